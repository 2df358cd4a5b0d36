"""x86 HLT with an in-kernel LAPIC, as arch/x86/kvm/x86.c does it.

* ``__kvm_emulate_halt``: ``halt_exits`` counts every emulated HLT; the vCPU
  becomes ``KVM_MP_STATE_HALTED`` unless ``kvm_vcpu_has_events``, in which case
  it stays RUNNABLE and ``kvm_vcpu_halt`` is never entered.
* ``vcpu_block``: a signal (or another host event) ends the halt without
  changing the activity state, so KVM_RUN returns -EINTR / KVM_EXIT_INTR with
  the vCPU still HALTED, and the next KVM_RUN halts again (RIP is already past
  the HLT).  Only ``kvm_arch_vcpu_runnable`` makes it RUNNABLE.
* ``kvm_arch_vcpu_ioctl_get_mpstate`` reads HALTED while it is halted, and a
  snapshot taken then restores a halted vCPU.
"""

from __future__ import annotations

import errno

import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.uapi import ExitReason, MpState

ENGINES = ("core", "reference")
ZERO = {"vm_exit_ns": 0, "vm_entry_ns": 0, "ipi_send_ns": 0, "wake_to_run_ns": 0,
        "context_switch_ns": 0}


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def x86_vm(engine, n=1, poll=0, costs=None):
    vm = kw.VM(arch="x86", nr_vcpus=n, engine=engine, costs=costs)
    vm.host.halt_poll_ns = poll
    return vm


def msi(vm, apic_id, vector):
    vm.signal_msi(0xFEE0_0000 | (apic_id << 12), vector)


def wakeup_records(vm):
    r = vm.trace_records()
    return int((r["kind"] == 0).sum())


def test_hlt_sets_halted_and_an_interrupt_makes_it_runnable(engine):
    """__kvm_emulate_halt: HALTED while it waits; vcpu_block: RUNNABLE once woken."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.hlt(), g.sync(1), g.end()])
    vm.run(50_000)                       # inside KVM_RUN (vm.run starts it), halted
    assert v.thread_state == "BLOCKED"
    v.signal()
    ex = v.run()
    assert ex.reason == ExitReason.INTR
    assert v.get_mp_state() == MpState.HALTED
    msi(vm, 0, 0x41)
    assert v.get_mp_state() == MpState.HALTED     # still HALTED until the next KVM_RUN
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 1
    assert v.get_mp_state() == MpState.RUNNABLE


def test_signal_leaves_the_vcpu_halted_and_it_keeps_halting(engine):
    """vcpu_block: 'If the vCPU is not runnable, a signal or another host event ...
    service it without changing the vCPU's activity state': KVM_RUN returns
    KVM_EXIT_INTR, the vCPU reads HALTED, and re-entering blocks again instead of
    going on past the HLT."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.hlt(), g.sync(1), g.end()])
    for _ in range(3):
        ex = v.run(timeout_ns=100_000)      # the watchdog's signal ends each KVM_RUN
        assert ex.reason == ExitReason.INTR
        assert v.get_mp_state() == MpState.HALTED
    st = v.stats()
    assert st["halt_exits"] == 1               # one HLT, halted across three KVM_RUNs
    t = vm.host.now
    msi(vm, 0, 0x41)
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 1 and ex.time_ns >= t
    assert v.get_mp_state() == MpState.RUNNABLE


def test_hlt_with_an_event_pending_counts_no_poll(engine):
    """A HLT that finds a deliverable interrupt pending is no halt at all
    (__kvm_emulate_halt leaves the vCPU RUNNABLE, vcpu_run enters the guest): no
    poll attempted or counted successful, no kvm_vcpu_wakeup; halt_exits counts it.

    The first HLT blocks and is woken at 10000, which grows the poll window to
    10000 ns; the vCPU re-enters at 16000, computes 5000 ns and leaves the guest
    for the second HLT at 21000 (trap at 22000).  The MSI at 21500 arrives in that
    exit: the second HLT finds it pending (the old model counted a 0 ns
    successful poll for it)."""
    vm = x86_vm(engine, poll=200_000)
    v = vm.vcpus[0]
    v.load([g.hlt(), g.compute(5_000), g.hlt(), g.sync(1), g.end()])
    vm.run(10_000)
    msi(vm, 0, 0x41)
    vm.run(21_500)
    assert v.thread_state == "RUNNING" and v.halt_poll_ns == 10_000
    msi(vm, 0, 0x42)
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 1 and ex.time_ns == 24_000
    st = v.stats()
    assert st["halt_exits"] == 2 and st["halt_wakeup"] == 1
    assert st["halt_attempted_poll"] == 0 and st["halt_successful_poll"] == 0
    assert st["halt_poll_success_ns"] == 0 and wakeup_records(vm) == 1
    assert v.get_mp_state() == MpState.RUNNABLE and not v.irq_state(0x42)["irr"]


