"""Fit the model's costs to a recording: ``kvmwake kernel calibrate DIR``.

Two kinds of parameters.

**Measured directly** on the recording (medians, robust to the tails):

* ``handler_ns``: the guest's work per extra interrupt, the gap between two
  port exits of one vCPU when the second MSI was already pending at the
  first (handler, port exit to userspace and back, EOI);
* ``vm_entry_ns + vm_exit_ns``: a vCPU's own work from a halt's end to its
  next halt's start with no MSI in between, less ``handler_ns`` (the model
  charges an entry, the handler and the ``hlt`` exit); the split into entry
  and exit is not identifiable from these observations and is taken equal.
  Only *uncontended* gaps count (``own_work``): on a shared CPU the gap also
  holds the time the vCPU thread waited for the CPU (246-313 us instead of
  about 3 us on a 6-vCPU recording).  With the scheduler's tracepoints in the
  recording, a gap is uncontended when no other thread of the recording was
  runnable on the vCPU's CPU during it (``analysis.sched_contended``).  An ipi
  recording's step holds more than one entry and exit: there, entry + exit come
  from the IPI's own path and the handler from what is left (``ipi_costs``).
  Without them the run's shape decides: where the recorder pinned some vCPU
  alone on its CPU (no other vCPU there; preferably not the injector's CPU
  either), the median of those vCPUs' gaps; otherwise (unpinned, or every CPU
  shared) the ``LOW_QUANTILE``-th percentile of all gaps, since waiting for
  the CPU only ever lengthens a gap;
* ``delivery_ns`` (interrupt delivery): from the MSI's send to the end of a
  halt that was ended by a successful poll (the poll loop notices at once);
* ``port_exit_ns``: from a halt's end to the handler's port exit seen in
  userspace (what the host-observed latency adds to the model's halt end);
* ``injector_ns``: one delivered ``KVM_SIGNAL_MSI`` ioctl (the injector's
  work per send); ``lateness_ns`` / ``injector_idle_wake_ns``: the
  injector's median lateness in the run (used by ``--arrivals target``).

**Fitted** by weighted least squares on the model's output:
``wake_to_run_ns`` (a thread woken on an idle host CPU), and where a vCPU
shares its host CPU with the injector, ``context_switch_ns`` (``free_costs``).
The simulation runs the host scheduler of ``--scheduler`` (``SimParams.scheduler``,
saved in ``params``): under ``"eevdf"`` (default, the machine's Linux 6.18) the
woken injector preempts a running vCPU as ``check_preempt_wakeup_fair`` decides
and ``sched_slice_ns`` is unused, so not searched.  Under ``"fifo"`` (for
comparison) a woken thread never preempts and ``sched_slice_ns`` is searched too:
a short slice stands in for EEVDF letting the woken injector run before the
vCPU's handler is done; it is kept above 1.2 times the handler's whole segment,
since in the engine a shorter slice starves a preempted handler.  For each
candidate the workload is simulated and the residuals are

* the poll share of halts, in units of 5 percentage points;
* ``ln(model / kernel)`` of the median wait time, in units of 0.15;
* ``ln(model / kernel)`` of each vCPU's median send-to-halt-end time over
  halts that waited, in units of 0.25;
* ``ln(model / kernel)`` of each vCPU's number of halts, in units of 0.15;

and the sum of squares is minimised by a deterministic search: a log-spaced
grid, then a pattern search that halves its log step.  Costs that nothing
in the recording depends on keep the model's defaults
(``calibration.json`` says so).

**Tails** (``--tails``).  Constant costs give a vCPU alone on an idle CPU
one latency (model p99 = p50); the kernel's p99/p50 there is 2.2 to 40.
With ``--tails`` the spread of the uncontended send-to-halt-end latencies
(halts that waited, woken with nothing else of the recording runnable on the
vCPU's CPU: from the scheduler trace, or the vCPUs the pinning left alone)
becomes the distribution of ``wake_to_run_ns``: its quantiles at every
percentile, shifted so that the median is the fitted constant
(``quantile_cost``), in the form ``{"dist": "quantiles", "q": [...]}``.  It
goes to ``calibration.json``'s ``costs`` (what ``Host(costs=...)`` takes over
the constants in ``params.costs``, see ``host_costs``); ``params.costs``
keeps the constant.  What compare's simulation gives ``Host(costs=...)`` is
decided in one place, ``sim_costs`` (the constants while ``Host`` takes no
distributions).  The handler's time stays a constant (it is the guest
program's, not a host cost).  Without ``--tails``, ``costs`` is empty.

**Saturated recordings.**  When the vCPUs hardly ever halt (fewer than
``SATURATED_HALTS_PER_WAKE`` halts per wake, or out of halt - running or
waiting for a CPU - more than ``SATURATED_OUT_OF_HALT`` of the run), most
wakes find their vCPU busy and the figures say more about the queueing than
about halt polling.  The calibration is still made, but ``calibration.json``
gets ``"saturated": true`` and a ``"saturated_reason"``, and ``compare``
reports the recording as "saturated, not scored" instead of pass/fail.

The result goes to ``DIR/calibration.json``; ``compare`` loads it.
"""

