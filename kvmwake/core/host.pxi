# core/host.pxi (twin: kvmwake/reference/host.py).
# Mirrors: kernel/sched/core.c (try_to_wake_up, ttwu_runnable, __schedule,
# single_task_running) and kernel/sched/fair.c of Linux 6.18 (avg_vruntime,
# vruntime_eligible, update_curr, update_deadline, update_entity_lag,
# place_entity, requeue_delayed_entity, dequeue_entity with DELAY_DEQUEUE,
# finish_delayed_dequeue_entity, pick_eevdf, pick_next_task_fair,
# set_next_entity, check_preempt_wakeup_fair, task_tick_fair).
#
# Host CPUs and their run queues: where vCPU threads wait, get a CPU, are
# preempted.  Each host CPU runs at most one thread.  Two schedulers, chosen
# per host (e.sched): FIFO run queues with a fixed time slice
# (SCHED_POLICY_FIFO), or the fair class as Linux 6.18 runs it, EEVDF
# (SCHED_POLICY_EEVDF), all threads nice 0 (docs/design.md, "Host CPUs and
# vCPU threads").  Under EEVDF the run-queue list is the cfs_rq's tree: the
# waiting threads and the delayed ones, in insertion order (the kernel's
# tie-break among equal deadlines); the current thread is cpu.cur.


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
    e.nqueued += 1


cdef inline int32_t rq_popleft(engine_t* e, cpu_t* cpu) noexcept nogil:
    cdef int32_t g = cpu.rq_head
    cpu.rq_head = e.th[g].rq_next
    if cpu.rq_head < 0:
        cpu.rq_tail = -1
    cpu.rq_len -= 1
    e.nqueued -= 1
    e.th[g].rq_next = -1
    return g


cdef int make_runnable(engine_t* e, uint32_t g, uint64_t t, uint64_t delay) noexcept nogil:
    """try_to_wake_up: the thread waits for its host CPU (``delay`` ns on an idle one)."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    cdef thread_t* cur
    if cpu.cur >= 0 and poll_settle(e, <uint32_t>cpu.cur):
        return -1
    if e.sched == SCHED_POLICY_EEVDF:
        return ttwu_fair(e, g, t, delay)
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
    if e.sched == SCHED_POLICY_EEVDF:
        return arm_tick(e, th, g, t)
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
    if e.sched == SCHED_POLICY_EEVDF:
        # It sleeps (blocks, exits to userspace): dequeue_entity(DEQUEUE_SLEEP).
        dequeue_sleep(e, cpu, th, t)
        return schedule_fair(e, cpu, t, cost_ns(e, th, COST_CONTEXT_SWITCH))
    if cpu.rq_len:
        nxt = rq_popleft(e, cpu)
        cpu.cur = nxt
        return push_thread(e, &e.th[nxt], <uint32_t>nxt, t + cost_ns(e, th, COST_CONTEXT_SWITCH),
                           EV_RUN)
    cpu.cur = -1
    return sched_balance_newidle(e, th.pcpu, t)


# -- A vCPU thread in userspace keeps its CPU (EEVDF) ---------------------------------
# KVM_RUN returning to userspace is not a sleep: the thread stays TASK_RUNNING,
# current on its CPU, while the VMM handles the exit, and the next ioctl(KVM_RUN)
# goes on from there (vcpu_put()/vcpu_load() only, no dequeue, no place_entity()).
# Userspace takes no virtual time, so the thread is "held": current, in state
# USER, until it re-enters at the same instant (reenter_held) or the clock is about
# to move on without it (release_held: the VMM then waits for something, a
# sleep at its exit time).  Held threads are derived from the state (a USER vCPU
# thread that is its CPU's current one); e.held lists them in thread order.
# FIFO keeps the old rule: the thread leaves its CPU at the exit.


cdef inline bint is_held(engine_t* e, uint32_t g) noexcept nogil:
    """A vCPU thread outside KVM_RUN that is still its CPU's current thread."""
    return e.th[g].state == TS_USER and e.cpus[e.th[g].pcpu].cur == <int32_t>g


cdef void hold_cpu(engine_t* e, thread_t* th, uint32_t g) noexcept nogil:
    """exit_to_user under EEVDF: the thread keeps its CPU, its slice tick void."""
    cdef uint32_t i = e.nheld
    th.run_gen += 1
    th.slice_armed = 0
    while i > 0 and e.held[i - 1] > g:
        e.held[i] = e.held[i - 1]
        i -= 1
    e.held[i] = g
    e.nheld += 1


cdef void drop_held(engine_t* e, uint32_t g) noexcept nogil:
    """g out of e.held."""
    cdef uint32_t i, j = 0
    for i in range(e.nheld):
        if e.held[i] != g:
            e.held[j] = e.held[i]
            j += 1
    e.nheld = j


cdef int unhold(engine_t* e, uint32_t g) noexcept nogil:
    """A held thread (out of e.held) leaves its CPU at its exit time."""
    cdef thread_t* th = &e.th[g]
    if e.tlcap:
        th.state = TS_RUNNING               # the timeline: running until now
        tl_note(e, th, g, th.exit_time, TS_USER)
        th.state = TS_USER
    return release_cpu(e, th, th.exit_time)


cdef int release_held(engine_t* e) noexcept nogil:
    """The clock moves on: every held thread leaves its CPU at its exit time (in
    thread order), as a thread that blocks in userspace does."""
    cdef uint32_t i, n = e.nheld
    e.nheld = 0
    for i in range(n):
        # (Releasing one changes no other CPU's current thread: e.held stays.)
        if unhold(e, e.held[i]):
            return -1
    return 0


