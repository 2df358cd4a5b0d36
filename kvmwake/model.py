"""The engine's shared vocabulary: op codes, thread states, events, stat layout, costs.

Both engines (the Cython core ``kvmwake._core`` and the plain-Python
``kvmwake.reference``) use exactly these numbers; ``tests/test_core_mirrors.py``
checks that the core's compiled-in copies agree with this module.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

# --------------------------------------------------------------------------
# Guest program ops.  A program is an array of OP_DTYPE records interpreted by
# the engine; see kvmwake.guest for the builder and the validation rules.


class Op(IntEnum):
    END = 0           #: the program ends; the vCPU thread leaves KVM_RUN
    COMPUTE = 1       #: run guest code for a drawn time (dist, p0, p1)
    WFI = 2           #: WFI (arm64) / HLT (x86): trap and kvm_vcpu_halt
    SGI = 3           #: send SGI / IPI ``arg`` to targets (dist = WakeTarget, p0, p1)
    WAKE = 3          #: the same op under its first name
    LOOP = 4          #: loop head: arg = counter slot, p0 = count (0: forever)
    ENDLOOP = 5       #: loop tail: arg = index of the LOOP op, p0 = count, p1 = slot
    IRQ_ENABLE = 6    #: GICD/GICR ISENABLER: enable INTID ``arg`` (traps)
    IRQ_DISABLE = 7   #: GICD/GICR ICENABLER: disable INTID ``arg`` (traps)
    SET_PRIORITY = 8  #: IPRIORITYR: INTID ``arg`` gets priority p0 (traps)
    SET_PMR = 9       #: ICC_PMR_EL1 = p0 (arm64) / TPR = p0 (x86); no trap
    MASK = 10         #: PSTATE.I = 1 / cli
    UNMASK = 11       #: PSTATE.I = 0 / sti
    SET_HANDLER = 12  #: the guest's interrupt handler runs for p0 ns from now on (arg 1: no iret)
    TIMER_ARM = 13    #: CNTV_CVAL = now + drawn delay, CNTV_CTL = ENABLE; arg = re-arm period
    TIMER_CANCEL = 14  #: CNTV_CTL.ENABLE = 0
    DIST_ENABLE = 15  #: GICD_CTLR: distributor enable = p0 (traps)
    ROUTE_SPI = 16    #: GICD_IROUTER<arg> = p0 (an MPIDR; traps)
    HVC = 17          #: an SMCCC call (PSCI) with x0..x3 as they are (traps)
    SET_REG = 18      #: x<arg> = p0 (arg 0..3); no trap
    SYNC = 19         #: the selftests' GUEST_SYNC: exit to userspace with x<arg>, or p0 if arg = 255
    # 20-31 are reserved.


class HostOp(IntEnum):
    """Host-thread program ops (``kvmwake.hostprog``), in the same op table as the
    guest's but with codes of their own: a host thread never runs a guest op."""

    END = 32          #: the thread exits (do_exit): it leaves its CPU for good
    COMPUTE = 33      #: run on its host CPU for a drawn time (dist, p0, p1); preemptible
    SLEEP = 34        #: sleep a drawn time (dist, p0, p1): dequeued, an hrtimer wakes it
    MSI = 35          #: x86 KVM_SIGNAL_MSI / irqfd: vector ``arg`` to vCPU p1 of VM p0
    IRQ = 36          #: arm64 irqfd: SPI ``arg`` of VM p0 pulsed (level 1, then 0)
    LOOP = 37         #: loop head: arg = counter slot, p0 = count (0: forever)
    ENDLOOP = 38      #: loop tail: arg = index of the LOOP op, p0 = count, p1 = slot
    SLEEP_UNTIL = 39  #: clock_nanosleep(TIMER_ABSTIME): the deadline moves on by a draw


#: Thread kinds of the engine's thread table: a vCPU thread, or a host thread
#: (a thread of the host that is not a vCPU: a device or injector thread, load).
THREAD_VCPU, THREAD_HOST = 0, 1
#: A host thread's VM index (it has none).
NO_VM = 0xFFFF_FFFF
#: The "VM index" a host thread's random stream is derived with (stream = its
#: index among the host threads), so that no vCPU or source stream changes.
HOST_STREAM_VM = 0xFFFF_FFFF

