"""The optional state timeline: both engines record the same thread state
changes, the ring keeps the newest ones, the window totals are exact, and the
timeline travels in snapshots."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import test_differential as D
from kvmwake import Host, _core, reference
from kvmwake import guest as G
from kvmwake.model import ThreadState
from kvmwake.reference import EngineError
from kvmwake.outputs.timeline import TIMELINE_DTYPE, totals

ENGINES = (_core.Engine, reference.Engine)


def _play(cls, sc, capacity):
    e = D.build(functools.partial(cls, timeline_capacity=capacity), sc)
    err = None
    try:
        for t, _ in sc.splits:
            e.run(t)
        e.run(sc.end_ns)
    except EngineError as exc:
        err = str(exc)
    return e, err


def _observed(e):
    t0, base = e.timeline_window()
    tot = e.timeline_totals(e.now)
    return {"array": e.timeline_array().tobytes(), "dropped": e.timeline_dropped,
            "t0": t0, "base": base.tolist(), "now": e.now,
            "totals": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                       for k, v in tot.items()}}


def _brute_totals(records, t0, now, ncpu):
    """Totals over [t0, now] from a complete timeline (every thread starts USER at 0)."""
    state = {}
    nrun, npoll = [0] * ncpu, [0] * ncpu
    last = [0] * ncpu
    run, poll, idle = [0] * ncpu, [0] * ncpu, [0] * ncpu

    def advance(c, t):
        lo, hi = max(last[c], t0), min(t, now)
        if hi > lo:
            (run if nrun[c] else poll if npoll[c] else idle)[c] += hi - lo
        last[c] = t

    for t, g, c, s in records:
        advance(c, t)
        old = state.get(g, int(ThreadState.USER))
        nrun[c] -= old == ThreadState.RUNNING
        npoll[c] -= old == ThreadState.POLLING
        nrun[c] += s == ThreadState.RUNNING
        npoll[c] += s == ThreadState.POLLING
        state[g] = s
    for c in range(ncpu):
        advance(c, now)
    return run, poll, idle


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=D.scenarios(), capacity=st.sampled_from([1, 3, 16, 200, 1 << 20]))
def test_core_and_reference_timelines_agree(sc, capacity):
    core, err_core = _play(_core.Engine, sc, capacity)
    assume(core.events <= D.EVENT_BUDGET)
    ref, err_ref = _play(reference.Engine, sc, capacity)
    assert err_core == err_ref
    a, b = _observed(core), _observed(ref)
    assert a == b
    # The timeline changes nothing else.
    plain, _ = _play(_core.Engine, sc, 0)
    assert plain.stats_array().tolist() == core.stats_array().tolist()
    assert plain.trace_list() == core.trace_list()
    assert plain.now == core.now
    # (With the timeline on, every poll window's end is a queued event: without
    # it, one nobody sees needs none; docs/design.md, "Time and events".)
    assert plain.events <= core.events
    assert len(plain.timeline_array()) == 0
    # Per CPU the totals fill the window; with a full record they match brute force.
    tot = core.timeline_totals(core.now)
    span = tot["now"] - tot["t0"]
    assert ((tot["running_ns"] + tot["polling_ns"] + tot["idle_ns"]) == span).all()
    full, _ = _play(_core.Engine, sc, 1 << 20)
    recs = [tuple(int(x) for x in r) for r in full.timeline_array().tolist()]
    assert full.timeline_dropped == 0
    run, poll, idle = _brute_totals(recs, tot["t0"], tot["now"], sc.host_cpus)
    assert tot["running_ns"].tolist() == run
    assert tot["polling_ns"].tolist() == poll
    assert tot["idle_ns"].tolist() == idle
    # The ring keeps the newest records of the full timeline.
    kept = core.timeline_array()
    if len(kept):
        assert kept.tobytes() == full.timeline_array()[-len(kept):].tobytes()
    assert core.timeline_dropped + len(kept) == len(recs)


def _host(engine="core", capacity=64, host_cpus=2):
    host = Host(host_cpus=host_cpus, arch="x86", seed=5, engine=engine,
                timeline_capacity=capacity)
    vm = host.create_vm(4)
    for v in vm.vcpus:
        v.load(G.Program([G.loop([G.compute_exp(20_000), G.wake_random_other(), G.wfi()])]))
    vm.set_tick(1_000_000)
    host.halt_poll_ns = 50_000
    return host


def test_host_timeline_records_states():
    host = _host(capacity=1 << 16)
    host.run(3_000_000)
    a = host.timeline_array()
    assert a.dtype == TIMELINE_DTYPE and a.dtype.itemsize == 24
    assert len(a) > 100 and host.timeline_dropped == 0
    assert set(np.unique(a["state"]).tolist()) <= {int(s) for s in ThreadState}
    assert {int(ThreadState.RUNNING), int(ThreadState.POLLING),
            int(ThreadState.BLOCKED), int(ThreadState.RUNNABLE)} <= set(a["state"].tolist())
    assert (np.diff(a["t"].astype(np.int64)) >= 0).all()
    assert (a["cpu"] == a["g"] % 2).all()
    # No record repeats its thread's previous state.
    last = {}
    for r in a.tolist():
        assert last.get(r[1]) != r[3]
        last[r[1]] = r[3]
    tot = host.timeline_totals()
    assert tot["t0"] == 0 and tot["now"] == 3_000_000
    assert (tot["running_ns"] + tot["polling_ns"] + tot["idle_ns"] == 3_000_000).all()
    assert tot["polling_ns"].sum() > 0 and tot["running_ns"].sum() > 0


def test_timeline_off_by_default_and_enable_before_run():
    host = Host(host_cpus=1, arch="x86")
    assert host.timeline_capacity == 0 and len(host.timeline_array()) == 0
    host = _host(capacity=0)
    host.enable_timeline(100)
    host.run(500_000)
    assert len(host.timeline_array()) > 0
    with pytest.raises(ValueError):
        host.enable_timeline(10)
    with pytest.raises(ValueError):
        Host(timeline_capacity=-1)


def test_totals_by_hand():
    recs = np.zeros(4, dtype=TIMELINE_DTYPE)
    # thread 0 on CPU 0: RUNNING at 10, POLLING at 30, BLOCKED at 60; thread 1 on CPU 1
    # RUNNING at 5.
    for i, (t, g, s) in enumerate([(5, 1, 1), (10, 0, 1), (30, 0, 2), (60, 0, 3)]):
        recs[i] = (t, g, g % 2, s)
    tot = totals(recs, np.zeros(2, dtype=np.uint8), 0, 100, 2)
    assert tot["running_ns"].tolist() == [20, 95]
    assert tot["polling_ns"].tolist() == [30, 0]
    assert tot["idle_ns"].tolist() == [50, 5]
    # A window that starts at 40 with thread 0 POLLING and thread 1 RUNNING.
    tot = totals(recs[3:], np.array([2, 1], dtype=np.uint8), 40, 100, 2)
    assert tot["polling_ns"].tolist() == [20, 0] and tot["running_ns"].tolist() == [0, 60]


@pytest.mark.parametrize("engine", ["core", "reference"])
def test_enable_mid_run(engine):
    full = _host(engine, capacity=1 << 16)
    full.run(3_000_000)
    late = _host(engine, capacity=0)
    late.run(1_000_000)
    late.enable_timeline(1 << 16)
    late.run(3_000_000)
    recs = [tuple(int(x) for x in r) for r in full.timeline_array().tolist()]
    tot = late.timeline_totals()
    assert tot["t0"] == 1_000_000
    run, poll, idle = _brute_totals(recs, 1_000_000, 3_000_000, 2)
    assert (tot["running_ns"].tolist(), tot["polling_ns"].tolist(),
            tot["idle_ns"].tolist()) == (run, poll, idle)
    kept = late.timeline_array()
    assert kept.tobytes() == full.timeline_array()[len(recs) - len(kept):].tobytes()
    assert kept["t"].min() >= 1_000_000


@pytest.mark.parametrize("capacity", [7, 1 << 16])
def test_timeline_in_snapshots(capacity):
    whole = _host(capacity=capacity)
    whole.run(4_000_000)
    half = _host(capacity=capacity)
    half.run(1_700_000)
    data = half.snapshot()
    back = Host.restore(data)
    assert back.timeline_array().tobytes() == half.timeline_array().tobytes()
    assert back.timeline_dropped == half.timeline_dropped
    assert back.snapshot() == data
    back.run(4_000_000)
    assert back.timeline_array().tobytes() == whole.timeline_array().tobytes()
    assert back.timeline_dropped == whole.timeline_dropped
    for k in ("running_ns", "polling_ns", "idle_ns"):
        assert back.timeline_totals()[k].tolist() == whole.timeline_totals()[k].tolist()
    assert back.snapshot() == whole.snapshot()


def test_snapshot_rejects_a_broken_timeline():
    from kvmwake import snapshot
    from kvmwake.errors import SnapshotError
    host = _host(capacity=50)
    host.run(1_000_000)
    scalars, arrays = host._engine.export_state()
    arrays["timeline"] = arrays["timeline"].copy()
    arrays["timeline"][8:12] = 255          # record 0 names thread 2**32 - 1
    fresh = Host(host_cpus=2, arch="x86", seed=5)
    fresh.create_vm(4)
    with pytest.raises(ValueError):
        fresh._engine.import_state(scalars, arrays)
    assert snapshot is not None and SnapshotError is not None


def test_a_thread_running_at_the_window_start_counts_where_its_first_record_is():
    """Base RUNNING, now on CPU 1: it ran on CPU 0 until its first record there."""
    from kvmwake.outputs import timeline as T
    recs = T.to_array([(100, 0, 0, int(ThreadState.RUNNABLE)),
                       (150, 0, 1, int(ThreadState.RUNNING))])
    base = np.array([int(ThreadState.RUNNING)], dtype=np.uint8)
    assert T.cpus_at_start(recs, 1, 2, [1]).tolist() == [0]
    assert T.cpus_at_start(recs[:0], 1, 2, [1]).tolist() == [1]
    tot = T.totals(recs, base, 0, 200, 2, [1])
    assert tot["running_ns"].tolist() == [100, 50]
    assert tot["idle_ns"].tolist() == [100, 150]
    # Thread 1 of 2 (g % ncpu is CPU 1) ran on CPU 0 at the start: its state there
    # ends on CPU 0, in both the numpy sums and the record-by-record loop.
    recs = T.to_array([(100, 1, 0, int(ThreadState.RUNNABLE)),
                       (150, 1, 1, int(ThreadState.RUNNING))])
    base = np.array([0, int(ThreadState.RUNNING)], dtype=np.uint8)
    for f in (T.totals, T._totals_loop):
        tot = f(recs, base, 0, 200, 2, T.cpus_at_start(recs, 2, 2, [0, 1]))
        assert tot["running_ns"].tolist() == [100, 50], f
        assert tot["idle_ns"].tolist() == [100, 150], f


def test_totals_with_arrays_equal_the_record_by_record_sum():
    """``totals`` sums with numpy (records in time order) exactly what the record by
    record loop sums: base states on given CPUs, threads added since the base,
    several threads per CPU, times near 2^62, a ``now`` before the last record."""
    import random
    from kvmwake.outputs import timeline as T
    rng = random.Random(15)
    for _ in range(800):
        ncpu, nth = rng.randint(1, 6), rng.randint(1, 8)
        base = np.array([rng.randrange(5) for _ in range(nth)], dtype=np.uint8)
        cpus = None if rng.random() < 0.5 else [rng.randrange(ncpu) for _ in range(nth)]
        t0 = rng.choice([0, 5, 100])
        ts = sorted(rng.randint(t0, t0 + 200) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.2:
            ts = [x + (1 << 62) for x in ts]
        recs = T.to_array([(x, rng.randrange(nth + 2), rng.randrange(ncpu), rng.randrange(5))
                           for x in ts])
        now = max(0, (ts[-1] if ts else t0) + rng.randint(-5, 50))
        want = T._totals_loop(recs, base, t0, max([now] + ts), ncpu,
                              T.cpus_at_start(recs, nth, ncpu, cpus))
        got = T.totals(recs, base, t0, now, ncpu, cpus)
        assert got["t0"] == want["t0"] and got["now"] == want["now"]
        for k in ("running_ns", "polling_ns", "idle_ns"):
            assert got[k].dtype == np.uint64 and got[k].tolist() == want[k].tolist(), k
