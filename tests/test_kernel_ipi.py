"""The ipi workload of ``kvmwake kernel record``: the plan, the guest, the model's run, and
a real recording (skipped, with the reason, where /dev/kvm or tracefs is missing)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import kvmwake.kernel as K
from kvmwake.kernel import cli as KC
from kvmwake.kernel import microvm as mv
from kvmwake.kernel import recording as R
from kvmwake.kernel import schedtrace as ST
from kvmwake.kernel import simulate as S
from kvmwake.kernel import workload as W


# ---------------------------------------------------------------- the plan

def test_plan_is_a_chain_of_other_vcpus():
    p = W.ipi_plan(7, 4, 500)
    assert len(p) == 500 and p.vcpu[0] == 0
    assert np.all(p.vcpu[1:] != p.vcpu[:-1])            # random-other: never itself
    assert set(p.vcpu.tolist()) == {0, 1, 2, 3}
    assert list(p.sender[:3]) == [-1, int(p.vcpu[0]), int(p.vcpu[1])]
    assert len(p.compute_ns) == 499 and p.compute_ns.min() >= 0
    assert 10_000 < p.compute_ns.mean() < 30_000       # exp:20us
    for v in range(4):                                 # each vCPU's wakes numbered 0, 1, ...
        assert list(p.index[p.vcpu == v]) == list(range(int((p.vcpu == v).sum())))
    assert np.array_equal(p.target_ns[1:], np.cumsum(p.compute_ns))
    assert list(p.vector[:1]) == [mv.wake_vector(0)]
    assert W.VEC_BASE_IPI == mv.VEC_BASE and W.NR_VECTORS_IPI == mv.NR_VECTORS


def test_plan_is_deterministic_and_seeded():
    a, b = W.ipi_plan(3, 3, 200), W.ipi_plan(3, 3, 200)
    assert np.array_equal(a.vcpu, b.vcpu) and np.array_equal(a.compute_ns, b.compute_ns)
    c = W.ipi_plan(4, 3, 200)
    assert not np.array_equal(a.vcpu, c.vcpu)
    # The draws are integer SplitMix64: these values hold on every machine.
    p = W.ipi_plan(1, 3, 6)
    assert p.vcpu.tolist() == [0, 2, 1, 0, 2, 0]
    assert p.compute_ns.tolist() == [63406, 35639, 22932, 30148, 37427]


def test_plan_steps_follow_the_chain():
    p = W.ipi_plan(5, 3, 50, compute="fixed:10us", targets="next", start_vcpu=1)
    assert p.vcpu.tolist()[:5] == [1, 2, 0, 1, 2]
    steps = [p.steps(v) for v in range(3)]
    assert sum(len(s) for s in steps) == 50
    ends = [(v, i) for v, s in enumerate(steps) for i, st in enumerate(s) if st[1] < 0]
    assert ends == [(int(p.vcpu[-1]), len(steps[int(p.vcpu[-1])]) - 1)]
    # Replaying the steps from the start reproduces the chain.
    pos = [0, 0, 0]
    v, order = p.start_vcpu, []
    while True:
        order.append(v)
        c, dest, vec = steps[v][pos[v]]
        pos[v] += 1
        if dest < 0:
            break
        assert c == 10_000 and vec == mv.wake_vector(pos[dest])
        v = dest
    assert order == p.vcpu.tolist()
    d = p.to_dict()
    assert d["kind"] == "ipi" and d["targets"] == "next" and d["wakes"] == 50
    assert d["duration_ns"] == 49 * 10_000


@pytest.mark.parametrize("args, message", [
    (dict(nr_vcpus=1), "at least 2 vCPUs"),
    (dict(targets="all"), "targets must be one of"),
    (dict(start_vcpu=5), "start_vcpu"),
    (dict(wakes=0), "wakes must be"),
    (dict(compute="exp:0us"), "positive mean"),
    (dict(seed=-1), "seed"),
])
def test_plan_bad_arguments(args, message):
    kw = dict(seed=0, nr_vcpus=3, wakes=10) | args
    with pytest.raises(W.SpecError, match=message):
        W.ipi_plan(**kw)


# ---------------------------------------------------------------- the guest

def test_msi_guest_is_unchanged():
    assert mv.guest_code()[0].hex() == (
        "c705f000e0feff010000e611fbf4ebfce610c705b000e0fe0000000083c40ce9e8ffffffe612faf4ebfc")


def test_ipi_guest_and_step_table():
    code, halt, common, fault = mv.guest_code(ipi=True)
    assert b"\xB9" + struct.pack("<I", mv.X2APIC_ICR_MSR) + b"\x0F\x30" in code
    assert bytes([0xE6, mv.SEND_PORT]) in code and bytes([0xE6, mv.DONE_PORT]) in code
    assert b"\xC7\x05" not in code                     # no xAPIC MMIO in x2APIC mode
    assert len(code) <= mv.STUBS_ADDR - mv.CODE_ADDR
    t = mv.step_table([(100, 2, 0x31), (0, -1, 0)])
    assert len(t) == 3 * mv.STEP_SIZE
    assert struct.unpack("<3I", t[:12]) == (100, 2, 0x31 | mv.ICR_LEVEL_ASSERT)
    assert struct.unpack("<3I", t[12:24])[1] == mv.STEP_END
    assert struct.unpack("<3I", t[24:])[1] == mv.STEP_END
    with pytest.raises(ValueError):
        mv.step_table([(1 << 33, 1, 0x30)])


# ---------------------------------------------------------------- the model

def _setup(plan, host_cpus=2):
    return S.Setup(plan.vcpus, host_cpus, {"halt_poll_ns": 200_000}, None, plan.target_ns,
                   plan.vcpu, plan.index, None, plan)


def test_simulate_ipi_runs_the_plan():
    plan = W.ipi_plan(2, 3, 200)
    r = S.simulate(_setup(plan), S.SimParams())
    assert np.all(r.send_ns >= 0)                       # every wake was sent
    assert np.all(np.diff(r.send_ns) > 0)               # one chain: in plan order
    gaps = np.diff(r.send_ns)
    assert np.all(gaps >= plan.compute_ns)              # each step computed first
    n_halts = sum(1 for e in r.events if e.event == "kvm_vcpu_wakeup")
    assert 150 <= n_halts <= 200 + 3
    # Deterministic per seed.
    r2 = S.simulate(_setup(plan), S.SimParams())
    assert np.array_equal(r.send_ns, r2.send_ns)
    # The host's thread timeline as scheduler events: three vCPUs (no injector thread in
    # the model's ipi run), pinned on 2 CPUs (no migration); a halt that waited ends
    # with its thread's wake-up (one that polled never left the CPU).
    assert [t["role"] for t in r.sched.threads] == ["vcpu"] * 3
    assert [t["vcpu"] for t in r.sched.threads] == [0, 1, 2]
    mig = ST.migration_rate(r.sched)["pooled"]
    assert mig["rate"] == 0.0 and mig["periods"] > 100
    waited = sum(1 for e in r.events if e.event == "kvm_vcpu_wakeup" and e.waited)
    # (and each thread's first entry into KVM_RUN is one, as sched_wakeup_new)
    assert sum(e.kind == ST.WAKEUP for e in r.sched.events) == waited + 3


def test_model_guest_stays_masked_from_the_handler_to_its_halt():
    """The micro-VM's handler EOIs and jumps back to ``sti; hlt`` without ``iret``, so
    IF stays 0 through the step's compute and send: an IPI that reaches a vCPU before
    it halts is taken at its ``sti; hlt``.  The model's program does the same
    (``iret=False``); with ``iret`` it would be taken at once, the step's halt would
    then wait for a wake that never comes, and the chain would stop."""
    from kvmwake import guest as g
    plan = W.ipi_plan(2, 3, 20)
    for v in range(3):
        prog = S._ipi_program(plan, v, 7_000)
        assert prog[0] == g.set_handler(7_000, iret=False)
        assert not any(op == g.set_handler(7_000) for op in prog)


# ---------------------------------------------------------------- the real kernel

AVAIL = K.available()


@pytest.mark.kvm
def test_record_ipi_accounts_for_every_wake(tmp_path, capsys):
    if not AVAIL:
        pytest.skip(f"no usable /dev/kvm: {AVAIL.reason}")
    d = tmp_path / "ipi"
    rc = KC.main(["record", "--workload", "ipi", "--vcpus", "2", "--wakes", "60",
                  "--compute", "fixed:10us", "--seed", "3", "-o", str(d)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "IPI chain of 60 wakes" in out.out
    meta = json.loads((d / "metadata.json").read_text())
    wl = meta["workload"]
    assert wl["kind"] == "ipi" and wl["wakes"] == 60 and wl["targets"] == "random-other"
    assert wl["seed"] == 3 and wl["canonical"] == "fixed:10us" and wl["tsc_khz"] > 0
    assert meta["wakes"] == {"sent": 60, "delivered": 60, "seen": 60, "not_seen": 0}
    rec = R.load(d)
    plan = R.regenerate_plan(rec)
    w = rec.wakes
    assert np.all(w["seen_ns"] > w["sent_ns"])           # each wake seen after its send
    # Wake k+1 is sent by the vCPU wake k woke, after it saw wake k and computed.
    assert np.all(w["sent_ns"][1:] > w["seen_ns"][:-1])
    assert np.all(w["vcpu"] == plan.vcpu)
    if rec.traced:
        assert KC.main(["replay", str(d), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["mismatched"] == 0 and r["halts"] > 0
        assert KC.main(["calibrate", str(d), "--quick"]) == 0
        assert KC.main(["compare", str(d), "--no-png"]) == 0
        assert "kernel vs model" in capsys.readouterr().out


def test_record_msi_needs_idle(tmp_path, capsys):
    assert KC.main(["record", "--vcpus", "2", "--wakes", "5", "-o", str(tmp_path / "x")]) == 2
    assert "--idle SPEC is required" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--vcpus", "1"], "at least 2 vCPUs"),
    (["--vcpus", "2", "--compute", "bogus"], "KIND:ARGS"),
    (["--vcpus", "2", "--compute", "exp:0us"], "positive mean"),
])
def test_record_ipi_bad_arguments(argv, message, tmp_path, capsys):
    out = tmp_path / "x"
    assert KC.main(["record", "--workload", "ipi", "--wakes", "10", *argv,
                    "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_workload_kind_defaults_to_msi():
    assert R.workload_kind({"workload": {"spec": "short", "seed": 0, "wakes": 1}}) == "msi"
    assert R.workload_kind({"workload": W.ipi_plan(0, 2, 3).to_dict()}) == "ipi"
