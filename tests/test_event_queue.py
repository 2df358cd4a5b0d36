"""The event queue (core/queue.pxi and its twin reference/queue.py): a radix heap.

* Under random traffic (pushes, cancellations, pops, and the clock stepping
  back so that pushes fall below the base), both engines' queues pop the live
  events in exactly the order of one binary heap of (time, class, sequence)
  with cancelled events skipped, and agree on every count (void events popped,
  length, dropped unpopped).  Their invariants are checked after every step.
* Cancelled events are dropped unpopped when their bucket is redistributed:
  both engines drop the same ones in a run (the default scenario drops many
  cancelled time slices).
* An engine's counters agree between the engines, and a run keeps the queue's
  invariants (the reference engine's check_state checks them all along).
* Snapshots carry the live events only, in order; a state whose events come
  in any order imports alike.
"""

from __future__ import annotations

import heapq
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmwake import _core, scenarios
from kvmwake import reference
from kvmwake.reference import bench as rbench
from kvmwake.reference import queue as rqueue
from kvmwake.reference import snapshot as rsnap
from kvmwake.model import SEQ_BITS, EventClass

SEG = int(EventClass.SEGMENT)


def binary_heap_model(ops):
    """What one binary heap with generation-skipping pops gives for the same steps."""
    heap, gens, now, seq, popped, skipped = [], [0] * 8, 0, 0, [], 0
    for op, a, b in ops:
        if op == 0:
            gens[b] += 1
            seq += 1
            heapq.heappush(heap, (now + a, (SEG << SEQ_BITS) | seq, b, gens[b]))
        elif op == 1:
            while heap:
                t, key, who, gen = heapq.heappop(heap)
                if gen == gens[who]:
                    now = t
                    popped.append((t, key, who))
                    break
                skipped += 1
        elif op == 2:
            gens[a] += 1
        else:
            now = max(now - a, 0)
    return popped, skipped, heap


steps = st.lists(st.one_of(
    st.tuples(st.just(0), st.one_of(st.integers(0, 3), st.integers(0, 5_000),
                                    st.integers(0, 1 << 40)), st.integers(0, 7)),
    st.tuples(st.just(1), st.just(0), st.just(0)),
    st.tuples(st.just(2), st.integers(0, 7), st.just(0)),
    st.tuples(st.just(3), st.integers(0, 10_000), st.just(0))), max_size=300)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_both_queues_pop_what_a_binary_heap_pops(ops):
    core = _core.queue_replay(ops)
    ref = rqueue.queue_replay(ops)
    assert core == ref
    popped, skipped, length, dropped = core
    want, _want_skipped, left = binary_heap_model(ops)
    assert popped == want
    # Every pushed event was popped live, popped void, dropped, or is still queued.
    pushes = sum(1 for op, _a, _b in ops if op == 0)
    assert len(popped) + skipped + dropped + length == pushes
    # Drained, the queue empties and gives every live event the binary heap holds.
    drained = ops + [(1, 0, 0)] * (pushes + 1)
    core = _core.queue_replay(drained)
    assert core == rqueue.queue_replay(drained)
    assert core[0] == binary_heap_model(drained)[0]
    assert core[2] == 0


def test_pushes_below_the_base_are_refiled():
    """The clock stepping back makes pushes fall below the base: the queue re-files."""
    ops = [(0, 1000, 0), (0, 5000, 1), (1, 0, 0), (3, 900, 0), (0, 0, 2), (0, 50, 3),
           (1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0)]
    got = _core.queue_replay(ops)
    assert got == rqueue.queue_replay(ops)
    assert [t for t, _k, _w in got[0]] == [1000, 100, 150, 5000]


def test_cancelled_events_far_ahead_are_dropped_unpopped():
    """Events cancelled before their bucket comes up are never popped."""
    ops = [(0, 1_000_000, g) for g in range(8)] + [(2, g, 0) for g in range(4)] \
        + [(0, 10, 7), (1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0)]
    popped, skipped, length, dropped = _core.queue_replay(ops)
    assert [w for _t, _k, w in popped] == [7, 4, 5, 6]
    # Threads 0-3 cancelled, thread 7's first event replaced: 5 void events,
    # all dropped when their bucket was redistributed, none popped.
    assert (skipped, dropped, length) == (0, 5, 0)
    assert rqueue.queue_replay(ops) == (popped, skipped, length, dropped)


def test_replay_refuses_bad_steps():
    for bad in ([(0, 1, 8)], [(2, 9, 0)], [(7, 0, 0)]):
        with pytest.raises(ValueError):
            _core.queue_replay(bad)
        with pytest.raises(ValueError):
            rqueue.queue_replay(bad)


@pytest.mark.parametrize("scenario", ["default", "ipi-storm"])
def test_a_run_drops_cancelled_events_in_both_engines_alike(scenario):
    kw = dict(vcpus=16, sim_ns=3_000_000, seed=2, trace_capacity=0)
    core, ns, _ = scenarios.build(scenario, **kw)
    ref, _ns, _ = scenarios.build(scenario, engine="reference", **kw)
    core.run(ns)
    ref.run(ns)
    c = _core.bench_counters(core._engine)
    r = rbench.bench_counters(ref._engine)
    c.pop("heap_cap")
    r.pop("heap_cap")
    assert c == r
    assert c["events"] > 0
    if scenario == "default":
        # The default scenario cancels most of its time slices before they end:
        # the queue drops them without popping them.
        assert c["dropped"] > 0
    rqueue.q_check(ref._engine.q)


def test_reference_check_state_checks_the_queue():
    host, ns, _ = scenarios.build("default", vcpus=8, sim_ns=2_000_000, seed=1,
                                  engine="reference", trace_capacity=0)
    host.run(ns)
    e = host._engine
    rsnap.check_state(e)
    e.q.tmin0 = 12345            # a wrong earliest time for bucket 0
    with pytest.raises(reference.EngineError, match="event queue"):
        rsnap.check_state(e)


def test_snapshots_carry_live_events_in_order_and_import_any_order():
    host, ns, _ = scenarios.build("default", vcpus=8, sim_ns=2_000_000, seed=3,
                                  engine="reference", trace_capacity=0)
    host.run(ns // 2)
    e = host._engine
    s = rsnap.engine_export(e)
    assert s["heap"] == sorted(s["heap"])
    assert all(rqueue.ev_live(e, ev) for ev in s["heap"])
    assert len(s["heap"]) <= e.q.len
    # The same state with its events shuffled imports and runs alike.
    shuffled = dict(s, heap=list(s["heap"]))
    random.Random(0).shuffle(shuffled["heap"])
    a, b = reference.Engine("arm64", 1, 0), reference.Engine("arm64", 1, 0)
    rsnap.engine_import(a, s)
    rsnap.engine_import(b, shuffled)
    a.run(ns)
    b.run(ns)
    assert rsnap.engine_export(a) == rsnap.engine_export(b)


def test_core_snapshot_events_are_live_and_sorted():
    host, ns, _ = scenarios.build("default", vcpus=8, sim_ns=2_000_000, seed=3,
                                  trace_capacity=0)
    host.run(ns // 2)
    _scalars, arrays = host._engine.export_state()
    ev = np.frombuffer(arrays["heap"].tobytes(), dtype=[("t", "<u8"), ("key", "<u8"),
                                                       ("who", "<u4"), ("gen", "<u4")])
    order = np.lexsort((ev["key"], ev["t"]))
    assert (order == np.arange(len(ev))).all()
    assert len(ev) <= _core.bench_counters(host._engine)["heap_len"]
