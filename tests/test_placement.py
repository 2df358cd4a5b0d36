"""Placement (core/host.pxi, reference/host.py; docs/design.md "Placement"): CPU
affinity, LLC groups, wake placement as select_task_rq_fair does it in outline,
newly-idle pulls, nr_migrations, set_affinity, snapshots.

Every case is computed by hand from the rules and run on both engines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import guest as G

from test_snapshot import edit_records

US = 1_000
MS = 1_000_000
ENGINES = ("core", "reference")
HOG = G.Program([G.loop([G.compute(MS)])])


def host_of(engine, cpus=2, scheduler="eevdf", **kw_):
    return kw.Host(host_cpus=cpus, engine=engine, scheduler=scheduler, **kw_)


def test_the_core_compiles_the_reference_constants():
    from kvmwake import _core
    from kvmwake.reference import host as rhost
    assert _core.compiled_constants()["placement"] == {
        name: getattr(rhost, name) for name in ("AFF_PINNED", "AFF_ALL", "AFF_LIST",
                                                "SCHED_MIGRATION_COST_NS",
                                                "SD_LLC_IMBALANCE_PCT")}


# -- validation ---------------------------------------------------------------------------

def test_llc_groups():
    assert kw.Host(host_cpus=4).llc_groups == ((0, 1, 2, 3),)
    assert kw.Host(host_cpus=5, llc=2).llc_groups == ((0, 1), (2, 3), (4,))
    assert kw.Host(host_cpus=4, llc=[[3, 0], [1, 2]]).llc_groups == ((0, 3), (1, 2))
    for bad, exc, words in (([[0], [0, 1]], ValueError, "CPU 0 is in two groups"),
                            ([[0]], ValueError, "CPU 1 is in no group"),
                            ([[0, 1], []], ValueError, "group 1 is empty"),
                            ([[0, 2]], ValueError, "out of range"),
                            (0, ValueError, "llc = 0"),
                            ("two", TypeError, "llc must be")):
        with pytest.raises(exc, match=words):
            kw.Host(host_cpus=2, llc=bad)


@pytest.mark.parametrize("engine", ENGINES)
def test_affinity_validation_leaves_the_host_as_it_was(engine):
    host = host_of(engine)
    for bad, exc, words in (([5], ValueError, "CPU 5 does not exist"),
                            ([], ValueError, "empty CPU set"),
                            ("some", ValueError, "unknown affinity"),
                            (1.5, TypeError, "affinity must be"),
                            ([0, True], TypeError, "not an integer")):
        with pytest.raises(exc, match=words):
            host.create_vm(2, affinity=bad)
        assert host.vms == [] and host._nthreads == 0
    vm = host.create_vm(3, affinity=[1, 0])
    assert [v.affinity for v in vm.vcpus] == [(0, 1)] * 3
    assert [v.host_cpu for v in vm.vcpus] == [0, 1, 0]      # the (g mod n)-th of the set
    with pytest.raises(ValueError, match="CPU 2 does not exist"):
        vm.vcpus[0].set_affinity([0, 2])
    assert vm.vcpus[0].affinity == (0, 1)
    vm.vcpus[0].set_affinity(1)
    assert vm.vcpus[0].affinity == (1,)
    vm.vcpus[0].set_affinity("pinned")
    assert vm.vcpus[0].affinity == (0,)
    pinned = host.create_vm(2)
    assert [v.affinity for v in pinned.vcpus] == [(1,), (0,)]    # threads 3, 4
    assert host.thread_info(3)["nr_migrations"] == 0
    with pytest.raises(ValueError, match="out of range"):
        host.thread_info(5)


# -- wake placement -------------------------------------------------------------------------

#: A hog that first sleeps 20 us (so that B's CPU empties and B is a plain sleeper,
#: not a delayed-dequeue one that would wake in place), then computes.
LATE_HOG = G.Program([G.timer_arm(20 * US), G.wfi(), G.loop([G.compute(MS)])])


def wake_case(engine, scheduler, hogs_on_prev, cpus):
    """vCPU A (thread 0, CPU 0) wakes vCPU B (thread 1, CPU 1, affinity "all") at
    ~50 us; ``hogs_on_prev`` pinned threads compute on B's CPU 1 from 20 us."""
    host = host_of(engine, cpus=cpus, scheduler=scheduler)
    vm = host.create_vm(2, affinity="all")
    vm.vcpus[0].load(G.Program([G.compute(50 * US), G.wake(1), G.loop([G.compute(MS)])]))
    vm.vcpus[1].load(G.Program([G.wfi(), G.loop([G.compute(MS)])]))
    for _ in range(hogs_on_prev):
        host.create_vm(1, affinity=[1]).vcpus[0].load(LATE_HOG)
    host.run(200 * US)
    return vm.vcpus[1]


