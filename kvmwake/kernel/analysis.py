"""The figures compared between the kernel and the model, computed the same way for both.

From a trace (real or simulated) and the time each wake's MSI was sent:

* **halts**: one per ``kvm_vcpu_wakeup`` line: vCPU, end (the line's
  timestamp), length (``ns``), waited or polled;
* **waker**: the wake that ended a halt: the first MSI to that vCPU sent at
  or after the halt began (a pending one would have stopped the guest before
  its ``hlt``); a halt with no such MSI up to its end has none;
* **poll/wait split**: the share of halts whose line says ``poll`` /
  ``wait`` (``poll`` also counts the rare halt that ended before it blocked,
  with no polling at all, as the kernel's line does);
* **wait time**: the length of the halts that waited (``halt_ns``; with
  polling stopped at once by a busy CPU it is the wait itself);
* **wake latency**: from the waker's send to the halt's end (the vCPU thread
  running again), and the host-observed latency (send to the handler's port
  exit in userspace) of those wakes;
* the binary-stats figures (``halt_wait_hist`` ...), summed over vCPUs;
* **MSI to exit** (``msi_to_exit_ns``, kernel recordings only): from the
  injector's ``KVM_SIGNAL_MSI`` to the vCPU thread's return from ``KVM_RUN``
  for that wake, with ``log2_hist`` / ``latency_summary`` to put any latency
  array in the kernel's 32-bucket log2 form with its p50/p90/p99.

Each vCPU's first halt (the long one before the first wake, while the
harness starts) is left out of every figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import HALT_POLL_HIST_COUNT
from ..outputs.tracefmt import WAKEUP
from ..reference.halt import hist_update
from .schedtrace import MIGRATE, SWITCH
from .schedtrace import WAKEUP as SCHED_WAKEUP

QUANTILES = (50, 90, 99)


@dataclass
class Halts:
    vcpu: np.ndarray      # int32
    end: np.ndarray       # int64 ns
    ns: np.ndarray        # int64 halt length
    waited: np.ndarray    # bool
    first: np.ndarray     # bool: the vCPU's first halt in the trace

    @property
    def start(self) -> np.ndarray:
        return self.end - self.ns

    def __len__(self) -> int:
        return len(self.end)


#: The kernel prints timestamps truncated to the microsecond.
TRACE_TEXT_RESOLUTION_NS = 1000


def halts_from_events(events, pid_to_vcpu: dict[int, int], resolution_ns: int = 0,
                      x86_prechecked: bool = False) -> Halts:
    """Halts of the vCPU threads in ``pid_to_vcpu``.  ``resolution_ns``: the events'
    timestamps are truncated to it (1000 for trace text); the end is taken in the
    middle of that interval.

    ``x86_prechecked`` drops halts of length 0 (the model's): x86's ``vcpu_block()``
    calls ``kvm_vcpu_halt()`` only when ``kvm_arch_vcpu_runnable()`` is false, so an
    interrupt that arrived during the ``hlt`` exit gives no halt and no line on the
    kernel, while the engine still traces a 0 ns halt."""
    half = resolution_ns // 2
    rows = [(pid_to_vcpu[e.pid], e.ts_ns + half, e.ns, e.waited) for e in events
            if e.event == WAKEUP and e.pid in pid_to_vcpu
            and not (x86_prechecked and e.ns == 0)]
    if not rows:
        z = np.zeros(0, dtype=np.int64)
        return Halts(z.astype(np.int32), z, z, z.astype(bool), z.astype(bool))
    a = np.array(rows, dtype=np.int64)
    vcpu = a[:, 0].astype(np.int32)
    first = np.zeros(len(a), dtype=bool)
    seen = set()
    for i, v in enumerate(vcpu.tolist()):
        if v not in seen:
            first[i] = True
            seen.add(v)
    return Halts(vcpu, a[:, 1], a[:, 2], a[:, 3].astype(bool), first)


def match_wakers(h: Halts, send_ns: np.ndarray, wake_vcpu: np.ndarray,
                 end_slack_ns: int = 1000) -> np.ndarray:
    """Index of the wake that ended each halt, or -1.

    ``end_slack_ns`` covers the trace's microsecond timestamps (a line shows
    the end truncated to the microsecond)."""
    out = np.full(len(h), -1, dtype=np.int64)
    for v in np.unique(h.vcpu):
        idx = np.nonzero(wake_vcpu == v)[0]
        if not len(idx):
            continue
        order = np.argsort(send_ns[idx], kind="stable")
        idx = idx[order]
        sends = send_ns[idx]
        sel = np.nonzero(h.vcpu == v)[0]
        pos = np.searchsorted(sends, h.start[sel], side="left")
        ok = pos < len(sends)
        cand = np.where(ok, idx[np.minimum(pos, len(idx) - 1)], -1)
        ok &= send_ns[np.maximum(cand, 0)] <= h.end[sel] + end_slack_ns
        out[sel] = np.where(ok, cand, -1)
    return out


def quantiles(a, qs=QUANTILES) -> dict:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return {f"p{q}": None for q in qs} | {"n": 0}
    return {f"p{q}": float(np.percentile(a, q)) for q in qs} | {"n": int(a.size)}


def hist_median(hist) -> float | None:
    """Median of a 32-bucket log2 histogram (bucket i is [2^(i-1), 2^i)), interpolated
    geometrically within its bucket."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    if total == 0:
        return None
    cum = np.cumsum(h)
    i = int(np.searchsorted(cum, total / 2))
    if i == 0:
        return 0.0
    lo, hi = 2.0 ** (i - 1), 2.0 ** i
    before = cum[i - 1] if i else 0.0
    frac = (total / 2 - before) / h[i] if h[i] else 0.5
    return float(lo * (hi / lo) ** frac)


