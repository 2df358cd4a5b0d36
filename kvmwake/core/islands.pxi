# core/islands.pxi (twin: kvmwake/reference/islands.py).
# Mirrors: no kernel code; an execution strategy of the core.  The twin finds
# the same islands; the reference engine runs every host on its one queue, and
# the tests hold the core's islands against it, stats and all.
#
# Islands: a host whose VMs share no host CPU runs as several independent
# simulations.  An island is a connected group of host CPUs, VMs and threads:
# a thread joins the CPUs it may run on (its affinity) and the CPU it is on, a
# vCPU thread its VM, a host thread the VMs its program injects into
# (HOP_MSI / HOP_IRQ).  Nothing
# one island does can reach another's state: wake-ups, IPIs, kicks and
# injections stay inside a VM, placement only picks CPUs a thread may use,
# and the newly-idle balance pass looks only at its own island's CPUs (the
# threads on another island's CPUs may not run on this one, so it would pull
# none of them; e.cpu_isl).
#
# Each island runs with its own engine_t: a copy of the host's that shares
# every per-thread, per-VM and per-CPU array (an island writes only its own
# rows) and has its own event queue, clock, sequence numbers, counters,
# latency histogram, held threads and exit queue.  Islands run one after
# another or on several threads at once (without the GIL); either way each
# island sees the same events in the same order as on the host's one queue,
# so stats, states and halts are the same, whatever the thread count.
#
# run_islands uses islands when all of these hold (otherwise the host runs on
# its one queue, as before):
# * the host has at least two islands;
# * no vCPU thread in KVM_RUN can exit to userspace before the run's end
#   (may_exit): an exit stops the whole host at its instant for the VMM,
#   which islands running ahead of each other could not give;
# * the state timeline is off (it keeps one order of records over the whole
#   host), and the trace ring is off or records the threads of one island
#   only (set_trace_threads: Host.trace_vm), which then keeps it;
# * no exit is waiting for the VMM.
#
# At the end the islands' live events go back on the host's queue with new
# sequence numbers (isl_join): distinct over the host, each island's own order
# kept, and the same whether the run was made in one call or several.  Open
# lazy poll windows (core/halt.pxi) are numbered with them, as the POLL_END
# events they stand for.

from libc.stdlib cimport calloc

cdef extern from *:
    """
    #define KW_NO_ISLAND 0xFFFFFFFFU
    """
    const uint32_t KW_NO_ISLAND


cdef inline uint32_t uf_find(uint32_t* p, uint32_t x) noexcept nogil:
    while p[x] != x:
        p[x] = p[p[x]]
        x = p[x]
    return x


cdef inline void uf_union(uint32_t* p, uint32_t a, uint32_t b) noexcept nogil:
    a = uf_find(p, a)
    b = uf_find(p, b)
    if a < b:
        p[b] = a
    elif b < a:
        p[a] = b


cdef bint ops_may_exit(engine_t* e, thread_t* th) noexcept nogil:
    """Whether the vCPU program can reach an op that exits to userspace (OP_SYNC,
    OP_HVC: PSCI SYSTEM_OFF, RESET or SUSPEND may exit, or OP_END) from its PC.
    Control only goes forward, except an ENDLOOP's jump back to its loop's
    start; an ENDLOOP with no count (p0 = 0) jumps back for ever, so from the
    PC the program runs the ops up to the first such ENDLOOP at or after the
    PC, and from then on that loop's body.  Conservative: any HVC counts."""
    cdef const op_t* ops = &e.ops[th.prog]
    cdef uint32_t i, j = th.prog_n, lo
    for i in range(th.pc, th.prog_n):
        if ops[i].code == OP_ENDLOOP and ops[i].p0 == 0:
            j = i
            break
    if j == th.prog_n:
        return 1                                    # the END is reachable
    lo = ops[j].arg if ops[j].arg < th.pc else th.pc
    for i in range(lo, j + 1):
        if ops[i].code == OP_SYNC or ops[i].code == OP_HVC or ops[i].code == OP_END:
            return 1
    return 0


