"""The ``kvmwake`` command line.

    kvmwake run [SCENARIO | FILE.toml] [--vcpus N] [--host-cpus N] [--sim-ms MS] [--seed S]
                [--engine core|reference] [--scheduler fifo|eevdf]
                [--affinity pinned|all] [--json PATH]
                [--trace PATH] [--npz PATH]
                [--plot PATH] [--out DIR | --no-out] [--quiet]

    With no output option, ``kvmwake run`` writes kvmwake-out/summary.json,
    kvmwake-out/vm0.trace and (with matplotlib) kvmwake-out/plot.png.
    On a terminal, each long phase (building the VMs, simulating, summarizing,
    writing the outputs) shows its progress on stderr (tqdm; not with --quiet
    or --no-progress, nor when stderr is not a terminal).  The run goes in
    chunks of virtual time: Ctrl-C stops between chunks, writes what was
    computed (summary.json first, then the trace, arrays and plot) and exits
    130.  Every file is written atomically (a temporary file, then
    os.replace): a second Ctrl-C while writing stops there, keeps the files
    already written and never leaves a truncated one.
    kvmwake scenarios
    kvmwake kernel record|calibrate|compare ...    (see kvmwake.kernel)
    kvmwake kernel replay TRACE --halt-poll-ns N [--grow G] [--grow-start S] [--shrink K] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import __version__
from .. import host as _host
from .. import vmm as _vmm
from .. import scenarios as _scenarios
from ..errors import EngineError, KvmError, ProgramError, ScenarioError, SnapshotError
from ..model import SCHEDULERS
# kernel.cli and kernel.replay use this package's argtypes, so importing them first
# loads this module while they are half loaded: take them as modules and look their
# functions up when they are called (tests/test_imports.py imports each module first).
from ..kernel import cli as _kernel_cli
from ..kernel import replay as _kernel_replay
from ..outputs import arrays as _arrays
from ..outputs import perfetto as _perfetto
from ..outputs import plots as _plots
from ..outputs import summary as _summary
from ..outputs import atomic as _atomic
from . import progress as _prog
from . import sweep as _sweep
from .argtypes import nonempty_path as _path
from .argtypes import nonneg_int as _nonneg_int
from .argtypes import positive_float as _positive_float
from .argtypes import positive_int as _positive_int
from .argtypes import threads as _threads


DEFAULT_OUT_DIR = "kvmwake-out"
#: Chunks a run is cut into (in virtual time) for progress and Ctrl-C.
RUN_CHUNKS = 64


def _on_chunk(host, now_ns: int, end_ns: int) -> None:
    """Called after every chunk of a run (tests patch it to simulate Ctrl-C)."""


def _progress(total_ns: int, quiet: bool):
    """The simulation's tqdm bar (virtual ms) on a terminal, or None (see cli.progress)."""
    return _prog.bar(_prog.enabled(quiet), total=total_ns / 1e6, unit="ms", unit_scale=False,
                     desc="simulating",
                     bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} virtual ms "
                                "[{elapsed}<{remaining}]")


#: Wall time aimed at per chunk: how long Ctrl-C may wait for the engine to return.
CHUNK_WALL_S = 0.1
#: The same for a host that runs as islands: each chunk runs every island in turn,
#: and an island's state leaves the caches between chunks, so its chunks are
#: longer (and at most 1/ISLAND_CHUNKS of the run).
CHUNK_WALL_ISLANDS_S = 1.0
ISLAND_CHUNKS = 4


