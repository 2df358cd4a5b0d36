"""The public API: Host, VM, VCpu, capabilities, errors that leave state unchanged."""

import errno

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.outputs import tracefmt
from kvmwake.haltpoll import HaltPollParams
from kvmwake.kernel.replay import replay
from kvmwake.uapi import Cap

ENGINES = ("core", "reference")


def storm_vm(engine, n=4, seed=1, **kw_args):
    vm = kw.VM(arch="arm64", nr_vcpus=n, host_cpus=n, seed=seed, engine=engine, **kw_args)
    vm.set_tick(4_000_000)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(20_000), g.wake_random_other(), g.wfi()])])
    return vm


@pytest.mark.parametrize("engine", ENGINES)
def test_readme_example_runs_and_reports_kernel_names(engine):
    vm = storm_vm(engine)
    vm.enable_cap(kw.Cap.HALT_POLL, 200_000)
    vm.run(until_ns=20_000_000)
    s = vm.stats()
    for name in ("halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid",
                 "halt_wakeup", "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns",
                 "halt_poll_success_hist", "halt_poll_fail_hist", "halt_wait_hist",
                 "blocking", "wfi_exit_stat"):
        assert name in s
    assert s["halt_poll_success_hist"].shape == (32,)
    assert s["halt_attempted_poll"] > 0
    assert s["halt_poll_invalid"] == 0
    per_vcpu = [v.stats() for v in vm.vcpus]
    assert sum(p["halt_wakeup"] for p in per_vcpu) == s["halt_wakeup"]
    assert np.array_equal(sum(p["halt_wait_hist"] for p in per_vcpu), s["halt_wait_hist"])
    # Every halt: one kvm_vcpu_wakeup line; the hist counts add up.
    lines = vm.trace_text(header=False).splitlines()
    n_wakeups = sum("kvm_vcpu_wakeup" in ln for ln in lines)
    assert n_wakeups == vm.host.halts
    assert int(s["halt_poll_success_hist"].sum()) == s["halt_successful_poll"]
    assert int(s["halt_wait_hist"].sum()) + s["halt_successful_poll"] <= n_wakeups


@pytest.mark.parametrize("engine", ENGINES)
def test_simulated_trace_replays_with_no_mismatch(engine):
    """A simulated run's trace text, read back, replays exactly through the rule."""
    vm = storm_vm(engine, n=6)
    vm.host.halt_poll_ns_shrink = 2
    vm.run(30_000_000)
    events = tracefmt.parse(vm.trace_text())
    params = HaltPollParams(halt_poll_ns=vm.host.halt_poll_ns,
                            halt_poll_ns_grow=vm.host.halt_poll_ns_grow,
                            halt_poll_ns_grow_start=vm.host.halt_poll_ns_grow_start,
                            halt_poll_ns_shrink=vm.host.halt_poll_ns_shrink)
    r = replay(events, params)
    assert r.halts == vm.host.halts
    assert r.recorded_lines > 0
    assert r.mismatched == 0 and r.matched == r.recorded_lines


def test_same_seed_same_results_different_seed_differs():
    a, b, c = storm_vm("core", seed=5), storm_vm("core", seed=5), storm_vm("core", seed=6)
    for vm in (a, b, c):
        vm.run(10_000_000)
    assert np.array_equal(a.stats_array(), b.stats_array())
    assert a.trace_text() == b.trace_text()
    assert not np.array_equal(a.stats_array(), c.stats_array())


def test_vms_share_a_host_and_its_cpus():
    host = kw.Host(host_cpus=2, arch="x86", seed=3)
    vm1, vm2 = host.create_vm(3), host.create_vm(2)
    assert [v.host_cpu for v in vm1.vcpus + vm2.vcpus] == [0, 1, 0, 1, 0]
    for vm in (vm1, vm2):
        for v in vm.vcpus:
            v.load([g.loop([g.compute(50_000), g.wake_next(), g.wfi()])])
    host.run(5_000_000)
    assert host.now == 5_000_000
    assert vm1.stats()["halt_exits"] > 0 and vm2.stats()["halt_exits"] > 0
    assert "wfi_exit_stat" not in vm1.stats()
    # Each VM's trace holds only its own threads.
    pids1 = {e.pid for e in vm1.trace_events()}
    pids2 = {e.pid for e in vm2.trace_events()}
    assert pids1 and pids2 and not pids1 & pids2