from __future__ import annotations

import datetime
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..model import COST_DEFAULTS
from . import analysis as A
from . import schedtrace as ST
from .recording import (CALIBRATION, Recording, RecordingError, regenerate_plan,
                        workload_kind, write_json)
from .recording import pinned_cpus, sim_placement  # noqa: F401  (the analysis' names)
from .simulate import SimParams, Setup, simulate

FORMAT = 1
SPLIT_UNIT_PP = 5.0
WAIT_UNIT = 0.15
D1_UNIT = 0.25
W2R_RANGE = (1_000, 400_000)
CTX_RANGE = (200, 100_000)
SLICE_RANGE = (10_000, 750_000)
HALTS_UNIT = 0.15
FALLBACK_DELIVERY_NS = 1_000
#: Own work without a scheduler trace and no vCPU alone on its CPU: this percentile
#: of the quiet gaps (waiting for the CPU only lengthens a gap).
LOW_QUANTILE = 10
#: A recording is saturated below this many halts per wake ...
SATURATED_HALTS_PER_WAKE = 0.25
#: ... or when its vCPUs spent more than this share of the run out of halt.
SATURATED_OUT_OF_HALT = 0.95
#: --tails: the quantile table's points (every percentile, 0 to 100) ...
TAIL_POINTS = 101
#: ... made from at least this many uncontended latencies.
TAILS_MIN_SAMPLES = 20


@dataclass
class KernelView:
    """The kernel side of a recording, analysed once."""

    rec: Recording
    halts: A.Halts | None
    waker: np.ndarray | None
    figures: dict
    sched: ST.SchedTrace | None = None   # the scheduler's tracepoints, if recorded


def kernel_view(rec: Recording) -> KernelView:
    w = rec.wakes
    stats = rec.vcpu_stats()
    if rec.traced:
        h = A.halts_from_events(rec.events, rec.pid_to_vcpu(), A.TRACE_TEXT_RESOLUTION_NS)
        if len(h) == 0:
            raise RecordingError(f"{rec.path}/trace: no kvm_vcpu_wakeup line of the recorded "
                                 f"vCPU threads {rec.meta['vcpu_tids']}")
        wk = A.match_wakers(h, w["sent_ns"], w["vcpu"])
        fig = A.figures(h, wk, w["sent_ns"], stats, w["seen_ns"])
    else:
        h = wk = None
        fig = stats_only_figures(stats)
    seen = w["seen_ns"] > 0
    fig["host_latency_all_ns"] = A.quantiles((w["seen_ns"] - w["sent_ns"])[seen])
    return KernelView(rec, h, wk, fig, sched_trace(rec))


# ---------------------------------------------------------------- the scheduler trace

def sched_trace(rec: Recording) -> ST.SchedTrace | None:
    """The recording's scheduler tracepoints and threads table
    (``schedtrace.load_sched``), or None when it was recorded without them."""
    try:
        return ST.load_sched(rec.path)
    except ST.SchedTraceError as exc:
        raise RecordingError(f"{rec.path / ST.SCHED_TRACE}: {exc}") from None


def _vcpu_tid(trace: ST.SchedTrace) -> dict[int, int]:
    """vCPU index -> its thread's tid, from a sched trace's threads table."""
    return {v: t for t, v in trace.vcpu_tids().items()}


def own_work(kv: KernelView) -> dict:
    """A vCPU's own work per wake (halt end to next halt start, no MSI in between)
    from uncontended gaps only; see the module docstring."""
    rec, h = kv.rec, kv.halts
    compute = plan_compute(rec)
    iv = A.busy_intervals(h, rec.wakes["sent_ns"], rec.wakes["vcpu"],
                          None if compute is None else kv.waker, compute)
    quiet = iv.quiet
    out = {"busy_all_median_ns": _median(iv.length[quiet]),
           "busy_all_samples": int(quiet.sum())}
    if kv.sched is not None:
        seg = A.runnable_segments(kv.sched.events, kv.sched.roles())
        cont = A.sched_contended(iv, _vcpu_tid(kv.sched), seg)
        ok = quiet & ~cont
        out.update(busy_method="scheduler trace: no other recorded thread runnable on the "
                               "vCPU's CPU", busy_ns=_median(iv.length[ok]),
                   busy_samples=int(ok.sum()))
    else:
        ok = quiet
        out.update(shape_own_work(iv, *pinned_cpus(rec.meta)))
    if compute is not None:
        out.update(ipi_step_split(iv, rec.wakes["sent_ns"], ok))
    return out


