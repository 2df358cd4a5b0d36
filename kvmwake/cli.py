"""The ``kvmwake`` command line.

    kvmwake run [SCENARIO] [--vcpus N] [--host-cpus N] [--sim-ms MS] [--seed S]
                [--engine core|reference] [--json PATH] [--trace PATH]
    kvmwake scenarios
    kvmwake kernel record|calibrate|compare ...    (see kvmwake.kernel)
    kvmwake kernel replay TRACE --halt-poll-ns N [--grow G] [--grow-start S] [--shrink K] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__
from . import scenarios as _scenarios
from . import snapshot as _snapshot
from . import stats as _stats
from .errors import EngineError, KvmError, ProgramError, ScenarioError, SnapshotError
from .kernel.cli import build_parser as _kernel_parser
from .kernel.cli import run as _kernel_run
from .kernel.replay import build_parser as _replay_parser
from .kernel.replay import run as _replay_run
from .model import STAT_COUNTERS


def _positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must not be negative")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmwake", description=(
        "A fast, deterministic model of how Linux KVM halts, polls, blocks and wakes vCPUs."))
    p.add_argument("--version", action="version", version=f"kvmwake {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a built-in scenario and print its halt stats")
    r.add_argument("scenario", nargs="?", default="default",
                   help="built-in scenario (see 'kvmwake scenarios'; default: %(default)s)")
    r.add_argument("--vcpus", type=_positive_int, help="total vCPUs (scenario default if omitted)")
    r.add_argument("--host-cpus", type=_positive_int, help="host CPUs")
    r.add_argument("--sim-ms", type=_positive_float, help="virtual time to simulate, ms")
    r.add_argument("--seed", type=_nonneg_int, default=0, help="seed (default: %(default)s)")
    r.add_argument("--engine", choices=("core", "reference"), default="core",
                   help="simulation engine (default: %(default)s)")
    r.add_argument("--json", metavar="PATH", help="write the summary as JSON ('-' for stdout)")
    r.add_argument("--trace", metavar="PATH",
                   help="write kvm_vcpu_wakeup / kvm_halt_poll_ns lines of VM 0 in the kernel's text")
    r.add_argument("--trace-capacity", type=_nonneg_int, default=1 << 20,
                   help="tracepoint records kept with --trace (newest; default: %(default)s)")
    r.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    r.add_argument("--snapshot-at", type=_positive_float, metavar="MS",
                   help="save a snapshot at this virtual time (ms; with --snapshot)")
    r.add_argument("--snapshot", metavar="PATH", help="where --snapshot-at writes the snapshot")
    r.add_argument("--restore", metavar="PATH",
                   help="continue the run saved in a snapshot (to its --sim-ms end, or "
                        "to --sim-ms if given)")

    sub.add_parser("scenarios", help="list the built-in scenarios")

    k = sub.add_parser("kernel", help="record, calibrate against, compare with and replay "
                                      "the real kernel")
    ksub = k.add_subparsers(dest="kernel_command", required=True)
    rp = ksub.add_parser("replay", help="replay a recorded trace through the halt-poll rule")
    _replay_parser(rp)
    _kernel_parser(ksub)
    return p


def run_scenario(args) -> dict:
    sim_ns = None if args.sim_ms is None else int(round(args.sim_ms * 1_000_000))
    trace_cap = args.trace_capacity if args.trace else 0
    if (args.snapshot_at is None) != (args.snapshot is None):
        raise ValueError("--snapshot-at and --snapshot go together")
    t0 = time.perf_counter()
    if args.restore:
        host, header = _snapshot.restore_host(args.restore)
        run = header.get("run") or {}
        name = run.get("scenario", "?")
        if sim_ns is None:
            sim_ns = run.get("sim_ns")
            if not isinstance(sim_ns, int):
                raise ValueError(f"{args.restore}: the snapshot names no end time; give --sim-ms")
        args.seed, args.engine = host.seed, host.engine_name
        start_events, start_halts = host.events, host.halts
    else:
        host, sim_ns, sc = _scenarios.build(args.scenario, vcpus=args.vcpus,
                                            host_cpus=args.host_cpus, sim_ns=sim_ns,
                                            seed=args.seed, engine=args.engine,
                                            trace_capacity=trace_cap)
        name = sc.name
        start_events = start_halts = 0
    if sim_ns < host.now:
        raise ValueError(f"the run ends at {sim_ns} ns, before the snapshot's {host.now} ns")
    t1 = time.perf_counter()
    if args.snapshot_at is not None:
        at = int(round(args.snapshot_at * 1_000_000))
        if not host.now <= at <= sim_ns:
            raise ValueError(f"--snapshot-at {args.snapshot_at} ms is outside the run")
        host.run(at)
        data = _snapshot.host_to_bytes(host, run={"scenario": name, "sim_ns": sim_ns})
        with open(args.snapshot, "wb") as fh:
            fh.write(data)
    host.run(sim_ns)
    wall = time.perf_counter() - t1
    rows = [vm.stats_array() for vm in host.vms]
    import numpy as np
    allrows = np.concatenate(rows)
    stats = _stats.sum_rows(allrows, host.arch)
    lat = _stats.latency_percentiles(host.latency_histogram())
    summary = {
        "scenario": name, "arch": host.arch, "engine": args.engine, "seed": args.seed,
        "vcpus": int(allrows.shape[0]), "vms": len(host.vms), "host_cpus": host.host_cpus,
        "sim_ns": sim_ns, "build_s": t1 - t0, "wall_s": wall,
        "events": host.events, "halts": host.halts,
        "halts_per_s": (host.halts - start_halts) / wall if wall > 0 else None,
        "events_per_s": (host.events - start_events) / wall if wall > 0 else None,
        "wake_latency_ns": lat,
        "stats": _stats.to_jsonable(stats),
        "exits": sum(vm.exits for vm in host.vms),
    }
    vmm = _vmm_summary(host)
    if vmm:
        summary["vmm"] = vmm
    if args.trace:
        with open(args.trace, "w") as fh:
            fh.write(host.vms[0].trace_text())
        summary["trace"] = args.trace
    return summary


def _vmm_summary(host) -> dict:
    """The VMM policies' counters summed over the VMs, and resume latencies."""
    import numpy as np
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


