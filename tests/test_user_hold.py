"""A vCPU thread that exits to userspace keeps its host CPU under EEVDF
(core/host.pxi hold_cpu, reference/host.py hold_cpu).

KVM_RUN returning to userspace is not a sleep: the thread stays TASK_RUNNING and
current on its CPU while the VMM handles the exit.  Userspace takes no virtual
time, so the model holds the thread on its CPU until it re-enters at the same
instant (no wake-up, no place_entity(); a reschedule that came due meanwhile is
taken on the way in) or until the clock moves on without it (then it leaves its
CPU at its exit time, as a thread that blocks in userspace).  FIFO keeps the
old rule (the thread leaves at the exit).

* the four paths (kept, released, preempted at re-entry, moved by an affinity
  change) in both engines, with the timeline records they leave;
* snapshots taken while a thread is held continue bit-identically, and the
  checks accept a held thread only where one can be;
* Hypothesis: both engines agree, event for event, with a VMM that re-enters
  every exit at once, and with a snapshot taken in the middle of that.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
from hypothesis import HealthCheck, assume, event, given, settings

import test_differential as D
import test_sched as S
from kvmwake import _core, reference
from kvmwake import guest as G
from kvmwake.model import COST_NAMES, ThreadState
from kvmwake.reference import EngineError
from kvmwake.reference import snapshot as rsnap

ZERO = dict.fromkeys(COST_NAMES, 0)
MS = 1_000_000
USER, RUNNING, RUNNABLE = ThreadState.USER, ThreadState.RUNNING, ThreadState.RUNNABLE
FOREVER = [G.loop([G.compute(MS)])]


@pytest.fixture(params=[_core.Engine, reference.Engine], ids=["core", "reference"])
def engine_cls(request):
    return request.param


def make(engine_cls, *programs, **kw):
    """test_sched.make (one VM, zero costs, all started at t = 0) with the state
    timeline on and no halt polling."""
    return S.make(functools.partial(engine_cls, timeline_capacity=1 << 12), *programs,
                  halt_poll_ns=0, **kw)


def cpu(e, c=0):
    return e.sched_state()["cpus"][c]


def records(e, g):
    """Thread g's timeline records: (t, state)."""
    return [(int(r["t"]), int(r["state"])) for r in e.timeline_array() if r["g"] == g]


def reenter(e, g):
    e.take_exit(g)
    e.start_vcpu(g)


# ---------------------------------------------------------------- the four paths

def test_kept_when_it_reenters_at_once(engine_cls):
    """Thread 0 exits at 1 ms with thread 1 queued behind it on its one CPU: it
    stays current, and re-entering at the same instant keeps the CPU with no
    timeline record (in the kernel no sched_switch happens)."""
    e = make(engine_cls, [G.compute(MS), G.sync(1)] + FOREVER, FOREVER)
    assert e.run_until_exit(10 * MS) == 0 and e.now == MS
    assert cpu(e)["cur"] == 0 and e.thread_info(0)["state"] == USER
    before = records(e, 0)
    reenter(e, 0)
    assert cpu(e)["cur"] == 0 and e.thread_info(0)["state"] == RUNNING
    assert records(e, 0) == before                  # never left its CPU
    assert all(s != USER for _t, s in records(e, 0))


def test_released_when_the_clock_moves_on(engine_cls):
    """Not re-entered: the clock moving on releases the CPU at the exit time, as a
    sleep; thread 1 gets it then, and the timeline says USER from the exit."""
    e = make(engine_cls, [G.compute(MS), G.sync(1)] + FOREVER, FOREVER)
    assert e.run_until_exit(10 * MS) == 0
    e.run(MS + 1)
    assert cpu(e)["cur"] == 1 and e.thread_info(0)["state"] == USER
    assert (MS, USER) in records(e, 0)
    # It ran 1 ms against thread 1's 0: an ineligible sleeper, delayed (DELAY_DEQUEUE).
    assert e.sched_state()["threads"][0]["sched_delayed"] and cpu(e)["queue"] == [0]
    reenter(e, 0)                                   # KVM_RUN now: requeued in place
    assert e.thread_info(0)["state"] == RUNNABLE and cpu(e)["queue"] == [0]
    assert not e.sched_state()["threads"][0]["sched_delayed"]


