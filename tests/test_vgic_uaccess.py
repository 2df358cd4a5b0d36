"""The vGICv3 as userspace sees it: KVM_DEV_ARM_VGIC_GRP_DIST_REGS / REDIST_REGS.

arch/arm64/kvm/vgic/vgic-kvm-device.c ``vgic_v3_attr_regs_access`` (EBUSY while a
vCPU is in KVM_RUN), vgic-mmio-v3.c ``vgic_v3_uaccess_write_pending`` (the latch
written whole), ``vgic_mmio_uaccess_write_v3_misc`` (GICD_CTLR without
``vgic_kick_vcpus``), vgic-mmio.c ``vgic_uaccess_write_senable`` /
``vgic_mmio_uaccess_write_sactive`` (queue through ``vgic_queue_irq_unlock``),
``__read_pending`` with ``is_user`` (the latch, not the line level).
"""

from __future__ import annotations

import errno

import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.model import INJECT_REQUEST
from kvmwake.uapi import GICD_CTLR_ARE_NS, GICD_CTLR_DS, GICD_CTLR_ENABLE_SS_G1, ExitReason

ENGINES = ("core", "reference")
SPI = 40
IRQ_PENDING_BIT = 1 << (INJECT_REQUEST["arm64"] & 0xFF)


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def make_vm(engine, n=1):
    return kw.VM(arch="arm64", nr_vcpus=n, engine=engine)


def requests(vm, vid):
    return vm._engine.thread_info(vm.vcpus[vid]._g)["requests"]


