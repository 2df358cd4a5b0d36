# core/queue.pxi (twin: kvmwake/reference/queue.py).
# Mirrors: no kernel code; the virtual clock's event queue, which stands in
# for real time and the hrtimer base.
#
# The event queue: a radix heap over event times with 64 buckets per level
# (evq_t in _core.pxd).  Events are popped in (t, key) order, where key =
# (event class << 56) | sequence number, exactly as a binary heap of (t, key)
# would pop them.
#
# * Time is cut into windows of 2**KW_QSHIFT ns (64).  Bucket 0 (b0) holds the
#   events in the base's window, as a binary heap in (t, key) order.  Every
#   other event is in bucket (L, d): L is the highest 6-bit digit in which its
#   window index differs from the base's, d its own digit there.  Those
#   buckets are unordered arrays with their earliest time (tmin); dmask[L]
#   has bit d set while bucket (L, d) holds events, lmask bit L while
#   dmask[L] is not 0.
# * Pushing appends to one bucket (or sifts into b0).  When b0 runs empty,
#   the lowest non-empty bucket (lowest level, then lowest digit) holds the
#   earliest events; it is redistributed around its earliest time, the new
#   base, and each of its events lands on a lower level or in b0.  An event
#   is filed about twice in all (at most once per level); a bucket of one
#   event gives it up without filing it.
# * Cancellation is by generation: an event whose gen no longer matches its
#   owner's is void.  A void event is dropped when its bucket is
#   redistributed, without being popped (``dropped`` counts them); one that
#   reached b0 while live is skipped by the run loop when popped.
#   Generations only grow, so a void event stays void.
# * Invariant: base <= every queued time, and base <= the engine's clock
#   outside heap_pop, so that every push (at the clock or later) is at or
#   above the base.  A push below the base (which the engine never makes)
#   re-files every event around the new base (q_rebase).

from libc.stdlib cimport malloc, realloc, free, qsort

cdef extern from *:
    """
    #define KW_NO_TIME 0xFFFFFFFFFFFFFFFFULL
    #define KW_QSHIFT 6
    """
    const uint64_t KW_NO_TIME
    const uint64_t KW_QSHIFT          # model.QUEUE_SHIFT: a window is 64 ns


cdef inline bint ev_before(const event_t* a, const event_t* b) noexcept nogil:
    # Bitwise, not short-circuit: compiles without a branch.
    return (a.t < b.t) | ((a.t == b.t) & (a.key < b.key))


cdef int ev_cmp(const void* a, const void* b) noexcept nogil:
    """qsort's comparison: (t, key) order."""
    if ev_before(<const event_t*>a, <const event_t*>b):
        return -1
    return ev_before(<const event_t*>b, <const event_t*>a)


cdef inline bint ev_live(const engine_t* e, const event_t* ev) noexcept nogil:
    """The event's gen is its owner's: it has not been cancelled."""
    cdef uint64_t cls = ev.key >> KW_SEQ_BITS
    if cls == EV_TICK:
        return ev.gen == e.vms[ev.who].tick_gen
    if cls == EV_SOURCE:
        return ev.gen == e.src[ev.who].gen
    if cls == EV_TIMER:
        return ev.gen == e.irq[ev.who].timer_gen
    if cls == EV_SLICE:
        return ev.gen == e.th[ev.who].run_gen
    return ev.gen == e.th[ev.who].gen


cdef inline int32_t q_bucket(uint64_t base, uint64_t t) noexcept nogil:
    """The bucket of time t (>= base) around ``base``: -1 for b0 (base's window),
    else L * 64 + d (see the top of this file)."""
    cdef uint64_t x = (t >> KW_QSHIFT) ^ (base >> KW_QSHIFT)
    cdef uint32_t level
    if x == 0:
        return -1
    level = <uint32_t>(63 - __builtin_clzll(x)) / 6
    return <int32_t>(level * 64 + (((t >> KW_QSHIFT) >> (6 * level)) & 63))


