"""kvmwake.kernel.replay: real traces replayed through the kernel's halt-poll rule."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmwake.haltpoll import GROW, SHRINK, HaltPollParams, adapt, clamp_on_entry
from kvmwake.kernel.replay import MAX_MISMATCHES, main, replay, replay_file
from kvmwake.outputs.tracefmt import TraceEvent, TraceFormatError, events_to_text, parse

DATA = Path(__file__).parent / "data"
CAP_TRACE = DATA / "mixed-1vcpu-cap120000.trace"
DEFAULT_TRACE = DATA / "mixed-2vcpu-default.trace"
X86 = HaltPollParams(halt_poll_ns=200_000)


def _count(path, name):
    return sum(f": {name}: " in line for line in path.read_text().splitlines())


# ---------------------------------------------------------------- real traces

@pytest.mark.parametrize("path, max_halt_poll_ns", [
    (CAP_TRACE, 120_000),
    (DEFAULT_TRACE, None),
])
def test_real_trace_replays_without_mismatch(path, max_halt_poll_ns):
    r = replay_file(path, X86, max_halt_poll_ns)
    assert r.mismatched == 0, r.mismatches
    assert r.halts == _count(path, "kvm_vcpu_wakeup")
    assert r.recorded_lines == _count(path, "kvm_halt_poll_ns")
    assert r.matched == r.recorded_lines
    assert (r.poll, r.wait) == (0, r.halts)             # NOTES.md: every wakeup said "wait"
    assert sum(s["halts"] for s in r.per_pid.values()) == r.halts


def test_cap_is_the_same_as_module_parameter():
    r = replay_file(CAP_TRACE, HaltPollParams(halt_poll_ns=120_000))
    assert (r.mismatched, r.matched) == (0, 1141)
    assert r.max_halt_poll_ns == 120_000


def test_two_vcpus_keep_separate_state():
    r = replay_file(DEFAULT_TRACE, X86)
    assert {pid: s["vcpu_id"] for pid, s in r.per_pid.items()} == {7628: 1, 7626: 0}
    assert list(r.per_pid) == [7628, 7626]              # order of appearance


@pytest.mark.parametrize("path, params, max_halt_poll_ns", [
    (CAP_TRACE, X86, 500_000),                          # wrong ceiling
    (CAP_TRACE, X86, None),                             # ignoring the VM's cap
    (DEFAULT_TRACE, HaltPollParams(200_000, halt_poll_ns_shrink=0), None),   # pre-6.11 shrink
    (DEFAULT_TRACE, HaltPollParams(200_000, halt_poll_ns_grow_start=5000), None),
])
def test_wrong_parameters_give_mismatches(path, params, max_halt_poll_ns):
    r = replay_file(path, params, max_halt_poll_ns)
    assert r.mismatched > 0
    assert len(r.mismatches) == MAX_MISMATCHES
    first = r.mismatches[0]
    assert first["line"] is not None or first["actual_line"] is not None
    assert first["expected"] != first["actual"]


# ---------------------------------------------------------------- hand-built traces

def w(ns, pid=1, waited=True, valid=True):
    kind, validity = ("wait" if waited else "poll"), ("valid" if valid else "invalid")
    return (f"  CPU 0/KVM-{pid} [000] ..... 1.000000: kvm_vcpu_wakeup: "
            f"{kind} time {ns} ns, polling {validity}")


def hp(new, op, old, pid=1, vcpu=0):
    return (f"  CPU 0/KVM-{pid} [000] ..... 1.000000: kvm_halt_poll_ns: "
            f"vcpu {vcpu}: halt_poll_ns {new} ({op} {old})")


PARAMS_50US = HaltPollParams(halt_poll_ns=50_000)
GROW_AND_SHRINK = [
    hp(10_000, "grow", 0), w(5_000),            # grow from 0 to grow_start
    hp(20_000, "grow", 10_000), w(15_000),
    hp(40_000, "grow", 20_000), w(30_000),
    hp(80_000, "grow", 40_000), w(45_000),      # grow is not clamped...
    hp(25_000, "shrink", 50_000), w(60_000),    # ...the next entry clamps 80000 to 50000
    hp(12_500, "shrink", 25_000), w(70_000),
    hp(0, "shrink", 12_500), w(70_000),         # 6250 < grow_start: 0
    w(70_000),                                  # long halt at 0: nothing
    hp(10_000, "grow", 0), w(3_000),
    w(8_000),                                   # within the poll window: keep
    w(50_000),                                  # not < max: no grow
]


def test_hand_built_grow_clamp_shrink():
    r = replay(parse(GROW_AND_SHRINK), PARAMS_50US)
    assert r.mismatches == []
    assert (r.halts, r.recorded_lines, r.matched, r.mismatched) == (11, 8, 8, 0)


def test_shrink_factor_zero():
    params = HaltPollParams(halt_poll_ns=200_000, halt_poll_ns_shrink=0)
    lines = [hp(10_000, "grow", 0), w(1_000), hp(20_000, "grow", 10_000), w(15_000),
             hp(0, "shrink", 20_000), w(300_000)]
    assert replay(parse(lines), params).mismatched == 0
    # The same trace under the v6.11+ default (halve) does not fit.
    r = replay(parse(lines), HaltPollParams(halt_poll_ns=200_000))
    assert r.mismatched == 1
    assert r.mismatches[0]["expected"] == "vcpu 0: halt_poll_ns 10000 (shrink 20000)"
    assert r.mismatches[0]["actual"] == "vcpu 0: halt_poll_ns 0 (shrink 20000)"


def test_grow_zero_still_traces():
    params = HaltPollParams(halt_poll_ns=200_000, halt_poll_ns_grow=0)
    lines = [hp(0, "grow", 0), w(1_000), hp(0, "grow", 0), w(2_000)]
    assert replay(parse(lines), params).matched == 2


def test_ceiling_zero_never_traces():
    r = replay(parse([w(1_000), w(2_000)]), X86, max_halt_poll_ns=0)
    assert (r.halts, r.matched, r.mismatched) == (2, 0, 0)


def test_invalid_wakeup_shrinks():
    lines = [hp(10_000, "grow", 0), w(1_000), hp(20_000, "grow", 10_000), w(12_000),
             hp(10_000, "shrink", 20_000), w(1_000, waited=False, valid=False)]
    r = replay(parse(lines), X86)
    assert (r.mismatched, r.matched, r.poll, r.wait) == (0, 3, 1, 2)


def test_interleaved_vcpus():
    lines = [w(50_000_000, pid=1), w(50_000_000, pid=2),
             hp(10_000, "grow", 0, pid=2, vcpu=1), w(1_000, pid=2),
             hp(10_000, "grow", 0, pid=1, vcpu=0), w(1_000, pid=1),
             hp(0, "shrink", 10_000, pid=2, vcpu=1), w(900_000, pid=2)]
    r = replay(parse(lines), X86)
    assert (r.mismatched, r.matched) == (0, 3)
    assert r.per_pid == {1: {"halts": 2, "matched": 1, "mismatched": 0, "vcpu_id": 0},
                         2: {"halts": 3, "matched": 2, "mismatched": 0, "vcpu_id": 1}}


def test_each_kind_of_mismatch():
    lines = [w(5_000),                              # 2: predicted grow, none recorded
             hp(20_000, "grow", 10_000), w(15_000),  # 3-4: matched
             hp(40_000, "grow", 20_000), w(100),     # 5-6: recorded, none predicted
             hp(99, "grow", 20_000), w(30_000),      # 7-8: differs
             hp(1, "shrink", 2)]                     # 9: no wakeup follows
    r = replay(parse(["# header"] + lines, source="t"), PARAMS_50US)
    assert (r.halts, r.recorded_lines, r.matched, r.mismatched) == (4, 4, 1, 4)
    assert [(m["line"], m["actual_line"], m["expected"], m["actual"]) for m in r.mismatches] == [
        (2, None, "vcpu ?: halt_poll_ns 10000 (grow 0)", None),
        (6, 5, None, "vcpu 0: halt_poll_ns 40000 (grow 20000)"),
        (8, 7, "vcpu 0: halt_poll_ns 40000 (grow 20000)", "vcpu 0: halt_poll_ns 99 (grow 20000)"),
        (None, 9, None, "vcpu 0: halt_poll_ns 1 (shrink 2)"),
    ]
    assert r.mismatches[1]["halt_ns"] == 100 and r.mismatches[1]["halt_poll_ns"] == 20_000
    assert "not followed" in r.mismatches[3]["what"]


def test_vcpu_id_change_on_one_thread_is_a_mismatch():
    lines = [hp(10_000, "grow", 0, vcpu=0), w(1_000), hp(20_000, "grow", 10_000, vcpu=3),
             w(15_000)]
    r = replay(parse(lines), X86)
    assert (r.matched, r.mismatched) == (1, 1)


def test_mismatch_details_are_capped():
    r = replay(parse([w(1_000), w(300_000)] * 50), X86)    # grow, shrink, ...: none recorded
    assert r.mismatched == 100 and len(r.mismatches) == MAX_MISMATCHES
    assert json.loads(json.dumps(r.to_dict()))["mismatched"] == 100


# ---------------------------------------------------------------- files and directories

def test_recording_directory(tmp_path):
    (tmp_path / "trace").write_text(CAP_TRACE.read_text())
    assert replay_file(tmp_path, X86, 120_000).matched == 1141
    other = tmp_path / "other"
    other.mkdir()
    (other / "trace.txt").write_text("\n".join(GROW_AND_SHRINK) + "\n")
    assert replay_file(other, PARAMS_50US).matched == 8


def test_directory_without_trace(tmp_path):
    (tmp_path / "stats.json").write_text("{}")
    with pytest.raises(TraceFormatError, match=f"{tmp_path} is a directory with no file "
                                               "named trace or trace.txt"):
        replay_file(tmp_path, X86)


def test_missing_trace(tmp_path):
    with pytest.raises(TraceFormatError, match="No such file"):
        replay_file(tmp_path / "absent.trace", X86)


# ---------------------------------------------------------------- command line

def test_cli_json(capsys):
    rc = main([str(CAP_TRACE), "--halt-poll-ns", "200000", "--max-halt-poll-ns", "120000",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert (out["halts"], out["matched"], out["mismatched"]) == (2498, 1141, 0)
    assert out["per_pid"] == {"7579": {"halts": 2498, "matched": 1141, "mismatched": 0,
                                       "vcpu_id": 0}}
    assert out["params"]["halt_poll_ns"] == 200000 and out["max_halt_poll_ns"] == 120000


def test_cli_table(capsys):
    rc = main([str(DEFAULT_TRACE), "--halt-poll-ns", "200000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "halts                   2499 (poll 0, wait 2499)" in out
    assert "matched                 1644" in out


def test_cli_mismatch_exit_code(capsys):
    rc = main([str(CAP_TRACE), "--halt-poll-ns", "500000"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "first 20 mismatches:" in out and "line 15 pid 7579" in out


def test_cli_garbage_file(tmp_path, capsys):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    rc = main([str(path), "--halt-poll-ns", "200000", "--json"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err.startswith(f"kvmwake: error: {path}: not a text trace")
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("argv", [
    [str(CAP_TRACE)],                                   # --halt-poll-ns is required
    [str(CAP_TRACE), "--halt-poll-ns", "-1"],
    [str(CAP_TRACE), "--halt-poll-ns", "200000", "--shrink", "4294967296"],
])
def test_cli_usage_errors(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- property

def _simulate(halts, params, ceiling):
    """Events the kernel would print for ``halts`` = [(vcpu, halt_ns), ...]."""
    state: dict[int, int] = {}
    events, ts = [], 1_000_000_000
    for vcpu, halt_ns in halts:
        pid, ts = 1000 + vcpu, ts + halt_ns + 1000
        old = clamp_on_entry(state.get(vcpu, 0), ceiling)
        state[vcpu], kind = adapt(old, halt_ns, ceiling, params)
        if kind in (GROW, SHRINK):
            events.append(TraceEvent.halt_poll(f"CPU {vcpu}/KVM", pid, vcpu, ts, vcpu_id=vcpu,
                                               new=state[vcpu], grow=kind == GROW, old=old))
        events.append(TraceEvent.wakeup(f"CPU {vcpu}/KVM", pid, vcpu, ts, ns=halt_ns,
                                        waited=halt_ns > old))
    return events


@settings(max_examples=200, deadline=None)
@given(
    halts=st.lists(st.tuples(st.integers(0, 3),
                             st.one_of(st.integers(0, 400_000), st.integers(0, 2**40))),
                   max_size=200),
    halt_poll_ns=st.sampled_from([0, 10_000, 120_000, 200_000, 500_000, 2**32 - 1]),
    grow=st.integers(0, 5),
    grow_start=st.sampled_from([0, 1, 10_000, 50_000]),
    shrink=st.integers(0, 4),
    cap=st.one_of(st.none(), st.integers(0, 1_000_000)),
)
def test_simulated_trace_replays_exactly(halts, halt_poll_ns, grow, grow_start, shrink, cap):
    params = HaltPollParams(halt_poll_ns, grow, grow_start, shrink)
    ceiling = halt_poll_ns if cap is None else cap
    events = _simulate(halts, params, ceiling)
    reparsed = parse(events_to_text(events), source="simulated")
    assert reparsed == [TraceEvent(**{**vars(ev), "ts_ns": ev.ts_ns // 1000 * 1000})
                        for ev in events]
    r = replay(reparsed, params, cap)
    assert r.mismatches == []
    assert r.halts == len(halts)
    assert r.matched == r.recorded_lines == len(events) - len(halts)