@pytest.mark.parametrize("scheduler", ["eevdf", "fifo"])
@pytest.mark.parametrize("engine", ENGINES)
def test_wake_onto_its_idle_previous_cpu(engine, scheduler):
    """B's CPU 1 is idle: wake_affine_idle() -> prev, select_idle_sibling(): target idle."""
    b = wake_case(engine, scheduler, 0, 2)
    assert (b.host_cpu, b.nr_migrations) == (1, 0)


@pytest.mark.parametrize("scheduler", ["eevdf", "fifo"])
@pytest.mark.parametrize("engine", ENGINES)
def test_wake_onto_an_idle_cpu_of_the_llc(engine, scheduler):
    """CPU 1 runs a hog, the waker's CPU 0 is busy, CPU 2 idle.  EEVDF:
    wake_affine_weight() keeps prev ((1 + 1) * 100 >= 1 * 108), select_idle_sibling()
    finds CPU 2 (select_idle_cpu from target + 1).  FIFO: the first idle CPU."""
    b = wake_case(engine, scheduler, 1, 3)
    assert (b.host_cpu, b.nr_migrations) == (2, 1)


@pytest.mark.parametrize("engine", ENGINES)
def test_wake_affine_pulls_towards_the_waker(engine):
    """Two hogs on CPU 1, nothing idle: wake_affine_weight() picks the waker's CPU 0
    ((1 + 1) * 100 < 2 * 108); select_idle_sibling() finds nothing idle: CPU 0."""
    b = wake_case(engine, "eevdf", 2, 2)
    assert (b.host_cpu, b.nr_migrations) == (0, 1)