#: A host thread's stats row (its own counters, in place of the halt stats):
#: ns on its CPU (sum_exec_runtime), ns runnable waiting for it (schedstat
#: wait_sum, the context switch included), ns asleep, times it got its CPU
#: (nr_switches in), times it was preempted (nivcsw), sleeps (nvcsw), injections.
HS_RUN_NS, HS_WAIT_NS, HS_SLEEP_NS, HS_NR_RUNS, HS_NR_PREEMPTED, HS_NR_SLEEPS, \
    HS_NR_INJECTS = range(7)
HOST_STAT_NAMES = ("run_ns", "wait_ns", "sleep_ns", "nr_runs", "nr_preempted", "nr_sleeps",
                   "nr_injects")


#: Ops that trap to KVM (a VM exit before, a VM entry after).
TRAPPING_OPS = frozenset({Op.WFI, Op.SGI, Op.IRQ_ENABLE, Op.IRQ_DISABLE, Op.SET_PRIORITY,
                          Op.DIST_ENABLE, Op.ROUTE_SPI, Op.HVC, Op.SYNC})
#: Ops that act at an instant without trapping (system registers, PSTATE).
INSTANT_OPS = frozenset({Op.SET_PMR, Op.MASK, Op.UNMASK, Op.SET_HANDLER, Op.TIMER_ARM,
                         Op.TIMER_CANCEL, Op.SET_REG})
#: SYNC's ``arg`` meaning "the immediate p0".
SYNC_IMMEDIATE = 255


class Dist(IntEnum):
    FIXED = 0        #: p0 ns
    EXPONENTIAL = 1  #: mean p0 ns, rounded to the nearest ns
    UNIFORM = 2      #: integer ns uniform in [p0, p1]


class WakeTarget(IntEnum):
    VCPU = 0          #: the vCPU whose id is p0
    RANDOM_OTHER = 1  #: a uniformly drawn other vCPU of the same VM
    NEXT = 2          #: vcpu_id + 1 modulo the VM's vCPU count
    LIST = 3          #: vCPUs p1 + i for every bit i set in the 64-bit mask p0
    ALL_BUT_SELF = 4  #: every other vCPU of the VM


#: SGI op ``arg`` meaning "the arch's reschedule IPI" (arm64 SGI 0, x86 vector 0xFD).
IPI_RESCHEDULE = 0xFFFF_FFFF
RESCHEDULE_IRQ = {"arm64": 0, "x86": 0xFD}
#: What a VM's periodic tick raises: arm64 PPI 30 (edge), x86 LOCAL_TIMER_VECTOR.
TICK_IRQ = {"arm64": 30, "x86": 0xEC}

OP_DTYPE = np.dtype([("code", "<u2"), ("dist", "<u2"), ("arg", "<u4"),
                     ("p0", "<u8"), ("p1", "<u8")])
#: Nesting depth of loops (counter slots per vCPU).
MAX_LOOP_DEPTH = 4
#: Latest clock an engine state may hold (snapshots are checked against it).
MAX_NOW = 1 << 62
#: Latest time of an event, a segment's end or a timer in a state.  Runs end by
#: MAX_NOW and add at most a span to the clock, so they stay below it, and a uint64
#: holds it with room to spare.
MAX_TIME = 3 << 62
#: Longest span a state holds (what is left of a preempted or interrupted segment, an
#: interrupt handler's time): a duration (at most 2**62, a random draw's limit) plus
#: costs (each at most 2**40).
MAX_SPAN = (1 << 62) + (1 << 48)
#: Sequence numbers an engine hands out: events are keyed (class << 56) | sequence,
#: and past this a run stops with an error instead of reaching the class bits.
MAX_SEQ = 1 << 55
#: An event's key is (event class << SEQ_BITS) | sequence number.
SEQ_BITS = 56
#: The event queue's bucket 0 spans a window of 2**QUEUE_SHIFT ns of the clock (a
#: binary heap); the other buckets, one per higher bit in which an event's window
#: differs from the base's, are unordered.
QUEUE_SHIFT = 6
#: Longest program accepted.
MAX_PROGRAM_OPS = 1 << 20
#: Ops one vCPU may execute at one instant of virtual time before the engine
#: declares that its program makes no progress.
MAX_OPS_PER_INSTANT = 100_000

