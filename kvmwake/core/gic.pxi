# core/gic.pxi (twin: kvmwake/reference/gic.py).
# Mirrors: arch/arm64/kvm/vgic/vgic.c vgic_queue_irq_unlock,
# vgic_target_oracle, kvm_vgic_vcpu_pending_irq; vgic-mmio.c;
# arch/x86/kvm/lapic.c kvm_apic_has_interrupt, kvm_apic_set_irq.
#
# The interrupt controllers: the arm64 vGICv3 subset (arch/arm64/kvm/vgic/)
# and the x86 LAPIC subset (arch/x86/kvm/lapic.c), and the guest side that
# acknowledges and ends interrupts.  Pending state is kept in 64-bit words:
# each vCPU's ``ap`` words hold the pending INTIDs queued on it (its
# ap_list), so the wake-condition scan is a handful of word operations.
#
# ``gp`` is the global index of the vCPU a private INTID (< 32) belongs to;
# it is -1 where only SPIs can be meant.


cdef inline bint pending_bit(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b) noexcept nogil:
    cdef virq_t* q
    cdef gic_t* gic
    if b < 32:
        q = &e.irq[gp]
        return ((q.priv_latch | q.priv_line) >> b) & 1
    gic = &e.gic[vmi]
    return ((gic.spi_latch[b >> 6] | gic.spi_line[b >> 6]) >> (b & 63)) & 1


cdef inline int64_t owner_of(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b) noexcept nogil:
    """The vCPU whose ap_list holds INTID b: its own for private, the route for SPIs."""
    cdef int32_t tgt
    if b < 32:
        return gp
    tgt = e.gic[vmi].spi_target[b]
    return <int64_t>e.vms[vmi].first + tgt if tgt >= 0 else -1


cdef inline void refresh(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b) noexcept nogil:
    """Put INTID b's pending bit into its owner's pending set (its ap_list).

    While the distributor is disabled a newly pending interrupt is not queued:
    vgic_target_oracle returns NULL for it, and vgic_queue_irq_unlock leaves
    it on no ap_list (one queued before stays until pruned, prune_ap_list).
    """
    cdef int64_t o = owner_of(e, gp, vmi, b)
    cdef uint64_t bit = (<uint64_t>1) << (b & 63)
    if o < 0:
        return
    if pending_bit(e, gp, vmi, b):
        if e.gic[vmi].enabled:
            e.irq[o].ap[b >> 6] |= bit
    else:
        e.irq[o].ap[b >> 6] &= ~bit


cdef void prune_ap_list(engine_t* e, uint32_t g) noexcept nogil:
    """vgic_prune_ap_list with the distributor disabled: every interrupt whose
    vgic_target_oracle is now NULL (all but the active ones) leaves the ap_list.
    Run at each guest entry of an arm64 vCPU (the kernel prunes at each exit)."""
    cdef virq_t* q = &e.irq[g]
    cdef gic_t* gic = &e.gic[e.th[g].vm]
    cdef uint32_t w
    if gic.enabled:
        return
    q.ap[0] &= (gic.spi_act[0] & <uint64_t>0xFFFFFFFF00000000) | q.priv_act
    for w in range(1, 16):
        q.ap[w] &= gic.spi_act[w]


cdef inline bint irq_enabled(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b) noexcept nogil:
    if b < 32:
        return (e.irq[gp].priv_en >> b) & 1
    return (e.gic[vmi].spi_en[b >> 6] >> (b & 63)) & 1


cdef inline bint irq_active(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b) noexcept nogil:
    if b < 32:
        return (e.irq[gp].priv_act >> b) & 1
    return (e.gic[vmi].spi_act[b >> 6] >> (b & 63)) & 1


cdef inline int64_t oracle(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b) noexcept nogil:
    """vgic_target_oracle: the vCPU to queue INTID b on, or -1."""
    cdef int64_t o = owner_of(e, gp, vmi, b)
    if o < 0:
        return -1
    if irq_active(e, gp, vmi, b):
        return o
    if irq_enabled(e, gp, vmi, b) and pending_bit(e, gp, vmi, b) and e.gic[vmi].enabled:
        return o
    return -1


