"""examples/threaded_vmm.py, the VMM with a thread per vCPU: its command line (the
same output on every run), its PSCI SYSTEM_SUSPEND handling across threads, its
snapshot of paused vCPU threads, and the tutorial's copy of its code
(docs/tutorial-vmm.md, "A VMM with a thread per vCPU")."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import kvmwake as kw
from kvmwake.vcpu_threads import IN_RUN
from kvmwake.uapi import ExitReason, MpState, PsciFn, PsciRet, SystemEventType

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "threaded_vmm.py"
TUTORIAL = ROOT / "docs" / "tutorial-vmm.md"
SECTION = "A VMM with a thread per vCPU"
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def ex():
    """The example, imported as a module."""
    spec = importlib.util.spec_from_file_location("threaded_vmm", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_example(*argv):
    """``python examples/threaded_vmm.py ARGV`` from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "examples/threaded_vmm.py", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


# -- the command line ---------------------------------------------------------------------

def test_the_command_line_runs_every_check_and_repeats_itself():
    first, second = run_example(), run_example()
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stderr == ""
    out = first.stdout
    for line in ("--- run", "SYSTEM_SUSPEND denied: vCPU 1 is RUNNABLE",
                 "SYSTEM_SUSPEND honoured: the others are off, SUSPENDED",
                 "control  wake-up: raises SPI 40",
                 "WAKEUP: resumes at 0x4000004c with x0 = 0xc0ffee00005eed",
                 "vCPU 0 is done: the VM stops", "--- checks",
                 "ok   the first SYSTEM_SUSPEND was denied: the guest read x0 = DENIED",
                 "ok   restored run: the same events and exits after the snapshot",
                 "ok   the same final snapshot, byte for byte",
                 "2 SYSTEM_SUSPEND calls, 1 denied, 1 resumed"):
        assert line in out, line
    assert "FAIL" not in out and "error" not in out
    assert re.search(r"^ +100\.000 us  control  pauses every vCPU$", out, re.M)
    assert re.search(r"^  vCPU 0: SYSTEM_EVENT SUSPEND @[\d.]+, SYNC DENIED @", out, re.M)
    # Deterministic, whatever the OS does with the threads.
    assert second.returncode == 0 and second.stdout == out


