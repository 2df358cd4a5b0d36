"""kvmwake.outputs.tracefmt: the kernel's kvm_vcpu_wakeup / kvm_halt_poll_ns text, in and out."""

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmwake.outputs import tracefmt

from kvmwake.outputs.tracefmt import (HALT_POLL_NS, TRACE_RECORD_DTYPE, WAKEUP, TraceEvent,
                              TraceFormatError, events_to_text, format_event, parse, read,
                              records_to_events, write)

DATA = Path(__file__).parent / "data"
TRACES = sorted(DATA.glob("*.trace"))
WAKEUP_LINE = ("         python3-7628    [001] .....  1083.824979: "
               "kvm_vcpu_wakeup: wait time 50661630 ns, polling valid")


def test_real_traces_present():
    assert [p.name for p in TRACES] == ["mixed-1vcpu-cap120000.trace",
                                        "mixed-2vcpu-default.trace"]


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_round_trip_every_line(path):
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines
    for line in lines:
        (ev,) = parse(line)
        assert format_event(ev) == line


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_whole_file_round_trip(path):
    # Header included: the entries count and #P come out as the kernel wrote them.
    assert events_to_text(read(path)) == path.read_text()


@pytest.mark.parametrize("path, wakeups, lines, pids", [
    (DATA / "mixed-1vcpu-cap120000.trace", 2498, 1141, {7579}),
    (DATA / "mixed-2vcpu-default.trace", 2499, 1644, {7626, 7628}),
])
def test_read_real_trace(path, wakeups, lines, pids):
    events = read(path)
    assert sum(ev.event == WAKEUP for ev in events) == wakeups
    assert sum(ev.event == HALT_POLL_NS for ev in events) == lines
    assert {ev.pid for ev in events} == pids
    assert all(ev.comm == "python3" for ev in events)
    assert events[0].line_no == 13          # after the 12 header lines
    assert [ev.ts_ns for ev in events] == sorted(ev.ts_ns for ev in events)


def test_parse_fields():
    (ev,) = parse(WAKEUP_LINE)
    assert ev == TraceEvent.wakeup("python3", 7628, 1, 1083824979000, ns=50661630,
                                   waited=True, valid=True)
    assert ev.line_no == 1
    (ev,) = parse("  python3-7626    [000] .....  1083.826961: kvm_halt_poll_ns: "
                  "vcpu 0: halt_poll_ns 20000 (grow 10000)")
    assert ev == TraceEvent.halt_poll("python3", 7626, 0, 1083826961000, vcpu_id=0,
                                      new=20000, grow=True, old=10000)
    (ev,) = parse("  python3-7626 [000] ..... 5.000001: kvm_vcpu_wakeup: "
                  "poll time 12 ns, polling invalid")
    assert (ev.waited, ev.valid, ev.ns, ev.ts_ns) == (False, False, 12, 5_000_001_000)


def test_line_no_not_compared():
    a = TraceEvent.wakeup("x", 1, 0, 0, ns=1, waited=True, line_no=3)
    b = TraceEvent.wakeup("x", 1, 0, 0, ns=1, waited=True, line_no=99)
    assert a == b


def test_trace_cmd_report_style():
    text = """cpus=2
         python3-7628  [001]  1083.824979: kvm_vcpu_wakeup:      wait time 50661630 ns, polling valid
         python3-7626  [000]  1083.826715: kvm_halt_poll_ns:     vcpu 0: halt_poll_ns 10000 (grow 0)
         python3-7626  [000]  1083.826716: kvm_vcpu_wakeup:      wait time 136973 ns, polling valid
"""
    events = parse(text)
    assert [(ev.pid, ev.event, ev.line_no) for ev in events] == [
        (7628, WAKEUP, 2), (7626, HALT_POLL_NS, 3), (7626, WAKEUP, 4)]
    assert events[0] == parse(WAKEUP_LINE)[0]
    assert events[1].new == 10000 and events[1].grow and events[1].old == 0


