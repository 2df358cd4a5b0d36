"""reference/kick.py (twin: kvmwake/core/kick.pxi).
Mirrors: virt/kvm/kvm_main.c kvm_vcpu_wake_up, kvm_vcpu_kick,
kvm_make_request, kvm_make_all_cpus_request.

Kicks and requests: kvm_vcpu_wake_up, kvm_vcpu_kick, kvm_make_request
(virt/kvm/kvm_main.c); a VM's periodic tick and device interrupt sources.
"""

from __future__ import annotations

from ..model import (
    CONT_EOI, CONT_IRQ, CONT_NEXT, RESUME_HALT, S_WAKEUP, Dist, EventClass, SourceKind, ThreadState,
)
from .queue import heap_push, push_thread
from .rng import COST_VM_ENTRY, COST_VM_EXIT, cost_ns, draw_ns

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
apic_set_irq = check_block = halt_done = inject = interrupt_segment = raise_irq = None
poll_settle = try_to_wake_up = None

_RUNNING, _POLLING, _BLOCKED = ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED
_EV_SEG, _EV_SOURCE = EventClass.SEGMENT, EventClass.SOURCE


def wake_up(e, th, t) -> bool:
    """kvm_vcpu_wake_up: True if a task was waiting on the vCPU's rcuwait."""
    poll_settle(e, th)
    if th.state != _BLOCKED:
        return False
    th.stats[S_WAKEUP] += 1
    try_to_wake_up(e, th, t)
    return True


def signal_wake(e, th, t) -> bool:
    """signal_wake_up: the signal code, not kvm_vcpu_wake_up, wakes a blocked or
    sleeping vCPU thread (so halt_wakeup does not count it); a polling one sees
    signal_pending(); one in guest mode is IPI'd out (kick_process)."""
    poll_settle(e, th)
    if th.state == _BLOCKED:
        try_to_wake_up(e, th, t)
        return False
    return kick(e, th, t, False)


def kick(e, th, t, wake=True) -> bool:
    """kvm_vcpu_kick (``wake=False``: a NO_WAKEUP request).  True if it sent an IPI."""
    poll_settle(e, th)
    if wake and wake_up(e, th, t):
        return False
    if th.state == _POLLING:
        # Not a waiter yet: the poll loop sees the condition itself.
        if check_block(e, th):
            th.gen += 1                       # cancel the poll-end event (if queued)
            th.wake_ts = t
            halt_done(e, th, t, False, t)
        return False
    if th.state == _RUNNING and (t < th.seg_gto or (t == th.seg_gto and th.cont == CONT_NEXT)):
        # (At the very end of a guest-only segment the vCPU is still in guest
        # mode: the boundary is the model's, not an exit.  Its end event is still
        # due at t, so it is interrupted here, not left to run on with the kick
        # (a signal, a request, an interrupt) unseen.)
        cont = th.cont
        if cont == CONT_IRQ:
            return False                      # on its way to take interrupts
        if cont == CONT_EOI:
            if t < th.seg_gfrom:
                return False
            # In a handler (masked): the IPI costs an exit and an entry.
            extra = cost_ns(e, th, COST_VM_EXIT)
            extra += cost_ns(e, th, COST_VM_ENTRY)
            th.seg_gto += extra
            th.seg_end += extra
            push_thread(e, th, th.seg_end, _EV_SEG)
            return True
        if t < th.seg_gfrom:
            # On its way into the guest: seen at entry.
            interrupt_segment(e, th, th.seg_gfrom, 0)
            return False
        # IN_GUEST_MODE: IPI; the vCPU exits and re-enters.
        extra = cost_ns(e, th, COST_VM_EXIT)
        extra += cost_ns(e, th, COST_VM_ENTRY)
        interrupt_segment(e, th, t, extra)
        return True
    return False


def tick(e, vm, t):
    """A VM's periodic tick: every halted vCPU gets the tick interrupt."""
    threads = e.threads
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        th = threads[g]
        if th.state == _POLLING or (th.state == _BLOCKED and th.resume == RESUME_HALT):
            raise_irq(e, th, e.tick_irq, t)


def source_draw(s) -> int:
    """An exponential inter-arrival time from the source's stream (at least 1 ns)."""
    return max(1, draw_ns(s, Dist.EXPONENTIAL, s.p0, 0))


def source_fire(e, s, t):
    """A device interrupt: an edge on the SPI (arm64) or an MSI (x86); the next one
    goes on the heap."""
    if e.x86:
        apic_set_irq(e, e.threads[s.target], s.intid, t)   # an MSI to one LAPIC
    else:
        inject(e, e.vms[s.vm], None, s.intid, True, t)     # an edge on the SPI
    if s.kind == SourceKind.PERIODIC:
        nxt = t + s.p0
    elif s.kind == SourceKind.POISSON:
        nxt = t + source_draw(s)
    else:
        s.idx += 1
        if s.idx >= len(s.times):
            return
        nxt = max(t, s.times[s.idx])
    heap_push(e, nxt, _EV_SOURCE, s.index, s.gen)
