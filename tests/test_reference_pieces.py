"""The reference engine's snapshot and benchmark pieces (twins of core/snapshot.pxi
and core/bench.pxi).

* ``engine_export`` / ``engine_import``: a run continued from a checkpoint, in
  another engine object, is the uninterrupted run (stats, trace, timeline,
  events, every field of the state); the checkpoint is a copy.
* ``check_state`` holds all along real runs, and names what is wrong in a
  state that was tampered with.
* ``engine_rehost`` moves the threads as the core's ``Engine.rehost`` does.
* ``engine_view`` / ``engine_exit_record`` give what the core's give.
* The bench hooks run, agree with the core's where they report model facts,
  and leave the engine exactly as they found it.
"""

from __future__ import annotations

import dataclasses

import copy
import functools

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import test_differential as D
from kvmwake import _core, reference
from kvmwake import guest as G
from kvmwake.model import COST_NAMES, CONT_EOI, EventClass, ThreadState
from kvmwake.reference import EngineError
from kvmwake.reference import bench as rbench
from kvmwake.reference import snapshot as rsnap

ZERO = dict.fromkeys(COST_NAMES, 0)
TIMELINE_CAPS = (0, 5, 1 << 12)


def _observed(e, sc):
    """Everything a run shows, plus the engine's full state."""
    snap = D.snapshot(e, sc)
    t0, base = e.timeline_window()
    snap.update(timeline=e.timeline_array().tobytes(), timeline_dropped=e.timeline_dropped,
                timeline_t0=t0, timeline_base=base.tolist(), exits=e.pending_exits(),
                state=None if e.failed else rsnap.engine_export(e))
    return snap


def _run_to(e, sc, book, t, acts):
    e.run(t)
    for act in acts:
        D.apply(e, sc, book, act)


