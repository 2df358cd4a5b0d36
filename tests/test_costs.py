"""Costs with tails (kvmwake.costs): specs, tables, sampling, both engines, snapshots."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import costs as C
from kvmwake import guest as g
from kvmwake import reference, scenarios
from kvmwake.reference import snapshot as ref_snapshot
from kvmwake.reference.rng import COST_STREAM_BASE
from kvmwake.errors import SnapshotError
from kvmwake.outputs.stats import latency_percentiles

from fuzz_snapshot import THREAD_DTYPE, frame, unframe

ENGINES = ("core", "reference")
US = 1_000
LOGN = {"dist": "lognormal", "median": 3000, "sigma": 0.5, "max": 200_000}


# -- specs --------------------------------------------------------------------------------------

def test_parse_constants_as_today():
    assert C.parse_cost("vm_exit_ns", 1500) == 1500
    assert C.parse_cost("vm_exit_ns", "1.5us") == 1500
    assert C.parse_cost("sched_slice_ns", np.uint32(7)) == 7
    assert C.parse_cost("wake_to_run_ns", 0) == 0
    assert C.parse_cost("wake_to_run_ns", C.MAX_COST_NS) == C.MAX_COST_NS


def test_parse_normalises_distributions():
    assert C.parse_cost("wake_to_run_ns", {"dist": "lognormal", "median": "3us", "sigma": 1,
                                           "max": "200us"}) == \
        {"dist": "lognormal", "median": 3000, "sigma": 1.0, "max": 200_000}
    assert C.parse_cost("vm_entry_ns", {"dist": "lognormal", "median": 10, "sigma": 0.25}) == \
        {"dist": "lognormal", "median": 10, "sigma": 0.25, "max": C.MAX_COST_NS}
    assert C.parse_cost("ipi_send_ns", {"dist": "quantiles", "q": (1, "2us", 2000)}) == \
        {"dist": "quantiles", "q": [1, 2000, 2000]}


@pytest.mark.parametrize("name, spec, exc, words", [
    ("warp_ns", 1, ValueError, "unknown cost 'warp_ns'"),
    ("vm_exit_ns", -1, ValueError, "out of range"),
    ("vm_exit_ns", C.MAX_COST_NS + 1, ValueError, "out of range"),
    ("vm_exit_ns", 1.5, TypeError, "integer (ns) or a duration"),
    ("vm_exit_ns", True, TypeError, "integer (ns) or a duration"),
    ("vm_exit_ns", "3 us", ValueError, "not a duration"),
    ("sched_slice_ns", {"dist": "quantiles", "q": [1, 2]}, ValueError, "is a constant"),
    ("vm_exit_ns", {"dist": "gamma"}, ValueError, "\"dist\" must be one of"),
    ("vm_exit_ns", {"median": 3}, ValueError, "\"dist\" must be one of"),
    ("vm_exit_ns", {"dist": "lognormal", "sigma": 1}, ValueError, "needs 'median'"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5}, ValueError, "needs 'sigma'"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 0, "sigma": 1}, ValueError, "above 0"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": 0}, ValueError, "sigma = 0.0"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": -1}, ValueError, "out of range"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": 11}, ValueError, "out of range"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": float("nan")}, ValueError,
     "out of range"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": "1"}, TypeError, "a number"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": 1, "max": 4}, ValueError,
     "below the median"),
    ("vm_exit_ns", {"dist": "lognormal", "median": 5, "sigma": 1, "mean": 4}, ValueError,
     "unknown key(s) 'mean'"),
    ("vm_exit_ns", {"dist": "quantiles"}, TypeError, "vm_exit_ns.q must be a list"),
    ("vm_exit_ns", {"dist": "quantiles", "q": [5]}, ValueError, "holds 1 values"),
    ("vm_exit_ns", {"dist": "quantiles", "q": [5, 4]}, ValueError, "nondecreasing: q[1] = 4"),
    ("vm_exit_ns", {"dist": "quantiles", "q": [5, -4]}, ValueError, "vm_exit_ns.q[1] = -4"),
    ("vm_exit_ns", {"dist": "quantiles", "q": [1, 2], "sigma": 1}, ValueError, "unknown key"),
])
def test_parse_errors_name_what_is_wrong(name, spec, exc, words):
    with pytest.raises(exc) as info:
        C.parse_cost(name, spec)
    assert words in str(info.value)


def test_host_rejects_bad_costs_and_reports_specs():
    with pytest.raises(ValueError, match="nondecreasing"):
        kw.Host(costs={"vm_exit_ns": {"dist": "quantiles", "q": [3, 1]}})
    with pytest.raises(TypeError, match="costs must be a dict"):
        kw.Host(costs=[("vm_exit_ns", 1)])
    h = kw.Host(costs={"wake_to_run_ns": {"dist": "lognormal", "median": "3us", "sigma": 0.5,
                                          "max": "200us"}, "vm_exit_ns": "2us"})
    assert h.costs["wake_to_run_ns"] == LOGN
    assert h.costs["vm_exit_ns"] == 2000 and h.costs["sched_slice_ns"] == 750_000
    h.costs["wake_to_run_ns"]["median"] = 1           # a copy: the host keeps its own
    assert h.costs["wake_to_run_ns"] == LOGN


# -- tables -------------------------------------------------------------------------------------

def test_table_of_a_constant_is_flat():
    t = C.cost_table(1234)
    assert t.dtype == np.uint64 and t.shape == (C.COST_TABLE_N,) and set(t.tolist()) == {1234}


@pytest.mark.parametrize("spec", [
    LOGN,
    {"dist": "lognormal", "median": 1, "sigma": 10.0},
    {"dist": "lognormal", "median": C.MAX_COST_NS, "sigma": 3.0},
    {"dist": "quantiles", "q": [0, C.MAX_COST_NS]},
    {"dist": "quantiles", "q": [5, 5, 5]},
    {"dist": "quantiles", "q": list(range(0, 3 * 300, 3))},
])
def test_tables_are_whole_sorted_and_bounded(spec):
    t = C.cost_table(C.parse_cost("vm_exit_ns", spec))
    assert t.dtype == np.uint64 and t.shape == (C.COST_TABLE_N,)
    assert (np.diff(t.astype(np.int64)) >= 0).all()
    assert int(t.max()) <= C.MAX_COST_NS
    C.check_table("x", t)


def test_quantile_table_interpolates_at_k_over_256():
    t = C.cost_table({"dist": "quantiles", "q": [100, 300, 1300]})
    assert t[0] == 100 and t[128] == 300 and t[256] == 1300
    assert t[64] == 200                       # halfway up the first of two intervals
    assert t[192] == 800
    assert t[1] == 100 + 200 * 2 // 256       # floor((k*N - j*256) * step / 256)
    q = list(range(1000, 1000 + 257 * 7, 7))
    assert C.cost_table({"dist": "quantiles", "q": q}).tolist() == q


def test_lognormal_table_median_and_clip():
    t = C.cost_table(LOGN)
    assert t[128] == 3000                      # p = 128.5 / 257 = 1/2
    assert t[0] > 0 and t[-1] < 200_000        # no clip at sigma 0.5
    z = statistics.NormalDist().inv_cdf(200.5 / 257)
    assert t[200] == round(3000 * np.exp(0.5 * z))
    clipped = C.cost_table({**LOGN, "max": 4000})
    assert clipped.max() == 4000 and clipped[128] == 3000


def test_median_and_bound():
    assert C.cost_median(1234) == C.cost_bound(1234) == 1234
    assert C.cost_median(LOGN) == 3000 and C.cost_bound(LOGN) == int(C.cost_table(LOGN)[-1])
    q = {"dist": "quantiles", "q": [10, 20, 400]}
    assert C.cost_median(q) == 20 and C.cost_bound(q) == 400


def test_sampling_rule():
    t = C.cost_table({"dist": "quantiles", "q": [0, 256 << 24]})   # tab[k] = k << 24
    assert C.sample(t, 0) == 0
    assert C.sample(t, (1 << 32) - 1) == (1 << 32) - 1                # linear: identity
    assert C.sample(t, 5 << 24 | 77) == (5 << 24) + 77
    flat = C.cost_table({"dist": "quantiles", "q": [9, 9]})
    assert {C.sample(flat, r) for r in (0, 12345, (1 << 32) - 1)} == {9}


def test_errors_check_table():
    t = C.cost_table(LOGN)
    with pytest.raises(ValueError, match="257"):
        C.check_table("w", t[:-1])
    bad = t.copy()
    bad[10] = bad[9] - 1
    with pytest.raises(ValueError, match="nondecreasing"):
        C.check_table("w", bad)
    bad = t.copy()
    bad[-1] = C.MAX_COST_NS + 1
    with pytest.raises(ValueError, match="out of range"):
        C.check_table("w", bad)


# -- the engines --------------------------------------------------------------------------------

def alone_on_a_cpu(engine, costs, seed=0, n=400):
    """One arm64 vCPU alone on one host CPU, no polling, woken by its timer every 50 us:
    each wake-up's latency is wake_to_run_ns + vm_entry_ns."""
    vm = kw.VM(nr_vcpus=1, host_cpus=1, engine=engine, costs=costs, seed=seed)
    vm.host.halt_poll_ns = 0
    vm.vcpus[0].load([g.unmask(), g.set_handler(0),
                      g.loop([g.compute(1 * US), g.timer_arm(50 * US), g.wfi()])])
    vm.run(n * 51 * US)
    return vm


