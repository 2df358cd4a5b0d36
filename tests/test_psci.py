"""PSCI as arm64 KVM emulates it (spec sections 4.1, 6, 13 and 15 items 3, 4, 8-11).

The first three tests are the upstream selftests of
tools/testing/selftests/kvm/arm64/psci_test.c (spec section 13) with the same
set-up and expectations; the guest's GUEST_ASSERTs become GUEST_SYNCs of the
return value, checked by the host.  Everything runs on both engines.
"""

import errno

import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.model import mpidr_of
from kvmwake.uapi import (
    ARM_SMCCC_VERSION_FUNC_ID, KVM_PSCI_FN_CPU_OFF, KVM_PSCI_FN_CPU_ON,
    KVM_PSCI_FN_CPU_SUSPEND, KVM_PSCI_FN_MIGRATE, KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2,
    KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2, PSCI_0_2_TOS_MP, PSCI_1_3_OFF_TYPE_HIBERNATE_OFF,
    AffinityInfo, Cap, ExitReason, MpState, PsciFn, PsciRet, PsciVersion, SystemEventType,
)

ENGINES = ("core", "reference")
U64 = (1 << 64) - 1
CPU_ON_ENTRY_ADDR = 0xFEEDF00D
CPU_ON_CONTEXT_ID = 0xDEADC0DE
#: PSCI return codes as the guest reads them in x0.
SUCCESS = 0
NOT_SUPPORTED = PsciRet.NOT_SUPPORTED & U64
INVALID_PARAMS = PsciRet.INVALID_PARAMS & U64
ALREADY_ON = PsciRet.ALREADY_ON & U64
INTERNAL_FAILURE = PsciRet.INTERNAL_FAILURE & U64
#: Return codes KVM never gives (spec 6.2).
NEVER = {PsciRet.DENIED & U64, PsciRet.ON_PENDING & U64, PsciRet.NOT_PRESENT & U64,
         PsciRet.DISABLED & U64, PsciRet.INVALID_ADDRESS & U64}

pytestmark = pytest.mark.parametrize("engine", ENGINES)


# -- helpers -------------------------------------------------------------------------

def make_vm(engine, n=2, **kwargs):
    return kw.VM(arch="arm64", nr_vcpus=n, engine=engine, **kwargs)


def call(fn, *args):
    """A PSCI call followed by GUEST_SYNC(x0)."""
    return g.psci(fn, *args) + [g.sync_reg(0)]


def call_all(fn, *args):
    """A PSCI call followed by GUEST_SYNC of x0, x1, x2 and x3."""
    return g.psci(fn, *args) + [g.sync_reg(r) for r in range(4)]


def step(vcpu, **kwargs):
    """KVM_RUN until an exit other than GUEST_SYNC; returns (synced values, that exit)."""
    syncs = []
    for _ in range(1000):
        ex = vcpu.run(**kwargs)
        if ex.reason == ExitReason.MMIO and ex.ucall == "SYNC":
            syncs.append(ex.value)
            continue
        return syncs, ex
    raise AssertionError("no exit but syncs after 1000 KVM_RUNs")


def is_done(ex):
    return ex.reason == ExitReason.MMIO and ex.ucall == "DONE"


def run_done(vcpu, **kwargs):
    """KVM_RUN until GUEST_DONE; returns the synced values."""
    syncs, ex = step(vcpu, **kwargs)
    assert is_done(ex), ex
    return syncs


def set_version(vm, version):
    """KVM_REG_ARM_PSCI_VERSION; for 0.1 the vCPUs are first initialised without the
    PSCI_0_2 feature, which the kernel requires (kvm_arm_set_fw_reg)."""
    if version == PsciVersion.V0_1:
        for v in vm.vcpus:
            v.init(0)
    vm.set_psci_version(version)


def guest_results(engine, ops, n=1, setup=None, **vm_kwargs):
    """Run ``ops`` on vCPU 0 of a fresh VM (others powered off); the synced values."""
    vm = make_vm(engine, n, **vm_kwargs)
    for v in vm.vcpus[1:]:
        v.init(power_off=True)
    if setup is not None:
        setup(vm)
    vm.vcpus[0].load(ops + [g.end()])
    return run_done(vm.vcpus[0])


def loop_program():
    """A guest that keeps running: compute, then WFI woken by its own timer."""
    return [g.loop([g.compute(2_000), g.timer_arm(3_000), g.wfi()])]


def wfi_exits(vcpu):
    return vcpu.stats()["wfi_exit_stat"]


# -- section 13: the upstream selftests -------------------------------------------------

def test_selftest_host_test_cpu_on(engine):
    """13.1: CPU_ON is synchronous, and the owed reset shows through GET_ONE_REG."""
    vm = make_vm(engine, 2)
    source, target = vm.vcpus
    target.set_mp_state(MpState.STOPPED)              # vcpu_power_off(target)
    target_mpidr = mpidr_of(1)
    source.load(call(PsciFn.FN64_CPU_ON, target_mpidr, CPU_ON_ENTRY_ADDR, CPU_ON_CONTEXT_ID)
                + call(PsciFn.FN64_AFFINITY_INFO, target_mpidr, 0) + [g.end()])
    target.load([g.wfi(), g.end()])
    syncs, ex = step(source)
    assert is_done(ex)                                 # UCALL_DONE
    assert syncs[0] == SUCCESS                         # !psci_cpu_on(...)
    assert syncs[1] in (AffinityInfo.ON, AffinityInfo.OFF)
    assert syncs[1] == AffinityInfo.ON                 # first query already ON
    # assert_vcpu_reset(target), without ever running it.
    assert target.outside_run and target.thread_state == "USER"
    assert target.get_reg("pc") == CPU_ON_ENTRY_ADDR
    assert target.get_reg("x0") == CPU_ON_CONTEXT_ID
    assert target.get_mp_state() == MpState.RUNNABLE
    assert target.stats()["wfi_exit_stat"] == 0


def test_selftest_host_test_system_suspend(engine):
    """13.2: with the cap, both PSCI_FEATURES give 0 and SYSTEM_SUSPEND exits SUSPEND."""
    vm = make_vm(engine, 2)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    source, target = vm.vcpus
    target.set_mp_state(MpState.STOPPED)
    source.load(call(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_SUSPEND)
                + call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_SUSPEND)
                + call(PsciFn.FN64_SYSTEM_SUSPEND, CPU_ON_ENTRY_ADDR, CPU_ON_CONTEXT_ID)
                + [g.end()])
    syncs, ex = step(source)
    assert syncs == [0, 0]                             # the GUEST_SYNC(ret) is never reached
    assert ex.reason == ExitReason.SYSTEM_EVENT
    assert ex.system_event.type == SystemEventType.SUSPEND


