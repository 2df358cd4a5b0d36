# cython: language_level=3
"""kvmwake's simulation core: the block / kick / halt-poll path of KVM.

Mirrors: virt/kvm/kvm_main.c and arch/arm64/kvm/arm.c as a whole, piece by
piece below; the event loop (``run_loop``) stands in for the host's clock.
Twin: ``kvmwake/reference/engine.py`` (and the package ``kvmwake/reference/``).

One extension module: this file holds the engine's C state (declared in
``_core.pxd``), the ``Engine`` class and the run loop, and includes one piece
per kernel concern from ``core/``.  Each piece has a plain-Python twin of the
same name in ``kvmwake/reference/`` (``tests/test_layout.py`` keeps the pair
whole):

* ``core/rng.pxi``       per-vCPU random streams
* ``core/queue.pxi``     the event queue (time, class, sequence) with cancellation
* ``core/host.pxi``      host CPUs, run queues, time slices
* ``core/guest.pxi``     the guest program interpreter
* ``core/halt.pxi``      kvm_vcpu_halt / kvm_vcpu_block, halt stats, tracepoints
* ``core/run.pxi``       KVM_RUN's loop: entry, sleep, reset, exits to userspace
* ``core/psci.pxi``      PSCI as arch/arm64/kvm/psci.c emulates it
* ``core/gic.pxi``       the vGICv3 and LAPIC subsets, acknowledge and EOI
* ``core/timer.pxi``     the arm64 virtual timer
* ``core/kick.pxi``      kvm_vcpu_wake_up, kvm_vcpu_kick, requests, ticks, sources
* ``core/hostthread.pxi`` host threads that are not vCPUs: their programs
* ``core/snapshot.pxi``  engine state out and in, with the consistency checks
* ``core/bench.pxi``     micro-benchmark hooks (no part of the model)

The event loop runs without the GIL and creates no Python object per event.
The model is the one of ``kvmwake.reference`` (plain Python), event for event.
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, realloc, free

import concurrent.futures as _futures

import numpy as np
cimport numpy as cnp

from . import haltpoll as _haltpoll
from . import model as _model
from . import uapi as _uapi
from .model import COST_DEFAULTS as _COST_DEFAULTS
from .costs import DRAWN_COSTS as _DRAWN_COSTS
from .reference import EngineError, SOURCE_STREAM_BASE as _SOURCE_STREAM_BASE
from .reference import stream_seed as _model_stream_seed

cnp.import_array()

cdef extern from *:
    """
    #define KW_LCG_MULT 6364136223846793005ULL
    #define KW_MAX_DRAW_NS 4611686018427387904ULL
    #define KW_MAX_TIME 13835058055282163712ULL
    #define KW_SEQ_BITS 56
    #define KW_MAX_SEQ (1ULL << 55)
    #ifndef KVMWAKE_DEBUG
    #define KVMWAKE_DEBUG 0
    #endif
    #define KW_DEBUG KVMWAKE_DEBUG
    #define KW_CHECK_EVERY 1024
    #define KW_CHECKPOINT 1
    #define KW_COST_TABLE_N 257
    #define KW_COST_FRAC_BITS 24
    #define KW_COST_FRAC_MASK 0xFFFFFFULL
    #define KW_COST_STREAM_BASE 0xC0000000ULL
    """
    const uint64_t KW_LCG_MULT
    const uint64_t KW_MAX_DRAW_NS
    const uint64_t KW_MAX_TIME        # model.MAX_TIME (3 << 62)
    const uint64_t KW_SEQ_BITS
    const uint64_t KW_MAX_SEQ
    # The debug build (KVMWAKE_DEBUG=1, setup.py): run_loop stops every
    # KW_CHECK_EVERY events with KW_CHECKPOINT, and the engine checks its whole
    # state (_check_state) before it goes on.
    const int KW_DEBUG
    const uint64_t KW_CHECK_EVERY
    const int KW_CHECKPOINT
    # Costs with tails (kvmwake.costs: COST_TABLE_N, COST_FRAC_BITS; the cost
    # stream's number, reference.rng.COST_STREAM_BASE).
    const uint64_t KW_COST_TABLE_N
    const uint64_t KW_COST_FRAC_BITS
    const uint64_t KW_COST_FRAC_MASK
    const uint64_t KW_COST_STREAM_BASE
    int __builtin_clzll(unsigned long long x) nogil
    int __builtin_ctzll(unsigned long long x) nogil

# The numbers of kvmwake.model, compiled in (tests/test_core_mirrors.py checks them).
cdef enum:
    OP_END = 0
    OP_COMPUTE = 1
    OP_WFI = 2
    OP_SGI = 3
    OP_LOOP = 4
    OP_ENDLOOP = 5
    OP_IRQ_ENABLE = 6
    OP_IRQ_DISABLE = 7
    OP_SET_PRIORITY = 8
    OP_SET_PMR = 9
    OP_MASK = 10
    OP_UNMASK = 11
    OP_SET_HANDLER = 12
    OP_TIMER_ARM = 13
    OP_TIMER_CANCEL = 14
    OP_DIST_ENABLE = 15
    OP_ROUTE_SPI = 16
    OP_HVC = 17
    OP_SET_REG = 18
    OP_SYNC = 19

# Host-thread ops (model.HostOp), thread kinds, a host thread's stats row (model.HS_*).
cdef enum:
    HOP_END = 32
    HOP_COMPUTE = 33
    HOP_SLEEP = 34
    HOP_MSI = 35
    HOP_IRQ = 36
    HOP_LOOP = 37
    HOP_ENDLOOP = 38
    HOP_SLEEP_UNTIL = 39

cdef enum:
    THREAD_VCPU = 0
    THREAD_HOST = 1
    HS_RUN_NS = 0
    HS_WAIT_NS = 1
    HS_SLEEP_NS = 2
    HS_NR_RUNS = 3
    HS_NR_PREEMPTED = 4
    HS_NR_SLEEPS = 5
    HS_NR_INJECTS = 6

cdef extern from *:
    """
    #define KW_NO_VM 0xFFFFFFFFu
    """
    const uint32_t NO_VM "KW_NO_VM"

cdef enum:
    DIST_FIXED = 0
    DIST_EXPONENTIAL = 1
    DIST_UNIFORM = 2

cdef enum:
    WT_VCPU = 0
    WT_RANDOM_OTHER = 1
    WT_NEXT = 2
    WT_LIST = 3
    WT_ALL_BUT_SELF = 4

cdef enum:
    SRC_PERIODIC = 0
    SRC_POISSON = 1
    SRC_TRACE = 2

cdef enum:
    IPI_RESCHEDULE = 0xFFFFFFFF
    VTIMER_IRQ = 27
    VGIC_PRI_MASK = 0xF8
    ARCH_TIMER_CTRL_ENABLE = 1
    ARCH_TIMER_CTRL_IT_MASK = 2
    MAX_TAKES_PER_INSTANT = 4096
    GIC_DEFAULT_PRIORITY = 0xA0
    GIC_DEFAULT_PMR = 0xF0

cdef enum:
    TS_USER = 0
    TS_RUNNING = 1
    TS_POLLING = 2
    TS_BLOCKED = 3
    TS_RUNNABLE = 4

cdef enum:
    RESUME_START = 0
    RESUME_HALT = 1
    RESUME_SEGMENT = 2
    RESUME_SLEEP = 3

cdef enum:
    HALT_WFI = 0
    HALT_SUSPEND = 1
    HALT_CPU_SUSPEND = 2
    HALT_MP_HALTED = 3

# include/uapi/linux/kvm.h
cdef enum:
    MP_RUNNABLE = 0
    MP_UNINITIALIZED = 1
    MP_INIT_RECEIVED = 2
    MP_HALTED = 3
    MP_SIPI_RECEIVED = 4
    MP_STOPPED = 5
    MP_AP_RESET_HOLD = 9
    MP_SUSPENDED = 10
    EXIT_MMIO = 6
    EXIT_INTR = 10
    EXIT_INTERNAL_ERROR = 17
    EXIT_SYSTEM_EVENT = 24
    SYSTEM_EVENT_SHUTDOWN = 1
    SYSTEM_EVENT_RESET = 2
    SYSTEM_EVENT_WAKEUP = 4
    SYSTEM_EVENT_SUSPEND = 5
    UCALL_SYNC = 1
    UCALL_DONE = 2

# include/uapi/linux/psci.h, include/kvm/arm_psci.h, arch/arm64/kvm/psci.c
cdef extern from *:
    """
    #define KW_MPIDR_HWID_BITMASK 0xFF00FFFFFFULL
    #define KW_U32MASK 0xFFFFFFFFULL
    """
    const uint64_t MPIDR_HWID_BITMASK "KW_MPIDR_HWID_BITMASK"
    const uint64_t KW_U32MASK

cdef enum:
    PSCI_FN_PSCI_VERSION = 0x84000000
    PSCI_FN_CPU_SUSPEND = 0x84000001
    PSCI_FN_CPU_OFF = 0x84000002
    PSCI_FN_CPU_ON = 0x84000003
    PSCI_FN_AFFINITY_INFO = 0x84000004
    PSCI_FN_MIGRATE_INFO_TYPE = 0x84000006
    PSCI_FN_SYSTEM_OFF = 0x84000008
    PSCI_FN_SYSTEM_RESET = 0x84000009
    PSCI_FN_PSCI_FEATURES = 0x8400000A
    PSCI_FN_SYSTEM_SUSPEND = 0x8400000E
    PSCI_FN_SYSTEM_RESET2 = 0x84000012
    PSCI_FN_SYSTEM_OFF2 = 0x84000015
    PSCI_FN64_CPU_SUSPEND = 0xC4000001
    PSCI_FN64_CPU_ON = 0xC4000003
    PSCI_FN64_AFFINITY_INFO = 0xC4000004
    PSCI_FN64_SYSTEM_SUSPEND = 0xC400000E
    PSCI_FN64_SYSTEM_RESET2 = 0xC4000012
    PSCI_FN64_SYSTEM_OFF2 = 0xC4000015
    SMCCC_VERSION_FUNC_ID = 0x80000000
    KVM_PSCI_FN_CPU_OFF = 0x95C1BA5F
    KVM_PSCI_FN_CPU_ON = 0x95C1BA60
    PSCI_RESET_TYPE_VENDOR_START = 0x80000000
    PSCI_TOS_MP = 2
    PSCI_V0_1 = 0x1
    PSCI_V0_2 = 0x2
    PSCI_V1_0 = 0x10000

cdef enum:
    PSCI_RET_NOT_SUPPORTED = -1
    PSCI_RET_INVALID_PARAMS = -2
    PSCI_RET_ALREADY_ON = -4
    PSCI_RET_INTERNAL_FAILURE = -6

# arch/arm64/include/uapi/asm/ptrace.h, arch/arm64/kvm/reset.c
cdef enum:
    PSR_MODE_EL1h = 0x5
    PSR_I_BIT = 0x80
    VCPU_RESET_PSTATE_EL1 = 0x3c5          # PSR_MODE_EL1h | A | I | F | D
    KVM_ARM_VCPU_PSCI_0_2_BIT = 1 << 2     # BIT(KVM_ARM_VCPU_PSCI_0_2)

cdef enum:
    CONT_NEXT = 0
    CONT_HALT = 1
    CONT_TRAP = 2
    CONT_END = 3
    CONT_IRQ = 4
    CONT_EOI = 5

cdef enum:
    EV_TICK = 0
    EV_SOURCE = 1
    EV_TIMER = 2
    EV_SEGMENT = 3
    EV_POLL_END = 4
    EV_RUN = 5
    EV_SLICE = 6

cdef enum:
    KVM_REQUEST_MASK = 0xFF
    KVM_REQUEST_NO_WAKEUP = 0x100
    KVM_REQUEST_WAIT = 0x200
    KVM_REQUEST_NO_ACTION = 0x400
    REQ_UNBLOCK_BIT = 1 << 2
    REQ_SLEEP = 8 | 0x200 | 0x100          # KVM_ARCH_REQ_FLAGS(0, WAIT | NO_WAKEUP)
    REQ_SUSPEND = 6 + 8                    # KVM_ARCH_REQ(6)

cdef enum:
    HALT_POLL_HIST_COUNT = 32
    S_SUCCESSFUL_POLL = 0
    S_ATTEMPTED_POLL = 1
    S_POLL_INVALID = 2
    S_WAKEUP = 3
    S_POLL_SUCCESS_NS = 4
    S_POLL_FAIL_NS = 5
    S_WAIT_NS = 6
    S_POLL_SUCCESS_HIST = 7
    S_POLL_FAIL_HIST = 39
    S_WAIT_HIST = 71
    S_BLOCKING = 103
    S_HALT_EXITS = 104
    NR_STATS = 105

cdef enum:
    LAT_BUCKETS = 64 + 58 * 64     # model.LAT_BUCKETS (LAT_SUB_BITS = 6)
    MAX_OPS_PER_INSTANT = 100000
    PID_BASE = 1000
    TR_WAKEUP = 0
    TR_HALT_POLL_NS = 1

cdef enum:
    KW_OK = 0
    KW_ERR_NOMEM = 1
    KW_ERR_STALL = 2
    KW_ERR_STORM = 3
    KW_ERR_SEQ = 4            # the event sequence numbers ran out (KW_MAX_SEQ)

# The drawn costs (kvmwake.costs.DRAWN_COSTS, in order: rows of engine_t.cost_tab).
cdef enum:
    COST_VM_EXIT = 0
    COST_VM_ENTRY = 1
    COST_IPI_SEND = 2
    COST_WAKE_TO_RUN = 3
    COST_CONTEXT_SWITCH = 4
    NR_DRAWN_COSTS = 5

# The host scheduler (kvmwake.model.SCHEDULERS, in order); HZ=250's tick.
cdef enum:
    SCHED_POLICY_FIFO = 0
    SCHED_POLICY_EEVDF = 1
    SCHED_TICK_NSEC = 4000000

include "core/rng.pxi"
include "core/queue.pxi"
include "core/host.pxi"
include "core/guest.pxi"
include "core/halt.pxi"
include "core/run.pxi"
include "core/psci.pxi"
include "core/gic.pxi"
include "core/timer.pxi"
include "core/kick.pxi"
include "core/hostthread.pxi"


def compiled_constants():
    """The model numbers compiled into the core, for the mirror test."""
    return {
        "host_ops": (HOP_END, HOP_COMPUTE, HOP_SLEEP, HOP_MSI, HOP_IRQ, HOP_LOOP, HOP_ENDLOOP,
                     HOP_SLEEP_UNTIL),
        "thread_kinds": (THREAD_VCPU, THREAD_HOST),
        "host_stats": (HS_RUN_NS, HS_WAIT_NS, HS_SLEEP_NS, HS_NR_RUNS, HS_NR_PREEMPTED,
                       HS_NR_SLEEPS, HS_NR_INJECTS),
        "no_vm": NO_VM,
        "ops": (OP_END, OP_COMPUTE, OP_WFI, OP_SGI, OP_LOOP, OP_ENDLOOP, OP_IRQ_ENABLE,
                OP_IRQ_DISABLE, OP_SET_PRIORITY, OP_SET_PMR, OP_MASK, OP_UNMASK, OP_SET_HANDLER,
                OP_TIMER_ARM, OP_TIMER_CANCEL, OP_DIST_ENABLE, OP_ROUTE_SPI, OP_HVC, OP_SET_REG,
                OP_SYNC),
        "dists": (DIST_FIXED, DIST_EXPONENTIAL, DIST_UNIFORM),
        "wake_targets": (WT_VCPU, WT_RANDOM_OTHER, WT_NEXT, WT_LIST, WT_ALL_BUT_SELF),
        "source_kinds": (SRC_PERIODIC, SRC_POISSON, SRC_TRACE),
        # IPI_RESCHEDULE as the u32 the interpreter compares op.arg with (a C enum
        # constant would come out as the int -1).
        "irq": {"IPI_RESCHEDULE": <uint32_t>IPI_RESCHEDULE, "VTIMER_IRQ": VTIMER_IRQ,
                "VGIC_PRI_MASK": VGIC_PRI_MASK, "ARCH_TIMER_CTRL_ENABLE": ARCH_TIMER_CTRL_ENABLE,
                "ARCH_TIMER_CTRL_IT_MASK": ARCH_TIMER_CTRL_IT_MASK,
                "MAX_TAKES_PER_INSTANT": MAX_TAKES_PER_INSTANT,
                "GIC_DEFAULT_PRIORITY": GIC_DEFAULT_PRIORITY, "GIC_DEFAULT_PMR": GIC_DEFAULT_PMR},
        "thread_states": (TS_USER, TS_RUNNING, TS_POLLING, TS_BLOCKED, TS_RUNNABLE),
        "resume": (RESUME_START, RESUME_HALT, RESUME_SEGMENT, RESUME_SLEEP),
        "halt_kinds": (HALT_WFI, HALT_SUSPEND, HALT_CPU_SUSPEND, HALT_MP_HALTED),
        "mp_states": {"RUNNABLE": MP_RUNNABLE, "UNINITIALIZED": MP_UNINITIALIZED,
                      "INIT_RECEIVED": MP_INIT_RECEIVED, "HALTED": MP_HALTED,
                      "SIPI_RECEIVED": MP_SIPI_RECEIVED, "STOPPED": MP_STOPPED,
                      "AP_RESET_HOLD": MP_AP_RESET_HOLD, "SUSPENDED": MP_SUSPENDED},
        "exits": {"MMIO": EXIT_MMIO, "INTR": EXIT_INTR, "INTERNAL_ERROR": EXIT_INTERNAL_ERROR,
                  "SYSTEM_EVENT": EXIT_SYSTEM_EVENT},
        "system_events": {"SHUTDOWN": SYSTEM_EVENT_SHUTDOWN, "RESET": SYSTEM_EVENT_RESET,
                          "WAKEUP": SYSTEM_EVENT_WAKEUP, "SUSPEND": SYSTEM_EVENT_SUSPEND},
        "ucalls": (UCALL_SYNC, UCALL_DONE),
        "requests": {"SLEEP": REQ_SLEEP, "SUSPEND": REQ_SUSPEND},
        "psci": {"PSCI_VERSION": PSCI_FN_PSCI_VERSION, "CPU_SUSPEND": PSCI_FN_CPU_SUSPEND,
                 "CPU_OFF": PSCI_FN_CPU_OFF, "CPU_ON": PSCI_FN_CPU_ON,
                 "AFFINITY_INFO": PSCI_FN_AFFINITY_INFO,
                 "MIGRATE_INFO_TYPE": PSCI_FN_MIGRATE_INFO_TYPE,
                 "SYSTEM_OFF": PSCI_FN_SYSTEM_OFF, "SYSTEM_RESET": PSCI_FN_SYSTEM_RESET,
                 "PSCI_FEATURES": PSCI_FN_PSCI_FEATURES,
                 "SYSTEM_SUSPEND": PSCI_FN_SYSTEM_SUSPEND, "SYSTEM_RESET2": PSCI_FN_SYSTEM_RESET2,
                 "SYSTEM_OFF2": PSCI_FN_SYSTEM_OFF2, "FN64_CPU_SUSPEND": PSCI_FN64_CPU_SUSPEND,
                 "FN64_CPU_ON": PSCI_FN64_CPU_ON, "FN64_AFFINITY_INFO": PSCI_FN64_AFFINITY_INFO,
                 "FN64_SYSTEM_SUSPEND": PSCI_FN64_SYSTEM_SUSPEND,
                 "FN64_SYSTEM_RESET2": PSCI_FN64_SYSTEM_RESET2,
                 "FN64_SYSTEM_OFF2": PSCI_FN64_SYSTEM_OFF2},
        "psci_ret": {"NOT_SUPPORTED": PSCI_RET_NOT_SUPPORTED,
                     "INVALID_PARAMS": PSCI_RET_INVALID_PARAMS,
                     "ALREADY_ON": PSCI_RET_ALREADY_ON,
                     "INTERNAL_FAILURE": PSCI_RET_INTERNAL_FAILURE},
        "mpidr_hwid_bitmask": MPIDR_HWID_BITMASK,
        "cont": (CONT_NEXT, CONT_HALT, CONT_TRAP, CONT_END, CONT_IRQ, CONT_EOI),
        "event_classes": (EV_TICK, EV_SOURCE, EV_TIMER, EV_SEGMENT, EV_POLL_END, EV_RUN,
                          EV_SLICE),
        "request_flags": (KVM_REQUEST_MASK, KVM_REQUEST_NO_WAKEUP, KVM_REQUEST_WAIT,
                          KVM_REQUEST_NO_ACTION),
        "stats": (S_SUCCESSFUL_POLL, S_ATTEMPTED_POLL, S_POLL_INVALID, S_WAKEUP,
                  S_POLL_SUCCESS_NS, S_POLL_FAIL_NS, S_WAIT_NS, S_POLL_SUCCESS_HIST,
                  S_POLL_FAIL_HIST, S_WAIT_HIST, S_BLOCKING, S_HALT_EXITS, NR_STATS),
        "queue": {"SEQ_BITS": KW_SEQ_BITS, "MAX_SEQ": KW_MAX_SEQ, "QUEUE_SHIFT": KW_QSHIFT},
        "lat_buckets": LAT_BUCKETS,
        "costs": {"table_n": KW_COST_TABLE_N, "frac_bits": KW_COST_FRAC_BITS,
                  "frac_mask": KW_COST_FRAC_MASK, "stream_base": KW_COST_STREAM_BASE,
                  "drawn": (COST_VM_EXIT, COST_VM_ENTRY, COST_IPI_SEND, COST_WAKE_TO_RUN,
                            COST_CONTEXT_SWITCH, NR_DRAWN_COSTS)},
        "max_ops_per_instant": MAX_OPS_PER_INSTANT,
        "pid_base": PID_BASE,
        "placement": {"AFF_PINNED": AFF_PINNED, "AFF_ALL": AFF_ALL, "AFF_LIST": AFF_LIST,
                      "SCHED_MIGRATION_COST_NS": SCHED_MIGRATION_COST_NS,
                      "SD_LLC_IMBALANCE_PCT": SD_LLC_IMBALANCE_PCT},
        "sizes": {"thread_t": sizeof(thread_t), "op_t": sizeof(op_t),
                  "virq_t": sizeof(virq_t), "gic_t": sizeof(gic_t),
                  "event_t": sizeof(event_t), "trace_rec_t": sizeof(trace_rec_t)},
    }


cdef int run_loop(engine_t* e, uint64_t until, bint stop_on_exit) noexcept nogil:
    """Process every event before ``until``; with ``stop_on_exit``, stop after the
    first event in which a vCPU exited to userspace (then e.now is that event's
    time).  Returns -1 on error (e.error).  The debug build returns KW_CHECKPOINT
    after every KW_CHECK_EVERY-th event, for the caller to check the state and
    call again (which goes on exactly where it stopped)."""
    cdef event_t ev
    cdef thread_t* th
    cdef vm_t* vm
    cdef int rc = 0
    cdef uint64_t cls
    cdef uint64_t t
    e.waker = -1
    while e.q.len:
        if stop_on_exit and e.exq_len:
            return loop_left(e, 0)
        t = q_peek(e)
        if t >= until:
            break
        if e.nheld and t > e.now:
            if release_held(e) or e.error:      # the clock moves on without them
                return -1
            continue
        rc = heap_pop(e, &ev)
        if rc <= 0:
            if rc < 0:
                return -1
            continue                            # only void events at that time
        e.now = ev.t
        e.cur_key = ev.key
        cls = ev.key >> KW_SEQ_BITS
        e.waker = -1
        if cls == EV_TICK:
            vm = &e.vms[ev.who]
            if ev.gen != vm.tick_gen:
                continue
            e.events += 1
            rc = tick(e, ev.who, ev.t)
            if rc == 0:
                rc = heap_push(e, ev.t + vm.tick_ns, EV_TICK, ev.who, ev.gen)
        elif cls == EV_SOURCE:
            if ev.gen != e.src[ev.who].gen:
                continue
            e.events += 1
            rc = source_fire(e, ev.who, ev.t)
        elif cls == EV_TIMER:
            if ev.gen != e.irq[ev.who].timer_gen:
                continue
            e.events += 1
            if e.th[ev.who].kind == THREAD_HOST:
                rc = ht_wake(e, ev.who, ev.t)       # a host thread's hrtimer
            else:
                rc = timer_fire(e, ev.who, ev.t)
        else:
            th = &e.th[ev.who]
            e.waker = <int32_t>ev.who           # the waker of what it wakes
            if cls == EV_SLICE:
                if ev.gen != th.run_gen:
                    continue
                e.events += 1
                rc = slice_end(e, ev.who, ev.t)
            else:
                if ev.gen != th.gen:
                    continue
                e.events += 1
                if cls == EV_SEGMENT:
                    if th.kind == THREAD_HOST:
                        rc = ht_run(e, ev.who, ev.t)
                    else:
                        rc = segment_end(e, ev.who, ev.t)
                elif cls == EV_POLL_END:
                    # The poll loop ran out of time: poll_end = cur >= stop.
                    rc = block(e, ev.who, ev.t, ev.t)
                else:
                    rc = got_cpu(e, ev.who, ev.t)
        if rc < 0 or e.error:
            e.waker = -1
            e.cur_key = 0
            return -1
        if KW_DEBUG and e.events % KW_CHECK_EVERY == 0:
            return loop_left(e, KW_CHECKPOINT)
    e.waker = -1
    if stop_on_exit and e.exq_len:
        return loop_left(e, 0)
    if e.nheld and until > e.now:
        # The clock moves on to until without the held threads.
        if release_held(e) or e.error:
            return -1
        return run_loop(e, until, stop_on_exit)
    e.now = until
    e.cur_key = 0
    return loop_left(e, 0)


cdef int loop_left(engine_t* e, int rc) noexcept nogil:
    """run_loop returns ``rc``: the lazy poll windows that ran out before where it
    stopped end now (core/halt.pxi, poll_settle), as their events would have."""
    e.waker = -1
    if settle_polls(e) or e.error:
        e.cur_key = 0
        return -1
    e.cur_key = 0
    return rc


cdef class Engine:
    """The Cython engine.

    Engine(arch, host_cpus, seed, costs=None, trace_capacity=1 << 20,
           timeline_capacity=0, scheduler="fifo")

    A low-level object: ``kvmwake.Host`` and ``kvmwake.VM`` are the public
    API and validate every argument before it gets here.  The interface is
    the same as ``kvmwake.reference.Engine``.
    """

    cdef engine_t e
    cdef readonly str arch
    cdef readonly object seed
    cdef object _threads      # numpy arrays that own the state
    cdef object _irqs
    cdef object _vms
    cdef object _gics
    cdef object _srcs
    cdef object _times
    cdef object _cpus
    cdef object _held
    cdef object _stats
    cdef object _lat
    cdef object _ops
    cdef object _exitq
    cdef object _tlbase       # per thread: timeline base state (u1)
    cdef object _cost_tab     # the drawn costs' tables (u8, NR_DRAWN_COSTS x table)
    cdef dict _prog_index     # program bytes -> offset in the op table
    cdef object _aff          # AFF_LIST CPU masks (u8 words), shared by equal sets
    cdef dict _aff_index      # mask bytes -> word offset in _aff
    cdef object _llc          # per host CPU: its LLC group (u4)
    cdef bint _failed
    cdef object _import_events  # an imported state's events, until they are queued
    cdef dict _spare          # array name -> (buffer with room to grow, the view in use)
    cdef engine_t** isl       # the islands while run_islands runs them (core/islands.pxi)
    cdef void* isl_mem        # their engine_t blocks, each on cache lines of its own
    cdef int64_t isl_trace    # the island that keeps the trace ring (-1: none)
    cdef uint32_t nisl
    cdef object _isl_bufs     # their own arrays (held threads, exits, latency histogram)

    def __cinit__(self):
        memset(&self.e, 0, sizeof(engine_t))
        q_init(&self.e.q, 0)
        self.e.tr_hi = 0xFFFFFFFF
        self.isl_trace = -1

    def __init__(self, str arch, uint32_t host_cpus, seed, costs=None,
                 uint64_t trace_capacity=1 << 20, uint64_t timeline_capacity=0,
                 str scheduler="fifo"):
        cdef dict c = dict(_COST_DEFAULTS)
        if scheduler not in _model.SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r} "
                             f"(choose from {', '.join(_model.SCHEDULERS)})")
        self.e.sched = _model.SCHEDULERS.index(scheduler)
        self.e.base_slice = _model.sched_base_slice(host_cpus)
        if costs:
            c.update(costs)
        self.arch = arch
        self.seed = int(seed)
        # A drawn cost comes as its table (kvmwake.costs.cost_table, checked by the
        # caller): its row of cost_tab, its cost_dist bit, its median in costs_t.
        self._cost_tab = np.zeros(NR_DRAWN_COSTS * KW_COST_TABLE_N, dtype=np.uint64)
        cdef uint64_t* consts = <uint64_t*>&self.e.costs
        cdef uint32_t ci
        for ci, name in enumerate(_DRAWN_COSTS):
            v = c[name]
            if isinstance(v, (int, np.integer)):
                consts[ci] = v
                self._cost_tab[ci * KW_COST_TABLE_N:(ci + 1) * KW_COST_TABLE_N] = v
            else:
                tab = np.asarray(v, dtype=np.uint64)
                if tab.shape != (KW_COST_TABLE_N,):
                    raise ValueError(f"cost {name}: a table of {KW_COST_TABLE_N} values, "
                                     f"not of shape {tab.shape}")
                self._cost_tab[ci * KW_COST_TABLE_N:(ci + 1) * KW_COST_TABLE_N] = tab
                consts[ci] = tab[KW_COST_TABLE_N // 2]
                self.e.cost_dist |= (<uint32_t>1) << ci
        self.e.costs.sched_slice_ns = c["sched_slice_ns"]
        self.e.halt_poll_ns = _haltpoll.HALT_POLL_NS_DEFAULT[arch]
        self.e.grow = _haltpoll.HALT_POLL_NS_GROW_DEFAULT
        self.e.grow_start = _haltpoll.HALT_POLL_NS_GROW_START_DEFAULT
        self.e.shrink = _haltpoll.HALT_POLL_NS_SHRINK_DEFAULT
        self.e.x86 = arch == "x86"
        self.e.resched_irq = _model.RESCHEDULE_IRQ[arch]
        self.e.tick_irq = _model.TICK_IRQ[arch]
        self.e.inject_req_bit = (<uint32_t>1) << (_model.INJECT_REQUEST[arch] & KVM_REQUEST_MASK)
        self._cpus = np.zeros(host_cpus * sizeof(cpu_t), dtype=np.uint8)
        self._threads = np.zeros(0, dtype=np.uint8)
        self._irqs = np.zeros(0, dtype=np.uint8)
        self._vms = np.zeros(0, dtype=np.uint8)
        self._gics = np.zeros(0, dtype=np.uint8)
        self._srcs = np.zeros(0, dtype=np.uint8)
        self._times = np.zeros(0, dtype=np.uint64)
        self._stats = np.zeros((0, NR_STATS), dtype=np.uint64)
        self._lat = np.zeros(LAT_BUCKETS, dtype=np.uint64)
        self._ops = np.zeros(0, dtype=np.uint8)
        self._exitq = np.zeros(0, dtype=np.uint32)
        self._tlbase = np.zeros(0, dtype=np.uint8)
        self._prog_index = {}
        self._spare = {}
        self.e.ncpu = host_cpus
        self.e.tcap = trace_capacity
        self.e.tlcap = timeline_capacity
        self.e.waker = -1
        self.e.aff_words = (host_cpus + 63) // 64
        self._aff = np.zeros(0, dtype=np.uint64)
        self._aff_index = {}
        self._llc = np.zeros(host_cpus, dtype=np.uint32)
        self._held = np.zeros(host_cpus, dtype=np.uint32)
        self._bind()
        cdef uint32_t i
        for i in range(host_cpus):
            self.e.cpus[i].cur = -1
            self.e.cpus[i].rq_head = -1
            self.e.cpus[i].rq_tail = -1

    def __dealloc__(self):
        cdef uint32_t k
        for k in range(self.nisl):
            q_free(&self.isl[k].q)
        free(self.isl)
        free(self.isl_mem)
        q_free(&self.e.q)
        free(self.e.trace)
        free(self.e.tl)

    cdef void _bind(self):
        """Point the C state at the numpy buffers (after any of them changed)."""
        self.e.th = <thread_t*>cnp.PyArray_DATA(self._threads)
        self.e.irq = <virq_t*>cnp.PyArray_DATA(self._irqs)
        self.e.vms = <vm_t*>cnp.PyArray_DATA(self._vms)
        self.e.gic = <gic_t*>cnp.PyArray_DATA(self._gics)
        self.e.src = <source_t*>cnp.PyArray_DATA(self._srcs)
        self.e.times = <uint64_t*>cnp.PyArray_DATA(self._times)
        self.e.cpus = <cpu_t*>cnp.PyArray_DATA(self._cpus)
        self.e.stats = <uint64_t*>cnp.PyArray_DATA(self._stats)
        self.e.lat_hist = <uint64_t*>cnp.PyArray_DATA(self._lat)
        self.e.ops = <op_t*>cnp.PyArray_DATA(self._ops)
        self.e.exitq = <uint32_t*>cnp.PyArray_DATA(self._exitq)
        self.e.tlbase = <uint8_t*>cnp.PyArray_DATA(self._tlbase)
        self.e.affmask = <uint64_t*>cnp.PyArray_DATA(self._aff)
        self.e.llc = <uint32_t*>cnp.PyArray_DATA(self._llc)
        self.e.cost_tab = <uint64_t*>cnp.PyArray_DATA(self._cost_tab)
        self.e.held = <uint32_t*>cnp.PyArray_DATA(self._held)

    def _grow(self, str name, arr, uint64_t nbytes, uint32_t cols=0):
        """``arr`` grown to ``nbytes``, the new part zeroed: u1, or with ``cols`` u8
        rows of that many columns.  The result is a view of a buffer with room to
        spare (twice the size when it must move), so that adding VMs, threads or
        sources one by one copies O(n) bytes in all, not O(n**2).  ``arr`` itself is
        left as it was, so a later failure (memory) leaves the engine as it was."""
        spare = self._spare.get(name)
        cdef uint64_t have = arr.nbytes
        if spare is not None and spare[1] is arr and len(spare[0]) >= nbytes:
            buf = spare[0]
        else:
            buf = np.zeros(max(nbytes, 2 * have), dtype=np.uint8)
            buf[:have] = arr.reshape(-1).view(np.uint8)
        buf[have:nbytes] = 0
        out = buf[:nbytes]
        if cols:
            out = out.view(np.uint64).reshape(-1, cols)
        self._spare[name] = (buf, out)
        return out

    def _grown_threads(self, uint32_t nth):
        """The per-thread arrays grown to ``nth`` threads (thread_t, virq_t, stats
        rows, the exit ring unrolled in its order, the timeline base), made before
        any is swapped in, so that a failure (memory) leaves the engine as it was."""
        cdef uint32_t k, old = self.e.nth
        threads = self._grow("threads", self._threads, nth * sizeof(thread_t))
        irqs = self._grow("irqs", self._irqs, nth * sizeof(virq_t))
        stats = self._grow("stats", self._stats, nth * NR_STATS * 8, NR_STATS)
        exitq = np.zeros(nth, dtype=np.uint32)
        for k in range(self.e.exq_len):
            exitq[k] = self.e.exitq[(self.e.exq_head + k) % old]
        tlbase = self._grow("tlbase", self._tlbase, nth)
        return threads, irqs, stats, exitq, tlbase

    # -- set-up -------------------------------------------------------------

    def add_vm(self, uint32_t nr_vcpus, uint32_t nr_spis=_model.DEFAULT_NR_SPIS):
        cdef uint32_t first = self.e.nth, vmi = self.e.nvm, i, g, b
        # Every new array is made before any is swapped in: a failure (memory)
        # leaves the engine as it was.
        threads, irqs, stats, exitq, tlbase = self._grown_threads(first + nr_vcpus)
        vms = self._grow("vms", self._vms, (vmi + 1) * sizeof(vm_t))
        gics = self._grow("gics", self._gics, (vmi + 1) * sizeof(gic_t))
        self._threads, self._irqs, self._vms, self._gics = threads, irqs, vms, gics
        self._stats, self._exitq, self._tlbase = stats, exitq, tlbase
        self.e.exq_head = 0
        self._bind()
        cdef vm_t* vm = &self.e.vms[vmi]
        vm.first = first
        vm.nr_vcpus = nr_vcpus
        vm.nr_spis = nr_spis
        vm.code_base = _model.MEM_BASE[self.arch]
        vm.psci_version = _uapi.KVM_ARM_PSCI_LATEST
        vm.vcpu_features = KVM_ARM_VCPU_PSCI_0_2_BIT    # until the first KVM_ARM_VCPU_INIT
        # The distributor: enabled by the booted guest; SPIs disabled, level,
        # routed to MPIDR 0 (vCPU 0), as vgic_init leaves them.
        cdef gic_t* gic = &self.e.gic[vmi]
        gic.enabled = 1
        for b in range(16):
            gic.spi_level[b] = <uint64_t>-1
        gic.spi_level[0] = <uint64_t>0xFFFFFFFF00000000
        for b in range(1024):
            gic.spi_prio[b] = GIC_DEFAULT_PRIORITY
        cdef thread_t* th
        cdef virq_t* q
        for i in range(nr_vcpus):
            g = first + i
            th = &self.e.th[g]
            th.vm = vmi
            th.vcpu_id = i
            th.pcpu = g % self.e.ncpu
            th.rq_next = -1
            th.state = TS_USER
            th.stall_t = <uint64_t>-1
            th.mp_state = MP_RUNNABLE
            th.pc_valid = 1
            th.pstate = PSR_MODE_EL1h         # a booted guest: EL1h, DAIF clear
            rng_seed(th, <uint64_t>(self.seed & 0xFFFFFFFFFFFFFFFF), vmi, i)
            cost_rng_seed(th, <uint64_t>(self.seed & 0xFFFFFFFFFFFFFFFF), vmi, i)
            # A booted guest: SGIs, the timer PPI and the tick PPI enabled.
            q = &self.e.irq[g]
            q.priv_en = 0xFFFF | (1u << VTIMER_IRQ) | (1u << _model.TICK_IRQ["arm64"])
            q.priv_level = (0xFFFFFFFFu & ~0xFFFFu) & ~(1u << _model.TICK_IRQ["arm64"])
            memset(q.priv_prio, GIC_DEFAULT_PRIORITY, 32)
            q.pmr = GIC_DEFAULT_PMR
            q.cur_irq = -1
        self.e.nth = first + nr_vcpus
        self.e.nvm = vmi + 1
        return vmi

    def load_program(self, uint32_t g, ops):
        """Give thread ``g`` a (validated) program; identical programs share storage."""
        key = ops.tobytes()
        off = self._prog_index.get(key)
        if off is None:
            off = len(self._ops) // sizeof(op_t)
            self._ops = np.concatenate([self._ops, np.frombuffer(key, dtype=np.uint8)])
            self._prog_index[key] = off
            self._bind()
        cdef thread_t* th = &self.e.th[g]
        th.prog = off
        th.prog_n = len(ops)
        th.pc = 0
        th.pc_valid = 1
        th.has_prog = 1
        memset(th.loops, 0, sizeof(th.loops))

    def set_vm_halt_poll(self, uint32_t vm, uint32_t max_ns):
        """KVM_CAP_HALT_POLL: per-VM ceiling, overriding the module value for good."""
        self.e.vms[vm].max_halt_poll_ns = max_ns
        self.e.vms[vm].override = 1

    def set_tick(self, uint32_t vmi, uint64_t period_ns):
        """A periodic tick on every halted vCPU of the VM, at multiples of the period."""
        cdef vm_t* vm = &self.e.vms[vmi]
        vm.tick_ns = period_ns
        vm.tick_gen += 1
        if period_ns:
            self._check(heap_push(&self.e, (self.e.now // period_ns + 1) * period_ns,
                                  EV_TICK, vmi, vm.tick_gen))

    def add_source(self, uint32_t vmi, uint32_t intid, uint32_t kind, uint64_t p0,
                   uint64_t p1, times=None, uint32_t target=0):
        """A device interrupt source: SPI ``intid`` (arm64) or MSI vector ``intid`` to
        thread ``target`` (x86); see model.SourceKind."""
        cdef uint32_t si = self.e.nsrc, nth = 0, k
        for k in range(si):
            if self.e.src[k].vm == vmi:
                nth += 1
        self._srcs = self._grow("srcs", self._srcs, (si + 1) * sizeof(source_t))
        tarr = np.ascontiguousarray(times if times is not None else [], dtype=np.uint64)
        off = len(self._times)
        self._times = np.concatenate([self._times, tarr])
        self._bind()
        cdef source_t* s = &self.e.src[si]
        s.vm = vmi
        s.intid = intid
        s.target = target
        s.kind = kind
        s.p0 = p0
        s.p1 = p1
        s.times_off = off
        s.times_len = len(tarr)
        s.idx = 0
        s.gen = 1
        state, inc = _model_stream_seed(self.seed, vmi, _SOURCE_STREAM_BASE + nth)
        s.rng_state = state
        s.rng_inc = inc
        self.e.nsrc = si + 1
        cdef uint64_t now = self.e.now, first
        if kind == SRC_PERIODIC:
            first = p1 if p1 >= now else p1 + ((now - p1) // p0 + 1) * p0
        elif kind == SRC_POISSON:
            first = now + source_draw(s)
        else:
            while s.idx < s.times_len and self.e.times[s.times_off + s.idx] < now:
                s.idx += 1
            if s.idx >= s.times_len:
                return si
            first = self.e.times[s.times_off + s.idx]
        self._check(heap_push(&self.e, first, EV_SOURCE, si, s.gen))
        return si

    def start_vcpu(self, uint32_t g):
        """The thread enters KVM_RUN now (at the current virtual time)."""
        cdef thread_t* th = &self.e.th[g]
        cdef uint32_t k
        if th.state != TS_USER:
            return
        for k in range(self.e.exq_len):
            if self.e.exitq[(self.e.exq_head + k) % self.e.nth] == g:
                # KVM_RUN returned that exit: no second KVM_RUN before it is taken.
                raise EngineError(f"vCPU thread {g} has an exit not yet taken")
        th.resume = RESUME_START
        if self.e.nheld and is_held(&self.e, g):
            self._guard()
            if cpu_allowed(&self.e, g, th.pcpu):
                self._check(reenter_held(&self.e, g, self.e.now))
                return
            # Its CPU was taken from its affinity while it was in userspace:
            # it leaves it (as the migration stopper would move it) and wakes.
            drop_held(&self.e, g)
            self._check(unhold(&self.e, g))
        if not cpu_allowed(&self.e, g, th.pcpu):
            # Its CPU was taken from its affinity while it was outside KVM_RUN.
            set_task_cpu(&self.e, g, select_task_rq(&self.e, g, -1))
        if self.e.tlcap:
            tl_note(&self.e, th, g, self.e.now, TS_RUNNABLE)
        th.state = TS_RUNNABLE
        # KVM_RUN from userspace: a system call, not a wake-up.
        self._guard()
        self._check(make_runnable(&self.e, g, self.e.now, 0))

    def add_host_thread(self, ops, uint32_t cpu):
        """A host thread (not a vCPU) with a validated host program, placed on host
        CPU ``cpu``; it enters the thread table after every thread so far and is
        started by ``start_host_thread``.  Returns its thread index."""
        cdef uint32_t g = self.e.nth, k, nhost = 0
        if cpu >= self.e.ncpu:
            raise ValueError(f"host CPU {cpu} does not exist")
        for k in range(g):
            if self.e.th[k].kind == THREAD_HOST:
                nhost += 1
        threads, irqs, stats, exitq, tlbase = self._grown_threads(g + 1)
        self._threads, self._irqs, self._stats, self._exitq = threads, irqs, stats, exitq
        self._tlbase = tlbase
        self.e.exq_head = 0
        self._bind()
        cdef thread_t* th = &self.e.th[g]
        th.kind = THREAD_HOST
        th.vm = NO_VM
        th.vcpu_id = nhost
        th.pcpu = cpu
        th.rq_next = -1
        th.state = TS_USER
        th.stall_t = <uint64_t>-1
        rng_seed(th, <uint64_t>(self.seed & 0xFFFFFFFFFFFFFFFF), NO_VM, nhost)
        cost_rng_seed(th, <uint64_t>(self.seed & 0xFFFFFFFFFFFFFFFF), NO_VM, nhost)
        self.e.irq[g].cur_irq = -1
        self.e.nth = g + 1
        self.load_program(g, ops)
        return g

    def start_host_thread(self, uint32_t g):
        """The host thread becomes runnable now (wake_up_new_task: no wake-up cost)."""
        cdef thread_t* th = &self.e.th[g]
        if th.kind != THREAD_HOST or th.state != TS_USER:
            raise EngineError(f"thread {g} is not a host thread that has not started")
        self._guard()
        th.resume = RESUME_START
        th.wake_ts = self.e.now
        th.exit_time = self.e.now             # sleep_until's deadlines count from here
        if self.e.tlcap:
            tl_note(&self.e, th, g, self.e.now, TS_RUNNABLE)
        th.state = TS_RUNNABLE
        self._check(make_runnable(&self.e, g, self.e.now, 0))

    def thread_kinds(self):
        """Per thread of the table, its kind (model.THREAD_VCPU or THREAD_HOST)."""
        cdef uint32_t g
        return [self.e.th[g].kind for g in range(self.e.nth)]

    # -- running -------------------------------------------------------------

    cdef _check(self, int rc):
        if rc >= 0 and not self.e.error:
            return rc
        self._failed = True
        err = self.e.error
        if err == KW_ERR_STALL or err == KW_ERR_STORM:
            th = &self.e.th[self.e.err_thread]
            if err == KW_ERR_STALL and th.kind == THREAD_HOST:
                raise EngineError(
                    f"host thread {th.vcpu_id} (thread {self.e.err_thread}) makes no progress: "
                    f"its program ran {self.e.err_n} ops at t={self.e.err_t} ns without "
                    "virtual time passing")
            if err == KW_ERR_STALL:
                raise EngineError(
                    f"vCPU {th.vcpu_id} of VM {th.vm} makes no progress: its program "
                    f"ran {self.e.err_n} ops at t={self.e.err_t} ns without virtual time passing")
            raise EngineError(f"vCPU {th.vcpu_id} of VM {th.vm}: interrupt storm "
                              f"({self.e.err_n} interrupts taken at t={self.e.err_t} ns)")
        if err == KW_ERR_SEQ:
            raise EngineError(f"the event sequence numbers ran out at t={self.e.now} ns "
                              f"(at most 2**55 events are ever scheduled)")
        raise MemoryError("the event queue could not grow")

    cdef _debug_check(self):
        """The debug build's periodic check of the whole state (see run_loop)."""
        global DEBUG_CHECKS
        DEBUG_CHECKS += 1
        try:
            _check_state(self, False)
            check_held(self)
        except ValueError as exc:
            self._failed = True
            raise EngineError(f"inconsistent engine state after {self.e.events} events "
                              f"at t={self.e.now} ns: {exc}") from None

    cdef _guard(self):
        if self._failed:
            raise EngineError("this engine stopped on an earlier error")

    def run(self, uint64_t until_ns):
        """Process every event before ``until_ns``; then the clock reads ``until_ns``."""
        cdef int rc
        self._guard()
        while True:
            with nogil:
                rc = run_loop(&self.e, until_ns, 0)
            if rc != KW_CHECKPOINT:
                break
            self._debug_check()
        self._check(rc)

    def run_until_exit(self, uint64_t until_ns, bint release_gil=True):
        """Like ``run``, but stop after the first event in which a vCPU exited to
        userspace; returns that thread, or -1 when ``until_ns`` was reached.

        ``release_gil=False`` keeps the GIL meanwhile, so that no other Python
        thread can call into the engine (vcpu_threads.py: vCPU threads)."""
        cdef int rc
        self._guard()
        while True:
            if release_gil:
                with nogil:
                    rc = run_loop(&self.e, until_ns, 1)
            else:
                rc = run_loop(&self.e, until_ns, 1)
            if rc != KW_CHECKPOINT:
                break
            self._debug_check()
        self._check(rc)
        return self.e.exitq[self.e.exq_head] if self.e.exq_len else -1

    def run_islands(self, uint64_t until_ns, int threads=1):
        """Like ``run``, as islands (core/islands.pxi) on up to ``threads`` threads at
        once; returns the number of islands.  0: this host cannot run as islands
        now (``islands_blocked`` says why) and nothing ran."""
        cdef uint32_t n, k
        cdef list rcs
        self._guard()
        if until_ns < self.e.now:
            raise ValueError(f"until_ns = {until_ns} is before the current time {self.e.now}")
        th_isl, cpu_isl, vm_isl = isl_plan(self)
        n = 1 + max(int(vm_isl.max()) if len(vm_isl) else 0,
                    int(cpu_isl[cpu_isl != KW_NO_ISLAND].max()) if (cpu_isl != KW_NO_ISLAND).any() else 0)
        if n < 2 or isl_blocked(self, (), th_isl) is not None:
            return 0
        # The biggest islands first, so that threads finish together.
        sizes = np.bincount(th_isl, minlength=n)
        order = sorted(range(n), key=lambda i: (-int(sizes[i]), i))
        rcs = [0] * n
        exited = False
        interrupted = None
        try:
            isl_split(self, n, th_isl, cpu_isl, vm_isl)
        except BaseException:
            isl_discard(self)
            raise
        try:
            # A Ctrl-C (KeyboardInterrupt) waits until every island has reached
            # until_ns, so that the host is whole; then it is raised.
            if threads <= 1:
                for k in order:
                    while True:
                        try:
                            rcs[k] = self._run_island(k, until_ns)
                            break
                        except KeyboardInterrupt as exc:
                            interrupted = exc
            else:
                with _futures.ThreadPoolExecutor(min(threads, n)) as pool:
                    futs = [pool.submit(self._run_island, k, until_ns) for k in order]
                    for k, fut in zip(order, futs):
                        while True:
                            try:
                                rcs[k] = fut.result()
                                break
                            except KeyboardInterrupt as exc:
                                interrupted = exc
        except BaseException:
            # (The debug build's queue check failed, say: the state is not to be
            # trusted, and on one thread the islands after it did not run.)
            self._failed = True
            raise
        finally:
            for k in range(n):
                exited = exited or (self.isl[k].exq_len and not self.isl[k].error)
            isl_join(self, until_ns)
        self._check(-1 if min(rcs) < 0 else 0)
        if interrupted is not None:
            raise interrupted
        if exited:
            self._failed = True
            raise EngineError("an island's vCPU exited to userspace although none could "
                              "(core/islands.pxi may_exit)")
        if KW_DEBUG:
            self._debug_check()
        return n

    def _run_island(self, uint32_t k, uint64_t until_ns):
        """Island k (while run_islands runs them) up to until_ns or its first exit."""
        cdef int rc
        cdef engine_t* ie = self.isl[k]
        if ie.error:
            return -1                     # (called again after a Ctrl-C: it failed)
        while True:
            with nogil:
                rc = run_loop(ie, until_ns, 1)
            if rc != KW_CHECKPOINT:
                return rc
            q_check(ie)

    def island_plan(self):
        """Each thread's, host CPU's and VM's island (core/islands.pxi isl_plan)."""
        return isl_plan(self)

    def islands_blocked(self, starting=()):
        """Why the host cannot run as islands now, or None (core/islands.pxi);
        ``starting``: vCPU threads the run would start first."""
        return isl_blocked(self, starting)

    def pending_exits(self):
        cdef uint32_t k
        return [self.e.exitq[(self.e.exq_head + k) % self.e.nth] for k in range(self.e.exq_len)]

    def take_exit(self, uint32_t g):
        """The exit thread g last made, removed from the queue of exits."""
        cdef list q = self.pending_exits()
        cdef uint32_t k
        cdef thread_t* th = &self.e.th[g]
        if g in q:
            q.remove(g)
            self.e.exq_head = 0
            self.e.exq_len = len(q)
            for k in range(len(q)):
                self.e.exitq[k] = q[k]
        return {"reason": th.exit_reason, "type": th.exit_type, "ndata": th.exit_ndata,
                "data0": th.exit_data0, "ucall": th.exit_ucall, "value": th.exit_value,
                "time": th.exit_time}

    def signal(self, uint32_t g):
        """A signal for the vCPU thread: it leaves KVM_RUN with KVM_EXIT_INTR."""
        self._guard()
        self.e.th[g].sig_pending = 1
        self._check(signal_wake(&self.e, g, self.e.now))

    def get_mp_state(self, uint32_t g):
        return self.e.th[g].mp_state

    def set_mp_state(self, uint32_t g, uint32_t state):
        """KVM_SET_MP_STATE with a value the arch accepts (the caller checked)."""
        cdef thread_t* th = &self.e.th[g]
        self._guard()
        if self.e.x86:
            th.mp_state = MP_RUNNABLE if state == MP_SIPI_RECEIVED else <uint8_t>state
        elif state == MP_STOPPED:
            self._check(power_off(&self.e, g, self.e.now))
        elif state == MP_SUSPENDED:
            # kvm_arm_vcpu_suspend: SUSPENDED, KVM_REQ_SUSPEND, kick.
            th.mp_state = MP_SUSPENDED
            self._check(request(&self.e, g, REQ_SUSPEND, self.e.now))
        else:
            th.mp_state = MP_RUNNABLE          # only the field: no kick

    def get_reg(self, uint32_t g, uint32_t idx):
        """KVM_GET_ONE_REG of a core register: x0..x30 (0..30), SP (31), PC (32),
        PSTATE (33); a reset owed by PSCI CPU_ON is applied first (kvm_arch_vcpu_ioctl)."""
        cdef thread_t* th = &self.e.th[g]
        if th.reset_pending:
            reset_vcpu(&self.e, g)
        if idx < 31:
            return th.regs[idx]
        if idx == 31:
            return th.sp
        if idx == 32:
            return get_pc(&self.e, th)
        return get_pstate(&self.e, g)

    def set_reg(self, uint32_t g, uint32_t idx, uint64_t value):
        """KVM_SET_ONE_REG of a core register (the caller checked a PSTATE's mode)."""
        cdef thread_t* th = &self.e.th[g]
        if th.reset_pending:
            reset_vcpu(&self.e, g)
        if idx < 31:
            th.regs[idx] = value
        elif idx == 31:
            th.sp = value
        elif idx == 32:
            set_pc(&self.e, g, value)
        else:
            set_pstate(&self.e, g, value)

    def vm_psci_version(self, uint32_t vmi):
        """kvm_psci_version: what KVM_REG_ARM_PSCI_VERSION reads."""
        return psci_version(&self.e.vms[vmi])

    def vcpu_features(self, uint32_t vmi):
        """(kvm->arch.vcpu_features, KVM_ARCH_FLAG_VCPU_FEATURES_CONFIGURED)."""
        return self.e.vms[vmi].vcpu_features, bool(self.e.vms[vmi].features_set)

    def vcpu_init(self, uint32_t g, uint32_t features, bint off):
        """KVM_ARM_VCPU_INIT with features the caller checked (POWER_OFF stripped):
        the VM's feature set, kvm_reset_vcpu, then STOPPED (power-off) or RUNNABLE."""
        cdef thread_t* th = &self.e.th[g]
        self._guard()
        self.e.vms[th.vm].vcpu_features = features
        self.e.vms[th.vm].features_set = 1
        reset_vcpu(&self.e, g)
        if off:
            self._check(power_off(&self.e, g, self.e.now))
        else:
            th.mp_state = MP_RUNNABLE

    def uaccess_write_pending(self, uint32_t vmi, int64_t g, uint32_t intid, bint on):
        self._guard()
        self._check(uaccess_write_pending(&self.e, g, vmi, intid, on, self.e.now))

    def uaccess_write_active(self, uint32_t vmi, int64_t g, uint32_t intid, bint on):
        self._guard()
        self._check(uaccess_write_active(&self.e, g, vmi, intid, on, self.e.now))

    def uaccess_write_dist_ctlr(self, uint32_t vmi, bint on):
        uaccess_write_dist_ctlr(&self.e, vmi, on)

    def enable_system_suspend(self, uint32_t vmi):
        self.e.vms[vmi].suspend_cap = 1

    def set_psci_version(self, uint32_t vmi, uint32_t version):
        self.e.vms[vmi].psci_version = version

    def make_request(self, uint32_t g, uint32_t req):
        self._guard()
        return self._check(request(&self.e, g, req, self.e.now)) == 1

    def kick(self, uint32_t g):
        self._guard()
        return self._check(kick(&self.e, g, self.e.now, 1)) == 1

    def raise_irq_at(self, uint32_t g, uint32_t irq):
        """SGI ``irq`` (arm64) or IPI vector ``irq`` (x86) arrives at vCPU ``g``."""
        self._guard()
        return self._check(raise_irq(&self.e, g, irq, self.e.now)) == 1

    def raise_pending(self, uint32_t g):
        """The arch's reschedule IPI arrives at vCPU ``g``."""
        self._guard()
        return self._check(raise_irq(&self.e, g, self.e.resched_irq, self.e.now)) == 1

    def irq_line(self, uint32_t vmi, uint32_t intid, bint level, int64_t g=-1):
        """KVM_IRQ_LINE: an SPI (g = -1) or a PPI of thread g changes level."""
        self._guard()
        return self._check(inject(&self.e, g, vmi, intid, level, self.e.now)) == 1

    def signal_msi(self, uint32_t g, uint32_t vector):
        """KVM_SIGNAL_MSI with fixed delivery to thread g's LAPIC."""
        self._guard()
        return self._check(apic_set_irq(&self.e, g, vector, self.e.now)) == 1

    def configure_irq(self, uint32_t vmi, int64_t g, uint32_t intid, int enabled, int priority,
                      int level):
        """Set an interrupt's enable, priority and trigger (-1: leave as is)."""
        cdef gic_t* gic = &self.e.gic[vmi]
        cdef uint64_t bit = (<uint64_t>1) << (intid & 63)
        self._guard()
        if priority >= 0:
            if intid < 32:
                self.e.irq[g].priv_prio[intid] = <uint8_t>(priority & VGIC_PRI_MASK)
            else:
                gic.spi_prio[intid] = <uint8_t>(priority & VGIC_PRI_MASK)
        if level >= 0 and intid >= 32:
            if level:
                gic.spi_level[intid >> 6] |= bit
            else:
                gic.spi_level[intid >> 6] &= ~bit
                gic.spi_line[intid >> 6] &= ~bit
            refresh(&self.e, g, vmi, intid)
        if enabled >= 0:
            self._check(set_enabled(&self.e, g, vmi, intid, enabled != 0, self.e.now))

    def set_dist_enabled(self, uint32_t vmi, bint on):
        self._guard()
        self._check(set_dist_enabled(&self.e, vmi, on, self.e.now))

    def route_spi(self, uint32_t vmi, uint32_t intid, uint64_t mpidr):
        self._guard()
        self._check(route_spi(&self.e, vmi, intid, mpidr, self.e.now))

    def set_pmr(self, uint32_t g, uint32_t pmr):
        if self.e.x86:
            self.e.irq[g].tpr = <uint8_t>pmr
        else:
            self.e.irq[g].pmr = <uint8_t>(pmr & VGIC_PRI_MASK)

    def set_masked(self, uint32_t g, bint masked):
        self.e.irq[g].masked = masked

    # -- module parameters and counters -----------------------------------------

    @property
    def now(self):
        return self.e.now

    @property
    def next_event_ns(self):
        """The earliest queued event's time (a void one included), or None when the
        queue is empty: a real-time driver sleeps until it (vcpu_threads.py)."""
        cdef uint64_t t = q_peek(&self.e)
        return None if t == KW_NO_TIME else t

    @property
    def events(self):
        return self.e.events

    @property
    def halts(self):
        return self.e.halts

    @property
    def trace_dropped(self):
        return self.e.tdropped

    def set_trace_threads(self, uint32_t lo, uint32_t hi):
        """Trace only threads lo <= g < hi from now on (0, 2**32 - 1: every thread)."""
        self.e.tr_lo = lo
        self.e.tr_hi = hi

    @property
    def trace_threads(self):
        """(lo, hi): the threads the trace ring records."""
        return (self.e.tr_lo, self.e.tr_hi)

    @property
    def failed(self):
        return self._failed

    @property
    def costs(self):
        """Each cost's constant (a drawn cost's: its table's median)."""
        return {"vm_exit_ns": self.e.costs.vm_exit_ns, "vm_entry_ns": self.e.costs.vm_entry_ns,
                "ipi_send_ns": self.e.costs.ipi_send_ns,
                "wake_to_run_ns": self.e.costs.wake_to_run_ns,
                "context_switch_ns": self.e.costs.context_switch_ns,
                "sched_slice_ns": self.e.costs.sched_slice_ns}

    def cost_tables(self):
        """The drawn costs' tables: {name: tuple of KW_COST_TABLE_N values}."""
        cdef uint32_t ci
        out = {}
        for ci, name in enumerate(_DRAWN_COSTS):
            if (self.e.cost_dist >> ci) & 1:
                out[name] = tuple(int(x) for x in
                                  self._cost_tab[ci * KW_COST_TABLE_N:(ci + 1) * KW_COST_TABLE_N])
        return out

    @property
    def halt_poll_ns(self):
        return self.e.halt_poll_ns

    @halt_poll_ns.setter
    def halt_poll_ns(self, uint32_t v):
        self.e.halt_poll_ns = v

    @property
    def halt_poll_ns_grow(self):
        return self.e.grow

    @halt_poll_ns_grow.setter
    def halt_poll_ns_grow(self, uint32_t v):
        self.e.grow = v

    @property
    def halt_poll_ns_grow_start(self):
        return self.e.grow_start

    @halt_poll_ns_grow_start.setter
    def halt_poll_ns_grow_start(self, uint32_t v):
        self.e.grow_start = v

    @property
    def halt_poll_ns_shrink(self):
        return self.e.shrink

    @halt_poll_ns_shrink.setter
    def halt_poll_ns_shrink(self, uint32_t v):
        self.e.shrink = v

    # -- read-out ------------------------------------------------------------------

    def stats_array(self):
        return self._stats.copy()

    def stats_rows(self, Py_ssize_t first, Py_ssize_t n):
        """A copy of the stats rows of threads ``first .. first + n - 1`` only."""
        if first < 0 or n < 0 or first + n > self._stats.shape[0]:
            raise IndexError(f"stats rows {first}..{first + n - 1} out of range")
        return self._stats[first:first + n].copy()

    def stats_view(self, Py_ssize_t first=0, Py_ssize_t n=-1):
        """The stats rows of threads ``first .. first + n - 1`` (``n`` -1: to the last)
        without a copy: a read-only array on the engine's rows, which cannot be made
        writeable.  It shows the rows as they are when it is read (a run changes them).
        Adding a VM or a host thread may move the rows (when their buffer has no room
        left): a view taken before then keeps the rows as they were at the move, so
        take views after the last VM is added."""
        cdef Py_ssize_t nth = self._stats.shape[0]
        if n == -1:
            n = nth - first
        if first < 0 or n < 0 or first + n > nth:
            raise IndexError(f"stats rows {first}..{first + n - 1} out of range")
        rows = np.frombuffer(memoryview(self._stats).toreadonly(), dtype=np.uint64)
        return rows.reshape(nth, NR_STATS)[first:first + n]

    def stat(self, uint32_t g, uint32_t i):
        """Stat ``i`` (a column of the stats row, ``model.S_*``) of thread ``g``."""
        if g >= <uint32_t>self._stats.shape[0] or i >= NR_STATS:
            raise IndexError(f"stat {i} of thread {g} out of range")
        return int(self.e.stats[<uint64_t>g * NR_STATS + i])

    def trace_array(self, uint64_t pid_lo=0, uint64_t pid_hi=0x100000000):
        """The trace records of the pids ``pid_lo <= pid < pid_hi``, oldest first, as a
        ``tracefmt.TRACE_RECORD_DTYPE`` array: ``trace_list``'s records of those pids,
        with no Python object per record."""
        from .outputs.tracefmt import TRACE_RECORD_DTYPE
        cdef uint64_t i, k = 0, m = 0, n = self.e.tcount, start
        cdef trace_rec_t* r
        start = (self.e.thead + self.e.tcap - n) % self.e.tcap if n and n == self.e.tcap else 0
        for i in range(n):
            r = &self.e.trace[(start + i) % self.e.tcap]
            if pid_lo <= r.pid < pid_hi:
                m += 1
        ts_a, a_a = np.empty(m, np.uint64), np.empty(m, np.uint64)
        pid_a, cpu_a = np.empty(m, np.uint32), np.empty(m, np.uint32)
        vid_a, b_a = np.empty(m, np.uint32), np.empty(m, np.uint32)
        kind_a, flag_a, valid_a = np.empty(m, np.uint8), np.empty(m, np.uint8), np.empty(m, np.uint8)
        cdef uint64_t[:] ts = ts_a, a = a_a
        cdef uint32_t[:] pid = pid_a, cpu = cpu_a, vid = vid_a, b = b_a
        cdef uint8_t[:] kind = kind_a, flag = flag_a, valid = valid_a
        for i in range(n):
            r = &self.e.trace[(start + i) % self.e.tcap]
            if pid_lo <= r.pid < pid_hi:
                ts[k], pid[k], cpu[k], vid[k], a[k], b[k] = r.ts, r.pid, r.cpu, r.vcpu_id, r.a, r.b
                kind[k], flag[k], valid[k] = r.kind, r.flag, r.valid
                k += 1
        out = np.empty(m, dtype=TRACE_RECORD_DTYPE)
        for name, col in (("ts", ts_a), ("pid", pid_a), ("cpu", cpu_a), ("kind", kind_a),
                          ("flag", flag_a), ("valid", valid_a), ("vcpu_id", vid_a),
                          ("a", a_a), ("b", b_a)):
            out[name] = col
        return out

    def lat_hist_array(self):
        return self._lat.copy()

    def trace_list(self):
        """Trace records, oldest first, as tuples (ts, pid, cpu, kind, flag, valid, vcpu_id, a, b)."""
        cdef list out = []
        cdef uint64_t i, n = self.e.tcount, start
        cdef trace_rec_t* r
        if n == 0:
            return out
        start = (self.e.thead + self.e.tcap - n) % self.e.tcap if n == self.e.tcap else 0
        for i in range(n):
            r = &self.e.trace[(start + i) % self.e.tcap]
            out.append((r.ts, r.pid, r.cpu, r.kind, r.flag, r.valid, r.vcpu_id, r.a, r.b))
        return out

    # -- the state timeline ------------------------------------------------------

    @property
    def timeline_capacity(self):
        return self.e.tlcap

    @property
    def timeline_dropped(self):
        return self.e.tldropped

    def set_timeline_capacity(self, uint64_t capacity):
        """Turn the state timeline on (or off) before anything was recorded; the
        window starts now, with every thread in its present state."""
        cdef uint32_t g
        if self.e.tlcount or self.e.tldropped:
            raise ValueError("the timeline capacity can only be set before it records")
        if capacity:
            self._check(queue_lazy_polls(&self.e))   # the timeline records a poll's end
        self.e.tlcap = capacity
        self.e.tlt0 = self.e.now
        for g in range(self.e.nth):
            self.e.tlbase[g] = self.e.th[g].state

    def timeline_array(self):
        """The recorded state changes, oldest first (``timeline.TIMELINE_DTYPE``)."""
        from .outputs.timeline import TIMELINE_DTYPE
        cdef uint64_t n = self.e.tlcount
        buf = np.zeros(n * sizeof(tl_rec_t), dtype=np.uint8)
        _copy_timeline(&self.e, <tl_rec_t*>cnp.PyArray_DATA(buf))
        return np.frombuffer(buf, dtype=TIMELINE_DTYPE)     # (a copy would lose the zeroed padding)

    def timeline_window(self):
        """(t0, base): the window's start and each thread's state then."""
        return self.e.tlt0, self._tlbase.copy()

    def timeline_totals(self, uint64_t now):
        """Per host CPU, ns running, polling and idle over the recorded window."""
        from .outputs.timeline import totals
        t0, base = self.timeline_window()
        cdef uint32_t g
        return totals(self.timeline_array(), base, t0, now, self.e.ncpu,
                      [self.e.th[g].pcpu for g in range(self.e.nth)])

    def thread_info(self, uint32_t g):
        cdef thread_t* th = &self.e.th[g]
        if th.kind == THREAD_HOST:
            return {"state": th.state, "pcpu": th.pcpu, "pc": th.pc, "kind": th.kind,
                    "nr_migrations": th.nr_migrations}
        return {"state": th.state, "halt_poll_ns": th.halt_poll_ns,
                "requests": th.requests, "pcpu": th.pcpu, "pc": th.pc,
                "runnable": bool(runnable(&self.e, g)), "mp_state": th.mp_state,
                "sig_pending": bool(th.sig_pending), "exit_reason": th.exit_reason,
                "nr_migrations": th.nr_migrations}

    # -- placement (core/host.pxi) -------------------------------------------------

    def set_llc(self, groups):
        """Each host CPU's LLC group (a list of ``host_cpus`` ints, each < host_cpus;
        validated by ``kvmwake.Host``): cpus_share_cache() and the LLC domain."""
        arr = np.ascontiguousarray(groups, dtype=np.uint32)
        if arr.shape != (self.e.ncpu,) or (self.e.ncpu and int(arr.max()) >= self.e.ncpu):
            raise ValueError(f"LLC groups: one group number below {self.e.ncpu} per host CPU")
        self._llc = arr.copy()
        self._bind()

    def llc_list(self):
        """Each host CPU's LLC group number."""
        return [int(x) for x in self._llc]

    def set_affinity(self, uint32_t g, cpus, bint initial=False):
        """sched_setaffinity() of thread g: ``cpus`` is "pinned" (CPU g % host_cpus),
        "all", or a list of CPUs (validated by the caller).  ``initial``: the thread
        was just created and takes its first CPU from the set (select_task_rq_fork);
        otherwise a waiting thread on a CPU it may no longer use moves now, a running
        one at its next preemption point, a sleeping one at its next wake-up."""
        cdef thread_t* th
        cdef uint8_t old
        cdef uint32_t c
        if g >= self.e.nth:
            raise IndexError(f"thread {g} does not exist")
        if cpus != "pinned":
            self._check(queue_lazy_polls(&self.e))   # a freed CPU may now pull a thread
        th = &self.e.th[g]
        old = th.aff_kind
        if cpus == "pinned":
            th.aff_kind = AFF_PINNED
        elif cpus == "all":
            th.aff_kind = AFF_ALL
        else:
            mask = np.zeros(self.e.aff_words, dtype=np.uint64)
            for c in cpus:
                if c >= self.e.ncpu:
                    raise ValueError(f"CPU {c} does not exist on this host")
                mask[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
            if not mask.any():
                raise ValueError("an empty CPU set")
            key = mask.tobytes()
            off = self._aff_index.get(key)
            if off is None:
                off = len(self._aff)
                self._aff = np.concatenate([self._aff, mask])
                self._aff_index[key] = off
                self._bind()
                th = &self.e.th[g]
            th.aff_off = off
            th.aff_kind = AFF_LIST
        if old == AFF_PINNED and th.aff_kind != AFF_PINNED:
            self.e.nunpinned += 1
        elif old != AFF_PINNED and th.aff_kind == AFF_PINNED:
            self.e.nunpinned -= 1
        if initial:
            th.pcpu = select_task_rq_fork(&self.e, g)
            return
        self._guard()
        self._check(migrate_disallowed(&self.e, g, self.e.now))

    def affinity(self, uint32_t g):
        """Thread g's allowed CPUs, in order."""
        if g >= self.e.nth:
            raise IndexError(f"thread {g} does not exist")
        return tuple(c for c in range(self.e.ncpu) if cpu_allowed(&self.e, g, c))

    def affinity_kind(self, uint32_t g):
        """"pinned", "all" or "list"."""
        if g >= self.e.nth:
            raise IndexError(f"thread {g} does not exist")
        return ("pinned", "all", "list")[self.e.th[g].aff_kind]

    @property
    def scheduler(self):
        """The host scheduler's name (``kvmwake.model.SCHEDULERS``)."""
        return _model.SCHEDULERS[self.e.sched]

    @property
    def base_slice(self):
        """EEVDF's sysctl_sched_base_slice, ns."""
        return self.e.base_slice

    @property
    def vcpu_pack(self):
        """The vCPU-pack wake placement is on (``set_vcpu_pack``)."""
        return bool(self.e.vcpu_pack)

    def set_vcpu_pack(self, bint on):
        """The vCPU-pack wake placement (core/host.pxi vcpu_pack_cpu; under EEVDF
        only): a vCPU thread woken by another vCPU thread of its VM goes to the
        waker's CPU when the waker is alone there and the wakee may run there.
        A host setting, set by ``kvmwake.Host``; not part of the engine's state."""
        self.e.vcpu_pack = 1 if on else 0

    @property
    def preempt_skips_delayed(self):
        """Wake-up preemption looks past delayed-dequeue sleepers
        (``set_preempt_skips_delayed``)."""
        return bool(self.e.preempt_skips_delayed)

    def set_preempt_skips_delayed(self, bint on):
        """Wake-up preemption as the host kernels kvmwake is held against decide it
        (core/host.pxi check_preempt_wakeup_fair; under EEVDF only): the woken
        thread preempts if it is what pick_eevdf() would run among the threads
        that are not delayed-dequeue sleepers.  A host setting, set by
        ``kvmwake.Host``; not part of the engine's state."""
        self.e.preempt_skips_delayed = 1 if on else 0

    def sched_state(self):
        """The scheduler's state: per thread (vruntime, deadline, vlag, vprot,
        exec_start, on_rq, sched_delayed) and per host CPU (current thread,
        run-queue list in order, nr_running, V)."""
        cdef uint32_t g, c
        cdef thread_t* th
        cdef cpu_t* cpu
        cdef int32_t x
        cdef int64_t n, s
        threads = []
        for g in range(self.e.nth):
            th = &self.e.th[g]
            threads.append({"vruntime": th.vruntime, "deadline": th.deadline,
                            "vlag": th.vlag, "vprot": th.vprot,
                            "exec_start": th.exec_start, "on_rq": bool(th.on_rq),
                            "sched_delayed": bool(th.sched_delayed)})
        cpus = []
        for c in range(self.e.ncpu):
            cpu = &self.e.cpus[c]
            queue = []
            x = cpu.rq_head
            while x >= 0:
                queue.append(x)
                x = self.e.th[x].rq_next
            n = nr_queued(cpu)
            s = cpu.sum_v
            if n and s < 0:
                s -= n - 1
            cpus.append({"cur": cpu.cur, "queue": queue, "nr_running": n,
                         "V": cpu.zero_v + (s / n if n else 0)})
        return {"threads": threads, "cpus": cpus}

    def irq_state(self, uint32_t g, uint32_t intid):
        """What the vGIC (or LAPIC) holds for ``intid`` as seen by thread g."""
        cdef virq_t* q = &self.e.irq[g]
        cdef uint32_t vmi = self.e.th[g].vm
        cdef gic_t* gic = &self.e.gic[vmi]
        cdef uint32_t w = intid >> 6, sh = intid & 63
        cdef int32_t tgt
        if self.e.x86:
            return {"irr": bool((q.irr[w] >> sh) & 1), "isr": bool((q.isr[w] >> sh) & 1),
                    "tpr": q.tpr, "masked": bool(q.masked)}
        if intid < 32:
            return {"pending": bool(pending_bit(&self.e, g, vmi, intid)),
                    "enabled": bool((q.priv_en >> intid) & 1),
                    "active": bool((q.priv_act >> intid) & 1),
                    "priority": q.priv_prio[intid], "level": bool((q.priv_level >> intid) & 1),
                    "line": bool((q.priv_line >> intid) & 1),
                    "latch": bool((q.priv_latch >> intid) & 1),
                    "queued": bool((q.ap[0] >> intid) & 1),
                    "target": self.e.th[g].vcpu_id, "pmr": q.pmr, "masked": bool(q.masked)}
        tgt = gic.spi_target[intid]
        return {"pending": bool(pending_bit(&self.e, g, vmi, intid)),
                "enabled": bool((gic.spi_en[w] >> sh) & 1),
                "active": bool((gic.spi_act[w] >> sh) & 1),
                "priority": gic.spi_prio[intid], "level": bool((gic.spi_level[w] >> sh) & 1),
                "line": bool((gic.spi_line[w] >> sh) & 1),
                "latch": bool((gic.spi_latch[w] >> sh) & 1),
                "queued": tgt >= 0 and bool(
                    (self.e.irq[self.e.vms[vmi].first + tgt].ap[w] >> sh) & 1),
                "target": tgt, "mpidr": gic.spi_mpidr[intid], "pmr": q.pmr,
                "masked": bool(q.masked)}

    def vm_gic_enabled(self, uint32_t vmi):
        return bool(self.e.gic[vmi].enabled)

    def timer_state(self, uint32_t g):
        cdef virq_t* q = &self.e.irq[g]
        return {"cval": q.timer_cval, "ctl": q.timer_ctl, "period": q.timer_period,
                "istatus": bool(self.e.now >= q.timer_cval and q.timer_ctl
                                & ARCH_TIMER_CTRL_ENABLE)}

    def export_state(self):
        """(scalars, arrays): everything that decides the engine's future, as copies."""
        return _engine_export(self)

    def import_state(self, dict scalars, dict arrays):
        """Load ``export_state()``'s output into this fresh engine (same arch, host
        CPUs, costs); every index and link is checked first (ValueError)."""
        _engine_import(self, scalars, arrays)

    def rehost(self, uint32_t host_cpus):
        """Move the threads onto ``host_cpus`` host CPUs, as a migration would."""
        if self.e.sched != SCHED_POLICY_FIFO:
            raise ValueError("restoring onto another host CPU count is only "
                             "implemented for the fifo scheduler")
        self._guard()
        _engine_rehost(self, host_cpus)
        self.e.base_slice = _model.sched_base_slice(host_cpus)   # update_sysctl() on hotplug

    def state_bytes(self):
        """Bytes of engine state: per thread, per thread stats, and the rest."""
        return {"thread_t": sizeof(thread_t), "virq_t": sizeof(virq_t),
                "stats_per_vcpu": NR_STATS * 8,
                "threads": self.e.nth * sizeof(thread_t),
                "irqs": self.e.nth * sizeof(virq_t),
                "stats": self.e.nth * NR_STATS * 8,
                "heap": _queue_bytes(&self.e.q),
                "ops": len(self._ops), "trace": self.e.talloc * sizeof(trace_rec_t),
                "cpus": self.e.ncpu * sizeof(cpu_t), "vms": self.e.nvm * sizeof(vm_t),
                "gics": self.e.nvm * sizeof(gic_t),
                "sources": self.e.nsrc * sizeof(source_t) + len(self._times) * 8}


include "core/snapshot.pxi"
include "core/islands.pxi"
include "core/bench.pxi"
