#!/usr/bin/env python
"""Core versus reference engine on the built-in scenarios, as a markdown report.

    python bench/compare.py [--repeat 5] [--ref-sim-ms 20] [--out docs/results-core.md]

In one process, for ``ipi-storm`` at 1,024 vCPUs (100 ms simulated),
``default`` at 4,096 vCPUs (200 ms), ``irq-storm`` at 4,096 vCPUs (100 ms)
and ``suspend-cycle`` at 4,096 vCPUs (50 ms):

* the core engine at that size: ``--repeat`` runs, each on a freshly built
  host; only ``host.run`` is timed (the build is not), after one untimed
  warm-up run;
* the reference engine on the same scenario and vCPU count for a shorter
  virtual time (``--ref-sim-ms``), since it is some 30 times slower;
* the core again at the reference's size, so that the core/reference ratio
  of halts per wall second is like for like.  The ratio against the core's
  full-size run is given too (per halt, so the sizes may differ).

Before timing, the two engines must agree exactly on small instances of both
scenarios (per-vCPU stats, halts, events, wake-latency histogram); the check's
result is printed, and the script stops if they differ.

It also reports the core's state bytes per vCPU (``Engine.state_bytes()``),
the heap's pushes and cancelled events, the process's peak RSS, the machine
and the software versions.  The process is pinned to CPU 0 where
``os.sched_setaffinity`` allows, and OpenBLAS is held to one thread (numpy
imports it; its idle threads would otherwise share the core).
"""

from __future__ import annotations

import os

# Before numpy is imported (by kvmwake): no BLAS helper threads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import kvmwake  # noqa: E402
from kvmwake import _core, scenarios  # noqa: E402

MS = 1_000_000

#: (scenario, vCPUs, simulated ms of the core's full-size run)
WORKLOADS = [("ipi-storm", 1024, 100), ("default", 4096, 200), ("irq-storm", 4096, 100),
             ("suspend-cycle", 4096, 50)]
#: Small instances on which the engines must agree before anything is timed.
AGREEMENT = [("ipi-storm", 64, 20), ("default", 256, 20), ("ipi-storm", 1024, 2),
             ("irq-storm", 512, 5), ("suspend-cycle", 64, 20)]

TARGET_HALTS_PER_S = 2_000_000
TARGET_RATIO = 50
TARGET_BYTES = 512


def pin_to_one_cpu() -> str:
    try:
        before = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {0})
        return f"pinned to CPU 0 (os.sched_setaffinity; allowed before: {before})"
    except (AttributeError, OSError) as exc:
        return f"not pinned ({exc})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    try:
        import Cython
        cython = Cython.__version__
    except ImportError:
        cython = "not installed (the extension was built elsewhere)"
    return {"Python": platform.python_version(), "Cython": cython, "numpy": np.__version__,
            "kvmwake": kvmwake.__version__}


def source() -> str:
    """Where kvmwake was imported from, and its git commit when that is a checkout."""
    import subprocess
    where = os.path.dirname(os.path.dirname(os.path.abspath(kvmwake.__file__)))
    try:
        rev = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return f"{where} (not a git checkout)"
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{where}, commit {rev.stdout.strip()}" + (" with local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"{where} (git not available)"


def build(scenario, vcpus, sim_ms, engine):
    host, sim_ns, _ = scenarios.build(scenario, vcpus=vcpus, sim_ns=int(sim_ms * MS), seed=0,
                                      engine=engine, trace_capacity=0)
    return host, sim_ns


def agreement_check() -> list[tuple[str, bool, str]]:
    out = []
    for scenario, vcpus, sim_ms in AGREEMENT:
        got = {}
        for engine in ("core", "reference"):
            host, sim_ns = build(scenario, vcpus, sim_ms, engine)
            host.run(sim_ns)
            e = host._engine
            got[engine] = (e.stats_array(), e.lat_hist_array(), host.halts, host.events, host.now)
        c, r = got["core"], got["reference"]
        same = (np.array_equal(c[0], r[0]) and np.array_equal(c[1], r[1]) and c[2:] == r[2:])
        what = f"{scenario}, {vcpus} vCPUs, {sim_ms} ms: {c[2]:,} halts, {c[3]:,} events"
        out.append((what, same, "stats_array, latency histogram, halts, events equal"
                    if same else "DIFFER"))
    return out


def time_runs(scenario, vcpus, sim_ms, engine, repeat, warmup):
    """Median/min/max wall seconds of host.run over ``repeat`` fresh hosts."""
    walls = []
    host = None
    for i in range(warmup + repeat):
        host = None
        gc.collect()
        host, sim_ns = build(scenario, vcpus, sim_ms, engine)
        t0 = time.perf_counter()
        host.run(sim_ns)
        wall = time.perf_counter() - t0
        if i >= warmup:
            walls.append(wall)
    med = statistics.median(walls)
    return {"scenario": scenario, "engine": engine, "vcpus": vcpus, "sim_ms": sim_ms,
            "median": med, "min": min(walls), "max": max(walls), "n": len(walls),
            "halts": host.halts, "events": host.events,
            "halts_per_s": host.halts / med, "events_per_s": host.events / med,
            "host": host}


