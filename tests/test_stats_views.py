"""Reading a big host's results without copying the host: per-VM stats are that VM's
rows of the host array, read-only views cannot be written or made writeable, copies
do not share the engine's memory, aggregates equal the per-VM sums, and a VM's trace
records are the host's records of its threads (both engines)."""

from __future__ import annotations

import numpy as np
import pytest

from kvmwake import Host, guest as g
from kvmwake.cli import sweep
from kvmwake.model import NR_STATS, S_BLOCKING
from kvmwake.outputs import arrays, stats as _stats, summary
from kvmwake.outputs.tracefmt import TRACE_RECORD_DTYPE
from kvmwake.reference import PID_BASE

ENGINES = ("core", "reference")
US = 1_000


def _storm_host(engine, host_thread=False, sizes=(3, 5, 2)):
    """VMs of ``sizes`` vCPUs waking each other on 4 host CPUs (a host thread before
    the second VM with ``host_thread``), run 3 ms with tracing on."""
    host = Host(host_cpus=4, engine=engine, seed=5, trace_capacity=1 << 14)
    for k, n in enumerate(sizes):
        if host_thread and k == 1:
            host.add_load(0.3, "50us")
        vm = host.create_vm(n)
        vm.set_tick(1_000 * US)
        for v in vm.vcpus:
            v.load([g.loop([g.compute_exp(20 * US), g.wake_random_other(), g.wfi()])])
    host.run(3_000_000)
    return host


def _vm_rows_of_engine(vm):
    """The old read-out: the whole host array copied, then the VM's rows taken."""
    return vm.host._engine.stats_array()[vm._first:vm._first + vm.nr_vcpus]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("host_thread", (False, True))
def test_per_vm_stats_are_the_slice_of_the_host_array(engine, host_thread):
    host = _storm_host(engine, host_thread)
    assert host.halts > 0
    whole = host._engine.stats_array()
    for vm in host.vms:
        want = whole[vm._first:vm._first + vm.nr_vcpus]
        assert vm.stats_array().shape == (vm.nr_vcpus, NR_STATS)
        assert np.array_equal(vm.stats_array(), want)
        assert np.array_equal(vm.stats_array(copy=False), want)
        assert vm.stats() == _stats.sum_rows(want, host.arch)
        for v in vm.vcpus:
            assert v.blocking == bool(whole[v._g][S_BLOCKING])
            assert host._engine.stat(v._g, S_BLOCKING) == int(whole[v._g][S_BLOCKING])
    # The host's rows: VM after VM, the host thread's row left out.
    concat = np.concatenate([vm.stats_array() for vm in host.vms])
    assert np.array_equal(host.stats_array(), concat)
    assert np.array_equal(host.stats_array(copy=False), concat)
    assert np.array_equal(host._engine.stats_view(), whole)
    assert np.array_equal(host._engine.stats_view(2, 3), whole[2:5])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("host_thread", (False, True))
def test_views_are_read_only(engine, host_thread):
    host = _storm_host(engine, host_thread)
    views = [host.stats_array(copy=False), host._engine.stats_view()] + \
        [vm.stats_array(copy=False) for vm in host.vms]
    before = host._engine.stats_array()
    shared = 0
    for view in views:
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0] = 12345
        if np.shares_memory(view, host._engine.stats_view()):
            # On the engine's memory: the flag cannot be turned back on.
            shared += 1
            with pytest.raises(ValueError):
                view.flags.writeable = True
    # The core engine hands out its own rows (all but the host's, copied to leave the
    # host thread's row out); the reference engine keeps lists, and copies.
    assert shared == (0 if engine == "reference" else len(views) - host_thread)
    assert np.array_equal(host._engine.stats_array(), before)


def test_core_views_share_the_engine_rows_and_copies_do_not():
    host = _storm_host("core")
    engine_rows = host._engine.stats_view()
    vm = host.vms[1]
    view = vm.stats_array(copy=False)
    assert np.shares_memory(view, engine_rows)               # no copy
    assert np.shares_memory(host.stats_array(copy=False), engine_rows)
    for copy in (vm.stats_array(), host.stats_array(), host._engine.stats_array(),
                 host._engine.stats_rows(vm._first, vm.nr_vcpus)):
        assert not np.shares_memory(copy, engine_rows)
    with pytest.raises(ValueError):
        view.flags.writeable = True
    # A copy written to leaves the engine's rows alone.
    copy = vm.stats_array()
    copy[:] = 7
    assert np.array_equal(vm.stats_array(), _vm_rows_of_engine(vm))
    # A view reads the rows as they are now: the run goes on, the view follows.
    halts_before = int(view[:, 1].sum())
    host.run(6_000_000)
    assert np.array_equal(view, vm.stats_array())
    assert int(view[:, 1].sum()) >= halts_before