def figures(h: Halts, waker: np.ndarray, send_ns: np.ndarray, stats: list[dict],
            port_exit_ns: np.ndarray | float | None = None,
            nvcpus: int | None = None) -> dict:
    """The compared figures.  ``port_exit_ns``: per wake (kernel: seen time) or a
    constant added to the halt end (model: entry + exit); None leaves host-observed out."""
    body = ~h.first
    n = int(body.sum())
    poll = int((~h.waited & body).sum())
    wait = int((h.waited & body).sum())
    wt = h.ns[h.waited & body]
    has = (waker >= 0) & body
    lat = h.end[has] - send_ns[waker[has]]
    out = {
        "halts": n, "poll": poll, "wait": wait,
        "poll_pct": 100.0 * poll / n if n else None,
        "wait_pct": 100.0 * wait / n if n else None,
        "wait_ns": quantiles(wt),
        "wake_to_halt_end_ns": quantiles(lat),
        "wake_to_halt_end_ns_wait": quantiles(h.end[has & h.waited] -
                                              send_ns[waker[has & h.waited]]),
        "wake_to_halt_end_ns_poll": quantiles(h.end[has & ~h.waited] -
                                              send_ns[waker[has & ~h.waited]]),
        "halts_with_waker": int(has.sum()),
    }
    if port_exit_ns is not None:
        if np.ndim(port_exit_ns) == 0:
            host = lat + float(port_exit_ns)
        else:
            pe = np.asarray(port_exit_ns)[waker[has]]
            ok = pe > 0
            host = (pe - send_ns[waker[has]])[ok]
        out["host_latency_halted_ns"] = quantiles(host)
    out["per_vcpu"] = []
    nv = len(stats) if nvcpus is None else nvcpus
    for v in range(nv):
        s = h.vcpu == v
        out["per_vcpu"].append({"vcpu": v, "halts": int((s & body).sum()),
                                "poll": int((~h.waited & s & body).sum()),
                                "wait_ns_p50": quantiles(h.ns[h.waited & body & s])["p50"]})
    out["stats"] = sum_stats(stats)
    st = out["stats"]
    out["stats_wait_median_ns"] = hist_median(st["halt_wait_hist"])
    waits = int(np.asarray(st["halt_wait_hist"]).sum())
    out["stats_wait_mean_ns"] = st["halt_wait_ns"] / waits if waits else None
    att = st["halt_attempted_poll"]
    out["stats_poll_success_pct"] = 100.0 * st["halt_successful_poll"] / att if att else None
    return out


# ---------------------------------------------------------------- MSI to exit to userspace

