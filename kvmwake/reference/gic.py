"""reference/gic.py (twin: kvmwake/core/gic.pxi).
Mirrors: arch/arm64/kvm/vgic/vgic.c vgic_queue_irq_unlock,
vgic_target_oracle, kvm_vgic_vcpu_pending_irq; vgic-mmio.c;
arch/x86/kvm/lapic.c kvm_apic_has_interrupt, kvm_apic_set_irq.

The interrupt controllers: the arm64 vGICv3 subset (arch/arm64/kvm/vgic/)
and the x86 LAPIC subset (arch/x86/kvm/lapic.c), and the guest side that
acknowledges and ends interrupts.  Pending state is kept in Python ints
used as bit sets: each vCPU's ``ap`` holds the pending INTIDs queued on it
(its ap_list).

``th`` is the vCPU a private INTID (< 32) belongs to; it is None where only
SPIs can be meant.
"""

from __future__ import annotations

from ..model import CONT_EOI, KVM_REQUEST_MASK, MAX_TAKES_PER_INSTANT, VTIMER_IRQ
# The IROUTER affinity rule is stated once, in kvmwake.model.
from ..model import vcpu_of_mpidr
from ..uapi import MpState
from . import EngineError

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
kick = segment = timer_ack = None

_PRIV_MASK = 0xFFFF_FFFF


def pending_bit(e, vm, th, b):
    if b < 32:
        return (th.priv_latch | th.priv_line) >> b & 1
    return (vm.spi_latch | vm.spi_line) >> b & 1


def owner_of(e, vm, th, b):
    """The vCPU whose ap_list holds INTID b: its own for private, the route for SPIs."""
    if b < 32:
        return th
    tgt = vm.spi_target[b]
    return e.threads[vm.first + tgt] if tgt >= 0 else None


def refresh(e, vm, th, b):
    """Put INTID b's pending bit into its owner's pending set (its ap_list).

    While the distributor is disabled a newly pending interrupt is not queued:
    vgic_target_oracle returns NULL for it, and vgic_queue_irq_unlock leaves
    it on no ap_list (one queued before stays until pruned, prune_ap_list).
    """
    owner = owner_of(e, vm, th, b)
    if owner is None:
        return
    if pending_bit(e, vm, th, b):
        if vm.gic_enabled:
            owner.ap |= 1 << b
    else:
        owner.ap &= ~(1 << b)


def prune_ap_list(e, th):
    """vgic_prune_ap_list with the distributor disabled: every interrupt whose
    vgic_target_oracle is now NULL (all but the active ones) leaves the ap_list.
    Run at each guest entry of an arm64 vCPU (the kernel prunes at each exit)."""
    vm = th.vm
    if vm.gic_enabled:
        return
    th.ap &= (vm.spi_act & ~_PRIV_MASK) | th.priv_act


def irq_enabled(e, vm, th, b):
    return (th.priv_en >> b & 1) if b < 32 else (vm.spi_en >> b & 1)


def irq_active(e, vm, th, b):
    return (th.priv_act >> b & 1) if b < 32 else (vm.spi_act >> b & 1)


def oracle(e, vm, th, b):
    """vgic_target_oracle: the vCPU to queue INTID b on, or None."""
    owner = owner_of(e, vm, th, b)
    if owner is None:
        return None
    if irq_active(e, vm, th, b):
        return owner
    if irq_enabled(e, vm, th, b) and pending_bit(e, vm, th, b) and vm.gic_enabled:
        return owner
    return None


def queue_irq(e, vm, th, b, t) -> bool:
    """vgic_queue_irq_unlock: onto the oracle's vCPU's ap_list, request + kick.
    True if an IPI went."""
    tgt = oracle(e, vm, th, b)
    if tgt is None:
        return False
    if pending_bit(e, vm, th, b):
        tgt.ap |= 1 << b
    tgt.requests |= 1 << (e.inject_req & KVM_REQUEST_MASK)
    return kick(e, tgt, t)


def inject(e, vm, th, b, level, t) -> bool:
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
    refresh(e, vm, th, b)
    return queue_irq(e, vm, th, b, t)


