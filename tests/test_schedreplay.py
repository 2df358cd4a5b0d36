"""kvmwake.kernel.schedreplay: the model's EEVDF rules on a scheduler trace's timing.

On the model's own trace the rules must give back the model's own decisions, every
one of them, and the picks it made; on hand-built kernel lines the decision is the
need-resched flag of the wake-up's line.
"""

from __future__ import annotations

import json

import pytest

import kvmwake as kw
from kvmwake import guest as G
from kvmwake.kernel import cli as KC
from kvmwake.kernel import schedreplay as SR
from kvmwake.kernel import schedtrace as ST
from kvmwake.kernel import synthetic as Y
from kvmwake.reference import host as rhost

US = 1_000
ZERO = dict.fromkeys(("vm_exit_ns", "vm_entry_ns", "wake_to_run_ns", "context_switch_ns",
                      "ipi_send_ns"), 0)


def model_run(monkeypatch, ncpu, skip, unpinned=False, seed=3):
    """A reference-engine run on ``ncpu`` CPUs, 3 vCPUs a CPU waking each other, with
    every wake-up preemption decision it made: {(t, woken g): need_resched}."""
    decisions = {}
    orig = rhost.check_preempt_wakeup_fair

    def spy(e, cpu, p, t):
        had = cpu.need_resched
        orig(e, cpu, p, t)
        if not had:
            decisions[(t, p)] = cpu.need_resched
    monkeypatch.setattr(rhost, "check_preempt_wakeup_fair", spy)
    host = kw.Host(host_cpus=ncpu, scheduler="eevdf", costs=ZERO, engine="reference",
                   timeline_capacity=1 << 20, seed=seed, preempt_skips_delayed=skip)
    host.halt_poll_ns = 0
    vm = host.create_vm(3 * ncpu, affinity="all" if unpinned else "pinned")
    for v in vm.vcpus:
        v.load(G.Program([G.loop([G.compute_exp(40 * US), G.wake_next(),
                                  G.timer_arm_exp(60 * US), G.wfi()])]))
    host.run(20_000 * US)
    return ST.from_timeline(host), decisions


@pytest.mark.parametrize("ncpu", [1, 2])
@pytest.mark.parametrize("skip", [False, True])
def test_the_rules_give_back_the_models_own_decisions(monkeypatch, ncpu, skip):
    trace, decisions = model_run(monkeypatch, ncpu, skip)
    asked = {}
    orig = SR._decide

    def spy(e, cpu, g, t):
        d = orig(e, cpu, g, t)
        asked[(t, g)] = d
        return d
    monkeypatch.setattr(SR, "_decide", spy)
    r = SR.replay(trace, ncpu)
    rule = "skips_delayed" if skip else "upstream"
    both = [k for k in asked if k in decisions]
    assert len(both) > 300
    assert all(asked[k][rule] == decisions[k] for k in both)
    # The other rule decides otherwise somewhere: the check can tell them apart.
    other = "upstream" if skip else "skips_delayed"
    assert any(asked[k][other] != decisions[k] for k in both)
    assert r["picks"]["agree"] == 1.0 and r["picks"]["n"] > 500
    row = r["pairs"]["vcpu->vcpu"]
    assert row["n"] > 300 and row["decided"] == 0        # the model's trace has no flags
    counts = row[f"{rule}_counts"]
    assert sum(counts.values()) == row["n"]


def test_unpinned_threads_and_migrations(monkeypatch):
    trace, decisions = model_run(monkeypatch, 2, False, unpinned=True, seed=5)
    assert any(e.kind == ST.MIGRATE for e in trace.events)
    r = SR.replay(trace, 2)
    assert r["picks"]["agree"] > 0.95


def _lines(*rows):
    comm = {10: "A", 11: "B", 12: "C"}
    return [ST.parse_line(ST.format_line(e, comm)) for e in rows]


def test_the_kernels_decision_is_the_need_resched_flag():
    """One CPU.  B runs 100 us from t = 0 while A waits, then sleeps with v 100 > V
    = 50 (delayed); A runs 150 us (v 150 > V = 125) and wakes C onto its CPU:
    upstream picks the delayed B (no preemption), preempt_skips_delayed picks C.
    The kernel's line carries N (it decided to preempt) and C runs 2 us later."""
    threads = [{"tid": t, "role": "vcpu", "vcpu": i, "cpu": 0}
               for i, t in enumerate((10, 11, 12))]
    ev = _lines(
        ST.SchedEvent(0, 0, ST.WAKEUP, 11, target_cpu=0, by=0, flags="d..2."),
        ST.SchedEvent(0, 0, ST.WAKEUP, 10, target_cpu=0, by=0, flags="d..2."),
        ST.SchedEvent(0, 0, ST.SWITCH, 0, next_pid=11, prev_state="R"),
        ST.SchedEvent(100 * US, 0, ST.SWITCH, 11, next_pid=10, prev_state="S"),
        ST.SchedEvent(250 * US, 0, ST.WAKEUP, 12, target_cpu=0, by=10, flags="dN.2."),
        ST.SchedEvent(252 * US, 0, ST.SWITCH, 10, next_pid=12, prev_state="R"))
    r = SR.replay(ST.SchedTrace(ev, threads), 1)
    row = r["pairs"]["vcpu->vcpu"]
    assert (row["n"], row["kernel_rate"], row["decided"], row["kernel_decided_rate"]) == \
        (1, 1.0, 1, 1.0)
    assert (row["upstream_rate"], row["upstream_agree_decided"]) == (0.0, 0.0)
    assert (row["skips_delayed_rate"], row["skips_delayed_agree_decided"]) == (1.0, 1.0)
    assert row["upstream_counts"] == {"both": 0, "rule_only": 0, "kernel_only": 1,
                                      "neither": 0}
    assert r["picks"] == {"n": 3, "agreed": 3, "agree": 1.0}
    # Two recordings pooled: counts summed, rates as computed from the sums.
    both = SR.pooled([r, r])
    assert both["pairs"]["vcpu->vcpu"]["counts"]["n"] == 2
    assert both["pairs"]["vcpu->vcpu"]["skips_delayed_agree_decided"] == 1.0
    assert both["picks"] == {"n": 6, "agreed": 6, "agree": 1.0}
    # Logged on another CPU (a remote wake-up), the flag is not the target's: no decision.
    ev2 = list(ev)
    ev2[4] = ST.SchedEvent(250 * US, 1, ST.WAKEUP, 12, target_cpu=0, by=99, flags="dN.2.")
    row2 = SR.replay(ST.SchedTrace(ev2, threads), 2)["pairs"]["vcpu->vcpu"]
    assert row2["decided"] == 0 and row2["kernel_decided_rate"] is None


def test_cli_on_a_synthetic_recording(tmp_path, capsys):
    d = tmp_path / "rec"
    Y.make_recording(d, "mixed", 300, vcpus=3, host_cpus=2, sched_trace=True)
    assert KC.main(["sched-replay", str(d), "--min-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "the EEVDF rules on the kernel's own timing" in out and "picks after a switch" in out
    assert KC.main(["sched-replay", str(d), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["host_cpus"] == 2 and got["picks"]["n"] > 0
    bare = tmp_path / "bare"
    Y.make_recording(bare, "mixed", 50, vcpus=1, host_cpus=1)
    assert KC.main(["sched-replay", str(bare)]) == 2
    assert "no scheduler trace" in capsys.readouterr().err
    assert KC.main(["sched-replay", str(tmp_path / "missing")]) == 2
