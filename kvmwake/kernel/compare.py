"""Kernel and model side by side: ``kvmwake kernel compare DIR``.

Runs the recording's workload in kvmwake (``simulate.py``: x86, the
recording's host CPU count, vCPUs, module parameters and cap, the
calibrated costs from ``DIR/calibration.json``) and prints, kernel against
model:

* the halt stats (binary stats, summed over vCPUs, without each vCPU's
  first halt, which on the kernel spans the harness's start-up);
* the poll/wait split (share of ``kvm_vcpu_wakeup`` lines), overall and per
  vCPU;
* the wait time: median of the halts that waited (trace), and the median of
  ``halt_wait_hist``;
* the wait-time histogram (the 32 log2 buckets of ``halt_wait_hist``);
* wake latency: send to halt end, and host-observed (send to the handler's
  port exit) for wakes that ended a halt, p50/p90/p99 and model/kernel
  ratios;
* the replay of the kernel trace through the halt-poll rule;
* where the recording has the scheduler's tracepoints, the preemption and
  migration rates of the kernel's scheduler trace and of the model's thread
  timeline (``kvmwake.kernel.schedtrace``).

The acceptance line checks every "Done when" criterion of issue 14
(``CRITERIA``): the poll/wait split within 5 points pooled and on every vCPU;
the median wait within 15 %; the send-to-halt-end latency's p90 within 25 %
and p99 within 40 %; ``halt_successful_poll`` and ``halt_wakeup`` within
10 % (where either side counts at least ``STAT_MIN_COUNT``); the preemption
and migration rates within 10 points of the kernel's
scheduler trace; the replay clean.  A criterion the recording cannot show
(no trace, no scheduler trace) is "not checked"; a recording its calibration
found saturated is "saturated, not scored" (``calibrate.py``).

It also writes ``DIR/compare.json`` and ``DIR/compare.png`` (both
histograms, and the latency distributions).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from ..haltpoll import HaltPollParams
from . import analysis as A
from . import calibrate as C
from . import schedtrace as ST
from .recording import Recording, RecordingError, vcpu_pack, write_json
from .replay import replay
from .simulate import SimParams, Setup

#: Acceptance bounds of the issue.
SPLIT_BOUND_PP = 5.0
WAIT_BOUND = 0.15
P90_BOUND = 0.25
P99_BOUND = 0.40
STAT_BOUND = 0.10
SCHED_BOUND_PP = 10.0
#: A scheduler rate is checked where both sides have at least this many samples (wake-ups
#: of the role pair, pairs of consecutive run periods): below, one event moves it by
#: more than a few points.  Checked: the preemption rate of each of
#: ``schedtrace.ROLE_PAIRS`` and the pooled migration rate (per vCPU: printed).
SCHED_MIN_SAMPLES = 20
#: ``halt_successful_poll`` and ``halt_wakeup`` are checked where either side counts at
#: least this many: below it on both sides the count is noise (0 against 1 is not a
#: 100 % miss), and the criterion is "not checked".
STAT_MIN_COUNT = 20

#: The acceptance criteria, in the order printed: (key in the verdict, label, bound).
CRITERIA = (
    ("split", "poll/wait split, pooled", f"{SPLIT_BOUND_PP:g} pp"),
    ("split_per_vcpu", "poll/wait split, worst vCPU", f"{SPLIT_BOUND_PP:g} pp"),
    ("median_wait", "median wait", f"{100 * WAIT_BOUND:g} %"),
    ("p90", "send -> halt end p90", f"{100 * P90_BOUND:g} %"),
    ("p99", "send -> halt end p99", f"{100 * P99_BOUND:g} %"),
    ("halt_successful_poll", "halt_successful_poll", f"{100 * STAT_BOUND:g} %"),
    ("halt_wakeup", "halt_wakeup", f"{100 * STAT_BOUND:g} %"),
    ("preemption", "preemption rate", f"{SCHED_BOUND_PP:g} pp"),
    ("migration", "migration rate", f"{SCHED_BOUND_PP:g} pp"),
    ("replay", "replay of the kernel trace", "0 mismatches"),
)
SATURATED = "saturated, not scored"

COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


def params_of(rec: Recording) -> HaltPollParams:
    mp = rec.module_params
    return HaltPollParams(
        halt_poll_ns=int(mp["halt_poll_ns"]),
        **{k: int(mp[k]) for k in ("halt_poll_ns_grow", "halt_poll_ns_grow_start",
                                   "halt_poll_ns_shrink") if k in mp})


def replay_recording(rec: Recording):
    """Replay the kernel trace with the recording's module parameters and cap."""
    if not rec.traced:
        return None
    pids = set(rec.pid_to_vcpu())
    events = [e for e in rec.events if e.pid in pids]
    return replay(events, params_of(rec), rec.cap)


