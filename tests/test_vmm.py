"""VMM policies in vm.run(until_ns, vmm=...): ReferenceVmm's PSCI SYSTEM_SUSPEND per
DEN0022D.b 5.19 on top of KVM's bare SUSPEND exit, DenyAllVmm, shutdown, reset, and
the default policy (spec sections 1.1, 4, 6.4 "What a conforming VMM does").
"""

import errno

import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.model import COST_DEFAULTS, mpidr_of
from kvmwake.uapi import AffinityInfo, Cap, ExitReason, MpState, PsciFn, PsciRet, SystemEventType
from kvmwake.vmm import DenyAllVmm, ReferenceVmm, Vmm

ENGINES = ("core", "reference")
U64 = (1 << 64) - 1
DENIED = PsciRet.DENIED & U64
INVALID_ADDRESS = PsciRet.INVALID_ADDRESS & U64
SPI = 40

pytestmark = pytest.mark.parametrize("engine", ENGINES)


def recording(base):
    """A subclass of policy ``base`` that records every exit it is handed."""
    class Recorder(base):
        def __init__(self):
            super().__init__()
            self.log = []

        def handle_exit(self, vcpu, ex):
            self.log.append((vcpu.id, ex))
            return super().handle_exit(vcpu, ex)

        def syncs(self, vcpu_id):
            return [ex.value for i, ex in self.log if i == vcpu_id
                    and ex.reason == ExitReason.MMIO and ex.ucall == "SYNC"]

        def events(self, vcpu_id=None):
            return [(i, ex.system_event.type, ex.time_ns) for i, ex in self.log
                    if ex.reason == ExitReason.SYSTEM_EVENT and vcpu_id in (None, i)]

        def done(self, vcpu_id):
            return any(i == vcpu_id and ex.ucall == "DONE" for i, ex in self.log)
    return Recorder


def make_vm(engine, n, **kwargs):
    vm = kw.VM(arch="arm64", nr_vcpus=n, engine=engine, **kwargs)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    return vm


class Prog:
    """A program built op by op, so labels know their op index."""

    def __init__(self):
        self.ops = []

    def add(self, *items):
        for it in items:
            if isinstance(it, list):
                self.ops.extend(it)
            else:
                self.ops.append(it)
        return self

    def label(self):
        return len(self.ops)


def call(fn, *args):
    return g.psci(fn, *args) + [g.sync_reg(0)]


# -- the multi-vCPU suspend / resume ------------------------------------------------------

def suspend_resume_vm(engine, wake):
    """4 vCPUs: the primary's SYSTEM_SUSPEND is denied while the secondaries are on,
    honoured once they have powered off; an SPI wakes it; it resumes at the entry with
    the context ID, then brings the secondaries back."""
    vm = make_vm(engine, 4)
    ctx = 0x0123_4567_89AB_CDEF
    p = Prog()
    p.add(call(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0))                # placeholder, patched below
    p.add(g.compute(100_000))                                     # the secondaries go off
    p.add(call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(1), 0))
    suspend_at = p.label()
    p.add(call(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0))                # patched below
    p.add(g.sync(0xBAD), g.end())
    resume = p.label()
    p.add(g.sync_reg(0))                                          # x0 == context ID
    sec_entry = {}
    for i in (1, 2, 3):
        p.add(call(PsciFn.FN64_CPU_ON, mpidr_of(i), 0, 0))        # patched below
    for i in (1, 2, 3):
        p.add(call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(i), 0))
    p.add(g.end())
    # Secondaries: run a while, power off; CPU_ON restarts them at their label.
    for i in (1, 2, 3):
        s = Prog()
        s.add(g.compute(20_000 * i))
        s.add(g.psci(PsciFn.CPU_OFF))
        s.add(g.sync(0xBAD), g.end())
        sec_entry[i] = s.label()
        s.add(g.sync_reg(0), g.end())
        vm.vcpus[i].load(s.ops)
    entry = vm.code_address(resume)
    ops = p.ops
    ops[:4] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, entry, ctx)[:4]
    ops[suspend_at:suspend_at + 4] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, entry, ctx)[:4]
    k = resume + 1
    for i in (1, 2, 3):
        ops[k:k + 4] = g.psci(PsciFn.FN64_CPU_ON, mpidr_of(i),
                              vm.code_address(sec_entry[i]), 0x100 + i)[:4]
        k += 6
    vm.vcpus[0].load(ops)
    vm.configure_irq(SPI, enabled=True)
    vm.route_spi(SPI, vcpu=0)
    if wake == "source":
        vm.add_irq_source(SPI, times_ns=[300_000])
    return vm, ctx


