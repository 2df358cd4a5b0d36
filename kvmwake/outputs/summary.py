"""The summary of ``kvmwake run``: one dict, written as JSON and printed as text.

``summarize(host, ...)`` reads a run's results off the host: halt stats
summed over every vCPU (``stats.sum_rows``), wake-latency percentiles, event,
halt and exit counts, rates per wall second, and the VMM policies' counters
(with resume latencies) when the policies keep any.  ``to_json`` is the text
of ``--json`` and ``summary.json``; ``print_summary`` the report printed at the
end of a run.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ..model import STAT_COUNTERS
from . import stats as _stats


def summarize(host, *, scenario: str, scenario_file, engine: str, seed: int, sim_ns: int,
              build_s: float, wall_s: float, start_events: int = 0, start_halts: int = 0,
              interrupted: bool = False) -> dict:
    """The summary of a run of ``host`` to ``sim_ns`` that took ``wall_s`` seconds (after
    ``build_s`` seconds of building); ``start_events`` and ``start_halts`` are the counts
    the run started from (a restored snapshot's), left out of the rates."""
    allrows = host.stats_array(copy=False)     # the engine's rows, read in place
    stats = _stats.sum_rows(allrows, host.arch)
    lat = _stats.latency_percentiles(host.latency_histogram())
    summary = {
        "scenario": scenario, "scenario_file": str(scenario_file) if scenario_file else None,
        "arch": host.arch, "engine": engine, "seed": seed,
        "vcpus": int(allrows.shape[0]), "vms": len(host.vms), "host_cpus": host.host_cpus,
        "sim_ns": sim_ns, "build_s": build_s, "wall_s": wall_s,
        "events": host.events, "halts": host.halts,
        "halts_per_s": (host.halts - start_halts) / wall_s if wall_s > 0 else None,
        "events_per_s": (host.events - start_events) / wall_s if wall_s > 0 else None,
        "wake_latency_ns": lat,
        "stats": _stats.to_jsonable(stats),
        "exits": sum(vm.exits for vm in host.vms),
        "nr_migrations": sum(host.thread_info(g)["nr_migrations"]
                             for g in range(int(allrows.shape[0]))),
        "threads": host.sim_threads,
        "islands": host.islands_used,
    }
    if interrupted:
        summary["interrupted"] = True
    vmm = vmm_summary(host)
    if vmm:
        summary["vmm"] = vmm
    return summary


def vmm_summary(host) -> dict:
    """The VMM policies' counters summed over the VMs, and resume latencies."""
    total: dict = {}
    lat: list = []
    for vm in host.vms:
        counters = getattr(vm.vmm, "counters", None)
        if counters is None:
            continue
        for k, v in counters().items():
            total[k] = total.get(k, 0) + v
        lat += getattr(vm.vmm, "resume_latency_ns", [])
    if total and lat:
        p = np.percentile(np.array(lat, dtype=np.float64), [50, 90, 99], method="lower")
        total["resume_latency_ns"] = {"count": len(lat), "p50": int(p[0]), "p90": int(p[1]),
                                      "p99": int(p[2]), "max": int(max(lat))}
    return total


def to_json(summary: dict) -> str:
    """The summary as the JSON text ``kvmwake run --json`` writes."""
    return json.dumps(summary, indent=2, sort_keys=True)


#: The phases of ``timing`` (``kvmwake run``'s wall time), in order, as printed.
TIMING_NAMES = (("startup_s", "start-up"), ("build_s", "build"), ("run_s", "run"),
                ("summary_s", "summary"), ("outputs_s", "outputs"))


def format_timing(t: dict) -> str:
    """``wall time 14.760 s in all: start-up 0.312 + build 6.236 + run 5.500 +
    summary 0.180 + outputs 2.532 s`` (the phases of the summary's ``timing``)."""
    parts = " + ".join(f"{name} {t[key]:,.3f}" for key, name in TIMING_NAMES if key in t)
    return f"wall time {t['total_s']:,.3f} s in all: {parts} s"


def print_summary(s: dict, out=None) -> None:
    """The report ``kvmwake run`` prints: halt stats, wake latency, VMM policy, speed."""
    out = out or sys.stdout
    st = s["stats"]
    w = out.write
    w(f"kvmwake run {s['scenario']}: {s['vcpus']} {s['arch']} vCPUs in {s['vms']} VM(s) on "
      f"{s['host_cpus']} host CPUs, seed {s['seed']}, engine {s['engine']}\n")
    if s.get("islands"):
        w(f"run as {s['islands']:,} independent islands on {min(s['threads'], s['islands'])} "
          f"thread(s)\n")
    w("\n")
    w("halt stats (sum over vCPUs)\n")
    for name in STAT_COUNTERS + (("wfi_exit_stat",) if s["arch"] == "arm64" else ("halt_exits",)):
        w(f"  {name:<24} {st[name]:>16,}\n")
    halts = s["halts"]
    if halts:
        polled = st["halt_successful_poll"]
        w(f"  {'poll / wait split':<24} {100 * polled / halts:>15.1f}% polled, "
          f"{100 * (halts - polled) / halts:.1f}% waited or immediate\n")
    lat = s["wake_latency_ns"]
    w("\nwake latency (wake-up to guest entry)\n")
    w(f"  {_stats.format_latency(lat)}\n")
    if s.get("vmm"):
        v = s["vmm"]
        w("\nVMM policy (sum over VMs)\n  " + "  ".join(
            f"{k} {v[k]:,}" for k in v if k != "resume_latency_ns") + "\n")
        if "resume_latency_ns" in v:
            r = v["resume_latency_ns"]
            w(f"  resume latency (SUSPEND exit to WAKEUP exit, ns): p50 {r['p50']:,}  "
              f"p90 {r['p90']:,}  p99 {r['p99']:,}  max {r['max']:,}  ({r['count']:,} resumes)\n")
    w(f"\nsimulated {s['sim_ns'] / 1e6:,.3f} ms in {s['wall_s']:.3f} s wall "
      f"(build {s['build_s']:.3f} s)\n")
    w(f"  events {s['events']:,}   halts {halts:,}   exits to userspace {s['exits']:,}\n")
    if s["halts_per_s"] is not None:
        w(f"  {s['halts_per_s']:,.0f} halts per wall second, "
          f"{s['events_per_s']:,.0f} events per wall second\n")
    if s.get("timing"):
        w(f"  {format_timing(s['timing'])}\n")
    if s.get("interrupted"):
        w(f"  interrupted at {s['sim_ns'] / 1e6:,.3f} ms of virtual time: the results cover "
          "the run so far\n")
