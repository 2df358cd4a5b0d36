"""A VMM with one thread per vCPU: PSCI SYSTEM_SUSPEND handled across threads.

A real VMM runs one thread per vCPU, each looping on ``KVM_RUN``, and other
threads beside them.  This one does it on kvmwake's threaded mode
(``kvmwake/vcpu_threads.py``), on an arm64 VM with ``KVM_CAP_ARM_SYSTEM_SUSPEND``:

* the secondaries work (WFIs woken by their timers) and call PSCI ``CPU_OFF``;
  vCPU 0 works, calls ``SYSTEM_SUSPEND`` once early (a secondary is still on:
  DENIED), then again until it is honoured, and resumes at its entry point
  with the context ID in x0 when the wake-up interrupt comes;
* on a ``SUSPEND`` exit, vCPU 0's thread pauses the other vCPU threads (a flag,
  a signal to each, each thread parks), checks that every other vCPU is off
  (PSCI DEN0022D.b 5.19.2), honours (MP state SUSPENDED) or denies (x0 =
  DENIED), and resumes them; on ``WAKEUP`` it resumes the guest at the entry
  point, as ``kvmwake.vmm.ReferenceVmm`` does in the callback mode;
* a control thread acts at fixed virtual times (``Host.hold_clock``): it pauses
  every vCPU and snapshots the host, and later raises the wake-up SPI;
* the snapshot is restored and run to the end by the same threads code, and
  both runs must end in the same state.

Run it: ``python examples/threaded_vmm.py [--vcpus N] [--seed S]``.  It prints
the events with their virtual times, the exits of each vCPU and the checks,
and exits 0 when every check holds, 1 otherwise.  The output is the same on
every run: virtual time moves only while no VMM thread is in userspace, and
the threads that are take turns in an order the model fixes.
docs/tutorial-vmm.md ("A VMM with a thread per vCPU") walks through it.
"""

from __future__ import annotations

import argparse
import sys
import threading

import numpy as np

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.uapi import ExitReason, MpState, PsciFn, PsciRet, SystemEventType
from kvmwake.vcpu_threads import IN_RUN

U64 = (1 << 64) - 1
DENIED = PsciRet.DENIED & U64
INVALID_ADDRESS = PsciRet.INVALID_ADDRESS & U64
#: The wake-up interrupt: an SPI (routed to vCPU 0, as SPIs are at boot) that the
#: guest enables.  A SUSPENDED vCPU wakes when an interrupt queued on it is
#: pending, enabled and of a priority above its PMR (kvm_arch_vcpu_runnable).
WAKE_SPI = 40
#: What vCPU 0 passes to SYSTEM_SUSPEND as its context ID, and finds in x0 on resume.
CONTEXT_ID = 0xC0FFEE_0000_5EED
#: The control thread's virtual times (ns): the snapshot, while the secondaries
#: still work; the wake-up interrupt, long after vCPU 0 is suspended.
SNAPSHOT_AT_NS = 100_000
WAKE_AT_NS = 800_000
#: A guest still running then has gone wrong: the VMM stops it.
TIME_LIMIT_NS = 100_000_000


# -- the guest -------------------------------------------------------------------------------

def boot_cpu_program(entry: int) -> tuple[list, list]:
    """vCPU 0's program: (the ops before its resume entry point, the ops from it)."""
    suspend = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, entry, CONTEXT_ID)
    before = [
        g.unmask(), g.set_handler(2_000), g.irq_enable(WAKE_SPI),
        g.compute(20_000),
        suspend, g.sync_reg(0),                        # too early: DENIED
        g.loop([g.compute(300_000), suspend, g.sync_reg(0)]),   # until honoured
    ]
    after = [                                          # the entry point: x0 = context ID
        g.sync_reg(0), g.unmask(),
        g.loop([g.compute(20_000), g.timer_arm(10_000), g.wfi()], 3),
        g.end(),
    ]
    return before, after


