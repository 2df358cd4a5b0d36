"""VCpu.run(): one KVM_RUN (spec sections 4, 7.1, 8 and 15 item 6; gotchas 1, 8, 9).

A SUSPENDED vCPU halts (with halt polling) and exits WAKEUP each time it is
runnable, staying SUSPENDED; a STOPPED one sleeps; signals, immediate_exit and
the watchdog give INTR; ucalls, DONE and INTERNAL_ERROR; other vCPUs keep
running during one vCPU's run() and their exits wait for their own run().
"""

import errno

import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.model import COST_DEFAULTS, mpidr_of
from kvmwake.uapi import Cap, ExitReason, MpState, PsciFn, SystemEventType

ENGINES = ("core", "reference")
U64 = (1 << 64) - 1
WAKE_TO_RUN = COST_DEFAULTS["wake_to_run_ns"]

pytestmark = pytest.mark.parametrize("engine", ENGINES)


def make_vm(engine, n=1, **kwargs):
    return kw.VM(arch="arm64", nr_vcpus=n, engine=engine, **kwargs)


def is_wakeup(ex):
    return (ex.reason == ExitReason.SYSTEM_EVENT
            and ex.system_event.type == SystemEventType.WAKEUP
            and ex.system_event.ndata == 0 and ex.system_event.data == ())


def run_done(vcpu, **kwargs):
    syncs = []
    while True:
        ex = vcpu.run(**kwargs)
        if ex.reason == ExitReason.MMIO and ex.ucall == "SYNC":
            syncs.append(ex.value)
            continue
        assert ex.reason == ExitReason.MMIO and ex.ucall == "DONE", ex
        return syncs


def spi(vm, intid, vcpu=0, **source):
    vm.configure_irq(intid, enabled=True)
    vm.route_spi(intid, vcpu=vcpu)
    if source:
        vm.add_irq_source(intid, **source)


# -- a SUSPENDED vCPU (item 6) -------------------------------------------------------------

def test_suspended_vcpu_halts_polls_and_exits_wakeup(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(0xAA), g.end()])
    spi(vm, 40, times_ns=[20_000])
    spi(vm, 41)
    v.set_mp_state(MpState.SUSPENDED)

    # 1. No poll window yet: it blocks; the SPI wakes it (try_to_wake_up, then the exit).
    ex = v.run()
    assert is_wakeup(ex)
    assert ex.time_ns == 20_000 + WAKE_TO_RUN
    assert v.get_mp_state() == MpState.SUSPENDED
    st = v.stats()
    assert st["halt_attempted_poll"] == 0 and st["halt_wakeup"] == 1
    assert st["halt_wait_ns"] > 0 and st["wfi_exit_stat"] == 0
    assert v.halt_poll_ns == vm.host.halt_poll_ns_grow_start       # grown from 0

    # 2. Re-entering with the SPI still pending: WAKEUP again at once, same virtual time.
    for _ in range(3):
        ex2 = v.run()
        assert is_wakeup(ex2) and ex2.time_ns == ex.time_ns
        assert v.get_mp_state() == MpState.SUSPENDED
    st = v.stats()
    assert st["halt_attempted_poll"] == 3 and st["halt_successful_poll"] == 3
    assert vm.host.now == ex.time_ns

    # 3. Userspace masks the SPI; another one, 3 us in, lands inside the poll window.
    vm.configure_irq(40, enabled=False)
    t_spi = vm.host.now + 3_000
    vm.add_irq_source(41, times_ns=[t_spi])
    ex3 = v.run()
    assert is_wakeup(ex3) and ex3.time_ns == t_spi              # no scheduler delay
    st3 = v.stats()
    assert st3["halt_attempted_poll"] == 4 and st3["halt_successful_poll"] == 4
    assert st3["halt_poll_success_ns"] >= 3_000
    assert st3["halt_wakeup"] == 1                              # polling: no wake-up
    assert v.get_mp_state() == MpState.SUSPENDED

    # 4. Nothing pending: the poll fails, it blocks; the watchdog's signal gives INTR,
    #    and it is still SUSPENDED (gotcha 8).
    vm.configure_irq(41, enabled=False)
    t0 = vm.host.now
    ex4 = v.run(timeout_ns=200_000)
    assert ex4.reason == ExitReason.INTR
    assert ex4.time_ns >= t0 + 200_000
    assert v.get_mp_state() == MpState.SUSPENDED
    st4 = v.stats()
    assert st4["halt_attempted_poll"] == 5 and st4["halt_successful_poll"] == 4
    assert st4["halt_poll_fail_ns"] > 0

    # 5. RUNNABLE: the guest runs again (WFI emulation never moved the PC).
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [0xAA]


