"""Replay a real kernel trace through the halt-poll rule and check every line.

A recorded trace gives, per vCPU thread (PID), one ``kvm_vcpu_wakeup`` line
per ``kvm_vcpu_halt`` call with the halt's total length, and a
``kvm_halt_poll_ns`` line just before it whenever that halt ended in
``grow_halt_poll_ns`` or ``shrink_halt_poll_ns`` (``virt/kvm/kvm_main.c``).
Starting each thread at ``vcpu->halt_poll_ns = 0``, this module runs the end
of ``kvm_vcpu_halt`` for every halt (clamp on entry to the ceiling, then
``kvmwake.haltpoll.adapt``, or a shrink for an invalid wakeup) and compares
the ``kvm_halt_poll_ns`` line the kernel must have printed with the one it did.

The ceiling is ``kvm_vcpu_max_halt_poll_ns()``: the VM's
``KVM_CAP_HALT_POLL`` value if it set one, else the ``halt_poll_ns`` module
parameter.  ``kvm_arch_no_poll()`` (guest PV haltpoll on x86) is assumed off:
with it on the kernel adapts nothing and every predicted line shows up as a
mismatch.  A trace with lost events (``[LOST N EVENTS]``) cannot be replayed
exactly either.

Command line: ``kvmwake kernel replay TRACE --halt-poll-ns N ...`` (``main``);
``kvmwake kernel replay DIR`` on a recording folder takes the module
parameters and the cap from its ``metadata.json`` (options still override).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmwake.haltpoll import (GROW, HALT_POLL_NS_GROW_DEFAULT, HALT_POLL_NS_GROW_START_DEFAULT,
                             HALT_POLL_NS_SHRINK_DEFAULT, SHRINK, HaltPollParams,
                             adapt, check_u32, clamp_on_entry, shrink)
from kvmwake.outputs.tracefmt import HALT_POLL_NS, TraceEvent, TraceFormatError, read

from ..cli.argtypes import u32 as _u32

#: How many mismatches a ``ReplayResult`` keeps in detail.
MAX_MISMATCHES = 20
#: File names looked for in a recording directory, in order.
TRACE_FILE_NAMES = ("trace", "trace.txt")


@dataclass
class ReplayResult:
    """What a replay found.

    ``matched`` counts halts whose predicted ``kvm_halt_poll_ns`` line equals
    the recorded one; ``mismatched`` counts halts (and stray recorded lines)
    where a line was predicted but not recorded, recorded but not predicted,
    or differs.  Halts with no line on either side count in neither.
    """

    params: HaltPollParams
    max_halt_poll_ns: int               # the ceiling used
    halts: int = 0
    poll: int = 0                       # halts whose wakeup line says "poll"
    wait: int = 0                       # halts whose wakeup line says "wait"
    recorded_lines: int = 0             # kvm_halt_poll_ns lines in the trace
    matched: int = 0
    mismatched: int = 0
    per_pid: dict[int, dict] = field(default_factory=dict)
    mismatches: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict (``per_pid`` keys become strings in JSON)."""
        return asdict(self)


@dataclass
class _Thread:
    """Replay state of one vCPU thread."""

    stats: dict
    halt_poll_ns: int = 0               # vcpu->halt_poll_ns
    pending: TraceEvent | None = None   # recorded kvm_halt_poll_ns awaiting its wakeup


def _line_text(vcpu_id: int | None, new: int, grow: bool, old: int) -> str:
    vcpu = "?" if vcpu_id is None else vcpu_id
    return f"vcpu {vcpu}: halt_poll_ns {new} ({'grow' if grow else 'shrink'} {old})"


def _record(result: ReplayResult, thread: _Thread, pid: int, ok: bool, **detail) -> None:
    if ok:
        result.matched += 1
        thread.stats["matched"] += 1
        return
    result.mismatched += 1
    thread.stats["mismatched"] += 1
    if len(result.mismatches) < MAX_MISMATCHES:
        result.mismatches.append({"pid": pid, **detail})


def _stray(result: ReplayResult, thread: _Thread, pid: int) -> None:
    """A recorded kvm_halt_poll_ns line that no kvm_vcpu_wakeup of its PID follows."""
    ev = thread.pending
    thread.pending = None
    _record(result, thread, pid, False, line=None, halt_ns=None, halt_poll_ns=None,
            expected=None, actual=ev.body(), actual_line=ev.line_no,
            what="kvm_halt_poll_ns line not followed by a kvm_vcpu_wakeup of its PID")


