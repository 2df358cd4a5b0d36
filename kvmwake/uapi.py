"""KVM and PSCI userspace constants: the one home of the numbers kvmwake speaks.

Each group cites the header it comes from; values are those of the merged
kernel (v6.17 unless a comment says otherwise).  ``tests/test_uapi.py`` checks
them against the spec and the core's compiled-in mirrors.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


# --- include/uapi/linux/kvm.h: exit reasons ---------------------------------------

class ExitReason(IntEnum):
    """``KVM_EXIT_*`` (include/uapi/linux/kvm.h)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37
    LOONGARCH_IOCSR = 38
    MEMORY_FAULT = 39
    TDX = 40


class SystemEventType(IntEnum):
    """``KVM_SYSTEM_EVENT_*``: ``run->system_event.type`` (include/uapi/linux/kvm.h)."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6
    TDX_FATAL = 7


#: arch/arm64/include/uapi/asm/kvm.h: ``system_event.data[0]`` flags.
KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2 = 1 << 0
KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2 = 1 << 0


class MpState(IntEnum):
    """``KVM_MP_STATE_*`` (include/uapi/linux/kvm.h)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


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


# --- ioctl numbers: include/uapi/asm-generic/ioctl.h encoding ----------------------

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr, size):
    return _ioc(_IOC_READ, nr, size)


def _iow(nr, size):
    return _ioc(_IOC_WRITE, nr, size)


#: sizeof of the argument structs.
SIZEOF_KVM_MP_STATE = 4          # struct kvm_mp_state { __u32 mp_state; }
SIZEOF_KVM_ENABLE_CAP = 104      # __u32 cap, flags; __u64 args[4]; __u8 pad[64]
SIZEOF_KVM_ONE_REG = 16          # __u64 id, addr
SIZEOF_KVM_MSI = 32              # __u32 address_lo, address_hi, data, flags, devid; __u8 pad[12]
SIZEOF_KVM_IRQ_LEVEL = 8         # __u32 irq; __u32 level


class Ioctl(IntEnum):
    """ioctl request numbers (include/uapi/linux/kvm.h)."""

    GET_API_VERSION = _io(0x00)
    CREATE_VM = _io(0x01)
    CHECK_EXTENSION = _io(0x03)
    GET_VCPU_MMAP_SIZE = _io(0x04)
    CREATE_VCPU = _io(0x41)
    SET_TSS_ADDR = _io(0x47)
    CREATE_IRQCHIP = _io(0x60)
    IRQ_LINE = _iow(0x61, SIZEOF_KVM_IRQ_LEVEL)
    RUN = _io(0x80)
    GET_MP_STATE = _ior(0x98, SIZEOF_KVM_MP_STATE)
    SET_MP_STATE = _iow(0x99, SIZEOF_KVM_MP_STATE)
    ENABLE_CAP = _iow(0xA3, SIZEOF_KVM_ENABLE_CAP)
    SIGNAL_MSI = _iow(0xA5, SIZEOF_KVM_MSI)
    GET_ONE_REG = _iow(0xAB, SIZEOF_KVM_ONE_REG)
    SET_ONE_REG = _iow(0xAC, SIZEOF_KVM_ONE_REG)
    GET_STATS_FD = _io(0xCE)


# --- include/uapi/linux/psci.h ----------------------------------------------------------

PSCI_0_2_FN_BASE = 0x84000000
PSCI_0_2_64BIT = 0x40000000
PSCI_0_2_FN64_BASE = PSCI_0_2_FN_BASE + PSCI_0_2_64BIT


