"""The Cython core and the plain-Python reference engine agree, event for event.

Hypothesis builds random set-ups (VMs, host CPUs, costs, module parameters,
KVM_CAP_HALT_POLL ceilings, ticks, guest programs, run splits with
interventions) and plays each one on both engines; every observable must be
identical: stats, trace, latency histogram, counters, clock and per-thread
state.  Splitting a run must not change its outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvmwake import _core, reference
from kvmwake import guest as G
from kvmwake.guest import ProgramError
from kvmwake.model import ARCHES, COST_NAMES, MAX_LOOP_DEPTH, Op, Request
from kvmwake.reference import EngineError

ENGINES = {"core": _core.Engine, "reference": reference.Engine}
ZERO_COSTS = dict.fromkeys(COST_NAMES, 0)
#: Scenarios with more events than this (on the core) are skipped.
EVENT_BUDGET = 30_000
PARAMS = ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink")
PARAM_MAX = {"halt_poll_ns": 600_000, "halt_poll_ns_grow": 4,
             "halt_poll_ns_grow_start": 50_000, "halt_poll_ns_shrink": 4}


# ---------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    arch: str
    host_cpus: int
    seed: int
    costs: dict
    trace_capacity: int
    params: dict
    vm_sizes: list
    caps: list                  # per VM: KVM_CAP_HALT_POLL value or None
    ticks: list                 # per VM: tick period or 0
    programs: list              # per global thread: op array or None
    start: list                 # per global thread: start at t = 0
    end_ns: int
    splits: list = field(default_factory=list)   # [(t, [intervention, ...]), ...]

    @property
    def n_threads(self):
        return sum(self.vm_sizes)

    def has_interventions(self):
        return any(acts for _, acts in self.splits)


def _maybe_zero(hi):
    return st.one_of(st.just(0), st.integers(1, hi))


costs_st = st.fixed_dictionaries({
    "vm_exit_ns": _maybe_zero(3_000),
    "vm_entry_ns": _maybe_zero(3_000),
    "ipi_send_ns": _maybe_zero(1_500),
    "wake_to_run_ns": _maybe_zero(10_000),
    "context_switch_ns": _maybe_zero(5_000),
    # small slices so that preemption happens within a few ms
    "sched_slice_ns": st.one_of(st.just(0), st.integers(1, 300_000)),
})


# Mostly values that let vCPUs poll and adapt; any value in range otherwise.
params_st = st.fixed_dictionaries({
    "halt_poll_ns": st.one_of(st.sampled_from([500_000, 200_000, 600_000]),
                              st.integers(0, PARAM_MAX["halt_poll_ns"])),
    "halt_poll_ns_grow": st.sampled_from([2, 2, 0, 1, 3, 4]),
    "halt_poll_ns_grow_start": st.one_of(st.sampled_from([10_000, 1_000]),
                                         st.integers(0, PARAM_MAX["halt_poll_ns_grow_start"])),
    "halt_poll_ns_shrink": st.sampled_from([2, 0, 1, 3, 4]),
})


@st.composite
def guest_op(draw, nr_vcpus):
    kinds = ["compute", "compute", "compute_exp", "compute_exp", "compute_uniform",
             "wfi", "wfi", "wfi", "wake", "wake", "wake_next"]
    if nr_vcpus >= 2:
        kinds += ["wake_random_other", "wake_random_other"]
    if draw(st.integers(0, 15)) == 15:
        kinds = ["end"]
    kind = draw(st.sampled_from(kinds))
    if kind == "compute":
        return G.compute(draw(st.integers(0, 30_000)))
    if kind == "compute_exp":
        return G.compute_exp(draw(st.integers(0, 30_000)))
    if kind == "compute_uniform":
        lo, hi = sorted(draw(st.lists(st.integers(0, 30_000), min_size=2, max_size=2)))
        return G.compute_uniform(lo, hi)
    if kind == "wfi":
        return G.wfi()
    if kind == "wake":
        return G.wake(draw(st.integers(0, nr_vcpus - 1)))
    if kind == "wake_next":
        return G.wake_next()
    if kind == "wake_random_other":
        return G.wake_random_other()
    return G.end()


def _takes_time(items):
    """guest.py's rule: a WFI or a compute whose first parameter is positive."""
    for it in items:
        if isinstance(it, G._Loop):
            if _takes_time(it.body):
                return True
        elif it.code == Op.WFI or (it.code == Op.COMPUTE and it.p0 > 0):
            return True
    return False


