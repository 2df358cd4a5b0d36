"""A VMM's own threads (vcpu_threads.py): one thread per vCPU blocked in run().

The threaded run must be the callback run (same exits, same stats), the same
on every repetition whatever the OS does, never hang (deadlocks are reported),
and give the kernel's answers to calls from other threads."""

import errno
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmwake as kw
from kvmwake import guest as G
from kvmwake import vcpu_threads as VT

ENGINES = ["core", "reference"]


def storm_vm(n, seed, engine="core", rounds=40, host_cpus=2):
    """vCPUs that wake each other, halt (a timer bounds each halt) and SYNC out."""
    vm = kw.VM(nr_vcpus=n, host_cpus=host_cpus, seed=seed, engine=engine)
    for i, v in enumerate(vm.vcpus):
        v.load([G.loop([G.compute_exp(20_000), G.wake_random_other(), G.timer_arm(50_000),
                        G.wfi(), G.sync(i)], rounds), G.end()])
    return vm


class LogVmm(kw.vmm.Vmm):
    def __init__(self):
        self.log = {}

    def handle_exit(self, vcpu, ex):
        self.log.setdefault(vcpu.id, []).append(str(ex))
        return ex.ucall == "SYNC"


def run_threads(vm, body=None, timeout_ns=10 ** 10, jitter=None):
    """Attach every vCPU, run one thread per vCPU until its vCPU is DONE; the exits."""
    exits = {v.id: [] for v in vm.vcpus}
    errors = []
    for v in vm.vcpus:
        v.attach()

    def loop(v):
        rnd = random.Random(v.id) if jitter else None
        try:
            with v:
                while True:
                    ex = v.run(timeout_ns=timeout_ns)
                    exits[v.id].append(str(ex))
                    if rnd is not None:
                        time.sleep(rnd.random() * jitter)
                    if body is not None:
                        body(v, ex)
                    if ex.ucall != "SYNC":
                        break
        except BaseException as exc:          # noqa: BLE001 (reported by the test)
            errors.append(exc)

    ts = [threading.Thread(target=loop, args=(v,), name=f"vcpu{v.id}") for v in vm.vcpus]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive(), "a vCPU thread hung"
    assert not errors, errors
    return exits


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n,seed", [(2, 0), (4, 3), (7, 11)])
def test_threaded_run_is_the_callback_run(engine, n, seed):
    ref_vm = storm_vm(n, seed, engine)
    pol = LogVmm()
    ref_vm.run(10 ** 9, vmm=pol)
    vm = storm_vm(n, seed, engine)
    exits = run_threads(vm)
    assert exits == pol.log
    assert vm.stats_array().tobytes() == ref_vm.stats_array().tobytes()
    assert vm.host._engine.halts == ref_vm.host._engine.halts
    assert not vm.host.vcpu_threads.active


def test_repeated_runs_are_bit_identical_whatever_the_os_does():
    """Random sleeps in the threads' userspace and a tiny GIL switch interval change
    the OS's interleaving, not the run."""
    import sys
    snaps = set()
    old = sys.getswitchinterval()
    try:
        for k in range(3):
            sys.setswitchinterval(1e-6 if k else old)
            vm = storm_vm(6, 5, rounds=15)
            run_threads(vm, jitter=0.0005 * k)
            snaps.add(vm.snapshot())
    finally:
        sys.setswitchinterval(old)
    assert len(snaps) == 1


def test_256_threads_start_block_wake_and_stop_without_leaks():
    before = threading.active_count()
    vm = storm_vm(256, 1, rounds=3, host_cpus=16)
    exits = run_threads(vm)
    assert sum(len(x) for x in exits.values()) == 256 * 4      # 3 SYNCs and a DONE each
    th = vm.host.vcpu_threads
    assert not th.active and not th.slots and not th.users and not th.ready
    assert not th.inside and not th.mutex_waiters and th.driver is None
    assert threading.active_count() == before
    # The host is back in one thread's hands.
    vm.run(vm.host.now + 1_000_000)


def blocked_vm(engine="core"):
    """vCPU 0 halts with nothing to wake it."""
    vm = kw.VM(nr_vcpus=1, host_cpus=1, seed=0, engine=engine)
    v = vm.vcpus[0]
    v.load([G.loop([G.wfi()])])
    return vm, v