@pytest.mark.parametrize("engine", ENGINES)
def test_reference_views_do_not_alias_the_engine(engine):
    """Whatever a user does to an array handed out, the engine's rows stay."""
    host = _storm_host(engine)
    before = host._engine.stats_array()
    for arr in (host.stats_array(), host.vms[0].stats_array()):
        arr[:] = 99
    view = host.vms[0].stats_array(copy=False)
    try:
        view.flags.writeable = True         # allowed only on a private copy
        view[:] = 99
    except ValueError:
        pass
    assert np.array_equal(host._engine.stats_array(), before)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_view_taken_before_a_vm_is_added_stays_readable(engine):
    host = _storm_host(engine)
    view = host.vms[0].stats_array(copy=False)
    old = view.copy()
    vm = host.create_vm(2)                  # the engine's rows may move
    for v in vm.vcpus:
        v.load([g.loop([g.compute(30 * US), g.wfi()])])
    host.run(4_000_000)
    # Not freed memory: the rows as they were when they moved, or still the engine's.
    assert np.array_equal(view, old) or np.array_equal(view, host.vms[0].stats_array())
    assert np.array_equal(host.stats_array()[-2:], vm.stats_array())


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_ranges_raise(engine):
    host = _storm_host(engine)
    n = host._engine.stats_array().shape[0]
    for first, count in ((-1, 1), (0, n + 1), (n, 1), (2, -2)):
        with pytest.raises(IndexError):
            host._engine.stats_view(first, count)
    for g_, i in ((n, 0), (0, NR_STATS)):
        with pytest.raises(IndexError):
            host._engine.stat(g_, i)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("host_thread", (False, True))
def test_aggregates_equal_the_per_vm_computation(engine, host_thread):
    host = _storm_host(engine, host_thread)
    old_rows = np.concatenate([_vm_rows_of_engine(vm) for vm in host.vms])
    s = summary.summarize(host, scenario="t", scenario_file=None, engine=engine, seed=5,
                          sim_ns=host.now, build_s=0.0, wall_s=1.0)
    assert s["stats"] == _stats.to_jsonable(_stats.sum_rows(old_rows, host.arch))
    assert s["vcpus"] == old_rows.shape[0] == sum(vm.nr_vcpus for vm in host.vms)
    a = arrays.arrays(host, host.now)
    assert np.array_equal(a["stats"], old_rows)
    assert not np.shares_memory(a["stats"], host._engine.stats_view())


def test_sweep_point_sums_every_vm():
    """A sweep point's row sums the host's rows as the per-VM concatenation did."""
    spec = {"id": "p0", "seed_index": 0, "seed": 3, "scenario": "default",
            "params": {"vcpus": 128, "host_cpus": 16, "sim_ms": 2}}
    row = sweep.run_point(spec)
    host, sim_ns, _ = sweep.build_point(spec)
    host.run(sim_ns)
    assert len(host.vms) > 1
    st = _stats.sum_rows(np.concatenate([_vm_rows_of_engine(vm) for vm in host.vms]),
                         host.arch)
    for key in ("halt_successful_poll", "halt_attempted_poll", "halt_wakeup",
                "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns"):
        assert row[key] == st[key]
    assert row["vcpus"] == 128


@pytest.mark.parametrize("engine", ENGINES)
def test_trace_records_are_the_vms_records_of_the_host_trace(engine):
    host = _storm_host(engine)
    every = np.array(host._engine.trace_list(), dtype=TRACE_RECORD_DTYPE)
    assert len(every) > 0
    assert np.array_equal(host._engine.trace_array(), every)
    total = 0
    for vm in host.vms:
        lo = PID_BASE + vm._first
        want = every[(every["pid"] >= lo) & (every["pid"] < lo + vm.nr_vcpus)]
        got = vm.trace_records()
        assert got.dtype == TRACE_RECORD_DTYPE and np.array_equal(got, want)
        total += len(got)
    assert total == len(every)
    assert len(host._engine.trace_array(0, PID_BASE)) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_trace_records_after_the_ring_wrapped(engine):
    """A full ring: the records come oldest first from the write position."""
    host = Host(host_cpus=2, engine=engine, seed=2, trace_capacity=64)
    vm = host.create_vm(2)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(20 * US), g.wake_random_other(), g.wfi()])])
    host.run(5_000_000)
    every = np.array(host._engine.trace_list(), dtype=TRACE_RECORD_DTYPE)
    assert len(every) == 64
    assert np.array_equal(vm.trace_records(), every)
    assert np.all(np.diff(every["ts"].astype(np.int64)) >= 0)
