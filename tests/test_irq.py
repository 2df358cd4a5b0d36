"""The interrupt model, through the public API, on both engines.

Spec: /work/shared/spec/kvm-semantics.md sections 7.2 (the wake predicate),
8.2 (kvm_vcpu_check_block), 11 (the vGIC), 12 (arch timer wake-ups) and 15
items 7, 16, 17, 18.  One test (or one parametrized group) per clause.

Unless a test says otherwise every cost is 0 and halt polling is off, so a
halted vCPU blocks at once and a woken one ends its halt at the instant of
the wake-up: times are exactly the computes, timer deadlines and arrival
times of the test.  ``halts`` counts ended halts (kvm_vcpu_wakeup lines);
``halt_wakeup`` counts effective kvm_vcpu_wake_up calls, so a vCPU that is
woken but finds nothing deliverable has halt_wakeup + 1 and no halt end.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.model import (ARCH_TIMER_CTRL_ENABLE, ARCH_TIMER_CTRL_IT_MASK, COST_NAMES,
                           GIC_DEFAULT_PMR, GIC_DEFAULT_PRIORITY, INJECT_REQUEST, TICK_IRQ,
                           VTIMER_IRQ, mpidr_of)

ZERO = dict.fromkeys(COST_NAMES, 0)
ENGINES = ("core", "reference")
SPI = 40
ENABLE, IMASK = ARCH_TIMER_CTRL_ENABLE, ARCH_TIMER_CTRL_IT_MASK
RESCHED = {"arm64": 0, "x86": 0xFD}


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


# ---------------------------------------------------------------- helpers

def make_vm(engine, programs, arch="arm64", costs=None, poll=0, host_cpus=None, **kwargs):
    """A VM with one vCPU per program (None: no program), zero costs, polling off."""
    vm = kw.VM(arch=arch, nr_vcpus=len(programs), host_cpus=host_cpus or len(programs),
               engine=engine, costs=dict(ZERO, **(costs or {})), **kwargs)
    vm.host.halt_poll_ns = poll
    for v, prog in zip(vm.vcpus, programs):
        if prog is not None:
            v.load(prog)
    return vm


def wakeups(vm, vid=0):
    """vCPU vid's kvm_vcpu_wakeup lines as (ts, waited, halt_ns)."""
    r = vm.trace_records()
    r = r[(r["vcpu_id"] == vid) & (r["kind"] == 0)]
    return [(int(ts), bool(f), int(a)) for ts, f, a in zip(r["ts"], r["flag"], r["a"])]


def wakeup_stat(vm, vid=0):
    return vm.vcpus[vid].stats()["halt_wakeup"]


def halted_at(vm, vid, t):
    """Run to t + 1 and check that vCPU vid was still running before t and blocked after.

    (A halt that starts at t: its WFI's segment ends at t; with zero costs
    and polling off the vCPU blocks at t.)"""
    vm.run(t)
    assert vm.vcpus[vid].thread_state == "RUNNING"
    vm.run(t + 1)
    assert vm.vcpus[vid].thread_state == "BLOCKED"


def irq_snapshot(vm, intids):
    """Everything the interrupt model shows, for the state-unchanged checks."""
    snap = {"state": [v.thread_state for v in vm.vcpus], "now": vm.host.now,
            "stats": vm.stats_array().tolist(),
            "irq": [[v.irq_state(i) for i in intids] for v in vm.vcpus]}
    if vm.arch == "arm64":
        snap["timer"] = [v.timer_state() for v in vm.vcpus]
        snap["dist"] = vm.distributor_enabled
    return snap


def requests(vm, vid):
    """vcpu->requests (not public: through the engine)."""
    return vm._engine.thread_info(vm.vcpus[vid]._g)["requests"]


IRQ_PENDING_BIT = 1 << (INJECT_REQUEST["arm64"] & 0xFF)


# ---------------------------------------------------------------- the defaults

def test_booted_guest_defaults(engine):
    vm = make_vm(engine, [None, None])
    v = vm.vcpus[1]
    assert vm.distributor_enabled
    for intid in (0, 7, 15, VTIMER_IRQ, TICK_IRQ["arm64"]):
        st = v.irq_state(intid)
        assert st["enabled"] and not st["pending"] and not st["active"]
        assert st["priority"] == GIC_DEFAULT_PRIORITY == 0xA0 and st["target"] == 1
    assert not v.irq_state(16)["enabled"]                  # other PPIs: off
    assert v.irq_state(VTIMER_IRQ)["level"] and not v.irq_state(TICK_IRQ["arm64"])["level"]
    assert not v.irq_state(0)["level"]                    # SGIs are edge
    spi = v.irq_state(SPI)
    assert (spi["enabled"], spi["level"], spi["target"], spi["mpidr"], spi["priority"]) == \
        (False, True, 0, 0, 0xA0)
    assert spi["pmr"] == GIC_DEFAULT_PMR == 0xF0 and not spi["masked"]
    assert v.timer_state() == {"cval": 0, "ctl": 0, "period": 0, "istatus": False}
    assert not v.runnable


# ---------------------------------------------------------------- the wake condition (arm64)

def blocked_vm(engine, n=1, **kwargs):
    """n vCPUs, each blocked in a WFI since t = 0 (then END); the clock at 10000."""
    vm = make_vm(engine, [[g.wfi()]] * n, **kwargs)
    vm.run(10_000)
    assert all(v.thread_state == "BLOCKED" for v in vm.vcpus)
    return vm


def assert_kick_does_not_end_halt(vm, vid=0):
    """A plain kick wakes the vCPU; it finds nothing deliverable and blocks again."""
    before = wakeup_stat(vm, vid)
    vm.vcpus[vid].kick()
    assert wakeup_stat(vm, vid) == before + 1
    vm.run(vm.host.now + 1_000)
    assert vm.vcpus[vid].thread_state == "BLOCKED" and vm.host.halts == 0


def test_distributor_disabled_does_not_wake(engine):
    vm = blocked_vm(engine)
    vm.set_distributor(False)
    assert not vm.distributor_enabled
    vm.configure_irq(SPI, enabled=True)
    vm.irq_line(SPI, 1)
    st = vm.vcpus[0].irq_state(SPI)
    assert st["pending"] and st["enabled"] and st["line"] and not st["active"]
    assert not vm.vcpus[0].runnable
    assert wakeup_stat(vm) == 0 and requests(vm, 0) == 0     # no queueing, no kick
    vm.run(20_000)
    assert vm.vcpus[0].thread_state == "BLOCKED" and vm.host.halts == 0
    assert_kick_does_not_end_halt(vm)


def test_distributor_enable_kicks_only_interrupts_queued_before(engine):
    """An SPI or SGI made pending while the distributor is disabled is never queued
    (vgic_target_oracle returns NULL, so vgic_queue_irq_unlock puts it on no
    ap_list), and enabling the distributor (vgic_mmio_write_v3_misc ->
    vgic_kick_vcpus) kicks only vCPUs whose ap_list holds something: a vCPU
    blocked in WFI stays blocked until the interrupt is queued again."""
    vm = blocked_vm(engine, n=3)
    vm.set_distributor(False)
    vm.configure_irq(SPI, enabled=True)
    vm.route_spi(SPI, vcpu=1)
    vm.irq_line(SPI, 1)
    vm.vcpus[2].raise_sgi(0)                               # SGI 0 pending on vCPU 2
    vm.run(20_000)
    assert [wakeup_stat(vm, i) for i in range(3)] == [0, 0, 0] and vm.host.halts == 0
    assert vm.vcpus[1].irq_state(SPI)["pending"] and not vm.vcpus[1].irq_state(SPI)["queued"]
    assert vm.vcpus[2].irq_state(0)["pending"] and not vm.vcpus[2].irq_state(0)["queued"]
    vm.set_distributor(True)                               # at 20000: nobody is kicked
    assert [wakeup_stat(vm, i) for i in range(3)] == [0, 0, 0]
    assert requests(vm, 1) == requests(vm, 2) == 0
    vm.run(30_000)
    assert [v.thread_state for v in vm.vcpus] == ["BLOCKED"] * 3 and vm.host.halts == 0
    assert not vm.vcpus[1].runnable and not vm.vcpus[2].runnable
    # Re-asserting a line already high is no new event (vgic_validate_injection) ...
    vm.irq_line(SPI, 1)
    assert wakeup_stat(vm, 1) == 0
    # ... a new SGI edge and the guest's ISENABLER write queue them (vgic_queue_irq_unlock).
    vm.vcpus[2].raise_sgi(0)
    vm.configure_irq(SPI, enabled=True)
    assert [wakeup_stat(vm, i) for i in range(3)] == [0, 1, 1]
    assert requests(vm, 1) == requests(vm, 2) == IRQ_PENDING_BIT and requests(vm, 0) == 0
    vm.run(40_000)
    assert wakeups(vm, 1) == wakeups(vm, 2) == [(30_000, True, 30_000)]
    assert wakeups(vm, 0) == [] and vm.vcpus[0].thread_state == "BLOCKED"
    # Both took their interrupt on entry.
    assert not vm.vcpus[1].irq_state(SPI)["pending"] and not vm.vcpus[2].irq_state(0)["pending"]
    # Off and on again with nothing pending: nobody is kicked.
    vm.set_distributor(False)
    vm.set_distributor(True)
    assert [wakeup_stat(vm, i) for i in range(3)] == [0, 1, 1]