@pytest.mark.parametrize("prefix", [
    "  CPU 0/KVM-1234    [003] d..1.  ",                # 5 flags, comm with space and slash
    "  CPU 0/KVM-1234    [003] d..1  ",                 # older 4-char flags
    "  CPU 0/KVM-1234    [003]  ",                      # no flags column
    "  CPU 0/KVM-1234 (   1200) [003] .....  ",         # options/record-tgid
])
def test_flags_and_comm_variants(prefix):
    (ev,) = parse(prefix + "12.345678: kvm_vcpu_wakeup: poll time 7 ns, polling valid")
    assert (ev.comm, ev.pid, ev.cpu, ev.ts_ns) == ("CPU 0/KVM", 1234, 3, 12_345_678_000)


def test_pid_split_at_last_dash():
    (ev,) = parse("qemu-system-x86-12-4242 [000] .....   1.000000: kvm_vcpu_wakeup: "
                  "wait time 5 ns, polling valid")
    assert (ev.comm, ev.pid) == ("qemu-system-x86-12", 4242)


def test_nanosecond_timestamp():
    (ev,) = parse("a-1 [000] 1.123456789: kvm_vcpu_wakeup: wait time 5 ns, polling valid")
    assert ev.ts_ns == 1_123_456_789


def test_interleaved_pids_and_unrelated_lines():
    text = """# tracer: nop
#
##### CPU 1 buffer started ####
 CPU 0/KVM-10 [000] ..... 1.000001: kvm_entry: vcpu 0, rip 0x1000
 CPU 1/KVM-11 [001] ..... 1.000002: kvm_vcpu_wakeup: wait time 100 ns, polling valid

CPU:1 [LOST 3 EVENTS]
 CPU 0/KVM-10 [000] ..... 1.000003: kvm_halt_poll_ns: vcpu 0: halt_poll_ns 10000 (grow 0)
 CPU 0/KVM-10 [000] ..... 1.000003: kvm_vcpu_wakeup: wait time 200 ns, polling valid
 CPU 1/KVM-11 [001] ..... 1.000004: kvm_exit: vcpu 1 reason HLT rip 0x1002
 CPU 1/KVM-11 [001] ..... 1.000005: kvm_vcpu_wakeup: poll time 300 ns, polling valid
"""
    events = parse(text.splitlines(keepends=True), source="mixed")
    assert [(ev.comm, ev.pid, ev.event, ev.line_no) for ev in events] == [
        ("CPU 1/KVM", 11, WAKEUP, 5),
        ("CPU 0/KVM", 10, HALT_POLL_NS, 8),
        ("CPU 0/KVM", 10, WAKEUP, 9),
        ("CPU 1/KVM", 11, WAKEUP, 11),
    ]


@pytest.mark.parametrize("line, problem", [
    ("a-1 [000] ..... 1.000000: kvm_vcpu_wakeup: wait time lots ns, polling valid",
     "kvm_vcpu_wakeup body"),
    ("a-1 [000] ..... 1.000000: kvm_vcpu_wakeup: wait time 5 ns, polling maybe",
     "kvm_vcpu_wakeup body"),
    ("a-1 [000] ..... 1.000000: kvm_vcpu_wakeup:", "kvm_vcpu_wakeup body"),
    ("a-1 [000] ..... 1.000000: kvm_halt_poll_ns: vcpu 0: halt_poll_ns 5 (up 2)",
     "kvm_halt_poll_ns body"),
    ("a-1 [000] ..... 1.000000: kvm_halt_poll_ns: vcpu 0: halt_poll_ns 4294967296 (grow 0)",
     "new = 4294967296"),
    ("garbled prefix: kvm_vcpu_wakeup: wait time 5 ns, polling valid", "prefix"),
])
def test_malformed_kvm_line_names_source_and_line(line, problem):
    text = "# tracer: nop\n\n" + line + "\n"
    with pytest.raises(TraceFormatError) as info:
        parse(text, source="run.trace")
    message = str(info.value)
    assert message.startswith("run.trace:3: ")
    assert problem in message