@st.composite
def guest_items(draw, nr_vcpus, depth=0):
    items = []
    for _ in range(draw(st.integers(1, 5 if depth <= 1 else 3))):
        if depth < MAX_LOOP_DEPTH and draw(st.integers(0, 3)) == 3:
            body = draw(guest_items(nr_vcpus, depth + 1))
            if not _takes_time(body):
                # guest.Program would reject it: give the body some time.
                body.append(draw(st.sampled_from([G.wfi(), G.compute(1), G.compute(2_500)])))
            items.append(G.loop(body, draw(st.sampled_from([0, 0, 1, 2, 3, 7]))))
        else:
            items.append(draw(guest_op(nr_vcpus)))
    return items


@st.composite
def program_ops(draw, nr_vcpus):
    idle_loop = draw(st.integers(0, 3)) != 3
    items = draw(guest_items(nr_vcpus, depth=1 if idle_loop else 0))
    if idle_loop:
        # Most vCPUs run an idle loop (as guests do) rather than ending at once.
        if not _takes_time(items):
            items.append(G.wfi())
        items = [G.loop(items, draw(st.sampled_from([0, 0, 0, 5, 50])))]
    try:
        prog = G.Program(items)
    except ProgramError:   # not expected: guest_items builds valid programs
        assume(False)
    G.validate(prog.ops, nr_vcpus)
    return prog.ops


@st.composite
def intervention(draw, n_threads, n_vms):
    kind = draw(st.sampled_from(["request", "kick", "raise", "param", "cap", "start", "tick"]))
    if kind == "request":
        return ("request", draw(st.integers(0, n_threads - 1)),
                int(draw(st.sampled_from(list(Request)))))
    if kind in ("kick", "raise", "start"):
        return (kind, draw(st.integers(0, n_threads - 1)))
    if kind == "param":
        name = draw(st.sampled_from(PARAMS))
        return ("param", name, draw(st.integers(0, PARAM_MAX[name])))
    if kind == "cap":
        # lower the VM's current ceiling to pct % of it
        return ("cap", draw(st.integers(0, n_vms - 1)), draw(st.integers(0, 100)))
    return ("tick", draw(st.integers(0, n_vms - 1)),
            draw(st.one_of(st.just(0), st.integers(5_000, 400_000))))


@st.composite
def scenarios(draw):
    n_vms = draw(st.integers(1, 3))
    vm_sizes = [draw(st.integers(1, 12)) for _ in range(n_vms)]
    programs, start = [], []
    for nr in vm_sizes:
        for _ in range(nr):
            if draw(st.integers(0, 5)) == 5:
                programs.append(None)           # a vCPU thread that never runs
                start.append(False)
            else:
                programs.append(draw(program_ops(nr)))
                start.append(draw(st.integers(0, 7)) != 7)
    n_threads = sum(vm_sizes)
    if draw(st.integers(0, 5)) == 5:
        end_ns = draw(st.integers(0, 50_000))
    else:
        end_ns = draw(st.integers(300, 3_000)) * 1_000
    split_times = sorted(draw(st.lists(st.integers(0, end_ns), max_size=3)))
    splits = [(t, draw(st.lists(intervention(n_threads, n_vms), max_size=4)))
              for t in split_times]
    return Scenario(
        arch=draw(st.sampled_from(ARCHES)),
        host_cpus=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**64 - 1)),
        costs=draw(costs_st),
        trace_capacity=draw(st.sampled_from([0, 1, 7, 64, 1 << 20])),
        params=draw(params_st),
        vm_sizes=vm_sizes,
        caps=[draw(st.one_of(st.none(), st.integers(0, 600_000))) for _ in vm_sizes],
        ticks=[0 if draw(st.booleans()) else draw(st.integers(5_000, 400_000))
               for _ in vm_sizes],
        programs=programs,
        start=start,
        end_ns=end_ns,
        splits=splits,
    )


