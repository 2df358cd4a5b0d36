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
    CONT_DELIVER, CONT_END, CONT_HALT, CONT_NEXT, COST_DEFAULTS, HALT_POLL_HIST_COUNT,
    KVM_REQUEST_MASK, KVM_REQUEST_NO_ACTION, KVM_REQUEST_NO_WAKEUP,
    LAT_BUCKETS, MAX_LOOP_DEPTH, MAX_OPS_PER_INSTANT, NR_STATS, RESUME_HALT,
    RESUME_SEGMENT, RESUME_START, S_ATTEMPTED_POLL, S_BLOCKING, S_HALT_EXITS,
    S_POLL_FAIL_HIST, S_POLL_FAIL_NS, S_POLL_SUCCESS_HIST, S_POLL_SUCCESS_NS,
    S_SUCCESSFUL_POLL, S_WAIT_HIST, S_WAIT_NS, S_WAKEUP, TR_HALT_POLL_NS, TR_WAKEUP,
    Dist, EventClass, Op, Request, ThreadState, WakeTarget, lat_bucket,
)

M64 = (1 << 64) - 1
U32 = 0xFFFF_FFFF
PID_BASE = 1000

_USER, _RUNNING, _POLLING, _BLOCKED, _RUNNABLE = (
    ThreadState.USER, ThreadState.RUNNING, ThreadState.POLLING,
    ThreadState.BLOCKED, ThreadState.RUNNABLE)
_EV_TICK, _EV_SEG, _EV_POLL, _EV_RUN, _EV_SLICE = (
    EventClass.TICK, EventClass.SEGMENT, EventClass.POLL_END, EventClass.RUN,
    EventClass.SLICE)
_REQ_UNBLOCK_BIT = 1 << (Request.UNBLOCK & KVM_REQUEST_MASK)


class EngineError(RuntimeError):
    """The simulation cannot go on (e.g. a program that lets no time pass)."""


# ---------------------------------------------------------------------------
# Random streams: one per vCPU, a 64-bit LCG with a per-stream increment and
# the SplitMix64 finaliser as output function.

def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    return fmix64(x)


def fmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def stream_seed(seed: int, vm_index: int, vcpu_id: int) -> tuple[int, int]:
    """(state, increment) of the stream of vCPU ``vcpu_id`` of VM ``vm_index``."""
    h = splitmix64(seed & M64)
    h = splitmix64(h ^ ((vm_index << 32) | vcpu_id))
    state = splitmix64(h ^ 0x5851F42D4C957F2D)
    inc = ((splitmix64(h ^ 0x14057B7EF767814F) << 1) | 1) & M64
    return state, inc


LCG_MULT = 6364136223846793005
MAX_DRAW_NS = 1 << 62


class _Thread:
    """One vCPU thread and its vCPU (the kvm_vcpu fields the model needs)."""

    __slots__ = (
        "g", "vm", "vcpu_id", "pcpu", "state", "resume", "gen", "run_gen",
        "slice_armed", "run_start",
        "seg_end", "seg_gfrom", "seg_gto", "cont", "rem_end", "rem_gfrom", "rem_gto",
        "wake_target",
        "halt_start", "poll_end", "do_poll", "wake_ts", "halt_poll_ns",
        "irq_pending", "requests",
        "prog", "pc", "loops", "rng_state", "rng_inc", "stall_t", "stall_n", "stats",
    )

    def __init__(self, g, vm, vcpu_id, pcpu, seed, vm_index):
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
        self.wake_target = 0
        self.halt_start = self.poll_end = self.wake_ts = 0
        self.do_poll = False
        self.halt_poll_ns = 0
        self.irq_pending = False
        self.requests = 0
        self.prog = None
        self.pc = 0
        self.loops = [0] * MAX_LOOP_DEPTH
        self.rng_state, self.rng_inc = stream_seed(seed, vm_index, vcpu_id)
        self.stall_t = -1
        self.stall_n = 0
        self.stats = [0] * NR_STATS

    def next64(self) -> int:
        self.rng_state = (self.rng_state * LCG_MULT + self.rng_inc) & M64
        return fmix64(self.rng_state)


