"""kvmwake.cli.sweep: local and Dask sweeps agree exactly, survive dead workers, resume."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import time

import pytest

from kvmwake.cli import sweep

SCENARIO = "ipi-storm"
PARAMS = {"halt_poll_ns": [0, 20_000, 200_000], "vcpus": [4], "sim_ms": [2]}
SEEDS = 2


def crash_once(spec, marker, target):
    """A point function whose worker process dies, once, on point ``target``."""
    if spec["id"] == target and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os._exit(13)
    return sweep.run_point(spec)


def always_fails(spec, target):
    if spec["id"] == target:
        raise RuntimeError("this point cannot be simulated")
    return sweep.run_point(spec)


def _table(out):
    with open(os.path.join(out, "results.csv")) as fh:
        return fh.read()


def _local(out, **kw):
    return sweep.run_sweep(SCENARIO, PARAMS, SEEDS, str(out), workers=2, **kw)


def test_points_and_seeds_are_stable():
    a = sweep.make_points(SCENARIO, PARAMS, SEEDS, base_seed=7)
    b = sweep.make_points(SCENARIO, dict(reversed(list(PARAMS.items()))), SEEDS, base_seed=7)
    assert len(a) == 6 and len({p["id"] for p in a}) == 6
    assert {p["id"]: p["seed"] for p in a} == {p["id"]: p["seed"] for p in b}
    c = sweep.make_points(SCENARIO, PARAMS, SEEDS, base_seed=8)
    assert [p["seed"] for p in a] != [p["seed"] for p in c]
    assert sweep.parse_params(["halt_poll_ns=0,10us,1_000", "sim_ms=3"]) == {
        "halt_poll_ns": [0, 10_000, 1_000], "sim_ms": [3]}
    for bad in (["nope=1"], ["halt_poll_ns"], ["halt_poll_ns=1,1"], ["vcpus=x"]):
        with pytest.raises(sweep.SweepError):
            sweep.parse_params(bad)


def test_costs_and_module_params_are_applied():
    p = sweep.make_points(SCENARIO, {"wake_to_run_ns": [12_345], "halt_poll_ns_grow": [3],
                                     "vcpus": [3], "host_cpus": [2], "sim_ms": [1]}, 1)[0]
    host, sim_ns, _ = sweep.build_point(p)
    assert host.costs["wake_to_run_ns"] == 12_345
    assert host.halt_poll_ns_grow == 3 and host.host_cpus == 2
    assert sum(vm.nr_vcpus for vm in host.vms) == 3 and sim_ns == 1_000_000
    assert host.seed == p["seed"]


def test_local_sweep(tmp_path):
    res = _local(tmp_path)
    assert res["ran"] == 6 and res["skipped"] == 0 and not res["failed"]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 6
    assert len(os.listdir(tmp_path / "points")) == 6
    polls = {int(r["halt_poll_ns"]): float(r["poll_cpu_fraction"]) for r in rows}
    assert polls[0] == 0 and polls[200_000] > polls[20_000] > 0
    assert all(int(r["wake_count"]) > 0 for r in rows)
    # Equal sweeps give equal tables, whatever the worker count.
    other = tmp_path / "one-worker"
    sweep.run_sweep(SCENARIO, PARAMS, SEEDS, str(other), workers=1, plot=False)
    assert _table(other) == _table(tmp_path)
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    except ImportError:
        pass


def test_resume_skips_finished_points(tmp_path):
    _local(tmp_path, plot=False)
    first = _table(tmp_path)
    mtimes = {f: os.path.getmtime(tmp_path / "points" / f) for f in os.listdir(tmp_path / "points")}
    res = _local(tmp_path, plot=False)
    assert res["ran"] == 0 and res["skipped"] == 6
    gone = sorted(mtimes)[0]
    os.remove(tmp_path / "points" / gone)
    res = _local(tmp_path, plot=False)
    assert res["ran"] == 1 and res["skipped"] == 5
    assert _table(tmp_path) == first
    for f, m in mtimes.items():
        if f != gone:
            assert os.path.getmtime(tmp_path / "points" / f) == m


def test_local_worker_killed_mid_sweep(tmp_path):
    ref = tmp_path / "ref"
    _local(ref, plot=False)
    target = sweep.make_points(SCENARIO, PARAMS, SEEDS)[3]["id"]
    marker = tmp_path / "crashed"
    out = tmp_path / "out"
    res = _local(out, plot=False,
                 point_fn=functools.partial(crash_once, marker=str(marker), target=target))
    assert marker.exists(), "the worker did not die"
    assert not res["failed"] and len(res["rows"]) == 6
    assert _table(out) == _table(ref)
    assert json.load(open(out / "points" / f"{target}.json"))["attempts"] == 2


def test_failing_point_is_reported_by_name(tmp_path, capsys):
    target = sweep.make_points(SCENARIO, PARAMS, SEEDS)[1]["id"]
    res = _local(tmp_path, plot=False, point_fn=functools.partial(always_fails, target=target))
    assert [f["id"] for f in res["failed"]] == [target]
    assert "cannot be simulated" in res["failed"][0]["error"]
    assert len(res["rows"]) == 5
    failed = json.load(open(tmp_path / "failed.json"))
    assert failed[0]["id"] == target and failed[0]["params"]["halt_poll_ns"] == 0
    # Resuming with a working point function fills the gap and clears the report.
    res = _local(tmp_path, plot=False)
    assert res["ran"] == 1 and not res["failed"] and not (tmp_path / "failed.json").exists()


def _cli(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    sweep.build_parser(sub)
    args = p.parse_args(argv)
    return args.sweep_run(args)


def test_cli(tmp_path, capsys):
    rc = _cli(["sweep", SCENARIO, "--param", "halt_poll_ns=0,50us", "--param", "vcpus=3",
               "--param", "sim_ms=1", "--seeds", "1", "--workers", "2", "-o", str(tmp_path),
               "--no-plot", "-q"])
    assert rc == 0
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == 2
    rc = _cli(["sweep", SCENARIO, "--param", "bogus=1", "-o", str(tmp_path)])
    assert rc == 2 and "unknown parameter" in capsys.readouterr().err


def test_unreachable_scheduler_fails_fast(tmp_path, capsys):
    pytest.importorskip("dask.distributed", reason="dask.distributed is not installed")
    t0 = time.monotonic()
    with pytest.raises(sweep.SweepError, match="cannot reach the Dask scheduler"):
        sweep.run_sweep(SCENARIO, PARAMS, 1, str(tmp_path), scheduler="tcp://127.0.0.1:1",
                        scheduler_timeout=2)
    assert time.monotonic() - t0 < 10
    rc = _cli(["sweep", SCENARIO, "--param", "vcpus=2", "--scheduler", "127.0.0.1:1",
               "--scheduler-timeout", "2", "-o", str(tmp_path / "cli")])
    assert rc == 2 and "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert time.monotonic() - t0 < 20


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("dask.distributed",
                                      reason="dask.distributed is not installed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=":0",
                                       silence_logs=40)
    try:
        yield cluster
    finally:
        cluster.close()


def test_dask_sweep_equals_local(tmp_path, dask_cluster):
    local = tmp_path / "local"
    _local(local, plot=False)
    remote = tmp_path / "dask"
    res = sweep.run_sweep(SCENARIO, PARAMS, SEEDS, str(remote),
                          scheduler=dask_cluster.scheduler_address, plot=False)
    assert res["ran"] == 6 and not res["failed"]
    assert _table(remote) == _table(local)
    for f in os.listdir(local / "points"):
        a = json.load(open(local / "points" / f))
        b = json.load(open(remote / "points" / f))
        assert a["result"] == b["result"] and a["spec"] == b["spec"]


def test_dask_worker_killed_mid_sweep(tmp_path, dask_cluster):
    local = tmp_path / "local"
    _local(local, plot=False)
    target = sweep.make_points(SCENARIO, PARAMS, SEEDS)[4]["id"]
    marker = tmp_path / "crashed"
    remote = tmp_path / "dask"
    res = sweep.run_sweep(SCENARIO, PARAMS, SEEDS, str(remote),
                          scheduler=dask_cluster.scheduler_address, plot=False,
                          point_fn=functools.partial(crash_once, marker=str(marker),
                                                     target=target))
    assert marker.exists(), "the worker did not die"
    assert not res["failed"] and len(res["rows"]) == 6
    assert _table(remote) == _table(local)


# ---------------------------------------------------------------- the grid, checked first

def _sweep_cli(tmp_path, *argv):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "kvmwake", "sweep", *argv],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("param, words", [
    ("vcpus=0", "--param vcpus: '0' (0) is outside 1..16777216"),
    ("vcpus=4,1025", "--param vcpus=1025: ipi-storm cannot run with 1025 vCPUs"),
    ("halt_poll_ns=abc", "--param halt_poll_ns: bad value 'abc'"),
    ("halt_poll_ns=5s", "--param halt_poll_ns: '5s' (5000000000) is outside"),
    ("sim_ms=0", "--param sim_ms: '0' is outside"),
    ("sim_ms=nan", "--param sim_ms: bad value 'nan'"),
    ("wake_to_run_ns=2000s", "--param wake_to_run_ns"),
])
def test_bad_grid_fails_before_anything_runs(tmp_path, param, words):
    r = _sweep_cli(tmp_path, "ipi-storm", "--param", param, "-o", "out")
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()       # nothing started, nothing created


def test_sim_ms_takes_decimals_like_run():
    assert sweep.parse_params(["sim_ms=0.5,2"]) == {"sim_ms": [0.5, 2]}
    spec = sweep.make_points("ipi-storm", {"sim_ms": [0.5], "vcpus": [4]}, 1)[0]
    _, sim_ns, _ = sweep.build_point(spec)
    assert sim_ns == 500_000


def test_mean_and_confidence_interval():
    st = sweep.mean_ci([10, 12, 14])
    # mean 12, sd 2, t(0.975, 2) = 4.3027: half-width 4.3027 * 2 / sqrt(3)
    assert st["mean"] == 12 and st["sd"] == 2
    assert abs(st["ci95"] - 4.302653 * 2 / 3 ** 0.5) < 1e-4
    assert sweep.mean_ci([5])["ci95"] is None and sweep.mean_ci([])["mean"] is None
    assert abs(sweep.t_quantile_975(30) - 2.0423) < 1e-3


def test_sweep_reports_spread_over_seeds(tmp_path):
    r = _sweep_cli(tmp_path, "ipi-storm", "--param", "halt_poll_ns=0,200us", "--param",
                   "vcpus=4", "--param", "sim_ms=1.5", "--seeds", "3", "--workers", "2",
                   "-o", "out", "--no-plot")
    assert r.returncode == 0, r.stderr
    assert "+-" in r.stdout and "95% confidence" in r.stdout
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["confidence"] == 0.95 and len(doc["points"]) == 2
    with open(tmp_path / "out" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    for p in doc["points"]:
        assert p["seeds"] == 3
        mine = [float(x["halts"]) for x in rows
                if int(x["halt_poll_ns"]) == p["params"]["halt_poll_ns"]]
        assert p["halts"] == sweep.mean_ci(mine) and p["halts"]["ci95"] is not None


def test_tradeoff_plot_has_error_bars(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"halt_poll_ns": h, "poll_cpu_fraction": 0.01 * k + h * 1e-8, "wake_p50_ns": 5000 + k,
             "wake_p99_ns": 9000 + 100 * k, "halts": 10 + k, "scenario": "ipi-storm",
             "arch": "x86", "vcpus": 8, "host_cpus": 4, "sim_ns": 10_000_000}
            for h in (0, 200000) for k in range(3)]
    import matplotlib.axes
    calls = []
    orig = matplotlib.axes.Axes.errorbar

    def spy(self, *a, **k):
        calls.append(k)
        return orig(self, *a, **k)
    matplotlib.axes.Axes.errorbar = spy
    try:
        assert sweep._plot(str(tmp_path), rows, ["halt_poll_ns"], scenario="ipi-storm")
    finally:
        matplotlib.axes.Axes.errorbar = orig
    # p50 and p99 of each of the two points, each with its spread over the three seeds.
    assert len(calls) == 4 and all(c["yerr"][0] > 0 and c["xerr"][0] > 0 for c in calls)
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000


def test_help_texts(capsys):
    parser = argparse.ArgumentParser()
    sweep.build_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "simulation engine" in out and "print nothing but errors" in out