class PsciFn(IntEnum):
    """PSCI function IDs, 32-bit (``PSCI_x_y_FN_*``) and 64-bit (``*_FN64_*``)."""

    PSCI_VERSION = PSCI_0_2_FN_BASE + 0
    CPU_SUSPEND = PSCI_0_2_FN_BASE + 1
    CPU_OFF = PSCI_0_2_FN_BASE + 2
    CPU_ON = PSCI_0_2_FN_BASE + 3
    AFFINITY_INFO = PSCI_0_2_FN_BASE + 4
    MIGRATE = PSCI_0_2_FN_BASE + 5
    MIGRATE_INFO_TYPE = PSCI_0_2_FN_BASE + 6
    MIGRATE_INFO_UP_CPU = PSCI_0_2_FN_BASE + 7
    SYSTEM_OFF = PSCI_0_2_FN_BASE + 8
    SYSTEM_RESET = PSCI_0_2_FN_BASE + 9
    PSCI_FEATURES = PSCI_0_2_FN_BASE + 10
    CPU_FREEZE = PSCI_0_2_FN_BASE + 11
    CPU_DEFAULT_SUSPEND = PSCI_0_2_FN_BASE + 12
    NODE_HW_STATE = PSCI_0_2_FN_BASE + 13
    SYSTEM_SUSPEND = PSCI_0_2_FN_BASE + 14
    SET_SUSPEND_MODE = PSCI_0_2_FN_BASE + 15
    STAT_RESIDENCY = PSCI_0_2_FN_BASE + 16
    STAT_COUNT = PSCI_0_2_FN_BASE + 17
    SYSTEM_RESET2 = PSCI_0_2_FN_BASE + 18
    MEM_PROTECT = PSCI_0_2_FN_BASE + 19
    MEM_PROTECT_CHECK_RANGE = PSCI_0_2_FN_BASE + 20
    SYSTEM_OFF2 = PSCI_0_2_FN_BASE + 21

    FN64_CPU_SUSPEND = PSCI_0_2_FN64_BASE + 1
    FN64_CPU_ON = PSCI_0_2_FN64_BASE + 3
    FN64_AFFINITY_INFO = PSCI_0_2_FN64_BASE + 4
    FN64_MIGRATE = PSCI_0_2_FN64_BASE + 5
    FN64_MIGRATE_INFO_UP_CPU = PSCI_0_2_FN64_BASE + 7
    FN64_CPU_DEFAULT_SUSPEND = PSCI_0_2_FN64_BASE + 12
    FN64_NODE_HW_STATE = PSCI_0_2_FN64_BASE + 13
    FN64_SYSTEM_SUSPEND = PSCI_0_2_FN64_BASE + 14
    FN64_STAT_RESIDENCY = PSCI_0_2_FN64_BASE + 16
    FN64_STAT_COUNT = PSCI_0_2_FN64_BASE + 17
    FN64_SYSTEM_RESET2 = PSCI_0_2_FN64_BASE + 18
    FN64_MEM_PROTECT_CHECK_RANGE = PSCI_0_2_FN64_BASE + 20
    FN64_SYSTEM_OFF2 = PSCI_0_2_FN64_BASE + 21


#: include/linux/arm-smccc.h: ``ARM_SMCCC_VERSION_FUNC_ID``.
ARM_SMCCC_VERSION_FUNC_ID = 0x80000000

#: include/kvm/arm_psci.h: KVM's private PSCI 0.1 function IDs.
KVM_PSCI_FN_BASE = 0x95C1BA5E
KVM_PSCI_FN_CPU_SUSPEND = KVM_PSCI_FN_BASE + 0
KVM_PSCI_FN_CPU_OFF = KVM_PSCI_FN_BASE + 1
KVM_PSCI_FN_CPU_ON = KVM_PSCI_FN_BASE + 2
KVM_PSCI_FN_MIGRATE = KVM_PSCI_FN_BASE + 3


class PsciRet(IntEnum):
    """``PSCI_RET_*`` (include/uapi/linux/psci.h); x0 holds them as u64."""

    SUCCESS = 0
    NOT_SUPPORTED = -1
    INVALID_PARAMS = -2
    DENIED = -3
    ALREADY_ON = -4
    ON_PENDING = -5
    INTERNAL_FAILURE = -6
    NOT_PRESENT = -7
    DISABLED = -8
    INVALID_ADDRESS = -9


class AffinityInfo(IntEnum):
    """``PSCI_0_2_AFFINITY_LEVEL_*``: AFFINITY_INFO results."""

    ON = 0
    OFF = 1
    ON_PENDING = 2


#: MIGRATE_INFO_TYPE's answer: ``PSCI_0_2_TOS_MP``.
PSCI_0_2_TOS_MP = 2
#: PSCI_FEATURES(SYSTEM_OFF2): ``PSCI_1_3_OFF_TYPE_HIBERNATE_OFF``.
PSCI_1_3_OFF_TYPE_HIBERNATE_OFF = 1 << 0
PSCI_1_1_RESET_TYPE_SYSTEM_WARM_RESET = 0
PSCI_1_1_RESET_TYPE_VENDOR_START = 0x80000000


def psci_version(major: int, minor: int) -> int:
    """``PSCI_VERSION(maj, min)``."""
    return ((major & 0x7FFF) << 16) | (minor & 0xFFFF)


class PsciVersion(IntEnum):
    """``KVM_ARM_PSCI_*`` (include/kvm/arm_psci.h)."""

    V0_1 = psci_version(0, 1)
    V0_2 = psci_version(0, 2)
    V1_0 = psci_version(1, 0)
    V1_1 = psci_version(1, 1)
    V1_2 = psci_version(1, 2)
    V1_3 = psci_version(1, 3)