cdef inline int queue_irq(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b,
                          uint64_t t) noexcept nogil:
    """vgic_queue_irq_unlock: onto the oracle's vCPU's ap_list, request + kick.
    1 if an IPI went."""
    cdef int64_t tgt = oracle(e, gp, vmi, b)
    if tgt < 0:
        return 0
    if pending_bit(e, gp, vmi, b):
        e.irq[tgt].ap[b >> 6] |= (<uint64_t>1) << (b & 63)
    e.th[tgt].requests |= e.inject_req_bit
    return kick(e, <uint32_t>tgt, t, 1)


cdef int inject(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b, bint level,
                uint64_t t) noexcept nogil:
    """kvm_vgic_inject_irq (gp: the vCPU of a private INTID)."""
    cdef virq_t* q
    cdef gic_t* gic
    cdef uint32_t pbit
    cdef uint64_t bit
    cdef uint32_t w
    if b < 32:
        q = &e.irq[gp]
        pbit = (<uint32_t>1) << b
        if q.priv_level & pbit:
            if ((q.priv_line & pbit) != 0) == level:
                return 0
            if level:
                q.priv_line |= pbit
            else:
                q.priv_line &= ~pbit
        else:
            if not level:
                return 0
            q.priv_latch |= pbit
    else:
        gic = &e.gic[vmi]
        w = b >> 6
        bit = (<uint64_t>1) << (b & 63)
        if gic.spi_level[w] & bit:
            if ((gic.spi_line[w] & bit) != 0) == level:
                return 0
            if level:
                gic.spi_line[w] |= bit
            else:
                gic.spi_line[w] &= ~bit
        else:
            if not level:
                return 0
            gic.spi_latch[w] |= bit
    refresh(e, gp, vmi, b)
    return queue_irq(e, gp, vmi, b, t)


cdef inline uint8_t prio_of(engine_t* e, virq_t* q, gic_t* gic, uint32_t b) noexcept nogil:
    return q.priv_prio[b] if b < 32 else gic.spi_prio[b]


cdef bint gic_pending(engine_t* e, uint32_t g) noexcept nogil:
    """kvm_vgic_vcpu_pending_irq: pending, enabled, not active, priority < PMR."""
    cdef virq_t* q = &e.irq[g]
    cdef uint32_t vmi = e.th[g].vm
    cdef gic_t* gic = &e.gic[vmi]
    cdef uint64_t cand, en, act
    cdef uint32_t w, b
    if not gic.enabled:
        return False
    for w in range(16):
        cand = q.ap[w]
        if not cand:
            continue
        en = gic.spi_en[w]
        act = gic.spi_act[w]
        if w == 0:
            en = (en & <uint64_t>0xFFFFFFFF00000000) | q.priv_en
            act = (act & <uint64_t>0xFFFFFFFF00000000) | q.priv_act
        cand &= en & ~act
        while cand:
            b = (w << 6) | <uint32_t>__builtin_ctzll(cand)
            if prio_of(e, q, gic, b) < q.pmr:
                return True
            cand &= cand - 1
    return False


cdef int32_t gic_best(engine_t* e, uint32_t g) noexcept nogil:
    """The interrupt the guest acknowledges: highest priority (lowest value), then INTID."""
    cdef virq_t* q = &e.irq[g]
    cdef uint32_t vmi = e.th[g].vm
    cdef gic_t* gic = &e.gic[vmi]
    cdef uint64_t cand, en, act
    cdef uint32_t w, b
    cdef int32_t best = -1
    cdef uint8_t best_prio = q.pmr, p
    if q.masked or not gic.enabled:
        return -1
    for w in range(16):
        cand = q.ap[w]
        if not cand:
            continue
        en = gic.spi_en[w]
        act = gic.spi_act[w]
        if w == 0:
            en = (en & <uint64_t>0xFFFFFFFF00000000) | q.priv_en
            act = (act & <uint64_t>0xFFFFFFFF00000000) | q.priv_act
        cand &= en & ~act
        while cand:
            b = (w << 6) | <uint32_t>__builtin_ctzll(cand)
            p = prio_of(e, q, gic, b)
            if p < best_prio:
                best = <int32_t>b
                best_prio = p
            cand &= cand - 1
    return best