def ipi_step_split(iv: A.BusyIntervals, sent_ns: np.ndarray, ok: np.ndarray) -> dict:
    """Where an ipi step's own work goes, over the gaps ``ok`` whose vCPU then sent the
    next wake: ``ipi_to_send_ns`` from the halt's end to the send's port exit seen in
    userspace, less the plan's compute (entry, the handler with its port exit's round
    trip, the exit of the send's port exit); ``ipi_send_to_halt_ns`` from there to the
    next halt (back into the guest, the ICR write, the ``hlt`` exit).  Medians; None
    without such gaps."""
    k = iv.wake
    has = ok & (k >= 0) & (k + 1 < len(sent_ns))
    nxt = np.where(has, sent_ns[np.minimum(k + 1, len(sent_ns) - 1)], 0)
    has &= (nxt >= iv.start) & (nxt <= iv.stop)
    return {"ipi_to_send_ns": _median((nxt - iv.start - iv.compute)[has]),
            "ipi_send_to_halt_ns": _median((iv.stop - nxt)[has]),
            "ipi_split_samples": int(has.sum())}


def plan_compute(rec: Recording) -> np.ndarray | None:
    """Per wake, the compute the woken vCPU's guest does before its next halt: an ipi
    recording's plan (``recording.regenerate_plan``) has vCPU ``vcpu[k]`` compute
    ``compute_ns[k]`` before it sends wake k+1 (the last wake: nothing), which is the
    workload, not the vCPU's own work.  None for an msi recording (the guest only runs
    its handler)."""
    if workload_kind(rec.meta) != "ipi":
        return None
    plan = regenerate_plan(rec)
    out = np.zeros(len(plan), dtype=np.int64)
    out[:-1] = plan.compute_ns
    return out


def alone_groups(vcpu_cpu: list, injector_cpu: int | None) -> list[tuple[list, str]]:
    """The vCPUs that had their host CPU to themselves as far as the pinning says, best
    first: alone and not on the injector's CPU; alone among the vCPUs."""
    alone = [v for v, c in enumerate(vcpu_cpu)
             if c is not None and sum(1 for d in vcpu_cpu if d == c) == 1]
    isolated = [v for v in alone if vcpu_cpu[v] != injector_cpu]
    return [(isolated, "pinned alone on its CPU, not the injector's"),
            (alone, "pinned alone among the vCPUs on its CPU")]


def shape_own_work(iv: A.BusyIntervals, vcpu_cpu: list, injector_cpu: int | None) -> dict:
    """Own work without a scheduler trace, from where the threads were pinned."""
    quiet = iv.quiet
    for group, what in alone_groups(vcpu_cpu, injector_cpu):
        sel = quiet & np.isin(iv.vcpu, group)
        if group and sel.any():
            return {"busy_method": f"run's shape: gaps of the vCPUs {what} "
                                   f"({', '.join(map(str, group))}), median",
                    "busy_ns": _median(iv.length[sel]), "busy_samples": int(sel.sum())}
    lengths = iv.length[quiet]
    return {"busy_method": f"run's shape: no vCPU alone on its CPU, percentile "
                           f"{LOW_QUANTILE} of all gaps",
            "busy_ns": float(np.percentile(lengths, LOW_QUANTILE)) if lengths.size else None,
            "busy_samples": int(lengths.size)}


# ---------------------------------------------------------------- tails

def uncontended_latencies(kv: KernelView) -> tuple[np.ndarray, str | None]:
    """Send-to-halt-end latencies of the halts that waited and were woken with nothing
    else of the recording runnable on the vCPU's CPU (scheduler trace), or, without a
    trace of the scheduler, of the vCPUs the pinning left alone on their CPU.  Returns
    (latencies, how they were chosen) - (empty, None) when no halt qualifies."""
    rec, h, wk = kv.rec, kv.halts, kv.waker
    if h is None:
        return np.zeros(0, dtype=np.int64), None
    sent = rec.wakes["sent_ns"]
    sel = (wk >= 0) & h.waited & ~h.first
    idx = np.nonzero(sel)[0]
    start = sent[wk[idx]]
    lat = h.end[idx] - start
    if kv.sched is not None:
        iv = A.BusyIntervals(h.vcpu[idx], start, h.end[idx], np.ones(idx.size, dtype=bool))
        seg = A.runnable_segments(kv.sched.events, kv.sched.roles())
        cont = A.sched_contended(iv, _vcpu_tid(kv.sched), seg)
        return lat[~cont], "scheduler trace: nothing else runnable on the vCPU's CPU"
    for group, what in alone_groups(*pinned_cpus(rec.meta)):
        ok = np.isin(h.vcpu[idx], group)
        if group and ok.any():
            return lat[ok], f"run's shape: the vCPUs {what} ({', '.join(map(str, group))})"
    return np.zeros(0, dtype=np.int64), None


