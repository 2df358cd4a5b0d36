# core/halt.pxi (twin: kvmwake/reference/halt.py).
# Mirrors: virt/kvm/kvm_main.c kvm_vcpu_halt, kvm_vcpu_block,
# kvm_vcpu_check_block, grow_halt_poll_ns, shrink_halt_poll_ns,
# kvm_vcpu_max_halt_poll_ns, update_halt_poll_stats; the trapped WFI
# (arch/arm64/kvm/handle_exit.c kvm_handle_wfx -> kvm_vcpu_wfi) and HLT
# (arch/x86/kvm/x86.c __kvm_emulate_halt).
#
# kvm_vcpu_halt / kvm_vcpu_block (virt/kvm/kvm_main.c): the poll window, the
# block on the vCPU's single-waiter rcuwait, the halt stats, the grow/shrink
# rule with unsigned int arithmetic, and the two tracepoints.


from libc.stdlib cimport qsort


cdef inline uint32_t max_halt_poll_ns(engine_t* e, thread_t* th) noexcept nogil:
    """kvm_vcpu_max_halt_poll_ns."""
    cdef vm_t* vm = &e.vms[th.vm]
    return vm.max_halt_poll_ns if vm.override else e.halt_poll_ns


cdef inline bint check_block(engine_t* e, uint32_t g) noexcept nogil:
    """kvm_vcpu_check_block() < 0: runnable, or KVM_REQ_UNBLOCK (consumed)."""
    cdef thread_t* th = &e.th[g]
    if runnable(e, g) or th.sig_pending:
        return True
    if th.requests & REQ_UNBLOCK_BIT:
        th.requests &= ~(<uint64_t>REQ_UNBLOCK_BIT)
        return True
    return False


cdef inline void hist_update(uint64_t* st, int base, uint64_t ns) noexcept nogil:
    """KVM_STATS_LOG_HIST_UPDATE: bucket min(fls64(ns), 31)."""
    cdef int idx = 0
    if ns:
        idx = 64 - __builtin_clzll(ns)
        if idx > HALT_POLL_HIST_COUNT - 1:
            idx = HALT_POLL_HIST_COUNT - 1
    st[base + idx] += 1


cdef inline uint32_t grow_halt_poll_ns(engine_t* e, uint32_t val) noexcept nogil:
    """grow_halt_poll_ns: u32 multiply, raised to grow_start; no-op if grow is 0."""
    if e.grow == 0:
        return val
    val = val * e.grow
    if val < e.grow_start:
        val = e.grow_start
    return val


cdef inline uint32_t shrink_halt_poll_ns(engine_t* e, uint32_t val) noexcept nogil:
    """shrink_halt_poll_ns: divide (0 when shrink is 0), 0 below grow_start."""
    if e.shrink == 0:
        val = 0
    else:
        val = val // e.shrink
    if val < e.grow_start:
        val = 0
    return val