def _drop_first_halts(stats: dict, h: A.Halts | None) -> dict:
    """Remove each vCPU's first halt (no poll: all of it was wait) from summed stats."""
    if h is None:
        return stats
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}
    for ns, waited in zip(h.ns[h.first], h.waited[h.first]):
        if not waited:
            continue
        b = min(int(ns).bit_length(), 31)
        if out["halt_wait_hist"][b] > 0:
            out["halt_wait_hist"][b] -= np.uint64(1)
            out["halt_wait_ns"] -= int(ns)
    return out


def sim_params(cal: dict, scheduler: str | None = None, host_rules: str | None = None):
    """(SimParams, port_exit_ns) of a calibration, its host scheduler replaced by
    ``scheduler`` when given ("eevdf" | "fifo": ``compare --scheduler``), its host
    kernel's rules by ``host_rules`` (``compare --host-rules``)."""
    params, port_exit = C.load_params(cal)
    over = {k: v for k, v in (("scheduler", scheduler), ("host_rules", host_rules))
            if v is not None}
    if over:
        params = SimParams.from_dict({**params.to_dict(), **over})
    return params, port_exit


def recording_info(rec: Recording) -> dict:
    """What a comparison says of the recording it scores."""
    return {"path": str(rec.path), "workload": rec.meta["workload"]["canonical"],
            "named": rec.meta["workload"].get("named"),
            "wakes": rec.meta["workload"]["wakes"], "vcpus": rec.nvcpus,
            "host_cpus": rec.meta["host_cpus"], "halt_poll_cap": rec.cap,
            "module_halt_poll_ns": rec.module_params.get("halt_poll_ns"),
            "kernel": rec.meta["kernel"]["release"], "date": rec.meta.get("date"),
            "traced": rec.traced, "trace_mode": rec.meta["trace"],
            "vcpu_pack": vcpu_pack(rec.meta)}


def run(rec: Recording, cal: dict | None = None, seed: int = 0,
        scheduler: str | None = None, host_rules: str | None = None) -> dict:
    """Simulate ``rec``'s workload with its calibration (with ``scheduler`` and
    ``host_rules`` instead of the calibration's, if given); returns every compared
    figure."""
    if cal is None:
        if rec.calibration is None:
            raise RecordingError(f"{rec.path}: no calibration.json; run 'kvmwake kernel "
                                 f"calibrate {rec.path}' first")
        cal = rec.calibration
    params, port_exit = sim_params(cal, scheduler, host_rules)
    kv = C.kernel_view(rec)
    setup = Setup.from_recording(rec)
    r, h, wk, sfig = C.sim_view(setup, params, port_exit, seed=seed,
                                host_costs=C.sim_costs(cal))
    if not rec.traced:
        sfig = C.stats_only_figures(r.stats)
    kfig = kv.figures
    kstats = _drop_first_halts(kfig["stats"], kv.halts)
    sstats = _drop_first_halts(sfig["stats"], h)
    rp = replay_recording(rec)
    sim_rp = replay(r.events, params_of(rec), rec.cap)
    out = {
        "recording": recording_info(rec),
        "params": params.to_dict(),
        "port_exit_ns": port_exit,
        "kernel": _jsonable(kfig, kstats),
        "model": _jsonable(sfig, sstats),
        "replay": rp.to_dict() if rp is not None else None,
        "model_replay": {"matched": sim_rp.matched, "mismatched": sim_rp.mismatched},
        "harness": rec.meta.get("harness"),
        "notes": list(rec.notes) + list(cal.get("notes", [])),
        "sched": sched_rates(kv, r),
        "saturated": bool(cal.get("saturated")),
        "saturated_reason": cal.get("saturated_reason"),
    }
    out["verdict"] = verdict(out)
    return out


