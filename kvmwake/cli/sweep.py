"""Parameter sweeps: ``kvmwake sweep SCENARIO --param NAME=V1,V2 ... --seeds K -o DIR``.

Every point of the sweep is one assignment of the swept parameters (the
cross product of the ``--param`` lists) and one seed index ``0..K-1``.  A
point's seed is derived from the base seed and the point's identity (a hash
of the scenario, the parameter assignment and the seed index), so results do
not depend on which worker ran which point, or in what order.

Parameters:

* kvm module parameters: ``halt_poll_ns``, ``halt_poll_ns_grow``,
  ``halt_poll_ns_grow_start``, ``halt_poll_ns_shrink``;
* the scenario's size and length: ``vcpus``, ``host_cpus``, ``sim_ms``
  (or ``sim_ns``);
* modelled costs: ``vm_exit_ns``, ``vm_entry_ns``, ``ipi_send_ns``,
  ``wake_to_run_ns``, ``context_switch_ns``, ``sched_slice_ns``;
* ``halt_poll`` (the scenario's per-VM KVM_CAP_HALT_POLL ceiling).

Values are integers (``_`` allowed) with an optional ``ns``/``us``/``ms``/``s``
suffix for the time-valued ones; ``sim_ms`` takes decimals (``0.5``) as ``run
--sim-ms`` does.  The whole grid is checked before any point runs: each value
against its range (``vcpus`` 1..2**24, ``host_cpus`` 1..2**20, the module
parameters and ``halt_poll`` an unsigned int, costs 0..2**40 ns, run lengths
1 ns..2**62 ns) and each ``vcpus`` value against the scenario's programs and
sources (``scenarios.expand.check_vm``), so a bad grid fails at once with the
parameter named.

Over the seeds of each parameter assignment the sweep reports the mean and
a 95% confidence interval (Student's t, ``ci95`` = half-width) of the wake
latency p50/p99, the polling CPU share and the halts: printed as a table,
written to ``DIR/summary.json`` and drawn as error bars in ``tradeoff.png``.

Points run in local processes (``--workers``) or on a Dask distributed
cluster (``--scheduler ADDRESS``).  Locally, the CPUs the workers leave go
to each point's host as its threads (a host of islands runs them at once;
the results are the same).  Each finished point is written at once:
``DIR/points/<id>.json`` and a row appended to ``DIR/results.csv``; at the
end ``results.csv`` is rewritten in the sweep's canonical order (so equal
sweeps give equal files), ``DIR/results.parquet`` is written when pyarrow
is installed and ``DIR/tradeoff.png`` (host CPU spent polling against wake
latency p50/p99) when matplotlib is.  A resumed sweep skips points whose JSON
exists.  A point that fails (an error, or its worker process dying) is
retried once; if it fails again it is reported by name in
``DIR/failed.json`` and the command exits with status 1.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import time

from ..model import COST_NAMES
from . import argtypes as _argtypes
from ..outputs import plots as _plots
from ..durations import UNITS as _UNITS
from ..haltpoll import MODULE_PARAMS
from ..outputs.stats import mean_ci, t_quantile_975  # noqa: F401  (one CI for table and plot)

BUILD_PARAMS = ("vcpus", "host_cpus", "sim_ms", "sim_ns")
SCENARIO_PARAMS = ("halt_poll",)
PARAM_NAMES = MODULE_PARAMS + BUILD_PARAMS + tuple(COST_NAMES) + SCENARIO_PARAMS
#: Attempts per point (the first run and one retry).
ATTEMPTS = 2
#: The table's columns after the swept parameters.
RESULT_COLUMNS = ("point", "seed_index", "seed", "scenario", "arch", "vcpus", "host_cpus",
                  "sim_ns", "events", "halts", "halt_successful_poll", "halt_attempted_poll",
                  "halt_wakeup", "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns",
                  "poll_cpu_fraction", "wake_count", "wake_p50_ns", "wake_p90_ns",
                  "wake_p99_ns", "wake_max_ns")


class SweepError(Exception):
    """A sweep that cannot start or go on (bad parameters, unreachable scheduler)."""


# -- the points --------------------------------------------------------------------------

def _ranges() -> dict:
    from ..host import MAX_COST_NS, MAX_HOST_CPUS
    r = {name: (0, 0xFFFF_FFFF) for name in MODULE_PARAMS + SCENARIO_PARAMS}
    r.update({name: (0, MAX_COST_NS) for name in COST_NAMES})
    r.update({"vcpus": (1, 1 << 24), "host_cpus": (1, MAX_HOST_CPUS), "sim_ns": (1, 1 << 62),
              "sim_ms": (1e-6, (1 << 62) / 1e6)})
    return r


def parse_value(text: str, name: str | None = None):
    """One value of ``--param NAME=...``: an integer with an optional ns/us/ms/s suffix
    (``sim_ms``: a decimal number of ms), checked against NAME's range."""
    what = f"--param {name}: " if name else ""
    if name == "sim_ms":
        try:
            v = float(text.replace("_", ""))
        except ValueError:
            raise SweepError(f"{what}bad value {text!r}: a number of ms, like 2 or 0.5") \
                from None
        if v != v or v in (float("inf"), float("-inf")):
            raise SweepError(f"{what}bad value {text!r}: a finite number of ms")
        if v == int(v):
            v = int(v)
        elif (v * 1_000_000) != int(v * 1_000_000):
            raise SweepError(f"{what}{text!r} ms is not a whole number of ns")
    else:
        m = re.fullmatch(r"\s*([0-9][0-9_]*)\s*(ns|us|ms|s)?\s*", text)
        if not m or len(m.group(1)) > 30:
            raise SweepError(f"{what}bad value {text!r}: an integer, optionally with "
                             f"ns/us/ms/s")
        v = int(m.group(1).replace("_", "")) * _UNITS[m.group(2) or "ns"]
    if name is not None:
        lo, hi = _ranges()[name]
        if not lo <= v <= hi:
            raise SweepError(f"{what}{text!r} is outside {lo:g}..{hi:g}" if name == "sim_ms"
                             else f"{what}{text!r} ({v}) is outside {lo}..{hi}")
    return v


