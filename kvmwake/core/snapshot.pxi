# core/snapshot.pxi (twin: kvmwake/reference/snapshot.py).
# Mirrors: no kernel code; the state a VMM saves with KVM_GET_* ioctls, plus
# the engine's own, out and in.
#
# Engine state out and in, for kvmwake.snapshot.  Everything that decides the
# future is in the arrays and scalars exported here; the import checks every
# index and link in them before the engine may run, so a file that passed the
# checksum but was crafted to be inconsistent is refused instead of crashing.

#: The debug build (setup.py's KVMWAKE_DEBUG=1): run_loop's periodic checks are on.
DEBUG = bool(KW_DEBUG)
#: Events between two of the debug build's checks of the whole state.
CHECK_EVERY = KW_CHECK_EVERY
#: How many of those checks this process has run (0 in the normal build).
DEBUG_CHECKS = 0
#: The latest clock a state may hold (twin: kvmwake.model.MAX_NOW); runs end by then.
MAX_NOW = 1 << 62
#: Latest event, segment end or timer in a state (kvmwake.model.MAX_TIME).
MAX_TIME = 3 << 62
#: Longest span a state holds (kvmwake.model.MAX_SPAN): a segment's rest, a handler.
MAX_SPAN = (1 << 62) + (1 << 48)
#: Largest sequence number a state may hold (kvmwake.model.MAX_SEQ): events are keyed
#: (class << 56) | sequence, and this leaves 2**55 pushes before the class bits.
MAX_SEQ = KW_MAX_SEQ

#: The engine_t scalars a snapshot carries (the rest is derived).
SNAPSHOT_SCALARS = ("now", "seq", "events", "halts", "tcap", "thead", "tcount", "tdropped",
                    "halt_poll_ns", "grow", "grow_start", "shrink", "exq_head", "exq_len",
                    "talloc", "tlcap", "tlhead", "tlcount", "tldropped", "tlt0", "tlalloc",
                    "cost_dist")
#: The largest cost (kvmwake.costs.MAX_COST_NS): every value of a cost table.
MAX_COST_NS = 1 << 40


def _engine_export(Engine self):
    """(scalars, arrays) of an engine: copies, safe to keep."""
    cdef engine_t* e = &self.e
    cdef uint64_t n
    if self._failed:
        raise EngineError("this engine stopped on an earlier error; it cannot be saved")
    scalars = {"now": e.now, "seq": e.seq, "events": e.events, "halts": e.halts,
               "tcap": e.tcap, "thead": e.thead, "tcount": e.tcount, "tdropped": e.tdropped,
               "halt_poll_ns": e.halt_poll_ns, "grow": e.grow, "grow_start": e.grow_start,
               "shrink": e.shrink, "exq_head": e.exq_head, "exq_len": e.exq_len,
               "cost_dist": e.cost_dist}
    # The live events, in (t, key) order: void ones are left out, so that equal
    # histories give equal bytes whatever the queue's internal state.
    heap = np.empty(e.q.len * sizeof(event_t), dtype=np.uint8)
    n = q_collect(e, <event_t*>cnp.PyArray_DATA(heap), True)
    heap = heap[:n * sizeof(event_t)].copy()
    # The trace ring, oldest record first and with its padding zeroed, so that
    # equal histories give equal bytes whatever the ring's position.
    n = e.tcount
    trace = np.zeros(n * sizeof(trace_rec_t), dtype=np.uint8)
    _copy_trace(e, <trace_rec_t*>cnp.PyArray_DATA(trace))
    scalars["thead"] = n
    scalars["talloc"] = n
    # The state timeline ring, normalised the same way.
    n = e.tlcount
    timeline = np.zeros(n * sizeof(tl_rec_t), dtype=np.uint8)
    _copy_timeline(e, <tl_rec_t*>cnp.PyArray_DATA(timeline))
    scalars.update({"tlcap": e.tlcap, "tlhead": n, "tlcount": n, "tldropped": e.tldropped,
                    "tlt0": e.tlt0, "tlalloc": n})
    arrays = {"threads": self._threads.copy(), "irqs": self._irqs.copy(),
              "vms": self._vms.copy(), "gics": self._gics.copy(), "srcs": self._srcs.copy(),
              "times": self._times.copy(), "cpus": self._cpus.copy(),
              "stats": self._stats.copy(), "lat": self._lat.copy(), "ops": self._ops.copy(),
              "exitq": self._exitq.copy(), "heap": heap, "trace": trace,
              "timeline": timeline, "tlbase": self._tlbase.copy(), "aff": self._aff.copy(),
              "costtab": self._cost_tab.copy()}
    return scalars, arrays


cdef void _copy_trace(engine_t* e, trace_rec_t* out) noexcept nogil:
    cdef uint64_t i, n = e.tcount, start
    cdef trace_rec_t* r
    if n == 0:
        return
    start = (e.thead + e.tcap - n) % e.tcap if n == e.tcap else 0
    for i in range(n):
        r = &e.trace[(start + i) % e.tcap]
        out[i].ts = r.ts
        out[i].a = r.a
        out[i].pid = r.pid
        out[i].cpu = r.cpu
        out[i].vcpu_id = r.vcpu_id
        out[i].b = r.b
        out[i].kind = r.kind
        out[i].flag = r.flag
        out[i].valid = r.valid


cdef void _copy_timeline(engine_t* e, tl_rec_t* out) noexcept nogil:
    """The timeline ring, oldest first, padding zeroed (out is zeroed)."""
    cdef uint64_t i, n = e.tlcount, start
    cdef tl_rec_t* r
    if n == 0:
        return
    start = (e.tlhead + e.tlcap - n) % e.tlcap if n == e.tlcap else 0
    for i in range(n):
        r = &e.tl[(start + i) % e.tlcap]
        out[i].t = r.t
        out[i].g = r.g
        out[i].cpu = r.cpu
        out[i].state = r.state


