# core/timer.pxi (twin: kvmwake/reference/timer.py).
# Mirrors: arch/arm64/kvm/arch_timer.c kvm_timer_should_fire,
# kvm_bg_timer_expire, timer_emulate.
#
# The virtual timer of each arm64 vCPU (arch/arm64/kvm/arch_timer.c): CVAL
# in virtual-time ns, CTL's ENABLE and IMASK, the level-triggered PPI 27.
# A blocked vCPU is woken at the deadline as kvm_bg_timer_expire does.


cdef inline bint timer_level(virq_t* q, uint64_t t) noexcept nogil:
    return (q.timer_ctl & ARCH_TIMER_CTRL_ENABLE) and not (q.timer_ctl & ARCH_TIMER_CTRL_IT_MASK) \
        and t >= q.timer_cval


cdef int timer_program(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """CNTV_CTL / CVAL written: new deadline event, new line level."""
    cdef virq_t* q = &e.irq[g]
    q.timer_gen += 1
    if (q.timer_ctl & ARCH_TIMER_CTRL_ENABLE) and not (q.timer_ctl & ARCH_TIMER_CTRL_IT_MASK) \
            and q.timer_cval > t:
        if heap_push(e, q.timer_cval, EV_TIMER, g, q.timer_gen):
            return -1
    return -1 if inject(e, g, e.th[g].vm, VTIMER_IRQ, timer_level(q, t), t) < 0 else 0


cdef int timer_fire(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """The deadline: the PPI's line rises; a blocked vCPU is woken."""
    if poll_settle(e, g):
        return -1
    if inject(e, g, e.th[g].vm, VTIMER_IRQ, 1, t) < 0:
        return -1
    if e.th[g].state == TS_BLOCKED:
        if wake_up(e, g, t) < 0:
            return -1
    return 0


cdef void timer_ack(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """The handler masks the timer, or re-arms it one period on (a periodic tick)."""
    cdef virq_t* q = &e.irq[g]
    q.timer_gen += 1
    if not q.timer_period:
        q.timer_ctl |= ARCH_TIMER_CTRL_IT_MASK
        return
    q.timer_cval += q.timer_period
    q.timer_ctl = ARCH_TIMER_CTRL_ENABLE
    if q.timer_cval > t:
        if heap_push(e, q.timer_cval, EV_TIMER, g, q.timer_gen):
            e.error = KW_ERR_NOMEM
    else:
        q.priv_line |= (<uint32_t>1) << VTIMER_IRQ       # already due again