def check_grid(scenario, params: dict) -> None:
    """Every value against the scenario before anything runs: the vCPU counts (split
    into VMs of at most the file's per_vm) against its programs and sources."""
    from .. import scenarios
    from ..scenarios.expand import check_vm
    try:
        sc = scenarios.get(scenario) if isinstance(scenario, str) else scenario
    except Exception as exc:                           # noqa: BLE001
        raise SweepError(str(exc)) from None
    for v in params.get("vcpus", []):
        per = min(sc.vcpus_per_vm, v)
        try:
            check_vm(sc, per)
            if v % per:
                check_vm(sc, v % per)
        except scenarios.ScenarioError as exc:
            raise SweepError(f"--param vcpus={v}: {sc.name} cannot run with {v} vCPUs "
                             f"(VMs of {per}{f' and {v % per}' if v % per else ''}): "
                             f"{exc}") from None
    if "sim_ms" in params and "sim_ns" in params:
        raise SweepError("--param sim_ms and sim_ns: give one of them")


def parse_params(specs) -> dict:
    """``["NAME=V1,V2", ...]`` -> ``{name: [v1, v2]}`` (in the order given)."""
    out: dict = {}
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not values.strip():
            raise SweepError(f"--param {spec!r}: write NAME=V1,V2,...")
        if name not in PARAM_NAMES:
            raise SweepError(f"--param {name}: unknown parameter (known: {', '.join(PARAM_NAMES)})")
        if name in out:
            raise SweepError(f"--param {name} given twice")
        vals = [parse_value(v, name) for v in values.split(",")]
        if len(set(vals)) != len(vals):
            raise SweepError(f"--param {name}: a value is repeated")
        out[name] = vals
    return out


