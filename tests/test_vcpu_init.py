"""KVM_ARM_VCPU_INIT, vCPU reset and the registers a VMM reads, as arch/arm64/kvm does it.

* ``kvm_arch_vcpu_ioctl_vcpu_init`` / ``kvm_vcpu_set_target`` /
  ``kvm_vcpu_init_check_features``: the target, the feature bits (ENOENT for an
  unknown bit, EINVAL for an unsupported one), the VM-wide feature set
  (``kvm_vcpu_init_changed``), POWER_OFF ephemeral.
* ``kvm_reset_vcpu`` on every init: x0-x30, SP, PC zeroed, PSTATE
  ``VCPU_RESET_PSTATE_EL1``, a pending PSCI CPU_ON reset state applied.
* ``kvm_arm_set_fw_reg``: KVM_REG_ARM_PSCI_VERSION by the vCPUs' PSCI_0_2 feature.
* ``tools/testing/selftests/kvm/arm64/psci_test.c`` ``host_test_cpu_on``.
"""

from __future__ import annotations

import errno

import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.uapi import (
    MPIDR_HWID_BITMASK, ExitReason, KvmReg, MpState, PsciFn, PsciVersion, VcpuFeature,
    vcpu_features,
)

ENGINES = ("core", "reference")
PSCI_0_2 = vcpu_features(VcpuFeature.PSCI_0_2)


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def make_vm(engine, n=1):
    return kw.VM(arch="arm64", nr_vcpus=n, engine=engine)


