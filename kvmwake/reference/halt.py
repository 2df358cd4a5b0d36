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
from .queue import push_thread
from .rng import COST_VM_ENTRY, cost_ns

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
enter = exit_to_user = release_cpu = runnable = single_task_running = tl_note = None

#: The trace's pid of thread g is PID_BASE + g.
PID_BASE = 1000

_RUNNING, _POLLING, _BLOCKED = ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED
_EV_POLL = EventClass.POLL_END
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
        push_thread(e, th, t + th.halt_poll_ns, _EV_POLL)
        return
    block(e, th, t, t)


def block(e, th, t, poll_end):
    """kvm_vcpu_block: wait on the rcuwait until kicked."""
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
