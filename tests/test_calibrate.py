"""Calibration under overcommit: own work from uncontended gaps only, saturated
recordings flagged, cost tails fitted (``kvmwake kernel calibrate``).

Everything here runs on inputs built in the test (halts, scheduler events) or on
synthetic recordings made by the model (``kvmwake.kernel.synthetic``); nothing
needs ``/dev/kvm``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kvmwake.kernel import analysis as A
from kvmwake.kernel import calibrate as C
from kvmwake.kernel import recording as R
from kvmwake.kernel import schedtrace as ST
from kvmwake.kernel import synthetic as Y
from kvmwake.kernel.simulate import SimParams, Setup
from kvmwake.model import COST_DEFAULTS

TRUE_OWN_NS = 12_000 + 800 + 800      # handler + entry + exit of _made_with()


def _made_with(handler=12_000):
    costs = {**COST_DEFAULTS, "wake_to_run_ns": 30_000, "context_switch_ns": 6_000,
             "vm_entry_ns": 800, "vm_exit_ns": 800}
    return SimParams(costs=costs, handler_ns=handler, delivery_ns=900, lateness_ns=15_000,
                     arrivals="target", injector_idle_wake_ns=15_000, injector_ns=1_000)


def _halts(rows):
    """Halts from (vcpu, end, ns, waited) rows; the first of each vCPU marked first."""
    a = np.array(rows, dtype=np.int64)
    first = np.zeros(len(a), dtype=bool)
    seen = set()
    for i, v in enumerate(a[:, 0].tolist()):
        first[i] = v not in seen
        seen.add(v)
    return A.Halts(a[:, 0].astype(np.int32), a[:, 1], a[:, 2], a[:, 3].astype(bool), first)


# ---------------------------------------------------------------- the gaps

def test_busy_intervals_mark_gaps_with_a_send_inside():
    # vCPU 0 halts end at 100, 300, 600; halts start at 150 (300-150), 400 (600-200)
    h = _halts([(0, 100, 50, 1), (0, 300, 150, 1), (0, 600, 200, 1)])
    sends = np.array([120, 140, 450], dtype=np.int64)
    iv = A.busy_intervals(h, sends, np.zeros(3, dtype=np.int32))
    assert iv.start.tolist() == [100, 300] and iv.stop.tolist() == [150, 400]
    assert iv.quiet.tolist() == [False, True]           # 120 and 140 fall in the first
    assert iv.length.tolist() == [50, 100]
    assert A.busy_samples(h, sends, np.zeros(3, dtype=np.int32)).tolist() == [100]


def test_busy_intervals_leave_out_the_plans_compute():
    # vCPU 0: halts end at 100 (woken by wake 0) and 300 (wake 1); the last has no waker
    h = _halts([(0, 100, 50, 1), (0, 300, 150, 1), (0, 600, 200, 1), (0, 900, 100, 1)])
    sends = np.array([40, 200], dtype=np.int64)
    waker = np.array([0, 1, -1, -1])
    compute = np.array([30, 60], dtype=np.int64)
    iv = A.busy_intervals(h, sends, np.zeros(2, dtype=np.int32), waker, compute)
    assert iv.start.tolist() == [100, 300, 600] and iv.stop.tolist() == [150, 400, 800]
    assert iv.compute.tolist() == [30, 60, 0] and iv.wake.tolist() == [0, 1, -1]
    assert iv.length.tolist() == [20, 40, 200]
    assert iv.quiet.tolist() == [True, True, False]     # after a halt without waker: unknown
    assert A.busy_samples(h, sends, np.zeros(2, dtype=np.int32), waker,
                          compute).tolist() == [20, 40]
    with pytest.raises(ValueError, match="needs waker"):
        A.busy_intervals(h, sends, np.zeros(2, dtype=np.int32), None, compute)


def test_ipi_recording_own_work_without_the_compute(tmp_path):
    """An ipi recording's gaps hold the plan's compute (here exp:50us): own work is
    what is left, near the msi recordings' handler + entry + exit."""
    Y.make_recording(tmp_path / "r", "exp:50us", 300, 3, 2, None, _made_with(),
                     workload="ipi")
    rec = R.load(tmp_path / "r")
    compute = C.plan_compute(rec)
    plan = R.regenerate_plan(rec)
    assert compute[:-1].tolist() == plan.compute_ns.tolist() and compute[-1] == 0
    kv = C.kernel_view(rec)
    own = C.own_work(kv)
    # the model's ipi step: entry, handler, the send's port exit and the ICR write (an
    # exit and entry each), the hlt exit
    assert TRUE_OWN_NS <= own["busy_ns"] <= TRUE_OWN_NS + 4 * 800 + 1000
    # where it goes: to the send (entry, handler, exit) and after it (entry, ICR, exit)
    assert own["ipi_to_send_ns"] == pytest.approx(12_000 + 1_600, abs=1_000)
    assert own["ipi_to_send_ns"] + own["ipi_send_to_halt_ns"] == pytest.approx(
        own["busy_ns"], abs=1_000)
    assert own["ipi_split_samples"] > 50
    whole = A.busy_samples(kv.halts, rec.wakes["sent_ns"], rec.wakes["vcpu"])
    assert np.median(whole) > own["busy_ns"] + 20_000      # the compute counted as own work
    # the model made this recording with entry = exit = 800 ns and a 12 us handler:
    # entry + exit come from the IPI's path (send -> polled halt end), the handler from
    # halt end -> send less them (the msi rule would put the handler and two round trips
    # into entry + exit)
    est = C.direct_estimates(kv)
    p, notes = C.initial_params(kv, est)
    assert p.costs["vm_entry_ns"] + p.costs["vm_exit_ns"] == pytest.approx(1_600, abs=100)
    assert p.handler_ns == pytest.approx(12_000, abs=200)
    assert any(n.startswith("ipi recording: entry + exit from the IPI's send") for n in notes)
    assert not any("handler_ns kept at 10 us" in n for n in notes)
    # without a polled halt (cap 0): half the send -> sender's halt time
    p, notes = C.initial_params(kv, {**est, "delivery_ns": None})
    assert p.costs["vm_entry_ns"] + p.costs["vm_exit_ns"] == pytest.approx(
        est["ipi_send_to_halt_ns"] / 2, abs=1)
    assert p.handler_ns == pytest.approx(est["ipi_to_send_ns"] - est["ipi_send_to_halt_ns"] / 2,
                                         abs=1)
    assert C.ipi_costs(C.direct_estimates(C.kernel_view(R.load(_msi(tmp_path))))) is None
    assert C.plan_compute(R.load(_msi(tmp_path))) is None