def point_id(scenario: str, params: dict, seed_index: int) -> str:
    ident = json.dumps({"scenario": scenario, "params": sorted(params.items()),
                        "seed_index": seed_index}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def point_seed(base_seed: int, pid: str) -> int:
    h = hashlib.sha256(f"{base_seed}:{pid}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def make_points(scenario: str, params: dict, seeds: int, base_seed: int = 0,
                engine: str = "core") -> list:
    """Every point of the sweep, in canonical order (parameter lists as given, seed last)."""
    names = list(params)
    out = []
    for values in itertools.product(*(params[n] for n in names)):
        assign = dict(zip(names, values))
        for k in range(seeds):
            pid = point_id(scenario, assign, k)
            out.append({"id": pid, "scenario": scenario, "params": assign, "seed_index": k,
                        "seed": point_seed(base_seed, pid), "engine": engine})
    return out


def build_point(spec: dict):
    """The host, run length and scenario of a point (costs and module parameters
    applied through a copy of the scenario)."""
    from .. import scenarios
    params = spec["params"]
    sc = scenarios.get(spec["scenario"]) if isinstance(spec["scenario"], str) \
        else spec["scenario"]
    costs = dict(sc.costs)
    module = dict(sc.module_params)
    changes = {}
    for name, v in params.items():
        if name in COST_NAMES:
            costs[name] = v
        elif name in MODULE_PARAMS:
            module[name] = v
        elif name == "halt_poll":
            changes["halt_poll"] = v
    sc = dataclasses.replace(sc, costs=costs, module_params=module, **changes)
    sim_ns = params.get("sim_ns")
    if "sim_ms" in params:
        sim_ns = int(round(params["sim_ms"] * 1_000_000))
    host, sim_ns, sc = scenarios.build(sc, vcpus=params.get("vcpus"),
                                       host_cpus=params.get("host_cpus"), sim_ns=sim_ns,
                                       seed=spec["seed"], engine=spec.get("engine", "core"),
                                       threads=spec.get("threads", 1))
    return host, sim_ns, sc


def run_point(spec: dict) -> dict:
    """Run one point; returns its result row (deterministic: no wall times)."""
    from ..outputs import stats as _stats
    host, sim_ns, sc = build_point(spec)
    host.run(sim_ns)
    rows = host.stats_array(copy=False)      # every VM's rows, read in place
    st = _stats.sum_rows(rows, host.arch)
    lat = _stats.latency_percentiles(host.latency_histogram())
    poll_ns = st["halt_poll_success_ns"] + st["halt_poll_fail_ns"]
    row = {"point": spec["id"], "seed_index": spec["seed_index"], "seed": spec["seed"],
           "scenario": sc.name, "arch": host.arch, "vcpus": int(rows.shape[0]),
           "host_cpus": host.host_cpus, "sim_ns": sim_ns, "events": host.events,
           "halts": host.halts,
           "halt_successful_poll": st["halt_successful_poll"],
           "halt_attempted_poll": st["halt_attempted_poll"],
           "halt_wakeup": st["halt_wakeup"],
           "halt_poll_success_ns": st["halt_poll_success_ns"],
           "halt_poll_fail_ns": st["halt_poll_fail_ns"], "halt_wait_ns": st["halt_wait_ns"],
           "poll_cpu_fraction": poll_ns / (sim_ns * host.host_cpus) if sim_ns else 0.0,
           "wake_count": lat["count"], "wake_p50_ns": lat["p50"], "wake_p90_ns": lat["p90"],
           "wake_p99_ns": lat["p99"], "wake_max_ns": lat["max"]}
    return row


# -- running -------------------------------------------------------------------------------

class _Store:
    """DIR/points/<id>.json, DIR/results.csv (appended), the final files."""

    def __init__(self, out_dir: str, param_names: list):
        self.dir = out_dir
        self.points = os.path.join(out_dir, "points")
        os.makedirs(self.points, exist_ok=True)
        self.columns = list(param_names) + [c for c in RESULT_COLUMNS if c not in param_names]
        self.csv = os.path.join(out_dir, "results.csv")

    def path(self, pid):
        return os.path.join(self.points, f"{pid}.json")

    def done(self, pid) -> bool:
        try:
            with open(self.path(pid)) as fh:
                json.load(fh)
            return True
        except (OSError, ValueError):
            return False

    def load(self, pid) -> dict:
        with open(self.path(pid)) as fh:
            return json.load(fh)

    def row(self, spec, result) -> dict:
        return {**spec["params"], **result}

    def save(self, spec, result, extra: dict) -> None:
        doc = {"spec": {k: spec[k] for k in ("id", "scenario", "params", "seed_index", "seed",
                                             "engine")},
               "result": result, **extra}
        tmp = self.path(spec["id"]) + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, sort_keys=True, indent=1)
        os.replace(tmp, self.path(spec["id"]))     # a point is done once its JSON is whole
        new = not os.path.exists(self.csv) or os.path.getsize(self.csv) == 0
        with open(self.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(self.row(spec, result))

    def finish(self, points) -> list:
        """Rewrite results.csv in canonical order from the point files; returns the rows."""
        rows = [self.row(p, self.load(p["id"])["result"]) for p in points if self.done(p["id"])]
        tmp = self.csv + ".tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv)
        return rows


def _local_run(todo, fn, workers, on_done, on_fail, log):
    """Run ``todo`` in local processes; a dead worker breaks the pool, which is
    rebuilt, and the points it was running are charged an attempt."""
    attempts = {p["id"]: 0 for p in todo}
    queue = list(todo)
    while queue:
        with cf.ProcessPoolExecutor(max_workers=workers) as pool:
            running: dict = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < workers:
                    p = queue.pop(0)
                    attempts[p["id"]] += 1
                    running[pool.submit(fn, p)] = p
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    p = running.pop(fut)
                    try:
                        on_done(p, fut.result(), attempts[p["id"]])
                    except cf.process.BrokenProcessPool as exc:
                        broken = True
                        _retry_or_fail(p, exc, attempts, queue, on_fail, log)
                    except Exception as exc:          # noqa: BLE001 (reported by name)
                        _retry_or_fail(p, exc, attempts, queue, on_fail, log)
            if broken:
                # Everything still in the broken pool failed with it.
                for fut, p in running.items():
                    _retry_or_fail(p, cf.process.BrokenProcessPool("a worker process died"),
                                   attempts, queue, on_fail, log)
                pool.shutdown(wait=True, cancel_futures=True)


def _retry_or_fail(p, exc, attempts, queue, on_fail, log):
    msg = f"{type(exc).__name__}: {exc}"
    if attempts[p["id"]] < ATTEMPTS:
        log(f"point {p['id']} {_label(p)} failed ({msg}); retrying")
        queue.append(p)
    else:
        on_fail(p, msg)


def connect(address: str, timeout: float = 5.0):
    """A dask.distributed Client for ``address``; SweepError if it cannot be reached."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise SweepError("--scheduler needs dask.distributed: pip install 'kvmwake[sweep]'") \
            from None
    try:
        return Client(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s: "
                         f"{exc}") from None


def _dask_run(todo, fn, client, on_done, on_fail, log):
    from dask.distributed import as_completed
    attempts = {p["id"]: 1 for p in todo}
    futs = {}
    for p in todo:
        futs[client.submit(fn, p, key=f"kvmwake-point-{p['id']}-1", pure=False)] = p
    ac = as_completed(list(futs))
    for fut in ac:
        p = futs.pop(fut)
        try:
            result = fut.result()
        except Exception as exc:                      # noqa: BLE001 (incl. KilledWorker)
            msg = f"{type(exc).__name__}: {exc}"
            if attempts[p["id"]] < ATTEMPTS:
                attempts[p["id"]] += 1
                log(f"point {p['id']} {_label(p)} failed ({msg}); retrying")
                nf = client.submit(fn, p, key=f"kvmwake-point-{p['id']}-{attempts[p['id']]}",
                                   pure=False)
                futs[nf] = p
                ac.add(nf)
            else:
                on_fail(p, msg)
            continue
        on_done(p, result, attempts[p["id"]])


def _label(p) -> str:
    parts = [f"{k}={v}" for k, v in p["params"].items()]
    return "(" + ", ".join(parts + [f"seed #{p['seed_index']}"]) + ")"


def run_sweep(scenario: str, params: dict, seeds: int, out_dir: str, *, workers: int | None = None,
              scheduler: str | None = None, client=None, base_seed: int = 0,
              engine: str = "core", point_fn=None, scheduler_timeout: float = 5.0,
              log=None, plot: bool = True) -> dict:
    """Run (or resume) a sweep; returns ``{"rows", "failed", "skipped", "ran"}``.

    ``point_fn`` (default ``run_point``) must be importable by the workers.
    """
    if seeds < 1:
        raise SweepError("--seeds must be at least 1")
    log = log or (lambda msg: None)
    fn = point_fn or run_point
    check_grid(scenario, params)
    points = make_points(scenario, params, seeds, base_seed, engine)
    store = _Store(out_dir, list(params))
    todo = [p for p in points if not store.done(p["id"])]
    skipped = len(points) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(points)} points already done")
    failed: list = []

    def on_done(p, result, attempt):
        store.save(p, result, {"attempts": attempt})
        log(f"point {p['id']} {_label(p)} done")

    def on_fail(p, msg):
        failed.append({"id": p["id"], "params": p["params"], "seed_index": p["seed_index"],
                       "error": msg})
        log(f"point {p['id']} {_label(p)} FAILED after {ATTEMPTS} attempts: {msg}")

    own_client = None
    if todo:
        if scheduler is not None or client is not None:
            if client is None:
                client = own_client = connect(scheduler, scheduler_timeout)
            try:
                _dask_run(todo, fn, client, on_done, on_fail, log)
            finally:
                if own_client is not None:
                    own_client.close()
        else:
            nworkers = max(1, workers or os.cpu_count() or 1)
            # The CPUs left over by the worker processes go to each point's host, for
            # a host of islands (Host(threads=...)); results do not depend on it.
            per_point = max(1, (os.cpu_count() or 1) // min(nworkers, len(todo)))
            todo = [{**p, "threads": per_point} for p in todo]
            _local_run(todo, fn, nworkers, on_done, on_fail, log)
    rows = store.finish(points)
    failed_path = os.path.join(out_dir, "failed.json")
    if failed:
        with open(failed_path, "w") as fh:
            json.dump(failed, fh, indent=1, sort_keys=True)
    elif os.path.exists(failed_path):
        os.remove(failed_path)
    _write_parquet(out_dir, rows, store.columns)
    summary = summarize(rows, list(params))
    tmp = os.path.join(out_dir, "summary.json.tmp")
    with open(tmp, "w") as fh:
        json.dump({"scenario": scenario if isinstance(scenario, str) else scenario.name,
                   "seeds": seeds, "confidence": 0.95, "metrics": list(SUMMARY_METRICS),
                   "points": summary}, fh, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    if plot:
        _plot(out_dir, rows, list(params), summary,
              scenario if isinstance(scenario, str) else scenario.name)
    return {"rows": rows, "failed": failed, "skipped": skipped, "ran": len(todo),
            "summary": summary}


#: The figures summarised over the seeds of each parameter assignment.
SUMMARY_METRICS = ("wake_p50_ns", "wake_p99_ns", "poll_cpu_fraction", "halts")


def summarize(rows, names) -> list:
    """Per parameter assignment (in the sweep's order): its values and ``mean_ci`` of
    each of ``SUMMARY_METRICS`` over its seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[n] for n in names), []).append(r)
    return [{"params": dict(zip(names, key)), "seeds": len(rs),
             **{m: mean_ci([r[m] for r in rs]) for m in SUMMARY_METRICS}}
            for key, rs in groups.items()]


