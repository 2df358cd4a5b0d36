"""KVM userspace API constants: the one home of the numbers kvmwake speaks.

Each group cites the header it comes from.  Values are those of the merged
kernel (``include/uapi/linux/kvm.h`` as of v6.17).
"""

from __future__ import annotations

from enum import IntEnum


class Cap(IntEnum):
    """``KVM_CAP_*`` (include/uapi/linux/kvm.h)."""

    IRQCHIP = 0
    HLT = 1
    MP_STATE = 14
    SIGNAL_MSI = 77
    ARM_PSCI = 87
    ARM_PSCI_0_2 = 102
    IMMEDIATE_EXIT = 136
    HALT_POLL = 182
    BINARY_STATS_FD = 203
    SYSTEM_EVENT_DATA = 215
    ARM_SYSTEM_SUSPEND = 216
