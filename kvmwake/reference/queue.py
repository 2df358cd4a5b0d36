"""reference/queue.py (twin: kvmwake/core/queue.pxi).
Mirrors: no kernel code; the virtual clock's event queue, which stands in
for real time and the hrtimer base.

The event queue: a radix heap over event times with 64 buckets per level.
Events are (t, class, sequence, who, gen) tuples, popped in
(time, class, sequence) order, exactly as one binary heap of them would pop
them.

* Time is cut into windows of 2**QUEUE_SHIFT ns.  Bucket 0 (``b0``) holds
  the events in the base's window, as a ``heapq`` heap.  Every other event
  is in bucket (L, d): L is the highest 6-bit digit in which its window
  index differs from the base's, d its own digit there; ``b[L * 64 + d]``
  is an unordered list with its earliest time in ``tmin``.  ``dmask[L]``
  has bit d set while bucket (L, d) holds events, ``lmask`` bit L while
  ``dmask[L]`` is not 0.
* When b0 runs empty, the lowest non-empty bucket (lowest level, then
  lowest digit) holds the earliest events; it is redistributed around its
  earliest time, the new base, and each of its events lands on a lower
  level or in b0.  A bucket of one event gives it up without filing it.
* Cancellation is by generation: an event whose gen no longer matches its
  owner's is void.  A void event is dropped when its bucket is
  redistributed, without being popped (``dropped`` counts them); one that
  reached b0 while live is skipped by the run loop when popped.
* The base is at or below every queued time and, outside ``heap_pop``, at
  or below the engine's clock; a push below it (which the engine never
  makes) re-files every event around the new base (``q_rebase``).

The core's queue is the same algorithm step for step, so that both engines
queue, drop and pop the same events (``bench_counters`` agrees).  A tool
may record the traffic by appending a callable to ``recorders``: it gets
``(t, class, sequence)`` for every push and ``None`` for every event that
leaves the queue (popped or dropped).
"""

from __future__ import annotations

import heapq

from ..model import MAX_SEQ, QUEUE_SHIFT, EventClass
from . import EngineError

#: Levels of 64 buckets: enough for the 58 bits of a window index.
QLEVELS = 10
#: Buckets other than b0.
QBUCKETS = QLEVELS * 64
#: tmin of an empty bucket, and q_peek of an empty queue.
NO_TIME = (1 << 64) - 1

_EV_TICK = int(EventClass.TICK)
_EV_SOURCE = int(EventClass.SOURCE)
_EV_TIMER = int(EventClass.TIMER)
_EV_SLICE = int(EventClass.SLICE)

#: The traffic recorders (see the module's docstring).
recorders: list = []


class EventQueue:
    """The queue's state (``evq_t`` in the core)."""

    __slots__ = ("b0", "tmin0", "b", "tmin", "dmask", "lmask", "base", "len", "dropped")

    def __init__(self, base: int = 0):
        self.b0: list = []
        self.tmin0 = NO_TIME
        self.b: list[list] = [[] for _ in range(QBUCKETS)]
        self.tmin = [NO_TIME] * QBUCKETS
        self.dmask = [0] * QLEVELS
        self.lmask = 0
        self.base = base
        self.len = 0
        self.dropped = 0

    def events(self) -> list:
        """Every queued event (void ones included), in (t, class, sequence) order."""
        return sorted([*self.b0, *(ev for b in self.b for ev in b)])


def ev_before(a: tuple, b: tuple) -> bool:
    """Event ``a`` comes before event ``b``: (time, class, sequence) order."""
    return a[:3] < b[:3]


def ev_live(e, ev: tuple) -> bool:
    """The event's gen is its owner's: it has not been cancelled."""
    cls, who, gen = ev[1], ev[3], ev[4]
    if cls == _EV_TICK:
        return gen == e.vms[who].tick_gen
    if cls == _EV_SOURCE:
        return gen == e.sources[who].gen
    th = e.threads[who]
    if cls == _EV_TIMER:
        return gen == th.timer_gen
    if cls == _EV_SLICE:
        return gen == th.run_gen
    return gen == th.gen


def q_bucket(base: int, t: int) -> int:
    """The bucket of time t (>= base) around ``base``: -1 for b0 (base's window),
    else L * 64 + d (q_file computes it inline)."""
    w = t >> QUEUE_SHIFT
    x = w ^ (base >> QUEUE_SHIFT)
    if not x:
        return -1
    level = (x.bit_length() - 1) // 6
    return level * 64 + ((w >> (6 * level)) & 63)


def q_file(q: EventQueue, ev: tuple) -> None:
    """Put an event (at or after the base) into its bucket; the count is the caller's."""
    t = ev[0]
    w = t >> QUEUE_SHIFT
    x = w ^ (q.base >> QUEUE_SHIFT)
    if x:
        level = (x.bit_length() - 1) // 6
        d = (w >> (6 * level)) & 63
        k = level * 64 + d
        q.b[k].append(ev)
        if t < q.tmin[k]:
            q.tmin[k] = t
        q.dmask[level] |= 1 << d
        q.lmask |= 1 << level
    else:
        heapq.heappush(q.b0, ev)
        if t < q.tmin0:
            q.tmin0 = t


def q_lowest(q: EventQueue) -> int:
    """The lowest non-empty bucket other than b0 (there must be one)."""
    level = (q.lmask & -q.lmask).bit_length() - 1
    m = q.dmask[level]
    return level * 64 + (m & -m).bit_length() - 1


def q_clear(q: EventQueue, base: int) -> None:
    """Empty the queue."""
    q.b0.clear()
    q.tmin0 = NO_TIME
    for b in q.b:
        b.clear()
    q.tmin = [NO_TIME] * QBUCKETS
    q.dmask = [0] * QLEVELS
    q.lmask = 0
    q.len = 0
    q.base = base


