"""reference/host.py (twin: kvmwake/core/host.pxi).
Mirrors: kernel/sched/core.c (try_to_wake_up, ttwu_runnable, __schedule,
single_task_running) and kernel/sched/fair.c of Linux 6.18 (avg_vruntime,
vruntime_eligible, update_curr, update_deadline, update_entity_lag,
place_entity, requeue_delayed_entity, dequeue_entity with DELAY_DEQUEUE,
finish_delayed_dequeue_entity, pick_eevdf, pick_next_task_fair,
set_next_entity, check_preempt_wakeup_fair, task_tick_fair).

Host CPUs and their run queues: where vCPU threads wait, get a CPU, are
preempted.  Each host CPU runs at most one thread.  Two schedulers, chosen
per host (``e.sched``): FIFO run queues with a fixed time slice (a ``deque``
of thread indices per CPU), or the fair class as Linux 6.18 runs it, EEVDF,
all threads nice 0.  Under EEVDF the deque is the cfs_rq's tree: the waiting
threads and the delayed ones, in insertion order (the kernel's tie-break
among equal deadlines); the current thread is ``cpu.cur``.
"""

from __future__ import annotations

from bisect import insort
from collections import deque

from ..model import (
    CONT_EOI, CONT_IRQ, RESUME_HALT, RESUME_SEGMENT, RESUME_SLEEP, RESUME_START,
    SCHED_TICK_NSEC, THREAD_HOST, EventClass, ThreadState,
)
from ..uapi import ExitReason
from .queue import heap_push, push_thread
from .rng import COST_CONTEXT_SWITCH, COST_VM_ENTRY, COST_VM_EXIT, COST_WAKE_TO_RUN, cost_ns

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
asleep = best_irq = block = check_block = enter = exit_to_user = halt_done = None
interrupt_segment = ht_got_cpu = ht_preempted = poll_settle = None

_USER, _RUNNING, _POLLING, _BLOCKED, _RUNNABLE = (
    ThreadState.USER, ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED,
    ThreadState.RUNNABLE)
_EV_SEG, _EV_RUN, _EV_SLICE = EventClass.SEGMENT, EventClass.RUN, EventClass.SLICE


#: e.sched values (kvmwake.model.SCHEDULERS, in order).
SCHED_POLICY_FIFO, SCHED_POLICY_EEVDF = 0, 1
_TICK = SCHED_TICK_NSEC


class _Cpu:
    """A host CPU: the thread it runs (-1: idle) and its run queue; under EEVDF
    also the cfs_rq's sum of (v - zero_v) over the queued threads (the current
    one included), zero_v, and TIF_NEED_RESCHED while the current switches in."""

    __slots__ = ("cur", "runq", "zero_v", "sum_v", "need_resched")

    def __init__(self):
        self.cur = -1
        self.runq = deque()
        self.zero_v = 0
        self.sum_v = 0
        self.need_resched = False


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
    if cpu.cur >= 0:
        poll_settle(e, e.threads[cpu.cur])
    if e.sched == SCHED_POLICY_EEVDF:
        ttwu_fair(e, th, t, delay)
        return
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
    if e.sched == SCHED_POLICY_EEVDF:
        arm_tick(e, th, t)
        return
    sl = e.costs["sched_slice_ns"]
    if sl and not th.slice_armed:
        th.slice_armed = True
        heap_push(e, max(t, th.run_start + sl), _EV_SLICE, th.g, th.run_gen)


def release_cpu(e, th, t):
    """The thread leaves its host CPU; the next queued thread gets it."""
    th.run_gen += 1
    th.slice_armed = False
    cpu = e.cpus[th.pcpu]
    if e.sched == SCHED_POLICY_EEVDF:
        # It sleeps (blocks, exits to userspace): dequeue_entity(DEQUEUE_SLEEP).
        dequeue_sleep(e, cpu, th, t)
        schedule_fair(e, cpu, t, cost_ns(e, th, COST_CONTEXT_SWITCH))
        return
    if cpu.runq:
        nxt = e.threads[rq_popleft(e, cpu)]
        cpu.cur = nxt.g
        push_thread(e, nxt, t + cost_ns(e, th, COST_CONTEXT_SWITCH), _EV_RUN)
    else:
        cpu.cur = -1
        sched_balance_newidle(e, th.pcpu, t)