def _msi(tmp_path):
    Y.make_recording(tmp_path / "m", "short", 30, 1, 2, None, _made_with())
    return tmp_path / "m"


# ---------------------------------------------------------------- the scheduler trace

def _sw(ts, cpu, prev, state, nxt):
    return ST.SchedEvent(ts, cpu, ST.SWITCH, prev, next_pid=nxt, prev_state=state)


def _wk(ts, pid, cpu, on=None):
    """``pid`` woken onto ``cpu`` (traced on CPU ``on``, default ``cpu``)."""
    return ST.SchedEvent(ts, cpu if on is None else on, ST.WAKEUP, pid, target_cpu=cpu)


def test_runnable_segments_follow_wakeups_switches_and_migrations():
    ev = [_wk(10, 1, 0), _sw(12, 0, 0, "R", 1),           # 1 woken on CPU 0, runs
          _wk(20, 2, 0, on=1),                            # 2 woken onto CPU 0 from CPU 1
          _sw(25, 0, 1, "R+", 2),                          # 1 preempted by 2 (stays runnable)
          _sw(30, 0, 2, "S", 1),                           # 2 sleeps, 1 runs again
          ST.SchedEvent(35, 0, ST.MIGRATE, 1, target_cpu=1, orig_cpu=0),
          _sw(36, 1, 0, "R", 1),                           # 1 switched in on CPU 1 (idle: pid 0)
          _sw(40, 1, 1, "S", 0),                           # 1 sleeps
          _wk(50, 3, 1)]                                   # 3 is not recorded: ignored
    seg = A.runnable_segments(list(reversed(ev)), [1, 2])   # order of the list is not relied on
    assert seg[1] == [(0, 10, 35), (1, 35, 40)]
    assert seg[2] == [(0, 20, 30)]
    # the same from the trace text the recorder writes (sched.trace)
    text = "".join(
        f"  t-{e.pid} [{e.cpu:03d}] d..2. 0.{e.ts:06d}: " + (
            f"sched_switch: prev_comm=a prev_pid={e.pid} prev_prio=120 prev_state="
            f"{e.prev_state} ==> next_comm=b next_pid={e.next_pid} next_prio=120\n"
            if e.kind == ST.SWITCH else
            f"sched_wakeup: comm=a pid={e.pid} prio=120 target_cpu={e.target_cpu:03d}\n"
            if e.kind == ST.WAKEUP else
            f"sched_migrate_task: comm=a pid={e.pid} prio=120 orig_cpu={e.orig_cpu} "
            f"dest_cpu={e.target_cpu}\n") for e in ev)
    parsed = ST.parse(text)
    assert [(e.kind, e.pid) for e in parsed] == [(e.kind, e.pid) for e in ev]
    us = {t: [(c, a * 1000, b * 1000) for c, a, b in v] for t, v in seg.items()}
    assert A.runnable_segments(parsed, [1, 2]) == us


def test_sched_contended_only_on_the_vcpus_cpu():
    # vCPU 0 = tid 1 runnable on CPU 0 during [100, 200] and [300, 400];
    # tid 2 (the injector) runnable on CPU 0 during [150, 160], on CPU 1 during [310, 390].
    seg = {1: [(0, 100, 200), (0, 300, 400)], 2: [(0, 150, 160), (1, 310, 390)]}
    iv = A.BusyIntervals(np.zeros(3, dtype=np.int32), np.array([100, 300, 160]),
                         np.array([200, 400, 200]), np.ones(3, dtype=bool))
    assert A.sched_contended(iv, {0: 1}, seg).tolist() == [True, False, False]


