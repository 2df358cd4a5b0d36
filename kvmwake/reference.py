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
from .uapi import (
    ARM_SMCCC_VERSION_FUNC_ID, KVM_ARM_PSCI_LATEST, KVM_PSCI_FN_CPU_OFF, KVM_PSCI_FN_CPU_ON,
    KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2, KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2,
    MPIDR_HWID_BITMASK, PSCI_0_2_TOS_MP, PSCI_1_1_RESET_TYPE_VENDOR_START,
    PSCI_1_3_OFF_TYPE_HIBERNATE_OFF, AffinityInfo, ExitReason, MpState, PsciFn, PsciRet,
    PsciVersion, SystemEventType,
)
from .model import (
    ARCH_TIMER_CTRL_ENABLE, ARCH_TIMER_CTRL_IT_MASK, CONT_END, CONT_EOI, CONT_HALT,
    CONT_IRQ, CONT_NEXT, CONT_TRAP, COST_DEFAULTS, DEFAULT_MEM_SIZE, DEFAULT_NR_SPIS,
    GIC_DEFAULT_PMR, HALT_CPU_SUSPEND, HALT_MP_HALTED, HALT_SUSPEND, HALT_WFI, MEM_BASE,
    RESUME_SLEEP, SYNC_IMMEDIATE, UCALL_DONE, UCALL_SYNC,
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


_PSCI_RESUME, _PSCI_HALT, _PSCI_EXIT = 0, 1, 2
_PSCI_FEATURES_ALWAYS = frozenset({
    PsciFn.PSCI_VERSION, PsciFn.CPU_SUSPEND, PsciFn.FN64_CPU_SUSPEND, PsciFn.CPU_OFF,
    PsciFn.CPU_ON, PsciFn.FN64_CPU_ON, PsciFn.AFFINITY_INFO, PsciFn.FN64_AFFINITY_INFO,
    PsciFn.MIGRATE_INFO_TYPE, PsciFn.SYSTEM_OFF, PsciFn.SYSTEM_RESET, PsciFn.PSCI_FEATURES,
    ARM_SMCCC_VERSION_FUNC_ID})


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
        # what userspace sees: MP state, registers, signals, the last exit
        "mp_state", "regs", "pc_valid", "pc_raw", "sig_pending", "reset_pending", "reset_pc",
        "reset_r0", "halt_kind", "exit_reason", "exit_type", "exit_ndata", "exit_data0",
        "exit_ucall", "exit_value", "exit_time",
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
        self.mp_state = MpState.RUNNABLE
        self.regs = [0, 0, 0, 0]
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
    __slots__ = ("index", "nr_vcpus", "first", "override", "max_halt_poll_ns", "tick_ns",
                 "tick_gen", "gic_enabled", "nr_spis", "spi_en", "spi_act", "spi_latch",
                 "spi_line", "spi_level", "spi_prio", "spi_target", "spi_mpidr",
                 "psci_version", "suspend_cap", "code_base")

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
        self.code_base = 0


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
                 trace_capacity: int = 1 << 20, timeline_capacity: int = 0):
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
        # The state timeline (kvmwake.timeline): a ring of (t, g, cpu, state),
        # each thread's state after the dropped records, and the window start.
        self.tl_cap = timeline_capacity
        self.timeline: deque = deque()
        self.tl_base: list = []
        self.tl_t0 = 0
        self.timeline_dropped = 0
        self.failed = False
        self.code_base = MEM_BASE[arch]
        self.exits: deque = deque()      # threads that exited to userspace, in order

    # -- set-up -------------------------------------------------------------

    def add_vm(self, nr_vcpus: int, nr_spis: int = DEFAULT_NR_SPIS) -> int:
        vm = _Vm(len(self.vms), nr_vcpus, len(self.threads), nr_spis)
        vm.code_base = self.code_base
        for i in range(nr_vcpus):
            g = len(self.threads)
            self.threads.append(_Thread(g, vm, i, g % len(self.cpus), self.seed))
            self.tl_base.append(int(_USER))
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
        if self.tl_cap:
            self._tl(th, self.now, _RUNNABLE)
        th.state = _RUNNABLE
        # KVM_RUN from userspace: a system call, not a wake-up.
        self._guard(self._make_runnable, th, self.now, 0)

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
        self._guard(self._run, until_ns, False)

    def run_until_exit(self, until_ns: int) -> int:
        """Like ``run``, but stop after the first event in which a vCPU exited to
        userspace; returns that thread, or -1 when ``until_ns`` was reached."""
        return self._guard(self._run, until_ns, True)

    def _guard(self, fn, *args):
        if self.failed:
            raise EngineError("this engine stopped on an earlier error")
        try:
            return fn(*args)
        except EngineError:
            self.failed = True
            raise

    def _run(self, until_ns, stop_on_exit):
        heap = self.heap
        threads = self.threads
        while heap and heap[0][0] < until_ns:
            if stop_on_exit and self.exits:
                return self.exits[0]
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
        if stop_on_exit and self.exits:
            return self.exits[0]
        self.now = until_ns
        return -1

    # -- host scheduler ---------------------------------------------------------

    def _make_runnable(self, th, t, delay=None):
        """try_to_wake_up: the thread waits for its host CPU."""
        cpu = self.cpus[th.pcpu]
        if cpu.cur == -1:
            cpu.cur = th.g
            self._push_thread(th, t + (self.costs["wake_to_run_ns"] if delay is None else delay),
                              _EV_RUN)
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
        if self.tl_cap:
            self._tl(th, t, _RUNNING)
        th.state = _RUNNING
        th.run_start = t
        if self.cpus[th.pcpu].runq:
            self._arm_slice(th, t)
        if th.resume == RESUME_START:
            self._enter(th, t, self.costs["vm_entry_ns"])
        elif th.resume == RESUME_HALT:
            # Back in kvm_vcpu_block's loop after schedule().
            if self._check_block(th):
                self._halt_done(th, t, True, th.poll_end)
            else:
                if self.tl_cap:
                    self._tl(th, t, _BLOCKED)
                th.state = _BLOCKED
                self._release_cpu(th, t)
        elif th.resume == RESUME_SLEEP:
            # Back in kvm_vcpu_sleep's rcuwait_wait_event.
            if self._asleep(th):
                if th.sig_pending:
                    self._exit(th, t, ExitReason.INTR)
                else:
                    if self.tl_cap:
                        self._tl(th, t, _BLOCKED)
                    th.state = _BLOCKED
                    self._release_cpu(th, t)
            else:
                self._enter(th, t, self.costs["vm_entry_ns"])
        else:
            th.seg_end = t + th.rem_end
            th.seg_gfrom = t + th.rem_gfrom
            th.seg_gto = t + th.rem_gto
            self._push_thread(th, th.seg_end, _EV_SEG)
            if th.rem_gto and th.cont not in (CONT_IRQ, CONT_EOI):
                # It enters the guest again: requests are handled and, if it
                # can take an interrupt now or has work to do in KVM_RUN's
                # loop (a signal, a power-off), it does so on the way in.
                th.requests = 0
                if self._best_irq(th) >= 0 or th.sig_pending or self._asleep(th):
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
        if self.tl_cap:
            self._tl(th, t, _RUNNABLE)
        th.state = _RUNNABLE
        th.resume = RESUME_SEGMENT
        self.cpus[th.pcpu].runq.append(th.g)
        self._release_cpu(th, t)

    # -- guest program interpreter ---------------------------------------------

    # -- KVM_RUN's loop: what happens before each guest entry --------------------

    def _asleep(self, th) -> bool:
        """A vCPU that kvm_vcpu_sleep (arm64 STOPPED) or kvm_vcpu_block (x86 waiting
        for INIT/SIPI) keeps out of the guest."""
        if self.x86:
            return th.mp_state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED,
                                   MpState.AP_RESET_HOLD)
        return th.mp_state == MpState.STOPPED

    def _enter(self, th, t, pre):
        """One trip round KVM_RUN's loop up to the guest entry (arm64:
        xfer_to_guest_mode_handle_work, then check_vcpu_requests)."""
        if th.sig_pending:
            self._exit(th, t, ExitReason.INTR)
            return
        if self._asleep(th):
            self._sleep(th, t)
            return
        if th.reset_pending:
            self._reset(th)
        if th.mp_state == MpState.SUSPENDED:
            self._halt(th, t, HALT_SUSPEND)
            return
        if th.mp_state == MpState.HALTED:
            self._halt(th, t, HALT_MP_HALTED)
            return
        if not th.pc_valid:
            self._exit(th, t, ExitReason.INTERNAL_ERROR)
            return
        self._guest_entry(th, t, pre)

    def _guest_entry(self, th, t, pre):
        """Into the guest after ``pre`` ns: requests are handled, pending
        interrupts taken, then the interrupted segment or the next op goes on."""
        th.requests = 0              # check_vcpu_requests on the way in
        if self._take_irqs(th, t, pre):
            return
        if th.sv_valid:
            th.sv_valid = False
            self._segment(th, t, pre, th.sv_guest, th.sv_cont)
        else:
            self._advance(th, t, pre)

    def _sleep(self, th, t):
        """kvm_vcpu_sleep: wait on the rcuwait until no longer STOPPED (or a signal)."""
        if self.tl_cap:
            self._tl(th, t, _BLOCKED)
        th.state = _BLOCKED
        th.resume = RESUME_SLEEP
        th.gen += 1
        self._release_cpu(th, t)

    def _exit(self, th, t, reason, type_=0, ndata=0, data0=0, ucall=0, value=0):
        """KVM_RUN returns to userspace: the thread leaves its CPU with an exit."""
        if reason == ExitReason.INTR:
            th.sig_pending = False
        th.exit_reason, th.exit_type, th.exit_ndata = int(reason), int(type_), ndata
        th.exit_data0, th.exit_ucall, th.exit_value, th.exit_time = data0, ucall, value, t
        if self.tl_cap:
            self._tl(th, t, _USER)
        th.state = _USER
        th.resume = RESUME_START
        th.gen += 1
        self.exits.append(th.g)
        self._release_cpu(th, t)

    def _reset(self, th):
        """kvm_reset_vcpu for a pending KVM_REQ_VCPU_RESET (PSCI CPU_ON)."""
        th.reset_pending = False
        th.regs = [th.reset_r0, 0, 0, 0]
        self._set_pc(th, th.reset_pc)
        th.masked = True                 # PSTATE.DAIF all set at reset
        th.timer_ctl = 0
        th.timer_gen += 1
        th.sv_valid = False

    def _set_pc(self, th, v):
        """The PC: op i of the program is at code_base + 4 * i."""
        off = v - th.vm.code_base
        # A new PC discards the rest of an interrupted segment: it belonged to
        # the old instruction stream (its trap would run the op at the new PC).
        th.sv_valid = False
        if th.prog is not None and off >= 0 and off % 4 == 0 and off // 4 < len(th.prog):
            th.pc = off // 4
            th.pc_valid = True
        else:
            th.pc_valid = False
            th.pc_raw = v

    def _get_pc(self, th):
        return th.vm.code_base + 4 * th.pc if th.pc_valid else th.pc_raw

    # -- guest program interpreter ---------------------------------------------

    def _advance(self, th, t, pre):
        """Run guest ops from ``th.pc`` from ``t + pre`` on.

        Adds up guest time until an op that must act at an instant of its own
        (a trap, a halt, a system register write, the end); then schedules
        the segment's end.
        """
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
            elif (code >= Op.SET_PMR and code <= Op.TIMER_CANCEL) or code == Op.SET_REG:
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
            self._halt(th, t, HALT_WFI)
        elif cont == CONT_TRAP:
            self._trap_op(th, t)
        elif cont == CONT_END:
            self._exit(th, t, ExitReason.MMIO, ucall=UCALL_DONE)   # the selftests' GUEST_DONE
        elif cont == CONT_IRQ:
            # Out of the guest for the IPI: a trip round KVM_RUN's loop.
            self._enter(th, t, 0)
        elif cont == CONT_EOI:
            self._eoi(th, th.cur_irq, t)
            th.cur_irq = -1
            if not self._take_irqs(th, t, 0):
                self._resume_program(th, t)
        else:
            self._advance(th, t, 0)

    def _resume_program(self, th, t):
        """After interrupt handling: the interrupted segment, or the next op."""
        if th.sv_valid:
            th.sv_valid = False
            self._segment(th, t, 0, th.sv_guest, th.sv_cont)
        else:
            self._advance(th, t, 0)

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
        if code == Op.HVC:
            self._hvc(th, t)
            return
        if code == Op.SYNC:
            value = th.regs[arg] if arg < 4 else p0
            self._exit(th, t, ExitReason.MMIO, ucall=UCALL_SYNC, value=value)
            return
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
        self._enter(th, t, self.costs["vm_entry_ns"] + extra)

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
        elif code == Op.TIMER_CANCEL:
            th.timer_ctl &= ~ARCH_TIMER_CTRL_ENABLE
            self._timer_program(th, t)
        else:  # Op.SET_REG
            th.regs[arg] = p0

    # -- PSCI (arch/arm64/kvm/psci.c) -----------------------------------------------

    def _hvc(self, th, t):
        """An SMCCC call trapped by HVC: kvm_psci_call, then back to the guest,
        a halt (CPU_SUSPEND) or an exit to userspace."""
        r = self._psci(th, t)
        if r == _PSCI_RESUME:
            self._enter(th, t, self.costs["vm_entry_ns"])
        elif r == _PSCI_HALT:
            self._halt(th, t, HALT_CPU_SUSPEND)

    def _psci(self, th, t):
        vm = th.vm
        regs = th.regs
        fn = regs[0] & U32
        ver = vm.psci_version
        if ver == PsciVersion.V0_1:
            # kvm_psci_0_1_call: KVM's private function IDs.
            if fn == KVM_PSCI_FN_CPU_OFF:
                self._power_off(th, t)
                return self._retval(th, PsciRet.SUCCESS)
            if fn == KVM_PSCI_FN_CPU_ON:
                return self._retval(th, self._cpu_on(th, t, regs[1], regs[2], regs[3], True))
            return self._retval(th, PsciRet.NOT_SUPPORTED)
        if ver >= PsciVersion.V1_0:
            # kvm_psci_1_x_call
            minor = ver & 0xFFFF
            if fn == PsciFn.PSCI_VERSION:
                return self._retval(th, (1 << 16) | minor)
            if fn == PsciFn.PSCI_FEATURES:
                return self._retval(th, self._psci_features(vm, regs[1] & U32, minor))
            if fn in (PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND):
                if fn == PsciFn.SYSTEM_SUSPEND:
                    self._narrow(th)
                if vm.suspend_cap:
                    # Registers untouched: userspace reads the SMCCC arguments.
                    self._exit(th, t, ExitReason.SYSTEM_EVENT, SystemEventType.SUSPEND)
                    return _PSCI_EXIT
                return self._retval(th, PsciRet.NOT_SUPPORTED)
            if fn in (PsciFn.SYSTEM_RESET2, PsciFn.FN64_SYSTEM_RESET2) and minor >= 1:
                if fn == PsciFn.SYSTEM_RESET2:
                    self._narrow(th)
                arg = regs[1] & U32
                if arg == 0 or arg >= PSCI_1_1_RESET_TYPE_VENDOR_START:
                    self._system_event(th, t, SystemEventType.RESET,
                                       KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2)
                    regs[0] = PsciRet.INTERNAL_FAILURE & M64
                    return _PSCI_EXIT
                return self._retval(th, PsciRet.INVALID_PARAMS)
            if fn in (PsciFn.SYSTEM_OFF2, PsciFn.FN64_SYSTEM_OFF2) and minor >= 3:
                if fn == PsciFn.SYSTEM_OFF2:
                    self._narrow(th)
                arg = regs[1] & U32
                if arg not in (0, PSCI_1_3_OFF_TYPE_HIBERNATE_OFF) or regs[2] != 0:
                    return self._retval(th, PsciRet.INVALID_PARAMS)
                self._system_event(th, t, SystemEventType.SHUTDOWN,
                                   KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2)
                self._retval(th, PsciRet.INTERNAL_FAILURE)
                return _PSCI_EXIT
        # kvm_psci_0_2_call (and what 1.x leaves to it)
        if fn == PsciFn.PSCI_VERSION:
            return self._retval(th, PsciVersion.V0_2)
        if fn in (PsciFn.CPU_SUSPEND, PsciFn.FN64_CPU_SUSPEND):
            return _PSCI_HALT
        if fn == PsciFn.CPU_OFF:
            self._power_off(th, t)
            return self._retval(th, PsciRet.SUCCESS)
        if fn in (PsciFn.CPU_ON, PsciFn.FN64_CPU_ON):
            if fn == PsciFn.CPU_ON:
                self._narrow(th)
            return self._retval(th, self._cpu_on(th, t, regs[1], regs[2], regs[3], False))
        if fn in (PsciFn.AFFINITY_INFO, PsciFn.FN64_AFFINITY_INFO):
            if fn == PsciFn.AFFINITY_INFO:
                self._narrow(th)
            return self._retval(th, self._affinity_info(vm, regs[1], regs[2]))
        if fn == PsciFn.MIGRATE_INFO_TYPE:
            return self._retval(th, PSCI_0_2_TOS_MP)
        if fn in (PsciFn.SYSTEM_OFF, PsciFn.SYSTEM_RESET):
            self._system_event(th, t, SystemEventType.SHUTDOWN if fn == PsciFn.SYSTEM_OFF
                               else SystemEventType.RESET, 0)
            self._retval(th, PsciRet.INTERNAL_FAILURE)
            return _PSCI_EXIT
        return self._retval(th, PsciRet.NOT_SUPPORTED)

    def _retval(self, th, val):
        """smccc_set_retval(vcpu, val, 0, 0, 0)."""
        th.regs = [val & M64, 0, 0, 0]
        return _PSCI_RESUME

    def _narrow(self, th):
        """kvm_psci_narrow_to_32bit: the 32-bit call's x1..x3 lose their top halves."""
        th.regs[1] &= U32
        th.regs[2] &= U32
        th.regs[3] &= U32

    def _psci_features(self, vm, arg, minor):
        if arg in _PSCI_FEATURES_ALWAYS:
            return PsciRet.SUCCESS
        if arg in (PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND):
            return PsciRet.SUCCESS if vm.suspend_cap else PsciRet.NOT_SUPPORTED
        if arg in (PsciFn.SYSTEM_RESET2, PsciFn.FN64_SYSTEM_RESET2):
            return PsciRet.SUCCESS if minor >= 1 else PsciRet.NOT_SUPPORTED
        if arg in (PsciFn.SYSTEM_OFF2, PsciFn.FN64_SYSTEM_OFF2):
            return PSCI_1_3_OFF_TYPE_HIBERNATE_OFF if minor >= 3 else PsciRet.NOT_SUPPORTED
        return PsciRet.NOT_SUPPORTED

    def _mpidr_to_vcpu(self, vm, mpidr):
        """kvm_mpidr_to_vcpu: the vCPU whose MPIDR affinity (Aff3..Aff0) is ``mpidr``."""
        if mpidr >> 24:
            return None                  # Aff3 is 0 for every vCPU here
        vid = vcpu_of_mpidr(mpidr, vm.nr_vcpus)
        return None if vid < 0 else self.threads[vm.first + vid]

    def _cpu_on(self, th, t, target, entry, context, v0_1):
        """kvm_psci_vcpu_on."""
        if target & ~MPIDR_HWID_BITMASK:
            return PsciRet.INVALID_PARAMS
        tgt = self._mpidr_to_vcpu(th.vm, target)
        if tgt is None:
            return PsciRet.INVALID_PARAMS
        if tgt.mp_state != MpState.STOPPED:
            return PsciRet.INVALID_PARAMS if v0_1 else PsciRet.ALREADY_ON
        tgt.reset_pc = entry
        tgt.reset_r0 = context
        tgt.reset_pending = True         # KVM_REQ_VCPU_RESET
        tgt.mp_state = MpState.RUNNABLE
        self._wake_up(tgt, t)
        return PsciRet.SUCCESS

    def _affinity_info(self, vm, target, level):
        """kvm_psci_vcpu_affinity_info: ON if any matching vCPU is not STOPPED."""
        if target & ~MPIDR_HWID_BITMASK or level > 3:
            return PsciRet.INVALID_PARAMS
        mask = MPIDR_HWID_BITMASK & ~((1 << (level * 8)) - 1)
        matched = False
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            th = self.threads[g]
            if mpidr_of(th.vcpu_id) & mask == target & mask:
                matched = True
                if th.mp_state != MpState.STOPPED:
                    return AffinityInfo.ON
        return AffinityInfo.OFF if matched else PsciRet.INVALID_PARAMS

    def _power_off(self, th, t):
        """kvm_arm_vcpu_power_off: STOPPED, KVM_REQ_SLEEP, kick."""
        th.mp_state = MpState.STOPPED
        self._make_request(th, Request.SLEEP, t)

    def _system_event(self, th, t, type_, flags):
        """kvm_prepare_system_event: every vCPU STOPPED with KVM_REQ_SLEEP (which
        does not wake a vCPU blocked in WFI), and the caller exits."""
        vm = th.vm
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            self.threads[g].mp_state = MpState.STOPPED
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            self._make_request(self.threads[g], Request.SLEEP, t)
        self._exit(th, t, ExitReason.SYSTEM_EVENT, type_, 1, flags)

    def _make_request(self, th, req, t):
        if not req & KVM_REQUEST_NO_ACTION:
            th.requests |= 1 << (req & KVM_REQUEST_MASK)
        return self._kick(th, t, not req & KVM_REQUEST_NO_WAKEUP)

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
        """kvm_arch_vcpu_runnable (arm64: an interrupt pending and not STOPPED) /
        kvm_vcpu_has_events (x86, IF=1 needed)."""
        if self.x86:
            return not th.masked and self._apic_has_interrupt(th) >= 0
        return th.mp_state != MpState.STOPPED and self._gic_pending(th)

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

    def _eoi(self, th, b, t):
        """End of interrupt: priority drop and deactivation (ICC_EOIR1_EL1 / EOI).

        An SPI that is pending again and was re-routed to another vCPU while it
        was active is queued there and that vCPU kicked, as vgic_prune_ap_list
        does when it migrates the interrupt (at this vCPU's next exit).
        """
        if self.x86:
            th.isr &= ~(1 << b)
        elif b < 32:
            th.priv_act &= ~(1 << b)
        else:
            vm = th.vm
            vm.spi_act &= ~(1 << b)
            if self._owner(vm, th, b) is not th:
                self._queue(vm, th, b, t)

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
            self._eoi(th, b, t)
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
        if self.tl_cap:
            self._tl(th, t, _RUNNABLE)
        th.state = _RUNNABLE
        self._make_runnable(th, t)
        return True

    def _tick(self, vm, t):
        """A VM's periodic tick: every halted vCPU gets the tick interrupt."""
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            th = self.threads[g]
            if th.state == _POLLING or (th.state == _BLOCKED and th.resume == RESUME_HALT):
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
        return self._guard(self._make_request, self.threads[g], req, self.now)

    def signal(self, g: int) -> None:
        """A signal for the vCPU thread: it leaves KVM_RUN with KVM_EXIT_INTR."""
        th = self.threads[g]
        th.sig_pending = True
        self._guard(self._signal_wake, th, self.now)

    def _signal_wake(self, th, t) -> bool:
        """signal_wake_up: the signal code, not kvm_vcpu_wake_up, wakes a blocked or
        sleeping vCPU thread (so halt_wakeup does not count it); a polling one sees
        signal_pending(); one in guest mode is IPI'd out (kick_process)."""
        if th.state == _BLOCKED:
            th.wake_ts = t
            if self.tl_cap:
                self._tl(th, t, _RUNNABLE)
            th.state = _RUNNABLE
            self._make_runnable(th, t)
            return False
        return self._kick(th, t, False)

    def take_exit(self, g: int) -> dict:
        """The exit thread g last made, removed from the queue of exits."""
        th = self.threads[g]
        if g in self.exits:
            self.exits.remove(g)
        return {"reason": th.exit_reason, "type": th.exit_type, "ndata": th.exit_ndata,
                "data0": th.exit_data0, "ucall": th.exit_ucall, "value": th.exit_value,
                "time": th.exit_time}

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
            self._guard(self._power_off, th, self.now)
        elif state == MpState.SUSPENDED:
            # kvm_arm_vcpu_suspend: SUSPENDED, KVM_REQ_SUSPEND, kick.
            th.mp_state = MpState.SUSPENDED
            self._guard(self._make_request, th, Request.SUSPEND, self.now)
        else:
            th.mp_state = MpState.RUNNABLE       # only the field: no kick

    def get_reg(self, g: int, idx: int) -> int:
        """KVM_GET_ONE_REG of x0..x3 (0..3) or the PC (4), a pending reset applied first."""
        th = self.threads[g]
        if th.reset_pending:
            self._reset(th)
        return th.regs[idx] if idx < 4 else self._get_pc(th)

    def set_reg(self, g: int, idx: int, value: int) -> None:
        th = self.threads[g]
        if th.reset_pending:
            self._reset(th)
        if idx < 4:
            th.regs[idx] = value
        else:
            self._set_pc(th, value)

    def enable_system_suspend(self, vm_index: int) -> None:
        self.vms[vm_index].suspend_cap = True

    def set_psci_version(self, vm_index: int, version: int) -> None:
        self.vms[vm_index].psci_version = version

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
        """kvm_vcpu_check_block < 0: runnable, a signal, or KVM_REQ_UNBLOCK (consumed)."""
        if self._runnable(th) or th.sig_pending:
            return True
        if th.requests & _REQ_UNBLOCK_BIT:
            th.requests &= ~_REQ_UNBLOCK_BIT
            return True
        return False

    def _halt(self, th, t, kind):
        """kvm_vcpu_halt, up to the poll loop or the block."""
        th.halt_kind = kind
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
            if self.tl_cap:
                self._tl(th, t, _POLLING)
            th.state = _POLLING
            self._push_thread(th, t + th.halt_poll_ns, _EV_POLL)
            return
        self._block(th, t, t)

    def _block(self, th, t, poll_end):
        """kvm_vcpu_block: wait on the rcuwait until kicked."""
        th.poll_end = poll_end
        th.stats[S_BLOCKING] = 1
        if self.tl_cap:
            self._tl(th, t, _BLOCKED)
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
        if self.tl_cap:
            self._tl(th, cur, _RUNNING)
        th.state = _RUNNING
        kind = th.halt_kind
        if kind == HALT_SUSPEND:
            # kvm_vcpu_suspend: a wake-up exits to userspace; SUSPENDED stays.
            if self._runnable(th):
                self._exit(th, cur, ExitReason.SYSTEM_EVENT, SystemEventType.WAKEUP)
                return
        else:
            if not immediate:
                self.lat_hist[lat_bucket(cur + entry - th.wake_ts)] += 1
            if kind == HALT_CPU_SUSPEND:
                th.regs = [PsciRet.SUCCESS, 0, 0, 0]
            elif kind == HALT_MP_HALTED:
                th.mp_state = MpState.RUNNABLE
        self._enter(th, cur, entry)

    def _trace(self, th, t, kind, flag, valid, a, b):
        if not self.tracing:
            return
        if len(self.trace) == self.trace.maxlen:
            self.trace_dropped += 1
        self.trace.append((t, PID_BASE + th.g, th.pcpu, kind, flag, valid, th.vcpu_id, a, b))

    def _tl(self, th, t, s):
        """The state timeline: th goes to state s at t (no record if nothing changes)."""
        if th.state == s:
            return
        tl = self.timeline
        if len(tl) == self.tl_cap:
            ot, og, _, ostate = tl.popleft()
            self.tl_base[og] = ostate
            self.tl_t0 = ot
            self.timeline_dropped += 1
        tl.append((t, th.g, th.pcpu, int(s)))

    @property
    def timeline_capacity(self) -> int:
        return self.tl_cap

    def set_timeline_capacity(self, capacity: int) -> None:
        if self.timeline or self.timeline_dropped:
            raise ValueError("the timeline capacity can only be set before it records")
        self.tl_cap = capacity
        self.tl_t0 = self.now
        self.tl_base = [int(th.state) for th in self.threads]

    def timeline_array(self) -> np.ndarray:
        from .timeline import to_array
        return to_array(list(self.timeline))

    def timeline_window(self):
        return self.tl_t0, np.array(self.tl_base, dtype=np.uint8)

    def timeline_totals(self, now: int) -> dict:
        from .timeline import totals
        t0, base = self.timeline_window()
        return totals(self.timeline_array(), base, t0, now, len(self.cpus))

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
                "runnable": self._runnable(th), "mp_state": int(th.mp_state),
                "sig_pending": th.sig_pending}
