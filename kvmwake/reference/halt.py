"""reference/halt.py (twin: kvmwake/core/halt.pxi).
Mirrors: virt/kvm/kvm_main.c kvm_vcpu_halt, kvm_vcpu_block,
kvm_vcpu_check_block, grow_halt_poll_ns, shrink_halt_poll_ns,
kvm_vcpu_max_halt_poll_ns, update_halt_poll_stats.

kvm_vcpu_halt / kvm_vcpu_block (virt/kvm/kvm_main.c): the poll window, the
block on the vCPU's single-waiter rcuwait, the halt stats, the grow/shrink
rule (``kvmwake.haltpoll``, with unsigned int arithmetic), and the two
tracepoints.
"""

from __future__ import annotations

from .. import haltpoll
from ..model import (
    HALT_CPU_SUSPEND, HALT_MP_HALTED, HALT_POLL_HIST_COUNT, HALT_WFI, HALT_SUSPEND, KVM_REQUEST_MASK,
    RESUME_HALT, S_ATTEMPTED_POLL, S_BLOCKING, S_HALT_EXITS, S_POLL_FAIL_HIST, S_POLL_FAIL_NS,
    S_POLL_SUCCESS_HIST, S_POLL_SUCCESS_NS, S_SUCCESSFUL_POLL, S_WAIT_HIST, S_WAIT_NS,
    TR_HALT_POLL_NS, TR_WAKEUP, EventClass, Request, ThreadState,
)
# The latency histogram's bucket rule is stated once, in kvmwake.model.
from ..model import lat_bucket
from ..uapi import ExitReason, MpState, PsciRet, SystemEventType
from .queue import heap_push, push_thread
from .rng import COST_VM_ENTRY, cost_ns

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
enter = exit_to_user = release_cpu = runnable = single_task_running = tl_note = None

#: The trace's pid of thread g is PID_BASE + g.
PID_BASE = 1000

_RUNNING, _POLLING, _BLOCKED = ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED
_EV_POLL = EventClass.POLL_END
#: Event keys are (class << SEQ_BITS) | sequence number (the core's KW_SEQ_BITS).
SEQ_BITS = 56
_REQ_UNBLOCK_BIT = 1 << (Request.UNBLOCK & KVM_REQUEST_MASK)


def max_halt_poll_ns(e, th):
    """kvm_vcpu_max_halt_poll_ns."""
    vm = th.vm
    return vm.max_halt_poll_ns if vm.override else e.halt_poll_ns


def check_block(e, th) -> bool:
    """kvm_vcpu_check_block < 0: runnable, a signal, or KVM_REQ_UNBLOCK (consumed)."""
    if runnable(e, th) or th.sig_pending:
        return True
    if th.requests & _REQ_UNBLOCK_BIT:
        th.requests &= ~_REQ_UNBLOCK_BIT
        return True
    return False


def hist_update(st, base, ns):
    """KVM_STATS_LOG_HIST_UPDATE: bucket min(fls64(ns), 31)."""
    st[base + min(ns.bit_length(), HALT_POLL_HIST_COUNT - 1)] += 1


def grow_halt_poll_ns(e, val):
    """grow_halt_poll_ns, with the module's grow and grow_start."""
    return haltpoll.grow(val, e.halt_poll_ns_grow, e.halt_poll_ns_grow_start)


def shrink_halt_poll_ns(e, val):
    """shrink_halt_poll_ns, with the module's shrink and grow_start."""
    return haltpoll.shrink(val, e.halt_poll_ns_shrink, e.halt_poll_ns_grow_start)


def emulate_halt(e, th, t):
    """The trapped WFI or HLT.

    arm64 (kvm_handle_wfx -> kvm_vcpu_wfi; its wfi_exit_stat was counted when
    the guest executed the WFI): kvm_vcpu_halt; the MP state stays RUNNABLE and
    the WFI is complete when the halt ends, whatever ended it.
    x86 (kvm_emulate_halt -> __kvm_emulate_halt with an in-kernel LAPIC): one
    halt_exits per HLT exit, here; the vCPU becomes HALTED unless
    kvm_vcpu_has_events, and vcpu_run's loop then blocks it (vcpu_block, in
    enter()); with an event already pending it stays RUNNABLE and re-enters the
    guest without entering kvm_vcpu_halt at all: no halt stat, no
    kvm_vcpu_wakeup, halt_poll_ns unchanged.
    """
    if e.x86:
        th.stats[S_HALT_EXITS] += 1                 # ++vcpu->stat.halt_exits
        if not runnable(e, th):
            th.mp_state = MpState.HALTED
        enter(e, th, t, cost_ns(e, th, COST_VM_ENTRY))
        return
    halt(e, th, t, HALT_WFI)