def test_suspended_vcpu_woken_by_its_timer_inside_the_poll_window(engine):
    """SYSTEM_SUSPEND, honoured by setting SUSPENDED; the guest's timer wakes it while
    KVM polls: WAKEUP at the deadline exactly, a successful poll, the PC still after the
    HVC (gotcha 9)."""
    vm = make_vm(engine)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    v = vm.vcpus[0]
    prog = [g.timer_arm(30_000), g.wfi(), g.timer_arm(8_000)] + \
        g.psci(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(0), 0x77)
    after_hvc = vm.code_address(len(prog))
    v.load(prog + [g.sync_reg(0), g.sync_reg(2), g.end()])
    ex = v.run()
    assert ex.reason == ExitReason.SYSTEM_EVENT
    assert ex.system_event.type == SystemEventType.SUSPEND and ex.system_event.ndata == 0
    assert v.get_reg("pc") == after_hvc
    st = v.stats()
    assert st["wfi_exit_stat"] == 1 and st["halt_attempted_poll"] == 0
    assert v.halt_poll_ns == 10_000                  # grown by the first (WFI) halt
    deadline = v.timer_state()["cval"]
    assert ex.time_ns < deadline < ex.time_ns + 10_000
    v.set_mp_state(MpState.SUSPENDED)
    ex2 = v.run()
    assert is_wakeup(ex2)
    assert ex2.time_ns == deadline
    st2 = v.stats()
    assert st2["halt_attempted_poll"] == 1 and st2["halt_successful_poll"] == 1
    assert st2["wfi_exit_stat"] == 1                 # emulated WFI: no trap counted
    assert v.get_reg("pc") == after_hvc
    assert v.get_mp_state() == MpState.SUSPENDED
    # The timer's line stays high: WAKEUP again at once.
    ex3 = v.run()
    assert is_wakeup(ex3) and ex3.time_ns == deadline
    assert v.get_reg("pc") == after_hvc
    v.set_mp_state(MpState.RUNNABLE)
    # x0/x2 as KVM left them (the SMCCC arguments): no VMM wrote anything.
    assert run_done(v) == [PsciFn.FN64_SYSTEM_SUSPEND, 0x77]


def test_suspended_vcpu_woken_by_a_line_raised_between_runs(engine):
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.set_mp_state(MpState.SUSPENDED)
    v1.load([g.sync(1), g.end()])
    spi(vm, 50, vcpu=1)
    ex = v1.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.INTR and v1.get_mp_state() == MpState.SUSPENDED
    vm.irq_line(50, 1)
    ex = v1.run()
    assert is_wakeup(ex) and ex.time_ns == vm.host.now
    vm.irq_line(50, 0)                     # userspace suppresses the wake source
    assert v1.run(timeout_ns=50_000).reason == ExitReason.INTR
    assert v1.get_mp_state() == MpState.SUSPENDED
    # An SPI routed elsewhere does not wake it.
    spi(vm, 51, vcpu=0)
    vm.irq_line(51, 1)
    assert v1.run(timeout_ns=50_000).reason == ExitReason.INTR
    assert v0.get_mp_state() == MpState.RUNNABLE


