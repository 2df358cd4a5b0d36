#!/usr/bin/env python
"""What the host scheduler costs the core: ns per simulated halt on ``ipi-storm``
(1,024 x86 vCPUs on 1,024 host CPUs, the scenario's 100 ms) with FIFO run queues
against Linux's fair class (EEVDF), pinned and with every vCPU thread allowed on
every CPU (wake placement and newly-idle balancing at work).

    python bench/scheduler_cost.py [--vcpus 1024] [--rounds 5] [--sim-ms 100]

Each round runs every setting once, each in a fresh Python process pinned to
CPU 0, in an order rotated from round to round (so slow phases of a shared
machine fall on every setting alike).  A run builds the host (not timed) and
times ``host.run`` once.  Reported per setting: the median ns per halt over the
rounds, its min and max, the halts and events of the run (identical in every
round: the runs are deterministic), and the ratio of each median to FIFO
pinned's.  The target (docs/results.md): EEVDF at most 1.15 x FIFO per halt.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

MS = 1_000_000
SETTINGS = (("fifo", "pinned"), ("eevdf", "pinned"), ("fifo", "all"), ("eevdf", "all"))
TARGET_RATIO = 1.15


def child(scheduler: str, affinity: str, vcpus: int, sim_ms: float) -> dict:
    try:
        os.sched_setaffinity(0, {0})
    except (AttributeError, OSError):
        pass
    from kvmwake import scenarios
    host, ns, _ = scenarios.build("ipi-storm", vcpus=vcpus, sim_ns=int(sim_ms * MS), seed=0,
                                  trace_capacity=0, scheduler=scheduler, affinity=affinity)
    t0 = time.perf_counter()
    host.run(ns)
    wall = time.perf_counter() - t0
    return {"wall": wall, "halts": host.halts, "events": host.events}


def run_child(setting, vcpus, sim_ms) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *setting, str(vcpus),
           str(sim_ms)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=4, metavar=("SCHED", "AFFINITY", "VCPUS", "SIM_MS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--vcpus", type=int, default=1024)
    p.add_argument("--sim-ms", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    if a.child:
        s, aff, n, ms = a.child
        print(json.dumps(child(s, aff, int(n), float(ms))))
        return 0
    runs = {s: [] for s in SETTINGS}
    for r in range(a.rounds):
        order = SETTINGS[r % len(SETTINGS):] + SETTINGS[:r % len(SETTINGS)]
        for s in order:
            runs[s].append(run_child(s, a.vcpus, a.sim_ms))
    base = None
    print(f"ipi-storm, {a.vcpus:,} vCPUs, {a.sim_ms:g} ms simulated, {a.rounds} rounds")
    print(f"{'scheduler':<10}{'affinity':<10}{'halts':>10}{'events':>11}"
          f"{'ns/halt p50':>13}{'min':>8}{'max':>8}{'ratio':>8}")
    out = []
    for s in SETTINGS:
        rs = runs[s]
        if len({(x['halts'], x['events']) for x in rs}) != 1:
            raise RuntimeError(f"{s}: runs differ in halts/events: not deterministic")
        per = [x["wall"] * 1e9 / x["halts"] for x in rs]
        med = statistics.median(per)
        base = base or med
        print(f"{s[0]:<10}{s[1]:<10}{rs[0]['halts']:>10,}{rs[0]['events']:>11,}"
              f"{med:>13.0f}{min(per):>8.0f}{max(per):>8.0f}{med / base:>8.3f}")
        out.append({"scheduler": s[0], "affinity": s[1], "halts": rs[0]["halts"],
                    "events": rs[0]["events"], "ns_per_halt": med, "ratio": med / base})
    eevdf = next(o for o in out if o["scheduler"] == "eevdf" and o["affinity"] == "pinned")
    print(f"EEVDF / FIFO (pinned) per halt: {eevdf['ratio']:.3f} "
          f"(target at most {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
