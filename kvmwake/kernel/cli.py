"""``kvmwake kernel record | calibrate | compare | suite``: the command line of the kernel comparison.

``build_parser(subparsers)`` adds the four commands to the ``kernel``
sub-command's subparsers; ``run(args)`` carries out a parsed one.  Exit
codes: 0 done, 1 ``compare --check`` found a missed acceptance figure,
2 bad input or an environment that cannot do it (no ``/dev/kvm``, no
permission, too many vCPUs, a broken recording folder, an unwritable ``-o``,
another recording running), 130 interrupted (Ctrl-C), 143 SIGTERM, 129 SIGHUP
(after the same cleanup).

``python -m kvmwake.kernel.cli`` runs them (and ``replay``) on its own.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..outputs.tracefmt import TraceFormatError
from . import replay as _replay
from .workload import IPI_DEFAULT_COMPUTE, IPI_TARGETS, NAMED, SpecError
from ..cli.argtypes import nonempty_path as _path
from ..cli.argtypes import nonneg_int as _nonneg
from ..cli.argtypes import positive_int as _pos_int
from ..cli.argtypes import u32 as _u32

from ..model import SCHEDULERS
from .simulate import HOST_RULES, HOST_RULES_HELP

COMMANDS = ("record", "calibrate", "compare", "suite", "sched-replay")


def build_parser(subparsers) -> None:
    """Add ``record``, ``calibrate``, ``compare``, ``suite`` and ``sched-replay`` to the
    ``kernel`` subparsers."""
    r = subparsers.add_parser(
        "record", help="record the real kernel (/dev/kvm micro-VM, tracefs, binary stats)",
        description="Run a micro-VM whose vCPUs halt in a loop, wake them with MSIs at the "
                    "workload's times (--workload msi) or let them wake each other with IPIs "
                    "(--workload ipi: a chain started by one MSI; each woken vCPU computes, "
                    "writes the x2APIC ICR to wake the next one of a seeded plan, and halts, "
                    "as the ipi-storm scenario), and record the kernel's tracepoints, each "
                    "vCPU's binary stats and the host-observed wake latencies into DIR.")
    r.add_argument("--vcpus", type=_pos_int, required=True, metavar="N", help="vCPUs")
    r.add_argument("--wakes", type=_pos_int, required=True, metavar="M",
                   help="wakes in all: MSIs spread round-robin over the vCPUs (msi), or the "
                        "chain's start MSI and M-1 IPIs (ipi)")
    r.add_argument("--workload", choices=("msi", "ipi"), default="msi",
                   help="msi: the injector thread wakes the vCPUs with MSIs (default); ipi: "
                        "vCPUs wake each other with IPIs (needs at least 2 vCPUs)")
    r.add_argument("--idle", metavar="SPEC",
                   help="msi (required there): time between two MSIs to one vCPU: " +
                        ", ".join(NAMED) + ", or fixed:DUR, exp:DUR, uniform:LO-HI, "
                        "mix:W*DIST,... (see kvmwake.kernel.workload)")
    r.add_argument("--compute", metavar="SPEC", default=IPI_DEFAULT_COMPUTE,
                   help=f"ipi: a woken vCPU's compute before it sends its IPI, same grammar "
                        f"as --idle (default {IPI_DEFAULT_COMPUTE}, as ipi-storm)")
    r.add_argument("--targets", choices=IPI_TARGETS, default="random-other",
                   help="ipi: whom each vCPU wakes (default random-other, as ipi-storm)")
    r.add_argument("--halt-poll-ns", type=_u32, metavar="X",
                   help="set the VM's KVM_CAP_HALT_POLL to X (default: not set, the module's "
                        "halt_poll_ns applies)")
    r.add_argument("-o", "--out", required=True, metavar="DIR", type=_path,
                   help="recording folder (created if missing; checked writable before "
                        "recording)")
    r.add_argument("--seed", type=_nonneg, default=0, help="workload seed (default 0)")
    r.add_argument("--injector", choices=("sleep", "spin", "hybrid"), default="sleep",
                   help="how the injector waits for a target time (default: sleep, "
                        "clock_nanosleep)")
    r.add_argument("--trace", choices=("auto", "require", "off"), default="auto",
                   help="tracefs: use it if it can be mounted (auto), fail without it "
                        "(require), or record stats only (off)")
    r.add_argument("--sched-trace", choices=("auto", "require", "off"), default="auto",
                   help="the scheduler's tracepoints (sched_switch, sched_wakeup, "
                        "sched_wakeup_new, sched_migrate_task) of the recording's threads into "
                        "DIR/sched.trace, with their roles and pinning in the metadata: when "
                        "tracefs is used and has them (auto), fail without them (require), or "
                        "not (off)")
    r.add_argument("--no-pin", action="store_true",
                   help="do not pin the vCPU and injector threads to host CPUs")
    r.add_argument("--force", action="store_true", help="overwrite a recording in DIR")
    r.add_argument("--json", action="store_true", help="print the metadata as JSON")

    c = subparsers.add_parser(
        "calibrate", help="fit the model's costs to a recording (writes DIR/calibration.json)",
        description="Measure the costs a recording shows directly and fit wake_to_run_ns and "
                    "context_switch_ns by simulating its workload; saves DIR/calibration.json.")
    c.add_argument("dir", metavar="DIR", help="a folder written by 'kvmwake kernel record'")
    c.add_argument("--arrivals", choices=("sent", "target"), default="sent",
                   help="simulated MSIs at the real send times (default) or at the spec's "
                        "targets plus the median lateness")
    c.add_argument("--quick", action="store_true", help="a coarser search (for tests)")
    c.add_argument("--scheduler", choices=SCHEDULERS, default="eevdf",
                   help="the host scheduler the simulation runs (default eevdf, the "
                        "kernel's; fifo for comparison)")
    c.add_argument("--host-rules", choices=HOST_RULES, default="recording",
                   help=HOST_RULES_HELP)
    c.add_argument("--tails", action="store_true",
                   help="also fit wake_to_run_ns as a distribution (quantiles) from the "
                        "spread of the uncontended latencies (calibration.json's costs)")
    c.add_argument("--json", action="store_true", help="print the calibration as JSON")

    p = subparsers.add_parser(
        "compare", help="run the recording's workload in the model and print both side by side",
        description="Simulate the recording's workload with its calibration and print the "
                    "halt stats, poll/wait split, wait-time histogram and wake latencies of "
                    "kernel and model; writes DIR/compare.json and DIR/compare.png.")
    p.add_argument("dir", metavar="DIR", help="a recorded and calibrated folder")
    p.add_argument("--no-png", action="store_true", help="do not write compare.png")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if any checked acceptance criterion misses its bound (a "
                        "saturated recording is not scored)")
    p.add_argument("--seed", type=_nonneg, default=0, help="simulation seed (default 0)")
    p.add_argument("--host-rules", choices=HOST_RULES, default=None,
                   help="run the model with these host kernel rules instead of the "
                        "calibration's: " + HOST_RULES_HELP)
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="run the model with this host scheduler instead of the "
                        "calibration's (eevdf or fifo)")

    from . import suite as _suite
    s = subparsers.add_parser(
        "suite", help="record, calibrate and compare a list of configurations; write the "
                      "validation table",
        description="For each configuration (built-in list covering issue 14's matrix, or "
                    "--config FILE) and seed: record, calibrate, compare into OUT/NAME/seedS; "
                    "writes OUT/suite.md (the validation table) and OUT/suite.json.")
    _suite.build_parser(s)

    from . import schedreplay as _schedreplay
    _schedreplay.build_parser(subparsers.add_parser(
        "sched-replay", help="the model's EEVDF rules on the kernel's own scheduler trace",
        description="Rebuild each host CPU's run queue of the recording's threads from its "
                    "scheduler trace (sched.trace) with the model's EEVDF rules, and hold "
                    "the rules' wake-up preemption decisions and picks against the "
                    "kernel's: upstream's rule and preempt_skips_delayed's."))


def _err(msg: str) -> int:
    print(f"kvmwake: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``kernel record|calibrate|compare`` (``args.kernel_command``)."""
    from .kvm import KvmIoctlError
    from .record import RecordError, Stopped
    from .recording import RecordingError
    cmd = args.kernel_command
    try:
        if cmd == "record":
            return _record(args)
        if cmd == "calibrate":
            return _calibrate(args)
        if cmd == "compare":
            return _compare(args)
        if cmd == "suite":
            from .suite import run_cli
            return run_cli(args)
        if cmd == "replay":
            return _replay.run(args)
        if cmd == "sched-replay":
            from .schedreplay import main as sched_replay
            return sched_replay(args)
        return _err(f"unknown kernel command {cmd!r}")
    except (RecordError, RecordingError, SpecError, KvmIoctlError, TraceFormatError) as exc:
        return _err(str(exc))
    except ImportError as exc:
        return _err(f"kvmwake's native recorder is not built ({exc}); run "
                    f"'python setup.py build_ext --inplace' or reinstall")
    except (OSError, ValueError) as exc:
        return _err(str(exc))
    except Stopped as exc:                   # SIGTERM, SIGHUP: cleaned up, say so
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("kvmwake: interrupted", file=sys.stderr)
        return 130