def test_signal_before_kvm_run_gives_intr_and_suspended_stays(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    v.set_mp_state(MpState.SUSPENDED)
    v.signal()
    t0 = vm.host.now
    ex = v.run()
    assert ex.reason == ExitReason.INTR and ex.time_ns == t0
    assert v.get_mp_state() == MpState.SUSPENDED
    assert v.stats()["halt_wakeup"] == 0


def test_suspended_vcpu_signalled_while_inside_kvm_run(engine):
    """Under vm.run (default policy), a signal to a blocked SUSPENDED vCPU is an INTR
    exit; the policy re-enters and it blocks again, still SUSPENDED."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    v.set_mp_state(MpState.SUSPENDED)
    vm.run(100_000)
    assert v.thread_state == "BLOCKED"
    exits = vm.exits
    v.signal()
    vm.run(200_000)
    assert vm.exits == exits + 1
    assert v.thread_state == "BLOCKED"
    assert v.get_mp_state() == MpState.SUSPENDED


# -- a STOPPED vCPU -----------------------------------------------------------------------------

def test_stopped_vcpu_sleeps_until_signalled(engine):
    vm = make_vm(engine, 2)
    v = vm.vcpus[1]
    v.init(power_off=True)
    v.load([g.sync(1), g.end()])
    t0 = vm.host.now
    ex = v.run(timeout_ns=300_000)
    assert ex.reason == ExitReason.INTR and ex.time_ns >= t0 + 300_000
    assert v.get_mp_state() == MpState.STOPPED
    st = v.stats()
    assert st["halt_attempted_poll"] == 0 and st["halt_wakeup"] == 0   # a sleep, no halt
    v.signal()
    assert v.run().reason == ExitReason.INTR
    assert v.get_mp_state() == MpState.STOPPED


def test_stopped_vcpu_woken_by_another_vcpus_cpu_on(engine):
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.init(power_off=True)
    v1.load([g.sync(0xBAD), g.sync_reg(0), g.end()])
    on_at = 40_000
    v0.load([g.compute(on_at)] + g.psci(PsciFn.FN64_CPU_ON, mpidr_of(1), vm.code_address(1),
                                         0xF00D) + [g.sync_reg(0), g.end()])
    vm.run(1_000)                        # both inside KVM_RUN; v1 sleeps
    assert v1.thread_state == "BLOCKED"
    ex = v1.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 0xF00D
    assert ex.time_ns > on_at
    assert v1.get_mp_state() == MpState.RUNNABLE
    assert v1.stats()["halt_wakeup"] == 1      # kvm_vcpu_wake_up on the sleeping vCPU
    assert v0.outside_run                   # v0 synced meanwhile; its exit is held
    ex0 = v0.run()
    assert ex0.ucall == "SYNC" and ex0.value == 0 and ex0.time_ns < ex.time_ns


# -- INTR: immediate_exit and the watchdog ---------------------------------------------------------

def immediate_exit(v):
    """KVM_RUN with kvm_run->immediate_exit set: the errno of the -EINTR return."""
    with pytest.raises(kw.KvmError) as ei:
        v.run(immediate_exit=True)
    return ei.value.errno


def test_immediate_exit(engine):
    """kvm_arch_vcpu_ioctl_run (arm64 and x86): with immediate_exit KVM_RUN returns
    -EINTR before run->exit_reason is written, so exit_reason keeps its old value;
    it is not a KVM_EXIT_INTR exit (kvm_handle_signal_exit is not reached)."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    t0 = vm.host.now
    assert immediate_exit(v) == errno.EINTR          # even without a program
    assert v.exit_reason == ExitReason.UNKNOWN and vm.host.now == t0
    v.load([g.compute(5_000), g.sync(9), g.sync(10), g.end()])
    assert immediate_exit(v) == errno.EINTR
    assert vm.host.now == t0 and v.outside_run
    ex = v.run()
    assert ex.reason == ExitReason.MMIO and ex.value == 9
    assert immediate_exit(v) == errno.EINTR
    assert v.exit_reason == ExitReason.MMIO          # left unchanged
    v.set_mp_state(MpState.SUSPENDED)
    assert immediate_exit(v) == errno.EINTR
    assert v.get_mp_state() == MpState.SUSPENDED and v.exit_reason == ExitReason.MMIO
    if engine == "core":                             # kept in a snapshot
        w = kw.VM.restore(vm.snapshot()).vcpus[0]
        assert immediate_exit(w) == errno.EINTR and w.exit_reason == ExitReason.MMIO
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [10]
    assert v.exit_reason == ExitReason.MMIO
    x86 = kw.VM(arch="x86", nr_vcpus=1, engine=engine)
    assert immediate_exit(x86.vcpus[0]) == errno.EINTR


def test_watchdog_timeout_gives_intr_and_the_guest_resumes(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.compute(1_000_000), g.sync(1), g.end()])
    ex = v.run(timeout_ns=300_000)
    assert ex.reason == ExitReason.INTR
    assert 300_000 <= ex.time_ns < 320_000
    assert v.get_mp_state() == MpState.RUNNABLE
    ex = v.run(timeout_ns=300_000)
    assert ex.reason == ExitReason.INTR
    ex = v.run()
    assert ex.ucall == "SYNC" and ex.value == 1
    assert 1_000_000 <= ex.time_ns < 1_100_000       # the compute was not restarted