def test_distributor_reenable_kicks_an_interrupt_still_queued(engine):
    """The exception (vgic_kick_vcpus, vgic_prune_ap_list): an SGI queued while the
    distributor was enabled stays on the ap_list until its vCPU next enters the
    guest; if the distributor is disabled and enabled again before that, the
    enable finds it (kvm_vgic_vcpu_pending_irq) and kicks the vCPU."""
    vm = blocked_vm(engine, n=1)
    vm.vcpus[0].raise_sgi(3)                     # queued and kicked at 10000 ...
    vm.set_distributor(False)                    # ... disabled before it runs
    assert vm.vcpus[0].irq_state(3)["queued"]
    vm.run(20_000)                               # it re-checks and blocks again
    assert vm.vcpus[0].thread_state == "BLOCKED" and vm.host.halts == 0
    assert vm.vcpus[0].irq_state(3)["queued"]    # not pruned: it never entered the guest
    vm.set_distributor(True)
    assert wakeup_stat(vm) == 2 and requests(vm, 0) == IRQ_PENDING_BIT
    vm.run(30_000)
    assert [w[0] for w in wakeups(vm)] == [20_000]


def test_disabled_distributor_prunes_at_guest_entry(engine):
    """vgic_prune_ap_list drops what vgic_target_oracle no longer names: a vCPU that
    entered the guest with the distributor disabled has an empty ap_list, and a
    later enable does not wake it."""
    vm = make_vm(engine, [[g.compute(5_000), g.wfi()]])
    vm.run(1_000)                                # in the guest, computing
    vm.set_distributor(False)
    vm.configure_irq(SPI, enabled=True)
    vm.irq_line(SPI, 1)
    vm.run(20_000)                               # WFI at 5000 (+ exit): blocked
    assert vm.vcpus[0].thread_state == "BLOCKED"
    assert not vm.vcpus[0].irq_state(SPI)["queued"]
    vm.set_distributor(True)
    vm.run(30_000)
    assert vm.vcpus[0].thread_state == "BLOCKED" and wakeup_stat(vm) == 0


def test_disabled_interrupt_does_not_wake_until_enabled(engine):
    vm = blocked_vm(engine)
    vm.irq_line(SPI, 1)                                    # SPIs start disabled
    st = vm.vcpus[0].irq_state(SPI)
    assert st["pending"] and not st["enabled"] and not vm.vcpus[0].runnable
    assert wakeup_stat(vm) == 0
    assert_kick_does_not_end_halt(vm)                      # at 11000 the vCPU is blocked again
    vm.configure_irq(SPI, enabled=True)                    # ISENABLER: queue and kick
    assert wakeup_stat(vm) == 2 and vm.vcpus[0].runnable
    vm.run(20_000)
    assert wakeups(vm) == [(11_000, True, 11_000)]
    assert not vm.vcpus[0].irq_state(SPI)["pending"]      # taken: the handler dropped the line


def test_disabled_private_interrupt_does_not_wake(engine):
    vm = make_vm(engine, [[g.wfi()], [g.compute(5_000), g.sgi(3, 0), g.compute(5_000),
                                      g.sgi(4, 0)]])
    vm.configure_irq(3, vcpu=0, enabled=False)
    vm.run(10_000)
    # SGI 3 (disabled) at 5000 is latched, but queues nothing and kicks nobody.
    st3 = vm.vcpus[0].irq_state(3)
    assert st3["pending"] and not st3["enabled"] and not vm.vcpus[0].runnable
    assert vm.vcpus[0].thread_state == "BLOCKED" and wakeup_stat(vm, 0) == 0
    vm.run(10_001)                       # SGI 4 at 10000 wakes it
    assert wakeup_stat(vm, 0) == 1 and wakeups(vm) == [(10_000, True, 10_000)]
    assert vm.vcpus[0].irq_state(3)["pending"]             # still latched, never taken
    assert not vm.vcpus[0].irq_state(4)["pending"]


def test_active_interrupt_does_not_wake(engine):
    """An SPI that is pending but still active (in vCPU 0's handler) does not end vCPU 1's
    WFI; the EOI makes it deliverable and vCPU 1 is then kicked (as the kernel's
    vgic_prune_ap_list does when it migrates the interrupt) and takes it."""
    vm = make_vm(engine, [[g.set_handler(50_000), g.compute(200_000)],
                          [g.compute(20_000), g.wfi(), g.compute(1_000), g.wfi()]])
    vm.configure_irq(SPI, enabled=True)
    vm.run(10_000)
    vm.irq_line(SPI, 1)                  # vCPU 0 takes it at once: active until 60000
    vm.run(10_001)
    assert vm.vcpus[0].irq_state(SPI)["active"] and not vm.vcpus[0].irq_state(SPI)["pending"]
    vm.route_spi(SPI, vcpu=1)
    vm.irq_line(SPI, 1)                  # pending again, active, now routed to vCPU 1
    st = vm.vcpus[1].irq_state(SPI)
    assert st["pending"] and st["active"] and st["enabled"] and st["queued"]
    assert st["target"] == 1
    assert not vm.vcpus[1].runnable
    halted_at(vm, 1, 20_000)             # its WFI at 20000 blocks: active is not pending
    vm.run(59_999)
    assert vm.vcpus[1].thread_state == "BLOCKED" and wakeups(vm, 1) == []
    vm.run(60_001)                       # vCPU 0's EOI at 60000
    assert wakeups(vm, 1) == [(60_000, True, 40_000)]
    assert wakeup_stat(vm, 1) == 1
    st = vm.vcpus[1].irq_state(SPI)
    assert not st["pending"] and not st["active"]          # taken by vCPU 1 on entry
    halted_at(vm, 1, 61_000)


@pytest.mark.parametrize("priority, pmr, wakes", [
    (0xF0, None, False),          # equal to the default PMR 0xF0
    (0xF7, None, False),          # 0xF7 keeps its top 5 bits: 0xF0
    (0xFF, None, False),
    (0xE8, None, True),           # below
    (0xEF, None, True),           # 0xE8
    (0x00, None, True),
    (0xA0, 0xA0, False),          # the default priority against a lowered PMR
    (0xA0, 0xA7, False),          # PMR 0xA7 reads 0xA0
    (0xA0, 0xA8, True),
], ids=lambda v: f"{v:#x}" if isinstance(v, int) else str(v))
def test_priority_against_pmr(engine, priority, pmr, wakes):
    """Only a priority strictly (numerically) below the PMR wakes; 5 priority bits."""
    vm = blocked_vm(engine)
    if pmr is not None:
        vm.vcpus[0].set_pmr(pmr)
        assert vm.vcpus[0].irq_state(SPI)["pmr"] == pmr & 0xF8
    vm.configure_irq(SPI, enabled=True, priority=priority)
    assert vm.vcpus[0].irq_state(SPI)["priority"] == priority & 0xF8
    vm.irq_line(SPI, 1)
    # The injection kicks the target whatever the priority (vgic_queue_irq_unlock) ...
    assert wakeup_stat(vm) == 1
    assert vm.vcpus[0].runnable == wakes
    vm.run(20_000)
    # ... and kvm_vcpu_check_block decides.
    if wakes:
        assert wakeups(vm) == [(10_000, True, 10_000)]
        assert vm.vcpus[0].thread_state == "USER"
        assert not vm.vcpus[0].irq_state(SPI)["pending"]
    else:
        assert wakeups(vm) == [] and vm.vcpus[0].thread_state == "BLOCKED"
        assert vm.vcpus[0].irq_state(SPI)["pending"]