#: ``KVM_ARM_PSCI_LATEST`` in v6.17.
KVM_ARM_PSCI_LATEST = PsciVersion.V1_3
#: arch/arm64/include/asm/cputype.h: ``MPIDR_HWID_BITMASK``.
MPIDR_HWID_BITMASK = 0xFF00FFFFFF

# --- arch/arm64/include/uapi/asm/kvm.h: vCPU init features ----------------------------------

KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2


class VcpuFeature(IntEnum):
    """``KVM_ARM_VCPU_*``: bit numbers of ``struct kvm_vcpu_init.features[0]``
    (arch/arm64/include/uapi/asm/kvm.h; HAS_EL2_E2H0 since v6.13)."""

    POWER_OFF = 0
    EL1_32BIT = 1
    PSCI_0_2 = 2
    PMU_V3 = 3
    SVE = 4
    PTRAUTH_ADDRESS = 5
    PTRAUTH_GENERIC = 6
    HAS_EL2 = 7
    HAS_EL2_E2H0 = 8


def vcpu_features(*bits: int) -> int:
    """``features[0]`` with the given ``VcpuFeature`` bits set."""
    out = 0
    for b in bits:
        out |= 1 << int(b)
    return out


#: arch/arm64/include/asm/kvm_host.h: ``KVM_VCPU_MAX_FEATURES`` (9 since v6.13).
KVM_VCPU_MAX_FEATURES = 9
#: ``KVM_VCPU_VALID_FEATURES``: a bit outside it is ENOENT.
KVM_VCPU_VALID_FEATURES = (1 << KVM_VCPU_MAX_FEATURES) - 1
#: What ``system_supported_vcpu_features()`` leaves on kvmwake's modelled host: no
#: AArch32 EL1, PMU, SVE, pointer authentication or nested virtualisation (a valid
#: bit outside this set is EINVAL, as on a host without the feature).  POWER_OFF is
#: ephemeral and never stored.
SUPPORTED_VCPU_FEATURES = vcpu_features(VcpuFeature.POWER_OFF, VcpuFeature.PSCI_0_2)
#: ``KVM_ARM_TARGET_GENERIC_V8``: the one ``struct kvm_vcpu_init.target`` accepted
#: (``KVM_ARM_PREFERRED_TARGET`` answers it).
KVM_ARM_TARGET_GENERIC_V8 = 5
#: The features ``VCpu.init`` passes by default: PSCI 0.2+, as QEMU and the PSCI
#: selftest do.
DEFAULT_VCPU_FEATURES = vcpu_features(VcpuFeature.PSCI_0_2)

# --- arch/arm64/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h: ONE_REG IDs ----------------

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_ARM_COPROC_SHIFT = 16
#: ``KVM_REG_ARM_CORE``: the coprocessor field of ``struct kvm_regs`` registers.
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
#: ``KVM_REG_ARM64_SYSREG``.
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
#: ``KVM_REG_ARM_FW``: firmware pseudo-registers.
KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT


def arm64_core_reg(u32_offset: int) -> int:
    """``ARM64_CORE_REG(x)``: ``KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
    KVM_REG_ARM_CORE_REG(x)``, with ``x``'s offset in ``struct kvm_regs`` in u32 words."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | u32_offset


def arm64_sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """``ARM64_SYS_REG(op0, op1, crn, crm, op2)``."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | op0 << 14 | op1 << 11
            | crn << 7 | crm << 3 | op2)