def test_run_argument_errors(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    with pytest.raises(kw.KvmError) as ei:
        v.run()
    assert ei.value.errno == errno.ENOEXEC
    v.load([g.end()])
    for bad in (0, -5, 1 << 63):
        with pytest.raises(ValueError):
            v.run(timeout_ns=bad)
    with pytest.raises(TypeError):
        v.run(timeout_ns=1.5)
    assert v.run().ucall == "DONE"


# -- ucalls, DONE, INTERNAL_ERROR -----------------------------------------------------------------

def test_guest_sync_carries_the_value_and_done(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(0), g.sync(U64), g.set_reg(2, 0x1234_5678_9ABC_DEF0), g.sync_reg(2),
            g.sync_reg(3), g.end()])
    v.set_reg("x3", 0x33)
    exits = [v.run() for _ in range(5)]
    assert [e.reason for e in exits] == [ExitReason.MMIO] * 5
    assert [e.ucall for e in exits] == ["SYNC"] * 4 + ["DONE"]
    assert [e.value for e in exits] == [0, U64, 0x1234_5678_9ABC_DEF0, 0x33, None]
    assert all(a.time_ns < b.time_ns for a, b in zip(exits, exits[1:]))
    assert v.outside_run and v.thread_state == "USER"
    assert v.run().ucall == "DONE"           # the PC stays on the END


def test_pc_outside_the_program_is_internal_error(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.sync(2), g.end()])
    for pc in (0, 0x1000, vm.code_address(0) - 4, vm.code_address(0) + 2,
               vm.code_address(3), vm.code_address(1000), U64 & ~3):
        v.set_reg("pc", pc)
        t0 = vm.host.now
        ex = v.run()
        assert ex.reason == ExitReason.INTERNAL_ERROR and ex.time_ns == t0
        assert v.get_reg("pc") == pc                 # and it stays there
        assert v.run().reason == ExitReason.INTERNAL_ERROR
    v.set_reg("pc", vm.code_address(1))
    assert run_done(v) == [2]


def test_a_new_program_resets_the_pc(engine):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    v.set_reg("pc", 0x10)
    assert v.run().reason == ExitReason.INTERNAL_ERROR
    v.load([g.sync(2), g.end()])
    assert run_done(v) == [2]


# -- other vCPUs during one vCPU's run() -----------------------------------------------------------

def test_other_vcpus_progress_and_their_exits_are_held(engine):
    vm = make_vm(engine, 3)
    v0, v1, v2 = vm.vcpus
    v0.load([g.compute(100_000), g.sync(0), g.end()])
    v1.load([g.compute(30_000), g.sync(1), g.compute(10_000), g.sync(11), g.end()])
    v2.load([g.loop([g.compute(2_000), g.timer_arm(3_000), g.wfi()])])
    vm.run(1_000)                               # everyone enters KVM_RUN
    ex0 = v0.run()
    assert ex0.value == 0 and 100_000 <= ex0.time_ns < 110_000
    # v1 exited at ~30 us and stayed out (nobody re-entered it); v2 kept running.
    assert v1.outside_run
    assert v2.stats()["wfi_exit_stat"] > 10 and not v2.outside_run
    ex1 = v1.run()                              # the held exit, at once
    assert ex1.value == 1 and 30_000 <= ex1.time_ns < 40_000
    assert vm.host.now == ex0.time_ns
    ex1b = v1.run()
    assert ex1b.value == 11 and ex1b.time_ns >= ex0.time_ns + 10_000
    assert v1.run().ucall == "DONE"
    assert v0.outside_run and v0.run().ucall == "DONE"


def test_held_exit_goes_to_the_vmm_policy_in_vm_run(engine):
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v0.load([g.compute(50_000), g.sync(0), g.end()])
    v1.load([g.compute(10_000), g.sync(1), g.compute(10_000), g.end()])
    vm.run(1_000)
    assert v0.run().value == 0
    assert v1.outside_run
    exits = vm.exits
    vm.run(vm.host.now + 100_000)               # the policy gets v1's SYNC and re-enters
    assert vm.exits == exits + 2                # SYNC, then DONE
    assert v1.outside_run and v1.thread_state == "USER"


