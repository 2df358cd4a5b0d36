"""The optional state timeline: every thread state change, and what it adds up to.

Threads are the host's vCPU threads and its host threads that are not vCPUs
(``Host.add_thread``): a record's ``g`` is the thread's index on the host.

With ``Host(..., timeline_capacity=N)`` (or ``host.enable_timeline(N)`` before
the host runs) both engines record each change of a vCPU thread's
``model.ThreadState`` as ``(t, g, cpu, state)``: at virtual time ``t`` thread
``g`` (on host CPU ``cpu``) went to ``state``.  The newest ``N`` records are
kept (a ring, like the trace ring); older ones are dropped and counted.

The *recorded window* runs from ``t0`` (0, or the time of the newest dropped
record) to ``now``.  Each engine keeps, per thread, its state at ``t0`` (the
state the dropped records left it in), so the window's totals are exact.
"""

from __future__ import annotations

import numpy as np

from ..model import ThreadState

#: One record; the layout of the core's ``tl_rec_t`` (24 bytes).
TIMELINE_DTYPE = np.dtype({"names": ["t", "g", "cpu", "state"],
                           "formats": ["<u8", "<u4", "<u4", "u1"],
                           "offsets": [0, 8, 12, 16], "itemsize": 24})

_RUNNING = int(ThreadState.RUNNING)
_POLLING = int(ThreadState.POLLING)


def to_array(records) -> np.ndarray:
    """Records ``[(t, g, cpu, state), ...]`` as a ``TIMELINE_DTYPE`` array."""
    out = np.zeros(len(records), dtype=TIMELINE_DTYPE)
    if len(records):
        t, g, cpu, state = zip(*records)
        out["t"] = t
        out["g"] = g
        out["cpu"] = cpu
        out["state"] = state
    return out


def totals(records: np.ndarray, base: np.ndarray, t0: int, now: int, ncpu: int,
           cpus=None) -> dict:
    """Per host CPU, ns spent RUNNING, POLLING and idle over ``[t0, now]``.

    A host CPU counts as running while one of its threads is RUNNING, polling
    while one is POLLING (and none RUNNING), idle otherwise (threads RUNNABLE
    on a CPU that is switching to them count as idle).  ``base`` holds each
    thread's state at ``t0``; ``cpus`` each thread's host CPU now (None: thread
    g on host CPU ``g % ncpu``).  Each record counts on the CPU it names, and a
    thread's RUNNING or POLLING ends on the CPU it began on, by a record there:
    so a thread RUNNING or POLLING at ``t0`` was on the CPU that its first record
    names, or, with no record since, on its CPU now (``cpus_at_start``; exact,
    whatever records the ring dropped and however the thread migrated).

    Returns ``{"t0", "now", "running_ns", "polling_ns", "idle_ns"}``, the last
    three numpy u8 arrays of length ``ncpu``; per CPU they add up to
    ``now - t0``.
    """
    t0 = int(t0)
    now = int(now)
    cpus = cpus_at_start(records, len(base), ncpu, cpus)
    if len(records):
        now = max(now, int(records["t"][-1]))
    ts = np.asarray(records["t"], dtype=np.uint64) if len(records) else None
    if ts is not None and len(ts) > 1 and bool(np.any(ts[1:] < ts[:-1])):
        return _totals_loop(records, base, t0, now, ncpu, cpus)
    return _totals_arrays(records, base, t0, now, ncpu, cpus)


def cpus_at_start(records: np.ndarray, nth: int, ncpu: int, cpus=None) -> np.ndarray:
    """Each of ``nth`` threads' host CPU at the start of ``records``: the CPU its first
    record names, or, with no record, ``cpus`` (its CPU now; None: ``g % ncpu``)."""
    out = (np.arange(nth, dtype=np.int64) % ncpu if cpus is None
           else np.array(cpus, dtype=np.int64)[:nth])
    if len(records):
        g, first = np.unique(np.asarray(records["g"], dtype=np.int64), return_index=True)
        inside = g < nth
        out[g[inside]] = np.asarray(records["cpu"], dtype=np.int64)[first[inside]]
    return out