def format_summary(summary, names) -> str:
    """The table ``kvmwake sweep`` prints: mean +- 95% CI half-width over seeds."""
    def cell(st, scale, fmt):
        if st["mean"] is None:
            return "-"
        ci = "" if st["ci95"] is None else f" +- {fmt.format(st['ci95'] * scale)}"
        return fmt.format(st["mean"] * scale) + ci
    head = [*names, "seeds", "wake p50 (us)", "wake p99 (us)", "polling CPU (%)", "halts"]
    body = [[*(str(p["params"][n]) for n in names), str(p["seeds"]),
             cell(p["wake_p50_ns"], 1e-3, "{:.1f}"), cell(p["wake_p99_ns"], 1e-3, "{:.1f}"),
             cell(p["poll_cpu_fraction"], 100, "{:.2f}"), cell(p["halts"], 1, "{:.0f}")]
            for p in summary]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines) + "\n(mean +- 95% confidence half-width over seeds, Student t)"


def _write_parquet(out_dir, rows, columns) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, os.path.join(out_dir, "results.parquet"))
    return True


def _plot(out_dir, rows, names, summary=None, scenario="") -> bool:
    """tradeoff.png (``outputs.plots.tradeoff_figure``): host CPU spent polling vs wake
    latency p50/p99, one point per parameter assignment (mean and 95% CI over seeds)."""
    if not rows or not _plots.have_matplotlib():
        return False
    _plots.write_tradeoff(rows, names, os.path.join(out_dir, "tradeoff.png"))
    return True