def kernel_vs_kernel(a: Recording, b: Recording) -> dict:
    """Recording ``b``'s kernel scored as if it were the model of recording ``a``: the
    same configuration and seed recorded twice, the same figures and ``verdict`` as
    ``run``.  Each acceptance criterion then reads against the kernel's own spread
    from one recording to the next: a bound the kernel misses against itself is
    one no model can be held to on a single recording."""
    ra, rb = a.meta["workload"], b.meta["workload"]
    for key, x, y in (("workload", ra["canonical"], rb["canonical"]),
                      ("wakes", ra["wakes"], rb["wakes"]), ("vCPUs", a.nvcpus, b.nvcpus),
                      ("host CPUs", a.meta["host_cpus"], b.meta["host_cpus"]),
                      ("halt-poll ceiling", a.cap, b.cap)):
        if x != y:
            raise RecordingError(f"{b.path} is not a second recording of {a.path}: its {key} "
                                 f"is {y!r}, not {x!r}")
    ka, kb = C.kernel_view(a), C.kernel_view(b)
    traced = a.traced and b.traced
    fa, fb = ka.figures, kb.figures
    if not traced:
        fa, fb = C.stats_only_figures(a.vcpu_stats()), C.stats_only_figures(b.vcpu_stats())
    rp = replay_recording(b)
    cal = a.calibration or {}
    out = {
        "recording": {**recording_info(a), "traced": traced},
        "against": {"path": str(b.path), "date": b.meta.get("date")},
        "kernel": _jsonable(fa, _drop_first_halts(fa["stats"], ka.halts if traced else None)),
        "model": _jsonable(fb, _drop_first_halts(fb["stats"], kb.halts if traced else None)),
        "replay": rp.to_dict() if rp is not None else None,
        "sched": sched_rates(ka, kb),
        "saturated": bool(cal.get("saturated")),
        "saturated_reason": cal.get("saturated_reason"),
    }
    out["verdict"] = verdict(out)
    return out


# ---------------------------------------------------------------- scheduler rates

def rate_values(trace: ST.SchedTrace, host_cpus: int | None = None) -> dict:
    """A trace's rates as compare checks and prints them (``schedtrace.figures``):
    ``{"preemption": {pair: {"rate", "n"}}, "migration": {"pooled" | "vCPU i":
    {"rate", "n"}}}``, ``n`` the wake-ups (pairs of consecutive run periods) a rate is
    the share of; a rate without any is left out.  With ``host_cpus``, also
    ``"placement": {"onto busy": {"rate", "n"}}`` (``schedtrace.busy_landing_rate``;
    printed, not an acceptance criterion)."""
    f = ST.figures(trace)
    pre = {pair: {"rate": x["rate"], "n": x["wakeups"]}
           for pair, x in f["preemption"].items() if x["wakeups"]}
    mig = {"pooled": {"rate": f["migration"]["pooled"]["rate"],
                      "n": f["migration"]["pooled"]["periods"]}}
    mig.update({f"vCPU {r['vcpu']}": {"rate": r["rate"], "n": r["periods"]}
                for r in f["migration"]["per_vcpu"]})
    out = {"preemption": pre,
           "migration": {k: v for k, v in mig.items() if v["n"]}}
    if host_cpus is not None:
        b = ST.busy_landing_rate(trace, host_cpus)
        out["placement"] = {"onto busy": {"rate": b["rate"], "n": b["wakeups"]}} \
            if b["wakeups"] else {}
    return out


def sched_rates(kv, r) -> dict:
    """Kernel and model rates side by side: the recording's scheduler tracepoints
    (``kv.sched``, ``schedtrace.load_sched``) and the simulated host's thread timeline
    (``r.sched``, ``schedtrace.from_timeline``; or, in ``kernel_vs_kernel``, a second
    recording's tracepoints); ``reason`` says why they are missing."""
    if kv.sched is None or r.sched is None:
        return {"kernel": None, "model": None,
                "reason": "the recording has no scheduler trace"}
    ncpu = int(kv.rec.meta["host_cpus"])
    return {"kernel": rate_values(kv.sched, ncpu), "model": rate_values(r.sched, ncpu),
            "reason": None}