def quantile_cost(samples, center: float, points: int = TAIL_POINTS) -> dict:
    """A cost in the contract's quantile form whose median is ``center`` and whose
    spread is that of ``samples``: the samples' quantiles at ``points`` evenly spaced
    probabilities, shifted by ``center - median(samples)``, clamped at 0 (so still
    nondecreasing), as integers."""
    a = np.asarray(samples, dtype=np.float64)
    q = np.percentile(a, np.linspace(0, 100, points)) - np.median(a) + center
    q = np.maximum(np.rint(q), 0).astype(np.int64)
    return {"dist": "quantiles", "q": np.maximum.accumulate(q).tolist()}


def fit_tails(kv: KernelView, params: SimParams) -> tuple[dict, dict]:
    """(costs in contract form, what they were made from): ``wake_to_run_ns`` as
    quantiles with the fitted constant as its median and the uncontended latencies'
    spread; empty costs when fewer than ``TAILS_MIN_SAMPLES`` latencies qualify."""
    lat, how = uncontended_latencies(kv)
    info = {"samples": int(lat.size), "method": how, "points": TAIL_POINTS}
    if lat.size < TAILS_MIN_SAMPLES:
        info["skipped"] = (f"{lat.size} uncontended halts that waited (at least "
                           f"{TAILS_MIN_SAMPLES} needed): costs kept constant")
        return {}, info
    info["latency_ns"] = A.quantiles(lat)
    w2r = float(params.costs["wake_to_run_ns"])
    return {"wake_to_run_ns": quantile_cost(lat, w2r)}, info


def check_costs(costs) -> dict:
    """The calibration's ``costs`` (cost name -> constant or distribution), checked: a
    known cost name; a non-negative integer, or ``{"dist": "quantiles", "q": [...]}``
    with at least two nondecreasing non-negative numbers (or any form
    ``kvmwake.costs.parse_cost`` accepts, where this build has it)."""
    if not isinstance(costs, dict):
        raise RecordingError("calibration.json: costs must be an object")
    parse = _cost_parser()
    out = {}
    for name, spec in costs.items():
        if name not in COST_DEFAULTS:
            raise RecordingError(f"calibration.json: costs: unknown cost {name!r}")
        if parse is not None:
            try:
                parse(name, spec)
            except (TypeError, ValueError) as exc:
                raise RecordingError(f"calibration.json: costs: {name}: {exc}") from None
        elif isinstance(spec, dict):
            q = spec.get("q")
            if (spec.get("dist") != "quantiles" or set(spec) != {"dist", "q"}
                    or not isinstance(q, list) or len(q) < 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                               and math.isfinite(x) and x >= 0 for x in q)
                    or any(b < a for a, b in zip(q, q[1:]))):
                raise RecordingError(f"calibration.json: costs: {name}: not a "
                                     f'{{"dist": "quantiles", "q": [...]}} of at least two '
                                     f"nondecreasing non-negative numbers")
        elif isinstance(spec, bool) or not isinstance(spec, int) or spec < 0:
            raise RecordingError(f"calibration.json: costs: {name}: {spec!r} is not a "
                                 f"non-negative integer")
        out[name] = spec
    return out


def _cost_parser():
    """``kvmwake.costs.parse_cost`` where this build has cost distributions, else None."""
    try:
        from ..costs import parse_cost
    except ImportError:
        return None
    return parse_cost


def host_costs(cal: dict) -> dict:
    """The costs to give ``Host(costs=...)`` for a calibration: its constants
    (``params.costs``) with its distributions (``costs``, from ``--tails``) over them."""
    p, _ = load_params(cal)
    return {**p.costs, **check_costs(cal.get("costs", {}))}


def sim_costs(cal: dict) -> dict:
    """The costs the simulation of a calibrated recording gives ``Host(costs=...)``:
    the one place that decides whether the fitted tails (``--tails``: ``cal["costs"]``,
    ``host_costs``) reach the model.

    ``Host(costs=...)`` takes the contract's distributions (``kvmwake.costs``), so this
    is ``host_costs(cal)``: the constants with the quantile tables over them.  The
    simulation's own arithmetic on costs (the lead-in, the injector's deadlines) takes
    their medians (``costs.cost_median``)."""
    return host_costs(cal)


