"""The state timeline as a Chrome trace-event JSON file (Perfetto, chrome://tracing).

``write_perfetto(host, path)`` writes ``{"traceEvents": [...], "displayTimeUnit": "ns"}``
with one process per host CPU (``pid`` = host CPU) and one thread per vCPU
thread (``tid`` = its host-wide index g, named ``"CPU i/KVM (VM v)"`` like
QEMU's vCPU threads) and per host thread that is not a vCPU (``Host.add_thread``;
``tid`` = g, named by its name, category ``"host"``), and a complete event (``"ph": "X"``) for every
RUNNING, POLLING, BLOCKED and RUNNABLE interval of the host's state timeline
(``Host(..., timeline_capacity=N)`` or ``host.enable_timeline(N)`` before
running).  Times are in microseconds (floats), as the format wants.
"""

from __future__ import annotations

import json

from ..model import ThreadState

#: The states drawn as slices (USER, outside KVM_RUN, is left blank).
DRAWN = (ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED, ThreadState.RUNNABLE)
_NAMES = {int(s): s.name for s in ThreadState}


def _threads(host):
    """[(g, host CPU, name, args)] of every thread of the host: its vCPU threads,
    then its host threads."""
    ncpu = host.host_cpus
    out = []
    for vm in host.vms:
        for i in range(vm.nr_vcpus):
            g = vm._first + i
            out.append((g, g % ncpu, f"CPU {i}/KVM (VM {vm.index})",
                        {"g": g, "vm": vm.index, "vcpu_id": i}))
    for t in getattr(host, "threads", ()):
        out.append((t.g, t.cpu, t.name, {"g": t.g, "host_thread": t.name}))
    return out


def trace_events(host) -> list:
    """The trace events (metadata first, then the intervals in time order)."""
    if host.timeline_capacity == 0:
        raise ValueError("the host has no state timeline: create it with "
                         "Host(..., timeline_capacity=N) or call host.enable_timeline(N) "
                         "before running")
    records = host.timeline_array()
    t0, base = host._engine.timeline_window()
    now = host.now
    threads = _threads(host)
    events: list = []
    used_cpus = sorted({c for _, c, _, _ in threads})
    for c in used_cpus:
        events.append({"ph": "M", "name": "process_name", "pid": c, "tid": 0,
                       "args": {"name": f"host CPU {c}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": c, "tid": 0,
                       "args": {"sort_index": c}})
    for g, c, name, _ in threads:
        events.append({"ph": "M", "name": "thread_name", "pid": c, "tid": g,
                       "args": {"name": name}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": c, "tid": g,
                       "args": {"sort_index": g}})
    info = {g: (c, args) for g, c, _, args in threads}
    # Each thread's open interval: (start, state).
    open_: dict = {g: (int(t0), int(base[g]) if g < len(base) else 0) for g, *_ in threads}
    slices = []

    def close(g, t):
        start, s = open_[g]
        if s in _DRAWN_INTS and t >= start:
            c, args = info[g]
            slices.append((start, g, {
                "ph": "X", "name": _NAMES[s], "cat": "host" if "host_thread" in args
                else "vcpu", "pid": c, "tid": g,
                "ts": start / 1000.0, "dur": (t - start) / 1000.0,
                "args": dict(args, start_ns=start, end_ns=t)}))

    for t, g, _cpu, s in zip(records["t"].tolist(), records["g"].tolist(),
                             records["cpu"].tolist(), records["state"].tolist()):
        if g not in open_:
            continue
        close(g, t)
        open_[g] = (t, s)
    for g in open_:
        close(g, max(now, open_[g][0]))
    slices.sort(key=lambda x: (x[0], x[1]))
    events.extend(ev for _, _, ev in slices)
    return events


_DRAWN_INTS = frozenset(int(s) for s in DRAWN)


def write_perfetto(host, path) -> int:
    """Write the host's state timeline to ``path`` as trace-event JSON; returns the
    number of interval events written."""
    events = trace_events(host)
    doc = {"traceEvents": events, "displayTimeUnit": "ns",
           "otherData": {"kvmwake": "state timeline", "now_ns": host.now,
                         "timeline_dropped": host.timeline_dropped,
                         "host_cpus": host.host_cpus, "arch": host.arch}}
    with open(path, "w") as fh:
        json.dump(doc, fh, separators=(",", ":"))
    return sum(1 for ev in events if ev["ph"] == "X")