def _totals_arrays(records, base, t0: int, now: int, ncpu: int, cpus) -> dict:
    """``totals`` with numpy, for records in time order: what ``_totals_loop`` adds up,
    one record at a time, summed over each CPU's intervals between count changes
    (narrow integer types and temporaries dropped early: a full plot timeline of
    262,144 records needs about 20 MB)."""
    base = np.asarray(base, dtype=np.uint8)
    nbase = len(base)
    home = np.asarray(cpus, dtype=np.int64)[:nbase]     # cpus_at_start
    nrun = np.bincount(home[base == _RUNNING], minlength=ncpu).astype(np.int64)
    npoll = np.bincount(home[base == _POLLING], minlength=ncpu).astype(np.int64)
    run = np.zeros(ncpu, dtype=np.uint64)
    poll = np.zeros(ncpu, dtype=np.uint64)
    idle = np.zeros(ncpu, dtype=np.uint64)
    last = np.full(ncpu, t0, dtype=np.uint64)      # each CPU's time accounted up to
    if len(records):
        ev_rec, ev_cpu, ev_run, ev_poll = _count_changes(records, base, ncpu, home)
        if len(ev_rec):
            # By CPU, then in record order.
            k = np.lexsort((ev_rec, ev_cpu))
            ev_rec, ev_cpu, ev_run, ev_poll = ev_rec[k], ev_cpu[k], ev_run[k], ev_poll[k]
            del k
            ev_t = np.asarray(records["t"], dtype=np.uint64)[ev_rec]
            del ev_rec
            start = np.ones(len(ev_cpu), dtype=bool)
            start[1:] = ev_cpu[1:] != ev_cpu[:-1]
            seg_first = np.flatnonzero(start)[np.cumsum(start, dtype=np.int32) - 1]
            # Counts before each change: the CPU's base counts plus its earlier changes.
            before = np.cumsum(ev_run, dtype=np.int32) - ev_run
            run_before = nrun[ev_cpu] + (before - before[seg_first])
            before = np.cumsum(ev_poll, dtype=np.int32) - ev_poll
            poll_before = npoll[ev_cpu] + (before - before[seg_first])
            del before, seg_first
            # The interval each change closes: from the CPU's previous change (or t0).
            prev_t = np.empty(len(ev_t), dtype=np.uint64)
            prev_t[1:] = ev_t[:-1]
            prev_t[start] = t0
            np.maximum(prev_t, np.uint64(t0), out=prev_t)
            dt = np.where(ev_t > prev_t, ev_t - prev_t, np.uint64(0))
            del prev_t
            is_run = run_before != 0
            is_poll = ~is_run & (poll_before != 0)
            del run_before, poll_before
            np.add.at(run, ev_cpu[is_run], dt[is_run])
            np.add.at(poll, ev_cpu[is_poll], dt[is_poll])
            rest = ~is_run & ~is_poll
            np.add.at(idle, ev_cpu[rest], dt[rest])
            del dt, is_run, is_poll, rest
            np.add.at(nrun, ev_cpu, ev_run.astype(np.int64))
            np.add.at(npoll, ev_cpu, ev_poll.astype(np.int64))
            end_at = np.flatnonzero(np.append(start[1:], True))
            last[ev_cpu[end_at]] = np.maximum(ev_t[end_at], np.uint64(t0))
    end = np.uint64(max(now, 0))
    dt = np.where(end > last, end - last, np.uint64(0))
    is_run = nrun != 0
    is_poll = ~is_run & (npoll != 0)
    run += np.where(is_run, dt, np.uint64(0))
    poll += np.where(is_poll, dt, np.uint64(0))
    idle += np.where(~is_run & ~is_poll, dt, np.uint64(0))
    return {"t0": t0, "now": now, "running_ns": run, "polling_ns": poll, "idle_ns": idle}