cdef int set_enabled(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b, bint on,
                     uint64_t t) noexcept nogil:
    cdef gic_t* gic = &e.gic[vmi]
    if b < 32:
        if on:
            e.irq[gp].priv_en |= (<uint32_t>1) << b
        else:
            e.irq[gp].priv_en &= ~((<uint32_t>1) << b)
    else:
        if on:
            gic.spi_en[b >> 6] |= (<uint64_t>1) << (b & 63)
        else:
            gic.spi_en[b >> 6] &= ~((<uint64_t>1) << (b & 63))
    if on:
        return queue_irq(e, gp, vmi, b, t)
    return 0


cdef int set_dist_enabled(engine_t* e, uint32_t vmi, bint on, uint64_t t) noexcept nogil:
    """GICD_CTLR written by the guest (vgic_mmio_write_v3_misc): enabling the
    distributor kicks every vCPU with something queued on its ap_list
    (vgic_kick_vcpus), not the interrupts that became pending while it was
    disabled: those were never queued (vgic_target_oracle returned NULL)."""
    cdef vm_t* vm = &e.vms[vmi]
    cdef gic_t* gic = &e.gic[vmi]
    cdef uint32_t was = gic.enabled, g
    gic.enabled = 1 if on else 0
    if on and not was:
        # vgic_kick_vcpus
        for g in range(vm.first, vm.first + vm.nr_vcpus):
            if gic_pending(e, g):
                e.th[g].requests |= e.inject_req_bit
                if kick(e, g, t, 1) < 0:
                    return -1
    return 0


cdef int uaccess_write_pending(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b, bint on,
                               uint64_t t) noexcept nogil:
    """GICD_ISPENDR / GICR_ISPENDR0 written by userspace (vgic_v3_uaccess_write_pending):
    the latch is written whole, 1 sets it and queues (vgic_queue_irq_unlock), 0
    clears it; no physical side effects.  1 if an IPI went."""
    cdef uint32_t pbit
    cdef uint64_t bit
    if b < 32:
        pbit = (<uint32_t>1) << b
        if on:
            e.irq[gp].priv_latch |= pbit
        else:
            e.irq[gp].priv_latch &= ~pbit
    else:
        bit = (<uint64_t>1) << (b & 63)
        if on:
            e.gic[vmi].spi_latch[b >> 6] |= bit
        else:
            e.gic[vmi].spi_latch[b >> 6] &= ~bit
    refresh(e, gp, vmi, b)
    if on:
        return queue_irq(e, gp, vmi, b, t)
    return 0


cdef int uaccess_write_active(engine_t* e, int64_t gp, uint32_t vmi, uint32_t b, bint on,
                              uint64_t t) noexcept nogil:
    """GICD_ISACTIVER / ICACTIVER written by userspace (vgic_mmio_uaccess_write_sactive /
    cactive -> vgic_mmio_change_active): no guest halt; an interrupt made active
    is queued (vgic_queue_irq_unlock).  1 if an IPI went."""
    cdef uint32_t pbit
    cdef uint64_t bit
    if b < 32:
        pbit = (<uint32_t>1) << b
        if on:
            e.irq[gp].priv_act |= pbit
        else:
            e.irq[gp].priv_act &= ~pbit
    else:
        bit = (<uint64_t>1) << (b & 63)
        if on:
            e.gic[vmi].spi_act[b >> 6] |= bit
        else:
            e.gic[vmi].spi_act[b >> 6] &= ~bit
    if on:
        return queue_irq(e, gp, vmi, b, t)
    return 0


