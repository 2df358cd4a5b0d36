"""Record the real kernel on a workload: ``kvmwake kernel record``.

The run, step by step:

1. Build the micro-VM (``microvm.MicroVm``): N vCPUs, the in-kernel irqchip,
   ``KVM_CAP_HALT_POLL`` if asked for; with ``--workload ipi`` the IPI guest
   with its plan's step tables (``workload.ipi_plan``).
2. Measure the harness on its own: one ``CLOCK_MONOTONIC`` read, one
   ``KVM_SIGNAL_MSI`` that delivers nothing (an APIC ID no vCPU has), the
   injector's timer lateness on its CPU with nothing else running.
3. Start the vCPU threads (native, pinned: vCPU i on allowed host CPU
   ``i % ncpus``) and wait until every guest has enabled its LAPIC.
4. Start tracing (tracefs instance, ``mono`` clock) and read each vCPU's
   binary stats.
5. Start the injector (native, pinned to host CPU ``N % ncpus``, the place
   the model gives the next thread): it sleeps to each target time of the
   schedule and sends that wake's MSI (ipi: only the chain's start MSI; the
   vCPUs send the rest, and the run ends when the plan's last wake is seen).
   With ``--sched-trace`` the scheduler's tracepoints run alongside and the
   lines of the recording's threads go to ``sched.trace``.
6. When it is done and the last wakes are seen (or 200 ms passed), stop
   tracing, read the stats again, stop the threads (a stop MSI), close the VM.
7. Write the folder (``recording.py`` describes it).

Whatever happens (an error, Ctrl-C, SIGTERM, SIGHUP), the ``finally`` blocks
stop the threads, switch tracing off, remove the trace instance, unmount
tracefs if it was mounted for the recording, and close every fd, with SIGINT,
SIGTERM and SIGHUP held off while they run (``Stopped`` carries the signal out;
the command exits 128 + its number).  One recording at a time: ``record``
takes an exclusive ``fcntl.flock`` on ``LOCK_PATH`` first, and a second
concurrent recording fails at once naming the first's pid.  The output folder
is checked (created if needed, and written to) before anything is recorded.
"""

from __future__ import annotations

import csv
import datetime
import errno
import fcntl
import os
import platform
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..outputs.tracefmt import HALT_POLL_NS, WAKEUP, parse as parse_trace
from . import microvm as mv
from .kvm import DEV_KVM, Kvm, KvmIoctlError, KVM_CAP_MAX_VCPUS, KVM_CAP_NR_VCPUS
from .recording import (FORMAT, METADATA, STATS, TRACE, WAKES, WAKE_COLUMNS, write_json)
from .stats import StatsFd, diff, to_jsonable
from .schedtrace import SCHED_EVENTS, SCHED_TRACE, filter_sched
from .tracefs import EVENTS as TRACE_EVENTS, TraceCapture, TracefsUnavailable
from .workload import (IPI_DEFAULT_COMPUTE, ipi_plan, parse as parse_spec,
                       schedule as make_schedule)
from ..uapi import Cap, Ioctl

MODULE_PARAM_DIRS = ("/sys/module/kvm/parameters", "/sys/module/kvm_amd/parameters",
                     "/sys/module/kvm_intel/parameters")
READY_TIMEOUT_S = 5.0
#: IPI runs: time allowed per wake on top of the plan's compute (a stalled chain fails).
IPI_WAKE_ALLOWANCE_S = 0.002
#: Above this share of the host's CPUs used by others, the summary warns.
FOREIGN_WARN_PCT = 5.0
#: The quiet windows before and after the injection that measure others' load.
AMBIENT_S = 0.3
DRAIN_S = 0.2


#: The lock that keeps recordings one at a time (tracefs mounts, instances and the
#: host's quiet are shared by them); ``KVMWAKE_RECORD_LOCK`` overrides it.
LOCK_PATH = "/run/lock/kvmwake-record.lock"
#: The signals that stop a recording cleanly (SIGINT arrives as KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RecordError(RuntimeError):
    """The recording could not be made; the message says why."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a recording; ``signum`` says which (cleanup runs as for
    Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP raise ``Stopped`` (in the main thread; elsewhere nothing changes)."""
    def handler(signum, frame):
        raise Stopped(signum)
    old = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old[sig] = signal.signal(sig, handler)
    except ValueError:                           # not the main thread
        pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _lock_path() -> str:
    return os.environ.get("KVMWAKE_RECORD_LOCK") or LOCK_PATH