def test_masked_wfi_still_wakes_and_leaves_the_interrupt_pending(engine):
    """PSTATE.I is not consulted by the wake condition; the guest cannot take it masked."""
    vm = make_vm(engine, [[g.set_handler(3_000), g.mask(), g.wfi(), g.compute(20_000),
                           g.unmask(), g.compute(1_000), g.wfi()]])
    vm.configure_irq(SPI, enabled=True)
    vm.run(10_000)
    assert vm.vcpus[0].thread_state == "BLOCKED"
    assert vm.vcpus[0].irq_state(SPI)["masked"]
    vm.irq_line(SPI, 1)
    assert vm.vcpus[0].runnable
    vm.run(20_000)
    assert wakeups(vm) == [(10_000, True, 10_000)] and wakeup_stat(vm) == 1
    st = vm.vcpus[0].irq_state(SPI)
    assert st["pending"] and st["line"] and not st["active"]   # not taken while masked
    vm.run(30_000)
    assert vm.vcpus[0].irq_state(SPI)["pending"]
    vm.run(30_001)                                              # unmasked at 30000: taken
    st = vm.vcpus[0].irq_state(SPI)
    assert st["active"] and not st["pending"] and not st["masked"]
    vm.run(33_001)
    assert not vm.vcpus[0].irq_state(SPI)["active"]            # EOI at 33000
    halted_at(vm, 0, 34_000)             # the handler delayed the program by 3000


def test_masked_wfi_with_the_reschedule_sgi(engine):
    vm = make_vm(engine, [[g.mask(), g.wfi(), g.wfi(), g.compute(5_000), g.unmask(),
                           g.compute(5_000), g.wfi()]])
    vm.run(1_000)
    vm.vcpus[0].raise_wake()
    vm.run(2_000)
    # The first WFI ended at 1000, the second one at once (the SGI is still pending).
    assert wakeups(vm) == [(1_000, True, 1_000), (1_000, False, 0)]
    assert vm.vcpus[0].irq_state(0)["pending"]
    vm.run(6_001)                        # unmasked at 6000: SGI 0 taken (ack + EOI)
    assert not vm.vcpus[0].irq_state(0)["pending"]
    halted_at(vm, 0, 11_000)


# ---------------------------------------------------------------- routing

def test_spi_routed_by_affinity(engine):
    """IROUTER Aff2.Aff1.Aff0 names one vCPU: vCPU 17 is Aff1 = 1, Aff0 = 1."""
    vm = blocked_vm(engine, n=20)
    assert mpidr_of(17) == 0x101
    vm.configure_irq(SPI, enabled=True)
    vm.route_spi(SPI, mpidr=0x101)
    st = vm.vcpus[0].irq_state(SPI)
    assert (st["target"], st["mpidr"]) == (17, 0x101)
    vm.irq_line(SPI, 1)
    assert [wakeup_stat(vm, i) for i in range(20)] == [0] * 17 + [1, 0, 0]
    assert vm.vcpus[17].irq_state(SPI)["queued"] and vm.vcpus[17].runnable
    assert not any(vm.vcpus[i].runnable for i in range(20) if i != 17)
    vm.run(20_000)
    assert wakeups(vm, 17) == [(10_000, True, 10_000)] and vm.host.halts == 1
    # route_spi(vcpu=...) writes that vCPU's MPIDR; bits IROUTER ignores are dropped.
    vm.route_spi(SPI, vcpu=16)
    assert vm.vcpus[0].irq_state(SPI)["mpidr"] == 0x100
    vm.route_spi(SPI, mpidr=(0xAB << 32) | (1 << 31) | 0x103)
    assert (vm.vcpus[0].irq_state(SPI)["target"], vm.vcpus[0].irq_state(SPI)["mpidr"]) == \
        (19, 0x103)


@pytest.mark.parametrize("mpidr", [0x10, 0x0F | 0x200, 0x01_0000, 0x14, mpidr_of(20)],
                         ids=["aff0-16", "vcpu-47", "aff2", "aff0-20", "vcpu-20"])
def test_spi_routed_to_nobody_is_never_delivered(engine, mpidr):
    vm = blocked_vm(engine, n=20)
    vm.configure_irq(SPI, enabled=True)
    vm.route_spi(SPI, mpidr=mpidr)
    vm.irq_line(SPI, 1)
    st = vm.vcpus[0].irq_state(SPI)
    assert st["target"] == -1 and st["mpidr"] == mpidr and st["pending"] and not st["queued"]
    assert [wakeup_stat(vm, i) for i in range(20)] == [0] * 20
    assert not any(v.runnable for v in vm.vcpus)
    vm.run(50_000)
    assert vm.host.halts == 0
    # Routed to a vCPU again, the pending SPI is queued there and that vCPU kicked.
    vm.route_spi(SPI, vcpu=3)
    assert [wakeup_stat(vm, i) for i in range(20)] == [0, 0, 0, 1] + [0] * 16
    vm.run(60_000)
    assert wakeups(vm, 3) == [(50_000, True, 50_000)] and vm.host.halts == 1


def test_injection_kicks_exactly_the_target(engine):
    """Four blocked vCPUs and one computing: only the oracle's vCPU is kicked."""
    vm = make_vm(engine, [[g.wfi()]] * 4 + [[g.compute(100_000)]],
                 costs={"vm_exit_ns": 300, "vm_entry_ns": 200})
    vm.configure_irq(SPI, enabled=True)
    vm.configure_irq(SPI + 1, enabled=True)
    vm.route_spi(SPI, vcpu=2)
    vm.route_spi(SPI + 1, vcpu=4)
    vm.run(10_000)
    vm.irq_line(SPI, 1)
    assert [wakeup_stat(vm, i) for i in range(5)] == [0, 0, 1, 0, 0]
    assert [requests(vm, i) for i in range(5)] == [0, 0, IRQ_PENDING_BIT, 0, 0]
    assert [v.thread_state for v in vm.vcpus] == ["BLOCKED", "BLOCKED", "RUNNABLE", "BLOCKED",
                                                  "RUNNING"]
    # vCPU 4 is in guest mode: it gets the IPI, an exit and an entry (500 ns).
    vm.irq_line(SPI + 1, 1)
    assert [wakeup_stat(vm, i) for i in range(5)] == [0, 0, 1, 0, 0]
    assert requests(vm, 4) == IRQ_PENDING_BIT
    vm.run(10_500)
    assert vm.vcpus[4].irq_state(SPI + 1)["pending"]
    vm.run(10_501)
    assert not vm.vcpus[4].irq_state(SPI + 1)["pending"] and requests(vm, 4) == 0
    # vCPU 4: entry 0-200, guest from 200; the IPI at 10000 stops it, exit + entry, the
    # interrupt, then the remaining 90200 ns of guest and END's exit: it leaves at 101000.
    vm.run(101_000)
    assert vm.vcpus[4].thread_state == "RUNNING"
    vm.run(101_001)
    assert vm.vcpus[4].thread_state == "USER"
    # vCPU 2 halted at 500 (entry 200 + exit 300).
    assert wakeups(vm, 2) == [(10_000, True, 9_500)]
    assert vm.stats()["halt_wakeup"] == 1 and vm.host.halts == 1


def test_injection_ends_the_poll_of_a_polling_target(engine):
    vm = make_vm(engine, [[g.wfi(), g.wfi(), g.wfi()], [g.wfi(), g.wfi()]], poll=100_000)
    vm.configure_irq(SPI, enabled=True)
    vm.run(1_000)
    for v in vm.vcpus:
        v.raise_wake()                   # the first halts end; the windows grow to 10000
    vm.run(4_000)
    assert [v.thread_state for v in vm.vcpus] == ["POLLING", "POLLING"]
    vm.irq_line(SPI, 1)                  # routed to vCPU 0
    assert vm.vcpus[0].thread_state == "RUNNING" and vm.vcpus[1].thread_state == "POLLING"
    assert wakeups(vm, 0)[-1] == (4_000, False, 3_000)
    assert [wakeup_stat(vm, i) for i in range(2)] == [1, 1]     # the poll was no waiter
    assert vm.vcpus[0].stats()["halt_successful_poll"] == 1
    assert vm.vcpus[1].stats()["halt_successful_poll"] == 0
    vm.run(20_000)
    assert wakeups(vm, 1)[-1] == (1_000, True, 1_000)          # it polled 10000, then blocked


def test_ipi_to_a_vcpu_in_guest_mode_costs_exit_and_entry(engine):
    costs = {"vm_exit_ns": 300, "vm_entry_ns": 200}
    for raise_it in (False, True):
        vm = make_vm(engine, [[g.compute(100_000)]], costs=costs)
        vm.configure_irq(SPI, enabled=True)
        vm.run(50_000)
        if raise_it:
            vm.irq_line(SPI, 1)
        end = 100_500 + (500 if raise_it else 0)
        vm.run(end)
        assert vm.vcpus[0].thread_state == "RUNNING"
        vm.run(end + 1)
        assert vm.vcpus[0].thread_state == "USER"