def print_summary(s: dict, out=None) -> None:
    out = out or sys.stdout
    st = s["stats"]
    w = out.write
    w(f"kvmwake run {s['scenario']}: {s['vcpus']} {s['arch']} vCPUs in {s['vms']} VM(s) on "
      f"{s['host_cpus']} host CPUs, seed {s['seed']}, engine {s['engine']}\n\n")
    w("halt stats (sum over vCPUs)\n")
    for name in STAT_COUNTERS + (("wfi_exit_stat",) if s["arch"] == "arm64" else ("halt_exits",)):
        w(f"  {name:<24} {st[name]:>16,}\n")
    halts = s["halts"]
    if halts:
        polled = st["halt_successful_poll"]
        w(f"  {'poll / wait split':<24} {100 * polled / halts:>15.1f}% polled, "
          f"{100 * (halts - polled) / halts:.1f}% waited or immediate\n")
    lat = s["wake_latency_ns"]
    w("\nwake latency (wake-up to guest entry, ns)\n")
    if lat["count"]:
        w(f"  p50 {lat['p50']:,}  p90 {lat['p90']:,}  p99 {lat['p99']:,}  max {lat['max']:,}"
          f"  ({lat['count']:,} wake-ups)\n")
    else:
        w("  no wake-ups\n")
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
    if s.get("trace"):
        w(f"  trace of VM 0 written to {s['trace']}\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "scenarios":
            for name in _scenarios.names():
                print(f"{name:<12} {_scenarios.get(name).description}")
            return 0
        if args.command == "kernel":
            if args.kernel_command == "replay":
                return _replay_run(args)
            return _kernel_run(args)
        summary = run_scenario(args)
        if args.json:
            text = json.dumps(summary, indent=2, sort_keys=True)
            if args.json == "-":
                print(text)
            else:
                with open(args.json, "w") as fh:
                    fh.write(text + "\n")
        if not args.quiet and args.json != "-":
            print_summary(summary)
        return 0
    except (ScenarioError, ProgramError, KvmError, EngineError, SnapshotError, ValueError,
            TypeError, OSError) as exc:
        print(f"kvmwake: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvmwake: interrupted", file=sys.stderr)
        return 130
