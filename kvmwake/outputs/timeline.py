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
    thread's state at ``t0``; ``cpus`` each thread's host CPU at ``t0`` (None:
    thread g on host CPU ``g % ncpu``; the CPU of a base state is not kept: exact
    for pinned threads; a thread that migrates may have been elsewhere at ``t0``
    if the ring dropped records); each record counts on the CPU it names, and a
    thread's RUNNING or POLLING ends on the CPU it began on.

    Returns ``{"t0", "now", "running_ns", "polling_ns", "idle_ns"}``, the last
    three numpy u8 arrays of length ``ncpu``; per CPU they add up to
    ``now - t0``.
    """
    t0 = int(t0)
    now = int(now)
    if len(records):
        now = max(now, int(records["t"][-1]))
    state = [int(s) for s in np.asarray(base, dtype=np.uint8)]
    nrun = [0] * ncpu
    npoll = [0] * ncpu
    where = [g % ncpu for g in range(len(state))]      # CPU of each thread's state
    for g, s in enumerate(state):
        c = g % ncpu if cpus is None else int(cpus[g])
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