# -- A vCPU thread in userspace keeps its CPU (EEVDF) ---------------------------------
# KVM_RUN returning to userspace is not a sleep: the thread stays TASK_RUNNING,
# current on its CPU, while the VMM handles the exit, and the next ioctl(KVM_RUN)
# goes on from there (vcpu_put()/vcpu_load() only, no dequeue, no place_entity()).
# Userspace takes no virtual time, so the thread is "held": current, in state
# USER, until it re-enters at the same instant (reenter_held) or the clock is about
# to move on without it (release_held: the VMM then waits for something, a
# sleep at its exit time).  Held threads are derived from the state (a USER vCPU
# thread that is its CPU's current one); e.held lists them in thread order.
# FIFO keeps the old rule: the thread leaves its CPU at the exit.


def is_held(e, th):
    """A vCPU thread outside KVM_RUN that is still its CPU's current thread."""
    return th.state == _USER and e.cpus[th.pcpu].cur == th.g


def hold_cpu(e, th):
    """exit_to_user under EEVDF: the thread keeps its CPU, its slice tick void."""
    th.run_gen += 1
    th.slice_armed = False
    insort(e.held, th.g)


def drop_held(e, g):
    """g out of e.held."""
    e.held.remove(g)


def release_held(e):
    """The clock moves on: every held thread leaves its CPU at its exit time (in
    thread order), as a thread that blocks in userspace does."""
    held, e.held = e.held, []
    for g in held:
        unhold(e, e.threads[g])


def unhold(e, th):
    """A held thread (out of e.held) leaves its CPU at its exit time."""
    if e.tl_cap:
        th.state = _RUNNING                 # the timeline: running until now
        tl_note(e, th, th.exit_time, _USER)
        th.state = _USER
    release_cpu(e, th, th.exit_time)


def reenter_held(e, th, t):
    """KVM_RUN again from a held thread: it is still current, so no wake-up and
    no update_curr() (none runs on a system call); a reschedule a wake-up asked
    for meanwhile (wakeup_preempt()) is taken on the way in, as the return to
    userspace would have (exit_to_user_mode_loop: schedule())."""
    drop_held(e, th.g)
    cpu = e.cpus[th.pcpu]
    if cpu.need_resched:
        if e.tl_cap:
            th.state = _RUNNING
            tl_note(e, th, t, _RUNNABLE)
        th.state = _RUNNABLE
        preempt_fair(e, cpu, th, t)
        if cpu.cur != th.g:
            return
    if e.tl_cap:
        th.state = _RUNNING                 # no record: it never left the CPU
    got_cpu(e, th, t)


def got_cpu(e, th, t):
    cpu = e.cpus[th.pcpu]
    if e.sched == SCHED_POLICY_EEVDF and cpu.need_resched:
        # A reschedule was requested while it switched in: __schedule() again.
        preempt_fair(e, cpu, th, t)
        if cpu.cur != th.g:
            return
    if e.tl_cap:
        tl_note(e, th, t, _RUNNING)
    th.state = _RUNNING
    th.run_start = t
    if e.cpus[th.pcpu].runq:
        arm_slice(e, th, t)
    if th.kind == THREAD_HOST:
        ht_got_cpu(e, th, t)
        return
    resume = th.resume
    if resume == RESUME_START:
        enter(e, th, t, cost_ns(e, th, COST_VM_ENTRY))
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
            enter(e, th, t, cost_ns(e, th, COST_VM_ENTRY))
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


def keep_segment_rest(e, th, t):
    """A running thread leaves its CPU at t: the rest of its segment, for later; its
    pending segment event is void (``th.gen``)."""
    th.rem_end = th.seg_end - t
    th.rem_gfrom = max(th.seg_gfrom, t) - t
    th.rem_gto = max(th.seg_gto, t) - t
    if th.seg_gfrom <= t < th.seg_gto:
        # Preempted in guest mode: it exits now and re-enters when resumed.
        extra = cost_ns(e, th, COST_VM_EXIT)
        extra += cost_ns(e, th, COST_VM_ENTRY)
        th.rem_end += extra
        th.rem_gfrom += extra
        th.rem_gto += extra
    th.gen += 1


def preempt_segment(e, th, t):
    """A running thread is preempted at t: it keeps the rest of its segment."""
    if th.kind == THREAD_HOST:
        ht_preempted(e, th, t)
    keep_segment_rest(e, th, t)
    if e.tl_cap:
        tl_note(e, th, t, _RUNNABLE)
    th.state = _RUNNABLE
    th.resume = RESUME_SEGMENT