# --------------------------------------------------------------------------
# vCPU thread states (what the host scheduler sees; MP state is separate).


class ThreadState(IntEnum):
    USER = 0      #: not in KVM_RUN
    RUNNING = 1   #: on its host CPU: guest code or host work (exit, entry, trap)
    POLLING = 2   #: in kvm_vcpu_halt's poll loop, on its host CPU
    BLOCKED = 3   #: in kvm_vcpu_block, waiting on its rcuwait
    RUNNABLE = 4  #: woken or preempted, waiting for its host CPU


#: What a thread does when it next gets its host CPU: enter the guest (KVM_RUN's
#: loop), go on halting, go on with a preempted segment, or go on sleeping
#: (kvm_vcpu_sleep of a STOPPED vCPU).
RESUME_START, RESUME_HALT, RESUME_SEGMENT, RESUME_SLEEP = 0, 1, 2, 3

#: Why a vCPU is in kvm_vcpu_halt: a trapped WFI/HLT, KVM_MP_STATE_SUSPENDED
#: (kvm_vcpu_suspend), PSCI CPU_SUSPEND, or x86 KVM_MP_STATE_HALTED set by userspace.
HALT_WFI, HALT_SUSPEND, HALT_CPU_SUSPEND, HALT_MP_HALTED = 0, 1, 2, 3

#: Where guest programs live: op i is at guest address CODE_BASE[arch] + 4 * i,
#: inside guest memory [MEM_BASE, MEM_BASE + memory size).
MEM_BASE = {"arm64": 0x4000_0000, "x86": 0x10_0000}
DEFAULT_MEM_SIZE = 256 << 20

#: ucall kinds of an MMIO exit (the selftests' UCALL_SYNC, UCALL_DONE).
UCALL_SYNC, UCALL_DONE = 1, 2

#: What happens when a timed segment ends: go on with the program, halt,
#: carry out the trapping op at pc, leave KVM_RUN, take interrupts after an
#: IPI, end an interrupt handler (EOI).
CONT_NEXT, CONT_HALT, CONT_TRAP, CONT_END, CONT_IRQ, CONT_EOI = 0, 1, 2, 3, 4, 5

# --------------------------------------------------------------------------
# Events.  The heap orders by (time, class, sequence); lower class first at
# equal times.  External wake sources come first, so that a wake that lands
# on the instant a poll window ends is seen by the poll.


class EventClass(IntEnum):
    TICK = 0      #: a VM's periodic tick fires
    SOURCE = 1    #: a device interrupt source fires
    TIMER = 2     #: a vCPU's virtual timer reaches CVAL
    SEGMENT = 3   #: a thread's timed segment ends
    POLL_END = 4  #: a poll window ends without a wake-up
    RUN = 5       #: a thread gets its host CPU
    SLICE = 6     #: a running thread's time slice ends


# --------------------------------------------------------------------------
# Interrupt controller model (arm64 vGICv3 subset, x86 LAPIC subset).

NR_INTIDS = 1024               #: INTID space held in bitmaps (16 words of 64)
NR_PRIVATE_IRQS = 32
MAX_NR_SPIS = 988              #: SPIs 32..1019 (VGIC_MAX_SPI)
DEFAULT_NR_SPIS = 224          #: VGIC_NR_IRQS_LEGACY (256) - 32
VGIC_PRI_MASK = 0xF8           #: 5 priority bits (VGIC_PRI_BITS), the low 3 read as 0
GIC_DEFAULT_PRIORITY = 0xA0    #: Linux's GICD_INT_DEF_PRI
GIC_DEFAULT_PMR = 0xF0         #: Linux's DEFAULT_PMR_VALUE
VTIMER_IRQ = 27                #: the virtual timer PPI
ARCH_TIMER_CTRL_ENABLE = 1
ARCH_TIMER_CTRL_IT_MASK = 2
#: Interrupts one vCPU may take at one instant (handler time 0) before the
#: engine declares an interrupt storm.
MAX_TAKES_PER_INSTANT = 4096