def test_own_work_from_the_scheduler_trace(tmp_path, monkeypatch):
    """With scheduler events, the gaps where another recorded thread was runnable on
    the vCPU's CPU are left out, however long they are."""
    Y.make_recording(tmp_path / "r", "mixed", 200, 1, 2, None, _made_with())
    rec = R.load(tmp_path / "r")
    kv = C.kernel_view(rec)
    iv = A.busy_intervals(kv.halts, rec.wakes["sent_ns"], rec.wakes["vcpu"])
    tid = rec.meta["vcpu_tids"][0]
    inj = rec.meta["injector_tid"]
    # The vCPU is runnable on CPU 0 through each gap; the injector is runnable on CPU 0
    # inside every other quiet gap, which is then made 50 us longer (it waited).
    ev, longer = [], []
    for i in np.nonzero(iv.quiet)[0]:
        a, b = int(iv.start[i]), int(iv.stop[i])
        ev += [_wk(a, tid, 0), _sw(b, 0, tid, "S", 0)]
        if len(longer) % 2 == 0:
            ev += [_wk(a + 10, inj, 0), _sw(a + 20, 0, inj, "S", tid)]
        longer.append(i)
    kv.sched = ST.SchedTrace(ev, [{"tid": tid, "role": "vcpu", "vcpu": 0, "cpu": 0},
                                  {"tid": inj, "role": "injector", "vcpu": None, "cpu": 0}])
    out = C.own_work(kv)
    assert out["busy_method"].startswith("scheduler trace")
    clean = [int(iv.length[i]) for k, i in enumerate(longer) if k % 2]
    assert out["busy_samples"] == len(clean)
    assert out["busy_ns"] == pytest.approx(np.median(clean))
    assert C.sched_trace(rec) is None                    # no sched.trace: the shape decides


# ---------------------------------------------------------------- without a trace: the shape

def _iv(lengths_by_vcpu):
    v, s, e = [], [], []
    t = 0
    for vc, ls in lengths_by_vcpu.items():
        for L in ls:
            v.append(vc)
            s.append(t)
            e.append(t + L)
            t += L + 1000
    return A.BusyIntervals(np.array(v, dtype=np.int32), np.array(s), np.array(e),
                           np.ones(len(v), dtype=bool))


def test_shape_prefers_a_vcpu_alone_and_off_the_injectors_cpu():
    iv = _iv({0: [50_000, 60_000, 70_000], 1: [10_000, 11_000, 12_000],
              2: [30_000, 31_000, 32_000]})
    # vCPUs 0 and 2 share CPU 0; vCPU 1 alone on CPU 1, the injector on CPU 0
    out = C.shape_own_work(iv, [0, 1, 0], 0)
    assert out["busy_ns"] == 11_000 and out["busy_samples"] == 3
    assert "not the injector's" in out["busy_method"]
    # the injector on vCPU 1's CPU: still the lone vCPU, said so
    out = C.shape_own_work(iv, [0, 1, 0], 1)
    assert out["busy_ns"] == 11_000 and "alone among the vCPUs" in out["busy_method"]


def test_shape_falls_back_to_a_low_quantile():
    lengths = list(range(10_000, 110_000, 1_000))      # 100 gaps, 10 us .. 109 us
    iv = _iv({0: lengths[:50], 1: lengths[50:]})
    for cpus in ([0, 0], [None, None]):                 # both on one CPU / unpinned
        out = C.shape_own_work(iv, cpus, None)
        assert out["busy_ns"] == pytest.approx(np.percentile(lengths, C.LOW_QUANTILE))
        assert f"percentile {C.LOW_QUANTILE}" in out["busy_method"]
    assert C.shape_own_work(_iv({}), [None], None)["busy_ns"] is None


def test_pinned_cpus_from_threads_table_or_pinning():
    meta = {"vcpus": 2, "pinning": {"vcpus": [0, 1], "injector": 0, "enabled": True}}
    assert C.pinned_cpus(meta) == ([0, 1], 0)
    assert C.pinned_cpus({**meta, "pinning": {"vcpus": [-1, -1], "injector": -1,
                                              "enabled": False}}) == ([None, None], None)
    threads = [{"tid": 5, "role": "vcpu", "vcpu": 1, "cpu": 0},
               {"tid": 4, "role": "vcpu", "vcpu": 0, "cpu": None},
               {"tid": 6, "role": "injector", "vcpu": None, "cpu": 1},
               {"tid": 3, "role": "main", "vcpu": None, "cpu": None}]
    assert C.pinned_cpus({**meta, "threads": threads}) == ([None, 0], 1)