def q_rebase(q: EventQueue, base: int) -> None:
    """Re-file every queued event around an earlier base."""
    every = q.events()
    n = q.len
    q_clear(q, base)
    for ev in every:
        q_file(q, ev)
    q.len = n


def q_insert(q: EventQueue, ev: tuple) -> None:
    """Queue an event as it is (its sequence number already drawn)."""
    if ev[0] < q.base:
        q_rebase(q, ev[0])
    q_file(q, ev)
    q.len += 1


def heap_push(e, t: int, cls: int, who: int, gen: int) -> None:
    if e.seq >= MAX_SEQ:
        e.failed = True
        raise EngineError(f"the event sequence numbers ran out at t={e.now} ns "
                          f"(at most 2**55 events are ever scheduled)")
    e.seq += 1
    q_insert(e.q, (t, cls, e.seq, who, gen))
    if recorders:
        for r in recorders:
            r((t, cls, e.seq))


def q_peek(q: EventQueue) -> int:
    """The earliest queued time (void events included), NO_TIME when empty."""
    if q.b0:
        return q.tmin0
    if q.lmask:
        return q.tmin[q_lowest(q)]
    return NO_TIME


def heap_pop(e):
    """Pop the earliest event.  Or, when b0 was empty and the redistribution of
    the lowest bucket dropped every event that reached b0 as void: None,
    nothing popped (call again).  The queue must not be empty."""
    q = e.q
    b0 = q.b0
    if not b0:
        k = q_lowest(q)
        level, d = k >> 6, k & 63
        bk = q.b[k]
        q.base = q.tmin[k]
        q.dmask[level] &= ~(1 << d)
        if not q.dmask[level]:
            q.lmask &= ~(1 << level)
        q.b[k] = []
        q.tmin[k] = NO_TIME
        if len(bk) == 1:
            # The one event of the bucket is the earliest: no need to file it.
            ev = bk[0]
            q.len -= 1
            if recorders:
                for r in recorders:
                    r(None)
            if ev_live(e, ev):
                return ev
            q.dropped += 1
            return None
        for ev in bk:
            if ev_live(e, ev):
                q_file(q, ev)                 # to a lower level, or b0
            else:
                q.len -= 1
                q.dropped += 1
                for r in recorders:
                    r(None)
        if not b0:
            return None
    q.len -= 1
    ev = heapq.heappop(b0)
    q.tmin0 = b0[0][0] if b0 else NO_TIME
    if recorders:
        for r in recorders:
            r(None)
    return ev


def q_check(q: EventQueue) -> None:
    """The queue's own invariants (the tests; the core's debug build checks its twin)."""
    total = 0
    for k, b, tmin in [(-1, q.b0, q.tmin0), *zip(range(QBUCKETS), q.b, q.tmin)]:
        for i, ev in enumerate(b):
            if ev[0] < q.base or q_bucket(q.base, ev[0]) != k:
                raise EngineError(f"event queue: an event at t={ev[0]} in bucket {k} "
                                  f"around {q.base}")
            if k < 0 and i and ev_before(ev, b[(i - 1) >> 1]):
                raise EngineError("event queue: bucket 0 is out of heap order")
        if tmin != min((ev[0] for ev in b), default=NO_TIME):
            raise EngineError(f"event queue: bucket {k}'s earliest time or size is wrong")
        if k >= 0 and ((q.dmask[k >> 6] >> (k & 63)) & 1) != bool(b):
            raise EngineError(f"event queue: the masks disagree with bucket {k}")
        total += len(b)
    for level in range(QLEVELS):
        if ((q.lmask >> level) & 1) != bool(q.dmask[level]):
            raise EngineError(f"event queue: the level mask disagrees with level {level}")
    if q.lmask >> QLEVELS:
        raise EngineError("event queue: the level mask names a level beyond the last")
    if total != q.len:
        raise EngineError(f"event queue: {total} events in the buckets, {q.len} counted")


def push_thread(e, th, t: int, cls: int) -> None:
    th.gen += 1
    heap_push(e, t, cls, th.g, th.gen)


def queue_replay(ops) -> tuple:
    """Drive a private queue with a list of (op, a, b) steps (the core's twin: see
    its docstring for the steps).  Returns (the live events popped as
    (t, key, who), the void events popped, queue length, dropped count)."""
    from types import SimpleNamespace
    from ..model import SEQ_BITS
    seg = int(EventClass.SEGMENT)
    threads = [SimpleNamespace(g=g, gen=0, run_gen=0, timer_gen=0) for g in range(8)]
    e = SimpleNamespace(q=EventQueue(), seq=0, now=0, threads=threads, vms=[], sources=[])
    now = skipped = 0
    popped = []
    for op, a, b in ops:
        if op == 0:
            if not 0 <= b < 8 or not 0 <= a <= 1 << 62:
                raise ValueError(f"step {(op, a, b)}: thread or time out of range")
            push_thread(e, threads[b], now + a, seg)
        elif op == 1:
            while e.q.len:
                ev = heap_pop(e)
                if ev is None:
                    continue
                if ev_live(e, ev):
                    now = ev[0]
                    popped.append((ev[0], (ev[1] << SEQ_BITS) | ev[2], ev[3]))
                    break
                skipped += 1
        elif op == 2:
            if not 0 <= a < 8:
                raise ValueError(f"step {(op, a, b)}: no thread {a}")
            threads[a].gen += 1
        elif op == 3:
            now = max(now - a, 0)
        else:
            raise ValueError(f"step {(op, a, b)}: unknown op")
        q_check(e.q)
    return popped, skipped, e.q.len, e.q.dropped
