"""reference/queue.py (twin: kvmwake/core/queue.pxi).
Mirrors: no kernel code; the virtual clock's event queue, which stands in
for real time and the hrtimer base.

The event heap: a binary min-heap (``heapq``) of (t, class, sequence, who,
gen) tuples, ordered by time, then class, then sequence number.
Cancellation is by generation: an event whose gen no longer matches its
owner's is skipped when popped.  Every push and pop goes through this
module's ``heapq``, so that a tool may record the heap's traffic by
replacing it.
"""

from __future__ import annotations

import heapq

from ..model import MAX_SEQ
from . import EngineError


def ev_before(a: tuple, b: tuple) -> bool:
    """Event ``a`` comes before event ``b``: (time, class, sequence) order."""
    return a[:3] < b[:3]


def heap_push(e, t: int, cls: int, who: int, gen: int) -> None:
    if e.seq >= MAX_SEQ:
        e.failed = True
        raise EngineError(f"the event sequence numbers ran out at t={e.now} ns "
                          f"(at most 2**55 events are ever scheduled)")
    e.seq += 1
    heapq.heappush(e.heap, (t, cls, e.seq, who, gen))


def heap_pop(e) -> tuple:
    """Pop the earliest event (the heap must not be empty)."""
    return heapq.heappop(e.heap)


def push_thread(e, th, t: int, cls: int) -> None:
    th.gen += 1
    heap_push(e, t, cls, th.g, th.gen)
