"""Halt stats under the kernel's binary-stats names, and wake-latency summaries.

The engines keep one row of ``model.NR_STATS`` u64 per vCPU in the layout of
``KVM_GENERIC_VCPU_STATS()`` (include/linux/kvm_host.h); this module turns
rows into dicts keyed by the kernel's names and sums them per VM.
"""

from __future__ import annotations

import numpy as np

from ..model import (
    HALT_EXIT_STAT, HALT_POLL_HIST_COUNT, LAT_BUCKETS, S_BLOCKING, S_HALT_EXITS,
    S_POLL_FAIL_HIST, S_POLL_SUCCESS_HIST, S_WAIT_HIST, STAT_COUNTERS, lat_bucket_low,
)

_HIST_BASE = {"halt_poll_success_hist": S_POLL_SUCCESS_HIST,
              "halt_poll_fail_hist": S_POLL_FAIL_HIST,
              "halt_wait_hist": S_WAIT_HIST}


def row_to_dict(row: np.ndarray, arch: str) -> dict:
    """One vCPU's (or a sum's) stats row as ``{kernel name: value}``.

    Counters are ints, histograms numpy arrays of 32 u64 buckets (bucket i
    counts values with ``min(fls64(ns), 31) == i``).
    """
    out: dict = {name: int(row[i]) for i, name in enumerate(STAT_COUNTERS)}
    for name, base in _HIST_BASE.items():
        out[name] = np.array(row[base:base + HALT_POLL_HIST_COUNT], dtype=np.uint64)
    out["blocking"] = int(row[S_BLOCKING])
    out[HALT_EXIT_STAT[arch]] = int(row[S_HALT_EXITS])
    return out


def sum_rows(rows: np.ndarray, arch: str) -> dict:
    """Sum of several vCPUs' rows, like adding up each vCPU's stats file.

    ``blocking`` (an instant boolean) becomes the number of vCPUs blocking.
    """
    return row_to_dict(rows.sum(axis=0, dtype=np.uint64), arch)


def to_jsonable(stats: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


def latency_percentiles(hist: np.ndarray, qs=(50, 90, 99)) -> dict:
    """Percentiles of the wake-latency histogram (ns, bucket lower bound, 1/16 resolution).

    Returns ``{"count": n, "p50": ..., "max_bucket": ...}``; percentiles are
    None when no wake-up was measured.
    """
    hist = np.asarray(hist, dtype=np.uint64)
    if hist.shape != (LAT_BUCKETS,):
        raise ValueError(f"latency histogram must have {LAT_BUCKETS} buckets, not {hist.shape}")
    total = int(hist.sum())
    out: dict = {"count": total}
    cum = np.cumsum(hist, dtype=np.uint64)
    for q in qs:
        if total == 0:
            out[f"p{q}"] = None
            continue
        rank = max(1, -(-total * q // 100))      # ceil(total * q / 100)
        out[f"p{q}"] = lat_bucket_low(int(np.searchsorted(cum, rank)))
    nz = np.nonzero(hist)[0]
    out["max"] = lat_bucket_low(int(nz[-1])) if len(nz) else None
    return out