def first_exits(sent_ns: np.ndarray, seen_ns: np.ndarray, wake_vcpu: np.ndarray) -> np.ndarray:
    """Per wake: True where its own port exit (``seen_ns``) is the first port exit of
    its vCPU's thread after its send (``sent_ns``), i.e. no other wake's exit of that
    vCPU came in between.  False where the wake was not sent or not seen.

    A wake sent while its vCPU was still to report an earlier one (the earlier MSI's
    handler not yet run, or running) has that earlier exit first: its own exit waited
    behind another wake's work."""
    sent = np.asarray(sent_ns, dtype=np.int64)
    seen = np.asarray(seen_ns, dtype=np.int64)
    vc = np.asarray(wake_vcpu)
    out = np.zeros(len(sent), dtype=bool)
    have = (sent > 0) & (seen > 0)
    for v in np.unique(vc[have]):
        idx = np.nonzero(have & (vc == v))[0]
        order = np.argsort(seen[idx], kind="stable")
        exits, who = seen[idx][order], idx[order]
        pos = np.searchsorted(exits, sent[idx], side="right")     # first exit > send
        ok = pos < len(exits)
        out[idx[ok]] = who[pos[ok]] == idx[ok]
    return out


def msi_to_exit_ns(rec, queued: bool = False) -> np.ndarray:
    """The real kernel's MSI-to-exit latency of a recording (``recording.load``), ns
    (int64), one per wake that has both ends, in wake order.

    The two ends, both ``CLOCK_MONOTONIC`` read with ``clock_gettime`` (vDSO) by the
    recorder's native threads (``_inject.pyx``), each pinned to its own host CPU:

    * **send** (``sent_ns``): the injector thread, just before its ``KVM_SIGNAL_MSI``
      ioctl on the VM fd;
    * **exit** (``seen_ns``): the vCPU's thread, just after ``ioctl(KVM_RUN)`` returns
      with the ``KVM_EXIT_IO`` that the guest's handler for this MSI's vector makes
      (``out WAKE_PORT``, its first instruction after the vector's stub; the vector
      tells which wake it answers).  The guest has no other exit to userspace while it
      runs (``hlt``, the EOI and the interrupt are handled in the kernel; the threads
      block every signal, so no ``KVM_EXIT_INTR``; ``vcpu_threads[].exits`` in the
      metadata counts them: the wakes, the ready and the stop exit), so this is the
      thread's first return to userspace after the send unless another wake's exit
      came first (below).

    The figure therefore includes, besides the kernel's wake path (the ioctl's MSI
    routing and delivery, the kick or wake-up of the vCPU thread, halt polling or
    the scheduler's switch to it, VM entry, injection, VM exit, the return from
    ``KVM_RUN``): the harness's half of a clock read at each end (~10 ns each,
    ``harness.clock_read_pair_ns``), the syscall entry of the MSI ioctl, the guest's
    vector stub (two instructions) and, on a nested host, the outer hypervisor's
    share of each of those steps.  It does not include the injector's lateness
    against the schedule (the send is when it really sent).

    Kept: wakes sent by the injector (an ``ipi`` recording: only the start MSI,
    wake 0), delivered (``ret`` > 0), seen, and, unless ``queued``, whose own exit is
    the vCPU's first exit after the send (``first_exits``: dropped are those that
    found their vCPU still to report an earlier wake, which would count that wake's
    handler in this one's latency).  Each vCPU's first wake is left out (it ends the
    halt that spans the harness's start-up, as in the other figures here)."""
    w = rec.wakes
    sent, seen, vc = w["sent_ns"], w["seen_ns"], w["vcpu"]
    keep = (sent > 0) & (seen > 0) & (w["ret"] > 0)
    if rec.meta["workload"].get("kind", "msi") == "ipi":
        keep &= np.arange(len(sent)) == 0
    if not queued:
        keep &= first_exits(sent, seen, vc)
    for v in np.unique(vc):
        keep[np.nonzero(vc == v)[0][0]] = False
    return (seen - sent)[keep].astype(np.int64)


def log2_hist(ns) -> np.ndarray:
    """Values (ns, non-negative) counted in the kernel's 32-bucket log2 layout of
    ``halt_wait_hist`` (``KVM_STATS_LOG_HIST_UPDATE``: bucket ``min(fls64(ns), 31)``,
    so bucket 0 holds 0 and bucket i >= 1 holds [2^(i-1), 2^i)); uint64 counts."""
    a = np.asarray(ns, dtype=np.int64).ravel()
    if a.size and a.min() < 0:
        raise ValueError(f"log2_hist: a negative value ({int(a.min())} ns)")
    h = np.zeros(HALT_POLL_HIST_COUNT, dtype=np.uint64)
    for v in a.tolist():
        hist_update(h, 0, v)
    return h