def test_selftest_host_test_system_off2(engine):
    """13.3: SYSTEM_OFF2's argument checks, its exits and the guest's INTERNAL_FAILURE."""
    vm = make_vm(engine, 2)                             # no SYSTEM_SUSPEND cap
    source, target = vm.vcpus
    target.set_mp_state(MpState.STOPPED)
    source.load(call(PsciFn.PSCI_VERSION)
                + call(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_OFF2)
                + call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_OFF2)
                + call(PsciFn.FN64_SYSTEM_OFF2, PSCI_1_3_OFF_TYPE_HIBERNATE_OFF, 1)
                + call(PsciFn.FN64_SYSTEM_OFF2, PSCI_1_3_OFF_TYPE_HIBERNATE_OFF, 0)
                + call(PsciFn.FN64_SYSTEM_OFF2, 0, 1)
                + call(PsciFn.FN64_SYSTEM_OFF2, 0, 0)
                + [g.end()])
    syncs = []
    nr_shutdowns = 0
    while True:
        s, ex = step(source)
        syncs += s
        if ex.reason != ExitReason.SYSTEM_EVENT:
            break
        ev = ex.system_event
        assert ev.type == SystemEventType.SHUTDOWN
        assert ev.ndata >= 1
        assert ev.data[0] & KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2
        nr_shutdowns += 1
        assert source.get_mp_state() == MpState.STOPPED
        source.set_mp_state(MpState.RUNNABLE)
    assert is_done(ex)
    assert nr_shutdowns == 2
    version, f32, f64, r11, r10, r01, r00 = syncs
    assert version >= PsciVersion.V1_3
    assert f32 & PSCI_1_3_OFF_TYPE_HIBERNATE_OFF and f64 & PSCI_1_3_OFF_TYPE_HIBERNATE_OFF
    assert r11 == INVALID_PARAMS
    assert r10 == INTERNAL_FAILURE
    assert r01 == INVALID_PARAMS
    assert r00 == INTERNAL_FAILURE


# -- PSCI_VERSION, PSCI_FEATURES, MIGRATE_INFO_TYPE, unknown IDs --------------------------

@pytest.mark.parametrize("version,expected", [
    (None, 0x10003), (PsciVersion.V0_2, 0x2), (PsciVersion.V1_0, 0x10000),
    (PsciVersion.V1_1, 0x10001), (PsciVersion.V1_2, 0x10002), (PsciVersion.V1_3, 0x10003)])
def test_psci_version(engine, version, expected):
    def setup(vm):
        if version is not None:
            vm.set_psci_version(version)
    assert guest_results(engine, call_all(PsciFn.PSCI_VERSION), setup=setup) == \
        [expected, 0, 0, 0]


def test_psci_version_register_rejects_unknown_versions(engine):
    vm = make_vm(engine, 1)
    # Non-integers too: 1.0 and True used to select PSCI 0.1 (1.0 == True == 1), and
    # 2.5, "x" or None failed formatting the error message.
    for bad in (0, 3, 0x10004, 0x20000, 0x30001, -1, 1 << 70, 1.0, 2.0, 2.5, True,
                "0x10000", None, [2]):
        with pytest.raises(kw.KvmError) as ei:
            vm.set_psci_version(bad)
        assert ei.value.errno == errno.EINVAL
    # Unchanged: still the latest.
    vm.vcpus[0].load(call(PsciFn.PSCI_VERSION) + [g.end()])
    assert run_done(vm.vcpus[0]) == [PsciVersion.V1_3]


def test_psci_version_register_is_arm64_only(engine):
    vm = kw.VM(arch="x86", nr_vcpus=1, engine=engine)
    with pytest.raises(kw.KvmError) as ei:
        vm.set_psci_version(PsciVersion.V1_0)
    assert ei.value.errno == errno.ENXIO


def test_psci_features(engine):
    always = [PsciFn.PSCI_VERSION, PsciFn.CPU_SUSPEND, PsciFn.FN64_CPU_SUSPEND, PsciFn.CPU_OFF,
              PsciFn.CPU_ON, PsciFn.FN64_CPU_ON, PsciFn.AFFINITY_INFO,
              PsciFn.FN64_AFFINITY_INFO, PsciFn.MIGRATE_INFO_TYPE, PsciFn.SYSTEM_OFF,
              PsciFn.SYSTEM_RESET, PsciFn.PSCI_FEATURES, ARM_SMCCC_VERSION_FUNC_ID,
              PsciFn.SYSTEM_RESET2, PsciFn.FN64_SYSTEM_RESET2]
    never = [PsciFn.MIGRATE, PsciFn.FN64_MIGRATE, PsciFn.MIGRATE_INFO_UP_CPU,
             PsciFn.FN64_MIGRATE_INFO_UP_CPU, PsciFn.CPU_FREEZE, PsciFn.CPU_DEFAULT_SUSPEND,
             PsciFn.FN64_CPU_DEFAULT_SUSPEND, PsciFn.NODE_HW_STATE, PsciFn.FN64_NODE_HW_STATE,
             PsciFn.SET_SUSPEND_MODE, PsciFn.STAT_RESIDENCY, PsciFn.FN64_STAT_RESIDENCY,
             PsciFn.STAT_COUNT, PsciFn.FN64_STAT_COUNT, PsciFn.MEM_PROTECT,
             PsciFn.MEM_PROTECT_CHECK_RANGE, PsciFn.FN64_MEM_PROTECT_CHECK_RANGE,
             PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND,      # no cap
             0x84000016, 0x8400001F, 0xC4000000, 0xC4000002, 0x12345678, 0,
             KVM_PSCI_FN_CPU_ON, 0xFFFFFFFF]
    ops = []
    for f in always + never:
        ops += call(PsciFn.PSCI_FEATURES, f)
    ops += call(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_OFF2)
    ops += call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_OFF2)
    got = guest_results(engine, ops)
    assert got[:len(always)] == [0] * len(always)
    assert got[len(always):len(always) + len(never)] == [NOT_SUPPORTED] * len(never)
    assert got[-2:] == [PSCI_1_3_OFF_TYPE_HIBERNATE_OFF] * 2


def test_psci_features_argument_is_32_bits(engine):
    """PSCI_FEATURES reads arg1 as a u32: high bits of x1 do not matter."""
    got = guest_results(engine, call(PsciFn.PSCI_FEATURES, (0xABCD << 32) | PsciFn.CPU_ON)
                        + call(PsciFn.PSCI_FEATURES, (1 << 63) | PsciFn.MIGRATE))
    assert got == [0, NOT_SUPPORTED]


@pytest.mark.parametrize("version,reset2,off2", [
    (PsciVersion.V1_0, NOT_SUPPORTED, NOT_SUPPORTED),
    (PsciVersion.V1_1, 0, NOT_SUPPORTED),
    (PsciVersion.V1_2, 0, NOT_SUPPORTED),
    (PsciVersion.V1_3, 0, PSCI_1_3_OFF_TYPE_HIBERNATE_OFF)])
def test_psci_features_follow_the_minor_version(engine, version, reset2, off2):
    got = guest_results(engine, call(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_RESET2)
                        + call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_RESET2)
                        + call(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_OFF2)
                        + call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_OFF2)
                        + call(PsciFn.PSCI_FEATURES, PsciFn.CPU_ON),
                        setup=lambda vm: vm.set_psci_version(version))
    assert got == [reset2, reset2, off2, off2, 0]