def test_fifo_leaves_at_the_exit(engine_cls):
    e = make(engine_cls, [G.compute(MS), G.sync(1)] + FOREVER, FOREVER, scheduler="fifo")
    assert e.run_until_exit(10 * MS) == 0
    assert cpu(e)["cur"] == 1 and (MS, USER) in records(e, 0)


def test_a_wakeup_while_held_preempts_at_reentry(engine_cls):
    """Thread 0 wakes thread 1 (asleep since 1 ms: positive lag, so wakeup_preempt()
    asks for a reschedule) and exits at the same instant.  It holds its CPU
    through the exit, and the reschedule is taken when it re-enters: thread 1
    gets the CPU, thread 0 waits with its vruntime as it was (no place_entity())."""
    a = [G.compute(5 * MS), G.wake(1), G.sync(1)] + FOREVER
    b = [G.compute(MS), G.wfi()] + FOREVER
    e = make(engine_cls, a, b)
    assert e.run_until_exit(10 * MS) == 0 and e.now == 6 * MS
    assert cpu(e)["cur"] == 0 and e.thread_info(0)["state"] == USER
    assert e.thread_info(1)["state"] == RUNNABLE and cpu(e)["queue"] == [1]
    v0 = e.sched_state()["threads"][0]["vruntime"]
    reenter(e, 0)
    assert cpu(e)["cur"] == 1 and cpu(e)["queue"] == [0]
    assert e.thread_info(0)["state"] == RUNNABLE
    assert e.sched_state()["threads"][0]["vruntime"] == v0
    assert records(e, 0)[-1] == (6 * MS, RUNNABLE)     # (thread 1 ran first, 1 ms)
    e.run(20 * MS)                                  # and goes on
    assert e.thread_info(0)["state"] in (RUNNING, RUNNABLE)


def test_an_affinity_change_while_held_moves_it(engine_cls):
    """Its CPU taken from its affinity while in userspace: at KVM_RUN it leaves
    CPU 0 at its exit time and is woken on CPU 1."""
    e = make(engine_cls, [G.compute(MS), G.sync(1)] + FOREVER, host_cpus=2)
    assert e.run_until_exit(10 * MS) == 0 and cpu(e, 0)["cur"] == 0
    e.set_affinity(0, [1])
    assert cpu(e, 0)["cur"] == 0                    # still held until KVM_RUN
    reenter(e, 0)
    assert cpu(e, 0)["cur"] == -1 and cpu(e, 1)["cur"] == 0
    assert e.thread_info(0)["pcpu"] == 1 and e.thread_info(0)["nr_migrations"] == 1
    assert (MS, USER) in records(e, 0)


# ---------------------------------------------------------------- snapshots and checks

def _held_engine(engine_cls):
    e = make(engine_cls, [G.compute(5 * MS), G.wake(1), G.sync(1)] + FOREVER,
             [G.compute(MS), G.wfi()] + FOREVER)
    assert e.run_until_exit(10 * MS) == 0 and cpu(e)["cur"] == 0
    return e


def _observed(e):
    return (e.stats_array().tolist(), e.trace_list(), e.sched_state(), e.events,
            e.timeline_array().tobytes(), [e.thread_info(g) for g in range(2)])


def _fresh(engine_cls):
    return engine_cls("arm64", 1, 5, costs=ZERO, scheduler="eevdf")


def test_snapshot_while_held_continues_bit_identically(engine_cls):
    e = _held_engine(engine_cls)
    if engine_cls is reference.Engine:
        state = rsnap.engine_export(e)
        f = _fresh(engine_cls)
        rsnap.engine_import(f, state)
        assert f.held == [0]                        # derived from the state
    else:
        scalars, arrays = e.export_state()
        f = _fresh(engine_cls)
        f.import_state(scalars, arrays)
    for x in (e, f):
        reenter(x, 0)
        x.run(30 * MS)
    assert _observed(f) == _observed(e)