def halt(e, th, t, kind):
    """kvm_vcpu_halt, up to the poll loop or the block."""
    th.halt_kind = kind
    mx = max_halt_poll_ns(e, th)
    if th.halt_poll_ns > mx:
        th.halt_poll_ns = mx
    th.do_poll = th.halt_poll_ns != 0
    th.halt_start = t
    th.resume = RESUME_HALT
    if check_block(e, th):
        th.wake_ts = t
        halt_done(e, th, t, False, t, immediate=True)
        return
    if th.do_poll and single_task_running(e, th.pcpu):
        if e.tl_cap:
            tl_note(e, th, t, _POLLING)
        th.state = _POLLING
        if lazy_polls(e):
            # The poll window's end, without an event: its time and the place its
            # POLL_END event would have had among equal times (after every event
            # queued so far, before every later one).
            th.gen += 1
            th.poll_stop = t + th.halt_poll_ns
            th.poll_seq = e.seq + 1
            e.nlazy += 1
            return
        push_thread(e, th, t + th.halt_poll_ns, _EV_POLL)
        return
    block(e, th, t, t)


# -- Lazy poll ends -------------------------------------------------------------------
# A poll loop that runs out of time (kvm_vcpu_halt: poll_end = cur >= stop) blocks
# the vCPU (kvm_vcpu_block) and frees its CPU, and nothing else: no trace record,
# no wake-up, no other CPU's state.  So when nothing can see the moment (no state
# timeline, and every thread pinned: no CPU looks at another's, nothing is pulled
# onto the freed CPU), the poll's end needs no event of its own.  halt() then
# records the window's end (poll_stop) and the place its POLL_END event would have
# had (poll_seq); whatever looks at the thread or its CPU first (a kick, a wake-up,
# a thread made runnable there, its timer, its time slice, the end of run_loop)
# calls poll_settle(), which blocks it then, at poll_stop, if the window ran out
# before the event being handled.  Enabling the timeline or unpinning a thread
# queues the POLL_END events of the windows still open (queue_lazy_polls).

def lazy_polls(e) -> bool:
    """Poll windows end without an event: no timeline and nothing unpinned."""
    return not e.tl_cap and e.nunpinned == 0


def poll_ran_out(e, th) -> bool:
    """The thread's lazy poll window ran out before the event being handled
    (e.now, e.cur_key; outside run_loop cur_key is 0, so a window ending at
    e.now is still open)."""
    return th.poll_stop < e.now or (th.poll_stop == e.now
                                    and e.cur_key >= (_EV_POLL << SEQ_BITS | th.poll_seq))


def poll_settle(e, th) -> None:
    """If thread ``th`` polls in a lazy window that ran out (poll_ran_out), the
    end of the poll loop: kvm_vcpu_block at poll_stop, as its POLL_END event
    would have done."""
    if th.poll_seq and poll_ran_out(e, th):
        block(e, th, th.poll_stop, th.poll_stop)


def settle_polls(e) -> None:
    """poll_settle() of every CPU's current thread (at the end of run_loop)."""
    if not e.nlazy:
        return
    for cpu in e.cpus:
        if cpu.cur >= 0 and e.threads[cpu.cur].poll_seq:
            poll_settle(e, e.threads[cpu.cur])


def queue_lazy_polls(e) -> None:
    """Every open lazy poll window gets its POLL_END event, in the order of the
    places they stand for (poll_seq), so that the events run as the windows
    would have ended."""
    if not e.nlazy:
        return
    open_ = sorted((e.threads[cpu.cur] for cpu in e.cpus
                    if cpu.cur >= 0 and e.threads[cpu.cur].poll_seq), key=lazy_poll_order)
    for th in open_:
        heap_push(e, th.poll_stop, _EV_POLL, th.g, th.gen)
        poll_window_closed(e, th)