def test_read_malformed_names_path_and_line(tmp_path):
    path = tmp_path / "bad.trace"
    path.write_text(WAKEUP_LINE + "\n" + WAKEUP_LINE.replace("50661630", "5066x630") + "\n")
    with pytest.raises(TraceFormatError, match=rf"^{path}:2: kvm_vcpu_wakeup body"):
        read(path)


def test_read_missing_file(tmp_path):
    path = tmp_path / "nope.trace"
    with pytest.raises(TraceFormatError) as info:
        read(path)
    assert str(path) in str(info.value) and "No such file" in str(info.value)


def test_read_directory(tmp_path):
    with pytest.raises(TraceFormatError, match="Is a directory"):
        read(tmp_path)


def test_read_binary_garbage(tmp_path):
    path = tmp_path / "garbage.trace"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(TraceFormatError, match=rf"{path}: not a text trace \(NUL byte"):
        read(path)


def test_read_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.trace"
    path.write_bytes(WAKEUP_LINE.encode() + b"\n\xff\xfe caf\xe9\n")
    with pytest.raises(TraceFormatError, match="not a text trace \\(invalid UTF-8 on line 2"):
        read(path)


def test_read_endless_line(tmp_path):
    path = tmp_path / "oneline.trace"
    path.write_bytes(b"x" * 200_000)
    with pytest.raises(TraceFormatError, match="not a text trace \\(line 1 is longer"):
        read(path)


def test_read_empty_file(tmp_path):
    path = tmp_path / "empty.trace"
    path.write_text("")
    with pytest.raises(TraceFormatError, match=f"^no kvm_vcpu_wakeup events in {path}$"):
        read(path)


def test_read_text_without_wakeups(tmp_path):
    path = tmp_path / "other.trace"
    path.write_text("# tracer: nop\n a-1 [000] ..... 1.000000: kvm_exit: reason HLT\n")
    with pytest.raises(TraceFormatError, match="no kvm_vcpu_wakeup events"):
        read(path)


def test_trace_format_error_is_value_error():
    assert issubclass(TraceFormatError, ValueError)


def test_event_validation():
    with pytest.raises(ValueError, match="missing fields"):
        TraceEvent("a", 1, 0, 0, WAKEUP, ns=5)
    with pytest.raises(ValueError, match="foreign fields"):
        TraceEvent("a", 1, 0, 0, WAKEUP, ns=5, waited=True, valid=True, new=3)
    with pytest.raises(ValueError, match="kvm_exit"):
        TraceEvent("a", 1, 0, 0, "kvm_exit")
    with pytest.raises(ValueError, match="old = -1"):
        TraceEvent.halt_poll("a", 1, 0, 0, vcpu_id=0, new=0, grow=False, old=-1)


def test_format_layout():
    ev = TraceEvent.halt_poll("CPU 12/KVM", 123, 7, 5_000_999, vcpu_id=12, new=0,
                              grow=False, old=15000)
    assert format_event(ev) == ("      CPU 12/KVM-123     [007] .....     0.005000: "
                                "kvm_halt_poll_ns: vcpu 12: halt_poll_ns 0 (shrink 15000)")


def test_wait_time_is_printed_as_lld():
    # The field is u64 but printed with %lld, so huge values come out negative.
    ev = TraceEvent.wakeup("a", 1, 0, 0, ns=2**64 - 5, waited=True)
    line = format_event(ev)
    assert "wait time -5 ns" in line
    assert parse(line)[0] == ev