@pytest.mark.parametrize("engine", ENGINES)
def test_a_lone_vcpu_has_a_tail_only_with_a_distribution(engine):
    hist = alone_on_a_cpu(engine, {}).host.latency_histogram()
    const = latency_percentiles(hist)
    assert const["count"] >= 300
    # One value, wake_to_run_ns + vm_entry_ns = 6000 ns: one bucket (p99 == p50 up to
    # the histogram's reading inside the bucket).
    assert np.flatnonzero(hist).tolist() == [kw.model.lat_bucket(6000)]
    assert abs(const["p99"] - const["p50"]) <= 6000 / 64
    tail = latency_percentiles(alone_on_a_cpu(
        engine, {"wake_to_run_ns": LOGN}).host.latency_histogram())
    assert tail["count"] >= 300
    assert tail["p99"] > 1.5 * tail["p50"]
    # The median of the draws is the table's median, within one table step (and the
    # histogram's 1/64 relative error).
    t = C.cost_table(LOGN)
    step = int(t[129] - t[127])
    assert abs(tail["p50"] - (3000 + 1000)) <= step + 4000 / 64


def test_constant_costs_draw_nothing():
    """A constant never draws: the cost streams stay at their seeds, whatever ran."""
    vm = alone_on_a_cpu("core", {"vm_exit_ns": 1500}, n=50)
    th = np.frombuffer(vm.host._engine.export_state()[1]["threads"].tobytes(),
                       dtype=THREAD_DTYPE)
    state, inc = reference.stream_seed(0, 0, COST_STREAM_BASE + 0)
    assert int(th["cost_rng_state"][0]) == state and int(th["cost_rng_inc"][0]) == inc
    drawn = alone_on_a_cpu("core", {"vm_exit_ns": {"dist": "quantiles", "q": [1500, 1600]}},
                           n=50)
    th = np.frombuffer(drawn.host._engine.export_state()[1]["threads"].tobytes(),
                       dtype=THREAD_DTYPE)
    assert int(th["cost_rng_state"][0]) != state
    # ... and the guest's own stream is the same either way (separate streams).
    a = np.frombuffer(vm.host._engine.export_state()[1]["threads"].tobytes(),
                      dtype=THREAD_DTYPE)
    assert int(a["rng_state"][0]) == int(th["rng_state"][0])


