# core/bench.pxi (twin: kvmwake/reference/bench.py).
# Mirrors: no kernel code; micro-benchmark hooks that leave the model
# untouched.
#
# Micro-benchmark hooks, in the style of numpy.random's ``_benchmark``: each
# runs its loop without the GIL and returns the elapsed wall time in ns
# (CLOCK_MONOTONIC), so that bench/ can report a cost per operation that
# excludes the Python call.  Nothing here is used by the engine itself, and
# none of it changes the model: a hook either works on private state or puts
# a real Engine back exactly as it found it.
#
# bench_heap(n, seed)            n heap_push of pseudo-random times into an
#                                empty queue, then pop them all (order checked)
# bench_wake_scan(engine, g, n)  the wake condition of one vCPU (the vGIC scan)
# bench_vm_scan(engine, vm, n)   the wake condition of every vCPU of a VM
# bench_kick(engine, g, n)       reschedule IPI + kvm_vcpu_kick of a BLOCKED vCPU
# bench_halt_path(n, poll)       a 2-vCPU engine: n complete halts of vCPU 0,
#                                each ended by vCPU 1's wake

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef inline uint64_t _bench_now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


def bench_heap(uint64_t n, uint64_t seed=0):
    """Push ``n`` events with pseudo-random times into an empty queue, pop them all.

    Works on a private, zeroed ``engine_t`` (the queue's buckets grow from
    nothing by doubling, as in a real run) whose one thread, VM, source and
    interrupt state own every event, so that none is void.  Every popped event
    is checked to come no earlier, in (time, class, sequence) order, than the
    one before; a disorder raises ``AssertionError``.  Returns the wall ns of
    the pushes and pops together.
    """
    cdef engine_t e
    cdef thread_t th
    cdef vm_t vm
    cdef source_t src
    cdef virq_t irq
    cdef event_t ev, prev
    cdef uint64_t i, x, t0, t1, popped = 0
    cdef int rc = 0
    cdef bint bad = False
    memset(&e, 0, sizeof(engine_t))
    memset(&th, 0, sizeof(thread_t))
    memset(&vm, 0, sizeof(vm_t))
    memset(&src, 0, sizeof(source_t))
    memset(&irq, 0, sizeof(virq_t))
    e.th, e.vms, e.src, e.irq = &th, &vm, &src, &irq
    q_init(&e.q, 0)
    memset(&prev, 0, sizeof(event_t))
    x = splitmix64(seed)
    try:
        with nogil:
            t0 = _bench_now_ns()
            for i in range(n):
                x = fmix64(x + <uint64_t>0x9E3779B97F4A7C15)
                # Times within ~1.1 ms, so that equal times (ordered by class
                # and sequence) occur too; the class is one of the five.
                rc = heap_push(&e, x & 0xFFFFF, (x >> 32) % 5, 0, 0)
                if rc:
                    break
            if rc == 0:
                while e.q.len:
                    rc = heap_pop(&e, &ev)
                    if rc < 0:
                        break
                    if rc == 0:
                        continue
                    rc = 0
                    if popped and ev_before(&ev, &prev):
                        bad = True
                        break
                    prev = ev
                    popped += 1
            t1 = _bench_now_ns()
    finally:
        q_free(&e.q)
    if rc:
        raise MemoryError("the event queue could not grow")
    if bad:
        raise AssertionError(f"the queue popped out of order after {popped} pops")
    if popped != n:
        raise AssertionError(f"{popped} events popped of {n} pushed")
    return t1 - t0


def bench_wake_scan(Engine engine, uint32_t g, uint64_t n):
    """``n`` wake-condition checks (``kvm_arch_vcpu_runnable``) of thread ``g``.

    Read-only: the vGIC scan (or the LAPIC's) over whatever state the engine
    holds.  Returns (wall ns of the n scans, the answer).
    """
    cdef engine_t* e = &engine.e
    cdef uint64_t i, t0, t1, hits = 0
    if g >= e.nth:
        raise ValueError(f"no thread {g} (the engine has {e.nth})")
    with nogil:
        t0 = _bench_now_ns()
        for i in range(n):
            hits += runnable(e, g)
        t1 = _bench_now_ns()
    return t1 - t0, hits == n


def bench_vm_scan(Engine engine, uint32_t vmi, uint64_t n):
    """``n`` scans of the wake condition of every vCPU of VM ``vmi`` (read-only).

    Returns (wall ns of the n whole-VM scans, vCPUs found runnable in one scan).
    """
    cdef engine_t* e = &engine.e
    cdef uint64_t i, t0, t1, hits = 0
    cdef uint32_t g, first, last
    if vmi >= e.nvm:
        raise ValueError(f"no VM {vmi} (the engine has {e.nvm})")
    first = e.vms[vmi].first
    last = first + e.vms[vmi].nr_vcpus
    with nogil:
        t0 = _bench_now_ns()
        for i in range(n):
            hits = 0
            for g in range(first, last):
                hits += runnable(e, g)
        t1 = _bench_now_ns()
    return t1 - t0, hits