# ---------------------------------------------------------------- level and edge

def test_level_spi_follows_its_line(engine):
    """A level SPI is pending while its line is high, whether or not it was taken before."""
    vm = make_vm(engine, [[g.mask(), g.compute(100_000), g.unmask(), g.compute(100_000)]])
    vm.configure_irq(SPI, enabled=True)
    v = vm.vcpus[0]
    vm.run(10_000)
    vm.irq_line(SPI, 1)
    assert v.irq_state(SPI)["pending"] and v.irq_state(SPI)["line"]
    vm.run(20_000)
    assert v.irq_state(SPI)["pending"]                    # masked: stays pending
    vm.irq_line(SPI, 1)                                    # same level: no change
    vm.irq_line(SPI, 0)
    st = v.irq_state(SPI)
    assert not st["pending"] and not st["line"] and not st["queued"]
    vm.irq_line(SPI, 1)
    assert v.irq_state(SPI)["pending"]
    vm.run(100_001)                                        # unmasked at 100000: taken
    st = v.irq_state(SPI)
    assert not st["pending"] and not st["line"] and not st["active"]


def test_level_spi_is_pending_again_after_eoi_when_raised_again(engine):
    """Raised again during its handler: pending and active, taken again after the EOI."""
    vm = make_vm(engine, [[g.set_handler(10_000), g.compute(100_000), g.wfi()]])
    vm.configure_irq(SPI, enabled=True)
    v = vm.vcpus[0]
    vm.run(20_000)
    vm.irq_line(SPI, 1)                  # IPI at 20000: handler 20000-30000
    vm.run(25_000)
    st = v.irq_state(SPI)
    assert st["active"] and not st["pending"] and not st["line"]   # the handler silenced it
    vm.irq_line(SPI, 1)
    st = v.irq_state(SPI)
    assert st["active"] and st["pending"] and st["line"]
    vm.run(30_000)
    assert v.irq_state(SPI)["active"] and v.irq_state(SPI)["pending"]
    vm.run(30_001)                       # EOI at 30000, taken again: handler 30000-40000
    st = v.irq_state(SPI)
    assert st["active"] and not st["pending"]
    vm.run(40_001)
    assert not v.irq_state(SPI)["active"]
    # Two handlers of 10000: the WFI comes at 120000 instead of 100000.
    halted_at(vm, 0, 120_000)


@pytest.mark.parametrize("trigger", ["edge", "level"])
def test_edge_spi_raised_twice_before_it_is_taken_is_taken_once(engine, trigger):
    vm = make_vm(engine, [[g.set_handler(10_000), g.mask(), g.compute(50_000), g.unmask(),
                           g.compute(50_000), g.wfi()]])
    vm.configure_irq(SPI, enabled=True, level=(trigger == "level"))
    v = vm.vcpus[0]
    assert v.irq_state(SPI)["level"] == (trigger == "level")
    for t in (10_000, 20_000):
        vm.run(t)
        vm.irq_line(SPI, 1)
        vm.irq_line(SPI, 0)
    st = v.irq_state(SPI)
    # An edge SPI latched on the rising edges; a level one dropped with its line.
    assert st["pending"] == (trigger == "edge") and not st["line"]
    vm.run(30_000)
    vm.irq_line(SPI, 1)                  # the last rise, left high
    vm.run(50_001)                       # unmasked at 50000: taken once
    st = v.irq_state(SPI)
    assert st["active"] and not st["pending"] and not st["line"]
    vm.run(60_001)
    assert not v.irq_state(SPI)["active"] and not v.irq_state(SPI)["pending"]
    halted_at(vm, 0, 110_000)            # one handler of 10000, not two


def test_edge_spi_raised_during_its_handler_is_taken_again(engine):
    vm = make_vm(engine, [[g.set_handler(10_000), g.compute(100_000), g.wfi()]])
    vm.configure_irq(SPI, enabled=True, level=False)
    vm.run(20_000)
    vm.irq_line(SPI, 1)
    vm.run(25_000)
    vm.irq_line(SPI, 0)                  # a falling edge does nothing
    st = vm.vcpus[0].irq_state(SPI)
    assert st["active"] and not st["pending"]
    vm.irq_line(SPI, 1)                  # a rising edge latches (an edge SPI has no line)
    st = vm.vcpus[0].irq_state(SPI)
    assert st["active"] and st["pending"] and not st["line"]
    halted_at(vm, 0, 120_000)


# ---------------------------------------------------------------- SGIs

def test_sgi_to_a_list_and_to_all_but_self(engine):
    vm = make_vm(engine, [[g.compute(10_000), g.sgi(1, [1, 3]), g.compute(10_000),
                           g.sgi(2, "all-but-self"), g.compute(10_000), g.wfi()]]
                 + [[g.wfi(), g.wfi(), g.wfi()]] * 3)
    vm.run(10_001)
    assert [wakeup_stat(vm, i) for i in range(4)] == [0, 1, 0, 1]
    assert wakeups(vm, 1) == wakeups(vm, 3) == [(10_000, True, 10_000)]
    assert wakeups(vm, 2) == []
    for i in (1, 3):                     # taken on entry, then the next WFI blocked
        assert not vm.vcpus[i].irq_state(1)["pending"]
        assert vm.vcpus[i].thread_state == "BLOCKED"
    vm.run(20_001)
    assert [wakeup_stat(vm, i) for i in range(4)] == [0, 2, 1, 2]
    for i in (1, 2, 3):
        assert wakeups(vm, i)[-1] == (20_000, True, 10_000 if i != 2 else 20_000)
        assert not vm.vcpus[i].irq_state(2)["pending"]
    assert not vm.vcpus[0].irq_state(2)["pending"]         # not to itself
    assert vm.vcpus[0].thread_state == "RUNNING"
    halted_at(vm, 0, 30_000)


@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_sgi_list_with_a_base_above_zero_and_next(engine, arch):
    irq = 5 if arch == "arm64" else 0x45
    vm = make_vm(engine, [[g.wfi()]] * 5 + [[g.compute(1_000), g.sgi(irq, [2, 4]),
                                            g.compute(1_000), g.sgi(irq, "next"), g.end()]],
                 arch=arch)
    vm.run(10_000)
    assert [wakeup_stat(vm, i) for i in range(6)] == [1, 0, 1, 0, 1, 0]
    assert [len(wakeups(vm, i)) for i in range(6)] == [1, 0, 1, 0, 1, 0]
    assert wakeups(vm, 0) == [(2_000, True, 2_000)]        # next of vCPU 5: vCPU 0


@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_sgi_to_random_other_is_another_vcpu(engine, arch):
    """With two vCPUs the random other one is the other one, for any SGI and for wake."""
    irq = 7 if arch == "arm64" else 0x77
    vm = make_vm(engine, [[g.wfi(), g.wfi()], [g.compute(3_000), g.sgi(irq, "random-other"),
                                               g.compute(3_000), g.wake_random_other()]],
                 arch=arch)
    vm.run(10_000)
    assert wakeups(vm, 0) == [(3_000, True, 3_000), (6_000, True, 3_000)]
    assert wakeup_stat(vm, 0) == 2 and vm.vcpus[0].thread_state == "USER"
    assert wakeups(vm, 1) == [] and wakeup_stat(vm, 1) == 0


@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_wake_sends_the_reschedule_ipi(engine, arch):
    vm = make_vm(engine, [[g.mask(), g.wfi()], [g.compute(5_000), g.wake(0)]], arch=arch)
    vm.run(6_000)
    st = vm.vcpus[0].irq_state(RESCHED[arch])
    if arch == "arm64":
        # Masked WFI: woken, halt ended, the SGI still pending.
        assert st["pending"] and wakeups(vm) == [(5_000, True, 5_000)]
    else:
        # HLT with IF = 0: kicked (halt_wakeup + 1) but no halt end; 0xFD sits in the IRR.
        assert st["irr"] and not st["isr"] and wakeups(vm) == []
        assert vm.vcpus[0].thread_state == "BLOCKED"
    assert wakeup_stat(vm) == 1


