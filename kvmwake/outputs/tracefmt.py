"""The kernel's tracepoint text for halt polling, in and out.

Two events matter, both from ``include/trace/events/kvm.h``:

* ``kvm_vcpu_wakeup`` (fired at the end of ``kvm_vcpu_halt`` in
  ``virt/kvm/kvm_main.c``)::

      TP_printk("%s time %lld ns, polling %s",
                waited ? "wait" : "poll", ns, valid ? "valid" : "invalid")

* ``kvm_halt_poll_ns`` (fired by ``grow_halt_poll_ns`` /
  ``shrink_halt_poll_ns``)::

      TP_printk("vcpu %u: halt_poll_ns %u (%s %u)",
                vcpu_id, new, grow ? "grow" : "shrink", old)

Each line carries the ftrace prefix printed by ``print_trace_fmt`` /
``trace_print_context`` in ``kernel/trace/trace_output.c``: ``%16s-%-7d`` for
comm and pid, ``[%03d]`` for the CPU, the latency flags (``.....`` on a
current kernel), and the ``%5lu.%06lu`` timestamp.  The reader also accepts
what ``trace-cmd report`` prints (no flags column, padded event bodies, a
``cpus=N`` first line) and the ``(tgid)`` column of ``options/record-tgid``.

The simulation engine hands over its trace as a numpy structured array of
``TRACE_RECORD_DTYPE``; ``records_to_events`` and ``events_to_text`` turn it
into the same text, so one parser reads a simulated run and a real one.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, TextIO

import numpy as np

WAKEUP = "kvm_vcpu_wakeup"
HALT_POLL_NS = "kvm_halt_poll_ns"
EVENTS = (WAKEUP, HALT_POLL_NS)

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

#: Longest line accepted by ``read``.  The kernel formats a line into one
#: ``trace_seq`` page (4 KiB); anything far longer is not a trace.
MAX_LINE_BYTES = 64 * 1024

#: The latency-flags column as the kernel prints it for these tracepoints:
#: irqs on, no resched, no hard/soft irq, preempt depth 0, migrate-disable 0.
DEFAULT_FLAGS = "....."

#: What the engine produces: one record per tracepoint hit.
#: ``kind`` 0 is ``kvm_vcpu_wakeup`` (``flag`` = waited, ``a`` = ns) and
#: 1 is ``kvm_halt_poll_ns`` (``flag`` = grow, ``a`` = new, ``b`` = old).
TRACE_RECORD_DTYPE = np.dtype([
    ("ts", "u8"), ("pid", "u4"), ("cpu", "u4"), ("kind", "u1"), ("flag", "u1"),
    ("valid", "u1"), ("vcpu_id", "u4"), ("a", "u8"), ("b", "u4"),
])
KIND_WAKEUP, KIND_HALT_POLL_NS = 0, 1

_HEADER = """\
# tracer: nop
#
# entries-in-buffer/entries-written: {n}/{n}   #P:{ncpus}
#
#                                _-----=> irqs-off/BH-disabled
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
"""

# comm is greedy, so the pid is split off at the last dash before the
# "[cpu]" column: comm may hold spaces, slashes and dashes ("CPU 0/KVM").
_PREFIX_RE = re.compile(
    r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+"
    r"(?:\(\s*(?:\d+|-+)\)\s+)?"               # (tgid), options/record-tgid
    r"\[(?P<cpu>\d+)\]\s+"
    r"(?:[^\s:]{4,5}\s+)?"                     # latency flags, e.g. "....." or "d..1"
    r"(?P<secs>\d+)\.(?P<frac>\d{1,9}):\s+"
    r"(?P<event>\w+):\s*(?P<body>.*?)\s*$"
)
_WAKEUP_RE = re.compile(r"(wait|poll) time (-?\d+) ns, polling (valid|invalid)")
_HALT_POLL_RE = re.compile(r"vcpu (\d+): halt_poll_ns (\d+) \((grow|shrink) (\d+)\)")
_NAMES_EVENT_RE = re.compile(r"\b(?:kvm_vcpu_wakeup|kvm_halt_poll_ns):")

_WAKEUP_FIELDS = ("ns", "waited", "valid")
_HALT_POLL_FIELDS = ("vcpu_id", "new", "grow", "old")
#: event -> (its own fields, the other event's fields)
_EVENT_FIELDS = {WAKEUP: (_WAKEUP_FIELDS, _HALT_POLL_FIELDS),
                 HALT_POLL_NS: (_HALT_POLL_FIELDS, _WAKEUP_FIELDS)}
#: Integer fields and the largest value of their kernel type.
_LIMITS = (("pid", U32_MAX), ("cpu", U32_MAX), ("ts_ns", U64_MAX), ("ns", U64_MAX),
           ("vcpu_id", U32_MAX), ("new", U32_MAX), ("old", U32_MAX))


class TraceFormatError(ValueError):
    """A trace that cannot be read; the message names the source and what is wrong."""


@dataclass(frozen=True)
class TraceEvent:
    """One ``kvm_vcpu_wakeup`` or ``kvm_halt_poll_ns`` line.

    The fields of the other event are ``None``; build events with
    ``TraceEvent.wakeup`` / ``TraceEvent.halt_poll`` to get that right.
    ``line_no`` (1-based, in the source that was parsed) is not compared.
    """

    comm: str
    pid: int
    cpu: int
    ts_ns: int
    event: str
    # kvm_vcpu_wakeup
    ns: int | None = None
    waited: bool | None = None
    valid: bool | None = None
    # kvm_halt_poll_ns
    vcpu_id: int | None = None
    new: int | None = None
    grow: bool | None = None
    old: int | None = None
    line_no: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.event not in _EVENT_FIELDS:
            raise ValueError(f"event must be {WAKEUP!r} or {HALT_POLL_NS!r}, not {self.event!r}")
        mine, others = _EVENT_FIELDS[self.event]
        missing = [name for name in mine if getattr(self, name) is None]
        extra = [name for name in others if getattr(self, name) is not None]
        if missing or extra:
            raise ValueError(
                f"{self.event} event: missing fields {missing}, foreign fields {extra}")
        for name, limit in _LIMITS:
            value = getattr(self, name)
            if value is not None and not 0 <= value <= limit:
                raise ValueError(f"{self.event} event: {name} = {value} is outside 0..{limit}")

    @classmethod
    def wakeup(cls, comm: str, pid: int, cpu: int, ts_ns: int, *, ns: int,
               waited: bool, valid: bool = True, line_no: int | None = None) -> TraceEvent:
        """A ``kvm_vcpu_wakeup`` event (one halt lasting ``ns``)."""
        return cls(comm, pid, cpu, ts_ns, WAKEUP, ns=ns, waited=waited, valid=valid,
                   line_no=line_no)

    @classmethod
    def halt_poll(cls, comm: str, pid: int, cpu: int, ts_ns: int, *, vcpu_id: int,
                  new: int, grow: bool, old: int, line_no: int | None = None) -> TraceEvent:
        """A ``kvm_halt_poll_ns`` event (one call of grow/shrink_halt_poll_ns)."""
        return cls(comm, pid, cpu, ts_ns, HALT_POLL_NS, vcpu_id=vcpu_id, new=new,
                   grow=grow, old=old, line_no=line_no)

    def body(self) -> str:
        """The ``TP_printk`` text of this event."""
        if self.event == WAKEUP:
            # %lld of a u64: the kernel prints values >= 2**63 as negative.
            ns = self.ns - (1 << 64) if self.ns >= 1 << 63 else self.ns
            return (f"{'wait' if self.waited else 'poll'} time {ns} ns, "
                    f"polling {'valid' if self.valid else 'invalid'}")
        return (f"vcpu {self.vcpu_id}: halt_poll_ns {self.new} "
                f"({'grow' if self.grow else 'shrink'} {self.old})")


# ---------------------------------------------------------------- reading

def _parse_line(line: str, line_no: int, source: str) -> TraceEvent | None:
    """Parse one line; ``None`` for anything that is not one of our two events."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    m = _PREFIX_RE.match(line)
    if m is None:
        if _NAMES_EVENT_RE.search(line):
            raise TraceFormatError(
                f"{source}:{line_no}: cannot read the 'TASK-PID [CPU] TIMESTAMP:' prefix "
                f"of a kvm event line: {line.strip()!r}")
        return None
    event = m["event"]
    if event not in EVENTS:
        return None
    body = m["body"]
    ts_ns = int(m["secs"]) * 1_000_000_000 + int(m["frac"].ljust(9, "0"))
    if event == WAKEUP:
        b = _WAKEUP_RE.fullmatch(body)
        if b is None:
            raise TraceFormatError(
                f"{source}:{line_no}: kvm_vcpu_wakeup body {body!r} does not match "
                f"'wait|poll time N ns, polling valid|invalid'")
        # %lld of a u64: a negative number is a value >= 2**63.
        fields = {"ns": int(b[2]) & U64_MAX, "waited": b[1] == "wait", "valid": b[3] == "valid"}
    else:
        b = _HALT_POLL_RE.fullmatch(body)
        if b is None:
            raise TraceFormatError(
                f"{source}:{line_no}: kvm_halt_poll_ns body {body!r} does not match "
                f"'vcpu N: halt_poll_ns NEW (grow|shrink OLD)'")
        fields = {"vcpu_id": int(b[1]), "new": int(b[2]), "grow": b[3] == "grow",
                  "old": int(b[4])}
    try:
        return TraceEvent(m["comm"], int(m["pid"]), int(m["cpu"]), ts_ns, event, **fields,
                          line_no=line_no)
    except ValueError as exc:       # a number out of its kernel type's range
        raise TraceFormatError(f"{source}:{line_no}: {exc}") from None