def saturation(kv: KernelView) -> dict:
    """``{"saturated", "saturated_reason", "halts_per_wake", "out_of_halt_share"}``:
    whether the vCPUs were saturated (see the module docstring)."""
    rec, h = kv.rec, kv.halts
    w = rec.wakes
    wakes = int((w["sent_ns"] > 0).sum())
    if h is not None:
        body = ~h.first
        halts = int(body.sum())
        # The run: from the first send to the last; each vCPU's halted time in it.
        sent = w["sent_ns"][w["sent_ns"] > 0]
        lo, hi = (int(sent.min()), int(sent.max())) if sent.size else (0, 0)
        halted = np.clip(np.minimum(h.end, hi) - np.maximum(h.start, lo), 0, None).sum()
        span = (hi - lo) * rec.nvcpus
        out_share = 1.0 - float(halted) / span if span > 0 else None
    else:
        st = A.sum_stats(rec.vcpu_stats())
        halts = int(st["halt_successful_poll"]) + int(np.asarray(st["halt_wait_hist"]).sum())
        dur = int(rec.meta["workload"].get("duration_ns") or 0) * rec.nvcpus
        halted = (int(st.get("halt_poll_success_ns", 0)) + int(st.get("halt_poll_fail_ns", 0))
                  + int(st.get("halt_wait_ns", 0)))
        out_share = max(0.0, 1.0 - halted / dur) if dur > 0 else None
    hpw = halts / wakes if wakes else None
    reasons = []
    if hpw is not None and hpw < SATURATED_HALTS_PER_WAKE:
        reasons.append(f"{halts} halts for {wakes} wakes ({hpw:.3f} per wake, below "
                       f"{SATURATED_HALTS_PER_WAKE})")
    if out_share is not None and out_share > SATURATED_OUT_OF_HALT:
        reasons.append(f"the vCPUs were out of halt (running or waiting for a CPU) "
                       f"{100 * out_share:.1f} % of the run (above "
                       f"{100 * SATURATED_OUT_OF_HALT:.0f} %)")
    return {"saturated": bool(reasons), "saturated_reason": "; ".join(reasons) or None,
            "halts_per_wake": hpw, "out_of_halt_share": out_share}


def stats_only_figures(stats: list[dict]) -> dict:
    st = A.sum_stats(stats)
    poll = st["halt_successful_poll"]
    wait = int(np.asarray(st["halt_wait_hist"]).sum())
    n = poll + wait
    return {"halts": None, "poll": poll, "wait": wait,
            "poll_pct": 100.0 * poll / n if n else None,
            "wait_pct": 100.0 * wait / n if n else None,
            "stats": st, "stats_wait_median_ns": A.hist_median(st["halt_wait_hist"]),
            "stats_wait_mean_ns": st["halt_wait_ns"] / wait if wait else None,
            "stats_poll_success_pct": (100.0 * poll / st["halt_attempted_poll"]
                                       if st["halt_attempted_poll"] else None),
            "per_vcpu": []}


def _median(a, default=None):
    a = np.asarray(a)
    return float(np.median(a)) if a.size else default


def direct_estimates(kv: KernelView) -> dict:
    """The parameters read straight off the recording (see the module docstring)."""
    rec, h, wk = kv.rec, kv.halts, kv.waker
    w = rec.wakes
    out: dict = {}
    sent, seen, vcpu = w["sent_ns"], w["seen_ns"], w["vcpu"]
    b2b = []
    for v in range(rec.nvcpus):
        sel = (vcpu == v) & (seen > 0) & (sent > 0)
        s, se = seen[sel], sent[sel]
        o = np.argsort(s)
        s, se = s[o], se[o]
        if len(s) > 1:
            b2b.append(np.diff(s)[se[1:] < s[:-1]])
    b2b = np.concatenate(b2b) if b2b else np.zeros(0)
    out["handler_ns"] = _median(b2b)
    out["handler_samples"] = int(b2b.size)
    ok = (sent > 0)
    late = (sent - (rec.meta["t0_ns"] + w["target_ns"]))[ok]
    out["lateness_ns"] = _median(late, 0.0)
    d = rec.meta.get("harness", {}).get("msi_ioctl_delivered_ns", {})
    out["injector_ns"] = d.get("p50") or 1000.0
    # Most sends find the injector's CPU idle: the median lateness is its idle wake.
    out["injector_idle_wake_ns"] = out["lateness_ns"]
    if h is not None:
        out.update(own_work(kv))
        has = wk >= 0
        polled = has & ~h.waited & (h.ns > 0) & ~h.first
        d1p = h.end[polled] - sent[wk[polled]]
        d1p = d1p[d1p >= 0]
        # A poll that ended before the send was stamped was not ended by it (with
        # polling off, KVM_CAP_HALT_POLL 0, the only halts left are such).
        out["delivery_ns"] = _median(d1p)
        out["delivery_samples"] = int(d1p.size)
        pe = seen[wk[has]] - h.end[has]
        pe = pe[(seen[wk[has]] > 0) & (pe >= 0)]
        out["port_exit_ns"] = _median(pe)
    else:
        out.update(busy_ns=None, busy_samples=0, busy_method=None, delivery_ns=None,
                   delivery_samples=0, port_exit_ns=None)
    return out


