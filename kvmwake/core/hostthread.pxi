# core/hostthread.pxi (twin: kvmwake/reference/hostthread.py).
# Mirrors: a user or kernel thread of the host that is not a vCPU: its CPU
# bursts, hrtimer_nanosleep (kernel/time/hrtimer.c: do_nanosleep ->
# schedule(); hrtimer_wakeup -> wake_up_process -> try_to_wake_up), the
# injection an irqfd write makes in the writer's context (virt/kvm/eventfd.c
# irqfd_wakeup -> kvm_arch_set_irq_inatomic: x86 kvm_msi_to_lapic_irq ->
# kvm_irq_delivery_to_apic_fast -> kvm_apic_set_irq -> kvm_vcpu_kick; arm64
# vgic_irqfd_set_irq -> kvm_vgic_inject_irq, level 1), and do_exit.
#
# A host thread is an entry of the thread table of kind THREAD_HOST: the host
# scheduler (core/host.pxi) runs it exactly as it runs a vCPU thread, on the
# same run queues.  It runs a host program (model.HostOp) from the op table;
# it never enters a guest, has no halt stats, and its stats row holds its own
# counters (model.HS_*).


cdef inline int ht_segment(engine_t* e, thread_t* th, uint32_t g, uint64_t t,
                           uint64_t d) noexcept nogil:
    """A CPU burst of d ns from t: a segment without guest mode (preempted, it
    keeps its rest as a vCPU's segment does, without an exit and entry)."""
    th.seg_end = t + d
    th.seg_gfrom = th.seg_end
    th.seg_gto = th.seg_end
    th.cont = CONT_NEXT
    return push_thread(e, th, g, th.seg_end, EV_SEGMENT)