class KvmReg(IntEnum):
    """The arm64 ONE_REG IDs kvmwake models (``KVM_GET/SET_ONE_REG``).

    Core registers: ``struct user_pt_regs`` is ``regs[31]``, ``sp`` (SP_EL0),
    ``pc``, ``pstate``, each a u64, so xN is u32 offset 2N, SP 62, PC 64,
    PSTATE 66.  MPIDR_EL1 is ``SYS_MPIDR_EL1`` (op0 3, op1 0, CRn 0, CRm 0,
    op2 5).  ``PSCI_VERSION`` is ``KVM_REG_ARM_PSCI_VERSION`` =
    ``KVM_REG_ARM_FW_REG(0)``.
    """

    X0 = arm64_core_reg(0)
    X1 = arm64_core_reg(2)
    X2 = arm64_core_reg(4)
    X3 = arm64_core_reg(6)
    X4 = arm64_core_reg(8)
    X5 = arm64_core_reg(10)
    X6 = arm64_core_reg(12)
    X7 = arm64_core_reg(14)
    X8 = arm64_core_reg(16)
    X9 = arm64_core_reg(18)
    X10 = arm64_core_reg(20)
    X11 = arm64_core_reg(22)
    X12 = arm64_core_reg(24)
    X13 = arm64_core_reg(26)
    X14 = arm64_core_reg(28)
    X15 = arm64_core_reg(30)
    X16 = arm64_core_reg(32)
    X17 = arm64_core_reg(34)
    X18 = arm64_core_reg(36)
    X19 = arm64_core_reg(38)
    X20 = arm64_core_reg(40)
    X21 = arm64_core_reg(42)
    X22 = arm64_core_reg(44)
    X23 = arm64_core_reg(46)
    X24 = arm64_core_reg(48)
    X25 = arm64_core_reg(50)
    X26 = arm64_core_reg(52)
    X27 = arm64_core_reg(54)
    X28 = arm64_core_reg(56)
    X29 = arm64_core_reg(58)
    X30 = arm64_core_reg(60)
    SP = arm64_core_reg(62)
    PC = arm64_core_reg(64)
    PSTATE = arm64_core_reg(66)
    MPIDR_EL1 = arm64_sys_reg(3, 0, 0, 0, 5)
    PSCI_VERSION = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | 0


#: ``KVM_REG_ARM_PSCI_VERSION`` (0x6030000000140000).
KVM_REG_ARM_PSCI_VERSION = KvmReg.PSCI_VERSION
#: arch/arm64/include/uapi/asm/ptrace.h and arch/arm64/kvm/reset.c.
PSR_MODE_EL0t = 0x0
PSR_MODE_EL1t = 0x4
PSR_MODE_EL1h = 0x5
PSR_I_BIT = 0x80
#: ``VCPU_RESET_PSTATE_EL1``: EL1h with D, A, I and F set.
VCPU_RESET_PSTATE_EL1 = 0x3C5
#: ``PSR_AA32_MODE_MASK``: the mode field ``set_core_reg`` checks.
PSR_AA32_MODE_MASK = 0x1F

# --- arch/arm64/include/uapi/asm/kvm.h: vGICv3 device attributes -----------------------------

KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
#: include/linux/irqchip/arm-gic-v3.h: ``GICD_CTLR_ENABLE_SS_G1``, ``GICD_CTLR_ARE_NS``,
#: ``GICD_CTLR_DS``.
GICD_CTLR_ENABLE_SS_G1 = 1 << 1
GICD_CTLR_ARE_NS = 1 << 4
GICD_CTLR_DS = 1 << 6

# --- include/kvm/arm_vgic.h ----------------------------------------------------------------------

VGIC_NR_SGIS = 16
VGIC_NR_PPIS = 16
VGIC_NR_PRIVATE_IRQS = 32
VGIC_MAX_SPI = 1019
VGIC_MAX_RESERVED = 1023
VGIC_V3_MAX_CPUS = 512
#: include/kvm/arm_arch_timer.h defaults: the virtual and physical EL1 timer PPIs.
ARCH_TIMER_VTIMER_IRQ = 27
ARCH_TIMER_PTIMER_IRQ = 30
#: include/clocksource/arm_arch_timer.h: CNT{V,P}_CTL bits.
ARCH_TIMER_CTRL_ENABLE = 1 << 0
ARCH_TIMER_CTRL_IT_MASK = 1 << 1
ARCH_TIMER_CTRL_IT_STAT = 1 << 2

# --- include/linux/kvm_host.h: halt polling --------------------------------------------------

#: KVM_HALT_POLL_NS_DEFAULT per architecture.
KVM_HALT_POLL_NS_DEFAULT = {"arm64": 500_000, "x86": 200_000}


class StatsFlag(IntFlag):
    """``KVM_STATS_*`` descriptor flags (include/uapi/linux/kvm.h)."""

    TYPE_CUMULATIVE = 0x0
    TYPE_INSTANT = 0x1
    TYPE_PEAK = 0x2
    TYPE_LINEAR_HIST = 0x3
    TYPE_LOG_HIST = 0x4
    UNIT_NONE = 0x00
    UNIT_BYTES = 0x10
    UNIT_SECONDS = 0x20
    UNIT_CYCLES = 0x30
    UNIT_BOOLEAN = 0x40
    BASE_POW10 = 0x000
    BASE_POW2 = 0x100


KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_UNIT_MASK = 0xF0
KVM_STATS_BASE_MASK = 0xF00