cdef int reenter_held(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """KVM_RUN again from a held thread: it is still current, so no wake-up and
    no update_curr() (none runs on a system call); a reschedule a wake-up asked
    for meanwhile (wakeup_preempt()) is taken on the way in, as the return to
    userspace would have (exit_to_user_mode_loop: schedule())."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    drop_held(e, g)
    if cpu.need_resched:
        if e.tlcap:
            th.state = TS_RUNNING
            tl_note(e, th, g, t, TS_RUNNABLE)
        th.state = TS_RUNNABLE
        if preempt_fair(e, cpu, g, t):
            return -1
        if cpu.cur != <int32_t>g:
            return 0
    if e.tlcap:
        th.state = TS_RUNNING               # no record: it never left the CPU
    return got_cpu(e, g, t)


cdef int got_cpu(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    if e.sched == SCHED_POLICY_EEVDF and cpu.need_resched:
        # A reschedule was requested while it switched in: __schedule() again.
        if preempt_fair(e, cpu, g, t):
            return -1
        if cpu.cur != <int32_t>g:
            return 0
    if e.tlcap:
        tl_note(e, th, g, t, TS_RUNNING)
    th.state = TS_RUNNING
    th.run_start = t
    if e.cpus[th.pcpu].rq_len:
        if arm_slice(e, th, g, t):
            return -1
    if th.kind == THREAD_HOST:
        return ht_got_cpu(e, g, t)
    if th.resume == RESUME_START:
        return enter(e, g, t, cost_ns(e, th, COST_VM_ENTRY))
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
        return enter(e, g, t, cost_ns(e, th, COST_VM_ENTRY))
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


cdef inline void keep_segment_rest(engine_t* e, thread_t* th, uint64_t t) noexcept nogil:
    """A running thread leaves its CPU at t: the rest of its segment, for later; its
    pending segment event is void (``th.gen``)."""
    cdef uint64_t extra
    th.rem_end = th.seg_end - t
    th.rem_gfrom = (th.seg_gfrom if th.seg_gfrom > t else t) - t
    th.rem_gto = (th.seg_gto if th.seg_gto > t else t) - t
    if th.seg_gfrom <= t < th.seg_gto:
        # Preempted in guest mode: it exits now and re-enters when resumed.
        extra = cost_ns(e, th, COST_VM_EXIT)
        extra += cost_ns(e, th, COST_VM_ENTRY)
        th.rem_end += extra
        th.rem_gfrom += extra
        th.rem_gto += extra
    th.gen += 1


cdef void preempt_segment(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    """A running thread is preempted at t: it keeps the rest of its segment."""
    if th.kind == THREAD_HOST:
        ht_preempted(e, th, g, t)
    keep_segment_rest(e, th, t)
    if e.tlcap:
        tl_note(e, th, g, t, TS_RUNNABLE)
    th.state = TS_RUNNABLE
    th.resume = RESUME_SEGMENT


cdef int slice_end(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    if th.poll_seq:
        # A lazy poll window that ran out first: the thread left its CPU then
        # (as its POLL_END event would have had it), so this slice is void.
        if poll_settle(e, g):
            return -1
        if th.state != TS_POLLING:
            return 0
    th.slice_armed = 0
    if e.sched == SCHED_POLICY_EEVDF:
        return task_tick_fair(e, g, t)
    if th.state != TS_RUNNING or not e.cpus[th.pcpu].rq_len:
        return 0
    # Preempted: keep the rest of the segment for later.
    preempt_segment(e, th, g, t)
    rq_append(e, &e.cpus[th.pcpu], g)
    if release_cpu(e, th, t):
        return -1
    return migrate_disallowed(e, g, t)


cdef inline bint single_task_running(engine_t* e, uint32_t c) noexcept nogil:
    """single_task_running(): rq->nr_running == 1 on the (polling) thread's CPU.
    Under EEVDF a delayed-dequeue thread is still queued and counts."""
    return e.cpus[c].rq_len == 0


# -- EEVDF: kernel/sched/fair.c of Linux 6.18, every thread nice 0 ------------------------
# With equal weights (NICE_0_LOAD) calc_delta_fair() is the identity and the
# weighted sums reduce to plain ones: V = floor(sum v / n), eligible(v) iff
# sum v >= n v, lag scaling (n + 1) / n.  All slices are the base slice, so
# set_protect_slice() sets vprot = deadline and PREEMPT_SHORT never applies.

cdef inline uint32_t nr_queued(cpu_t* cpu) noexcept nogil:
    """cfs_rq->nr_queued (= rq->nr_running here): current, waiting and delayed."""
    return cpu.rq_len + (1 if cpu.cur >= 0 else 0)


cdef inline int64_t avg_vruntime(cpu_t* cpu) noexcept nogil:
    """avg_vruntime(): V, the floor of the queued vruntimes' mean; it moves
    zero_vruntime to V (update_zero_vruntime); an empty queue keeps the last V."""
    cdef int64_t n = nr_queued(cpu)
    cdef int64_t s, delta
    if n:
        s = cpu.sum_v
        if s < 0:
            s -= n - 1
        delta = s / n
        cpu.zero_v += delta
        cpu.sum_v -= delta * n
    return cpu.zero_v


cdef inline bint vruntime_eligible(cpu_t* cpu, int64_t v) noexcept nogil:
    """vruntime_eligible(): v <= V, without a division."""
    return cpu.sum_v >= (v - cpu.zero_v) * <int64_t>nr_queued(cpu)


cdef inline void update_entity_lag(engine_t* e, cpu_t* cpu, thread_t* th) noexcept nogil:
    """update_entity_lag(): vlag = V - v, clamped to +-(max slice + TICK_NSEC)."""
    cdef int64_t lim = <int64_t>e.base_slice + SCHED_TICK_NSEC
    cdef int64_t lag = avg_vruntime(cpu) - th.vruntime
    if lag > lim:
        lag = lim
    elif lag < -lim:
        lag = -lim
    th.vlag = lag


cdef inline void place_entity(engine_t* e, cpu_t* cpu, thread_t* th) noexcept nogil:
    """place_entity() (PLACE_LAG; no ENQUEUE_INITIAL: a vCPU thread exists before
    it first runs): v = V - vlag * (n + 1) / n (C division), d = v + slice."""
    cdef int64_t vr = avg_vruntime(cpu)
    cdef int64_t n = nr_queued(cpu)
    cdef int64_t lag = 0
    if n and th.vlag:
        lag = th.vlag * (n + 1) / n
    th.vruntime = vr - lag
    th.deadline = th.vruntime + <int64_t>e.base_slice


cdef inline int64_t next_tick(uint64_t t) noexcept nogil:
    """The first jiffy (HZ=250, one grid for every CPU) after t."""
    return <int64_t>((t / SCHED_TICK_NSEC + 1) * SCHED_TICK_NSEC)


cdef bint update_curr(engine_t* e, cpu_t* cpu, uint64_t t) noexcept nogil:
    """update_curr() + update_deadline(): the current thread's vruntime advances by
    its run time; 1 if it asks for a reschedule (its request is used up, or its
    protected slice, with another thread queued).

    The ticks that fell in (exec_start, t] without an event of their own (a
    thread alone on its CPU needs none) ran update_deadline() too: a deadline
    reached at a tick was renewed from that tick's vruntime, and (the base
    slice being shorter than a tick) at every later tick as well."""
    cdef int32_t g = cpu.cur
    cdef thread_t* th
    cdef int64_t a, v0, first, need, last
    cdef bint resched = 0
    if g < 0:
        return 0
    th = &e.th[g]
    if t <= th.exec_start:
        return 0
    a = <int64_t>th.exec_start
    v0 = th.vruntime
    th.exec_start = t
    th.vruntime += <int64_t>t - a
    cpu.sum_v += <int64_t>t - a
    first = next_tick(<uint64_t>a)
    if first <= <int64_t>t:
        need = a + (th.deadline - v0)           # v(T) = v0 + T - a >= deadline
        if need > first:
            first = (need + SCHED_TICK_NSEC - 1) / SCHED_TICK_NSEC * SCHED_TICK_NSEC
        if first <= <int64_t>t:
            last = <int64_t>(t / SCHED_TICK_NSEC * SCHED_TICK_NSEC)
            th.deadline = v0 + (last - a) + <int64_t>e.base_slice
    if th.vruntime >= th.deadline:              # update_deadline()
        th.deadline = th.vruntime + <int64_t>e.base_slice
        avg_vruntime(cpu)
        resched = 1
    if nr_queued(cpu) == 1:
        return 0
    return resched or th.vruntime >= th.vprot


cdef int32_t pick_eevdf(engine_t* e, cpu_t* cpu, bint skip_delayed) noexcept nogil:
    """pick_eevdf() (__pick_eevdf with protect): the one queued entity; else the
    current one inside its protected slice (RUN_TO_PARITY) if eligible; else
    the eligible entity with the earliest deadline (the earlier queued on a
    tie), the current one only if strictly earlier.  ``skip_delayed``: the
    delayed-dequeue sleepers are no candidates (they still count in V)."""
    cdef int32_t c = cpu.cur
    cdef int32_t best = -1
    cdef int32_t x
    if nr_queued(cpu) == 1:
        return c if c >= 0 else cpu.rq_head
    if c >= 0 and not vruntime_eligible(cpu, e.th[c].vruntime):
        c = -1
    if c >= 0 and e.th[c].vruntime < e.th[c].vprot:
        return c
    x = cpu.rq_head
    while x >= 0:
        if (best < 0 or e.th[x].deadline < e.th[best].deadline) \
                and not (skip_delayed and e.th[x].sched_delayed) \
                and vruntime_eligible(cpu, e.th[x].vruntime):
            best = x
        x = e.th[x].rq_next
    if best < 0 or (c >= 0 and e.th[c].deadline < e.th[best].deadline):
        best = c
    return best


cdef void rq_remove(engine_t* e, cpu_t* cpu, int32_t g) noexcept nogil:
    """__dequeue_entity(): take g out of the run-queue list."""
    cdef int32_t x = cpu.rq_head
    cdef int32_t prev = -1
    while x != g:
        prev = x
        x = e.th[x].rq_next
    if prev < 0:
        cpu.rq_head = e.th[g].rq_next
    else:
        e.th[prev].rq_next = e.th[g].rq_next
    if cpu.rq_tail == g:
        cpu.rq_tail = prev
    cpu.rq_len -= 1
    e.nqueued -= 1
    e.th[g].rq_next = -1


cdef void finish_delayed_dequeue(engine_t* e, cpu_t* cpu, int32_t g) noexcept nogil:
    """dequeue_entities(DEQUEUE_SLEEP | DEQUEUE_DELAYED) of a delayed thread picked
    by pick_next_entity(): update_entity_lag(), out of the queue, and
    finish_delayed_dequeue_entity(): DELAY_ZERO clips a positive lag to 0."""
    cdef thread_t* th = &e.th[g]
    update_entity_lag(e, cpu, th)
    cpu.sum_v -= th.vruntime - cpu.zero_v
    rq_remove(e, cpu, g)
    th.on_rq = 0
    th.sched_delayed = 0
    if th.vlag > 0:
        th.vlag = 0


cdef int32_t pick_next_task_fair(engine_t* e, cpu_t* cpu) noexcept nogil:
    """pick_next_task_fair(): pick_eevdf(), dequeueing the delayed entities it
    returns and picking again; -1 when nothing is left (the CPU goes idle)."""
    cdef int32_t x
    while nr_queued(cpu):
        x = pick_eevdf(e, cpu, False)
        if x != cpu.cur and e.th[x].sched_delayed:
            finish_delayed_dequeue(e, cpu, x)
            continue
        return x
    return -1


cdef int set_next_entity(engine_t* e, cpu_t* cpu, int32_t g, uint64_t t,
                         uint64_t delay) noexcept nogil:
    """set_next_entity(first): g leaves the tree and becomes current, its
    protected slice set (set_protect_slice: vprot = deadline with equal slices);
    it runs after ``delay`` ns (the context switch, or the wake-up from idle)."""
    cdef thread_t* th = &e.th[g]
    rq_remove(e, cpu, g)
    cpu.cur = g
    th.exec_start = t
    th.vprot = th.deadline
    return push_thread(e, th, <uint32_t>g, t + delay, EV_RUN)


cdef int schedule_fair(engine_t* e, cpu_t* cpu, uint64_t t, uint64_t delay) noexcept nogil:
    """__schedule() on a CPU whose thread has left it: the next pick, or idle."""
    cdef int32_t x = pick_next_task_fair(e, cpu)
    cpu.need_resched = 0
    if x < 0:
        return sched_balance_newidle(e, <uint32_t>(cpu - e.cpus), t)
    return set_next_entity(e, cpu, x, t, delay)


cdef void dequeue_sleep(engine_t* e, cpu_t* cpu, thread_t* th, uint64_t t) noexcept nogil:
    """dequeue_entity(DEQUEUE_SLEEP) of the current thread, then put_prev_entity():
    an ineligible sleeper stays queued, delayed (DELAY_DEQUEUE), and counts in
    nr_running; an eligible one leaves with its lag."""
    cdef int32_t g = cpu.cur
    update_curr(e, cpu, t)
    if not vruntime_eligible(cpu, th.vruntime):
        th.sched_delayed = 1
        cpu.cur = -1
        rq_append(e, cpu, g)
    else:
        update_entity_lag(e, cpu, th)
        cpu.sum_v -= th.vruntime - cpu.zero_v
        cpu.cur = -1
        th.on_rq = 0


cdef int preempt_fair(engine_t* e, cpu_t* cpu, uint32_t g, uint64_t t) noexcept nogil:
    """__schedule() with the current thread g still runnable (a reschedule
    request): pick again; a re-pick keeps g (and its stale vprot), another
    pick preempts it."""
    cdef thread_t* th = &e.th[g]
    cdef int32_t x
    update_curr(e, cpu, t)
    cpu.need_resched = 0
    x = pick_next_task_fair(e, cpu)
    if x == <int32_t>g:
        if th.state == TS_RUNNING:
            return arm_tick(e, th, g, t)
        return 0
    if th.state == TS_RUNNING:
        preempt_segment(e, th, g, t)
    th.run_gen += 1
    th.slice_armed = 0
    cpu.cur = -1
    rq_append(e, cpu, <int32_t>g)                   # put_prev_entity
    if set_next_entity(e, cpu, x, t, cost_ns(e, th, COST_CONTEXT_SWITCH)):
        return -1
    return migrate_disallowed(e, g, t)


cdef int arm_tick(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    """The first tick at which task_tick_fair() will reschedule the running
    thread g (v >= vprot), if another thread is queued (no HRTICK: a slice's
    end is noticed at a tick).  Ticks with nothing to do get no event."""
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    cdef int64_t target, at
    if th.slice_armed or nr_queued(cpu) < 2:
        return 0
    th.slice_armed = 1
    target = <int64_t>th.exec_start
    if th.vprot > th.vruntime:
        target += th.vprot - th.vruntime
    at = (target + SCHED_TICK_NSEC - 1) / SCHED_TICK_NSEC * SCHED_TICK_NSEC
    if at <= <int64_t>t:
        at = next_tick(t)
    return heap_push(e, <uint64_t>at, EV_SLICE, g, th.run_gen)


cdef int task_tick_fair(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """task_tick_fair() -> entity_tick() -> update_curr() on the running thread;
    or the preemption point after a resched_curr()."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    if th.state != TS_RUNNING or cpu.cur != <int32_t>g:
        return 0
    if update_curr(e, cpu, t) or cpu.need_resched:
        return preempt_fair(e, cpu, g, t)
    return arm_tick(e, th, g, t)