class SourceKind(IntEnum):
    PERIODIC = 0   #: every p0 ns from p1
    POISSON = 1    #: exponential inter-arrival times of mean p0 ns
    TRACE = 2      #: at the given absolute times


def mpidr_of(vcpu_id: int) -> int:
    """Affinity fields of a vCPU's MPIDR_EL1 (reset_mpidr: 16 vCPUs per Aff0)."""
    return (vcpu_id & 0xF) | (((vcpu_id >> 4) & 0xFF) << 8) | (((vcpu_id >> 12) & 0xFF) << 16)


def vcpu_of_mpidr(mpidr: int, nr_vcpus: int) -> int:
    """kvm_mpidr_to_vcpu on IROUTER bits [23:0]: the vCPU id, or -1."""
    mpidr &= 0xFFFFFF
    aff0 = mpidr & 0xFF
    if aff0 >= 16:
        return -1
    vid = aff0 | (((mpidr >> 8) & 0xFF) << 4) | (((mpidr >> 16) & 0xFF) << 12)
    return vid if vid < nr_vcpus and mpidr_of(vid) == mpidr else -1


# --------------------------------------------------------------------------
# vCPU requests (include/linux/kvm_host.h, arch/arm64/include/asm/kvm_host.h).

KVM_REQUEST_MASK = 0xFF
KVM_REQUEST_NO_WAKEUP = 1 << 8
KVM_REQUEST_WAIT = 1 << 9
KVM_REQUEST_NO_ACTION = 1 << 10
KVM_REQUEST_ARCH_BASE = 8


class Request(IntEnum):
    """Request numbers with their flag bits, as the kernel defines them."""

    TLB_FLUSH = 0 | KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP
    VM_DEAD = 1 | KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP
    UNBLOCK = 2
    DIRTY_RING_SOFT_FULL = 3
    # arm64: KVM_ARCH_REQ_FLAGS(nr, flags) = (nr + KVM_REQUEST_ARCH_BASE) | flags
    SLEEP = (0 + KVM_REQUEST_ARCH_BASE) | KVM_REQUEST_WAIT | KVM_REQUEST_NO_WAKEUP
    IRQ_PENDING = 1 + KVM_REQUEST_ARCH_BASE
    VCPU_RESET = 2 + KVM_REQUEST_ARCH_BASE
    SUSPEND = 6 + KVM_REQUEST_ARCH_BASE


#: The request an injection makes before its kick: arm64 KVM_REQ_IRQ_PENDING,
#: x86 KVM_REQ_EVENT (KVM_ARCH_REQ(6)).
INJECT_REQUEST = {"arm64": Request.IRQ_PENDING, "x86": 6 + KVM_REQUEST_ARCH_BASE}


# --------------------------------------------------------------------------
# Per-vCPU stats, in the kernel's binary-stats order
# (KVM_GENERIC_VCPU_STATS in include/linux/kvm_host.h), then the arch's
# trap counter (x86 "halt_exits", arm64 "wfi_exit_stat").

HALT_POLL_HIST_COUNT = 32

STAT_COUNTERS = ("halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid",
                 "halt_wakeup", "halt_poll_success_ns", "halt_poll_fail_ns",
                 "halt_wait_ns")
STAT_HISTOGRAMS = ("halt_poll_success_hist", "halt_poll_fail_hist", "halt_wait_hist")

S_SUCCESSFUL_POLL = 0
S_ATTEMPTED_POLL = 1
S_POLL_INVALID = 2
S_WAKEUP = 3
S_POLL_SUCCESS_NS = 4
S_POLL_FAIL_NS = 5
S_WAIT_NS = 6
S_POLL_SUCCESS_HIST = 7
S_POLL_FAIL_HIST = S_POLL_SUCCESS_HIST + HALT_POLL_HIST_COUNT
S_WAIT_HIST = S_POLL_FAIL_HIST + HALT_POLL_HIST_COUNT
S_BLOCKING = S_WAIT_HIST + HALT_POLL_HIST_COUNT
S_HALT_EXITS = S_BLOCKING + 1
NR_STATS = S_HALT_EXITS + 1

#: Name of the arch trap counter at S_HALT_EXITS.
HALT_EXIT_STAT = {"arm64": "wfi_exit_stat", "x86": "halt_exits"}

