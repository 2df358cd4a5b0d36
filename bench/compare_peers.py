#!/usr/bin/env python
"""kvmwake against its peers and the floor on ``ipi-storm``, as a markdown report.

    python bench/compare_peers.py [--vcpus 1024] [--sim-ms 100] [--seeds 5] [--repeat 5]
                                  [--ref-sim-ms 100] [--ref-runs 3] [--threads 1]
                                  [--out FILE]

From one run of this script, on ``ipi-storm`` (the canonical workload; see
``kvmwake/scenarios/builtin/ipi-storm.toml``) at ``--vcpus`` vCPUs for ``--sim-ms`` of virtual
time (the core's hosts with ``--threads`` OS threads: a host of several VMs,
beyond 1,024 vCPUs, runs its VMs as islands on them; the table says how many):

* **kvmwake core** (``kvmwake._core``): seeds ``0..--seeds-1``, each run
  ``--repeat`` times on a freshly built host after one untimed warm-up,
  with the FIFO run queue (the semantics the SimPy model implements), and
  the same runs with the EEVDF scheduler, reported but not compared;
* **kvmwake.reference** (the plain-Python engine): ``--ref-runs`` seeds at
  ``--ref-sim-ms`` of virtual time;
* **SimPy**: an idiomatic SimPy model of the same workload
  (``bench/simpy_ipi_storm.py``), one run per seed;
* **the floor**: a bare C binary-heap loop (``bench/_floor.pyx``) that
  replays exactly the pushes of the core's seed-0 run, with a pop for
  every event that left the core's queue (popped, or dropped unpopped as
  cancelled; the reference engine's queue traffic is recorded, event for
  event the core's; its count is checked against the core's
  ``bench_counters``),
  with no model logic; and, for scale, the classic "hold" loop with the
  heap held at ``--vcpus`` events.

Only the run is timed (never the build).  Halts per wall second is the
median over the runs of each engine; the floor reports events (pops) per
wall second and ns per event against the core's on the same heap traffic.

The agreement check: the core and the SimPy model must give the same
aggregate figures over the same virtual time within sampling noise: for
halts per virtual second and the successful-poll fraction (and, reported
only, attempted polls and wake-ups per halt), the difference of the two
seed means must be within ``--sigmas`` (default 3) standard errors of that
difference, the standard errors from the spread over the seeds.  The
script exits with status 1 if they do not agree.

The process is pinned to CPU 0 where ``os.sched_setaffinity`` allows, and
BLAS threads are held to one.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import array  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from compare import cpu_model, pin_to_one_cpu, source, versions  # noqa: E402

from kvmwake import _core, scenarios  # noqa: E402

MS = 1_000_000
POP = 0xFFFF_FFFF_FFFF_FFFF          # the floor's replay stream: one pop
SEQ_BITS = 56                        # key = (event class << 56) | sequence

TARGET_VS_SIMPY = 100
TARGET_VS_FLOOR = 3.0

AGREE_FIGURES = ("halts per virtual s", "successful polls / halts")
INFO_FIGURES = ("attempted polls / halts", "halt_wakeup / halts")


# -- the engines -------------------------------------------------------------------


def _sum_stats(host) -> dict:
    out: dict = {}
    for vm in host.vms:
        for k, v in vm.stats().items():
            if not k.endswith("_hist"):
                out[k] = out.get(k, 0) + int(v)
    return out


def run_kvmwake(engine, vcpus, sim_ns, seed, scheduler="fifo", threads=1):
    """One timed run of ``host.run`` (the build is not timed).  The FIFO run queue
    is the semantics the SimPy model implements; ``scheduler`` "eevdf" gives the
    other scheduler's figure."""
    host = None
    gc.collect()
    host, ns, _ = scenarios.build("ipi-storm", vcpus=vcpus, sim_ns=sim_ns, seed=seed,
                                  engine=engine, trace_capacity=0, scheduler=scheduler,
                                  threads=threads)
    t0 = time.perf_counter()
    host.run(ns)
    wall = time.perf_counter() - t0
    st = _sum_stats(host)
    return {"wall": wall, "halts": host.halts, "events": host.events, "sim_ns": sim_ns,
            "successful": st["halt_successful_poll"], "attempted": st["halt_attempted_poll"],
            "wakeups": st["halt_wakeup"], "host": host, "threads": threads,
            "islands": host.islands_used}


def run_simpy(vcpus, sim_ns, seed):
    import simpy_ipi_storm
    gc.collect()
    storm = simpy_ipi_storm.IpiStorm(vcpus, seed)
    t0 = time.perf_counter()
    storm.run(sim_ns)
    wall = time.perf_counter() - t0
    st = storm.stats
    return {"wall": wall, "halts": st.halts, "events": None, "sim_ns": sim_ns,
            "successful": st.halt_successful_poll, "attempted": st.halt_attempted_poll,
            "wakeups": st.halt_wakeup}