def prio_of(th, vm, b):
    return th.priv_prio[b] if b < 32 else vm.spi_prio[b]


def gic_pending(e, th) -> bool:
    """kvm_vgic_vcpu_pending_irq: pending, enabled, not active, priority < PMR."""
    vm = th.vm
    if not vm.gic_enabled:
        return False
    en = (vm.spi_en & ~_PRIV_MASK) | th.priv_en
    act = (vm.spi_act & ~_PRIV_MASK) | th.priv_act
    cand = th.ap & en & ~act
    while cand:
        b = (cand & -cand).bit_length() - 1
        if prio_of(th, vm, b) < th.pmr:
            return True
        cand &= cand - 1
    return False


def gic_best(e, th) -> int:
    """The interrupt the guest acknowledges: highest priority (lowest value), then INTID."""
    vm = th.vm
    if th.masked or not vm.gic_enabled:
        return -1
    en = (vm.spi_en & ~_PRIV_MASK) | th.priv_en
    act = (vm.spi_act & ~_PRIV_MASK) | th.priv_act
    cand = th.ap & en & ~act
    best, best_prio = -1, th.pmr
    while cand:
        b = (cand & -cand).bit_length() - 1
        prio = prio_of(th, vm, b)
        if prio < best_prio:
            best, best_prio = b, prio
        cand &= cand - 1
    return best


def set_enabled(e, vm, th, b, on, t):
    """GICD_ISENABLER / ICENABLER (GICR_ for a private INTID): enabling queues it."""
    bit = 1 << b
    if b < 32:
        th.priv_en = th.priv_en | bit if on else th.priv_en & ~bit
    else:
        vm.spi_en = vm.spi_en | bit if on else vm.spi_en & ~bit
    if on:
        queue_irq(e, vm, th, b, t)


def set_dist_enabled(e, vm_index, on, t):
    """GICD_CTLR written by the guest (vgic_mmio_write_v3_misc): enabling the
    distributor kicks every vCPU with something queued on its ap_list
    (vgic_kick_vcpus), not the interrupts that became pending while it was
    disabled: those were never queued (vgic_target_oracle returned NULL)."""
    vm = e.vms[vm_index]
    was = vm.gic_enabled
    vm.gic_enabled = on
    if on and not was:
        # vgic_kick_vcpus
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            th = e.threads[g]
            if gic_pending(e, th):
                th.requests |= 1 << (e.inject_req & KVM_REQUEST_MASK)
                kick(e, th, t)


def uaccess_write_pending(e, vm, th, b, on, t):
    """GICD_ISPENDR / GICR_ISPENDR0 written by userspace (vgic_v3_uaccess_write_pending):
    the latch is written whole, 1 sets it and queues (vgic_queue_irq_unlock), 0
    clears it; no physical side effects.  True if an IPI went."""
    bit = 1 << b
    if b < 32:
        th.priv_latch = th.priv_latch | bit if on else th.priv_latch & ~bit
    else:
        vm.spi_latch = vm.spi_latch | bit if on else vm.spi_latch & ~bit
    refresh(e, vm, th, b)
    if on:
        return queue_irq(e, vm, th, b, t)
    return False


def uaccess_write_active(e, vm, th, b, on, t):
    """GICD_ISACTIVER / ICACTIVER written by userspace (vgic_mmio_uaccess_write_sactive /
    cactive -> vgic_mmio_change_active): no guest halt; an interrupt made active
    is queued (vgic_queue_irq_unlock).  True if an IPI went."""
    bit = 1 << b
    if b < 32:
        th.priv_act = th.priv_act | bit if on else th.priv_act & ~bit
    else:
        vm.spi_act = vm.spi_act | bit if on else vm.spi_act & ~bit
    if on:
        return queue_irq(e, vm, th, b, t)
    return False


def uaccess_write_dist_ctlr(e, vm_index, on):
    """GICD_CTLR written by userspace (vgic_mmio_uaccess_write_v3_misc): the enable
    bit only; no vgic_kick_vcpus."""
    e.vms[vm_index].gic_enabled = bool(on)