def start_thread(fn, *args):
    box = {}

    def body():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:            # noqa: BLE001
            box["error"] = exc
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def wait_role(v, role, limit=10.0):
    end = time.monotonic() + limit
    while v.thread_role != role:
        assert time.monotonic() < end, f"vCPU {v.id} is {v.thread_role}, not {role}"
        time.sleep(0.001)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_signal_from_another_thread_ends_a_blocked_run(engine):
    """On the deterministic clock, a vCPU with nothing to wake it would reach its
    watchdog at once: the control thread stops the clock first (hold_clock)."""
    vm, v = blocked_vm(engine)
    v.attach()
    got = []

    def control():
        with vm.host.hold_clock(at_ns=1_000_000):
            wait_role(v, VT.IN_RUN)
            time.sleep(0.02)
            v.signal()
            got.append(vm.host.now)
    c = threading.Thread(target=control)
    c.start()
    t, box = start_thread(v.run, 1 << 60)
    t.join(10)
    c.join(10)
    ex = box["value"]
    assert ex.reason == kw.ExitReason.INTR and got == [1_000_000]
    assert ex.time_ns - 1_000_000 < 100_000
    v.detach()


def test_a_signal_or_immediate_exit_ends_a_blocked_run_in_real_time():
    vm, v = blocked_vm()
    v.attach()
    vm.host.set_realtime(1.0)
    t, box = start_thread(v.run, 1 << 60)
    wait_role(v, VT.IN_RUN)
    time.sleep(0.05)
    assert t.is_alive(), "run() returned with nothing to wake the vCPU"
    v.signal()
    t.join(10)
    assert box["value"].reason == kw.ExitReason.INTR
    # immediate_exit, set by another thread, then a signal (QEMU's kick): the
    # blocked run() ends, and the next run() returns -EINTR at once.
    t, box = start_thread(lambda: (v.run(1 << 60), v.run(1 << 60)))
    wait_role(v, VT.IN_RUN)
    time.sleep(0.01)
    v.immediate_exit = True
    v.signal()
    t.join(10)
    assert isinstance(box["error"], kw.KvmError) and box["error"].errno == errno.EINTR
    v.immediate_exit = False
    v.detach()


def test_a_vcpu_ioctl_waits_for_the_vcpu_to_leave_kvm_run():
    """KVM_GET/SET_ONE_REG from another thread take vcpu->mutex: they block until
    the thread is out of KVM_RUN (here: its timer wakes it at 5 ms, and it exits).
    The caller holds the clock at 1 ms first, so the vCPU is surely inside."""
    vm = kw.VM(nr_vcpus=1, host_cpus=1, seed=0)
    v = vm.vcpus[0]
    v.load([G.timer_arm(5_000_000), G.wfi(), G.sync(7), G.loop([G.wfi()])])
    v.attach()
    seen = {}

    def control():
        with vm.host.hold_clock(at_ns=1_000_000):
            seen["at"], seen["role"] = vm.host.now, v.thread_role
            try:
                vm.snapshot()                # kvm_trylock_all_vcpus: EBUSY, no wait
            except kw.KvmError as exc:
                seen["snapshot"] = exc.errno
            seen["x0"] = v.get_reg("x0")     # gives the clock back, waits for the exit
            seen["read_at"], seen["role_after"] = vm.host.now, v.thread_role
    c = threading.Thread(target=control)
    c.start()
    t, box = start_thread(v.run, 1 << 60)
    c.join(10)
    t.join(10)
    assert seen["at"] == 1_000_000 and seen["role"] == VT.IN_RUN
    assert seen["snapshot"] == errno.EBUSY
    assert seen["read_at"] >= 5_000_000 and seen["role_after"] == VT.READY
    ex = box["value"]
    assert ex.ucall == "SYNC" and ex.time_ns == seen["read_at"]
    v.detach()


def test_hold_clock_stops_the_clock_at_its_time():
    vm = storm_vm(3, 2, rounds=200)
    held = []

    def control():
        with vm.host.hold_clock(at_ns=1_000_000) as h:
            t0 = vm.host.now
            time.sleep(0.05)                 # the vCPU threads wait meanwhile
            held.append((h.time_ns, t0, vm.host.now))
    c = threading.Thread(target=control)
    c.start()
    run_threads(vm)
    c.join(10)
    assert held == [(1_000_000, 1_000_000, 1_000_000)]