cdef void check_preempt_wakeup_fair(engine_t* e, cpu_t* cpu, int32_t p,
                                    uint64_t t) noexcept nogil:
    """check_preempt_wakeup_fair(): nothing if a reschedule is pending; else
    update_curr(), and preempt if p is now what pick_eevdf() would run (with
    e.preempt_skips_delayed, what it would run among the threads that are not
    delayed-dequeue sleepers: the host kernels kvmwake is held against decide
    so, docs/design.md "The EEVDF scheduler")."""
    if cpu.need_resched:
        return
    if update_curr(e, cpu, t) or pick_eevdf(e, cpu, e.preempt_skips_delayed) == p:
        cpu.need_resched = 1


cdef inline void requeue_delayed_entity(engine_t* e, cpu_t* cpu, uint32_t g) noexcept nogil:
    """requeue_delayed_entity() (ttwu_runnable of a delayed sleeper, no
    update_curr() first): re-placed at V only if its lag became positive
    (DELAY_ZERO), and no longer delayed."""
    cdef thread_t* th = &e.th[g]
    update_entity_lag(e, cpu, th)
    if th.vlag > 0:
        cpu.sum_v -= th.vruntime - cpu.zero_v
        rq_remove(e, cpu, <int32_t>g)
        th.vlag = 0
        place_entity(e, cpu, th)
        cpu.sum_v += th.vruntime - cpu.zero_v
        rq_append(e, cpu, <int32_t>g)
    th.sched_delayed = 0