cdef void q_init(evq_t* q, uint64_t base) noexcept nogil:
    """An empty queue (its buckets' memory is not allocated yet)."""
    memset(q, 0, sizeof(evq_t))
    q.base = base
    q.b0.tmin = KW_NO_TIME
    cdef int k
    for k in range(KW_QBUCKETS):
        q.b[k].tmin = KW_NO_TIME


cdef void q_free(evq_t* q) noexcept nogil:
    cdef int k
    free(q.b0.ev)
    for k in range(KW_QBUCKETS):
        free(q.b[k].ev)
    q_init(q, q.base)


cdef void q_clear(evq_t* q, uint64_t base) noexcept nogil:
    """Empty the queue, keeping its memory."""
    cdef int k
    q.b0.n = 0
    q.b0.tmin = KW_NO_TIME
    for k in range(KW_QBUCKETS):
        q.b[k].n = 0
        q.b[k].tmin = KW_NO_TIME
    memset(q.dmask, 0, sizeof(q.dmask))
    q.lmask = 0
    q.len = 0
    q.base = base


cdef inline int q_grow(engine_t* e, evq_bucket_t* b) noexcept nogil:
    cdef uint64_t ncap = b.cap * 2 if b.cap else 16
    cdef event_t* p = <event_t*>realloc(b.ev, ncap * sizeof(event_t))
    if p == NULL:
        e.error = KW_ERR_NOMEM
        return -1
    b.ev = p
    b.cap = ncap
    return 0


cdef inline void q_shrink(evq_bucket_t* b, uint64_t used) noexcept nogil:
    """Give back most of an emptied bucket's memory when it last held far fewer
    events than it has room for (the room a burst, such as every vCPU starting at
    once, left behind): keep room for twice ``used``, 16 at least.  A failed
    realloc keeps the larger array."""
    cdef uint64_t ncap = 16
    cdef event_t* p
    if b.cap <= 1024 or used * 8 >= b.cap:
        return
    while ncap < 2 * used:
        ncap *= 2
    p = <event_t*>realloc(b.ev, ncap * sizeof(event_t))
    if p != NULL:
        b.ev = p
        b.cap = ncap


cdef inline int q_file(engine_t* e, const event_t* ev) noexcept nogil:
    """Put an event (at or after the base) into its bucket; the count is the caller's."""
    cdef evq_t* q = &e.q
    cdef int32_t k = q_bucket(q.base, ev.t)
    cdef evq_bucket_t* b = &q.b0 if k < 0 else &q.b[k]
    cdef event_t* h
    cdef uint64_t i, parent
    if b.n == b.cap and q_grow(e, b):
        return -1
    if ev.t < b.tmin:
        b.tmin = ev.t
    if k >= 0:
        b.ev[b.n] = ev[0]
        b.n += 1
        q.dmask[k >> 6] |= 1ULL << (k & 63)
        q.lmask |= 1ULL << (k >> 6)
        return 0
    # b0: a binary heap in (t, key) order.
    h = b.ev
    i = b.n
    b.n += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not ev_before(ev, &h[parent]):
            break
        h[i] = h[parent]
        i = parent
    h[i] = ev[0]
    return 0


cdef inline int32_t q_lowest(const evq_t* q) noexcept nogil:
    """The lowest non-empty bucket other than b0 (there must be one)."""
    cdef uint32_t level = __builtin_ctzll(q.lmask)
    return <int32_t>(level * 64 + __builtin_ctzll(q.dmask[level]))


cdef uint64_t q_collect(const engine_t* e, event_t* out, bint live_only) noexcept nogil:
    """Copy the queued events (only the live ones with ``live_only``) into ``out``
    (room for e.q.len) in (t, key) order; returns how many."""
    cdef uint64_t n = 0, i
    cdef int k
    cdef const evq_bucket_t* b
    for k in range(-1, KW_QBUCKETS):
        b = &e.q.b0 if k < 0 else &e.q.b[k]
        for i in range(b.n):
            if not live_only or ev_live(e, &b.ev[i]):
                out[n] = b.ev[i]
                n += 1
    if n > 1:
        qsort(out, n, sizeof(event_t), ev_cmp)
    return n