def test_cli_hlt_halts_with_an_interrupt_pending(engine):
    """kvm_vcpu_has_events needs kvm_arch_interrupt_allowed (IF = 1): after cli; hlt a
    pending interrupt is no event, and the vCPU is HALTED."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.mask(), g.sync(1), g.hlt(), g.sync(2), g.end()])
    assert v.run().value == 1
    msi(vm, 0, 0x41)
    ex = v.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.INTR and v.get_mp_state() == MpState.HALTED
    assert v.irq_state(0x41)["irr"]


def test_set_mp_state_halted_with_an_event_pending_enters_the_guest(engine):
    """vcpu_block: kvm_vcpu_halt only if not kvm_arch_vcpu_runnable; a runnable
    HALTED vCPU becomes RUNNABLE and enters at once."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(7), g.end()])
    v.set_mp_state(MpState.HALTED)
    msi(vm, 0, 0x41)
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 7 and ex.time_ns < 20_000
    assert v.get_mp_state() == MpState.RUNNABLE
    assert v.stats()["halt_attempted_poll"] == 0 and wakeup_records(vm) == 0


def test_halted_vcpu_survives_snapshot_and_restore():
    """Save while HALTED, restore, and it is still halted: it blocks again on the
    next KVM_RUN and leaves the HLT only when an interrupt arrives."""
    vm = x86_vm("core")
    v = vm.vcpus[0]
    v.load([g.hlt(), g.sync(1), g.end()])
    assert v.run(timeout_ns=100_000).reason == ExitReason.INTR
    assert v.get_mp_state() == MpState.HALTED
    vm2 = kw.VM.restore(vm.snapshot())
    w = vm2.vcpus[0]
    assert w.get_mp_state() == MpState.HALTED
    assert w.run(timeout_ns=100_000).reason == ExitReason.INTR
    assert w.get_mp_state() == MpState.HALTED and w.stats()["halt_exits"] == 1
    msi(vm2, 0, 0x41)
    ex = w.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 1


def test_blocking_stat_is_set_only_inside_kvm_vcpu_block(engine):
    """The binary `blocking` stat (kvm_vcpu_block): 1 while blocked, 0 while polling
    (kvm_vcpu_halt polls before kvm_vcpu_block), 0 once woken."""
    vm = x86_vm(engine, poll=50_000, costs=ZERO)
    v = vm.vcpus[0]
    v.load([g.hlt(), g.hlt(), g.sync(1), g.end()])
    vm.run(10_000)                       # the first halt: window 0, blocked at once
    assert v.thread_state == "BLOCKED" and v.blocking and v.stats()["blocking"] == 1
    assert vm.stats()["blocking"] == 1
    msi(vm, 0, 0x41)                     # woken; the window grows to 10000; 2nd HLT polls
    vm.run(15_000)
    assert v.thread_state == "POLLING" and not v.blocking and v.stats()["blocking"] == 0
    vm.run(30_000)                       # the poll ran out at 20000: blocked
    assert v.thread_state == "BLOCKED" and v.blocking
    msi(vm, 0, 0x41)
    ex = v.run()
    assert ex.value == 1 and not v.blocking and v.stats()["blocking"] == 0


def test_blocking_is_0_for_a_stopped_arm64_vcpu(engine):
    """kvm_vcpu_sleep (a powered-off arm64 vCPU) is not kvm_vcpu_block."""
    vm = kw.VM(arch="arm64", nr_vcpus=2, engine=engine)
    v = vm.vcpus[1]
    v.init(power_off=True)
    v.load([g.sync(1), g.end()])
    vm.run(100_000)
    assert v.thread_state == "BLOCKED" and not v.blocking


# -- the arch's own names ---------------------------------------------------------------------

def test_x86_names_and_arm64_names_refuse_the_other_arch(engine):
    x86 = x86_vm(engine)
    arm = kw.VM(arch="arm64", nr_vcpus=1, engine=engine)
    xv, av = x86.vcpus[0], arm.vcpus[0]
    for call, right in ((lambda: xv.set_pmr(0x40), "set_tpr"),
                        (lambda: xv.set_masked(True), "set_interrupt_flag"),
                        (lambda: xv.raise_sgi(1), "send_ipi"),
                        (lambda: av.set_tpr(0x40), "set_pmr"),
                        (lambda: av.set_interrupt_flag(True), "set_masked"),
                        (lambda: av.send_ipi(0x41), "raise_sgi")):
        with pytest.raises(kw.KvmError, match=right) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
    assert xv.irq_state(0x41) == {"irr": False, "isr": False, "tpr": 0, "masked": False}
    xv.set_tpr(0x50)
    xv.set_interrupt_flag(False)
    assert xv.irq_state(0x41) == {"irr": False, "isr": False, "tpr": 0x50, "masked": True}
    xv.send_ipi(0x61)
    assert xv.irq_state(0x61)["irr"]
    av.raise_sgi(5)
    assert av.irq_state(5)["pending"]
    with pytest.raises(ValueError):
        xv.send_ipi(15)
    with pytest.raises(ValueError):
        av.raise_sgi(16)