def test_check_extension_and_enable_cap_halt_poll():
    vm = kw.VM(nr_vcpus=1)
    assert vm.check_extension(kw.Cap.HALT_POLL) == 1
    assert vm.check_extension(99999) == 0
    assert vm.max_halt_poll_ns == 500_000          # arm64 module default
    vm.enable_cap(kw.Cap.HALT_POLL, 0)
    assert vm.max_halt_poll_ns == 0
    vm.host.halt_poll_ns = 123                      # the override is for good
    assert vm.max_halt_poll_ns == 0
    vm.enable_cap(kw.Cap.HALT_POLL, 0xFFFF_FFFF)
    assert vm.max_halt_poll_ns == 0xFFFF_FFFF


@pytest.mark.parametrize("args,flags", [((1 << 32,), 0), ((-1,), 0), ((100,), 1), (("x",), 0)])
def test_enable_cap_halt_poll_rejects_with_einval_and_keeps_state(args, flags):
    vm = kw.VM(nr_vcpus=1)
    vm.enable_cap(kw.Cap.HALT_POLL, 1000)
    with pytest.raises(kw.KvmError) as ei:
        vm.enable_cap(kw.Cap.HALT_POLL, *args, flags=flags)
    assert ei.value.errno == errno.EINVAL
    assert vm.max_halt_poll_ns == 1000


def test_enable_unknown_cap_is_einval():
    vm = kw.VM(nr_vcpus=1)
    with pytest.raises(kw.KvmError) as ei:
        vm.enable_cap(4242)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(nr_vcpus=0), ValueError, "at least one vCPU"),
    (dict(nr_vcpus=-3), ValueError, "nr_vcpus"),
    (dict(nr_vcpus=513), kw.KvmError, "KVM_MAX_VCPUS"),
    (dict(nr_vcpus=2, host_cpus=0), ValueError, "host_cpus"),
    (dict(nr_vcpus=2, arch="riscv"), ValueError, "unknown arch"),
    (dict(nr_vcpus=2.5), TypeError, "integer"),
    (dict(nr_vcpus=2, seed=-1), ValueError, "seed"),
    (dict(nr_vcpus=2, engine="fast"), ValueError, "unknown engine"),
    (dict(nr_vcpus=2, costs={"vm_exit_ns": -1}), ValueError, "vm_exit_ns"),
    (dict(nr_vcpus=2, costs={"bogus_ns": 1}), ValueError, "unknown cost"),
])
def test_bad_vm_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kw.VM(**kwargs)


def test_x86_allows_1024_vcpus_arm64_512():
    assert kw.VM(arch="x86", nr_vcpus=1024, host_cpus=4).nr_vcpus == 1024
    with pytest.raises(kw.KvmError):
        kw.VM(arch="x86", nr_vcpus=1025, host_cpus=4)


def test_failed_vm_creation_leaves_host_unchanged():
    host = kw.Host(host_cpus=2)
    host.create_vm(2)
    with pytest.raises(kw.KvmError):
        host.create_vm(600)
    with pytest.raises(ValueError):
        host.create_vm(1, arch="x86")
    assert len(host.vms) == 1
    vm = host.create_vm(1)
    assert vm.vcpus[0].host_cpu == 0            # the third thread: 2 % 2


def test_module_params_are_unsigned_int():
    host = kw.Host()
    host.halt_poll_ns = 0xFFFF_FFFF
    for bad in (-1, 1 << 32, "1", 1.0, True):
        with pytest.raises((ValueError, TypeError)):
            host.halt_poll_ns = bad
    assert host.halt_poll_ns == 0xFFFF_FFFF


def test_bad_program_is_rejected_and_vcpu_keeps_nothing():
    vm = kw.VM(nr_vcpus=2)
    with pytest.raises(kw.ProgramError, match="does not exist"):
        vm.vcpus[0].load([g.loop([g.compute(10), g.wake(5), g.wfi()])])
    with pytest.raises(kw.ProgramError, match="no virtual time"):
        vm.vcpus[0].load([g.loop([g.wake(1)])])
    with pytest.raises(kw.ProgramError, match="at least 2"):
        kw.VM(nr_vcpus=1).vcpus[0].load([g.wake_random_other(), g.wfi()])
    vm.run(1_000_000)
    assert vm.vcpus[0].thread_state == "USER"