def test_migrate_info_type_and_unsupported_ids(engine):
    unsupported = [PsciFn.MIGRATE, PsciFn.FN64_MIGRATE, PsciFn.MIGRATE_INFO_UP_CPU,
                   PsciFn.FN64_MIGRATE_INFO_UP_CPU, PsciFn.CPU_FREEZE,
                   PsciFn.CPU_DEFAULT_SUSPEND, PsciFn.NODE_HW_STATE, PsciFn.SET_SUSPEND_MODE,
                   PsciFn.STAT_RESIDENCY, PsciFn.STAT_COUNT, PsciFn.MEM_PROTECT,
                   PsciFn.MEM_PROTECT_CHECK_RANGE, 0x84000016, 0x8400001F, 0xC4000008,
                   0xC4000000, 0x12345678, 0, KVM_PSCI_FN_CPU_OFF, KVM_PSCI_FN_CPU_ON,
                   KVM_PSCI_FN_MIGRATE, 0xFFFFFFFF]
    ops = call_all(PsciFn.MIGRATE_INFO_TYPE, 7, 8, 9)
    for f in unsupported:
        ops += call_all(f, 0x11, 0x22, 0x33)       # smccc_set_retval(val, 0, 0, 0)
    got = guest_results(engine, ops)
    assert got[:4] == [PSCI_0_2_TOS_MP, 0, 0, 0]
    assert got[4:] == [NOT_SUPPORTED, 0, 0, 0] * len(unsupported)


def test_function_id_is_the_low_32_bits_of_x0(engine):
    """smccc_get_function reads x0 as a u32."""
    got = guest_results(engine, call(0xFFFF_FFFF_0000_0000 | PsciFn.PSCI_VERSION)
                        + call((1 << 40) | PsciFn.MIGRATE_INFO_TYPE))
    assert got == [PsciVersion.V1_3, PSCI_0_2_TOS_MP]


# -- CPU_ON (item 8) ---------------------------------------------------------------------

def test_cpu_on_stopped_target_becomes_runnable_at_once(engine):
    vm = make_vm(engine, 3)
    src, t1, t2 = vm.vcpus
    t1.init(power_off=True)
    t2.init(power_off=True)
    entry = vm.code_address(1)
    src.load(call_all(PsciFn.FN64_CPU_ON, mpidr_of(1), entry, 0x1234_5678_9ABC_DEF0)
             + [g.end()])
    t1.load([g.sync(0xBAD), g.sync_reg(0), g.sync_reg(1), g.end()])
    assert run_done(src) == [SUCCESS, 0, 0, 0]
    assert t1.get_mp_state() == MpState.RUNNABLE
    assert t2.get_mp_state() == MpState.STOPPED
    assert t1.get_reg("pc") == entry and t1.get_reg("x0") == 0x1234_5678_9ABC_DEF0
    # The target starts at the entry point, with x0 = context and PSTATE masked.
    assert run_done(t1) == [0x1234_5678_9ABC_DEF0, 0]
    assert t1.irq_state(27)["masked"]


@pytest.mark.parametrize("state", [MpState.RUNNABLE, MpState.SUSPENDED])
def test_cpu_on_to_a_target_not_stopped_is_already_on(engine, state):
    vm = make_vm(engine, 2)
    src, tgt = vm.vcpus
    tgt.set_mp_state(state)
    tgt.set_reg("pc", 0x4000_1000)
    tgt.set_reg("x0", 77)
    src.load(call_all(PsciFn.FN64_CPU_ON, mpidr_of(1), 0xFEEDF00D, 1)
             + call(PsciFn.CPU_ON, mpidr_of(1), 0xFEEDF00D, 1)
             + call(PsciFn.FN64_CPU_ON, mpidr_of(0), 0xFEEDF00D, 1)      # itself
             + [g.end()])
    assert run_done(src) == [ALREADY_ON, 0, 0, 0, ALREADY_ON, ALREADY_ON]
    assert tgt.get_mp_state() == state
    assert tgt.get_reg("pc") == 0x4000_1000 and tgt.get_reg("x0") == 77


@pytest.mark.parametrize("target", [
    mpidr_of(2),                    # no such vCPU (2 vCPUs)
    mpidr_of(15), 0x10, 0xFF,       # Aff0 >= 16 never names a vCPU; beyond nr_vcpus
    0x100, 0x1_0000,                # Aff1 / Aff2 of no vCPU
    1 << 32, 0xFF_0000_0000,        # Aff3: inside the mask, but no vCPU has it
    1 << 24, 0xFF00_0000,           # bits 24-31: outside MPIDR_HWID_BITMASK
    1 << 40, 1 << 63, U64,          # above Aff3
])
def test_cpu_on_bad_mpidr_is_invalid_params(engine, target):
    vm = make_vm(engine, 2)
    src, tgt = vm.vcpus
    tgt.init(power_off=True)
    assert run_done_prog(src, call_all(PsciFn.FN64_CPU_ON, target, 0xFEEDF00D, 5)) == \
        [INVALID_PARAMS, 0, 0, 0]
    assert tgt.get_mp_state() == MpState.STOPPED
    assert tgt.get_reg("x0") == 0


def run_done_prog(vcpu, ops):
    vcpu.load(ops + [g.end()])
    return run_done(vcpu)


def test_cpu_on_32bit_narrows_x1_to_x3(engine):
    """The 32-bit CPU_ON zeroes the top halves of x1..x3 before use; the 64-bit one
    does not, so the same high bits make its MPIDR invalid."""
    vm = make_vm(engine, 2)
    src, tgt = vm.vcpus
    tgt.init(power_off=True)
    entry = vm.code_address(2)
    src.load(call(PsciFn.FN64_CPU_ON, (0xFFFF_FFFF << 32) | mpidr_of(1), entry, 9)
             + call(PsciFn.CPU_ON, (0xFFFF_FFFF << 32) | mpidr_of(1),
                    (0xABCD << 32) | entry, (0x7 << 40) | 0xCAFE)
             + [g.end()])
    assert run_done(src) == [INVALID_PARAMS, SUCCESS]
    assert tgt.get_mp_state() == MpState.RUNNABLE
    assert tgt.get_reg("pc") == entry
    assert tgt.get_reg("x0") == 0xCAFE


def test_cpu_on_does_not_check_the_entry_address(engine):
    """The entry is not checked: a non-code PC gives INTERNAL_ERROR when the target runs."""
    vm = make_vm(engine, 2)
    src, tgt = vm.vcpus
    tgt.init(power_off=True)
    src.load(call(PsciFn.FN64_CPU_ON, mpidr_of(1), 0x10, 3) + [g.end()])
    tgt.load([g.sync(1), g.end()])
    assert run_done(src) == [SUCCESS]
    assert tgt.get_reg("pc") == 0x10
    assert tgt.run().reason == ExitReason.INTERNAL_ERROR