def _record(args) -> int:
    from pathlib import Path
    from .record import RecordOptions, print_summary, record
    if args.workload == "msi" and not args.idle:
        return _err("record: --idle SPEC is required with --workload msi")
    opts = RecordOptions(vcpus=args.vcpus, wakes=args.wakes, idle=args.idle or "",
                         workload=args.workload, compute=args.compute, targets=args.targets,
                         out=Path(args.out), halt_poll_ns=args.halt_poll_ns, seed=args.seed,
                         mode=args.injector, trace=args.trace, force=args.force,
                         sched_trace=args.sched_trace,
                         pin=not args.no_pin)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    meta = record(opts, log=log)
    if args.json:
        print(json.dumps(meta, indent=2))
    else:
        print_summary(meta)
        print(f"  written to {args.out}")
    return 0


def _calibrate(args) -> int:
    from . import calibrate as C
    from .recording import load
    rec = load(args.dir)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    cal = C.fit(rec, arrivals=args.arrivals, quick=args.quick, log=log, tails=args.tails,
                scheduler=args.scheduler, host_rules=args.host_rules)
    C.save(rec, cal)
    if args.json:
        print(json.dumps(cal, indent=2, default=float))
        return 0
    p = cal["params"]
    co = p["costs"]
    d = cal["direct"]
    print(f"calibration of {rec.path} ({cal['recording']['workload']}, "
          f"{rec.nvcpus} vCPU(s), cap {rec.cap})")
    print(f"  measured: handler {p['handler_ns']} ns ({d['handler_samples']} samples), "
          f"entry + exit {co['vm_entry_ns'] + co['vm_exit_ns']} ns, interrupt delivery "
          f"{p['delivery_ns']} ns ({d['delivery_samples']} polls), port exit "
          f"{cal['port_exit_ns']} ns, injector lateness {p['lateness_ns']} ns")
    f = cal["fit"]
    print(f"  fitted:   wake_to_run_ns {co['wake_to_run_ns']}, context_switch_ns "
          f"{co['context_switch_ns']}{'' if 'context_switch_ns' in f['free'] else ' (not fitted)'}"
          f" - {f['evals']} simulations, loss {f['loss']:.3f}")
    print("  residuals: " + ", ".join(f"{k} {v:+.2f}" for k, v in f["residuals"].items()))
    if d.get("busy_method"):
        print(f"  own work: {d['busy_method']} ({d['busy_samples']} gaps)")
    if cal.get("tails"):
        t = cal["tails"]
        for name, spec in cal["costs"].items():
            q = spec["q"]
            print(f"  tails:    {name} quantiles p0 {q[0]}, p50 {q[len(q) // 2]}, p90 "
                  f"{q[(len(q) - 1) * 9 // 10]}, p99 {q[(len(q) - 1) * 99 // 100]}, p100 "
                  f"{q[-1]} ns from {t['samples']} latencies ({t['method']})")
    if cal.get("saturated"):
        print(f"  SATURATED ({cal['saturated_reason']}): compare will not score it")
    for n in cal["notes"]:
        print(f"  note: {n}")
    print(f"  saved to {rec.path / 'calibration.json'}")
    return 0


def _compare(args) -> int:
    from . import compare as CM
    from .recording import load
    rec = load(args.dir)
    c = CM.compare_dir(rec, png=not args.no_png, seed=args.seed, scheduler=args.scheduler,
                       host_rules=args.host_rules)
    if args.json:
        print(CM.dumps(c))
    else:
        CM.print_report(c)
        if c.get("png"):
            print(f"picture: {c['png']} ({c['png_backend']})")
    return 1 if args.check and c["verdict"]["pass"] is False else 0


def build_standalone() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmwake kernel",
                                     description="Compare kvmwake with the real kernel.")
    sub = parser.add_subparsers(dest="kernel_command", required=True)
    build_parser(sub)
    _replay.build_parser(sub.add_parser("replay", help="replay a recorded trace"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """``kvmwake kernel ...`` on its own (before it is mounted in ``kvmwake.cli``)."""
    parser = build_standalone()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