@pytest.mark.parametrize("wake", ["source", "irq_line"])
def test_suspend_resume_with_reference_vmm(engine, wake):
    vm, ctx = suspend_resume_vm(engine, wake)
    vmm = recording(ReferenceVmm)()
    primary = vm.vcpus[0]
    vm.run(250_000, vmm=vmm)
    # Denied once (secondaries on), then honoured: SUSPENDED, blocked in KVM_RUN.
    assert vmm.syncs(0)[:2] == [DENIED, AffinityInfo.OFF]
    assert vmm.suspends == 2 and vmm.denials == 1 and vmm.resumes == 0
    assert primary.get_mp_state() == MpState.SUSPENDED
    assert primary.thread_state == "BLOCKED"
    assert all(v.get_mp_state() == MpState.STOPPED for v in vm.vcpus[1:])
    assert [e[1] for e in vmm.events(0)] == [SystemEventType.SUSPEND] * 2
    t_suspend = vmm.events(0)[1][2]
    if wake == "irq_line":
        vm.run(300_000)
        assert primary.get_mp_state() == MpState.SUSPENDED        # nothing woke it
        vm.irq_line(SPI, 1)
    vm.run(2_000_000)
    # WAKEUP -> resumed at the entry with x0 = context ID, RUNNABLE.
    kinds = [e[1] for e in vmm.events(0)]
    assert kinds == [SystemEventType.SUSPEND] * 2 + [SystemEventType.WAKEUP]
    t_wakeup = vmm.events(0)[2][2]
    assert t_wakeup >= 300_000
    assert vmm.resumes == 1
    assert vmm.resume_latency_ns == [t_wakeup - t_suspend]
    assert vmm.invalid_addresses == 0 and vmm.shutdowns == 0
    assert primary.get_mp_state() == MpState.RUNNABLE
    # After the resume label: the context, three CPU_ONs, three AFFINITY_INFO ON.
    assert vmm.syncs(0) == [DENIED, AffinityInfo.OFF, ctx, 0, 0, 0, 0, 0, 0]
    assert 0xBAD not in vmm.syncs(0)
    assert vmm.done(0)
    for i in (1, 2, 3):
        assert vmm.syncs(i) == [0x100 + i]          # restarted at its entry, x0 = context
        assert vmm.done(i)
        assert vm.vcpus[i].get_mp_state() == MpState.RUNNABLE
    assert all(v.outside_run for v in vm.vcpus)
    # The interrupt was taken by the resumed guest (and silenced by its handler).
    assert not primary.irq_state(SPI)["pending"]


def test_reference_vmm_32bit_suspend_reads_narrowed_arguments(engine):
    vm = make_vm(engine, 1)
    p = Prog()
    hi = 0xFFFF_0000 << 32
    p.add(call(PsciFn.SYSTEM_SUSPEND, 0, 0))
    p.add(g.sync(0xBAD), g.end())
    resume = p.label()
    p.add(g.sync_reg(0), g.end())
    p.ops[:4] = g.psci(PsciFn.SYSTEM_SUSPEND, hi | vm.code_address(resume), hi | 0xC7)[:4]
    vm.vcpus[0].load(p.ops)
    vm.configure_irq(SPI, enabled=True)
    vm.add_irq_source(SPI, times_ns=[50_000])
    vmm = recording(ReferenceVmm)()
    vm.run(1_000_000, vmm=vmm)
    assert vmm.suspends == 1 and vmm.resumes == 1 and vmm.invalid_addresses == 0
    assert vmm.syncs(0) == [0xC7]
    assert vmm.done(0)