def _iter_parse(lines: Iterable[str], source: str) -> Iterator[TraceEvent]:
    for line_no, line in enumerate(lines, 1):
        ev = _parse_line(line, line_no, source)
        if ev is not None:
            yield ev


def parse(lines: Iterable[str] | str, source: str = "<string>") -> list[TraceEvent]:
    """Parse trace text (an iterable of lines, or one string) into events.

    Lines of other events, blank lines, ``#`` comments, ``cpus=N`` and
    ``CPU:N [LOST M EVENTS]`` markers are skipped.  A line that names
    ``kvm_vcpu_wakeup`` or ``kvm_halt_poll_ns`` but does not follow the
    kernel's format raises ``TraceFormatError`` naming ``source`` and the line.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    return list(_iter_parse(lines, source))


def _text_lines(fh: IO[bytes], path: str) -> Iterator[str]:
    """Decode a binary stream line by line, refusing what is not text."""
    line_no = 0
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        line_no += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise TraceFormatError(
                f"{path}: not a text trace (line {line_no} is longer than {MAX_LINE_BYTES} bytes)")
        if b"\0" in raw:
            raise TraceFormatError(f"{path}: not a text trace (NUL byte on line {line_no})")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceFormatError(
                f"{path}: not a text trace (invalid UTF-8 on line {line_no}: {exc.reason})"
            ) from None


def read(path: str | os.PathLike[str]) -> list[TraceEvent]:
    """Read a trace file (the tracefs ``trace`` file, or ``trace-cmd report`` output).

    The file is streamed line by line.  Raises ``TraceFormatError`` when the
    file cannot be opened, is not text, or holds no ``kvm_vcpu_wakeup`` event.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            events = list(_iter_parse(_text_lines(fh, name), name))
    except OSError as exc:
        raise TraceFormatError(f"cannot read trace {name}: {exc.strerror or exc}") from None
    if not any(ev.event == WAKEUP for ev in events):
        raise TraceFormatError(f"no kvm_vcpu_wakeup events in {name}")
    return events