def initial_params(kv: KernelView, est: dict, arrivals: str = "sent",
                   scheduler: str = "eevdf",
                   host_rules: str = "recording") -> tuple[SimParams, list]:
    """SimParams from the direct estimates; notes say what had to be assumed."""
    notes = []
    handler = est["handler_ns"]
    ipi = ipi_costs(est)
    if handler is None and ipi is None:
        handler = 10_000.0
        notes.append("no back-to-back port exits: handler_ns kept at 10 us")
    busy = est.get("busy_ns")
    if ipi is not None:
        ee, handler, note = ipi
        notes.append(note)
    elif busy is None:
        ee = 2 * COST_DEFAULTS["vm_entry_ns"]
        notes.append("no trace: entry + exit kept at the model's defaults" if kv.halts is None
                     else "no uncontended gap between two halts: entry + exit kept at the "
                          "model's defaults")
    else:
        ee = max(0.0, busy - handler)
        if busy < handler:
            notes.append(f"quiet busy time {busy:.0f} ns is below the per-interrupt handler "
                         f"time {handler:.0f} ns: entry and exit set to 0")
    delivery = est.get("delivery_ns")
    if delivery is None:
        delivery = FALLBACK_DELIVERY_NS
        notes.append(f"no successful poll to measure interrupt delivery on: delivery_ns "
                     f"kept at {FALLBACK_DELIVERY_NS} ns")
    costs = dict(COST_DEFAULTS)
    costs["vm_entry_ns"] = int(round(ee / 2))
    costs["vm_exit_ns"] = int(round(ee - ee / 2))
    p = SimParams(costs=costs, handler_ns=int(round(handler)), delivery_ns=int(round(delivery)),
                  lateness_ns=int(round(est["lateness_ns"])), arrivals=arrivals,
                  injector_idle_wake_ns=int(round(est["injector_idle_wake_ns"])),
                  injector_ns=int(round(est["injector_ns"])), scheduler=scheduler,
                  host_rules=host_rules)
    return p, notes


def ipi_costs(est: dict) -> tuple[float, float, str] | None:
    """(entry + exit, handler, note) of an ipi recording, None for any other.

    An ipi step's own work is not one entry, the handler and one exit (an msi wake's):
    the model runs, after a halt's end, an entry, the handler (with its port exit), the
    step's compute, the send's port exit to userspace (``sync``: the send time), an
    entry, the ICR write (its exit), an entry and the ``hlt`` exit.  Taking entry + exit
    as the whole gap less the handler (``busy_ns - handler_ns``, the msi rule) puts the
    handler and two round trips into it: 20-28 us, so that every IPI to a polling vCPU
    took exactly that long in the model, against a kernel median of 8 us.  Instead:

    * entry + exit from the IPI's own path: in the model, send -> polled halt end is the
      sender's entry and the ICR write's exit, so ``delivery_ns`` (the kernel's send ->
      end of a halt ended by a successful poll); without polled halts (cap 0), half of
      ``ipi_send_to_halt_ns`` (send -> the sender's next halt: two entries, two exits);
    * the handler: ``ipi_to_send_ns`` (halt end -> the send's port exit, less the
      compute: entry, handler, exit) less entry + exit.

    The ICR write in the kernel is a fastpath exit (x2APIC, handled without leaving
    the run loop), cheaper than a full exit and entry; the model has one cost for each,
    so from the send to the sender's halt it charges more than the kernel (docs/results.md
    gives the figures)."""
    to_send, send_to_halt = est.get("ipi_to_send_ns"), est.get("ipi_send_to_halt_ns")
    if to_send is None or send_to_halt is None:
        return None
    delivery = est.get("delivery_ns")
    if delivery is not None:
        ee, how = float(delivery), f"the IPI's send -> polled halt end ({delivery:.0f} ns)"
    else:
        ee, how = send_to_halt / 2, (f"half the send -> sender's halt time "
                                     f"({send_to_halt:.0f} ns; no polled halt)")
    handler = max(0.0, to_send - ee)
    return ee, handler, (f"ipi recording: entry + exit from {how}, handler_ns from halt end "
                         f"-> send ({to_send:.0f} ns) less entry + exit")


def sim_view(setup: Setup, params: SimParams, port_exit_ns: float | None, seed: int = 0,
             host_costs: dict | None = None):
    """The model's run of ``setup`` and its figures; ``host_costs``: ``simulate``'s."""
    r = simulate(setup, params, seed=seed, host_costs=host_costs)
    h = A.halts_from_events(r.events, r.pid_to_vcpu(), x86_prechecked=True)
    wk = A.match_wakers(h, r.send_ns, setup.vcpu, end_slack_ns=0)
    fig = A.figures(h, wk, r.send_ns, r.stats,
                    port_exit_ns if port_exit_ns is not None else None)
    return r, h, wk, fig