def secondary_program() -> list:
    """The other vCPUs: work with halts (each WFI woken by the timer), then CPU_OFF."""
    return [
        g.unmask(), g.set_handler(2_000),
        g.loop([g.compute_uniform(10_000, 40_000), g.timer_arm(20_000), g.wfi()], 3),
        g.psci(PsciFn.CPU_OFF), g.sync(0xBAD), g.end(),
    ]


def build_vm(nr_vcpus: int = 4, seed: int = 1) -> tuple[kw.VM, int]:
    """The VM with its programs loaded; returns it and vCPU 0's resume entry point."""
    vm = kw.VM(arch="arm64", nr_vcpus=nr_vcpus, seed=seed)
    vm.enable_cap(kw.Cap.ARM_SYSTEM_SUSPEND)
    before, _ = boot_cpu_program(0)
    entry = vm.code_address(len(g.Program(before + [g.end()])) - 1)
    before, after = boot_cpu_program(entry)
    vm.vcpus[0].load(before + after)
    for v in vm.vcpus[1:]:
        v.load(secondary_program())
    return vm, entry


# -- the VMM's shared state ------------------------------------------------------------------

class Vmm:
    """What the VMM's threads share.  One thread at a time runs VMM code (the one
    holding kvmwake's userspace token, as QEMU's threads hold its big lock), so
    the fields change in an order the model fixes.  ``cond`` is for the control
    thread, which waits for the vCPU threads outside the model."""

    def __init__(self, vm: kw.VM, out=print):
        self.vm, self.host, self.out = vm, vm.host, out
        self.cond = threading.Condition()
        # Pausing (QEMU: cpu->stop, cpu->stopped, pause_all_vcpus).
        self.pauser = None       # a vCPU id or "control" while one pauses vCPUs
        self.stop = set()        # the vCPUs asked to stop
        self.stopped = set()     # those whose thread is parked at its stop point
        self.waiter = None       # the vCPU parked until the others have stopped
        self.handover = False    # the control thread waits to take a pause over
        self.quit = False
        self.errors: list = []
        # The VMM's side of a snapshot (save_state), which goes beside the host's
        # bytes as QEMU's device state goes beside the kernel's.
        self.pending: dict = {}  # vCPU id -> [entry, context ID] of its suspend
        self.suspends = self.denials = self.resumes = 0
        # What happened: (virtual time, who, text), and each vCPU's exits.
        self.events: list = []
        self.exits: dict = {v.id: [] for v in vm.vcpus}
        # The control thread's snapshot: (bytes, save_state(), virtual time), and how
        # many events and exits (per vCPU) came before it.
        self.snapshot = self.mark = None

    def log(self, who: str, text: str, t: int | None = None) -> None:
        t = self.host.now if t is None else t
        self.events.append((t, who, text))
        self.out(f"{t / 1000:10.3f} us  {who:8} {text}")

    def save_state(self) -> dict:
        return {"pending": {k: list(p) for k, p in self.pending.items()},
                "counts": [self.suspends, self.denials, self.resumes]}

    def load_state(self, state: dict) -> None:
        self.pending = {k: list(p) for k, p in state["pending"].items()}
        self.suspends, self.denials, self.resumes = state["counts"]


def name(v: kw.VCpu) -> str:
    return f"vCPU {v.id}"


# -- a vCPU's thread -----------------------------------------------------------------------------

def vcpu_thread(vmm: Vmm, vcpu: kw.VCpu) -> None:
    """One vCPU's thread (QEMU's kvm_vcpu_thread_fn): KVM_RUN, handle the exit,
    stop if asked to.  The main thread attached the vCPU before starting it."""
    with vcpu:                                 # detaches the vCPU when the thread ends
        while True:
            ex = vcpu.run()                    # blocks the thread until the vCPU exits
            handle_exit(vmm, vcpu, ex)
            stop_point(vmm, vcpu)
            if vmm.quit:
                return