@pytest.mark.parametrize("entry", [0, 0x1000, 0x3FFF_FFFC, 0x4000_0000 + (256 << 20), U64 & ~3])
def test_reference_vmm_invalid_address(engine, entry):
    vm = make_vm(engine, 2)
    vm.vcpus[1].init(power_off=True)
    assert not vm.memory_contains(entry)
    vm.vcpus[0].load(call(PsciFn.FN64_SYSTEM_SUSPEND, entry, 5) + [g.sync_reg(1), g.end()])
    vmm = recording(ReferenceVmm)()
    vm.run(1_000_000, vmm=vmm)
    assert vmm.syncs(0) == [INVALID_ADDRESS, entry]
    assert (vmm.suspends, vmm.invalid_addresses, vmm.denials, vmm.resumes) == (1, 1, 0, 0)
    assert vm.vcpus[0].get_mp_state() == MpState.RUNNABLE
    assert vmm.done(0)


def test_reference_vmm_entry_need_not_be_code(engine):
    """An entry inside guest memory but not on an op is honoured; the resumed vCPU then
    exits INTERNAL_ERROR, which the policy leaves out."""
    vm = make_vm(engine, 1)
    entry = vm.code_address(1000)
    assert vm.memory_contains(entry)
    vm.vcpus[0].load(call(PsciFn.FN64_SYSTEM_SUSPEND, entry, 5) + [g.end()])
    vm.configure_irq(SPI, enabled=True)
    vm.add_irq_source(SPI, times_ns=[40_000])
    vmm = recording(ReferenceVmm)()
    vm.run(1_000_000, vmm=vmm)
    assert vmm.resumes == 1
    assert vmm.log[-1][1].reason == ExitReason.INTERNAL_ERROR
    assert vm.vcpus[0].outside_run and vm.vcpus[0].get_reg("pc") == entry


def test_deny_all_vmm(engine):
    vm = make_vm(engine, 2)
    vm.vcpus[1].init(power_off=True)              # even with every other vCPU off
    vm.vcpus[0].load(call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1)
                     + call(PsciFn.SYSTEM_SUSPEND, vm.code_address(0), 2) + [g.end()])
    vmm = recording(DenyAllVmm)()
    vm.run(1_000_000, vmm=vmm)
    assert vmm.syncs(0) == [DENIED, DENIED]
    assert [e[1] for e in vmm.events()] == [SystemEventType.SUSPEND] * 2
    assert vm.vcpus[0].get_mp_state() == MpState.RUNNABLE
    assert vmm.done(0)


def test_deny_all_vmm_honours_wakeups(engine):
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    v.set_mp_state(MpState.SUSPENDED)
    vm.configure_irq(SPI, enabled=True)
    vm.add_irq_source(SPI, times_ns=[30_000])
    vmm = recording(DenyAllVmm)()
    vm.run(1_000_000, vmm=vmm)
    assert [e[1] for e in vmm.events()] == [SystemEventType.WAKEUP]
    assert vmm.syncs(0) == [1] and vmm.done(0)


