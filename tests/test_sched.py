"""The EEVDF host scheduler (core/host.pxi, reference/host.py), hand-computed.

Spec: /work/notes/sched-spec.md (Linux 6.18 kernel/sched/fair.c), nice-0 forms of
section 1.6.  Each case names the kernel function whose rule it checks.  Most
end-to-end cases run one host CPU with every cost 0, so that a thread's
vruntime is exactly the time it held the CPU; the base slice is then 0.7 ms
and ticks fall every 4 ms (HZ=250) from time 0.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import _core, reference
from kvmwake import guest as G
from kvmwake.model import COST_NAMES, SCHED_TICK_NSEC, ThreadState, sched_base_slice
from kvmwake.reference import EngineError
from kvmwake.reference import host as rhost
from kvmwake.reference import snapshot as rsnap

ZERO = dict.fromkeys(COST_NAMES, 0)
MS = 1_000_000
SLICE1 = 700_000                 # sysctl_sched_base_slice on 1 CPU
USER, RUNNING, POLLING, BLOCKED, RUNNABLE = (
    ThreadState.USER, ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED,
    ThreadState.RUNNABLE)
FOREVER = [G.loop([G.compute(MS)])]


@pytest.fixture(params=[_core.Engine, reference.Engine], ids=["core", "reference"])
def engine_cls(request):
    return request.param


def make(engine_cls, *programs, host_cpus=1, scheduler="eevdf", costs=None, start=None,
         halt_poll_ns=200_000):
    """One VM, one vCPU per program, zero costs; threads in ``start`` (default: all)
    enter KVM_RUN at t = 0 in order."""
    e = engine_cls("arm64", host_cpus, 0, costs=dict(ZERO, **(costs or {})),
                   scheduler=scheduler)
    e.halt_poll_ns = halt_poll_ns
    e.add_vm(len(programs))
    for g, prog in enumerate(programs):
        e.load_program(g, G.Program(prog).ops)
    for g in range(len(programs)) if start is None else start:
        e.start_vcpu(g)
    return e


def state(e, g):
    return e.thread_info(g)["state"]


def se(e, g):
    return e.sched_state()["threads"][g]


def rq(e, c=0):
    return e.sched_state()["cpus"][c]


# ---------------------------------------------------------------- the base slice

@pytest.mark.parametrize("ncpus, want", [(1, 700_000), (2, 1_400_000), (3, 1_400_000),
                                         (4, 2_100_000), (7, 2_100_000), (8, 2_800_000),
                                         (64, 2_800_000), (1024, 2_800_000)])
def test_base_slice_scales_with_cpu_count(engine_cls, ncpus, want):
    """update_sysctl() / get_update_sysctl_factor(): SCHED_TUNABLESCALING_LOG,
    0.70 ms x (1 + ilog2(min(ncpus, 8))) (spec section 3's table)."""
    assert sched_base_slice(ncpus) == want
    assert engine_cls("arm64", ncpus, 0, scheduler="eevdf").base_slice == want


# ---------------------------------------------------------------- the rules, one by one
# On the reference's functions (the core's twins are held equal to them by
# tests/test_differential.py::test_core_and_reference_agree_eevdf).

def fake(vruntimes, cur=None, deadlines=None, vprot=None, delayed=(), base_slice=SLICE1):
    """A fake engine with one CPU: thread i has vruntime vruntimes[i]; ``cur`` is
    the current one, the others are queued in order."""
    threads = []
    for i, v in enumerate(vruntimes):
        threads.append(types.SimpleNamespace(
            g=i, vruntime=v, deadline=(deadlines or vruntimes)[i] if deadlines else v + base_slice,
            vprot=0, vlag=0, sched_delayed=i in delayed, on_rq=True, exec_start=0))
    cpu = rhost._Cpu()
    for i in range(len(vruntimes)):
        if i == cur:
            cpu.cur = i
        else:
            cpu.runq.append(i)
    cpu.sum_v = sum(vruntimes)
    if cur is not None and vprot is not None:
        threads[cur].vprot = vprot
    return types.SimpleNamespace(threads=threads, cpus=[cpu], base_slice=base_slice), cpu


def test_avg_vruntime_is_the_floor_of_the_mean():
    """avg_vruntime(): the `runtime -= weight - 1` before div_s64 makes it a floor
    for negative sums too; it moves zero_vruntime to V; an empty queue keeps it."""
    e, cpu = fake([10, 11])
    assert rhost.avg_vruntime(cpu) == 10 and cpu.zero_v == 10 and cpu.sum_v == 1
    e, cpu = fake([-10, -11])
    assert rhost.avg_vruntime(cpu) == -11
    e, cpu = fake([])
    cpu.zero_v = 1234
    assert rhost.avg_vruntime(cpu) == 1234


def test_eligibility_without_division():
    """vruntime_eligible(): eligible iff sum (v_j - v0) >= (v - v0) n, i.e. v <= V
    exactly (equality eligible), not v <= floor(V)."""
    e, cpu = fake([0, 1, 1])             # mean 2/3
    assert rhost.vruntime_eligible(cpu, 0)
    assert not rhost.vruntime_eligible(cpu, 1)   # 1 > 2/3 though floor(V) = 0 < 1
    e, cpu = fake([4, 6])
    assert rhost.vruntime_eligible(cpu, 5) and not rhost.vruntime_eligible(cpu, 6)


def test_update_entity_lag_is_clamped():
    """update_entity_lag(): vlag = V - v, clamped to +-(max slice + TICK_NSEC)."""
    e, cpu = fake([0, 20 * MS])
    rhost.update_entity_lag(e, cpu, e.threads[0])
    assert e.threads[0].vlag == SLICE1 + SCHED_TICK_NSEC           # V - v = 10 ms
    rhost.update_entity_lag(e, cpu, e.threads[1])
    assert e.threads[1].vlag == -(SLICE1 + SCHED_TICK_NSEC)
    e, cpu = fake([0, 2 * MS])
    rhost.update_entity_lag(e, cpu, e.threads[0])
    assert e.threads[0].vlag == MS


@pytest.mark.parametrize("queued, vlag, want_v", [
    ([5 * MS], 300_000, 5 * MS - 600_000),          # n = 1: lag x 2
    ([0, 3], 5, 1 - 7),                             # n = 2: V = 1, 5 x 3 / 2 = 7.5 -> 7
    ([0, 3], -5, 1 + 7),                            # -7.5 truncates toward 0: -7
    ([], 300_000, 0),                               # empty queue: no lag, v = V
    ([4, 4], 0, 4),
])
def test_place_entity_inflates_the_lag(queued, vlag, want_v):
    """place_entity() (PLACE_LAG): v = V - vlag (n + 1) / n with C division, so that
    after the insert the entity has its lag again; d = v + base slice."""
    e, cpu = fake(queued)
    th = types.SimpleNamespace(vruntime=None, deadline=None, vlag=vlag)
    rhost.place_entity(e, cpu, th)
    assert th.vruntime == want_v and th.deadline == want_v + SLICE1


def test_pick_eevdf_order():
    """pick_eevdf(): the eligible entity with the earliest deadline; an ineligible
    one with an earlier deadline is passed over; on equal deadlines the earlier
    queued wins; the current one wins only with a strictly earlier deadline, and
    inside its protected slice (RUN_TO_PARITY) whatever the others' deadlines."""
    # queued 1 (v 0, d 9), 2 (v 10, d 1: ineligible, V = 6), 3 (v 8, d 5)
    e, cpu = fake([0, 0, 10, 8], cur=0, deadlines=[20, 9, 1, 5], vprot=0)
    cpu.runq.remove(0) if 0 in cpu.runq else None
    assert rhost.pick_eevdf(e, cpu) == 1            # 3 is ineligible too (8 > 4.5)
    e, cpu = fake([4, 4, 4], cur=0, deadlines=[9, 9, 9], vprot=0)
    assert rhost.pick_eevdf(e, cpu) == 1            # tie: earlier queued, not curr
    e, cpu = fake([4, 4, 4], cur=0, deadlines=[8, 9, 9], vprot=0)
    assert rhost.pick_eevdf(e, cpu) == 0            # curr strictly earlier
    e, cpu = fake([4, 4, 4], cur=0, deadlines=[30, 9, 9], vprot=5)
    assert rhost.pick_eevdf(e, cpu) == 0            # protected: v 4 < vprot 5
    e, cpu = fake([6, 0], cur=0, deadlines=[30, 9], vprot=100)
    assert rhost.pick_eevdf(e, cpu) == 1            # an ineligible curr is not protected
    e, cpu = fake([50], delayed=(0,))
    assert rhost.pick_eevdf(e, cpu) == 0            # one queued: no eligibility test


def test_pick_eevdf_can_look_past_delayed_sleepers():
    """skip_delayed (check_preempt_wakeup_fair with preempt_skips_delayed): a delayed
    sleeper still counts in V, but is no candidate.  Curr 0 (v 150) is
    ineligible (V = 125); delayed 1 (v 100, d 700) is eligible and earliest;
    2 (v 125, d 825) is next."""
    e, cpu = fake([150, 100, 125], cur=0, deadlines=[700, 700, 825], vprot=700, delayed=(1,))
    assert rhost.avg_vruntime(cpu) == 125
    assert rhost.pick_eevdf(e, cpu) == 1
    assert rhost.pick_eevdf(e, cpu, True) == 2
    e, cpu = fake([150, 100], cur=0, deadlines=[700, 700], vprot=700, delayed=(1,))
    assert rhost.pick_eevdf(e, cpu, True) == -1     # nothing else: no pick (curr ineligible)


#: On one CPU: B (thread 0) sleeps at once; D (1) computes 100 us and sleeps with
#: v 100 us > V = 50 us (delayed); C (2) computes 150 us (v 150 > V = 125: not
#: eligible; D is, with the earlier deadline) and wakes B, placed at V = 125 us.
SKIP_CASE = ([G.wfi()] + FOREVER, [G.compute(100_000), G.wfi()] + FOREVER,
             [G.compute(150_000), G.wake(0)] + FOREVER)


@pytest.mark.parametrize("on", [False, True])
def test_wakeup_preemption_past_a_delayed_sleeper(engine_cls, on):
    """Upstream, pick_eevdf() returns the delayed D, not B: C keeps its CPU.  With
    preempt_skips_delayed (the host kernels kvmwake is held against), B is the
    pick among the threads that are not delayed: C is preempted, B runs, and
    pick_next_task_fair() finishes D's dequeue on the way."""
    e = make(engine_cls, *SKIP_CASE, halt_poll_ns=0)
    e.set_preempt_skips_delayed(on)
    assert e.preempt_skips_delayed is on
    e.run(200_000)
    assert se(e, 1)["sched_delayed"] and state(e, 2) == RUNNING
    e.run(260_000)
    assert se(e, 0)["vruntime"] == 125_000 and se(e, 0)["deadline"] == 825_000
    if on:
        assert (state(e, 0), state(e, 2)) == (RUNNING, RUNNABLE)
        assert not se(e, 1)["on_rq"]
    else:
        assert (state(e, 0), state(e, 2)) == (RUNNABLE, RUNNING)
        assert se(e, 1)["sched_delayed"]


def test_preempt_skips_delayed_on_the_host():
    with pytest.raises(TypeError, match="preempt_skips_delayed must be True or False"):
        kw.Host(preempt_skips_delayed="yes")
    host = kw.Host(scheduler="eevdf", preempt_skips_delayed=True,
                   costs={k: v for k, v in ZERO.items() if k != "sched_slice_ns"})
    assert host.preempt_skips_delayed is True and kw.Host().preempt_skips_delayed is False
    vm = host.create_vm(3)
    for v, prog in zip(vm.vcpus, SKIP_CASE):
        v.load(G.Program(prog))
    host.halt_poll_ns = 0
    host.run(200_000)
    h2 = kw.Host.restore(host.snapshot())
    assert h2.preempt_skips_delayed is True
    for h in (host, h2):
        h.run(260_000)
    assert [v.thread_state for v in h2.vms[0].vcpus] == ["RUNNING", "BLOCKED", "RUNNABLE"]
    assert h2.events == host.events


# ---------------------------------------------------------------- end to end, both engines

def test_slice_end_noticed_at_a_tick(engine_cls):
    """task_tick_fair() -> update_curr(): without HRTICK two CPU-bound threads swap
    only at 4 ms ticks, although the slice is 0.7 ms.  At 4 ms, v = (4, 0) ms:
    thread 0 is ineligible and 1 runs; at 8 ms v = (4, 4) ms, the deadlines tie
    (4.7 ms, renewed at the tick) and the queued thread wins (pick_eevdf)."""
    e = make(engine_cls, FOREVER, FOREVER)
    e.run(4 * MS)                                   # events before 4 ms
    assert rq(e)["cur"] == 0 and state(e, 0) == RUNNING
    e.run(4 * MS + 1)
    assert rq(e)["cur"] == 1 and state(e, 0) == RUNNABLE
    assert se(e, 0)["vruntime"] == 4 * MS and se(e, 0)["deadline"] == 4 * MS + SLICE1
    e.run(8 * MS + 1)
    assert rq(e)["cur"] == 0
    assert se(e, 1)["vruntime"] == 4 * MS and se(e, 1)["deadline"] == 4 * MS + SLICE1
    # FIFO with the same threads swaps at every sched_slice_ns.
    f = make(engine_cls, FOREVER, FOREVER, scheduler="fifo",
             costs={"sched_slice_ns": 750_000})
    f.run(750_001)
    assert state(f, 1) == RUNNING


def test_wakeup_inside_the_protected_slice_does_not_preempt(engine_cls):
    """check_preempt_wakeup_fair(): thread 1 enqueued at 0 with lag 0 is placed at
    V = v_0; thread 0 is eligible and inside its protected slice (v < vprot), so
    pick_eevdf() returns it and nothing is preempted until the tick."""
    e = make(engine_cls, FOREVER, FOREVER)
    e.run(1)
    assert rq(e)["cur"] == 0 and rq(e)["queue"] == [1]
    assert se(e, 1)["vruntime"] == 0 and se(e, 1)["deadline"] == SLICE1
    e.run(3 * MS)
    assert rq(e)["cur"] == 0 and state(e, 1) == RUNNABLE


def test_wakeup_after_the_protected_slice_preempts_on_a_deadline_tie(engine_cls):
    """check_preempt_wakeup_fair() at 1 ms: enqueue_entity()'s update_curr() renews
    thread 0's deadline to 1.7 ms (v 1 ms >= d 0.7 ms; alone, so no reschedule);
    thread 1 is placed at V = 1 ms with d = 1.7 ms; thread 0 is no longer
    protected (v >= vprot 0.7 ms) and not strictly earlier: thread 1 runs."""
    e = make(engine_cls, FOREVER, FOREVER, start=[0])
    e.run(MS)
    e.start_vcpu(1)
    e.run(MS + 1)
    assert rq(e)["cur"] == 1 and state(e, 1) == RUNNING
    assert se(e, 0)["deadline"] == MS + SLICE1 and se(e, 1)["deadline"] == MS + SLICE1


def test_wakeup_with_positive_lag_preempts(engine_cls):
    """place_entity() + check_preempt_wakeup_fair(): thread 1 runs from the 4 ms
    tick (v 0 against 4 ms), halts at 5 ms while eligible (V = 2.5 ms), so it
    leaves with vlag = 1.5 ms (update_entity_lag).  Woken by its timer at 6 ms
    with thread 0 alone (v 5 ms), it is placed at 5 - 2 x 1.5 = 2 ms; thread 0
    is then ineligible (V = 3.5 ms) and is preempted at once."""
    b = [G.compute(MS), G.timer_arm(MS), G.wfi()] + FOREVER
    e = make(engine_cls, FOREVER, b, halt_poll_ns=0)
    e.run(5 * MS + 1)
    assert state(e, 1) == BLOCKED and se(e, 1)["vlag"] == 1_500_000
    assert not se(e, 1)["on_rq"]
    e.run(6 * MS + 1)
    assert rq(e)["cur"] == 1 and state(e, 1) == RUNNING and state(e, 0) == RUNNABLE
    assert se(e, 1)["vruntime"] == 2 * MS and se(e, 1)["deadline"] == 2 * MS + SLICE1


def test_wakee_preempting_its_waker(engine_cls):
    """resched_curr() of the waker itself: thread 0 wakes thread 1 (positive lag,
    as in the case above) at 6 ms on its own CPU; the switch happens at the
    waker's next preemption point, after the wake, and leaves the run queue
    consistent (the state checks of a snapshot import pass)."""
    a = [G.compute(5 * MS), G.wake(1)] + FOREVER
    b = [G.compute(MS), G.wfi()] + FOREVER
    e = make(engine_cls, a, b, halt_poll_ns=0)
    e.run(6 * MS + 1)
    assert rq(e)["cur"] == 1 and state(e, 1) == RUNNING and state(e, 0) == RUNNABLE
    assert rq(e)["queue"] == [0] and se(e, 1)["vruntime"] == 2 * MS
    if engine_cls is reference.Engine:
        rsnap.check_state(e)
    else:
        scalars, arrays = e.export_state()
        fresh = _core.Engine("arm64", 1, 0, costs=ZERO, scheduler="eevdf")
        fresh.add_vm(2)
        fresh.import_state(scalars, arrays)
    e.run(20 * MS)                                  # and goes on
    assert e.thread_info(0)["pcpu"] == 0


# Thread 0 first halts for 5 us (its per-vCPU halt_poll_ns grows from 0 to
# grow_start, 10 us, so that its next halt may poll), then computes 1.6 ms
# (0.005-1.005 ms and 3.905-4.505 ms) and halts again.  Thread 1 starts at
# 1.005 ms, when thread 0 has run exactly 1 ms, and computes 2.9 ms.
A_HALTS = [G.timer_arm(5_000), G.wfi(), G.compute(1_600_000), G.wfi()] + FOREVER
B_OVERRUNS = [G.compute(2_900_000), G.wfi()] + FOREVER
T0 = 5_000


def delayed_host(engine_cls, b=B_OVERRUNS):
    e = make(engine_cls, A_HALTS, b, start=[0])
    e.run(MS + T0)
    assert se(e, 0)["exec_start"] == T0 and rq(e)["cur"] == 0     # v = now - exec_start
    e.start_vcpu(1)         # preempts thread 0 (as in the deadline-tie case above)
    return e


def test_ineligible_sleeper_is_delayed_and_stops_a_poll(engine_cls):
    """dequeue_entity() with DELAY_DEQUEUE: thread 1 blocks with v 3.9 ms > V =
    2.45 ms, so it stays queued (sched_delayed) and rq->nr_running stays 2.
    Thread 0 halts 0.6 ms later with halt_poll_ns = 10 us: single_task_running()
    is false on its CPU, so kvm_vcpu_halt() does not poll; it blocks.  Then
    pick_next_task_fair() finds only the delayed thread, dequeues it (DELAY_ZERO:
    lag 0) and the CPU idles."""
    e = delayed_host(engine_cls)
    e.run(T0 + 3_900_001)
    assert state(e, 1) == BLOCKED and rq(e)["cur"] == 0
    assert se(e, 1)["sched_delayed"] and se(e, 1)["on_rq"]
    assert rq(e)["nr_running"] == 2 and rq(e)["queue"] == [1]
    assert e.thread_info(0)["halt_poll_ns"] == 10_000
    e.run(T0 + 4_500_001)
    assert state(e, 0) == BLOCKED                   # no poll
    assert rq(e) == {"cur": -1, "queue": [], "nr_running": 0, "V": rq(e)["V"]}
    assert not se(e, 1)["on_rq"] and not se(e, 1)["sched_delayed"]
    assert se(e, 1)["vlag"] == 0
    # FIFO: a thread that blocks leaves the run queue at once.  Thread 1 starts
    # at 0.1 ms, gets the CPU at thread 0's slice end (0.305 ms), blocks at
    # 0.805 ms; thread 0 halts at 2.105 ms on a CPU with nothing queued: it polls.
    f = make(engine_cls, A_HALTS, [G.compute(500_000), G.wfi()] + FOREVER, start=[0],
             scheduler="fifo", costs={"sched_slice_ns": 300_000})
    f.run(100_000)
    f.start_vcpu(1)
    f.run(2_105_001)
    assert state(f, 1) == BLOCKED and state(f, 0) == POLLING


def test_eevdf_is_deterministic(engine_cls):
    def run():
        e = engine_cls("arm64", 2, 7, scheduler="eevdf")
        e.add_vm(6)
        for g in range(6):
            e.load_program(g, G.Program([G.loop([G.compute_exp(30_000), G.wake_random_other(),
                                                 G.wfi()])]).ops)
            e.start_vcpu(g)
        e.run(10 * MS)
        return e.stats_array().tolist(), e.trace_list(), e.sched_state(), e.events
    assert run() == run()


# ---------------------------------------------------------------- hosts and snapshots

def storm_host(scheduler="eevdf", seed=3):
    host = kw.Host(host_cpus=2, seed=seed, scheduler=scheduler)
    vm = host.create_vm(6)
    vm.set_tick(4 * MS)
    for v in vm.vcpus:
        v.load([G.loop([G.compute_exp(40_000), G.wake_random_other(), G.wfi()])])
    return host, vm


def test_host_scheduler_argument():
    assert kw.Host().scheduler == "fifo"
    assert kw.Host(scheduler="eevdf").scheduler == "eevdf"
    for bad in ("cfs", None, 1):
        with pytest.raises(ValueError, match="scheduler"):
            kw.Host(scheduler=bad)


def test_eevdf_snapshot_continues_bit_identically():
    """A restored EEVDF host (the scheduler fields ride in the thread and CPU
    structs) goes on exactly as the original."""
    host, vm = storm_host()
    host.run(5 * MS)
    # (a thread is delayed on a CPU at this instant: its state rides along)
    assert any(x["sched_delayed"] for x in host.sched_state()["threads"])
    data = host.snapshot()
    twin = kw.Host.restore(data)
    assert twin.scheduler == "eevdf"
    host.run(15 * MS)
    twin.run(15 * MS)
    assert host.sched_state() == twin.sched_state()
    assert host._engine.stats_array().tolist() == twin._engine.stats_array().tolist()
    assert host._engine.trace_list() == twin._engine.trace_list()
    assert host.events == twin.events


def test_eevdf_snapshot_refuses_a_changed_cpu_count():
    """Re-placement onto another CPU count is FIFO-only for now (docs/design.md)."""
    host, vm = storm_host()
    host.run(MS)
    with pytest.raises(kw.SnapshotError, match="fifo"):
        kw.Host.restore(host.snapshot(), host_cpus=3)
    with pytest.raises(ValueError, match="fifo"):
        host._engine.rehost(3)
    e = delayed_host(reference.Engine)
    with pytest.raises(ValueError, match="fifo"):
        rsnap.engine_rehost(e, 2)


CPU_DTYPE = np.dtype([("zero_v", "<i8"), ("sum_v", "<i8"), ("cur", "<i4"), ("rq_head", "<i4"),
                      ("rq_tail", "<i4"), ("rq_len", "<u4"), ("need_resched", "u1"),
                      ("_pad", "u1", (7,))], align=True)


@pytest.mark.parametrize("at, field, delta, what", [
    (T0 + 3_900_001, "sum_v", 1, "vruntime sum"),       # thread 1 delayed on CPU 0
    (T0 + 4_600_000, "need_resched", 1, "reschedule"),  # CPU 0 idle
])
def test_core_import_checks_the_cpu_fields(at, field, delta, what):
    """_check_state/_check_sched: a CPU's EEVDF fields must agree with its queue."""
    e = delayed_host(_core.Engine)
    e.run(at)
    scalars, arrays = e.export_state()
    cpus = np.frombuffer(bytes(arrays["cpus"]), dtype=CPU_DTYPE).copy()
    cpus[field][0] += delta
    arrays = dict(arrays, cpus=np.frombuffer(cpus.tobytes(), dtype=np.uint8).copy())
    fresh = _core.Engine("arm64", 1, 0, costs=ZERO, scheduler="eevdf")
    fresh.add_vm(2)
    with pytest.raises(ValueError, match=what):
        fresh.import_state(scalars, arrays)
    # The same state on a fifo engine is refused as EEVDF state there.
    scalars, arrays = e.export_state()
    fifo = _core.Engine("arm64", 1, 0, costs=ZERO, scheduler="fifo")
    fifo.add_vm(2)
    with pytest.raises(ValueError, match="EEVDF state on a fifo host|run queue"):
        fifo.import_state(scalars, arrays)


@pytest.mark.parametrize("edit, what", [
    (lambda s: s["threads"][1].update(sched_delayed=False), "sched_delayed|run queue"),
    (lambda s: s["threads"][0].update(on_rq=False), "on_rq"),
    (lambda s: s["cpus"][0].update(sum_v=s["cpus"][0]["sum_v"] + 1), "vruntime sum"),
    (lambda s: s["engine"].update(sched=7), "scheduler"),
    (lambda s: s["cpus"][0].update(cur=-1), "idle CPU|on_rq"),
])
def test_reference_import_checks_the_sched_fields(edit, what):
    """check_state/check_sched, the reference's twin of the core's checks."""
    e = delayed_host(reference.Engine)
    e.run(T0 + 3_900_001)
    state_ = rsnap.engine_export(e)
    edit(state_)
    with pytest.raises(EngineError, match=what):
        rsnap.engine_import(reference.Engine("arm64", 1, 0, scheduler="eevdf"), state_)


# ---------------------------------------------------------------- scenarios and the CLI

def _scenario_file(tmp_path, scheduler_line):
    from kvmwake import scenarios
    text = scenarios.path_of("ipi-storm").read_text().replace(
        'cpus = "per-vcpu"', 'cpus = 2\n' + scheduler_line)
    f = tmp_path / "sched.toml"
    f.write_text(text)
    return f


def test_scenario_host_scheduler(tmp_path):
    """[host] scheduler = "eevdf" builds an EEVDF host; build(scheduler=...) (the
    CLI's --scheduler) overrides the file; an unknown name is refused by key."""
    from kvmwake import scenarios
    host, _, sc = scenarios.build(str(_scenario_file(tmp_path, 'scheduler = "eevdf"')),
                                  vcpus=4)
    assert sc.scheduler == "eevdf" and host.scheduler == "eevdf"
    host, _, _ = scenarios.build(str(_scenario_file(tmp_path, 'scheduler = "eevdf"')),
                                 vcpus=4, scheduler="fifo")
    assert host.scheduler == "fifo"
    host, _, sc = scenarios.build(str(_scenario_file(tmp_path, "")), vcpus=4)
    assert sc.scheduler == "fifo" and host.scheduler == "fifo"
    with pytest.raises(kw.ScenarioError, match=r"host\.scheduler.*'cfs'"):
        scenarios.build(str(_scenario_file(tmp_path, 'scheduler = "cfs"')))
    with pytest.raises(kw.ScenarioError, match=r"host\.scheduler"):
        scenarios.build(str(_scenario_file(tmp_path, "scheduler = 3")))


def test_cli_scheduler(tmp_path, capsys):
    from kvmwake import cli
    out = tmp_path / "s.json"
    assert cli.main(["run", "ipi-storm", "--vcpus", "8", "--host-cpus", "2", "--sim-ms", "5",
                     "--scheduler", "eevdf", "--json", str(out), "--no-out"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["run", "ipi-storm", "--scheduler", "cfs"])