def kvm_error(errnum, fn, *args, **kwargs):
    with pytest.raises(kw.KvmError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == errnum, ei.value
    return ei.value


def core_regs(v):
    return {name: v.get_reg(name) for name in [f"x{i}" for i in range(31)]
            + ["sp", "pc", "pstate"]}


def test_init_resets_the_core_registers(engine):
    """kvm_reset_vcpu: memset of the gp regs (x0-x30, SP, PC), PSTATE =
    VCPU_RESET_PSTATE_EL1 (0x3c5), on the first init and on every later one."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    for i in range(31):
        v.set_reg(f"x{i}", 0x1000 + i)
    v.set_reg("sp", 0x4000_0000)
    v.set_reg("pstate", 0x5)
    v.init()
    regs = core_regs(v)
    assert regs == dict({f"x{i}": 0 for i in range(31)}, sp=0, pc=0, pstate=0x3C5)
    assert v.get_mp_state() == MpState.RUNNABLE
    assert v.irq_state(0)["masked"]                 # PSTATE.I is set
    # PC 0 holds no code of the program: the next KVM_RUN exits with an error ...
    assert v.run().reason == ExitReason.INTERNAL_ERROR
    # ... until the VMM sets the entry point, as the selftests' vcpu_arch_set_entry_point.
    v.set_reg("x3", 77)
    v.init()                                        # again: reset again
    assert v.get_reg("x3") == 0
    v.set_reg("pc", vm.code_address(0))
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 1


def test_init_applies_a_pending_cpu_on_reset_state(engine):
    """kvm_reset_vcpu takes the reset state kvm_psci_vcpu_on left (PC = entry,
    x0 = context) after zeroing the registers."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.init(power_off=True)
    v1.set_reg("x5", 5)                             # a register CPU_ON's reset zeroes
    entry, context = vm.code_address(1), 0xC0FFEE
    v0.load(g.psci(PsciFn.FN64_CPU_ON, 1, entry, context) + [g.sync_reg(0), g.end()])
    ex = v0.run()
    assert ex.value == 0                            # PSCI SUCCESS
    assert v1.get_mp_state() == MpState.RUNNABLE
    v1.init()                                       # the owed reset, applied by init
    assert v1.get_reg("pc") == entry and v1.get_reg("x0") == context
    assert v1.get_reg("x5") == 0 and v1.get_reg("pstate") == 0x3C5
    v1.init()                                       # consumed: a plain reset now
    assert v1.get_reg("pc") == 0 and v1.get_reg("x0") == 0


def test_psci_selftest_host_test_cpu_on(engine):
    """psci_test.c host_test_cpu_on: power the target off, read its MPIDR_EL1, have the
    source CPU_ON it with 0xfeedf00d / 0xdeadc0de, then (target never run) read its
    PC and x0 (assert_vcpu_reset): the reset owed to it is applied before the read."""
    vm = make_vm(engine, 2)
    for v in vm.vcpus:
        v.init(PSCI_0_2)                            # init.features[0] |= PSCI_0_2
    source, target = vm.vcpus
    target.set_mp_state(MpState.STOPPED)            # vcpu_power_off(target)
    target_mpidr = target.get_reg(KvmReg.MPIDR_EL1)
    assert target_mpidr == 0x80000001
    source.load(g.psci(PsciFn.FN64_CPU_ON, target_mpidr & MPIDR_HWID_BITMASK, 0xFEEDF00D,
                       0xDEADC0DE) + [g.sync_reg(0)]
                + g.psci(PsciFn.FN64_AFFINITY_INFO, target_mpidr & MPIDR_HWID_BITMASK, 0)
                + [g.sync_reg(0), g.end()])
    source.set_reg("pc", vm.code_address(0))
    assert source.run().value == 0                  # CPU_ON: SUCCESS
    assert source.run().value == 0                  # AFFINITY_INFO: LEVEL_ON
    assert target.get_reg(KvmReg.PC) == 0xFEEDF00D
    assert target.get_reg(KvmReg.X0) == 0xDEADC0DE


def test_feature_checks(engine):
    """kvm_vcpu_init_check_features and kvm_vcpu_set_target; nothing changes on an
    error."""
    vm = make_vm(engine, 2)
    v = vm.vcpus[0]
    v.set_reg("x1", 11)
    kvm_error(errno.EINVAL, v.init, target=0)       # not KVM_ARM_TARGET_GENERIC_V8
    kvm_error(errno.ENOENT, v.init, 1 << 9)         # outside KVM_VCPU_VALID_FEATURES
    kvm_error(errno.ENOENT, v.init, [PSCI_0_2, 1])  # features[1] != 0
    for bit in (VcpuFeature.EL1_32BIT, VcpuFeature.PMU_V3, VcpuFeature.SVE,
                VcpuFeature.PTRAUTH_ADDRESS, VcpuFeature.HAS_EL2, VcpuFeature.HAS_EL2_E2H0):
        err = kvm_error(errno.EINVAL, v.init, PSCI_0_2 | (1 << bit))
        assert bit.name in str(err)
    kvm_error(errno.EINVAL, v.init, vcpu_features(VcpuFeature.PTRAUTH_ADDRESS,
                                                  VcpuFeature.PTRAUTH_GENERIC))
    with pytest.raises(TypeError):
        v.init("psci")
    with pytest.raises(TypeError):
        v.init([0] * 8)
    with pytest.raises(ValueError):
        v.init([1 << 32])
    assert v.get_reg("x1") == 11 and v.get_mp_state() == MpState.RUNNABLE
    assert vm.vcpu_features == PSCI_0_2             # not yet configured


def test_features_are_vm_wide(engine):
    """__kvm_vcpu_set_target / kvm_vcpu_init_changed: once a vCPU of the VM was
    initialised, every init (first of another vCPU, or again) must pass the same
    features but POWER_OFF, which is ephemeral."""
    vm = make_vm(engine, 3)
    a, b, c = vm.vcpus
    a.init(0)                                       # PSCI 0.1 vCPUs
    assert vm.vcpu_features == 0
    kvm_error(errno.EINVAL, b.init)                 # the default carries PSCI_0_2
    kvm_error(errno.EINVAL, a.init, PSCI_0_2)
    b.init(0, power_off=True)
    assert b.get_mp_state() == MpState.STOPPED
    b.init(0)                                       # POWER_OFF was not stored
    assert b.get_mp_state() == MpState.RUNNABLE
    c.init(vcpu_features(VcpuFeature.POWER_OFF))
    assert c.get_mp_state() == MpState.STOPPED and vm.vcpu_features == 0


def test_psci_version_register_follows_the_psci_0_2_feature(engine):
    """kvm_arm_set_fw_reg: 0.1 only without PSCI_0_2, 0.2+ only with it (EINVAL
    otherwise, unchanged); kvm_arm_get_fw_reg reads kvm_psci_version."""
    vm = make_vm(engine, 1)
    v = vm.vcpus[0]
    assert v.get_reg("psci_version") == PsciVersion.V1_3
    kvm_error(errno.EINVAL, vm.set_psci_version, PsciVersion.V0_1)
    kvm_error(errno.EINVAL, v.set_reg, KvmReg.PSCI_VERSION, PsciVersion.V0_1)
    assert v.get_reg(KvmReg.PSCI_VERSION) == PsciVersion.V1_3
    v.set_reg("psci_version", PsciVersion.V1_0)
    assert vm.psci_version == PsciVersion.V1_0
    vm0 = make_vm(engine, 1)
    w = vm0.vcpus[0]
    w.init(0)                                       # without PSCI_0_2: 0.1
    assert w.get_reg("psci_version") == PsciVersion.V0_1
    kvm_error(errno.EINVAL, vm0.set_psci_version, PsciVersion.V1_0)
    vm0.set_psci_version(PsciVersion.V0_1)
    # The guest sees PSCI 0.1: PSCI_VERSION (a 0.2 function) is not supported.
    w.load(g.psci(PsciFn.PSCI_VERSION) + [g.sync_reg(0), g.end()])
    assert w.run().value == (1 << 64) - 1           # NOT_SUPPORTED (-1)


def test_init_is_arm64_only_and_busy_in_kvm_run(engine):
    x86 = kw.VM(arch="x86", nr_vcpus=1, engine=engine)
    kvm_error(errno.ENXIO, x86.vcpus[0].init)
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.wfi(), g.end()])
    vm.run(10_000)
    kvm_error(errno.EBUSY, v.init)
    assert vm.vcpu_features == PSCI_0_2


