"""Halt stats under the kernel's binary-stats names, and wake-latency summaries.

The engines keep one row of ``model.NR_STATS`` u64 per vCPU in the layout of
``KVM_GENERIC_VCPU_STATS()`` (include/linux/kvm_host.h); this module turns
rows into dicts keyed by the kernel's names and sums them per VM.
"""

from __future__ import annotations

import numpy as np

from ..model import (
    HALT_EXIT_STAT, HALT_POLL_HIST_COUNT, LAT_BUCKETS, LAT_REL_ERROR, S_BLOCKING, S_HALT_EXITS,
    S_POLL_FAIL_HIST, S_POLL_SUCCESS_HIST, S_WAIT_HIST, STAT_COUNTERS, lat_bucket_low,
    lat_bucket_width,
)

_HIST_BASE = {"halt_poll_success_hist": S_POLL_SUCCESS_HIST,
              "halt_poll_fail_hist": S_POLL_FAIL_HIST,
              "halt_wait_hist": S_WAIT_HIST}


class HaltStats(dict):
    """Halt stats under the kernel's names: a dict (``s["halt_wait_hist"]``,
    ``s.items()``, ``dict(s)`` work as before) whose histograms are numpy arrays,
    that compares with ``==`` (histograms by ``np.array_equal``) and prints
    the counters and only the non-empty histogram buckets."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other):
        if not isinstance(other, dict):
            return NotImplemented
        if self.keys() != other.keys():
            return False
        for k, v in self.items():
            w = other[k]
            if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
                if not np.array_equal(np.asarray(v), np.asarray(w)):
                    return False
            elif v != w:
                return False
        return True

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __repr__(self):
        parts = []
        for k, v in self.items():
            if isinstance(v, np.ndarray):
                nz = {int(i): int(v[i]) for i in np.nonzero(v)[0]}
                parts.append(f"{k}={{{', '.join(f'{i}: {c}' for i, c in nz.items())}}}")
            else:
                parts.append(f"{k}={v!r}")
        return "HaltStats(" + ", ".join(parts) + ")"

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(repr(self))

    def copy(self):
        return HaltStats({k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in self.items()})


def row_to_dict(row: np.ndarray, arch: str) -> HaltStats:
    """One vCPU's (or a sum's) stats row as ``{kernel name: value}`` (a ``HaltStats``).

    Counters are ints, histograms numpy arrays of 32 u64 buckets (bucket i
    counts values with ``min(fls64(ns), 31) == i``); the repr shows a
    histogram as ``{bucket: count}`` of its non-empty buckets.
    """
    out = HaltStats({name: int(row[i]) for i, name in enumerate(STAT_COUNTERS)})
    for name, base in _HIST_BASE.items():
        out[name] = np.array(row[base:base + HALT_POLL_HIST_COUNT], dtype=np.uint64)
    out["blocking"] = int(row[S_BLOCKING])
    out[HALT_EXIT_STAT[arch]] = int(row[S_HALT_EXITS])
    return out


def sum_rows(rows: np.ndarray, arch: str) -> HaltStats:
    """Sum of several vCPUs' rows, like adding up each vCPU's stats file.

    ``blocking`` (an instant boolean) becomes the number of vCPUs blocking.
    """
    return row_to_dict(rows.sum(axis=0, dtype=np.uint64), arch)


def to_jsonable(stats: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


def latency_percentiles(hist: np.ndarray, qs=(50, 90, 99)) -> dict:
    """Percentiles of the wake-latency histogram (``host.latency_histogram()``), in ns.

    Returns ``{"count": n, "p50": ns, "p90": ns, "p99": ns, "max": ns,
    "rel_error": model.LAT_REL_ERROR}`` (one ``p<q>`` per ``q`` in ``qs``).
    ``p<q>`` is the sample of rank ``ceil(n * q / 100)`` and ``max`` the largest
    sample, each estimated by linear interpolation inside its bucket: the
    buckets are log-linear (``model.lat_bucket``), so an estimate is off the true
    sample by less than ``rel_error`` (1/64, 1.6%) of it; values below 64 ns
    are exact.  Percentiles and ``max`` are None when no wake-up was measured.
    """
    hist = np.asarray(hist, dtype=np.uint64)
    if hist.shape != (LAT_BUCKETS,):
        raise ValueError(f"latency histogram must have {LAT_BUCKETS} buckets, not {hist.shape}")
    total = int(hist.sum())
    out: dict = {"count": total}
    cum = np.cumsum(hist, dtype=np.uint64)

    def at_rank(rank: int) -> int:
        i = int(np.searchsorted(cum, rank))          # first bucket with cum >= rank
        before = int(cum[i - 1]) if i else 0
        c = int(hist[i])
        low, width = lat_bucket_low(i), lat_bucket_width(i)
        # The bucket's c samples spread evenly over [low, low + width): the one
        # of rank r sits at the middle of its c-th share; floor keeps it inside.
        return low + int(width * (rank - before - 0.5) / c)

    for q in qs:
        if not 0 < q <= 100:
            raise ValueError(f"percentile {q!r} is not in (0, 100]")
        out[f"p{q}"] = at_rank(max(1, int(-(-total * q // 100)))) if total else None
    out["max"] = at_rank(total) if total else None
    out["rel_error"] = LAT_REL_ERROR
    return out


def format_ns(ns) -> str:
    """A duration as a kernel engineer reads it: 850 ns, 5.89 us, 1.25 ms, 2.50 s
    (three significant digits, the histogram's precision)."""
    if ns is None:
        return "-"
    ns = float(ns)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if abs(ns) >= scale:
            v = ns / scale
            return f"{v:#.3g}".rstrip(".") + f" {unit}" if v < 1000 else f"{v:,.0f} {unit}"
    return f"{ns:.0f} ns"


def format_latency(lat: dict) -> str:
    """``p50 5.89 us  p90 7.23 us  p99 12.1 us  max 40.2 us  (±1.6%, 1,234 wake-ups)``."""
    if not lat.get("count"):
        return "no wake-ups"
    ps = [k for k in lat if k.startswith("p") and k[1:].isdigit()]
    body = "  ".join(f"{k} {format_ns(lat[k])}" for k in ps + ["max"])
    return f"{body}  (±{100 * lat['rel_error']:.1f}%, {lat['count']:,} wake-ups)"


# -- spread over seeds -----------------------------------------------------------------------

#: Two-sided 95% Student t quantiles (0.975) for 1..30 degrees of freedom; beyond, the
#: listed points, then the normal 1.960.  A table, not scipy, so that every machine
#: prints the same intervals.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_T975_TAIL = ((40, 2.021075), (60, 2.000298), (120, 1.979930))


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%);
    for ``df`` between the tabulated points, the next larger one's (conservative)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, not {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    for k, q in _T975_TAIL:
        if df <= k:
            return q
    return 1.959964


def mean_ci(values) -> dict:
    """Mean, sample standard deviation and the 95% Student-t half-width ``ci95`` of
    ``values`` (``None`` entries skipped; ``ci95`` is None with fewer than two)."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = sum(vals) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5
    return {"n": n, "mean": mean, "sd": sd, "ci95": t_quantile_975(n - 1) * sd / n ** 0.5}