def record_heap_ops(vcpus, sim_ns, seed):
    """The event queue's traffic of an ipi-storm run, as the floor's replay stream.

    Recorded from the reference engine (which pushes and pops exactly what the
    core does; the caller checks the counts against the core's): every push
    as (time, (class << 56) | sequence), and as ``POP`` every event that left
    the queue, popped or dropped unpopped as cancelled (the floor's binary heap
    pops them all).  Events pushed while the host was built (the ticks) come
    first.
    """
    # Every push of the reference engine, and every event leaving its queue (popped,
    # or dropped as cancelled), goes to the queue module's recorders.
    from kvmwake.reference import queue as ref_queue
    host, ns, _ = scenarios.build("ipi-storm", vcpus=vcpus, sim_ns=sim_ns, seed=seed,
                                  engine="reference", trace_capacity=0)
    eng = host._engine
    ops = array.array("Q")
    for t, cls, seq, _who, _gen in sorted(eng.q.events(), key=lambda e: e[2]):
        ops.extend((t, (cls << SEQ_BITS) | seq))

    def recorder(ev):
        if ev is None:
            ops.append(POP)
        else:
            t, cls, seq = ev
            ops.extend((t, (int(cls) << SEQ_BITS) | seq))

    ref_queue.recorders.append(recorder)
    try:
        host.run(ns)
    finally:
        ref_queue.recorders.remove(recorder)
    arr = np.frombuffer(ops, dtype=np.uint64).copy()
    pops = int(np.count_nonzero(arr == POP))
    return arr, {"pushes": (len(arr) - pops) // 2, "pops": pops, "heap_len": eng.q.len,
                 "events": host.events, "halts": host.halts}


# -- statistics -----------------------------------------------------------------------


def figures(r) -> dict:
    h = r["halts"]
    return {"halts per virtual s": h / (r["sim_ns"] / 1e9),
            "successful polls / halts": r["successful"] / h,
            "attempted polls / halts": r["attempted"] / h,
            "halt_wakeup / halts": r["wakeups"] / h}