def kvm_error(errnum, fn, *args, **kwargs):
    with pytest.raises(kw.KvmError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == errnum, ei.value


def test_save_and_restore_a_pending_spi(engine):
    """A VMM migrating a vGIC reads each interrupt's state and writes it into the new
    VM; the restored pending SPI is queued and taken when its vCPU enters."""
    src = make_vm(engine, 2)
    src.configure_irq(SPI, enabled=True, priority=0x80, level=False)
    src.route_spi(SPI, vcpu=1)
    src.set_distributor(False)                  # (so it stays pending in the source)
    src.irq_line(SPI, 1)
    saved = src.vgic_get_irq(SPI)
    assert saved == {"pending": True, "active": False, "enabled": True, "priority": 0x80,
                     "level": False, "line": False, "mpidr": 1}
    assert src.vgic_get_ctlr() == GICD_CTLR_ARE_NS | GICD_CTLR_DS

    dst = make_vm(engine, 2)
    dst.vgic_set_ctlr(GICD_CTLR_ENABLE_SS_G1)
    dst.vgic_set_irq(SPI, level=saved["level"], priority=saved["priority"],
                     mpidr=saved["mpidr"], pending=saved["pending"], active=saved["active"],
                     enabled=saved["enabled"])
    got = dst.vgic_get_irq(SPI)
    assert {k: got[k] for k in ("pending", "active", "enabled", "priority", "level", "mpidr")} \
        == {k: saved[k] for k in ("pending", "active", "enabled", "priority", "level", "mpidr")}
    assert dst.vcpus[1].irq_state(SPI)["queued"]
    assert requests(dst, 1) == IRQ_PENDING_BIT     # queued: KVM_REQ_IRQ_PENDING
    v = dst.vcpus[1]
    v.load([g.wfi(), g.sync(1), g.end()])
    v.set_reg("pstate", 0x3C5)                      # DAIF masked: not taken at entry, but
    ex = v.run()                                    # the WFI ends (kvm_arch_vcpu_runnable)
    assert ex.reason == ExitReason.MMIO and ex.value == 1 and ex.time_ns < 100_000
    assert dst.vgic_get_irq(SPI)["pending"]
    v.set_reg("pstate", 0x345)                      # unmasked: taken at the next entry
    assert v.run().ucall == "DONE"
    assert not dst.vgic_get_irq(SPI)["pending"]


def test_userspace_pending_write_is_the_whole_latch(engine):
    """vgic_v3_uaccess_write_pending: a 0 clears the latch (the guest's ISPENDR write of
    0 does nothing, its ICPENDR clears); a level interrupt's line is not the latch."""
    vm = make_vm(engine)
    vm.configure_irq(SPI, enabled=True)             # level-triggered by default
    vm.irq_line(SPI, 1)
    st = vm.vgic_get_irq(SPI)
    assert st["pending"] is False and st["line"] is True   # __read_pending, is_user
    vm.vgic_set_irq(SPI, pending=True)
    assert vm.vgic_get_irq(SPI)["pending"]
    vm.vgic_set_irq(SPI, pending=False)
    st = vm.vgic_get_irq(SPI)
    assert not st["pending"] and st["line"]
    assert vm.vcpus[0].irq_state(SPI)["pending"]    # the line still holds it pending


def test_userspace_distributor_enable_does_not_kick(engine):
    """vgic_mmio_uaccess_write_v3_misc sets the enable only; the guest's write
    (vgic_mmio_write_v3_misc) calls vgic_kick_vcpus."""
    for userspace in (True, False):
        vm = make_vm(engine)
        vm.vcpus[0].raise_sgi(2)                    # queued while enabled
        vm.vcpus[0].load([g.end()])
        vm.vcpus[0].run()                           # the entry consumes the request
        vm.vcpus[0].raise_sgi(2)
        vm.vgic_set_ctlr(0)
        assert vm.vgic_get_ctlr() & GICD_CTLR_ENABLE_SS_G1 == 0
        before = requests(vm, 0)
        if userspace:
            vm.vgic_set_ctlr(GICD_CTLR_ENABLE_SS_G1)
        else:
            vm.set_distributor(True)
        assert vm.distributor_enabled
        assert requests(vm, 0) == (before if userspace else before | IRQ_PENDING_BIT)


def test_userspace_writes_while_disabled_queue_nothing(engine):
    """vgic_target_oracle returns NULL while the distributor is disabled: a userspace
    ISPENDR write latches the SPI but queues it nowhere, and a later userspace
    enable finds nothing to deliver: the vCPU's WFI waits."""
    vm = make_vm(engine)
    vm.vgic_set_ctlr(0)
    vm.vgic_set_irq(SPI, enabled=True, pending=True)
    assert vm.vgic_get_irq(SPI)["pending"] and not vm.vcpus[0].irq_state(SPI)["queued"]
    assert requests(vm, 0) == 0
    vm.vgic_set_ctlr(GICD_CTLR_ENABLE_SS_G1)
    v = vm.vcpus[0]
    v.load([g.wfi(), g.sync(1), g.end()])
    ex = v.run(timeout_ns=200_000)
    assert ex.reason == ExitReason.INTR and v.thread_state == "USER"
    # Writing it pending again (enabled distributor) queues it: the WFI ends.
    vm.vgic_set_irq(SPI, pending=True)
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 1


def test_userspace_active_write_queues_and_private_irqs_need_a_vcpu(engine):
    vm = make_vm(engine, 2)
    vm.vgic_set_irq(20, vcpu=1, active=True)        # a PPI of vCPU 1 (REDIST_REGS)
    st = vm.vgic_get_irq(20, vcpu=1)
    assert st["active"] and "mpidr" not in st
    assert requests(vm, 1) == IRQ_PENDING_BIT and requests(vm, 0) == 0
    vm.vgic_set_irq(20, vcpu=1, active=False, priority=0x48)
    st = vm.vgic_get_irq(20, vcpu=1)
    assert not st["active"] and st["priority"] == 0x48
    kvm_error(errno.EINVAL, vm.vgic_get_irq, 20)    # a private INTID without its vCPU
    with pytest.raises(ValueError):
        vm.vgic_set_irq(20, vcpu=0, mpidr=0)        # GICD_IROUTER is for SPIs
    with pytest.raises(ValueError):
        vm.vgic_set_irq(20, vcpu=0, level=True)


def test_userspace_access_is_ebusy_while_a_vcpu_runs(engine):
    """vgic_v3_attr_regs_access: kvm_trylock_all_vcpus fails (-EBUSY) while any vCPU
    is inside KVM_RUN; nothing changes."""
    vm = make_vm(engine, 2)
    vm.vcpus[1].load([g.wfi(), g.end()])
    vm.run(10_000)
    before = vm.vcpus[0].irq_state(SPI)
    kvm_error(errno.EBUSY, vm.vgic_set_irq, SPI, pending=True, enabled=True)
    kvm_error(errno.EBUSY, vm.vgic_get_irq, SPI)
    kvm_error(errno.EBUSY, vm.vgic_set_ctlr, 0)
    assert vm.vcpus[0].irq_state(SPI) == before and vm.distributor_enabled
    vm.vcpus[1].signal()
    assert vm.vcpus[1].run().reason == ExitReason.INTR
    vm.vgic_set_irq(SPI, pending=True)
    assert vm.vgic_get_irq(SPI)["pending"]


def test_vgic_uaccess_is_arm64_only(engine):
    x86 = kw.VM(arch="x86", nr_vcpus=1, engine=engine)
    kvm_error(errno.ENXIO, x86.vgic_get_irq, SPI)
    kvm_error(errno.ENXIO, x86.vgic_set_irq, SPI, pending=True)
    kvm_error(errno.ENXIO, x86.vgic_set_ctlr, 2)