cdef bint may_exit(engine_t* e, uint32_t g, bint starting) noexcept nogil:
    """Whether vCPU thread g, in KVM_RUN, can exit to userspace in a run that no
    VMM interrupts (exit_to_user's callers): a pending signal (EXIT_INTR), a
    SUSPENDED vCPU (a wake-up exits, kvm_vcpu_suspend), no valid PC
    (EXIT_INTERNAL_ERROR), or its program's own exits (ops_may_exit).
    ``starting``: a vCPU outside KVM_RUN that the run will start (its first)."""
    cdef thread_t* th = &e.th[g]
    if th.kind != THREAD_VCPU or (th.state == TS_USER and not starting):
        return 0
    if th.sig_pending or th.mp_state == MP_SUSPENDED or not th.pc_valid or not th.has_prog:
        return 1
    return ops_may_exit(e, th)


cdef struct isl_key_t:
    uint64_t t
    uint64_t key
    uint32_t isl
    uint32_t late              # 0: an open lazy poll window (thread i), 1: event i
    uint64_t i


cdef int isl_key_cmp(const void* a, const void* b) noexcept nogil:
    """The joined events' order: (time, class, island, sequence), which is each
    island's own (time, key) order, islands apart only where time and class tie.
    An open lazy poll window (core/halt.pxi) stands among them as the POLL_END
    event it would have been: (poll_stop, POLL_END, island, poll_seq)."""
    cdef const isl_key_t* x = <const isl_key_t*>a
    cdef const isl_key_t* y = <const isl_key_t*>b
    if x.t != y.t:
        return -1 if x.t < y.t else 1
    if (x.key >> KW_SEQ_BITS) != (y.key >> KW_SEQ_BITS):
        return -1 if (x.key >> KW_SEQ_BITS) < (y.key >> KW_SEQ_BITS) else 1
    if x.isl != y.isl:
        return -1 if x.isl < y.isl else 1
    if x.key != y.key:
        return -1 if x.key < y.key else 1
    if x.late != y.late:
        # A lazy window's place (poll_seq) is the sequence number the next event
        # pushed takes: the window comes first.
        return -1 if x.late < y.late else 1
    return 0


cdef uint64_t isl_gather(const evq_t* q, event_t* out) noexcept nogil:
    """Copy every queued event (void ones too) into ``out`` (room for q.len), in no
    particular order; returns how many."""
    cdef uint64_t n = 0
    cdef int k
    cdef const evq_bucket_t* b
    for k in range(-1, KW_QBUCKETS):
        b = &q.b0 if k < 0 else &q.b[k]
        if b.n:
            memcpy(&out[n], b.ev, b.n * sizeof(event_t))
            n += b.n
    return n


cdef uint32_t event_island(engine_t* e, const event_t* ev, const uint32_t* th_isl,
                           const uint32_t* vm_isl) noexcept nogil:
    """The island whose state an event acts on: its VM's (a tick, a device
    source) or its thread's."""
    cdef uint64_t cls = ev.key >> KW_SEQ_BITS
    if cls == EV_TICK:
        return vm_isl[ev.who]
    if cls == EV_SOURCE:
        return vm_isl[e.src[ev.who].vm]
    return th_isl[ev.who]