@contextmanager
def recording_lock():
    """Hold the one-recording-at-a-time lock, or raise RecordError at once."""
    path = _lock_path()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RecordError(f"cannot open the recording lock {path}: "
                          f"{exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RecordError(f"cannot lock {path}: {exc.strerror or exc}") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RecordError(f"another 'kvmwake kernel record' is running (pid {holder}, "
                              f"lock {path}); recordings share tracefs and the host, so "
                              f"one runs at a time") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)                             # releases the lock


def check_out_dir(out: Path, force: bool) -> bool:
    """The output folder: not empty, a folder (created if missing) where files can be
    written, without a recording unless ``force``.  True if it was created here."""
    if str(out) == "":
        raise RecordError("-o: an empty path (give a folder name)")
    if out.exists() and not out.is_dir():
        raise RecordError(f"{out} exists and is not a folder")
    if (out / METADATA).exists() and not force:
        raise RecordError(f"{out} already holds a recording (use --force to overwrite)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kvmwake-write-test-{os.getpid()}"
        with open(probe, "w") as fh:
            fh.write("x")
        probe.unlink()
    except OSError as exc:
        if created:
            _remove_empty(out)
        raise RecordError(f"cannot write into {out}: {exc.strerror or exc}") from None
    return created


def _remove_empty(out: Path) -> None:
    try:
        out.rmdir()
    except OSError:
        pass


@dataclass
class RecordOptions:
    vcpus: int
    wakes: int
    idle: str
    out: Path
    halt_poll_ns: int | None = None
    seed: int = 0
    mode: str = "sleep"               # the injector: sleep | spin | hybrid
    spin_ns: int = 20_000             # hybrid: spin the last spin_ns
    trace: str = "auto"               # auto | require | off
    force: bool = False
    pin: bool = True
    sched_trace: str = "auto"         # the scheduler's tracepoints: auto | require | off
    workload: str = "msi"             # msi: the injector's MSIs | ipi: vCPUs wake each other
    compute: str = IPI_DEFAULT_COMPUTE  # ipi: a vCPU's compute before it sends its IPI
    targets: str = "random-other"     # ipi: whom it wakes (workload.IPI_TARGETS)


#: ``--workload`` values.
WORKLOADS = ("msi", "ipi")


def module_params() -> dict:
    """The kvm module parameters (ints where they parse), and the arch module's."""
    out: dict = {}
    for d in MODULE_PARAM_DIRS:
        p = Path(d)
        if not p.is_dir():
            continue
        mod = p.parent.name
        for f in sorted(p.iterdir()):
            try:
                text = f.read_text().strip()
            except OSError:
                continue
            try:
                value: object = int(text)
            except ValueError:
                value = text
            out[f.name if mod == "kvm" else f"{mod}.{f.name}"] = value
    return out


#: Where the host scheduler's sysctls live (``kernel.sched_*``).
SCHED_SYSCTL_DIR = "/proc/sys/kernel"


def sched_sysctls(root: str = SCHED_SYSCTL_DIR) -> dict:
    """The host scheduler's sysctls, ``kernel.sched_*`` (ints where they parse):
    ``sched_autogroup_enabled``, and vendor ones such as ``sched_vcpu_pack``, whose
    presence and value the simulation reads (``recording.vcpu_pack``); kept in the
    metadata as ``sched_sysctls``."""
    out: dict = {}
    p = Path(root)
    if not p.is_dir():
        return out
    for f in sorted(p.glob("sched_*")):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        try:
            out[f.name] = int(text)
        except ValueError:
            out[f.name] = text
    return out


def cpu_times() -> tuple[float, float, float]:
    """(busy seconds of all host CPUs, this process's CPU seconds, monotonic seconds)."""
    busy = 0.0
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        ticks = [int(x) for x in fields[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal guest guest_nice; guest is in user.
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / hz
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, t.user + t.system, time.monotonic()


def foreign_load(before, after, ncpu: int) -> dict:
    """How much of the host's CPUs others (not this process) used between two ``cpu_times``."""
    busy = after[0] - before[0]
    mine = after[1] - before[1]
    wall = max(after[2] - before[2], 1e-9)
    return {"wall_s": wall, "host_busy_pct": 100 * busy / (wall * ncpu),
            "kvmwake_pct": 100 * mine / (wall * ncpu),
            "foreign_pct": max(0.0, 100 * (busy - mine) / (wall * ncpu)),
            "loadavg": os.getloadavg()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pct(a, q) -> float | None:
    a = np.asarray(a)
    return float(np.percentile(a, q)) if a.size else None


def summarize(a) -> dict:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "p50": _pct(a, 50), "p90": _pct(a, 90),
            "p99": _pct(a, 99), "max": float(a.max()), "min": float(a.min())}


@contextmanager
def sigint_held():
    """Hold SIGINT, SIGTERM and SIGHUP off while cleanup runs (delivered afterwards)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    except (AttributeError, ValueError, OSError):      # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _open_kvm() -> Kvm:
    if not os.path.exists(DEV_KVM):
        raise RecordError(f"{DEV_KVM} does not exist: this machine has no KVM (no "
                          f"virtualisation extensions, or the kvm module is not loaded)")
    try:
        return Kvm()
    except PermissionError:
        raise RecordError(f"cannot open {DEV_KVM}: permission denied (run as root or as a "
                          f"member of the kvm group)") from None
    except OSError as exc:
        raise RecordError(f"cannot open {DEV_KVM}: {exc.strerror or exc}") from None


def _check_caps(kvm: Kvm) -> dict:
    caps = {}
    for name, cap in (("IRQCHIP", Cap.IRQCHIP), ("SIGNAL_MSI", Cap.SIGNAL_MSI),
                      ("HALT_POLL", Cap.HALT_POLL), ("BINARY_STATS_FD", Cap.BINARY_STATS_FD),
                      ("MP_STATE", Cap.MP_STATE), ("MAX_VCPUS", KVM_CAP_MAX_VCPUS),
                      ("NR_VCPUS", KVM_CAP_NR_VCPUS)):
        caps[name] = kvm.check_extension(cap)
    missing = [n for n in ("IRQCHIP", "SIGNAL_MSI", "BINARY_STATS_FD") if not caps[n]]
    if missing:
        raise RecordError(f"this KVM lacks {', '.join('KVM_CAP_' + m for m in missing)}, which "
                          f"the micro-VM needs")
    return caps


def _harness_baseline(vm: mv.MicroVm, inj_cpu: int) -> dict:
    from . import _inject
    clock = _inject.bench_clock(20000)
    # An MSI to an APIC ID that no vCPU has: the ioctl and the routing, no delivery.
    ghost = vm.nr_vcpus if vm.nr_vcpus <= mv.MAX_XAPIC_ID else mv.MAX_XAPIC_ID
    msi_ns, msi_ret = _inject.bench_msi(vm.vm.fd, Ioctl.SIGNAL_MSI, ghost, mv.VEC_BASE, 2000)
    timer = _inject.bench_timer(inj_cpu, 100_000, 200)
    return {
        "clock_read_pair_ns": summarize(clock),
        "msi_ioctl_undelivered_ns": summarize(msi_ns),
        "msi_ioctl_undelivered_ret": sorted(set(int(x) for x in msi_ret)),
        "timer_lateness_idle_ns": summarize(timer),
    }


def record(opts: RecordOptions, log=print) -> dict:
    """Make one recording into ``opts.out``; returns the metadata written.

    Raises ``RecordError`` (at once if another recording holds the lock or the
    output folder cannot be written), ``KeyboardInterrupt`` on Ctrl-C and
    ``Stopped`` on SIGTERM/SIGHUP, each after the cleanup."""
    from . import _inject
    if opts.workload not in WORKLOADS:
        raise RecordError(f"--workload must be one of {', '.join(WORKLOADS)}, not "
                          f"{opts.workload!r}")
    if opts.workload == "ipi":
        spec = parse_spec(opts.compute)
        # Check the plan's arguments before anything is set up (same errors as later).
        ipi_plan(opts.seed, opts.vcpus, 1, spec, opts.targets)
    else:
        spec = parse_spec(opts.idle)
    if opts.vcpus < 1:
        raise RecordError(f"--vcpus must be at least 1, not {opts.vcpus}")
    if opts.wakes < 1:
        raise RecordError(f"--wakes must be at least 1, not {opts.wakes}")
    if isinstance(opts.out, str) and not opts.out.strip():
        raise RecordError("-o: an empty path (give a folder name)")
    out = Path(opts.out)
    with stop_on_signals(), recording_lock():
        created = check_out_dir(out, opts.force)
        try:
            return _record(opts, spec, out, _inject, log)
        except BaseException:
            if created:
                _remove_empty(out)
            raise


class _IpiWork:
    """What ``_record`` needs of an IPI run, shaped like a ``workload.Schedule``."""

    def __init__(self, plan):
        self.plan = plan
        self.tsc_khz = None
        self.target_ns = plan.target_ns
        self.vcpu = plan.vcpu
        self.index = plan.index
        self.duration_ns = plan.duration_ns

    def __len__(self) -> int:
        return len(self.plan)

    def steps(self) -> list:
        return [self.plan.steps(v) for v in range(self.plan.vcpus)]

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "compute_clock": "tsc", "tsc_khz": self.tsc_khz}


def _open_capture(sched_trace: str):
    """The trace capture: the kvm events, and the scheduler's unless ``sched_trace`` is
    "off" ("auto": without them, saying why, if they cannot be enabled)."""
    if sched_trace == "off":
        return TraceCapture(), {"mode": "off", "reason": "--sched-trace off"}
    try:
        return (TraceCapture(events=TRACE_EVENTS + SCHED_EVENTS),
                {"mode": "tracefs", "events": [e.split("/")[1] for e in SCHED_EVENTS],
                 "file": SCHED_TRACE})
    except TracefsUnavailable as exc:
        if sched_trace == "require" or "sched" not in str(exc):
            if sched_trace == "require":
                raise RecordError(f"the scheduler's tracepoints are needed (--sched-trace "
                                  f"require) but: {exc}") from None
            raise
        return TraceCapture(), {"mode": "off", "reason": str(exc)}


def _threads_table(status: list, inj_tid: int, inj_cpu: int, main_tid: int) -> list:
    """``meta["threads"]``: tid, role, vCPU index and pinned CPU (null: unpinned)."""
    rows = [{"tid": int(s["tid"]), "role": "vcpu", "vcpu": int(s["vcpu"]),
             "cpu": int(s["cpu"]) if s["cpu"] >= 0 else None} for s in status]
    rows.append({"tid": int(inj_tid), "role": "injector", "vcpu": None,
                 "cpu": inj_cpu if inj_cpu >= 0 else None})
    rows.append({"tid": int(main_tid), "role": "main", "vcpu": None, "cpu": None})
    return rows


def _record(opts, spec, out, _inject, log) -> dict:
    ipi = opts.workload == "ipi"
    if ipi:
        sched = _IpiWork(ipi_plan(opts.seed, opts.vcpus, opts.wakes, spec, opts.targets))
    else:
        sched = make_schedule(spec, opts.wakes, opts.vcpus, opts.seed)
    allowed = sorted(os.sched_getaffinity(0))
    ncpu = len(allowed)
    cpus = [allowed[i % ncpu] for i in range(opts.vcpus)] if opts.pin else [-1] * opts.vcpus
    inj_cpu = allowed[opts.vcpus % ncpu] if opts.pin else -1

    kvm = _open_kvm()
    vm = capture = session = None
    trace_text = None
    trace_info: dict = {}
    lost = 0
    interrupted = ""
    try:
        caps = _check_caps(kvm)
        try:
            vm = mv.MicroVm(opts.vcpus, opts.halt_poll_ns, kvm=kvm,
                            ipi_steps=sched.steps() if ipi else None)
        except mv.VcpuCountError as exc:
            raise RecordError(str(exc)) from None
        except KvmIoctlError as exc:
            if exc.errno == 22 and "CREATE_VCPU" in exc.what:
                raise RecordError(f"the kernel refused vCPU creation ({exc}); at most "
                                  f"{caps['MAX_VCPUS']} vCPUs per VM here") from None
            raise RecordError(f"building the micro-VM failed: {exc}") from None
        if ipi:
            sched.tsc_khz = vm.tsc_khz
        if vm.vm.check_extension(Cap.HALT_POLL) == 0 and opts.halt_poll_ns is not None:
            raise RecordError("KVM_CAP_HALT_POLL is not supported by this kernel")
        stats_fds = [StatsFd(v.stats_fd()) for v in vm.vcpus]
        what = (f"an IPI chain of {len(sched)} wakes ({opts.targets}, compute "
                f"{spec.canonical()}, seed {opts.seed}), ~{sched.duration_ns / 1e6:.1f} ms of "
                f"compute" if ipi else
                f"{len(sched)} wakes of {spec.canonical()} (seed {opts.seed}), "
                f"~{sched.duration_ns / 1e6:.1f} ms")
        log(f"micro-VM: {opts.vcpus} vCPU(s), KVM_CAP_HALT_POLL "
            f"{'not set' if opts.halt_poll_ns is None else opts.halt_poll_ns}; {what}")
        harness = _harness_baseline(vm, inj_cpu)

        sched_info = {"mode": "off", "reason": "--sched-trace off"}
        if opts.trace != "off":
            try:
                capture, sched_info = _open_capture(opts.sched_trace)
                trace_info = {"mode": "tracefs", "root": str(capture.root),
                              "instance": str(capture.instance) if capture.instance else None,
                              "mounted_by_kvmwake": capture.mounted_by_us is not None,
                              "clock": capture.clock, "note": capture.fallback_note}
            except TracefsUnavailable as exc:
                if opts.trace == "require":
                    raise RecordError(f"tracefs is needed (--trace require) but: {exc}") from None
                trace_info = {"mode": "stats-only", "reason": str(exc)}
                log(f"tracefs unavailable ({exc}): recording in stats-only mode "
                    f"(binary stats and host-observed latencies, no trace, no replay)")
        else:
            trace_info = {"mode": "stats-only", "reason": "--trace off"}
        if opts.sched_trace != "off" and capture is None:
            sched_info = {"mode": "off", "reason": f"no kvm trace ({trace_info['reason']})"}
            if opts.sched_trace == "require":
                raise RecordError(f"the scheduler's tracepoints are needed (--sched-trace "
                                  f"require) but tracing is off: {trace_info['reason']}")

        vectors = np.array([mv.wake_vector(int(j)) for j in sched.index], dtype=np.int32)
        session = _inject.Session(
            vm.vm.fd, [v.fd for v in vm.vcpus], [v.run_addr for v in vm.vcpus], cpus, inj_cpu,
            Ioctl.RUN, Ioctl.SIGNAL_MSI, sched.target_ns, sched.vcpu, vectors,
            vec_base=mv.VEC_BASE, nvec=mv.NR_VECTORS, wake_port=mv.WAKE_PORT,
            ready_port=mv.READY_PORT, fault_port=mv.FAULT_PORT, stop_vector=mv.STOP_VECTOR,
            mode=opts.mode, spin_ns=opts.spin_ns,
            **(dict(msi_count=1, senders=sched.plan.sender, send_port=mv.SEND_PORT,
                    done_port=mv.DONE_PORT) if ipi else {}))
        session.start_vcpus()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not session.all_ready():
            if session.any_vcpu_failed():
                raise RecordError(f"a vCPU stopped before it was ready: "
                                  f"{_vcpu_problem(session)}")
            if time.monotonic() > deadline:
                raise RecordError(f"the guests did not come up within {READY_TIMEOUT_S} s "
                                  f"({_vcpu_problem(session)})")
            time.sleep(0.001)
        time.sleep(0.005)                      # let every vCPU reach its first hlt
        quiet0 = cpu_times()                   # the guests are halted: the host is others'
        time.sleep(AMBIENT_S)
        ambient_before = foreign_load(quiet0, cpu_times(), os.cpu_count() or ncpu)
        if capture is not None:
            capture.start()
        before = [s.read() for s in stats_fds]
        wall0 = time.time()
        load0 = cpu_times()
        session.start_injector()
        limit = time.monotonic() + sched.duration_ns / 1e9 + 10.0
        if ipi:
            # The chain runs on its own after the start MSI; it ends with the last wake.
            limit += len(sched) * IPI_WAKE_ALLOWANCE_S
            while not (session.chain_done and session.received() >= len(sched)):
                if session.any_vcpu_failed():
                    raise RecordError(f"a vCPU thread stopped during the run: "
                                      f"{_vcpu_problem(session)}")
                if time.monotonic() > limit:
                    raise RecordError(f"the IPI chain stopped: {session.received()} of "
                                      f"{len(sched)} wakes seen ({_chain_problem(session)})")
                time.sleep(0.002)
        while not session.injector_done:
            if session.any_vcpu_failed():
                raise RecordError(f"a vCPU thread stopped during the run: "
                                  f"{_vcpu_problem(session)}")
            if time.monotonic() > limit:
                raise RecordError("the injector did not finish in time (the host is "
                                  "overloaded?)")
            time.sleep(0.005)
        load1 = cpu_times()
        drain_end = time.monotonic() + DRAIN_S
        while session.received() < len(sched) and time.monotonic() < drain_end:
            time.sleep(0.001)
        if capture is not None:
            capture.stop()
        after = [s.read() for s in stats_fds]
        quiet1 = cpu_times()
        time.sleep(AMBIENT_S)
        ambient_after = foreign_load(quiet1, cpu_times(), os.cpu_count() or ncpu)
        if capture is not None:
            trace_text = capture.read()
            lost = capture.lost_events()
    except KeyboardInterrupt as exc:
        interrupted = f"stopped by {exc}" if isinstance(exc, Stopped) else "interrupted"
        raise
    finally:
        with sigint_held():
            stuck = session.stop() if session is not None else 0
            problems = capture.close() if capture is not None else []
            if vm is not None:
                vm.close()
            kvm.close()
            if stuck:
                print(f"kvmwake: warning: {stuck} native thread(s) did not stop",
                      file=sys.stderr)
            for p in problems:
                print(f"kvmwake: warning: tracefs: {p}", file=sys.stderr)
            if interrupted:
                print(f"kvmwake: {interrupted}: threads stopped, tracing off, VM closed",
                      file=sys.stderr)

    status = session.vcpu_status()
    tids = [s["tid"] for s in status]
    threads = _threads_table(status, session.injector_tid, inj_cpu, threading.get_native_id())
    errors = [s for s in status if s["error"]]
    if errors:
        raise RecordError(f"a vCPU thread failed: {_describe(errors[0])}")

    # -- results ---------------------------------------------------------------------------
    t0 = session.t0
    sent, sent_end, ret, seen = session.sent, session.sent_end, session.ret, session.seen
    target_abs = t0 + sched.target_ns
    ok = seen > 0
    is_msi = np.ones(len(sched), dtype=bool)
    if ipi:
        is_msi[1:] = False                     # wake 0 is the start MSI, the rest IPIs
    harness.update({
        "injector_lateness_ns": summarize((sent - target_abs)[(sent > 0) & is_msi]),
        "msi_ioctl_delivered_ns": summarize((sent_end - sent)[(sent > 0) & is_msi]),
        "vcpu_userspace_turnaround_ns": {
            "mean": (sum(s["user_ns"] for s in status) / max(1, sum(s["exits"] for s in status))),
            "max": max(s["user_max_ns"] for s in status)},
        "injector_mode": opts.mode,
    })
    lat = (seen - sent)[ok]
    meta = {
        "format": FORMAT,
        "kvmwake": __version__,
        "date": datetime.datetime.fromtimestamp(wall0, datetime.timezone.utc).isoformat(),
        "kernel": {"release": platform.release(), "version": platform.version(),
                   "machine": platform.machine()},
        "cpu_model": cpu_model(),
        "host_cpus": ncpu,
        "host_cpu_ids": allowed,
        "pinning": {"vcpus": cpus, "injector": inj_cpu, "enabled": opts.pin},
        "module_params": module_params(),
        "sched_sysctls": sched_sysctls(),
        "caps": caps,
        "halt_poll_cap": opts.halt_poll_ns,
        "vcpus": opts.vcpus,
        "workload": {"kind": opts.workload, **sched.to_dict()},
        "trace": trace_info,
        "t0_ns": t0,
        "vcpu_tids": tids,
        "injector_tid": session.injector_tid,
        "threads": threads,
        "pinned": bool(opts.pin),
        "sched_trace": sched_info,
        "harness": harness,
        "wakes": {"sent": int((sent > 0).sum()), "delivered": int((ret > 0).sum()),
                  "seen": int(ok.sum()), "not_seen": int((~ok).sum())},
        "host_latency_ns": summarize(lat),
        "host_load": {**foreign_load(load0, load1, os.cpu_count() or ncpu),
                      "foreign_before_pct": ambient_before["foreign_pct"],
                      "foreign_after_pct": ambient_after["foreign_pct"]},
        "vcpu_threads": status,
    }
    out.mkdir(parents=True, exist_ok=True)
    if trace_text is not None and sched_info["mode"] == "tracefs":
        text, kept, dropped = filter_sched(trace_text, {t["tid"] for t in threads})
        sched_info.update({"lines": kept, "other_lines_dropped": dropped})
        (out / SCHED_TRACE).write_text(text)
    elif (out / SCHED_TRACE).exists():
        (out / SCHED_TRACE).unlink()
    if trace_text is not None:
        trace_text, kept, dropped = filter_trace(trace_text, set(tids))
        meta["trace"].update({"lines": kept, "other_lines_dropped": dropped,
                              "lost_events": lost})
        (out / TRACE).write_text(trace_text)
    elif (out / TRACE).exists():
        (out / TRACE).unlink()
    with open(out / WAKES, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(WAKE_COLUMNS)
        for row in zip(range(len(sched)), sched.vcpu.tolist(), sched.index.tolist(),
                       vectors.tolist(), sched.target_ns.tolist(), sent.tolist(),
                       sent_end.tolist(), ret.tolist(), seen.tolist()):
            w.writerow(row)
    write_json(out / STATS, {"vcpus": [
        {"vcpu": i, "before": to_jsonable(b), "after": to_jsonable(a),
         "delta": to_jsonable(diff(a, b))} for i, (b, a) in enumerate(zip(before, after))]})
    cal = out / "calibration.json"
    if cal.exists():
        cal.unlink()                           # stale: it belonged to the old recording
    write_json(out / METADATA, meta)
    return meta


def filter_trace(text: str, pids: set[int]) -> tuple[str, int, int]:
    """Keep the header and the two events' lines from ``pids``; (text, kept, dropped)."""
    out, kept, dropped = [], 0, 0
    events = {e.line_no: e for e in parse_trace(text, "trace")}
    for no, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            out.append(line)
            continue
        ev = events.get(no)
        if ev is None:
            if "LOST" in line and "EVENTS" in line:
                out.append(line)
            elif line.strip():
                dropped += 1
            continue
        if ev.pid in pids and ev.event in (WAKEUP, HALT_POLL_NS):
            out.append(line)
            kept += 1
        else:
            dropped += 1
    return "\n".join(out) + "\n", kept, dropped


def _describe(s: dict) -> str:
    what = s["error"]
    if what == "guest exception":
        return f"vCPU {s['vcpu']}: guest exception, vector {s['fault'] & 0xFF}"
    if what == "KVM_EXIT_INTERNAL_ERROR":
        return f"vCPU {s['vcpu']}: KVM_EXIT_INTERNAL_ERROR, suberror {s['suberror']}"
    if what == "KVM_RUN failed":
        return f"vCPU {s['vcpu']}: KVM_RUN failed: {os.strerror(s['errno'])}"
    return f"vCPU {s['vcpu']}: {what} (exit reason {s['exit_reason']})"


def _chain_problem(session) -> str:
    seen = np.asarray(session.seen)
    sent = np.asarray(session.sent)
    miss = np.nonzero(seen == 0)[0]
    first = int(miss[0]) if miss.size else -1
    st = session.vcpu_status()
    return (f"first wake not seen: {first}, sent: {bool(first >= 0 and sent[first] > 0)}; "
            + ", ".join(f"vCPU {x['vcpu']}: {x['wakes_seen']} seen, {x['stray']} stray, "
                        f"{x['dup']} duplicate" for x in st))


def _vcpu_problem(session) -> str:
    bad = [s for s in session.vcpu_status() if s["error"]]
    return _describe(bad[0]) if bad else "no error reported"


def print_summary(meta: dict, out=None) -> None:
    w = (out or sys.stdout).write
    wl = meta["workload"]
    ipi = wl.get("kind") == "ipi"
    what = (f"an IPI chain of {wl['wakes']} wakes ({wl['targets']}, compute {wl['canonical']})"
            if ipi else f"{wl['wakes']} wakes of {wl['canonical']}")
    w(f"recorded {what} on {meta['vcpus']} vCPU(s), "
      f"{meta['host_cpus']} host CPUs, kernel {meta['kernel']['release']}\n")
    cap = meta["halt_poll_cap"]
    w(f"  halt polling: module halt_poll_ns {meta['module_params'].get('halt_poll_ns')}, "
      f"KVM_CAP_HALT_POLL {'not set' if cap is None else cap}\n")
    tr = meta["trace"]
    if tr["mode"] == "tracefs":
        w(f"  trace: {tr.get('lines', 0)} lines (tracefs {tr.get('root')}, clock "
          f"{tr.get('clock')}, lost {tr.get('lost_events', 0)})\n")
    else:
        w(f"  trace: none, stats-only mode ({tr.get('reason')})\n")
    wk = meta["wakes"]
    if ipi:
        w(f"  wakes sent {wk['sent']} (1 start MSI, then IPIs through the x2APIC ICR), "
          f"handler exits seen {wk['seen']}\n")
    else:
        w(f"  MSIs sent {wk['sent']}, delivered {wk['delivered']}, handler exits seen "
          f"{wk['seen']}\n")
    hl = meta.get("host_load")
    if hl:
        worst = max(hl["foreign_pct"], hl.get("foreign_before_pct", 0),
                    hl.get("foreign_after_pct", 0))
        w(f"  other processes used {hl.get('foreign_before_pct', 0):.1f} % of the host CPUs "
          f"just before the run, ~{hl['foreign_pct']:.1f} % during it (10 ms clock ticks), "
          f"{hl.get('foreign_after_pct', 0):.1f} % just after\n")
        if worst > FOREIGN_WARN_PCT:
            w("  warning: other processes were busy; the kernel's figures include their "
              "interference, which the model does not know about\n")
    lat = meta["host_latency_ns"]
    if lat.get("n"):
        w(f"  host-observed wake latency ({'send port exit' if ipi else 'MSI send'} -> "
          f"port exit): p50 {lat['p50'] / 1e3:.1f} us, "
          f"p90 {lat['p90'] / 1e3:.1f} us, p99 {lat['p99'] / 1e3:.1f} us\n")
    h = meta["harness"]
    w(f"  harness: MSI ioctl {h['msi_ioctl_delivered_ns'].get('p50', 0) / 1e3:.1f} us p50 "
      f"(undelivered {h['msi_ioctl_undelivered_ns']['p50'] / 1e3:.1f} us), injector lateness "
      f"p50 {h['injector_lateness_ns'].get('p50', 0) / 1e3:.1f} us / p99 "
      f"{h['injector_lateness_ns'].get('p99', 0) / 1e3:.1f} us, clock read "
      f"{h['clock_read_pair_ns']['p50']:.0f} ns\n")


# ---------------------------------------------------------------- MSI to exit, in one call

def kernel_msi_to_exit(wakes: int = 500, seed: int = 0, idle: str = "mixed",
                       halt_poll_ns: int | None = None, trace: str = "off",
                       out: str | Path | None = None, log=None) -> dict:
    """Record the real kernel and return its MSI-to-exit latency
    (``analysis.msi_to_exit_ns``: the injector's ``KVM_SIGNAL_MSI`` to the vCPU thread's
    return from ``KVM_RUN`` for that wake) as ``analysis.latency_summary`` gives it:
    ``{"p50_ns", "p90_ns", "p99_ns", "n", "hist"}`` (``hist``: the 32 log2 buckets of
    ``halt_wait_hist``), plus ``sent`` (MSIs sent), ``queued`` (seen wakes left out
    because another wake's exit came first), ``kernel`` (release) and ``host_load``
    (the recording's: others' CPU share before, during and after, and the load average).

    The run is ``kvmwake kernel record --vcpus 1 --wakes WAKES --idle IDLE --seed SEED``
    with the command's defaults (vCPU and injector threads pinned, the injector
    sleeping to each target, the module's ``halt_poll_ns`` unless ``halt_poll_ns``
    sets ``KVM_CAP_HALT_POLL``), except ``trace``: "off" by default, since the figure
    needs no trace and the tracepoints would add their cost to the path it measures
    ("auto" records them as the command does).  Into ``out`` if given (it must not
    hold a recording), else a temporary folder removed afterwards.  Raises
    ``RecordError`` where the machine cannot record (see ``kvmwake.kernel.available``)."""
    import tempfile
    from .analysis import latency_summary, msi_to_exit_ns
    from .recording import load

    def run(folder: Path) -> dict:
        meta = record(RecordOptions(vcpus=1, wakes=wakes, idle=idle, out=folder,
                                    halt_poll_ns=halt_poll_ns, seed=seed, trace=trace,
                                    sched_trace="auto" if trace != "off" else "off"),
                      log=log or (lambda *a, **k: None))
        rec = load(folder)
        lat = msi_to_exit_ns(rec)
        seen = len(msi_to_exit_ns(rec, queued=True))
        return {**latency_summary(lat), "sent": meta["wakes"]["sent"],
                "queued": seen - len(lat), "kernel": meta["kernel"]["release"],
                "host_load": meta["host_load"]}

    if out is not None:
        return run(Path(out))
    with tempfile.TemporaryDirectory(prefix="kvmwake-msi-exit-") as tmp:
        return run(Path(tmp) / "rec")


if __name__ == "__main__":                     # python -m kvmwake.kernel.record [WAKES [SEED]]
    import json
    try:
        _r = kernel_msi_to_exit(*(int(a) for a in sys.argv[1:3]))
    except RecordError as _exc:
        print(f"kvmwake: {_exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(_r))