cdef void uaccess_write_dist_ctlr(engine_t* e, uint32_t vmi, bint on) noexcept nogil:
    """GICD_CTLR written by userspace (vgic_mmio_uaccess_write_v3_misc): the enable
    bit only; no vgic_kick_vcpus."""
    e.gic[vmi].enabled = 1 if on else 0


cdef int route_spi(engine_t* e, uint32_t vmi, uint32_t b, uint64_t mpidr,
                   uint64_t t) noexcept nogil:
    """GICD_IROUTER: Aff2.Aff1.Aff0 names the target; no match, no delivery."""
    cdef vm_t* vm = &e.vms[vmi]
    cdef gic_t* gic = &e.gic[vmi]
    cdef int32_t old = gic.spi_target[b]
    if old >= 0:
        e.irq[vm.first + old].ap[b >> 6] &= ~((<uint64_t>1) << (b & 63))
    gic.spi_mpidr[b] = <uint32_t>(mpidr & 0xFFFFFF)
    gic.spi_target[b] = vcpu_of_mpidr(mpidr, vm.nr_vcpus)
    refresh(e, -1, vmi, b)
    return queue_irq(e, -1, vmi, b, t)


cdef inline int32_t vcpu_of_mpidr(uint64_t mpidr, uint32_t nr_vcpus) noexcept nogil:
    """kvm_mpidr_to_vcpu on IROUTER bits [23:0] (reset_mpidr's layout)."""
    cdef uint64_t m = mpidr & 0xFFFFFF
    cdef uint64_t aff0 = m & 0xFF, vid
    if aff0 >= 16:
        return -1
    vid = aff0 | (((m >> 8) & 0xFF) << 4) | (((m >> 16) & 0xFF) << 12)
    if vid >= nr_vcpus:
        return -1
    if ((vid & 0xF) | (((vid >> 4) & 0xFF) << 8) | (((vid >> 12) & 0xFF) << 16)) != m:
        return -1
    return <int32_t>vid


# -- x86 LAPIC subset -------------------------------------------------------------

cdef inline int32_t fls256(const uint64_t* v) noexcept nogil:
    cdef int w
    for w in range(3, -1, -1):
        if v[w]:
            return (w << 6) + 63 - __builtin_clzll(v[w])
    return -1


cdef int32_t apic_has_interrupt(virq_t* q) noexcept nogil:
    """kvm_apic_has_interrupt: the highest IRR vector above the PPR, or -1."""
    cdef int32_t v = fls256(q.irr), isrv
    cdef uint32_t ppr
    if v < 0:
        return -1
    isrv = fls256(q.isr)
    if isrv < 0:
        isrv = 0
    ppr = q.tpr if (q.tpr & 0xF0) >= (<uint32_t>isrv & 0xF0) else (<uint32_t>isrv & 0xF0)
    return v if (<uint32_t>v & 0xF0) > ppr else -1


cdef int apic_set_irq(engine_t* e, uint32_t g, uint32_t vec, uint64_t t) noexcept nogil:
    """__apic_accept_irq (fixed delivery): IRR, KVM_REQ_EVENT, kick."""
    e.irq[g].irr[vec >> 6] |= (<uint64_t>1) << (vec & 63)
    e.th[g].requests |= e.inject_req_bit
    return kick(e, g, t, 1)


# -- either arch ------------------------------------------------------------------------

cdef inline bint runnable(engine_t* e, uint32_t g) noexcept nogil:
    """kvm_arch_vcpu_runnable (arm64: an interrupt pending and not STOPPED) /
    kvm_vcpu_has_events (x86, IF=1 needed)."""
    if e.x86:
        return not e.irq[g].masked and apic_has_interrupt(&e.irq[g]) >= 0
    return e.th[g].mp_state != MP_STOPPED and gic_pending(e, g)


