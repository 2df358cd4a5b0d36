"""reference/guest.py (twin: kvmwake/core/guest.pxi).
Mirrors: the guest CPU itself; trapping ops are handled by KVM as
arch/arm64/kvm/handle_exit.c (kvm_handle_wfx, kvm_handle_hvc) and
arch/x86/kvm/x86.c (kvm_emulate_halt) do.

The guest program interpreter.  A thread runs ops from its pc, adding up
guest time, until an op that must act at an instant of its own (a trap, a
halt, a system register write, the end); then the segment's end goes on the
heap.  Trapping ops are carried out in KVM when the segment ends.
"""

from __future__ import annotations

from ..model import (
    ARCH_TIMER_CTRL_ENABLE, CONT_END, CONT_EOI, CONT_HALT, CONT_IRQ, CONT_NEXT, CONT_TRAP,
    HALT_WFI, IPI_RESCHEDULE, MAX_OPS_PER_INSTANT, S_HALT_EXITS, UCALL_DONE, UCALL_SYNC,
    VGIC_PRI_MASK, EventClass, Op, WakeTarget,
)
from ..uapi import ExitReason
from . import EngineError
from .queue import push_thread
from .rng import COST_IPI_SEND, COST_VM_ENTRY, COST_VM_EXIT, MAX_DRAW_NS, cost_ns, draw_ns, rng_next

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
asleep = emulate_halt = enter = eoi = exit_to_user = halt = hvc = raise_irq = route_spi = None
set_dist_enabled = set_enabled = take_irqs = timer_program = None

_EV_SEG = EventClass.SEGMENT


def segment(e, th, t, pre, guest, cont):
    """A guest segment from ``t + pre``: ``guest`` ns in the guest, then ``cont``
    (after a VM exit for a halt, a trap or the end)."""
    th.seg_gfrom = t + pre
    th.seg_gto = th.seg_gfrom + guest
    th.seg_end = th.seg_gto + (cost_ns(e, th, COST_VM_EXIT)
                               if cont in (CONT_HALT, CONT_TRAP, CONT_END) else 0)
    th.cont = cont
    push_thread(e, th, th.seg_end, _EV_SEG)


def advance(e, th, t, pre):
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
            # A segment's guest time saturates at MAX_DRAW_NS (2^62 ns), as a
            # single draw does (the core's u64 sum cannot wrap).
            guest = min(guest + draw_ns(th, dist, p0, p1), MAX_DRAW_NS)
            th.pc += 1
        elif code == Op.WFI:
            if not e.x86:
                # kvm_handle_wfx's wfi_exit_stat (x86's halt_exits is counted by
                # kvm_emulate_halt, at the exit: emulate_halt).
                th.stats[S_HALT_EXITS] += 1
            th.pc += 1
            segment(e, th, t, pre, guest, CONT_HALT)
            break
        elif code == Op.LOOP:
            th.loops[arg] = p0
            th.pc += 1
        elif code == Op.ENDLOOP:
            if p0 == 0:
                th.pc = arg + 1
            else:
                # The counter is a u32, as in the core: one whose LOOP op never ran
                # (a PC set into the body) wraps from 0 to 2^32 - 1.
                th.loops[p1] = (th.loops[p1] - 1) & 0xFFFF_FFFF
                th.pc = arg + 1 if th.loops[p1] > 0 else th.pc + 1
            if guest and th.pc == arg + 1:
                # A loop back-edge after guest time ends the segment.
                segment(e, th, t, pre, guest, CONT_NEXT)
                break
        elif code == Op.END:
            segment(e, th, t, pre, guest, CONT_END)
            break
        elif (code >= Op.SET_PMR and code <= Op.TIMER_CANCEL) or code == Op.SET_REG:
            # A system register or PSTATE write: it acts at its instant.
            if pre or guest:
                segment(e, th, t, pre, guest, CONT_NEXT)
                break
            th.pc += 1
            instant_op(e, th, t, code, dist, arg, p0, p1)
            if not sti_shadow(e, th, code) and take_irqs(e, th, t, 0):
                break
        else:
            # SGI and the GIC register writes trap; done at the trap.
            segment(e, th, t, pre, guest, CONT_TRAP)
            break
    if t == th.stall_t:
        th.stall_n += n
        if th.stall_n > MAX_OPS_PER_INSTANT:
            raise EngineError(
                f"vCPU {th.vcpu_id} of VM {th.vm.index} makes no progress: its program "
                f"ran {th.stall_n} ops at t={t} ns without virtual time passing")
    else:
        th.stall_t, th.stall_n = t, n


def sti_shadow(e, th, code) -> bool:
    """x86 ``sti; hlt``: STI blocks interrupts until after the next instruction
    (the interrupt shadow), so an interrupt pending at an unmask that the HLT
    follows is not taken before the HLT: the HLT exits (halt_exits), and
    __kvm_emulate_halt finds the event (kvm_skip_emulated_instruction has
    ended the shadow) and re-enters the guest, which takes it then."""
    return (e.x86 and code == Op.UNMASK and th.pc < len(th.prog)
            and th.prog[th.pc][0] == Op.WFI)