def test_a_thread_waiting_on_another_without_parking_is_a_reported_deadlock():
    vm = kw.VM(nr_vcpus=2, host_cpus=2, seed=0)
    for v in vm.vcpus:
        v.load([G.compute(10_000 * (v.id + 1)), G.sync(0), G.end()])
    vm.host.set_deadlock_timeout(0.5)
    a, b = vm.vcpus
    a.attach()
    b.attach()
    b_done = threading.Event()
    result = {}

    def vcpu_a():                            # exits first, then waits for B: holds the clock
        a.run(1 << 40)
        b_done.wait(30)
        try:
            a.run(1 << 40)
        except kw.DeadlockError as exc:
            result["a"] = exc

    def vcpu_b():
        t0 = time.monotonic()
        try:
            b.run(1 << 40)
        except kw.DeadlockError as exc:
            result["b"] = (exc, time.monotonic() - t0)
        b_done.set()
    ta, tb = threading.Thread(target=vcpu_a), threading.Thread(target=vcpu_b)
    ta.start()
    tb.start()
    tb.join(20)
    ta.join(20)
    assert not ta.is_alive() and not tb.is_alive()
    exc, waited = result["b"]
    assert waited < 5
    assert "vCPU 0 of VM 0 has held the userspace token" in str(exc)
    assert "vCPU 1 of VM 0 waits in KVM_RUN" in str(exc)
    assert "park" in str(exc)
    assert isinstance(result["a"], kw.DeadlockError)     # the host stays failed


def test_a_thread_that_ends_without_detaching_is_reported_at_once():
    vm = kw.VM(nr_vcpus=2, host_cpus=2, seed=0)
    for v in vm.vcpus:
        v.load([G.compute(10_000 * (v.id + 1)), G.sync(0), G.end()])
    a, b = vm.vcpus
    a.attach()
    b.attach()
    ta = threading.Thread(target=a.run, args=(1 << 40,), name="leaver")
    t, box = start_thread(b.run, 1 << 40)
    ta.start()
    ta.join(10)
    t0 = time.monotonic()
    t.join(10)
    assert time.monotonic() - t0 < 3
    assert isinstance(box["error"], kw.DeadlockError)
    assert "'leaver' ended without detaching" in str(box["error"])


