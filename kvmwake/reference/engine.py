"""reference/engine.py (twin: kvmwake/_core.pyx).
Mirrors: no kernel code of its own; the engine's state (the kvm, kvm_vcpu
and host fields the model needs), the interface the Host/VM layer calls,
and the event loop that dispatches each event to its piece.

``Engine`` holds the state; ``run_loop`` pops events in (time, class,
sequence) order and hands each live one to the function that models it.
"""

from __future__ import annotations

import types
from collections import deque

import numpy as np

from .. import haltpoll
from ..model import (
    ARCH_TIMER_CTRL_ENABLE, CONT_NEXT, COST_DEFAULTS, DEFAULT_NR_SPIS, GIC_DEFAULT_PMR,
    GIC_DEFAULT_PRIORITY, HALT_WFI, INJECT_REQUEST, LAT_BUCKETS, MAX_LOOP_DEPTH, MEM_BASE,
    HOST_STREAM_VM, NR_INTIDS, NR_STATS, RESCHEDULE_IRQ, RESUME_START, SCHEDULERS,
    THREAD_HOST, THREAD_VCPU, TICK_IRQ, VGIC_PRI_MASK,
    VTIMER_IRQ, EventClass, sched_base_slice, Request, SourceKind, ThreadState,
)
from ..costs import COST_TABLE_N, DRAWN_COSTS
from ..uapi import DEFAULT_VCPU_FEATURES, KVM_ARM_PSCI_LATEST, PSR_MODE_EL1h, MpState
from . import (EngineError, gic, guest, halt, host, hostthread, islands, kick, psci, queue, rng,
               run, timer)
from .halt import SEQ_BITS
from .rng import SOURCE_STREAM_BASE, _Stream, cost_rng_seed, rng_seed


def _link_pieces(*pieces):
    """Give each piece the functions of the other pieces that it calls.

    The core's pieces are included into one module, where each calls the
    others by name.  The reference's pieces are modules of their own, and their
    calls go round in circles (kvm_vcpu_kick ends a halt, which enters the
    guest, which takes interrupts, which kick), which their imports may not.
    So each piece names the functions it takes from the others as module
    globals set to None, and they are set here, once, as the package loads.
    """
    defined = {}
    for mod in pieces:
        for name, obj in vars(mod).items():
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                if name in defined:
                    raise ImportError(f"{name}() is defined by two pieces")
                defined[name] = obj
    for mod in pieces:
        for name, obj in list(vars(mod).items()):
            if obj is None and name in defined:
                setattr(mod, name, defined[name])


_link_pieces(rng, queue, host, guest, halt, run, psci, gic, timer, kick, hostthread, islands)

_USER, _RUNNABLE = ThreadState.USER, ThreadState.RUNNABLE
_EV_TICK, _EV_SOURCE, _EV_TIMER, _EV_SEG, _EV_POLL, _EV_SLICE = (
    EventClass.TICK, EventClass.SOURCE, EventClass.TIMER, EventClass.SEGMENT,
    EventClass.POLL_END, EventClass.SLICE)
_PRIV_MASK = 0xFFFF_FFFF
_SGI_MASK = 0xFFFF
_ALL_INTIDS = (1 << NR_INTIDS) - 1