def latency_summary(ns) -> dict:
    """``{"p50_ns", "p90_ns", "p99_ns", "n", "hist"}`` of a latency array: the
    percentiles of the samples themselves (``quantiles``: linear interpolation, None
    when empty) and ``hist``, the 32 counts of ``log2_hist`` as ints."""
    q = quantiles(ns)
    return {"p50_ns": q["p50"], "p90_ns": q["p90"], "p99_ns": q["p99"], "n": q["n"],
            "hist": [int(c) for c in log2_hist(ns)]}


STAT_KEYS = ("halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid", "halt_wakeup",
             "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns",
             "halt_poll_success_hist", "halt_poll_fail_hist", "halt_wait_hist", "halt_exits")


def sum_stats(rows: list[dict]) -> dict:
    out: dict = {}
    for k in STAT_KEYS:
        vals = [r[k] for r in rows if k in r]
        if not vals:
            continue
        if isinstance(vals[0], (np.ndarray, list)):
            out[k] = np.sum([np.asarray(v, dtype=np.uint64) for v in vals], axis=0,
                            dtype=np.uint64)
        else:
            out[k] = int(sum(int(v) for v in vals))
    return out


def busy_samples(h: Halts, send_ns: np.ndarray, wake_vcpu: np.ndarray,
                 waker: np.ndarray | None = None,
                 compute_ns: np.ndarray | None = None) -> np.ndarray:
    """Time from a halt's end to the vCPU's next halt, where no wake to it was sent in
    between: the guest's own work per wake (entry, handler, exits).  An ipi
    recording's vCPU also computes the plan's step in that time: ``compute_ns`` (per
    wake, with ``waker`` from ``match_wakers``) is taken off; see ``busy_intervals``."""
    iv = busy_intervals(h, send_ns, wake_vcpu, waker, compute_ns)
    return iv.length[iv.quiet]


# ---------------------------------------------------------------- own work under overcommit
#
# ``busy_samples`` takes every gap between two halts of a vCPU with no wake to it in
# between as that vCPU's own work.  Where the vCPU shares its host CPU with other
# runnable threads (overcommit, the injector), the gap also holds the time the vCPU
# thread waited for the CPU.  The functions below keep only the *uncontended* gaps:
# those during which no other thread of the recording was runnable on the vCPU's CPU.
# With the scheduler's tracepoints in the recording that is read off them
# (``sched_contended``); without, the run's shape decides (``calibrate.py``).

@dataclass
class BusyIntervals:
    """The gaps between two consecutive halts of a vCPU: from a halt's end (``start``)
    to the next halt's start (``stop``); ``quiet``: no wake to that vCPU was sent in
    between (one wake's own work, not two); ``compute``: the workload's compute the
    vCPU did in the gap (an ipi plan's step; None: none), which ``length`` leaves out."""

    vcpu: np.ndarray      # int32
    start: np.ndarray     # int64 ns
    stop: np.ndarray      # int64 ns
    quiet: np.ndarray     # bool
    compute: np.ndarray | None = None   # int64 ns
    wake: np.ndarray | None = None      # int64: the wake that ended the halt before (-1)

    @property
    def length(self) -> np.ndarray:
        d = self.stop - self.start
        return d if self.compute is None else d - self.compute

    def __len__(self) -> int:
        return len(self.start)


def busy_intervals(h: Halts, send_ns: np.ndarray, wake_vcpu: np.ndarray,
                   waker: np.ndarray | None = None,
                   compute_ns: np.ndarray | None = None) -> BusyIntervals:
    """Every gap between two consecutive halts of each vCPU (see ``BusyIntervals``).

    ``compute_ns``: per wake, what the woken vCPU computes before its next halt (an ipi
    recording: the plan's ``compute_ns`` of the step, ``calibrate.plan_compute``);
    ``waker`` (``match_wakers``) says which wake ended each halt.  The gap after a halt
    is charged its waker's compute; a gap after a halt with no waker is not quiet (what
    it computed is not known)."""
    if compute_ns is not None and waker is None:
        raise ValueError("compute_ns needs waker (the wake that ended each halt)")
    vs, st, sp, qu, cp, wa = [], [], [], [], [], []
    for v in np.unique(h.vcpu):
        sel = np.nonzero(h.vcpu == v)[0]
        sends = np.sort(send_ns[wake_vcpu == v])
        ends = h.end[sel][:-1]
        nxt = h.start[sel][1:]
        lo = np.searchsorted(sends, ends, side="right")
        hi = np.searchsorted(sends, nxt, side="right")
        quiet = hi == lo
        if compute_ns is not None:
            wk = waker[sel][:-1]
            quiet &= wk >= 0
            cp.append(np.where(wk >= 0, np.asarray(compute_ns, dtype=np.int64)[wk], 0))
            wa.append(wk)
        vs.append(np.full(len(ends), v, dtype=np.int32))
        st.append(ends)
        sp.append(nxt)
        qu.append(quiet)
    if not vs:
        z = np.zeros(0, dtype=np.int64)
        return BusyIntervals(z.astype(np.int32), z, z, z.astype(bool),
                             *((None, None) if compute_ns is None else (z, z)))
    return BusyIntervals(np.concatenate(vs), np.concatenate(st).astype(np.int64),
                         np.concatenate(sp).astype(np.int64), np.concatenate(qu),
                         *((None, None) if compute_ns is None else
                           (np.concatenate(cp).astype(np.int64),
                            np.concatenate(wa).astype(np.int64))))