cdef tuple isl_plan(Engine self):
    """The host's islands: ``(threads, cpus, vms)``, three arrays (u4) giving each
    thread's, host CPU's and VM's island (0, 1, ...; numbered in the order of
    their lowest CPU, then of their lowest VM; a CPU no thread may use is in
    none: 0xFFFFFFFF)."""
    cdef engine_t* e = &self.e
    cdef uint32_t ncpu = e.ncpu, nvm = e.nvm, nth = e.nth
    cdef uint32_t nodes = ncpu + nvm
    cdef cnp.ndarray[cnp.uint32_t, ndim=1] parent = np.arange(nodes, dtype=np.uint32)
    cdef cnp.ndarray[cnp.uint32_t, ndim=1] th_isl = np.zeros(nth, dtype=np.uint32)
    cdef cnp.ndarray[cnp.uint32_t, ndim=1] cpu_isl = np.full(ncpu, KW_NO_ISLAND, dtype=np.uint32)
    cdef cnp.ndarray[cnp.uint32_t, ndim=1] vm_isl = np.zeros(nvm, dtype=np.uint32)
    cdef cnp.ndarray[cnp.uint32_t, ndim=1] num = np.full(nodes, KW_NO_ISLAND, dtype=np.uint32)
    cdef cnp.ndarray[cnp.uint8_t, ndim=1] used = np.zeros(ncpu, dtype=np.uint8)
    cdef uint32_t* p = &parent[0] if nodes else NULL
    cdef uint32_t g, c, w, k, node, anchor, n = 0
    cdef uint64_t bits
    cdef thread_t* th
    cdef const op_t* op
    cdef bint all_joined = False
    with nogil:
        for g in range(nth):
            th = &e.th[g]
            # The thread's anchor: its VM, or (a host thread) its first allowed CPU.
            if th.kind == THREAD_VCPU:
                anchor = ncpu + th.vm
            else:
                anchor = nth_allowed(e, g, 0)
            # Its current CPU too (a thread keeps it after its affinity changed,
            # until it next moves): placement looks at that CPU.
            uf_union(p, anchor, th.pcpu)
            used[th.pcpu] = 1
            if th.aff_kind == AFF_ALL:
                if not all_joined:            # (once: every CPU in one group)
                    for c in range(ncpu):
                        used[c] = 1
                        if c:
                            uf_union(p, 0, c)
                    all_joined = True
                uf_union(p, anchor, 0)
            elif th.aff_kind == AFF_PINNED:
                c = g % ncpu
                uf_union(p, anchor, c)
                used[c] = 1
            else:
                for w in range(e.aff_words):
                    bits = e.affmask[th.aff_off + w]
                    while bits:
                        c = w * 64 + <uint32_t>__builtin_ctzll(bits)
                        bits &= bits - 1
                        uf_union(p, anchor, c)
                        used[c] = 1
            if th.kind == THREAD_HOST and th.has_prog:
                for w in range(th.prog_n):
                    op = &e.ops[th.prog + w]
                    if (op.code == HOP_MSI or op.code == HOP_IRQ) and op.p0 < nvm:
                        uf_union(p, anchor, ncpu + <uint32_t>op.p0)
        for node in range(nodes):
            if node < ncpu and not used[node]:
                continue
            k = uf_find(p, node)
            if num[k] == KW_NO_ISLAND:
                num[k] = n
                n += 1
            if node < ncpu:
                cpu_isl[node] = num[k]
            else:
                vm_isl[node - ncpu] = num[k]
        for g in range(nth):
            th = &e.th[g]
            if th.kind == THREAD_VCPU:
                th_isl[g] = vm_isl[th.vm]
            else:
                th_isl[g] = cpu_isl[nth_allowed(e, g, 0)]
    return th_isl, cpu_isl, vm_isl


cdef int64_t trace_island(engine_t* e, const uint32_t* th_isl) noexcept nogil:
    """The island of the threads the trace ring records (set_trace_threads): -1 if
    no thread is recorded, -2 if they are in more than one island."""
    cdef uint32_t g, hi = e.tr_hi if e.tr_hi < e.nth else e.nth
    cdef int64_t k = -1
    for g in range(e.tr_lo, hi):
        if k < 0:
            k = th_isl[g]
        elif th_isl[g] != k:
            return -2
    return k


