"""reference/hostthread.py (twin: kvmwake/core/hostthread.pxi).
Mirrors: a user or kernel thread of the host that is not a vCPU: its CPU
bursts, hrtimer_nanosleep (kernel/time/hrtimer.c: do_nanosleep -> schedule();
hrtimer_wakeup -> wake_up_process -> try_to_wake_up), the injection an irqfd
write makes in the writer's context (virt/kvm/eventfd.c irqfd_wakeup ->
kvm_arch_set_irq_inatomic: x86 kvm_msi_to_lapic_irq -> kvm_irq_delivery_to_apic_fast
-> kvm_apic_set_irq -> kvm_vcpu_kick; arm64 vgic_irqfd_set_irq ->
kvm_vgic_inject_irq, level 1), and do_exit.

A host thread is an entry of the thread table of kind THREAD_HOST: the host
scheduler (host.py) runs it exactly as it runs a vCPU thread, on the same run
queues.  It runs a host program (model.HostOp); it never enters a guest, has
no halt stats, and its stats row holds its own counters (model.HS_*).
"""

from __future__ import annotations

from ..model import (
    CONT_NEXT, HS_NR_INJECTS, HS_NR_PREEMPTED, HS_NR_RUNS, HS_NR_SLEEPS, HS_RUN_NS,
    HS_SLEEP_NS, HS_WAIT_NS, MAX_OPS_PER_INSTANT, MAX_TIME, RESUME_SEGMENT, RESUME_START,
    EventClass, HostOp, ThreadState,
)
from . import EngineError
from .queue import heap_push, push_thread
from .rng import COST_IPI_SEND, cost_ns, draw_ns

# Functions of other pieces (set by engine._link_pieces as the package loads).
apic_set_irq = inject = release_cpu = tl_note = try_to_wake_up = None

_USER, _BLOCKED = ThreadState.USER, ThreadState.BLOCKED
_EV_SEG, _EV_TIMER = EventClass.SEGMENT, EventClass.TIMER


def ht_segment(e, th, t, d):
    """A CPU burst of d ns from t: a segment without guest mode (preempted, it
    keeps its rest as a vCPU's segment does, without an exit and entry)."""
    th.seg_end = t + d
    th.seg_gfrom = th.seg_end
    th.seg_gto = th.seg_end
    th.cont = CONT_NEXT
    push_thread(e, th, th.seg_end, _EV_SEG)


def ht_off_cpu(e, th, t):
    """Its time on the CPU (sum_exec_runtime) up to t, when it leaves the CPU."""
    th.stats[HS_RUN_NS] += t - th.run_start


def ht_sleep(e, th, t, d):
    """hrtimer_nanosleep: the hrtimer is armed for t + d, the thread blocks
    (schedule(): dequeued, the CPU goes to the next thread)."""
    ht_off_cpu(e, th, t)
    th.stats[HS_NR_SLEEPS] += 1
    th.halt_start = t
    if e.tl_cap:
        tl_note(e, th, t, _BLOCKED)
    th.state = _BLOCKED
    th.resume = RESUME_START
    th.gen += 1
    th.timer_gen += 1
    heap_push(e, t + d, _EV_TIMER, th.g, th.timer_gen)
    release_cpu(e, th, t)


def ht_wake(e, th, t):
    """hrtimer_wakeup -> wake_up_process -> try_to_wake_up, the scheduler's
    normal wake-up path, placement (select_task_rq) included (``wake_to_run_ns`` on
    an idle CPU, as for a vCPU)."""
    th.stats[HS_SLEEP_NS] += t - th.halt_start
    try_to_wake_up(e, th, t)


def ht_exit(e, th, t):
    """do_exit: the program ended; the thread leaves its CPU for good."""
    ht_off_cpu(e, th, t)
    if e.tl_cap:
        tl_note(e, th, t, _USER)
    th.state = _USER
    th.resume = RESUME_START
    th.gen += 1
    release_cpu(e, th, t)