def _session(engine, seed):
    """A random VMM session over the new calls (init, registers, userspace vGIC
    writes, distributor toggles, SGIs) and runs; everything userspace can see."""
    import random
    rnd = random.Random(seed)
    n = rnd.randint(1, 3)
    vm = kw.VM(arch="arm64", nr_vcpus=n, engine=engine, seed=seed)
    out = []
    for v in vm.vcpus:
        v.load(g.psci(PsciFn.FN64_CPU_ON, rnd.randrange(n), vm.code_address(0), 5)
               + [g.loop([g.compute_exp(20_000), g.wake_random_other() if n > 1
                          else g.compute(1_000), g.wfi(), g.sync_reg(0)], 6), g.end()])
    for step in range(25):
        k = rnd.randrange(9)
        v = vm.vcpus[rnd.randrange(n)]
        try:
            if k == 0:
                v.init(power_off=rnd.random() < 0.3)
                v.set_reg("pc", vm.code_address(0))
            elif k == 1:
                v.set_reg(f"x{rnd.randrange(31)}", rnd.getrandbits(64))
            elif k == 2:
                v.set_reg("pstate", rnd.choice([0x5, 0x3C5, 0x4, 0x0, 0x85]))
            elif k == 3:
                vm.vgic_set_irq(rnd.choice([40, 41]), pending=rnd.random() < 0.7,
                                enabled=rnd.random() < 0.8, mpidr=rnd.randrange(n))
            elif k == 4:
                vm.vgic_set_ctlr(rnd.choice([0, 2]))
            elif k == 5:
                vm.set_distributor(rnd.random() < 0.6)
            elif k == 6:
                v.raise_sgi(rnd.randrange(16))
            elif k == 7:
                vm.vgic_set_irq(rnd.randrange(16, 32), vcpu=v, active=rnd.random() < 0.5)
            else:
                ex = v.run(timeout_ns=rnd.choice([30_000, 200_000]))
                out.append((v.id, repr(ex)))
        except kw.KvmError as exc:
            out.append(("err", exc.errno))
        out.append(tuple(w.get_mp_state() for w in vm.vcpus))
    regs = [[w.get_reg(r) for r in ("x0", "x1", "sp", "pc", "pstate")]
            for w in vm.vcpus if w.outside_run]
    irqs = [vm.vgic_get_irq(i) for i in (40, 41)] if all(w.outside_run for w in vm.vcpus) \
        else None
    return out, regs, irqs, vm.stats_array().tolist(), vm.trace_text(), vm.host.now


@pytest.mark.parametrize("seed", range(6))
def test_engines_agree_on_random_vmm_sessions(seed):
    assert _session("core", seed) == _session("reference", seed)
