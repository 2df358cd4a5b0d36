#!/usr/bin/env python
"""Snapshot and restore time and size at 4,096 vCPUs (issue: snapshots).

    python bench/snapshot_speed.py [--repeat 5]

For each built-in 4,096-vCPU scenario, run 20 ms of virtual time, then time
``host.snapshot()`` and ``Host.restore(blob)`` (median of ``--repeat``), and
report the bytes per vCPU.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import kvmwake as kw  # noqa: E402
from kvmwake import scenarios  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    try:
        os.sched_setaffinity(0, {0})
    except (AttributeError, OSError):
        pass
    print("| scenario | vCPUs | bytes | bytes / vCPU | snapshot() ms | restore ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("default", "irq-storm", "suspend-cycle"):
        host, _, _ = scenarios.build(name)
        host.run(20_000_000)
        n = sum(vm.nr_vcpus for vm in host.vms)
        save, load = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            blob = host.snapshot()
            save.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            kw.Host.restore(blob)
            load.append(time.perf_counter() - t0)
        print(f"| {name} | {n:,} | {len(blob):,} | {len(blob) / n:,.0f} | "
              f"{statistics.median(save) * 1e3:.1f} | {statistics.median(load) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