def test_reference_vmm_shutdown_stops_the_vm(engine):
    vm = make_vm(engine, 3)
    v0, v1, v2 = vm.vcpus
    v1.load([g.loop([g.compute(2_000), g.timer_arm(3_000), g.wfi()])])
    v2.load([g.loop([g.compute(5_000), g.sync(2)])])
    v0.load([g.compute(50_000)] + g.psci(PsciFn.SYSTEM_OFF) + [g.sync(0xBAD), g.end()])
    vmm = recording(ReferenceVmm)()
    vm.run(200_000, vmm=vmm)
    assert vmm.shutdowns == 1 and vmm.off
    assert all(v.get_mp_state() == MpState.STOPPED for v in vm.vcpus)
    n_exits, n_wfi = len(vmm.log), v1.stats()["wfi_exit_stat"]
    assert n_wfi > 0 and 0xBAD not in vmm.syncs(0)
    # Nothing runs again: signals get the sleeping vCPUs out, the policy leaves them out.
    v1.signal()
    v2.signal()
    vm.run(1_000_000)
    assert v1.stats()["wfi_exit_stat"] == n_wfi
    assert all(v.outside_run for v in vm.vcpus)
    assert len(vmm.log) == n_exits + 2
    assert all(ex.reason == ExitReason.INTR for _, ex in vmm.log[n_exits:])
    vm.run(2_000_000)
    assert len(vmm.log) == n_exits + 2


def test_reference_vmm_reset_restarts_the_boot_vcpu(engine):
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.load([g.loop([g.compute(2_000), g.timer_arm(3_000), g.wfi()])])
    v0.load([g.sync(7), g.compute(20_000)] + g.psci(PsciFn.SYSTEM_RESET) + [g.end()])
    vmm = recording(ReferenceVmm)()
    vm.run(100_000, vmm=vmm)
    assert vmm.resets >= 2
    assert vmm.syncs(0) == [7] * (vmm.resets + 1)
    assert v1.get_mp_state() == MpState.STOPPED
    assert v0.get_mp_state() == MpState.RUNNABLE


def test_reference_vmm_counters_over_two_cycles(engine):
    """Two suspend / resume cycles on one vCPU: every counter and latency recorded."""
    vm = make_vm(engine, 1)
    p = Prog()
    first = p.label()
    p.add(call(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0))
    p.add(g.sync(0xBAD), g.end())
    second = p.label()
    p.add(g.sync_reg(0))
    p.add(call(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0))
    p.add(g.sync(0xBAD), g.end())
    third = p.label()
    p.add(g.sync_reg(0), g.end())
    p.ops[first:first + 4] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(second), 1)[:4]
    p.ops[second + 1:second + 5] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(third),
                                          2)[:4]
    vm.vcpus[0].load(p.ops)
    vm.configure_irq(SPI, enabled=True)
    vm.add_irq_source(SPI, times_ns=[100_000, 400_000])
    vmm = recording(ReferenceVmm)()
    vm.run(1_000_000, vmm=vmm)
    assert vmm.syncs(0) == [1, 2]
    assert (vmm.suspends, vmm.resumes, vmm.denials, vmm.invalid_addresses) == (2, 2, 0, 0)
    ev = vmm.events(0)
    assert [e[1] for e in ev] == [SystemEventType.SUSPEND, SystemEventType.WAKEUP] * 2
    assert vmm.resume_latency_ns == [ev[1][2] - ev[0][2], ev[3][2] - ev[2][2]]
    assert ev[1][2] >= 100_000 and ev[3][2] >= 400_000


# -- the default policy -------------------------------------------------------------------------

def test_default_policy(engine):
    vm = kw.VM(arch="arm64", nr_vcpus=3, engine=engine)
    v0, v1, v2 = vm.vcpus
    v0.load([g.sync(1), g.compute(10_000), g.sync(2), g.end()])
    v1.load([g.loop([g.compute(10_000)])])
    v2.load([g.compute(5_000), g.end()])
    vmm = recording(Vmm)()
    vm.run(100_000, vmm=vmm)
    assert vmm.syncs(0) == [1, 2]                   # re-entered after each SYNC
    assert vmm.done(0) and vmm.done(2)
    assert v0.outside_run and v2.outside_run        # left out after DONE
    assert not v1.outside_run
    n = len(vmm.log)
    v1.signal()
    vm.run(200_000)
    assert len(vmm.log) == n + 1 and vmm.log[-1][0] == 1
    assert vmm.log[-1][1].reason == ExitReason.INTR
    assert not v1.outside_run                       # re-entered after INTR
    vm.run(300_000)
    assert len(vmm.log) == n + 1                    # DONE vCPUs were not re-entered
    assert vm.vmm is vmm                            # the policy stays the VM's