def slice_end(e, th, t):
    if th.poll_seq:
        # A lazy poll window that ran out first: the thread left its CPU then
        # (as its POLL_END event would have had it), so this slice is void.
        poll_settle(e, th)
        if th.state != _POLLING:
            return
    th.slice_armed = False
    if e.sched == SCHED_POLICY_EEVDF:
        task_tick_fair(e, th, t)
        return
    if th.state != _RUNNING or not e.cpus[th.pcpu].runq:
        return
    # Preempted: keep the rest of the segment for later.
    preempt_segment(e, th, t)
    rq_append(e, e.cpus[th.pcpu], th.g)
    release_cpu(e, th, t)
    migrate_disallowed(e, th, t)


def single_task_running(e, c):
    """single_task_running(): rq->nr_running == 1 on the (polling) thread's CPU.
    Under EEVDF a delayed-dequeue thread is still queued and counts."""
    return not e.cpus[c].runq


# -- EEVDF: kernel/sched/fair.c of Linux 6.18, every thread nice 0 ------------------------
# With equal weights (NICE_0_LOAD) calc_delta_fair() is the identity and the
# weighted sums reduce to plain ones: V = floor(sum v / n), eligible(v) iff
# sum v >= n v, lag scaling (n + 1) / n.  All slices are the base slice, so
# set_protect_slice() sets vprot = deadline and PREEMPT_SHORT never applies.
# Integers as the core's int64_t (C division truncates toward 0: _trunc_div).

def _trunc_div(a, b):
    q = abs(a) // b
    return -q if a < 0 else q


def nr_queued(cpu):
    """cfs_rq->nr_queued (= rq->nr_running here): current, waiting and delayed."""
    return len(cpu.runq) + (1 if cpu.cur >= 0 else 0)


def avg_vruntime(cpu):
    """avg_vruntime(): V, the floor of the queued vruntimes' mean; it moves
    zero_vruntime to V (update_zero_vruntime); an empty queue keeps the last V."""
    n = nr_queued(cpu)
    if n:
        delta = cpu.sum_v // n
        cpu.zero_v += delta
        cpu.sum_v -= delta * n
    return cpu.zero_v


def vruntime_eligible(cpu, v):
    """vruntime_eligible(): v <= V, without a division."""
    return cpu.sum_v >= (v - cpu.zero_v) * nr_queued(cpu)


def update_entity_lag(e, cpu, th):
    """update_entity_lag(): vlag = V - v, clamped to +-(max slice + TICK_NSEC)."""
    lim = e.base_slice + _TICK
    th.vlag = max(-lim, min(lim, avg_vruntime(cpu) - th.vruntime))


def place_entity(e, cpu, th):
    """place_entity() (PLACE_LAG; no ENQUEUE_INITIAL: a vCPU thread exists before
    it first runs): v = V - vlag * (n + 1) / n (C division), d = v + slice."""
    vr = avg_vruntime(cpu)
    n = nr_queued(cpu)
    lag = 0
    if n and th.vlag:
        lag = _trunc_div(th.vlag * (n + 1), n)
    th.vruntime = vr - lag
    th.deadline = th.vruntime + e.base_slice


