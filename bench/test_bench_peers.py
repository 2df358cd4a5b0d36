"""Peer benchmarks: the SimPy model of ipi-storm and the floor (a bare C heap loop).

The full comparison, with its agreement check and ratios, is
``bench/compare_peers.py``; these keep its pieces working and give
pytest-benchmark figures.  SimPy (the ``bench`` extra) and Cython with a C
compiler (for the floor, built by pyximport) are optional: without them the
tests that need them are skipped.

* SimPy model: ``bench/simpy_ipi_storm.py`` at ``PEER_SIZES`` (full: 1,024
  vCPUs for 20 ms); the environment is built untimed, ``run`` is timed.
* floor: the hold loop of ``bench/_floor.pyx`` (full: 500,000 pushes and
  pops with 1,024 events queued); one op = one push and its pop.

The plain tests check that the floor's replay of a recorded run pushes and
pops exactly what the core's heap did, and that the SimPy model and the
core roughly agree on a small instance (the tight check, over seeds, is the
script's).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvmwake import _core, scenarios

MS = 1_000_000


@pytest.fixture(scope="module")
def floor_mod():
    import floorloop
    try:
        return floorloop.load()
    except ImportError as exc:            # no Cython, or no C compiler
        pytest.skip(f"the floor cannot be built here: {exc}")


def test_simpy_ipi_storm(benchmark, peer_sizes):
    pytest.importorskip("simpy")
    import simpy_ipi_storm
    vcpus, sim_ns, rounds = peer_sizes["simpy"]
    last = {}

    def setup():
        last["storm"] = simpy_ipi_storm.IpiStorm(vcpus, 0)
        return (last["storm"], sim_ns), {}

    benchmark.group = "peers ipi-storm"
    benchmark.pedantic(lambda storm, ns: storm.run(ns), setup=setup, rounds=rounds)
    st = last["storm"].stats
    assert last["storm"].env.now == sim_ns and st.halts > 0
    benchmark.extra_info.update(scenario="ipi-storm", engine="simpy", vcpus=vcpus,
                                sim_ms=sim_ns / MS, halts=st.halts, events=None)


def test_floor_hold(benchmark, peer_sizes, floor_mod):
    pushes, live = peer_sizes["floor"]
    ns, pops, _ = benchmark(floor_mod.hold, pushes, live)
    assert pops == pushes
    benchmark.extra_info.update(ops_per_call=pushes, op="push+pop", c_ns_per_op=ns / pushes)


def test_floor_replays_the_cores_heap_traffic(floor_mod):
    from compare_peers import record_heap_ops
    ops, rec = record_heap_ops(32, 2 * MS, 0)
    host, ns, _ = scenarios.build("ipi-storm", vcpus=32, sim_ns=2 * MS, seed=0, trace_capacity=0)
    host.run(ns)
    cnt = _core.bench_counters(host._engine)
    assert (rec["pushes"], rec["pops"], rec["heap_len"], rec["events"]) == \
        (cnt["pushes"], cnt["pushes"] - cnt["heap_len"], cnt["heap_len"], cnt["events"])
    _, pushes, pops, left, _ = floor_mod.replay(ops)
    assert (pushes, pops, left) == (rec["pushes"], rec["pops"], rec["heap_len"])
    with pytest.raises(ValueError):
        floor_mod.replay(np.array([floor_mod.POP], dtype=np.uint64))


def test_simpy_model_is_the_same_workload():
    """Same order of halts and successful polls as the core on a small instance
    (one seed each, so only loosely; compare_peers.py checks over seeds)."""
    pytest.importorskip("simpy")
    import simpy_ipi_storm
    n, sim_ns = 64, 20 * MS
    host, ns, _ = scenarios.build("ipi-storm", vcpus=n, sim_ns=sim_ns, seed=0, trace_capacity=0)
    host.run(ns)
    core = host.vms[0].stats()
    sp = simpy_ipi_storm.run(n, sim_ns, 0)
    assert sp["halts"] == pytest.approx(host.halts, rel=0.15)
    assert sp["halt_exits"] == pytest.approx(core["halt_exits"], rel=0.15)
    assert sp["halt_wakeup"] == pytest.approx(core["halt_wakeup"], rel=0.15)
    assert sp["halt_attempted_poll"] == pytest.approx(core["halt_attempted_poll"], rel=0.25)