def test_snapshot_while_held_released_on_restore(engine_cls):
    """Restored and run on without re-entering: released at the exit time."""
    e = _held_engine(engine_cls)
    if engine_cls is reference.Engine:
        f = _fresh(engine_cls)
        rsnap.engine_import(f, rsnap.engine_export(e))
    else:
        f = _fresh(engine_cls)
        f.import_state(*e.export_state())
    e.run(7 * MS)
    f.run(7 * MS)
    assert _observed(f) == _observed(e)
    assert (6 * MS, USER) in records(f, 0)


def test_host_snapshot_while_held():
    """Through the public API: VCpu.run() returns the exit with the thread still
    on its CPU; Host.snapshot() then and Host.restore() go on identically."""
    import kvmwake as kw

    def build():
        host = kw.Host(host_cpus=1, seed=2, scheduler="eevdf")
        vm = host.create_vm(2)
        vm.vcpus[0].load([G.loop([G.compute(300_000), G.wake(1), G.sync(7)])])
        vm.vcpus[1].load([G.loop([G.compute(50_000), G.wfi()])])
        return host, vm

    host, vm = build()
    exit_ = vm.vcpus[0].run()
    assert exit_.reason.name == "MMIO"
    assert host.sched_state()["cpus"][0]["cur"] == 0
    twin = kw.Host.restore(host.snapshot())
    for h in (host, twin):
        v = h.vms[0].vcpus[0]
        for _ in range(20):
            v.run()
    assert host.sched_state() == twin.sched_state()
    assert host._engine.stats_array().tolist() == twin._engine.stats_array().tolist()
    assert host.events == twin.events


@pytest.mark.parametrize("edit, what", [
    # A USER thread current on a FIFO host, or queued: neither can be.
    (lambda s: s["engine"].update(sched=0), "EEVDF state on a fifo host|current thread"),
    (lambda s: (s["cpus"][0].update(cur=1, runq=[0]),
                s["threads"][1].update(state=int(USER))), "run queue|current"),
])
def test_reference_import_rejects_an_impossible_hold(edit, what):
    state = rsnap.engine_export(_held_engine(reference.Engine))
    edit(state)
    with pytest.raises(EngineError, match=what):
        rsnap.engine_import(_fresh(reference.Engine), state)


def test_core_import_rejects_a_hold_on_a_fifo_host():
    """A held thread is EEVDF's: the same state on a FIFO engine is refused."""
    scalars, arrays = _held_engine(_core.Engine).export_state()
    _fresh(_core.Engine).import_state(scalars, arrays)       # accepted under EEVDF
    fifo = _core.Engine("arm64", 1, 5, costs=ZERO, scheduler="fifo")
    with pytest.raises(ValueError, match="EEVDF state on a fifo host|userspace"):
        fifo.import_state(scalars, arrays)


def test_reference_check_held_names_a_stale_list():
    e = _held_engine(reference.Engine)
    rsnap.check_held(e)
    e.held = []
    with pytest.raises(EngineError, match="held threads"):
        rsnap.check_held(e)


# ---------------------------------------------------------------- both engines agree

MAX_EXITS = 400


def play_reentering(engine_cls, sc, checkpoint_at=0):
    """Play ``sc`` as a VMM that re-enters every exit at once (VCpu.run in a loop);
    with ``checkpoint_at`` = k, the state at the k-th exit (the thread held) goes
    through export and import into a new engine, which plays on.  After
    MAX_EXITS exits (a zero-cost exit loop takes no time) it stops re-entering."""
    make_ = functools.partial(engine_cls, timeline_capacity=1 << 12)
    e = D.build(make_, sc)
    book = {"module": sc.params["halt_poll_ns"], "caps": list(sc.caps)}
    err = None
    n = 0
    try:
        for t, acts in list(sc.splits) + [(sc.end_ns, [])]:
            while n < MAX_EXITS:
                g = e.run_until_exit(t)
                if g < 0:
                    break
                n += 1
                if engine_cls is reference.Engine:
                    rsnap.check_held(e)
                if n == checkpoint_at:
                    e = _through_snapshot(engine_cls, e, sc)
                e.take_exit(g)
                e.start_vcpu(g)
            e.run(t)
            for act in acts:
                D.apply(e, sc, book, act)
    except EngineError as exc:
        err = str(exc)
    snap = D.snapshot(e, sc)
    snap["timeline"] = e.timeline_array().tobytes()
    snap["exits"] = n
    return err, snap