def handle_exit(vmm: Vmm, vcpu: kw.VCpu, ex) -> None:
    event = ex.system_event.type if ex.reason == ExitReason.SYSTEM_EVENT else None
    if ex.reason == ExitReason.INTR:           # a signal: stop_point does the rest
        what = "INTR"
        if vmm.host.now > TIME_LIMIT_NS and not vmm.quit:    # (run()'s watchdog, 1 s)
            vmm.errors.append(f"the guest did not end in {TIME_LIMIT_NS} ns")
            shutdown(vmm, "time limit")
    elif event == SystemEventType.SUSPEND:
        what = "SYSTEM_EVENT SUSPEND"
        system_suspend(vmm, vcpu)
    elif event == SystemEventType.WAKEUP:
        what = "SYSTEM_EVENT WAKEUP"
        system_wakeup(vmm, vcpu, ex)
    elif ex.reason == ExitReason.MMIO and ex.ucall == "SYNC":
        what = f"SYNC {'DENIED' if ex.value == DENIED else hex(ex.value)}"
    elif ex.reason == ExitReason.MMIO and ex.ucall == "DONE":
        what = "DONE"
        shutdown(vmm, f"{name(vcpu)} is done")
    else:
        what = repr(ex)
        vmm.errors.append(f"{name(vcpu)}: unexpected exit {ex!r}")
        shutdown(vmm, f"{name(vcpu)} failed")
    vmm.exits[vcpu.id].append((ex.time_ns, what))


def stop_point(vmm: Vmm, vcpu: kw.VCpu) -> None:
    """Park while a pause wants this vCPU stopped (QEMU's qemu_wait_io_event).  Its
    exit is handled: the thread can restart from here (a snapshot's point)."""
    while vcpu.id in vmm.stop:
        with vmm.cond:
            vmm.stopped.add(vcpu.id)
            w = vmm.waiter                     # the last one to stop wakes the pauser
            if w is not None and vmm.stop - {w.id} <= vmm.stopped:
                vmm.waiter = None
                w.unpark()
            vmm.cond.notify_all()
        vcpu.park()                            # holds nothing until resume_vcpus()


# -- pausing vCPU threads ---------------------------------------------------------------------

def pause_vcpus(vmm: Vmm, who, vcpus) -> None:
    """Ask ``vcpus`` to stop, and signal those in KVM_RUN out of it (the caller
    holds the userspace token)."""
    with vmm.cond:
        vmm.pauser = who
        vmm.stop = {v.id for v in vcpus}
        for v in vcpus:
            if v.thread_role == IN_RUN:
                v.signal()                     # KVM_RUN returns KVM_EXIT_INTR


def resume_vcpus(vmm: Vmm) -> None:
    """Let every stopped vCPU thread go on (QEMU's resume_all_vcpus)."""
    with vmm.cond:
        stopped = sorted(vmm.stopped)
        vmm.pauser, vmm.stop, vmm.stopped = None, set(), set()
    for i in stopped:
        vmm.vm.vcpus[i].unpark()


def pause_others(vmm: Vmm, vcpu: kw.VCpu) -> bool:
    """From ``vcpu``'s thread: stop every other vCPU thread, parking until the last
    of them has stopped (to wait without parking would hold the clock, so they
    could never leave KVM_RUN).  Inside the control thread's pause, wait for it
    to stop them.  False: another vCPU pauses them (that one is on)."""
    with vmm.cond:
        if vmm.pauser is None:
            pause_vcpus(vmm, vcpu.id, [v for v in vmm.vm.vcpus if v is not vcpu])
        elif vmm.pauser != "control":
            return False
        if vmm.stop - {vcpu.id} <= vmm.stopped:
            return True
        vmm.waiter = vcpu
    vcpu.park()                                # until the last one unparks it
    return True