cdef inline void enqueue_entity(engine_t* e, cpu_t* cpu, uint32_t g, uint64_t t) noexcept nogil:
    """enqueue_entity(ENQUEUE_WAKEUP) of a thread that is not queued: update_curr()
    with the old nr_queued (a reschedule it asks for is kept), place_entity(),
    into the queue."""
    cdef thread_t* th = &e.th[g]
    if update_curr(e, cpu, t):
        cpu.need_resched = 1
    place_entity(e, cpu, th)
    cpu.sum_v += th.vruntime - cpu.zero_v
    th.on_rq = 1
    rq_append(e, cpu, <int32_t>g)


cdef int ttwu_fair(engine_t* e, uint32_t g, uint64_t t, uint64_t delay) noexcept nogil:
    """try_to_wake_up() under EEVDF: a delayed thread is requeued in place
    (ttwu_runnable -> requeue_delayed_entity); another is enqueued with its lag
    (enqueue_entity -> place_entity); then wakeup_preempt().  A CPU that was
    idle switches to it after ``delay`` ns; a polling thread stops polling
    (single_task_running() is false); a running one is preempted at once if a
    reschedule was requested (TIF_NEED_RESCHED acted on at once for vCPU
    threads), else its next slice-ending tick is armed."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    cdef thread_t* cur
    if th.on_rq:
        requeue_delayed_entity(e, cpu, g)
    elif cpu.cur < 0 and cpu.rq_len == 0:
        # An idle CPU (empty queue): place_entity() puts it at V (no lag with
        # nothing queued), and the pick is it (the general path, shortened).
        th.vruntime = cpu.zero_v
        th.deadline = th.vruntime + <int64_t>e.base_slice
        th.on_rq = 1
        cpu.cur = <int32_t>g
        cpu.need_resched = 0
        th.exec_start = t
        th.vprot = th.deadline
        return push_thread(e, th, g, t + delay, EV_RUN)
    else:
        enqueue_entity(e, cpu, g, t)
        if cpu.cur < 0:
            # Woken onto the idle task: resched_curr(), and the pick is g.
            return schedule_fair(e, cpu, t, delay)
    check_preempt_wakeup_fair(e, cpu, <int32_t>g, t)
    cur = &e.th[cpu.cur]
    if cur.state == TS_POLLING:
        # kvm_vcpu_can_poll: single_task_running() is now false.
        return block(e, <uint32_t>cpu.cur, t, t)
    if cur.state != TS_RUNNING:
        return 0                    # it switches in; got_cpu() acts on need_resched
    if cpu.need_resched:
        return resched_curr(e, cur, <uint32_t>cpu.cur, t)
    return arm_tick(e, cur, <uint32_t>cpu.cur, t)


cdef int resched_curr(engine_t* e, thread_t* th, uint32_t g, uint64_t t) noexcept nogil:
    """resched_curr(): the running thread g reschedules at its next preemption
    point, an event at t after the one being handled (g may be the waker, in
    the middle of its own work); it replaces g's armed tick."""
    th.run_gen += 1
    th.slice_armed = 1
    return heap_push(e, t, EV_SLICE, g, th.run_gen)