def test_default_policy_system_events(engine):
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.set_mp_state(MpState.SUSPENDED)
    v1.load([g.sync(5), g.end()])
    vm.configure_irq(SPI, enabled=True)
    vm.route_spi(SPI, vcpu=1)
    vm.add_irq_source(SPI, times_ns=[20_000])
    v0.load(call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1)
            + [g.compute(50_000)] + g.psci(PsciFn.SYSTEM_OFF) + [g.end()])
    vmm = recording(Vmm)()
    vm.run(1_000_000, vmm=vmm)
    # SUSPEND: denied and re-entered; WAKEUP: made RUNNABLE; SHUTDOWN: left out.
    assert vmm.syncs(0) == [DENIED]
    assert vmm.syncs(1) == [5] and vmm.done(1)
    assert [(i, t) for i, t, _ in vmm.events()] == [
        (0, SystemEventType.SUSPEND), (1, SystemEventType.WAKEUP),
        (0, SystemEventType.SHUTDOWN)]
    assert v0.outside_run and v0.get_mp_state() == MpState.STOPPED


def test_vmm_must_be_a_policy(engine):
    vm = kw.VM(arch="arm64", nr_vcpus=1, engine=engine)
    with pytest.raises(TypeError):
        vm.run(1000, vmm=object())
    assert isinstance(vm.vmm, Vmm) and vm.host.now == 0


def test_resume_latency_includes_the_scheduler_wakeup(engine):
    """Woken from a block (no poll window): WAKEUP comes wake_to_run_ns after the SPI."""
    vm = make_vm(engine, 1)
    p = Prog()
    p.add(call(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0), g.end())
    resume = p.label()
    p.add(g.sync_reg(0), g.end())
    p.ops[:4] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(resume), 9)[:4]
    vm.vcpus[0].load(p.ops)
    vm.configure_irq(SPI, enabled=True)
    vm.add_irq_source(SPI, times_ns=[500_000])
    vmm = recording(ReferenceVmm)()
    vm.run(2_000_000, vmm=vmm)
    (_, _, t_s), (_, _, t_w) = vmm.events(0)
    assert t_w == 500_000 + COST_DEFAULTS["wake_to_run_ns"]
    assert vmm.resume_latency_ns == [t_w - t_s]
    assert vmm.syncs(0) == [9]


# -- policies that fail, re-enter or snapshot (issue 12 item 10) -----------------------------------

class Failing(Vmm):
    """The default policy, logging each exit it handles; raises ``exc`` once, on the
    ``at``-th exit offered."""

    def __init__(self, at=None, exc=None):
        self.log = []
        self.offered = 0
        self.at = at
        self.exc = exc

    def handle_exit(self, vcpu, ex):
        self.offered += 1
        if self.offered == self.at:
            self.failed_on = (vcpu.id, ex.time_ns)
            raise self.exc
        self.log.append((vcpu.id, int(ex.reason), ex.ucall, ex.value, ex.time_ns))
        return super().handle_exit(vcpu, ex)


def sync_vm(engine):
    vm = kw.VM(nr_vcpus=2, host_cpus=1, engine=engine, seed=4)
    for i in range(2):
        vm.vcpus[i].load([g.loop([g.compute_exp(20_000), g.sync(10 + i), g.wfi()], count=6),
                          g.end()])
    vm.set_tick(50_000)
    return vm


def outcome(vm):
    return (vm.vmm.log, vm.exits, vm.stats_array().tolist(), vm.trace_records().tolist(),
            vm.host.now, vm.host.events)