@pytest.mark.parametrize("engine", ENGINES)
def test_fifo_keeps_the_previous_cpu_when_nothing_is_idle(engine):
    """FIFO's rule: prev if idle, else the first idle CPU, else prev."""
    b = wake_case(engine, "fifo", 2, 2)
    assert (b.host_cpu, b.nr_migrations) == (1, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_wake_placement_stays_in_the_wakers_llc_scan(engine):
    """With LLCs {0, 1} and {2}, the idle CPU 2 is outside the target's LLC: B
    stays queued on its CPU 1 (wake_affine keeps prev, no idle CPU in its LLC)."""
    host = host_of(engine, cpus=3, llc=[[0, 1], [2]])
    vm = host.create_vm(2, affinity="all")
    vm.vcpus[0].load(G.Program([G.compute(50 * US), G.wake(1), G.loop([G.compute(MS)])]))
    vm.vcpus[1].load(G.Program([G.wfi(), G.loop([G.compute(MS)])]))
    host.create_vm(1, affinity=[1]).vcpus[0].load(LATE_HOG)
    host.run(200 * US)
    assert (vm.vcpus[1].host_cpu, vm.vcpus[1].nr_migrations) == (1, 0)


# -- the vCPU-pack wake placement (Host(vcpu_pack=True)) -------------------------------------

def pack_case(engine, *, pack=True, scheduler="eevdf", b_affinity="all", hog_on_waker=False):
    """vCPU A (thread 0, pinned to CPU 0) computes 50 us and wakes vCPU B (thread 1,
    last on CPU 1, which is idle); with ``hog_on_waker`` a pinned hog of another VM
    waits on A's CPU 0 (it starts 20 us in: A has the CPU when it wakes B)."""
    host = host_of(engine, cpus=3 if b_affinity != "all" else 2, scheduler=scheduler,
                   vcpu_pack=pack, timeline_capacity=1 << 12)
    vm = host.create_vm(2, affinity="all")
    vm.vcpus[0].set_affinity([0])
    vm.vcpus[0].load(G.Program([G.compute(50 * US), G.wake(1), G.loop([G.compute(MS)])]))
    vm.vcpus[1].load(G.Program([G.wfi(), G.loop([G.compute(MS)])]))
    if b_affinity != "all":
        vm.vcpus[1].set_affinity(b_affinity)
    if hog_on_waker:
        host.create_vm(1, affinity=[0]).vcpus[0].load(LATE_HOG)
    host.run(40 * US)
    assert vm.vcpus[0].thread_state == "RUNNING" and vm.vcpus[1].thread_state == "BLOCKED"
    assert vm.vcpus[1].host_cpu == 1
    host.run(200 * US)
    return host, vm.vcpus[1]


@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_pack_wakes_onto_the_wakers_cpu(engine):
    """A is alone on CPU 0 (nr_running 1): B goes there although its previous CPU 1
    is idle; upstream placement keeps it on the idle CPU 1."""
    host, b = pack_case(engine)
    assert host.vcpu_pack is True
    assert (b.host_cpu, b.nr_migrations) == (0, 1)
    _, b = pack_case(engine, pack=False)
    assert (b.host_cpu, b.nr_migrations) == (1, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_pack_needs_the_waker_alone_on_its_cpu(engine):
    """A hog waits on A's CPU (nr_running 2): the rule does not apply; B wakes on its
    idle previous CPU, as upstream."""
    _, b = pack_case(engine, hog_on_waker=True)
    assert (b.host_cpu, b.nr_migrations) == (1, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_pack_does_not_count_a_delayed_sleeper(engine):
    """CPU 0: D (pinned) computes 100 us and sleeps while A waits: v 100 us > V, so
    D stays queued, delayed; A computes 150 us and wakes B (last on the idle CPU
    1).  nr_running on CPU 0 is 2, but A is its only runnable thread: packed."""
    for pack, want in ((False, (1, 0)), (True, (0, 1))):
        host = host_of(engine, vcpu_pack=pack)
        host.halt_poll_ns = 0
        vm = host.create_vm(3, affinity="all")
        d, b, a = vm.vcpus
        d.set_affinity([0])
        a.set_affinity([0])
        d.load(G.Program([G.compute(100 * US), G.wfi(), G.loop([G.compute(MS)])]))
        b.load(G.Program([G.wfi(), G.loop([G.compute(MS)])]))
        a.load(G.Program([G.compute(150 * US), G.wake(1), G.loop([G.compute(MS)])]))
        host.run(200 * US)
        st = host.sched_state()
        assert st["threads"][0]["sched_delayed"] and st["cpus"][0]["nr_running"] == 2
        assert b.host_cpu == 1 and a.thread_state == "RUNNING"
        host.run(300 * US)
        assert (b.host_cpu, b.nr_migrations) == want


@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_pack_keeps_to_the_wakees_affinity(engine):
    """B may not run on A's CPU 0 (affinity {1, 2}): upstream placement, prev CPU 1."""
    _, b = pack_case(engine, b_affinity=[1, 2])
    assert (b.host_cpu, b.nr_migrations) == (1, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_pack_is_a_rule_of_eevdf_only(engine):
    _, b = pack_case(engine, scheduler="fifo")
    assert (b.host_cpu, b.nr_migrations) == (1, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_vcpu_pack_leaves_host_thread_wakeups_alone(engine):
    """x86: an injector host thread alone on CPU 0 sends an MSI to vCPU B (previous
    CPU 1, idle): the waker is not a vCPU thread, so B stays on CPU 1."""
    from kvmwake import guest as g
    from kvmwake import hostprog as hp
    for pack in (False, True):
        host = kw.Host(host_cpus=2, arch="x86", engine=engine, scheduler="eevdf",
                       vcpu_pack=pack)
        vm = host.create_vm(2, affinity="all")
        vm.vcpus[0].set_affinity([1])
        for v in vm.vcpus:
            v.load(g.Program([g.loop([g.hlt()])]))
        inj = host.add_thread([hp.compute("50us"), hp.msi(vm, 1, 0x30), hp.compute("1ms")],
                              affinity=[0], name="injector")
        host.run(40 * US)
        assert vm.vcpus[1].host_cpu == 1 and inj.cpu == 0
        host.run(200 * US)
        assert (vm.vcpus[1].host_cpu, vm.vcpus[1].nr_migrations) == (1, 0)


def test_vcpu_pack_validation_and_snapshot():
    with pytest.raises(TypeError, match="vcpu_pack must be True or False"):
        kw.Host(host_cpus=2, vcpu_pack=1)
    assert kw.Host(host_cpus=2).vcpu_pack is False
    runs = {eng: mixed(eng, 5, vcpu_pack=True) for eng in ENGINES}
    (hc, vc), (hr, vr) = runs["core"], runs["reference"]
    assert hc.events == hr.events
    assert np.array_equal(hc.stats_array(), hr.stats_array())
    assert hc.timeline_array().tolist() == hr.timeline_array().tolist()
    assert [v.nr_migrations for v in vc.vcpus] == [v.nr_migrations for v in vr.vcpus]
    plain = mixed("core", 5)[0]
    assert plain.timeline_array().tolist() != hc.timeline_array().tolist()
    host2 = kw.Host.restore(hc.snapshot())
    assert host2.vcpu_pack is True
    assert kw.Host.restore(plain.snapshot()).vcpu_pack is False
    hc.run(30 * MS)
    host2.run(30 * MS)
    assert host2.events == hc.events
    assert np.array_equal(host2.stats_array(), hc.stats_array())


def test_vendor_rules_run_the_same_as_islands():
    """Two VMs on CPUs {0, 1} and {2, 3}, unpinned inside their sets: two islands.
    With both vendor rules on, the islands on two threads give the one queue's run."""
    def run(split, threads):
        host = kw.Host(host_cpus=4, scheduler="eevdf", seed=4, trace_capacity=0,
                       threads=threads, split_islands=split, vcpu_pack=True,
                       preempt_skips_delayed=True)
        host.halt_poll_ns = 0
        for cpus in ([0, 1], [2, 3]):
            vm = host.create_vm(4, affinity=cpus)
            for v in vm.vcpus:
                v.load(G.Program([G.loop([G.compute_exp(30 * US), G.wake_next(),
                                          G.timer_arm_exp(60 * US), G.wfi()])]))
        host.run(20 * MS)
        return host
    a, b = run(True, 2), run(False, 1)
    assert (a.islands_used, b.islands_used) == (2, 0)
    assert a.events == b.events
    assert np.array_equal(a.stats_array(), b.stats_array())
    assert [v.nr_migrations for vm in a.vms for v in vm.vcpus] == \
        [v.nr_migrations for vm in b.vms for v in vm.vcpus]


@pytest.mark.parametrize("key", ["vcpu_pack", "preempt_skips_delayed"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_restore_refuses_a_bad_vendor_rule(key, value):
    from test_snapshot import reframe

    host = kw.Host(host_cpus=2, scheduler="eevdf", **{key: True})
    host.create_vm(1)

    def edit(header):
        assert header["host"][key] is True
        header["host"][key] = value
    with pytest.raises(kw.SnapshotError, match="host configuration is invalid"):
        kw.Host.restore(reframe(host.snapshot(), edit_header=edit))


def pack_scenario(text, scheduler="eevdf"):
    """SCENARIO (below) with ``text`` in its [host] table."""
    return SCENARIO.format(affinity='affinity = "all"').replace(
        'scheduler = "eevdf"\n', f'scheduler = "{scheduler}"\n{text}\n')


@pytest.mark.parametrize("text, want", [("", False), ("vcpu_pack = true", True),
                                        ("vcpu_pack = false", False)])
def test_scenario_vcpu_pack(text, want):
    from kvmwake import scenarios
    sc = scenarios.loads(pack_scenario(text), "t.toml")
    assert sc.vcpu_pack is want
    host, _, _ = scenarios.build(sc)
    assert host.vcpu_pack is want
    sc = scenarios.loads(pack_scenario(text.replace("vcpu_pack", "preempt_skips_delayed")),
                         "t.toml")
    assert (sc.preempt_skips_delayed, sc.vcpu_pack) == (want, False)
    assert scenarios.build(sc)[0].preempt_skips_delayed is want


@pytest.mark.parametrize("text, scheduler, words", [
    ("vcpu_pack = 1", "eevdf", "host.vcpu_pack: must be true or false"),
    ("vcpu_pack = true", "fifo", "a rule of the eevdf scheduler"),
    ("preempt_skips_delayed = 0", "eevdf", "host.preempt_skips_delayed: must be true"),
    ("preempt_skips_delayed = true", "fifo", "a rule of the eevdf scheduler")])
def test_scenario_vcpu_pack_errors(text, scheduler, words):
    from kvmwake import scenarios
    with pytest.raises(scenarios.ScenarioError, match=words):
        scenarios.loads(pack_scenario(text, scheduler), "t.toml")


# -- newly-idle balancing -------------------------------------------------------------------

def newidle_case(engine, sleep_at):
    """P (thread 0, pinned CPU 1) and Q (thread 1, "all", first CPU 1 % 2 = 1) compute
    on CPU 1; A (thread 2, pinned CPU 0) computes until ``sleep_at`` and sleeps, so
    CPU 0 goes idle.  EEVDF on CPU 1 (base slice 1.4 ms, ticks every 4 ms): P runs
    first, Q waits; at the 4 ms tick Q preempts P, at the 8 ms tick P preempts Q:
    from then Q waits, having last run at 8 ms."""
    host = host_of(engine)
    p = host.create_vm(1, affinity=[1]).vcpus[0]
    q = host.create_vm(1, affinity="all").vcpus[0]
    a = host.create_vm(1, affinity=[0]).vcpus[0]
    p.load(HOG)
    q.load(HOG)
    a.load(G.Program([G.compute(sleep_at), G.wfi()]))
    host.run(sleep_at + 100 * US)
    return q


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sleep_at", [MS, 8_700 * US])
def test_newidle_pulls_a_waiting_thread(engine, sleep_at):
    """CPU 0 goes idle at ~1 ms (Q never ran) or ~8.7 ms (Q last ran at 8 ms,
    ~700 us ago); CPU 1 (P running, Q waiting) is the busiest, Q is not task_hot
    (500 us): pulled, it runs on CPU 0."""
    q = newidle_case(engine, sleep_at)
    assert (q.host_cpu, q.nr_migrations, q.thread_state) == (0, 1, "RUNNING")


@pytest.mark.parametrize("engine", ENGINES)
def test_newidle_skips_a_cache_hot_thread(engine):
    """CPU 0 goes idle at ~8.2 ms: Q ran ~200 us ago, task_hot; P is pinned: nothing
    moves, Q waits on CPU 1."""
    q = newidle_case(engine, 8_200 * US)
    assert (q.host_cpu, q.nr_migrations, q.thread_state) == (1, 0, "RUNNABLE")


@pytest.mark.parametrize("scheduler", ["eevdf", "fifo"])
@pytest.mark.parametrize("engine", ENGINES)
def test_newidle_looks_beyond_its_llc(engine, scheduler):
    """LLCs {0, 1} and {2, 3}; pinned hogs on CPUs 1, 2 and 3, Q ("all", thread 2:
    first CPU 2) waits behind the one on CPU 2; A (pinned CPU 0) sleeps at ~1 ms.
    CPU 0's LLC has no CPU with 2 threads; at the host level CPU 2 is the busiest
    (2 threads against CPU 3's 1): Q is pulled across LLCs."""
    host = host_of(engine, cpus=4, scheduler=scheduler, llc=2,
                   costs={"sched_slice_ns": 10 * MS})     # FIFO: no slice end before
    host.create_vm(1, affinity=[2]).vcpus[0].load(HOG)
    host.create_vm(1, affinity=[1]).vcpus[0].load(HOG)
    q = host.create_vm(1, affinity="all").vcpus[0]
    q.load(HOG)
    host.create_vm(1, affinity=[3]).vcpus[0].load(HOG)
    host.create_vm(1, affinity=[0]).vcpus[0].load(G.Program([G.compute(MS), G.wfi()]))
    host.run(MS // 2)
    assert (q.host_cpu, q.thread_state) == (2, "RUNNABLE")
    host.run(MS + 100 * US)
    assert (q.host_cpu, q.nr_migrations, q.thread_state) == (0, 1, "RUNNING")


# -- migration counts, determinism ----------------------------------------------------------

def mixed(engine, seed, scheduler="eevdf", vcpu_pack=False):
    """2 unpinned vCPUs on 2 CPUs, mixed idle (compute, wake the other, timer
    idle), and a pinned vCPU with a duty cycle on CPU 0; no halt polling (a
    polling vCPU keeps its CPU from looking idle)."""
    host = host_of(engine, scheduler=scheduler, seed=seed, timeline_capacity=1 << 16,
                   vcpu_pack=vcpu_pack)
    host.halt_poll_ns = 0
    vm = host.create_vm(2, affinity="all")
    vm.vcpus[0].load(G.Program([G.loop([G.compute_exp(30 * US), G.wake_next(),
                                        G.timer_arm_exp(80 * US), G.wfi()])]))
    vm.vcpus[1].load(G.Program([G.loop([G.compute_exp(20 * US), G.timer_arm_exp(60 * US),
                                        G.wfi()])]))
    host.create_vm(1, affinity=[0]).vcpus[0].load(
        G.Program([G.loop([G.compute_exp(150 * US), G.timer_arm_exp(150 * US), G.wfi()])]))
    host.run(20 * MS)
    return host, vm


@pytest.mark.parametrize("scheduler", ["eevdf", "fifo"])
def test_unpinned_vcpus_migrate_deterministically(scheduler):
    runs = {eng: mixed(eng, 7, scheduler) for eng in ENGINES}
    counts = {eng: [v.nr_migrations for v in vm.vcpus] for eng, (_, vm) in runs.items()}
    assert counts["core"] == counts["reference"]
    assert all(n > 0 for n in counts["core"])
    (hc, _), (hr, _) = runs["core"], runs["reference"]
    assert hc.events == hr.events
    assert np.array_equal(hc.stats_array(), hr.stats_array())
    assert hc.timeline_array().tolist() == hr.timeline_array().tolist()
    assert [v.nr_migrations for v in mixed("core", 7, scheduler)[1].vcpus] == counts["core"]
    host, vm = runs["core"]
    # The timeline records each state change on the CPU of its time: both CPUs
    # appear for each unpinned thread, and every RUNNING record's CPU ran it.
    tl = host.timeline_array()
    for g in (0, 1):
        assert set(tl["cpu"][tl["g"] == g].tolist()) == {0, 1}
    assert set(tl["cpu"][tl["g"] == 2].tolist()) == {0}
    tot = {eng: h.timeline_totals() for eng, (h, _) in runs.items()}
    for key in ("running_ns", "polling_ns", "idle_ns"):
        assert tot["core"][key].tolist() == tot["reference"][key].tolist()
    span = tot["core"]["now"] - tot["core"]["t0"]
    assert (tot["core"]["running_ns"] + tot["core"]["polling_ns"]
            + tot["core"]["idle_ns"]).tolist() == [span, span]
    assert all(x > 0 for x in tot["core"]["running_ns"].tolist())


def test_pinned_default_is_unchanged():
    """The default affinity never migrates, whatever the load."""
    host, _ = mixed("core", 7)
    host2 = host_of("core", seed=7)
    vm = host2.create_vm(2)
    for v in vm.vcpus:
        v.load(G.Program([G.loop([G.compute_exp(30 * US), G.wake_next(), G.wfi()])]))
    host2.run(5 * MS)
    assert [v.nr_migrations for v in vm.vcpus] == [0, 0]
    assert [v.host_cpu for v in vm.vcpus] == [0, 1]


# -- set_affinity at run time -----------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["eevdf", "fifo"])
@pytest.mark.parametrize("engine", ENGINES)
def test_set_affinity_moves_a_waiting_thread_at_once(engine, scheduler):
    """Two hogs pinned on CPU 0, CPU 1 idle: the waiting one, allowed only CPU 1,
    moves at once and runs there after wake_to_run_ns."""
    host = host_of(engine, scheduler=scheduler)
    vm = host.create_vm(2, affinity=[0])
    for v in vm.vcpus:
        v.load(HOG)
    host.run(100 * US)
    waiting = [v for v in vm.vcpus if v.thread_state == "RUNNABLE"]
    assert len(waiting) == 1
    waiting[0].set_affinity([1])
    assert (waiting[0].host_cpu, waiting[0].nr_migrations) == (1, 1)
    host.run(100 * US + 5 * US + 1)
    assert waiting[0].thread_state == "RUNNING"


@pytest.mark.parametrize("engine", ENGINES)
def test_set_affinity_moves_a_running_thread_at_its_preemption_point(engine):
    """FIFO, 200 us slices, two hogs on CPU 0: the running one, allowed only CPU 1,
    stays until its slice ends, then moves (and runs on the idle CPU 1)."""
    host = host_of(engine, scheduler="fifo", costs={"sched_slice_ns": 200 * US})
    vm = host.create_vm(2, affinity=[0])
    for v in vm.vcpus:
        v.load(HOG)
    host.run(100 * US)
    running = [v for v in vm.vcpus if v.thread_state == "RUNNING"][0]
    running.set_affinity([1])
    assert (running.host_cpu, running.nr_migrations) == (0, 0)
    host.run(400 * US)
    assert (running.host_cpu, running.nr_migrations, running.thread_state) == (1, 1, "RUNNING")


# -- snapshots ------------------------------------------------------------------------------

def test_snapshot_carries_placement_and_continues_bit_for_bit():
    host, vm = mixed("core", 3)
    host2 = kw.Host.restore(host.snapshot())
    assert host2.llc_groups == host.llc_groups
    v2 = host2.vms[0].vcpus
    assert [v.affinity for v in v2] == [(0, 1), (0, 1)]
    assert [v.nr_migrations for v in v2] == [v.nr_migrations for v in vm.vcpus]
    host.run(30 * MS)
    host2.run(30 * MS)
    assert [v.nr_migrations for v in v2] == [v.nr_migrations for v in vm.vcpus]
    assert host2.events == host.events
    assert np.array_equal(host2.stats_array(), host.stats_array())
    h3 = kw.Host(host_cpus=4, llc=2, scheduler="eevdf")
    h3.create_vm(2, affinity=[1, 3])
    assert kw.Host.restore(h3.snapshot()).llc_groups == ((0, 1), (2, 3))


def _edit_thread(data: bytes, g: int, **fields) -> bytes:
    def fn(recs):
        for k, v in fields.items():
            recs[k][g] = v
    return edit_records(data, "threads", fn)


@pytest.mark.parametrize("fields, words", [
    ({"aff_kind": 7}, "affinity kind"),
    ({"aff_kind": 2, "aff_off": 1000}, "outside the table"),
    ({"pcpu": 9}, "host CPU out of range|out of range"),
])
def test_restore_refuses_bad_affinity(fields, words):
    host = kw.Host(host_cpus=2, scheduler="eevdf")
    host.create_vm(2, affinity=[1]).vcpus[0].load(HOG)
    host.run(MS)
    data = _edit_thread(host.snapshot(), 0, **fields)
    with pytest.raises(kw.SnapshotError, match=words):
        kw.Host.restore(data)


@pytest.mark.parametrize("word, words", [(0, "empty CPU affinity"),
                                         (1 << 5, "names CPU 5")])
def test_restore_refuses_an_empty_or_foreign_mask(word, words):
    """The affinity mask table (the snapshot's ``aff`` array) is checked on restore."""
    from test_snapshot import reframe

    host = kw.Host(host_cpus=2, scheduler="eevdf")
    host.create_vm(1, affinity=[1])
    data = host.snapshot()

    def edit(header, body):
        d = header["engine"]["arrays"]["aff"]
        assert d["nbytes"] == 8
        body[d["offset"]:d["offset"] + 8] = np.array([word], dtype=np.uint64).tobytes()
    with pytest.raises(kw.SnapshotError, match=words):
        kw.Host.restore(reframe(data, edit_body=edit))
    # The engine's own import refuses it as well (ValueError, state unusable).
    scalars, arrays = host._engine.export_state()
    arrays["aff"] = np.array([word], dtype=np.uint64)
    fresh = kw.Host(host_cpus=2, scheduler="eevdf")
    fresh.create_vm(1)
    with pytest.raises(ValueError, match=words):
        fresh._engine.import_state(scalars, arrays)


def test_replacement_onto_another_cpu_count_keeps_affinity_lists():
    host = kw.Host(host_cpus=4, llc=2)
    vm = host.create_vm(2, affinity=[1, 3])
    host.create_vm(2, affinity="all")
    for v in vm.vcpus:
        v.load(HOG)
    host.run(MS)
    h2 = kw.Host.restore(host.snapshot(), host_cpus=2)
    assert [v.affinity for v in h2.vms[0].vcpus] == [(1,), (1,)]
    assert [v.affinity for v in h2.vms[1].vcpus] == [(0, 1), (0, 1)]
    assert h2.llc_groups == ((0, 1),)
    h2.run(3 * MS)
    with pytest.raises(kw.SnapshotError, match="names no CPU"):
        kw.Host.restore(host.snapshot(), host_cpus=1)
    h4 = kw.Host(host_cpus=4, llc=[[0, 2], [1, 3]])
    h4.create_vm(1)
    with pytest.raises(kw.SnapshotError, match="LLC groups"):
        kw.Host.restore(h4.snapshot(), host_cpus=2)


# -- scenarios and the command line ------------------------------------------------------------

SCENARIO = '''\
name = "t"
sim = "2ms"
[host]
cpus = 2
scheduler = "eevdf"
halt_poll_ns = 0
[vm]
vcpus = 3
{affinity}
[[vm.program]]
ops = """
loop {{
    compute exp 20us
    wake random-other
    wfi
}}
"""
'''


@pytest.mark.parametrize("value, want", [("", [(0,), (1,), (0,)]),
                                         ('affinity = "all"', [(0, 1)] * 3),
                                         ("affinity = [1]", [(1,)] * 3)])
def test_scenario_affinity(value, want):
    from kvmwake import scenarios
    sc = scenarios.loads(SCENARIO.format(affinity=value), "t.toml")
    host, _, _ = scenarios.build(sc)
    assert [v.affinity for v in host.vms[0].vcpus] == want
    host, _, _ = scenarios.build(sc, affinity="all")
    assert [v.affinity for v in host.vms[0].vcpus] == [(0, 1)] * 3


@pytest.mark.parametrize("value, words", [('affinity = "some"', "vm.affinity: must be"),
                                          ("affinity = []", "empty list"),
                                          ('affinity = [0, "x"]', "vm.affinity[1]"),
                                          ("affinity = [7]", "CPU 7 does not exist")])
def test_scenario_affinity_errors(value, words):
    from kvmwake import scenarios
    from kvmwake.errors import ScenarioError
    with pytest.raises(ScenarioError, match=words.replace("[", r"\[")):
        scenarios.build(scenarios.loads(SCENARIO.format(affinity=value), "t.toml"))


def test_cli_affinity(tmp_path, capsys):
    from kvmwake import cli
    path = tmp_path / "t.toml"
    path.write_text(SCENARIO.format(affinity=""))
    out = tmp_path / "s.json"
    assert cli.main(["run", str(path), "--affinity", "all", "--json", str(out), "-q",
                     "--no-out"]) == 0
    assert json.loads(out.read_text())["nr_migrations"] > 0
    assert cli.main(["run", str(path), "--json", str(out), "-q", "--no-out"]) == 0
    assert json.loads(out.read_text())["nr_migrations"] == 0
    with pytest.raises(SystemExit):
        cli.main(["run", str(path), "--affinity", "some", "--no-out"])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_sleeper_pinned_back_wakes_on_its_cpu(engine):
    """Thread 0 moved to CPU 1 (a list), then pinned back (CPU 0) while it sleeps
    there: its next wake-up puts it on CPU 0 (is_cpu_allowed() fails for CPU 1),
    though no thread is unpinned any more."""
    host = host_of(engine)
    vm = host.create_vm(2)
    a, b = vm.vcpus
    a.load(G.Program([G.loop([G.timer_arm(100 * US), G.wfi(), G.compute(10 * US)])]))
    b.load(G.Program([G.loop([G.compute(MS)])]))
    a.set_affinity([1])
    host.run(50 * US)
    host.run(150 * US)
    assert a.host_cpu == 1 and a.nr_migrations == 1
    host.run(250 * US)
    assert a.thread_state in ("BLOCKED", "POLLING", "RUNNING", "RUNNABLE")
    a.set_affinity("pinned")
    host.run(600 * US)
    assert a.host_cpu == 0 and a.nr_migrations == 2


def test_vm_on_a_private_host_takes_an_affinity():
    vm = kw.VM(nr_vcpus=3, host_cpus=2, affinity="all", engine="reference")
    assert [v.affinity for v in vm.vcpus] == [(0, 1)] * 3
    assert [v.host_cpu for v in vm.vcpus] == [0, 1, 0]
    with pytest.raises(ValueError, match="CPU 2 does not exist"):
        kw.VM(nr_vcpus=2, host_cpus=2, affinity=[2])


@pytest.mark.parametrize("llc", ["x", 0, [[0]], [[0, 1], [1]], 3.5])
def test_restore_refuses_bad_llc_groups(llc):
    from test_snapshot import reframe

    host = kw.Host(host_cpus=2, llc=1)
    host.create_vm(1)

    def edit(header):
        header["host"]["llc"] = llc
    with pytest.raises(kw.SnapshotError, match="host configuration is invalid"):
        kw.Host.restore(reframe(host.snapshot(), edit_header=edit))
