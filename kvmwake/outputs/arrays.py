"""``kvmwake run --npz``: per-vCPU stats, histograms and wake latencies as numpy arrays.

``write_npz(host, path, sim_ns)`` stores, per vCPU of every VM (rows in host order):

* ``vm``, ``vcpu_id``: which vCPU each row is;
* ``stats``: the raw ``model.NR_STATS`` u64 row (its column names in
  ``stats_columns``, ``stats_column_names(arch)``); every counter of
  ``model.STAT_COUNTERS`` also under its kernel name (one value per vCPU);
* ``halt_poll_success_hist``, ``halt_poll_fail_hist``, ``halt_wait_hist``:
  the 32-bucket log2 histograms, one row per vCPU;
* ``halt_poll_ns``: each vCPU's poll window at the end of the run;
* ``latency_hist`` and ``latency_bucket_low_ns``: the host's wake-latency
  histogram and each bucket's lower bound;
* ``sim_ns``, ``host_cpus``.
"""

from __future__ import annotations

import numpy as np

from ..model import (HALT_POLL_HIST_COUNT, LAT_BUCKETS, S_POLL_FAIL_HIST, S_POLL_SUCCESS_HIST,
                     S_WAIT_HIST, STAT_COUNTERS, lat_bucket_low)


def stats_column_names(arch: str) -> list:
    """The names of the ``stats`` matrix's columns (docs/outputs.md): the counters, the
    three 32-bucket histograms as ``NAME[i]``, ``blocking`` and the arch trap counter."""
    from ..model import HALT_EXIT_STAT, NR_STATS, S_BLOCKING, S_HALT_EXITS
    names = list(STAT_COUNTERS)
    for name in ("halt_poll_success_hist", "halt_poll_fail_hist", "halt_wait_hist"):
        names += [f"{name}[{i}]" for i in range(HALT_POLL_HIST_COUNT)]
    names.append("blocking")
    names.append(HALT_EXIT_STAT[arch])
    assert len(names) == NR_STATS and names.index("blocking") == S_BLOCKING \
        and len(names) - 1 == S_HALT_EXITS
    return names


def arrays(host, sim_ns: int) -> dict:
    """The arrays ``write_npz`` stores, as a dict."""
    rows = host.stats_array()            # one copy of the host's rows (uint64)
    out = {
        "vm": np.concatenate([np.full(vm.nr_vcpus, vm.index, np.int32) for vm in host.vms]),
        "vcpu_id": np.concatenate([np.arange(vm.nr_vcpus, dtype=np.int32) for vm in host.vms]),
        "stats": rows,
        "stats_columns": np.array(stats_column_names(host.arch)),
        "halt_poll_ns": np.array([v.halt_poll_ns for vm in host.vms for v in vm.vcpus],
                                 dtype=np.uint64),
        "latency_hist": np.asarray(host.latency_histogram(), dtype=np.uint64),
        "latency_bucket_low_ns": np.array([lat_bucket_low(i) for i in range(LAT_BUCKETS)],
                                          dtype=np.uint64),
        "sim_ns": np.uint64(sim_ns),
        "host_cpus": np.uint32(host.host_cpus),
    }
    for i, name in enumerate(STAT_COUNTERS):
        out[name] = rows[:, i].copy()
    for name, base in (("halt_poll_success_hist", S_POLL_SUCCESS_HIST),
                       ("halt_poll_fail_hist", S_POLL_FAIL_HIST),
                       ("halt_wait_hist", S_WAIT_HIST)):
        out[name] = rows[:, base:base + HALT_POLL_HIST_COUNT].copy()
    return out


def write_npz(host, path, sim_ns: int) -> None:
    """Write ``arrays(host, sim_ns)`` to ``path`` (``np.savez_compressed``)."""
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays(host, sim_ns))