def test_overcommitted_recording_own_work_is_not_the_waiting(tmp_path):
    """4 vCPUs on 2 CPUs: the gaps' upper part holds the wait for the CPU; the
    estimate from the uncontended (low) end of them is the vCPU's own work."""
    Y.make_recording(tmp_path / "r", "short", 300, 4, 2, None, _made_with())
    kv = C.kernel_view(R.load(tmp_path / "r"))
    iv = A.busy_intervals(kv.halts, kv.rec.wakes["sent_ns"], kv.rec.wakes["vcpu"])
    assert np.percentile(iv.length[iv.quiet], 90) > 1.5 * TRUE_OWN_NS
    est = C.direct_estimates(kv)
    assert est["busy_ns"] == pytest.approx(TRUE_OWN_NS, rel=0.1)


# ---------------------------------------------------------------- saturation

def test_saturated_recording_is_flagged(tmp_path):
    Y.make_recording(tmp_path / "sat", "short", 300, 6, 2, None, _made_with())
    cal = C.fit(R.load(tmp_path / "sat"), quick=True)
    assert cal["saturated"] is True
    assert "halts for 300 wakes" in cal["saturated_reason"]
    assert cal["halts_per_wake"] < C.SATURATED_HALTS_PER_WAKE
    assert any("saturated" in n for n in cal["notes"])
    json.dumps(cal, default=float)


def test_unsaturated_recording_is_not_flagged(tmp_path):
    Y.make_recording(tmp_path / "ok", "mixed", 200, 2, 2, None, _made_with())
    sat = C.saturation(C.kernel_view(R.load(tmp_path / "ok")))
    assert sat["saturated"] is False and sat["saturated_reason"] is None
    assert sat["halts_per_wake"] > 0.5 and sat["out_of_halt_share"] < 0.5


def test_saturation_thresholds_on_built_halts(tmp_path):
    Y.make_recording(tmp_path / "r", "long", 40, 1, 2, None, _made_with())
    kv = C.kernel_view(R.load(tmp_path / "r"))
    # out of halt almost all the time: halts of 1 us every 100 us
    kv.halts = _halts([(0, t, 1_000, 1) for t in range(100_000, 2_000_000, 100_000)])
    kv.rec.wakes = {**kv.rec.wakes, "sent_ns": np.arange(1, 21, dtype=np.int64)}
    sat = C.saturation(kv)
    assert sat["saturated"] and "out of halt" in sat["saturated_reason"]
    assert "per wake" not in sat["saturated_reason"]     # 18 halts for 20 wakes is fine


def test_stats_only_saturation(tmp_path):
    Y.make_recording(tmp_path / "s", "short", 300, 6, 2, None, _made_with(), traced=False)
    sat = C.saturation(C.kernel_view(R.load(tmp_path / "s")))
    assert sat["saturated"] and "halts for 300 wakes" in sat["saturated_reason"]


# ---------------------------------------------------------------- tails

def test_quantile_cost_keeps_the_spread_and_moves_the_median():
    rng = np.random.default_rng(1)
    lat = rng.lognormal(np.log(40_000), 0.6, 2_000)
    c = C.quantile_cost(lat, 25_000)
    q = np.array(c["q"])
    assert c["dist"] == "quantiles" and len(q) == C.TAIL_POINTS
    assert (np.diff(q) >= 0).all() and q.dtype.kind == "i" and q.min() >= 0
    assert q[50] == 25_000
    assert q[99] - q[50] == pytest.approx(np.percentile(lat, 99) - np.median(lat), abs=1)
    # a spread wider below than the centre: clamped at 0, still nondecreasing
    c = C.quantile_cost([0, 1_000, 100_000, 100_001, 100_002], 2_000)
    assert c["q"][0] == 0 and c["q"] == sorted(c["q"])


def test_tails_fitted_from_uncontended_latencies(tmp_path):
    Y.make_recording(tmp_path / "r", "mixed", 400, 2, 2, None, _made_with())
    rec = R.load(tmp_path / "r")
    kv = C.kernel_view(rec)
    lat, how = C.uncontended_latencies(kv)
    assert "(1)" in how                         # vCPU 1: alone, off the injector's CPU
    h, wk = kv.halts, kv.waker
    sel = (wk >= 0) & h.waited & ~h.first & (h.vcpu == 1)
    assert sorted(lat.tolist()) == sorted((h.end[sel] - rec.wakes["sent_ns"][wk[sel]]).tolist())
    cal = C.fit(rec, quick=True, tails=True)
    spec = cal["costs"]["wake_to_run_ns"]
    assert spec["dist"] == "quantiles" and len(spec["q"]) == C.TAIL_POINTS
    assert spec["q"][50] == cal["params"]["costs"]["wake_to_run_ns"]   # constant stays
    assert cal["tails"]["samples"] == lat.size
    C.save(rec, cal)
    again = json.loads((rec.path / "calibration.json").read_text())
    assert C.host_costs(again)["wake_to_run_ns"] == spec
    assert C.host_costs(again)["vm_exit_ns"] == cal["params"]["costs"]["vm_exit_ns"]
    # without --tails: constants as before
    plain = C.fit(rec, quick=True)
    assert plain["costs"] == {} and plain["tails"] is None
    assert plain["params"] == cal["params"]