def route_spi(e, vm_index, b, mpidr, t):
    """GICD_IROUTER: Aff2.Aff1.Aff0 names the target; no match, no delivery."""
    vm = e.vms[vm_index]
    old = vm.spi_target[b]
    if old >= 0:
        e.threads[vm.first + old].ap &= ~(1 << b)
    vm.spi_mpidr[b] = mpidr & 0xFFFFFF
    vm.spi_target[b] = vcpu_of_mpidr(mpidr, vm.nr_vcpus)
    refresh(e, vm, None, b)
    queue_irq(e, vm, None, b, t)


# -- x86 LAPIC subset -------------------------------------------------------------

def fls256(v):
    """The highest set bit of a 256-bit vector set, or -1."""
    return v.bit_length() - 1


def apic_has_interrupt(th) -> int:
    """kvm_apic_has_interrupt: the highest IRR vector above the PPR, or -1."""
    v = fls256(th.irr)
    if v < 0:
        return -1
    isrv = fls256(th.isr)
    if isrv < 0:
        isrv = 0
    ppr = th.tpr if (th.tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
    return v if (v & 0xF0) > ppr else -1


def apic_set_irq(e, th, vec, t) -> bool:
    """__apic_accept_irq (fixed delivery): IRR, KVM_REQ_EVENT, kick."""
    th.irr |= 1 << vec
    th.requests |= 1 << (e.inject_req & KVM_REQUEST_MASK)
    return kick(e, th, t)


# -- either arch --------------------------------------------------------------------

def runnable(e, th) -> bool:
    """kvm_arch_vcpu_runnable (arm64: an interrupt pending and not STOPPED) /
    kvm_vcpu_has_events (x86, IF=1 needed)."""
    if e.x86:
        return not th.masked and apic_has_interrupt(th) >= 0
    return th.mp_state != MpState.STOPPED and gic_pending(e, th)


def best_irq(e, th) -> int:
    if e.x86:
        return -1 if th.masked else apic_has_interrupt(th)
    return gic_best(e, th)


def raise_irq(e, th, irq, t) -> bool:
    """An SGI / IPI or tick arriving at vCPU ``th``: edge, the arch's way."""
    if e.x86:
        return apic_set_irq(e, th, irq, t)
    return inject(e, th.vm, th, irq, True, t)


def ack(e, th, b, t):
    """The guest acknowledges ``b`` (ICC_IAR1_EL1 / the LAPIC's INTA)."""
    if e.x86:
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
            timer_ack(e, th, t)
    else:
        vm.spi_act |= bit
        vm.spi_latch &= ~bit
        # The driver's handler silences its device: the line drops.
        vm.spi_line &= ~bit
    refresh(e, vm, th, b)


def eoi(e, th, b, t):
    """End of interrupt: priority drop and deactivation (ICC_EOIR1_EL1 / EOI).

    An SPI that is pending again and was re-routed to another vCPU while it
    was active is queued there and that vCPU kicked, as vgic_prune_ap_list
    does when it migrates the interrupt (at this vCPU's next exit).
    """
    if e.x86:
        th.isr &= ~(1 << b)
    elif b < 32:
        th.priv_act &= ~(1 << b)
    else:
        vm = th.vm
        vm.spi_act &= ~(1 << b)
        if owner_of(e, vm, th, b) is not th:
            queue_irq(e, vm, th, b, t)


def take_irqs(e, th, t, pre) -> bool:
    """The guest takes its interrupts at ``t + pre``.

    With a handler time, acknowledges the best one and schedules its EOI;
    returns True.  With none, acknowledges and ends every deliverable one
    at once and returns False (the program goes on).
    """
    n = 0
    while True:
        b = best_irq(e, th)
        if b < 0:
            return False
        ack(e, th, b, t)
        if th.handler_ns:
            th.cur_irq = b
            segment(e, th, t, pre, th.handler_ns, CONT_EOI)
            return True
        eoi(e, th, b, t)
        if th.handler_noiret:
            th.masked = True                  # no iret: IF stays 0 until the next unmask
        n += 1
        if n > MAX_TAKES_PER_INSTANT:
            raise EngineError(f"vCPU {th.vcpu_id} of VM {th.vm.index}: interrupt storm "
                              f"({n} interrupts taken at t={t} ns)")
