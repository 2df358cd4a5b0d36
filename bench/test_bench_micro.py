"""Micro benchmarks of the core's hot paths, through the hooks of ``kvmwake/_bench.pxi``.

Each hook runs ``n`` operations in C without the GIL and returns its own
nanosecond count; pytest-benchmark times the whole call (``n`` operations
plus one Python call).  ``extra_info`` keeps both per-operation figures.

* heap push/pop: ``n`` pushes of pseudo-random times into an empty event
  heap, then ``n`` pops, order checked (one "op" = one push or one pop).
* wake condition: raise a wake source (interrupt, KVM_REQ_UNBLOCK or
  neither), then ``kvm_vcpu_check_block`` (one op = raise + check).
* kick: ``raise_pending`` + ``kvm_vcpu_kick`` of a vCPU BLOCKED in a halt on
  an idle host CPU: wake-up, run-queue and EV_RUN push; the engine is put
  back after each kick (one op = one kick).
* halt path: a 2-vCPU engine where vCPU 1 wakes vCPU 0 out of its halts,
  with polling off (block path) or on (poll path) (one op = one halt, with
  everything both vCPUs do around it).

The plain tests at the end check the hooks themselves (no timing).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvmwake import Host, _core
from kvmwake import guest as g


def _record(benchmark, c_ns, ops, op):
    benchmark.extra_info.update(ops_per_call=ops, op=op, c_ns_per_op=c_ns / ops)


def _blocked_host(nr_vcpus=2):
    """A host whose vCPUs are all BLOCKED in a halt, each on its own idle host CPU."""
    host = Host(host_cpus=nr_vcpus, arch="x86", seed=3, trace_capacity=1 << 12)
    host.halt_poll_ns = 0
    vm = host.create_vm(nr_vcpus)
    for v in vm.vcpus:
        v.load(g.Program([g.loop([g.compute(1_000), g.wfi()])]))
    host.run(1_000_000)
    assert all(v.thread_state == "BLOCKED" for v in vm.vcpus)
    return host, vm


# -- benchmarks -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["heap_small", "heap_large"])
def test_heap_push_pop(benchmark, micro_sizes, which):
    n = micro_sizes[which]
    c_ns = benchmark(_core.bench_heap, n, 1)
    _record(benchmark, c_ns, 2 * n, "push-or-pop")
    benchmark.extra_info["heap_events"] = n


def test_wake_condition_check(benchmark, micro_sizes):
    n = micro_sizes["check_block"]
    c_ns = benchmark(_core.bench_check_block, n, 1)
    _record(benchmark, c_ns, n, "check")


def test_kick_blocked_vcpu(benchmark, micro_sizes):
    n = micro_sizes["kick"]
    host, vm = _blocked_host()
    c_ns = benchmark(_core.bench_kick, host._engine, vm.vcpus[0]._g, n)
    _record(benchmark, c_ns, n, "kick")


@pytest.mark.parametrize("poll", [False, True], ids=["block", "poll"])
def test_halt_path(benchmark, micro_sizes, poll):
    n = micro_sizes["halt_path"]
    c_ns = benchmark(_core.bench_halt_path, n, poll)
    _record(benchmark, c_ns, n, "halt")


# -- the hooks themselves (not timed) ----------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 1000, 5000])
def test_bench_heap_runs(n):
    assert _core.bench_heap(n, n) >= 0


def test_bench_check_block_runs():
    assert _core.bench_check_block(10_000, 7) >= 0
    with pytest.raises(ValueError):
        _core.bench_check_block(10, 0, 1000)


def test_bench_kick_leaves_the_engine_as_it_was():
    kicked, kvm = _blocked_host()
    twin, tvm = _blocked_host()
    e = kicked._engine
    before = (e.stats_array(), e.thread_info(0), e.thread_info(1), e.events, e.halts,
              e.state_bytes())
    assert _core.bench_kick(e, kvm.vcpus[0]._g, 10_000) >= 0
    after = (e.stats_array(), e.thread_info(0), e.thread_info(1), e.events, e.halts,
             e.state_bytes())
    assert np.array_equal(before[0], after[0]) and before[1:] == after[1:]
    # The two hosts go on identically: same stats, counters and trace.
    for host, vm in ((kicked, kvm), (twin, tvm)):
        vm.vcpus[0].raise_wake()
        host.run(3_000_000)
        vm.vcpus[1].raise_wake()
        host.run(6_000_000)
    assert np.array_equal(kvm.stats_array(), tvm.stats_array())
    assert (kicked.halts, kicked.events) == (twin.halts, twin.events)
    assert kvm.trace_text() == tvm.trace_text()


def test_bench_kick_refuses_a_vcpu_that_is_not_blocked():
    host = Host(host_cpus=1, arch="x86", seed=0)
    vm = host.create_vm(1)
    with pytest.raises(ValueError):
        _core.bench_kick(host._engine, 0, 10)       # never started: USER
    with pytest.raises(ValueError):
        _core.bench_kick(host._engine, 5, 10)       # no such thread


@pytest.mark.parametrize("poll", [False, True])
def test_bench_halt_path_counts_its_halts(poll):
    assert _core.bench_halt_path(1000, poll) > 0
    with pytest.raises(ValueError):
        _core.bench_halt_path(0, poll)
