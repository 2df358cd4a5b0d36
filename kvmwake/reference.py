"""The reference engine: kvmwake's model in plain Python.

Slow and meant to be obviously right.  The Cython core (``kvmwake._core``)
implements the same model; for the same inputs both give the same stats, the
same trace and the same counters, event for event (``tests/test_differential.py``).
The model is described in ``docs/design.md``; each piece names the kernel
function it mirrors.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from . import haltpoll
from .model import (
    ARCH_TIMER_CTRL_ENABLE, ARCH_TIMER_CTRL_IT_MASK, CONT_END, CONT_EOI, CONT_HALT,
    CONT_IRQ, CONT_NEXT, CONT_TRAP, COST_DEFAULTS, DEFAULT_NR_SPIS, GIC_DEFAULT_PMR,
    GIC_DEFAULT_PRIORITY, HALT_POLL_HIST_COUNT, INJECT_REQUEST, IPI_RESCHEDULE,
    KVM_REQUEST_MASK, KVM_REQUEST_NO_ACTION, KVM_REQUEST_NO_WAKEUP, LAT_BUCKETS,
    MAX_LOOP_DEPTH, MAX_OPS_PER_INSTANT, MAX_TAKES_PER_INSTANT, NR_INTIDS, NR_STATS,
    RESCHEDULE_IRQ, RESUME_HALT, RESUME_SEGMENT, RESUME_START, S_ATTEMPTED_POLL,
    S_BLOCKING, S_HALT_EXITS, S_POLL_FAIL_HIST, S_POLL_FAIL_NS, S_POLL_SUCCESS_HIST,
    S_POLL_SUCCESS_NS, S_SUCCESSFUL_POLL, S_WAIT_HIST, S_WAIT_NS, S_WAKEUP, TICK_IRQ,
    TR_HALT_POLL_NS, TR_WAKEUP, VGIC_PRI_MASK, VTIMER_IRQ, Dist, EventClass, Op, Request,
    SourceKind, ThreadState, WakeTarget, lat_bucket, mpidr_of, vcpu_of_mpidr,
)

M64 = (1 << 64) - 1
U32 = 0xFFFF_FFFF
PID_BASE = 1000
#: Stream number of device source i of a VM (vCPU streams use the vCPU id).
SOURCE_STREAM_BASE = 1 << 31

_USER, _RUNNING, _POLLING, _BLOCKED, _RUNNABLE = (
    ThreadState.USER, ThreadState.RUNNING, ThreadState.POLLING,
    ThreadState.BLOCKED, ThreadState.RUNNABLE)
_EV_TICK, _EV_SOURCE, _EV_TIMER, _EV_SEG, _EV_POLL, _EV_RUN, _EV_SLICE = (
    EventClass.TICK, EventClass.SOURCE, EventClass.TIMER, EventClass.SEGMENT,
    EventClass.POLL_END, EventClass.RUN, EventClass.SLICE)
_REQ_UNBLOCK_BIT = 1 << (Request.UNBLOCK & KVM_REQUEST_MASK)
_PRIV_MASK = 0xFFFF_FFFF
_SGI_MASK = 0xFFFF
_ALL_INTIDS = (1 << NR_INTIDS) - 1


class EngineError(RuntimeError):
    """The simulation cannot go on (e.g. a program that lets no time pass)."""


# ---------------------------------------------------------------------------
# Random streams: one per vCPU and one per device source, a 64-bit LCG with a
# per-stream increment and the SplitMix64 finaliser as output function.

def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    return fmix64(x)


def fmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def stream_seed(seed: int, vm_index: int, stream: int) -> tuple[int, int]:
    """(state, increment) of stream ``stream`` of VM ``vm_index``."""
    h = splitmix64(seed & M64)
    h = splitmix64(h ^ ((vm_index << 32) | stream))
    state = splitmix64(h ^ 0x5851F42D4C957F2D)
    inc = ((splitmix64(h ^ 0x14057B7EF767814F) << 1) | 1) & M64
    return state, inc


LCG_MULT = 6364136223846793005
MAX_DRAW_NS = 1 << 62


class _Stream:
    __slots__ = ("rng_state", "rng_inc")

    def next64(self) -> int:
        self.rng_state = (self.rng_state * LCG_MULT + self.rng_inc) & M64
        return fmix64(self.rng_state)


def draw(st: _Stream, dist: int, p0: int, p1: int) -> int:
    """A duration from ``st``: fixed p0, exponential of mean p0, uniform [p0, p1]."""
    if dist == Dist.FIXED:
        return p0
    if dist == Dist.EXPONENTIAL:
        u = (st.next64() >> 11) * (1.0 / 9007199254740992.0)
        d = -math.log(1.0 - u) * p0 + 0.5
        return MAX_DRAW_NS if d >= MAX_DRAW_NS else int(d)
    return p0 + st.next64() % (p1 - p0 + 1)


class _Thread(_Stream):
    """One vCPU thread and its vCPU (the kvm_vcpu fields the model needs)."""

    __slots__ = (
        "g", "vm", "vcpu_id", "pcpu", "state", "resume", "gen", "run_gen",
        "slice_armed", "run_start",
        "seg_end", "seg_gfrom", "seg_gto", "cont", "rem_end", "rem_gfrom", "rem_gto",
        "halt_start", "poll_end", "do_poll", "wake_ts", "halt_poll_ns", "requests",
        "prog", "pc", "loops", "stall_t", "stall_n", "stats",
        # interrupt state: vGICv3 redistributor + CPU interface, or the LAPIC
        "ap", "priv_en", "priv_act", "priv_latch", "priv_line", "priv_level", "priv_prio",
        "pmr", "masked", "handler_ns", "cur_irq", "sv_guest", "sv_cont", "sv_valid",
        "timer_cval", "timer_ctl", "timer_gen", "timer_period", "irr", "isr", "tpr",
    )

    def __init__(self, g, vm, vcpu_id, pcpu, seed):
        self.g, self.vm, self.vcpu_id, self.pcpu = g, vm, vcpu_id, pcpu
        self.state = _USER
        self.resume = RESUME_START
        self.gen = 0
        self.run_gen = 0
        self.slice_armed = False
        self.run_start = 0
        self.seg_end = self.seg_gfrom = self.seg_gto = 0
        self.cont = CONT_NEXT
        self.rem_end = self.rem_gfrom = self.rem_gto = 0
        self.halt_start = self.poll_end = self.wake_ts = 0
        self.do_poll = False
        self.halt_poll_ns = 0
        self.requests = 0
        self.prog = None
        self.pc = 0
        self.loops = [0] * MAX_LOOP_DEPTH
        self.rng_state, self.rng_inc = stream_seed(seed, vm.index, vcpu_id)
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


class _Vm:
    __slots__ = ("index", "nr_vcpus", "first", "override", "max_halt_poll_ns", "tick_ns",
                 "tick_gen", "gic_enabled", "nr_spis", "spi_en", "spi_act", "spi_latch",
                 "spi_line", "spi_level", "spi_prio", "spi_target", "spi_mpidr")

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


class _Source(_Stream):
    __slots__ = ("vm", "intid", "kind", "p0", "p1", "times", "idx", "gen", "index", "target")


class _Cpu:
    __slots__ = ("cur", "runq")

    def __init__(self):
        self.cur = -1
        self.runq = deque()


def _hist(stats, base, ns):
    """KVM_STATS_LOG_HIST_UPDATE: bucket min(fls64(ns), 31)."""
    stats[base + min(ns.bit_length(), HALT_POLL_HIST_COUNT - 1)] += 1


def _lowest(bits):
    return (bits & -bits).bit_length() - 1


class Engine:
    """The plain-Python engine.  See ``kvmwake._core.Engine`` for the interface."""

    def __init__(self, arch: str, host_cpus: int, seed: int, costs: dict | None = None,
                 trace_capacity: int = 1 << 20):
        self.arch = arch
        self.x86 = arch == "x86"
        self.seed = seed
        self.costs = dict(COST_DEFAULTS)
        if costs:
            self.costs.update(costs)
        self.halt_poll_ns = haltpoll.HALT_POLL_NS_DEFAULT[arch]
        self.halt_poll_ns_grow = haltpoll.HALT_POLL_NS_GROW_DEFAULT
        self.halt_poll_ns_grow_start = haltpoll.HALT_POLL_NS_GROW_START_DEFAULT
        self.halt_poll_ns_shrink = haltpoll.HALT_POLL_NS_SHRINK_DEFAULT
        self.resched_irq = RESCHEDULE_IRQ[arch]
        self.tick_irq = TICK_IRQ[arch]
        self.inject_req = INJECT_REQUEST[arch]
        self.cpus = [_Cpu() for _ in range(host_cpus)]
        self.vms: list[_Vm] = []
        self.threads: list[_Thread] = []
        self.sources: list[_Source] = []
        self.heap: list = []
        self.seq = 0
        self.now = 0
        self.events = 0
        self.halts = 0
        self.lat_hist = [0] * LAT_BUCKETS
        self.trace = deque(maxlen=trace_capacity) if trace_capacity else None
        self.trace_dropped = 0
        self.tracing = bool(trace_capacity)
        self.failed = False

    # -- set-up -------------------------------------------------------------

    def add_vm(self, nr_vcpus: int, nr_spis: int = DEFAULT_NR_SPIS) -> int:
        vm = _Vm(len(self.vms), nr_vcpus, len(self.threads), nr_spis)
        for i in range(nr_vcpus):
            g = len(self.threads)
            self.threads.append(_Thread(g, vm, i, g % len(self.cpus), self.seed))
        self.vms.append(vm)
        return vm.index

    def load_program(self, g: int, ops: np.ndarray) -> None:
        th = self.threads[g]
        th.prog = [tuple(int(x) for x in op) for op in ops.tolist()]
        th.pc = 0
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
            self._push(first, _EV_TICK, vm, v.tick_gen)

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
        s.rng_state, s.rng_inc = stream_seed(self.seed, vm, SOURCE_STREAM_BASE + nth)
        self.sources.append(s)
        first = self._source_first(s)
        if first is not None:
            self._push(first, _EV_SOURCE, s.index, s.gen)
        return s.index

    def _source_first(self, s):
        now = self.now
        if s.kind == SourceKind.PERIODIC:
            if s.p1 >= now:
                return s.p1
            return s.p1 + ((now - s.p1) // s.p0 + 1) * s.p0
        if s.kind == SourceKind.POISSON:
            return now + max(1, draw(s, Dist.EXPONENTIAL, s.p0, 0))
        while s.idx < len(s.times) and s.times[s.idx] < now:
            s.idx += 1
        return s.times[s.idx] if s.idx < len(s.times) else None

    def start_vcpu(self, g: int) -> None:
        """The thread enters KVM_RUN now (at the current virtual time)."""
        th = self.threads[g]
        if th.state != _USER:
            return
        th.resume = RESUME_START
        th.state = _RUNNABLE
        self._make_runnable(th, self.now)

    # -- event heap -----------------------------------------------------------

    def _push(self, t, cls, who, gen):
        self.seq += 1
        heapq.heappush(self.heap, (t, cls, self.seq, who, gen))

    def _push_thread(self, th, t, cls):
        th.gen += 1
        self._push(t, cls, th.g, th.gen)

    # -- the run loop -----------------------------------------------------------

    def run(self, until_ns: int) -> None:
        """Process every event before ``until_ns``; then the clock reads ``until_ns``."""
        self._guard(self._run, until_ns)

    def _guard(self, fn, *args):
        if self.failed:
            raise EngineError("this engine stopped on an earlier error")
        try:
            return fn(*args)
        except EngineError:
            self.failed = True
            raise

    def _run(self, until_ns):
        heap = self.heap
        threads = self.threads
        while heap and heap[0][0] < until_ns:
            t, cls, _seq, who, gen = heapq.heappop(heap)
            self.now = t
            if cls == _EV_TICK:
                vm = self.vms[who]
                if gen != vm.tick_gen:
                    continue
                self.events += 1
                self._tick(vm, t)
                self._push(t + vm.tick_ns, _EV_TICK, who, gen)
                continue
            if cls == _EV_SOURCE:
                s = self.sources[who]
                if gen != s.gen:
                    continue
                self.events += 1
                self._source_fire(s, t)
                continue
            th = threads[who]
            if cls == _EV_TIMER:
                if gen != th.timer_gen:
                    continue
                self.events += 1
                self._timer_fire(th, t)
                continue
            if cls == _EV_SLICE:
                if gen != th.run_gen:
                    continue
                self.events += 1
                self._slice_end(th, t)
                continue
            if gen != th.gen:
                continue
            self.events += 1
            if cls == _EV_SEG:
                self._segment_end(th, t)
            elif cls == _EV_POLL:
                # The poll loop ran out of time: poll_end = cur >= stop.
                self._block(th, t, t)
            else:
                self._got_cpu(th, t)
        self.now = until_ns

    # -- host scheduler ---------------------------------------------------------

    def _make_runnable(self, th, t):
        """try_to_wake_up: the thread waits for its host CPU."""
        cpu = self.cpus[th.pcpu]
        if cpu.cur == -1:
            cpu.cur = th.g
            self._push_thread(th, t + self.costs["wake_to_run_ns"], _EV_RUN)
            return
        cpu.runq.append(th.g)
        cur = self.threads[cpu.cur]
        if cur.state == _POLLING:
            # kvm_vcpu_can_poll: single_task_running() is now false.
            self._block(cur, t, t)
        elif cur.state == _RUNNING:
            self._arm_slice(cur, t)

    def _arm_slice(self, th, t):
        sl = self.costs["sched_slice_ns"]
        if sl and not th.slice_armed:
            th.slice_armed = True
            self._push(max(t, th.run_start + sl), _EV_SLICE, th.g, th.run_gen)

    def _release_cpu(self, th, t):
        """The thread leaves its host CPU; the next queued thread gets it."""
        th.run_gen += 1
        th.slice_armed = False
        cpu = self.cpus[th.pcpu]
        if cpu.runq:
            nxt = self.threads[cpu.runq.popleft()]
            cpu.cur = nxt.g
            self._push_thread(nxt, t + self.costs["context_switch_ns"], _EV_RUN)
        else:
            cpu.cur = -1

    def _got_cpu(self, th, t):
        th.state = _RUNNING
        th.run_start = t
        if self.cpus[th.pcpu].runq:
            self._arm_slice(th, t)
        if th.resume == RESUME_START:
            self._advance(th, t, self.costs["vm_entry_ns"], True)
        elif th.resume == RESUME_HALT:
            # Back in kvm_vcpu_block's loop after schedule().
            if self._check_block(th):
                self._halt_done(th, t, True, th.poll_end)
            else:
                th.state = _BLOCKED
                self._release_cpu(th, t)
        else:
            th.seg_end = t + th.rem_end
            th.seg_gfrom = t + th.rem_gfrom
            th.seg_gto = t + th.rem_gto
            self._push_thread(th, th.seg_end, _EV_SEG)
            if th.rem_gto and th.cont not in (CONT_IRQ, CONT_EOI):
                # It enters the guest again: requests are handled and, if it
                # can take an interrupt now, it does so once in the guest.
                th.requests = 0
                if self._best_irq(th) >= 0:
                    self._interrupt_segment(th, th.seg_gfrom, 0)

    def _slice_end(self, th, t):
        th.slice_armed = False
        if th.state != _RUNNING or not self.cpus[th.pcpu].runq:
            return
        # Preempted: keep the rest of the segment for later.
        th.rem_end = th.seg_end - t
        th.rem_gfrom = max(th.seg_gfrom, t) - t
        th.rem_gto = max(th.seg_gto, t) - t
        if th.seg_gfrom <= t < th.seg_gto:
            # Preempted in guest mode: it exits now and re-enters when resumed.
            extra = self.costs["vm_exit_ns"] + self.costs["vm_entry_ns"]
            th.rem_end += extra
            th.rem_gfrom += extra
            th.rem_gto += extra
        th.gen += 1
        th.state = _RUNNABLE
        th.resume = RESUME_SEGMENT
        self.cpus[th.pcpu].runq.append(th.g)
        self._release_cpu(th, t)

    # -- guest program interpreter ---------------------------------------------

    def _advance(self, th, t, pre, entering):
        """Run guest ops from ``th.pc``; ``entering``: after an entry of ``pre`` ns.

        Adds up guest time until an op that must act at an instant of its own
        (a trap, a halt, a system register write, the end); then schedules
        the segment's end.
        """
        if entering:
            th.requests = 0          # check_vcpu_requests on the way in
            if self._take_irqs(th, t, pre):
                return
        guest = 0
        ops = th.prog
        n = 0
        while True:
            code, dist, arg, p0, p1 = ops[th.pc]
            n += 1
            if code == Op.COMPUTE:
                guest += draw(th, dist, p0, p1)
                th.pc += 1
            elif code == Op.WFI:
                th.stats[S_HALT_EXITS] += 1
                th.pc += 1
                self._segment(th, t, pre, guest, CONT_HALT)
                break
            elif code == Op.LOOP:
                th.loops[arg] = p0
                th.pc += 1
            elif code == Op.ENDLOOP:
                if p0 == 0:
                    th.pc = arg + 1
                else:
                    th.loops[p1] -= 1
                    th.pc = arg + 1 if th.loops[p1] > 0 else th.pc + 1
                if guest and th.pc == arg + 1:
                    # A loop back-edge after guest time ends the segment.
                    self._segment(th, t, pre, guest, CONT_NEXT)
                    break
            elif code == Op.END:
                self._segment(th, t, pre, guest, CONT_END)
                break
            elif code >= Op.SET_PMR and code <= Op.TIMER_CANCEL:
                # A system register or PSTATE write: it acts at its instant.
                if pre or guest:
                    self._segment(th, t, pre, guest, CONT_NEXT)
                    break
                th.pc += 1
                self._instant_op(th, t, code, dist, arg, p0, p1)
                if self._take_irqs(th, t, 0):
                    break
            else:
                # SGI and the GIC register writes trap; done at the trap.
                self._segment(th, t, pre, guest, CONT_TRAP)
                break
        if t == th.stall_t:
            th.stall_n += n
            if th.stall_n > MAX_OPS_PER_INSTANT:
                raise EngineError(
                    f"vCPU {th.vcpu_id} of VM {th.vm.index} makes no progress: its program "
                    f"ran {th.stall_n} ops at t={t} ns without virtual time passing")
        else:
            th.stall_t, th.stall_n = t, n

    def _segment(self, th, t, pre, guest, cont):
        th.seg_gfrom = t + pre
        th.seg_gto = th.seg_gfrom + guest
        th.seg_end = th.seg_gto + (self.costs["vm_exit_ns"]
                                   if cont in (CONT_HALT, CONT_TRAP, CONT_END) else 0)
        th.cont = cont
        self._push_thread(th, th.seg_end, _EV_SEG)

    def _segment_end(self, th, t):
        cont = th.cont
        if cont == CONT_HALT:
            self._halt(th, t)
        elif cont == CONT_TRAP:
            self._trap_op(th, t)
        elif cont == CONT_END:
            th.state = _USER
            self._release_cpu(th, t)
        elif cont == CONT_IRQ:
            th.requests = 0
            if not self._take_irqs(th, t, 0):
                self._resume_program(th, t)
        elif cont == CONT_EOI:
            self._eoi(th, th.cur_irq)
            th.cur_irq = -1
            if not self._take_irqs(th, t, 0):
                self._resume_program(th, t)
        else:
            self._advance(th, t, 0, False)

    def _resume_program(self, th, t):
        """After interrupt handling: the interrupted segment, or the next op."""
        if th.sv_valid:
            th.sv_valid = False
            self._segment(th, t, 0, th.sv_guest, th.sv_cont)
        else:
            self._advance(th, t, 0, False)

    def _interrupt_segment(self, th, base, cost):
        """Stop the current segment at ``base``: take interrupts ``cost`` ns later.

        What was left of its guest part, and its continuation, resume after.
        """
        th.sv_guest = th.seg_gto - base
        th.sv_cont = th.cont
        th.sv_valid = True
        th.seg_gfrom = th.seg_gto = th.seg_end = base + cost
        th.cont = CONT_IRQ
        self._push_thread(th, th.seg_end, _EV_SEG)

    def _targets(self, th, kind, p0, p1):
        n = th.vm.nr_vcpus
        if kind == WakeTarget.VCPU:
            return (p0,)
        if kind == WakeTarget.NEXT:
            return ((th.vcpu_id + 1) % n,)
        if kind == WakeTarget.RANDOM_OTHER:
            r = th.next64() % (n - 1)
            return (r if r < th.vcpu_id else r + 1,)
        if kind == WakeTarget.LIST:
            out = []
            while p0:
                out.append(p1 + _lowest(p0))
                p0 &= p0 - 1
            return out
        return [i for i in range(n) if i != th.vcpu_id]

    def _trap_op(self, th, t):
        """A trapping op, carried out in KVM after the exit; then the entry."""
        code, dist, arg, p0, p1 = th.prog[th.pc]
        th.pc += 1
        vm = th.vm
        ipi = False
        if code == Op.SGI:
            irq = self.resched_irq if arg == IPI_RESCHEDULE else arg
            for vid in self._targets(th, dist, p0, p1):
                ipi |= self._raise_irq(self.threads[vm.first + vid], irq, t)
        elif code == Op.IRQ_ENABLE:
            self._set_enabled(vm, th, arg, True, t)
        elif code == Op.IRQ_DISABLE:
            self._set_enabled(vm, th, arg, False, t)
        elif code == Op.SET_PRIORITY:
            prio = p0 & VGIC_PRI_MASK
            if arg < 32:
                th.priv_prio[arg] = prio
            else:
                vm.spi_prio[arg] = prio
        elif code == Op.DIST_ENABLE:
            self.set_dist_enabled(vm.index, bool(p0))
        else:  # Op.ROUTE_SPI
            self.route_spi(vm.index, arg, p0)
        extra = self.costs["ipi_send_ns"] if ipi else 0
        self._advance(th, t, self.costs["vm_entry_ns"] + extra, True)

    def _instant_op(self, th, t, code, dist, arg, p0, p1):
        if code == Op.SET_PMR:
            if self.x86:
                th.tpr = p0
            else:
                th.pmr = p0 & VGIC_PRI_MASK
        elif code == Op.MASK:
            th.masked = True
        elif code == Op.UNMASK:
            th.masked = False
        elif code == Op.SET_HANDLER:
            th.handler_ns = p0
        elif code == Op.TIMER_ARM:
            th.timer_cval = t + draw(th, dist, p0, p1)
            th.timer_period = arg
            th.timer_ctl = ARCH_TIMER_CTRL_ENABLE
            self._timer_program(th, t)
        else:  # Op.TIMER_CANCEL
            th.timer_ctl &= ~ARCH_TIMER_CTRL_ENABLE
            self._timer_program(th, t)

    # -- the interrupt controller: arm64 vGICv3 subset ---------------------------

    def _pending_bit(self, vm, th, b):
        if b < 32:
            return (th.priv_latch | th.priv_line) >> b & 1
        return (vm.spi_latch | vm.spi_line) >> b & 1

    def _owner(self, vm, th, b):
        """The vCPU whose ap_list holds INTID b: its own for private, the route for SPIs."""
        if b < 32:
            return th
        tgt = vm.spi_target[b]
        return self.threads[vm.first + tgt] if tgt >= 0 else None

    def _refresh(self, vm, th, b):
        """Put INTID b's pending bit into its owner's pending set."""
        owner = self._owner(vm, th, b)
        if owner is None:
            return
        if self._pending_bit(vm, th, b):
            owner.ap |= 1 << b
        else:
            owner.ap &= ~(1 << b)

    def _enabled(self, vm, th, b):
        return (th.priv_en >> b & 1) if b < 32 else (vm.spi_en >> b & 1)

    def _active(self, vm, th, b):
        return (th.priv_act >> b & 1) if b < 32 else (vm.spi_act >> b & 1)

    def _oracle(self, vm, th, b):
        """vgic_target_oracle: the vCPU to queue INTID b on, or None."""
        owner = self._owner(vm, th, b)
        if owner is None:
            return None
        if self._active(vm, th, b):
            return owner
        if self._enabled(vm, th, b) and self._pending_bit(vm, th, b) and vm.gic_enabled:
            return owner
        return None

    def _queue(self, vm, th, b, t) -> bool:
        """vgic_queue_irq_unlock: request + kick the oracle's vCPU.  True if an IPI went."""
        tgt = self._oracle(vm, th, b)
        if tgt is None:
            return False
        tgt.requests |= 1 << (self.inject_req & KVM_REQUEST_MASK)
        return self._kick(tgt, t)

    def _inject(self, vm, th, b, level, t) -> bool:
        """kvm_vgic_inject_irq (``th``: the vCPU for a private INTID)."""
        bit = 1 << b
        if b < 32:
            if th.priv_level & bit:
                if bool(th.priv_line & bit) == bool(level):
                    return False
                th.priv_line = th.priv_line | bit if level else th.priv_line & ~bit
            else:
                if not level:
                    return False
                th.priv_latch |= bit
        else:
            if vm.spi_level & bit:
                if bool(vm.spi_line & bit) == bool(level):
                    return False
                vm.spi_line = vm.spi_line | bit if level else vm.spi_line & ~bit
            else:
                if not level:
                    return False
                vm.spi_latch |= bit
        self._refresh(vm, th, b)
        return self._queue(vm, th, b, t)

    def _gic_pending(self, th) -> bool:
        """kvm_vgic_vcpu_pending_irq: pending, enabled, not active, priority < PMR."""
        vm = th.vm
        if not vm.gic_enabled:
            return False
        en = (vm.spi_en & ~_PRIV_MASK) | th.priv_en
        act = (vm.spi_act & ~_PRIV_MASK) | th.priv_act
        cand = th.ap & en & ~act
        while cand:
            b = _lowest(cand)
            prio = th.priv_prio[b] if b < 32 else vm.spi_prio[b]
            if prio < th.pmr:
                return True
            cand &= cand - 1
        return False

    def _gic_best(self, th) -> int:
        """The interrupt the guest acknowledges: highest priority (lowest value), then INTID."""
        vm = th.vm
        if th.masked or not vm.gic_enabled:
            return -1
        en = (vm.spi_en & ~_PRIV_MASK) | th.priv_en
        act = (vm.spi_act & ~_PRIV_MASK) | th.priv_act
        cand = th.ap & en & ~act
        best, best_prio = -1, th.pmr
        while cand:
            b = _lowest(cand)
            prio = th.priv_prio[b] if b < 32 else vm.spi_prio[b]
            if prio < best_prio:
                best, best_prio = b, prio
            cand &= cand - 1
        return best

    def _set_enabled(self, vm, th, b, on, t):
        bit = 1 << b
        if b < 32:
            th.priv_en = th.priv_en | bit if on else th.priv_en & ~bit
        else:
            vm.spi_en = vm.spi_en | bit if on else vm.spi_en & ~bit
        if on:
            self._queue(vm, th, b, t)

    def set_dist_enabled(self, vm_index: int, on: bool) -> None:
        """GICD_CTLR: enabling the distributor kicks every vCPU with something pending."""
        vm = self.vms[vm_index]
        was = vm.gic_enabled
        vm.gic_enabled = on
        if on and not was:
            # vgic_kick_vcpus
            for g in range(vm.first, vm.first + vm.nr_vcpus):
                th = self.threads[g]
                if self._gic_pending(th):
                    th.requests |= 1 << (self.inject_req & KVM_REQUEST_MASK)
                    self._kick(th, self.now)

    def route_spi(self, vm_index: int, b: int, mpidr: int) -> None:
        """GICD_IROUTER: Aff2.Aff1.Aff0 names the target; no match, no delivery."""
        vm = self.vms[vm_index]
        old = vm.spi_target[b]
        if old >= 0:
            self.threads[vm.first + old].ap &= ~(1 << b)
        vm.spi_mpidr[b] = mpidr & 0xFFFFFF
        vm.spi_target[b] = vcpu_of_mpidr(mpidr, vm.nr_vcpus)
        self._refresh(vm, None, b)
        self._queue(vm, None, b, self.now)

    # -- the interrupt controller: x86 LAPIC subset --------------------------------

    def _apic_has_interrupt(self, th) -> int:
        """kvm_apic_has_interrupt: the highest IRR vector above the PPR, or -1."""
        if not th.irr:
            return -1
        v = th.irr.bit_length() - 1
        isrv = th.isr.bit_length() - 1 if th.isr else 0
        ppr = th.tpr if (th.tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
        return v if (v & 0xF0) > ppr else -1

    def _apic_set_irq(self, th, vec, t) -> bool:
        """__apic_accept_irq (fixed delivery): IRR, KVM_REQ_EVENT, kick."""
        th.irr |= 1 << vec
        th.requests |= 1 << (self.inject_req & KVM_REQUEST_MASK)
        return self._kick(th, t)

    # -- either arch --------------------------------------------------------------------

    def _runnable(self, th) -> bool:
        """kvm_arch_vcpu_runnable (arm64) / kvm_vcpu_has_events (x86, IF=1 needed)."""
        if self.x86:
            return not th.masked and self._apic_has_interrupt(th) >= 0
        return self._gic_pending(th)

    def _best_irq(self, th) -> int:
        if self.x86:
            return -1 if th.masked else self._apic_has_interrupt(th)
        return self._gic_best(th)

    def _raise_irq(self, th, irq, t) -> bool:
        """An SGI / IPI or tick arriving at vCPU ``th``: edge, the arch's way."""
        if self.x86:
            return self._apic_set_irq(th, irq, t)
        return self._inject(th.vm, th, irq, True, t)

    def _ack(self, th, b, t):
        """The guest acknowledges ``b`` (ICC_IAR1_EL1 / the LAPIC's INTA)."""
        if self.x86:
            th.irr &= ~(1 << b)
            th.isr |= 1 << b
            return
        vm = th.vm
        bit = 1 << b
        if b < 32:
            th.priv_act |= bit
            th.priv_latch &= ~bit
            if b == VTIMER_IRQ:
                # Linux's timer handler masks the timer (CNTV_CTL.IMASK).
                th.priv_line &= ~bit
                self._timer_ack(th, t)
        else:
            vm.spi_act |= bit
            vm.spi_latch &= ~bit
            # The driver's handler silences its device: the line drops.
            vm.spi_line &= ~bit
        self._refresh(vm, th, b)

    def _eoi(self, th, b):
        """End of interrupt: priority drop and deactivation (ICC_EOIR1_EL1 / EOI)."""
        if self.x86:
            th.isr &= ~(1 << b)
        elif b < 32:
            th.priv_act &= ~(1 << b)
        else:
            th.vm.spi_act &= ~(1 << b)

    def _take_irqs(self, th, t, pre) -> bool:
        """The guest takes its interrupts at ``t + pre``.

        With a handler time, acknowledges the best one and schedules its EOI;
        returns True.  With none, acknowledges and ends every deliverable one
        at once and returns False (the program goes on).
        """
        n = 0
        while True:
            b = self._best_irq(th)
            if b < 0:
                return False
            self._ack(th, b, t)
            if th.handler_ns:
                th.cur_irq = b
                self._segment(th, t, pre, th.handler_ns, CONT_EOI)
                return True
            self._eoi(th, b)
            n += 1
            if n > MAX_TAKES_PER_INSTANT:
                raise EngineError(f"vCPU {th.vcpu_id} of VM {th.vm.index}: interrupt storm "
                                  f"({n} interrupts taken at t={t} ns)")

    # -- the virtual timer (arch_timer.c) -----------------------------------------------

    def _timer_level(self, th, t):
        ctl = th.timer_ctl
        return (ctl & ARCH_TIMER_CTRL_ENABLE) and not (ctl & ARCH_TIMER_CTRL_IT_MASK) \
            and t >= th.timer_cval

    def _timer_program(self, th, t):
        """CNTV_CTL / CVAL written: new deadline event, new line level."""
        th.timer_gen += 1
        ctl = th.timer_ctl
        if (ctl & ARCH_TIMER_CTRL_ENABLE) and not (ctl & ARCH_TIMER_CTRL_IT_MASK) \
                and th.timer_cval > t:
            self._push(th.timer_cval, _EV_TIMER, th.g, th.timer_gen)
        self._inject(th.vm, th, VTIMER_IRQ, self._timer_level(th, t), t)

    def _timer_fire(self, th, t):
        """The deadline: the PPI's line rises; a blocked vCPU is woken (kvm_bg_timer_expire)."""
        self._inject(th.vm, th, VTIMER_IRQ, True, t)
        if th.state == _BLOCKED:
            self._wake_up(th, t)

    def _timer_ack(self, th, t):
        """The handler masks the timer, or re-arms it one period on (a periodic tick)."""
        th.timer_gen += 1
        if not th.timer_period:
            th.timer_ctl |= ARCH_TIMER_CTRL_IT_MASK
            return
        th.timer_cval += th.timer_period
        th.timer_ctl = ARCH_TIMER_CTRL_ENABLE
        if th.timer_cval > t:
            self._push(th.timer_cval, _EV_TIMER, th.g, th.timer_gen)
        else:
            th.priv_line |= 1 << VTIMER_IRQ        # already due again

    # -- wake sources, requests and kicks ----------------------------------------

    def _kick(self, th, t, wake=True) -> bool:
        """kvm_vcpu_kick (``wake=False``: a NO_WAKEUP request).  True if it sent an IPI."""
        if wake and self._wake_up(th, t):
            return False
        if th.state == _POLLING:
            # Not a waiter yet: the poll loop sees the condition itself.
            if self._check_block(th):
                th.gen += 1                       # cancel the poll-end event
                th.wake_ts = t
                self._halt_done(th, t, False, t)
            return False
        if th.state == _RUNNING and t < th.seg_gto:
            cont = th.cont
            if cont == CONT_IRQ:
                return False                      # on its way to take interrupts
            if cont == CONT_EOI:
                if t < th.seg_gfrom:
                    return False
                # In a handler (masked): the IPI costs an exit and an entry.
                extra = self.costs["vm_exit_ns"] + self.costs["vm_entry_ns"]
                th.seg_gto += extra
                th.seg_end += extra
                self._push_thread(th, th.seg_end, _EV_SEG)
                return True
            if t < th.seg_gfrom:
                # On its way into the guest: seen at entry.
                self._interrupt_segment(th, th.seg_gfrom, 0)
                return False
            # IN_GUEST_MODE: IPI; the vCPU exits and re-enters.
            self._interrupt_segment(th, t, self.costs["vm_exit_ns"] + self.costs["vm_entry_ns"])
            return True
        return False

    def _wake_up(self, th, t) -> bool:
        """kvm_vcpu_wake_up: wake the task waiting on the vCPU's rcuwait."""
        if th.state != _BLOCKED:
            return False
        th.stats[S_WAKEUP] += 1
        th.wake_ts = t
        th.state = _RUNNABLE
        th.resume = RESUME_HALT
        self._make_runnable(th, t)
        return True

    def _tick(self, vm, t):
        """A VM's periodic tick: every halted vCPU gets the tick interrupt."""
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            th = self.threads[g]
            if th.state == _POLLING or th.state == _BLOCKED:
                self._raise_irq(th, self.tick_irq, t)

    def _source_fire(self, s, t):
        if self.x86:
            self._apic_set_irq(self.threads[s.target], s.intid, t)   # an MSI to one LAPIC
        else:
            self._inject(self.vms[s.vm], None, s.intid, True, t)     # an edge on the SPI
        if s.kind == SourceKind.PERIODIC:
            nxt = t + s.p0
        elif s.kind == SourceKind.POISSON:
            nxt = t + max(1, draw(s, Dist.EXPONENTIAL, s.p0, 0))
        else:
            s.idx += 1
            if s.idx >= len(s.times):
                return
            nxt = max(t, s.times[s.idx])
        self._push(nxt, _EV_SOURCE, s.index, s.gen)

    # -- host-side calls (at the current virtual time) -------------------------------

    def make_request(self, g: int, req: int) -> bool:
        """kvm_make_request + kvm_vcpu_kick, as kvm_make_vcpu_request does it.

        Sets the request bit (unless NO_ACTION), wakes a waiting vCPU unless
        the request is NO_WAKEUP, and IPIs a vCPU in guest mode.  Returns True
        if it sent an IPI.
        """
        th = self.threads[g]
        if not req & KVM_REQUEST_NO_ACTION:
            th.requests |= 1 << (req & KVM_REQUEST_MASK)
        return self._guard(self._kick, th, self.now, not req & KVM_REQUEST_NO_WAKEUP)

    def kick(self, g: int) -> bool:
        return self._guard(self._kick, self.threads[g], self.now)

    def raise_pending(self, g: int) -> bool:
        """The arch's reschedule IPI arrives at vCPU ``g``."""
        return self._guard(self._raise_irq, self.threads[g], self.resched_irq, self.now)

    def irq_line(self, vm_index: int, intid: int, level: bool, g: int = -1) -> bool:
        """KVM_IRQ_LINE: an SPI (g = -1) or a PPI of thread g changes level."""
        vm = self.vms[vm_index]
        th = self.threads[g] if g >= 0 else None
        return self._guard(self._inject, vm, th, intid, level, self.now)

    def signal_msi(self, g: int, vector: int) -> bool:
        """KVM_SIGNAL_MSI with fixed delivery to thread g's LAPIC."""
        return self._guard(self._apic_set_irq, self.threads[g], vector, self.now)

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
            self._refresh(vm, th, intid)
        if enabled >= 0:
            self._guard(self._set_enabled, vm, th, intid, bool(enabled), self.now)

    def set_pmr(self, g: int, pmr: int) -> None:
        th = self.threads[g]
        if self.x86:
            th.tpr = pmr
        else:
            th.pmr = pmr & VGIC_PRI_MASK

    def set_masked(self, g: int, masked: bool) -> None:
        self.threads[g].masked = bool(masked)

    def irq_state(self, g: int, intid: int) -> dict:
        """What the vGIC (or LAPIC) holds for ``intid`` as seen by thread g."""
        th = self.threads[g]
        vm = th.vm
        if self.x86:
            return {"irr": bool(th.irr >> intid & 1), "isr": bool(th.isr >> intid & 1),
                    "tpr": th.tpr, "masked": th.masked}
        b = intid
        if b < 32:
            return {"pending": bool(self._pending_bit(vm, th, b)),
                    "enabled": bool(th.priv_en >> b & 1), "active": bool(th.priv_act >> b & 1),
                    "priority": th.priv_prio[b], "level": bool(th.priv_level >> b & 1),
                    "line": bool(th.priv_line >> b & 1), "queued": bool(th.ap >> b & 1),
                    "target": th.vcpu_id, "pmr": th.pmr, "masked": th.masked}
        return {"pending": bool(self._pending_bit(vm, th, b)),
                "enabled": bool(vm.spi_en >> b & 1), "active": bool(vm.spi_act >> b & 1),
                "priority": vm.spi_prio[b], "level": bool(vm.spi_level >> b & 1),
                "line": bool(vm.spi_line >> b & 1),
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

    # -- kvm_vcpu_halt -----------------------------------------------------------

    def _max_halt_poll_ns(self, th):
        """kvm_vcpu_max_halt_poll_ns."""
        vm = th.vm
        return vm.max_halt_poll_ns if vm.override else self.halt_poll_ns

    def _check_block(self, th) -> bool:
        """kvm_vcpu_check_block < 0: runnable, or KVM_REQ_UNBLOCK (consumed)."""
        if self._runnable(th):
            return True
        if th.requests & _REQ_UNBLOCK_BIT:
            th.requests &= ~_REQ_UNBLOCK_BIT
            return True
        return False

    def _halt(self, th, t):
        """kvm_vcpu_halt, up to the poll loop or the block."""
        mx = self._max_halt_poll_ns(th)
        if th.halt_poll_ns > mx:
            th.halt_poll_ns = mx
        th.do_poll = th.halt_poll_ns != 0
        th.halt_start = t
        th.resume = RESUME_HALT
        if self._check_block(th):
            th.wake_ts = t
            self._halt_done(th, t, False, t, immediate=True)
            return
        if th.do_poll and not self.cpus[th.pcpu].runq:
            th.state = _POLLING
            self._push_thread(th, t + th.halt_poll_ns, _EV_POLL)
            return
        self._block(th, t, t)

    def _block(self, th, t, poll_end):
        """kvm_vcpu_block: wait on the rcuwait until kicked."""
        th.poll_end = poll_end
        th.stats[S_BLOCKING] = 1
        th.state = _BLOCKED
        th.gen += 1
        self._release_cpu(th, t)

    def _halt_done(self, th, cur, waited, poll_end, immediate=False):
        """The end of kvm_vcpu_halt: stats, grow/shrink, tracepoints."""
        st = th.stats
        start = th.halt_start
        halt_ns = cur - start
        st[S_BLOCKING] = 0
        if waited:
            w = cur - poll_end
            st[S_WAIT_NS] += w
            _hist(st, S_WAIT_HIST, w)
        if th.do_poll:
            poll_ns = poll_end - start
            st[S_ATTEMPTED_POLL] += 1
            if not waited:
                st[S_SUCCESSFUL_POLL] += 1
                st[S_POLL_SUCCESS_NS] += poll_ns
                _hist(st, S_POLL_SUCCESS_HIST, poll_ns)
            else:
                st[S_POLL_FAIL_NS] += poll_ns
                _hist(st, S_POLL_FAIL_HIST, poll_ns)
        mx = self._max_halt_poll_ns(th)
        old = th.halt_poll_ns
        if mx:
            if halt_ns <= old:
                pass
            elif old and halt_ns > mx:
                th.halt_poll_ns = haltpoll.shrink(old, self.halt_poll_ns_shrink,
                                                  self.halt_poll_ns_grow_start)
                self._trace(th, cur, TR_HALT_POLL_NS, 0, 1, th.halt_poll_ns, old)
            elif old < mx and halt_ns < mx:
                th.halt_poll_ns = haltpoll.grow(old, self.halt_poll_ns_grow,
                                                self.halt_poll_ns_grow_start)
                self._trace(th, cur, TR_HALT_POLL_NS, 1, 1, th.halt_poll_ns, old)
        else:
            th.halt_poll_ns = 0
        self._trace(th, cur, TR_WAKEUP, 1 if waited else 0, 1, halt_ns, 0)
        self.halts += 1
        entry = self.costs["vm_entry_ns"]
        if not immediate:
            self.lat_hist[lat_bucket(cur + entry - th.wake_ts)] += 1
        th.state = _RUNNING
        self._advance(th, cur, entry, True)

    def _trace(self, th, t, kind, flag, valid, a, b):
        if not self.tracing:
            return
        if len(self.trace) == self.trace.maxlen:
            self.trace_dropped += 1
        self.trace.append((t, PID_BASE + th.g, th.pcpu, kind, flag, valid, th.vcpu_id, a, b))

    # -- read-out -----------------------------------------------------------------

    def stats_array(self) -> np.ndarray:
        return np.array([th.stats for th in self.threads], dtype=np.uint64).reshape(
            len(self.threads), NR_STATS)

    def lat_hist_array(self) -> np.ndarray:
        return np.array(self.lat_hist, dtype=np.uint64)

    def trace_list(self) -> list:
        return list(self.trace) if self.trace is not None else []

    def thread_info(self, g: int) -> dict:
        th = self.threads[g]
        return {"state": int(th.state), "halt_poll_ns": th.halt_poll_ns,
                "requests": th.requests, "pcpu": th.pcpu, "pc": th.pc,
                "runnable": self._runnable(th)}
