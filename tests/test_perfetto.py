"""kvmwake.outputs.perfetto writes valid Chrome trace-event JSON from the state timeline."""

from __future__ import annotations

import json
import os
import numbers

import pytest

from kvmwake import Host
from kvmwake import guest as G
from kvmwake.model import ThreadState
from kvmwake.outputs.perfetto import write_perfetto

SLICE_NAMES = {"RUNNING", "POLLING", "BLOCKED", "RUNNABLE"}
METADATA = {"process_name", "thread_name", "process_sort_index", "thread_sort_index"}


def _host(engine="core", capacity=1 << 16):
    host = Host(host_cpus=3, arch="arm64", seed=11, engine=engine, timeline_capacity=capacity)
    for n in (4, 2):
        vm = host.create_vm(n)
        for v in vm.vcpus:
            v.load(G.Program([G.loop([G.compute_exp(30_000), G.wake_random_other(), G.wfi()])]))
        vm.set_tick(1_000_000)
    host.halt_poll_ns = 40_000
    host.run(2_000_000)
    return host


def validate_trace_events(doc) -> dict:
    """Check ``doc`` against the trace-event format; returns per-tid X events."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit") in ("ms", "ns")
    names = {}
    procs = set()
    slices: dict = {}
    for ev in doc["traceEvents"]:
        assert isinstance(ev, dict)
        for key in ("ph", "pid", "tid", "name"):
            assert key in ev, f"{ev} lacks {key}"
        assert ev["ph"] in ("X", "M"), ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        assert isinstance(ev["name"], str)
        if ev["ph"] == "M":
            assert ev["name"] in METADATA
            assert isinstance(ev["args"], dict)
            if ev["name"] == "thread_name":
                assert isinstance(ev["args"]["name"], str)
                names[(ev["pid"], ev["tid"])] = ev["args"]["name"]
            elif ev["name"] == "process_name":
                procs.add(ev["pid"])
            continue
        for key in ("ts", "dur"):
            assert isinstance(ev[key], numbers.Real) and not isinstance(ev[key], bool)
            assert ev[key] >= 0, ev
        assert isinstance(ev["ts"], float) and isinstance(ev["dur"], float)
        assert ev["name"] in SLICE_NAMES
        assert (ev["pid"], ev["tid"]) in names, "a slice on an unnamed thread"
        assert ev["pid"] in procs, "a slice in an unnamed process"
        slices.setdefault(ev["tid"], []).append(ev)
    # A thread's slices follow each other without overlapping.
    for evs in slices.values():
        evs.sort(key=lambda e: e["ts"])
        for a, b in zip(evs, evs[1:]):
            assert a["args"]["end_ns"] <= b["args"]["start_ns"]
    return {"names": names, "slices": slices}


@pytest.mark.parametrize("engine", ["core", "reference"])
def test_write_perfetto_valid(tmp_path, engine):
    host = _host(engine)
    path = tmp_path / "trace.json"
    n = write_perfetto(host, path)
    doc = json.loads(path.read_text())
    info = validate_trace_events(doc)
    assert n == sum(len(v) for v in info["slices"].values()) > 50
    assert info["names"][(0, 0)] == "CPU 0/KVM (VM 0)"
    assert info["names"][(4 % 3, 4)] == "CPU 0/KVM (VM 1)"
    assert {e["name"] for v in info["slices"].values() for e in v} == SLICE_NAMES
    # The slices add up to the timeline: RUNNING time per CPU equals the totals'.
    tot = host.timeline_totals()
    for c in range(3):
        run = sum(e["args"]["end_ns"] - e["args"]["start_ns"]
                  for v in info["slices"].values() for e in v
                  if e["pid"] == c and e["name"] == "RUNNING")
        assert run == tot["running_ns"][c]


def test_core_and_reference_write_the_same(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_perfetto(_host("core"), a)
    write_perfetto(_host("reference"), b)
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja["traceEvents"] == jb["traceEvents"]


def test_wrapped_ring_starts_at_the_window(tmp_path):
    host = _host(capacity=40)
    assert host.timeline_dropped > 0
    write_perfetto(host, tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    info = validate_trace_events(doc)
    t0 = host.timeline_totals()["t0"]
    assert min(e["args"]["start_ns"] for v in info["slices"].values() for e in v) >= t0


def test_needs_a_timeline(tmp_path):
    host = Host(host_cpus=1)
    with pytest.raises(ValueError, match="timeline"):
        write_perfetto(host, tmp_path / "x.json")


def test_trace_processor_loads_it(tmp_path):
    """Perfetto's own TraceProcessor, given a local trace_processor_shell binary.

    The perfetto package would download that binary; this test never does:
    point KVMWAKE_TRACE_PROCESSOR at a binary to run it.
    """
    tp_mod = pytest.importorskip("perfetto.trace_processor")
    shell = os.environ.get("KVMWAKE_TRACE_PROCESSOR")
    if not shell or not os.access(shell, os.X_OK):
        pytest.skip("no local trace_processor_shell (set KVMWAKE_TRACE_PROCESSOR to one); "
                    "the trace-event format is validated by the other tests")
    host = _host()
    path = tmp_path / "trace.json"
    n = write_perfetto(host, path)
    tp = tp_mod.TraceProcessor(trace=str(path),
                               config=tp_mod.TraceProcessorConfig(bin_path=shell,
                                                                  load_timeout=20))
    try:
        rows = list(tp.query("select count(*) as n from slice"))
        assert rows[0].n == n
        names = {r.name for r in tp.query("select name from thread where name is not null")}
        assert "CPU 0/KVM (VM 0)" in names
    finally:
        tp.close()


def test_thread_states_are_the_model_states():
    assert {s.name for s in ThreadState} - {"USER"} == SLICE_NAMES