class _Thread(_Stream):
    """One vCPU thread and its vCPU (the kvm_vcpu fields the model needs), or
    (kind THREAD_HOST, vm None) a host thread that is not a vCPU."""

    __slots__ = (
        "g", "kind", "vm", "vcpu_id", "pcpu", "state", "resume", "gen", "run_gen",
        "slice_armed", "run_start",
        # EEVDF (struct sched_entity, nice 0)
        "vruntime", "deadline", "vlag", "vprot", "exec_start", "on_rq", "sched_delayed",
        # placement: se.nr_migrations, p->cpus_ptr (host.AFF_*, the CPU bit mask of a list)
        "nr_migrations", "aff_kind", "aff_mask",
        "seg_end", "seg_gfrom", "seg_gto", "cont", "rem_end", "rem_gfrom", "rem_gto",
        "halt_start", "poll_end", "do_poll", "wake_ts", "halt_poll_ns", "requests",
        # a lazy poll window (halt.py, poll_settle): its end and place (0: none)
        "poll_stop", "poll_seq",
        "prog", "pc", "loops", "stall_t", "stall_n", "stats",
        # its cost stream (kvmwake.costs: drawn costs only)
        "cost_rng_state", "cost_rng_inc",
        # interrupt state: vGICv3 redistributor + CPU interface, or the LAPIC
        "ap", "priv_en", "priv_act", "priv_latch", "priv_line", "priv_level", "priv_prio",
        "pmr", "masked", "handler_ns", "handler_noiret", "cur_irq", "sv_guest", "sv_cont", "sv_valid",
        "timer_cval", "timer_ctl", "timer_gen", "timer_period", "irr", "isr", "tpr",
        # what userspace sees: MP state, registers, signals, the last exit
        "mp_state", "regs", "sp", "pstate", "pc_valid", "pc_raw", "sig_pending", "reset_pending", "reset_pc",
        "reset_r0", "halt_kind", "exit_reason", "exit_type", "exit_ndata", "exit_data0",
        "exit_ucall", "exit_value", "exit_time",
    )

    def __init__(self, g, vm, vcpu_id, pcpu, seed):
        self.g, self.vm, self.vcpu_id, self.pcpu = g, vm, vcpu_id, pcpu
        self.kind = THREAD_VCPU if vm is not None else THREAD_HOST
        self.state = _USER
        self.resume = RESUME_START
        self.gen = 0
        self.run_gen = 0
        self.slice_armed = False
        self.run_start = 0
        self.vruntime = self.deadline = self.vlag = self.vprot = self.exec_start = 0
        self.on_rq = self.sched_delayed = False
        self.nr_migrations = 0
        self.aff_kind = host.AFF_PINNED
        self.aff_mask = 0
        self.seg_end = self.seg_gfrom = self.seg_gto = 0
        self.cont = CONT_NEXT
        self.rem_end = self.rem_gfrom = self.rem_gto = 0
        self.halt_start = self.poll_end = self.wake_ts = 0
        self.poll_stop = self.poll_seq = 0
        self.do_poll = False
        self.halt_poll_ns = 0
        self.requests = 0
        self.prog = None
        self.pc = 0
        self.loops = [0] * MAX_LOOP_DEPTH
        stream_vm = vm.index if vm is not None else HOST_STREAM_VM
        rng_seed(self, seed, stream_vm, vcpu_id)
        cost_rng_seed(self, seed, stream_vm, vcpu_id)
        self.stall_t = -1
        self.stall_n = 0
        self.stats = [0] * NR_STATS
        # A booted guest: SGIs, the timer PPI and the tick PPI enabled.
        self.ap = 0
        self.priv_en = _SGI_MASK | (1 << VTIMER_IRQ) | (1 << TICK_IRQ["arm64"])
        self.priv_act = 0
        self.priv_latch = 0
        self.priv_line = 0
        self.priv_level = (_PRIV_MASK & ~_SGI_MASK) & ~(1 << TICK_IRQ["arm64"])
        self.priv_prio = [GIC_DEFAULT_PRIORITY] * 32
        self.pmr = GIC_DEFAULT_PMR
        self.masked = False
        self.handler_ns = 0
        self.handler_noiret = 0
        self.cur_irq = -1
        self.sv_guest = 0
        self.sv_cont = CONT_NEXT
        self.sv_valid = False
        self.timer_cval = 0
        self.timer_ctl = 0
        self.timer_gen = 0
        self.timer_period = 0
        self.irr = 0
        self.isr = 0
        self.tpr = 0
        self.mp_state = MpState.RUNNABLE
        self.regs = [0] * 31
        self.sp = 0
        self.pstate = PSR_MODE_EL1h         # a booted guest: EL1h, DAIF clear
        self.pc_valid = True
        self.pc_raw = 0
        self.sig_pending = False
        self.reset_pending = False
        self.reset_pc = 0
        self.reset_r0 = 0
        self.halt_kind = HALT_WFI
        self.exit_reason = 0
        self.exit_type = 0
        self.exit_ndata = 0
        self.exit_data0 = 0
        self.exit_ucall = 0
        self.exit_value = 0
        self.exit_time = 0


class _Vm:
    """One VM: its vCPUs' range, halt-poll ceiling, tick, distributor, PSCI."""

    __slots__ = ("index", "nr_vcpus", "first", "override", "max_halt_poll_ns", "tick_ns",
                 "tick_gen", "gic_enabled", "nr_spis", "spi_en", "spi_act", "spi_latch",
                 "spi_line", "spi_level", "spi_prio", "spi_target", "spi_mpidr",
                 "psci_version", "suspend_cap", "code_base", "vcpu_features", "features_set")

    def __init__(self, index, nr_vcpus, first, nr_spis):
        self.index, self.nr_vcpus, self.first = index, nr_vcpus, first
        self.override = False
        self.max_halt_poll_ns = 0
        self.tick_ns = 0
        self.tick_gen = 0
        # The distributor: enabled by the booted guest; SPIs disabled, level,
        # routed to MPIDR 0 (vCPU 0), as vgic_init leaves them.
        self.gic_enabled = True
        self.nr_spis = nr_spis
        self.spi_en = 0
        self.spi_act = 0
        self.spi_latch = 0
        self.spi_line = 0
        self.spi_level = _ALL_INTIDS & ~_PRIV_MASK
        self.spi_prio = [GIC_DEFAULT_PRIORITY] * NR_INTIDS
        self.spi_target = [0] * NR_INTIDS
        self.spi_mpidr = [0] * NR_INTIDS
        self.psci_version = KVM_ARM_PSCI_LATEST
        self.suspend_cap = False
        self.vcpu_features = DEFAULT_VCPU_FEATURES   # until the first KVM_ARM_VCPU_INIT
        self.features_set = False
        self.code_base = 0


class _Source(_Stream):
    """A device interrupt source and its random stream."""

    __slots__ = ("vm", "intid", "kind", "p0", "p1", "times", "idx", "gen", "index", "target")


