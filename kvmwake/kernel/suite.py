"""The full kernel-vs-model comparison behind ``docs/results.md``.

    python -m kvmwake.kernel.suite -o OUT [--wakes short=3000,mixed=3000,long=1500]

For each workload (short, mixed, long idle), each vCPU count (1, 2) and each
polling setting (the module's default ceiling; ``KVM_CAP_HALT_POLL`` = 0) it
records (``record``), calibrates on that recording (``calibrate``) and
compares (``compare``), into ``OUT/<workload>-<n>vcpu-<cap>/``.  The machine
is shared, so before each recording it waits (up to ``--wait-s``) for a
quiet moment (other processes below ``--quiet-pct`` of the CPUs over half a
second) and re-records (up to ``--tries``) when others were busy during
the run (the last try is kept); its foreign load is in the table.  Prints
the Markdown table and writes ``OUT/suite-<arrivals>.json``.  ``--reuse``
skips the recording; ``--arrivals target`` calibrates and compares with the
spec's target times instead of the real send times, without touching the
folders' files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import calibrate as C
from . import compare as CM
from .record import RecordOptions, cpu_times, foreign_load, record
from .recording import load, write_json

WORKLOADS = ("short", "mixed", "long")
CAPS = (None, 0)


def wait_quiet(limit_pct: float, max_wait_s: float, log) -> float:
    """Wait until others use less than ``limit_pct`` of the CPUs for half a second."""
    import os
    end = time.monotonic() + max_wait_s
    while True:
        a = cpu_times()
        time.sleep(0.5)
        f = foreign_load(a, cpu_times(), os.cpu_count() or 1)["foreign_pct"]
        if f < limit_pct or time.monotonic() > end:
            return f
        log(f"  waiting for a quiet moment (others use {f:.0f} % of the CPUs)")
        time.sleep(2.0)


def foreign_of(meta: dict) -> float:
    """The worst of others' CPU share before, during and after the run."""
    hl = meta["host_load"]
    return max(hl["foreign_pct"], hl.get("foreign_before_pct", 0.0),
               hl.get("foreign_after_pct", 0.0))


def run_one(out: Path, workload: str, vcpus: int, cap, wakes: int, args, log) -> dict:
    name = f"{workload}-{vcpus}vcpu-{'default' if cap is None else f'cap{cap}'}"
    d = out / name
    attempt = 0
    for attempt in range(1, 0 if args.reuse else args.tries + 1):
        wait_quiet(args.quiet_pct, args.wait_s, log)
        meta = record(RecordOptions(vcpus=vcpus, wakes=wakes, idle=workload, out=d,
                                    halt_poll_ns=cap, seed=args.seed, force=True),
                      log=lambda m: None)
        f = foreign_of(meta)
        log(f"{name}: attempt {attempt}, others used {f:.1f} % of the CPUs")
        if f <= args.quiet_pct:
            break
    rec = load(d)
    cal = C.fit(rec, arrivals=args.arrivals, log=lambda m: log(f"  {name}: {m}"))
    if args.arrivals == "sent":
        C.save(rec, cal)
        c = CM.compare_dir(load(d))
    else:                                   # a side study: leave the folder's files alone
        c = CM.run(rec, cal)
    row = CM.table_row(c)
    row.update(name=name, foreign_pct=foreign_of(rec.meta),
               w2r=cal["params"]["costs"]["wake_to_run_ns"],
               ctx=cal["params"]["costs"]["context_switch_ns"],
               handler=cal["params"]["handler_ns"], delivery=cal["params"]["delivery_ns"],
               lateness_p50=rec.meta["harness"]["injector_lateness_ns"].get("p50"),
               msi_ioctl_p50=rec.meta["harness"]["msi_ioctl_delivered_ns"].get("p50"),
               host_lat_p50=rec.meta["host_latency_ns"].get("p50"),
               host_lat_p99=rec.meta["host_latency_ns"].get("p99"),
               halts_k=c["kernel"]["halts"], halts_m=c["model"]["halts"],
               per_vcpu_k=[(v["poll"], v["halts"]) for v in c["kernel"]["per_vcpu"]],
               per_vcpu_m=[(v["poll"], v["halts"]) for v in c["model"]["per_vcpu"]],
               verdict=c["verdict"], tries=attempt)
    return row


def _us(x):
    return "-" if x is None else f"{x / 1000:.1f}"


def _r(x):
    return "-" if x is None else f"{x:.2f}"


def markdown(rows: list[dict]) -> str:
    head = ("| workload | vCPUs | ceiling | wakes | poll % kernel / model (diff) | "
            "median wait us kernel / model (ratio) | p50 us k / m (ratio) | "
            "p90 us k / m (ratio) | p99 us k / m (ratio) | replay matched / mismatched | "
            "others' CPU % |")
    lines = [head, "|---|---:|---|---:|---|---|---|---|---|---|---:|"]
    for r in rows:
        v = r["verdict"]
        split = (f"{r['k_poll']:.1f} / {r['m_poll']:.1f} ({r['split_pp']:+.1f} pp"
                 f"{'' if v.get('split_ok') else ', **missed**'})")
        wait = (f"{_us(r['k_wait'])} / {_us(r['m_wait'])} ({_r(r['wait_ratio'])}"
                f"{'' if v.get('median_wait_ok') else ', **missed**'})")
        cap = "module 200000" if r["cap"] is None else f"cap {r['cap']}"
        lat = [f"{_us(r[f'k_{q}'])} / {_us(r[f'm_{q}'])} ({_r(r[f'r_{q}'])})"
               for q in ("p50", "p90", "p99")]
        rp = "-" if r["replay"] is None else f"{r['replay'][0]} / {r['replay'][1]}"
        lines.append(f"| {r['workload']} | {r['vcpus']} | {cap} | {r['wakes']} | {split} | "
                     f"{wait} | {' | '.join(lat)} | {rp} | {r['foreign_pct']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmwake.kernel.suite")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--wakes", default="short=3000,mixed=3000,long=1500")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--vcpus", default="1,2")
    ap.add_argument("--caps", default="default,0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tries", type=int, default=4)
    ap.add_argument("--quiet-pct", type=float, default=5.0)
    ap.add_argument("--wait-s", type=float, default=120.0)
    ap.add_argument("--reuse", action="store_true",
                    help="do not record: calibrate and compare the recordings already in OUT")
    ap.add_argument("--arrivals", choices=("sent", "target"), default="sent",
                    help="calibrate and compare with these arrivals ('target' leaves "
                         "calibration.json and compare.json as they are)")
    args = ap.parse_args(argv)
    wakes = dict(item.split("=") for item in args.wakes.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(m):
        print(m, file=sys.stderr, flush=True)
    path = out / f"suite-{args.arrivals}.json"
    done = {}
    if path.exists():                       # keep the rows of earlier runs into OUT
        done = {r["name"]: r for r in json.loads(path.read_text()).get("rows", [])}
    caps = [None if c == "default" else int(c) for c in args.caps.split(",")]
    for wl in args.workloads.split(","):
        for n in (int(x) for x in args.vcpus.split(",")):
            for cap in caps:
                row = run_one(out, wl, n, cap, int(wakes[wl]), args, log)
                done[row["name"]] = row
                write_json(path, {"rows": list(done.values())})
    order = {f"{w}-{n}vcpu-{c}": i for i, (w, n, c) in enumerate(
        (w, n, c) for w in WORKLOADS for n in (1, 2) for c in ("default", "cap0"))}
    print(markdown(sorted(done.values(), key=lambda r: order.get(r["name"], 99))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