def _through_snapshot(engine_cls, e, sc):
    f = engine_cls("x86" if sc.arch == "arm64" else "arm64", 3, 99, trace_capacity=0) \
        if engine_cls is reference.Engine else \
        engine_cls(sc.arch, sc.host_cpus, sc.seed, costs=D.engine_costs(sc.costs),
                   scheduler=sc.scheduler)
    if engine_cls is reference.Engine:
        rsnap.engine_import(f, rsnap.engine_export(e))
        rsnap.check_held(f)
    else:
        f.import_state(*e.export_state())
    return f


def _eevdf(sc):
    return dataclasses.replace(sc, scheduler="eevdf", end_ns=sc.end_ns * 4)


@settings(max_examples=max(20, D.DIFF_EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=D.scenarios().map(_eevdf))
def test_core_and_reference_agree_reentering_at_once(sc):
    assume(D.within_budget(sc))
    core = play_reentering(_core.Engine, sc)
    assume(core[1]["events"] <= D.EVENT_BUDGET)
    ref = play_reentering(reference.Engine, sc)
    D.assert_same(core, ref, "core vs reference (re-entering at once)")
    event(f"exits re-entered: {min(core[1]['exits'], 10)}{'+' if core[1]['exits'] >= 10 else ''}")
    if core[0] is None and core[1]["exits"] >= 2:
        k = core[1]["exits"] // 2
        D.assert_same(play_reentering(_core.Engine, sc, k), core,
                      "core continued from a snapshot taken while held")
        D.assert_same(play_reentering(reference.Engine, sc, k), ref,
                      "reference continued from a snapshot taken while held")


def _storm(engine_cls, seed, ncpu=2, nvcpu=6, until=20 * MS):
    """vCPUs that wake each other and exit right after each wake (as the kernel
    harness's guest does around its ICR writes; zero costs put the exit at the
    wake's instant), each with a 50 us periodic timer, under a VMM that
    re-enters at once."""
    e = engine_cls("arm64", ncpu, seed, costs=ZERO, scheduler="eevdf",
                   timeline_capacity=1 << 14)
    e.add_vm(nvcpu)
    prog = G.Program([G.timer_arm(50_000, 50_000),
                      G.loop([G.compute_exp(20_000), G.wake_random_other(), G.sync(1),
                              G.wfi()])])
    for g in range(nvcpu):
        e.load_program(g, prog.ops)
        e.start_vcpu(g)
    while (g := e.run_until_exit(until)) >= 0:
        reenter(e, g)
    e.run(until)
    return (e.stats_array().tolist(), e.trace_list(), e.sched_state(), e.events,
            e.timeline_array().tobytes())


def test_both_engines_agree_when_wakeups_meet_a_held_thread(monkeypatch):
    """Wake-ups that land on a held thread's CPU ask for a reschedule it takes at
    re-entry (the branch random scenarios rarely reach): both engines agree, and
    the branch is taken."""
    from kvmwake.reference import host as rhost
    seen = {"reenter": 0, "resched": 0}
    orig = rhost.reenter_held

    def counting(e, th, t):
        seen["reenter"] += 1
        seen["resched"] += bool(e.cpus[th.pcpu].need_resched)
        return orig(e, th, t)

    monkeypatch.setattr(rhost, "reenter_held", counting)
    for seed, ncpu, nvcpu in ((0, 1, 3), (1, 2, 6), (2, 2, 5)):
        assert _storm(_core.Engine, seed, ncpu, nvcpu) == _storm(reference.Engine, seed, ncpu,
                                                                nvcpu)
    assert seen["reenter"] > 1000 and seen["resched"] > 50, seen
