# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The floor for the peer comparison: a bare binary-heap event loop in C.

No model logic: a min-heap of events laid out like kvmwake's ``event_t``
(time, a (class << 56 | sequence) key, owner, generation: 24 bytes),
ordered by (time, key) with the same branch-free comparison.  The "hold"
loop keeps ``live`` events queued: it pops the earliest and pushes one new
event a pseudo-random delay after it (xorshift64*, uniform in
``[0, 2 * mean_ns)``), until ``pushes`` events have been pushed in all,
then pops the rest.  So it pushes and pops exactly ``pushes`` events, with
the heap holding about ``live`` of them, and does nothing else.

Compiled on first use by ``pyximport`` (``bench/_floor.pyxbld`` gives -O3,
as setup.py gives the core).
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


ctypedef struct fev_t:
    uint64_t t
    uint64_t key
    uint32_t who
    uint32_t gen


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline bint _before(const fev_t* a, const fev_t* b) noexcept nogil:
    return (a.t < b.t) | ((a.t == b.t) & (a.key < b.key))


cdef inline void _push(fev_t* h, uint64_t* n, fev_t ev) noexcept nogil:
    cdef uint64_t i = n[0], parent
    n[0] = i + 1
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(&ev, &h[parent]):
            break
        h[i] = h[parent]
        i = parent
    h[i] = ev


cdef inline void _pop(fev_t* h, uint64_t* n, fev_t* out) noexcept nogil:
    cdef uint64_t i = 0, c, m
    cdef fev_t last
    out[0] = h[0]
    n[0] -= 1
    m = n[0]
    if m == 0:
        return
    last = h[m]
    while True:
        c = 2 * i + 1
        if c >= m:
            break
        if c + 1 < m:
            c += _before(&h[c + 1], &h[c])
        if not _before(&h[c], &last):
            break
        h[i] = h[c]
        i = c
    h[i] = last


cdef inline uint64_t _xs(uint64_t* s) noexcept nogil:
    cdef uint64_t x = s[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    s[0] = x
    return x * 0x2545F4914F6CDD1DULL


cdef inline uint64_t _draw(uint64_t* s, uint64_t span) noexcept nogil:
    # Uniform in [0, span) for span < 2**32, by multiply and shift (no division).
    return ((_xs(s) >> 32) * span) >> 32


def hold(uint64_t pushes, uint64_t live, uint64_t mean_ns=20_000, uint64_t seed=1):
    """Push and pop ``pushes`` events, about ``live`` queued at a time.

    Returns ``(wall_ns, pops, checksum)``: the wall ns of the whole loop
    (CLOCK_MONOTONIC, without the GIL), the events popped (= ``pushes``) and
    a checksum of the popped times (so that the compiler keeps the work).
    Raises ``AssertionError`` if an event pops out of (time, key) order.
    """
    cdef fev_t* h
    cdef fev_t ev, prev
    cdef uint64_t n = 0, pushed = 0, pops = 0, seq = 0, s, span, t0, t1, check = 0
    cdef bint bad = False
    if live < 1:
        live = 1
    if live > pushes:
        live = pushes
    span = 2 * mean_ns if mean_ns else 1
    s = seed * 0x9E3779B97F4A7C15ULL + 1
    h = <fev_t*>malloc((live + 1) * sizeof(fev_t))
    if h == NULL:
        raise MemoryError()
    prev.t = 0
    prev.key = 0
    try:
        with nogil:
            t0 = _now_ns()
            while pushed < live:
                seq += 1
                ev.t = _draw(&s, span)
                ev.key = (<uint64_t>3 << 56) | seq
                ev.who = <uint32_t>pushed
                ev.gen = 1
                _push(h, &n, ev)
                pushed += 1
            while n:
                _pop(h, &n, &ev)
                pops += 1
                if _before(&ev, &prev):
                    bad = True
                    break
                prev = ev
                check += ev.t ^ ev.who
                if pushed < pushes:
                    seq += 1
                    ev.t = ev.t + _draw(&s, span)
                    ev.key = (<uint64_t>3 << 56) | seq
                    ev.gen += 1
                    _push(h, &n, ev)
                    pushed += 1
            t1 = _now_ns()
    finally:
        free(h)
    if bad:
        raise AssertionError(f"the floor's heap popped out of order after {pops} pops")
    return t1 - t0, pops, check


#: In a replay stream, this word stands for one pop; anything else is a push
#: and is followed by its key (so a push takes two words: time, key).
cdef uint64_t _POP = 0xFFFFFFFFFFFFFFFFULL
POP = _POP


def replay(const uint64_t[::1] ops):
    """Replay a recorded stream of heap operations: the same pushes (time, key)
    and pops, in the same order, as an engine's run; nothing else.

    ``ops`` holds ``POP`` for a pop and ``time, key`` for a push.  Returns
    ``(wall_ns, pushes, pops, heap_len_at_end, checksum)``.
    """
    cdef uint64_t nops = ops.shape[0], i = 0, n = 0, cap = 1024, pushes = 0, pops = 0
    cdef uint64_t t0, t1, check = 0, w
    cdef fev_t* h
    cdef fev_t* nh
    cdef fev_t ev
    cdef bint nomem = False, empty = False
    h = <fev_t*>malloc(cap * sizeof(fev_t))
    if h == NULL:
        raise MemoryError()
    ev.who = 0
    ev.gen = 0
    try:
        with nogil:
            t0 = _now_ns()
            while i < nops:
                w = ops[i]
                if w == _POP:
                    if n == 0:
                        empty = True
                        break
                    _pop(h, &n, &ev)
                    check += ev.t
                    pops += 1
                    i += 1
                else:
                    if n == cap:        # grow by doubling, as the core's heap does
                        nh = <fev_t*>realloc(h, 2 * cap * sizeof(fev_t))
                        if nh == NULL:
                            nomem = True
                            break
                        h = nh
                        cap *= 2
                    ev.t = w
                    ev.key = ops[i + 1]
                    _push(h, &n, ev)
                    pushes += 1
                    i += 2
            t1 = _now_ns()
    finally:
        free(h)
    if nomem:
        raise MemoryError()
    if empty:
        raise ValueError(f"op {i}: a pop from an empty heap")
    return t1 - t0, pushes, pops, n, check