def test_cpu_on_wakes_a_target_sleeping_in_kvm_run(engine):
    """CPU_OFF makes the caller sleep inside KVM_RUN; a CPU_ON from another vCPU wakes
    it at the new entry with x0 = context and PSTATE masked."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    entry = vm.code_address(5 + 2)        # psci (5 ops), sync(0xBAD), end, then the label
    v1.load(g.psci(PsciFn.CPU_OFF) + [g.sync(0xBAD), g.end(),
                                      g.sync_reg(0), g.sync_reg(1), g.end()])
    v0.load([g.compute(50_000)] + call(PsciFn.FN64_CPU_ON, mpidr_of(1), entry, 0xC0FFEE)
            + call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(1), 0) + [g.end()])
    vm.run(10_000)                         # both enter KVM_RUN; v1 powers itself off
    assert v1.get_mp_state() == MpState.STOPPED
    assert v1.thread_state == "BLOCKED"     # kvm_vcpu_sleep, still inside KVM_RUN
    # v1's run() waits until v0's CPU_ON wakes it.
    assert run_done(v1) == [0xC0FFEE, 0]
    assert v1.irq_state(27)["masked"]
    assert v1.get_mp_state() == MpState.RUNNABLE
    # v0's exits were held for its own run().
    assert run_done(v0) == [SUCCESS, AffinityInfo.ON]


def test_cpu_off_then_runnable_continues_after_the_hvc(engine):
    """CPU_OFF: STOPPED, x0 = SUCCESS; KVM_RUN sleeps (a signal gives INTR) until
    userspace writes RUNNABLE, then the guest goes on after the HVC."""
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    v.load(g.psci(PsciFn.CPU_OFF, 1, 2, 3) + [g.sync_reg(0), g.sync_reg(1), g.end()])
    t0 = vm.host.now
    ex = v.run(timeout_ns=200_000)
    assert ex.reason == ExitReason.INTR
    assert ex.time_ns >= t0 + 200_000
    assert v.get_mp_state() == MpState.STOPPED
    assert v.get_reg("x0") == SUCCESS
    assert v.get_reg("pc") == vm.code_address(5)
    assert v.run(timeout_ns=50_000).reason == ExitReason.INTR      # still asleep
    assert v.get_mp_state() == MpState.STOPPED
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [SUCCESS, 0]


# -- AFFINITY_INFO (item 9) -----------------------------------------------------------------

def test_affinity_info_levels(engine):
    """18 vCPUs: 0-15 share Aff1 = 0, 16 and 17 have Aff1 = 1."""
    vm = make_vm(engine, 18)
    v0 = vm.vcpus[0]
    for v in vm.vcpus[1:]:
        v.set_mp_state(MpState.STOPPED)
    vm.vcpus[3].set_mp_state(MpState.SUSPENDED)
    ops = []
    cases = [
        ((mpidr_of(1), 0), AffinityInfo.OFF),
        ((mpidr_of(3), 0), AffinityInfo.ON),             # SUSPENDED counts as ON
        ((mpidr_of(0), 0), AffinityInfo.ON),             # the caller
        ((mpidr_of(16), 0), AffinityInfo.OFF),
        ((mpidr_of(16), 1), AffinityInfo.OFF),           # 16 and 17 both off
        ((mpidr_of(17), 1), AffinityInfo.OFF),
        ((mpidr_of(5), 1), AffinityInfo.ON),             # the Aff1 = 0 group holds vCPU 0
        ((mpidr_of(16), 2), AffinityInfo.ON),            # Aff2 = 0: everyone
        ((mpidr_of(16), 3), AffinityInfo.ON),
        ((0x10, 0), INVALID_PARAMS),                     # Aff0 16: nobody
        ((mpidr_of(18), 0), INVALID_PARAMS),             # no such vCPU
        ((0x200, 1), INVALID_PARAMS),                    # Aff1 = 2: nobody
        ((0x1_0000, 2), INVALID_PARAMS),                 # Aff2 = 1: nobody
        ((1 << 32, 3), INVALID_PARAMS),                  # Aff3 = 1: nobody
        ((1 << 32, 2), INVALID_PARAMS),                  # level 2 still matches Aff3
        ((mpidr_of(1), 4), INVALID_PARAMS),              # level > 3
        ((mpidr_of(1), 0xFFFF_FFFF), INVALID_PARAMS),
        ((mpidr_of(1), U64), INVALID_PARAMS),
        ((1 << 24, 0), INVALID_PARAMS),                  # bits outside the mask
        ((1 << 40, 3), INVALID_PARAMS),
    ]
    for args, _ in cases:
        ops += call_all(PsciFn.FN64_AFFINITY_INFO, *args)
    v0.load(ops + [g.end()])
    got = run_done(v0)
    for i, (args, want) in enumerate(cases):
        assert got[4 * i:4 * i + 4] == [want & U64, 0, 0, 0], (args, got[4 * i])
    assert AffinityInfo.ON_PENDING not in got[::4]
    # Switch vCPU 17 on: the Aff1 = 1 group is ON, vCPU 16 alone still OFF.
    vm.vcpus[17].set_mp_state(MpState.RUNNABLE)
    v0.load(call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(16), 1)
            + call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(16), 0) + [g.end()])
    assert run_done(v0) == [AffinityInfo.ON, AffinityInfo.OFF]


def test_affinity_info_32bit_narrows_x1_and_x2(engine):
    vm = make_vm(engine, 2)
    vm.vcpus[1].init(power_off=True)
    v0 = vm.vcpus[0]
    v0.load(call(PsciFn.AFFINITY_INFO, (0xFFFF_FFFF << 32) | mpidr_of(1), 1 << 32)
            + call(PsciFn.FN64_AFFINITY_INFO, (0xFFFF_FFFF << 32) | mpidr_of(1), 0)
            + call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(1), 1 << 32) + [g.end()])
    assert run_done(v0) == [AffinityInfo.OFF, INVALID_PARAMS, INVALID_PARAMS]


def test_affinity_info_never_on_pending(engine):
    """A CPU_ON'd target is ON at once (not ON_PENDING), before it ever runs."""
    vm = make_vm(engine, 4)
    for v in vm.vcpus[1:]:
        v.init(power_off=True)
    ops = []
    for i in (1, 2, 3):
        ops += call(PsciFn.FN64_CPU_ON, mpidr_of(i), 0xFEEDF00D, i)
        ops += call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(i), 0)
    vm.vcpus[0].load(ops + [g.end()])
    assert run_done(vm.vcpus[0]) == [SUCCESS, AffinityInfo.ON] * 3


# -- SYSTEM_SUSPEND (items 3, 4) -----------------------------------------------------------------

@pytest.mark.parametrize("fn", [PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND])
def test_system_suspend_without_the_cap_is_not_supported(engine, fn):
    vm = make_vm(engine, 2)
    vm.vcpus[1].init(power_off=True)
    v0 = vm.vcpus[0]
    v0.load(call(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_SUSPEND)
            + call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_SUSPEND)
            + call_all(fn, vm.code_address(0), 0xC0DE, 0x33) + [g.end()])
    assert run_done(v0) == [NOT_SUPPORTED, NOT_SUPPORTED, NOT_SUPPORTED, 0, 0, 0]
    assert v0.get_mp_state() == MpState.RUNNABLE