def replay(events: Iterable[TraceEvent], params: HaltPollParams,
           max_halt_poll_ns: int | None = None) -> ReplayResult:
    """Replay ``events`` through the kernel rule and compare every ``kvm_halt_poll_ns`` line.

    ``max_halt_poll_ns`` is the VM's ``KVM_CAP_HALT_POLL`` ceiling if it set
    one; otherwise the ceiling is ``params.halt_poll_ns``.
    """
    ceiling = (params.halt_poll_ns if max_halt_poll_ns is None
               else check_u32("max_halt_poll_ns", max_halt_poll_ns))
    result = ReplayResult(params=params, max_halt_poll_ns=ceiling)
    threads: dict[int, _Thread] = {}
    for ev in events:
        thread = threads.get(ev.pid)
        if thread is None:
            stats = {"halts": 0, "matched": 0, "mismatched": 0, "vcpu_id": None}
            thread = threads[ev.pid] = _Thread(stats)
            result.per_pid[ev.pid] = stats

        if ev.event == HALT_POLL_NS:
            result.recorded_lines += 1
            if thread.stats["vcpu_id"] is None:
                thread.stats["vcpu_id"] = ev.vcpu_id
            if thread.pending is not None:
                _stray(result, thread, ev.pid)
            thread.pending = ev
            continue

        result.halts += 1
        thread.stats["halts"] += 1
        if ev.waited:
            result.wait += 1
        else:
            result.poll += 1
        old = thread.halt_poll_ns = clamp_on_entry(thread.halt_poll_ns, ceiling)
        if ev.valid:
            thread.halt_poll_ns, kind = adapt(old, ev.ns, ceiling, params)
        else:
            thread.halt_poll_ns = shrink(old, params.halt_poll_ns_shrink,
                                         params.halt_poll_ns_grow_start)
            kind = SHRINK
        recorded, thread.pending = thread.pending, None
        if kind not in (GROW, SHRINK) and recorded is None:
            continue
        vcpu_id = thread.stats["vcpu_id"]
        expected = (_line_text(vcpu_id, thread.halt_poll_ns, kind == GROW, old)
                    if kind in (GROW, SHRINK) else None)
        actual = recorded.body() if recorded is not None else None
        if expected == actual:
            _record(result, thread, ev.pid, True)
        else:
            what = ("kernel printed no kvm_halt_poll_ns line" if actual is None
                    else "kvm_halt_poll_ns line not predicted" if expected is None
                    else "kvm_halt_poll_ns line differs")
            _record(result, thread, ev.pid, False, line=ev.line_no, halt_ns=ev.ns,
                    halt_poll_ns=old, expected=expected, actual=actual,
                    actual_line=recorded.line_no if recorded is not None else None,
                    what=what)
    for pid, thread in threads.items():
        if thread.pending is not None:
            _stray(result, thread, pid)
    return result


def find_trace(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or the ``trace`` / ``trace.txt`` file of a recording directory."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in TRACE_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    raise TraceFormatError(
        f"{path} is a directory with no file named {' or '.join(TRACE_FILE_NAMES)}")


def replay_file(path: str | os.PathLike[str], params: HaltPollParams,
                max_halt_poll_ns: int | None = None) -> ReplayResult:
    """``replay`` the trace in ``path`` (a file, or a recording directory)."""
    return replay(read(find_trace(path)), params, max_halt_poll_ns)