# ---------------------------------------------------------------- playing

def build(engine_cls, sc: Scenario):
    e = engine_cls(sc.arch, sc.host_cpus, sc.seed, costs=sc.costs,
                   trace_capacity=sc.trace_capacity)
    for name, value in sc.params.items():
        setattr(e, name, value)
    for nr in sc.vm_sizes:
        e.add_vm(nr)
    for vm, cap in enumerate(sc.caps):
        if cap is not None:
            e.set_vm_halt_poll(vm, cap)
    for vm, period in enumerate(sc.ticks):
        if period:
            e.set_tick(vm, period)
    for g, ops in enumerate(sc.programs):
        if ops is not None:
            e.load_program(g, ops)
    for g, go in enumerate(sc.start):
        if go:
            e.start_vcpu(g)
    return e


def apply(e, sc: Scenario, book: dict, act):
    """One intervention at the current virtual time; ``book`` tracks ceilings."""
    kind = act[0]
    if kind == "request":
        e.make_request(act[1], act[2])
    elif kind == "kick":
        e.kick(act[1])
    elif kind == "raise":
        e.raise_pending(act[1])
    elif kind == "start":
        if sc.programs[act[1]] is not None:
            e.start_vcpu(act[1])
    elif kind == "param":
        setattr(e, act[1], act[2])
        book["module"] = e.halt_poll_ns
    elif kind == "cap":
        vm, pct = act[1], act[2]
        cur = book["caps"][vm] if book["caps"][vm] is not None else book["module"]
        book["caps"][vm] = cur * pct // 100
        e.set_vm_halt_poll(vm, book["caps"][vm])
    else:
        e.set_tick(act[1], act[2])


def snapshot(e, n_threads):
    return {
        "now": e.now,
        "events": e.events,
        "halts": e.halts,
        "trace_dropped": e.trace_dropped,
        "stats": e.stats_array().tolist(),
        "lat_hist": e.lat_hist_array().tolist(),
        "trace": e.trace_list(),
        "thread_info": [e.thread_info(g) for g in range(n_threads)],
        "params": tuple(getattr(e, name) for name in PARAMS),
        "costs": dict(e.costs),
    }


def play(engine_cls, sc: Scenario, split=True, interventions=True):
    """Play the scenario; returns (error message or None, snapshot)."""
    e = build(engine_cls, sc)
    book = {"module": sc.params["halt_poll_ns"], "caps": list(sc.caps)}
    err = None
    try:
        if split:
            for t, acts in sc.splits:
                e.run(t)
                assert e.now == t
                if interventions:
                    for act in acts:
                        apply(e, sc, book, act)
        e.run(sc.end_ns)
    except EngineError as exc:
        err = str(exc)
    return err, snapshot(e, sc.n_threads)


def assert_same(a, b, what):
    err_a, snap_a = a
    err_b, snap_b = b
    assert err_a == err_b, f"{what}: errors differ"
    for key in snap_a:
        assert snap_a[key] == snap_b[key], f"{what}: {key} differs"


# ---------------------------------------------------------------- properties

@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=scenarios())
def test_core_and_reference_agree(sc):
    core = play(_core.Engine, sc)
    # Keep the slow reference engine's share small (a 1 ns compute loop with
    # zero costs makes an event per ns).
    assume(core[1]["events"] <= EVENT_BUDGET)
    ref = play(reference.Engine, sc)
    assert_same(core, ref, "core vs reference")
    # Splitting a run (without interventions) changes nothing.
    direct = play(_core.Engine, sc, split=False)
    assert_same(play(_core.Engine, sc, interventions=False), direct, "split vs direct")
    if not sc.has_interventions():
        assert_same(ref, direct, "reference split vs core direct")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(sc=scenarios())