def tails_scenario(engine, seed):
    host, sim_ns, _ = scenarios.build("ipi-storm", vcpus=6, host_cpus=2, seed=seed,
                                      engine=engine)
    return host, sim_ns


TAILS = {"wake_to_run_ns": LOGN,
         "vm_exit_ns": {"dist": "quantiles", "q": [600, 900, 1000, 1500, 12_000]},
         "vm_entry_ns": {"dist": "lognormal", "median": 900, "sigma": 0.3},
         "ipi_send_ns": {"dist": "lognormal", "median": 400, "sigma": 1.2, "max": 20_000},
         "context_switch_ns": {"dist": "quantiles", "q": [1000, 2000, 40_000]}}


def storm(engine, seed, costs=TAILS, ns=2_000_000):
    host = kw.Host(host_cpus=2, arch="x86", seed=seed, costs=costs, engine=engine,
                   trace_capacity=4096)
    vm = host.create_vm(6)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(20 * US), g.wake_random_other(), g.wfi()])])
    vm.set_tick(250 * US)
    host.run(ns)
    return host, vm


def outcome(host, vm):
    return (host.now, host.events, host.halts, host.stats_array().tolist(),
            host.latency_histogram().tolist(), vm.trace_records().tobytes())


def test_same_seed_same_run_other_seed_other_run():
    a, b, c = storm("core", 1), storm("core", 1), storm("core", 2)
    assert outcome(*a) == outcome(*b)
    assert outcome(*a) != outcome(*c)