def end_pause(vmm: Vmm, vcpu: kw.VCpu) -> None:
    """Done with the others: resume them, or leave them to the control thread (its
    own pause, or one it waits to take over: ``vcpu`` stops too)."""
    with vmm.cond:
        if vmm.pauser != vcpu.id:
            return
        if vmm.handover:
            vmm.handover, vmm.pauser = False, "control"
            vmm.stop.add(vcpu.id)
            return
    resume_vcpus(vmm)


# -- PSCI SYSTEM_SUSPEND (DEN0022D.b 5.19), as ReferenceVmm does it ------------------------------

def system_suspend(vmm: Vmm, vcpu: kw.VCpu) -> None:
    """The guest's SYSTEM_SUSPEND: KVM left its arguments in x0-x2 and did nothing."""
    vmm.suspends += 1
    fn, entry, context = (vcpu.get_reg(r) for r in ("x0", "x1", "x2"))
    if fn == PsciFn.SYSTEM_SUSPEND:            # the 32-bit call: arguments narrowed
        entry, context = entry & 0xFFFF_FFFF, context & 0xFFFF_FFFF
    if not pause_others(vmm, vcpu):
        vmm.denials += 1
        vcpu.set_reg("x0", DENIED)
        vmm.log(name(vcpu), f"SYSTEM_SUSPEND denied: vCPU {vmm.pauser} is on")
        return
    on = [v for v in vmm.vm.vcpus if v is not vcpu and v.get_mp_state() != MpState.STOPPED]
    if on:                                     # 5.19.2: every other core must be off
        vmm.denials += 1
        vcpu.set_reg("x0", DENIED)
        vmm.log(name(vcpu), f"SYSTEM_SUSPEND denied: {name(on[0])} is "
                            f"{on[0].get_mp_state().name}")
    elif not vmm.vm.memory_contains(entry):
        vcpu.set_reg("x0", INVALID_ADDRESS)
        vmm.log(name(vcpu), f"SYSTEM_SUSPEND: entry {entry:#x} outside guest memory")
    else:
        vmm.pending[vcpu.id] = [entry, context]
        vcpu.set_mp_state(MpState.SUSPENDED)    # KVM emulates a WFI until a wake-up
        vmm.log(name(vcpu), "SYSTEM_SUSPEND honoured: the others are off, SUSPENDED")
    end_pause(vmm, vcpu)


def system_wakeup(vmm: Vmm, vcpu: kw.VCpu, ex) -> None:
    """A SUSPENDED vCPU saw a wake-up: resume it at its entry point, RUNNABLE."""
    p = vmm.pending.pop(vcpu.id, None)
    if p is not None:                          # resume "as if from reset" at the entry
        entry, context = p
        vcpu.set_reg("pc", entry)
        vcpu.set_reg("x0", context)
        vmm.resumes += 1
        vmm.log(name(vcpu), f"WAKEUP: resumes at {entry:#x} with x0 = {context:#x}",
                ex.time_ns)
    vcpu.set_mp_state(MpState.RUNNABLE)


def shutdown(vmm: Vmm, why: str) -> None:
    """Every vCPU thread ends: the ones in KVM_RUN are signalled out of it."""
    vmm.quit = True
    vmm.log("vm", f"{why}: the VM stops")
    for v in vmm.vm.vcpus:
        if v.thread_role == IN_RUN:
            v.signal()


# -- the control thread ---------------------------------------------------------------------------