def test_sgi_sender_pays_ipi_send_when_a_target_is_in_guest_mode(engine):
    costs = {"vm_exit_ns": 100, "vm_entry_ns": 200, "ipi_send_ns": 500}
    vm = make_vm(engine, [[g.compute(1_000), g.sgi(1, [1, 2]), g.compute(1_000), g.end()],
                          [g.compute(100_000)], [g.wfi()]], costs=costs)
    # vCPU 0: entry 0-200, guest 200-1200, exit to 1300; SGI 1 to vCPU 1 (guest mode: IPI)
    # and vCPU 2 (blocked: woken); entry 200 + ipi_send 500; guest 2000-3000; exit 3100.
    vm.run(3_100)
    assert vm.vcpus[0].thread_state == "RUNNING"
    vm.run(3_101)
    assert vm.vcpus[0].thread_state == "USER"
    assert wakeup_stat(vm, 2) == 1 and wakeup_stat(vm, 1) == 0


# ---------------------------------------------------------------- the virtual timer

def test_timer_wakes_a_blocked_vcpu_at_cval(engine):
    vm = make_vm(engine, [[g.compute(1_000), g.timer_arm(50_000), g.wfi(), g.compute(1),
                           g.wfi()]])
    vm.run(1_001)
    assert vm.vcpus[0].timer_state() == {"cval": 51_000, "ctl": ENABLE, "period": 0,
                                         "istatus": False}
    vm.run(51_000)
    assert vm.vcpus[0].thread_state == "BLOCKED" and wakeup_stat(vm) == 0
    assert not vm.vcpus[0].irq_state(VTIMER_IRQ)["pending"]
    vm.run(51_001)
    assert wakeups(vm) == [(51_000, True, 50_000)] and wakeup_stat(vm) == 1
    # Taken on entry: the handler masked the timer (IMASK); its line is low.
    assert vm.vcpus[0].timer_state() == {"cval": 51_000, "ctl": ENABLE | IMASK, "period": 0,
                                         "istatus": True}
    st = vm.vcpus[0].irq_state(VTIMER_IRQ)
    assert not st["pending"] and not st["line"] and not st["active"]
    vm.run(1_000_000)                    # masked: no second wake
    assert wakeup_stat(vm) == 1 and vm.host.halts == 1
    assert vm.vcpus[0].thread_state == "BLOCKED"


def test_timer_ends_a_poll_at_cval(engine):
    vm = make_vm(engine, [[g.wfi(), g.timer_arm(5_000), g.wfi(), g.compute(1), g.wfi()]],
                 poll=100_000)
    vm.run(1_000)
    vm.vcpus[0].raise_wake()             # halt 1 (not polled) ends; window grows to 10000
    vm.run(4_000)
    assert vm.vcpus[0].thread_state == "POLLING"
    vm.run(6_001)
    assert wakeups(vm) == [(1_000, True, 1_000), (6_000, False, 5_000)]
    s = vm.vcpus[0].stats()
    assert s["halt_successful_poll"] == 1 and s["halt_poll_success_ns"] == 5_000
    assert s["halt_wakeup"] == 1         # the poll was not a waiter
    assert vm.vcpus[0].timer_state()["ctl"] == ENABLE | IMASK


def test_timer_cancel_means_no_wake(engine):
    vm = make_vm(engine, [[g.timer_arm(50_000), g.compute(10_000), g.timer_cancel(), g.wfi()]])
    vm.run(10_001)
    assert vm.vcpus[0].timer_state() == {"cval": 50_000, "ctl": 0, "period": 0,
                                         "istatus": False}
    vm.run(1_000_000)
    assert vm.vcpus[0].thread_state == "BLOCKED"
    assert wakeup_stat(vm) == 0 and vm.host.halts == 0
    assert not vm.vcpus[0].irq_state(VTIMER_IRQ)["pending"]


@pytest.mark.parametrize("how", ["disabled", "priority", "distributor"])
def test_bg_timer_wakes_a_vcpu_whose_timer_ppi_cannot_be_delivered(engine, how):
    """kvm_bg_timer_expire wakes the blocked vCPU at the deadline; nothing is deliverable,
    so it blocks again: halt_wakeup + 1 (exactly one), no halt end."""
    prog = {"disabled": [g.irq_disable(VTIMER_IRQ)],
            "priority": [g.set_priority(VTIMER_IRQ, 0xF0)],
            "distributor": [g.dist_enable(False)]}[how]
    vm = make_vm(engine, [prog + [g.timer_arm(50_000), g.wfi()]])
    vm.run(49_999)
    assert vm.vcpus[0].thread_state == "BLOCKED" and wakeup_stat(vm) == 0
    vm.run(50_000)
    assert wakeup_stat(vm) == 0
    vm.run(50_001)
    assert wakeup_stat(vm) == 1 and vm.vcpus[0].thread_state == "BLOCKED"
    assert vm.host.halts == 0 and wakeups(vm) == []
    st = vm.vcpus[0].irq_state(VTIMER_IRQ)
    assert st["pending"] and st["line"] and not st["active"]
    assert st["enabled"] == (how != "disabled")
    assert vm.vcpus[0].timer_state()["ctl"] == ENABLE      # not taken: not masked
    vm.run(1_000_000)
    assert wakeup_stat(vm) == 1


def test_periodic_timer_ticks(engine):
    vm = make_vm(engine, [[g.timer_arm(10_000, period_ns=10_000), g.loop([g.wfi()])]])
    vm.run(55_000)
    assert wakeups(vm) == [(t, True, 10_000) for t in (10_000, 20_000, 30_000, 40_000, 50_000)]
    assert wakeup_stat(vm) == 5
    assert vm.vcpus[0].timer_state() == {"cval": 60_000, "ctl": ENABLE, "period": 10_000,
                                         "istatus": False}


def test_periodic_timer_taken_late_catches_up_at_once(engine):
    """Masked past several deadlines: each take moves CVAL on by one period; the ones
    already due are taken at once (handler time 0)."""
    vm = make_vm(engine, [[g.mask(), g.timer_arm(10_000, period_ns=10_000), g.compute(35_000),
                           g.unmask(), g.loop([g.wfi()])]])
    vm.run(35_001)
    # Taken at 35000 for the deadlines 10000, 20000 and 30000; next deadline 40000.
    assert vm.vcpus[0].timer_state() == {"cval": 40_000, "ctl": ENABLE, "period": 10_000,
                                         "istatus": False}
    assert vm.vcpus[0].thread_state == "BLOCKED"
    vm.run(45_000)
    assert wakeups(vm) == [(40_000, True, 5_000)]


def test_timer_ops_of_one_vcpu_leave_the_others_alone(engine):
    vm = make_vm(engine, [[g.timer_arm(20_000), g.wfi()], [g.wfi()]])
    vm.run(30_000)
    assert wakeup_stat(vm, 0) == 1 and wakeup_stat(vm, 1) == 0
    assert vm.vcpus[1].timer_state() == {"cval": 0, "ctl": 0, "period": 0, "istatus": False}


# ---------------------------------------------------------------- x86: the LAPIC

def msi_address(apic_id):
    return 0xFEE0_0000 | (apic_id << 12)


def test_msi_wakes_the_vcpu_with_that_apic_id(engine):
    vm = make_vm(engine, [[g.hlt()]] * 3, arch="x86")
    vm.run(10_000)
    assert vm.signal_msi(msi_address(2), 0x41) == 1
    assert [wakeup_stat(vm, i) for i in range(3)] == [0, 0, 1]
    assert vm.vcpus[2].irq_state(0x41) == {"irr": True, "isr": False, "tpr": 0, "masked": False}
    vm.run(20_000)
    assert wakeups(vm, 2) == [(10_000, True, 10_000)] and vm.host.halts == 1
    # Taken at entry (IRR -> ISR) and ended (EOI).
    assert vm.vcpus[2].irq_state(0x41) == {"irr": False, "isr": False, "tpr": 0, "masked": False}
    assert vm.vcpus[0].thread_state == vm.vcpus[1].thread_state == "BLOCKED"


def test_hlt_with_interrupts_disabled_does_not_wake(engine):
    vm = make_vm(engine, [[g.mask(), g.hlt()]], arch="x86")
    vm.run(10_000)
    vm.signal_msi(msi_address(0), 0x41)
    assert wakeup_stat(vm) == 1          # kicked ...
    assert not vm.vcpus[0].runnable
    vm.run(20_000)                       # ... but kvm_vcpu_has_events needs IF = 1
    assert vm.vcpus[0].thread_state == "BLOCKED" and vm.host.halts == 0
    assert vm.vcpus[0].irq_state(0x41)["irr"]
    vm.vcpus[0].set_interrupt_flag(True)      # (sti from outside) + a kick: now it wakes
    vm.vcpus[0].kick()
    vm.run(30_000)
    assert wakeups(vm) == [(20_000, True, 20_000)]
    assert not vm.vcpus[0].irq_state(0x41)["irr"]