cdef int q_rebase(engine_t* e, uint64_t base) noexcept nogil:
    """Re-file every queued event around an earlier base."""
    cdef evq_t* q = &e.q
    cdef uint64_t n = q.len, i
    cdef event_t* all_ = NULL
    if n:
        all_ = <event_t*>malloc(n * sizeof(event_t))
        if all_ == NULL:
            e.error = KW_ERR_NOMEM
            return -1
        q_collect(e, all_, False)
    q_clear(q, base)
    for i in range(n):
        if q_file(e, &all_[i]):
            free(all_)
            return -1
    q.len = n
    free(all_)
    return 0


cdef int q_insert(engine_t* e, const event_t* ev) noexcept nogil:
    """Queue an event as it is (its key already made)."""
    if ev.t < e.q.base and q_rebase(e, ev.t):
        return -1
    if q_file(e, ev):
        return -1
    e.q.len += 1
    return 0


cdef int heap_push(engine_t* e, uint64_t t, uint64_t cls, uint32_t who,
                   uint32_t gen) noexcept nogil:
    """Push an event; returns -1 when memory runs out, or the sequence numbers do
    (KW_MAX_SEQ: above it, they would reach the class bits of the key)."""
    cdef event_t ev
    if e.seq >= KW_MAX_SEQ:
        e.error = KW_ERR_SEQ
        return -1
    e.seq += 1
    ev.t = t
    ev.key = (cls << KW_SEQ_BITS) | e.seq
    ev.who = who
    ev.gen = gen
    return q_insert(e, &ev)


cdef inline uint64_t q_peek(const engine_t* e) noexcept nogil:
    """The earliest queued time (void events included), KW_NO_TIME when empty."""
    if e.q.b0.n:
        return e.q.b0.tmin
    if e.q.lmask:
        return e.q.b[q_lowest(&e.q)].tmin
    return KW_NO_TIME