def next_tick(t):
    """The first jiffy (HZ=250, one grid for every CPU) after t."""
    return (t // _TICK + 1) * _TICK


def update_curr(e, cpu, t):
    """update_curr() + update_deadline(): the current thread's vruntime advances by
    its run time; True if it asks for a reschedule (its request is used up, or
    its protected slice, with another thread queued).

    The ticks that fell in (exec_start, t] without an event of their own (a
    thread alone on its CPU needs none) ran update_deadline() too: a deadline
    reached at a tick was renewed from that tick's vruntime, and (the base
    slice being shorter than a tick) at every later tick as well."""
    if cpu.cur < 0:
        return False
    th = e.threads[cpu.cur]
    if t <= th.exec_start:
        return False
    a = th.exec_start
    v0 = th.vruntime
    th.exec_start = t
    th.vruntime += t - a
    cpu.sum_v += t - a
    first = next_tick(a)
    if first <= t:
        need = a + (th.deadline - v0)           # v(T) = v0 + T - a >= deadline
        if need > first:
            first = (need + _TICK - 1) // _TICK * _TICK
        if first <= t:
            th.deadline = v0 + (t // _TICK * _TICK - a) + e.base_slice
    resched = False
    if th.vruntime >= th.deadline:              # update_deadline()
        th.deadline = th.vruntime + e.base_slice
        avg_vruntime(cpu)
        resched = True
    if nr_queued(cpu) == 1:
        return False
    return resched or th.vruntime >= th.vprot


def pick_eevdf(e, cpu, skip_delayed=False):
    """pick_eevdf() (__pick_eevdf with protect): the one queued entity; else the
    current one inside its protected slice (RUN_TO_PARITY) if eligible; else
    the eligible entity with the earliest deadline (the earlier queued on a
    tie), the current one only if strictly earlier.  ``skip_delayed``: the
    delayed-dequeue sleepers are no candidates (they still count in V)."""
    c = cpu.cur
    if nr_queued(cpu) == 1:
        return c if c >= 0 else cpu.runq[0]
    threads = e.threads
    if c >= 0 and not vruntime_eligible(cpu, threads[c].vruntime):
        c = -1
    if c >= 0 and threads[c].vruntime < threads[c].vprot:
        return c
    best = -1
    for x in cpu.runq:
        if (best < 0 or threads[x].deadline < threads[best].deadline) \
                and not (skip_delayed and threads[x].sched_delayed) \
                and vruntime_eligible(cpu, threads[x].vruntime):
            best = x
    if best < 0 or (c >= 0 and threads[c].deadline < threads[best].deadline):
        best = c
    return best


def rq_remove(e, cpu, g):
    """__dequeue_entity(): take g out of the run-queue list."""
    cpu.runq.remove(g)


def finish_delayed_dequeue(e, cpu, g):
    """dequeue_entities(DEQUEUE_SLEEP | DEQUEUE_DELAYED) of a delayed thread picked
    by pick_next_entity(): update_entity_lag(), out of the queue, and
    finish_delayed_dequeue_entity(): DELAY_ZERO clips a positive lag to 0."""
    th = e.threads[g]
    update_entity_lag(e, cpu, th)
    cpu.sum_v -= th.vruntime - cpu.zero_v
    rq_remove(e, cpu, g)
    th.on_rq = False
    th.sched_delayed = False
    if th.vlag > 0:
        th.vlag = 0


def pick_next_task_fair(e, cpu):
    """pick_next_task_fair(): pick_eevdf(), dequeueing the delayed entities it
    returns and picking again; -1 when nothing is left (the CPU goes idle)."""
    while nr_queued(cpu):
        x = pick_eevdf(e, cpu)
        if x != cpu.cur and e.threads[x].sched_delayed:
            finish_delayed_dequeue(e, cpu, x)
            continue
        return x
    return -1


def set_next_entity(e, cpu, g, t, delay):
    """set_next_entity(first): g leaves the tree and becomes current, its
    protected slice set (set_protect_slice: vprot = deadline with equal slices);
    it runs after ``delay`` ns (the context switch, or the wake-up from idle)."""
    th = e.threads[g]
    rq_remove(e, cpu, g)
    cpu.cur = g
    th.exec_start = t
    th.vprot = th.deadline
    push_thread(e, th, t + delay, _EV_RUN)


def schedule_fair(e, cpu, t, delay):
    """__schedule() on a CPU whose thread has left it: the next pick, or idle."""
    x = pick_next_task_fair(e, cpu)
    cpu.need_resched = False
    if x >= 0:
        set_next_entity(e, cpu, x, t, delay)
    else:
        sched_balance_newidle(e, e.cpus.index(cpu), t)


def dequeue_sleep(e, cpu, th, t):
    """dequeue_entity(DEQUEUE_SLEEP) of the current thread, then put_prev_entity():
    an ineligible sleeper stays queued, delayed (DELAY_DEQUEUE), and counts in
    nr_running; an eligible one leaves with its lag."""
    g = cpu.cur
    update_curr(e, cpu, t)
    if not vruntime_eligible(cpu, th.vruntime):
        th.sched_delayed = True
        cpu.cur = -1
        rq_append(e, cpu, g)
    else:
        update_entity_lag(e, cpu, th)
        cpu.sum_v -= th.vruntime - cpu.zero_v
        cpu.cur = -1
        th.on_rq = False


def preempt_fair(e, cpu, th, t):
    """__schedule() with the current thread still runnable (a reschedule
    request): pick again; a re-pick keeps it (and its stale vprot), another
    pick preempts it."""
    update_curr(e, cpu, t)
    cpu.need_resched = False
    x = pick_next_task_fair(e, cpu)
    if x == th.g:
        if th.state == _RUNNING:
            arm_tick(e, th, t)
        return
    if th.state == _RUNNING:
        preempt_segment(e, th, t)
    th.run_gen += 1
    th.slice_armed = False
    cpu.cur = -1
    rq_append(e, cpu, th.g)                       # put_prev_entity
    set_next_entity(e, cpu, x, t, cost_ns(e, th, COST_CONTEXT_SWITCH))
    migrate_disallowed(e, th, t)


def arm_tick(e, th, t):
    """The first tick at which task_tick_fair() will reschedule the running
    thread (v >= vprot), if another thread is queued (no HRTICK: a slice's
    end is noticed at a tick).  Ticks with nothing to do get no event."""
    cpu = e.cpus[th.pcpu]
    if th.slice_armed or nr_queued(cpu) < 2:
        return
    th.slice_armed = True
    target = th.exec_start + max(0, th.vprot - th.vruntime)
    at = (target + _TICK - 1) // _TICK * _TICK
    if at <= t:
        at = next_tick(t)
    heap_push(e, at, _EV_SLICE, th.g, th.run_gen)


def task_tick_fair(e, th, t):
    """task_tick_fair() -> entity_tick() -> update_curr() on the running thread;
    or the preemption point after a resched_curr()."""
    cpu = e.cpus[th.pcpu]
    if th.state != _RUNNING or cpu.cur != th.g:
        return
    if update_curr(e, cpu, t) or cpu.need_resched:
        preempt_fair(e, cpu, th, t)
    else:
        arm_tick(e, th, t)


def check_preempt_wakeup_fair(e, cpu, p, t):
    """check_preempt_wakeup_fair(): nothing if a reschedule is pending; else
    update_curr(), and preempt if p is now what pick_eevdf() would run (with
    e.preempt_skips_delayed, what it would run among the threads that are not
    delayed-dequeue sleepers: the host kernels kvmwake is held against decide
    so, docs/design.md "The EEVDF scheduler")."""
    if cpu.need_resched:
        return
    if update_curr(e, cpu, t) or pick_eevdf(e, cpu, e.preempt_skips_delayed) == p:
        cpu.need_resched = True


def requeue_delayed_entity(e, cpu, th):
    """requeue_delayed_entity() (ttwu_runnable of a delayed sleeper, no
    update_curr() first): re-placed at V only if its lag became positive
    (DELAY_ZERO), and no longer delayed."""
    update_entity_lag(e, cpu, th)
    if th.vlag > 0:
        cpu.sum_v -= th.vruntime - cpu.zero_v
        rq_remove(e, cpu, th.g)
        th.vlag = 0
        place_entity(e, cpu, th)
        cpu.sum_v += th.vruntime - cpu.zero_v
        rq_append(e, cpu, th.g)
    th.sched_delayed = False


def enqueue_entity(e, cpu, th, t):
    """enqueue_entity(ENQUEUE_WAKEUP) of a thread that is not queued: update_curr()
    with the old nr_queued (a reschedule it asks for is kept), place_entity(),
    into the queue."""
    if update_curr(e, cpu, t):
        cpu.need_resched = True
    place_entity(e, cpu, th)
    cpu.sum_v += th.vruntime - cpu.zero_v
    th.on_rq = True
    rq_append(e, cpu, th.g)


def ttwu_fair(e, th, t, delay):
    """try_to_wake_up() under EEVDF: a delayed thread is requeued in place
    (ttwu_runnable -> requeue_delayed_entity); another is enqueued with its lag
    (enqueue_entity -> place_entity); then wakeup_preempt().  A CPU that was
    idle switches to it after ``delay`` ns; a polling thread stops polling
    (single_task_running() is false); a running one is preempted at once if a
    reschedule was requested (TIF_NEED_RESCHED acted on at once for vCPU
    threads), else its next slice-ending tick is armed."""
    cpu = e.cpus[th.pcpu]
    g = th.g
    if th.on_rq:
        requeue_delayed_entity(e, cpu, th)
    elif cpu.cur < 0 and not cpu.runq:
        # An idle CPU (empty queue): place_entity() puts it at V (no lag with
        # nothing queued), and the pick is it (the general path, shortened).
        th.vruntime = cpu.zero_v
        th.deadline = th.vruntime + e.base_slice
        th.on_rq = True
        cpu.cur = g
        cpu.need_resched = False
        th.exec_start = t
        th.vprot = th.deadline
        push_thread(e, th, t + delay, _EV_RUN)
        return
    else:
        enqueue_entity(e, cpu, th, t)
        if cpu.cur < 0:
            # Woken onto the idle task: resched_curr(), and the pick is g.
            schedule_fair(e, cpu, t, delay)
            return
    check_preempt_wakeup_fair(e, cpu, g, t)
    cur = e.threads[cpu.cur]
    if cur.state == _POLLING:
        # kvm_vcpu_can_poll: single_task_running() is now false.
        block(e, cur, t, t)
    elif cur.state == _RUNNING:
        if cpu.need_resched:
            resched_curr(e, cur, t)
        else:
            arm_tick(e, cur, t)
    # else it switches in; got_cpu() acts on need_resched


def resched_curr(e, th, t):
    """resched_curr(): the running thread reschedules at its next preemption
    point, an event at t after the one being handled (it may be the waker, in
    the middle of its own work); it replaces the thread's armed tick."""
    th.run_gen += 1
    th.slice_armed = True
    heap_push(e, t, _EV_SLICE, th.g, th.run_gen)


# -- Placement: kernel/sched/core.c (select_task_rq, set_task_cpu, select_fallback_rq,
# is_cpu_allowed) and kernel/sched/fair.c of Linux 6.18 (select_task_rq_fair,
# wake_affine, wake_affine_idle, wake_affine_weight, select_idle_sibling,
# select_idle_cpu, available_idle_cpu, cpus_share_cache, sched_balance_newidle,
# sched_balance_rq, can_migrate_task, task_hot) in outline (docs/design.md,
# "Placement").  A thread allowed on one CPU never moves: the pinned default
# keeps every result of before.

#: th.aff_kind: CPU g % ncpu (the default), every CPU, or the CPUs of th.aff_mask.
AFF_PINNED, AFF_ALL, AFF_LIST = 0, 1, 2
#: sysctl_sched_migration_cost, ns.
SCHED_MIGRATION_COST_NS = 500_000
#: sd->imbalance_pct of the LLC (MC) domain.
SD_LLC_IMBALANCE_PCT = 117


def cpu_allowed(e, th, c):
    """is_cpu_allowed(): c is in the thread's p->cpus_ptr."""
    if th.aff_kind == AFF_ALL:
        return True
    if th.aff_kind == AFF_PINNED:
        return c == th.g % len(e.cpus)
    return bool((th.aff_mask >> c) & 1)


def nr_cpus_allowed(e, th):
    """p->nr_cpus_allowed."""
    if th.aff_kind == AFF_ALL:
        return len(e.cpus)
    if th.aff_kind == AFF_PINNED:
        return 1
    return bin(th.aff_mask).count("1")


def nth_allowed(e, th, k):
    """The k-th CPU (from 0, in CPU order) of the thread's allowed set."""
    for c in range(len(e.cpus)):
        if cpu_allowed(e, th, c):
            if k == 0:
                return c
            k -= 1
    return 0


def available_idle_cpu(e, c):
    """available_idle_cpu() -> idle_cpu(): nothing current or switching in, nothing
    queued (a delayed-dequeue sleeper counts in nr_running)."""
    cpu = e.cpus[c]
    return cpu.cur < 0 and not cpu.runq


def cpus_share_cache(e, a, b):
    return e.llc[a] == e.llc[b]


def select_task_rq_fork(e, th):
    """A new thread's first CPU (wake_up_new_task's placement, simplified): the
    (g mod n)-th of its n allowed CPUs; pinned and "all" give CPU g % ncpu."""
    return nth_allowed(e, th, th.g % nr_cpus_allowed(e, th))


def select_fallback_rq(e, th):
    """select_fallback_rq(): the first allowed CPU (no NUMA nodes, all CPUs active)."""
    return nth_allowed(e, th, 0)


def select_idle_cpu(e, th, target):
    """select_idle_cpu(): the first idle CPU of target's LLC the thread may use, in
    CPU order from target + 1, wrapping (the whole LLC); -1 if none."""
    n = len(e.cpus)
    llc = e.llc
    for i in range(1, n + 1):
        x = (target + i) % n
        if llc[x] == llc[target] and available_idle_cpu(e, x) and cpu_allowed(e, th, x):
            return x
    return -1


def select_idle_sibling(e, th, prev, target):
    """select_idle_sibling(): target if idle; else prev if it shares target's LLC
    and is idle; else an idle CPU of target's LLC (select_idle_cpu); else target.
    (No SMT siblings; recent_used_cpu is not modelled.)"""
    if available_idle_cpu(e, target):
        return target
    if prev != target and cpus_share_cache(e, prev, target) and available_idle_cpu(e, prev):
        return prev
    i = select_idle_cpu(e, th, target)
    return i if i >= 0 else target


def wake_affine(e, this_cpu, prev):
    """wake_affine() without WF_SYNC: wake_affine_idle(), else wake_affine_weight()
    with loads as run-queue lengths: this CPU if (nr(this) + 1) * 100 <
    nr(prev) * (100 + (imbalance_pct - 100) / 2)."""
    if available_idle_cpu(e, this_cpu) and cpus_share_cache(e, this_cpu, prev):
        return prev if available_idle_cpu(e, prev) else this_cpu
    if available_idle_cpu(e, prev):
        return prev
    this_eff = (nr_queued(e.cpus[this_cpu]) + 1) * 100
    prev_eff = nr_queued(e.cpus[prev]) * (100 + (SD_LLC_IMBALANCE_PCT - 100) // 2)
    return this_cpu if this_eff < prev_eff else prev


def select_task_rq(e, th, waker_cpu):
    """select_task_rq() for a wake-up: its one CPU if it has one; under EEVDF
    select_task_rq_fair() (wake_affine() towards the waker's CPU, then
    select_idle_sibling()); under FIFO its previous CPU if idle, else the first
    idle CPU it may use, else the previous one.  waker_cpu < 0 (no waking thread)
    stands for the previous CPU.  A choice it may not use falls back."""
    prev = th.pcpu
    if nr_cpus_allowed(e, th) == 1:
        cpu = nth_allowed(e, th, 0)
    elif e.sched == SCHED_POLICY_EEVDF:
        cpu = prev
        if waker_cpu >= 0 and waker_cpu != prev and cpu_allowed(e, th, waker_cpu):
            cpu = wake_affine(e, waker_cpu, prev)
        cpu = select_idle_sibling(e, th, prev, cpu)
    else:
        cpu = prev
        if not (available_idle_cpu(e, prev) and cpu_allowed(e, th, prev)):
            for c in range(len(e.cpus)):
                if available_idle_cpu(e, c) and cpu_allowed(e, th, c):
                    cpu = c
                    break
    if not cpu_allowed(e, th, cpu):
        cpu = select_fallback_rq(e, th)
    return cpu


def set_task_cpu(e, th, cpu):
    """set_task_cpu(): onto another CPU, se.nr_migrations += 1."""
    if th.pcpu != cpu:
        th.pcpu = cpu
        th.nr_migrations += 1


def vcpu_pack_cpu(e, th):
    """The vCPU-pack wake placement of the host kernels kvmwake is held against
    (a vendor scheduler option, the sysctl ``kernel.sched_vcpu_pack``; not in
    upstream Linux, docs/design.md "Placement"): a vCPU thread woken by another
    vCPU thread of its VM goes to the waker's CPU when the waker is alone there
    (its only runnable thread: nr_running less the delayed-dequeue sleepers,
    1) and the wakee may run there, idle CPUs elsewhere notwithstanding.  The
    waker's CPU, or -1 where the rule does not apply."""
    w = e.waker
    if not e.vcpu_pack or e.sched != SCHED_POLICY_EEVDF or w < 0 or w == th.g:
        return -1
    wt = e.threads[w]
    if th.kind == THREAD_HOST or wt.kind == THREAD_HOST or wt.vm is not th.vm:
        return -1
    c = wt.pcpu
    cpu = e.cpus[c]
    if cpu.cur != w or not cpu_allowed(e, th, c):
        return -1
    if any(not e.threads[x].sched_delayed for x in cpu.runq):
        return -1                                   # another runnable thread waits there
    return c


def ttwu_select(e, th):
    """try_to_wake_up()'s placement: a delayed sleeper wakes where it is; another
    goes where vcpu_pack_cpu() or else select_task_rq() says, the waker being
    the thread whose event is being handled."""
    if th.on_rq or (th.aff_kind == AFF_PINNED and th.pcpu == th.g % len(e.cpus)):
        return
    cpu = vcpu_pack_cpu(e, th)
    if cpu >= 0:
        set_task_cpu(e, th, cpu)
        return
    waker_cpu = -1
    if e.waker >= 0 and e.waker != th.g:
        waker_cpu = e.threads[e.waker].pcpu
    set_task_cpu(e, th, select_task_rq(e, th, waker_cpu))



def try_to_wake_up(e, th, t):
    """try_to_wake_up() of a sleeping thread (a blocked vCPU thread, a host thread
    at its hrtimer): placed (ttwu_select), RUNNABLE, and onto its CPU
    (make_runnable: ``wake_to_run_ns`` on an idle one, drawn from its stream)."""
    th.wake_ts = t
    ttwu_select(e, th)
    if e.tl_cap:
        tl_note(e, th, t, ThreadState.RUNNABLE)
    th.state = ThreadState.RUNNABLE
    make_runnable(e, th, t, cost_ns(e, th, COST_WAKE_TO_RUN))

def detach_queued(e, th, t):
    """detach_task() -> deactivate_task() of a waiting thread: out of its CPU's
    queue; under EEVDF update_curr() there, then update_entity_lag()."""
    cpu = e.cpus[th.pcpu]
    if e.sched == SCHED_POLICY_EEVDF:
        if update_curr(e, cpu, t) and e.threads[cpu.cur].state in (_RUNNING, _RUNNABLE):
            cpu.need_resched = True
        update_entity_lag(e, cpu, th)
        cpu.sum_v -= th.vruntime - cpu.zero_v
        th.on_rq = False
    rq_remove(e, cpu, th.g)


def attach_queued(e, th, dst, t, delay):
    """attach_task() -> activate_task() on dst: set_task_cpu(), then the enqueue and
    wakeup_preempt() of a wake-up; a reschedule the source CPU asked for is then
    acted on."""
    scpu = e.cpus[th.pcpu]
    set_task_cpu(e, th, dst)
    make_runnable(e, th, t, delay)
    if scpu.need_resched and scpu.cur >= 0 and e.threads[scpu.cur].state == _RUNNING:
        resched_curr(e, e.threads[scpu.cur], t)


def task_hot(e, th, t):
    """task_hot(): it ran within sysctl_sched_migration_cost of now (FIFO: never)."""
    return e.sched == SCHED_POLICY_EEVDF and t - th.exec_start < SCHED_MIGRATION_COST_NS


def detach_one(e, src, dst, t):
    """detach_tasks() for one thread: (the first movable waiting thread of src's
    queue or None, whether every one was pinned away from dst)."""
    all_pinned = True
    for x in e.cpus[src].runq:
        th = e.threads[x]
        if not th.sched_delayed and cpu_allowed(e, th, dst):
            all_pinned = False
            if not task_hot(e, th, t):
                return th, all_pinned
    return None, all_pinned


def sched_balance_newidle(e, c, t):
    """sched_balance_newidle(): CPU c is about to go idle; sched_balance_rq() at its
    LLC domain, then at the whole host (outside c's LLC), pulls one waiting thread
    from the busiest CPU (most threads current or queued, at least 2; lowest CPU
    on a tie), skipping all-pinned CPUs for the next busiest; the pulled thread
    runs after context_switch_ns."""
    if not e.nunpinned:
        return
    llc = e.llc
    for level in (0, 1):
        cands = sorted(((nr_queued(e.cpus[x]), x) for x in range(len(e.cpus))
                        if x != c and (llc[x] == llc[c]) == (level == 0)),
                       key=lambda p: (-p[0], p[1]))
        for n, x in cands:
            if n < 2:
                break
            th, all_pinned = detach_one(e, x, c, t)
            if th is not None:
                detach_queued(e, th, t)
                attach_queued(e, th, c, t, cost_ns(e, th, COST_CONTEXT_SWITCH))
                return
            if not all_pinned:
                break


def migrate_disallowed(e, th, t):
    """After set_affinity or at a preemption point: a waiting thread on a CPU it may
    no longer use moves now (to the first CPU it may use, after wake_to_run_ns);
    a delayed sleeper there is dequeued for good."""
    cpu = e.cpus[th.pcpu]
    if cpu_allowed(e, th, th.pcpu) or cpu.cur == th.g:
        return
    if th.sched_delayed:
        finish_delayed_dequeue(e, cpu, th.g)
        return
    if th.state != _RUNNABLE:
        return
    detach_queued(e, th, t)
    attach_queued(e, th, select_fallback_rq(e, th), t, cost_ns(e, th, COST_WAKE_TO_RUN))