# -- Placement: kernel/sched/core.c (select_task_rq, set_task_cpu, select_fallback_rq,
# is_cpu_allowed) and kernel/sched/fair.c of Linux 6.18 (select_task_rq_fair,
# wake_affine, wake_affine_idle, wake_affine_weight, select_idle_sibling,
# select_idle_cpu, available_idle_cpu, cpus_share_cache, sched_balance_newidle,
# sched_balance_rq, can_migrate_task, task_hot) in outline (docs/design.md,
# "Placement").  A thread allowed on one CPU never moves: the pinned default
# keeps every result of before.

cdef extern from *:
    """
    #define kw_popcount64(x) ((uint32_t)__builtin_popcountll(x))
    """
    uint32_t kw_popcount64(uint64_t x) nogil

cdef enum:
    AFF_PINNED = 0            # CPU g % ncpu (the default)
    AFF_ALL = 1               # every CPU
    AFF_LIST = 2              # a mask in engine_t.affmask
    SCHED_MIGRATION_COST_NS = 500000    # sysctl_sched_migration_cost
    SD_LLC_IMBALANCE_PCT = 117          # sd->imbalance_pct of the LLC (MC) domain


cdef inline bint cpu_allowed(engine_t* e, uint32_t g, uint32_t c) noexcept nogil:
    """is_cpu_allowed(): c is in thread g's p->cpus_ptr."""
    cdef thread_t* th = &e.th[g]
    if th.aff_kind == AFF_ALL:
        return 1
    if th.aff_kind == AFF_PINNED:
        return c == g % e.ncpu
    return (e.affmask[th.aff_off + (c >> 6)] >> (c & 63)) & 1


