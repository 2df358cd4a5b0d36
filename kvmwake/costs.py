"""Modelled host costs with tails: constants or seeded distributions.

A cost of ``Host(costs={...})`` (``vm_exit_ns``, ``vm_entry_ns``, ``ipi_send_ns``,
``wake_to_run_ns``, ``context_switch_ns``; ``sched_slice_ns`` is a parameter of
the FIFO scheduler and stays a constant) is one of:

* an int (ns) or a duration string (``"3us"``): a constant, as before.  A constant
  never draws from any random stream, so results with constant costs are those
  of a model without distributions, bit for bit;
* ``{"dist": "lognormal", "median": 3000, "sigma": 0.5, "max": 200000}``: a
  log-normal of that median (ns or a duration) and shape ``sigma`` (the standard
  deviation of its logarithm, 0 < sigma <= ``MAX_SIGMA``), clipped at ``max``
  (optional, default ``MAX_COST_NS``; at least the median);
* ``{"dist": "quantiles", "q": [v0, v1, ..., vN]}``: an empirical distribution,
  N + 1 >= 2 nondecreasing values (ns or durations) at the evenly spaced
  probabilities 0, 1/N, ..., 1, linear in between.

Both engines sample every distribution the same way, from one integer table of
``COST_TABLE_N`` = 257 nondecreasing values (``cost_table``): ``tab[k]`` is the
cost at probability ``k / 256``.  A draw takes 32 bits ``r`` from the charged
thread's cost stream; ``i = r >> 24`` picks an interval (0..255) and the low 24
bits ``f`` the place in it: ``tab[i] + ((tab[i+1] - tab[i]) * f >> 24)``, integer
arithmetic only (no value exceeds 2**40, so the product fits 64 bits).

The tables:

* quantiles: the N + 1 values resampled at k / 256 by linear interpolation
  rounded down (``q[j] + (q[j+1] - q[j]) * (k*N - j*256) // 256``, ``j = k*N // 256``);
  with N = 256 the table is ``q`` itself;
* lognormal: ``tab[k] = round(median * exp(sigma * z_k))`` clipped at ``max``,
  with ``z_k = NormalDist().inv_cdf(p_k)`` at ``p_k = (k + 1/2) / 257``, the
  midpoints of 257 equal slices of probability (so ``p_128 = 1/2``: ``tab[128]``
  is the median, and the ends are finite).
"""

from __future__ import annotations

import math
import numbers
import statistics

import numpy as np

from .durations import duration
from .model import COST_DEFAULTS

#: Entries of a cost's quantile table (256 intervals).
COST_TABLE_N = 257
#: Bits of a cost draw that pick the interval, and that place the draw in it.
COST_INDEX_BITS = 8
COST_FRAC_BITS = 24
#: The largest cost (each cost, and every value of a table).
MAX_COST_NS = 1 << 40
#: The largest log-normal shape accepted (exp(10 * 2.9) is far past any clip).
MAX_SIGMA = 10.0
#: The costs that may be distributions, in the engines' order (their table rows).
DRAWN_COSTS = ("vm_exit_ns", "vm_entry_ns", "ipi_send_ns", "wake_to_run_ns",
               "context_switch_ns")
#: The costs that must stay constants.
CONSTANT_COSTS = ("sched_slice_ns",)
DISTRIBUTIONS = ("lognormal", "quantiles")

assert COST_TABLE_N == (1 << COST_INDEX_BITS) + 1
assert set(DRAWN_COSTS) | set(CONSTANT_COSTS) == set(COST_DEFAULTS)


def _ns(name: str, v) -> int:
    """An int (ns) or a duration string, 0..MAX_COST_NS."""
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, str)):
        raise TypeError(f"{name} must be an integer (ns) or a duration string, "
                        f"not {type(v).__name__}")
    if isinstance(v, str):
        try:
            v = duration(v, name, bare_ns=True)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    v = int(v)
    if not 0 <= v <= MAX_COST_NS:
        raise ValueError(f"{name} = {v} is out of range 0..{MAX_COST_NS}")
    return v


