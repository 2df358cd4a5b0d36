"""Workload specs: the idle times between wakes, one grammar for the kernel and the model.

A spec says how long each vCPU waits between two MSIs aimed at it (the time
from one MSI to the next MSI to the same vCPU).  Grammar::

    SPEC  := NAME | DIST | "mix:" PART ("," PART)*
    PART  := WEIGHT "*" DIST                  weights > 0, normalised to sum 1
    DIST  := "fixed:" DUR                     always DUR
           | "exp:" DUR                       exponential of mean DUR
           | "uniform:" DUR "-" DUR           uniform in [lo, hi] (integer ns)
    DUR   := NUMBER UNIT                      UNIT in ns, us, ms, s (e.g. 50us, 1.5ms)
    NAME  := short | mixed | long             the named workloads below

Named workloads (``NAMED``):

* ``short``: ``uniform:5us-80us``, idle shorter than the poll ceiling;
* ``mixed``: ``mix:0.8*uniform:5us-80us,0.15*uniform:150us-400us,0.05*uniform:1ms-6ms``,
  the mix of ``shared/kernel/NOTES.md``'s traces;
* ``long``: ``uniform:500us-4ms``, idle longer than the poll ceiling.

``schedule(spec, wakes, vcpus, seed)`` draws the gaps and returns the
arrival times of all wakes, merged in time order, with each wake's target
vCPU and vector.  The draws use their own SplitMix64 stream per vCPU (seed,
vCPU id), in integer arithmetic, so the same arguments give the same array
on every machine and numpy version.  The same array drives the injector on
the real kernel and the MSIs of the simulation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

NAMED = {
    "short": "uniform:5us-80us",
    "mixed": "mix:0.8*uniform:5us-80us,0.15*uniform:150us-400us,0.05*uniform:1ms-6ms",
    "long": "uniform:500us-4ms",
}
UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
#: Longest gap accepted (60 s): a recording must end.
MAX_GAP_NS = 60_000_000_000
MAX_WAKES = 10_000_000

_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|ms|s)\s*$")


class SpecError(ValueError):
    """A workload spec that does not parse; the message says where and why."""


@dataclass(frozen=True)
class Dist:
    kind: str            # fixed | exp | uniform
    a: int               # fixed value, exp mean, uniform lo (ns)
    b: int = 0           # uniform hi (ns)

    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else float(self.a)

    def text(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{fmt_ns(self.a)}-{fmt_ns(self.b)}"
        return f"{self.kind}:{fmt_ns(self.a)}"


@dataclass(frozen=True)
class Spec:
    """A parsed spec: weighted parts (one part of weight 1 for a plain distribution)."""

    source: str
    parts: tuple[tuple[float, Dist], ...]

    @property
    def name(self) -> str | None:
        for name, text in NAMED.items():
            if self.source == name or self.source == text:
                return name
        return None

    def canonical(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0][1].text()
        return "mix:" + ",".join(f"{w:g}*{d.text()}" for w, d in self.parts)

    def mean_ns(self) -> float:
        return sum(w * d.mean() for w, d in self.parts)

    def max_ns(self) -> int:
        return max(d.b if d.kind == "uniform" else d.a for _, d in self.parts)


def fmt_ns(ns: int) -> str:
    for unit, mult in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns >= mult and ns % mult == 0:
            return f"{ns // mult}{unit}"
    return f"{ns}ns"


def parse_duration(text: str, where: str = "duration") -> int:
    m = _DUR_RE.match(text)
    if not m:
        raise SpecError(f"{where}: {text.strip()!r} is not a duration like 50us, 1.5ms or "
                        f"200ns (units: {', '.join(UNITS)})")
    value = float(m.group(1)) * UNITS[m.group(2)]
    ns = int(round(value))
    if ns < 0 or ns > MAX_GAP_NS:
        raise SpecError(f"{where}: {text.strip()!r} is outside 0..60s")
    return ns


def _parse_dist(text: str, where: str) -> Dist:
    kind, sep, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep:
        raise SpecError(f"{where}: {text.strip()!r} needs the form KIND:ARGS "
                        f"(fixed:DUR, exp:DUR, uniform:LO-HI)")
    if kind == "fixed":
        return Dist("fixed", parse_duration(arg, where))
    if kind == "exp":
        mean = parse_duration(arg, where)
        if mean == 0:
            raise SpecError(f"{where}: an exponential needs a positive mean")
        return Dist("exp", mean)
    if kind == "uniform":
        lo, dash, hi = arg.partition("-")
        if not dash:
            raise SpecError(f"{where}: uniform needs LO-HI, e.g. uniform:5us-80us")
        a, b = parse_duration(lo, where), parse_duration(hi, where)
        if a > b:
            raise SpecError(f"{where}: uniform low {fmt_ns(a)} is above high {fmt_ns(b)}")
        return Dist("uniform", a, b)
    if kind == "mix":
        raise SpecError(f"{where}: mix cannot be nested")
    raise SpecError(f"{where}: unknown distribution {kind!r} (fixed, exp, uniform, mix)")


def parse(text: str) -> Spec:
    """Parse a spec (or a named workload) into a ``Spec``."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty workload spec")
    source = text.strip()
    body = NAMED.get(source.lower(), source)
    head, _, rest = body.partition(":")
    if head.strip().lower() != "mix":
        return Spec(source, ((1.0, _parse_dist(body, "spec")),))
    parts = []
    for i, item in enumerate(rest.split(",")):
        where = f"mix part {i + 1}"
        w, star, dist = item.partition("*")
        if not star:
            raise SpecError(f"{where}: {item.strip()!r} needs WEIGHT*DIST, e.g. 0.8*exp:50us")
        try:
            weight = float(w)
        except ValueError:
            raise SpecError(f"{where}: weight {w.strip()!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise SpecError(f"{where}: weight {w.strip()!r} must be a positive finite number")
        parts.append((weight, _parse_dist(dist, where)))
    if len(parts) < 2:
        raise SpecError("mix needs at least two parts")
    total = sum(w for w, _ in parts)
    return Spec(source, tuple((w / total, d) for w, d in parts))


# ---------------------------------------------------------------- drawing

_M64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_GOLDEN = np.uint64(0x9E37_79B9_7F4A_7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
        return z ^ (z >> np.uint64(31))


def _uniforms(seed: int, stream: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1), 53-bit, from SplitMix64 over (seed, stream, index)."""
    key = _splitmix(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))[0]
    key = _splitmix(np.array([key ^ np.uint64(stream)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        x = _splitmix(np.arange(n, dtype=np.uint64) * _GOLDEN + key)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _draw_dist(d: Dist, u: np.ndarray) -> np.ndarray:
    if d.kind == "fixed":
        return np.full(u.shape, d.a, dtype=np.int64)
    if d.kind == "exp":
        return np.rint(-np.log1p(-u) * d.a).astype(np.int64)
    span = d.b - d.a + 1
    return d.a + np.minimum(np.floor(u * span).astype(np.int64), span - 1)


def draw_gaps(spec: Spec | str, n: int, seed: int = 0, stream: int = 0) -> np.ndarray:
    """n gaps (int64 ns) of ``spec`` from stream ``stream`` of ``seed``."""
    if isinstance(spec, str):
        spec = parse(spec)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    u_pick = _uniforms(seed, 2 * stream, n)
    u_val = _uniforms(seed, 2 * stream + 1, n)
    if len(spec.parts) == 1:
        return _draw_dist(spec.parts[0][1], u_val)
    edges = np.cumsum([w for w, _ in spec.parts])
    edges[-1] = 1.0
    which = np.searchsorted(edges, u_pick, side="right")
    which = np.minimum(which, len(spec.parts) - 1)
    out = np.empty(n, dtype=np.int64)
    for i, (_, d) in enumerate(spec.parts):
        sel = which == i
        out[sel] = _draw_dist(d, u_val[sel])
    return out


@dataclass
class Schedule:
    """All wakes of a run, in time order."""

    spec: Spec
    seed: int
    vcpus: int
    target_ns: np.ndarray      # int64, arrival time after the start
    vcpu: np.ndarray           # int32, the vCPU (APIC ID) it wakes
    index: np.ndarray          # int64, the wake's number among its vCPU's wakes

    def __len__(self) -> int:
        return len(self.target_ns)

    @property
    def duration_ns(self) -> int:
        return int(self.target_ns[-1]) if len(self.target_ns) else 0

    def per_vcpu(self, v: int) -> np.ndarray:
        return self.target_ns[self.vcpu == v]

    def to_dict(self) -> dict:
        return {"spec": self.spec.source, "canonical": self.spec.canonical(),
                "named": self.spec.name, "seed": self.seed, "vcpus": self.vcpus,
                "wakes": len(self), "mean_gap_ns": self.spec.mean_ns(),
                "duration_ns": self.duration_ns}


def schedule(spec: Spec | str, wakes: int, vcpus: int, seed: int = 0) -> Schedule:
    """``wakes`` MSIs spread round-robin over ``vcpus`` (vCPU v gets wakes v, v+N, ...
    in count), each vCPU's arrivals the running sum of its own gaps."""
    if isinstance(spec, str):
        spec = parse(spec)
    if isinstance(wakes, bool) or not isinstance(wakes, int) or not 1 <= wakes <= MAX_WAKES:
        raise SpecError(f"wakes must be an integer in 1..{MAX_WAKES}, not {wakes!r}")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
        raise SpecError(f"vcpus must be a positive integer, not {vcpus!r}")
    times, who, idx = [], [], []
    for v in range(vcpus):
        n = wakes // vcpus + (1 if v < wakes % vcpus else 0)
        gaps = draw_gaps(spec, n, seed, stream=v)
        gaps = np.maximum(gaps, 1)          # two MSIs to one vCPU never share an instant
        times.append(np.cumsum(gaps))
        who.append(np.full(n, v, dtype=np.int32))
        idx.append(np.arange(n, dtype=np.int64))
    t = np.concatenate(times)
    w = np.concatenate(who)
    i = np.concatenate(idx)
    order = np.lexsort((w, t))
    return Schedule(spec, seed, vcpus, t[order].astype(np.int64), w[order], i[order])


# ---------------------------------------------------------------- the validation suite's idle kinds

#: The idle kinds of ``kvmwake kernel suite``: the named workloads, plus
#: ``periodic`` (every MSI to a vCPU ``PERIODIC_NS`` after the last one, so a
#: vCPU's halts are all about as long: polling grows to cover them, or stays
#: off) and ``near-ceiling`` (idle uniform in ``NEAR_CEILING`` times the
#: polling ceiling: the halts end around where polling gives up, where
#: growing and shrinking alternate).
SUITE_IDLE = ("short", "mixed", "long", "periodic", "near-ceiling")
PERIODIC_NS = 100_000
NEAR_CEILING = (0.75, 1.25)


def suite_idle_spec(kind: str, ceiling_ns: int) -> str:
    """The spec of a suite idle kind for a VM whose polling ceiling is ``ceiling_ns``
    (``kvm_vcpu_max_halt_poll_ns``; with polling off (0) the module's default
    ``halt_poll_ns`` stands in).  A name of ``NAMED`` or a spec is returned as it is,
    checked."""
    if kind == "periodic":
        return f"fixed:{fmt_ns(PERIODIC_NS)}"
    if kind == "near-ceiling":
        if isinstance(ceiling_ns, bool) or not isinstance(ceiling_ns, int) or ceiling_ns <= 0:
            raise SpecError(f"near-ceiling idle needs a positive polling ceiling, not "
                            f"{ceiling_ns!r}")
        lo, hi = (int(round(f * ceiling_ns / 1000)) * 1000 for f in NEAR_CEILING)
        return f"uniform:{fmt_ns(lo)}-{fmt_ns(hi)}"
    parse(kind)
    return kind


# ---------------------------------------------------------------- the IPI workload

#: How ``ipi_plan`` picks the vCPU each step wakes.
IPI_TARGETS = ("random-other", "next")
#: The ``ipi-storm`` scenario's compute between two wakes.
IPI_DEFAULT_COMPUTE = "exp:20us"
#: Stream numbers of the plan's draws (apart from the MSI schedule's 0..2N-1 streams).
_IPI_TARGET_STREAM = 1 << 20
_IPI_COMPUTE_STREAM = (1 << 20) + 1


@dataclass
class IpiPlan:
    """A chain of ``wakes`` wakes, the steady state of ``ipi-storm``.

    Wake 0 is the start: one MSI from the injector to ``vcpu[0]``.  Wake k
    (k >= 1) is an IPI that ``vcpu[k - 1]`` sends to ``vcpu[k]`` after it was
    woken by wake k - 1 and computed ``compute_ns[k - 1]``; the vCPU woken by
    the last wake sends nothing (the run ends there).  ``index[k]`` numbers
    wake k among its vCPU's wakes and ``vector[k]`` is its interrupt vector
    (``microvm.wake_vector(index[k])``), so the host can tell which wake each
    handler exit answers.  One token passes from vCPU to vCPU: in ``ipi-storm``
    two tokens that meet at one vCPU merge into one pending IPI, so after the
    first steps a single chain is what runs.

    ``target_ns[k]`` is the sum of the computes before wake k, the arrival
    time if nothing but the guest's compute took time (the ``target_ns``
    column of the recording's ``wakes.csv``).
    """

    spec: Spec
    seed: int
    vcpus: int
    targets: str
    vcpu: np.ndarray           # int32, the vCPU woken by wake k
    compute_ns: np.ndarray     # int64, len wakes - 1: vcpu[k]'s compute before it sends wake k+1
    index: np.ndarray          # int64, wake k's number among its vCPU's wakes
    start_vcpu: int = 0

    def __len__(self) -> int:
        return len(self.vcpu)

    @property
    def sender(self) -> np.ndarray:
        """The vCPU that sends wake k (-1: the injector's start MSI)."""
        out = np.empty(len(self.vcpu), dtype=np.int32)
        out[0] = -1
        out[1:] = self.vcpu[:-1]
        return out

    @property
    def vector(self) -> np.ndarray:
        return (VEC_BASE_IPI + self.index % NR_VECTORS_IPI).astype(np.int32)

    @property
    def target_ns(self) -> np.ndarray:
        out = np.zeros(len(self.vcpu), dtype=np.int64)
        out[1:] = np.cumsum(self.compute_ns)
        return out

    @property
    def duration_ns(self) -> int:
        return int(self.compute_ns.sum())

    def steps(self, v: int) -> list[tuple[int, int, int]]:
        """vCPU ``v``'s steps, one per wake it receives, in order: (compute ns, the vCPU it
        then wakes, that wake's vector), or (0, -1, 0) for the last wake of the run."""
        vec = self.vector
        out = []
        last = len(self.vcpu) - 1
        for k in np.nonzero(self.vcpu == v)[0].tolist():
            if k == last:
                out.append((0, -1, 0))
            else:
                out.append((int(self.compute_ns[k]), int(self.vcpu[k + 1]), int(vec[k + 1])))
        return out

    def to_dict(self) -> dict:
        return {"kind": "ipi", "spec": self.spec.source, "canonical": self.spec.canonical(),
                "named": self.spec.name, "seed": self.seed, "vcpus": self.vcpus,
                "wakes": len(self), "targets": self.targets, "start_vcpu": self.start_vcpu,
                "mean_gap_ns": self.spec.mean_ns(), "duration_ns": self.duration_ns}


#: The vectors of ``microvm.wake_vector`` (kept here so the plan needs no microvm import).
VEC_BASE_IPI = 0x30
NR_VECTORS_IPI = 176


def ipi_plan(seed: int, nr_vcpus: int, wakes: int, compute: Spec | str = IPI_DEFAULT_COMPUTE,
             targets: str = "random-other", start_vcpu: int = 0) -> IpiPlan:
    """The deterministic plan of an IPI recording (``IpiPlan``): who wakes whom and how
    long each vCPU computes first.

    ``compute``: a spec of this module's grammar (default ``exp:20us``, as
    ``ipi-storm``); ``targets``: ``"random-other"`` (a uniformly drawn other
    vCPU, as ``ipi-storm``'s ``wake random-other``) or ``"next"`` (``v + 1 mod
    N``).  Draws use SplitMix64 streams of ``seed`` in integer arithmetic, as
    ``schedule`` does: the same arguments give the same plan everywhere.
    """
    if isinstance(compute, str):
        compute = parse(compute)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"seed must be a non-negative integer, not {seed!r}")
    if isinstance(wakes, bool) or not isinstance(wakes, int) or not 1 <= wakes <= MAX_WAKES:
        raise SpecError(f"wakes must be an integer in 1..{MAX_WAKES}, not {wakes!r}")
    if isinstance(nr_vcpus, bool) or not isinstance(nr_vcpus, int) or nr_vcpus < 2:
        raise SpecError(f"an IPI workload needs at least 2 vCPUs (a vCPU wakes another), "
                        f"not {nr_vcpus!r}")
    if targets not in IPI_TARGETS:
        raise SpecError(f"targets must be one of {', '.join(IPI_TARGETS)}, not {targets!r}")
    if isinstance(start_vcpu, bool) or not isinstance(start_vcpu, int) or \
            not 0 <= start_vcpu < nr_vcpus:
        raise SpecError(f"start_vcpu must be a vCPU in 0..{nr_vcpus - 1}, not {start_vcpu!r}")
    vcpu = np.empty(wakes, dtype=np.int32)
    vcpu[0] = start_vcpu
    if targets == "next":
        vcpu[:] = (start_vcpu + np.arange(wakes)) % nr_vcpus
    else:
        # Another vCPU, uniformly: an offset 1..N-1 from the sender.
        u = _uniforms(seed, _IPI_TARGET_STREAM, max(0, wakes - 1))
        off = 1 + np.minimum(np.floor(u * (nr_vcpus - 1)).astype(np.int64), nr_vcpus - 2)
        cur = start_vcpu
        for k in range(1, wakes):
            cur = (cur + int(off[k - 1])) % nr_vcpus
            vcpu[k] = cur
    comp = draw_gaps(compute, wakes - 1, seed, stream=_IPI_COMPUTE_STREAM)
    index = np.zeros(wakes, dtype=np.int64)
    count = np.zeros(nr_vcpus, dtype=np.int64)
    for k, v in enumerate(vcpu.tolist()):
        index[k] = count[v]
        count[v] += 1
    return IpiPlan(compute, seed, nr_vcpus, targets, vcpu, comp.astype(np.int64), index,
                   start_vcpu)
