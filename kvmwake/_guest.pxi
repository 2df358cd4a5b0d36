# The guest program interpreter.  A thread runs ops from its pc, adding up
# guest time, until an op that must act at an instant of its own (a trap, a
# halt, the end); then the segment's end goes on the heap.


cdef inline int segment(engine_t* e, thread_t* th, uint32_t g, uint64_t t, uint64_t pre,
                        uint64_t guest, uint8_t cont) noexcept nogil:
    th.seg_gfrom = t + pre
    th.seg_gto = th.seg_gfrom + guest
    th.seg_end = th.seg_gto + (e.costs.vm_exit_ns if cont != CONT_NEXT else 0)
    th.cont = cont
    return push_thread(e, th, g, th.seg_end, EV_SEGMENT)


cdef inline uint32_t wake_target(thread_t* th, uint32_t nr_vcpus, uint16_t kind,
                                 uint32_t arg) noexcept nogil:
    cdef uint64_t r
    if kind == WT_VCPU:
        return arg
    if kind == WT_NEXT:
        return (th.vcpu_id + 1) % nr_vcpus
    r = rng_next(th) % (nr_vcpus - 1)
    return <uint32_t>r if r < th.vcpu_id else <uint32_t>(r + 1)


cdef int advance(engine_t* e, uint32_t g, uint64_t t, uint64_t pre,
                 bint entry) noexcept nogil:
    """Run guest ops from th.pc after ``pre`` ns of host work (the entry).

    ``entry``: the thread enters the guest now (start, after a trap, after a
    halt), not just going on in guest mode (a loop back-edge).  An entry takes
    pending work even when it costs 0 ns.
    """
    cdef thread_t* th = &e.th[g]
    cdef const op_t* ops = &e.ops[th.prog]
    cdef const op_t* op
    cdef uint64_t guest = 0
    cdef uint32_t n = 0
    cdef int rc = 0
    if entry:
        th.irq_pending = 0        # the guest takes the interrupt on entry
        th.requests = 0           # check_vcpu_requests on the way in
    while True:
        op = &ops[th.pc]
        n += 1
        if op.code == OP_COMPUTE:
            guest += draw_ns(th, op.dist, op.p0, op.p1)
            th.pc += 1
        elif op.code == OP_WFI:
            e.stats[<uint64_t>g * NR_STATS + S_HALT_EXITS] += 1
            th.pc += 1
            rc = segment(e, th, g, t, pre, guest, CONT_HALT)
            break
        elif op.code == OP_WAKE:
            th.wake_target = wake_target(th, e.vms[th.vm].nr_vcpus, op.dist, op.arg)
            th.pc += 1
            rc = segment(e, th, g, t, pre, guest, CONT_DELIVER)
            break
        elif op.code == OP_LOOP:
            th.loops[op.arg] = <uint32_t>op.p0
            th.pc += 1
        elif op.code == OP_ENDLOOP:
            if op.p0 == 0:
                th.pc = op.arg + 1
            else:
                th.loops[op.p1] -= 1
                th.pc = op.arg + 1 if th.loops[op.p1] > 0 else th.pc + 1
            if guest and th.pc == op.arg + 1:
                # A loop back-edge after guest time ends the segment.
                rc = segment(e, th, g, t, pre, guest, CONT_NEXT)
                break
        else:
            rc = segment(e, th, g, t, pre, guest, CONT_END)
            break
    if t == th.stall_t:
        th.stall_n += n
        if th.stall_n > MAX_OPS_PER_INSTANT:
            e.error = KW_ERR_STALL
            e.err_thread = g
            e.err_t = t
            e.err_n = th.stall_n
            return -1
    else:
        th.stall_t = t
        th.stall_n = n
    return rc


cdef int segment_end(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    cdef uint8_t cont = th.cont
    cdef int ipi
    if cont == CONT_HALT:
        return halt(e, g, t)
    if cont == CONT_DELIVER:
        ipi = raise_pending(e, e.vms[th.vm].first + th.wake_target, t)
        if ipi < 0:
            return -1
        return advance(e, g, t, e.costs.vm_entry_ns + (e.costs.ipi_send_ns if ipi else 0), 1)
    if cont == CONT_END:
        th.state = TS_USER
        return release_cpu(e, th, t)
    return advance(e, g, t, 0, 0)