def test_system_suspend_cap_can_be_enabled_after_running(engine):
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    v.load(call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_SUSPEND)
           + call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1) + [g.end()])
    assert run_done(v) == [NOT_SUPPORTED, NOT_SUPPORTED]
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)          # idempotent
    v.load(call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_SUSPEND)
           + call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1) + [g.end()])
    syncs, ex = step(v)
    assert syncs == [0]
    assert ex.system_event.type == SystemEventType.SUSPEND


@pytest.mark.parametrize("version", [PsciVersion.V0_1, PsciVersion.V0_2])
def test_system_suspend_is_unknown_before_psci_1_0(engine, version):
    vm = make_vm(engine, 1)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    set_version(vm, version)
    v = vm.vcpus[0]
    v.load(call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1)
           + call(PsciFn.SYSTEM_SUSPEND, vm.code_address(0), 1)
           + call(PsciFn.PSCI_FEATURES, PsciFn.FN64_SYSTEM_SUSPEND) + [g.end()])
    assert run_done(v) == [NOT_SUPPORTED] * 3


def test_system_suspend_with_the_cap_exits_with_registers_untouched(engine):
    vm = make_vm(engine, 4)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    v0, runner, stopped, suspended = vm.vcpus
    stopped.init(power_off=True)
    runner.load(loop_program())
    stopped.load(loop_program())
    suspended.set_mp_state(MpState.SUSPENDED)
    suspended.load(loop_program())
    entry, ctx = vm.code_address(1), 0x1111_2222_3333_4444
    prog = [g.compute(30_000)] + g.psci(PsciFn.FN64_SYSTEM_SUSPEND, entry, ctx, 0x55)
    hvc_index = len(prog) - 1
    v0.load(prog + [g.sync_reg(0), g.sync_reg(1), g.sync_reg(2), g.end()])
    vm.run(1_000)                                   # every loaded vCPU enters KVM_RUN
    syncs, ex = step(v0)
    assert syncs == []
    assert ex.reason == ExitReason.SYSTEM_EVENT
    ev = ex.system_event
    assert ev.type == SystemEventType.SUSPEND and ev.ndata == 0 and ev.data == ()
    # KVM changed nothing: the SMCCC arguments are there for userspace to read.
    assert v0.get_reg("x0") == PsciFn.FN64_SYSTEM_SUSPEND
    assert v0.get_reg("x1") == entry
    assert v0.get_reg("x2") == ctx
    assert v0.get_reg("x3") == 0x55
    assert v0.get_reg("pc") == vm.code_address(hvc_index + 1)
    assert v0.get_mp_state() == MpState.RUNNABLE
    # The other vCPUs keep their MP state; the running one keeps running.
    assert runner.get_mp_state() == MpState.RUNNABLE
    assert stopped.get_mp_state() == MpState.STOPPED
    assert suspended.get_mp_state() == MpState.SUSPENDED
    before = wfi_exits(runner)
    assert before > 0
    vm.run(vm.host.now + 200_000)
    assert wfi_exits(runner) > before
    assert runner.thread_state != "USER"
    assert wfi_exits(stopped) == 0 and wfi_exits(suspended) == 0
    # KVM never answers DENIED itself: re-entering as is, the guest sees x0 untouched.
    assert run_done(v0) == [PsciFn.FN64_SYSTEM_SUSPEND, entry, ctx]


def test_system_suspend_32bit_narrows_x1_x2(engine):
    vm = make_vm(engine, 1)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    v = vm.vcpus[0]
    hi = 0xDEAD_BEEF << 32
    v.load(g.psci(PsciFn.SYSTEM_SUSPEND, hi | 0x4000_0010, hi | 0x1234, hi | 7)
           + [g.sync_reg(0), g.sync_reg(1), g.sync_reg(2), g.sync_reg(3), g.end()])
    syncs, ex = step(v)
    assert syncs == [] and ex.system_event.type == SystemEventType.SUSPEND
    assert ex.system_event.ndata == 0
    assert [v.get_reg(r) for r in ("x0", "x1", "x2", "x3")] == \
        [PsciFn.SYSTEM_SUSPEND, 0x4000_0010, 0x1234, 7]
    # The 64-bit call keeps them whole.
    v.load(g.psci(PsciFn.FN64_SYSTEM_SUSPEND, hi | 0x4000_0010, hi | 0x1234) + [g.end()])
    syncs, ex = step(v)
    assert ex.system_event.type == SystemEventType.SUSPEND
    assert v.get_reg("x1") == hi | 0x4000_0010 and v.get_reg("x2") == hi | 0x1234


def test_system_suspend_denied_by_userspace(engine):
    """The VMM's denial is a register write; the guest sees it in x0."""
    vm = make_vm(engine, 1)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    v = vm.vcpus[0]
    v.load(call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1) + [g.end()])
    syncs, ex = step(v)
    assert ex.system_event.type == SystemEventType.SUSPEND
    v.set_reg("x0", PsciRet.DENIED & U64)
    assert run_done(v) == [PsciRet.DENIED & U64]


# -- CPU_SUSPEND -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [PsciFn.CPU_SUSPEND, PsciFn.FN64_CPU_SUSPEND])
def test_cpu_suspend_halts_like_wfi_then_returns_success(engine, fn):
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    # The first call blocks (no poll window yet) until the timer; the window then
    # grows and the second, woken 4 us in, is a successful poll.
    v.load([g.timer_arm(100_000)] + g.psci(fn, 0x1_0000, 0x4000_0000, 5)
           + [g.sync_reg(0), g.sync_reg(1), g.sync_reg(2), g.sync_reg(3)]
           + [g.timer_arm(4_000)] + call(fn, 0, 0, 0) + [g.end()])
    t0 = vm.host.now
    syncs, ex = step(v)
    assert is_done(ex)
    assert syncs == [SUCCESS, 0, 0, 0, SUCCESS]
    assert ex.time_ns >= t0 + 100_000
    st = v.stats()
    assert st["wfi_exit_stat"] == 0              # an HVC, not a trapped WFI
    assert st["halt_wakeup"] >= 1
    assert st["halt_attempted_poll"] == 1 and st["halt_successful_poll"] == 1
    assert v.get_mp_state() == MpState.RUNNABLE


def test_cpu_suspend_interrupted_by_a_signal(engine):
    """A signal ends the halt: CPU_SUSPEND has returned SUCCESS, KVM_RUN gives INTR."""
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    v.load(g.psci(PsciFn.CPU_SUSPEND, 0, 0, 0) + [g.sync_reg(0), g.end()])
    ex = v.run(timeout_ns=300_000)
    assert ex.reason == ExitReason.INTR
    assert v.get_reg("x0") == SUCCESS
    assert v.get_reg("pc") == vm.code_address(5)
    assert run_done(v) == [SUCCESS]


# -- SYSTEM_OFF / RESET / RESET2 / OFF2 (items 10, 11) ---------------------------------------