def _count_changes(records, base, ncpu: int, home):
    """The changes of the per-CPU counts the records make, in record order: arrays of
    (record index, CPU, running count change, polling count change).  A record takes
    its thread's previous state (its previous record's, else its base state, 0 for a
    thread added since) off the CPU of its previous record (else its CPU at the start,
    ``home``; CPU g % ncpu for a thread added since), and puts its new state on the
    CPU it names."""
    n = len(records)
    g = np.asarray(records["g"], dtype=np.int64)
    order = np.argsort(g, kind="stable")
    gs = g[order]
    del g
    first = np.ones(n, dtype=bool)
    first[1:] = gs[1:] != gs[:-1]
    s = np.asarray(records["state"], dtype=np.int8)
    c = np.asarray(records["cpu"], dtype=np.int32)
    ps = np.empty(n, dtype=np.int8)
    pc = np.empty(n, dtype=np.int32)
    ps[1:] = s[order[:-1]]
    pc[1:] = c[order[:-1]]
    ext = np.zeros(max(len(base), int(gs[-1]) + 1), dtype=np.int8)
    ext[:len(base)] = base
    ps[first] = ext[gs[first]]
    at = np.arange(len(ext), dtype=np.int32) % ncpu
    at[:len(home)] = home
    pc[first] = at[gs[first]]
    del gs, first, ext, at
    prev_s = np.empty(n, dtype=np.int8)
    prev_c = np.empty(n, dtype=np.int32)
    prev_s[order] = ps
    prev_c[order] = pc
    del order, ps, pc
    out_m = (prev_s == _RUNNING) | (prev_s == _POLLING)
    in_m = (s == _RUNNING) | (s == _POLLING)
    ev_rec = np.concatenate([np.flatnonzero(out_m), np.flatnonzero(in_m)]).astype(np.int32)
    ev_cpu = np.concatenate([prev_c[out_m], c[in_m]])
    ev_run = np.concatenate([-(prev_s[out_m] == _RUNNING).astype(np.int8),
                             (s[in_m] == _RUNNING).astype(np.int8)])
    ev_poll = np.concatenate([-(prev_s[out_m] == _POLLING).astype(np.int8),
                              (s[in_m] == _POLLING).astype(np.int8)])
    return ev_rec, ev_cpu, ev_run, ev_poll


def _totals_loop(records, base, t0: int, now: int, ncpu: int, cpus) -> dict:
    """``totals`` one record at a time (records in any order; ``now`` is the end)."""
    state = [int(s) for s in np.asarray(base, dtype=np.uint8)]
    nrun = [0] * ncpu
    npoll = [0] * ncpu
    where = [int(cpus[g]) for g in range(len(state))]  # CPU of each thread's state
    for g, s in enumerate(state):
        c = where[g]
        if s == _RUNNING:
            nrun[c] += 1
        elif s == _POLLING:
            npoll[c] += 1
    last = [t0] * ncpu
    run = [0] * ncpu
    poll = [0] * ncpu
    idle = [0] * ncpu

    def advance(c, t):
        dt = t - last[c]
        if dt > 0:
            if nrun[c]:
                run[c] += dt
            elif npoll[c]:
                poll[c] += dt
            else:
                idle[c] += dt
            last[c] = t

    if len(records):
        for t, g, c, s in zip(records["t"].tolist(), records["g"].tolist(),
                              records["cpu"].tolist(), records["state"].tolist()):
            while g >= len(state):          # a thread added after the base was taken
                where.append(len(state) % ncpu)
                state.append(0)
            advance(c, t)
            old, oc = state[g], where[g]
            if old in (_RUNNING, _POLLING) and oc != c:
                advance(oc, t)
            if old == _RUNNING:
                nrun[oc] -= 1
            elif old == _POLLING:
                npoll[oc] -= 1
            if s == _RUNNING:
                nrun[c] += 1
            elif s == _POLLING:
                npoll[c] += 1
            state[g] = s
            where[g] = c
    for c in range(ncpu):
        advance(c, now)
    return {"t0": t0, "now": now,
            "running_ns": np.array(run, dtype=np.uint64),
            "polling_ns": np.array(poll, dtype=np.uint64),
            "idle_ns": np.array(idle, dtype=np.uint64)}