def test_system_event_of_one_vcpu_during_anothers_run(engine):
    """A SHUTDOWN made by v1 during v0's run(): v0 is STOPPED and sleeps (its run() ends
    by the watchdog), v1's exit waits for v1.run()."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v0.load([g.loop([g.compute(5_000), g.timer_arm(1_000), g.wfi()])])
    v1.load([g.compute(20_000)] + g.psci(PsciFn.SYSTEM_OFF) + [g.end()])
    vm.run(1_000)
    ex = v0.run(timeout_ns=200_000)
    assert ex.reason == ExitReason.INTR
    assert v0.get_mp_state() == MpState.STOPPED
    ex1 = v1.run()
    assert ex1.reason == ExitReason.SYSTEM_EVENT
    assert ex1.system_event.type == SystemEventType.SHUTDOWN and ex1.system_event.ndata == 1
    assert 20_000 <= ex1.time_ns < 30_000


# -- regression: a signal is not a kvm_vcpu_wake_up ---------------------------------------------

@pytest.mark.parametrize("how", ["wfi", "suspended", "stopped"])
def test_signal_wakes_without_counting_halt_wakeup(engine, how):
    """Signals wake the thread through the signal code (signal_wake_up), not through
    kvm_vcpu_wake_up, so halt_wakeup (spec 8.7, 15 item 14) must not count them.  The
    engines used to count every signal that ended a block or a sleep."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    vm.enable_cap(Cap.HALT_POLL, 0)            # no polling: it blocks at once
    v.load([g.loop([g.wfi()])])
    if how == "suspended":
        v.set_mp_state(MpState.SUSPENDED)
    elif how == "stopped":
        v.set_mp_state(MpState.STOPPED)
    vm.run(50_000)
    assert v.thread_state == "BLOCKED"
    v.signal()
    vm.run(100_000)                             # the default policy re-enters after INTR
    assert vm.exits == 1
    assert v.stats()["halt_wakeup"] == 0
    assert v.thread_state == "BLOCKED"
    ex = v.run(timeout_ns=100_000)              # the watchdog's signal, too
    assert ex.reason == ExitReason.INTR
    st = v.stats()
    assert st["halt_wakeup"] == 0
    if how != "stopped":
        assert st["halt_wait_ns"] > 0            # the halts did end (waited)
    # A real wake-up still counts, once.
    if how == "stopped":
        v.set_mp_state(MpState.RUNNABLE)
    vm.configure_irq(40, enabled=True)
    vm.add_irq_source(40, times_ns=[vm.host.now + 30_000])
    ex = v.run(timeout_ns=200_000)
    assert is_wakeup(ex) if how == "suspended" else ex.reason == ExitReason.INTR
    assert v.stats()["halt_wakeup"] == 1


def test_suspended_vcpu_stopped_by_a_shutdown_never_exits_wakeup(engine):
    """A SUSPENDED vCPU that another vCPU's SYSTEM_OFF makes STOPPED is not runnable:
    an interrupt for it gives no WAKEUP (kvm_vcpu_suspend checks
    kvm_arch_vcpu_runnable, which needs !STOPPED); a signal gives INTR.
    Regression: the engines exited WAKEUP for the STOPPED vCPU."""
    vm = make_vm(engine, 2)
    v0, v1 = vm.vcpus
    v1.set_mp_state(MpState.SUSPENDED)
    v1.load([g.sync(1), g.end()])
    v0.load([g.compute(20_000)] + g.psci(PsciFn.SYSTEM_OFF) + [g.end()])
    spi(vm, 40, vcpu=1)
    vm.run(1_000)
    assert v1.thread_state == "BLOCKED"
    ex = v0.run()
    assert ex.system_event.type == SystemEventType.SHUTDOWN
    assert v1.get_mp_state() == MpState.STOPPED
    vm.irq_line(40, 1)
    assert not v1.runnable
    ex = v1.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.INTR
    assert v1.get_mp_state() == MpState.STOPPED
    # Made SUSPENDED again by userspace, the pending SPI wakes it at once.
    v1.set_mp_state(MpState.SUSPENDED)
    assert v1.runnable
    ex = v1.run()
    assert is_wakeup(ex) and ex.time_ns == vm.host.now