def test_sim_costs_are_what_the_simulated_host_gets(tmp_path, monkeypatch):
    """compare's simulation gives Host(costs=...) calibrate.sim_costs(cal): the
    constants with the fitted tails (--tails: cal["costs"]) over them."""
    from kvmwake.kernel import compare as CMP
    from kvmwake.kernel import simulate as SM
    d = tmp_path / "r"
    Y.make_recording(d, "mixed", 200, 2, 2, None, _made_with())
    cal = C.fit(R.load(d), quick=True)
    cal["costs"] = {"wake_to_run_ns": {"dist": "quantiles", "q": [1000, 5000, 90000]}}
    C.save(R.load(d), cal)
    assert C.sim_costs(cal) == {**cal["params"]["costs"], **cal["costs"]}
    assert C.sim_costs(cal) == C.host_costs(cal)
    got = []
    real = SM.Host

    def spy(*a, **kw):
        got.append(kw["costs"])
        return real(*a, **kw)
    monkeypatch.setattr(SM, "Host", spy)
    CMP.run(R.load(d))
    assert got and all(c == C.sim_costs(cal) for c in got)
    # host_costs reach the host, the constants still time the injector
    setup = Setup.from_recording(R.load(d))
    p = SimParams.from_dict(cal["params"])
    got.clear()
    other = {**p.costs, "vm_exit_ns": p.costs["vm_exit_ns"] + 5000}
    r = SM.simulate(setup, p, host_costs=other)
    assert got == [other]
    assert r.events != SM.simulate(setup, p).events


def test_tails_skipped_without_uncontended_halts(tmp_path):
    Y.make_recording(tmp_path / "r", "short", 200, 4, 2, None, _made_with())
    cal = C.fit(R.load(tmp_path / "r"), quick=True, tails=True)
    assert cal["costs"] == {} and cal["tails"]["samples"] == 0
    assert any("--tails" in n and "costs kept constant" in n for n in cal["notes"])


@pytest.mark.parametrize("costs, message", [
    ([1], "must be an object"),
    ({"nope_ns": 1}, "unknown cost"),
    ({"wake_to_run_ns": -1}, "wake_to_run_ns"),
    ({"wake_to_run_ns": {"dist": "quantiles", "q": [3, 2]}}, "wake_to_run_ns"),
    ({"wake_to_run_ns": {"dist": "quantiles", "q": [1]}}, "wake_to_run_ns"),
    ({"wake_to_run_ns": {"dist": "quantiles", "q": ["a", "b"]}}, "wake_to_run_ns"),
    ({"wake_to_run_ns": {"dist": "weird", "q": [1, 2]}}, "wake_to_run_ns"),
])
def test_bad_costs_in_a_calibration(tmp_path, costs, message):
    Y.make_recording(tmp_path / "r", "long", 40, 1, 2, None, _made_with())
    rec = R.load(tmp_path / "r")
    cal = C.fit(rec, quick=True)
    cal["costs"] = costs
    with pytest.raises(R.RecordingError, match=message):
        C.load_params(cal)


def test_cli_calibrate_tails(tmp_path, capsys):
    from kvmwake.kernel import cli as KC
    Y.make_recording(tmp_path / "r", "mixed", 300, 2, 2, None, _made_with())
    assert KC.main(["calibrate", str(tmp_path / "r"), "--quick", "--tails"]) == 0
    out = capsys.readouterr().out
    assert "tails:    wake_to_run_ns quantiles" in out and "own work:" in out
    cal = json.loads((tmp_path / "r" / "calibration.json").read_text())
    assert cal["costs"]["wake_to_run_ns"]["dist"] == "quantiles"


# ---------------------------------------------------------------- compare's acceptance line

from kvmwake.kernel import compare as CM  # noqa: E402


def _side(poll_pct, per_vcpu, wait50, p90, p99, succ, wakeup):
    return {"poll_pct": poll_pct, "wait_pct": None if poll_pct is None else 100 - poll_pct,
            "per_vcpu": [{"vcpu": i, "halts": h, "poll": p} for i, (p, h) in enumerate(per_vcpu)],
            "wait_ns": {"p50": wait50}, "stats_wait_median_ns": wait50,
            "wake_to_halt_end_ns": {"p50": 1.0, "p90": p90, "p99": p99},
            "stats": {"halt_successful_poll": succ, "halt_wakeup": wakeup}}


def _c(kernel, model, replay=0, sched=None, saturated=False, traced=True):
    return {"kernel": kernel, "model": model, "recording": {"traced": traced},
            "replay": None if replay is None else {"matched": 10, "mismatched": replay},
            "sched": sched, "saturated": saturated, "saturated_reason": "few halts"}