def fmt_row(r, role):
    return (f"| {r['scenario']} | {r['engine']} ({role}) | {r['vcpus']:,} | {r['sim_ms']:g} | "
            f"{r['median']:.4f} ({r['min']:.4f}-{r['max']:.4f}) | {r['halts']:,} | "
            f"{r['events']:,} | {r['halts_per_s']:,.0f} | {r['events_per_s']:,.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per row (default: %(default)s)")
    p.add_argument("--ref-sim-ms", type=float, default=20.0,
                   help="virtual ms of the reference engine's runs (default: %(default)s)")
    p.add_argument("--out", metavar="PATH", help="also write the report to PATH")
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to CPU 0")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    pinned = "not pinned (--no-pin)" if args.no_pin else pin_to_one_cpu()
    lines: list[str] = []
    say = lines.append
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))

    say("### Core versus reference engine")
    say("")
    say(f"- command: `{cmd}`")
    say(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.platform()}; "
        f"{pinned}")
    say(f"- kvmwake source: {source()}")
    say("- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    say(f"- timing: wall seconds of `host.run` only (the host is built untimed), median of "
        f"{args.repeat} runs on fresh hosts (min-max in brackets); the core gets one untimed "
        "warm-up run per row; a gc.collect() before each run, the collector on during it "
        "(as in `kvmwake run`); seed 0; tracing off")
    say("")

    checks = agreement_check()
    ok = all(same for _, same, _ in checks)
    say("Agreement check before timing (core vs reference, exact):")
    say("")
    for what, same, how in checks:
        say(f"- {what}: {'OK' if same else 'FAILED'} ({how})")
    say("")
    print("\n".join(lines), flush=True)
    if not ok:
        print("\nThe engines disagree: nothing timed.", file=sys.stderr)
        return 1
    printed = len(lines)

    load0 = os.getloadavg()
    results = []
    for scenario, vcpus, sim_ms in WORKLOADS:
        full = time_runs(scenario, vcpus, sim_ms, "core", args.repeat, 1)
        ref = time_runs(scenario, vcpus, args.ref_sim_ms, "reference", args.repeat, 0)
        like = time_runs(scenario, vcpus, args.ref_sim_ms, "core", args.repeat, 1)
        assert (like["halts"], like["events"]) == (ref["halts"], ref["events"])
        results.append((full, ref, like))

    say("| scenario | engine | vCPUs | simulated ms | wall s, median (min-max) | halts | events "
        "| halts / wall s | events / wall s |")
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for full, ref, like in results:
        say(fmt_row(full, "full size"))
        say(fmt_row(like, "reference's size"))
        say(fmt_row(ref, "shorter run"))
    say("")
    say("Core / reference, halts per wall second:")
    say("")
    say("| scenario | like for like (same vCPUs and simulated time) | core full size vs reference |")
    say("|---|---:|---:|")
    for full, ref, like in results:
        say(f"| {full['scenario']} {full['vcpus']:,} vCPUs | "
            f"{like['halts_per_s'] / ref['halts_per_s']:.1f}x ({ref['sim_ms']:g} ms both) | "
            f"{full['halts_per_s'] / ref['halts_per_s']:.1f}x ({full['sim_ms']:g} ms vs "
            f"{ref['sim_ms']:g} ms) |")
    say("")

    say("Core state per vCPU (bytes; `Engine.state_bytes()` after the full-size run):")
    say("")
    say("| scenario | vCPUs | thread_t | stats row (kernel u64 layout) | thread + stats "
        "| all engine state / vCPU | heap pushes | cancelled pops |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    for full, _, _ in results:
        e = full["host"]._engine
        sb = e.state_bytes()
        n = full["vcpus"]
        total = sum(sb[k] for k in ("threads", "stats", "heap", "ops", "trace", "cpus", "vms"))
        cnt = _core.bench_counters(e)
        popped = cnt["pushes"] - cnt["heap_len"]
        say(f"| {full['scenario']} | {n:,} | {sb['thread_t']} | {sb['stats_per_vcpu']} | "
            f"{sb['thread_t'] + sb['stats_per_vcpu']} | {total / n:,.0f} "
            f"({total:,} B: threads {sb['threads']:,}, stats {sb['stats']:,}, heap {sb['heap']:,}, "
            f"cpus {sb['cpus']:,}, vms {sb['vms']:,}, ops {sb['ops']:,}) | {cnt['pushes']:,} | "
            f"{popped - cnt['events']:,} of {popped:,} ({100 * (popped - cnt['events']) / popped:.1f}%) |")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    say("")
    say("Load average (1, 5, 15 min) before / after timing: "
        f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} / "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (other work on the machine shows here and in the min-max spread)")
    say("")
    say(f"Peak RSS of this process (all of the above, both engines, Python and numpy): "
        f"{rss_kib / 1024:,.1f} MiB")
    say("")

    say("Targets:")
    say("")
    storm = next(r for r in results if r[0]["scenario"] == "ipi-storm")
    hps = storm[0]["halts_per_s"]
    ratio = storm[2]["halts_per_s"] / storm[1]["halts_per_s"]
    sb = storm[0]["host"]._engine.state_bytes()
    tb = sb["thread_t"]
    say(f"- ipi-storm 1,024 vCPUs, core: {hps:,.0f} halts/s vs {TARGET_HALTS_PER_S:,}: "
        f"{'met' if hps >= TARGET_HALTS_PER_S else 'MISSED'} ({hps / TARGET_HALTS_PER_S:.2f}x the target)")
    say(f"- core/reference like for like on ipi-storm: {ratio:.1f}x vs {TARGET_RATIO}x: "
        f"{'met' if ratio >= TARGET_RATIO else 'MISSED'} ({ratio / TARGET_RATIO:.2f} of the target)")
    say(f"- thread state per vCPU: {tb} B vs {TARGET_BYTES} B: "
        f"{'met' if tb <= TARGET_BYTES else 'MISSED'}; with the kernel-layout stats row "
        f"{tb + sb['stats_per_vcpu']} B")
    say("")

    print("\n".join(lines[printed:]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