def test_wake_predicate_of_a_suspended_vcpu(engine):
    """PSTATE.I does not matter (the vGIC's pending check ignores it); PMR and the
    distributor enable do."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.sync(1), g.end()])
    v.set_mp_state(MpState.SUSPENDED)
    v.set_masked(True)
    spi(vm, 40)
    vm.configure_irq(40, priority=0xF0)
    vm.irq_line(40, 1)
    assert not v.runnable                        # priority 0xF0 is not below PMR 0xF0
    assert v.run(timeout_ns=50_000).reason == ExitReason.INTR
    vm.set_distributor(False)
    vm.configure_irq(40, priority=0x80)
    assert not v.runnable
    assert v.run(timeout_ns=50_000).reason == ExitReason.INTR
    vm.set_distributor(True)
    assert v.runnable
    assert is_wakeup(v.run())
    assert v.get_mp_state() == MpState.SUSPENDED


def test_pc_after_a_halt_ended_by_a_signal(engine):
    """Gotcha 9: a trapped WFI's PC is advanced (kvm_handle_wfx) when the halt ends, even
    by a signal; a SUSPENDED vCPU's WFI emulation leaves the PC alone."""
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.compute(1_000), g.wfi(), g.sync(1), g.end()])
    ex = v.run(timeout_ns=100_000)
    assert ex.reason == ExitReason.INTR
    assert v.get_reg("pc") == vm.code_address(2)
    assert v.stats()["wfi_exit_stat"] == 1
    v.set_mp_state(MpState.SUSPENDED)
    for _ in range(2):
        assert v.run(timeout_ns=100_000).reason == ExitReason.INTR
        assert v.get_reg("pc") == vm.code_address(2)
    assert v.stats()["wfi_exit_stat"] == 1
    v.set_mp_state(MpState.RUNNABLE)
    assert run_done(v) == [1]


def test_setting_the_pc_discards_an_interrupted_segment(engine):
    """Signalled out in the work before a trapping op, then moved to another op:
    re-entering runs from the new PC (the old segment's trap is dropped)."""
    vm = kw.VM(arch="arm64", nr_vcpus=2, seed=1, engine=engine)
    vm.vcpus[0].load([g.compute(100_000), g.wake(1),
                      g.timer_arm(1_000_000, period_ns=4_000_000),
                      g.loop([g.compute(10_000), g.wfi()])])
    vm.vcpus[1].load([g.loop([g.compute(10_000), g.wfi()])])
    ex = vm.vcpus[0].run(timeout_ns=50_000)
    assert ex.reason == ExitReason.INTR
    vm.vcpus[0].set_reg("pc", vm.code_address(2))          # the TIMER_ARM
    ex = vm.vcpus[0].run(timeout_ns=500_000)
    assert ex.reason == ExitReason.INTR
    assert vm.vcpus[0].timer_state()["period"] == 4_000_000
    assert vm.vcpus[1].stats()["halt_wakeup"] == 0            # the skipped wake never ran


def test_a_second_kvm_run_before_the_exit_is_taken_is_refused(engine):
    """KVM_RUN returned the exit: the engine refuses to start the thread again
    before the exit is taken (it used to queue a second exit for the same thread,
    past the core's exit ring)."""
    from kvmwake import _core, reference
    from kvmwake import guest as G
    from kvmwake.reference import EngineError
    E = _core.Engine if engine == "core" else reference.Engine
    e = E("arm64", 1, 0)
    e.add_vm(1)
    e.load_program(0, G.Program([G.compute(0), G.end()]).ops)
    e.start_vcpu(0)
    e.run(1_000_000)
    assert e.pending_exits() == [0]
    with pytest.raises(EngineError, match="exit not yet taken"):
        e.start_vcpu(0)
    assert e.pending_exits() == [0]
    e.take_exit(0)
    e.start_vcpu(0)


# -- the watchdog's signal is never dropped (issue 12 item 8) ------------------------------------

def _engine_cls(engine):
    from kvmwake import _core, reference
    return _core.Engine if engine == "core" else reference.Engine