def _x86_session(engine, seed):
    """A random x86 session: HLT loops, MSIs, IPIs, TPR / IF writes, MP-state writes,
    signals and runs; everything userspace can see."""
    import random
    rnd = random.Random(seed)
    n = rnd.randint(1, 3)
    vm = kw.VM(arch="x86", nr_vcpus=n, engine=engine, seed=seed)
    vm.host.halt_poll_ns = rnd.choice([0, 20_000, 200_000])
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(15_000), g.hlt(), g.sync(v.id)], 8), g.end()])
    out = []
    for _ in range(30):
        k = rnd.randrange(8)
        v = vm.vcpus[rnd.randrange(n)]
        try:
            if k == 0:
                msi(vm, v.id, rnd.choice([0x41, 0x61, 0xEC]))
            elif k == 1:
                v.send_ipi(rnd.choice([0x41, 0xFD]))
            elif k == 2:
                v.set_tpr(rnd.choice([0, 0x50, 0x70]))
            elif k == 3:
                v.set_interrupt_flag(rnd.random() < 0.7)
            elif k == 4:
                v.set_mp_state(rnd.choice([MpState.RUNNABLE, MpState.HALTED]))
            elif k == 5:
                v.signal()
            elif k == 6:
                vm.run(vm.host.now + rnd.randrange(1, 60_000))
            else:
                ex = v.run(timeout_ns=rnd.choice([20_000, 100_000]))
                out.append((v.id, repr(ex), int(v.get_mp_state())))
        except kw.KvmError as exc:
            out.append(("err", exc.errno))
        out.append(tuple(int(w.get_mp_state()) for w in vm.vcpus))
        out.append(tuple(w.blocking for w in vm.vcpus))
    return out, vm.stats_array().tolist(), vm.trace_text(), vm.host.now


@pytest.mark.parametrize("seed", range(6))
def test_engines_agree_on_random_x86_halt_sessions(seed):
    assert _x86_session("core", seed) == _x86_session("reference", seed)


def test_blocking_while_waiting_for_init(engine):
    """x86 UNINITIALIZED: vcpu_run -> kvm_vcpu_block, so `blocking` is 1 (until the
    signal that ends the wait)."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    v.set_mp_state(MpState.UNINITIALIZED)
    vm.run(50_000)
    assert v.thread_state == "BLOCKED" and v.blocking
    v.signal()
    assert v.run().reason == ExitReason.INTR and not v.blocking


# -- halt_exits and the sti; hlt interrupt shadow (kvm_emulate_halt) --------------------------

def test_halt_exits_counts_at_the_hlt_exit(engine):
    """kvm_emulate_halt counts halt_exits when it handles the exit: not while the
    guest still computes before its HLT.  Entry 0-1000, guest 1000-21000, the HLT's
    exit 21000-22000, handled at 22000."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.compute(20_000), g.hlt(), g.sync(1), g.end()])
    vm.run(21_500)
    assert v.stats()["halt_exits"] == 0
    vm.run(22_001)
    assert v.stats()["halt_exits"] == 1 and v.thread_state == "BLOCKED"
    assert v.get_mp_state() == MpState.HALTED


def test_sti_hlt_takes_a_pending_interrupt_after_the_hlt_exit(engine):
    """sti; hlt with an interrupt already pending: the STI shadow covers the HLT, which
    exits (halt_exits 1); __kvm_emulate_halt finds the event, so no kvm_vcpu_halt (no
    halt stat, no kvm_vcpu_wakeup, halt_poll_ns unchanged) and the interrupt is taken
    at the next entry.  Times: exit of sync(1) handled at 2000, the MSI then; KVM_RUN
    enters at 3000 (entry 1000), sti and hlt at 3000, the HLT's exit handled at 4000,
    re-entry at 5000 takes the interrupt (handler time 0), sync(2) exits 5000-6000."""
    vm = x86_vm(engine, poll=200_000)
    v = vm.vcpus[0]
    v.load([g.cli(), g.sync(1), g.sti(), g.hlt(), g.sync(2), g.end()])
    assert v.run().time_ns == 2_000
    msi(vm, 0, 0x41)
    ex = v.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.MMIO and ex.value == 2 and ex.time_ns == 6_000
    st = v.stats()
    assert st["halt_exits"] == 1
    assert st["halt_attempted_poll"] == st["halt_successful_poll"] == st["halt_wakeup"] == 0
    assert wakeup_records(vm) == 0 and v.halt_poll_ns == 0
    assert v.get_mp_state() == MpState.RUNNABLE
    assert v.irq_state(0x41) == {"irr": False, "isr": False, "tpr": 0, "masked": False}