def _d1_wait_by_vcpu(h: A.Halts, wk: np.ndarray, send: np.ndarray, nv: int) -> list:
    out = []
    for v in range(nv):
        sel = (h.vcpu == v) & h.waited & (wk >= 0) & ~h.first
        d = h.end[sel] - send[wk[sel]]
        out.append(float(np.median(d)) if d.size >= 5 else None)
    return out


def residuals(kfig: dict, kd1: list, sfig: dict, sd1: list, traced: bool) -> dict:
    r = {}
    if kfig["poll_pct"] is not None and sfig["poll_pct"] is not None:
        r["split"] = (sfig["poll_pct"] - kfig["poll_pct"]) / SPLIT_UNIT_PP
    if traced:
        kw, sw = kfig["wait_ns"]["p50"], sfig["wait_ns"]["p50"]
    else:
        kw, sw = kfig["stats_wait_median_ns"], sfig["stats_wait_median_ns"]
    if kw and sw:
        r["median_wait"] = math.log(sw / kw) / WAIT_UNIT
    for v, (a, b) in enumerate(zip(kd1, sd1)):
        if a and b:
            r[f"d1_wait_vcpu{v}"] = math.log(b / a) / D1_UNIT
    for kv, sv in zip(kfig.get("per_vcpu", []), sfig.get("per_vcpu", [])):
        r[f"halts_vcpu{kv['vcpu']}"] = math.log((sv["halts"] + 1) / (kv["halts"] + 1)) / HALTS_UNIT
    return r


def shares_injector_cpu(nvcpus: int, host_cpus: int, injector_cpu: int | None = None) -> bool:
    """Whether a vCPU thread (on CPU ``g % host_cpus``) shares its CPU with the injector
    thread: on ``injector_cpu`` where the recorder pinned it, else where the model
    starts it (thread index ``nvcpus``, ``host_thread_cpu``)."""
    inj = nvcpus % host_cpus if injector_cpu is None else injector_cpu
    return any(v % host_cpus == inj for v in range(nvcpus))


@dataclass
class FitResult:
    params: SimParams
    loss: float
    residuals: dict
    evals: int
    seconds: float
    free: list
    notes: list


#: The fitted costs: (name, range, coarse grid points, quick grid points).
FREE = (("wake_to_run_ns", W2R_RANGE, 11, 7),
        ("context_switch_ns", CTX_RANGE, 6, 4),
        ("sched_slice_ns", SLICE_RANGE, 4, 3))


def free_costs(scheduler: str, shared: bool) -> list:
    """The costs ``fit`` searches (``FREE`` rows): ``wake_to_run_ns`` always; where a
    vCPU shares its CPU with the injector, ``context_switch_ns``, and under FIFO
    ``sched_slice_ns`` (the only way a FIFO run queue lets a woken thread in before the
    running one is done).  Under EEVDF the slice is the scheduler's own
    (``sysctl_sched_base_slice`` scaled by the CPU count), ``sched_slice_ns`` unused."""
    return [f for f in FREE
            if f[0] == "wake_to_run_ns"
            or shared and (f[0] == "context_switch_ns"
                           or f[0] == "sched_slice_ns" and scheduler == "fifo")]