def run_loop(e, until_ns, stop_on_exit):
    """Process every event before ``until_ns``; then the clock reads ``until_ns``.

    With ``stop_on_exit``, stop after the first event in which a vCPU exited
    to userspace (the clock then reads that event's time) and return that
    thread; otherwise, or when ``until_ns`` was reached, return -1.
    """
    q = e.q
    threads = e.threads
    heap_pop = queue.heap_pop
    q_peek = queue.q_peek
    while q.len:
        if stop_on_exit and e.exits:
            loop_left(e)
            return e.exits[0]
        t = q_peek(q)
        if t >= until_ns:
            break
        if e.held and t > e.now:
            host.release_held(e)             # the clock moves on without them
            continue
        ev = heap_pop(e)
        if ev is None:
            continue                         # only void events at that time
        t, cls, _seq, who, gen = ev
        e.now = t
        e.cur_key = cls << SEQ_BITS | _seq
        e.waker = -1
        if cls == _EV_TICK:
            vm = e.vms[who]
            if gen != vm.tick_gen:
                continue
            e.events += 1
            kick.tick(e, vm, t)
            queue.heap_push(e, t + vm.tick_ns, _EV_TICK, who, gen)
            continue
        if cls == _EV_SOURCE:
            s = e.sources[who]
            if gen != s.gen:
                continue
            e.events += 1
            kick.source_fire(e, s, t)
            continue
        th = threads[who]
        if cls == _EV_TIMER:
            if gen != th.timer_gen:
                continue
            e.events += 1
            if th.kind == THREAD_HOST:
                hostthread.ht_wake(e, th, t)       # a host thread's hrtimer
            else:
                timer.timer_fire(e, th, t)
            continue
        e.waker = who                       # the waker of what it wakes
        if cls == _EV_SLICE:
            if gen != th.run_gen:
                continue
            e.events += 1
            host.slice_end(e, th, t)
            continue
        if gen != th.gen:
            continue
        e.events += 1
        if cls == _EV_SEG:
            if th.kind == THREAD_HOST:
                hostthread.ht_run(e, th, t)
            else:
                guest.segment_end(e, th, t)
        elif cls == _EV_POLL:
            # The poll loop ran out of time: poll_end = cur >= stop.
            halt.block(e, th, t, t)
        else:
            host.got_cpu(e, th, t)
    e.waker = -1
    if stop_on_exit and e.exits:
        loop_left(e)
        return e.exits[0]
    if e.held and until_ns > e.now:
        host.release_held(e)
        return run_loop(e, until_ns, stop_on_exit)
    e.now = until_ns
    e.cur_key = 0
    loop_left(e)
    return -1


def loop_left(e) -> None:
    """run_loop returns: the lazy poll windows that ran out before where it stopped
    end now (halt.py, poll_settle), as their events would have."""
    e.waker = -1
    halt.settle_polls(e)
    e.cur_key = 0


