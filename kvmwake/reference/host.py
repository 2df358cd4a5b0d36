"""reference/host.py (twin: kvmwake/core/host.pxi).
Mirrors: kernel/sched/core.c and fair.c in outline (try_to_wake_up,
schedule, a CPU's run queue); today a FIFO run queue with time slices.

Host CPUs and their run queues: where vCPU threads wait, get a CPU, are
preempted.  Each host CPU runs at most one thread; the others queue FIFO
(a ``deque`` of thread indices per CPU).
"""

from __future__ import annotations

from collections import deque

from ..model import (
    CONT_EOI, CONT_IRQ, RESUME_HALT, RESUME_SEGMENT, RESUME_SLEEP, RESUME_START, EventClass,
    ThreadState,
)
from ..uapi import ExitReason
from .queue import heap_push, push_thread

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
asleep = best_irq = block = check_block = enter = exit_to_user = halt_done = None
interrupt_segment = None

_RUNNING, _POLLING, _BLOCKED, _RUNNABLE = (
    ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED, ThreadState.RUNNABLE)
_EV_SEG, _EV_RUN, _EV_SLICE = EventClass.SEGMENT, EventClass.RUN, EventClass.SLICE


class _Cpu:
    """A host CPU: the thread it runs (-1: idle) and its run queue."""

    __slots__ = ("cur", "runq")

    def __init__(self):
        self.cur = -1
        self.runq = deque()


def tl_note(e, th, t, s):
    """The state timeline: th goes to state s at t (called, when the timeline is
    on, just before ``th.state = s``; no record if nothing changes)."""
    if th.state == s:
        return
    tl = e.timeline
    if len(tl) == e.tl_cap:
        # The oldest record leaves the window: the window now starts at its
        # time, with its thread in the state it recorded.
        ot, og, _, ostate = tl.popleft()
        e.tl_base[og] = ostate
        e.tl_t0 = ot
        e.timeline_dropped += 1
    tl.append((t, th.g, th.pcpu, int(s)))


def rq_append(e, cpu, g):
    cpu.runq.append(g)


def rq_popleft(e, cpu):
    return cpu.runq.popleft()


def make_runnable(e, th, t, delay):
    """try_to_wake_up: the thread waits for its host CPU (``delay`` ns on an idle one)."""
    cpu = e.cpus[th.pcpu]
    if cpu.cur == -1:
        cpu.cur = th.g
        push_thread(e, th, t + delay, _EV_RUN)
        return
    rq_append(e, cpu, th.g)
    cur = e.threads[cpu.cur]
    if cur.state == _POLLING:
        # kvm_vcpu_can_poll: single_task_running() is now false.
        block(e, cur, t, t)
    elif cur.state == _RUNNING:
        arm_slice(e, cur, t)


def arm_slice(e, th, t):
    sl = e.costs["sched_slice_ns"]
    if sl and not th.slice_armed:
        th.slice_armed = True
        heap_push(e, max(t, th.run_start + sl), _EV_SLICE, th.g, th.run_gen)


def release_cpu(e, th, t):
    """The thread leaves its host CPU; the next queued thread gets it."""
    th.run_gen += 1
    th.slice_armed = False
    cpu = e.cpus[th.pcpu]
    if cpu.runq:
        nxt = e.threads[rq_popleft(e, cpu)]
        cpu.cur = nxt.g
        push_thread(e, nxt, t + e.costs["context_switch_ns"], _EV_RUN)
    else:
        cpu.cur = -1


def got_cpu(e, th, t):
    if e.tl_cap:
        tl_note(e, th, t, _RUNNING)
    th.state = _RUNNING
    th.run_start = t
    if e.cpus[th.pcpu].runq:
        arm_slice(e, th, t)
    resume = th.resume
    if resume == RESUME_START:
        enter(e, th, t, e.costs["vm_entry_ns"])
    elif resume == RESUME_HALT:
        # Back in kvm_vcpu_block's loop after schedule().
        if check_block(e, th):
            halt_done(e, th, t, True, th.poll_end)
        else:
            if e.tl_cap:
                tl_note(e, th, t, _BLOCKED)
            th.state = _BLOCKED
            release_cpu(e, th, t)
    elif resume == RESUME_SLEEP:
        # Back in kvm_vcpu_sleep's rcuwait_wait_event.
        if asleep(e, th):
            if th.sig_pending:
                exit_to_user(e, th, t, ExitReason.INTR)
            else:
                if e.tl_cap:
                    tl_note(e, th, t, _BLOCKED)
                th.state = _BLOCKED
                release_cpu(e, th, t)
        else:
            enter(e, th, t, e.costs["vm_entry_ns"])
    else:
        th.seg_end = t + th.rem_end
        th.seg_gfrom = t + th.rem_gfrom
        th.seg_gto = t + th.rem_gto
        push_thread(e, th, th.seg_end, _EV_SEG)
        if th.rem_gto and th.cont not in (CONT_IRQ, CONT_EOI):
            # It enters the guest again: requests are handled and, if it can
            # take an interrupt now or has work to do in KVM_RUN's loop (a
            # signal, a power-off), it does so on the way in.
            th.requests = 0
            if best_irq(e, th) >= 0 or th.sig_pending or asleep(e, th):
                interrupt_segment(e, th, th.seg_gfrom, 0)


def slice_end(e, th, t):
    th.slice_armed = False
    if th.state != _RUNNING or not e.cpus[th.pcpu].runq:
        return
    # Preempted: keep the rest of the segment for later.
    th.rem_end = th.seg_end - t
    th.rem_gfrom = max(th.seg_gfrom, t) - t
    th.rem_gto = max(th.seg_gto, t) - t
    if th.seg_gfrom <= t < th.seg_gto:
        # Preempted in guest mode: it exits now and re-enters when resumed.
        extra = e.costs["vm_exit_ns"] + e.costs["vm_entry_ns"]
        th.rem_end += extra
        th.rem_gfrom += extra
        th.rem_gto += extra
    th.gen += 1
    if e.tl_cap:
        tl_note(e, th, t, _RUNNABLE)
    th.state = _RUNNABLE
    th.resume = RESUME_SEGMENT
    rq_append(e, e.cpus[th.pcpu], th.g)
    release_cpu(e, th, t)