def test_write_header():
    events = [TraceEvent.wakeup("a", 1, 3, 1_000, ns=5, waited=True)]
    buf = io.StringIO()
    write(events, buf)
    text = buf.getvalue()
    assert text.startswith("# tracer: nop\n#\n# entries-in-buffer/entries-written: 1/1   #P:4\n")
    assert text == events_to_text(events)
    assert events_to_text(events, header=False) == format_event(events[0]) + "\n"
    assert parse(text) == events


def _records(rows):
    return np.array(rows, dtype=TRACE_RECORD_DTYPE)


def test_records_to_events():
    assert TRACE_RECORD_DTYPE.names == ("ts", "pid", "cpu", "kind", "flag", "valid",
                                        "vcpu_id", "a", "b")
    records = _records([
        (1_083_824_979_123, 7628, 1, 0, 1, 1, 0, 50661630, 0),
        (1_083_826_209_000, 7628, 0, 1, 1, 0, 1, 10000, 0),
        (1_083_826_209_500, 7628, 0, 0, 0, 1, 0, 197723, 0),
        (1_083_828_369_000, 99, 0, 1, 0, 0, 1, 0, 10000),
    ])
    events = records_to_events(records, {7628: "python3"})
    assert events == [
        TraceEvent.wakeup("python3", 7628, 1, 1_083_824_979_123, ns=50661630, waited=True),
        TraceEvent.halt_poll("python3", 7628, 0, 1_083_826_209_000, vcpu_id=1, new=10000,
                             grow=True, old=0),
        TraceEvent.wakeup("python3", 7628, 0, 1_083_826_209_500, ns=197723, waited=False),
        TraceEvent.halt_poll("<...>", 99, 0, 1_083_828_369_000, vcpu_id=1, new=0,
                             grow=False, old=10000),
    ]
    assert all(type(v) is int for ev in events for v in (ev.pid, ev.cpu, ev.ts_ns))
    text = events_to_text(events, header=False)
    assert text.splitlines()[0] == WAKEUP_LINE          # 979123 ns -> 979 us, truncated
    # Re-parsed, timestamps are truncated to microseconds; nothing else changes.
    reparsed = parse(text)
    assert [ev.ts_ns for ev in reparsed] == [ev.ts_ns // 1000 * 1000 for ev in events]


def test_records_to_events_rejects_bad_input():
    with pytest.raises(ValueError, match="kind 7"):
        records_to_events(_records([(0, 1, 0, 7, 0, 0, 0, 0, 0)]), {})
    with pytest.raises(ValueError, match="TRACE_RECORD_DTYPE"):
        records_to_events(np.zeros(3, dtype="u8"), {})
    assert records_to_events(_records([]), {}) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1),
                          st.integers(0, 9999), st.sampled_from([0, 1]), st.booleans(),
                          st.booleans(), st.integers(0, (1 << 32) - 1),
                          st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1)),
                max_size=30),
       st.booleans())
def test_records_to_text_is_events_to_text(rows, header):
    """The direct formatter writes the same text as the event objects do (every
    field's extremes: a u64 ns printed as %lld, unknown comms, both kinds)."""
    # (kvm_halt_poll_ns carries unsigned ints: the engine's values fit 32 bits.)
    rows = [r[:7] + ((r[7] if r[3] == 0 else r[7] & 0xFFFF_FFFF),) + r[8:] for r in rows]
    recs = np.array(rows, dtype=tracefmt.TRACE_RECORD_DTYPE)
    comms = {r[1]: f"CPU {i}/KVM" for i, r in enumerate(rows[::2])}
    assert tracefmt.records_to_text(recs, comms, header=header) == \
        tracefmt.events_to_text(tracefmt.records_to_events(recs, comms), header=header)


def test_records_to_text_refuses_an_unknown_kind():
    recs = np.zeros(2, dtype=tracefmt.TRACE_RECORD_DTYPE)
    recs["kind"][1] = 7
    with pytest.raises(ValueError, match="record 1: kind 7"):
        tracefmt.records_to_text(recs, {})