def lazy_poll_order(th) -> int:
    """The order of open lazy poll windows: the places they stand for."""
    return th.poll_seq


def poll_window_closed(e, th) -> None:
    if th.poll_seq:
        e.nlazy -= 1
    th.poll_stop = 0
    th.poll_seq = 0


def block(e, th, t, poll_end):
    """kvm_vcpu_block: wait on the rcuwait until kicked."""
    poll_window_closed(e, th)
    th.poll_end = poll_end
    th.stats[S_BLOCKING] = 1
    if e.tl_cap:
        tl_note(e, th, t, _BLOCKED)
    th.state = _BLOCKED
    th.gen += 1
    release_cpu(e, th, t)


def trace_rec(e, th, t, kind, flag, a, b):
    """A tracepoint record (kvm_vcpu_wakeup, kvm_halt_poll_ns) into the trace ring."""
    if not e.tracing or not e.tr_lo <= th.g < e.tr_hi:
        return
    if len(e.trace) == e.trace.maxlen:
        e.trace_dropped += 1
    e.trace.append((t, PID_BASE + th.g, th.pcpu, kind, flag, 1, th.vcpu_id, a, b))


def halt_done(e, th, cur, waited, poll_end, immediate=False):
    """The end of kvm_vcpu_halt: stats, grow/shrink, tracepoints."""
    st = th.stats
    start = th.halt_start
    halt_ns = cur - start
    poll_window_closed(e, th)
    st[S_BLOCKING] = 0
    if waited:
        w = cur - poll_end
        st[S_WAIT_NS] += w
        hist_update(st, S_WAIT_HIST, w)
    if th.do_poll:
        poll_ns = poll_end - start
        st[S_ATTEMPTED_POLL] += 1
        if not waited:
            st[S_SUCCESSFUL_POLL] += 1
            st[S_POLL_SUCCESS_NS] += poll_ns
            hist_update(st, S_POLL_SUCCESS_HIST, poll_ns)
        else:
            st[S_POLL_FAIL_NS] += poll_ns
            hist_update(st, S_POLL_FAIL_HIST, poll_ns)
    mx = max_halt_poll_ns(e, th)
    old = th.halt_poll_ns
    if mx:
        if halt_ns <= old:
            pass
        elif old and halt_ns > mx:
            th.halt_poll_ns = shrink_halt_poll_ns(e, old)
            trace_rec(e, th, cur, TR_HALT_POLL_NS, 0, th.halt_poll_ns, old)
        elif old < mx and halt_ns < mx:
            th.halt_poll_ns = grow_halt_poll_ns(e, old)
            trace_rec(e, th, cur, TR_HALT_POLL_NS, 1, th.halt_poll_ns, old)
    else:
        th.halt_poll_ns = 0
    trace_rec(e, th, cur, TR_WAKEUP, 1 if waited else 0, halt_ns, 0)
    e.halts += 1
    entry = cost_ns(e, th, COST_VM_ENTRY)
    if e.tl_cap:
        tl_note(e, th, cur, _RUNNING)
    th.state = _RUNNING
    kind = th.halt_kind
    if kind == HALT_SUSPEND:
        # kvm_vcpu_suspend: a wake-up exits to userspace; SUSPENDED stays.
        if runnable(e, th):
            exit_to_user(e, th, cur, ExitReason.SYSTEM_EVENT, SystemEventType.WAKEUP)
            return
    else:
        if not immediate:
            e.lat_hist[lat_bucket(cur + entry - th.wake_ts)] += 1
        if kind == HALT_CPU_SUSPEND:
            th.regs[0:4] = [PsciRet.SUCCESS, 0, 0, 0]
        elif kind == HALT_MP_HALTED and runnable(e, th):
            # vcpu_block: RUNNABLE only if kvm_arch_vcpu_runnable; a signal or
            # KVM_REQ_UNBLOCK leaves the activity state alone (still HALTED).
            th.mp_state = MpState.RUNNABLE
    enter(e, th, cur, entry)