def test_both_engines_identical_with_tails():
    core = storm("core", 3)
    ref = storm("reference", 3)
    assert outcome(*core) == outcome(*ref)
    assert core[0]._engine.cost_tables() == ref[0]._engine.cost_tables()
    assert set(core[0]._engine.cost_tables()) == set(C.DRAWN_COSTS)


def test_tails_change_the_run_but_constants_match_the_defaults():
    assert outcome(*storm("core", 4, costs=None)) == outcome(
        *storm("core", 4, costs={k: v for k, v in kw.model.COST_DEFAULTS.items()}))
    assert outcome(*storm("core", 4, costs=None)) != outcome(*storm("core", 4))


def test_scenario_costs_take_distributions(tmp_path):
    p = tmp_path / "tails.toml"
    p.write_text('''
name = "tails"
sim = "1ms"
[host]
cpus = 1
costs = { wake_to_run_ns = { dist = "lognormal", median = "3us", sigma = 0.5, max = "200us" }, vm_exit_ns = { dist = "quantiles", q = ["1us", "2us"] } }
[vm]
vcpus = 2
[[vm.program]]
vcpus = "all"
ops = "loop { compute 5us\\n wfi }"
''')
    host, _, sc = scenarios.build(str(p))
    assert host.costs["wake_to_run_ns"] == LOGN
    assert host.costs["vm_exit_ns"] == {"dist": "quantiles", "q": [1000, 2000]}
    bad = tmp_path / "bad.toml"
    bad.write_text(p.read_text().replace('sigma = 0.5', 'sigma = -1'))
    with pytest.raises(scenarios.ScenarioError, match="host.costs.wake_to_run_ns"):
        scenarios.load(str(bad))
    bad.write_text(p.read_text().replace('wake_to_run_ns', 'sched_slice_ns'))
    with pytest.raises(scenarios.ScenarioError, match="is a constant"):
        scenarios.load(str(bad))


# -- snapshots ----------------------------------------------------------------------------------

def test_snapshot_mid_run_continues_bit_identically():
    host, vm = storm("core", 5, ns=1_000_000)
    snap = host.snapshot()
    host.run(3_000_000)
    again = kw.Host.restore(snap)
    assert again.costs == host.costs
    again.run(3_000_000)
    assert outcome(again, again.vms[0]) == outcome(host, vm)
    assert again.snapshot() == host.snapshot()


def _edit(snap, fn):
    header, body = unframe(snap)
    fn(header, body)
    return frame(header, body)


def _costtab(header, body):
    d = header["engine"]["arrays"]["costtab"]
    return np.frombuffer(memoryview(body)[d["offset"]:d["offset"] + d["nbytes"]],
                         dtype=np.uint64)