cdef inline int32_t best_irq(engine_t* e, uint32_t g) noexcept nogil:
    if e.x86:
        return -1 if e.irq[g].masked else apic_has_interrupt(&e.irq[g])
    return gic_best(e, g)


cdef inline int raise_irq(engine_t* e, uint32_t g, uint32_t irq, uint64_t t) noexcept nogil:
    """An SGI / IPI or tick arriving at vCPU g: edge, the arch's way."""
    if e.x86:
        return apic_set_irq(e, g, irq, t)
    return inject(e, g, e.th[g].vm, irq, 1, t)


cdef void ack(engine_t* e, uint32_t g, uint32_t b, uint64_t t) noexcept nogil:
    """The guest acknowledges b (ICC_IAR1_EL1 / the LAPIC's INTA)."""
    cdef virq_t* q = &e.irq[g]
    cdef uint32_t vmi = e.th[g].vm
    cdef gic_t* gic
    cdef uint32_t pbit
    cdef uint64_t bit
    if e.x86:
        q.irr[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        q.isr[b >> 6] |= (<uint64_t>1) << (b & 63)
        return
    if b < 32:
        pbit = (<uint32_t>1) << b
        q.priv_act |= pbit
        q.priv_latch &= ~pbit
        if b == VTIMER_IRQ:
            # Linux's timer handler masks the timer (CNTV_CTL.IMASK).
            q.priv_line &= ~pbit
            timer_ack(e, g, t)
    else:
        gic = &e.gic[vmi]
        bit = (<uint64_t>1) << (b & 63)
        gic.spi_act[b >> 6] |= bit
        gic.spi_latch[b >> 6] &= ~bit
        # The driver's handler silences its device: the line drops.
        gic.spi_line[b >> 6] &= ~bit
    refresh(e, g, vmi, b)


cdef int eoi(engine_t* e, uint32_t g, uint32_t b, uint64_t t) noexcept nogil:
    """End of interrupt: priority drop and deactivation (ICC_EOIR1_EL1 / EOI).

    An SPI that is pending again and was re-routed to another vCPU while it
    was active is queued there and that vCPU kicked, as vgic_prune_ap_list
    does when it migrates the interrupt (at this vCPU's next exit).  -1 on error.
    """
    cdef uint32_t vmi
    if e.x86:
        e.irq[g].isr[b >> 6] &= ~((<uint64_t>1) << (b & 63))
        return 0
    if b < 32:
        e.irq[g].priv_act &= ~((<uint32_t>1) << b)
        return 0
    vmi = e.th[g].vm
    e.gic[vmi].spi_act[b >> 6] &= ~((<uint64_t>1) << (b & 63))
    if owner_of(e, g, vmi, b) != <int64_t>g:
        return -1 if queue_irq(e, g, vmi, b, t) < 0 else 0
    return 0


cdef int take_irqs(engine_t* e, uint32_t g, uint64_t t, uint64_t pre) noexcept nogil:
    """The guest takes its interrupts at t + pre.

    With a handler time: acknowledges the best one, schedules its EOI and
    returns 1.  With none: acknowledges and ends every deliverable one at
    once and returns 0.  -1 on error.
    """
    cdef virq_t* q = &e.irq[g]
    cdef int32_t b
    cdef uint32_t n = 0
    while True:
        b = best_irq(e, g)
        if b < 0:
            return 0
        ack(e, g, <uint32_t>b, t)
        if q.handler_ns:
            q.cur_irq = b
            return -1 if segment(e, &e.th[g], g, t, pre, q.handler_ns, CONT_EOI) else 1
        if eoi(e, g, <uint32_t>b, t) < 0:
            return -1
        if q.handler_noiret:
            q.masked = 1                   # no iret: IF stays 0 until the next unmask
        n += 1
        if n > MAX_TAKES_PER_INSTANT:
            e.error = KW_ERR_STORM
            e.err_thread = g
            e.err_t = t
            e.err_n = n
            return -1
