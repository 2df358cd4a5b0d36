#!/usr/bin/env python3
"""Outputs that a change to how events are queued must leave alone, as digests.

    python tools/events_identity.py --save FILE      # record (e.g. from an older commit)
    python tools/events_identity.py --check FILE     # compare this tree with the record

For every built-in scenario, both schedulers (``fifo``, ``eevdf``) and both
engines (the core at the scenario's size, the reference engine on a smaller
set-up), it runs the scenario with the trace on, once with the state timeline
on and once with it off, and exports the engine's state halfway (the core's
run without the timeline also takes a host snapshot there, restores it and
runs the copy to the end).  Recorded per run: digests of the
per-vCPU stats array, the wake-latency histogram, the trace records, the
timeline records and window, the engine's exported state at the halfway point
and at the end (less the event heap, the sequence number and the events
count), and the restored copy's final stats and trace; plus the events count
and the halts, which are reported, not compared (only the events count may
change, and only down).  Exit status 1 when a digest differs.

``tools/events_identity_7b0fd12.json`` is the record of commit 7b0fd12, before
poll windows could end without an event (docs/design.md, "Time and events"),
after the radix-heap queue (whose reference engine exports its queue in
another form than the binary heap's, so older records differ there):

    PYTHONPATH=. python tools/events_identity.py --check tools/events_identity_7b0fd12.json

(The core's thread records are compared in their first BASE_THREAD_T bytes, the
layout of that commit: a change to thread_t's earlier fields needs a new record.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

#: (scenario, engine) -> (vCPUs, host CPUs, virtual ms); None: the scenario's own.
SETUPS = {
    ("default", "core"): (None, None, None),
    ("ipi-storm", "core"): (None, None, None),
    ("irq-storm", "core"): (None, None, 50),
    ("suspend-cycle", "core"): (None, None, None),
    ("default", "reference"): (256, 16, 40),
    ("ipi-storm", "reference"): (128, None, 20),
    ("irq-storm", "reference"): (512, 32, 10),
    ("suspend-cycle", "reference"): (256, 16, 20),
}
#: Export keys that describe the event queue, not the model.
QUEUE_KEYS = ("heap", "seq", "events", "hlen", "hcap", "cur_key")
#: Thread fields that describe queued events (a lazy poll window's end and place).
QUEUE_THREAD_FIELDS = ("poll_stop", "poll_seq")
#: sizeof(thread_t) before those fields (they are its last 16 bytes).
BASE_THREAD_T = 592


def _h(obj) -> str:
    d = hashlib.sha256()
    _feed(d, obj)
    return d.hexdigest()[:20]


def _feed(d, obj) -> None:
    if isinstance(obj, np.ndarray):
        d.update(str(obj.dtype).encode() + str(obj.shape).encode())
        d.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            d.update(repr(k).encode())
            _feed(d, obj[k])
    elif isinstance(obj, (list, tuple)):
        d.update(b"[%d" % len(obj))
        for x in obj:
            _feed(d, x)
    else:
        d.update(repr(obj).encode())


def _drop_queue(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(q in k for q in QUEUE_KEYS)}


def _state(e) -> dict:
    if hasattr(e, "export_state"):
        scalars, arrays = e.export_state()
        arrays = _drop_queue(arrays)
        from kvmwake._core import struct_sizes
        size = struct_sizes()["thread_t"]
        arrays["threads"] = arrays["threads"].reshape(-1, size)[:, :BASE_THREAD_T].copy()
        return {"scalars": _drop_queue(scalars), "arrays": arrays}
    from kvmwake.reference.snapshot import engine_export
    st = _drop_queue(engine_export(e))
    st["engine"] = _drop_queue(st["engine"])
    st["threads"] = [{k: v for k, v in d.items() if k not in QUEUE_THREAD_FIELDS}
                     for d in st["threads"]]
    return st


def one(name: str, engine: str, sched: str, timeline: bool) -> dict:
    from kvmwake import Host, scenarios
    vcpus, hc, ms = SETUPS[(name, engine)]
    kw = {}
    if ms is not None:
        kw["sim_ns"] = ms * 1_000_000
    host, ns, _ = scenarios.build(name, vcpus=vcpus, host_cpus=hc, engine=engine,
                                  trace_capacity=1 << 22, scheduler=sched, **kw)
    if timeline:
        host.enable_timeline(1 << 24)
    half = ns // 2
    host.run(half)
    e = host._engine
    mid = _state(e)
    snap = host.snapshot() if engine == "core" else None
    host.run(ns)
    out = {
        "stats": _h(e.stats_array()), "lat": _h(e.lat_hist_array()),
        "trace": _h(e.trace_list()), "mid_state": _h(mid), "end_state": _h(_state(e)),
        "events": int(e.events), "halts": int(e.halts),
    }
    if timeline:
        out["timeline"] = _h(e.timeline_array())
        out["window"] = _h(e.timeline_window())
    elif snap is not None:
        copy = Host.restore(snap)
        copy.run(ns)
        ce = copy._engine
        out["restored"] = _h([ce.stats_array(), ce.lat_hist_array(), ce.trace_list(),
                              _state(ce)])
        out["restored_events"] = int(ce.events)
    return out


def collect() -> dict:
    res = {}
    for (name, engine) in SETUPS:
        for sched in ("fifo", "eevdf"):
            for tl in (True, False):
                key = f"{name}/{engine}/{sched}/{'tl' if tl else 'notl'}"
                res[key] = one(name, engine, sched, tl)
                r = res[key]
                print(f"{key:40s} events/halt {r['events'] / max(1, r['halts']):.3f}",
                      flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--check")
    a = ap.parse_args(argv)
    res = collect()
    if a.save:
        with open(a.save, "w") as fh:
            json.dump(res, fh, indent=1, sort_keys=True)
        return 0
    with open(a.check) as fh:
        ref = json.load(fh)
    bad = 0
    for key, r in ref.items():
        got = res.get(key)
        if got is None:
            print(f"MISSING {key}")
            bad += 1
            continue
        for k, v in r.items():
            if k in ("events", "halts", "restored_events"):
                continue
            if got.get(k) != v:
                print(f"DIFFERS {key} {k}")
                bad += 1
        if got["halts"] != r["halts"] or got["events"] > r["events"]:
            print(f"DIFFERS {key} halts {r['halts']} -> {got['halts']}, "
                  f"events {r['events']} -> {got['events']}")
            bad += 1
        print(f"{key:40s} events/halt {r['events'] / max(1, r['halts']):.3f} -> "
              f"{got['events'] / max(1, got['halts']):.3f}")
    print("identical" if not bad else f"{bad} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