cdef inline uint32_t nr_cpus_allowed(engine_t* e, uint32_t g) noexcept nogil:
    """p->nr_cpus_allowed."""
    cdef thread_t* th = &e.th[g]
    cdef uint32_t w, n = 0
    if th.aff_kind == AFF_ALL:
        return e.ncpu
    if th.aff_kind == AFF_PINNED:
        return 1
    for w in range(e.aff_words):
        n += kw_popcount64(e.affmask[th.aff_off + w])
    return n


cdef uint32_t nth_allowed(engine_t* e, uint32_t g, uint32_t k) noexcept nogil:
    """The k-th CPU (from 0, in CPU order) of thread g's allowed set (k < the count)."""
    cdef uint32_t c
    for c in range(e.ncpu):
        if cpu_allowed(e, g, c):
            if k == 0:
                return c
            k -= 1
    return 0


cdef inline bint available_idle_cpu(engine_t* e, uint32_t c) noexcept nogil:
    """available_idle_cpu() -> idle_cpu(): nothing current or switching in, nothing
    queued (a delayed-dequeue sleeper counts in nr_running)."""
    return e.cpus[c].cur < 0 and e.cpus[c].rq_len == 0


cdef inline bint cpus_share_cache(engine_t* e, uint32_t a, uint32_t b) noexcept nogil:
    return e.llc[a] == e.llc[b]


cdef uint32_t select_task_rq_fork(engine_t* e, uint32_t g) noexcept nogil:
    """A new thread's first CPU (wake_up_new_task's placement, simplified): the
    (g mod n)-th of its n allowed CPUs, so that threads created one after another
    spread over their CPUs; pinned and "all" give CPU g % ncpu."""
    return nth_allowed(e, g, g % nr_cpus_allowed(e, g))


cdef inline uint32_t select_fallback_rq(engine_t* e, uint32_t g) noexcept nogil:
    """select_fallback_rq(): the chosen CPU is not allowed: the first allowed one
    (no NUMA nodes, every CPU active)."""
    return nth_allowed(e, g, 0)


cdef int32_t select_idle_cpu(engine_t* e, uint32_t g, uint32_t target) noexcept nogil:
    """select_idle_cpu(): the first idle CPU of target's LLC that g may use, in
    CPU order from target + 1, wrapping (the whole LLC: SIS_UTIL's scan limit is
    not modelled); -1 if none."""
    cdef uint32_t i, x
    for i in range(1, e.ncpu + 1):
        x = (target + i) % e.ncpu
        if e.llc[x] == e.llc[target] and cpu_allowed(e, g, x) and available_idle_cpu(e, x):
            return <int32_t>x
    return -1


cdef uint32_t select_idle_sibling(engine_t* e, uint32_t g, uint32_t prev,
                                  uint32_t target) noexcept nogil:
    """select_idle_sibling(): target if idle; else prev if it shares target's LLC
    and is idle; else an idle CPU of target's LLC (select_idle_cpu); else target.
    (No SMT siblings, so no idle-core search; recent_used_cpu is not modelled.)"""
    cdef int32_t i
    if available_idle_cpu(e, target):
        return target
    if prev != target and cpus_share_cache(e, prev, target) and available_idle_cpu(e, prev):
        return prev
    i = select_idle_cpu(e, g, target)
    if i >= 0:
        return <uint32_t>i
    return target


cdef uint32_t wake_affine(engine_t* e, uint32_t this_cpu, uint32_t prev) noexcept nogil:
    """wake_affine() without WF_SYNC: wake_affine_idle() (this CPU if it is idle and
    shares prev's cache while prev is busy; prev if idle), else wake_affine_weight()
    with loads as run-queue lengths (nr_running x NICE_0_LOAD, the waking thread's
    blocked load on prev cancelling out, equal capacities): this CPU if
    (nr(this) + 1) * 100 < nr(prev) * (100 + (imbalance_pct - 100) / 2)."""
    cdef uint64_t this_eff, prev_eff
    if available_idle_cpu(e, this_cpu) and cpus_share_cache(e, this_cpu, prev):
        return prev if available_idle_cpu(e, prev) else this_cpu
    if available_idle_cpu(e, prev):
        return prev
    this_eff = (<uint64_t>nr_queued(&e.cpus[this_cpu]) + 1) * 100
    prev_eff = <uint64_t>nr_queued(&e.cpus[prev]) * (100 + (SD_LLC_IMBALANCE_PCT - 100) / 2)
    return this_cpu if this_eff < prev_eff else prev