@pytest.mark.parametrize("exc", [RuntimeError("policy bug"), KeyboardInterrupt()])
def test_a_failing_policy_leaves_the_exit_pending(engine, exc):
    ref = sync_vm(engine)
    ref.run(2_000_000, vmm=Failing())
    vm = sync_vm(engine)
    pol = Failing(at=3, exc=exc)
    with pytest.raises(type(exc)):
        vm.run(2_000_000, vmm=pol)
    assert len(pol.log) == 2 and vm.exits == 2
    t = vm.host.now
    # The exit is still there, as kvm_run stays filled: the next run offers it again.
    vm.run(2_000_000)
    assert vm.host.now == 2_000_000 and t < 2_000_000
    assert outcome(vm) == outcome(ref)
    assert len(pol.log) == 2 * 7                      # 6 SYNCs and DONE per vCPU: none lost


def test_vcpu_run_returns_the_exit_a_policy_failed_on(engine):
    vm = sync_vm(engine)
    pol = Failing(at=1, exc=RuntimeError("policy bug"))
    with pytest.raises(RuntimeError):
        vm.run(2_000_000, vmm=pol)
    vid, t = pol.failed_on
    ex = vm.vcpus[vid].run()
    assert ex.reason == ExitReason.MMIO and ex.ucall == "SYNC" and ex.value == 10 + vid
    assert ex.time_ns == t                         # that very exit, not a later one


class Reentering(Vmm):
    """Tries KVM_RUN from inside the policy, each way, and logs what it got."""

    def __init__(self):
        self.errors = []

    def handle_exit(self, vcpu, ex):
        for call_ in (lambda: vcpu.vm.host.run(vcpu.vm.host.now + 1000),
                      lambda: vcpu.vm.run(vcpu.vm.host.now + 1000),
                      lambda: vcpu.run(),
                      lambda: vcpu.vm.vcpus[1 - vcpu.id].run()):
            try:
                call_()
            except kw.KvmError as err:
                self.errors.append((err.errno, err.message))
            else:
                self.errors.append(None)
        return super().handle_exit(vcpu, ex)


def test_run_from_inside_a_policy_is_ebusy(engine):
    ref = sync_vm(engine)
    ref.run(1_000_000)
    vm = sync_vm(engine)
    pol = Reentering()
    vm.run(1_000_000, vmm=pol)
    assert pol.errors and all(e is not None and e[0] == errno.EBUSY for e in pol.errors)
    assert "inside a VMM policy" in pol.errors[0][1]
    assert {e[1].split(" called")[0] for e in pol.errors} == \
        {"host.run()", "vm.run()", "vcpu.run()"}
    # Nothing ran under the policy's feet.
    assert vm.stats_array().tolist() == ref.stats_array().tolist()
    assert vm.exits == ref.exits and vm.host.events == ref.host.events


SNAPS = []


class Snapshotting(Vmm):
    """Takes a host snapshot first thing in its ``at``-th call (once per test)."""

    def __init__(self, at=0):
        self.calls = 0
        self.at = at

    def handle_exit(self, vcpu, ex):
        if self.calls == self.at and not SNAPS:
            SNAPS.append(vcpu.vm.host.snapshot())
        self.calls += 1
        return super().handle_exit(vcpu, ex)


@pytest.mark.parametrize("at", [0, 3, 7])
def test_snapshot_inside_handle_exit_continues_identically(engine, at):
    if engine != "core":
        pytest.skip("snapshots need the core engine")
    SNAPS.clear()
    vm = sync_vm(engine)
    vm.run(2_000_000, vmm=Snapshotting(at))
    assert len(SNAPS) == 1
    classes = {f"{__name__}:Snapshotting": Snapshotting}
    restored = kw.Host.restore(SNAPS[0], vmm_classes=classes)
    rvm = restored.vms[0]
    assert any(v._held is not None for v in rvm.vcpus)       # the exit being handled
    rvm.run(2_000_000)
    assert rvm.vmm.calls == vm.vmm.calls and rvm.exits == vm.exits
    assert rvm.stats_array().tolist() == vm.stats_array().tolist()
    assert rvm.trace_records().tolist() == vm.trace_records().tolist()
    assert restored.snapshot() == vm.host.snapshot()