def ht_inject(e, op, t) -> bool:
    """The injection of an irqfd write, made by this thread in its own context
    (irqfd_wakeup -> kvm_arch_set_irq_inatomic): x86 an MSI, kvm_apic_set_irq
    (IRR, KVM_REQ_EVENT, kvm_vcpu_kick), as KVM_SIGNAL_MSI; arm64 the SPI's line
    raised (vgic_irqfd_set_irq with level 1, never lowered: an edge SPI latches,
    a level one stays asserted), as a device source does.  True if the kick
    IPI'd a vCPU in guest mode."""
    _code, _dist, arg, p0, p1 = op
    vm = e.vms[p0]
    if e.x86:
        return apic_set_irq(e, e.threads[vm.first + p1], arg, t)
    return inject(e, vm, None, arg, True, t)


def ht_run(e, th, t):
    """The host program from th.pc on, at t, the thread on its CPU: ops act at
    once until one takes time (a burst, a sleep, an IPI's cost) or it ends."""
    ops = th.prog
    if t == th.stall_t:
        n = th.stall_n
    else:
        n = 0
        th.stall_t = t
    while True:
        n += 1
        if n > MAX_OPS_PER_INSTANT:
            raise EngineError(
                f"host thread {th.vcpu_id} (thread {th.g}) makes no progress: its program "
                f"ran {n} ops at t={t} ns without virtual time passing")
        th.stall_n = n
        op = ops[th.pc]
        code, dist, arg, p0, p1 = op
        if code == HostOp.COMPUTE:
            d = draw_ns(th, dist, p0, p1)
            th.pc += 1
            if d:
                ht_segment(e, th, t, d)
                return
        elif code == HostOp.SLEEP:
            d = draw_ns(th, dist, p0, p1)
            th.pc += 1
            if d:
                ht_sleep(e, th, t, d)
                return
        elif code == HostOp.SLEEP_UNTIL:
            # clock_nanosleep(TIMER_ABSTIME): the deadline (kept in exit_time) moves
            # on by the draw, at most to MAX_TIME; a deadline already past: no sleep.
            d = draw_ns(th, dist, p0, p1)
            th.pc += 1
            th.exit_time = min(th.exit_time + d, MAX_TIME)
            if th.exit_time > t:
                ht_sleep(e, th, t, th.exit_time - t)
                return
        elif code in (HostOp.MSI, HostOp.IRQ):
            th.pc += 1
            th.stats[HS_NR_INJECTS] += 1
            if ht_inject(e, op, t):
                # The kick's IPI to a vCPU in guest mode costs the sender.
                cost = cost_ns(e, th, COST_IPI_SEND)
                if cost:
                    ht_segment(e, th, t, cost)
                    return
        elif code == HostOp.LOOP:
            th.loops[arg] = p0
            th.pc += 1
        elif code == HostOp.ENDLOOP:
            if p0 == 0:
                th.pc = arg + 1
            else:
                th.loops[p1] = (th.loops[p1] - 1) & 0xFFFF_FFFF
                th.pc = arg + 1 if th.loops[p1] > 0 else th.pc + 1
        else:
            ht_exit(e, th, t)
            return


def ht_got_cpu(e, th, t):
    """The host thread has its CPU (got_cpu, after the scheduler's part): its wait
    ends; it goes on with a preempted burst, or with its program."""
    th.stats[HS_WAIT_NS] += t - th.wake_ts
    th.stats[HS_NR_RUNS] += 1
    if th.resume == RESUME_SEGMENT:
        th.resume = RESUME_START
        ht_segment(e, th, t, th.rem_end)
        return
    ht_run(e, th, t)


def ht_preempted(e, th, t):
    """A running host thread is preempted at t (preempt_segment): off its CPU,
    runnable (waiting) from t."""
    ht_off_cpu(e, th, t)
    th.stats[HS_NR_PREEMPTED] += 1
    th.wake_ts = t