def _play_with_checkpoint(sc, capacity, at):
    """Play ``sc`` on the reference engine, checkpointing after split ``at``.

    Returns (the uninterrupted run, the run continued from the checkpoint in a
    new engine, the original continued after the export); each (error, observed).
    """
    make = functools.partial(reference.Engine, timeline_capacity=capacity)
    e = D.build(make, sc)
    book = {"module": sc.params["halt_poll_ns"], "caps": list(sc.caps)}
    runs = {}
    try:
        for i, (t, acts) in enumerate(sc.splits):
            _run_to(e, sc, book, t, acts)
            rsnap.check_state(e)
            if i == at:
                state = rsnap.engine_export(e)
                saved = (copy.deepcopy(state), copy.deepcopy(book), i)
        e.run(sc.end_ns)
        runs["whole"] = (None, _observed(e, sc))
    except EngineError as exc:
        runs["whole"] = (str(exc), _observed(e, sc))
        with pytest.raises(EngineError, match="cannot be saved"):
            rsnap.engine_export(e)
    if "saved" not in locals():
        return runs
    state, book, i = saved
    # Another arch, host and seed: the import replaces all of it.
    other = reference.Engine("x86" if sc.arch == "arm64" else "arm64", 3, 99, trace_capacity=0)
    rsnap.engine_import(other, state)
    assert rsnap.engine_export(other) == state
    try:
        for t, acts in sc.splits[i + 1:]:
            _run_to(other, sc, book, t, acts)
        other.run(sc.end_ns)
        runs["continued"] = (None, _observed(other, sc))
    except EngineError as exc:
        runs["continued"] = (str(exc), _observed(other, sc))
    return runs


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=D.scenarios(), capacity=st.sampled_from(TIMELINE_CAPS), data=st.data())
def test_a_checkpoint_continues_as_the_uninterrupted_run(sc, capacity, data):
    assume(sc.splits)
    assume(D.play(_core.Engine, sc)[1]["events"] <= D.EVENT_BUDGET // 3)
    at = data.draw(st.integers(0, len(sc.splits) - 1))
    runs = _play_with_checkpoint(sc, capacity, at)
    if "continued" in runs:
        D.assert_same(runs["whole"], runs["continued"], "continued from a checkpoint")


def test_a_checkpoint_is_a_copy():
    """The exported state does not follow the engine, and import does not share it."""
    e = reference.Engine("arm64", 2, 3, timeline_capacity=64)
    e.add_vm(3)
    for g in range(3):
        e.load_program(g, G.Program([G.loop([G.compute_exp(5_000), G.wake_next(), G.wfi()])]).ops)
        e.start_vcpu(g)
    e.run(300_000)
    state = rsnap.engine_export(e)
    frozen = copy.deepcopy(state)
    e.run(600_000)
    assert state == frozen
    f = reference.Engine("arm64", 2, 3)
    rsnap.engine_import(f, state)
    f.run(900_000)
    assert state == frozen
    assert f.threads[0].stats is not state["threads"][0]["stats"]
    # Every engine field outside the structured parts is a plain immutable value.
    assert all(isinstance(v, (bool, int, str, type(None))) for v in state["engine"].values())


# -- check_state ---------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["default", "ipi-storm", "irq-storm", "suspend-cycle"])
def test_check_state_holds_along_the_builtin_scenarios(scenario):
    from kvmwake import scenarios
    host, sim_ns, _ = scenarios.build(scenario, vcpus=12, host_cpus=5, sim_ns=3_000_000,
                                      seed=2, engine="reference", trace_capacity=100)
    e = host._engine
    e.set_timeline_capacity(50)
    for k in range(1, 31):
        host.run(sim_ns * k // 30)
        rsnap.check_state(e)
    assert e.halts > 0


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=D.scenarios())
def test_check_state_holds_along_random_runs(sc):
    assume(D.play(_core.Engine, sc, split=False)[1]["events"] <= D.EVENT_BUDGET // 3)
    e = D.build(functools.partial(reference.Engine, timeline_capacity=16), sc)
    rsnap.check_state(e)
    try:
        for k in range(1, 11):
            e.run(sc.end_ns * k // 10)
            rsnap.check_state(e)
    except EngineError:
        pass


def _busy_engine():
    """arm64, 4 vCPUs on 2 host CPUs, interrupts with handlers, a timeline: at 1.6 ms
    one thread runs, one waits in a run queue, two are blocked."""
    e = reference.Engine("arm64", 2, 1, costs={"sched_slice_ns": 50_000}, trace_capacity=64,
                         timeline_capacity=32)
    e.halt_poll_ns = 0
    e.add_vm(4, 32)
    e.configure_irq(0, -1, 40, 1, 0x80, 0)
    e.route_spi(0, 40, 1)
    e.add_source(0, 40, 1, 30_000, 0)
    prog = G.Program([G.set_handler(2_000), G.loop([G.compute_exp(40_000), G.wake_next(),
                                                    G.wfi(), G.wfi()])]).ops
    for g in range(4):
        e.load_program(g, prog)
        e.start_vcpu(g)
    e.run(1_600_000)
    return e


def _find(state, pred):
    return next(g for g, th in enumerate(state["threads"]) if pred(th))


def _live_event(state, g, cls):
    th = state["threads"][g]
    return next(i for i, ev in enumerate(state["heap"])
                if ev[3] == g and ev[1] == cls and ev[4] == th["gen"])


RUNNING, BLOCKED, RUNNABLE = ThreadState.RUNNING, ThreadState.BLOCKED, ThreadState.RUNNABLE


def _running(s):
    return _find(s, lambda th: th["state"] == RUNNING)


def _blocked(s):
    return _find(s, lambda th: th["state"] == BLOCKED)


def _queued(s):
    return next(x for c in s["cpus"] for x in c["runq"])


def _set(path_value):
    def corrupt(s):
        *path, value = path_value(s)
        obj = s
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return corrupt


def _second_live_event(s):
    g = _running(s)
    i = _live_event(s, g, EventClass.SEGMENT)
    t, cls, _seq, who, gen = s["heap"][i]
    s["seq"] = s["engine"]["seq"] = s["engine"]["seq"] + 1
    s["heap"].append((s["engine"]["now"] + 10**9, cls, s["engine"]["seq"], who, gen))


def _eoi_without_irq(s):
    g = _running(s)
    s["threads"][g]["cont"] = CONT_EOI
    s["threads"][g]["cur_irq"] = -1


TAMPERING = {
    "vCPU id out of range": (_set(lambda s: ("threads", 0, "vcpu_id", 7)),
                             "thread 0: VM, vCPU id or host CPU out of range"),
    "host CPU out of range": (_set(lambda s: ("threads", 0, "pcpu", 7)),
                              "timeline record .*: out of range"),
    "blocked thread on a CPU": (_set(lambda s: ("cpus", s["threads"][_blocked(s)]["pcpu"],
                                                "cur", _blocked(s))),
                                "neither running nor about to"),
    "running thread queued": (lambda s: s["cpus"][s["threads"][_running(s)]["pcpu"]]["runq"]
                              .append(_running(s)),
                              "run queue holds thread"),
    "queued thread blocked": (_set(lambda s: ("threads", _queued(s), "state", BLOCKED)),
                              "run queue holds thread .*, which is current or not runnable"),
    "running thread without a CPU": (_set(lambda s: ("cpus", s["threads"][_running(s)]["pcpu"],
                                                     "cur", -1)),
                                     "its state disagrees"),
    "event for no thread": (_set(lambda s: ("heap", 0, (s["heap"][0][0], EventClass.SEGMENT,
                                                        s["heap"][0][2], 99, 0))),
                            "names something that does not exist"),
    "event in the past": (_set(lambda s: ("heap", 0, (s["engine"]["now"] - 1,)
                                          + s["heap"][0][1:])),
                          "class, time or sequence out of range"),
    "two live events": (_second_live_event, "a second live event"),
    "live event of a blocked thread": (
        lambda s: s["heap"].append((s["engine"]["now"] + 10**9, EventClass.RUN,
                                    s["engine"]["seq"], _blocked(s),
                                    s["threads"][_blocked(s)]["gen"])),
        "state does not expect it"),
    "SPI to no vCPU": (_set(lambda s: ("vms", 0, "spi_target", 40, 4)),
                       "SPI 40 routed to vCPU 4, which does not exist"),
    "exit of no thread": (lambda s: s["exits"].append(4), "exit queue"),
    "timeline out of order": (lambda s: s["timeline"].reverse(), "timeline record"),
    "unknown thread state": (_set(lambda s: ("threads", 1, "state", 9)),
                             "a state field holds an unknown value"),
    "EOI with nothing in service": (_eoi_without_irq, "no interrupt in service"),
    "interrupt in service out of range": (_set(lambda s: ("threads", 0, "cur_irq", 1024)),
                                          "interrupt bookkeeping out of range"),
    "unknown op": (_set(lambda s: ("threads", 0, "prog", 0, (31, 0, 0, 0, 0))),
                   "thread 0's program: op 0: unknown op code 31"),
    "SGI to no vCPU": (_set(lambda s: ("threads", 0, "prog", 0, (3, 0, 0, 9, 0))),
                       "thread 0's program: op 0"),
    "missing field": (lambda s: s["threads"][2].pop("ap"), "fields \\['ap'\\] missing"),
    "unknown engine field": (_set(lambda s: ("engine", "speed", 3)),
                             "engine fields \\['speed'\\] missing or unknown"),
    "VM of no thread": (_set(lambda s: ("threads", 0, "vm", 5)), "VM 5 does not exist"),
}


@pytest.fixture(scope="module")
def good_state():
    e = _busy_engine()
    s = rsnap.engine_export(e)
    assert any(th["state"] == RUNNING for th in s["threads"])
    assert any(th["state"] == BLOCKED for th in s["threads"])
    assert any(c["runq"] for c in s["cpus"]) and s["timeline"] and s["trace"]["records"]
    return s


@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_check_state_names_what_is_wrong(good_state, name):
    corrupt, message = TAMPERING[name]
    s = copy.deepcopy(good_state)
    corrupt(s)
    e = reference.Engine("arm64", 1, 0)
    with pytest.raises(EngineError, match=message):
        rsnap.engine_import(e, s)
    # The engine refuses to run on a state that failed its checks.
    assert e.failed
    with pytest.raises(EngineError, match="earlier error"):
        e.run(10**9)


def test_the_good_state_imports(good_state):
    e = reference.Engine("arm64", 1, 0)
    rsnap.engine_import(e, good_state)
    assert not e.failed
    e.run(2_000_000)


def test_check_state_on_a_live_engine():
    e = _busy_engine()
    rsnap.check_state(e)
    g = next(g for g, th in enumerate(e.threads) if th.state == BLOCKED)
    e.cpus[e.threads[g].pcpu].runq.append(g)
    with pytest.raises(EngineError, match=f"run queue holds thread {g}"):
        rsnap.check_state(e)


def test_a_failed_engine_cannot_be_exported():
    e = reference.Engine("arm64", 2, 1, costs=ZERO)
    e.halt_poll_ns = 0
    e.add_vm(2)
    e.load_program(0, G.Program([G.loop([G.wake(1), G.wfi()])]).ops)
    e.load_program(1, G.Program([G.loop([G.wake(0), G.wfi()])]).ops)
    e.start_vcpu(0)
    e.start_vcpu(1)
    with pytest.raises(EngineError, match="makes no progress"):
        e.run(1_000)
    with pytest.raises(EngineError, match="cannot be saved"):
        rsnap.engine_export(e)


# -- the core's other snapshot functions ---------------------------------------------------

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=D.scenarios(), data=st.data())
def test_rehost_matches_the_core(sc, data):
    # (Restoring onto another host CPU count is refused while host threads exist.)
    sc = dataclasses.replace(sc, host_threads=[])
    assume(D.play(_core.Engine, sc, split=False)[1]["events"] <= D.EVENT_BUDGET // 3)
    t1 = data.draw(st.integers(0, sc.end_ns))
    ncpu = data.draw(st.integers(1, 9))
    got = {}
    for name, cls in D.ENGINES.items():
        e = D.build(cls, sc)
        err = None
        try:
            e.run(t1)
            if name == "core":
                e.rehost(ncpu)
            else:
                rsnap.engine_rehost(e, ncpu)
            e.run(sc.end_ns)
        except EngineError as exc:
            err = str(exc)
        got[name] = (err, D.snapshot(e, sc))
    D.assert_same(got["core"], got["reference"], "core vs reference after a rehost")


def test_rehost_refuses_a_host_out_of_range():
    e = _busy_engine()
    for n in (0, (1 << 20) + 1):
        with pytest.raises(ValueError, match="out of range"):
            rsnap.engine_rehost(e, n)


def test_view_and_exit_records_match_the_core():
    """Two VMs (a KVM_CAP_HALT_POLL ceiling, a tick, the suspend cap); vCPUs that end,
    sync or loop, and one never started: the exits stay queued in the engine."""
    recs = {}
    for name, cls in D.ENGINES.items():
        e = cls("arm64", 3, 11, trace_capacity=0)
        e.add_vm(3)
        e.add_vm(2, 64)
        e.set_vm_halt_poll(1, 150_000)
        e.set_tick(0, 250_000)
        e.enable_system_suspend(1)
        progs = [[G.compute(20_000), G.end()], [G.loop([G.compute_exp(9_000), G.wfi()])],
                 [G.compute(5_000), G.sync(7)], [G.compute(1_000), G.end()], None]
        for g, items in enumerate(progs):
            if items is not None:
                e.load_program(g, G.Program(items).ops)
                e.start_vcpu(g)
        e.run(1_000_000)
        if name == "reference":
            view, record = rsnap.engine_view(e), rsnap.engine_exit_record
        else:
            view, record = _core._engine_view(e), _core._engine_exit_record
        recs[name] = (view, [record(e, g) for g in range(5)])
    assert recs["core"] == recs["reference"]
    assert len(recs["core"][0][2]) == 3
    with pytest.raises(IndexError):
        rsnap.engine_exit_record(reference.Engine("x86", 1, 0), 0)


# -- the pieces' links ---------------------------------------------------------------------

def test_every_linked_name_is_a_function_of_another_piece():
    """What a piece takes from the others (module globals set to None in its source)
    is, once the package has loaded, the function of that name of another piece."""
    import ast
    import importlib
    from pathlib import Path
    pieces = ("rng", "queue", "host", "guest", "halt", "run", "psci", "gic", "timer", "kick",
              "hostthread")
    mods = {p: importlib.import_module(f"kvmwake.reference.{p}") for p in pieces}
    linked = 0
    for p, mod in mods.items():
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and node.value.value is None:
                for target in node.targets:
                    fn = getattr(mod, target.id)
                    assert callable(fn) and fn.__module__ != mod.__name__, (p, target.id)
                    assert getattr(mods[fn.__module__.rpartition(".")[2]], target.id) is fn
                    linked += 1
    assert linked > 40


# -- the bench hooks -----------------------------------------------------------------------

def _halted_engine(cls, arch):
    """Thread 0 BLOCKED in a halt on an idle host CPU 0; on host CPU 1 thread 1 runs and
    thread 3 waits in the run queue; threads 2 and 4 never start."""
    e = cls(arch, 2, 5, costs={"sched_slice_ns": 0}, trace_capacity=16)
    e.halt_poll_ns = 0
    e.add_vm(5)
    e.load_program(0, G.Program([G.compute(1_000), G.wfi(), G.compute(5)]).ops)
    for g in (1, 3):
        e.load_program(g, G.Program([G.loop([G.compute(1_000_000)])]).ops)
        e.start_vcpu(g)
    e.start_vcpu(0)
    e.run(50_000)
    return e


@pytest.mark.parametrize("arch", ["arm64", "x86"])
def test_bench_hooks_leave_the_engine_as_found(arch):
    e = _halted_engine(reference.Engine, arch)
    e.set_timeline_capacity(8)        # a timeline on: bench_kick keeps its kicks off it
    before = rsnap.engine_export(e)
    assert [int(th.state) for th in e.threads] == [BLOCKED, RUNNING, 0, RUNNABLE, 0]
    assert e.cpus[0].cur == -1 and list(e.cpus[1].runq) == [3]
    ns, runnable = rbench.bench_wake_scan(e, 0, 50)
    assert ns >= 0 and runnable is False
    ns, hits = rbench.bench_vm_scan(e, 0, 20)
    assert ns >= 0 and 0 <= hits <= 5
    assert rbench.bench_kick(e, 0, 100) >= 0
    counters = rbench.bench_counters(e)
    assert rsnap.engine_export(e) == before
    # The kicked engine goes on as one that was never kicked.
    f = reference.Engine("arm64", 1, 0)
    rsnap.engine_import(f, before)
    e.run(400_000)
    f.run(400_000)
    assert rsnap.engine_export(e) == rsnap.engine_export(f)
    # The same facts as the core's hooks on the same engine.
    c = _halted_engine(_core.Engine, arch)
    assert _core.bench_wake_scan(c, 0, 5)[1] is False
    assert _core.bench_vm_scan(c, 0, 1)[1] == rbench.bench_vm_scan(
        _halted_engine(reference.Engine, arch), 0, 1)[1]
    core_counters = _core.bench_counters(c)
    assert {k: v for k, v in counters.items() if k != "heap_cap"} \
        == {k: v for k, v in core_counters.items() if k != "heap_cap"}


def test_bench_kick_refuses_a_thread_that_is_not_blocked():
    e = _halted_engine(reference.Engine, "arm64")
    before = rsnap.engine_export(e)
    for g in (1, 2, 3):
        with pytest.raises(ValueError, match="must be BLOCKED"):
            rbench.bench_kick(e, g, 1)
        with pytest.raises(ValueError, match="must be BLOCKED"):
            _core.bench_kick(_halted_engine(_core.Engine, "arm64"), g, 1)
    with pytest.raises(ValueError, match="no thread"):
        rbench.bench_kick(e, 5, 1)
    assert rsnap.engine_export(e) == before


def test_bench_heap_and_halt_path():
    assert rbench.bench_heap(2_000, seed=3) > 0
    assert rbench.bench_heap(0) >= 0
    for poll in (False, True):
        assert rbench.bench_halt_path(40, poll=poll) > 0
    with pytest.raises(ValueError):
        rbench.bench_halt_path(0)
