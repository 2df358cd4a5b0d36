#!/usr/bin/env python
"""Instructions per simulated halt on ``ipi-storm``, counted by valgrind's callgrind.

    python bench/instructions.py [--vcpus 1024] [--sim-ms 20] [--peers-sim-ms 20]
                                 [--sizes 1024,65536] [--out FILE]

Wall-clock figures on a shared machine move with its load; instruction
counts do not.  Each figure here is one run under
``valgrind --tool=callgrind`` (no cache simulation), with
``PYTHONHASHSEED=0`` so that the Python side is the same every time:

* **kvmwake core**, two ways: (a) collection switched on only inside the
  event loop (``--collect-atstart=no --toggle-collect=*6Engine_*run*``:
  the methods ``Engine.run`` and ``Engine.run_until_exit`` and everything
  they call, the C ``run_loop`` included, which the C compiler may inline
  into them), and (b) the whole process
  minus a twin process that builds the same host and does not run it;
* **kvmwake.reference** and **SimPy** (``bench/simpy_ipi_storm.py``): way
  (b), at ``--peers-sim-ms`` of virtual time;
* **the floor** (``bench/_floor.pyx``, replaying the core's heap traffic of
  the same run): collection only inside its ``replay`` function.

``--sizes`` also counts the core's event loop (way (a)) at other vCPU
counts, for the scaling of instructions per halt.  The valgrind command
lines are printed with the results.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: callgrind's toggle for the core's event loop: the Engine methods that run it (the C
#: compiler may inline run_loop into them, so its own name is not enough).
LOOP_TOGGLE = "*6Engine_*run*"
if HERE not in sys.path:
    sys.path.insert(0, HERE)
MS = 1_000_000


# -- what runs under valgrind ---------------------------------------------------------


def child(what: str, vcpus: int, sim_ms: float, run: bool, ops_path: str | None) -> dict:
    if what == "floor":
        import numpy as np
        import floorloop
        fl = floorloop.load()
        ops = np.load(ops_path)
        if run:
            _, pushes, pops, left, _ = fl.replay(ops)
            return {"pushes": pushes, "pops": pops}
        return {}
    sim_ns = int(sim_ms * MS)
    if what == "simpy":
        import simpy_ipi_storm
        storm = simpy_ipi_storm.IpiStorm(vcpus, 0)
        if run:
            storm.run(sim_ns)
        return {"halts": storm.stats.halts, "events": None}
    from kvmwake import _core, scenarios
    host, ns, _ = scenarios.build("ipi-storm", vcpus=vcpus, sim_ns=sim_ns, seed=0,
                                  engine=what, trace_capacity=0)
    if run:
        host.run(ns)
    out = {"halts": host.halts, "events": host.events}
    if what == "core" and run:
        cnt = _core.bench_counters(host._engine)
        out["pops"] = cnt["pushes"] - cnt["heap_len"]
    return out


#: The cache simulated with --cache-sim: this machine's L1d (32 KiB per core,
#: 8-way) and its L3 (32 MiB, 16-way) as valgrind's last level; 64-byte lines.
CACHE_SIM = ["--cache-sim=yes", "--I1=32768,8,64", "--D1=32768,8,64", "--LL=33554432,16,64"]


def valgrind(args_child: list[str], toggle: str | None,
             cache_sim: bool = False) -> tuple[int, dict, str]:
    """Run this script's child mode under callgrind; (instructions, child's result, command).

    With ``cache_sim`` the child's result also gets ``"counters"``: every event
    callgrind counted (Ir, Dr, Dw, I1mr, D1mr, D1mw, ILmr, DLmr, DLmw).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "callgrind.out")
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
        if cache_sim:
            vg += CACHE_SIM
        if toggle:
            vg += ["--collect-atstart=no", f"--toggle-collect={toggle}"]
        cmd = vg + [sys.executable, os.path.abspath(__file__), "--child"] + args_child
        env = dict(os.environ, PYTHONHASHSEED="0")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        with open(out_file) as fh:
            text = fh.read()
        m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
        if not m:
            raise RuntimeError(f"no instruction total in {out_file}")
        result = json.loads(res.stdout.strip().splitlines()[-1])
        ev = re.search(r"^events:\s*(.+)$", text, re.M)
        tot = re.search(r"^(?:summary|totals):\s*([\d ]+)$", text, re.M)
        if ev and tot:
            result["counters"] = dict(zip(ev.group(1).split(), map(int, tot.group(1).split())))
        shown = "valgrind --tool=callgrind" + (" " + " ".join(CACHE_SIM) if cache_sim else "") + (
            f" --collect-atstart=no --toggle-collect='{toggle}'" if toggle else "")
        shown += " python bench/instructions.py --child " + " ".join(args_child)
        return int(m.group(1)), result, shown


