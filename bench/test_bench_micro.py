"""Micro benchmarks of the core's hot paths, through the hooks of ``kvmwake/core/bench.pxi``.

Each hook runs ``n`` operations in C without the GIL and returns its own
nanosecond count; pytest-benchmark times the whole call (``n`` operations
plus one Python call).  ``extra_info`` keeps both per-operation figures.

* heap push/pop: ``n`` pushes of pseudo-random times into an empty event
  heap, then ``n`` pops, order checked (one "op" = one push or one pop).
* wake-condition scan: ``kvm_vgic_vcpu_pending_irq`` of one arm64 vCPU in a
  VM with all 988 SPIs configured and enabled, a handful pending on it
  (deliverable or all at or above the PMR, so the scan checks every
  candidate); one op = one scan.  The whole-VM scan does every vCPU of
  16,384 (32 VMs of 512); one op = one vCPU.
* kick: the reschedule IPI + ``kvm_vcpu_kick`` of a vCPU BLOCKED in a halt on
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


def _gic_host(nr_vms=1, deliverable=True):
    """arm64 VMs of 512 vCPUs, 988 SPIs each, all enabled; SPIs 40, 100, 300, 700
    and 1000 routed to vCPU 0 and pending (priority 0xA0, or 0xF0 = the PMR)."""
    host = Host(host_cpus=4, arch="arm64", seed=1, trace_capacity=0)
    for _ in range(nr_vms):
        vm = host.create_vm(512, nr_spis=988)
        for intid in range(32, 1020):
            vm.configure_irq(intid, enabled=True, level=False,
                             priority=0xA0 if deliverable else 0xF0)
        for intid in (40, 100, 300, 700, 1000):
            vm.route_spi(intid, vcpu=0)
            vm.irq_line(intid, 1)
    return host


@pytest.mark.parametrize("deliverable", [True, False], ids=["found", "none-beats-pmr"])
def test_wake_condition_scan(benchmark, micro_sizes, deliverable):
    n = micro_sizes["wake_scan"]
    host = _gic_host(1, deliverable)
    c_ns, answer = benchmark(_core.bench_wake_scan, host._engine, 0, n)
    assert answer == deliverable
    _record(benchmark, c_ns, n, "scan")


def test_whole_vm_scan(benchmark, micro_sizes):
    nvcpu = micro_sizes["vm_scan_vcpus"]
    host = _gic_host(nvcpu // 512)
    n = micro_sizes["vm_scan"]

    def scan_all():
        total = 0
        for vm in host.vms:
            ns, hits = _core.bench_vm_scan(host._engine, vm.index, n)
            assert hits == 1
            total += ns
        return total

    c_ns = benchmark(scan_all)
    _record(benchmark, c_ns, n * nvcpu, "vCPU scan")


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


def test_bench_wake_scan_answers_like_the_api():
    for deliverable in (True, False):
        host = _gic_host(1, deliverable)
        ns, answer = _core.bench_wake_scan(host._engine, 0, 100)
        assert ns >= 0 and answer == deliverable == host.vms[0].vcpus[0].runnable
        ns, hits = _core.bench_vm_scan(host._engine, 0, 3)
        assert hits == (1 if deliverable else 0)
    with pytest.raises(ValueError):
        _core.bench_wake_scan(host._engine, 10_000, 1)
    with pytest.raises(ValueError):
        _core.bench_vm_scan(host._engine, 5, 1)


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
