# cython: language_level=3
"""kvmwake's simulation core: the block / kick / halt-poll path of KVM.

One extension module built from the ``.pxi`` pieces it includes:

* ``_rng.pxi``    per-vCPU random streams
* ``_heap.pxi``   the event heap (time, class, sequence) with cancellation
* ``_host.pxi``   host CPUs, run queues, time slices
* ``_guest.pxi``  the guest program interpreter
* ``_halt.pxi``   kvm_vcpu_halt / kvm_vcpu_block, halt stats, tracepoints
* ``_kick.pxi``   kvm_vcpu_wake_up, kvm_vcpu_kick, requests, wake sources

The event loop runs without the GIL and creates no Python object per event.
The model is the one of ``kvmwake.reference`` (plain Python), event for event.
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, realloc, free

import numpy as np
cimport numpy as cnp

from . import haltpoll as _haltpoll
from .model import COST_DEFAULTS as _COST_DEFAULTS, NR_STATS as _NR_STATS
from .reference import EngineError

cnp.import_array()

cdef extern from *:
    """
    #define KW_LCG_MULT 6364136223846793005ULL
    #define KW_MAX_DRAW_NS 4611686018427387904ULL
    #define KW_SEQ_BITS 56
    """
    const uint64_t KW_LCG_MULT
    const uint64_t KW_MAX_DRAW_NS
    const uint64_t KW_SEQ_BITS
    int __builtin_clzll(unsigned long long x) nogil

# The numbers of kvmwake.model, compiled in (tests/test_core_mirrors.py checks them).
cdef enum:
    OP_END = 0
    OP_COMPUTE = 1
    OP_WFI = 2
    OP_WAKE = 3
    OP_LOOP = 4
    OP_ENDLOOP = 5

cdef enum:
    DIST_FIXED = 0
    DIST_EXPONENTIAL = 1
    DIST_UNIFORM = 2

cdef enum:
    WT_VCPU = 0
    WT_RANDOM_OTHER = 1
    WT_NEXT = 2

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

cdef enum:
    CONT_NEXT = 0
    CONT_HALT = 1
    CONT_DELIVER = 2
    CONT_END = 3

cdef enum:
    EV_TICK = 0
    EV_SEGMENT = 1
    EV_POLL_END = 2
    EV_RUN = 3
    EV_SLICE = 4

cdef enum:
    KVM_REQUEST_MASK = 0xFF
    KVM_REQUEST_NO_WAKEUP = 0x100
    KVM_REQUEST_WAIT = 0x200
    KVM_REQUEST_NO_ACTION = 0x400
    REQ_UNBLOCK_BIT = 1 << 2

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
    LAT_BUCKETS = 16 + 60 * 16
    MAX_OPS_PER_INSTANT = 100000
    PID_BASE = 1000
    TR_WAKEUP = 0
    TR_HALT_POLL_NS = 1

cdef enum:
    KW_OK = 0
    KW_ERR_NOMEM = 1
    KW_ERR_STALL = 2

include "_rng.pxi"
include "_heap.pxi"
include "_host.pxi"
include "_guest.pxi"
include "_halt.pxi"
include "_kick.pxi"


def compiled_constants():
    """The model numbers compiled into the core, for the mirror test."""
    return {
        "ops": (OP_END, OP_COMPUTE, OP_WFI, OP_WAKE, OP_LOOP, OP_ENDLOOP),
        "dists": (DIST_FIXED, DIST_EXPONENTIAL, DIST_UNIFORM),
        "wake_targets": (WT_VCPU, WT_RANDOM_OTHER, WT_NEXT),
        "thread_states": (TS_USER, TS_RUNNING, TS_POLLING, TS_BLOCKED, TS_RUNNABLE),
        "resume": (RESUME_START, RESUME_HALT, RESUME_SEGMENT),
        "cont": (CONT_NEXT, CONT_HALT, CONT_DELIVER, CONT_END),
        "event_classes": (EV_TICK, EV_SEGMENT, EV_POLL_END, EV_RUN, EV_SLICE),
        "request_flags": (KVM_REQUEST_MASK, KVM_REQUEST_NO_WAKEUP, KVM_REQUEST_WAIT,
                          KVM_REQUEST_NO_ACTION),
        "stats": (S_SUCCESSFUL_POLL, S_ATTEMPTED_POLL, S_POLL_INVALID, S_WAKEUP,
                  S_POLL_SUCCESS_NS, S_POLL_FAIL_NS, S_WAIT_NS, S_POLL_SUCCESS_HIST,
                  S_POLL_FAIL_HIST, S_WAIT_HIST, S_BLOCKING, S_HALT_EXITS, NR_STATS),
        "lat_buckets": LAT_BUCKETS,
        "max_ops_per_instant": MAX_OPS_PER_INSTANT,
        "pid_base": PID_BASE,
        "sizes": {"thread_t": sizeof(thread_t), "op_t": sizeof(op_t),
                  "event_t": sizeof(event_t), "trace_rec_t": sizeof(trace_rec_t)},
    }


cdef int run_loop(engine_t* e, uint64_t until) noexcept nogil:
    """Process every event before ``until``.  Returns -1 on error (e.error)."""
    cdef event_t ev
    cdef thread_t* th
    cdef vm_t* vm
    cdef int rc = 0
    while e.hlen and e.heap[0].t < until:
        heap_pop(e, &ev)
        e.now = ev.t
        cls = ev.key >> KW_SEQ_BITS
        if cls == EV_TICK:
            vm = &e.vms[ev.who]
            if ev.gen != vm.tick_gen:
                continue
            e.events += 1
            rc = tick(e, ev.who, ev.t)
            if rc == 0:
                rc = heap_push(e, ev.t + vm.tick_ns, EV_TICK, ev.who, ev.gen)
        else:
            th = &e.th[ev.who]
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
                    rc = segment_end(e, ev.who, ev.t)
                elif cls == EV_POLL_END:
                    # The poll loop ran out of time: poll_end = cur >= stop.
                    rc = block(e, ev.who, ev.t, ev.t)
                else:
                    rc = got_cpu(e, ev.who, ev.t)
        if rc < 0:
            return -1
    e.now = until
    return 0


cdef class Engine:
    """The Cython engine.

    Engine(arch, host_cpus, seed, costs=None, trace_capacity=1 << 20)

    A low-level object: ``kvmwake.Host`` and ``kvmwake.VM`` are the public
    API and validate every argument before it gets here.  The interface is
    the same as ``kvmwake.reference.Engine``.
    """

    cdef engine_t e
    cdef readonly str arch
    cdef readonly object seed
    cdef object _threads      # numpy arrays that own the state
    cdef object _vms
    cdef object _cpus
    cdef object _stats
    cdef object _lat
    cdef object _ops
    cdef dict _prog_index     # program bytes -> offset in the op table
    cdef bint _failed

    def __cinit__(self):
        memset(&self.e, 0, sizeof(engine_t))

    def __init__(self, str arch, uint32_t host_cpus, seed, costs=None,
                 uint64_t trace_capacity=1 << 20):
        cdef dict c = dict(_COST_DEFAULTS)
        if costs:
            c.update(costs)
        self.arch = arch
        self.seed = int(seed)
        self.e.costs.vm_exit_ns = c["vm_exit_ns"]
        self.e.costs.vm_entry_ns = c["vm_entry_ns"]
        self.e.costs.ipi_send_ns = c["ipi_send_ns"]
        self.e.costs.wake_to_run_ns = c["wake_to_run_ns"]
        self.e.costs.context_switch_ns = c["context_switch_ns"]
        self.e.costs.sched_slice_ns = c["sched_slice_ns"]
        self.e.halt_poll_ns = _haltpoll.HALT_POLL_NS_DEFAULT[arch]
        self.e.grow = _haltpoll.HALT_POLL_NS_GROW_DEFAULT
        self.e.grow_start = _haltpoll.HALT_POLL_NS_GROW_START_DEFAULT
        self.e.shrink = _haltpoll.HALT_POLL_NS_SHRINK_DEFAULT
        self._cpus = np.zeros(host_cpus * sizeof(cpu_t), dtype=np.uint8)
        self._threads = np.zeros(0, dtype=np.uint8)
        self._vms = np.zeros(0, dtype=np.uint8)
        self._stats = np.zeros((0, NR_STATS), dtype=np.uint64)
        self._lat = np.zeros(LAT_BUCKETS, dtype=np.uint64)
        self._ops = np.zeros(0, dtype=np.uint8)
        self._prog_index = {}
        self.e.ncpu = host_cpus
        self.e.tcap = trace_capacity
        self._bind()
        cdef uint32_t i
        for i in range(host_cpus):
            self.e.cpus[i].cur = -1
            self.e.cpus[i].rq_head = -1
            self.e.cpus[i].rq_tail = -1

    def __dealloc__(self):
        free(self.e.heap)
        free(self.e.trace)

    cdef void _bind(self):
        """Point the C state at the numpy buffers (after any of them changed)."""
        self.e.th = <thread_t*>cnp.PyArray_DATA(self._threads)
        self.e.vms = <vm_t*>cnp.PyArray_DATA(self._vms)
        self.e.cpus = <cpu_t*>cnp.PyArray_DATA(self._cpus)
        self.e.stats = <uint64_t*>cnp.PyArray_DATA(self._stats)
        self.e.lat_hist = <uint64_t*>cnp.PyArray_DATA(self._lat)
        self.e.ops = <op_t*>cnp.PyArray_DATA(self._ops)

    # -- set-up -------------------------------------------------------------

    def add_vm(self, uint32_t nr_vcpus):
        cdef uint32_t first = self.e.nth, vmi = self.e.nvm, i, g
        cdef cnp.ndarray threads = np.zeros((first + nr_vcpus) * sizeof(thread_t), dtype=np.uint8)
        cdef cnp.ndarray vms = np.zeros((vmi + 1) * sizeof(vm_t), dtype=np.uint8)
        threads[:first * sizeof(thread_t)] = self._threads
        vms[:vmi * sizeof(vm_t)] = self._vms
        stats = np.zeros((first + nr_vcpus, NR_STATS), dtype=np.uint64)
        stats[:first] = self._stats
        self._threads, self._vms, self._stats = threads, vms, stats
        self._bind()
        cdef vm_t* vm = &self.e.vms[vmi]
        vm.first = first
        vm.nr_vcpus = nr_vcpus
        cdef thread_t* th
        for i in range(nr_vcpus):
            g = first + i
            th = &self.e.th[g]
            th.vm = vmi
            th.vcpu_id = i
            th.pcpu = g % self.e.ncpu
            th.rq_next = -1
            th.state = TS_USER
            th.stall_t = <uint64_t>-1
            rng_seed(th, <uint64_t>(self.seed & 0xFFFFFFFFFFFFFFFF), vmi, i)
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
        th.pc = 0
        th.has_prog = 1
        memset(th.loops, 0, sizeof(th.loops))

    def set_vm_halt_poll(self, uint32_t vm, uint32_t max_ns):
        """KVM_CAP_HALT_POLL: per-VM ceiling, overriding the module value for good."""
        self.e.vms[vm].max_halt_poll_ns = max_ns
        self.e.vms[vm].override = 1

    def set_tick(self, uint32_t vmi, uint64_t period_ns):
        """A periodic wake source on every halted vCPU of the VM, at multiples of the period."""
        cdef vm_t* vm = &self.e.vms[vmi]
        vm.tick_ns = period_ns
        vm.tick_gen += 1
        if period_ns:
            self._check(heap_push(&self.e, (self.e.now // period_ns + 1) * period_ns,
                                  EV_TICK, vmi, vm.tick_gen))

    def start_vcpu(self, uint32_t g):
        """The thread enters KVM_RUN now (at the current virtual time)."""
        cdef thread_t* th = &self.e.th[g]
        if th.state != TS_USER:
            return
        th.resume = RESUME_START
        th.state = TS_RUNNABLE
        self._check(make_runnable(&self.e, g, self.e.now))

    # -- running -------------------------------------------------------------

    cdef _check(self, int rc):
        if rc >= 0:
            return rc
        self._failed = True
        err = self.e.error
        if err == KW_ERR_STALL:
            th = &self.e.th[self.e.err_thread]
            raise EngineError(
                f"vCPU {th.vcpu_id} of VM {th.vm} makes no progress: its program "
                f"ran {self.e.err_n} ops at t={self.e.err_t} ns without virtual time passing")
        raise MemoryError("the event heap could not grow")

    def run(self, uint64_t until_ns):
        """Process every event before ``until_ns``; then the clock reads ``until_ns``."""
        cdef int rc
        if self._failed:
            raise EngineError("this engine stopped on an earlier error")
        with nogil:
            rc = run_loop(&self.e, until_ns)
        self._check(rc)

    def make_request(self, uint32_t g, uint32_t req):
        return self._check(make_request(&self.e, g, req)) == 1

    def kick(self, uint32_t g):
        return self._check(kick(&self.e, g, self.e.now, 1)) == 1

    def raise_pending(self, uint32_t g):
        return self._check(raise_pending(&self.e, g, self.e.now)) == 1

    # -- module parameters and counters -----------------------------------------

    @property
    def now(self):
        return self.e.now

    @property
    def events(self):
        return self.e.events

    @property
    def halts(self):
        return self.e.halts

    @property
    def trace_dropped(self):
        return self.e.tdropped

    @property
    def costs(self):
        return {"vm_exit_ns": self.e.costs.vm_exit_ns, "vm_entry_ns": self.e.costs.vm_entry_ns,
                "ipi_send_ns": self.e.costs.ipi_send_ns,
                "wake_to_run_ns": self.e.costs.wake_to_run_ns,
                "context_switch_ns": self.e.costs.context_switch_ns,
                "sched_slice_ns": self.e.costs.sched_slice_ns}

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

    def thread_info(self, uint32_t g):
        cdef thread_t* th = &self.e.th[g]
        return {"state": th.state, "halt_poll_ns": th.halt_poll_ns,
                "irq_pending": bool(th.irq_pending), "requests": th.requests,
                "pcpu": th.pcpu, "pc": th.pc}

    def state_bytes(self):
        """Bytes of engine state: per thread, per thread stats, and the rest."""
        return {"thread_t": sizeof(thread_t), "stats_per_vcpu": NR_STATS * 8,
                "threads": self.e.nth * sizeof(thread_t),
                "stats": self.e.nth * NR_STATS * 8,
                "heap": self.e.hcap * sizeof(event_t),
                "ops": len(self._ops), "trace": self.e.talloc * sizeof(trace_rec_t),
                "cpus": self.e.ncpu * sizeof(cpu_t), "vms": self.e.nvm * sizeof(vm_t)}


include "_bench.pxi"