cdef int heap_pop(engine_t* e, event_t* out) noexcept nogil:
    """Pop the earliest event into ``out``: 1.  Or, when b0 was empty and the
    redistribution of the lowest bucket dropped every event that reached b0 as
    void: 0, nothing popped (call again).  -1 when memory runs out.  The
    queue must not be empty."""
    cdef evq_t* q = &e.q
    cdef evq_bucket_t* b0 = &q.b0
    cdef evq_bucket_t* bk
    cdef event_t* h
    cdef event_t last
    cdef uint64_t n, i, c, j
    cdef int32_t k
    if b0.n == 0:
        k = q_lowest(q)
        bk = &q.b[k]
        q.base = bk.tmin
        q.dmask[k >> 6] &= ~(1ULL << (k & 63))
        if q.dmask[k >> 6] == 0:
            q.lmask &= ~(1ULL << (k >> 6))
        n = bk.n
        bk.n = 0
        bk.tmin = KW_NO_TIME
        if n == 1:
            # The one event of the bucket is the earliest: no need to file it.
            q.len -= 1
            if ev_live(e, &bk.ev[0]):
                out[0] = bk.ev[0]
                return 1
            q.dropped += 1
            return 0
        for j in range(n):
            if not ev_live(e, &bk.ev[j]):
                q.len -= 1
                q.dropped += 1
            elif q_file(e, &bk.ev[j]):      # to a lower level, or b0
                return -1
        q_shrink(bk, n)
        if b0.n == 0:
            return 0
    h = b0.ev
    out[0] = h[0]
    q.len -= 1
    b0.n -= 1
    n = b0.n
    if n == 0:
        b0.tmin = KW_NO_TIME
        q_shrink(b0, 1)
        return 1
    last = h[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n:
            c += ev_before(&h[c + 1], &h[c])     # the earlier child, without a branch
        if not ev_before(&h[c], &last):
            break
        h[i] = h[c]
        i = c
    h[i] = last
    b0.tmin = h[0].t
    return 1


cdef int q_check(const engine_t* e) except -1:
    """The queue's own invariants (the debug build's periodic check and the tests)."""
    cdef const evq_t* q = &e.q
    cdef uint64_t total = 0, i, tmin
    cdef int k
    cdef uint32_t level
    cdef const evq_bucket_t* b
    for k in range(-1, KW_QBUCKETS):
        b = &q.b0 if k < 0 else &q.b[k]
        tmin = KW_NO_TIME
        for i in range(b.n):
            if b.ev[i].t < q.base or q_bucket(q.base, b.ev[i].t) != k:
                raise ValueError(f"event queue: an event at t={b.ev[i].t} in bucket {k} "
                                 f"around {q.base}")
            if k < 0 and i and ev_before(&b.ev[i], &b.ev[(i - 1) >> 1]):
                raise ValueError("event queue: bucket 0 is out of heap order")
            if b.ev[i].t < tmin:
                tmin = b.ev[i].t
        if b.tmin != tmin or b.n > b.cap:
            raise ValueError(f"event queue: bucket {k}'s earliest time or size is wrong")
        if k >= 0 and ((q.dmask[k >> 6] >> (k & 63)) & 1) != (b.n != 0):
            raise ValueError(f"event queue: the masks disagree with bucket {k}")
        total += b.n
    for level in range(KW_QLEVELS):
        if ((q.lmask >> level) & 1) != (q.dmask[level] != 0):
            raise ValueError(f"event queue: the level mask disagrees with level {level}")
    if q.lmask >> KW_QLEVELS:
        raise ValueError("event queue: the level mask names a level beyond the last")
    if total != q.len:
        raise ValueError(f"event queue: {total} events in the buckets, {q.len} counted")
    return 0


cdef inline int push_thread(engine_t* e, thread_t* th, uint32_t g, uint64_t t,
                            uint64_t cls) noexcept nogil:
    th.gen += 1
    return heap_push(e, t, cls, g, th.gen)


cdef uint64_t _queue_bytes(const evq_t* q) noexcept nogil:
    """Bytes of the queue's bucket arrays."""
    cdef uint64_t n = q.b0.cap * sizeof(event_t)
    cdef int k
    for k in range(KW_QBUCKETS):
        n += q.b[k].cap * sizeof(event_t)
    return n


def queue_replay(ops):
    """Drive a private queue with a list of (op, a, b) steps; the tests' window on it.

    Eight threads own the events (EV_SEGMENT, gen their ``gen``).  Steps:
    (0, dt, g) thread g's event at now + dt (push_thread: its earlier one is
    void); (1, 0, 0) pop as the run loop does, until a live event (the clock
    moves to it) or an empty queue; (2, g, 0) thread g's event is cancelled;
    (3, dt, 0) the clock steps back by dt (down to 0), so that pushes may
    fall below the queue's base.  The queue's invariants are checked after
    every step.  Returns (the live events popped as (t, key, who), the void
    events popped, queue length, dropped count).
    """
    cdef engine_t e
    cdef thread_t th[8]
    cdef event_t ev
    cdef uint64_t now = 0, op, a, b, skipped = 0
    cdef int rc
    memset(&e, 0, sizeof(engine_t))
    memset(th, 0, sizeof(th))
    e.th = th
    q_init(&e.q, 0)
    popped = []
    try:
        for op, a, b in ops:
            if op == 0:
                if b >= 8 or a > (1 << 62):
                    raise ValueError(f"step {(op, a, b)}: thread or time out of range")
                if push_thread(&e, &th[b], <uint32_t>b, now + a, EV_SEGMENT):
                    raise MemoryError("the event queue could not grow")
            elif op == 1:
                while e.q.len:
                    rc = heap_pop(&e, &ev)
                    if rc < 0:
                        raise MemoryError("the event queue could not grow")
                    if rc == 0:
                        continue
                    if ev_live(&e, &ev):
                        now = ev.t
                        popped.append((ev.t, ev.key, ev.who))
                        break
                    skipped += 1
            elif op == 2:
                if a >= 8:
                    raise ValueError(f"step {(op, a, b)}: no thread {a}")
                th[a].gen += 1
            elif op == 3:
                now = now - a if a < now else 0
            else:
                raise ValueError(f"step {(op, a, b)}: unknown op")
            q_check(&e)
        return popped, skipped, e.q.len, e.q.dropped
    finally:
        q_free(&e.q)