@pytest.mark.parametrize("tpr, vector, wakes", [
    (0x50, 0x41, False), (0x50, 0x5F, False), (0x50, 0x60, True),
    (0x40, 0x4F, False), (0x40, 0x50, True), (0x4F, 0x4F, False), (0x00, 0x10, True),
], ids=lambda v: f"{v:#x}" if isinstance(v, int) else str(v))
def test_tpr_blocks_vector_classes_at_or_below_it(engine, tpr, vector, wakes):
    vm = make_vm(engine, [[g.hlt()]], arch="x86")
    vm.vcpus[0].set_tpr(tpr)
    vm.run(10_000)
    vm.signal_msi(msi_address(0), vector)
    assert vm.vcpus[0].runnable == wakes
    vm.run(20_000)
    assert wakeups(vm) == ([(10_000, True, 10_000)] if wakes else [])
    assert vm.vcpus[0].irq_state(vector)["irr"] == (not wakes)
    assert vm.vcpus[0].irq_state(vector)["tpr"] == tpr


def test_x86_vectors_taken_highest_first_with_eoi_between(engine):
    vm = make_vm(engine, [[g.set_handler(1_000), g.mask(), g.compute(10_000), g.unmask(),
                           g.compute(10_000), g.hlt()]], arch="x86")
    vm.run(5_000)
    for vec in (0x31, 0x82, 0x55):
        vm.signal_msi(msi_address(0), vec)
    v = vm.vcpus[0]
    # Unmasked at 10000: 0x82 first, then 0x55, then 0x31, 1000 ns each.
    for t, vec in ((10_500, 0x82), (11_500, 0x55), (12_500, 0x31)):
        vm.run(t)
        in_service = [x for x in (0x31, 0x55, 0x82) if v.irq_state(x)["isr"]]
        assert in_service == [vec]
    halted_at(vm, 0, 23_000)


# ---------------------------------------------------------------- handlers

@pytest.mark.parametrize("handler", [0, 1, 2_500])
def test_handler_time_delays_the_program_per_interrupt(engine, handler):
    """Each IPI in guest mode: exit + entry, then the handler, then the rest of the compute."""
    costs = {"vm_exit_ns": 300, "vm_entry_ns": 200}
    vm = make_vm(engine, [[g.set_handler(handler), g.compute(100_000), g.wfi()]], costs=costs)
    for t in (30_000, 60_000):
        vm.run(t)
        vm.vcpus[0].raise_wake()
    # Without interrupts the WFI's trap would end at 100500.
    halted_at(vm, 0, 100_500 + 2 * (500 + handler))
    assert vm.vcpus[0].stats()["wfi_exit_stat"] == 1


def test_pending_interrupts_taken_in_priority_order_with_eoi_between(engine):
    vm = make_vm(engine, [[g.set_handler(1_000), g.mask(), g.compute(10_000), g.unmask(),
                           g.compute(10_000), g.wfi()]])
    for intid, prio in ((SPI, 0xA0), (SPI + 1, 0x80), (SPI + 2, 0xA0)):
        vm.configure_irq(intid, enabled=True, priority=prio)
    vm.run(5_000)
    for intid in (SPI + 2, SPI, SPI + 1):
        vm.irq_line(intid, 1)
    vm.vcpus[0].raise_wake()             # SGI 0, priority 0xA0
    v = vm.vcpus[0]
    order = []
    for t in (10_500, 11_500, 12_500, 13_500):
        vm.run(t)
        active = [i for i in (0, SPI, SPI + 1, SPI + 2) if v.irq_state(i)["active"]]
        assert len(active) == 1          # one at a time: the EOI comes before the next ack
        order.append(active[0])
    # Lowest priority value first, then lowest INTID.
    assert order == [SPI + 1, 0, SPI, SPI + 2]
    vm.run(14_001)
    assert not any(v.irq_state(i)["active"] or v.irq_state(i)["pending"]
                   for i in (0, SPI, SPI + 1, SPI + 2))
    halted_at(vm, 0, 24_000)


def test_interrupt_arriving_during_a_handler_is_taken_after_its_eoi(engine):
    vm = make_vm(engine, [[g.set_handler(10_000), g.compute(100_000), g.wfi()]])
    vm.configure_irq(SPI, enabled=True)
    vm.configure_irq(SPI + 1, enabled=True, priority=0x00)     # the highest priority
    vm.run(20_000)
    vm.irq_line(SPI, 1)                  # handler 20000-30000
    vm.run(25_000)
    vm.irq_line(SPI + 1, 1)              # no preemption: handlers run masked
    v = vm.vcpus[0]
    vm.run(29_999)
    assert v.irq_state(SPI)["active"] and not v.irq_state(SPI + 1)["active"]
    assert v.irq_state(SPI + 1)["pending"]
    vm.run(30_001)
    assert not v.irq_state(SPI)["active"] and v.irq_state(SPI + 1)["active"]
    halted_at(vm, 0, 120_000)


def test_ipi_during_a_handler_extends_it_by_exit_and_entry(engine):
    costs = {"vm_exit_ns": 300, "vm_entry_ns": 200}
    vm = make_vm(engine, [[g.set_handler(10_000), g.compute(100_000), g.wfi()]], costs=costs)
    vm.configure_irq(SPI, enabled=True)
    vm.configure_irq(SPI + 1, enabled=True)
    vm.run(20_000)
    vm.irq_line(SPI, 1)                  # IPI: handler 20500-30500
    vm.run(25_000)
    vm.irq_line(SPI + 1, 1)              # IPI in the handler: it ends at 31000
    v = vm.vcpus[0]
    vm.run(31_000)
    assert v.irq_state(SPI)["active"]
    vm.run(31_001)
    assert not v.irq_state(SPI)["active"] and v.irq_state(SPI + 1)["active"]
    # 100500 + (500 + 10000) + 500 + 10000 (the second handler, taken after the EOI).
    halted_at(vm, 0, 121_500)


def test_interrupt_storm_is_an_engine_error(engine):
    """A level PPI whose line stays high is taken again at each EOI: with no handler time
    that never ends; the engine stops with an EngineError after 4096 at one instant."""
    vm = make_vm(engine, [[g.compute(100_000)]])
    vm.configure_irq(16, vcpu=0, enabled=True)
    vm.run(10_000)
    with pytest.raises(kw.EngineError, match=r"interrupt storm \(4097 interrupts taken at "
                                             r"t=10000 ns\)"):
        vm.irq_line(16, 1, vcpu=0)
        vm.run(20_000)
    with pytest.raises(kw.EngineError, match="stopped on an earlier error"):
        vm.run(30_000)


# ---------------------------------------------------------------- device sources

def source_vm(engine, edge=False, **kwargs):
    vm = make_vm(engine, [[g.loop([g.wfi()])]], **kwargs)
    vm.configure_irq(SPI, enabled=True, level=not edge)
    return vm


@pytest.mark.parametrize("edge", [False, True], ids=["level", "edge"])
def test_periodic_source_arrives_at_exact_times(engine, edge):
    vm = source_vm(engine, edge)
    vm.add_irq_source(SPI, period_ns=25_000, phase_ns=10_000)
    vm.run(100_000)
    assert wakeups(vm) == [(10_000, True, 10_000)] + [(t, True, 25_000)
                                                      for t in (35_000, 60_000, 85_000)]
    assert wakeup_stat(vm) == 4


def test_periodic_source_added_later_starts_at_its_next_arrival(engine):
    vm = source_vm(engine)
    vm.run(40_000)
    vm.add_irq_source(SPI, period_ns=25_000, phase_ns=10_000)  # 10000, 35000 have passed
    vm.run(100_000)
    assert [ts for ts, *_ in wakeups(vm)] == [60_000, 85_000]


@pytest.mark.parametrize("edge", [False, True], ids=["level", "edge"])
def test_trace_source_arrives_at_the_given_times(engine, edge):
    vm = source_vm(engine, edge)
    vm.add_irq_source(SPI, times_ns=[5_000, 7_000, 7_000, 50_000, 50_001])
    vm.run(100_000)
    # Two arrivals at 7000 before the vCPU runs again are one interrupt.
    assert wakeups(vm) == [(5_000, True, 5_000), (7_000, True, 2_000), (50_000, True, 43_000),
                           (50_001, True, 1)]
    late = source_vm(engine, edge)
    late.run(6_000)
    late.add_irq_source(SPI, times_ns=[5_000, 7_000, 60_000])   # 5000 has passed
    late.run(100_000)
    assert [ts for ts, *_ in wakeups(late)] == [7_000, 60_000]