def test_sti_then_other_work_takes_the_interrupt_at_once(engine):
    """The shadow lasts one instruction: sti followed by anything but hlt takes a
    pending interrupt right away, and the HLT after it halts (no event pending)."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.cli(), g.sync(1), g.sti(), g.compute(1_000), g.hlt(), g.sync(2), g.end()])
    v.run()
    msi(vm, 0, 0x41)
    ex = v.run(timeout_ns=50_000)
    assert ex.reason == ExitReason.INTR and v.get_mp_state() == MpState.HALTED
    assert v.stats()["halt_exits"] == 1 and not v.irq_state(0x41)["irr"]


def test_arm64_wfi_keeps_its_counting_and_takes_interrupts_at_unmask(engine):
    """arm64 is unchanged: wfi_exit_stat counts when the guest executes the WFI (the
    count shows before the exit is handled) and an unmask takes a pending interrupt at
    once (no interrupt shadow), so the WFI then halts."""
    vm = kw.VM(arch="arm64", nr_vcpus=1, engine=engine)
    v = vm.vcpus[0]
    v.load([g.compute(20_000), g.wfi(), g.sync(1), g.end()])
    vm.run(21_500)
    assert v.stats()["wfi_exit_stat"] == 1
    vm2 = kw.VM(arch="arm64", nr_vcpus=1, engine=engine)
    w = vm2.vcpus[0]
    w.load([g.mask(), g.sync(1), g.unmask(), g.wfi(), g.sync(2), g.end()])
    w.run()
    w.raise_sgi(1)
    ex = w.run(timeout_ns=50_000)
    assert ex.reason == ExitReason.INTR and w.stats()["wfi_exit_stat"] == 1


@pytest.mark.parametrize("iret, halt_exits", [(True, 2), (False, 4)])
def test_handler_without_iret_takes_each_interrupt_after_a_hlt_exit(engine, iret, halt_exits):
    """The micro-VM's guest (kvmwake/kernel/microvm.py): its handler EOIs and jumps back
    to sti; hlt without an iret, so IF stays 0 and interrupts that arrived during the
    handler wait for the sti; hlt: each is taken after a HLT exit that finds it
    pending (no kvm_vcpu_halt).

    HLT exit at 2000 (halt_exits 1), blocked; MSI 0x41 at 50000 wakes it (halt_wakeup,
    one kvm_vcpu_wakeup), the handler runs 56000-66000; 0x52 and 0x63 arrive at 60000.
    With iret the handler's end takes them back to back, then one HLT exit halts
    (halt_exits 2).  Without: sti; hlt, a HLT exit at 67000 finds 0x52 (2), its
    handler 68000-78000, a HLT exit at 79000 finds 0x63 (3), its handler to 90000,
    the HLT exit at 91000 finds nothing and halts (4)."""
    vm = x86_vm(engine)
    v = vm.vcpus[0]
    v.load([g.set_handler(10_000, iret=iret), g.loop([g.sti(), g.hlt()])])
    vm.run(50_000)
    msi(vm, 0, 0x41)
    vm.run(60_000)
    msi(vm, 0, 0x52)
    msi(vm, 0, 0x63)
    vm.run(200_000)
    st = v.stats()
    assert st["halt_exits"] == halt_exits
    assert st["halt_wakeup"] == 1 and wakeup_records(vm) == 1
    assert st["halt_attempted_poll"] == 0 and v.thread_state == "BLOCKED"
    assert v.get_mp_state() == MpState.HALTED
    assert v.irq_state(0x63) == {"irr": False, "isr": False, "tpr": 0, "masked": False}


def test_set_handler_iret_is_checked():
    with pytest.raises(g.ProgramError, match="iret must be True or False"):
        g.set_handler(1_000, iret=0)
    ops = g.Program([g.set_handler(1_000), g.end()]).ops.copy()
    ops["arg"][0] = 2
    with pytest.raises(g.ProgramError, match="iret flag 2"):
        g.validate(ops, 1, "x86")
