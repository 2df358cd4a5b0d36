"""kvmwake.kernel.schedtrace: the scheduler's tracepoints of a recording and of a model run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kvmwake.kernel as K
from kvmwake import guest as g
from kvmwake.host import Host
from kvmwake.kernel import cli as KC
from kvmwake.kernel import schedtrace as ST
from kvmwake.model import ThreadState
from kvmwake.outputs.timeline import to_array

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = DATA / "sched-sample.txt"
#: The threads table of the (unpinned, 4 vCPU, ipi) recording the sample comes from.
SAMPLE_THREADS = [
    {"tid": 29769, "role": "vcpu", "vcpu": 0, "cpu": None},
    {"tid": 29770, "role": "vcpu", "vcpu": 1, "cpu": None},
    {"tid": 29772, "role": "vcpu", "vcpu": 2, "cpu": None},
    {"tid": 29773, "role": "vcpu", "vcpu": 3, "cpu": None},
    {"tid": 29778, "role": "injector", "vcpu": None, "cpu": None},
    {"tid": 29723, "role": "main", "vcpu": None, "cpu": None}]

S, W, M = ST.SWITCH, ST.WAKEUP, ST.MIGRATE


def test_parse_real_lines():
    ev = ST.parse(SAMPLE.read_text())
    kinds = [e.kind for e in ev]
    assert len(ev) == 22 and kinds.count(M) == 2 and kinds.count(W) == 7
    assert ev[0] == ST.SchedEvent(54554_597063_000, 0, W, 29778, target_cpu=1,   # _new
                                  by=29723, flags="d..2.")
    assert ev[0].need_resched is False
    woken = [e for e in ev if e.kind == W and e.need_resched]
    assert [(e.by, e.pid, e.target_cpu) for e in woken] == [(29777, 29723, 0), (29776, 29723, 0),
                                                            (29700, 29778, 1)]
    sw = [e for e in ev if e.kind == S and e.pid == 29769][0]     # comm "CPU 0/KVM"
    assert (sw.cpu, sw.prev_state, sw.sleeps) == (1, "S", True)
    pre = [e for e in ev if e.kind == S and e.prev_state == "R"][0]
    assert not pre.sleeps
    mig = [e for e in ev if e.kind == M]
    assert (mig[0].pid, mig[0].orig_cpu, mig[0].target_cpu, mig[0].cpu) == (29773, 0, 1, 1)
    assert all(ST.involves(e, {t["tid"] for t in SAMPLE_THREADS}) for e in ev)


def test_format_line_is_parse_lines_inverse():
    comm = {7: "a", 9: "b"}
    for e in (ST.SchedEvent(1_000_002_000, 1, W, 7, target_cpu=1, by=9, flags="dNh3."),
              ST.SchedEvent(5_000, 0, S, 9, next_pid=7, prev_state="R+", by=9, flags="d..2."),
              ST.SchedEvent(6_000, 1, M, 7, target_cpu=0, orig_cpu=1, by=0, flags="d..3.")):
        assert ST.parse_line(ST.format_line(e, comm)) == e
    assert ST.parse_line(ST.format_line(
        ST.SchedEvent(1, 1, W, 7, target_cpu=1, by=9, flags="dNh3."), comm)).need_resched
    # A model event (no logging task, no flags) prints as logged by its own thread.
    e = ST.SchedEvent(8_000, 0, W, 7, target_cpu=0)
    assert e.need_resched is None
    assert ST.parse_line(ST.format_line(e, comm)) == ST.SchedEvent(
        8_000, 0, W, 7, target_cpu=0, by=7, flags="d..2.")


def test_parse_errors_and_other_lines():
    assert ST.parse_line("# comment") is None
    assert ST.parse_line("  x-1 [000] d..2. 1.000001: kvm_vcpu_wakeup: wait time 5 ns, "
                         "polling valid") is None
    with pytest.raises(ST.SchedTraceError, match="line 7: sched_switch"):
        ST.parse_line("  x-1 [000] d..2. 1.000001: sched_switch: garbage", 7)


def test_filter_sched_keeps_the_threads_lines():
    text, kept, dropped = ST.filter_sched(SAMPLE.read_text(), {29769})
    ev = ST.parse(text)
    assert kept == len(ev) == 4 and dropped == 18
    assert all(ST.involves(e, {29769}) for e in ev)
    assert text.startswith("# tracer: nop")


def _sw(ts, cpu, prev, nxt, state="S"):
    return ST.SchedEvent(ts, cpu, S, prev, next_pid=nxt, prev_state=state)


def _wk(ts, pid, cpu):
    return ST.SchedEvent(ts, cpu, W, pid, target_cpu=cpu)


ROLES = {1: "vcpu", 2: "vcpu", 9: "injector"}


def test_preemption_rate_hand_built():
    ev = [
        _sw(0, 0, 0, 1, "R"),          # vCPU 1 runs on CPU 0
        _wk(10, 9, 0),                 # injector woken onto it ...
        _sw(12, 0, 1, 9, "R"),         # ... and preempts it: 1 of 1
        _sw(20, 0, 9, 1, "S"),         # injector sleeps, vCPU 1 back
        _wk(30, 9, 0),                 # injector woken again ...
        _sw(40, 0, 1, 9, "S"),         # ... but gets the CPU only as vCPU 1 sleeps: no
        _wk(50, 1, 0),                 # vCPU 1 woken onto the injector's CPU
        _sw(55, 0, 9, 1, "R+"),        # preempts it: vcpu->injector 1 of 1
        _wk(60, 2, 1),                 # vCPU 2 woken onto idle CPU 1: not counted
        _wk(70, 2, 0),                 # vCPU 2 woken onto CPU 0 (vCPU 1 runs) ...
        _sw(80, 1, 5, 2, "R"),         # ... runs on CPU 1 instead: not a preemption
        _wk(90, 9, 0),                 # a wake-up the trace never decides: not counted
    ]
    r = ST.preemption_rate(ev, ROLES)
    assert r["injector->vcpu"] == {"wakeups": 2, "preempted": 1, "rate": 0.5}
    assert r["vcpu->injector"] == {"wakeups": 1, "preempted": 1, "rate": 1.0}
    assert r["vcpu->vcpu"] == {"wakeups": 1, "preempted": 0, "rate": 0.0}
    with pytest.raises(ValueError, match="roles"):
        ST.preemption_rate(ev)


def test_migration_rate_hand_built():
    ev = [
        _sw(0, 0, 0, 1), _sw(5, 0, 1, 0),             # vCPU 1: runs on 0, sleeps
        _sw(10, 1, 0, 1), _sw(15, 1, 1, 0),           # on 1: moved
        _sw(20, 1, 0, 1, "R"),
        _sw(22, 1, 1, 0, "R"),                        # preempted: same run period
        ST.SchedEvent(23, 1, M, 1, target_cpu=0, orig_cpu=1),
        _sw(25, 0, 0, 1, "R"), _sw(30, 0, 1, 0),      # continues on 0: not a new period
        _sw(40, 0, 0, 1), _sw(45, 0, 1, 0),           # on 0 again: not moved
        _sw(50, 0, 0, 2), _sw(55, 0, 2, 0),           # vCPU 2: one period only
    ]
    r = ST.migration_rate(ev, {1: 0, 2: 1})
    v0, v1 = r["per_vcpu"]
    assert (v0["periods"], v0["moved"], v0["migrations"]) == (3, 2, 1)
    assert v0["rate"] == pytest.approx(2 / 3)
    assert (v1["periods"], v1["rate"]) == (0, None)
    assert r["pooled"] == {"periods": 3, "moved": 2, "rate": pytest.approx(2 / 3),
                           "migrations": 1}


def test_from_timeline_hand_built():
    R, P, B, Q = (int(ThreadState.RUNNING), int(ThreadState.POLLING),
                  int(ThreadState.BLOCKED), int(ThreadState.RUNNABLE))
    tl = to_array([
        (0, 0, 0, R), (0, 1, 1, R),
        (10, 1, 1, P), (12, 1, 1, B),          # thread 1 halts, blocks on CPU 1
        (20, 1, 0, Q),                         # woken onto CPU 0 (migrated) where 0 runs
        (25, 0, 0, Q), (25, 1, 0, R),          # and preempts thread 0
        (30, 1, 0, B), (30, 0, 0, R),
    ])
    threads = [{"tid": 0, "role": "vcpu", "vcpu": 0, "cpu": None},
               {"tid": 1, "role": "vcpu", "vcpu": 1, "cpu": None}]
    tr = ST.from_timeline(tl, threads)
    kinds = [(e.kind, e.pid) for e in tr.events]
    assert (M, 1) in kinds and (W, 1) in kinds
    assert ST.preemption_rate(tr)["vcpu->vcpu"] == {"wakeups": 1, "preempted": 1, "rate": 1.0}
    m = ST.migration_rate(tr)
    assert m["per_vcpu"][1]["periods"] == 1 and m["per_vcpu"][1]["moved"] == 1
    assert m["per_vcpu"][1]["migrations"] == 1


def test_from_timeline_of_a_model_run():
    h = Host(host_cpus=2, arch="x86", timeline_capacity=1 << 16)
    vm = h.create_vm(4)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(20_000), g.wake_random_other(), g.hlt()])])
    h.run(5_000_000)
    tr = ST.from_timeline(h)
    assert [t["vcpu"] for t in tr.threads] == [0, 1, 2, 3]
    n_wake = sum(1 for e in tr.events if e.kind == W)
    blocked = sum(int(s) == ThreadState.BLOCKED for s in h.timeline_array()["state"])
    assert n_wake > 50 and abs(n_wake - blocked) <= 4     # every blocked halt is woken
    m = ST.migration_rate(tr)
    assert m["pooled"]["periods"] > 50
    assert m["pooled"]["rate"] == 0.0                     # thread g stays on CPU g % 2
    r = ST.preemption_rate(tr)
    assert r["vcpu->vcpu"]["wakeups"] > 0
    assert ST.figures(tr) == {"preemption": r, "migration": m}


# ---------------------------------------------------------------- a real recording

AVAIL = K.available()


@pytest.mark.kvm
def test_real_recording_has_the_sched_trace(tmp_path, capsys):
    if not AVAIL:
        pytest.skip(f"no usable /dev/kvm: {AVAIL.reason}")
    if not AVAIL.tracefs:
        pytest.skip(f"tracefs unusable: {AVAIL.tracefs_reason}")
    d = tmp_path / "r"
    rc = KC.main(["record", "--workload", "ipi", "--vcpus", "2", "--wakes", "80",
                  "--sched-trace", "require", "-o", str(d)])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["pinned"] is True and meta["sched_trace"]["mode"] == "tracefs"
    roles = [(t["role"], t["vcpu"]) for t in meta["threads"]]
    assert roles == [("vcpu", 0), ("vcpu", 1), ("injector", None), ("main", None)]
    assert [t["tid"] for t in meta["threads"][:2]] == meta["vcpu_tids"]
    assert all(t["cpu"] is not None for t in meta["threads"][:3])
    tr = ST.load_sched(d)
    tids = {t["tid"] for t in meta["threads"]}
    assert len(tr.events) == meta["sched_trace"]["lines"] > 0
    assert all(ST.involves(e, tids) for e in tr.events)
    m = ST.migration_rate(tr)
    assert all(r["periods"] > 0 for r in m["per_vcpu"])
    assert m["pooled"]["moved"] == 0 and m["pooled"]["migrations"] == 0   # pinned
    # Each vCPU thread is switched in on its pinned CPU only.
    pinned = {t["tid"]: t["cpu"] for t in meta["threads"] if t["role"] == "vcpu"}
    assert all(e.cpu == pinned[e.next_pid] for e in tr.events
               if e.kind == ST.SWITCH and e.next_pid in pinned)
    # --sched-trace off: no file, the metadata says so.
    d2 = tmp_path / "off"
    assert KC.main(["record", "--vcpus", "1", "--wakes", "20", "--idle", "short",
                    "--sched-trace", "off", "-o", str(d2)]) == 0
    meta2 = json.loads((d2 / "metadata.json").read_text())
    assert meta2["sched_trace"]["mode"] == "off" and not (d2 / ST.SCHED_TRACE).exists()
    assert ST.load_sched(d2) is None
