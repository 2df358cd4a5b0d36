# core/queue.pxi (twin: kvmwake/reference/queue.py).
# Mirrors: no kernel code; the virtual clock's event queue, which stands in
# for real time and the hrtimer base.
#
# The event heap: a binary min-heap of event_t ordered by (t, key), where
# key = (event class << 56) | sequence number.  Cancellation is by generation:
# an event whose gen no longer matches its owner's is skipped when popped.

from libc.stdlib cimport malloc, realloc, free



cdef inline bint ev_before(const event_t* a, const event_t* b) noexcept nogil:
    # Bitwise, not short-circuit: compiles without a branch.
    return (a.t < b.t) | ((a.t == b.t) & (a.key < b.key))


cdef int heap_push(engine_t* e, uint64_t t, uint64_t cls, uint32_t who,
                   uint32_t gen) noexcept nogil:
    """Push an event; returns -1 when memory runs out, or the sequence numbers do
    (KW_MAX_SEQ: above it, they would reach the class bits of the key)."""
    cdef uint64_t i, parent, ncap
    cdef event_t ev
    cdef event_t* h
    if e.seq >= KW_MAX_SEQ:
        e.error = KW_ERR_SEQ
        return -1
    if e.hlen == e.hcap:
        ncap = e.hcap * 2 if e.hcap else 1024
        h = <event_t*>realloc(e.heap, ncap * sizeof(event_t))
        if h == NULL:
            e.error = KW_ERR_NOMEM
            return -1
        e.heap = h
        e.hcap = ncap
    e.seq += 1
    ev.t = t
    ev.key = (cls << KW_SEQ_BITS) | e.seq
    ev.who = who
    ev.gen = gen
    h = e.heap
    i = e.hlen
    e.hlen += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not ev_before(&ev, &h[parent]):
            break
        h[i] = h[parent]
        i = parent
    h[i] = ev
    return 0


cdef void heap_pop(engine_t* e, event_t* out) noexcept nogil:
    """Pop the earliest event into ``out`` (the heap must not be empty)."""
    cdef event_t* h = e.heap
    cdef uint64_t n, i, c
    cdef event_t last
    out[0] = h[0]
    e.hlen -= 1
    n = e.hlen
    if n == 0:
        return
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


cdef inline int push_thread(engine_t* e, thread_t* th, uint32_t g, uint64_t t,
                            uint64_t cls) noexcept nogil:
    th.gen += 1
    return heap_push(e, t, cls, g, th.gen)