def test_signal_at_a_segment_boundary_is_not_dropped(engine):
    """loop{compute 1000}: each segment ends at a multiple of 1000 ns after the entry;
    a signal landing exactly on such a boundary must still make the vCPU exit."""
    e = _engine_cls(engine)("arm64", 1, 0, costs={"vm_entry_ns": 0, "vm_exit_ns": 0})
    e.add_vm(1)
    e.load_program(0, g.Program([g.loop([g.compute(1000)])]).ops)
    e.start_vcpu(0)
    assert e.run_until_exit(50_000) == -1          # a boundary is due at 50 us
    e.signal(0)
    assert e.run_until_exit(100_000) == 0, "the signal was dropped"
    rec = e.take_exit(0)
    assert rec["reason"] == ExitReason.INTR and rec["time"] == 50_000


@pytest.mark.parametrize("compute_ns", [1000, 999])
def test_run_with_the_default_watchdog_returns_on_a_compute_loop(engine, compute_ns):
    vm = make_vm(engine)
    v = vm.vcpus[0]
    v.load([g.loop([g.compute(compute_ns * (1 if engine == "core" else 1000))])])
    # The reference engine is slow: a shorter watchdog, still a multiple of the loop.
    timeout = kw.vm.DEFAULT_RUN_TIMEOUT_NS if engine == "core" else 1_000_000
    ex = v.run(timeout_ns=timeout)
    assert ex.reason == ExitReason.INTR
    assert timeout <= ex.time_ns <= timeout + 10_000
    ex = v.run(timeout_ns=timeout)                  # and again: the guest resumes
    assert ex.reason == ExitReason.INTR


def test_signal_during_an_interrupt_handler_exits_when_it_ends(engine):
    """A kick in a handler IPIs the vCPU out; KVM_RUN's loop then sees the signal (the
    model acts on it at the handler's end), not only at the next trap."""
    e = _engine_cls(engine)("arm64", 1, 0)
    e.add_vm(1)
    e.load_program(0, g.Program([g.set_handler(50_000), g.timer_arm(10_000),
                                 g.loop([g.compute(1000)])]).ops)
    e.start_vcpu(0)
    e.run(30_000)
    assert e.thread_info(0)["state"] == 1               # RUNNING, in the handler
    assert e.timer_state(0)["ctl"] & 2                  # its handler masked the timer
    e.signal(0)
    assert e.run_until_exit(1_000_000) == 0, "the signal was lost in the handler"
    rec = e.take_exit(0)
    assert rec["reason"] == ExitReason.INTR
    # The handler (50 us from ~10 us) plus the IPI's exit and entry.
    assert 60_000 <= rec["time"] <= 70_000


def test_run_gives_up_on_a_vcpu_that_cannot_get_its_cpu(engine):
    """No preemption (sched_slice_ns = 0) and another vCPU thread computing forever on
    the same host CPU: the signalled vCPU can never leave KVM_RUN; run() says so."""
    host = kw.Host(host_cpus=1, engine=engine, costs={"sched_slice_ns": 0})
    vm = host.create_vm(2)
    vm.vcpus[0].load([g.loop([g.compute(100_000)])])
    vm.vcpus[1].load([g.sync(1), g.end()])
    host.run(10_000)                                  # vCPU 0 holds the CPU; 1 queues
    with pytest.raises(kw.KvmError) as ei:
        vm.vcpus[1].run(timeout_ns=1_000_000)
    assert ei.value.errno == errno.ETIMEDOUT
    assert "sched_slice_ns = 0" in str(ei.value) and "RUNNABLE" in str(ei.value)


def test_power_off_during_an_interrupt_handler_sleeps_when_it_ends(engine):
    """KVM_REQ_SLEEP's kick in a handler: KVM_RUN's loop puts the vCPU to sleep once
    the handler is done, instead of letting the guest compute on."""
    e = _engine_cls(engine)("arm64", 1, 0)
    e.add_vm(1)
    e.load_program(0, g.Program([g.set_handler(50_000), g.timer_arm(10_000),
                                 g.loop([g.compute(1000)])]).ops)
    e.start_vcpu(0)
    e.run(30_000)
    e.set_mp_state(0, MpState.STOPPED)
    e.run(100_000)
    assert e.thread_info(0)["state"] == 3                 # BLOCKED in kvm_vcpu_sleep
    events = e.events
    e.run(1_000_000)
    assert e.events == events                             # and no guest runs meanwhile
