"""Benchmarks of kvmwake (pytest-benchmark).  Not part of the test run.

    pytest bench --benchmark-only --benchmark-columns=median,ops,rounds   # full size
    KVMWAKE_BENCH_SIZE=tiny pytest bench --benchmark-disable -q           # CI smoke

The suites: ``test_bench_micro.py`` (heap push/pop, the wake-condition scan,
a kick, a full halt), ``test_bench_scenarios.py`` (the four built-in
scenarios on both engines), ``test_bench_islands.py`` (a host of islands on
one queue, on one thread and on two), ``test_bench_threads.py`` (64 and 256
vCPU threads of a VMM against a callback policy) and ``test_bench_peers.py`` (the SimPy model of
ipi-storm and the bare heap loop; skipped without SimPy or Cython).  The
scripts beside them print whole reports: ``compare.py`` (core vs
reference), ``compare_peers.py`` (vs SimPy and the floor), ``scaling.py``
(1,024 to 65,536 vCPUs), ``threaded_vmm.py`` (a VMM's own vCPU threads, and
the real-time kick-to-run latency beside the kernel's) and ``instructions.py``
(callgrind counts).

``KVMWAKE_BENCH_SIZE`` picks the size: ``full`` (the default) or ``tiny`` (a
few vCPUs for a millisecond of virtual time: checks that every benchmark
runs, in a few seconds, and times nothing useful).  The project's
``testpaths`` is ``tests``, so a plain ``pytest`` never collects this folder.

Only ``host.run`` is timed in the scenario benchmarks (the host is built in
pedantic's untimed ``setup``); the micro benchmarks call the ``bench_*``
hooks of ``kvmwake._core`` (``kvmwake/core/bench.pxi``), which run their loop
without the GIL and also return their own nanosecond count.  The summary at
the end prints what pytest-benchmark's table does not: ns per operation and
halts per wall second.
"""

from __future__ import annotations

import os

# No BLAS helper threads (numpy starts OpenBLAS's on import; idle, they still
# spin on the second core).  Too late if numpy was imported before this file.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

MS = 1_000_000

SIZE = os.environ.get("KVMWAKE_BENCH_SIZE", "full") or "full"

#: (scenario, engine) -> (vCPUs, simulated ns, rounds), per size.
SCENARIO_SIZES = {
    "tiny": {
        ("ipi-storm", "core"): (16, 1 * MS, 1),
        ("ipi-storm", "reference"): (16, 1 * MS, 1),
        ("default", "core"): (16, 1 * MS, 1),
        ("default", "reference"): (16, 1 * MS, 1),
        ("irq-storm", "core"): (16, 1 * MS, 1),
        ("irq-storm", "reference"): (16, 1 * MS, 1),
        ("suspend-cycle", "core"): (16, 1 * MS, 1),
        ("suspend-cycle", "reference"): (16, 1 * MS, 1),
    },
    "full": {
        ("ipi-storm", "core"): (1024, 100 * MS, 7),
        ("ipi-storm", "reference"): (1024, 5 * MS, 5),
        ("default", "core"): (4096, 200 * MS, 7),
        ("default", "reference"): (256, 5 * MS, 7),
        ("irq-storm", "core"): (4096, 100 * MS, 5),
        ("irq-storm", "reference"): (512, 5 * MS, 3),
        ("suspend-cycle", "core"): (4096, 50 * MS, 5),
        ("suspend-cycle", "reference"): (256, 10 * MS, 3),
    },
}

#: Island benchmarks (bench/test_bench_islands.py), per size: (scenario, vCPUs,
#: host CPUs, simulated ns, rounds); one host CPU per vCPU, so each VM is an island.
ISLAND_SIZES = {
    "tiny": ("default", 128, 128, 1 * MS, 1),
    "full": ("ipi-storm", 16384, 16384, 20 * MS, 5),
}

#: Peer benchmarks (bench/test_bench_peers.py), per size: the SimPy model's
#: (vCPUs, simulated ns, rounds) and the floor's (pushes, events queued).
PEER_SIZES = {
    "tiny": {"simpy": (16, 1 * MS, 1), "floor": (1_000, 16)},
    "full": {"simpy": (1024, 20 * MS, 3), "floor": (500_000, 1024)},
}

#: Operations per call of each micro benchmark, per size.
MICRO_SIZES = {
    "tiny": {"heap_small": 64, "heap_large": 256, "wake_scan": 1_000, "kick": 1_000,
             "halt_path": 100, "vm_scan_vcpus": 1024, "vm_scan": 2},
    "full": {"heap_small": 1024, "heap_large": 1 << 20, "wake_scan": 10_000_000,
             "kick": 1_000_000, "halt_path": 200_000, "vm_scan_vcpus": 16_384,
             "vm_scan": 200},
}


def pytest_configure(config):
    if SIZE not in SCENARIO_SIZES:
        raise pytest.UsageError(f"KVMWAKE_BENCH_SIZE={SIZE!r}: choose tiny or full")


def pytest_report_header(config):
    return f"kvmwake benchmarks: KVMWAKE_BENCH_SIZE={SIZE}"


@pytest.fixture(scope="session")
def bench_size() -> str:
    return SIZE


@pytest.fixture(scope="session")
def scenario_sizes() -> dict:
    return SCENARIO_SIZES[SIZE]


@pytest.fixture(scope="session")
def micro_sizes() -> dict:
    return MICRO_SIZES[SIZE]


@pytest.fixture(scope="session")
def island_sizes() -> tuple:
    return ISLAND_SIZES[SIZE]


@pytest.fixture(scope="session")
def peer_sizes() -> dict:
    return PEER_SIZES[SIZE]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    benches = getattr(bs, "benchmarks", None) or []
    rows = []
    for b in benches:
        info = dict(getattr(b, "extra_info", {}) or {})
        if not info:
            continue
        try:
            median = b.stats.median
        except AttributeError:
            continue
        ops = info.get("ops_per_call")
        if ops:
            rows.append(f"  {b.name:<48} {median * 1e9 / ops:10.1f} ns/{info.get('op', 'op')}"
                        f" (median call; C timer, last call: {info.get('c_ns_per_op', float('nan')):.1f})")
        elif "halts" in info:
            events = (f"{info['events'] / median:14,.0f} events/s" if info.get("events")
                      else f"{'(not counted)':>14} events/s")
            rows.append(f"  {b.name:<48} {info['halts'] / median:14,.0f} halts/s "
                        f"{events}  ({info['vcpus']} vCPUs, {info['sim_ms']} ms simulated)")
    if rows:
        terminalreporter.write_sep("-", f"kvmwake per-operation figures (size {SIZE}, from medians)")
        for r in rows:
            terminalreporter.write_line(r)


# Benchmarks write nothing in the current folder or the repository root either
# (tests/_cwd_guard.py): a benchmark that does fails.
import importlib.util as _ilu  # noqa: E402
import pathlib as _pl  # noqa: E402

_spec = _ilu.spec_from_file_location(
    "_kvmwake_cwd_guard", _pl.Path(__file__).resolve().parent.parent / "tests" / "_cwd_guard.py")
_cwd_guard = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_cwd_guard)
_writes_nothing_in_cwd_or_root = _cwd_guard.Guard().fixture()
