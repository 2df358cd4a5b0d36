"""Island benchmarks: one host of independent VMs run on its one queue, as islands
on one thread, and as islands on two threads (``Host(threads=...)``).

Each round builds a fresh host in pedantic's untimed ``setup`` and times
``host.run`` alone.  At ``full`` size: ipi-storm, 16,384 vCPUs in 16 VMs of
1,024, one host CPU each (16 islands), 20 ms; at ``tiny``: default, 128 vCPUs
in 2 VMs on 128 host CPUs (2 islands), 1 ms.  Every mode gives the same halts
and events (checked); ``extra_info`` has them and, when timed, halts per wall
second.  ``bench/scaling.py --threads 1,2 --one-queue`` reports the same
comparison from 1,024 to 65,536 vCPUs in fresh processes.
"""

from __future__ import annotations

import os

import pytest

from kvmwake import scenarios

MODES = {"one-queue": (1, False), "islands-1-thread": (1, True), "islands-2-threads": (2, True)}
COUNTS: dict = {}


@pytest.mark.parametrize("mode", MODES)
def test_islands_run(benchmark, island_sizes, mode):
    scenario, vcpus, host_cpus, sim_ns, rounds = island_sizes
    threads, split = MODES[mode]
    if threads > (os.cpu_count() or 1):
        pytest.skip(f"{threads} threads on {os.cpu_count()} CPUs")
    last = {}

    def setup():
        host, ns, _ = scenarios.build(scenario, vcpus=vcpus, host_cpus=host_cpus, sim_ns=sim_ns,
                                      seed=0, trace_capacity=0, threads=threads)
        host.split_islands = split
        last["host"] = host
        return (host, ns), {}

    def run(host, ns):
        host.run(ns)

    benchmark.group = f"islands {scenario} {vcpus}"
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)
    host = last["host"]
    assert host.now == sim_ns and host.halts > 0
    assert host.islands_used == (len(host.islands()) if split else 0) and len(host.islands()) > 1
    COUNTS[mode] = (host.halts, host.events)
    assert len(set(COUNTS.values())) == 1, COUNTS      # every mode: the same run
    benchmark.extra_info.update(scenario=scenario, vcpus=vcpus, sim_ms=sim_ns / 1e6,
                                halts=host.halts, events=host.events, threads=threads,
                                islands=host.islands_used)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        benchmark.extra_info.update(halts_per_s=host.halts / median,
                                    events_per_s=host.events / median)