def test_run_rejects_time_going_backwards():
    vm = storm_vm("core")
    vm.run(1_000_000)
    with pytest.raises(ValueError, match="before the current time"):
        vm.run(999_999)
    with pytest.raises(ValueError):
        vm.run(-5)
    assert vm.host.now == 1_000_000


def test_program_end_leaves_kvm_run():
    vm = kw.VM(nr_vcpus=1, costs={"vm_exit_ns": 0, "vm_entry_ns": 0})
    vm.vcpus[0].load([g.compute(1000), g.end()])
    vm.run(10_000)
    assert vm.vcpus[0].thread_state == "USER"
    vm.run(20_000)                                 # an ended program is not restarted
    assert vm.vcpus[0].thread_state == "USER"


def test_trace_capacity_keeps_the_newest_records():
    vm = storm_vm("core", trace_capacity=50)
    vm.run(20_000_000)
    events = vm.trace_events()
    assert len(events) == 50
    assert vm.host._engine.trace_dropped > 0
    assert events[-1].ts_ns <= 20_000_000
    ref = storm_vm("reference", trace_capacity=50)
    ref.run(20_000_000)
    assert ref.trace_events() == events


def test_tracing_off():
    vm = storm_vm("core", trace_capacity=0)
    vm.run(5_000_000)
    assert vm.trace_events() == []
    assert vm.stats()["halt_attempted_poll"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_error_is_raised_and_sticky(engine):
    zero = {name: 0 for name in kw.model.COST_DEFAULTS}
    vm = kw.VM(nr_vcpus=2, costs=zero, engine=engine)
    # Two vCPUs wake each other before every WFI: with zero costs no time passes.
    vm.vcpus[0].load([g.loop([g.wake(1), g.wfi()])])
    vm.vcpus[1].load([g.loop([g.wake(0), g.wfi()])])
    with pytest.raises(kw.EngineError, match="no progress"):
        vm.run(1_000)
    with pytest.raises(kw.EngineError, match="earlier error"):
        vm.run(2_000)


@pytest.mark.parametrize("engine", ENGINES)
def test_self_wake_is_taken_at_entry_even_with_zero_costs(engine):
    zero = {name: 0 for name in kw.model.COST_DEFAULTS}
    vm = kw.VM(nr_vcpus=1, costs=zero, engine=engine)
    vm.vcpus[0].load([g.loop([g.compute(10), g.wake(0), g.wfi()])])
    vm.run(1_000)
    assert vm.vcpus[0].thread_state == "BLOCKED"
    assert vm.vcpus[0].stats()["wfi_exit_stat"] == 1


# -- constructors and set-up calls that fail change nothing (issue 12 item 11) --------------------

def _busy_host():
    host = kw.Host(host_cpus=2, seed=3)
    vm = host.create_vm(2, nr_spis=32)
    vm.vcpus[0].load([g.loop([g.compute(5_000), g.wfi()])])
    vm.set_tick(40_000)
    host.run(100_000)
    return host, vm


@pytest.mark.parametrize("kwargs,exc", [
    (dict(nr_vcpus=1, memory_size=1), ValueError),
    (dict(nr_vcpus=1, memory_size=1 << 49), ValueError),
    (dict(nr_vcpus=1, memory_size="4096"), TypeError),
    (dict(nr_vcpus=1, nr_spis=-1), ValueError),
    (dict(nr_vcpus=1, nr_spis=989), ValueError),
    (dict(nr_vcpus=1, nr_spis=1.0), TypeError),
    (dict(nr_vcpus=0), ValueError),
    (dict(nr_vcpus=513), kw.KvmError),
    (dict(nr_vcpus="2"), TypeError),
    (dict(nr_vcpus=True), TypeError),
    (dict(nr_vcpus=1, arch="x86"), ValueError),
    (dict(nr_vcpus=1, arch="riscv"), ValueError),
    (dict(nr_vcpus=1, host_cpus=2), ValueError),
    (dict(nr_vcpus=1, costs={}), ValueError),
])
def test_a_failed_vm_constructor_leaves_the_host_unchanged(kwargs, exc):
    host, vm = _busy_host()
    before = host.snapshot()
    with pytest.raises(exc):
        kw.VM(host=host, **kwargs)
    assert len(host.vms) == 1 and host.snapshot() == before
    with pytest.raises(exc):
        host.create_vm(**kwargs) if "host_cpus" not in kwargs and "costs" not in kwargs \
            else kw.VM(host=host, **kwargs)
    assert len(host.vms) == 1 and host.snapshot() == before
    # ... and the host still works: a good VM, a snapshot, a run.
    host.create_vm(1, nr_spis=1)
    host.run(200_000)
    kw.Host.restore(host.snapshot())


def test_a_vm_on_something_that_is_not_a_host():
    with pytest.raises(TypeError, match="kvmwake.Host"):
        kw.VM(host="not a host")


def test_bad_host_arguments_are_named():
    with pytest.raises(TypeError, match="costs"):
        kw.Host(costs=[("vm_exit_ns", 1)])
    with pytest.raises(ValueError, match="unknown engine"):
        kw.Host(engine="fast")


@pytest.mark.parametrize("call,exc", [
    (lambda vm: vm.vcpus[1].load([g.wake(7)]), kw.ProgramError),
    (lambda vm: vm.vcpus[1].load([g.irq_enable(40 + 32)]), kw.ProgramError),
    (lambda vm: vm.vcpus[1].load("nonsense"), kw.ProgramError),
    (lambda vm: vm.vcpus[0].load([g.end()]), kw.KvmError),           # inside KVM_RUN
    (lambda vm: vm.add_irq_source(40, period_ns=0), ValueError),
    (lambda vm: vm.add_irq_source(40, period_ns=10, phase_ns=-1), ValueError),
    (lambda vm: vm.add_irq_source(40, mean_ns=1 << 51), ValueError),
    (lambda vm: vm.add_irq_source(40, times_ns=[5, 3]), ValueError),
    (lambda vm: vm.add_irq_source(40, times_ns=[[1]]), ValueError),
    (lambda vm: vm.add_irq_source(40, period_ns=10, mean_ns=10), ValueError),
    (lambda vm: vm.add_irq_source(64 + 32, period_ns=10), kw.KvmError),
    (lambda vm: vm.add_irq_source(20, period_ns=10), kw.KvmError),
    (lambda vm: vm.add_msi_source(0, 40, period_ns=10), kw.KvmError),
    (lambda vm: vm.set_tick(-1), ValueError),
    (lambda vm: vm.set_tick((1 << 62) + 1), ValueError),
    (lambda vm: vm.set_tick(1.5), TypeError),
    (lambda vm: vm.enable_cap(Cap.HALT_POLL, 1 << 32), kw.KvmError),
    (lambda vm: vm.enable_cap(Cap.HALT_POLL, 10, flags=1), kw.KvmError),
    (lambda vm: vm.enable_cap(12345), kw.KvmError),
    (lambda vm: vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND, flags=2), kw.KvmError),
    (lambda vm: vm.vcpus[0].make_request(64), kw.KvmError),
    (lambda vm: vm.vcpus[0].make_request(0x100 | 255), kw.KvmError),
    (lambda vm: vm.vcpus[0].make_request(0x800), ValueError),
])
def test_failed_set_up_calls_leave_the_host_unchanged(call, exc):
    host, vm = _busy_host()
    before = host.snapshot()
    with pytest.raises(exc):
        call(vm)
    assert host.snapshot() == before


def test_make_request_of_a_high_bit_does_not_unblock():
    """Request 34 is bit 34 of the u64 vcpu->requests, not KVM_REQ_UNBLOCK (bit 2)."""
    for engine in ("core", "reference"):
        vm = kw.VM(nr_vcpus=1, engine=engine)
        vm.host.halt_poll_ns = 0
        vm.vcpus[0].load([g.wfi(), g.sync(1), g.end()])
        vm.host.run(10_000)
        assert vm.vcpus[0].thread_state == "BLOCKED"
        vm.vcpus[0].make_request(34)
        vm.host.run(20_000)
        assert vm.vcpus[0].thread_state == "BLOCKED", engine
        assert vm._engine.thread_info(vm.vcpus[0]._g)["requests"] == 1 << 34
        with pytest.raises(kw.KvmError) as ei:
            vm.vcpus[0].make_request(64)
        assert ei.value.errno == errno.EINVAL and "request number 64" in str(ei.value)