def trap_op(e, th, t):
    """A trapping op, carried out in KVM after the exit; then the entry."""
    code, dist, arg, p0, p1 = th.prog[th.pc]
    th.pc += 1
    vm = th.vm
    ipi = False
    if code == Op.HVC:
        hvc(e, th, t)
        return
    if code == Op.SYNC:
        value = th.regs[arg] if arg < 4 else p0
        exit_to_user(e, th, t, ExitReason.MMIO, ucall=UCALL_SYNC, value=value)
        return
    if code == Op.SGI:
        irq = e.resched_irq if arg == IPI_RESCHEDULE else arg
        threads, first, n = e.threads, vm.first, vm.nr_vcpus
        if dist == WakeTarget.VCPU:
            ipi |= raise_irq(e, threads[first + p0], irq, t)
        elif dist == WakeTarget.NEXT:
            ipi |= raise_irq(e, threads[first + (th.vcpu_id + 1) % n], irq, t)
        elif dist == WakeTarget.RANDOM_OTHER:
            r = rng_next(th) % (n - 1)
            ipi |= raise_irq(e, threads[first + (r if r < th.vcpu_id else r + 1)], irq, t)
        elif dist == WakeTarget.LIST:
            # vCPUs p1 + i for every bit i of the mask p0, lowest first.
            while p0:
                vid = p1 + (p0 & -p0).bit_length() - 1
                ipi |= raise_irq(e, threads[first + vid], irq, t)
                p0 &= p0 - 1
        else:
            for vid in range(n):
                if vid != th.vcpu_id:
                    ipi |= raise_irq(e, threads[first + vid], irq, t)
    elif code == Op.IRQ_ENABLE:
        set_enabled(e, vm, th, arg, True, t)
    elif code == Op.IRQ_DISABLE:
        set_enabled(e, vm, th, arg, False, t)
    elif code == Op.SET_PRIORITY:
        prio = p0 & VGIC_PRI_MASK
        if arg < 32:
            th.priv_prio[arg] = prio
        else:
            vm.spi_prio[arg] = prio
    elif code == Op.DIST_ENABLE:
        set_dist_enabled(e, vm.index, bool(p0), t)
    else:  # Op.ROUTE_SPI
        route_spi(e, vm.index, arg, p0, t)
    pre = cost_ns(e, th, COST_VM_ENTRY)
    if ipi:
        pre += cost_ns(e, th, COST_IPI_SEND)
    enter(e, th, t, pre)


def instant_op(e, th, t, code, dist, arg, p0, p1):
    """A system register or PSTATE write, at its instant."""
    if code == Op.SET_PMR:
        if e.x86:
            th.tpr = p0
        else:
            th.pmr = p0 & VGIC_PRI_MASK
    elif code == Op.MASK:
        th.masked = True
    elif code == Op.UNMASK:
        th.masked = False
    elif code == Op.SET_HANDLER:
        th.handler_ns = p0
        th.handler_noiret = arg
    elif code == Op.TIMER_ARM:
        th.timer_cval = t + draw_ns(th, dist, p0, p1)
        th.timer_period = arg
        th.timer_ctl = ARCH_TIMER_CTRL_ENABLE
        timer_program(e, th, t)
    elif code == Op.TIMER_CANCEL:
        th.timer_ctl &= ~ARCH_TIMER_CTRL_ENABLE
        timer_program(e, th, t)
    else:  # Op.SET_REG
        th.regs[arg] = p0


def resume_program(e, th, t):
    """After interrupt handling: the interrupted segment, or the next op."""
    if th.sv_valid:
        th.sv_valid = False
        segment(e, th, t, 0, th.sv_guest, th.sv_cont)
    else:
        advance(e, th, t, 0)


def interrupt_segment(e, th, base, cost):
    """Stop the current segment at ``base``: take interrupts ``cost`` ns later.

    What was left of its guest part, and its continuation, resume after.
    """
    th.sv_guest = th.seg_gto - base
    th.sv_cont = th.cont
    th.sv_valid = True
    th.seg_gfrom = th.seg_gto = th.seg_end = base + cost
    th.cont = CONT_IRQ
    push_thread(e, th, th.seg_end, _EV_SEG)


def segment_end(e, th, t):
    cont = th.cont
    if cont == CONT_HALT:
        emulate_halt(e, th, t)
    elif cont == CONT_TRAP:
        trap_op(e, th, t)
    elif cont == CONT_END:
        exit_to_user(e, th, t, ExitReason.MMIO, ucall=UCALL_DONE)  # the selftests' GUEST_DONE
    elif cont == CONT_IRQ:
        # Out of the guest for the IPI: a trip round KVM_RUN's loop.
        enter(e, th, t, 0)
    elif cont == CONT_EOI:
        eoi(e, th, th.cur_irq, t)
        th.cur_irq = -1
        if th.handler_noiret:
            th.masked = True                  # no iret: IF stays 0 until the next unmask
        if th.sig_pending or asleep(e, th):
            # A kick during the handler IPI'd the vCPU out (kick() added the exit
            # and entry to the handler's time); KVM_RUN's loop has work to do
            # before the guest continues: a signal, a power-off.
            enter(e, th, t, 0)
        elif not take_irqs(e, th, t, 0):
            resume_program(e, th, t)
    else:
        advance(e, th, t, 0)