class Engine:
    """The plain-Python engine.  See ``kvmwake._core.Engine`` for the interface."""

    def __init__(self, arch: str, host_cpus: int, seed: int, costs: dict | None = None,
                 trace_capacity: int = 1 << 20, timeline_capacity: int = 0,
                 scheduler: str = "fifo"):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r} "
                             f"(choose from {', '.join(SCHEDULERS)})")
        self.sched = SCHEDULERS.index(scheduler)
        self.held = []              # vCPU threads in userspace still on their CPU
        self.base_slice = sched_base_slice(host_cpus)
        self.vcpu_pack = False      # placement: vcpu_pack_cpu() (host.py); set_vcpu_pack()
        self.preempt_skips_delayed = False  # check_preempt_wakeup_fair (host.py)
        self.arch = arch
        self.x86 = arch == "x86"
        self.seed = seed
        # Each cost's constant; a drawn cost (given as its table, kvmwake.costs.
        # cost_table) also has its row of cost_tabs and its bit of cost_dist, and
        # its constant is the table's median.
        merged = dict(COST_DEFAULTS)
        if costs:
            merged.update(costs)
        self.costs = {}
        self.cost_tabs = []
        self.cost_dist = 0
        for c, name in enumerate(DRAWN_COSTS):
            v = merged[name]
            if isinstance(v, (int, np.integer)):
                self.costs[name] = int(v)
                self.cost_tabs.append([int(v)] * COST_TABLE_N)
            else:
                tab = [int(x) for x in v]
                if len(tab) != COST_TABLE_N:
                    raise ValueError(f"cost {name}: a table of {COST_TABLE_N} values, "
                                     f"not {len(tab)}")
                self.costs[name] = tab[COST_TABLE_N // 2]
                self.cost_tabs.append(tab)
                self.cost_dist |= 1 << c
        self.costs["sched_slice_ns"] = int(merged["sched_slice_ns"])
        self.halt_poll_ns = haltpoll.HALT_POLL_NS_DEFAULT[arch]
        self.halt_poll_ns_grow = haltpoll.HALT_POLL_NS_GROW_DEFAULT
        self.halt_poll_ns_grow_start = haltpoll.HALT_POLL_NS_GROW_START_DEFAULT
        self.halt_poll_ns_shrink = haltpoll.HALT_POLL_NS_SHRINK_DEFAULT
        self.resched_irq = RESCHEDULE_IRQ[arch]
        self.tick_irq = TICK_IRQ[arch]
        self.inject_req = INJECT_REQUEST[arch]
        self.cpus = [host._Cpu() for _ in range(host_cpus)]
        self.vms: list[_Vm] = []
        self.threads: list[_Thread] = []
        self.sources: list[_Source] = []
        self.q = queue.EventQueue()
        self.seq = 0
        self.now = 0
        self.events = 0
        self.halts = 0
        self.lat_hist = [0] * LAT_BUCKETS
        self.trace = deque(maxlen=trace_capacity) if trace_capacity else None
        self.trace_dropped = 0
        self.tracing = bool(trace_capacity)
        self.tr_lo, self.tr_hi = 0, 0xFFFF_FFFF       # the threads traced
        # The state timeline (kvmwake.outputs.timeline): a ring of (t, g, cpu, state),
        # each thread's state after the dropped records, and the window start.
        self.tl_cap = timeline_capacity
        self.timeline: deque = deque()
        self.tl_base: list = []
        self.tl_t0 = 0
        self.timeline_dropped = 0
        self.failed = False
        self.code_base = MEM_BASE[arch]
        self.exits: deque = deque()      # threads that exited to userspace, in order
        # Placement (host.py): each CPU's LLC group, the thread whose event is being
        # handled (-1: none), how many threads are not pinned by default.
        self.llc = [0] * host_cpus
        self.waker = -1
        self.nunpinned = 0
        # The key of the event run_loop is handling (0 outside it): where lazy poll
        # windows ending now stand (halt.py, poll_settle).
        self.cur_key = 0
        self.nlazy = 0                  # threads in a lazy poll window

    def cost_tables(self) -> dict:
        """The drawn costs' tables: {name: tuple of COST_TABLE_N values}."""
        return {name: tuple(self.cost_tabs[c]) for c, name in enumerate(DRAWN_COSTS)
                if (self.cost_dist >> c) & 1}

    # -- set-up -------------------------------------------------------------

    def add_vm(self, nr_vcpus: int, nr_spis: int = DEFAULT_NR_SPIS) -> int:
        # Everything is built before the engine's lists change: a failure (memory)
        # leaves the engine as it was.
        first = len(self.threads)
        vm = _Vm(len(self.vms), nr_vcpus, first, nr_spis)
        vm.code_base = self.code_base
        new = [_Thread(first + i, vm, i, (first + i) % len(self.cpus), self.seed)
               for i in range(nr_vcpus)]
        self.threads.extend(new)
        self.tl_base.extend([int(_USER)] * nr_vcpus)
        self.vms.append(vm)
        return vm.index

    def load_program(self, g: int, ops: np.ndarray) -> None:
        th = self.threads[g]
        th.prog = [tuple(int(x) for x in op) for op in ops.tolist()]
        th.pc = 0
        th.pc_valid = True
        th.loops = [0] * MAX_LOOP_DEPTH

    def set_vm_halt_poll(self, vm: int, max_ns: int) -> None:
        """KVM_CAP_HALT_POLL: per-VM ceiling, overriding the module value for good."""
        self.vms[vm].max_halt_poll_ns = max_ns
        self.vms[vm].override = True

    def set_tick(self, vm: int, period_ns: int) -> None:
        """A periodic tick on every halted vCPU of the VM, at multiples of the period."""
        v = self.vms[vm]
        v.tick_ns = period_ns
        v.tick_gen += 1
        if period_ns:
            first = (self.now // period_ns + 1) * period_ns
            queue.heap_push(self, first, _EV_TICK, vm, v.tick_gen)

    def add_source(self, vm: int, intid: int, kind: int, p0: int, p1: int,
                   times=None, target: int = 0) -> int:
        """A device interrupt source: SPI ``intid`` (arm64) or MSI vector ``intid`` to
        thread ``target`` (x86); see SourceKind."""
        s = _Source()
        s.index = len(self.sources)
        s.target = target
        s.vm, s.intid, s.kind, s.p0, s.p1 = vm, intid, kind, p0, p1
        s.times = [int(x) for x in times] if times is not None else []
        s.idx = 0
        s.gen = 1
        nth = sum(1 for x in self.sources if x.vm == vm)
        rng_seed(s, self.seed, vm, SOURCE_STREAM_BASE + nth)
        self.sources.append(s)
        # The first arrival at or after now.
        now = self.now
        if s.kind == SourceKind.PERIODIC:
            first = s.p1 if s.p1 >= now else s.p1 + ((now - s.p1) // s.p0 + 1) * s.p0
        elif s.kind == SourceKind.POISSON:
            first = now + kick.source_draw(s)
        else:
            while s.idx < len(s.times) and s.times[s.idx] < now:
                s.idx += 1
            if s.idx >= len(s.times):
                return s.index
            first = s.times[s.idx]
        queue.heap_push(self, first, _EV_SOURCE, s.index, s.gen)
        return s.index

    def start_vcpu(self, g: int) -> None:
        """The thread enters KVM_RUN now (at the current virtual time)."""
        th = self.threads[g]
        if th.state != _USER:
            return
        if g in self.exits:
            # KVM_RUN returned that exit: no second KVM_RUN before it is taken.
            raise EngineError(f"vCPU thread {g} has an exit not yet taken")
        th.resume = RESUME_START
        if self.held and host.is_held(self, th):
            if host.cpu_allowed(self, th, th.pcpu):
                self._guard(host.reenter_held, self, th, self.now)
                return
            # Its CPU was taken from its affinity while it was in userspace:
            # it leaves it (as the migration stopper would move it) and wakes.
            host.drop_held(self, g)
            self._guard(host.unhold, self, th)
        if not host.cpu_allowed(self, th, th.pcpu):
            # Its CPU was taken from its affinity while it was outside KVM_RUN.
            host.set_task_cpu(self, th, host.select_task_rq(self, th, -1))
        if self.tl_cap:
            host.tl_note(self, th, self.now, _RUNNABLE)
        th.state = _RUNNABLE
        # KVM_RUN from userspace: a system call, not a wake-up.
        self._guard(host.make_runnable, self, th, self.now, 0)

    def add_host_thread(self, ops: np.ndarray, cpu: int) -> int:
        """A host thread (not a vCPU) with a validated host program, placed on host
        CPU ``cpu``; it enters the thread table after every thread so far and is
        started by ``start_host_thread``.  Returns its thread index."""
        if not 0 <= cpu < len(self.cpus):
            raise ValueError(f"host CPU {cpu} does not exist")
        g = len(self.threads)
        nhost = sum(1 for th in self.threads if th.kind == THREAD_HOST)
        th = _Thread(g, None, nhost, cpu, self.seed)
        self.threads.append(th)
        self.tl_base.append(int(_USER))
        self.load_program(g, ops)
        return g

    def start_host_thread(self, g: int) -> None:
        """The host thread becomes runnable now (wake_up_new_task: no wake-up cost)."""
        th = self.threads[g]
        if th.kind != THREAD_HOST or th.state != _USER:
            raise EngineError(f"thread {g} is not a host thread that has not started")
        if self.failed:
            raise EngineError("this engine stopped on an earlier error")
        th.resume = RESUME_START
        th.wake_ts = self.now
        th.exit_time = self.now               # sleep_until's deadlines count from here
        if self.tl_cap:
            host.tl_note(self, th, self.now, _RUNNABLE)
        th.state = _RUNNABLE
        self._guard(host.make_runnable, self, th, self.now, 0)

    def thread_kinds(self) -> list:
        """Per thread of the table, its kind (model.THREAD_VCPU or THREAD_HOST)."""
        return [th.kind for th in self.threads]

    # -- running --------------------------------------------------------------

    def run(self, until_ns: int) -> None:
        """Process every event before ``until_ns``; then the clock reads ``until_ns``."""
        self._guard(run_loop, self, until_ns, False)

    @property
    def next_event_ns(self):
        """The earliest queued event's time (a void one included), or None when the
        queue is empty: a real-time driver sleeps until it (vcpu_threads.py)."""
        t = queue.q_peek(self.q)
        return None if t == queue.NO_TIME else t

    def run_until_exit(self, until_ns: int, release_gil: bool = True) -> int:
        """Like ``run``, but stop after the first event in which a vCPU exited to
        userspace; returns that thread, or -1 when ``until_ns`` was reached.
        (``release_gil``: the core's; plain Python always holds the GIL.)"""
        return self._guard(run_loop, self, until_ns, True)

    def _guard(self, fn, *args):
        if self.failed:
            raise EngineError("this engine stopped on an earlier error")
        try:
            return fn(*args)
        except EngineError:
            self.failed = True
            raise

    # -- host-side calls (at the current virtual time) -------------------------------

    def make_request(self, g: int, req: int) -> bool:
        """kvm_make_request + kvm_vcpu_kick, as kvm_make_vcpu_request does it.

        Sets the request bit (unless NO_ACTION), wakes a waiting vCPU unless
        the request is NO_WAKEUP, and IPIs a vCPU in guest mode.  Returns True
        if it sent an IPI.
        """
        return self._guard(psci.request, self, self.threads[g], req, self.now)

    def signal(self, g: int) -> None:
        """A signal for the vCPU thread: it leaves KVM_RUN with KVM_EXIT_INTR."""
        th = self.threads[g]
        th.sig_pending = True
        self._guard(kick.signal_wake, self, th, self.now)

    def take_exit(self, g: int) -> dict:
        """The exit thread g last made, removed from the queue of exits."""
        th = self.threads[g]
        if g in self.exits:
            self.exits.remove(g)
        return {"reason": th.exit_reason, "type": th.exit_type, "ndata": th.exit_ndata,
                "data0": th.exit_data0, "ucall": th.exit_ucall, "value": th.exit_value,
                "time": th.exit_time}

    def set_trace_threads(self, lo: int, hi: int) -> None:
        """Trace only threads lo <= g < hi from now on (0, 2**32 - 1: every thread)."""
        self.tr_lo, self.tr_hi = lo, hi

    @property
    def trace_threads(self) -> tuple:
        """(lo, hi): the threads the trace ring records."""
        return (self.tr_lo, self.tr_hi)

    def run_islands(self, until_ns: int, threads: int = 1) -> int:
        """0: the reference runs every host on its one queue (``run_until_exit``);
        the core's islands are held against it."""
        return 0

    def island_plan(self) -> tuple:
        """Each thread's, host CPU's and VM's island (reference/islands.py)."""
        return islands.isl_plan(self)

    def islands_blocked(self, starting=()):
        """Why the host cannot run as islands now, or None (reference/islands.py);
        ``starting``: vCPU threads the run would start first."""
        return islands.isl_blocked(self, starting)

    def pending_exits(self) -> list:
        return list(self.exits)

    def get_mp_state(self, g: int) -> int:
        return int(self.threads[g].mp_state)

    def set_mp_state(self, g: int, state: int) -> None:
        """KVM_SET_MP_STATE with a value the arch accepts (the caller checked)."""
        th = self.threads[g]
        if self.x86:
            th.mp_state = MpState.RUNNABLE if state == MpState.SIPI_RECEIVED else state
        elif state == MpState.STOPPED:
            self._guard(psci.power_off, self, th, self.now)
        elif state == MpState.SUSPENDED:
            # kvm_arm_vcpu_suspend: SUSPENDED, KVM_REQ_SUSPEND, kick.
            th.mp_state = MpState.SUSPENDED
            self._guard(psci.request, self, th, Request.SUSPEND, self.now)
        else:
            th.mp_state = MpState.RUNNABLE       # only the field: no kick

    def get_reg(self, g: int, idx: int) -> int:
        """KVM_GET_ONE_REG of a core register: x0..x30 (0..30), SP (31), PC (32),
        PSTATE (33); a reset owed by PSCI CPU_ON is applied first (kvm_arch_vcpu_ioctl)."""
        th = self.threads[g]
        if th.reset_pending:
            run.reset_vcpu(self, th)
        if idx < 31:
            return th.regs[idx]
        if idx == 31:
            return th.sp
        if idx == 32:
            return run.get_pc(self, th)
        return run.get_pstate(self, th)

    def set_reg(self, g: int, idx: int, value: int) -> None:
        """KVM_SET_ONE_REG of a core register (the caller checked a PSTATE's mode)."""
        th = self.threads[g]
        if th.reset_pending:
            run.reset_vcpu(self, th)
        if idx < 31:
            th.regs[idx] = value
        elif idx == 31:
            th.sp = value
        elif idx == 32:
            run.set_pc(self, th, value)
        else:
            run.set_pstate(self, th, value)

    def vm_psci_version(self, vm_index: int) -> int:
        """kvm_psci_version: what KVM_REG_ARM_PSCI_VERSION reads."""
        return int(psci.psci_version(self.vms[vm_index]))

    def vcpu_features(self, vm_index: int):
        """(kvm->arch.vcpu_features, KVM_ARCH_FLAG_VCPU_FEATURES_CONFIGURED)."""
        vm = self.vms[vm_index]
        return vm.vcpu_features, bool(vm.features_set)

    def vcpu_init(self, g: int, features: int, off: bool) -> None:
        """KVM_ARM_VCPU_INIT with features the caller checked (POWER_OFF stripped):
        the VM's feature set, kvm_reset_vcpu, then STOPPED (power-off) or RUNNABLE."""
        th = self.threads[g]
        th.vm.vcpu_features = features
        th.vm.features_set = True
        run.reset_vcpu(self, th)
        if off:
            self._guard(psci.power_off, self, th, self.now)
        else:
            th.mp_state = MpState.RUNNABLE

    def uaccess_write_pending(self, vm_index: int, g: int, intid: int, on: bool) -> None:
        th = self.threads[g] if g >= 0 else None
        self._guard(gic.uaccess_write_pending, self, self.vms[vm_index], th, intid, on,
                    self.now)

    def uaccess_write_active(self, vm_index: int, g: int, intid: int, on: bool) -> None:
        th = self.threads[g] if g >= 0 else None
        self._guard(gic.uaccess_write_active, self, self.vms[vm_index], th, intid, on,
                    self.now)

    def uaccess_write_dist_ctlr(self, vm_index: int, on: bool) -> None:
        gic.uaccess_write_dist_ctlr(self, vm_index, on)

    def enable_system_suspend(self, vm_index: int) -> None:
        self.vms[vm_index].suspend_cap = True

    def set_psci_version(self, vm_index: int, version: int) -> None:
        self.vms[vm_index].psci_version = version

    def kick(self, g: int) -> bool:
        return self._guard(kick.kick, self, self.threads[g], self.now)

    def raise_irq_at(self, g: int, irq: int) -> bool:
        """SGI ``irq`` (arm64) or IPI vector ``irq`` (x86) arrives at vCPU ``g``."""
        return self._guard(gic.raise_irq, self, self.threads[g], irq, self.now)

    def raise_pending(self, g: int) -> bool:
        """The arch's reschedule IPI arrives at vCPU ``g``."""
        return self._guard(gic.raise_irq, self, self.threads[g], self.resched_irq, self.now)

    def irq_line(self, vm_index: int, intid: int, level: bool, g: int = -1) -> bool:
        """KVM_IRQ_LINE: an SPI (g = -1) or a PPI of thread g changes level."""
        vm = self.vms[vm_index]
        th = self.threads[g] if g >= 0 else None
        return self._guard(gic.inject, self, vm, th, intid, level, self.now)

    def signal_msi(self, g: int, vector: int) -> bool:
        """KVM_SIGNAL_MSI with fixed delivery to thread g's LAPIC."""
        return self._guard(gic.apic_set_irq, self, self.threads[g], vector, self.now)

    def configure_irq(self, vm_index: int, g: int, intid: int, enabled: int, priority: int,
                      level: int) -> None:
        """Set an interrupt's enable, priority and trigger (-1: leave as is)."""
        vm = self.vms[vm_index]
        th = self.threads[g] if g >= 0 else None
        bit = 1 << intid
        if priority >= 0:
            if intid < 32:
                th.priv_prio[intid] = priority & VGIC_PRI_MASK
            else:
                vm.spi_prio[intid] = priority & VGIC_PRI_MASK
        if level >= 0 and intid >= 32:
            vm.spi_level = vm.spi_level | bit if level else vm.spi_level & ~bit
            if not level:
                vm.spi_line &= ~bit
            gic.refresh(self, vm, th, intid)
        if enabled >= 0:
            self._guard(gic.set_enabled, self, vm, th, intid, bool(enabled), self.now)

    def set_dist_enabled(self, vm_index: int, on: bool) -> None:
        """GICD_CTLR: enabling the distributor kicks every vCPU with something pending."""
        gic.set_dist_enabled(self, vm_index, on, self.now)

    def route_spi(self, vm_index: int, b: int, mpidr: int) -> None:
        """GICD_IROUTER: Aff2.Aff1.Aff0 names the target; no match, no delivery."""
        gic.route_spi(self, vm_index, b, mpidr, self.now)

    def set_pmr(self, g: int, pmr: int) -> None:
        th = self.threads[g]
        if self.x86:
            th.tpr = pmr
        else:
            th.pmr = pmr & VGIC_PRI_MASK

    def set_masked(self, g: int, masked: bool) -> None:
        self.threads[g].masked = bool(masked)

    # -- read-out -----------------------------------------------------------------

    def irq_state(self, g: int, intid: int) -> dict:
        """What the vGIC (or LAPIC) holds for ``intid`` as seen by thread g."""
        th = self.threads[g]
        vm = th.vm
        if self.x86:
            return {"irr": bool(th.irr >> intid & 1), "isr": bool(th.isr >> intid & 1),
                    "tpr": th.tpr, "masked": th.masked}
        b = intid
        if b < 32:
            return {"pending": bool(gic.pending_bit(self, vm, th, b)),
                    "enabled": bool(th.priv_en >> b & 1), "active": bool(th.priv_act >> b & 1),
                    "priority": th.priv_prio[b], "level": bool(th.priv_level >> b & 1),
                    "line": bool(th.priv_line >> b & 1), "latch": bool(th.priv_latch >> b & 1),
                    "queued": bool(th.ap >> b & 1),
                    "target": th.vcpu_id, "pmr": th.pmr, "masked": th.masked}
        return {"pending": bool(gic.pending_bit(self, vm, th, b)),
                "enabled": bool(vm.spi_en >> b & 1), "active": bool(vm.spi_act >> b & 1),
                "priority": vm.spi_prio[b], "level": bool(vm.spi_level >> b & 1),
                "line": bool(vm.spi_line >> b & 1), "latch": bool(vm.spi_latch >> b & 1),
                "queued": vm.spi_target[b] >= 0 and bool(
                    self.threads[vm.first + vm.spi_target[b]].ap >> b & 1),
                "target": vm.spi_target[b], "mpidr": vm.spi_mpidr[b],
                "pmr": th.pmr, "masked": th.masked}

    def vm_gic_enabled(self, vm_index: int) -> bool:
        return self.vms[vm_index].gic_enabled

    def timer_state(self, g: int) -> dict:
        th = self.threads[g]
        return {"cval": th.timer_cval, "ctl": th.timer_ctl, "period": th.timer_period,
                "istatus": bool(self.now >= th.timer_cval and th.timer_ctl
                                & ARCH_TIMER_CTRL_ENABLE)}

    @property
    def timeline_capacity(self) -> int:
        return self.tl_cap

    def set_timeline_capacity(self, capacity: int) -> None:
        if self.timeline or self.timeline_dropped:
            raise ValueError("the timeline capacity can only be set before it records")
        if capacity:
            halt.queue_lazy_polls(self)     # the timeline records a poll's end
        self.tl_cap = capacity
        self.tl_t0 = self.now
        self.tl_base = [int(th.state) for th in self.threads]

    def timeline_array(self) -> np.ndarray:
        from ..outputs.timeline import to_array
        return to_array(list(self.timeline))

    def timeline_window(self):
        return self.tl_t0, np.array(self.tl_base, dtype=np.uint8)

    def timeline_totals(self, now: int) -> dict:
        from ..outputs.timeline import totals
        t0, base = self.timeline_window()
        return totals(self.timeline_array(), base, t0, now, len(self.cpus),
                      [th.pcpu for th in self.threads])

    def stats_array(self) -> np.ndarray:
        return np.array([th.stats for th in self.threads], dtype=np.uint64).reshape(
            len(self.threads), NR_STATS)

    def stats_rows(self, first: int, n: int) -> np.ndarray:
        """A copy of the stats rows of threads ``first .. first + n - 1`` only."""
        if first < 0 or n < 0 or first + n > len(self.threads):
            raise IndexError(f"stats rows {first}..{first + n - 1} out of range")
        return np.array([th.stats for th in self.threads[first:first + n]],
                        dtype=np.uint64).reshape(n, NR_STATS)

    def stats_view(self, first: int = 0, n: int = -1) -> np.ndarray:
        """The stats rows of threads ``first .. first + n - 1`` (``n`` -1: to the last),
        read-only (see ``kvmwake._core.Engine.stats_view``); this engine keeps its rows
        as Python lists, so here they are a copy of those rows made at the call."""
        nth = len(self.threads)
        if n == -1:
            n = nth - first
        rows = self.stats_rows(first, n)
        rows.flags.writeable = False
        return rows

    def stat(self, g: int, i: int) -> int:
        """Stat ``i`` (a column of the stats row, ``model.S_*``) of thread ``g``."""
        if not (0 <= g < len(self.threads) and 0 <= i < NR_STATS):
            raise IndexError(f"stat {i} of thread {g} out of range")
        return int(self.threads[g].stats[i])

    def lat_hist_array(self) -> np.ndarray:
        return np.array(self.lat_hist, dtype=np.uint64)

    def trace_list(self) -> list:
        return list(self.trace) if self.trace is not None else []

    def trace_array(self, pid_lo: int = 0, pid_hi: int = 1 << 32) -> np.ndarray:
        """The trace records of the pids ``pid_lo <= pid < pid_hi``, oldest first, as a
        ``tracefmt.TRACE_RECORD_DTYPE`` array."""
        from ..outputs.tracefmt import TRACE_RECORD_DTYPE
        recs = [r for r in (self.trace or ()) if pid_lo <= r[1] < pid_hi]
        return np.array(recs, dtype=TRACE_RECORD_DTYPE)

    @property
    def scheduler(self) -> str:
        """The host scheduler's name (``kvmwake.model.SCHEDULERS``)."""
        return SCHEDULERS[self.sched]

    def sched_state(self) -> dict:
        """The scheduler's state (see ``kvmwake._core.Engine.sched_state``)."""
        threads = [{"vruntime": th.vruntime, "deadline": th.deadline, "vlag": th.vlag,
                    "vprot": th.vprot, "exec_start": th.exec_start, "on_rq": bool(th.on_rq),
                    "sched_delayed": bool(th.sched_delayed)} for th in self.threads]
        cpus = []
        for cpu in self.cpus:
            n = host.nr_queued(cpu)
            cpus.append({"cur": cpu.cur, "queue": list(cpu.runq), "nr_running": n,
                         "V": cpu.zero_v + (cpu.sum_v // n if n else 0)})
        return {"threads": threads, "cpus": cpus}

    def thread_info(self, g: int) -> dict:
        th = self.threads[g]
        if th.kind == THREAD_HOST:
            return {"state": int(th.state), "pcpu": th.pcpu, "pc": th.pc, "kind": th.kind,
                    "nr_migrations": th.nr_migrations}
        return {"state": int(th.state), "halt_poll_ns": th.halt_poll_ns,
                "requests": th.requests, "pcpu": th.pcpu, "pc": th.pc,
                "runnable": gic.runnable(self, th), "mp_state": int(th.mp_state),
                "sig_pending": th.sig_pending, "exit_reason": int(th.exit_reason),
                "nr_migrations": th.nr_migrations}

    # -- placement (host.py) ------------------------------------------------------------

    def set_vcpu_pack(self, on: bool) -> None:
        """The vCPU-pack wake placement (see ``kvmwake._core.Engine.set_vcpu_pack``)."""
        self.vcpu_pack = bool(on)

    def set_preempt_skips_delayed(self, on: bool) -> None:
        """See ``kvmwake._core.Engine.set_preempt_skips_delayed``."""
        self.preempt_skips_delayed = bool(on)

    def set_llc(self, groups) -> None:
        """Each host CPU's LLC group (see ``kvmwake._core.Engine.set_llc``)."""
        groups = [int(x) for x in groups]
        if len(groups) != len(self.cpus) or any(not 0 <= x < len(self.cpus) for x in groups):
            raise ValueError(f"LLC groups: one group number below {len(self.cpus)} per "
                             "host CPU")
        self.llc = groups

    def llc_list(self) -> list:
        return list(self.llc)

    def set_affinity(self, g: int, cpus, initial: bool = False) -> None:
        """sched_setaffinity() of thread g (see ``kvmwake._core.Engine.set_affinity``)."""
        if cpus != "pinned":
            halt.queue_lazy_polls(self)     # a freed CPU may now pull a thread
        th = self.threads[g]
        old = th.aff_kind
        if cpus == "pinned":
            kind, mask = host.AFF_PINNED, 0
        elif cpus == "all":
            kind, mask = host.AFF_ALL, 0
        else:
            mask = 0
            for c in cpus:
                if not 0 <= c < len(self.cpus):
                    raise ValueError(f"CPU {c} does not exist on this host")
                mask |= 1 << c
            if not mask:
                raise ValueError("an empty CPU set")
            kind = host.AFF_LIST
        th.aff_kind, th.aff_mask = kind, mask
        self.nunpinned += (kind != host.AFF_PINNED) - (old != host.AFF_PINNED)
        if initial:
            th.pcpu = host.select_task_rq_fork(self, th)
            return
        self._guard(host.migrate_disallowed, self, th, self.now)

    def affinity(self, g: int) -> tuple:
        th = self.threads[g]
        return tuple(c for c in range(len(self.cpus)) if host.cpu_allowed(self, th, c))

    def affinity_kind(self, g: int) -> str:
        return ("pinned", "all", "list")[self.threads[g].aff_kind]