def run_chunked(host, until_ns: int, quiet: bool = True) -> None:
    """``host.run(until_ns)`` in chunks of virtual time (the result does not depend on
    them), with a progress bar; KeyboardInterrupt propagates between (or inside) chunks.

    The engine does not look at signals while it runs, so a Ctrl-C takes effect when
    the chunk ends: chunks are sized to take about ``CHUNK_WALL_S`` of wall time each
    (the first is 1/4096 of the run, then each is scaled by how long the last took),
    and are at most 1/``RUN_CHUNKS`` of the run so the bar moves.  A host that runs
    as islands takes ``CHUNK_WALL_ISLANDS_S`` and 1/``ISLAND_CHUNKS`` instead."""
    start = host.now
    span = until_ns - start
    islands = getattr(host, "split_islands", False) and host.islands_blocked() is None
    chunks, wall = (ISLAND_CHUNKS, CHUNK_WALL_ISLANDS_S) if islands else (RUN_CHUNKS, CHUNK_WALL_S)
    most = max(1, -(-span // chunks)) if span > 0 else 1
    least = max(1, span // (1 << 22))        # at most ~4 million chunks
    step = max(least, min(most, span // (chunks * 64)))
    bar = _progress(span, quiet)
    try:
        t = start
        while t < until_ns:
            t = min(until_ns, t + step)
            w0 = time.perf_counter()
            host.run(t)
            dt = time.perf_counter() - w0
            step = int(min(most, step * 4, max(step / 4, step * wall / max(dt, 1e-6))))
            step = max(least, step)
            if bar is not None:
                bar.update((t - start) / 1e6 - bar.n)
            _on_chunk(host, t, until_ns)
        if host.now < until_ns:
            host.run(until_ns)
    finally:
        if bar is not None:
            bar.close()


MAIN_EPILOG = """\
What it models: vCPU halts (x86 HLT, arm64 WFI), halt polling (halt_poll_ns and
KVM_CAP_HALT_POLL), kicks and IPIs, the arm64 vGIC and arch timer, PSCI
(CPU_ON/CPU_OFF and SYSTEM_SUSPEND with KVM_CAP_ARM_SYSTEM_SUSPEND), x86 MSIs,
and host CPUs shared by vCPU threads.  VMM policies (kvmwake.vmm: default,
reference, deny-all, or your own) answer the exits KVM leaves to userspace.

  kvmwake scenarios                       the built-in scenarios
  kvmwake run ipi-storm --vcpus 64        run one and print its halt stats
  kvmwake run suspend-cycle               arm64 PSCI SYSTEM_SUSPEND cycles
  kvmwake sweep ipi-storm --param halt_poll_ns=0,200us --seeds 3 -o sweep-out

Tutorials: docs/tutorial-perf.md (halt polling, sweeps, plots) and
docs/tutorial-vmm.md (a VMM policy, SYSTEM_SUSPEND); outputs: docs/outputs.md.
"""

RUN_EPILOG = """\
SCENARIO is a built-in name (default, irq-storm, suspend-cycle, ipi-storm; see
'kvmwake scenarios') unless it looks like a path (contains '/' or ends in .toml):
a scenario file (format: docs/design.md, 'Scenario files'), which may set the
VMM policy (vm.vmm = "default" | "reference" | "deny-all") and capabilities
such as ARM_SYSTEM_SUSPEND (the suspend-cycle built-in uses PSCI
SYSTEM_SUSPEND).  --restore continues a snapshot: it takes no SCENARIO,
--vcpus, --host-cpus, --seed or --engine (the snapshot fixes them).
Exit status: 0 done, 1 runtime error, 2 bad arguments or input, 130 interrupted.
Tutorials: docs/tutorial-perf.md, docs/tutorial-vmm.md; outputs: docs/outputs.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmwake", description=(
        "A fast, deterministic model of how Linux KVM halts, polls, blocks and wakes vCPUs."),
        epilog=MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kvmwake {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a scenario (built-in or a .toml file) and print its "
                                   "halt stats", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("scenario", nargs="?", default=None,
                   help="built-in scenario name (see 'kvmwake scenarios') or a scenario file "
                        "(a path: contains '/' or ends in .toml) (default: default)")
    r.add_argument("--vcpus", type=_positive_int, help="total vCPUs (scenario default if omitted)")
    r.add_argument("--host-cpus", type=_positive_int, help="host CPUs")
    r.add_argument("--sim-ms", type=_positive_float, help="virtual time to simulate, ms")
    r.add_argument("--seed", type=_nonneg_int, default=None,
                   help="seed (default: the scenario's, 0 for the built-ins)")
    r.add_argument("--engine", choices=("core", "reference"), default=None,
                   help="simulation engine (default: core)")
    r.add_argument("--vmm", metavar="SPEC",
                   help="the VMM policy of every VM: default, reference, deny-all or "
                        "package.module:Class (a kvmwake.vmm.Vmm subclass, importable from "
                        "the current directory or PYTHONPATH); overrides the scenario's.  With "
                        "--restore: the class a custom policy saved in the snapshot needs")
    r.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="host scheduler: fifo run queues or Linux's EEVDF (default: the "
                        "scenario's [host] scheduler, else fifo)")
    r.add_argument("--affinity", choices=("pinned", "all"), default=None,
                   help="where the vCPU threads may run: pinned (thread g on host CPU "
                        "g %% host CPUs) or all host CPUs, placed at each wake-up (default: "
                        "the scenario's [vm] affinity, else pinned)")
    r.add_argument("--threads", type=_threads, default=None,
                   help="OS threads for a host of independent islands (VMs that share no "
                        "host CPU), which run as separate simulations when no vCPU can exit "
                        "to userspace and no state timeline is kept (--perfetto, or --plot "
                        "with --one-queue); the results do not depend on it (default: the "
                        "CPUs this process may use)")
    r.add_argument("--one-queue", action="store_true",
                   help="run the host on its one event queue even when it is islands (the "
                        "same results, slower); --plot then draws the host CPU-time split "
                        "from the state timeline")
    r.add_argument("--json", metavar="PATH", type=_path,
                   help="write the summary as JSON ('-' for stdout)")
    r.add_argument("--trace", metavar="PATH", type=_path,
                   help="write kvm_vcpu_wakeup / kvm_halt_poll_ns lines of VM 0 in the kernel's text")
    r.add_argument("--trace-capacity", type=_nonneg_int, default=1 << 20,
                   help="tracepoint records kept with --trace (newest; default: %(default)s)")
    r.add_argument("--npz", metavar="PATH", type=_path,
                   help="write per-vCPU stats, histograms and wake latencies as .npz arrays")
    r.add_argument("--plot", metavar="PATH", type=_path,
                   help="write a PNG: wake-latency histogram, halt_poll_ns over time, host "
                        "CPU time (needs matplotlib: pip install 'kvmwake[plot]')")
    r.add_argument("--perfetto", metavar="PATH", type=_path,
                   help="write the vCPU thread state timeline (RUNNING/POLLING/BLOCKED/RUNNABLE "
                        "per host CPU) as Chrome trace-event JSON (ui.perfetto.dev, "
                        "chrome://tracing)")
    r.add_argument("--timeline-capacity", type=_nonneg_int, default=1 << 18,
                   help="state changes kept for --perfetto (the newest; default: %(default)s)")
    r.add_argument("--out", metavar="DIR", type=_path,
                   help="write summary.json, vm0.trace and plot.png (with matplotlib) into DIR; "
                        "the default when no other output option is given is "
                        f"{DEFAULT_OUT_DIR}")
    r.add_argument("--no-out", action="store_true",
                   help=f"write no files (not even to {DEFAULT_OUT_DIR})")
    r.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but errors (and no progress)")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress lines on stderr (shown by default on a terminal, for "
                        "the build, the simulation, the summary and the writing)")
    r.add_argument("--snapshot-at", type=_positive_float, metavar="MS",
                   help="save a snapshot at this virtual time (ms; with --snapshot)")
    r.add_argument("--snapshot", metavar="PATH", type=_path,
                   help="where --snapshot-at writes the snapshot")
    r.add_argument("--restore", metavar="PATH", type=_path,
                   help="continue the run saved in a snapshot (to its --sim-ms end, or "
                        "to --sim-ms if given)")

    sub.add_parser("scenarios", help="list the built-in scenarios, one line each")

    k = sub.add_parser("kernel", help="record, calibrate against, compare with and replay "
                                      "the real kernel")
    ksub = k.add_subparsers(dest="kernel_command", required=True)
    rp = ksub.add_parser("replay", help="replay a recorded trace through the halt-poll rule")
    _kernel_replay.build_parser(rp)
    _kernel_cli.build_parser(ksub)
    _sweep.build_parser(sub)
    return p


class UsageError(ValueError):
    """Arguments that cannot go together (exit status 2)."""


def check_run_args(args):
    """Check ``kvmwake run``'s arguments before anything is built or created; returns the
    checked ``Scenario`` (None with --restore)."""
    if (args.snapshot_at is None) != (args.snapshot is None):
        raise UsageError("--snapshot-at and --snapshot go together")
    if args.no_out and args.out:
        raise UsageError("--out and --no-out contradict each other")
    if args.restore is not None:
        fixed = [opt for opt, v in (("a SCENARIO", args.scenario), ("--vcpus", args.vcpus),
                                    ("--host-cpus", args.host_cpus), ("--seed", args.seed),
                                    ("--engine", args.engine)) if v is not None]
        if fixed:
            raise UsageError(f"--restore continues the run saved in {args.restore}, whose "
                             f"snapshot fixes the scenario, vCPUs, host CPUs, seed and engine: "
                             f"{', '.join(fixed)} cannot apply")
        if not os.path.isfile(args.restore):
            raise UsageError(f"--restore {args.restore}: no such file")
        return None
    args.scenario = "default" if args.scenario is None else args.scenario
    args.engine = args.engine or "core"
    return _scenarios.get(args.scenario)


def _note(args, msg: str) -> None:
    """A line about what the run does (snapshots, restores); stderr, so --json - stays JSON."""
    if not args.quiet:
        print(f"kvmwake: {msg}", file=sys.stderr)


_startup_counted = False


def command_start(own_command: bool) -> float:
    """When the command began (``time.perf_counter()``).  For the process's own
    command line (``main()`` with no ``argv``: the ``kvmwake`` program, ``python -m
    kvmwake``), the first time, when kvmwake began to load, so that its start-up
    (the imports) counts; otherwise (``main(argv)`` called from Python), now."""
    global _startup_counted
    from .. import _LOAD_T0
    now = time.perf_counter()
    if not own_command or _startup_counted:
        return now
    _startup_counted = True
    return min(_LOAD_T0, now)


def timing(marks, end: float) -> dict:
    """The wall time of ``kvmwake run`` split into its phases: ``marks`` are the
    ``time.perf_counter()`` values at which start-up, build, run, summary and outputs
    began, ``end`` when the outputs ended.  Each phase and ``total_s`` are whole
    milliseconds (as seconds), so that the phases add up to the total exactly."""
    ms = [round(1000 * (t - marks[0])) for t in list(marks) + [end]]
    out = {"total_s": ms[-1] / 1000}
    for (key, _), a, b in zip(_summary.TIMING_NAMES, ms, ms[1:]):
        out[key] = (b - a) / 1000
    return out


def run_scenario(args, sc=None) -> dict:
    if not hasattr(args, "_checked"):
        sc = check_run_args(args)
    sim_ns = None if args.sim_ms is None else int(round(args.sim_ms * 1_000_000))
    trace_cap = args.trace_capacity if (args.trace or args.plot) else 0
    t0 = time.perf_counter()
    if getattr(args, "_t_start", None) is None:
        args._t_start = t0
    policy = None
    if getattr(args, "vmm", None) is not None:
        added = "" not in sys.path and os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())      # as `python -m` would find the module
        try:
            policy = _vmm.load_policy(args.vmm)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    quiet = args.quiet or getattr(args, "no_progress", False)
    on = _prog.enabled(quiet)
    if args.restore:
        classes = {_vmm.policy_spec(policy): policy} if policy is not None else None
        with _prog.phase(on, f"restoring {args.restore}"):
            host, header = _host.restore_host(args.restore, vmm_classes=classes,
                                              threads=args.threads)
        run = header.get("run") or {}
        name = run.get("scenario", "?")
        if sim_ns is None:
            sim_ns = run.get("sim_ns")
            if not isinstance(sim_ns, int):
                raise UsageError(f"{args.restore}: the snapshot names no end time; give --sim-ms")
        if args.scheduler is not None and args.scheduler != host.scheduler:
            raise UsageError(f"{args.restore}: the snapshot's host runs the "
                             f"{host.scheduler} scheduler, not {args.scheduler}")
        if args.affinity is not None:
            raise UsageError(f"{args.restore}: --affinity builds a new host; a restored "
                             "host keeps its threads' affinity")
        args.seed, args.engine = host.seed, host.engine_name
        path = None
        start_events, start_halts = host.events, host.halts
        _note(args, f"restored {args.restore} (scenario {name}, seed {host.seed}): continuing "
                    f"from virtual time {host.now / 1e6:.3f} ms ({host.now} ns) to "
                    f"{sim_ns / 1e6:.3f} ms")
    else:
        what = str(args.scenario) + (f", {args.vcpus:,} vCPUs" if args.vcpus else "")
        with _prog.phase(on, f"building {what}"):
            host, sim_ns, sc = _scenarios.build(sc if sc is not None else args.scenario,
                                                vcpus=args.vcpus,
                                                host_cpus=args.host_cpus, sim_ns=sim_ns,
                                                seed=args.seed, engine=args.engine,
                                                trace_capacity=trace_cap,
                                                scheduler=args.scheduler,
                                                affinity=args.affinity,
                                                threads=args.threads)
        name = sc.name
        path = sc.path
        args.seed = host.seed
        if policy is not None:
            for vm in host.vms:
                vm.vmm = policy()
                vm.vmm.attach(vm)
        start_events = start_halts = 0
    if sim_ns < host.now:
        raise UsageError(f"the run ends at {sim_ns} ns, before the snapshot's {host.now} ns")
    if trace_cap:
        host.trace_vm(0)                  # the trace outputs are VM 0's
    host.split_islands = not args.one_queue
    if args.plot and (args.one_queue or host.islands_blocked() is not None):
        # The timeline keeps one order over the host: a host of islands runs
        # without it, and the plot splits its CPU time from the stats.
        _plots.enable_cpu_time(host)
    if args.perfetto and host.timeline_capacity == 0:
        host.enable_timeline(args.timeline_capacity)
    t1 = time.perf_counter()
    if args.snapshot_at is not None:
        at = int(round(args.snapshot_at * 1_000_000))
        if not host.now <= at <= sim_ns:
            raise UsageError(f"--snapshot-at {args.snapshot_at} ms is outside the run "
                             f"({host.now / 1e6:g} to {sim_ns / 1e6:g} ms)")
        interrupted = _run_interruptible(host, at, quiet)
        if interrupted:
            return _summarize(args, host, name, path, host.now, t0, t1, start_events,
                              start_halts, interrupted=True)
        data = _host.host_to_bytes(host, run={"scenario": name, "sim_ns": sim_ns})
        with _atomic.atomic_path(args.snapshot) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
        _note(args, f"snapshot at virtual time {host.now / 1e6:.3f} ms ({host.now} ns) written "
                    f"to {args.snapshot} ({len(data):,} bytes); continue it with "
                    f"'kvmwake run --restore {args.snapshot}'")
    interrupted = _run_interruptible(host, sim_ns, quiet)
    return _summarize(args, host, name, path, host.now if interrupted else sim_ns, t0, t1,
                      start_events, start_halts, interrupted)


def _run_interruptible(host, until_ns, quiet) -> bool:
    """Run; True if Ctrl-C stopped it (the host keeps what was computed)."""
    try:
        run_chunked(host, until_ns, quiet)
    except KeyboardInterrupt:
        return True
    return False


def _summarize(args, host, name, path, sim_ns, t0, t1, start_events, start_halts,
               interrupted) -> dict:
    t2 = time.perf_counter()
    wall = t2 - t1
    quiet = args.quiet or getattr(args, "no_progress", False)
    with _prog.phase(_prog.enabled(quiet), "summarizing"):
        summary = _summary.summarize(host, scenario=name, scenario_file=path,
                                     engine=args.engine, seed=args.seed, sim_ns=sim_ns,
                                     build_s=t1 - t0, wall_s=wall, start_events=start_events,
                                     start_halts=start_halts, interrupted=interrupted)
    # When each phase began: start-up, build, run, summary, outputs.
    args._marks = (args._t_start, t0, t1, t2, time.perf_counter())
    summary["timing"] = timing(args._marks, args._marks[-1])
    summary["_host"] = host
    return summary


def _resolve_outputs(args) -> list:
    """Fill in --out's files; returns notes for the summary's end."""
    notes = []
    if args.no_out:
        return notes
    if args.out is None and not (args.json or args.trace or args.npz or args.plot
                                 or args.perfetto):
        args.out = DEFAULT_OUT_DIR
    if args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: exists and is not a folder")
        args.json = args.json or os.path.join(args.out, "summary.json")
        args.trace = args.trace or os.path.join(args.out, "vm0.trace")
        if args.plot is None:
            if _plots.have_matplotlib():
                args.plot = os.path.join(args.out, "plot.png")
            else:
                notes.append("no plot: matplotlib is not installed (pip install 'kvmwake[plot]')")
    elif args.plot and not _plots.have_matplotlib():
        raise ValueError("--plot needs matplotlib: pip install 'kvmwake[plot]'")
    return notes


class WriteInterrupted(Exception):
    """Ctrl-C while writing the outputs: ``written`` are complete, ``missing`` not written."""

    def __init__(self, written, missing):
        super().__init__("interrupted while writing")
        self.written, self.missing = written, missing


def write_outputs(args, summary: dict) -> list:
    """Write the files asked for, each atomically; returns [(what, path)] written.

    The JSON summary goes first (it holds the results), then the trace, the
    arrays, the plot and the Perfetto trace; at the end the summary is written
    again, now naming the files written.  Ctrl-C while writing raises
    ``WriteInterrupted``: the files written so far stay complete, the one being
    written is not left behind (``outputs.atomic``).
    """
    host = summary.pop("_host")
    sim_ns = summary["sim_ns"]
    json_file = args.json if args.json and args.json != "-" else None
    marks = getattr(args, "_marks", None)

    def stamp():
        """The wall time split, up to now (the summary's ``timing``)."""
        if marks is not None:
            summary["timing"] = timing(marks, time.perf_counter())

    def write_json():
        stamp()
        _atomic.write_text(json_file, _summary.to_json(summary) + "\n")

    def write_trace():
        _atomic.write_text(args.trace, host.vms[0].trace_text())

    def write_npz():
        with _atomic.atomic_path(args.npz) as tmp:
            _arrays.write_npz(host, tmp, sim_ns)

    def write_plot():
        with _atomic.atomic_path(args.plot) as tmp:
            _plots.write_plot(host, tmp, sim_ns, summary=summary)

    def write_perfetto():
        with _atomic.atomic_path(args.perfetto) as tmp:
            _perfetto.write_perfetto(host, tmp)

    jobs = []           # (what, path, summary key, writer)
    if json_file:
        jobs.append(("summary", json_file, None, write_json))
    if args.trace:
        jobs.append(("trace of VM 0", args.trace, "trace", write_trace))
    if args.npz:
        jobs.append(("arrays", args.npz, "npz", write_npz))
    if args.plot:
        jobs.append(("plot", args.plot, "plot", write_plot))
    if args.perfetto:
        jobs.append(("Perfetto trace", args.perfetto, "perfetto", write_perfetto))
    quiet = args.quiet or getattr(args, "no_progress", False)
    rewrite = bool(json_file) and len(jobs) > 1
    bar = _prog.bar(_prog.enabled(quiet), total=len(jobs) + rewrite, unit="file",
                    desc="writing", bar_format="{desc} {n}/{total} files [{elapsed}]")
    written = []
    try:
        for what, path, key, writer in jobs:
            if bar is not None:
                bar.set_description(f"writing {os.path.basename(path)}", refresh=False)
            writer()
            if key:
                summary[key] = path
            written.append((what, path))
            if bar is not None:
                bar.update(1)
        if rewrite:
            if bar is not None:
                bar.set_description(f"writing {os.path.basename(json_file)}", refresh=False)
            write_json()         # again, naming the files written (and the full timing)
            if bar is not None:
                bar.update(1)
        elif not json_file:
            stamp()
    except KeyboardInterrupt:
        stamp()
        done = {p for _, p in written}
        missing = [p for _, p, _, _ in jobs if p not in done]
        raise WriteInterrupted(written, missing or [f"the final {json_file} (the first one, "
                                                    "without the list of files, stays)"]) \
            from None
    finally:
        if bar is not None:
            bar.close()
    if args.json == "-":
        print(_summary.to_json(summary))
    return written


def main(argv=None) -> int:
    """``kvmwake``: returns the exit status (0 done, 1 runtime error, 2 bad arguments or
    input, 130 interrupted, 141 stdout closed early as by ``| head``)."""
    try:
        rc = _main(argv)
        sys.stdout.flush()                       # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        return _pipe_closed()
    except SystemExit as exc:                    # argparse: --help, usage errors
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _pipe_closed()
        raise exc


def _pipe_closed() -> int:
    """stdout's reader went away (``kvmwake ... | head``): stop quietly, as a process
    that SIGPIPE ends would (status 128 + SIGPIPE)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())         # no second error when Python flushes
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass
    return 128 + 13


def _main(argv=None) -> int:
    t_start = command_start(argv is None)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._t_start = t_start
    try:
        if args.command == "scenarios":
            for name in _scenarios.names():
                print(f"{name:<14} {_scenarios.get(name).description}")
            return 0
        if args.command == "kernel":
            if args.kernel_command == "replay":
                return _kernel_replay.run(args)
            return _kernel_cli.run(args)
        if args.command == "sweep":
            return args.sweep_run(args)
        sc = check_run_args(args)                # nothing is created before this passes
        args._checked = True
        notes = _resolve_outputs(args)
        summary = run_scenario(args, sc)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        cut = None
        try:
            written = write_outputs(args, summary)
        except WriteInterrupted as exc:
            written, cut = exc.written, exc
        if not args.quiet and args.json != "-":
            _summary.print_summary(summary)
            for what, path in written:
                print(f"  {what} written to {path}")
            for note in notes:
                print(f"  {note}")
        if cut is not None:
            kept = ", ".join(p for _, p in cut.written) or "nothing"
            print(f"kvmwake: interrupted while writing: kept {kept} (complete); not written: "
                  f"{', '.join(cut.missing)}", file=sys.stderr)
            return 130
        if summary.get("interrupted"):
            print("kvmwake: interrupted; wrote what was computed", file=sys.stderr)
            return 130
        return 0
    except BrokenPipeError:
        raise
    except (ScenarioError, ProgramError, KvmError, SnapshotError, ValueError,
            TypeError, OSError) as exc:
        print(f"kvmwake: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("kvmwake: error: out of memory (fewer --vcpus, a shorter trace with "
              "--trace-capacity, or more memory)", file=sys.stderr)
        return 1
    except EngineError as exc:
        print(f"kvmwake: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmwake: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:                     # noqa: BLE001 (never a traceback)
        if os.environ.get("KVMWAKE_TRACEBACK"):
            raise
        print(f"kvmwake: error: internal error: {type(exc).__name__}: {exc} (set "
              f"KVMWAKE_TRACEBACK=1 to see where)", file=sys.stderr)
        return 1