# ---------------------------------------------------------------- writing

def format_event(ev: TraceEvent) -> str:
    """The line the kernel prints in the tracefs ``trace`` file for ``ev`` (no newline)."""
    usecs = ev.ts_ns // 1000            # ns2usecs(): truncated
    secs, usecs = divmod(usecs, 1_000_000)
    return (f"{ev.comm:>16}-{ev.pid:<7} [{ev.cpu:03d}] {DEFAULT_FLAGS} "
            f"{secs:5d}.{usecs:06d}: {ev.event}: {ev.body()}")


def write(events: Iterable[TraceEvent], fh: TextIO, header: bool = True) -> None:
    """Write ``events`` as the tracefs ``trace`` file does, with its header if asked.

    The header's ``#P:`` (CPUs in the buffer) is taken as the highest CPU
    number seen plus one.
    """
    events = list(events)
    if header:
        ncpus = max((ev.cpu for ev in events), default=0) + 1
        fh.write(_HEADER.format(n=len(events), ncpus=ncpus))
    for ev in events:
        fh.write(format_event(ev))
        fh.write("\n")


def events_to_text(events: Iterable[TraceEvent], header: bool = True) -> str:
    """``write`` into a string."""
    buf = io.StringIO()
    write(events, buf, header=header)
    return buf.getvalue()