def snapshot_paused(vmm: Vmm, hold: kw.ClockHold) -> kw.ClockHold:
    """With the clock held at the snapshot's time: pause every vCPU, snapshot the
    host while every vCPU thread is parked, resume them.  Sets ``vmm.snapshot`` and
    ``vmm.mark``; returns the clock held again, at the snapshot's instant."""
    host, everyone = vmm.host, {v.id for v in vmm.vm.vcpus}
    with hold:
        if vmm.quit:
            return host.hold_clock()
        with vmm.cond:
            if vmm.pauser is None:
                pause_vcpus(vmm, "control", vmm.vm.vcpus)
            else:                              # a vCPU pauses the others: it hands over
                vmm.handover = True
        vmm.log("control", "pauses every vCPU")
    with vmm.cond:                             # wait, holding nothing, for them all
        vmm.cond.wait_for(lambda: vmm.pauser == "control" and vmm.stopped == everyone)
    hold = host.hold_clock()                   # every thread parked: the clock stands still
    vmm.snapshot = (host.snapshot(), vmm.save_state(), hold.time_ns)
    vmm.log("control", f"snapshot, every vCPU parked ({len(vmm.snapshot[0])} bytes); "
                       "resumes them")
    vmm.mark = (len(vmm.events), {i: len(x) for i, x in vmm.exits.items()})
    resume_vcpus(vmm)
    return hold


def wake_up(vmm: Vmm) -> None:
    """With the clock held at the wake-up time: raise the wake-up SPI for the
    suspended vCPU 0."""
    if vmm.quit:
        return
    if 0 not in vmm.pending:
        vmm.errors.append(f"vCPU 0 is not suspended at {vmm.host.now} ns, the wake-up time")
        shutdown(vmm, "nothing to wake")
        return
    vmm.vm.irq_line(WAKE_SPI, 1)               # KVM_IRQ_LINE, a VM ioctl: acts at once
    vmm.log("control", f"wake-up: raises SPI {WAKE_SPI}")


def control_thread(vmm: Vmm, hold: kw.ClockHold, snapshot_at, wake_at) -> None:
    """A snapshot of the paused vCPUs at ``snapshot_at``, then the wake-up at
    ``wake_at`` (virtual ns; None: not done).  ``hold`` was asked for, for the
    first of them, before the vCPU threads started, so it cannot come late; from
    one time to the next the clock goes with ``wait_until``, held again there."""
    hold.wait()
    if snapshot_at is not None:
        hold = snapshot_paused(vmm, hold)
    if wake_at is not None:
        if hold.time_ns < wake_at:
            hold.wait_until(wake_at)
        wake_up(vmm)
    hold.release()


# -- running ------------------------------------------------------------------------------------

def run_vmm(vmm: Vmm, snapshot_at: int | None = SNAPSHOT_AT_NS,
            wake_at: int | None = WAKE_AT_NS) -> None:
    """Attach every vCPU, start the control thread and one thread per vCPU, and
    wait for them all.  Errors of the threads end up in ``vmm.errors``."""
    def guarded(fn, *args):
        def body():
            try:
                fn(*args)
            except Exception as exc:          # reported by the caller
                vmm.errors.append(f"{threading.current_thread().name}: "
                                  f"{type(exc).__name__}: {exc}")
        return body

    for v in vmm.vm.vcpus:
        v.attach()                    # all before any thread runs: first entries together
    times = [t for t in (snapshot_at, wake_at) if t is not None]
    # Asked for before any vCPU thread can move the clock; granted when it gets there.
    hold = vmm.host.hold_clock(at_ns=min(times, default=None), wait=False)
    control = threading.Thread(target=guarded(control_thread, vmm, hold, snapshot_at,
                                              wake_at), name="control")
    threads = [threading.Thread(target=guarded(vcpu_thread, vmm, v), name=f"CPU {v.id}/KVM")
               for v in vmm.vm.vcpus]
    for t in [control] + threads:
        t.start()
    for t in threads + [control]:
        t.join()


def exit_lines(vmm: Vmm, marks: dict | None = None) -> list:
    """Each vCPU's exits (from its ``marks[id]``-th on, if given), one line each."""
    return [f"  {name(vmm.vm.vcpus[i])}: "
            + ", ".join(f"{what} @{t / 1000:.3f}" for t, what in exits[(marks or {}).get(i, 0):])
            for i, exits in sorted(vmm.exits.items())]