cdef _check_cost_tables(engine_t* e):
    """Every drawn cost's table: at most MAX_COST_NS, nondecreasing (the sampling's
    products then fit 64 bits); its median is the cost's constant field."""
    cdef uint32_t c
    cdef uint64_t k
    cdef const uint64_t* tab
    if e.cost_dist >> NR_DRAWN_COSTS:
        raise ValueError(f"drawn-cost mask {e.cost_dist:#x} names unknown costs")
    for c in range(NR_DRAWN_COSTS):
        if not (e.cost_dist >> c) & 1:
            continue
        tab = &e.cost_tab[c * KW_COST_TABLE_N]
        for k in range(KW_COST_TABLE_N):
            if tab[k] > MAX_COST_NS or (k and tab[k] < tab[k - 1]):
                raise ValueError(f"cost table {c}: value {k} ({tab[k]}) out of range "
                                 f"0..2**40 or below the one before")
        (<uint64_t*>&e.costs)[c] = tab[KW_COST_TABLE_N // 2]


def struct_sizes():
    return {"thread_t": sizeof(thread_t), "virq_t": sizeof(virq_t), "vm_t": sizeof(vm_t),
            "gic_t": sizeof(gic_t), "source_t": sizeof(source_t), "cpu_t": sizeof(cpu_t),
            "event_t": sizeof(event_t), "trace_rec_t": sizeof(trace_rec_t),
            "op_t": sizeof(op_t), "tl_rec_t": sizeof(tl_rec_t)}


def _engine_import(Engine self, dict scalars, dict arrays):
    """Load exported state into a freshly constructed engine (same arch, CPUs, costs).

    Raises ValueError naming the first inconsistency; the engine is then unusable.
    """
    cdef engine_t* e = &self.e
    cdef uint64_t nheap, ntrace, ntl
    self._failed = True                    # until every check has passed
    self._threads = arrays["threads"]
    self._irqs = arrays["irqs"]
    self._vms = arrays["vms"]
    self._gics = arrays["gics"]
    self._srcs = arrays["srcs"]
    self._times = arrays["times"]
    self._cpus = arrays["cpus"]
    self._stats = arrays["stats"]
    self._lat = arrays["lat"]
    self._ops = arrays["ops"]
    self._exitq = arrays["exitq"]
    self._tlbase = arrays["tlbase"]
    self._aff = np.ascontiguousarray(arrays["aff"], dtype=np.uint64)
    # The cost tables: the drawn costs must be those of the host configuration the
    # engine was built from (cost_dist), each table whole, in range and sorted.
    tab = arrays["costtab"]
    if tab.dtype != np.uint64 or tab.shape != (NR_DRAWN_COSTS * KW_COST_TABLE_N,):
        raise ValueError(f"the cost tables hold {tab.size} values, expected "
                         f"{NR_DRAWN_COSTS} x {KW_COST_TABLE_N}")
    if scalars["cost_dist"] != e.cost_dist:
        raise ValueError(f"the drawn costs (mask {scalars['cost_dist']:#x}) disagree with "
                         f"the host configuration's (mask {e.cost_dist:#x})")
    self._cost_tab = tab
    e.nth = <uint32_t>(len(self._threads) // sizeof(thread_t))
    e.nvm = <uint32_t>(len(self._vms) // sizeof(vm_t))
    e.nsrc = <uint32_t>(len(self._srcs) // sizeof(source_t))
    e.ncpu = <uint32_t>(len(self._cpus) // sizeof(cpu_t))
    e.aff_words = (e.ncpu + 63) // 64
    e.waker = -1
    e.cur_key = 0                          # (run_loop's: not handling an event)
    if len(self._llc) != e.ncpu:
        raise ValueError("the host's LLC groups disagree with its CPU count")
    self._bind()
    # The events stay in this array (self._import_events) until the checks have
    # passed; then they are queued (_queue_imported).
    nheap = len(arrays["heap"]) // sizeof(event_t)
    self._import_events = np.ascontiguousarray(arrays["heap"], dtype=np.uint8)
    ntrace = len(arrays["trace"]) // sizeof(trace_rec_t)
    if ntrace != scalars["tcount"] or scalars["thead"] != ntrace:
        raise ValueError("the trace ring's record count disagrees with its positions")
    free(e.trace)
    e.trace = NULL
    e.talloc = 0
    if ntrace:
        e.trace = <trace_rec_t*>malloc(ntrace * sizeof(trace_rec_t))
        if e.trace == NULL:
            raise MemoryError("no memory for the snapshot's trace")
        memcpy(e.trace, cnp.PyArray_DATA(arrays["trace"]), ntrace * sizeof(trace_rec_t))
        e.talloc = ntrace
    ntl = len(arrays["timeline"]) // sizeof(tl_rec_t)
    if len(arrays["timeline"]) % sizeof(tl_rec_t) or ntl != scalars["tlcount"] \
            or scalars["tlhead"] != ntl or scalars["tlalloc"] != ntl:
        raise ValueError("the timeline ring's record count disagrees with its positions")
    free(e.tl)
    e.tl = NULL
    e.tlalloc = 0
    if ntl:
        e.tl = <tl_rec_t*>malloc(ntl * sizeof(tl_rec_t))
        if e.tl == NULL:
            raise MemoryError("no memory for the snapshot's timeline")
        memcpy(e.tl, cnp.PyArray_DATA(arrays["timeline"]), ntl * sizeof(tl_rec_t))
        e.tlalloc = ntl
    e.tlcap, e.tlhead, e.tlcount = scalars["tlcap"], scalars["tlhead"], scalars["tlcount"]
    e.tldropped, e.tlt0 = scalars["tldropped"], scalars["tlt0"]
    e.now, e.seq, e.events, e.halts = (scalars["now"], scalars["seq"], scalars["events"],
                                       scalars["halts"])
    e.tcap, e.thead, e.tcount, e.tdropped = (scalars["tcap"], scalars["thead"],
                                             scalars["tcount"], scalars["tdropped"])
    e.halt_poll_ns, e.grow = scalars["halt_poll_ns"], scalars["grow"]
    e.grow_start, e.shrink = scalars["grow_start"], scalars["shrink"]
    e.exq_head, e.exq_len = scalars["exq_head"], scalars["exq_len"]
    e.nqueued = 0
    for c in range(e.ncpu):
        e.nqueued += e.cpus[c].rq_len                 # derived (checked with the queues)
    e.nheld = 0
    e.nlazy = 0
    for c in range(e.nth):
        if e.th[c].poll_seq:
            e.nlazy += 1                              # derived (checked with the threads)
    _check_state(self, True)
    _queue_imported(self)
    derive_held(e)
    self._prog_index = {}
    self._spare = {}                 # the imported arrays have no room to spare
    index_affinity(self)
    cdef uint32_t g
    for g in range(e.nth):
        if e.th[g].has_prog:
            key = self._ops[e.th[g].prog * sizeof(op_t):
                            (e.th[g].prog + e.th[g].prog_n) * sizeof(op_t)].tobytes()
            self._prog_index.setdefault(key, e.th[g].prog)
    self._failed = False


cdef void derive_held(engine_t* e) noexcept nogil:
    """e.held from the state: the vCPU threads in userspace that are still their
    CPU's current thread (hold_cpu), in thread order."""
    cdef uint32_t g
    e.nheld = 0
    for g in range(e.nth):
        if is_held(e, g):
            e.held[e.nheld] = g
            e.nheld += 1


cdef check_held(Engine self):
    """The debug build's check that e.held is what the state says (derive_held)."""
    cdef engine_t* e = &self.e
    cdef uint32_t g, n = 0
    if e.nheld > e.ncpu:
        raise ValueError(f"{e.nheld} held threads on {e.ncpu} host CPUs")
    for g in range(e.nth):
        if is_held(e, g):
            if n >= e.nheld or e.held[n] != g:
                raise ValueError(f"thread {g}: holds its CPU in userspace but is not "
                                 "listed as held, or out of order")
            n += 1
    if n != e.nheld:
        raise ValueError("a thread listed as held does not hold its CPU")


cdef _queue_imported(Engine self):
    """Queue the checked events of an imported state (any order: the queue orders them)."""
    cdef engine_t* e = &self.e
    cdef uint64_t i, n = len(self._import_events) // sizeof(event_t)
    cdef const event_t* evs = <const event_t*>cnp.PyArray_DATA(self._import_events)
    q_free(&e.q)
    q_init(&e.q, e.now)
    for i in range(n):
        if q_insert(e, &evs[i]):
            raise MemoryError("no memory for the snapshot's events")
    self._import_events = None


cdef _state_events(Engine self):
    """The events to check: an imported state's staged array, or else every queued
    event (void ones included) in (t, key) order, after the queue's own check."""
    cdef engine_t* e = &self.e
    if self._import_events is not None:
        return self._import_events
    q_check(e)
    buf = np.empty(e.q.len * sizeof(event_t), dtype=np.uint8)
    q_collect(e, <event_t*>cnp.PyArray_DATA(buf), False)
    return buf


cdef _check_state(Engine self, bint programs):
    """Every index, count and link of the state, checked before the engine may run
    (and, in the debug build, every CHECK_EVERY events of a run; ``programs``
    False then skips the programs' validation, which a run cannot change)."""
    cdef engine_t* e = &self.e
    cdef uint32_t g, v, c, s, k, n, w
    cdef uint64_t nops = len(self._ops) // sizeof(op_t), i, cls
    cdef thread_t* th
    cdef vm_t* vm
    cdef cpu_t* cpu
    cdef source_t* src
    cdef int32_t x
    cdef event_t* ev
    cdef tl_rec_t* tr
    cdef uint64_t start, prev
    cdef list seen
    if len(self._stats) != e.nth or len(self._irqs) != e.nth * sizeof(virq_t) \
            or len(self._gics) != e.nvm * sizeof(gic_t) or len(self._exitq) != e.nth:
        raise ValueError("per-vCPU and per-VM arrays disagree on the vCPU or VM count")
    if e.ncpu == 0 or e.ncpu > (1 << 20):
        raise ValueError(f"host CPU count {e.ncpu} out of range")
    if e.tcap and (e.talloc > e.tcap or e.thead > e.talloc or e.tcount > e.talloc):
        raise ValueError("trace ring positions out of range")
    if not e.tcap and (e.talloc or e.tcount):
        raise ValueError("a trace without a trace capacity")
    if e.exq_len > e.nth or (e.nth and e.exq_head >= e.nth) or (not e.nth and e.exq_head):
        raise ValueError("exit queue positions out of range")
    if len(self._tlbase) != e.nth:
        raise ValueError("the timeline's base states disagree on the vCPU count")
    if e.now > MAX_NOW:
        raise ValueError(f"clock {e.now} ns beyond the engine's limit 2**62 ns")
    if e.seq > KW_MAX_SEQ:
        raise ValueError(f"event sequence number {e.seq} beyond the limit 2**55")
    _check_cost_tables(e)
    if e.tlcount > e.tlcap or e.tlcount > e.tlalloc or e.tlalloc > e.tlcap \
            or e.tlhead > e.tlalloc or e.tlt0 > e.now \
            or (e.tldropped and e.tlcount != e.tlcap):
        raise ValueError("timeline ring positions out of range")
    for g in range(e.nth):
        if e.tlbase[g] > TS_RUNNABLE:
            raise ValueError(f"thread {g}: an unknown timeline base state")
    # Oldest record first (an imported ring starts at 0; a running one may wrap).
    start = (e.tlhead + e.tlcap - e.tlcount) % e.tlcap if e.tlcount and e.tlcount == e.tlcap else 0
    prev = e.tlt0
    for i in range(e.tlcount):
        tr = &e.tl[(start + i) % e.tlcap]
        # (A record keeps the CPU of its time: threads migrate.)
        if tr.g >= e.nth or tr.cpu >= e.ncpu or e.th[tr.g].pcpu >= e.ncpu \
                or tr.state > TS_RUNNABLE \
                or tr.t < prev or tr.t > e.now:
            raise ValueError(f"timeline record {i}: out of range or out of order")
        prev = tr.t
    n = 0
    w = 0                               # where the previous VM's threads end
    for v in range(e.nvm):
        vm = &e.vms[v]
        if vm.first < w or vm.first > e.nth or vm.nr_vcpus == 0 or vm.nr_vcpus > 1024 \
                or vm.nr_spis > 988:
            raise ValueError(f"VM {v}: vCPU range or SPI count inconsistent")
        while w < vm.first:             # only host threads lie between two VMs' vCPUs
            if e.th[w].kind != THREAD_HOST:
                raise ValueError(f"VM {v}: vCPU range inconsistent (thread {w} before it "
                                 "is neither its nor a host thread)")
            w += 1
        w = vm.first + vm.nr_vcpus
        if vm.psci_version not in (1, 2, 0x10000, 0x10001, 0x10002, 0x10003):
            raise ValueError(f"VM {v}: PSCI version {vm.psci_version:#x} unknown")
        if vm.vcpu_features & ~(<uint32_t>_uapi.SUPPORTED_VCPU_FEATURES) or vm.features_set > 1:
            raise ValueError(f"VM {v}: vCPU features {vm.vcpu_features:#x} not supported")
        for k in range(1024):           # INTIDs 1020..1023 too: owner_of reads them all
            x = e.gic[v].spi_target[k]
            if x < -1 or x >= <int32_t>vm.nr_vcpus:
                raise ValueError(f"VM {v}: SPI {k} routed to vCPU {x}, which does not exist")
        n += vm.nr_vcpus
    k = 0                               # host threads so far
    for g in range(e.nth):
        th = &e.th[g]
        if th.kind > THREAD_HOST:
            raise ValueError(f"thread {g}: an unknown thread kind {th.kind}")
        if th.kind == THREAD_HOST:
            # A host thread (core/hostthread.pxi): no VM, numbered among the host
            # threads, always with its program, never polling, inside a guest or
            # with a trap or an interrupt to go on with.
            if th.vm != NO_VM or th.vcpu_id != k or th.pcpu >= e.ncpu:
                raise ValueError(f"thread {g}: a host thread's VM, number or host CPU "
                                 "out of range")
            if not th.has_prog or not th.pc_valid or th.state == TS_POLLING \
                    or th.state > TS_RUNNABLE \
                    or (th.resume != RESUME_START and th.resume != RESUME_SEGMENT) \
                    or th.cont != CONT_NEXT or th.exit_time > MAX_TIME:
                raise ValueError(f"thread {g}: a host thread's state, program, "
                                 "continuation or deadline holds an unknown value")
            k += 1
        elif th.vm >= e.nvm or g < e.vms[th.vm].first \
                or th.vcpu_id != g - e.vms[th.vm].first \
                or th.vcpu_id >= e.vms[th.vm].nr_vcpus or th.pcpu >= e.ncpu:
            raise ValueError(f"thread {g}: VM, vCPU id or host CPU out of range")
        if th.state > TS_RUNNABLE or th.resume > RESUME_SLEEP or th.cont > CONT_EOI \
                or th.halt_kind > HALT_MP_HALTED or th.mp_state > MP_SUSPENDED:
            raise ValueError(f"thread {g}: a state field holds an unknown value")
        if (th.pstate & 0x1F) not in (0x0, 0x4, 0x5) or th.pstate & PSR_I_BIT:
            raise ValueError(f"thread {g}: PSTATE {th.pstate:#x} has a mode KVM refuses")
        if th.has_prog:
            if th.prog_n == 0 or <uint64_t>th.prog + th.prog_n > nops \
                    or (th.pc_valid and th.pc >= th.prog_n):
                raise ValueError(f"thread {g}: program or PC out of range")
        elif th.state != TS_USER:
            raise ValueError(f"thread {g}: in KVM_RUN without a program")
        if th.rq_next < -1 or th.rq_next >= <int32_t>e.nth:
            raise ValueError(f"thread {g}: run-queue link out of range")
        check_affinity(self, g)
        if e.irq[g].cur_irq < -1 or e.irq[g].cur_irq > 1023 or e.irq[g].sv_cont > CONT_EOI:
            raise ValueError(f"thread {g}: interrupt bookkeeping out of range")
    if n + k != e.nth:
        raise ValueError("the VMs' vCPUs and the host threads do not add up to the "
                         "thread count")
    if e.nvm and <uint64_t>e.vms[e.nvm - 1].first + e.vms[e.nvm - 1].nr_vcpus > e.nth:
        raise ValueError(f"VM {e.nvm - 1}: vCPU range beyond the thread count")
    if programs:
        _check_programs(self, nops)
    for c in range(e.ncpu):
        cpu = &e.cpus[c]
        if cpu.cur < -1 or cpu.cur >= <int32_t>e.nth or cpu.rq_head < -1 \
                or cpu.rq_head >= <int32_t>e.nth or cpu.rq_tail < -1 \
                or cpu.rq_tail >= <int32_t>e.nth or cpu.rq_len > e.nth:
            raise ValueError(f"host CPU {c}: thread index out of range")
        x = cpu.rq_head
        k = 0
        while x >= 0:
            if k >= cpu.rq_len or e.th[x].pcpu != c:
                raise ValueError(f"host CPU {c}: run queue broken")
            k += 1
            x = e.th[x].rq_next
        if k != cpu.rq_len or (k and (cpu.rq_tail < 0 or e.th[cpu.rq_tail].rq_next != -1)) \
                or (k == 0 and (cpu.rq_head != -1 or cpu.rq_tail != -1)):
            raise ValueError(f"host CPU {c}: run queue length or tail wrong")
        if k and cpu.rq_tail != _rq_last(e, cpu):
            raise ValueError(f"host CPU {c}: run queue tail wrong")
        if cpu.cur >= 0 and e.th[cpu.cur].pcpu != c:
            raise ValueError(f"host CPU {c}: runs a thread placed elsewhere")
    for s in range(e.nsrc):
        src = &e.src[s]
        if src.vm >= e.nvm or src.kind > SRC_TRACE or src.intid > 1023 \
                or src.times_off > <uint64_t>len(self._times) \
                or src.times_len > <uint64_t>len(self._times) - src.times_off \
                or (e.x86 and (src.target < e.vms[src.vm].first or src.target >= e.vms[src.vm].first
                                + e.vms[src.vm].nr_vcpus)) \
                or (src.kind == SRC_PERIODIC and src.p0 == 0) \
                or (not e.x86 and (src.intid < 32 or src.intid >= 32 + e.vms[src.vm].nr_spis)) \
                or (e.x86 and src.intid > 255):
            raise ValueError(f"interrupt source {s}: out of range")
    for i in range(e.exq_len):
        if e.exitq[(e.exq_head + i) % e.nth] >= e.nth \
                or e.th[e.exitq[(e.exq_head + i) % e.nth]].kind == THREAD_HOST:
            raise ValueError("exit queue names a thread that does not exist or is no vCPU")
    evbuf = _state_events(self)
    cdef uint64_t nev = len(evbuf) // sizeof(event_t)
    cdef event_t* evs = <event_t*>cnp.PyArray_DATA(evbuf)
    for i in range(nev):
        ev = &evs[i]
        cls = ev.key >> KW_SEQ_BITS
        if cls > EV_SLICE or ev.t < e.now or ev.t > MAX_TIME \
                or (ev.key & ((1ULL << KW_SEQ_BITS) - 1)) > e.seq:
            raise ValueError(f"event {i}: class, time or sequence out of range")
        if (cls == EV_TICK and ev.who >= e.nvm) or (cls == EV_SOURCE and ev.who >= e.nsrc) \
                or (cls >= EV_TIMER and ev.who >= e.nth):
            raise ValueError(f"event {i}: names something that does not exist")
        if cls == EV_TICK and ev.gen == e.vms[ev.who].tick_gen and e.vms[ev.who].tick_ns == 0:
            raise ValueError(f"event {i}: a live tick of period 0")
    _check_links(self, evs, nev)
    n = 0
    for c in range(e.ncpu):
        n += e.cpus[c].rq_len
    if n != e.nqueued:
        raise ValueError(f"{n} threads wait in the run queues, but the count of waiting "
                         f"threads is {e.nqueued}")


cdef check_times(engine_t* e, uint32_t g):
    """Thread g's times against the clock, so that no difference the engine takes
    (slice_end's seg_end - t, halt_done's cur - halt_start, cur - poll_end and
    poll_end - start, the latency's cur + entry - wake_ts) can wrap, and no sum
    (got_cpu's t + rem_end) can either."""
    cdef thread_t* th = &e.th[g]
    cdef uint64_t now = e.now
    if th.run_start > now or th.halt_start > now or th.poll_end > now or th.wake_ts > now:
        raise ValueError(f"thread {g}: a time of its past lies in the future")
    if th.seg_end > MAX_TIME or th.seg_gfrom > th.seg_gto or th.seg_gto > th.seg_end \
            or th.rem_gfrom > th.rem_gto or th.rem_gto > th.rem_end or th.rem_end > MAX_SPAN:
        raise ValueError(f"thread {g}: segment times out of order or out of range")
    if th.state == TS_RUNNING and th.seg_end < now:
        raise ValueError(f"thread {g}: running a segment that ended before the clock")
    if e.irq[g].timer_cval > MAX_TIME or e.irq[g].handler_ns > MAX_SPAN \
            or e.irq[g].sv_guest > MAX_SPAN or e.irq[g].handler_noiret > 1:
        raise ValueError(f"thread {g}: its timer, handler (time, iret flag) or "
                         "interrupted segment out of range")
    if th.resume == RESUME_HALT and (th.state == TS_BLOCKED or th.state == TS_RUNNABLE) \
            and th.poll_end < th.halt_start:
        raise ValueError(f"thread {g}: its halt-polling ended before its halt began")


cdef _check_sched(Engine self, uint8_t[::1] where):
    """The host scheduler's fields (core/host.pxi) against the run queues: FIFO
    leaves them zero; under EEVDF on_rq is "current or queued", only a queued
    sleeper is delayed (and every queued sleeper is), need_resched needs a
    current thread, and sum_v is the queued vruntimes' sum."""
    cdef engine_t* e = &self.e
    cdef uint32_t g, c
    cdef thread_t* th
    cdef cpu_t* cpu
    sums = [0] * e.ncpu
    for g in range(e.nth):
        th = &e.th[g]
        if e.sched == SCHED_POLICY_FIFO:
            if th.on_rq or th.sched_delayed:
                raise ValueError(f"thread {g}: EEVDF state on a fifo host")
            continue
        if th.on_rq > 1 or th.sched_delayed > 1 or th.on_rq != (where[g] != 0) \
                or th.sched_delayed != (where[g] == 2 and th.state != TS_RUNNABLE):
            raise ValueError(f"thread {g}: on_rq or sched_delayed disagrees with its "
                             "host CPU's run queue")
        if th.on_rq:
            sums[th.pcpu] += th.vruntime - e.cpus[th.pcpu].zero_v
    for c in range(e.ncpu):
        cpu = &e.cpus[c]
        if e.sched == SCHED_POLICY_FIFO:
            if cpu.need_resched or cpu.sum_v or cpu.zero_v:
                raise ValueError(f"host CPU {c}: EEVDF state on a fifo host")
            continue
        if cpu.need_resched > 1 or cpu.need_resched and (
                cpu.cur < 0 or e.th[cpu.cur].state != TS_RUNNABLE
                and e.th[cpu.cur].state != TS_RUNNING and e.th[cpu.cur].state != TS_USER):
            raise ValueError(f"host CPU {c}: a pending reschedule without a current "
                             "thread")
        if sums[c] != cpu.sum_v:
            raise ValueError(f"host CPU {c}: its vruntime sum disagrees with its queue")
        if cpu.rq_len and cpu.cur < 0:
            raise ValueError(f"host CPU {c}: threads queued on an idle CPU")


cdef int32_t _rq_last(engine_t* e, cpu_t* cpu):
    cdef int32_t x = cpu.rq_head
    while e.th[x].rq_next >= 0:
        x = e.th[x].rq_next
    return x


cdef _check_programs(Engine self, uint64_t nops):
    """Each distinct program must pass the guest validation against its VM (a host
    thread's, the host-program validation against the host's VMs)."""
    from . import guest as _guest
    from . import hostprog as _hostprog
    cdef engine_t* e = &self.e
    cdef uint32_t g
    ops = np.frombuffer(self._ops, dtype=_model.OP_DTYPE) if nops else None
    done = set()
    vms = [(e.vms[k].nr_vcpus, e.vms[k].nr_spis) for k in range(e.nvm)]
    for g in range(e.nth):
        th = &e.th[g]
        if not th.has_prog:
            continue
        if th.kind == THREAD_HOST:
            key = (th.prog, th.prog_n, None, None)
            if key in done:
                continue
            done.add(key)
            try:
                _hostprog.validate(ops[th.prog:th.prog + th.prog_n], vms, self.arch)
            except _guest.ProgramError as exc:
                raise ValueError(f"thread {g}'s host program: {exc}") from None
            continue
        key = (th.prog, th.prog_n, e.vms[th.vm].nr_vcpus, e.vms[th.vm].nr_spis)
        if key in done:
            continue
        done.add(key)
        try:
            _guest.validate(ops[th.prog:th.prog + th.prog_n], e.vms[th.vm].nr_vcpus,
                            self.arch, e.vms[th.vm].nr_spis)
        except _guest.ProgramError as exc:
            raise ValueError(f"thread {g}'s program: {exc}") from None


cdef _check_links(Engine self, const event_t* evs, uint64_t nev):
    """Each thread's state against where it is and what the heap holds for it.

    The scheduler's list operations and the interrupt handler's EOI trust these
    (a thread queued twice, or run while queued, or an EOI with no interrupt in
    service, would corrupt memory), so a snapshot must agree with them.  Called
    at the end of _check_state, once every index is known to be in range.
    """
    cdef engine_t* e = &self.e
    cdef uint32_t g, c
    cdef int32_t x
    cdef uint64_t i, cls
    cdef const event_t* ev
    cdef thread_t* th
    cdef virq_t* q
    where_arr = np.zeros(e.nth, dtype=np.uint8)     # 1: a host CPU's current, 2: queued
    live_arr = np.zeros(e.nth, dtype=np.uint8)      # its live SEGMENT/POLL_END/RUN event
    slice_arr = np.zeros(e.nth, dtype=np.uint8)     # its live SLICE event
    cdef uint8_t[::1] where = where_arr
    cdef uint8_t[::1] live = live_arr
    cdef uint8_t[::1] slices = slice_arr
    timer_arr = np.zeros(e.nth, dtype=np.uint8)     # a host thread's live hrtimer
    cdef uint8_t[::1] timers = timer_arr
    for c in range(e.ncpu):
        x = e.cpus[c].cur
        if x >= 0:
            if e.th[x].state != TS_RUNNABLE and e.th[x].state != TS_RUNNING \
                    and e.th[x].state != TS_POLLING and not (
                        e.th[x].state == TS_USER and e.th[x].kind == THREAD_VCPU
                        and e.sched == SCHED_POLICY_EEVDF and e.th[x].pcpu == c):
                # (EEVDF: a vCPU thread in userspace keeps its CPU, hold_cpu.)
                raise ValueError(f"host CPU {c}: its current thread {x} is neither running "
                                 "nor about to, nor a vCPU thread in userspace")
            where[x] = 1
        x = e.cpus[c].rq_head
        while x >= 0:
            # (EEVDF: a delayed-dequeue sleeper stays queued.)
            if where[x] or (e.th[x].state != TS_RUNNABLE and not e.th[x].sched_delayed):
                raise ValueError(f"host CPU {c}: run queue holds thread {x}, which is "
                                 "current or not runnable")
            where[x] = 2
            x = e.th[x].rq_next
    _check_sched(self, where)
    for g in range(e.nth):
        th = &e.th[g]
        if (th.state == TS_RUNNING or th.state == TS_POLLING) and where[g] != 1 \
                or th.state == TS_RUNNABLE and where[g] == 0 \
                or th.state == TS_BLOCKED and where[g] != 0 and not th.sched_delayed \
                or th.state == TS_USER and where[g] == 2 and not th.sched_delayed:
            raise ValueError(f"thread {g}: its state disagrees with its host CPU's run queue")
        if where[g] != 2 and th.rq_next != -1:
            raise ValueError(f"thread {g}: a run-queue link but in no run queue")
    # The exit queue: threads that left KVM_RUN, each once (take_exit removes one).
    exited_arr = np.zeros(e.nth, dtype=np.uint8)
    cdef uint8_t[::1] exited = exited_arr
    for i in range(e.exq_len):
        g = e.exitq[(e.exq_head + i) % e.nth]
        if exited[g] or e.th[g].state != TS_USER:
            raise ValueError(f"thread {g}: in the exit queue twice, or inside KVM_RUN")
        exited[g] = 1
    for i in range(nev):
        ev = &evs[i]
        cls = ev.key >> KW_SEQ_BITS
        if cls == EV_TIMER and e.th[ev.who].kind == THREAD_HOST \
                and ev.gen == e.irq[ev.who].timer_gen:
            if timers[ev.who] or e.th[ev.who].state != TS_BLOCKED:
                raise ValueError(f"event {i}: an hrtimer of host thread {ev.who}, which is "
                                 "not asleep or has another")
            timers[ev.who] = 1
        if cls == EV_SLICE and ev.gen == e.th[ev.who].run_gen:
            if slices[ev.who] or not e.th[ev.who].slice_armed or where[ev.who] != 1:
                raise ValueError(f"event {i}: a time slice of thread {ev.who}, which is "
                                 "not on its host CPU with one slice armed")
            slices[ev.who] = 1
        if cls < EV_SEGMENT or cls > EV_RUN or ev.gen != e.th[ev.who].gen:
            continue
        th = &e.th[ev.who]
        if live[ev.who]:
            raise ValueError(f"event {i}: a second live event of thread {ev.who}")
        live[ev.who] = 1
        if cls == EV_RUN and (th.state != TS_RUNNABLE or where[ev.who] != 1) \
                or cls == EV_SEGMENT and th.state != TS_RUNNING \
                or cls == EV_POLL_END and th.state != TS_POLLING:
            raise ValueError(f"event {i}: thread {ev.who}'s state does not expect it")
        if cls == EV_SEGMENT and ev.t != th.seg_end:
            raise ValueError(f"event {i}: thread {ev.who}'s segment ends at another time")
    cdef bint all_pinned = True
    for g in range(e.nth):
        if e.th[g].aff_kind != AFF_PINNED:
            all_pinned = False
    for g in range(e.nth):
        th = &e.th[g]
        # A lazy poll window (core/halt.pxi): a polling thread's, open (its end not
        # before the clock), standing where an event queued after the last one
        # would (at most seq + 1), only while poll ends need no event (no
        # timeline, every thread pinned: lazy_polls()).
        if th.poll_seq and (th.state != TS_POLLING or th.poll_stop < e.now
                            or th.poll_stop > MAX_TIME or th.poll_seq > e.seq + 1
                            or e.tlcap or not all_pinned):
            raise ValueError(f"thread {g}: a lazy poll window out of place or range")
        if not th.poll_seq and th.poll_stop:
            raise ValueError(f"thread {g}: a lazy poll window's end without the window")
        # The thread's own event, both ways: a running, polling (but in a lazy
        # window) or about-to-run thread has exactly one live event (checked
        # above), every other thread none.
        if live[g] != (th.state == TS_RUNNING or th.state == TS_POLLING and not th.poll_seq
                       or th.state == TS_RUNNABLE and where[g] == 1):
            raise ValueError(f"thread {g}: {'no' if not live[g] else 'a'} live event in "
                             f"state {th.state}")
        if th.slice_armed and not slices[g]:
            raise ValueError(f"thread {g}: a time slice armed without its event")
        if th.kind == THREAD_HOST and th.state == TS_BLOCKED and not timers[g]:
            raise ValueError(f"thread {g}: a host thread asleep without its hrtimer")
        check_times(e, g)
    for g in range(e.nth):
        th = &e.th[g]
        q = &e.irq[g]
        if q.cur_irq > (255 if e.x86 else 1023):
            raise ValueError(f"thread {g}: interrupt in service {q.cur_irq} out of range")
        if q.sv_valid and (q.sv_cont == CONT_IRQ or q.sv_cont == CONT_EOI):
            raise ValueError(f"thread {g}: an interrupted segment that was itself an "
                             "interrupt's")
        if th.cont == CONT_EOI and q.cur_irq < 0 and (
                live[g] and th.state == TS_RUNNING
                or th.state == TS_RUNNABLE and th.resume == RESUME_SEGMENT):
            raise ValueError(f"thread {g}: ends an interrupt handler with no interrupt "
                             "in service")
        if th.has_prog and th.pc >= th.prog_n:
            raise ValueError(f"thread {g}: program counter out of range")
        # A segment that ends in a trap carries out the op at the PC (trap_op), which
        # must then be a trapping op.  (Outside KVM_RUN userspace may move the PC.)
        if th.has_prog and th.state != TS_USER and not th.reset_pending and (
                th.cont == CONT_TRAP and (live[g] and th.state == TS_RUNNING
                                          or th.state == TS_RUNNABLE
                                          and th.resume == RESUME_SEGMENT)
                or q.sv_valid and q.sv_cont == CONT_TRAP) \
                and not _is_trap_op(e.ops[th.prog + th.pc].code):
            raise ValueError(f"thread {g}: traps on op {th.pc}, which does not trap")


cdef check_affinity(Engine self, uint32_t g):
    """Thread g's CPU affinity: a known kind; a list's mask inside the table,
    naming at least one CPU and none beyond the host's."""
    cdef engine_t* e = &self.e
    cdef thread_t* th = &e.th[g]
    cdef uint32_t w, c
    cdef uint64_t naff = len(self._aff)
    cdef bint any_cpu = 0
    if th.aff_kind > AFF_LIST:
        raise ValueError(f"thread {g}: an unknown CPU affinity kind {th.aff_kind}")
    if th.aff_kind != AFF_LIST:
        return
    if <uint64_t>th.aff_off + e.aff_words > naff:
        raise ValueError(f"thread {g}: its CPU affinity mask lies outside the table")
    for w in range(e.aff_words):
        if e.affmask[th.aff_off + w]:
            any_cpu = 1
    for c in range(e.ncpu, e.aff_words * 64):
        if (e.affmask[th.aff_off + (c >> 6)] >> (c & 63)) & 1:
            raise ValueError(f"thread {g}: its CPU affinity names CPU {c}, which the "
                             f"host ({e.ncpu} CPUs) does not have")
    if not any_cpu:
        raise ValueError(f"thread {g}: an empty CPU affinity")


cdef index_affinity(Engine self):
    """After an import or re-placement: the mask table's index, the count of
    threads that are not pinned and the count of waiting threads (all derived)."""
    cdef engine_t* e = &self.e
    cdef uint32_t g
    self._aff_index = {}
    e.nunpinned = 0
    e.nqueued = 0
    for g in range(e.ncpu):
        e.nqueued += e.cpus[g].rq_len
    for g in range(e.nth):
        if e.th[g].aff_kind != AFF_PINNED:
            e.nunpinned += 1
        if e.th[g].aff_kind == AFF_LIST:
            key = self._aff[e.th[g].aff_off:e.th[g].aff_off + e.aff_words].tobytes()
            self._aff_index.setdefault(key, e.th[g].aff_off)


def _engine_view(Engine self):
    """What the Python side of a restore is checked against: per VM (first thread,
    vCPUs, SPIs, KVM_CAP_HALT_POLL ceiling or None, tick, suspend cap), per thread
    (has a program, thread state), and the threads in the exit queue."""
    cdef engine_t* e = &self.e
    cdef uint32_t v, g, k
    vms = [(e.vms[v].first, e.vms[v].nr_vcpus, e.vms[v].nr_spis,
            e.vms[v].max_halt_poll_ns if e.vms[v].override else None, e.vms[v].tick_ns,
            bool(e.vms[v].suspend_cap)) for v in range(e.nvm)]
    threads = [(bool(e.th[g].has_prog), e.th[g].state) for g in range(e.nth)]
    # (Host threads: their kinds are Engine.thread_kinds().)
    queued = [e.exitq[(e.exq_head + k) % e.nth] for k in range(e.exq_len)]
    return vms, threads, queued


def _engine_exit_record(Engine self, uint32_t g):
    """Thread g's last exit to userspace as take_exit() gives it, without taking it."""
    if g >= self.e.nth:
        raise IndexError(f"thread {g} does not exist")
    cdef thread_t* th = &self.e.th[g]
    return {"reason": th.exit_reason, "type": th.exit_type, "ndata": th.exit_ndata,
            "data0": th.exit_data0, "ucall": th.exit_ucall, "value": th.exit_value,
            "time": th.exit_time}


cdef inline bint _is_trap_op(uint16_t code) noexcept nogil:
    """The ops advance() ends a segment on with CONT_TRAP, for trap_op to carry out."""
    return code == OP_SGI or code == OP_IRQ_ENABLE or code == OP_IRQ_DISABLE \
        or code == OP_SET_PRIORITY or code == OP_DIST_ENABLE or code == OP_ROUTE_SPI \
        or code == OP_HVC or code == OP_SYNC


def _engine_rehost(Engine self, uint32_t ncpu):
    """Move every vCPU thread to a host of ``ncpu`` CPUs, as a migration would.

    Thread g goes to host CPU g % ncpu (one with an affinity list: the
    (g mod n)-th of the n CPUs of its list that the new host has; a list left
    empty is refused; the LLC groups are then the caller's to set).  Threads that had a CPU keep one if
    their new CPU is free (in the old CPU order); otherwise a running thread
    is preempted (the rest of its segment waits in the run queue), a polling
    one stops polling and blocks (another thread is runnable on its CPU), and
    one about to get its CPU queues instead.  Queued threads keep their order
    behind them.  A CPU left idle with threads queued gives the first one the
    CPU after a context switch.  The result is checked like an imported state.
    """
    cdef engine_t* e = &self.e
    cdef uint32_t c, g, old_n = e.ncpu
    cdef int32_t x
    cdef thread_t* th
    cdef cpu_t* cpu
    cdef uint64_t t = e.now
    if ncpu == 0 or ncpu > (1 << 20):
        raise ValueError(f"host_cpus = {ncpu} out of range 1..{1 << 20}")
    for g in range(e.nth):
        if e.th[g].kind == THREAD_HOST:
            raise ValueError("restoring onto another host CPU count is not implemented "
                             "with host threads")
    # Affinity lists keep the CPUs the new host has (checked before anything changes).
    lists = {}
    for g in range(e.nth):
        if e.th[g].aff_kind == AFF_LIST:
            kept = [c for c in self.affinity(g) if c < ncpu]
            if not kept:
                raise ValueError(f"thread {g}'s CPU affinity {list(self.affinity(g))} names "
                                 f"no CPU of a {ncpu}-CPU host")
            lists[g] = kept
    # Open lazy poll windows get their events first (a polling thread whose CPU is
    # taken stops polling, which cancels its POLL_END event).
    self._check(queue_lazy_polls(e))
    curs = []
    queues = []
    for c in range(old_n):
        cpu = &e.cpus[c]
        if cpu.cur >= 0:
            curs.append(cpu.cur)
        q = []
        x = cpu.rq_head
        while x >= 0:
            q.append(x)
            x = e.th[x].rq_next
        queues.append(q)
    self._cpus = np.zeros(ncpu * sizeof(cpu_t), dtype=np.uint8)
    self._held = np.zeros(ncpu, dtype=np.uint32)     # (FIFO: nothing is held)
    e.nheld = 0
    self._llc = np.zeros(ncpu, dtype=np.uint32)      # one LLC until set_llc()
    self._aff = np.zeros(0, dtype=np.uint64)
    self._aff_index = {}
    e.ncpu = ncpu
    e.aff_words = (ncpu + 63) // 64
    self._bind()
    for g, kept in lists.items():
        self.set_affinity(g, kept, True)
    for c in range(ncpu):
        e.cpus[c].cur = -1
        e.cpus[c].rq_head = -1
        e.cpus[c].rq_tail = -1
    for g in range(e.nth):
        e.th[g].pcpu = select_task_rq_fork(e, g)      # g % ncpu unless a list says
        e.th[g].rq_next = -1
    for g in curs:
        th = &e.th[g]
        cpu = &e.cpus[th.pcpu]
        if cpu.cur < 0:
            cpu.cur = g
            continue
        th.run_gen += 1
        th.slice_armed = 0
        if th.state == TS_RUNNING:
            # Preempted, as slice_end does it.
            keep_segment_rest(e, th, t)
            th.state = TS_RUNNABLE
            th.resume = RESUME_SEGMENT
            rq_append(e, cpu, g)
        elif th.state == TS_POLLING:
            # kvm_vcpu_block: the poll ends now, without the CPU to release.
            th.poll_end = t
            e.stats[<uint64_t>g * NR_STATS + S_BLOCKING] = 1
            th.state = TS_BLOCKED
            th.gen += 1
        else:
            th.gen += 1                    # its EV_RUN is void: it queues instead
            rq_append(e, cpu, g)
    for q in queues:
        for g in q:
            rq_append(e, &e.cpus[e.th[g].pcpu], g)
    for c in range(ncpu):
        cpu = &e.cpus[c]
        if not cpu.rq_len:
            continue
        if cpu.cur < 0:
            g = <uint32_t>rq_popleft(e, cpu)
            cpu.cur = g
            if push_thread(e, &e.th[g], g, t + cost_ns(e, &e.th[g], COST_CONTEXT_SWITCH), EV_RUN):
                raise MemoryError("the event queue could not grow")
        elif e.th[cpu.cur].state == TS_POLLING:
            if block(e, <uint32_t>cpu.cur, t, t):
                raise MemoryError("the event queue could not grow")
        elif e.th[cpu.cur].state == TS_RUNNING:
            if arm_slice(e, &e.th[cpu.cur], <uint32_t>cpu.cur, t):
                raise MemoryError("the event queue could not grow")
    index_affinity(self)
    _check_state(self, True)