def fit(rec: Recording, arrivals: str = "sent", quick: bool = False, log=None,
        tails: bool = False, scheduler: str = "eevdf", host_rules: str = "recording") -> dict:
    """Calibrate on ``rec`` with the host ``scheduler`` and ``host_rules`` (the
    simulation's ``SimParams.scheduler`` and ``.host_rules``); returns the
    calibration dict (also what is saved)."""
    t_start = time.perf_counter()
    kv = kernel_view(rec)
    est = direct_estimates(kv)
    params, notes = initial_params(kv, est, arrivals, scheduler, host_rules)
    setup = Setup.from_recording(rec)
    traced = rec.traced
    kd1 = (_d1_wait_by_vcpu(kv.halts, kv.waker, rec.wakes["sent_ns"], rec.nvcpus)
           if traced else [None] * rec.nvcpus)
    if not traced:
        notes.append("stats-only recording: fitted on the poll/wait split and the median of "
                     "halt_wait_hist only")
    shared = shares_injector_cpu(rec.nvcpus, int(rec.meta["host_cpus"]), setup.injector_cpu)
    if not shared:
        notes.append("no vCPU shares its host CPU with the injector: context_switch_ns"
                     + (" and sched_slice_ns are" if scheduler == "fifo" else " is")
                     + " not identified by this recording and keep the model's defaults")
    free = free_costs(scheduler, shared)
    # A slice shorter than a handler's whole segment starves the preempted vCPU in the
    # engine (its handler never completes while the injector keeps waking): keep above.
    co = params.costs
    slice_lo = int(max(SLICE_RANGE[0], 1.2 * (params.handler_ns + co["vm_entry_ns"] +
                                              co["vm_exit_ns"])))
    free = [(n, (slice_lo, rng[1]) if n == "sched_slice_ns" else rng, a, b)
            for n, rng, a, b in free]
    names = [f[0] for f in free]
    sat = saturation(kv)
    if sat["saturated"]:
        notes.append(f"saturated recording ({sat['saturated_reason']}): compare does not "
                     f"score it")
    cache: dict = {}

    def loss_of(x: tuple) -> float:
        if x not in cache:
            p = _with(params, dict(zip(names, x)))
            r, h, wk, sfig = sim_view(setup, p, est.get("port_exit_ns"))
            sd1 = (_d1_wait_by_vcpu(h, wk, r.send_ns, rec.nvcpus) if traced
                   else [None] * rec.nvcpus)
            if not traced:
                sfig = stats_only_figures(r.stats)
            res = residuals(kv.figures, kd1, sfig, sd1, traced)
            cache[x] = (sum(v * v for v in res.values()), res)
        return cache[x][0]

    def clamp(v: float, rng) -> int:
        return int(min(max(round(v), rng[0]), rng[1]))

    grids = [np.unique(np.round(np.geomspace(rng[0], rng[1], nq if quick else n)).astype(int))
             for _, rng, n, nq in free]
    best = min(itertools.product(*[g.tolist() for g in grids]), key=loss_of)
    steps = [(rng[1] / rng[0]) ** (1 / ((nq if quick else n) - 1)) for _, rng, n, nq in free]
    min_step = 1.05 if quick else 1.01
    while max(steps) > min_step:
        improved = True
        while improved:
            improved = False
            for d, (_, rng, _, _) in enumerate(free):
                for f in (steps[d], 1 / steps[d]):
                    cand = list(best)
                    cand[d] = clamp(best[d] * f, rng)
                    cand = tuple(cand)
                    if loss_of(cand) < loss_of(best) - 1e-12:
                        best, improved = cand, True
        steps = [math.sqrt(x) for x in steps]
    fitted = dict(zip(names, best))
    final = _with(params, fitted)
    loss, res = cache[best]
    tail_costs, tail_info = fit_tails(kv, final) if tails else ({}, None)
    if tail_info and tail_info.get("skipped"):
        notes.append(f"--tails: {tail_info['skipped']}")
    secs = time.perf_counter() - t_start
    if log:
        log("fitted " + ", ".join(f"{k} {v}" for k, v in fitted.items()) +
            f" in {len(cache)} simulations ({secs:.1f} s), loss {loss:.3f}")
    return {
        "format": FORMAT,
        "kvmwake": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "recording": {"path": str(rec.path), "workload": rec.meta["workload"]["canonical"],
                      "vcpus": rec.nvcpus, "halt_poll_cap": rec.cap,
                      "traced": traced, "sched_traced": kv.sched is not None,
                      "placement": sim_placement(rec.meta)},
        "params": final.to_dict(),
        "port_exit_ns": est.get("port_exit_ns"),
        "costs": tail_costs,
        "tails": tail_info,
        **sat,
        "direct": est,
        "fit": {"method": "weighted least squares: log grid, then a pattern search that "
                          "halves its log step",
                "free": names, **fitted,
                "loss": loss, "residuals": res, "evals": len(cache), "seconds": secs,
                "units": {"split": f"{SPLIT_UNIT_PP} pp", "median_wait": f"ln ratio / {WAIT_UNIT}",
                          "d1_wait": f"ln ratio / {D1_UNIT}",
                          "halts": f"ln ratio / {HALTS_UNIT}"}},
        "notes": notes,
    }


def _with(p: SimParams, costs: dict) -> SimParams:
    q = SimParams.from_dict(p.to_dict())
    q.costs = {**q.costs, **{k: int(v) for k, v in costs.items()}}
    return q


def _with_costs(p: SimParams, w2r: int, ctx: int) -> SimParams:
    return _with(p, {"wake_to_run_ns": w2r, "context_switch_ns": ctx})


def save(rec: Recording, cal: dict) -> None:
    write_json(rec.path / CALIBRATION, cal)


def load_params(cal: dict) -> tuple[SimParams, float | None]:
    """SimParams and port_exit_ns from a calibration dict (checked)."""
    if not isinstance(cal, dict) or cal.get("format") != FORMAT or "params" not in cal:
        raise RecordingError("calibration.json: not a kvmwake calibration (format "
                             f"{cal.get('format') if isinstance(cal, dict) else None!r})")
    try:
        p = SimParams.from_dict(cal["params"])
    except (TypeError, ValueError) as exc:
        raise RecordingError(f"calibration.json: bad params: {exc}") from None
    pe = cal.get("port_exit_ns")
    if pe is not None and (not isinstance(pe, (int, float)) or pe < 0):
        raise RecordingError("calibration.json: port_exit_ns must be a non-negative number")
    check_costs(cal.get("costs", {}))
    return p, pe