def mean_sd(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def agreement(core_runs, simpy_runs, sigmas):
    rows = []
    ok = True
    for name in AGREE_FIGURES + INFO_FIGURES:
        a = [figures(r)[name] for r in core_runs]
        b = [figures(r)[name] for r in simpy_runs]
        ma, sa = mean_sd(a)
        mb, sb = mean_sd(b)
        se = math.sqrt(sa * sa / len(a) + sb * sb / len(b))
        z = abs(ma - mb) / se if se > 0 else (0.0 if ma == mb else math.inf)
        checked = name in AGREE_FIGURES
        good = z <= sigmas
        if checked:
            ok &= good
        rows.append((name, ma, sa, mb, sb, (mb - ma) / ma, z, checked, good))
    return ok, rows


# -- the report ---------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vcpus", type=int, default=1024)
    p.add_argument("--sim-ms", type=float, default=100.0,
                   help="virtual ms of the core, SimPy and floor runs (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=8,
                   help="seeds of the core and SimPy runs (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed core runs per seed, and floor runs (default: %(default)s)")
    p.add_argument("--ref-sim-ms", type=float, default=None,
                   help="virtual ms of the reference runs (default: --sim-ms)")
    p.add_argument("--ref-runs", type=int, default=3,
                   help="reference runs, seeds 0.. (default: %(default)s)")
    p.add_argument("--sigmas", type=float, default=3.0,
                   help="agreement tolerance in standard errors (default: %(default)s)")
    p.add_argument("--no-floor", action="store_true", help="skip the floor (needs Cython)")
    p.add_argument("--out", metavar="PATH", help="also write the report to PATH")
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to CPU 0")
    p.add_argument("--threads", type=int, default=1,
                   help="OS threads of the core's hosts (Host(threads=...)); with more than "
                        "one, the process is pinned to CPUs 0..threads-1 (default: %(default)s)")
    args = p.parse_args(argv)
    if min(args.seeds, args.repeat, args.ref_runs) < 1 or args.vcpus < 2:
        p.error("--seeds, --repeat and --ref-runs must be at least 1, --vcpus at least 2")
    sim_ns = int(args.sim_ms * MS)
    ref_ns = int((args.ref_sim_ms if args.ref_sim_ms is not None else args.sim_ms) * MS)

    if not 1 <= args.threads <= (os.cpu_count() or 1):
        p.error(f"--threads: 1 to {os.cpu_count()} on this machine")
    if args.no_pin:
        pinned = "not pinned (--no-pin)"
    elif args.threads == 1:
        pinned = pin_to_one_cpu()
    else:
        os.sched_setaffinity(0, set(range(args.threads)))
        pinned = f"pinned to CPUs 0-{args.threads - 1}"
    lines: list[str] = []
    say = lines.append
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))
    try:
        import simpy
        simpy_version = simpy.__version__
    except ImportError:
        print("SimPy is not installed: pip install 'simpy>=4' (the bench extra)", file=sys.stderr)
        return 2
    say("### Peers and floor on ipi-storm")
    say("")
    say(f"- command: `{cmd}`")
    say(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.platform()}; "
        f"{pinned}")
    say(f"- kvmwake source: {source()}")
    say("- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f", SimPy {simpy_version}")
    say(f"- workload: ipi-storm, {args.vcpus:,} x86 vCPUs, one host CPU each; "
        f"{sim_ns / MS:g} ms of virtual time (the reference: {ref_ns / MS:g} ms)")
    say("- timing: wall seconds of the run only (hosts and SimPy environments are built "
        "untimed), gc.collect() before each run, the collector on during it; halts per wall "
        "second is the median over the runs")
    say("")
    print("\n".join(lines), flush=True)
    printed = len(lines)
    load0 = os.getloadavg()

    # The core: one warm-up, then --repeat runs of each seed.
    run_kvmwake("core", args.vcpus, sim_ns, 0, threads=args.threads)
    core_runs = []
    for seed in range(args.seeds):
        for _ in range(args.repeat):
            core_runs.append(run_kvmwake("core", args.vcpus, sim_ns, seed, threads=args.threads)
                             | {"seed": seed})
    core_seed0 = [r for r in core_runs if r["seed"] == 0]
    core_by_seed = [next(r for r in core_runs if r["seed"] == s) for s in range(args.seeds)]
    cnt = _core.bench_counters(core_seed0[-1]["host"]._engine)

    # The same runs with the EEVDF scheduler: reported, not compared with SimPy.
    eevdf_runs = []
    for seed in range(args.seeds):
        for _ in range(args.repeat):
            eevdf_runs.append(run_kvmwake("core", args.vcpus, sim_ns, seed, "eevdf",
                                          threads=args.threads))

    ref_runs = [run_kvmwake("reference", args.vcpus, ref_ns, seed) for seed in range(args.ref_runs)]
    simpy_runs = []
    for seed in range(args.seeds):
        simpy_runs.append(run_simpy(args.vcpus, sim_ns, seed))
        print(f"  (SimPy seed {seed}: {simpy_runs[-1]['wall']:.2f} s)", file=sys.stderr, flush=True)

    floor_rows = []
    if not args.no_floor:
        import floorloop as floor_mod
        fl = floor_mod.load()
        ops, rec = record_heap_ops(args.vcpus, sim_ns, 0)
        want = {"pushes": cnt["pushes"], "pops": cnt["pushes"] - cnt["heap_len"],
                "events": cnt["events"], "halts": cnt["halts"]}
        got = {k: rec[k] for k in want}
        if got != want:
            print(f"The recorded heap traffic {got} is not the core's {want}: no floor.",
                  file=sys.stderr)
            return 1
        fl.replay(ops)                                   # warm-up
        walls = []
        for _ in range(args.repeat):
            ns, pushes, pops, left, _ = fl.replay(ops)
            assert (pushes, pops, left) == (rec["pushes"], rec["pops"], rec["heap_len"])
            walls.append(ns / 1e9)
        floor_rows.append(("floor: replay of the core's heap traffic", walls, rec["pops"]))
        hold_walls = []
        fl.hold(rec["pushes"], args.vcpus)
        for _ in range(args.repeat):
            ns, pops, _ = fl.hold(rec["pushes"], args.vcpus)
            hold_walls.append(ns / 1e9)
        floor_rows.append((f"floor: hold loop, {args.vcpus:,} events queued", hold_walls,
                           rec["pushes"]))
    load1 = os.getloadavg()

    def hps(runs):
        return statistics.median(r["halts"] / r["wall"] for r in runs)

    def wall_med(runs):
        return statistics.median(r["wall"] for r in runs)

    core_hps = hps(core_runs)
    core0_wall = wall_med(core_seed0)
    pops0 = cnt["pushes"] - cnt["heap_len"]
    say("| engine | threads | islands | simulated ms | runs | wall s per run, median (min-max) "
        "| halts per run, median | halts / wall s, median | events / wall s "
        "| core's halts/s over this |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(name, runs, sim):
        threads = runs[0].get("threads", 1)
        isl = runs[0].get("islands")
        isl = "—" if isl is None else (f"{isl:,}" if isl else "one queue")
        walls = [r["wall"] for r in runs]
        ev = (f"{statistics.median(r['events'] / r['wall'] for r in runs):,.0f}"
              if runs[0]["events"] is not None else "—")
        h = hps(runs)
        say(f"| {name} | {threads} | {isl} | {sim / MS:g} | {len(runs)} | "
            f"{statistics.median(walls):.4f} "
            f"({min(walls):.4f}-{max(walls):.4f}) | "
            f"{statistics.median(r['halts'] for r in runs):,.0f} | {h:,.0f} | {ev} | "
            f"{core_hps / h:,.1f}x |")
    row(f"kvmwake core ({args.seeds} seeds x {args.repeat})", core_runs, sim_ns)
    row(f"kvmwake core, EEVDF scheduler ({args.seeds} seeds x {args.repeat}; not the SimPy "
        "model's semantics)", eevdf_runs, sim_ns)
    row(f"kvmwake.reference ({args.ref_runs} seeds)", ref_runs, ref_ns)
    row(f"SimPy {simpy_version} ({args.seeds} seeds)", simpy_runs, sim_ns)
    for name, walls, pops in floor_rows:
        w = statistics.median(walls)
        say(f"| {name} | 1 | — | — | {len(walls)} | {w:.4f} ({min(walls):.4f}-{max(walls):.4f}) "
            f"| — | — | "
            f"{pops / w:,.0f} | — |")
    say("")

    say("Cost per event on the same heap traffic (the core's seed-0 run: "
        f"{cnt['pushes']:,} pushes, {pops0:,} leaving the queue ({cnt['dropped']:,} dropped "
        f"unpopped, {cnt['events']:,} live events), "
        f"{cnt['halts']:,} halts):")
    say("")
    say("| loop | wall s, median | ns per popped event | ns per live event | ns per halt "
        "| core / this |")
    say("|---|---:|---:|---:|---:|---:|")
    say(f"| kvmwake core, seed 0 | {core0_wall:.4f} | {core0_wall * 1e9 / pops0:.1f} | "
        f"{core0_wall * 1e9 / cnt['events']:.1f} | {core0_wall * 1e9 / cnt['halts']:.1f} | 1.00 |")
    for name, walls, pops in floor_rows:
        w = statistics.median(walls)
        say(f"| {name} | {w:.4f} | {w * 1e9 / pops:.1f} | — | — | {core0_wall / w:.2f} |")
    say("")

    ok, rows = agreement(core_by_seed, simpy_runs, args.sigmas)
    say(f"Agreement, kvmwake core vs SimPy, {args.seeds} seeds each (0..{args.seeds - 1}), "
        f"{sim_ns / MS:g} ms of virtual time: mean (sd over seeds); the difference in "
        f"standard errors of the difference; checked: |difference| <= {args.sigmas:g} "
        "standard errors")
    say("")
    say("| figure | core | SimPy | SimPy - core | standard errors | |")
    say("|---|---:|---:|---:|---:|---|")
    for name, ma, sa, mb, sb, rel, z, checked, good in rows:
        fmt = "{:,.0f}" if name.startswith("halts per") else "{:.4f}"
        verdict = ("agree" if good else "DISAGREE") if checked else "(reported only)"
        say(f"| {name} | {fmt.format(ma)} ({fmt.format(sa)}) | {fmt.format(mb)} "
            f"({fmt.format(sb)}) | {100 * rel:+.2f}% | {z:.2f} | {verdict} |")
    say("")
    say("Load average (1, 5, 15 min) before / after: "
        + " ".join(f"{x:.2f}" for x in load0) + " / " + " ".join(f"{x:.2f}" for x in load1))
    say("")

    say("Targets:")
    say("")
    simpy_hps = hps(simpy_runs)
    ratio = core_hps / simpy_hps
    say(f"- core vs SimPy, halts per wall second: {ratio:,.1f}x vs {TARGET_VS_SIMPY}x: "
        f"{'met' if ratio >= TARGET_VS_SIMPY else 'MISSED'} ({ratio / TARGET_VS_SIMPY:.2f} of the "
        "target)")
    say(f"- core vs reference: {core_hps / hps(ref_runs):,.1f}x (halts per wall second)")
    if floor_rows:
        fr = core0_wall / statistics.median(floor_rows[0][1])
        say(f"- core vs the floor (replay), cost per event: {fr:.2f}x vs at most "
            f"{TARGET_VS_FLOOR:g}x: {'met' if fr <= TARGET_VS_FLOOR else 'MISSED'}"
            + ("" if fr <= TARGET_VS_FLOOR else f" (by {fr / TARGET_VS_FLOOR:.2f}x)"))
    say(f"- the core and SimPy agree on halts and successful polls: "
        f"{'yes' if ok else 'NO'}")
    say("")
    print("\n".join(lines[printed:]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