def parse_cost(name: str, spec):
    """The normalised form of cost ``name``'s ``spec``: an int (a constant), or a
    dict ``{"dist": "lognormal", "median", "sigma", "max"}`` or
    ``{"dist": "quantiles", "q": [...]}`` with every value in ns.

    Raises ValueError (TypeError for a value of the wrong type) naming what is wrong.
    """
    if name not in COST_DEFAULTS:
        raise ValueError(f"unknown cost {name!r} (known: {', '.join(COST_DEFAULTS)})")
    if not isinstance(spec, dict):
        return _ns(name, spec)
    if name in CONSTANT_COSTS:
        raise ValueError(f"{name} is a constant (a parameter of the scheduler); "
                         f"it cannot be a distribution")
    dist = spec.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"{name}: \"dist\" must be one of {', '.join(DISTRIBUTIONS)}, "
                         f"not {dist!r}")
    keys = {"lognormal": ("dist", "median", "sigma", "max"), "quantiles": ("dist", "q")}[dist]
    unknown = sorted(set(spec) - set(keys), key=str)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {', '.join(map(repr, unknown))} for a "
                         f"{dist} cost (known: {', '.join(keys)})")
    if dist == "lognormal":
        for k in ("median", "sigma"):
            if k not in spec:
                raise ValueError(f"{name}: a lognormal cost needs {k!r}")
        median = _ns(f"{name}.median", spec["median"])
        if median == 0:
            raise ValueError(f"{name}.median must be above 0")
        sigma = spec["sigma"]
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise TypeError(f"{name}.sigma must be a number, not {type(sigma).__name__}")
        sigma = float(sigma)
        if not (0.0 < sigma <= MAX_SIGMA):
            raise ValueError(f"{name}.sigma = {sigma!r} is out of range (0, {MAX_SIGMA:g}]")
        mx = _ns(f"{name}.max", spec.get("max", MAX_COST_NS))
        if mx < median:
            raise ValueError(f"{name}.max = {mx} is below the median {median}")
        return {"dist": "lognormal", "median": median, "sigma": sigma, "max": mx}
    q = spec.get("q")
    if not isinstance(q, (list, tuple)):
        raise TypeError(f"{name}.q must be a list of values, not {type(q).__name__}")
    if not 2 <= len(q) <= 1 << 16:
        raise ValueError(f"{name}.q holds {len(q)} values; it needs 2..{1 << 16}")
    vals = [_ns(f"{name}.q[{i}]", v) for i, v in enumerate(q)]
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise ValueError(f"{name}.q must be nondecreasing: q[{i}] = {vals[i]} < "
                             f"q[{i - 1}] = {vals[i - 1]}")
    return {"dist": "quantiles", "q": vals}


def is_constant(spec) -> bool:
    """A normalised spec that is a constant (never draws)."""
    return not isinstance(spec, dict)


def cost_table(spec) -> np.ndarray:
    """The ``COST_TABLE_N`` nondecreasing uint64 values both engines sample ``spec``
    (normalised or not; a constant gives a table of that constant) from."""
    if not isinstance(spec, dict) or spec.get("dist") not in DISTRIBUTIONS:
        return np.full(COST_TABLE_N, _ns("cost", spec), dtype=np.uint64)
    m = COST_TABLE_N - 1
    if spec["dist"] == "quantiles":
        q = [_ns("q", v) for v in spec["q"]]
        n = len(q) - 1
        out = []
        for k in range(COST_TABLE_N):
            j, rest = divmod(k * n, m)
            out.append(q[j] if rest == 0 else q[j] + (q[j + 1] - q[j]) * rest // m)
        return np.array(out, dtype=np.uint64)
    median, sigma = int(spec["median"]), float(spec["sigma"])
    mx = min(int(spec.get("max", MAX_COST_NS)), MAX_COST_NS)
    nd = statistics.NormalDist()
    out = []
    for k in range(COST_TABLE_N):
        z = nd.inv_cdf((k + 0.5) / COST_TABLE_N)
        out.append(min(mx, int(round(median * math.exp(sigma * z)))))
    return np.array(out, dtype=np.uint64)


def sample(table, r32: int) -> int:
    """One cost from ``table`` for the 32-bit draw ``r32`` (the engines' rule)."""
    i = r32 >> COST_FRAC_BITS
    f = r32 & ((1 << COST_FRAC_BITS) - 1)
    lo = int(table[i])
    return lo + (((int(table[i + 1]) - lo) * f) >> COST_FRAC_BITS)


def check_table(name: str, table) -> None:
    """A cost table as a snapshot carries it: ``COST_TABLE_N`` values, nondecreasing,
    each at most ``MAX_COST_NS`` (ValueError otherwise)."""
    t = [int(x) for x in table]
    if len(t) != COST_TABLE_N:
        raise ValueError(f"cost table {name}: {len(t)} values, expected {COST_TABLE_N}")
    for i, v in enumerate(t):
        if not 0 <= v <= MAX_COST_NS:
            raise ValueError(f"cost table {name}: value {i} = {v} is out of range "
                             f"0..{MAX_COST_NS}")
        if i and v < t[i - 1]:
            raise ValueError(f"cost table {name}: not nondecreasing at value {i}")


def cost_bound(spec) -> int:
    """The largest value ``spec`` (normalised) can charge."""
    if is_constant(spec):
        return int(spec)
    if spec["dist"] == "quantiles":
        return int(spec["q"][-1])
    return int(cost_table(spec)[-1])


def cost_median(spec) -> int:
    """The median ``spec`` (normalised) charges: the constant, or its table's middle
    value (``tab[128]``, the probability 1/2), for arithmetic on typical costs."""
    if is_constant(spec):
        return int(spec)
    return int(cost_table(spec)[COST_TABLE_N // 2])


def normalize_costs(costs) -> dict:
    """Every cost's normalised spec: ``COST_DEFAULTS`` overridden by ``costs``."""
    if costs is not None and not isinstance(costs, dict):
        raise TypeError(f"costs must be a dict of cost names to ns or distributions, not "
                        f"{type(costs).__name__}")
    out = dict(COST_DEFAULTS)
    for name, spec in (costs or {}).items():
        out[name] = parse_cost(name, spec)
    return out


def engine_costs(specs: dict) -> dict:
    """What an engine takes: each constant as an int, each distribution as its table."""
    return {name: spec if is_constant(spec) else cost_table(spec)
            for name, spec in specs.items()}
