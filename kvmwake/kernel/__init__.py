"""Drive and read the real KVM: micro-VMs, tracefs, binary stats, trace replay."""
