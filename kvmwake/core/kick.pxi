# core/kick.pxi (twin: kvmwake/reference/kick.py).
# Mirrors: virt/kvm/kvm_main.c kvm_vcpu_wake_up, kvm_vcpu_kick,
# kvm_make_request, kvm_make_all_cpus_request.
#
# Kicks and requests: kvm_vcpu_wake_up, kvm_vcpu_kick, kvm_make_request
# (virt/kvm/kvm_main.c); a VM's periodic tick and device interrupt sources.


cdef int wake_up(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """kvm_vcpu_wake_up: 1 if a task was waiting on the vCPU's rcuwait."""
    cdef thread_t* th = &e.th[g]
    if poll_settle(e, g):
        return -1
    if th.state != TS_BLOCKED:
        return 0
    e.stats[<uint64_t>g * NR_STATS + S_WAKEUP] += 1
    if try_to_wake_up(e, g, t):
        return -1
    return 1


cdef int signal_wake(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """signal_wake_up: the signal code, not kvm_vcpu_wake_up, wakes a blocked or
    sleeping vCPU thread (so halt_wakeup does not count it); a polling one sees
    signal_pending(); one in guest mode is IPI'd out (kick_process)."""
    cdef thread_t* th = &e.th[g]
    if poll_settle(e, g):
        return -1
    if th.state == TS_BLOCKED:
        return -1 if try_to_wake_up(e, g, t) else 0
    return kick(e, g, t, 0)


cdef int kick(engine_t* e, uint32_t g, uint64_t t, bint wake) noexcept nogil:
    """kvm_vcpu_kick (wake=0: a NO_WAKEUP request).  1 if it sent an IPI, -1 on error."""
    cdef thread_t* th = &e.th[g]
    cdef int rc
    cdef uint64_t extra
    if poll_settle(e, g):
        return -1
    if wake:
        rc = wake_up(e, g, t)
        if rc:
            return -1 if rc < 0 else 0
    if th.state == TS_POLLING:
        # Not a waiter yet: the poll loop sees the condition itself.
        if check_block(e, g):
            th.gen += 1                        # cancel the poll-end event (if queued)
            th.wake_ts = t
            return -1 if halt_done(e, g, t, 0, t, 0) else 0
        return 0
    if th.state == TS_RUNNING and (t < th.seg_gto or (t == th.seg_gto and th.cont == CONT_NEXT)):
        # (At the very end of a guest-only segment the vCPU is still in guest
        # mode: the boundary is the model's, not an exit.  Its end event is still
        # due at t, so it is interrupted here, not left to run on with the kick
        # (a signal, a request, an interrupt) unseen.)
        if th.cont == CONT_IRQ:
            return 0                           # on its way to take interrupts
        if th.cont == CONT_EOI:
            if t < th.seg_gfrom:
                return 0
            # In a handler (masked): the IPI costs an exit and an entry.
            extra = cost_ns(e, th, COST_VM_EXIT)
            extra += cost_ns(e, th, COST_VM_ENTRY)
            th.seg_gto += extra
            th.seg_end += extra
            return -1 if push_thread(e, th, g, th.seg_end, EV_SEGMENT) else 1
        if t < th.seg_gfrom:
            # On its way into the guest: seen at entry.
            return -1 if interrupt_segment(e, g, th.seg_gfrom, 0) else 0
        # IN_GUEST_MODE: IPI; the vCPU exits and re-enters.
        extra = cost_ns(e, th, COST_VM_EXIT)
        extra += cost_ns(e, th, COST_VM_ENTRY)
        return -1 if interrupt_segment(e, g, t, extra) else 1
    return 0


cdef int tick(engine_t* e, uint32_t vmi, uint64_t t) noexcept nogil:
    """A VM's periodic tick: every halted vCPU gets the tick interrupt."""
    cdef vm_t* vm = &e.vms[vmi]
    cdef uint32_t g
    cdef uint8_t s
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        s = e.th[g].state
        if s == TS_POLLING or (s == TS_BLOCKED and e.th[g].resume == RESUME_HALT):
            if raise_irq(e, g, e.tick_irq, t) < 0:
                return -1
    return 0


cdef inline uint64_t source_draw(source_t* s) noexcept nogil:
    """An exponential inter-arrival time from the source's stream (at least 1 ns)."""
    cdef double u, d
    s.rng_state = s.rng_state * KW_LCG_MULT + s.rng_inc
    u = <double>(fmix64(s.rng_state) >> 11) * (1.0 / 9007199254740992.0)
    d = -log(1.0 - u) * <double>s.p0 + 0.5
    if d >= <double>KW_MAX_DRAW_NS:
        return KW_MAX_DRAW_NS
    return <uint64_t>d if d >= 1.0 else 1


cdef int source_fire(engine_t* e, uint32_t si, uint64_t t) noexcept nogil:
    cdef source_t* s = &e.src[si]
    cdef uint64_t nxt
    cdef int rc
    if e.x86:
        rc = apic_set_irq(e, s.target, s.intid, t)      # an MSI to one LAPIC
    else:
        rc = inject(e, -1, s.vm, s.intid, 1, t)         # an edge on the SPI's line
    if rc < 0:
        return -1
    if s.kind == SRC_PERIODIC:
        nxt = t + s.p0
    elif s.kind == SRC_POISSON:
        nxt = t + source_draw(s)
    else:
        s.idx += 1
        if s.idx >= s.times_len:
            return 0
        nxt = e.times[s.times_off + s.idx]
        if nxt < t:
            nxt = t
    return heap_push(e, nxt, EV_SOURCE, si, s.gen)