# ---------------------------------------------------------------- command line


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``kvmwake kernel replay`` arguments to ``parser``."""
    parser.description = ("Replay the halts of a kernel trace through the halt-poll rule "
                          "and check every kvm_halt_poll_ns line.")
    parser.add_argument("trace", metavar="TRACE",
                        help="trace file, or a recording directory holding 'trace' or 'trace.txt'")
    parser.add_argument("--halt-poll-ns", type=_u32, metavar="N",
                        help="kvm.halt_poll_ns module parameter when the trace was taken "
                             "(required for a trace file; a recording folder's metadata.json "
                             "supplies it and the other parameters)")
    parser.add_argument("--grow", type=_u32, default=None,
                        metavar="G", help=f"kvm.halt_poll_ns_grow (default "
                                          f"{HALT_POLL_NS_GROW_DEFAULT})")
    parser.add_argument("--grow-start", type=_u32, default=None,
                        metavar="S", help=f"kvm.halt_poll_ns_grow_start (default "
                                          f"{HALT_POLL_NS_GROW_START_DEFAULT})")
    parser.add_argument("--shrink", type=_u32, default=None,
                        metavar="K", help=f"kvm.halt_poll_ns_shrink (default "
                                          f"{HALT_POLL_NS_SHRINK_DEFAULT})")
    parser.add_argument("--max-halt-poll-ns", type=_u32, metavar="M",
                        help="the VM's KVM_CAP_HALT_POLL ceiling, if it set one "
                             "(overrides --halt-poll-ns as the ceiling)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _print_table(trace: str, r: ReplayResult) -> None:
    p = r.params
    rows = [
        ("ceiling", f"{r.max_halt_poll_ns} ns (grow {p.halt_poll_ns_grow}, grow start "
                    f"{p.halt_poll_ns_grow_start}, shrink {p.halt_poll_ns_shrink})"),
        ("halts", f"{r.halts} (poll {r.poll}, wait {r.wait})"),
        ("kvm_halt_poll_ns lines", str(r.recorded_lines)),
        ("matched", str(r.matched)),
        ("mismatched", str(r.mismatched)),
    ]
    print(f"replay of {trace}")
    for label, value in rows:
        print(f"  {label:<24}{value}")
    for pid, s in r.per_pid.items():
        vcpu = "?" if s["vcpu_id"] is None else s["vcpu_id"]
        print(f"  pid {pid} (vcpu {vcpu}): {s['halts']} halts, "
              f"{s['matched']} matched, {s['mismatched']} mismatched")
    if r.mismatches:
        print(f"first {len(r.mismatches)} mismatches:")
        for m in r.mismatches:
            where = f"line {m['line']}" if m["line"] is not None else f"line {m['actual_line']}"
            print(f"  {where} pid {m['pid']}: {m['what']}: "
                  f"expected {m['expected'] or 'none'}, recorded {m['actual'] or 'none'}")


def recording_params(path: str | os.PathLike[str]) -> tuple[dict, int | None] | None:
    """The module parameters and the VM's cap of a recording folder (``metadata.json``
    written by ``kvmwake kernel record``), or None if ``path`` is not one."""
    meta_path = Path(path) / "metadata.json"
    if not Path(path).is_dir() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        mp = meta["module_params"]
        params = {k: int(mp[k]) for k in ("halt_poll_ns", "halt_poll_ns_grow",
                                          "halt_poll_ns_grow_start", "halt_poll_ns_shrink")
                  if k in mp}
        cap = meta.get("halt_poll_cap")
        if "halt_poll_ns" not in params or not (cap is None or isinstance(cap, int)):
            raise ValueError("module_params.halt_poll_ns or halt_poll_cap")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TraceFormatError(f"{meta_path}: unreadable or incomplete ({exc})") from None
    return params, cap


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``kvmwake kernel replay`` command; 0 all matched, 1 mismatches, 2 bad input."""
    try:
        rec = recording_params(args.trace)
        given = {"halt_poll_ns": args.halt_poll_ns, "halt_poll_ns_grow": args.grow,
                 "halt_poll_ns_grow_start": args.grow_start, "halt_poll_ns_shrink": args.shrink}
        base = {"halt_poll_ns_grow": HALT_POLL_NS_GROW_DEFAULT,
                "halt_poll_ns_grow_start": HALT_POLL_NS_GROW_START_DEFAULT,
                "halt_poll_ns_shrink": HALT_POLL_NS_SHRINK_DEFAULT}
        ceiling = args.max_halt_poll_ns
        if rec is not None:
            base.update(rec[0])
            if ceiling is None:
                ceiling = rec[1]
        elif args.halt_poll_ns is None:
            print("kvmwake: error: --halt-poll-ns is required unless TRACE is a recording "
                  "folder with metadata.json", file=sys.stderr)
            return 2
        base.update({k: v for k, v in given.items() if v is not None})
        params = HaltPollParams(**base)
        result = replay_file(args.trace, params, ceiling)
    except TraceFormatError as exc:
        print(f"kvmwake: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table(args.trace, result)
    return 1 if result.mismatched else 0


def main(argv: list[str] | None = None) -> int:
    """``kvmwake kernel replay`` as a standalone command."""
    parser = build_parser(argparse.ArgumentParser(prog="kvmwake kernel replay"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:           # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