K0 = _side(20.0, [(10, 50), (10, 50)], 100_000, 200_000, 400_000, 20, 80)


def _status(v):
    return {e["name"]: e["status"] for e in v["criteria"]}


def test_every_criterion_met_and_sched_not_checked():
    v = CM.verdict(_c(K0, _side(24.0, [(12, 50), (12, 50)], 114_000, 249_000, 559_000, 21, 73)))
    st = _status(v)
    assert [e["name"] for e in v["criteria"]] == [k for k, _, _ in CM.CRITERIA]
    assert all(st[k] == "met" for k in ("split", "split_per_vcpu", "median_wait", "p90", "p99",
                                        "halt_successful_poll", "halt_wakeup", "replay"))
    assert st["preemption"] == st["migration"] == "not checked"
    assert v["pass"] is True and v["status"] == "pass"
    assert v["not_checked"] == ["preemption", "migration"] and v["missed"] == []
    assert v["split_per_vcpu_pp"] == [pytest.approx(4.0), pytest.approx(4.0)]
    # the fields compare had before stay
    assert v["split_ok"] and v["median_wait_ok"] and v["replay_ok"]
    assert v["split_diff_pp"] == pytest.approx(4.0)


@pytest.mark.parametrize("model, missed", [
    (_side(26.0, [(10, 50), (10, 50)], 100_000, 200_000, 400_000, 20, 80), "split"),
    (_side(20.0, [(7, 50), (13, 50)], 100_000, 200_000, 400_000, 20, 80), "split_per_vcpu"),
    (_side(20.0, [(10, 50), (0, 0)], 100_000, 200_000, 400_000, 20, 80), "split_per_vcpu"),
    (_side(20.0, [(10, 50), (10, 50)], 116_000, 200_000, 400_000, 20, 80), "median_wait"),
    (_side(20.0, [(10, 50), (10, 50)], 100_000, 149_000, 400_000, 20, 80), "p90"),
    (_side(20.0, [(10, 50), (10, 50)], 100_000, 200_000, 561_000, 20, 80), "p99"),
    (_side(20.0, [(10, 50), (10, 50)], 100_000, 200_000, 400_000, 23, 80), "halt_successful_poll"),
    (_side(20.0, [(10, 50), (10, 50)], 100_000, 200_000, 400_000, 20, 71), "halt_wakeup"),
])
def test_each_criterion_can_miss(model, missed):
    v = CM.verdict(_c(K0, model))
    assert v["missed"] == [missed] and v["pass"] is False and v["status"] == "fail"
    assert v[f"{missed}_ok"] is False


def test_replay_and_zero_counts():
    v = CM.verdict(_c(K0, K0, replay=3))
    assert v["missed"] == ["replay"]
    n = CM.STAT_MIN_COUNT
    k = _side(20.0, [(10, 50)], 1.0, 1.0, 1.0, 0, n)
    m = _side(20.0, [(10, 50)], 1.0, 1.0, 1.0, 1, n)
    e = {x["name"]: x for x in CM.verdict(_c(k, m))["criteria"]}               # 0 and 1
    assert e["halt_successful_poll"]["status"] == "not checked"
    assert e["halt_successful_poll"]["reason"] == f"fewer than {n} on both sides"
    assert e["halt_wakeup"]["status"] == "met"
    # checked as soon as either side reaches STAT_MIN_COUNT: 0 against n is missed
    m = _side(20.0, [(10, 50)], 1.0, 1.0, 1.0, n, n)
    assert CM.verdict(_c(k, m))["missed"] == ["halt_successful_poll"]
    k = _side(20.0, [(10, 50)], 1.0, 1.0, 1.0, n - 1, n)
    m = _side(20.0, [(10, 50)], 1.0, 1.0, 1.0, int(n * 1.2), n)               # 19 and 24
    assert CM.verdict(_c(k, m))["missed"] == ["halt_successful_poll"]


def test_stats_only_leaves_trace_criteria_unchecked():
    v = CM.verdict(_c(K0, K0, replay=None, traced=False))
    st = _status(v)
    for key in ("split_per_vcpu", "p90", "p99", "replay", "preemption", "migration"):
        assert st[key] == "not checked"
    assert st["split"] == st["median_wait"] == st["halt_wakeup"] == "met" and v["pass"]


def _r(rate, n=100):
    return {"rate": rate, "n": n}