cdef uint32_t select_task_rq(engine_t* e, uint32_t g, int32_t waker_cpu) noexcept nogil:
    """select_task_rq() for a wake-up of thread g: its one CPU if it has one; under
    EEVDF select_task_rq_fair() (wake_affine() towards the waker's CPU when the
    waker runs elsewhere on a CPU g may use, no wake_wide(); then the fast path,
    select_idle_sibling()); under FIFO its previous CPU if idle, else the first
    idle CPU it may use, else the previous one.  waker_cpu < 0 (no waking thread:
    a timer, a device interrupt, userspace) stands for the previous CPU, as an
    interrupt arriving there.  A choice g may not use falls back
    (select_fallback_rq)."""
    cdef thread_t* th = &e.th[g]
    cdef uint32_t prev = th.pcpu, cpu, c
    if nr_cpus_allowed(e, g) == 1:
        cpu = nth_allowed(e, g, 0)                  # cpumask_any(p->cpus_ptr)
    elif e.sched == SCHED_POLICY_EEVDF:
        cpu = prev
        if waker_cpu >= 0 and <uint32_t>waker_cpu != prev and cpu_allowed(e, g, <uint32_t>waker_cpu):
            cpu = wake_affine(e, <uint32_t>waker_cpu, prev)
        cpu = select_idle_sibling(e, g, prev, cpu)
    else:
        cpu = prev
        if not (cpu_allowed(e, g, prev) and available_idle_cpu(e, prev)):
            for c in range(e.ncpu):
                if cpu_allowed(e, g, c) and available_idle_cpu(e, c):
                    cpu = c
                    break
    if not cpu_allowed(e, g, cpu):
        cpu = select_fallback_rq(e, g)
    return cpu


cdef inline void set_task_cpu(engine_t* e, uint32_t g, uint32_t cpu) noexcept nogil:
    """set_task_cpu(): onto another CPU, se.nr_migrations += 1 (sched_migrate_task).
    The thread's lag is relative, so place_entity() on the new CPU uses it as is."""
    cdef thread_t* th = &e.th[g]
    if th.pcpu != cpu:
        th.pcpu = cpu
        th.nr_migrations += 1


cdef int32_t vcpu_pack_cpu(engine_t* e, uint32_t g) noexcept nogil:
    """The vCPU-pack wake placement of the host kernels kvmwake is held against
    (a vendor scheduler option, the sysctl kernel.sched_vcpu_pack; not in
    upstream Linux, docs/design.md "Placement"): a vCPU thread woken by another
    vCPU thread of its VM goes to the waker's CPU when the waker is alone there
    (its only runnable thread: nr_running less the delayed-dequeue sleepers,
    1) and g may run there, idle CPUs elsewhere notwithstanding.  The
    waker's CPU, or -1 where the rule does not apply."""
    cdef int32_t w = e.waker
    cdef int32_t x
    cdef uint32_t c
    if not e.vcpu_pack or e.sched != SCHED_POLICY_EEVDF or w < 0 or w == <int32_t>g:
        return -1
    if e.th[g].kind != THREAD_VCPU or e.th[w].kind != THREAD_VCPU or e.th[w].vm != e.th[g].vm:
        return -1
    c = e.th[w].pcpu
    if e.cpus[c].cur != w or not cpu_allowed(e, g, c):
        return -1
    x = e.cpus[c].rq_head
    while x >= 0:
        if not e.th[x].sched_delayed:
            return -1                                # another runnable thread waits there
        x = e.th[x].rq_next
    return <int32_t>c


cdef void ttwu_select(engine_t* e, uint32_t g) noexcept nogil:
    """try_to_wake_up()'s placement, before the thread is made runnable: a thread
    still queued (a delayed-dequeue sleeper) wakes where it is (ttwu_runnable);
    another goes where vcpu_pack_cpu() or else select_task_rq() says, the waker
    being the thread whose event is being handled (a pinned thread on its CPU
    stays, without a look)."""
    cdef int32_t waker_cpu = -1
    cdef int32_t pack
    if e.th[g].on_rq or (e.th[g].aff_kind == AFF_PINNED and e.th[g].pcpu == g % e.ncpu):
        return
    pack = vcpu_pack_cpu(e, g)
    if pack >= 0:
        set_task_cpu(e, g, <uint32_t>pack)
        return
    if e.waker >= 0 and e.waker != <int32_t>g:
        waker_cpu = <int32_t>e.th[e.waker].pcpu
    set_task_cpu(e, g, select_task_rq(e, g, waker_cpu))



