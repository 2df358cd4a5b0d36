"""kvmwake: a fast, deterministic model of how Linux KVM blocks, polls, kicks and wakes vCPUs.

    import kvmwake as kw
    from kvmwake import guest as g

    vm = kw.VM(arch="arm64", nr_vcpus=2, host_cpus=2, seed=1)
    vm.enable_cap(kw.Cap.HALT_POLL, 100_000)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(20_000), g.wake_random_other(), g.wfi()])])
    vm.run(until_ns=10_000_000)
    vm.stats()["halt_successful_poll"]
    print(vm.trace_text())
"""

__version__ = "0.1.0"

from . import guest, model, uapi, vmm  # noqa: E402
from .errors import EngineError, KvmError, ProgramError, ScenarioError, SnapshotError  # noqa: E402
from .host import Host  # noqa: E402
from .model import Request  # noqa: E402
from .uapi import (  # noqa: E402
    Cap, ExitReason, KvmReg, MpState, PsciFn, PsciRet, PsciVersion, SystemEventType,
    VcpuFeature,
)
from .vm import VCpu, VM  # noqa: E402

__all__ = [
    "Host", "VM", "VCpu", "Cap", "ExitReason", "KvmReg", "MpState", "PsciFn", "PsciRet",
    "PsciVersion", "SystemEventType", "VcpuFeature", "Request", "KvmError", "ProgramError", "EngineError",
    "ScenarioError", "SnapshotError", "guest", "model", "uapi", "vmm",
    "__version__",
]
