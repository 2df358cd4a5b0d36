"""Issue 16 items 1, 5, 10: the core-missing message, honest latency percentiles,
and the library's VM-level read-outs (now, latency_histogram, comparable stats,
duration strings, vcpu.run's watchdog)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import kvmwake as kw
from kvmwake import guest as g
from kvmwake.errors import ProgramError
from kvmwake.model import LAT_BUCKETS, LAT_REL_ERROR, lat_bucket, lat_bucket_low, lat_bucket_width
from kvmwake.outputs import stats as st

ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- 1: the compiled core missing ---------------------------------------------------------

@pytest.fixture
def tree_without_core(tmp_path):
    shutil.copytree(ROOT / "kvmwake", tmp_path / "kvmwake",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_missing_core_fails_at_import_with_one_line(tree_without_core):
    code = ("try:\n    import kvmwake\nexcept ImportError as e:\n"
            "    print(type(e).__name__, issubclass(type(e), ImportError)); print(e)\n")
    env = dict(os.environ, PYTHONPATH=str(tree_without_core))
    r = subprocess.run([sys.executable, "-c", code], cwd=tree_without_core, env=env,
                       capture_output=True, text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "CoreMissingError True", r.stdout + r.stderr
    assert len(lines) == 2
    msg = lines[1]
    assert msg.startswith("kvmwake: the compiled core kvmwake._core is missing")
    assert f"pip install -e . in {tree_without_core}" in msg


def test_missing_core_python_m_run(tree_without_core):
    env = dict(os.environ, PYTHONPATH=str(tree_without_core))
    r = subprocess.run([sys.executable, "-m", "kvmwake", "run", "--no-out"],
                       cwd=tree_without_core, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kvmwake.CoreMissingError: kvmwake: the compiled core")
    assert "cannot import name '_core'" not in r.stderr


# -- 5: latency percentiles -----------------------------------------------------------------

def _hist(samples):
    h = np.zeros(LAT_BUCKETS, dtype=np.uint64)
    for v in samples:
        h[lat_bucket(int(v))] += 1
    return h


def test_lat_buckets_cover_with_bounded_width():
    for i in list(range(0, 200)) + list(range(LAT_BUCKETS - 70, LAT_BUCKETS - 1)):
        lo, w = lat_bucket_low(i), lat_bucket_width(i)
        assert lat_bucket(lo) == i and lat_bucket(lo + w - 1) == i and lat_bucket(lo + w) == i + 1
        assert w == 1 or w <= lo * LAT_REL_ERROR


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_within_stated_error(seed):
    rng = np.random.default_rng(seed)
    samples = np.sort(rng.lognormal(np.log(6_000), 1.0, size=2_001).astype(np.int64) + 1)
    lat = st.latency_percentiles(_hist(samples))
    assert set(lat) == {"count", "p50", "p90", "p99", "max", "rel_error"}
    assert lat["rel_error"] == LAT_REL_ERROR == 1 / 64
    n = len(samples)
    for q in (50, 90, 99):
        true = samples[-(-n * q // 100) - 1]
        assert abs(lat[f"p{q}"] - true) <= true * LAT_REL_ERROR, (q, lat[f"p{q}"], true)
    assert abs(lat["max"] - samples[-1]) <= samples[-1] * LAT_REL_ERROR


def test_percentiles_interpolate_and_small_values_exact():
    # 100 samples spread over one bucket: the median is inside it, not its lower bound.
    lo = lat_bucket_low(lat_bucket(100_000))
    w = lat_bucket_width(lat_bucket(100_000))
    h = _hist(lo + (np.arange(100) * w) // 100)
    lat = st.latency_percentiles(h)
    assert lo < lat["p50"] < lo + w and lat["p50"] < lat["p99"] <= lat["max"] < lo + w
    assert st.latency_percentiles(_hist([7, 7, 40]))["p50"] == 7
    assert st.latency_percentiles(_hist([7, 7, 40]))["max"] == 40
    empty = st.latency_percentiles(np.zeros(LAT_BUCKETS, dtype=np.uint64))
    assert empty["count"] == 0 and empty["p50"] is None and empty["max"] is None


def test_docstring_names_the_result_keys():
    doc = st.latency_percentiles.__doc__
    assert "max_bucket" not in doc
    for k in ("count", "p50", "max", "rel_error"):
        assert f'"{k}"' in doc


def test_run_prints_latency_with_units_and_precision():
    r = subprocess.run([sys.executable, "-m", "kvmwake", "run", "--no-out", "--sim-ms", "5"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("p50"))
    assert "(±1.6%," in line and ("us" in line or "ms" in line)


# -- 10: the library ------------------------------------------------------------------------

def _vm(seed=1):
    vm = kw.VM(arch="arm64", nr_vcpus=2, host_cpus=2, seed=seed)
    vm.set_tick(1_000_000)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp("20us"), g.wake_random_other(), g.wfi()])])
    return vm


def test_vm_now_and_latency_histogram():
    vm = _vm()
    vm.run(until_ns=3_000_000)
    assert vm.now == vm.host.now == 3_000_000
    h = vm.latency_histogram()
    assert np.array_equal(h, vm.host.latency_histogram()) and h.sum() > 0
    shared = kw.Host(host_cpus=2)
    a, b = shared.create_vm(1), shared.create_vm(1)
    assert a.now == b.now == 0
    with pytest.raises(ValueError, match="host.latency_histogram"):
        a.latency_histogram()


def test_compute_takes_duration_strings():
    assert g.compute("20us") == g.compute(20_000)
    assert g.compute("1.5ms") == g.compute(1_500_000)
    assert g.compute_uniform("1us", "2us") == g.compute_uniform(1_000, 2_000)
    with pytest.raises(ProgramError, match="duration"):
        g.compute("20 parsecs")
    with pytest.raises(ProgramError):
        g.compute(2.5)
    with pytest.raises(ProgramError, match="no unit"):
        g.compute("10")            # a string says its unit; an int is ns


def test_stats_compare_and_print():
    a, b, c = _vm(1), _vm(1), _vm(2)
    for vm in (a, b, c):
        vm.run(until_ns=5_000_000)
    assert a.stats() == b.stats() and not (a.stats() != b.stats())
    assert a.stats() != c.stats()
    assert a.vcpus[0].stats() == b.vcpus[0].stats()
    s = a.stats()
    assert isinstance(s["halt_wait_hist"], np.ndarray) and s["halt_wait_hist"].shape == (32,)
    r = repr(s)
    assert r.startswith("HaltStats(halt_successful_poll=") and "array(" not in r
    nz = int(np.nonzero(s["halt_wait_hist"])[0][0])
    assert f"halt_wait_hist={{{nz}: " in r
    assert s == s.copy() and dict(s) == s


def test_vcpu_run_after_vm_run_warns_about_the_watchdog():
    vm = _vm()
    vm.run(until_ns=1_000_000)
    with pytest.warns(RuntimeWarning, match="did not exit"):
        ex = vm.vcpus[0].run()
    assert ex.reason == kw.uapi.ExitReason.INTR
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = vm.vcpus[0].run(timeout_ns=1_000_000)
    assert ex.reason == kw.uapi.ExitReason.INTR
