#!/usr/bin/env python3
"""Long structure-aware fuzzing campaigns of the snapshot loader.

    python tools/fuzz_snapshots.py --cases 100000 --seed 1 --jobs 2
    python tools/fuzz_snapshots.py --cases 2000 --scenarios default,ipi-storm

Each case takes a valid snapshot of a seed state (``--scenarios``, default all of
``tests/fuzz_snapshot.py``'s SEEDS), changes one field, re-frames it with a valid
checksum and, in a child process, restores it, runs it and snapshots it again
(see ``tests/fuzz_snapshot.py``).  Prints the counts of rejected, ran, stopped
(a clean EngineError in the run), crash, hang and broken (accepted then broken)
cases, and every crash, hang and broken case with its seed state and mutation;
exits 1 if there was any.  ``--json FILE`` writes the counts and findings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import fuzz_snapshot as F  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--scenarios", default=",".join(sorted(F.SEEDS)),
                    help="comma-separated seed states (default: all): "
                         + ", ".join(sorted(F.SEEDS)))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=500, help="cases per child process")
    ap.add_argument("--timeout", type=float, default=F.CASE_TIMEOUT,
                    help="seconds without an answer before a case is a hang")
    ap.add_argument("--json", help="write the counts and findings here")
    args = ap.parse_args(argv)
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in F.SEEDS]
    if unknown or not names:
        ap.error(f"unknown seed states {unknown}; known: {', '.join(sorted(F.SEEDS))}")
    if args.cases < 1 or args.jobs < 1 or args.batch < 1:
        ap.error("--cases, --jobs and --batch must be positive")
    import kvmwake._core as core
    F.check_layouts()
    seeds = F.seed_states(names)
    print(f"kvmwake snapshot fuzzing: {args.cases} cases, seed {args.seed}, "
          f"{len(names)} seed states ({', '.join(names)}), jobs {args.jobs}, "
          f"debug build {core.DEBUG}", flush=True)

    last = [0.0]

    def progress(done, counts, dt):
        if dt - last[0] >= 30 or done == args.cases:
            last[0] = dt
            print(f"  {done}/{args.cases} in {dt:.0f} s ({done / max(dt, 1e-9):.0f}/s): "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)

    t0 = time.monotonic()
    def finding(f):
        print(f"  FOUND case {f['i']} [{f['outcome']}] {f['seed_state']}: {f['mutation']}: "
              f"{f.get('detail', '')}", flush=True)

    res = F.campaign(seeds, args.seed, args.cases, jobs=args.jobs, batch=args.batch,
                     timeout=args.timeout, progress=progress, on_finding=finding)
    dt = time.monotonic() - t0
    c = res["counts"]
    print(f"cases {args.cases} in {dt:.0f} s: rejected {c['rejected']}, "
          f"accepted-and-ran {c['ran']}, accepted-and-stopped-cleanly {c['stopped']}, "
          f"crashes {c['crash']}, hangs {c['hang']}, accepted-then-broken {c['broken']}")
    for f in res["findings"]:
        print(f"  case {f['i']} [{f['outcome']}] {f['seed_state']}: {f['mutation']}: "
              f"{f.get('detail', '')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(res, cases=args.cases, seed=args.seed, scenarios=names,
                           seconds=round(dt, 1)), fh, indent=1)
    return 1 if res["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
