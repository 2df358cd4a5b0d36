# Wake sources, requests and kicks: kvm_vcpu_wake_up, kvm_vcpu_kick,
# kvm_make_request (virt/kvm/kvm_main.c) and the plain wake source that a
# guest WAKE op or a VM's periodic tick raises (vgic_queue_irq_unlock's kick).


cdef int wake_up(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """kvm_vcpu_wake_up: 1 if a task was waiting on the vCPU's rcuwait."""
    cdef thread_t* th = &e.th[g]
    if th.state != TS_BLOCKED:
        return 0
    e.stats[<uint64_t>g * NR_STATS + S_WAKEUP] += 1
    th.wake_ts = t
    th.state = TS_RUNNABLE
    th.resume = RESUME_HALT
    if make_runnable(e, g, t):
        return -1
    return 1


cdef int kick(engine_t* e, uint32_t g, uint64_t t, bint wake) noexcept nogil:
    """kvm_vcpu_kick (wake=0: a NO_WAKEUP request).  1 if it sent an IPI, -1 on error."""
    cdef thread_t* th = &e.th[g]
    cdef int rc
    cdef uint64_t extra
    if wake:
        rc = wake_up(e, g, t)
        if rc:
            return -1 if rc < 0 else 0
    if th.state == TS_POLLING:
        # Not a waiter yet: the poll loop sees the condition itself.
        if check_block(th):
            th.gen += 1                        # cancel the poll-end event
            th.wake_ts = t
            return -1 if halt_done(e, g, t, 0, t, 0) else 0
        return 0
    if th.state == TS_RUNNING and t < th.seg_gto:
        th.irq_pending = 0
        th.requests = 0
        if t >= th.seg_gfrom:
            # IN_GUEST_MODE: IPI; the vCPU exits, takes it and re-enters.
            extra = e.costs.vm_exit_ns + e.costs.vm_entry_ns
            th.seg_gto += extra
            th.seg_end += extra
            if push_thread(e, th, g, th.seg_end, EV_SEGMENT):
                return -1
            return 1
        # Still on its way into the guest: taken at entry.
    return 0


cdef inline int raise_pending(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """Make the plain wake source pending on a vCPU and kick it."""
    e.th[g].irq_pending = 1
    return kick(e, g, t, 1)


cdef int make_request(engine_t* e, uint32_t g, uint32_t req) noexcept nogil:
    """kvm_make_request + kick, as kvm_make_vcpu_request does it."""
    if not (req & KVM_REQUEST_NO_ACTION):
        e.th[g].requests |= (<uint32_t>1) << (req & KVM_REQUEST_MASK)
    return kick(e, g, e.now, not (req & KVM_REQUEST_NO_WAKEUP))


cdef int tick(engine_t* e, uint32_t vmi, uint64_t t) noexcept nogil:
    """A VM's periodic wake source: every halted vCPU is woken."""
    cdef vm_t* vm = &e.vms[vmi]
    cdef uint32_t g
    cdef uint8_t s
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        s = e.th[g].state
        if s == TS_POLLING or s == TS_BLOCKED:
            if raise_pending(e, g, t) < 0:
                return -1
    return 0