def _jsonable(fig: dict, stats: dict) -> dict:
    d = {k: v for k, v in fig.items() if k != "stats"}
    d["stats"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}
    d["stats_wait_median_ns"] = A.hist_median(stats["halt_wait_hist"])
    waits = int(np.asarray(stats["halt_wait_hist"]).sum())
    d["stats_wait_mean_ns"] = stats["halt_wait_ns"] / waits if waits else None
    return d


def _ratio(a, b):
    return None if a in (None, 0) or b is None else b / a


def _within(ratio, bound) -> bool:
    return ratio is not None and abs(ratio - 1) <= bound


def _count_ratio(a, b) -> tuple[float | None, bool | None]:
    """(model/kernel, within STAT_BOUND) for two counts; None (not checked) where both
    are below ``STAT_MIN_COUNT``."""
    if a is None or b is None:
        return None, False
    if max(a, b) < STAT_MIN_COUNT:
        return (b / a if a else None), None
    if a == 0:
        return None, False
    return b / a, abs(b / a - 1) <= STAT_BOUND


def _poll_share(v: dict):
    return 100.0 * v["poll"] / v["halts"] if v["halts"] else None


def verdict(c: dict) -> dict:
    """The acceptance figures (see ``CRITERIA``): each criterion's value, ``<key>_ok``
    (True, False, or None when not checked or not scored) and ``criteria`` (one entry
    per criterion with its status); ``status`` "pass", "fail" or "saturated, not
    scored"; ``pass`` True / False / None."""
    k, m = c["kernel"], c["model"]
    traced = c["recording"]["traced"]
    out: dict = {}
    crit: dict = {}

    def put(key, value, ok, reason=None):
        crit[key] = {"value": value, "ok": ok, "reason": reason}

    # the poll/wait split, pooled and per vCPU
    if k["poll_pct"] is not None and m["poll_pct"] is not None:
        d = m["poll_pct"] - k["poll_pct"]
        out["split_diff_pp"] = d
        out["split_ok"] = abs(d) <= SPLIT_BOUND_PP
        put("split", d, out["split_ok"])
    else:
        put("split", None, None, "no halts")
    if traced and k.get("per_vcpu"):
        diffs = []
        for kv_, mv in zip(k["per_vcpu"], m.get("per_vcpu", [])):
            a, b = _poll_share(kv_), _poll_share(mv)
            diffs.append(None if a is None and b is None else
                         (b - a) if a is not None and b is not None else float("nan"))
        out["split_per_vcpu_pp"] = [None if x is not None and math.isnan(x) else x
                                    for x in diffs]
        real = [x for x in diffs if x is not None]
        if real:
            worst = max(real, key=lambda x: float("inf") if math.isnan(x) else abs(x))
            ok = not math.isnan(worst) and abs(worst) <= SPLIT_BOUND_PP
            out["split_per_vcpu_worst_pp"] = None if math.isnan(worst) else worst
            out["split_per_vcpu_ok"] = ok
            put("split_per_vcpu", out["split_per_vcpu_worst_pp"], ok,
                None if not math.isnan(worst) else "a vCPU halted on one side only")
        else:
            put("split_per_vcpu", None, None, "no vCPU halted")
    else:
        put("split_per_vcpu", None, None, "stats-only recording" if not traced else
            "no per-vCPU halts")
    # the wait time and the latency tails
    kw = k.get("wait_ns", {}).get("p50") if traced else k["stats_wait_median_ns"]
    mw = m.get("wait_ns", {}).get("p50") if traced else m["stats_wait_median_ns"]
    r = _ratio(kw, mw)
    out["median_wait_ratio"] = r
    out["median_wait_ok"] = _within(r, WAIT_BOUND)
    put("median_wait", r, out["median_wait_ok"])
    for q, bound in (("p90", P90_BOUND), ("p99", P99_BOUND)):
        if traced:
            r = _ratio(k["wake_to_halt_end_ns"][q], m["wake_to_halt_end_ns"][q])
            out[f"{q}_ratio"] = r
            out[f"{q}_ok"] = _within(r, bound)
            put(q, r, out[f"{q}_ok"])
        else:
            put(q, None, None, "stats-only recording")
    # the halt stats
    for name in ("halt_successful_poll", "halt_wakeup"):
        r, ok = _count_ratio(k["stats"].get(name), m["stats"].get(name))
        out[f"{name}_ratio"] = r
        out[f"{name}_ok"] = ok
        put(name, r, ok, None if ok is not None else
            f"fewer than {STAT_MIN_COUNT} on both sides")
    # the scheduler's rates
    sc = c.get("sched") or {"kernel": None, "model": None,
                            "reason": "the recording has no scheduler trace"}
    for name in ("preemption", "migration"):
        if sc.get("kernel") is None or sc.get("model") is None:
            put(name, None, None, sc.get("reason"))
            continue
        ka, ma = sc["kernel"][name], sc["model"][name]
        keys = ST.ROLE_PAIRS if name == "preemption" else ("pooled",)
        both = [x for x in keys if x in ka and x in ma
                and min(ka[x]["n"], ma[x]["n"]) >= SCHED_MIN_SAMPLES]
        if not both:
            put(name, None, None, f"no rate with {SCHED_MIN_SAMPLES} samples on both sides")
            continue
        diffs = {x: 100.0 * (ma[x]["rate"] - ka[x]["rate"]) for x in both}
        worst = max(diffs.values(), key=abs)
        out[f"{name}_diff_pp"] = diffs
        out[f"{name}_ok"] = abs(worst) <= SCHED_BOUND_PP
        put(name, worst, out[f"{name}_ok"])
    # the replay
    rp = c["replay"]
    if rp is not None:
        out["replay_ok"] = rp["mismatched"] == 0
        put("replay", rp["mismatched"], out["replay_ok"])
    else:
        put("replay", None, None, "stats-only recording")
    # the outcome
    sat = bool(c.get("saturated"))
    out["saturated"] = sat
    out["criteria"] = []
    for key, label, bound in CRITERIA:
        e = crit[key]
        if sat:
            status, e["ok"] = SATURATED, None
        elif e["ok"] is None:
            status = "not checked"
        else:
            status = "met" if e["ok"] else "missed"
        out["criteria"].append({"name": key, "label": label, "bound": bound,
                                "value": e["value"], "status": status, "reason": e["reason"]})
    if sat:
        for key in list(out):
            if key.endswith("_ok"):
                out[key] = None
        out["status"], out["pass"] = SATURATED, None
        out["saturated_reason"] = c.get("saturated_reason")
    else:
        checked = [e for e in out["criteria"] if e["status"] in ("met", "missed")]
        out["pass"] = all(e["status"] == "met" for e in checked)
        out["status"] = "pass" if out["pass"] else "fail"
        out["missed"] = [e["name"] for e in checked if e["status"] == "missed"]
        out["not_checked"] = [e["name"] for e in out["criteria"]
                              if e["status"] == "not checked"]
    return out