def test_the_command_line_options():
    r = run_example("--vcpus", "6", "--seed", "7", "--snapshot-at", "24.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("threaded_vmm: 6 vCPUs, seed 7; snapshot at 24.5 us")
    assert "  vCPU 5: INTR @" in r.stdout and "FAIL" not in r.stdout
    r = run_example("--vcpus", "1")
    assert r.returncode == 2 and "at least 2" in r.stderr
    r = run_example("--snapshot-at", "900")
    assert r.returncode == 2 and "--snapshot-at < --wake-at" in r.stderr


def test_a_wake_up_before_the_suspend_is_a_failed_check():
    r = run_example("--wake-at", "200")
    assert r.returncode == 1
    assert "error: vCPU 0 is not suspended at 200000 ns, the wake-up time" in r.stdout
    assert "FAIL a later one was honoured" in r.stdout


# -- the VMM's SYSTEM_SUSPEND handling -------------------------------------------------------

def test_denied_with_a_secondary_on_then_resumed_at_the_entry_with_the_context(ex, monkeypatch):
    """The exits and the registers, seen from the vCPU threads: x0 = DENIED after the
    early call, and after the wake-up PC = entry, x0 = context ID, RUNNABLE."""
    vm, entry = ex.build_vm(4, seed=3)
    vmm = ex.Vmm(vm, out=lambda line: None)
    seen = []                        # (vCPU id, exit, pc, x0, MP state) after the VMM's work
    decided = []                     # (x0, MP state, the others' MP states) per suspend
    handle_exit, system_suspend = ex.handle_exit, ex.system_suspend

    def exit_spy(vmm_, vcpu, exit_):
        if exit_.reason == ExitReason.SYSTEM_EVENT \
                and exit_.system_event.type == SystemEventType.SUSPEND:
            assert [vcpu.get_reg(r) for r in ("x0", "x1", "x2")] == \
                [PsciFn.FN64_SYSTEM_SUSPEND, entry, ex.CONTEXT_ID]    # KVM left them
        handle_exit(vmm_, vcpu, exit_)
        seen.append((vcpu.id, exit_, vcpu.get_reg("pc"), vcpu.get_reg("x0"),
                     vcpu.get_mp_state()))

    def suspend_spy(vmm_, vcpu):
        system_suspend(vmm_, vcpu)
        # The others are out of KVM_RUN until they get the token back (else these
        # vCPU ioctls would wait for them: vcpu->mutex).
        assert all(v.thread_role != IN_RUN for v in vm.vcpus[1:])
        decided.append((vcpu.get_reg("x0"), vcpu.get_mp_state(),
                        {v.get_mp_state() for v in vm.vcpus[1:]}))

    monkeypatch.setattr(ex, "handle_exit", exit_spy)
    monkeypatch.setattr(ex, "system_suspend", suspend_spy)
    ex.run_vmm(vmm, snapshot_at=None, wake_at=ex.WAKE_AT_NS)
    assert vmm.errors == []
    boot = [s for s in seen if s[0] == 0 and s[1].reason != ExitReason.INTR]
    kinds = [(s[1].reason, s[1].system_event.type if s[1].system_event else s[1].ucall)
             for s in boot]
    assert kinds == [(ExitReason.SYSTEM_EVENT, SystemEventType.SUSPEND),
                     (ExitReason.MMIO, "SYNC"),
                     (ExitReason.SYSTEM_EVENT, SystemEventType.SUSPEND),
                     (ExitReason.SYSTEM_EVENT, SystemEventType.WAKEUP),
                     (ExitReason.MMIO, "SYNC"), (ExitReason.MMIO, "DONE")]
    _, synced, _, woken, resumed, _ = boot
    # Denied: a secondary was still on; the guest read DENIED in x0.  Then honoured:
    # every other vCPU off (CPU_OFF), vCPU 0 SUSPENDED until the SPI.
    assert decided[0][:2] == (PsciRet.DENIED & U64, MpState.RUNNABLE)
    assert MpState.RUNNABLE in decided[0][2]
    assert synced[1].value == PsciRet.DENIED & U64
    assert decided[1][1:] == (MpState.SUSPENDED, {MpState.STOPPED}) and len(decided) == 2
    assert woken[1].time_ns >= ex.WAKE_AT_NS
    # Resumed at the entry point with the context ID in x0, RUNNABLE ...
    assert (woken[2], woken[3], woken[4]) == (entry, ex.CONTEXT_ID, MpState.RUNNABLE)
    # ... which the guest's first op there synced back.
    assert resumed[1].value == ex.CONTEXT_ID
    assert (vmm.suspends, vmm.denials, vmm.resumes, vmm.pending) == (2, 1, 1, {})
    # The secondaries only left KVM_RUN for the VMM's signals.
    assert {s[1].reason for s in seen if s[0] != 0} == {ExitReason.INTR}
    assert all(not v.attached and v.outside_run for v in vm.vcpus)


@pytest.mark.parametrize("snapshot_us", [1, 20, 23.5, 24, 24.5, 26, 29, 30, 100, 337, 500])
def test_snapshot_at_any_time_restores_to_the_same_end(ex, snapshot_us, capsys):
    """A snapshot taken while vCPU 0's thread pauses the others (it hands the pause
    over), or while the control thread's pause is under way when vCPU 0 suspends
    (it waits inside it), restores to the same run as any other."""
    assert ex.main(["--snapshot-at", str(snapshot_us)]) == 0, capsys.readouterr().out


def test_both_overlapping_pauses_are_exercised(ex, monkeypatch):
    """Some snapshot time of the test above falls in each overlap: the control thread
    takes over vCPU 0's pause, and vCPU 0 decides inside the control thread's."""
    seen = set()
    end_pause = ex.end_pause

    def spy(vmm, vcpu):
        if vmm.pauser == "control":
            seen.add("inside the control thread's pause")
        elif vmm.handover:
            seen.add("handed over to the control thread")
        end_pause(vmm, vcpu)

    monkeypatch.setattr(ex, "end_pause", spy)
    for t in (23_500, 24_500):
        vm, _ = ex.build_vm()
        vmm = ex.Vmm(vm, out=lambda line: None)
        ex.run_vmm(vmm, t, ex.WAKE_AT_NS)
        assert vmm.errors == [] and vmm.snapshot is not None
    assert seen == {"inside the control thread's pause", "handed over to the control thread"}


# -- the tutorial's copy ------------------------------------------------------------------

def top_level(tree) -> dict:
    """name -> AST dump of each top-level function, class and assigned constant."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.dump(node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.dump(node.value)
    return out


def test_the_tutorial_walks_through_this_very_code():
    text = TUTORIAL.read_text()
    start = re.search(rf"^## \d+\. {re.escape(SECTION)}$", text, re.M)
    assert start, f"docs/tutorial-vmm.md has no section {SECTION!r}"
    assert not re.search(r"^## ", text[start.end():], re.M), "it is the last section"
    blocks = re.findall(r"^```python\n(.*?)^```", text[start.end():], re.S | re.M)
    doc = {}
    for b in blocks:
        doc.update(top_level(ast.parse(b)))
    example = top_level(ast.parse(EXAMPLE.read_text()))
    shared = sorted(set(doc) & set(example))
    for name in ("Vmm", "vcpu_thread", "handle_exit", "stop_point", "pause_vcpus",
                 "resume_vcpus", "pause_others", "end_pause", "system_suspend",
                 "system_wakeup", "shutdown", "snapshot_paused", "wake_up",
                 "control_thread", "run_vmm", "build_vm"):
        assert name in shared, f"the tutorial does not show {name}"
    for name in shared:
        assert doc[name] == example[name], f"the tutorial's {name} differs from the example's"