def test_park_and_unpark_hand_the_clock_over():
    """vCPU 0's thread waits, parked, for vCPU 1's exit, which needs the clock."""
    vm = kw.VM(nr_vcpus=2, host_cpus=2, seed=0)
    a, b = vm.vcpus
    a.load([G.compute(10_000), G.sync(0), G.end()])
    b.load([G.compute(50_000), G.sync(0), G.end()])
    a.attach()
    b.attach()
    seen = []

    def vcpu_a():
        ex = a.run(1 << 40)
        seen.append(("a", ex.time_ns))
        a.park()                             # until B's thread unparks it
        seen.append(("a-back", vm.host.now))
        a.run(1 << 40)
        a.detach()

    def vcpu_b():
        ex = b.run(1 << 40)
        seen.append(("b", ex.time_ns))
        a.unpark()
        b.run(1 << 40)
        b.detach()
    ts = [threading.Thread(target=vcpu_a), threading.Thread(target=vcpu_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert [s[0] for s in seen] == ["a", "b", "a-back"]
    assert seen[2][1] == seen[1][1]           # the clock stood still while B held it


def test_misuse_is_refused_with_a_clear_error():
    vm, v = blocked_vm()
    v.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        v.attach()
    with pytest.raises(RuntimeError, match="attached to threads"):
        vm.run(1_000)
    with pytest.raises(RuntimeError, match="attached to threads"):
        vm.host.run(1_000)
    with pytest.raises(RuntimeError, match="not parked"):
        v.unpark()
    with pytest.raises(ValueError):
        vm.host.set_deadlock_timeout(-1)
    with pytest.raises(ValueError):
        vm.host.set_realtime(0)
    vm.host.set_realtime(1.0)                # (so that the vCPU stays in KVM_RUN)
    done = threading.Event()
    t, box = start_thread(lambda: (v.run(1 << 60), done.wait(10)))
    wait_role(v, VT.IN_RUN)
    with pytest.raises(RuntimeError, match="belongs to thread"):
        v.run(1 << 60)
    with pytest.raises(RuntimeError, match="detach it from its own thread"):
        v.detach()
    v.signal()
    wait_role(v, VT.ACTIVE)
    with pytest.raises(RuntimeError, match="only that thread may detach"):
        v.detach()
    with pytest.raises(RuntimeError, match="not in userspace in this thread"):
        v.park()
    done.set()
    t.join(10)
    v.detach()                               # its thread ended: any thread may
    other = kw.VM(nr_vcpus=2, host_cpus=1)
    other.vcpus[0].load([G.end()])
    other.vcpus[1].load([G.end()])
    other.vcpus[0].attach()
    with pytest.raises(RuntimeError, match="is not attached"):
        other.vcpus[1].run()


def test_real_time_paces_virtual_time_to_the_wall_clock():
    """A device thread injects at wall times; the vCPU's thread is woken through its
    wait queue; the clock is never ahead of the wall clock."""
    vm = kw.VM(nr_vcpus=1, host_cpus=2, seed=1)
    v = vm.vcpus[0]
    v.load([G.irq_enable(40), G.loop([G.wfi(), G.sync(0)])])
    v.attach()
    vm.host.set_realtime(1.0)
    rate, wall0, virt0 = vm.host.vcpu_threads.rt
    got, sent = [], []
    stop = threading.Event()

    def vcpu():
        while len(got) < 20:
            ex = v.run(1 << 60)
            got.append((time.monotonic_ns(), ex.time_ns))
        v.detach()

    def device():
        for _ in range(20):
            time.sleep(0.002)
            sent.append((time.monotonic_ns(), vm.host.now))
            vm.irq_line(40, 1)
            vm.irq_line(40, 0)
            while len(got) < len(sent) and not stop.wait(0.0001):
                pass
    a, b = threading.Thread(target=vcpu), threading.Thread(target=device)
    a.start()
    b.start()
    b.join(20)
    a.join(20)
    assert len(got) == 20
    for wall, virt in got:
        assert virt - virt0 <= (wall - wall0) * rate
    for (ws, vs), (wg, vg) in zip(sent, got):
        assert wg >= ws and vg >= vs                     # each wake after its send
    # Back to the deterministic clock.
    vm.host.set_realtime(None)
    assert vm.host.realtime is None


def test_the_watchdog_signals_a_vcpu_that_does_not_exit():
    """run()'s watchdog works in threaded mode as in one thread: a RuntimeWarning
    when the default window fired, silence when the caller chose it."""
    vm, v = blocked_vm()
    v.attach()
    with pytest.warns(RuntimeWarning, match="did not exit in 1 s of virtual time"):
        ex = first = v.run()
    assert ex.reason == kw.ExitReason.INTR
    t = vm.host.now
    ex = v.run(timeout_ns=2_000_000)
    assert ex.reason == kw.ExitReason.INTR and ex.time_ns - t - 2_000_000 < 100_000
    v.detach()
    # The same vCPU driven from one thread again: the same answer.
    vm2, v2 = blocked_vm()
    with pytest.warns(RuntimeWarning):
        ex2 = v2.run()
    assert str(ex2) == str(first)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 5), seed=st.integers(0, 2 ** 16), rounds=st.integers(1, 6),
       per_exit=st.integers(1, 3), host_cpus=st.integers(1, 3),
       timer=st.integers(5_000, 200_000), scheduler=st.sampled_from(["fifo", "eevdf"]))
def test_threaded_and_callback_runs_agree(n, seed, rounds, per_exit, host_cpus, timer,
                                          scheduler):
    def build():
        host = kw.Host(host_cpus=host_cpus, seed=seed, scheduler=scheduler)
        vm = host.create_vm(n)
        body = [G.compute_exp(20_000), G.wake_random_other(), G.timer_arm(timer), G.wfi()]
        for i, v in enumerate(vm.vcpus):
            v.load([G.loop([G.loop(body, per_exit), G.sync(i)], rounds), G.end()])
        return vm
    ref = build()
    pol = LogVmm()
    ref.run(10 ** 10, vmm=pol)
    vm = build()
    assert run_threads(vm) == pol.log
    assert vm.stats_array().tobytes() == ref.stats_array().tobytes()
    assert vm.host.now <= ref.host.now