SYSTEM_EVENTS = [
    # (fn, args, type, data0, x1..x3 zeroed)
    (PsciFn.SYSTEM_OFF, (0x11, 0x22, 0x33), SystemEventType.SHUTDOWN, 0, True),
    (PsciFn.SYSTEM_RESET, (0x11, 0x22, 0x33), SystemEventType.RESET, 0, True),
    (PsciFn.FN64_SYSTEM_RESET2, (0, 0x22, 0x33), SystemEventType.RESET,
     KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2, False),
    (PsciFn.SYSTEM_RESET2, (0x8000_0000, 0x22, 0x33), SystemEventType.RESET,
     KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2, False),
    (PsciFn.FN64_SYSTEM_RESET2, (0xFFFF_FFFF, 0x22, 0x33), SystemEventType.RESET,
     KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2, False),
    (PsciFn.FN64_SYSTEM_RESET2, (1 << 32, 0x22, 0x33), SystemEventType.RESET,   # u32 arg 0
     KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2, False),
    (PsciFn.FN64_SYSTEM_OFF2, (PSCI_1_3_OFF_TYPE_HIBERNATE_OFF, 0, 0x33),
     SystemEventType.SHUTDOWN, KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2, True),
    (PsciFn.SYSTEM_OFF2, (0, 1 << 32, 0x33), SystemEventType.SHUTDOWN,        # narrowed x2
     KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2, True),
    (PsciFn.FN64_SYSTEM_OFF2, ((1 << 32) | 1, 0, 0), SystemEventType.SHUTDOWN,  # u32 arg 1
     KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2, True),
]


@pytest.mark.parametrize("fn,args,type_,data0,zeroed", SYSTEM_EVENTS,
                         ids=[f"{e[0].name}-{e[1][0]:#x}" for e in SYSTEM_EVENTS])
def test_system_event_stops_every_vcpu(engine, fn, args, type_, data0, zeroed):
    vm = make_vm(engine, 3)
    v0, other, off = vm.vcpus
    off.init(power_off=True)
    other.load(loop_program())
    prog = [g.compute(40_000)] + g.psci(fn, *args)
    v0.load(prog + [g.sync_reg(0), g.sync_reg(1), g.sync_reg(2), g.sync_reg(3), g.end()])
    vm.run(1_000)
    syncs, ex = step(v0)
    assert syncs == []
    assert ex.reason == ExitReason.SYSTEM_EVENT
    ev = ex.system_event
    assert (ev.type, ev.ndata, ev.data) == (type_, 1, (data0,))
    assert ev.flags == data0
    for v in vm.vcpus:
        assert v.get_mp_state() == MpState.STOPPED
    # The vCPU that was looping never runs guest code again; it sleeps in KVM_RUN.
    n = wfi_exits(other)
    assert n > 0
    vm.run(vm.host.now + 500_000)
    assert wfi_exits(other) == n
    assert other.thread_state == "BLOCKED"
    assert other.get_mp_state() == MpState.STOPPED
    # Its run() sleeps until signalled: INTR, still STOPPED.
    ex = other.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.INTR
    assert other.get_mp_state() == MpState.STOPPED and wfi_exits(other) == n
    # The caller, set RUNNABLE and re-entered, sees INTERNAL_FAILURE (-6 as u64).
    assert v0.run(timeout_ns=100_000).reason == ExitReason.INTR
    assert v0.get_mp_state() == MpState.STOPPED
    v0.set_mp_state(MpState.RUNNABLE)
    rest = [0, 0, 0] if zeroed else [args[0] & (0xFFFF_FFFF if fn == PsciFn.SYSTEM_RESET2
                                                 else U64), args[1], args[2]]
    assert run_done(v0) == [INTERNAL_FAILURE] + rest
    assert off.get_mp_state() == MpState.STOPPED and other.get_mp_state() == MpState.STOPPED


@pytest.mark.parametrize("fn,args", [
    (PsciFn.FN64_SYSTEM_RESET2, (1,)),
    (PsciFn.FN64_SYSTEM_RESET2, (0x7FFF_FFFF,)),
    (PsciFn.SYSTEM_RESET2, (0x1234,)),
    (PsciFn.SYSTEM_RESET2, ((0x8000_0000 << 32) | 5,)),     # narrowed: 5
    (PsciFn.FN64_SYSTEM_OFF2, (2, 0)),
    (PsciFn.FN64_SYSTEM_OFF2, (0xFFFF_FFFF, 0)),
    (PsciFn.FN64_SYSTEM_OFF2, (0, 1)),
    (PsciFn.FN64_SYSTEM_OFF2, (1, 1 << 32)),                 # arg2 is not narrowed
    (PsciFn.FN64_SYSTEM_OFF2, (1, U64)),
    (PsciFn.SYSTEM_OFF2, (1, 0xFFFF_FFFF)),
])
def test_invalid_reset2_and_off2_arguments(engine, fn, args):
    vm = make_vm(engine, 2)
    other = vm.vcpus[1]
    other.set_mp_state(MpState.RUNNABLE)
    got = run_done_prog(vm.vcpus[0], call_all(fn, *args))
    assert got == [INVALID_PARAMS, 0, 0, 0]
    for v in vm.vcpus:
        assert v.get_mp_state() == MpState.RUNNABLE


@pytest.mark.parametrize("version,fn,args", [
    (PsciVersion.V1_0, PsciFn.FN64_SYSTEM_RESET2, (0,)),
    (PsciVersion.V1_0, PsciFn.SYSTEM_RESET2, (0x8000_0000,)),
    (PsciVersion.V0_2, PsciFn.FN64_SYSTEM_RESET2, (0,)),
    (PsciVersion.V1_1, PsciFn.FN64_SYSTEM_OFF2, (0, 0)),
    (PsciVersion.V1_2, PsciFn.SYSTEM_OFF2, (1, 0)),
    (PsciVersion.V0_2, PsciFn.FN64_SYSTEM_OFF2, (0, 0)),
    (PsciVersion.V0_2, PsciFn.PSCI_FEATURES, (PsciFn.CPU_ON,)),
])
def test_functions_newer_than_the_version_are_not_supported(engine, version, fn, args):
    got = guest_results(engine, call_all(fn, *args), n=2,
                        setup=lambda vm: vm.set_psci_version(version))
    assert got == [NOT_SUPPORTED, 0, 0, 0]


def test_reset2_keeps_x1_to_x3(engine):
    """SYSTEM_RESET2 writes only x0 (spec 4.1): the guest sees its arguments again."""
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    v.load(call_all(PsciFn.FN64_SYSTEM_RESET2, 0x8000_0001, 0xAAAA_BBBB_CCCC_DDDD, 0x99)
           + [g.end()])
    syncs, ex = step(v)
    assert ex.system_event.type == SystemEventType.RESET
    assert v.get_reg("x0") == INTERNAL_FAILURE
    assert v.get_reg("x2") == 0xAAAA_BBBB_CCCC_DDDD
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [INTERNAL_FAILURE, 0x8000_0001, 0xAAAA_BBBB_CCCC_DDDD, 0x99]


