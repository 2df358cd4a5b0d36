#!/usr/bin/env python
"""Scaling of the core: ``ipi-storm`` and ``default`` from 1,024 to 65,536 vCPUs.

    python bench/scaling.py [--sizes 1024,4096,16384,65536] [--runs 3]
                            [--threads 1,2] [--one-queue] [--plot docs/scaling.png]
                            [--out FILE]

Each point is run ``--runs`` times, each time in a fresh Python process (so
that ``ru_maxrss``, the peak resident memory, is that run's alone), pinned
to CPU 0 (to CPUs 0..t-1 with ``t`` threads) with BLAS threads held to one.
A host of several islands (VMs on host CPUs of their own: ipi-storm beyond
1,024 vCPUs, default beyond 64) runs them one after another on one thread,
or on ``t`` threads at once (``Host(threads=t)``); ``--one-queue`` adds rows
of the host kept on its one queue (``split_islands=False``), as before
islands.  A run builds the host (not timed),
then times ``host.run`` once.  Reported per point: the median wall time,
halts and events per wall second, ns per halt, the peak RSS of the process,
the engine's state bytes per vCPU (``Engine.state_bytes()``, all of it:
threads, interrupt state, stats rows, heap, CPUs, VMs, distributors) and the
growth of the peak RSS over the process's RSS before the build, per vCPU
(engine state plus the Python objects of the API: ``VM``, ``VCpu``).

The sizes:

* ``ipi-storm``: VMs of at most 1,024 x86 vCPUs (KVM_MAX_VCPUS), so 1, 4,
  16 and 64 VMs; one host CPU per vCPU, as the scenario defines it; the
  scenario's 100 ms of virtual time at every size.
* ``default``: 64-vCPU arm64 VMs; host CPUs = vCPUs / 16 (the scenario's
  256 at 4,096: the same 16 vCPU threads per host CPU at every size); the
  scenario's 200 ms of virtual time at every size.

With ``--plot``, a PNG of halts per wall second and bytes per vCPU against
the vCPU count (needs matplotlib).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MS = 1_000_000
SIZES = (1024, 4096, 16384, 65536)
#: scenario -> (virtual ms, host CPUs for n vCPUs (None: the scenario's one per vCPU))
SETUPS = {
    "ipi-storm": (100, lambda n: None),
    "default": (200, lambda n: max(1, n // 16)),
}
TARGET_RSS_GIB = 24
TARGET_COST_RATIO = 1.5
TARGET_THREAD_SPEEDUP = 1.8


def child(scenario: str, vcpus: int, sim_ms: float, threads: int = 1, split: bool = True) -> dict:
    """One run in this (fresh) process; returns the figures as a dict."""
    try:
        os.sched_setaffinity(0, set(range(threads)))
        pinned = True
    except (AttributeError, OSError):
        pinned = False
    from kvmwake import _core, scenarios
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host_cpus = SETUPS[scenario][1](vcpus)
    t0 = time.perf_counter()
    host, ns, _ = scenarios.build(scenario, vcpus=vcpus, sim_ns=int(sim_ms * MS), seed=0,
                                  host_cpus=host_cpus, trace_capacity=0, threads=threads)
    host.split_islands = split
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    host.run(ns)
    wall = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sb = host._engine.state_bytes()
    engine_bytes = sum(v for k, v in sb.items()
                       if k not in ("thread_t", "virq_t", "stats_per_vcpu"))
    cnt = _core.bench_counters(host._engine)
    return {"scenario": scenario, "vcpus": vcpus, "sim_ms": sim_ms, "vms": len(host.vms),
            "threads": threads, "islands": host.islands_used,
            "host_cpus": host.host_cpus, "build_s": build_s, "wall": wall,
            "halts": host.halts, "events": host.events, "pushes": cnt["pushes"],
            "heap_cap": cnt["heap_cap"], "rss_before_kib": rss_before, "rss_peak_kib": rss_peak,
            "engine_bytes": engine_bytes, "state_bytes": sb, "pinned": pinned}


def run_child(scenario, vcpus, sim_ms, threads=1, split=True) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", scenario, str(vcpus), str(sim_ms),
           str(threads), "1" if split else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    r0 = runs[0]
    wall = statistics.median(r["wall"] for r in runs)
    peak = max(r["rss_peak_kib"] for r in runs) * 1024
    growth = statistics.median((r["rss_peak_kib"] - r["rss_before_kib"]) * 1024 for r in runs)
    return {**{k: r0[k] for k in ("scenario", "vcpus", "sim_ms", "vms", "threads", "islands",
                                  "host_cpus", "halts",
                                  "events", "pushes", "heap_cap", "engine_bytes", "state_bytes")},
            "runs": len(runs), "wall": wall, "wall_min": min(r["wall"] for r in runs),
            "wall_max": max(r["wall"] for r in runs),
            "build_s": statistics.median(r["build_s"] for r in runs),
            "halts_per_s": r0["halts"] / wall, "events_per_s": r0["events"] / wall,
            "ns_per_halt": wall * 1e9 / r0["halts"], "rss_peak": peak,
            "rss_growth_per_vcpu": growth / r0["vcpus"],
            "engine_per_vcpu": r0["engine_bytes"] / r0["vcpus"]}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sc, marker, color in (("ipi-storm", "o", "C0"), ("default", "s", "C1")):
        pts = [r for r in results if r["scenario"] == sc and r["threads"] == 1 and r["split"]]
        if not pts:
            continue
        x = [r["vcpus"] for r in pts]
        a1.plot(x, [r["halts_per_s"] / 1e6 for r in pts], marker=marker, color=color,
                label=f"{sc}, one thread")
        for t, style in ((2, "--"), (4, "-.")):
            more = [r for r in results if r["scenario"] == sc and r["threads"] == t and r["split"]]
            if more:
                a1.plot([r["vcpus"] for r in more], [r["halts_per_s"] / 1e6 for r in more],
                        marker=marker, color=color, linestyle=style, label=f"{sc}, {t} threads")
        one = [r for r in results if r["scenario"] == sc and not r["split"]]
        if one:
            a1.plot([r["vcpus"] for r in one], [r["halts_per_s"] / 1e6 for r in one],
                    marker=marker, color=color, linestyle=":", alpha=0.6,
                    label=f"{sc}, one queue")
        a1.axhline(pts[0]["halts_per_s"] / 1e6 / TARGET_COST_RATIO, color=color, linestyle=":",
                   linewidth=1, label=f"{sc}: its rate at {pts[0]['vcpus']:,} / "
                                      f"{TARGET_COST_RATIO:g} (the target)")
        a2.plot(x, [r["engine_per_vcpu"] for r in pts], marker=marker, color=color,
                label=f"{sc}: engine state")
        a2.plot(x, [r["rss_growth_per_vcpu"] for r in pts], marker=marker, color=color,
                linestyle="--", label=f"{sc}: peak RSS growth (engine + Python objects)")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(SIZES, [f"{s:,}" for s in SIZES])
        a.set_xlabel("vCPUs")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    a1.set_ylabel("million simulated halts per wall second")
    a1.set_ylim(bottom=0)
    a1.set_title("Speed")
    a2.set_ylabel("bytes per vCPU")
    a2.set_ylim(bottom=0)
    a2.set_title("Memory")
    fig.suptitle("kvmwake core scaling: ipi-storm (VMs of 1,024 vCPUs) and default "
                 "(VMs of 64, vCPUs/16 host CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=5, metavar=("SCENARIO", "VCPUS", "SIM_MS", "THREADS", "SPLIT"),
                   help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="vCPU counts, comma-separated (default: %(default)s)")
    p.add_argument("--scenarios", default=",".join(SETUPS),
                   help="scenarios (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per point")
    p.add_argument("--sim-scale", type=float, default=1.0,
                   help="multiply every virtual time by this (e.g. 0.01 for a smoke run)")
    p.add_argument("--threads", default="1",
                   help="thread counts, comma-separated (default: %(default)s)")
    p.add_argument("--one-queue", action="store_true",
                   help="also run each point on the host's one queue (one thread)")
    p.add_argument("--plot", metavar="PNG", help="write the plot to PNG")
    p.add_argument("--json", metavar="PATH", help="write the per-point figures as JSON")
    p.add_argument("--out", metavar="PATH", help="also write the report to PATH")
    args = p.parse_args(argv)
    if args.child:
        sc, n, ms, t, split = args.child
        print(json.dumps(child(sc, int(n), float(ms), int(t), split == "1")))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    if any(t < 1 or t > (os.cpu_count() or 1) for t in thread_counts):
        p.error(f"--threads: 1 to {os.cpu_count()} on this machine")
    modes = [(t, True) for t in thread_counts] + ([(1, False)] if args.one_queue else [])
    scs = [s.strip() for s in args.scenarios.split(",")]
    for s in scs:
        if s not in SETUPS:
            p.error(f"unknown scenario {s!r} (choose from {', '.join(SETUPS)})")
    from compare import cpu_model, source, versions
    lines: list[str] = []
    say = lines.append
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))
    say("### Scaling to 65,536 vCPUs")
    say("")
    say(f"- command: `{cmd}`")
    say(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.platform()}; "
        "each run in a fresh process pinned to CPU 0 (CPUs 0..t-1 with t threads)")
    say(f"- kvmwake source: {source()}")
    say("- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    say(f"- {args.runs} fresh processes per point; wall time of `host.run` only, median "
        "(min-max); peak RSS is the largest `ru_maxrss` of the point's processes; seed 0, "
        "tracing off")
    say("")
    print("\n".join(lines), flush=True)
    printed = len(lines)
    load0 = os.getloadavg()
    results = []
    for sc in scs:
        sim_ms = SETUPS[sc][0] * args.sim_scale
        for n in sizes:
            for t, split in modes:
                runs = [run_child(sc, n, sim_ms, t, split) for _ in range(args.runs)]
                results.append({**summarise(runs), "split": split})
                r = results[-1]
                print(f"  ({sc} {n:,}, {t} thread(s){'' if split else ', one queue'}: "
                      f"{r['wall']:.3f} s, {r['halts_per_s'] / 1e6:.2f} M halts/s, "
                      f"peak RSS {r['rss_peak'] / 2**20:,.0f} MiB)", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    say("| scenario | vCPUs | VMs | host CPUs | threads | islands | simulated ms | build s "
        "| run wall s, median (min-max) "
        "| halts | halts / wall s | events / wall s | ns per halt | peak RSS MiB "
        "| engine state B / vCPU | peak RSS growth B / vCPU |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        isl = f"{r['islands']:,}" if r["islands"] else "one queue"
        say(f"| {r['scenario']} | {r['vcpus']:,} | {r['vms']} | {r['host_cpus']:,} | "
            f"{r['threads']} | {isl} | "
            f"{r['sim_ms']:g} | {r['build_s']:.2f} | {r['wall']:.3f} ({r['wall_min']:.3f}-"
            f"{r['wall_max']:.3f}) | {r['halts']:,} | {r['halts_per_s']:,.0f} | "
            f"{r['events_per_s']:,.0f} | {r['ns_per_halt']:.0f} | {r['rss_peak'] / 2**20:,.1f} | "
            f"{r['engine_per_vcpu']:,.0f} | {r['rss_growth_per_vcpu']:,.0f} |")
    say("")
    say("Engine state at the largest size (bytes, `Engine.state_bytes()` after the run):")
    say("")
    for sc in scs:
        big = max((r for r in results if r["scenario"] == sc), key=lambda r: r["vcpus"])
        sb = big["state_bytes"]
        parts = ", ".join(f"{k} {v:,}" for k, v in sb.items()
                          if k not in ("thread_t", "virq_t", "stats_per_vcpu") and v)
        say(f"- {sc}, {big['vcpus']:,} vCPUs: {big['engine_bytes']:,} B ({parts}); "
            f"heap capacity {big['heap_cap']:,} events")
    say("")
    say("Load average (1, 5, 15 min) before / after: "
        + " ".join(f"{x:.2f}" for x in load0) + " / " + " ".join(f"{x:.2f}" for x in load1))
    say("")
    say("Targets:")
    say("")
    for sc in scs:
        pts = {r["vcpus"]: r for r in results
               if r["scenario"] == sc and r["threads"] == 1 and r["split"]}
        lo, hi = min(pts), max(pts)
        ratio = pts[hi]["ns_per_halt"] / pts[lo]["ns_per_halt"]
        say(f"- {sc}: cost per halt at {hi:,} vCPUs / at {lo:,} (one thread): {ratio:.2f}x vs "
            f"at most {TARGET_COST_RATIO:g}x: {'met' if ratio <= TARGET_COST_RATIO else 'MISSED'}"
            + ("" if ratio <= TARGET_COST_RATIO else f" (by {ratio / TARGET_COST_RATIO:.2f}x)"))
        for t in thread_counts:
            if t == 1:
                continue
            multi = [r for r in results if r["scenario"] == sc and r["vcpus"] == hi
                     and r["threads"] == t and r["split"]]
            if multi:
                up = pts[hi]["wall"] / multi[0]["wall"]
                say(f"- {sc}: {hi:,} vCPUs on {t} threads: {up:.2f}x the one-thread halts per "
                    f"wall second vs at least {TARGET_THREAD_SPEEDUP:g}x: "
                    f"{'met' if up >= TARGET_THREAD_SPEEDUP else 'MISSED'}")
        gib = pts[hi]["rss_peak"] / 2**30
        say(f"- {sc}: peak RSS at {hi:,} vCPUs {gib:.2f} GiB vs {TARGET_RSS_GIB} GiB: "
            f"{'met' if gib <= TARGET_RSS_GIB else 'MISSED'}")
    say("")
    print("\n".join(lines[printed:]), flush=True)
    if args.plot:
        try:
            plot(results, args.plot)
            print(f"(plot written to {args.plot})", file=sys.stderr)
        except ImportError:
            print("(no plot: matplotlib is not installed)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
