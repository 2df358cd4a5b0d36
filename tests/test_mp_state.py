"""MP state, vCPU ioctls, capabilities and halt-poll parameters (spec sections 2, 3, 5, 8.1
and 15 items 1, 2, 5, 6, 13), with the kernel's errors for bad input.
"""

import errno

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake import haltpoll
from kvmwake.model import mpidr_of
from kvmwake.uapi import (
    KVM_HALT_POLL_NS_DEFAULT, Cap, ExitReason, KvmReg, MpState, PsciFn, SystemEventType,
)

ENGINES = ("core", "reference")
UINT_MAX = 0xFFFF_FFFF

ARM64_OK = {0, 5, 10}
X86_OK = {0, 1, 2, 3, 4, 9}


def make_vm(engine, n=1, arch="arm64", **kwargs):
    return kw.VM(arch=arch, nr_vcpus=n, engine=engine, **kwargs)


def kvm_error(errnum, fn, *args, **kwargs):
    with pytest.raises(kw.KvmError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == errnum, ei.value
    return ei.value


def run_done(vcpu, **kwargs):
    syncs = []
    while True:
        ex = vcpu.run(**kwargs)
        if ex.reason == ExitReason.MMIO and ex.ucall == "SYNC":
            syncs.append(ex.value)
            continue
        assert ex.reason == ExitReason.MMIO and ex.ucall == "DONE", ex
        return syncs


# -- item 1: constants ------------------------------------------------------------------

def test_uapi_constants():
    assert ExitReason.SYSTEM_EVENT == 24 and ExitReason.INTR == 10
    assert ExitReason.INTERNAL_ERROR == 17 and ExitReason.MMIO == 6
    assert ExitReason.SHUTDOWN == 8 and ExitReason.HLT == 5
    assert [SystemEventType(i).name for i in range(1, 8)] == [
        "SHUTDOWN", "RESET", "CRASH", "WAKEUP", "SUSPEND", "SEV_TERM", "TDX_FATAL"]
    assert (MpState.RUNNABLE, MpState.STOPPED, MpState.SUSPENDED) == (0, 5, 10)
    assert [int(s) for s in MpState] == list(range(11))
    assert Cap.ARM_SYSTEM_SUSPEND == 216 and Cap.HALT_POLL == 182
    assert Cap.MP_STATE == 14 and Cap.ARM_PSCI_0_2 == 102 and Cap.SYSTEM_EVENT_DATA == 215
    assert KVM_HALT_POLL_NS_DEFAULT == {"arm64": 500_000, "x86": 200_000}


# -- item 2: KVM_CAP_ARM_SYSTEM_SUSPEND ----------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_system_suspend_cap(engine):
    vm = make_vm(engine)
    assert vm.check_extension(216) == 1
    assert vm.check_extension(Cap.ARM_SYSTEM_SUSPEND) == 1
    for flags in (1, 2, 1 << 31):
        kvm_error(errno.EINVAL, vm.enable_cap, 216, flags=flags)
    # The failed calls enabled nothing.
    v = vm.vcpus[0]
    v.load(g.psci(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_SUSPEND) + [g.sync_reg(0), g.end()])
    assert run_done(v) == [(1 << 64) - 1]
    assert vm.enable_cap(216) is None
    assert vm.enable_cap(216) is None                     # idempotent
    assert vm.enable_cap(216, 0xDEAD, 7) is None          # args are ignored
    kvm_error(errno.EINVAL, vm.enable_cap, 216, flags=1)  # still EINVAL once enabled
    v.load(g.psci(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_SUSPEND) + [g.sync_reg(0), g.end()])
    assert run_done(v) == [0]


@pytest.mark.parametrize("engine", ENGINES)
def test_system_suspend_cap_on_x86(engine):
    vm = make_vm(engine, arch="x86")
    assert vm.check_extension(216) == 0
    kvm_error(errno.EINVAL, vm.enable_cap, 216)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_check_extension_of_unknown_caps_is_zero(engine, arch):
    vm = make_vm(engine, arch=arch)
    for cap in (9999, -1, 1 << 40, 217, 183, "HALT_POLL", None, 1.5):
        assert vm.check_extension(cap) == 0
    assert vm.check_extension(Cap.HALT_POLL) == 1
    assert vm.check_extension(Cap.MP_STATE) == 1
    assert vm.check_extension(Cap.ARM_PSCI_0_2) == (1 if arch == "arm64" else 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_enable_unknown_or_fixed_caps_is_einval(engine):
    vm = make_vm(engine)
    for cap in (9999, -1, Cap.MP_STATE, Cap.ARM_PSCI_0_2, Cap.IRQCHIP, "x"):
        kvm_error(errno.EINVAL, vm.enable_cap, cap)
    assert vm.max_halt_poll_ns == vm.host.halt_poll_ns


# -- item 13: halt-poll defaults and KVM_CAP_HALT_POLL ---------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_halt_poll_defaults(engine, arch):
    host = kw.Host(arch=arch, engine=engine)
    assert host.halt_poll_ns == KVM_HALT_POLL_NS_DEFAULT[arch]
    assert host.halt_poll_ns_grow == 2
    assert host.halt_poll_ns_grow_start == 10_000
    assert host.halt_poll_ns_shrink == 2
    assert (haltpoll.HALT_POLL_NS_GROW_DEFAULT, haltpoll.HALT_POLL_NS_GROW_START_DEFAULT,
            haltpoll.HALT_POLL_NS_SHRINK_DEFAULT) == (2, 10_000, 2)
    vm = host.create_vm(1)
    assert vm.max_halt_poll_ns == KVM_HALT_POLL_NS_DEFAULT[arch]
    assert vm.vcpus[0].halt_poll_ns == 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("args,flags", [
    ((UINT_MAX + 1,), 0), ((1 << 63,), 0), (((1 << 64) - 1,), 0), ((-1,), 0),
    ((100,), 1), ((0,), 1 << 31), ((True,), 0), (("100",), 0), ((1.0,), 0), ((None,), 0)])
def test_halt_poll_cap_rejects(engine, args, flags):
    vm = make_vm(engine)
    kvm_error(errno.EINVAL, vm.enable_cap, Cap.HALT_POLL, *args, flags=flags)
    # No override: the VM still follows the module parameter.
    assert vm.max_halt_poll_ns == vm.host.halt_poll_ns
    vm.host.halt_poll_ns = 1234
    assert vm.max_halt_poll_ns == 1234


def halting_program(n, gap_ns):
    """n halts, each woken by the vCPU's own timer ``gap_ns`` later."""
    return [g.loop([g.timer_arm(gap_ns), g.wfi()], n)]


@pytest.mark.parametrize("engine", ENGINES)
def test_halt_poll_cap_overrides_the_module_parameter_for_good(engine):
    host = kw.Host(host_cpus=2, engine=engine)
    capped, free = host.create_vm(1), host.create_vm(1)
    capped.enable_cap(Cap.HALT_POLL, UINT_MAX)            # the largest value fits
    capped.enable_cap(Cap.HALT_POLL, 0)                    # any number of times
    assert capped.max_halt_poll_ns == 0
    host.halt_poll_ns = 300_000
    assert capped.max_halt_poll_ns == 0 and free.max_halt_poll_ns == 300_000
    for vm in (capped, free):
        vm.vcpus[0].load(halting_program(20, 5_000))
    host.run(1_000_000)
    # The override of 0 means no polling at all; the other VM polls.
    assert capped.stats()["halt_attempted_poll"] == 0
    assert capped.vcpus[0].halt_poll_ns == 0
    assert free.stats()["halt_attempted_poll"] > 0
    assert free.stats()["halt_successful_poll"] > 0
    # Switching the module parameter off: the free VM follows, the capped one keeps
    # its own ceiling, which can still be raised.
    host.halt_poll_ns = 0
    capped.enable_cap(Cap.HALT_POLL, 100_000)
    assert capped.max_halt_poll_ns == 100_000 and free.max_halt_poll_ns == 0
    before = (capped.stats()["halt_attempted_poll"], free.stats()["halt_attempted_poll"])
    for vm in (capped, free):
        vm.vcpus[0].load(halting_program(20, 5_000))
    host.run(2_000_000)
    assert capped.stats()["halt_attempted_poll"] > before[0]
    assert free.stats()["halt_attempted_poll"] == before[1]
    assert free.vcpus[0].halt_poll_ns == 0
    assert 0 < capped.vcpus[0].halt_poll_ns <= 100_000


# -- item 5: arm64 KVM_SET_MP_STATE / KVM_GET_MP_STATE ------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_arm64_set_mp_state_accepts_exactly_0_5_10(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    assert v.get_mp_state() == MpState.RUNNABLE
    for start in (MpState.RUNNABLE, MpState.STOPPED, MpState.SUSPENDED):
        v.set_mp_state(start)
        assert v.get_mp_state() == start
        for value in range(21):
            if value in ARM64_OK:
                continue
            kvm_error(errno.EINVAL, v.set_mp_state, value)
            assert v.get_mp_state() == start
        for bad in (-1, 1 << 32, 10 + (1 << 32), "0", None, 5.0, True, False, MpState):
            kvm_error(errno.EINVAL, v.set_mp_state, bad)
            assert v.get_mp_state() == start
    for value in (5, 10, 0, 10, 10, 5, 5, 0):
        v.set_mp_state(value)
        got = v.get_mp_state()
        assert got == value and isinstance(got, MpState)


@pytest.mark.parametrize("engine", ENGINES)
def test_x86_set_mp_state(engine):
    vm = make_vm(engine, arch="x86")
    v = vm.vcpus[0]
    for value in range(21):
        if value in X86_OK:
            v.set_mp_state(value)
            # SIPI_RECEIVED: the SIPI is accepted at once (kvm_apic_accept_events on GET).
            assert v.get_mp_state() == (MpState.RUNNABLE if value == 4 else value)
            v.set_mp_state(MpState.RUNNABLE)
        else:
            v.set_mp_state(MpState.HALTED)
            kvm_error(errno.EINVAL, v.set_mp_state, value)
            assert v.get_mp_state() == MpState.HALTED
    for bad in (-1, "0", None, True):
        kvm_error(errno.EINVAL, v.set_mp_state, bad)


@pytest.mark.parametrize("engine", ENGINES)
def test_init_power_off(engine):
    vm = make_vm(engine, 3)
    a, b, c = vm.vcpus
    a.init(power_off=True)
    b.init()
    assert a.get_mp_state() == MpState.STOPPED
    assert b.get_mp_state() == MpState.RUNNABLE
    assert c.get_mp_state() == MpState.RUNNABLE
    c.set_mp_state(MpState.SUSPENDED)
    c.init()                           # KVM_ARM_VCPU_INIT again: RUNNABLE
    assert c.get_mp_state() == MpState.RUNNABLE
    a.init(power_off=False)
    assert a.get_mp_state() == MpState.RUNNABLE
    x86 = make_vm(engine, arch="x86")
    kvm_error(errno.ENXIO, x86.vcpus[0].init)


@pytest.mark.parametrize("engine", ENGINES)
def test_stopped_vcpu_does_not_run_until_runnable(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.init(power_off=True)
    v.load([g.sync(1), g.end()])
    ex = v.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.INTR
    assert v.get_mp_state() == MpState.STOPPED
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [1]


# -- item 6 (the MP state side; the run side is in test_vcpu_run.py) ---------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_suspended_is_sticky_until_userspace_writes_runnable(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(0x5), g.end()])
    v.set_mp_state(MpState.SUSPENDED)
    vm.configure_irq(40, enabled=True)
    vm.route_spi(40, vcpu=0)
    vm.irq_line(40, 1)                         # a wake source, pending all along
    for _ in range(3):
        ex = v.run()
        assert ex.reason == ExitReason.SYSTEM_EVENT
        assert ex.system_event.type == SystemEventType.WAKEUP and ex.system_event.ndata == 0
        assert v.get_mp_state() == MpState.SUSPENDED
    assert v.stats()["wfi_exit_stat"] == 0
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [0x5]
    assert v.get_mp_state() == MpState.RUNNABLE


# -- vCPU ioctls while the vCPU is inside KVM_RUN: EBUSY --------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_ioctls_inside_kvm_run_are_ebusy(engine):
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v0.load([g.loop([g.compute(10_000)])])
    v1.load([g.compute(1_000_000), g.end()])
    v0.set_reg("x1", 0x42)
    vm.run(50_000)
    for v in (v0, v1):
        assert not v.outside_run
        assert v.get_mp_state() == MpState.RUNNABLE
        for state in (MpState.RUNNABLE, MpState.STOPPED, MpState.SUSPENDED):
            kvm_error(errno.EBUSY, v.set_mp_state, state)
            assert v.get_mp_state() == MpState.RUNNABLE
        kvm_error(errno.EBUSY, v.get_reg, "x0")
        kvm_error(errno.EBUSY, v.set_reg, "pc", vm.code_address(0))
        kvm_error(errno.EBUSY, v.init, power_off=True)
        assert v.get_mp_state() == MpState.RUNNABLE
        # Bad input is still reported as such.
        kvm_error(errno.EINVAL, v.set_mp_state, 7)
        kvm_error(errno.ENOENT, v.get_reg, "x31")
    # Both vCPUs kept running: the state writes did not happen.
    vm.run(2_000_000)
    assert v1.outside_run                       # v1 reached its END
    v0.signal()
    vm.run(2_100_000)
    assert not v0.outside_run                   # the default policy re-entered after INTR
    ex_count = vm.exits
    assert ex_count >= 2


@pytest.mark.parametrize("engine", ENGINES)
def test_registers_and_unknown_names(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    assert [v.get_reg(f"x{i}") for i in range(31)] == [0] * 31
    assert v.get_reg("pc") == vm.code_address(0)
    for name, value in (("x0", 1), ("x1", (1 << 64) - 1), ("x2", 0), ("x3", 1 << 63),
                        ("x17", 0x1234), ("x30", 0xDEAD_BEEF), ("sp", 0x4000_8000)):
        v.set_reg(name, value)
        assert v.get_reg(name) == value
    for bad in ("x31", "x-1", "PC", "X0", "mpidr", "", None, 0, 4, 1.0, "sp_el1",
                0x6030000000100044, 0x603000000013C006, 1 << 64, -1):
        kvm_error(errno.ENOENT, v.get_reg, bad)
        kvm_error(errno.ENOENT, v.set_reg, bad, 1)
    for bad_value in (-1, 1 << 64):
        with pytest.raises(ValueError):
            v.set_reg("x0", bad_value)
    for bad_value in ("1", 1.0, None, True):
        with pytest.raises(TypeError):
            v.set_reg("x0", bad_value)
    assert v.get_reg("x0") == 1
    x86 = make_vm(engine, arch="x86")
    kvm_error(errno.ENOENT, x86.vcpus[0].get_reg, "x0")
    kvm_error(errno.ENOENT, x86.vcpus[0].set_reg, "pc", 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_registers_by_kernel_id(engine):
    """ARM64_CORE_REG(regs.regs[N]) etc. (arch/arm64/include/uapi/asm/kvm.h): the IDs
    the psci selftest and QEMU use reach the same registers as the names."""
    vm = make_vm(engine, 2)
    v = vm.vcpus[1]
    assert KvmReg.X0 == 0x6030000000100000 and KvmReg.X30 == 0x603000000010003C
    assert KvmReg.SP == 0x603000000010003E and KvmReg.PC == 0x6030000000100040
    assert KvmReg.PSTATE == 0x6030000000100042
    assert KvmReg.MPIDR_EL1 == 0x603000000013C005
    assert KvmReg.PSCI_VERSION == 0x6030000000140000 == kw.uapi.KVM_REG_ARM_PSCI_VERSION
    for i in range(31):
        v.set_reg(0x6030000000100000 + 2 * i, 100 + i)
        assert v.get_reg(f"x{i}") == 100 + i
    v.set_reg(KvmReg.SP, 0x8000)
    assert v.get_reg("sp") == 0x8000
    v.set_reg(KvmReg.PC, vm.code_address(0))
    assert v.get_reg(0x6030000000100040) == vm.code_address(0)
    # A core register with the wrong size field: EINVAL (core_reg_size_from_offset);
    # the firmware register with it: ENOENT (kvm_arm_set_fw_reg).
    u32 = 0x0020000000000000
    kvm_error(errno.EINVAL, v.get_reg, (KvmReg.X0 & ~0x00F0000000000000) | u32)
    kvm_error(errno.ENOENT, v.set_reg, (KvmReg.PSCI_VERSION & ~0x00F0000000000000) | u32, 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_mpidr_is_reset_mpidrs(engine):
    """reset_mpidr (arch/arm64/kvm/sys_regs.c): Aff0 = id & 0xf, Aff1 = (id >> 4) & 0xff,
    Aff2 = (id >> 12) & 0xff, bit 31 (RES1) set."""
    vm = make_vm(engine, 18)
    assert [vm.vcpus[i].get_reg("mpidr_el1") for i in (0, 1, 15, 16, 17)] == \
        [0x80000000, 0x80000001, 0x8000000F, 0x80000100, 0x80000101]
    assert vm.vcpus[16].get_reg(KvmReg.MPIDR_EL1) & kw.uapi.MPIDR_HWID_BITMASK == mpidr_of(16)
    vm.vcpus[16].set_reg("mpidr_el1", 0x80000100)     # restoring what was read
    kvm_error(errno.EINVAL, vm.vcpus[16].set_reg, "mpidr_el1", 0x80000200)
    assert vm.vcpus[16].get_reg("mpidr_el1") == 0x80000100


@pytest.mark.parametrize("engine", ENGINES)
def test_pstate_modes_and_mask(engine):
    """set_core_reg: PSTATE's mode must be EL0t, EL1t or EL1h for an AArch64 vCPU
    without NV (else EINVAL); its I bit is the interrupt mask."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    assert v.get_reg("pstate") == 0x5                 # the booted guest: EL1h, DAIF clear
    for mode in (0x0, 0x4, 0x5):
        v.set_reg("pstate", 0x3C0 | mode)
        assert v.get_reg("pstate") == 0x3C0 | mode
        assert v.irq_state(0)["masked"]
    v.set_reg("pstate", 0x5)
    assert not v.irq_state(0)["masked"]
    for bad in (0x1, 0x9, 0x8, 0x10, 0x13, 0x1F, 0x3C9):
        kvm_error(errno.EINVAL, v.set_reg, "pstate", bad)
        assert v.get_reg("pstate") == 0x5


@pytest.mark.parametrize("engine", ENGINES)
def test_pc_round_trips_any_value(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.sync(2), g.end()])
    for pc in (0, 0x10, vm.code_address(1) + 2, vm.code_address(3), (1 << 64) - 4,
               vm.code_address(1)):
        v.set_reg("pc", pc)
        assert v.get_reg("pc") == pc
    assert run_done(v) == [2]


# -- regressions: integer-typed arguments --------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_numpy_integers_are_integers(engine):
    """numpy integers are valid ioctl arguments (they used to give EINVAL for
    KVM_SET_MP_STATE and KVM_CAP_HALT_POLL)."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.set_mp_state(np.int64(5))
    assert v.get_mp_state() == MpState.STOPPED
    v.set_mp_state(np.uint8(10))
    assert v.get_mp_state() == MpState.SUSPENDED
    v.set_mp_state(np.uint32(0))
    assert v.get_mp_state() == MpState.RUNNABLE
    kvm_error(errno.EINVAL, v.set_mp_state, np.int64(7))
    kvm_error(errno.EINVAL, v.set_mp_state, np.bool_(False))
    assert v.get_mp_state() == MpState.RUNNABLE
    vm.enable_cap(Cap.HALT_POLL, np.uint32(1234))
    assert vm.max_halt_poll_ns == 1234 and type(vm.max_halt_poll_ns) is int
    vm.enable_cap(np.int32(216), flags=np.int64(0))
    assert vm.check_extension(np.int16(216)) == 1
    kvm_error(errno.EINVAL, vm.enable_cap, Cap.HALT_POLL, np.int64(-1))
    kvm_error(errno.EINVAL, vm.enable_cap, Cap.HALT_POLL, np.uint64(UINT_MAX + 1))
    assert vm.max_halt_poll_ns == 1234


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flags", [None, "", 0.0, 1.0, -1, 1 << 32, True, False, [0]])
def test_non_integer_or_nonzero_flags_are_einval(engine, flags):
    """Flags are a u32 that must be 0; anything else (falsy non-integers included,
    which used to pass) is EINVAL, with nothing enabled."""
    vm = make_vm(engine)
    kvm_error(errno.EINVAL, vm.enable_cap, Cap.ARM_SYSTEM_SUSPEND, flags=flags)
    kvm_error(errno.EINVAL, vm.enable_cap, Cap.HALT_POLL, 100, flags=flags)
    assert vm.max_halt_poll_ns == vm.host.halt_poll_ns
    v = vm.vcpus[0]
    v.load(g.psci(PsciFn.PSCI_FEATURES, PsciFn.SYSTEM_SUSPEND) + [g.sync_reg(0), g.end()])
    assert run_done(v) == [(1 << 64) - 1]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cap", [216.0, 182.0, True, None, "216", b"216", [216]])
def test_non_integer_caps(engine, cap):
    vm = make_vm(engine)
    assert vm.check_extension(cap) == 0
    kvm_error(errno.EINVAL, vm.enable_cap, cap)