def test_system_off_from_a_vcpu_while_another_is_blocked_in_wfi(engine):
    """KVM_REQ_SLEEP does not wake a vCPU blocked in WFI.  Once STOPPED it is not
    runnable (kvm_arch_vcpu_runnable needs !STOPPED), so an interrupt wakes its task
    (halt_wakeup) but does not end the halt; a signal does, and then it sleeps.
    Regression: the engines ended the halt on any pending interrupt."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    vm.enable_cap(Cap.HALT_POLL, 0)
    v1.load([g.wfi(), g.sync(0xBAD), g.end()])       # no wake source
    v0.load([g.compute(20_000)] + g.psci(PsciFn.SYSTEM_OFF) + [g.end()])
    vm.run(1_000)
    syncs, ex = step(v0)
    assert ex.system_event.type == SystemEventType.SHUTDOWN
    assert v1.get_mp_state() == MpState.STOPPED
    vm.run(vm.host.now + 50_000)
    assert v1.thread_state == "BLOCKED" and v1.stats()["blocking"] == 1
    halts = vm.host.halts
    # The reschedule IPI: pending, but a STOPPED vCPU is not runnable.
    v1.raise_wake()
    vm.run(vm.host.now + 50_000)
    assert not v1.runnable
    assert v1.thread_state == "BLOCKED" and v1.stats()["blocking"] == 1
    assert vm.host.halts == halts                     # the halt did not end
    assert v1.stats()["halt_wakeup"] == 1             # but its task was woken
    ex = v1.run(timeout_ns=50_000)                    # a signal ends it: INTR
    assert ex.reason == ExitReason.INTR
    assert vm.host.halts == halts + 1
    assert v1.get_mp_state() == MpState.STOPPED
    ex = v1.run(timeout_ns=50_000)                    # now it sleeps (no halt)
    assert ex.reason == ExitReason.INTR and vm.host.halts == halts + 1


def test_cpu_on_of_a_vcpu_stopped_inside_wfi(engine):
    """SYSTEM_OFF leaves v1 blocked in WFI; v0 is made RUNNABLE again and CPU_ONs it.
    The wake-up alone does not end v1's halt (nothing pending); the interrupt it then
    gets does, and v1 starts at the CPU_ON entry point."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    vm.enable_cap(Cap.HALT_POLL, 0)
    vm.configure_irq(40, enabled=True)
    vm.route_spi(40, vcpu=1)
    v1.load([g.wfi(), g.sync(0xBAD), g.end(), g.sync_reg(0), g.end()])
    v0.load(g.psci(PsciFn.SYSTEM_OFF)
            + call(PsciFn.FN64_CPU_ON, mpidr_of(1), vm.code_address(3), 0xAB) + [g.end()])
    vm.run(1_000)
    syncs, ex = step(v0)
    assert ex.system_event.type == SystemEventType.SHUTDOWN
    v0.set_mp_state(MpState.RUNNABLE)
    assert run_done(v0) == [SUCCESS]
    assert v1.get_mp_state() == MpState.RUNNABLE
    halts = vm.host.halts
    vm.run(vm.host.now + 50_000)
    assert v1.thread_state == "BLOCKED" and vm.host.halts == halts
    vm.irq_line(40, 1)
    assert run_done(v1) == [0xAB]