def test_sched_rates_compared_within_10_pp():
    sched = {"kernel": {"preemption": {"injector->vcpu": _r(0.60), "vcpu->injector": _r(0.20),
                                       "main->vcpu": _r(0.9)},
                        "migration": {"pooled": _r(0.25), "vCPU 0": _r(0.5)}},
             "model": {"preemption": {"injector->vcpu": _r(0.52), "vcpu->injector": _r(0.21),
                                      "vcpu->vcpu": _r(0.0)},
                       "migration": {"pooled": _r(0.36), "vCPU 0": _r(0.36)}}, "reason": None}
    v = CM.verdict(_c(K0, K0, sched=sched))
    assert _status(v)["preemption"] == "met" and _status(v)["migration"] == "missed"
    # checked: the role pairs both sides have (not main's), the pooled migration rate
    assert v["preemption_diff_pp"] == pytest.approx({"injector->vcpu": -8.0,
                                                     "vcpu->injector": 1.0})
    assert v["migration_diff_pp"] == pytest.approx({"pooled": 11.0})
    assert v["missed"] == ["migration"]
    no_model = {**sched, "model": None, "reason": "no timeline"}
    e = {x["name"]: x for x in CM.verdict(_c(K0, K0, sched=no_model))["criteria"]}
    assert e["migration"]["status"] == "not checked" and e["migration"]["reason"] == "no timeline"
    # a rate from fewer than SCHED_MIN_SAMPLES samples on either side is not checked
    few = {**sched, "model": {**sched["model"],
                              "migration": {"pooled": _r(0.36, CM.SCHED_MIN_SAMPLES - 1)}}}
    e = {x["name"]: x for x in CM.verdict(_c(K0, K0, sched=few))["criteria"]}
    assert e["migration"]["status"] == "not checked"
    assert e["migration"]["reason"].startswith(f"no rate with {CM.SCHED_MIN_SAMPLES} samples")
    assert e["preemption"]["status"] == "met"


def test_saturated_is_not_scored():
    bad = _side(60.0, [(30, 50), (30, 50)], 1.0, 1.0, 1.0, 99, 1)
    v = CM.verdict(_c(K0, bad, saturated=True))
    assert v["status"] == CM.SATURATED and v["pass"] is None
    assert all(e["status"] == CM.SATURATED for e in v["criteria"])
    assert v["split_ok"] is None and v["median_wait_ok"] is None and v["replay_ok"] is None
    assert v["split_diff_pp"] == pytest.approx(40.0)        # the figures are still there


def test_sched_rates_of_a_recording_and_of_the_model(tmp_path):
    """A synthetic recording with the model's own scheduler trace (sched.trace in the
    kernel's text form): compare reads it with schedtrace, simulates, and the model's
    rates (from its state timeline, the injector's VM as role "injector") equal the
    recording's."""
    d = tmp_path / "r"
    Y.make_recording(d, "short", 300, 3, 2, None, _made_with(), sched_trace=True)
    rec = R.load(d)
    kv = C.kernel_view(rec)
    assert isinstance(kv.sched, ST.SchedTrace)
    assert sorted(kv.sched.roles().values()) == ["injector", "vcpu", "vcpu", "vcpu"]
    r = C.sim_view(Setup.from_recording(rec), SimParams.from_dict(rec.meta["made_with"]),
                   rec.meta["port_exit_ns"])[0]
    assert isinstance(r.sched, ST.SchedTrace)
    assert {t["role"] for t in r.sched.threads} == {"vcpu", "injector"}
    sc = CM.sched_rates(kv, r)
    assert sc["reason"] is None
    k, m = sc["kernel"], sc["model"]
    assert set(k["preemption"]) >= {"injector->vcpu", "vcpu->injector"}
    assert k["preemption"]["injector->vcpu"]["n"] >= CM.SCHED_MIN_SAMPLES
    assert k["migration"]["pooled"] == {"rate": 0.0, "n": m["migration"]["pooled"]["n"]}
    for pair, x in k["preemption"].items():   # the same run: the same rates
        assert m["preemption"][pair]["rate"] == pytest.approx(x["rate"]), pair
    # own work from the scheduler trace now
    assert C.own_work(kv)["busy_method"].startswith("scheduler trace")
    # without sched.trace: not checked, saying why
    (d / ST.SCHED_TRACE).unlink()
    kv = C.kernel_view(R.load(d))
    assert kv.sched is None
    assert CM.sched_rates(kv, r)["reason"] == "the recording has no scheduler trace"
    # a corrupt sched.trace is an error naming the file, not a silent "no trace"
    (d / ST.SCHED_TRACE).write_text("  x-1 [000] d..2. 1.000001: sched_switch: garbage\n")
    with pytest.raises(R.RecordingError, match="sched.trace: line 1: sched_switch"):
        C.kernel_view(R.load(d))