def bench_kick(Engine engine, uint32_t g, uint64_t n):
    """The reschedule IPI + ``kvm_vcpu_kick`` of thread ``g``, ``n`` times.

    ``g`` must be BLOCKED in a halt on an idle host CPU, with nothing pending
    (e.g. a vCPU whose program is ``wfi`` with polling off, run past its
    halt): each iteration raises SGI 0 (arm64) or vector 0xFD (x86) and kicks
    it, which is ``kvm_vcpu_wake_up`` (the halt_wakeup stat, RUNNABLE) and
    ``try_to_wake_up`` (it takes the idle host CPU and its EV_RUN event is
    pushed).  Then the fields the kick changed are put back and the event is
    dropped, so the next iteration kicks the same blocked vCPU.

    The EV_RUN events go to a private queue emptied each time, so heap_push
    costs O(1) here (the queue's own cost is ``bench_heap``'s).  On return the
    engine is exactly as before.  Returns the wall ns of the n kicks.
    """
    cdef engine_t* e = &engine.e
    cdef thread_t* th
    cdef virq_t* q
    cdef cpu_t* cpu
    cdef thread_t saved_th
    cdef virq_t saved_q
    cdef cpu_t saved_cpu
    cdef uint64_t saved_wakeups, saved_seq, i, t0, t1, done = 0
    cdef uint64_t saved_tlcap
    cdef evq_t saved_evq
    cdef uint64_t req0
    cdef uint64_t ap0, irr3
    cdef uint32_t latch0
    cdef int rc = 0
    if engine._failed:
        raise ValueError("this engine stopped on an earlier error")
    if g >= e.nth:
        raise ValueError(f"no thread {g} (the engine has {e.nth})")
    th = &e.th[g]
    q = &e.irq[g]
    cpu = &e.cpus[th.pcpu]
    if th.state != TS_BLOCKED or th.resume != RESUME_HALT or cpu.cur >= 0 or runnable(e, g):
        raise ValueError(f"thread {g} must be BLOCKED in a halt on an idle host CPU with "
                         f"nothing pending (state {th.state}, host CPU {th.pcpu} runs {cpu.cur})")
    saved_th = th[0]
    saved_q = q[0]
    saved_cpu = cpu[0]
    saved_wakeups = e.stats[<uint64_t>g * NR_STATS + S_WAKEUP]
    saved_evq, saved_seq = e.q, e.seq
    req0, ap0, latch0, irr3 = th.requests, q.ap[0], q.priv_latch, q.irr[3]
    q_init(&e.q, e.now)           # a private queue, emptied after each kick
    saved_tlcap = e.tlcap
    e.tlcap = 0                   # the kicks are undone: keep them off the timeline
    try:
        with nogil:
            t0 = _bench_now_ns()
            for i in range(n):
                rc = raise_irq(e, g, e.resched_irq, e.now)
                if rc != 0 or th.state != TS_RUNNABLE or e.q.len != 1:
                    break
                done += 1
                th.state = TS_BLOCKED
                th.requests = req0
                q.ap[0] = ap0
                q.priv_latch = latch0
                q.irr[3] = irr3
                cpu.cur = -1
                q_clear(&e.q, e.now)
            t1 = _bench_now_ns()
    finally:
        e.tlcap = saved_tlcap
        th[0] = saved_th
        q[0] = saved_q
        cpu[0] = saved_cpu
        e.stats[<uint64_t>g * NR_STATS + S_WAKEUP] = saved_wakeups
        q_free(&e.q)
        e.q, e.seq = saved_evq, saved_seq
    if done != n:
        raise AssertionError(f"kick {done} did not wake thread {g} (rc {rc})")
    return t1 - t0


def bench_halt_path(uint64_t n, bint poll=False, uint64_t seed=0):
    """``n`` complete halts on a private 2-vCPU x86 engine (2 host CPUs).

    vCPU 0 loops ``n`` times over {compute 100 ns, HLT}; vCPU 1 loops ``n``
    times over {compute 10 us, wake vCPU 0}.  With ``poll`` false
    (halt_poll_ns = 0) every halt is the block path: kvm_vcpu_halt,
    kvm_vcpu_block, release of the host CPU, the kick's wake-up, the EV_RUN
    event, the re-check after schedule(), the halt stats and the guest entry.
    With ``poll`` true (halt_poll_ns 200 us) the halts end in the poll window.
    Both vCPUs' guest segments, exits and the wake-up IPI are part of each
    halt's cost.  Runs the event loop until both programs end, checks that
    there were exactly ``n`` halts, and returns the wall ns of the run.
    """
    cdef Engine eng
    cdef uint64_t t0, t1
    cdef int rc
    from . import guest as _g
    if n < 1 or n > 0xFFFFFFFF:
        raise ValueError(f"n = {n} is out of range 1..2**32-1")
    eng = Engine("x86", 2, seed, None, 0)
    eng.halt_poll_ns = 200_000 if poll else 0
    eng.add_vm(2)
    eng.load_program(0, _g.Program([_g.loop([_g.compute(100), _g.wfi()], n)]).ops)
    eng.load_program(1, _g.Program([_g.loop([_g.compute(10_000), _g.wake(0)], n)]).ops)
    eng.start_vcpu(0)
    eng.start_vcpu(1)
    with nogil:
        t0 = _bench_now_ns()
        rc = run_loop(&eng.e, <uint64_t>1 << 62, 0)
        while rc == KW_CHECKPOINT:           # the debug build's checkpoints
            rc = run_loop(&eng.e, <uint64_t>1 << 62, 0)
        t1 = _bench_now_ns()
    eng._check(rc)
    if eng.e.halts != n:
        raise AssertionError(f"{eng.e.halts} halts, expected {n}")
    return t1 - t0


def bench_counters(Engine engine):
    """Read-only counters of an engine's event queue, for the benchmark reports.

    ``pushes`` events were pushed in all (cancelled ones included), ``heap_len``
    are still queued, and ``dropped`` were cancelled ones dropped unpopped, so
    ``pushes - heap_len - dropped`` were popped, of which ``events`` were live
    (the others were cancelled by a newer generation after they reached the
    queue's bucket 0).  ``heap_cap`` is the queue's allocation, in events.
    """
    cdef engine_t* e = &engine.e
    return {"pushes": e.seq, "heap_len": e.q.len, "dropped": e.q.dropped,
            "heap_cap": _queue_bytes(&e.q) // sizeof(event_t),
            "events": e.events, "halts": e.halts, "threads": e.nth}