def checks(vmm: Vmm, restored: Vmm) -> list:
    """(what, held) for the example's checks."""
    boot = [what for _, what in vmm.exits[0] if what != "INTR"]     # vCPU 0's exits
    woken = boot.index("SYSTEM_EVENT WAKEUP") if "SYSTEM_EVENT WAKEUP" in boot else -2
    n_events, n_exits = vmm.mark
    vm, vm2 = vmm.vm, restored.vm
    return [
        ("no thread failed", not vmm.errors and not restored.errors),
        ("the first SYSTEM_SUSPEND was denied: the guest read x0 = DENIED",
         boot[:2] == ["SYSTEM_EVENT SUSPEND", "SYNC DENIED"]),
        ("a later one was honoured; vCPU 0 resumed at the entry point, x0 = context ID",
         vmm.resumes == 1 and boot[woken + 1:woken + 2] == [f"SYNC {CONTEXT_ID:#x}"]),
        ("every vCPU thread detached, out of KVM_RUN",
         all(not v.attached and v.outside_run for v in vm.vcpus + vm2.vcpus)),
        ("restored run: the same events and exits after the snapshot",
         vmm.events[n_events:] == restored.events
         and exit_lines(vmm, n_exits) == exit_lines(restored)),
        ("the same VMM state", vmm.save_state() == restored.save_state()),
        ("the same final time and halt stats",
         vm.host.now == vm2.host.now and np.array_equal(vm.stats_array(), vm2.stats_array())),
        ("the same final snapshot, byte for byte", vm.host.snapshot() == vm2.host.snapshot()),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vcpus", type=int, default=4, help="vCPUs, at least 2 (default 4)")
    ap.add_argument("--seed", type=int, default=1, help="the host's seed (default 1)")
    ap.add_argument("--snapshot-at", type=float, default=SNAPSHOT_AT_NS / 1000, metavar="US",
                    help="virtual time of the snapshot, in us (default %(default)g)")
    ap.add_argument("--wake-at", type=float, default=WAKE_AT_NS / 1000, metavar="US",
                    help="virtual time of the wake-up SPI, in us (default %(default)g)")
    args = ap.parse_args(argv)
    if args.vcpus < 2:
        ap.error("--vcpus: at least 2 (a secondary is on at the first SYSTEM_SUSPEND)")
    snapshot_at, wake_at = round(args.snapshot_at * 1000), round(args.wake_at * 1000)
    if not 0 < snapshot_at < wake_at:
        ap.error("the snapshot comes first: 0 < --snapshot-at < --wake-at")

    vm, entry = build_vm(args.vcpus, args.seed)
    print(f"threaded_vmm: {args.vcpus} vCPUs, seed {args.seed}; snapshot at "
          f"{snapshot_at / 1000:g} us, wake-up at {wake_at / 1000:g} us; "
          f"resume entry {entry:#x}, context ID {CONTEXT_ID:#x}")
    print("--- run")
    vmm = Vmm(vm)
    run_vmm(vmm, snapshot_at, wake_at)
    print("exits (virtual us):")
    print("\n".join(exit_lines(vmm)))
    if vmm.snapshot is None:
        print(f"no snapshot taken: {vmm.errors}")
        return 1

    snap, state, t_snap = vmm.snapshot
    print(f"--- the snapshot of {t_snap / 1000:.3f} us, restored and run to the end")
    restored = Vmm(kw.Host.restore(snap).vms[0])
    restored.load_state(state)
    run_vmm(restored, None, wake_at)
    print("exits (virtual us):")
    print("\n".join(exit_lines(restored)))

    print("--- checks")
    results = checks(vmm, restored)
    for what, held in results:
        print(f"  {'ok  ' if held else 'FAIL'} {what}")
    for e in vmm.errors + restored.errors:
        print(f"  error: {e}")
    ok = all(held for _, held in results)
    print(f"{vmm.suspends} SYSTEM_SUSPEND calls, {vmm.denials} denied, {vmm.resumes} resumed; "
          f"final time {vm.host.now / 1000:.3f} us: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