def records_to_text(records: np.ndarray, comms: Mapping[int, str], header: bool = True) -> str:
    """``events_to_text(records_to_events(records, comms))`` without an event object
    per record (the same text; a VM's whole trace ring can be a million records)."""
    if records.dtype != TRACE_RECORD_DTYPE:
        raise ValueError(f"records must have dtype TRACE_RECORD_DTYPE, not {records.dtype}")
    bad = ~np.isin(records["kind"], (KIND_WAKEUP, KIND_HALT_POLL_NS))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"record {i}: kind {records['kind'][i]} is neither {KIND_WAKEUP} "
                         f"({WAKEUP}) nor {KIND_HALT_POLL_NS} ({HALT_POLL_NS})")
    out = []
    if header:
        ncpus = int(records["cpu"].max()) + 1 if len(records) else 1
        out.append(_HEADER.format(n=len(records), ncpus=ncpus))
    usecs = records["ts"] // 1000                         # ns2usecs(): truncated
    columns = [records[name].tolist() for name in ("pid", "cpu", "kind", "flag", "valid",
                                                    "vcpu_id", "a", "b")]
    secs_l, usecs_l = (usecs // 1_000_000).tolist(), (usecs % 1_000_000).tolist()
    tasks = {pid: f"{comms.get(pid, '<...>'):>16}-{pid:<7}" for pid in set(columns[0])}
    wake = f"{WAKEUP}: "
    poll = f"{HALT_POLL_NS}: "
    for pid, cpu, kind, flag, valid, vcpu_id, a, b, secs, us in zip(*columns, secs_l, usecs_l):
        head = f"{tasks[pid]} [{cpu:03d}] {DEFAULT_FLAGS} {secs:5d}.{us:06d}: "
        if kind == KIND_WAKEUP:
            ns = a - (1 << 64) if a >= 1 << 63 else a      # %lld of a u64
            out.append(f"{head}{wake}{'wait' if flag else 'poll'} time {ns} ns, "
                       f"polling {'valid' if valid else 'invalid'}\n")
        else:
            out.append(f"{head}{poll}vcpu {vcpu_id}: halt_poll_ns {a} "
                       f"({'grow' if flag else 'shrink'} {b})\n")
    return "".join(out)


def records_to_events(records: np.ndarray, comms: Mapping[int, str]) -> list[TraceEvent]:
    """Turn the engine's ``TRACE_RECORD_DTYPE`` array into events.

    ``comms`` maps pid to task name; a pid missing from it is shown as
    ``<...>``, as the kernel does when the comm was not saved.
    """
    if records.dtype != TRACE_RECORD_DTYPE:
        raise ValueError(f"records must have dtype TRACE_RECORD_DTYPE, not {records.dtype}")
    events = []
    columns = (records[name].tolist() for name in TRACE_RECORD_DTYPE.names)
    for i, (ts, pid, cpu, kind, flag, valid, vcpu_id, a, b) in enumerate(zip(*columns)):
        common = (comms.get(pid, "<...>"), pid, cpu, ts)
        if kind == KIND_WAKEUP:
            events.append(TraceEvent.wakeup(*common, ns=a, waited=bool(flag), valid=bool(valid)))
        elif kind == KIND_HALT_POLL_NS:
            events.append(TraceEvent.halt_poll(*common, vcpu_id=vcpu_id, new=a,
                                               grow=bool(flag), old=b))
        else:
            raise ValueError(f"record {i}: kind {kind} is neither {KIND_WAKEUP} "
                             f"({WAKEUP}) nor {KIND_HALT_POLL_NS} ({HALT_POLL_NS})")
    return events