def test_a_thread_may_start_parked_and_holds_may_be_registered_ahead():
    """QEMU's vCPU threads start stopped: park() before the first run(); a control
    thread registers its holds before the vCPU threads start (wait=False) and
    goes from one to the next with wait_until, so none comes late."""
    vm = storm_vm(2, 4, rounds=50)
    a, b = vm.vcpus
    a.attach()
    b.attach()
    hold = vm.host.hold_clock(at_ns=200_000, wait=False)
    seen = []

    def control():
        hold.wait()
        seen.append(vm.host.now)
        b.unpark()                            # B starts at 200 us
        hold.wait_until(400_000)
        seen.append(vm.host.now)
        with pytest.raises(ValueError, match="is past"):
            hold.wait_until(100_000)
        hold.release()
        with pytest.raises(RuntimeError, match="not waiting"):
            hold.wait()

    def vcpu(v, parked):
        if parked:
            v.park()
            seen.append(("b in", vm.host.now))
        with v:
            while v.run(1 << 40).ucall == "SYNC":
                pass
    ts = [threading.Thread(target=control), threading.Thread(target=vcpu, args=(a, False)),
          threading.Thread(target=vcpu, args=(b, True))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert seen[:3] == [200_000, ("b in", 200_000), 400_000]
    # A hold registered and never waited for is withdrawn by release(), whether it
    # was granted meanwhile or not: the clock is not left held.
    vm2 = storm_vm(2, 4, rounds=5)
    early = vm2.host.hold_clock(wait=False)             # granted at once (time 0)
    late = vm2.host.hold_clock(at_ns=10 ** 12, wait=False)
    early.release()
    late.release()
    assert not vm2.host.vcpu_threads.active
    run_threads(vm2)
    # A hold waiting for its time with no thread on it yet never stalls the clock.
    vm3 = storm_vm(2, 4, rounds=5)
    pending = vm3.host.hold_clock(at_ns=10 ** 12, wait=False)
    run_threads(vm3)
    assert vm3.host.now < 10 ** 12
    pending.release()
    assert not vm3.host.vcpu_threads.active
    with pytest.raises(ValueError, match="is past"):
        vm.host.hold_clock(at_ns=1)


def _mixed_vmm(seed, n=5):
    """A VMM whose threads do everything at once: vCPU threads read other vCPUs'
    registers (waiting on their vcpu->mutex) and sleep at random in userspace; a
    control thread raises interrupts, signals vCPUs and reads registers at times it
    holds the clock at.  Returns a digest of the final snapshot and of every value
    the threads saw."""
    import hashlib
    vm = kw.VM(nr_vcpus=n, host_cpus=2, seed=seed)
    for i, v in enumerate(vm.vcpus):
        v.load([G.irq_enable(40), G.loop([G.compute_exp(15_000), G.wake_random_other(),
                                          G.timer_arm(40_000), G.wfi(), G.sync(i)], 30),
                G.end()])
    vm.host.set_deadlock_timeout(5)
    log = []
    for v in vm.vcpus:
        v.attach()
    hold = vm.host.hold_clock(at_ns=100_000, wait=False)

    def control():
        rnd = random.Random(seed * 7)
        hold.wait()
        t = 100_000
        for _ in range(8):
            act = rnd.choice(["irq", "signal", "reg"])
            if act == "irq":
                vm.irq_line(40, 1)
                vm.irq_line(40, 0)
            elif act == "signal":
                vm.vcpus[rnd.randrange(n)].signal()
            else:
                log.append(("control", vm.host.now, vm.vcpus[rnd.randrange(n)].get_reg("x0")))
            t += rnd.randrange(10_000, 80_000)
            if t > vm.host.now:
                hold.wait_until(t)
        hold.release()

    def vcpu(v):
        rnd = random.Random(seed * 100 + v.id)
        with v:
            while True:
                ex = v.run(1 << 40)
                log.append((v.id, str(ex)))
                o = vm.vcpus[rnd.randrange(n)]
                if rnd.random() < 0.3 and o is not v:
                    log.append((v.id, o.id, o.get_reg("pc"), vm.host.now))
                if rnd.random() < 0.05:
                    time.sleep(0.001)
                if ex.ucall == "DONE":
                    return
    ts = [threading.Thread(target=control)] + [threading.Thread(target=vcpu, args=(v,))
                                               for v in vm.vcpus]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    return hashlib.sha1(vm.snapshot() + repr(sorted(map(str, log))).encode()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_vmm_doing_everything_at_once_is_deterministic(seed):
    import sys
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        assert len({_mixed_vmm(seed) for _ in range(3)}) == 1
    finally:
        sys.setswitchinterval(old)