class _Vm:
    __slots__ = ("index", "nr_vcpus", "first", "override", "max_halt_poll_ns", "tick_ns",
                 "tick_gen")

    def __init__(self, index, nr_vcpus, first):
        self.index, self.nr_vcpus, self.first = index, nr_vcpus, first
        self.override = False
        self.max_halt_poll_ns = 0
        self.tick_ns = 0
        self.tick_gen = 0


class _Cpu:
    __slots__ = ("cur", "runq")

    def __init__(self):
        self.cur = -1
        self.runq = deque()


def _hist(stats, base, ns):
    """KVM_STATS_LOG_HIST_UPDATE: bucket min(fls64(ns), 31)."""
    stats[base + min(ns.bit_length(), HALT_POLL_HIST_COUNT - 1)] += 1


class Engine:
    """The plain-Python engine.  See ``kvmwake._core.Engine`` for the interface."""

    def __init__(self, arch: str, host_cpus: int, seed: int, costs: dict | None = None,
                 trace_capacity: int = 1 << 20):
        self.arch = arch
        self.seed = seed
        self.costs = dict(COST_DEFAULTS)
        if costs:
            self.costs.update(costs)
        self.halt_poll_ns = haltpoll.HALT_POLL_NS_DEFAULT[arch]
        self.halt_poll_ns_grow = haltpoll.HALT_POLL_NS_GROW_DEFAULT
        self.halt_poll_ns_grow_start = haltpoll.HALT_POLL_NS_GROW_START_DEFAULT
        self.halt_poll_ns_shrink = haltpoll.HALT_POLL_NS_SHRINK_DEFAULT
        self.cpus = [_Cpu() for _ in range(host_cpus)]
        self.vms: list[_Vm] = []
        self.threads: list[_Thread] = []
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

    def add_vm(self, nr_vcpus: int) -> int:
        vm = _Vm(len(self.vms), nr_vcpus, len(self.threads))
        for i in range(nr_vcpus):
            g = len(self.threads)
            self.threads.append(_Thread(g, vm, i, g % len(self.cpus), self.seed, vm.index))
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
        """A periodic wake source on every halted vCPU of the VM, at multiples of the period."""
        v = self.vms[vm]
        v.tick_ns = period_ns
        v.tick_gen += 1
        if period_ns:
            first = (self.now // period_ns + 1) * period_ns
            self._push(first, _EV_TICK, vm, v.tick_gen)

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
        if self.failed:
            raise EngineError("this engine stopped on an earlier error")
        try:
            self._run(until_ns)
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
            th = threads[who]
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
            if th.rem_gto:
                # Preempted before it left guest mode (entering, or in guest
                # mode): it enters the guest again and takes pending work on
                # entry, whatever the entry costs (even 0 ns).
                th.irq_pending = False
                th.requests = 0
            th.seg_end = t + th.rem_end
            th.seg_gfrom = t + th.rem_gfrom
            th.seg_gto = t + th.rem_gto
            self._push_thread(th, th.seg_end, _EV_SEG)

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

    def _advance(self, th, t, pre, entry):
        """Run guest ops from ``th.pc`` after ``pre`` ns of host work (entry).

        ``entry`` is true when the thread enters the guest now (at its start,
        after a trap, after a halt) and false when it only goes on in guest
        mode (a loop back-edge).  An entry takes pending work even when it
        costs 0 ns.

        Accumulates guest time until an op that must act at an instant of its
        own (a trap, a halt, the end), then schedules the segment's end.
        """
        if entry:
            th.irq_pending = False   # the guest takes the interrupt on entry
            th.requests = 0          # check_vcpu_requests on the way in
        guest = 0
        ops = th.prog
        n = 0
        while True:
            code, dist, arg, p0, p1 = ops[th.pc]
            n += 1
            if code == Op.COMPUTE:
                guest += self._draw(th, dist, p0, p1)
                th.pc += 1
            elif code == Op.WFI:
                th.stats[S_HALT_EXITS] += 1
                th.pc += 1
                self._segment(th, t, pre, guest, CONT_HALT)
                break
            elif code == Op.WAKE:
                th.wake_target = self._wake_target(th, dist, arg)
                th.pc += 1
                self._segment(th, t, pre, guest, CONT_DELIVER)
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
                    # A loop back-edge after guest time: end the segment here so
                    # that a loop of pure computation stays a sequence of events.
                    self._segment(th, t, pre, guest, CONT_NEXT)
                    break
            else:  # Op.END
                self._segment(th, t, pre, guest, CONT_END)
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
        exit_ns = self.costs["vm_exit_ns"] if cont != CONT_NEXT else 0
        th.seg_gfrom = t + pre
        th.seg_gto = th.seg_gfrom + guest
        th.seg_end = th.seg_gto + exit_ns
        th.cont = cont
        self._push_thread(th, th.seg_end, _EV_SEG)

    def _draw(self, th, dist, p0, p1):
        if dist == Dist.FIXED:
            return p0
        if dist == Dist.EXPONENTIAL:
            u = (th.next64() >> 11) * (1.0 / 9007199254740992.0)
            d = -math.log(1.0 - u) * p0 + 0.5
            return MAX_DRAW_NS if d >= MAX_DRAW_NS else int(d)
        return p0 + th.next64() % (p1 - p0 + 1)

    def _wake_target(self, th, kind, arg):
        n = th.vm.nr_vcpus
        if kind == WakeTarget.VCPU:
            return arg
        if kind == WakeTarget.NEXT:
            return (th.vcpu_id + 1) % n
        r = th.next64() % (n - 1)
        return r if r < th.vcpu_id else r + 1

    def _segment_end(self, th, t):
        cont = th.cont
        if cont == CONT_HALT:
            self._halt(th, t)
        elif cont == CONT_DELIVER:
            target = self.threads[th.vm.first + th.wake_target]
            ipi = self._raise_pending(target, t)
            extra = self.costs["ipi_send_ns"] if ipi else 0
            self._advance(th, t, self.costs["vm_entry_ns"] + extra, True)
        elif cont == CONT_END:
            th.state = _USER
            self._release_cpu(th, t)
        else:
            self._advance(th, t, 0, False)

    # -- wake sources, requests and kicks ----------------------------------------

    def _raise_pending(self, th, t) -> bool:
        """Make the plain wake source pending on ``th`` and kick it (vgic_queue_irq_unlock)."""
        th.irq_pending = True
        return self._kick(th, t)

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
            th.irq_pending = False
            th.requests = 0
            if t >= th.seg_gfrom:
                # IN_GUEST_MODE: IPI; the vCPU exits, takes it and re-enters.
                extra = self.costs["vm_exit_ns"] + self.costs["vm_entry_ns"]
                th.seg_gto += extra
                th.seg_end += extra
                self._push_thread(th, th.seg_end, _EV_SEG)
                return True
            # Still on its way into the guest: taken at entry.
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

    def make_request(self, g: int, req: int) -> bool:
        """kvm_make_request + kvm_vcpu_kick, as kvm_make_vcpu_request does it.

        Sets the request bit (unless NO_ACTION), wakes a waiting vCPU unless
        the request is NO_WAKEUP, and IPIs a vCPU in guest mode.  Returns True
        if it sent an IPI.
        """
        th = self.threads[g]
        if not req & KVM_REQUEST_NO_ACTION:
            th.requests |= 1 << (req & KVM_REQUEST_MASK)
        return self._kick(th, self.now, wake=not req & KVM_REQUEST_NO_WAKEUP)

    def kick(self, g: int) -> bool:
        return self._kick(self.threads[g], self.now)

    def raise_pending(self, g: int) -> bool:
        return self._raise_pending(self.threads[g], self.now)

    def _tick(self, vm, t):
        """A VM's periodic wake source: every halted vCPU is woken."""
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            th = self.threads[g]
            if th.state == _POLLING or th.state == _BLOCKED:
                self._raise_pending(th, t)

    # -- kvm_vcpu_halt -----------------------------------------------------------

    def _max_halt_poll_ns(self, th):
        """kvm_vcpu_max_halt_poll_ns."""
        vm = th.vm
        return vm.max_halt_poll_ns if vm.override else self.halt_poll_ns

    def _check_block(self, th) -> bool:
        """kvm_vcpu_check_block < 0: runnable, or KVM_REQ_UNBLOCK (consumed)."""
        if th.irq_pending:
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
                "irq_pending": th.irq_pending, "requests": th.requests,
                "pcpu": th.pcpu, "pc": th.pc}