cdef int emulate_halt(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """The trapped WFI or HLT.

    arm64 (kvm_handle_wfx -> kvm_vcpu_wfi; its wfi_exit_stat was counted when
    the guest executed the WFI): kvm_vcpu_halt; the MP state stays RUNNABLE and
    the WFI is complete when the halt ends, whatever ended it.
    x86 (kvm_emulate_halt -> __kvm_emulate_halt with an in-kernel LAPIC): one
    halt_exits per HLT exit, here; the vCPU becomes HALTED unless
    kvm_vcpu_has_events, and vcpu_run's loop then blocks it (vcpu_block, in
    enter()); with an event already pending it stays RUNNABLE and re-enters the
    guest without entering kvm_vcpu_halt at all: no halt stat, no
    kvm_vcpu_wakeup, halt_poll_ns unchanged.
    """
    cdef thread_t* th = &e.th[g]
    if e.x86:
        e.stats[<uint64_t>g * NR_STATS + S_HALT_EXITS] += 1    # ++vcpu->stat.halt_exits
        if not runnable(e, g):
            th.mp_state = MP_HALTED
        return enter(e, g, t, cost_ns(e, th, COST_VM_ENTRY))
    return halt(e, g, t, HALT_WFI)


cdef int halt(engine_t* e, uint32_t g, uint64_t t, uint8_t kind) noexcept nogil:
    """kvm_vcpu_halt, up to the poll loop or the block."""
    cdef thread_t* th = &e.th[g]
    cdef uint32_t mx = max_halt_poll_ns(e, th)
    th.halt_kind = kind
    if th.halt_poll_ns > mx:
        th.halt_poll_ns = mx
    th.do_poll = th.halt_poll_ns != 0
    th.halt_start = t
    th.resume = RESUME_HALT
    if check_block(e, g):
        th.wake_ts = t
        return halt_done(e, g, t, 0, t, 1)
    if th.do_poll and single_task_running(e, th.pcpu):
        if e.tlcap:
            tl_note(e, th, g, t, TS_POLLING)
        th.state = TS_POLLING
        if lazy_polls(e):
            # The poll window's end, without an event: its time and the place its
            # POLL_END event would have had among equal times (after every event
            # queued so far, before every later one).
            th.gen += 1
            th.poll_stop = t + th.halt_poll_ns
            th.poll_seq = e.seq + 1
            e.nlazy += 1
            return 0
        return push_thread(e, th, g, t + th.halt_poll_ns, EV_POLL_END)
    return block(e, g, t, t)


# -- Lazy poll ends -------------------------------------------------------------------
# A poll loop that runs out of time (kvm_vcpu_halt: poll_end = cur >= stop) blocks
# the vCPU (kvm_vcpu_block) and frees its CPU, and nothing else: no trace record,
# no wake-up, no other CPU's state.  So when nothing can see the moment (no state
# timeline, and every thread pinned: no CPU looks at another's, nothing is pulled
# onto the freed CPU), the poll's end needs no event of its own.  halt() then
# records the window's end (poll_stop) and the place its POLL_END event would have
# had (poll_seq); whatever looks at the thread or its CPU first (a kick, a wake-up,
# a thread made runnable there, its timer, its time slice, the end of run_loop)
# calls poll_settle(), which blocks it then, at poll_stop, if the window ran out
# before the event being handled.  Enabling the timeline or unpinning a thread
# queues the POLL_END events of the windows still open (queue_lazy_polls).

cdef inline bint lazy_polls(engine_t* e) noexcept nogil:
    """Poll windows end without an event: no timeline and nothing unpinned."""
    return e.tlcap == 0 and e.nunpinned == 0


cdef inline bint poll_ran_out(engine_t* e, thread_t* th) noexcept nogil:
    """The thread's lazy poll window ran out before the event being handled
    (e.now, e.cur_key; outside run_loop cur_key is 0, so a window ending at
    e.now is still open)."""
    return th.poll_stop < e.now or (th.poll_stop == e.now and e.cur_key >=
                                    ((<uint64_t>EV_POLL_END << KW_SEQ_BITS) | th.poll_seq))


cdef inline int poll_settle(engine_t* e, uint32_t g) noexcept nogil:
    """If thread g polls in a lazy window that ran out (poll_ran_out), the end
    of the poll loop: kvm_vcpu_block at poll_stop, as its POLL_END event would
    have done.  -1 on error."""
    cdef thread_t* th
    if e.nlazy == 0:
        return 0
    th = &e.th[g]
    if th.poll_seq and poll_ran_out(e, th):
        return block(e, g, th.poll_stop, th.poll_stop)
    return 0


cdef int settle_polls(engine_t* e) noexcept nogil:
    """poll_settle() of every CPU's current thread (at the end of run_loop)."""
    cdef uint32_t c, i, n = e.ncpu
    cdef int32_t g
    if e.nlazy == 0:
        return 0
    if e.isl_cpus != NULL:
        n = e.isl_ncpus                 # an island's own CPUs (core/islands.pxi)
    for i in range(n):
        c = e.isl_cpus[i] if e.isl_cpus != NULL else i
        g = e.cpus[c].cur
        if g >= 0 and e.th[g].poll_seq:
            if poll_settle(e, <uint32_t>g):
                return -1
    return 0


ctypedef struct lazy_poll_t:
    uint64_t seq
    uint32_t g


cdef int lazy_poll_order(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const lazy_poll_t*>a).seq
    cdef uint64_t y = (<const lazy_poll_t*>b).seq
    return (x > y) - (x < y)


cdef int queue_lazy_polls(engine_t* e) noexcept nogil:
    """Every open lazy poll window gets its POLL_END event, in the order of the
    places they stand for (poll_seq), so that the events run as the windows
    would have ended.  -1 on error."""
    cdef lazy_poll_t* open_
    cdef uint32_t c, i, n = 0
    cdef int32_t g
    cdef thread_t* th
    if e.nlazy == 0:
        return 0
    open_ = <lazy_poll_t*>malloc(e.ncpu * sizeof(lazy_poll_t))
    if open_ == NULL:
        e.error = KW_ERR_NOMEM
        return -1
    for c in range(e.ncpu):
        g = e.cpus[c].cur
        if g >= 0 and e.th[g].poll_seq:
            open_[n].seq = e.th[g].poll_seq
            open_[n].g = <uint32_t>g
            n += 1
    qsort(open_, n, sizeof(lazy_poll_t), lazy_poll_order)
    for i in range(n):
        th = &e.th[open_[i].g]
        if heap_push(e, th.poll_stop, EV_POLL_END, open_[i].g, th.gen):
            free(open_)
            return -1
        poll_window_closed(e, th)
    free(open_)
    return 0


cdef inline void poll_window_closed(engine_t* e, thread_t* th) noexcept nogil:
    if th.poll_seq:
        e.nlazy -= 1
    th.poll_stop = 0
    th.poll_seq = 0


cdef int block(engine_t* e, uint32_t g, uint64_t t, uint64_t poll_end) noexcept nogil:
    """kvm_vcpu_block: wait on the rcuwait until kicked."""
    cdef thread_t* th = &e.th[g]
    poll_window_closed(e, th)
    th.poll_end = poll_end
    e.stats[<uint64_t>g * NR_STATS + S_BLOCKING] = 1
    if e.tlcap:
        tl_note(e, th, g, t, TS_BLOCKED)
    th.state = TS_BLOCKED
    th.gen += 1
    return release_cpu(e, th, t)


cdef inline void trace_rec(engine_t* e, thread_t* th, uint32_t g, uint64_t t, uint8_t kind,
                           uint8_t flag, uint64_t a, uint32_t b) noexcept nogil:
    cdef trace_rec_t* r
    cdef uint64_t ncap
    cdef trace_rec_t* buf
    if e.tcap == 0 or g < e.tr_lo or g >= e.tr_hi:
        return
    if e.thead == e.talloc and e.talloc < e.tcap:
        ncap = e.talloc * 2 if e.talloc else 4096
        if ncap > e.tcap:
            ncap = e.tcap
        buf = <trace_rec_t*>realloc(e.trace, ncap * sizeof(trace_rec_t))
        if buf == NULL:
            e.tdropped += 1
            return
        e.trace = buf
        e.talloc = ncap
    if e.thead == e.tcap:
        e.thead = 0
    if e.tcount == e.tcap:
        e.tdropped += 1
    else:
        e.tcount += 1
    r = &e.trace[e.thead]
    e.thead += 1
    r.ts = t
    r.a = a
    r.pid = PID_BASE + g
    r.cpu = th.pcpu
    r.vcpu_id = th.vcpu_id
    r.b = b
    r.kind = kind
    r.flag = flag
    r.valid = 1


cdef int halt_done(engine_t* e, uint32_t g, uint64_t cur, bint waited, uint64_t poll_end,
                   bint immediate) noexcept nogil:
    """The end of kvm_vcpu_halt: stats, grow/shrink, tracepoints."""
    cdef thread_t* th = &e.th[g]
    cdef uint64_t* st = &e.stats[<uint64_t>g * NR_STATS]
    cdef uint64_t start = th.halt_start
    cdef uint64_t halt_ns = cur - start
    cdef uint64_t w, poll_ns, entry
    cdef uint32_t mx, old
    poll_window_closed(e, th)
    st[S_BLOCKING] = 0
    if waited:
        w = cur - poll_end
        st[S_WAIT_NS] += w
        hist_update(st, S_WAIT_HIST, w)
    if th.do_poll:
        poll_ns = poll_end - start
        st[S_ATTEMPTED_POLL] += 1
        if not waited:
            st[S_SUCCESSFUL_POLL] += 1
            st[S_POLL_SUCCESS_NS] += poll_ns
            hist_update(st, S_POLL_SUCCESS_HIST, poll_ns)
        else:
            st[S_POLL_FAIL_NS] += poll_ns
            hist_update(st, S_POLL_FAIL_HIST, poll_ns)
    mx = max_halt_poll_ns(e, th)
    old = th.halt_poll_ns
    if mx:
        if halt_ns <= old:
            pass
        elif old and halt_ns > mx:
            th.halt_poll_ns = shrink_halt_poll_ns(e, old)
            trace_rec(e, th, g, cur, TR_HALT_POLL_NS, 0, th.halt_poll_ns, old)
        elif old < mx and halt_ns < mx:
            th.halt_poll_ns = grow_halt_poll_ns(e, old)
            trace_rec(e, th, g, cur, TR_HALT_POLL_NS, 1, th.halt_poll_ns, old)
    else:
        th.halt_poll_ns = 0
    trace_rec(e, th, g, cur, TR_WAKEUP, 1 if waited else 0, halt_ns, 0)
    e.halts += 1
    entry = cost_ns(e, th, COST_VM_ENTRY)
    if e.tlcap:
        tl_note(e, th, g, cur, TS_RUNNING)
    th.state = TS_RUNNING
    if th.halt_kind == HALT_SUSPEND:
        # kvm_vcpu_suspend: a wake-up exits to userspace; SUSPENDED stays.
        if runnable(e, g):
            return exit_to_user(e, g, cur, EXIT_SYSTEM_EVENT, SYSTEM_EVENT_WAKEUP, 0, 0, 0, 0)
    else:
        if not immediate:
            e.lat_hist[lat_bucket(cur + entry - th.wake_ts)] += 1
        if th.halt_kind == HALT_CPU_SUSPEND:
            retval(th, 0)
        elif th.halt_kind == HALT_MP_HALTED and runnable(e, g):
            # vcpu_block: RUNNABLE only if kvm_arch_vcpu_runnable; a signal or
            # KVM_REQ_UNBLOCK leaves the activity state alone (still HALTED).
            th.mp_state = MP_RUNNABLE
    return enter(e, g, cur, entry)


cdef inline uint32_t lat_bucket(uint64_t v) noexcept nogil:
    # model.lat_bucket: 64 log-linear sub-buckets per power of two (error <= 1/64).
    cdef uint32_t ex
    if v < 64:
        return <uint32_t>v
    ex = 63 - __builtin_clzll(v)
    return 64 + (ex - 6) * 64 + <uint32_t>((v >> (ex - 6)) & 63)