@pytest.mark.parametrize("edit, words", [
    (lambda h, b: _costtab(h, b).__setitem__(3 * 257 + 100, 1), "cost table 3"),   # unsorted
    (lambda h, b: _costtab(h, b).__setitem__(3 * 257 + 256, (1 << 40) + 1), "out of range"),
    (lambda h, b: _costtab(h, b).__setitem__(3 * 257 + 256, (1 << 64) - 1), "out of range"),
    (lambda h, b: h["engine"]["scalars"].__setitem__("cost_dist", 0), "drawn costs"),
    (lambda h, b: h["engine"]["scalars"].__setitem__("cost_dist", 0xFF), "drawn costs"),
    (lambda h, b: h["engine"]["scalars"].__setitem__("cost_dist", -1), "cost_dist"),
    (lambda h, b: h["host"]["costs"].__setitem__("wake_to_run_ns", {"dist": "x"}),
     "host configuration"),
    (lambda h, b: h["host"]["costs"].__setitem__("wake_to_run_ns", 5), "drawn costs"),
    (lambda h, b: h["engine"]["arrays"]["costtab"].__setitem__("shape", [5 * 257 - 1]),
     "costtab"),
])
def test_restore_refuses_bad_cost_tables(edit, words):
    host, _ = storm("core", 6, costs={"wake_to_run_ns": LOGN}, ns=300_000)
    snap = host.snapshot()
    kw.Host.restore(snap)
    with pytest.raises(SnapshotError, match=words):
        kw.Host.restore(_edit(snap, edit))


def test_constant_rows_are_not_checked_but_drawn_rows_are():
    """A constant's row is never sampled: only the drawn costs' rows must be sorted."""
    host, _ = storm("core", 6, costs={"wake_to_run_ns": LOGN}, ns=300_000)
    snap = host.snapshot()
    ok = _edit(snap, lambda h, b: _costtab(h, b).__setitem__(5, 0))   # vm_exit's row: constant
    kw.Host.restore(ok).run(600_000)


@pytest.mark.parametrize("mutate", [
    lambda e: e.cost_tabs[3].__setitem__(7, e.cost_tabs[3][6] - 1),
    lambda e: e.cost_tabs[3].__setitem__(256, (1 << 40) + 1),
    lambda e: e.cost_tabs.pop(),
    lambda e: setattr(e, "cost_dist", 64),
])
def test_reference_import_checks_cost_tables(mutate):
    host, _ = storm("reference", 6, costs={"wake_to_run_ns": LOGN}, ns=200_000)
    e = host._engine
    state = ref_snapshot.engine_export(e)
    fresh = reference.Engine("x86", 2, 6)
    ref_snapshot.engine_import(fresh, state)
    mutate(e)
    bad = ref_snapshot.engine_export(e)
    with pytest.raises(reference.EngineError, match="cost"):
        ref_snapshot.engine_import(reference.Engine("x86", 2, 6), bad)


def test_the_core_compiles_the_same_cost_constants():
    from kvmwake import _core
    from kvmwake.reference import rng
    c = _core.compiled_constants()["costs"]
    assert c["table_n"] == C.COST_TABLE_N
    assert c["frac_bits"] == C.COST_FRAC_BITS and c["frac_mask"] == (1 << C.COST_FRAC_BITS) - 1
    assert c["stream_base"] == rng.COST_STREAM_BASE
    assert c["drawn"] == (rng.COST_VM_EXIT, rng.COST_VM_ENTRY, rng.COST_IPI_SEND,
                          rng.COST_WAKE_TO_RUN, rng.COST_CONTEXT_SWITCH, len(C.DRAWN_COSTS))
    assert [C.DRAWN_COSTS[i] for i in c["drawn"][:5]] == [
        "vm_exit_ns", "vm_entry_ns", "ipi_send_ns", "wake_to_run_ns", "context_switch_ns"]
    # costs_t opens with the drawn costs in this order (cost_ns indexes it).
    assert list(kw.model.COST_NAMES[:5]) == list(C.DRAWN_COSTS)
