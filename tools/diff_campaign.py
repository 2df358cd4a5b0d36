#!/usr/bin/env python3
"""A long differential campaign: the core and the reference engine on many random
set-ups (tests/test_differential.py's test_core_and_reference_agree, whose
Hypothesis strategies include boundary values: the largest durations and loop
counts, sums of computes past 2^62 and 2^64, every request number 0..63, PCs set
into loop bodies, u64 register values).

    python tools/diff_campaign.py --examples 20000 [--chunk 2000] [--seed 0]

Runs the property in chunks of ``--chunk`` examples, chunk i with Hypothesis
seed ``seed + i`` (so a campaign is reproducible), each in its own pytest
process; prints each chunk's counts and the total, and stops at the first
divergence (pytest's output then shows the falsifying example).  Exit status 0
when every example agreed, 1 on a divergence or error, 2 when a chunk's pytest
was killed from outside.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_differential.py::test_core_and_reference_agree"
_COUNTS = re.compile(r"(\d+) passing examples?, (\d+) failing examples?, (\d+) invalid")


def run_chunk(n: int, seed: int) -> tuple[int, int, int, str, int]:
    env = dict(os.environ, KVMWAKE_DIFF_EXAMPLES=str(n))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST,
                        f"--hypothesis-seed={seed}", "--hypothesis-show-statistics"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    m = _COUNTS.search(r.stdout)
    passing, failing, invalid = (int(x) for x in m.groups()) if m else (0, 0, 0)
    return passing, failing, invalid, r.stdout + r.stderr, r.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000, help="examples in all")
    ap.add_argument("--chunk", type=int, default=2_000, help="examples per pytest run")
    ap.add_argument("--seed", type=int, default=0, help="Hypothesis seed of the first chunk")
    args = ap.parse_args(argv)
    if args.examples < 1 or args.chunk < 1:
        ap.error("--examples and --chunk must be positive")
    total = inval = 0
    t0 = time.monotonic()
    i = 0
    while total < args.examples:
        n = min(args.chunk, args.examples - total)
        passing, failing, invalid, out, rc = run_chunk(n, args.seed + i)
        total += passing
        inval += invalid
        print(f"chunk {i} (seed {args.seed + i}): {passing} agreed, {failing} diverged, "
              f"{invalid} skipped (over the event budget) [{time.monotonic() - t0:.0f} s]",
              flush=True)
        if rc < 0:
            # Killed from outside (a signal): no verdict on this chunk's examples.
            print(f"chunk {i}: pytest was killed by signal {-rc}; stopping after {total} "
                  "agreeing examples (no divergence seen)", flush=True)
            return 2
        if rc != 0 or failing or passing == 0:
            print(out)
            print(f"DIVERGENCE (or error) after {total} agreeing examples", flush=True)
            return 1
        i += 1
    print(f"{total} examples, 0 divergences ({inval} skipped over the event budget), "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