# ---------------------------------------------------------------- printing

def _us(ns) -> str:
    return "-" if ns is None else f"{ns / 1000:,.1f} us"


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.1f}"
    return f"{x:,}"


def _rat(a, b) -> str:
    r = _ratio(a, b)
    return "-" if r is None else f"{r:.2f}"


def print_report(c: dict, out=None) -> None:
    w = (out or sys.stdout).write
    rc = c["recording"]
    k, m = c["kernel"], c["model"]
    cap = rc["halt_poll_cap"]
    w(f"kernel vs model: {rc['wakes']} wakes of {rc['workload']} on {rc['vcpus']} vCPU(s), "
      f"{rc['host_cpus']} host CPUs, KVM_CAP_HALT_POLL {'not set' if cap is None else cap} "
      f"(module halt_poll_ns {rc['module_halt_poll_ns']}), kernel {rc['kernel']}\n")
    if not rc["traced"]:
        w(f"  stats-only recording ({rc['trace_mode'].get('reason')}): no trace figures, no "
          f"replay\n")
    p = c["params"]
    co = p["costs"]
    w(f"  model costs: wake_to_run {co['wake_to_run_ns']} ns, context_switch "
      f"{co['context_switch_ns']} ns, vm_entry {co['vm_entry_ns']} ns, vm_exit "
      f"{co['vm_exit_ns']} ns, handler {p['handler_ns']} ns, delivery {p['delivery_ns']} ns "
      f"(arrivals: {p['arrivals']}, scheduler: {p.get('scheduler', 'eevdf')})\n\n")
    rows = [("", "kernel", "model", "model/kernel")]
    if rc["traced"]:
        rows.append(("halts (kvm_vcpu_wakeup lines)", _num(k["halts"]), _num(m["halts"]),
                     _rat(k["halts"], m["halts"])))
    rows.append(("poll / wait split",
                 f"{k['poll_pct']:.1f} / {k['wait_pct']:.1f} %" if k["poll_pct"] is not None
                 else "-",
                 f"{m['poll_pct']:.1f} / {m['wait_pct']:.1f} %" if m["poll_pct"] is not None
                 else "-",
                 f"{m['poll_pct'] - k['poll_pct']:+.1f} pp"
                 if k["poll_pct"] is not None and m["poll_pct"] is not None else "-"))
    for kv, mv in zip(k.get("per_vcpu", []), m.get("per_vcpu", [])):
        kp = 100 * kv["poll"] / kv["halts"] if kv["halts"] else 0
        mp = 100 * mv["poll"] / mv["halts"] if mv["halts"] else 0
        rows.append((f"  vCPU {kv['vcpu']} poll share", f"{kp:.1f} %", f"{mp:.1f} %",
                     f"{mp - kp:+.1f} pp"))
    if rc["traced"]:
        rows.append(("median wait (halts that waited)", _us(k["wait_ns"]["p50"]),
                     _us(m["wait_ns"]["p50"]), _rat(k["wait_ns"]["p50"], m["wait_ns"]["p50"])))
    rows.append(("median of halt_wait_hist", _us(k["stats_wait_median_ns"]),
                 _us(m["stats_wait_median_ns"]),
                 _rat(k["stats_wait_median_ns"], m["stats_wait_median_ns"])))
    rows.append(("mean wait (halt_wait_ns / waits)", _us(k["stats_wait_mean_ns"]),
                 _us(m["stats_wait_mean_ns"]),
                 _rat(k["stats_wait_mean_ns"], m["stats_wait_mean_ns"])))
    if rc["traced"]:
        for label, key in (("send -> halt end", "wake_to_halt_end_ns"),
                           ("  halts that waited", "wake_to_halt_end_ns_wait"),
                           ("  halts that polled", "wake_to_halt_end_ns_poll"),
                           ("host-observed, halted wakes", "host_latency_halted_ns")):
            for q in ("p50", "p90", "p99"):
                a, b = k[key][q], m[key][q]
                rows.append((f"{label} {q}" if q == "p50" else f"{'':<{len(label)}} {q}",
                             _us(a), _us(b), _rat(a, b)))
    hl = k.get("host_latency_all_ns", {})
    if hl.get("n"):
        rows.append(("host-observed, all wakes p50/p99",
                     f"{_us(hl['p50'])} / {_us(hl['p99'])}", "(not modelled)", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        w("  " + r[0].ljust(widths[0]) + "  " + "  ".join(r[i].rjust(widths[i])
                                                          for i in (1, 2, 3)) + "\n")
    w("\nhalt stats (binary stats, sum over vCPUs, each vCPU's first halt left out)\n")
    for name in ("halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid",
                 "halt_wakeup", "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns",
                 "halt_exits"):
        a, b = k["stats"].get(name), m["stats"].get(name)
        w(f"  {name:<24}{_num(a):>16}{_num(b):>16}{_rat(a, b):>10}\n")
    w("\nwait-time histogram (halt_wait_hist, log2 buckets)\n")
    kh, mh = np.asarray(k["stats"]["halt_wait_hist"]), np.asarray(m["stats"]["halt_wait_hist"])
    nz = np.nonzero(kh + mh)[0]
    for b in range(nz.min(), nz.max() + 1) if nz.size else []:
        lo = 0 if b == 0 else 1 << (b - 1)
        w(f"  [{_bucket(lo):>7}, {_bucket(1 << b) if b < 31 else 'inf':>7})  "
          f"{int(kh[b]):>7}  {int(mh[b]):>7}\n")
    rp = c["replay"]
    if rp is not None:
        w(f"\nreplay of the kernel trace: {rp['recorded_lines']} kvm_halt_poll_ns lines, "
          f"{rp['matched']} matched, {rp['mismatched']} mismatched "
          f"(ceiling {rp['max_halt_poll_ns']} ns)\n")
    v = c["verdict"]
    sc = c.get("sched") or {}
    if sc.get("kernel") is not None:
        w("\nscheduler (shares of wake-ups / of consecutive run periods; samples)\n")
        for name in ("preemption", "migration", "placement"):
            if name not in sc["kernel"]:
                continue                        # a comparison saved before it was kept
            ka, ma = sc["kernel"][name], (sc.get("model") or {}).get(name, {})
            for x in sorted(set(ka) | set(ma)):
                a, b = ka.get(x), ma.get(x)
                d = "" if a is None or b is None else f"{100 * (b['rate'] - a['rate']):+9.1f} pp"
                w(f"  {name} {x:<16}{_rate(a):>18}{_rate(b):>18}{d}\n")
    w("\nacceptance: ")
    parts = []
    if "split_diff_pp" in v:
        parts.append(f"split {v['split_diff_pp']:+.1f} pp "
                     f"({_met(v['split_ok'])}, bound 5)")
    if v["median_wait_ratio"] is not None:
        parts.append(f"median wait x{v['median_wait_ratio']:.2f} "
                     f"({_met(v['median_wait_ok'])}, bound 15 %)")
    if "replay_ok" in v and v["replay_ok"] is not None:
        parts.append(f"replay {'clean' if v['replay_ok'] else 'MISMATCHES'}")
    w("; ".join(parts) + "\n")
    print_criteria(v, w)
    for n in c["notes"]:
        w(f"note: {n}\n")


def _met(ok) -> str:
    return "not scored" if ok is None else "met" if ok else "MISSED"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _rate(x) -> str:
    """A scheduler rate ``{"rate", "n"}`` as printed: share and samples."""
    return "-" if x is None else f"{_pct(x['rate'])} ({x['n']})"


def criterion_value(e: dict) -> str:
    """A criterion's value as printed: pp differences signed, ratios as xR."""
    v = e["value"]
    if v is None:
        return "-"
    if e["name"] in ("split", "split_per_vcpu", "preemption", "migration"):
        return f"{v:+.1f} pp"
    if e["name"] == "replay":
        return f"{v} mismatched"
    return f"x{v:.2f}"


def print_criteria(v: dict, w) -> None:
    """Every criterion of the acceptance line, one a line, then the outcome."""
    rows = [(e["label"], criterion_value(e), e["bound"],
             e["status"] + (f" ({e['reason']})" if e["status"] == "not checked"
                            and e["reason"] else ""))
            for e in v["criteria"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        w(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  bound {r[2]:<{widths[2]}}  {r[3]}\n")
    if v["status"] == SATURATED:
        w(f"outcome: {SATURATED} ({v.get('saturated_reason')})\n")
    else:
        missed = v["missed"]
        w(f"outcome: {'PASS' if v['pass'] else 'FAIL'}"
          f"{'' if not missed else ' (missed: ' + ', '.join(missed) + ')'}"
          f"{'' if not v['not_checked'] else '; not checked: ' + ', '.join(v['not_checked'])}"
          f"\n")


def _bucket(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.2g}s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3g}ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.3g}us"
    return f"{ns}ns"


# ---------------------------------------------------------------- the picture

def write_png(c: dict, path: Path, kernel_lat=None, model_lat=None) -> str:
    """Both wait-time histograms (and the latency distributions); returns the backend."""
    kh = np.asarray(c["kernel"]["stats"]["halt_wait_hist"], dtype=float)
    mh = np.asarray(c["model"]["stats"]["halt_wait_hist"], dtype=float)
    rc = c["recording"]
    ceiling = (f"module halt_poll_ns {rc['module_halt_poll_ns']}" if rc["halt_poll_cap"] is None
               else f"KVM_CAP_HALT_POLL {rc['halt_poll_cap']}")
    title = (f"{rc.get('named') or rc['workload']} idle, {rc['vcpus']} vCPU(s), {ceiling}: "
             f"kernel vs model")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .png import bar_chart
        bar_chart(path, kh, mh, ("kernel", "model"), title)
        return "builtin"
    nz = np.nonzero(kh + mh)[0]
    lo, hi = (int(nz.min()), int(nz.max()) + 1) if nz.size else (0, 32)
    ncols = 2 if kernel_lat is not None and len(kernel_lat) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    x = np.arange(lo, hi)
    ax.bar(x - 0.2, kh[lo:hi], width=0.4, label="kernel", color="#1f77b4")
    ax.bar(x + 0.2, mh[lo:hi], width=0.4, label="model", color="#ff7f0e")
    ax.set_xticks(x)
    ax.set_xticklabels([_bucket(1 << (b - 1)) if b else "0" for b in x], rotation=60,
                       fontsize=7)
    ax.set_xlabel("halt_wait_hist bucket (lower bound)")
    ax.set_ylabel("halts")
    ax.set_title("wait time (halt_wait_hist)")
    ax.legend()
    if ncols == 2:
        ax = axes[0][1]
        for data, label, col in ((kernel_lat, "kernel", "#1f77b4"),
                                 (model_lat, "model", "#ff7f0e")):
            d = np.sort(np.asarray(data, dtype=float)) / 1000
            if d.size:
                ax.step(d, np.arange(1, d.size + 1) / d.size, where="post", label=label,
                        color=col)
        ax.set_xscale("log")
        ax.set_xlabel("send -> halt end (us)")
        ax.set_ylabel("fraction of halts")
        ax.set_title("wake latency")
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def latencies(rec: Recording, cal: dict, seed: int = 0, scheduler: str | None = None,
              host_rules: str | None = None):
    """Per-halt send-to-halt-end latencies, kernel and model (for the picture)."""
    kv = C.kernel_view(rec)
    params, port_exit = sim_params(cal, scheduler, host_rules)
    r, h, wk, _ = C.sim_view(Setup.from_recording(rec), params, port_exit, seed=seed,
                             host_costs=C.sim_costs(cal))
    out = []
    for hh, ww, send in ((kv.halts, kv.waker, rec.wakes["sent_ns"]), (h, wk, r.send_ns)):
        if hh is None:
            out.append(np.zeros(0))
            continue
        ok = (ww >= 0) & ~hh.first
        out.append(hh.end[ok] - send[ww[ok]])
    return out


def compare_dir(rec: Recording, png: bool = True, seed: int = 0,
                scheduler: str | None = None, host_rules: str | None = None) -> dict:
    c = run(rec, seed=seed, scheduler=scheduler, host_rules=host_rules)
    write_json(rec.path / COMPARE_JSON, c)
    if png:
        klat, mlat = (latencies(rec, rec.calibration, seed, scheduler, host_rules)
                      if rec.traced else (None, None))
        c["png"] = str(rec.path / COMPARE_PNG)
        c["png_backend"] = write_png(c, rec.path / COMPARE_PNG, klat, mlat)
    return c


def table_row(c: dict) -> dict:
    """One row of the results table."""
    k, m, v = c["kernel"], c["model"], c["verdict"]
    rc = c["recording"]
    row = {"workload": rc.get("named") or rc["workload"], "vcpus": rc["vcpus"],
           "cap": rc["halt_poll_cap"], "wakes": rc["wakes"],
           "k_poll": k["poll_pct"], "m_poll": m["poll_pct"],
           "split_pp": v.get("split_diff_pp"),
           "k_wait": k.get("wait_ns", {}).get("p50"), "m_wait": m.get("wait_ns", {}).get("p50"),
           "wait_ratio": v["median_wait_ratio"]}
    for q in ("p50", "p90", "p99"):
        a = k.get("wake_to_halt_end_ns", {}).get(q)
        b = m.get("wake_to_halt_end_ns", {}).get(q)
        row[f"k_{q}"], row[f"m_{q}"], row[f"r_{q}"] = a, b, _ratio(a, b)
    rp = c["replay"]
    row["replay"] = None if rp is None else (rp["matched"], rp["mismatched"])
    row["criteria"] = v.get("criteria", [])
    row["status"] = v.get("status")
    return row


def dumps(c: dict) -> str:
    def default(o):
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return None if math.isnan(o) else float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(type(o).__name__)
    return json.dumps(c, indent=2, default=default)