def test_source_on_a_disabled_spi_does_not_wake(engine):
    vm = make_vm(engine, [[g.loop([g.wfi()])]])
    vm.add_irq_source(SPI, period_ns=10_000)
    vm.run(100_000)
    assert wakeup_stat(vm) == 0 and vm.vcpus[0].irq_state(SPI)["pending"]


def poisson_arrivals(engine, seed, mean, n):
    vm = kw.VM(arch="arm64", nr_vcpus=1, engine=engine, seed=seed, costs=ZERO)
    vm.host.halt_poll_ns = 0
    vm.vcpus[0].load([g.loop([g.wfi()])])
    vm.configure_irq(SPI, enabled=True, level=False)
    vm.add_irq_source(SPI, mean_ns=mean)
    vm.run(mean * n)
    return np.array([ts for ts, *_ in wakeups(vm)], dtype=np.int64)


def test_poisson_source_is_deterministic_per_seed():
    a = poisson_arrivals("core", 7, 10_000, 200)
    assert len(a) > 100
    assert np.array_equal(a, poisson_arrivals("core", 7, 10_000, 200))
    assert np.array_equal(a, poisson_arrivals("reference", 7, 10_000, 200))
    b = poisson_arrivals("core", 8, 10_000, 200)
    assert not np.array_equal(a[:50], b[:50])


def test_poisson_source_mean_inter_arrival():
    mean = 10_000
    t = poisson_arrivals("core", 3, mean, 40_000)
    gaps = np.diff(np.concatenate([[0], t]))
    assert len(gaps) > 38_000 and gaps.min() >= 1
    # 40000 exponential gaps: the sample mean is within 0.5 % (1 sigma) of the mean;
    # allow 2 % (4 sigma), and the coefficient of variation is that of an exponential.
    assert abs(gaps.mean() / mean - 1) < 0.02
    assert abs(gaps.std() / gaps.mean() - 1) < 0.03


def test_two_sources_of_a_vm_have_their_own_streams(engine):
    vm = make_vm(engine, [[g.loop([g.wfi()])], [g.loop([g.wfi()])]])
    for intid, vid in ((SPI, 0), (SPI + 1, 1)):
        vm.configure_irq(intid, enabled=True, level=False)
        vm.route_spi(intid, vcpu=vid)
        vm.add_irq_source(intid, mean_ns=20_000)
    vm.run(2_000_000)
    a, b = [ts for ts, *_ in wakeups(vm, 0)], [ts for ts, *_ in wakeups(vm, 1)]
    assert len(a) > 50 and len(b) > 50 and a[:20] != b[:20]


def test_msi_source_on_x86(engine):
    vm = make_vm(engine, [[g.loop([g.hlt()])]] * 2, arch="x86")
    vm.add_msi_source(1, 0x41, period_ns=30_000, phase_ns=5_000)
    vm.run(100_000)
    assert [ts for ts, *_ in wakeups(vm, 1)] == [5_000, 35_000, 65_000, 95_000]
    assert wakeups(vm, 0) == []


# ---------------------------------------------------------------- bad input

GIC_INTIDS = (0, 1, 16, VTIMER_IRQ, TICK_IRQ["arm64"], 32, SPI, 63)


@pytest.fixture
def live_vm(engine):
    """A 2-vCPU arm64 VM with 32 SPIs, some interrupt state, mid-run."""
    vm = make_vm(engine, [[g.timer_arm(100_000), g.loop([g.wfi()])], [g.compute(1_000_000)]],
                 nr_spis=32)
    vm.configure_irq(SPI, enabled=True, priority=0x80)
    vm.route_spi(SPI, vcpu=1)
    vm.run(10_000)
    vm.irq_line(SPI, 1)
    vm.run(20_000)
    return vm


@pytest.mark.parametrize("call, exc, match", [
    (lambda vm: vm.irq_line(3, 1), kw.KvmError, r"INTID 3 is an SGI"),
    (lambda vm: vm.irq_line(3, 1, vcpu=0), kw.KvmError, r"INTID 3 is an SGI"),
    (lambda vm: vm.irq_line(16, 1), kw.KvmError, r"PPI 16 needs a vcpu"),
    (lambda vm: vm.irq_line(64, 1), kw.KvmError, r"SPI 64 is beyond the VM's 32 SPIs"),
    (lambda vm: vm.irq_line(1019, 1), kw.KvmError, r"SPI 1019 is beyond"),
    (lambda vm: vm.configure_irq(64, enabled=True), kw.KvmError, r"SPI 64 is beyond"),
    (lambda vm: vm.configure_irq(20, enabled=True), kw.KvmError, r"INTID 20 is private"),
    (lambda vm: vm.route_spi(64, vcpu=0), kw.KvmError, r"SPI 64 is beyond"),
    (lambda vm: vm.add_irq_source(64, period_ns=1_000), kw.KvmError, r"SPI 64 is beyond"),
], ids=["sgi", "sgi-with-vcpu", "ppi-no-vcpu", "spi-64", "spi-1019", "configure-spi-64",
        "configure-ppi-no-vcpu", "route-spi-64", "source-spi-64"])
def test_rejected_with_einval_and_state_unchanged(live_vm, call, exc, match):
    before = irq_snapshot(live_vm, GIC_INTIDS)
    with pytest.raises(exc, match=match) as info:
        call(live_vm)
    assert info.value.errno == errno.EINVAL
    assert irq_snapshot(live_vm, GIC_INTIDS) == before
    live_vm.run(200_000)                 # and the run goes on as before (timer at 100000)
    assert wakeups(live_vm, 0) == [(100_000, True, 100_000)]


@pytest.mark.parametrize("call, exc, match", [
    (lambda vm: vm.configure_irq(SPI, priority=256), ValueError, r"priority = 256"),
    (lambda vm: vm.configure_irq(SPI, priority=-1), ValueError, r"priority = -1"),
    (lambda vm: vm.configure_irq(16, vcpu=0, level=False), ValueError, r"only SPIs"),
    (lambda vm: vm.configure_irq(1024, enabled=True), ValueError, r"intid = 1024"),
    (lambda vm: vm.irq_line(SPI, 2), ValueError, r"level must be 0 or 1"),
    (lambda vm: vm.irq_line(SPI, True), ValueError, r"level must be 0 or 1"),
    (lambda vm: vm.irq_line(16, 1, vcpu=2), ValueError, r"vcpu = 2"),
    (lambda vm: vm.route_spi(SPI), ValueError, r"exactly one of vcpu= or mpidr="),
    (lambda vm: vm.route_spi(SPI, vcpu=0, mpidr=0), ValueError, r"exactly one"),
    (lambda vm: vm.route_spi(SPI, mpidr=-1), ValueError, r"mpidr = -1"),
    (lambda vm: vm.add_irq_source(SPI), ValueError, r"exactly one of period_ns"),
    (lambda vm: vm.add_irq_source(SPI, period_ns=0), ValueError, r"period_ns = 0"),
    (lambda vm: vm.add_irq_source(SPI, times_ns=[5, 3]), ValueError, r"non-decreasing"),
    (lambda vm: vm.vcpus[0].set_pmr(256), ValueError, r"pmr = 256"),
    (lambda vm: vm.vcpus[0].irq_state(64), kw.KvmError, r"SPI 64 is beyond"),
], ids=["prio-256", "prio-neg", "level-ppi", "intid-1024", "level-2",
        "level-bool", "vcpu-2", "route-none", "route-both", "route-neg", "source-none",
        "period-0", "times-decreasing", "pmr-256", "irq-state-64"])
def test_rejected_arguments_leave_state_unchanged(live_vm, call, exc, match):
    before = irq_snapshot(live_vm, GIC_INTIDS)
    with pytest.raises(exc, match=match):
        call(live_vm)
    assert irq_snapshot(live_vm, GIC_INTIDS) == before


@pytest.fixture
def x86_vm(engine):
    vm = make_vm(engine, [[g.loop([g.hlt()])]] * 2, arch="x86")
    vm.run(10_000)
    vm.signal_msi(msi_address(1), 0x41)
    vm.vcpus[0].set_tpr(0x70)
    vm.signal_msi(msi_address(0), 0x61)
    vm.run(20_000)
    return vm


X86_VECTORS = (0x41, 0x61, 0xEC, 0xFD)


