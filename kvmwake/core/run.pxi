# core/run.pxi (twin: kvmwake/reference/run.py).
# Mirrors: arch/arm64/kvm/arm.c kvm_arch_vcpu_ioctl_run, kvm_vcpu_suspend,
# kvm_vcpu_sleep, check_vcpu_requests; arch/arm64/kvm/reset.c kvm_reset_vcpu;
# arch/x86/kvm/x86.c vcpu_run, vcpu_block.
#
# KVM_RUN's loop (arch/arm64/kvm/arm.c kvm_arch_vcpu_ioctl_run): what happens
# before each guest entry (a signal, a STOPPED vCPU's sleep, a pending reset,
# a SUSPENDED vCPU's WFI emulation), and the exits to userspace.


cdef inline bint asleep(engine_t* e, thread_t* th) noexcept nogil:
    """A vCPU that kvm_vcpu_sleep (arm64 STOPPED) or kvm_vcpu_block (x86 waiting
    for INIT/SIPI) keeps out of the guest."""
    if e.x86:
        return th.mp_state == MP_UNINITIALIZED or th.mp_state == MP_INIT_RECEIVED \
            or th.mp_state == MP_AP_RESET_HOLD
    return th.mp_state == MP_STOPPED


cdef int enter(engine_t* e, uint32_t g, uint64_t t, uint64_t pre) noexcept nogil:
    """One trip round KVM_RUN's loop up to the guest entry."""
    cdef thread_t* th = &e.th[g]
    if th.sig_pending:
        return exit_to_user(e, g, t, EXIT_INTR, 0, 0, 0, 0, 0)
    if asleep(e, th):
        return vcpu_sleep(e, g, t)
    if th.reset_pending:
        reset_vcpu(e, g)
    if th.mp_state == MP_SUSPENDED:
        return halt(e, g, t, HALT_SUSPEND)
    if th.mp_state == MP_HALTED:
        # x86 vcpu_block: kvm_vcpu_halt only if not kvm_arch_vcpu_runnable; a
        # runnable vCPU becomes RUNNABLE and enters the guest at once.
        if not runnable(e, g):
            return halt(e, g, t, HALT_MP_HALTED)
        th.mp_state = MP_RUNNABLE
    if not th.pc_valid:
        return exit_to_user(e, g, t, EXIT_INTERNAL_ERROR, 0, 0, 0, 0, 0)
    return guest_entry(e, g, t, pre)


cdef int guest_entry(engine_t* e, uint32_t g, uint64_t t, uint64_t pre) noexcept nogil:
    """Into the guest after ``pre`` ns: requests handled, interrupts taken, then
    the interrupted segment or the next op."""
    cdef thread_t* th = &e.th[g]
    cdef virq_t* q = &e.irq[g]
    cdef int rc
    th.requests = 0               # check_vcpu_requests on the way in
    if not e.x86 and not e.gic[th.vm].enabled:
        prune_ap_list(e, g)
    rc = take_irqs(e, g, t, pre)
    if rc:
        return -1 if rc < 0 else 0
    if q.sv_valid:
        q.sv_valid = 0
        return segment(e, th, g, t, pre, q.sv_guest, q.sv_cont)
    return advance(e, g, t, pre)