def test_system_event_then_cpu_on_restarts_a_vcpu(engine):
    """After a SHUTDOWN exit every vCPU is STOPPED; CPU_ON works on them again."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.load([g.sync_reg(0), g.end()])
    v0.load(g.psci(PsciFn.SYSTEM_OFF) + call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(1), 0)
            + call(PsciFn.FN64_CPU_ON, mpidr_of(1), vm.code_address(0), 0x5A5A)
            + call(PsciFn.FN64_AFFINITY_INFO, mpidr_of(1), 0) + [g.end()])
    syncs, ex = step(v0)
    assert ex.system_event.type == SystemEventType.SHUTDOWN
    v0.set_mp_state(MpState.RUNNABLE)
    assert run_done(v0) == [AffinityInfo.OFF, SUCCESS, AffinityInfo.ON]
    assert run_done(v1) == [0x5A5A]


# -- PSCI 0.1 -------------------------------------------------------------------------------

def test_psci_0_1_private_ids(engine):
    vm = make_vm(engine, 3)
    set_version(vm, PsciVersion.V0_1)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    v0, v1, v2 = vm.vcpus
    v1.init(0, power_off=True)
    entry = vm.code_address(0)
    v1.load([g.sync_reg(0)] + g.psci(KVM_PSCI_FN_CPU_OFF) + [g.sync(0x0FF), g.end()])
    ops = (call_all(KVM_PSCI_FN_CPU_ON, mpidr_of(1), entry, 0x77)          # SUCCESS
           + call(KVM_PSCI_FN_CPU_ON, mpidr_of(2), entry, 1)              # RUNNABLE: -2
           + call(KVM_PSCI_FN_CPU_ON, mpidr_of(0), entry, 1)              # itself: -2
           + call(KVM_PSCI_FN_CPU_ON, (1 << 32) | mpidr_of(1), entry, 1)  # no narrowing: -2
           + call(KVM_PSCI_FN_CPU_ON, mpidr_of(5), entry, 1)              # nobody: -2
           + call(KVM_PSCI_FN_CPU_SUSPEND, 0, 0, 0)                       # not implemented
           + call(KVM_PSCI_FN_MIGRATE, 0, 0, 0)
           # Every PSCI 0.2+ ID is unknown to 0.1.
           + call(PsciFn.PSCI_VERSION) + call(PsciFn.FN64_CPU_ON, mpidr_of(2), entry, 1)
           + call(PsciFn.CPU_ON, mpidr_of(2), entry, 1) + call(PsciFn.CPU_OFF)
           + call(PsciFn.AFFINITY_INFO, mpidr_of(1), 0) + call(PsciFn.MIGRATE_INFO_TYPE)
           + call(PsciFn.SYSTEM_OFF) + call(PsciFn.SYSTEM_RESET)
           + call(PsciFn.CPU_SUSPEND, 0, 0, 0) + call(PsciFn.PSCI_FEATURES, PsciFn.CPU_ON)
           + call(PsciFn.FN64_SYSTEM_SUSPEND, entry, 1) + call(PsciFn.FN64_SYSTEM_OFF2, 0, 0)
           + [g.end()])
    v0.load(ops)
    got = run_done(v0)
    assert got[:4] == [SUCCESS, 0, 0, 0]
    assert got[4:8] == [INVALID_PARAMS] * 4
    assert got[8:] == [NOT_SUPPORTED] * (len(got) - 8)
    assert all(v.get_mp_state() != MpState.STOPPED for v in (v0, v2))
    # The target started at the entry with x0 = context; its 0.1 CPU_OFF stops it.
    assert v1.get_mp_state() == MpState.RUNNABLE
    syncs, ex = step(v1, timeout_ns=100_000)
    assert syncs == [0x77] and ex.reason == ExitReason.INTR
    assert v1.get_mp_state() == MpState.STOPPED
    assert v1.get_reg("x0") == SUCCESS


def test_never_returns_codes_kvm_does_not_use(engine):
    """Over a sweep of calls and arguments x0 is never DENIED, ON_PENDING, NOT_PRESENT,
    DISABLED or INVALID_ADDRESS (nor AFFINITY_INFO's ON_PENDING)."""
    vm = make_vm(engine, 3)
    vm.vcpus[2].init(power_off=True)
    vm.vcpus[1].set_mp_state(MpState.SUSPENDED)
    ops = []
    for fn in (PsciFn.CPU_ON, PsciFn.FN64_CPU_ON, PsciFn.AFFINITY_INFO,
               PsciFn.FN64_AFFINITY_INFO, PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND,
               PsciFn.MIGRATE, PsciFn.CPU_FREEZE):
        for a1 in (0, 1, mpidr_of(2), 0x100, 1 << 24, U64):
            for a2 in (0, 5, U64):
                ops += call(fn, a1, a2, 0x1000)
    for a1 in (1, 2, 0x7FFF_FFFF):
        ops += call(PsciFn.FN64_SYSTEM_RESET2, a1, 0)
        ops += call(PsciFn.FN64_SYSTEM_OFF2, a1 + 1, 0)
        ops += call(PsciFn.FN64_SYSTEM_OFF2, 0, a1)
    vm.vcpus[0].load(ops + [g.end()])
    got = run_done(vm.vcpus[0])
    assert len(got) == 8 * 18 + 9
    assert not NEVER & set(got)
    assert AffinityInfo.ON_PENDING not in got
    assert vm.vcpus[2].get_mp_state() == MpState.RUNNABLE      # CPU_ON'd by mpidr_of(2)
    assert vm.vcpus[1].get_mp_state() == MpState.SUSPENDED


@pytest.mark.parametrize("version", [PsciVersion.V0_2, PsciVersion.V1_0, PsciVersion.V1_1])
def test_older_versions_keep_off_reset_and_suspend(engine, version):
    """SYSTEM_OFF / SYSTEM_RESET exist from 0.2 on; SYSTEM_SUSPEND (with the cap) from
    1.0 on."""
    vm = make_vm(engine, 1)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    vm.set_psci_version(version)
    v = vm.vcpus[0]
    v.load(g.psci(PsciFn.SYSTEM_OFF) + [g.sync_reg(0)] + g.psci(PsciFn.SYSTEM_RESET)
           + [g.sync_reg(0)] + call(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 1)
           + [g.end()])
    got = []
    for type_ in (SystemEventType.SHUTDOWN, SystemEventType.RESET):
        syncs, ex = step(v)
        got += syncs
        assert ex.system_event.type == type_
        assert (ex.system_event.ndata, ex.system_event.data) == (1, (0,))
        v.set_mp_state(MpState.RUNNABLE)
    syncs, ex = step(v)
    got += syncs
    if version == PsciVersion.V0_2:
        assert got == [INTERNAL_FAILURE, INTERNAL_FAILURE, NOT_SUPPORTED] and is_done(ex)
    else:
        assert got == [INTERNAL_FAILURE, INTERNAL_FAILURE]
        assert ex.system_event.type == SystemEventType.SUSPEND
        assert ex.system_event.ndata == 0


# -- both engines, same answers ------------------------------------------------------------

_FUZZ_FNS = [PsciFn.CPU_ON, PsciFn.FN64_CPU_ON, PsciFn.CPU_OFF, PsciFn.CPU_SUSPEND,
             PsciFn.FN64_SYSTEM_SUSPEND, PsciFn.SYSTEM_SUSPEND, PsciFn.AFFINITY_INFO,
             PsciFn.SYSTEM_OFF, PsciFn.SYSTEM_RESET, PsciFn.FN64_SYSTEM_RESET2,
             PsciFn.FN64_SYSTEM_OFF2, PsciFn.PSCI_FEATURES, PsciFn.MIGRATE,
             KVM_PSCI_FN_CPU_ON, KVM_PSCI_FN_CPU_OFF]


def _random_session(engine, seed):
    """A random VM of 1-4 vCPUs with random PSCI programs, driven through a random
    sequence of KVM_RUNs (with watchdogs), signals, MP-state writes, line changes and
    vm.run slices; returns everything userspace could observe."""
    import random
    rnd = random.Random(seed)
    n = rnd.randint(1, 4)
    vm = kw.VM(arch="arm64", nr_vcpus=n, engine=engine, seed=seed)
    if rnd.random() < 0.7:
        vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    if rnd.random() < 0.3:
        set_version(vm, rnd.choice(list(PsciVersion)))
    if rnd.random() < 0.5:
        vm.enable_cap(Cap.HALT_POLL, rnd.choice([0, 5_000, 100_000]))
    for intid in (40, 41):
        vm.configure_irq(intid, enabled=True)
        vm.route_spi(intid, vcpu=rnd.randrange(n))
    vm.add_irq_source(40, period_ns=rnd.choice([30_000, 70_000, 200_000]))
    for v in vm.vcpus:
        v.set_mp_state(rnd.choice([0, 0, 5, 10]))
        ops = []
        for _ in range(rnd.randint(1, 10)):
            r = rnd.random()
            if r < 0.15:
                ops.append(g.compute(rnd.randint(1, 50_000)))
            elif r < 0.3:
                ops += [g.timer_arm(rnd.randint(1, 40_000)), g.wfi()]
            else:
                args = [rnd.choice([0, 1, mpidr_of(rnd.randrange(5)),
                                    vm.code_address(rnd.randrange(40)), 1 << 32, U64])
                        for _ in range(3)]
                ops += g.psci(rnd.choice(_FUZZ_FNS), *args)
            ops.append(g.sync_reg(rnd.randrange(4)))
        v.load(ops + [g.end()])
    out = []
    for _ in range(30):
        v = rnd.choice(vm.vcpus)
        r = rnd.random()
        try:
            if r < 0.5:
                ex = v.run(timeout_ns=rnd.choice([10_000, 100_000, 1_000_000]))
                out.append((v.id, repr(ex), ex.value))
            elif r < 0.6:
                v.signal()
            elif r < 0.75:
                v.set_mp_state(rnd.choice([0, 5, 10]))
            elif r < 0.8:
                vm.irq_line(41, rnd.randrange(2))
            elif r < 0.9:
                vm.run(vm.host.now + rnd.randint(1, 100_000))
            else:
                out.append((v.get_reg("x0"), v.get_reg("pc")))
        except kw.KvmError as e:
            out.append(("err", v.id, e.errno))
        out.append((vm.host.now, [int(x.get_mp_state()) for x in vm.vcpus],
                    [x.thread_state for x in vm.vcpus]))
    out.append([sorted((k, int(np_sum)) for k, np_sum in
                       ((k, val if isinstance(val, int) else val.sum())
                        for k, val in x.stats().items())) for x in vm.vcpus])
    out.append((vm.host.events, vm.host.halts))
    return out


def test_engines_agree_on_random_psci_sessions(engine):
    seeds = range(0, 40) if engine == "core" else range(40, 80)
    for seed in seeds:
        assert _random_session("core", seed) == _random_session("reference", seed), seed