@pytest.mark.parametrize("call, exc, match", [
    (lambda vm: vm.irq_line(SPI, 1), kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.configure_irq(SPI, enabled=True), kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.route_spi(SPI, vcpu=0), kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.set_distributor(False), kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.distributor_enabled, kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.add_irq_source(SPI, period_ns=1_000), kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.vcpus[0].timer_state(), kw.KvmError, r"has no vGIC"),
    (lambda vm: vm.signal_msi(msi_address(2), 0x41), ValueError,
     r"MSI to APIC ID 2: no vCPU of this VM has it"),
    (lambda vm: vm.signal_msi(msi_address(200), 0x41), ValueError, r"APIC ID 200"),
    (lambda vm: vm.signal_msi(msi_address(0), 0x41, flags=1), kw.KvmError,
     r"flags 0x1 not supported"),
    (lambda vm: vm.signal_msi(msi_address(0), 0x05), ValueError, r"vector 5 is reserved"),
    (lambda vm: vm.signal_msi(0xFED0_0000, 0x41), ValueError, r"not in the LAPIC window"),
    (lambda vm: vm.signal_msi(msi_address(0), 0x141), ValueError, r"delivery mode 1"),
    (lambda vm: vm.add_msi_source(2, 0x41, period_ns=1_000), ValueError, r"apic_id = 2"),
    (lambda vm: vm.add_msi_source(0, 0x0F, period_ns=1_000), ValueError, r"vector = 15"),
    (lambda vm: vm.vcpus[0].irq_state(256), ValueError, r"intid = 256"),
], ids=["irq-line", "configure", "route", "distributor", "distributor-enabled", "source",
        "timer-state", "msi-apic-2", "msi-apic-200", "msi-flags", "msi-vector-5",
        "msi-address", "msi-mode", "msi-source-apic", "msi-source-vector", "irq-state-256"])
def test_x86_rejections_leave_state_unchanged(x86_vm, call, exc, match):
    before = irq_snapshot(x86_vm, X86_VECTORS)
    with pytest.raises(exc, match=match) as info:
        call(x86_vm)
    if isinstance(info.value, kw.KvmError):
        assert info.value.errno in (errno.ENXIO, errno.EINVAL)
        assert info.value.errno == (errno.EINVAL if "flags" in match else errno.ENXIO)
    assert irq_snapshot(x86_vm, X86_VECTORS) == before


def test_signal_msi_on_arm64_is_rejected(engine):
    vm = make_vm(engine, [[g.wfi()]])
    with pytest.raises(kw.KvmError, match="no ITS") as info:
        vm.signal_msi(msi_address(0), 0x41)
    assert info.value.errno == errno.ENODEV
    with pytest.raises(kw.KvmError, match="no ITS"):
        vm.add_msi_source(0, 0x41, period_ns=1_000)


@pytest.mark.parametrize("nr_spis", [989, -1, 1 << 20])
def test_nr_spis_out_of_range(engine, nr_spis):
    host = kw.Host(host_cpus=1, arch="arm64", engine=engine)
    with pytest.raises(ValueError, match=rf"nr_spis = {nr_spis} is out of range 0..988"):
        host.create_vm(1, nr_spis=nr_spis)
    assert host.vms == []
    vm = host.create_vm(1, nr_spis=988)                    # the largest: INTIDs up to 1019
    vm.configure_irq(1019, enabled=True)
    assert vm.vcpus[0].irq_state(1019)["enabled"]


@pytest.mark.parametrize("arch, items, match", [
    ("arm64", [g.sgi(16, 0)], r"op 0: SGI 16 out of range 0..15"),
    ("arm64", [g.compute(1), g.sgi(255, "all-but-self")], r"op 1: SGI 255 out of range"),
    ("x86", [g.sgi(15, 0)], r"op 0: IPI vector 15 out of range 16..255"),
    ("x86", [g.sgi(0, 1)], r"op 0: IPI vector 0 out of range"),
    ("x86", [g.irq_enable(40)], r"op 0: IRQ_ENABLE is an arm64 GIC op; x86 has none"),
    ("x86", [g.set_priority(3, 0)], r"op 0: SET_PRIORITY is an arm64 GIC op"),
    ("x86", [g.dist_enable()], r"op 0: DIST_ENABLE is an arm64 GIC op"),
    ("x86", [g.route_spi(40, 0)], r"op 0: ROUTE_SPI is an arm64 GIC op"),
    ("x86", [g.timer_arm(1_000)], r"op 0: TIMER_ARM: the arch timer is arm64's"),
    ("x86", [g.timer_cancel()], r"op 0: TIMER_CANCEL: the arch timer is arm64's"),
    ("arm64", [g.irq_enable(64)], r"op 0: IRQ_ENABLE: INTID 64 does not exist "
                                  r"\(the VM has INTIDs 0..63\)"),
    ("arm64", [g.route_spi(64, 0)], r"op 0: ROUTE_SPI: INTID 64 does not exist"),
    ("arm64", [g.set_priority(1019, 0)], r"INTID 1019 does not exist"),
    ("arm64", [g.sgi(1, [0, 2])], r"op 0: SGI target vCPU 2 does not exist \(the VM has 2\)"),
], ids=["sgi-16", "sgi-255", "vector-15", "vector-0", "x86-enable", "x86-priority",
        "x86-dist", "x86-route", "x86-timer", "x86-cancel", "spi-64", "route-64",
        "priority-1019", "sgi-list"])
def test_bad_programs_rejected_at_load(engine, arch, items, match):
    vm = kw.VM(arch=arch, nr_vcpus=2, engine=engine, nr_spis=32)
    vm.vcpus[0].load([g.wfi()])
    intids = X86_VECTORS if arch == "x86" else GIC_INTIDS
    before = irq_snapshot(vm, intids)
    with pytest.raises(kw.ProgramError, match=match):
        vm.vcpus[1].load(items)
    assert irq_snapshot(vm, intids) == before
    vm.run(10_000)                       # vCPU 1 has no program: it never runs
    assert vm.vcpus[1].thread_state == "USER" and vm.vcpus[0].thread_state == "BLOCKED"


def test_programs_within_the_limits_load(engine):
    vm = kw.VM(arch="arm64", nr_vcpus=2, engine=engine, nr_spis=32)
    vm.vcpus[0].load([g.sgi(15, 1), g.irq_enable(63), g.route_spi(63, 1), g.wake(1)])
    xvm = kw.VM(arch="x86", nr_vcpus=2, engine=engine)
    xvm.vcpus[0].load([g.sgi(16, 1), g.sgi(255, [0, 1]), g.set_tpr(0x40), g.wake(1)])


# ---------------------------------------------------------------- the irq-storm scenario

def test_irq_storm_scenario_engines_agree():
    """The built-in ``irq-storm`` at a small size: both engines give exactly the same run."""
    try:
        from kvmwake import scenarios
        names = scenarios.names()
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"kvmwake.scenarios cannot list its scenarios: {exc}")
    if "irq-storm" not in names:
        pytest.skip("the irq-storm scenario is not built in (yet)")
    runs = {}
    for engine in ENGINES:
        host, _, sc = scenarios.build("irq-storm", vcpus=8, host_cpus=4, sim_ns=10_000_000,
                                      seed=11, engine=engine, trace_capacity=1 << 20)
        host.run(10_000_000)
        vm = host.vms[0]
        intids = (0, VTIMER_IRQ, 32, 33, 39, 32 + vm.nr_spis - 1)
        runs[engine] = {
            "now": host.now, "events": host.events, "halts": host.halts,
            "stats": vm.stats_array().tolist(),
            "lat": host.latency_histogram().tolist(),
            "trace": vm.trace_records().tolist(),
            "irq": [[v.irq_state(i) for i in intids] for v in vm.vcpus],
            "timer": [v.timer_state() for v in vm.vcpus],
            "threads": [v.thread_state for v in vm.vcpus],
        }
    core, ref = runs["core"], runs["reference"]
    for key in core:
        assert core[key] == ref[key], f"irq-storm: {key} differs between the engines"
    # It was a storm: one VM of 8 vCPUs with every SPI a Poisson source (mean 4 ms).
    vm_spis = 32 + 988 - 1
    assert core["irq"][0][-1]["target"] == (vm_spis - 32) % 8
    # About 2470 arrivals over the 8 vCPUs in 10 ms.
    assert core["halts"] > 500
    assert sum(row[3] for row in core["stats"]) > 500          # halt_wakeup
    for t in core["timer"]:
        # Each vCPU armed its 4 ms periodic timer as it started (within its first
        # 100 us) and took it twice: CVAL moved on by two periods.
        assert t["period"] == 4_000_000 and t["ctl"] == ENABLE
        assert 12_000_000 < t["cval"] < 12_100_000