cdef inline void ht_off_cpu(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    """Its time on the CPU (sum_exec_runtime) up to t, when it leaves the CPU."""
    e.stats[<uint64_t>g * NR_STATS + HS_RUN_NS] += t - th.run_start


cdef int ht_sleep(engine_t* e, thread_t* th, uint32_t g, uint64_t t, uint64_t d) noexcept nogil:
    """hrtimer_nanosleep: the hrtimer is armed for t + d, the thread blocks
    (schedule(): dequeued, the CPU goes to the next thread)."""
    cdef virq_t* q = &e.irq[g]
    ht_off_cpu(e, th, g, t)
    e.stats[<uint64_t>g * NR_STATS + HS_NR_SLEEPS] += 1
    th.halt_start = t
    if e.tlcap:
        tl_note(e, th, g, t, TS_BLOCKED)
    th.state = TS_BLOCKED
    th.resume = RESUME_START
    th.gen += 1
    q.timer_gen += 1
    if heap_push(e, t + d, EV_TIMER, g, q.timer_gen):
        return -1
    return release_cpu(e, th, t)


cdef int ht_wake(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """hrtimer_wakeup -> wake_up_process -> try_to_wake_up, the scheduler's
    normal wake-up path, placement (select_task_rq) included (``wake_to_run_ns`` on
    an idle CPU, as for a vCPU)."""
    cdef thread_t* th = &e.th[g]
    e.stats[<uint64_t>g * NR_STATS + HS_SLEEP_NS] += t - th.halt_start
    return try_to_wake_up(e, g, t)


cdef int ht_exit(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    """do_exit: the program ended; the thread leaves its CPU for good."""
    ht_off_cpu(e, th, g, t)
    if e.tlcap:
        tl_note(e, th, g, t, TS_USER)
    th.state = TS_USER
    th.resume = RESUME_START
    th.gen += 1
    return release_cpu(e, th, t)


cdef int ht_inject(engine_t* e, const op_t* op, uint64_t t) noexcept nogil:
    """The injection of an irqfd write, made by this thread in its own context
    (irqfd_wakeup -> kvm_arch_set_irq_inatomic): x86 an MSI, kvm_apic_set_irq
    (IRR, KVM_REQ_EVENT, kvm_vcpu_kick), as KVM_SIGNAL_MSI; arm64 the SPI's line
    raised (vgic_irqfd_set_irq with level 1, never lowered: an edge SPI latches,
    a level one stays asserted), as a device source does.  1 if the kick IPI'd
    a vCPU in guest mode, -1 on error."""
    if e.x86:
        return apic_set_irq(e, e.vms[op.p0].first + <uint32_t>op.p1, op.arg, t)
    return inject(e, -1, <uint32_t>op.p0, op.arg, 1, t)


cdef int ht_run(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """The host program from th.pc on, at t, the thread on its CPU: ops act at
    once until one takes time (a burst, a sleep, an IPI's cost) or it ends."""
    cdef thread_t* th = &e.th[g]
    cdef const op_t* ops = &e.ops[th.prog]
    cdef const op_t* op
    cdef uint64_t d
    cdef uint32_t n = 0
    cdef int rc
    cdef uint64_t cost
    if t == th.stall_t:
        n = th.stall_n
    else:
        th.stall_t = t
    while True:
        n += 1
        if n > MAX_OPS_PER_INSTANT:
            e.error = KW_ERR_STALL
            e.err_thread = g
            e.err_t = t
            e.err_n = n
            return -1
        th.stall_n = n
        op = &ops[th.pc]
        if op.code == HOP_COMPUTE:
            d = draw_ns(th, op.dist, op.p0, op.p1)
            th.pc += 1
            if d:
                return ht_segment(e, th, g, t, d)
        elif op.code == HOP_SLEEP:
            d = draw_ns(th, op.dist, op.p0, op.p1)
            th.pc += 1
            if d:
                return ht_sleep(e, th, g, t, d)
        elif op.code == HOP_SLEEP_UNTIL:
            # clock_nanosleep(TIMER_ABSTIME): the deadline (kept in exit_time) moves
            # on by the draw, at most to MAX_TIME; a deadline already past: no sleep.
            d = draw_ns(th, op.dist, op.p0, op.p1)
            th.pc += 1
            th.exit_time = th.exit_time + d if d < KW_MAX_TIME - th.exit_time else KW_MAX_TIME
            if th.exit_time > t:
                return ht_sleep(e, th, g, t, th.exit_time - t)
        elif op.code == HOP_MSI or op.code == HOP_IRQ:
            th.pc += 1
            e.stats[<uint64_t>g * NR_STATS + HS_NR_INJECTS] += 1
            rc = ht_inject(e, op, t)
            if rc < 0:
                return -1
            if rc:
                # The kick's IPI to a vCPU in guest mode costs the sender.
                cost = cost_ns(e, th, COST_IPI_SEND)
                if cost:
                    return ht_segment(e, th, g, t, cost)
        elif op.code == HOP_LOOP:
            th.loops[op.arg] = <uint32_t>op.p0
            th.pc += 1
        elif op.code == HOP_ENDLOOP:
            if op.p0 == 0:
                th.pc = op.arg + 1
            else:
                th.loops[op.p1] -= 1
                th.pc = op.arg + 1 if th.loops[op.p1] > 0 else th.pc + 1
        else:
            return ht_exit(e, th, g, t)


cdef int ht_got_cpu(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """The host thread has its CPU (got_cpu, after the scheduler's part): its wait
    ends; it goes on with a preempted burst, or with its program."""
    cdef thread_t* th = &e.th[g]
    cdef uint64_t* st = &e.stats[<uint64_t>g * NR_STATS]
    st[HS_WAIT_NS] += t - th.wake_ts
    st[HS_NR_RUNS] += 1
    if th.resume == RESUME_SEGMENT:
        th.resume = RESUME_START
        return ht_segment(e, th, g, t, th.rem_end)
    return ht_run(e, g, t)


cdef inline void ht_preempted(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    """A running host thread is preempted at t (preempt_segment): off its CPU,
    runnable (waiting) from t."""
    ht_off_cpu(e, th, g, t)
    e.stats[<uint64_t>g * NR_STATS + HS_NR_PREEMPTED] += 1
    th.wake_ts = t