cdef int try_to_wake_up(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """try_to_wake_up() of a sleeping thread (a blocked vCPU thread, a host thread
    at its hrtimer): placed (ttwu_select), RUNNABLE, and onto its CPU
    (make_runnable: ``wake_to_run_ns`` on an idle one, drawn from its stream)."""
    cdef thread_t* th = &e.th[g]
    th.wake_ts = t
    ttwu_select(e, g)
    if e.tlcap:
        tl_note(e, th, g, t, TS_RUNNABLE)
    th.state = TS_RUNNABLE
    return make_runnable(e, g, t, cost_ns(e, th, COST_WAKE_TO_RUN))

cdef void detach_queued(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """detach_task() -> deactivate_task() of a waiting thread (not current, not
    delayed): out of its CPU's queue; under EEVDF dequeue_entity() without
    DEQUEUE_SLEEP: update_curr() of that CPU (a reschedule it asks for is acted
    on as after a wake-up), then update_entity_lag(), so the lag goes along."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    if e.sched == SCHED_POLICY_EEVDF:
        if update_curr(e, cpu, t) and (e.th[cpu.cur].state == TS_RUNNING
                                       or e.th[cpu.cur].state == TS_RUNNABLE):
            cpu.need_resched = 1
        update_entity_lag(e, cpu, th)
        cpu.sum_v -= th.vruntime - cpu.zero_v
        th.on_rq = 0
    rq_remove(e, cpu, <int32_t>g)


cdef int attach_queued(engine_t* e, uint32_t g, uint32_t dst, uint64_t t,
                       uint64_t delay) noexcept nogil:
    """attach_task() -> activate_task() on dst: set_task_cpu(), then the enqueue and
    wakeup_preempt() of a wake-up (place_entity() with the thread's lag; PLACE_REL_DEADLINE
    is not modelled: the deadline is a fresh slice); an idle dst runs it after
    ``delay`` ns.  A reschedule the source CPU's update_curr() asked for is then
    acted on."""
    cdef uint32_t src = e.th[g].pcpu
    cdef cpu_t* scpu = &e.cpus[src]
    set_task_cpu(e, g, dst)
    if make_runnable(e, g, t, delay):
        return -1
    if scpu.need_resched and scpu.cur >= 0 and e.th[scpu.cur].state == TS_RUNNING:
        return resched_curr(e, &e.th[scpu.cur], <uint32_t>scpu.cur, t)
    return 0


cdef inline bint task_hot(engine_t* e, thread_t* th, uint64_t t) noexcept nogil:
    """task_hot(): it ran within sysctl_sched_migration_cost (500 us) of now
    (se.exec_start: when it last ran).  FIFO keeps no exec_start: never hot."""
    return e.sched == SCHED_POLICY_EEVDF and t - th.exec_start < SCHED_MIGRATION_COST_NS


cdef int32_t detach_one(engine_t* e, uint32_t src, uint32_t dst, uint64_t t,
                        bint* all_pinned) noexcept nogil:
    """detach_tasks() for one thread (a newly idle CPU's imbalance is one task):
    the first waiting thread of src's queue, in queue order, that can_migrate_task()
    allows: allowed on dst, not current, not delayed (a delayed sleeper counts as
    pinned here), not task_hot().  all_pinned stays set if none was allowed on dst."""
    cdef int32_t x = e.cpus[src].rq_head
    cdef thread_t* th
    while x >= 0:
        th = &e.th[x]
        if not th.sched_delayed and cpu_allowed(e, <uint32_t>x, dst):
            all_pinned[0] = 0
            if not task_hot(e, th, t):
                return x
        x = th.rq_next
    return -1


cdef int sched_balance_newidle(engine_t* e, uint32_t c, uint64_t t) noexcept nogil:
    """sched_balance_newidle(): CPU c is about to go idle; sched_balance_rq() at its
    LLC domain, then (several LLCs) at the whole host, pulls one waiting thread from
    the busiest CPU there (the most threads current or queued, at least 2; the
    lowest-numbered on a tie; outside c's LLC at the host level), skipping a CPU
    whose threads are all pinned (LBF_ALL_PINNED) for the next busiest; the pulled
    thread runs after context_switch_ns.  -1 on error.  As the kernel's, it
    returns at once when no CPU is overloaded (rd->overloaded: here, no thread
    waits in any run queue).  (No avg_idle / max_newidle_lb_cost cut-off, no
    periodic or NOHZ balancing.)"""
    cdef uint32_t level, x, best, bestn, n, lastn
    cdef int32_t last, p
    cdef bint all_pinned
    if e.nunpinned == 0 or e.nqueued == 0:
        # Nothing can move, or no CPU is overloaded (rd->overloaded clear: no
        # thread waits anywhere), so the balance pass would find nothing.
        return 0
    for level in range(2):
        lastn = <uint32_t>-1
        last = -1
        while True:
            # The next busiest after (lastn, last) in (most threads, lowest CPU) order.
            best = e.ncpu
            bestn = 1
            for x in range(e.ncpu):
                if x == c or (e.llc[x] == e.llc[c]) != (level == 0):
                    continue
                if e.cpu_isl != NULL and e.cpu_isl[x] != e.isl_id:
                    continue        # another island's: none of its threads may come here
                n = nr_queued(&e.cpus[x])
                if n > lastn or (n == lastn and <int32_t>x <= last):
                    continue
                if n > bestn:
                    bestn = n
                    best = x
            if best == e.ncpu:
                break
            all_pinned = 1
            p = detach_one(e, best, c, t, &all_pinned)
            if p >= 0:
                detach_queued(e, <uint32_t>p, t)
                return attach_queued(e, <uint32_t>p, c, t,
                                     cost_ns(e, &e.th[p], COST_CONTEXT_SWITCH))
            if not all_pinned:
                break               # hot threads: nothing moves at this level
            lastn = bestn
            last = <int32_t>best
    return 0


cdef int migrate_disallowed(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """After set_affinity (sched_setaffinity) or at a preemption point: a waiting
    thread on a CPU it may no longer use moves now (move_queued_task() to the
    first CPU it may use, woken from idle after wake_to_run_ns); a delayed sleeper
    there is dequeued for good (its next wake-up places it)."""
    cdef thread_t* th = &e.th[g]
    cdef cpu_t* cpu = &e.cpus[th.pcpu]
    if cpu_allowed(e, g, th.pcpu) or cpu.cur == <int32_t>g:
        return 0
    if th.sched_delayed:
        finish_delayed_dequeue(e, cpu, <int32_t>g)
        return 0
    if th.state != TS_RUNNABLE:
        return 0
    detach_queued(e, g, t)
    return attach_queued(e, g, select_fallback_rq(e, g), t, cost_ns(e, th, COST_WAKE_TO_RUN))