def test_reference_split_equals_direct(sc):
    assume(play(_core.Engine, sc, split=False)[1]["events"] <= EVENT_BUDGET)
    assert_same(play(reference.Engine, sc, interventions=False),
                play(reference.Engine, sc, split=False), "reference split vs direct")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_same_inputs_same_outputs(name):
    """Each engine is deterministic: the same scenario twice gives the same result."""
    cls = ENGINES[name]
    progs = [G.Program([G.loop([G.compute_exp(5_000), G.wake_random_other(), G.wfi()])]).ops] * 4
    sc = Scenario(arch="arm64", host_cpus=2, seed=12345, costs={"sched_slice_ns": 20_000},
                  trace_capacity=1 << 20, params={"halt_poll_ns": 100_000}, vm_sizes=[4],
                  caps=[None], ticks=[100_000], programs=progs, start=[True] * 4,
                  end_ns=2_000_000)
    first = play(cls, sc)
    assert first[0] is None and first[1]["halts"] > 50
    assert_same(first, play(cls, sc), name)


def test_trace_ring_beyond_first_allocation():
    """A ring larger than the core's first allocation (4096 records) wraps identically."""
    sc = Scenario(arch="x86", host_cpus=1, seed=7, costs=dict(ZERO_COSTS), trace_capacity=5_000,
                  params={"halt_poll_ns": 0}, vm_sizes=[1], caps=[None], ticks=[1_000],
                  programs=[G.Program([G.loop([G.wfi()])]).ops], start=[True],
                  end_ns=6_500_000)
    core, ref = play(_core.Engine, sc), play(reference.Engine, sc)
    assert_same(core, ref, "core vs reference")
    snap = core[1]
    assert snap["halts"] == 6_499
    assert len(snap["trace"]) == 5_000
    assert snap["trace_dropped"] == 1_499
    assert snap["trace"][0][0] == 1_500_000 and snap["trace"][-1][0] == 6_499_000


# ---------------------------------------------------------------- errors

PING_PONG = [G.Program([G.loop([G.wake(1), G.wfi()])]).ops,
             G.Program([G.loop([G.wake(0), G.wfi()])]).ops]
RING3 = [G.Program([G.loop([G.wake_next(), G.wfi()])]).ops] * 3


@pytest.mark.parametrize("programs, host_cpus, halt_poll_ns", [
    (PING_PONG, 2, 500_000),   # two vCPUs wake each other at one instant forever
    (PING_PONG, 2, 0),
    (PING_PONG, 1, 500_000),   # ... also when they share a host CPU
    (RING3, 3, 0),
], ids=["ping-pong", "ping-pong-nopoll", "ping-pong-one-cpu", "ring3"])
def test_engine_errors_match(programs, host_cpus, halt_poll_ns):
    """With every cost 0 a program that lets no time pass is an EngineError in both engines."""
    sc = Scenario(arch="arm64", host_cpus=host_cpus, seed=1, costs=dict(ZERO_COSTS),
                  trace_capacity=1 << 20, params={"halt_poll_ns": halt_poll_ns},
                  vm_sizes=[len(programs)], caps=[None], ticks=[0], programs=programs,
                  start=[True] * len(programs), end_ns=1_000_000)
    engines = {}
    for name, cls in ENGINES.items():
        e = build(cls, sc)
        with pytest.raises(EngineError, match="makes no progress") as info:
            e.run(sc.end_ns)
        engines[name] = (str(info.value), snapshot(e, sc.n_threads))
        # The engine stays stopped: a second run raises again.
        with pytest.raises(EngineError):
            e.run(sc.end_ns + 1)
    assert_same(engines["core"], engines["reference"], "at the error")
    assert engines["core"][1]["now"] == 0


def test_error_after_intervention_matches():
    """A zero-time ping-pong started by an intervention fails the same way in both engines."""
    sc = Scenario(arch="arm64", host_cpus=2, seed=1, costs=dict(ZERO_COSTS),
                  trace_capacity=1 << 20, params={"halt_poll_ns": 0}, vm_sizes=[2],
                  caps=[None], ticks=[0],
                  programs=[G.Program([G.wfi(), G.loop([G.wake(1), G.wfi()])]).ops,
                            G.Program([G.loop([G.wfi(), G.wake(0)])]).ops],
                  start=[True, True], end_ns=100,
                  splits=[(50, [("raise", 0)])])
    core, ref = play(_core.Engine, sc), play(reference.Engine, sc)
    assert core[0] is not None and "makes no progress" in core[0]
    assert core[1]["now"] == 50
    assert_same(core, ref, "core vs reference")