def runnable_segments(events, tids) -> dict[int, list[tuple[int, int, int]]]:
    """Per thread of ``tids``: ``(cpu, start, end)`` spans during which it was runnable
    (queued or running) on that CPU's run queue, from its wake-up (``sched_wakeup``,
    or being switched in) to the ``sched_switch`` that puts it to sleep, split where
    it migrates.  A span still open at the end of the trace ends at +inf.

    ``events``: ``schedtrace.SchedEvent`` records (``schedtrace.load_sched(dir).events``
    or ``schedtrace.from_timeline``), in any order (they are sorted by time here)."""
    tids = set(int(t) for t in tids)
    seg: dict[int, list] = {t: [] for t in tids}
    on: dict[int, tuple[int, int]] = {}          # tid -> (cpu, since)

    def begin(t, cpu, ts):
        cur = on.get(t)
        if cur is None:
            on[t] = (cpu, ts)
        elif cur[0] != cpu:
            seg[t].append((cur[0], cur[1], ts))
            on[t] = (cpu, ts)

    for e in sorted(events, key=lambda e: e.ts):
        if e.kind == SWITCH:
            if e.pid in tids and e.sleeps and e.pid in on:
                c, since = on.pop(e.pid)
                seg[e.pid].append((c, since, e.ts))
            elif e.pid in tids and not e.sleeps:
                begin(e.pid, e.cpu, e.ts)
            if e.next_pid in tids:
                begin(e.next_pid, e.cpu, e.ts)
        elif e.kind == SCHED_WAKEUP and e.pid in tids:
            begin(e.pid, e.target_cpu, e.ts)
        elif e.kind == MIGRATE and e.pid in tids and e.pid in on:
            begin(e.pid, e.target_cpu, e.ts)
    inf = np.iinfo(np.int64).max
    for t, (c, since) in on.items():
        seg[t].append((c, since, inf))
    return seg


def sched_contended(iv: BusyIntervals, vcpu_tid: dict[int, int],
                    segments: dict[int, list]) -> np.ndarray:
    """Per interval of ``iv``: True where another thread of ``segments`` was runnable,
    at some instant strictly inside the interval, on a CPU where the vCPU's own thread
    was runnable then (or, where the trace has no span of the vCPU there, on any CPU
    the vCPU ran on)."""
    out = np.zeros(len(iv), dtype=bool)
    for v, tid in vcpu_tid.items():
        sel = np.nonzero(iv.vcpu == v)[0]
        if not sel.size:
            continue
        own = segments.get(tid, [])
        others: dict[int, list] = {}
        for t, spans in segments.items():
            if t != tid:
                for c, s, e in spans:
                    others.setdefault(c, []).append((s, e))
        lookup = {}
        for c, spans in others.items():
            spans.sort()
            s = np.array([a for a, _ in spans], dtype=np.int64)
            e = np.maximum.accumulate(np.array([b for _, b in spans], dtype=np.int64))
            lookup[c] = (s, e)
        own_c = np.array([c for c, _, _ in own], dtype=np.int64)
        own_s = np.array([s for _, s, _ in own], dtype=np.int64)
        own_e = np.array([e for _, _, e in own], dtype=np.int64)
        all_cpus = set(own_c.tolist()) or set(lookup)
        for i in sel:
            a, b = int(iv.start[i]), int(iv.stop[i])
            hit = (own_s < b) & (own_e > a)
            cpus = set(own_c[hit].tolist()) or all_cpus
            for c in cpus:
                if c not in lookup:
                    continue
                s, e = lookup[c]
                k = int(np.searchsorted(s, b, side="left"))
                if k and e[k - 1] > a:
                    out[i] = True
                    break
    return out
