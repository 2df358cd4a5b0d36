# core/host.pxi (twin: kvmwake/reference/host.py).
# Mirrors: kernel/sched/core.c and fair.c in outline (try_to_wake_up,
# schedule, a CPU's run queue); today a FIFO run queue with time slices.
#
# Host CPUs and their run queues: where vCPU threads wait, get a CPU, are
# preempted.  Each host CPU runs at most one thread; the others queue FIFO.


cdef void tl_note(engine_t* e, thread_t* th, uint32_t g, uint64_t t,
                  uint8_t s) noexcept nogil:
    """The state timeline: thread g goes to state s at t (called, when the
    timeline is on, just before ``th.state = s``; no record if nothing changes)."""
    cdef tl_rec_t* r
    cdef tl_rec_t* buf
    cdef uint64_t ncap
    if th.state == s:
        return
    if e.tlhead == e.tlalloc and e.tlalloc < e.tlcap:
        ncap = e.tlalloc * 2 if e.tlalloc else 4096
        if ncap > e.tlcap:
            ncap = e.tlcap
        buf = <tl_rec_t*>realloc(e.tl, ncap * sizeof(tl_rec_t))
        if buf == NULL:
            e.error = KW_ERR_NOMEM
            return
        e.tl = buf
        e.tlalloc = ncap
    if e.tlhead == e.tlcap:
        e.tlhead = 0
    r = &e.tl[e.tlhead]
    if e.tlcount == e.tlcap:
        # The oldest record leaves the window: the window now starts at its time,
        # with its thread in the state it recorded.
        e.tldropped += 1
        e.tlbase[r.g] = r.state
        e.tlt0 = r.t
    else:
        e.tlcount += 1
    e.tlhead += 1
    r.t = t
    r.g = g
    r.cpu = th.pcpu
    r.state = s
    memset(r._pad, 0, 7)


cdef inline void rq_append(engine_t* e, cpu_t* cpu, int32_t g) noexcept nogil:
    e.th[g].rq_next = -1
    if cpu.rq_tail >= 0:
        e.th[cpu.rq_tail].rq_next = g
    else:
        cpu.rq_head = g
    cpu.rq_tail = g
    cpu.rq_len += 1


cdef inline int32_t rq_popleft(engine_t* e, cpu_t* cpu) noexcept nogil:
    cdef int32_t g = cpu.rq_head
    cpu.rq_head = e.th[g].rq_next
    if cpu.rq_head < 0:
        cpu.rq_tail = -1
    cpu.rq_len -= 1
    e.th[g].rq_next = -1
    return g


cdef int make_runnable(engine_t* e, uint32_t g, uint64_t t, uint64_t delay) noexcept nogil:
    """try_to_wake_up: the thread waits for its host CPU (``delay`` ns on an idle one)."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    cdef thread_t* cur
    if cpu.cur < 0:
        cpu.cur = g
        return push_thread(e, th, g, t + delay, EV_RUN)
    rq_append(e, cpu, g)
    cur = &e.th[cpu.cur]
    if cur.state == TS_POLLING:
        # kvm_vcpu_can_poll: single_task_running() is now false.
        return block(e, <uint32_t>cpu.cur, t, t)
    if cur.state == TS_RUNNING:
        return arm_slice(e, cur, <uint32_t>cpu.cur, t)
    return 0


cdef inline int arm_slice(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    cdef uint64_t sl = e.costs.sched_slice_ns
    cdef uint64_t at
    if sl and not th.slice_armed:
        th.slice_armed = 1
        at = th.run_start + sl
        return heap_push(e, at if at > t else t, EV_SLICE, g, th.run_gen)
    return 0


cdef int release_cpu(engine_t* e, thread_t* th, uint64_t t) noexcept nogil:
    """The thread leaves its host CPU; the next queued thread gets it."""
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    cdef int32_t nxt
    th.run_gen += 1
    th.slice_armed = 0
    if cpu.rq_len:
        nxt = rq_popleft(e, cpu)
        cpu.cur = nxt
        return push_thread(e, &e.th[nxt], <uint32_t>nxt, t + e.costs.context_switch_ns, EV_RUN)
    cpu.cur = -1
    return 0


cdef int got_cpu(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    if e.tlcap:
        tl_note(e, th, g, t, TS_RUNNING)
    th.state = TS_RUNNING
    th.run_start = t
    if e.cpus[th.pcpu].rq_len:
        if arm_slice(e, th, g, t):
            return -1
    if th.resume == RESUME_START:
        return enter(e, g, t, e.costs.vm_entry_ns)
    if th.resume == RESUME_HALT:
        # Back in kvm_vcpu_block's loop after schedule().
        if check_block(e, g):
            return halt_done(e, g, t, 1, th.poll_end, 0)
        if e.tlcap:
            tl_note(e, th, g, t, TS_BLOCKED)
        th.state = TS_BLOCKED
        return release_cpu(e, th, t)
    if th.resume == RESUME_SLEEP:
        # Back in kvm_vcpu_sleep's rcuwait_wait_event.
        if asleep(e, th):
            if th.sig_pending:
                return exit_to_user(e, g, t, EXIT_INTR, 0, 0, 0, 0, 0)
            if e.tlcap:
                tl_note(e, th, g, t, TS_BLOCKED)
            th.state = TS_BLOCKED
            return release_cpu(e, th, t)
        return enter(e, g, t, e.costs.vm_entry_ns)
    th.seg_end = t + th.rem_end
    th.seg_gfrom = t + th.rem_gfrom
    th.seg_gto = t + th.rem_gto
    if push_thread(e, th, g, th.seg_end, EV_SEGMENT):
        return -1
    if th.rem_gto and th.cont != CONT_IRQ and th.cont != CONT_EOI:
        # It enters the guest again: requests are handled and, if it can take
        # an interrupt now or has work to do in KVM_RUN's loop (a signal, a
        # power-off), it does so on the way in.
        th.requests = 0
        if best_irq(e, g) >= 0 or th.sig_pending or asleep(e, th):
            return interrupt_segment(e, g, th.seg_gfrom, 0)
    return 0


cdef int slice_end(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    cdef uint64_t extra
    th.slice_armed = 0
    if th.state != TS_RUNNING or not e.cpus[th.pcpu].rq_len:
        return 0
    # Preempted: keep the rest of the segment for later.
    th.rem_end = th.seg_end - t
    th.rem_gfrom = (th.seg_gfrom if th.seg_gfrom > t else t) - t
    th.rem_gto = (th.seg_gto if th.seg_gto > t else t) - t
    if th.seg_gfrom <= t < th.seg_gto:
        # Preempted in guest mode: it exits now and re-enters when resumed.
        extra = e.costs.vm_exit_ns + e.costs.vm_entry_ns
        th.rem_end += extra
        th.rem_gfrom += extra
        th.rem_gto += extra
    th.gen += 1
    if e.tlcap:
        tl_note(e, th, g, t, TS_RUNNABLE)
    th.state = TS_RUNNABLE
    th.resume = RESUME_SEGMENT
    rq_append(e, &e.cpus[th.pcpu], g)
    return release_cpu(e, th, t)
