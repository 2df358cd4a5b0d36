"""A VMM's own threads: the same guest programs run by a callback policy on one
thread and by one Python thread per vCPU blocked in ``run()``
(``bench/threaded_vmm.py`` builds them; kvmwake/vcpu_threads.py).

Each round builds a fresh VM in pedantic's untimed ``setup``.  At ``full``
size: 64 and 256 vCPU threads, a SYNC exit after every halt, 40 exits each; at
``tiny``: 4 threads, 5 exits each.  Both modes give the same halts, exits and
stats (checked); ``extra_info`` has halts and exits per wall second.
``python bench/threaded_vmm.py`` prints the whole report, with the hand-off
floor of this machine and the real-time kick-to-run latency beside the
kernel's.
"""

from __future__ import annotations

import pytest

import threaded_vmm as T

SIZES = {"full": ((64, 256), 40, 3), "tiny": ((4,), 5, 1)}
RESULTS: dict = {}


@pytest.fixture(scope="module")
def thread_sizes(bench_size):
    return SIZES[bench_size]


@pytest.mark.parametrize("mode", ["callback", "threaded"])
@pytest.mark.parametrize("which", [0, 1])
def test_vcpu_threads(benchmark, thread_sizes, mode, which):
    counts, iterations, rounds = thread_sizes
    if which >= len(counts):
        pytest.skip("one size only at this bench size")
    n = counts[which]
    fn = T.run_callback if mode == "callback" else T.run_threaded
    last = {}

    def run():
        last["r"] = fn(n, 1, iterations)

    benchmark.group = f"vcpu threads {n}"
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
    wall, halts, exits, stats = last["r"]
    assert halts > 0 and exits == n * (iterations + 1)
    RESULTS.setdefault(n, set()).add((halts, exits, stats))
    assert len(RESULTS[n]) == 1, "the threaded run differs from the callback run"
    benchmark.extra_info.update(vcpus=n, halts=halts, exits=exits, mode=mode)
    st = getattr(benchmark, "stats", None)
    if st is not None:
        benchmark.extra_info.update(halts_per_s=halts / st.stats.median,
                                    exits_per_s=exits / st.stats.median)