cdef int vcpu_sleep(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """kvm_vcpu_sleep (arm64): wait on the rcuwait until no longer STOPPED (or a
    signal).  x86 waits for INIT/SIPI in kvm_vcpu_block, which sets the blocking
    stat (only a signal ends that wait here: no INIT/SIPI is modelled)."""
    cdef thread_t* th = &e.th[g]
    if e.x86:
        e.stats[<uint64_t>g * NR_STATS + S_BLOCKING] = 1
    if e.tlcap:
        tl_note(e, th, g, t, TS_BLOCKED)
    th.state = TS_BLOCKED
    th.resume = RESUME_SLEEP
    th.gen += 1
    return release_cpu(e, th, t)


cdef int exit_to_user(engine_t* e, uint32_t g, uint64_t t, uint32_t reason, uint32_t type_,
                      uint32_t ndata, uint64_t data0, uint32_t ucall,
                      uint64_t value) noexcept nogil:
    """KVM_RUN returns to userspace with an exit.  Under EEVDF the thread keeps
    its CPU while userspace handles it (hold_cpu); under FIFO it leaves."""
    cdef thread_t* th = &e.th[g]
    cdef bint hold = e.sched == SCHED_POLICY_EEVDF and e.cpus[th.pcpu].cur == <int32_t>g
    if reason == EXIT_INTR:
        th.sig_pending = 0
    e.stats[<uint64_t>g * NR_STATS + S_BLOCKING] = 0
    th.exit_reason = reason
    th.exit_type = type_
    th.exit_ndata = ndata
    th.exit_data0 = data0
    th.exit_ucall = ucall
    th.exit_value = value
    th.exit_time = t
    if e.tlcap and not hold:
        tl_note(e, th, g, t, TS_USER)
    th.state = TS_USER
    th.resume = RESUME_START
    th.gen += 1
    e.exitq[(e.exq_head + e.exq_len) % e.nth] = g
    e.exq_len += 1
    if hold:
        hold_cpu(e, th, g)
        return 0
    return release_cpu(e, th, t)


cdef void reset_vcpu(engine_t* e, uint32_t g) noexcept nogil:
    """kvm_reset_vcpu (arch/arm64/kvm/reset.c): the core registers zeroed (x0-x30,
    SP, PC), PSTATE = VCPU_RESET_PSTATE_EL1 (EL1h, D, A, I, F set), the timer
    off (kvm_timer_vcpu_reset); then the reset state a PSCI CPU_ON left
    (KVM_REQ_VCPU_RESET) is taken and applied: PC = entry, x0 = context."""
    cdef thread_t* th = &e.th[g]
    cdef virq_t* q = &e.irq[g]
    cdef bint owed = th.reset_pending
    th.reset_pending = 0
    memset(th.regs, 0, sizeof(th.regs))
    th.sp = 0
    th.pstate = VCPU_RESET_PSTATE_EL1 & ~(<uint64_t>PSR_I_BIT)
    q.masked = 1                  # PSTATE.I (the rest of DAIF is in th.pstate)
    q.timer_ctl = 0
    q.timer_gen += 1
    q.sv_valid = 0
    if owed:
        set_pc(e, g, th.reset_pc)
        th.regs[0] = th.reset_r0
    else:
        set_pc(e, g, 0)


cdef inline uint64_t get_pstate(engine_t* e, uint32_t g) noexcept nogil:
    """PSTATE as KVM_GET_ONE_REG reads it: its I bit is the mask the GIC side uses."""
    return (e.th[g].pstate & ~(<uint64_t>PSR_I_BIT)) | (PSR_I_BIT if e.irq[g].masked else 0)


cdef inline void set_pstate(engine_t* e, uint32_t g, uint64_t v) noexcept nogil:
    e.th[g].pstate = v & ~(<uint64_t>PSR_I_BIT)
    e.irq[g].masked = 1 if v & PSR_I_BIT else 0


cdef void set_pc(engine_t* e, uint32_t g, uint64_t v) noexcept nogil:
    """The PC: op i of the program is at code_base + 4 * i."""
    cdef thread_t* th = &e.th[g]
    cdef uint64_t off = v - e.vms[th.vm].code_base
    # A new PC discards the rest of an interrupted segment: it belonged to the
    # old instruction stream (its trap would run the op at the new PC).
    e.irq[g].sv_valid = 0
    if th.has_prog and v >= e.vms[th.vm].code_base and off % 4 == 0 \
            and off // 4 < th.prog_n:
        th.pc = <uint32_t>(off // 4)
        th.pc_valid = 1
    else:
        th.pc_valid = 0
        th.pc_raw = v


cdef inline uint64_t get_pc(engine_t* e, thread_t* th) noexcept nogil:
    if th.pc_valid:
        return e.vms[th.vm].code_base + 4 * <uint64_t>th.pc
    return th.pc_raw