# --------------------------------------------------------------------------
# Wake-latency histogram: HDR-style log-linear buckets, 2**LAT_SUB_BITS = 64
# sub-buckets per power of two.  Values 0..63 have a bucket each (exact); a
# value v >= 64 with e = floor(log2 v) goes to
#     64 + (e - 6) * 64 + ((v >> (e - 6)) & 63),
# a bucket [low, low + 2**(e - 6)) whose width is at most low / 64.  Any value
# placed in its bucket (a percentile interpolated inside it, see
# kvmwake.outputs.stats.latency_percentiles) is therefore within
# LAT_REL_ERROR = 1/64 (1.6%) of the true sample.  The kernel's own halt
# histograms (32 log2 buckets, the binary stats) are separate and unchanged.

LAT_SUB_BITS = 6
LAT_SUB = 1 << LAT_SUB_BITS
LAT_BUCKETS = LAT_SUB + (64 - LAT_SUB_BITS) * LAT_SUB
#: Bound on the relative error of a value read off the wake-latency histogram.
LAT_REL_ERROR = 1.0 / LAT_SUB


def lat_bucket(v: int) -> int:
    """The wake-latency bucket of ``v`` ns (twin of ``lat_bucket`` in core/halt.pxi)."""
    if v < LAT_SUB:
        return v
    e = v.bit_length() - 1
    return LAT_SUB + (e - LAT_SUB_BITS) * LAT_SUB + ((v >> (e - LAT_SUB_BITS)) & (LAT_SUB - 1))


def lat_bucket_low(i: int) -> int:
    """Smallest value that falls in bucket ``i``."""
    if i < LAT_SUB:
        return i
    e = (i - LAT_SUB) // LAT_SUB + LAT_SUB_BITS
    sub = (i - LAT_SUB) % LAT_SUB
    return (LAT_SUB + sub) << (e - LAT_SUB_BITS)


def lat_bucket_width(i: int) -> int:
    """Number of values bucket ``i`` holds (it covers [low, low + width))."""
    if i < LAT_SUB:
        return 1
    return 1 << ((i - LAT_SUB) // LAT_SUB)


# --------------------------------------------------------------------------
# Modelled host costs (ns), each a named parameter with a default.

COST_DEFAULTS = {
    "vm_exit_ns": 1_000,        # guest -> host transition (trap or IPI)
    "vm_entry_ns": 1_000,       # host -> guest transition
    "ipi_send_ns": 500,         # sender's cost to IPI a vCPU that is in guest mode
    "wake_to_run_ns": 5_000,    # try_to_wake_up to running, on an idle host CPU
    "context_switch_ns": 2_000,  # switching a host CPU to the next queued thread
    "sched_slice_ns": 750_000,  # time slice before a running thread is preempted (0: never)
}
COST_NAMES = tuple(COST_DEFAULTS)

# --------------------------------------------------------------------------
# The host scheduler (kvmwake/core/host.pxi): FIFO run queues with a fixed slice
# (``sched_slice_ns``), or Linux 6.18's fair class, EEVDF (kernel/sched/fair.c).

SCHEDULERS = ("fifo", "eevdf")
DEFAULT_SCHEDULER = "fifo"
#: TICK_NSEC at HZ=250 (the kernel of the recorded machines).
SCHED_TICK_NSEC = 4_000_000
#: normalized_sysctl_sched_base_slice (0.70 ms since Linux 6.15).
SCHED_BASE_SLICE_NS = 700_000


def sched_base_slice(ncpus: int) -> int:
    """sysctl_sched_base_slice on ``ncpus`` online CPUs: update_sysctl() with
    SCHED_TUNABLESCALING_LOG, 0.70 ms x (1 + ilog2(min(ncpus, 8)))."""
    return SCHED_BASE_SLICE_NS * (1 + (min(ncpus, 8).bit_length() - 1))


#: Default vCPU limit per VM (KVM_MAX_VCPUS with the arch's in-kernel irqchip).
MAX_VCPUS = {"arm64": 512, "x86": 1024}
ARCHES = ("arm64", "x86")

# --------------------------------------------------------------------------
# Trace records (see kvmwake.outputs.tracefmt for the text form).

TR_WAKEUP = 0
TR_HALT_POLL_NS = 1