# -- command line --------------------------------------------------------------------------

def build_parser(subparsers):
    """Add ``sweep`` to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "sweep", help="run a scenario over a grid of parameters and seeds, in local "
                      "processes or on a Dask cluster")
    p.add_argument("scenario", help="built-in scenario name or a scenario .toml file")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a swept parameter and its values (repeatable; known: "
                        f"{', '.join(PARAM_NAMES)})")
    p.add_argument("--seeds", type=_argtypes.positive_int, default=1, metavar="K",
                   help="seed indices per parameter assignment (default: %(default)s)")
    p.add_argument("--base-seed", type=_argtypes.nonneg_int, default=0,
                   help="base of the per-point seeds (default: %(default)s)")
    p.add_argument("--workers", type=_argtypes.positive_int, default=None, metavar="N",
                   help="local worker processes (default: the CPU count)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on this Dask distributed scheduler (e.g. tcp://host:8786)")
    p.add_argument("--scheduler-timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the scheduler (default: %(default)s)")
    p.add_argument("--engine", choices=("core", "reference"), default="core",
                   help="simulation engine: the Cython core or the plain-Python reference "
                        "twin (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="do not write tradeoff.png")
    p.add_argument("-o", "--out", required=True, metavar="DIR", type=_argtypes.nonempty_path,
                   help="output directory")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but errors (no per-point log, no table)")
    p.set_defaults(sweep_run=run)
    return p


def run(args) -> int:
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    try:
        params = parse_params(args.param)
        res = run_sweep(args.scenario, params, args.seeds, args.out, workers=args.workers,
                        scheduler=args.scheduler, base_seed=args.base_seed, engine=args.engine,
                        scheduler_timeout=args.scheduler_timeout, log=log,
                        plot=not args.no_plot)
    except SweepError as exc:
        print(f"kvmwake sweep: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_summary(res["summary"], list(params)))
        print(f"{len(res['rows'])} points in {args.out}/results.csv ({res['ran']} run, "
              f"{res['skipped']} resumed) in {time.perf_counter() - t0:.1f} s")
    if res["failed"]:
        names = ", ".join(f"{f['id']} {_label(f)}" for f in res["failed"])
        print(f"kvmwake sweep: {len(res['failed'])} point(s) failed: {names} "
              f"(see {args.out}/failed.json)", file=sys.stderr)
        return 1
    return 0