def measure(what, vcpus, sim_ms, ops_path=None, toggle=None, subtract=True):
    base = [what, str(vcpus), str(sim_ms)] + (["--ops", ops_path] if ops_path else [])
    t0 = time.perf_counter()
    ins, res, shown = valgrind(base + ["--run"], toggle)
    rec = {"what": what, "vcpus": vcpus, "sim_ms": sim_ms, "instructions": ins, **res,
           "command": shown, "method": "toggle" if toggle else "whole process"}
    if subtract and not toggle:
        ins0, _, shown0 = valgrind(base, None)
        rec.update(instructions=ins - ins0, whole=ins, baseline=ins0,
                   command=f"{shown}  minus  {shown0}", method="whole process minus build only")
    print(f"  ({what} {vcpus:,} vCPUs {sim_ms:g} ms, {rec['method']}: "
          f"{rec['instructions']:,} instructions, {time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    return rec


def cache_report(args, lines, printed) -> int:
    say = lines.append
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        t0 = time.perf_counter()
        ins, res, shown = valgrind(["core", str(n), str(args.sim_ms), "--run"], LOOP_TOGGLE,
                                   cache_sim=True)
        rows.append((n, res, shown))
        print(f"  (core {n:,} vCPUs, cache simulation: {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    say(f"ipi-storm, seed 0, {args.sim_ms:g} ms of virtual time; collection inside `Engine.run` / `run_until_exit` "
        "only; simulated caches: L1d 32 KiB 8-way, last level 32 MiB 16-way (this machine's "
        "L3), 64-byte lines.  Per simulated halt:")
    say("")
    say("| vCPUs | halts | instructions | data reads | data writes | L1d misses "
        "| last-level data misses | instructions per halt, relative to the first row "
        "| LL misses per halt, relative to the first row |")
    say("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = None
    for n, res, _ in rows:
        c, h = res["counters"], res["halts"]
        per = {k: v / h for k, v in c.items()}
        ll = per.get("DLmr", 0) + per.get("DLmw", 0)
        d1 = per.get("D1mr", 0) + per.get("D1mw", 0)
        if first is None:
            first = (per["Ir"], ll)
        say(f"| {n:,} | {h:,} | {per['Ir']:,.0f} | {per.get('Dr', 0):,.0f} | "
            f"{per.get('Dw', 0):,.0f} | {d1:,.1f} | {ll:,.2f} | {per['Ir'] / first[0]:.2f}x | "
            + (f"{ll / first[1]:,.1f}x |" if first[1] else "— |"))
    say("")
    say("Commands (under `PYTHONHASHSEED=0`):")
    say("")
    for _, _, shown in rows:
        say(f"- `{shown}`")
    say("")
    print("\n".join(lines[printed:]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=3, metavar=("WHAT", "VCPUS", "SIM_MS"), help=argparse.SUPPRESS)
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ops", help=argparse.SUPPRESS)
    p.add_argument("--vcpus", type=int, default=1024)
    p.add_argument("--sim-ms", type=float, default=20.0,
                   help="virtual ms of the core and floor runs (default: %(default)s)")
    p.add_argument("--peers-sim-ms", type=float, default=20.0,
                   help="virtual ms of the reference and SimPy runs (default: %(default)s)")
    p.add_argument("--sizes", default="1024,65536",
                   help="vCPU counts for the core's event loop alone (default: %(default)s)")
    p.add_argument("--no-peers", action="store_true", help="skip the reference and SimPy")
    p.add_argument("--cache-sim", action="store_true",
                   help="instead: the core's event loop at --sizes with callgrind's cache "
                        "simulation (this machine's L1d and L3), misses per halt")
    p.add_argument("--out", metavar="PATH", help="also write the report to PATH")
    args = p.parse_args(argv)
    if args.child:
        what, n, ms = args.child
        print(json.dumps(child(what, int(n), float(ms), args.run, args.ops)))
        return 0

    from compare import cpu_model, source, versions
    import numpy as np
    from compare_peers import record_heap_ops
    vg = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    lines: list[str] = []
    say = lines.append
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + list(argv or sys.argv[1:]))
    say("### Instructions per simulated halt (callgrind)")
    say("")
    say(f"- command: `{cmd}`")
    say(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say(f"- machine: {cpu_model()}, {platform.platform()}; {vg}; PYTHONHASHSEED=0")
    say(f"- kvmwake source: {source()}")
    say("- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    say("")
    print("\n".join(lines), flush=True)
    printed = len(lines)

    if args.cache_sim:
        return cache_report(args, lines, printed)
    recs = []
    core_t = measure("core", args.vcpus, args.sim_ms, toggle=LOOP_TOGGLE)
    core_s = measure("core", args.vcpus, args.sim_ms)
    recs += [core_t, core_s]
    with tempfile.TemporaryDirectory() as tmp:
        ops, rec = record_heap_ops(args.vcpus, int(args.sim_ms * MS), 0)
        assert rec["pops"] == core_t["pops"], (rec, core_t)
        path = os.path.join(tmp, "ops.npy")
        np.save(path, ops)
        fl = measure("floor", args.vcpus, args.sim_ms, ops_path=path, toggle="*_floor*replay*")
        fl["command"] = fl["command"].replace(path, "OPS.npy")
        fl["halts"], fl["events"] = core_t["halts"], core_t["events"]
    recs.append(fl)
    if not args.no_peers:
        recs.append(measure("reference", args.vcpus, args.peers_sim_ms))
        recs.append(measure("simpy", args.vcpus, args.peers_sim_ms))
        if args.peers_sim_ms != args.sim_ms:
            recs.append(measure("core", args.vcpus, args.peers_sim_ms, toggle=LOOP_TOGGLE))
    sizes = [int(s) for s in args.sizes.split(",") if int(s) != args.vcpus]
    for n in sizes:
        recs.append(measure("core", n, args.sim_ms, toggle=LOOP_TOGGLE))

    say(f"ipi-storm, seed 0.  For the floor, \"events\" are its pops: the same pushes and pops "
        f"as the core's run (OPS.npy: the core's heap traffic, recorded as in "
        f"`bench/compare_peers.py`).")
    say("")
    say("| what | vCPUs | simulated ms | method | instructions | halts | live events "
        "| instructions / halt | instructions / event |")
    say("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    names = {"core": "kvmwake core", "reference": "kvmwake.reference", "simpy": "SimPy model",
             "floor": "floor (replay)"}
    for r in recs:
        ins, h = r["instructions"], r["halts"]
        ev = r.get("pops") if r["what"] == "floor" else r.get("events")
        cells = [names[r["what"]], f"{r['vcpus']:,}", f"{r['sim_ms']:g}", r["method"], f"{ins:,}",
                 f"{h:,}", f"{ev:,}" if ev else "—", f"{ins / h:,.0f}",
                 f"{ins / ev:,.0f}" if ev else "—"]
        say("| " + " | ".join(cells) + " |")
    say("")
    say(f"- core / floor, instructions on the same heap traffic: "
        f"{core_t['instructions'] / fl['instructions']:.2f}x "
        f"({core_t['instructions'] / core_t['pops']:.0f} vs "
        f"{fl['instructions'] / fl['pops']:.0f} per popped event)")
    for r in recs:
        if r["what"] in ("reference", "simpy"):
            same = next((c for c in recs if c["what"] == "core" and c["method"] == "toggle"
                         and c["vcpus"] == r["vcpus"] and c["sim_ms"] == r["sim_ms"]), None)
            if same:
                ratio = (r["instructions"] / r["halts"]) / (same["instructions"] / same["halts"])
                say(f"- {names[r['what']]} / core's event loop, instructions per halt: {ratio:,.0f}x")
    say("")
    say("Commands (under `PYTHONHASHSEED=0`):")
    say("")
    for r in recs:
        say(f"- `{r['command']}`")
    say("")
    print("\n".join(lines[printed:]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
