"""Scenario benchmarks: the four built-in scenarios, core and reference engines.

Each round builds a fresh host with ``scenarios.build`` in pedantic's
``setup`` (not timed) and times ``host.run`` alone.  Sizes come from
``KVMWAKE_BENCH_SIZE`` (see conftest.py): at ``full``, ipi-storm runs 1,024
vCPUs for 100 ms on the core and 5 ms on the reference engine; default runs
4,096 vCPUs for 200 ms on the core and 256 vCPUs for 5 ms on the reference;
irq-storm runs 4,096 vCPUs for 100 ms on the core and 512 (one VM) for 5 ms
on the reference; suspend-cycle runs 4,096 vCPUs for 50 ms on the core and
256 for 10 ms on the reference.
``extra_info`` records the halts and events of a run (the same every round:
the simulation is deterministic) and, when timed, halts and events per wall
second from the median.
"""

from __future__ import annotations

import pytest

from kvmwake import scenarios

SCENARIOS = ("ipi-storm", "default", "irq-storm", "suspend-cycle")
CASES = [(s, e) for s in SCENARIOS for e in ("core", "reference")]


@pytest.mark.parametrize("scenario,engine", CASES, ids=[f"{s}-{e}" for s, e in CASES])
def test_scenario_run(benchmark, scenario_sizes, scenario, engine):
    vcpus, sim_ns, rounds = scenario_sizes[(scenario, engine)]
    last = {}

    def setup():
        host, ns, _ = scenarios.build(scenario, vcpus=vcpus, sim_ns=sim_ns, seed=0,
                                      engine=engine, trace_capacity=0)
        last["host"] = host
        return (host, ns), {}

    def run(host, ns):
        host.run(ns)

    benchmark.group = f"scenario {scenario}"
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1 if engine == "core" else 0)
    host = last["host"]
    assert host.now == sim_ns and host.halts > 0
    benchmark.extra_info.update(scenario=scenario, engine=engine, vcpus=vcpus,
                                sim_ms=sim_ns / 1e6, halts=host.halts, events=host.events)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        benchmark.extra_info.update(halts_per_s=host.halts / median,
                                    events_per_s=host.events / median)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_and_reference_agree_small(scenario):
    """The engines compared above give the same counts on a small instance (not timed)."""
    counts = []
    for engine in ("core", "reference"):
        host, ns, _ = scenarios.build(scenario, vcpus=16, sim_ns=2_000_000, engine=engine,
                                      trace_capacity=0)
        host.run(ns)
        counts.append((host.halts, host.events, [vm.stats_array().tolist() for vm in host.vms]))
    assert counts[0] == counts[1]