def test_simulation_timeline_sized_from_the_run(tmp_path, monkeypatch):
    """simulate keeps the host's state timeline: a run that overflows it is run again
    with room (same seed, same result), and the timeline changes nothing else."""
    from kvmwake.kernel import simulate as SM
    Y.make_recording(tmp_path / "r", "short", 200, 3, 2, None, _made_with())
    setup = Setup.from_recording(R.load(tmp_path / "r"))
    p = _made_with()
    r = SM.simulate(setup, p)
    caps = []
    real = SM._simulate_msi

    def spy(*a):
        caps.append(a[5])            # the timeline capacity
        return real(*a)
    monkeypatch.setattr(SM, "_simulate_msi", spy)
    monkeypatch.setattr(SM, "TIMELINE_RECORDS_PER_WAKE", 0)
    monkeypatch.setattr(SM, "TIMELINE_BASE", 64)
    r2 = SM.simulate(setup, p)
    assert caps[0] == 64 and len(caps) >= 2 and caps[-1] > 64       # overflowed, re-run
    assert r2.sched.events == r.sched.events
    assert r2.events == r.events and np.array_equal(r2.send_ns, r.send_ns)
    off, dropped = real(setup, p, 0, "core", 20_000_000, 0)         # no timeline at all
    assert dropped == 0 and off.events == r.events and off.sched.events == []
    assert [t["role"] for t in r.sched.threads] == ["vcpu"] * 3 + ["injector"]


def test_compare_check_exit_codes(tmp_path, capsys):
    from kvmwake.kernel import cli as KC
    d = tmp_path / "r"
    Y.make_recording(d, "mixed", 300, 2, 2, None, _made_with())
    assert KC.main(["calibrate", str(d), "--quick"]) == 0
    assert KC.main(["compare", str(d), "--no-png", "--check"]) == 0
    out = capsys.readouterr().out
    assert "outcome: PASS" in out and "send -> halt end p99" in out
    c = json.loads((d / "compare.json").read_text())
    assert c["verdict"]["status"] == "pass" and len(c["verdict"]["criteria"]) == 10
    cal = json.loads((d / "calibration.json").read_text())
    cal["params"]["handler_ns"] *= 8                    # a wrong model
    (d / "calibration.json").write_text(json.dumps(cal))
    assert KC.main(["compare", str(d), "--no-png", "--check"]) == 1
    assert "outcome: FAIL" in capsys.readouterr().out
    assert KC.main(["compare", str(d), "--no-png"]) == 0     # without --check: report only
    cal.update(saturated=True, saturated_reason="12 halts for 300 wakes")
    (d / "calibration.json").write_text(json.dumps(cal))
    capsys.readouterr()
    assert KC.main(["compare", str(d), "--no-png", "--check"]) == 0
    assert "outcome: saturated, not scored (12 halts for 300 wakes)" in capsys.readouterr().out


def test_no_uncontended_gap_keeps_entry_and_exit(tmp_path):
    Y.make_recording(tmp_path / "r", "long", 40, 1, 2, None, _made_with())
    kv = C.kernel_view(R.load(tmp_path / "r"))
    est = C.direct_estimates(kv)
    est["busy_ns"] = None
    p, notes = C.initial_params(kv, est)
    assert p.costs["vm_entry_ns"] == COST_DEFAULTS["vm_entry_ns"]
    assert any("no uncontended gap" in n for n in notes)


def test_sim_placement_from_the_recording():
    base = {"vcpus": 3, "host_cpus": 2, "host_cpu_ids": [0, 1]}
    pinned = {**base, "pinning": {"vcpus": [0, 1, 0], "injector": 1, "enabled": True}}
    assert C.sim_placement(pinned) == {"vm": "pinned", "vcpus": None, "injector": 1}
    other = {**base, "pinning": {"vcpus": [1, 0, 1], "injector": 0, "enabled": True}}
    assert C.sim_placement(other) == {"vm": "pinned", "vcpus": [1, 0, 1], "injector": 0}
    unpinned = {**base, "pinning": {"vcpus": [-1] * 3, "injector": -1, "enabled": False}}
    assert C.sim_placement(unpinned) == {"vm": "all", "vcpus": None, "injector": "all"}
    assert C.sim_placement({**pinned, "pinned": False})["vm"] == "all"
    # the recorder's CPU ids (allowed CPUs 2 and 3) become the model's 0 and 1
    ids = {**base, "host_cpu_ids": [2, 3], "threads": [
        {"tid": 1, "role": "vcpu", "vcpu": 0, "cpu": 3},
        {"tid": 2, "role": "vcpu", "vcpu": 1, "cpu": 2},
        {"tid": 3, "role": "vcpu", "vcpu": 2, "cpu": 3},
        {"tid": 4, "role": "injector", "vcpu": None, "cpu": 2}]}
    assert C.sim_placement(ids) == {"vm": "pinned", "vcpus": [1, 0, 1], "injector": 0}


def test_polling_off_calibrates_without_a_delivery_measurement(tmp_path):
    """KVM_CAP_HALT_POLL 0: no halt ends in a successful poll, so interrupt delivery
    cannot be read off the recording; calibration keeps the fallback, never a
    negative duration (a halt that ended before its send was stamped is no
    measurement of delivery)."""
    Y.make_recording(tmp_path / "c0", "mixed", 200, 1, 2, 0, _made_with())
    kv = C.kernel_view(R.load(tmp_path / "c0"))
    est = C.direct_estimates(kv)
    assert est["delivery_ns"] is None or est["delivery_ns"] >= 0
    p, notes = C.initial_params(kv, est)
    assert p.delivery_ns >= 0