cdef object isl_blocked(Engine self, starting=(), th_isl=None):
    """Why this host cannot run as islands now (``run_islands`` leaves it to run on its
    one queue), or None: the reasons of this file's header, in words.
    ``starting``: vCPU threads outside KVM_RUN that the run would start first;
    ``th_isl``: isl_plan's threads, if already found."""
    cdef engine_t* e = &self.e
    cdef thread_t* th
    cdef uint32_t g
    if e.tcap:
        if th_isl is None:
            th_isl = isl_plan(self)[0]
        if len(th_isl) and trace_island(e, <const uint32_t*>cnp.PyArray_DATA(th_isl)) == -2:
            return ("the trace ring records threads of more than one island (trace_capacity > 0; "
                    "Host.trace_vm records one VM's)")
    if e.tlcap:
        return "the state timeline is on"
    if e.exq_len:
        return "exits wait for the VMM"
    cdef set start = set(starting)
    for g in range(e.nth):
        if may_exit(e, g, g in start):
            th = &e.th[g]
            return (f"vCPU {th.vcpu_id} of VM {th.vm} may exit to userspace "
                    "(a signal, SUSPENDED, no valid PC, or an HVC, SYNC or END its "
                    "program can reach)")
    return None


cdef int isl_split(Engine self, uint32_t n, object th_isl_a, object cpu_isl_a,
                   object vm_isl_a) except -1:
    """Make n islands out of the host's engine: each an engine_t copy with its own
    queue (the host's events handed out by event_island), counters, held
    threads and exit queue; the host's queue is left empty."""
    cdef engine_t* e = &self.e
    cdef engine_t* ie
    cdef uint32_t k, g, c, i
    cdef uint64_t j, nev = e.q.len
    cdef event_t* evs = NULL
    cdef const uint32_t* th_isl = <const uint32_t*>cnp.PyArray_DATA(th_isl_a)
    cdef const uint32_t* vm_isl = <const uint32_t*>cnp.PyArray_DATA(vm_isl_a)
    cdef uint32_t* cpu_isl = <uint32_t*>cnp.PyArray_DATA(cpu_isl_a)
    self._isl_bufs = [cpu_isl_a]
    # Each island's engine_t on cache lines of its own, with a line to spare on
    # either side: one island's queue head (at the end of its engine_t) is
    # written on every push and pop, and must not share a line with the next
    # island's pointers, which its thread reads as often.
    cdef size_t stride = ((sizeof(engine_t) + 63) // 64) * 64 + 128
    self.isl = <engine_t**>calloc(n, sizeof(engine_t*))
    self.isl_mem = calloc(n * stride + 64, 1)
    if self.isl == NULL or self.isl_mem == NULL:
        free(self.isl)
        free(self.isl_mem)
        self.isl = NULL
        self.isl_mem = NULL
        raise MemoryError("no memory for the islands")
    cdef size_t at = (<size_t>self.isl_mem + 63) & ~(<size_t>63)
    for k in range(n):
        self.isl[k] = <engine_t*>(at + 64 + k * stride)
    self.nisl = n
    # Room for each island's held threads (at most one per CPU) and exits (at
    # most one per vCPU thread): its CPU and thread counts.
    ncpus = np.bincount(cpu_isl_a[cpu_isl_a != KW_NO_ISLAND], minlength=n)
    nths = np.bincount(th_isl_a, minlength=n)
    # Each island's CPUs, in CPU order: island k's are by_isl[starts[k]:starts[k + 1]].
    by_isl = np.argsort(cpu_isl_a, kind="stable").astype(np.uint32)
    starts = np.concatenate(([0], np.cumsum(ncpus))).astype(np.int64)
    self._isl_bufs.append(by_isl)
    for k in range(n):
        ie = self.isl[k]
        memcpy(ie, e, sizeof(engine_t))
        q_init(&ie.q, e.now)
        held = np.zeros(int(ncpus[k]) + 1, dtype=np.uint32)
        exitq = np.zeros(int(nths[k]) + 1, dtype=np.uint32)
        lat = np.zeros(LAT_BUCKETS, dtype=np.uint64)
        self._isl_bufs += [held, exitq, lat]
        ie.held = <uint32_t*>cnp.PyArray_DATA(held)
        ie.exitq = <uint32_t*>cnp.PyArray_DATA(exitq)
        ie.lat_hist = <uint64_t*>cnp.PyArray_DATA(lat)
        ie.nheld = 0
        ie.exq_head = 0
        ie.exq_len = 0
        ie.events = 0
        ie.halts = 0
        ie.nqueued = 0
        ie.nlazy = 0
        ie.waker = -1
        ie.cpu_isl = cpu_isl
        ie.isl_id = k
        ie.isl_cpus = <uint32_t*>cnp.PyArray_DATA(by_isl) + <size_t>starts[k]
        ie.isl_ncpus = <uint32_t>ncpus[k]
    # The trace ring goes to the island of the threads it records; the others
    # record nothing (isl_blocked: they are in one island).
    self.isl_trace = trace_island(e, th_isl) if e.tcap and e.nth else -1
    for k in range(n):
        if <int64_t>k != self.isl_trace:
            self.isl[k].tcap = 0
    for c in range(e.ncpu):
        if cpu_isl[c] != KW_NO_ISLAND:
            self.isl[cpu_isl[c]].nqueued += e.cpus[c].rq_len
            if e.cpus[c].cur >= 0 and e.th[e.cpus[c].cur].poll_seq:
                self.isl[cpu_isl[c]].nlazy += 1
    for i in range(e.nheld):
        ie = self.isl[th_isl[e.held[i]]]
        ie.held[ie.nheld] = e.held[i]
        ie.nheld += 1
    if nev:
        evs = <event_t*>malloc(nev * sizeof(event_t))
        if evs == NULL:
            raise MemoryError("no memory for the islands' events")
        isl_gather(&e.q, evs)
        for j in range(nev):
            if q_insert(self.isl[event_island(e, &evs[j], th_isl, vm_isl)], &evs[j]):
                free(evs)
                raise MemoryError("no memory for the islands' events")
        free(evs)
    j = e.q.dropped
    q_free(&e.q)
    q_init(&e.q, e.now)
    e.q.dropped = j
    return 0


cdef void isl_discard(Engine self) noexcept:
    """Free the islands without joining them (isl_split failed before it emptied
    the host's queue: the host is as it was)."""
    cdef uint32_t k
    for k in range(self.nisl):
        q_free(&self.isl[k].q)
    free(self.isl)
    free(self.isl_mem)
    self.isl = NULL
    self.isl_mem = NULL
    self.nisl = 0
    self.isl_trace = -1
    self._isl_bufs = None


cdef int isl_join(Engine self, uint64_t until) except -1:
    """The islands back into the host's engine: counters summed, held threads
    derived again, and the live events back on the host's queue, renumbered
    by their rank in (time, class, island, sequence) order (isl_key_cmp) below
    the host's new sequence count (pushes in all); void ones are dropped.
    The numbering depends only on the live events and each island's order, so
    that a run gives the same state whether it was made in one call or several.
    An island that failed gives the host its error (the earliest in time, then
    the lowest island)."""
    cdef engine_t* e = &self.e
    cdef engine_t* ie
    cdef uint32_t k, b
    cdef uint64_t n = 0, live = 0, i, m, s0 = e.seq, pushed = 0, base, dropped, nlazy = 0
    cdef uint32_t c
    cdef int32_t g
    cdef const uint32_t* cpu_isl = <const uint32_t*>cnp.PyArray_DATA(self._isl_bufs[0])
    cdef event_t* evs = NULL
    cdef isl_key_t* keys = NULL
    cdef event_t* ev
    cdef int32_t failed = -1
    cdef uint64_t seq_mask = ((<uint64_t>1) << KW_SEQ_BITS) - 1
    for k in range(self.nisl):
        n += self.isl[k].q.len
        nlazy += self.isl[k].nlazy
    try:
        if n + nlazy:
            evs = <event_t*>malloc((n + 1) * sizeof(event_t))
            keys = <isl_key_t*>malloc((n + nlazy) * sizeof(isl_key_t))
            if evs == NULL or keys == NULL:
                raise MemoryError("no memory to join the islands' events")
        m = 0
        dropped = e.q.dropped
        for k in range(self.nisl):
            ie = self.isl[k]
            i = isl_gather(&ie.q, &evs[m])
            for b in range(<uint32_t>i):
                ev = &evs[m + b]
                if not ev_live(ie, ev):
                    dropped += 1
                    continue
                keys[live].t = ev.t
                keys[live].key = ev.key
                keys[live].isl = k
                keys[live].late = 1
                keys[live].i = m + b
                live += 1
            m += i
            pushed += ie.seq - s0
            e.events += ie.events
            e.halts += ie.halts
            dropped += ie.q.dropped
            for b in range(LAT_BUCKETS):
                e.lat_hist[b] += ie.lat_hist[b]
            if ie.error and (failed < 0 or ie.now < self.isl[failed].now):
                failed = <int32_t>k
            for b in range(ie.exq_len):
                e.exitq[(e.exq_head + e.exq_len) % e.nth] = ie.exitq[(ie.exq_head + b) % e.nth]
                e.exq_len += 1
        # The open lazy poll windows (each its CPU's current thread), numbered
        # with the events so that their places keep their order.
        m = live
        for c in range(e.ncpu):
            g = e.cpus[c].cur
            if g >= 0 and e.th[g].poll_seq and cpu_isl[c] != KW_NO_ISLAND:
                if m == live + nlazy:
                    m += 1                  # more than counted: refused below
                    break
                keys[m].t = e.th[g].poll_stop
                keys[m].key = (<uint64_t>EV_POLL_END << KW_SEQ_BITS) | e.th[g].poll_seq
                keys[m].isl = cpu_isl[c]
                keys[m].late = 0
                keys[m].i = <uint64_t>g
                m += 1
        if m - live != nlazy:
            self._failed = True
            raise EngineError(f"{nlazy} lazy poll windows counted in the islands, "
                              f"{m - live} found")
        if m > 1:
            qsort(keys, m, sizeof(isl_key_t), isl_key_cmp)
        e.seq = s0 + pushed
        if e.seq < m:
            e.seq = m
        base = e.seq - m
        e.now = until if failed < 0 else self.isl[failed].now
        q_free(&e.q)
        q_init(&e.q, e.now)
        e.q.dropped = dropped
        # (Events behind the clock, of an island that stopped early on an error,
        # keep their place: q_insert re-files around an earlier base.)
        for i in range(m):
            if not keys[i].late:
                e.th[keys[i].i].poll_seq = base + i + 1
                continue
            ev = &evs[keys[i].i]
            ev.key = (ev.key & ~seq_mask) | (base + i + 1)
            if q_insert(e, ev):
                raise MemoryError("no memory to join the islands' events")
        e.nqueued = 0
        for k in range(self.nisl):
            e.nqueued += self.isl[k].nqueued
        e.nlazy = <uint32_t>nlazy

        derive_held(e)
        if failed >= 0:
            ie = self.isl[failed]
            e.error = ie.error
            e.err_t = ie.err_t
            e.err_n = ie.err_n
            e.err_thread = ie.err_thread
    finally:
        if self.isl_trace >= 0:             # the ring (realloc may have moved it)
            ie = self.isl[self.isl_trace]
            e.trace = ie.trace
            e.talloc = ie.talloc
            e.thead = ie.thead
            e.tcount = ie.tcount
            e.tdropped = ie.tdropped
            self.isl_trace = -1
        free(evs)
        free(keys)
        for k in range(self.nisl):
            q_free(&self.isl[k].q)
        free(self.isl)
        free(self.isl_mem)
        self.isl = NULL
        self.isl_mem = NULL
        self.nisl = 0
        self._isl_bufs = None
    return 0
