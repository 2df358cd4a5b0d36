"""The recording folder: what ``kvmwake kernel record`` writes and the others read.

Files in ``DIR``:

``metadata.json``
    kernel version, module parameters, the VM's ``KVM_CAP_HALT_POLL`` value,
    the workload, host CPUs and pinning, the trace mode (or why there is no
    trace), harness overhead, thread ids.  ``FORMAT`` is its version.
``wakes.csv``
    one row per wake (``ipi`` workload: row 0 is the start MSI, the others IPIs;
    ``sent_ns`` is then the sender's port exit just before its ICR write,
    ``sent_end_ns`` the same, ``ret`` 1, ``target_ns`` the sum of the plan's
    computes before the wake); for MSIs: ``k, vcpu, index, vector, target_ns`` (after the
    injector's start ``t0_ns``), ``sent_ns`` / ``sent_end_ns`` (CLOCK_MONOTONIC
    just before / after ``KVM_SIGNAL_MSI``), ``ret`` (the ioctl's result),
    ``seen_ns`` (the guest handler's port exit seen by the vCPU thread; 0 if
    never).
``stats.json``
    each vCPU's binary stats (all names the kernel gives) at the start and
    the end of the injection, and the difference.
``trace``
    the ``kvm_vcpu_wakeup`` / ``kvm_halt_poll_ns`` lines of the run's vCPU
    threads, timestamps in ``CLOCK_MONOTONIC`` (trace_clock ``mono``).
    Absent in stats-only mode.
``sched.trace``
    the scheduler's tracepoints (``sched_switch``, ``sched_wakeup[_new]``,
    ``sched_migrate_task``) of the recording's threads, whose roles are in
    the metadata's ``threads``; ``kvmwake.kernel.schedtrace`` reads it.
    Absent with ``--sched-trace off`` or in stats-only mode.
``calibration.json``
    written by ``kvmwake kernel calibrate``.

``load(DIR)`` checks all of it and raises ``RecordingError`` with a message
naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..outputs.tracefmt import TraceEvent, TraceFormatError, read as read_trace
from .workload import (IPI_TARGETS, SpecError, ipi_plan, parse as parse_spec,
                       schedule as make_schedule)

FORMAT = 1
METADATA = "metadata.json"
WAKES = "wakes.csv"
STATS = "stats.json"
TRACE = "trace"
CALIBRATION = "calibration.json"
WAKE_COLUMNS = ("k", "vcpu", "index", "vector", "target_ns", "sent_ns", "sent_end_ns", "ret",
                "seen_ns")
REQUIRED_METADATA = ("format", "kernel", "module_params", "halt_poll_cap", "workload",
                     "host_cpus", "vcpus", "trace", "t0_ns", "vcpu_tids")
HALT_STATS = ("halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid",
              "halt_wakeup", "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns",
              "halt_poll_success_hist", "halt_poll_fail_hist", "halt_wait_hist", "halt_exits")


class RecordingError(ValueError):
    """A recording folder that cannot be used; the message names the file."""


@dataclass
class Recording:
    path: Path
    meta: dict
    wakes: dict            # column -> int64 array
    stats: dict            # {"vcpus": [{"vcpu", "before", "after", "delta"}]}
    events: list[TraceEvent] | None
    calibration: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def traced(self) -> bool:
        return self.events is not None

    @property
    def nvcpus(self) -> int:
        return int(self.meta["vcpus"])

    @property
    def cap(self) -> int | None:
        return self.meta["halt_poll_cap"]

    @property
    def module_params(self) -> dict:
        return self.meta["module_params"]

    def ceiling(self) -> int:
        """``kvm_vcpu_max_halt_poll_ns``: the cap if the VM set one, else the module's."""
        return self.cap if self.cap is not None else int(self.module_params["halt_poll_ns"])

    def pid_to_vcpu(self) -> dict[int, int]:
        return {int(tid): i for i, tid in enumerate(self.meta["vcpu_tids"])}

    def vcpu_stats(self, which: str = "delta") -> list[dict]:
        out = []
        for row in self.stats["vcpus"]:
            d = {}
            for k, v in row[which].items():
                d[k] = np.asarray(v, dtype=np.uint64) if isinstance(v, list) else int(v)
            out.append(d)
        return out

    def summed_stats(self) -> dict:
        rows = self.vcpu_stats()
        total: dict = {}
        for r in rows:
            for k, v in r.items():
                total[k] = total[k] + v if k in total else v
        return total


def _json(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecordingError(f"{path}: missing ({what}); is this a folder written by "
                             f"'kvmwake kernel record'?") from None
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordingError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise RecordingError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _check_meta(meta: dict, path: Path) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise RecordingError(f"{path}: missing keys {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise RecordingError(f"{path}: format {meta['format']!r}, this kvmwake reads {FORMAT}")
    n = meta["vcpus"]
    if not isinstance(n, int) or n < 1:
        raise RecordingError(f"{path}: vcpus = {n!r} is not a positive integer")
    if not isinstance(meta["host_cpus"], int) or meta["host_cpus"] < 1:
        raise RecordingError(f"{path}: host_cpus = {meta['host_cpus']!r} is not a positive "
                             f"integer")
    if not isinstance(meta["vcpu_tids"], list) or len(meta["vcpu_tids"]) != n:
        raise RecordingError(f"{path}: vcpu_tids must list {n} thread ids")
    cap = meta["halt_poll_cap"]
    if cap is not None and (not isinstance(cap, int) or not 0 <= cap <= 0xFFFF_FFFF):
        raise RecordingError(f"{path}: halt_poll_cap = {cap!r} is not null or a u32")
    mp = meta["module_params"]
    if not isinstance(mp, dict) or not isinstance(mp.get("halt_poll_ns"), int):
        raise RecordingError(f"{path}: module_params.halt_poll_ns is missing or not an integer")
    for key in ("halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink"):
        if key in mp and not isinstance(mp[key], int):
            raise RecordingError(f"{path}: module_params.{key} is not an integer")
    wl = meta["workload"]
    if not isinstance(wl, dict) or "spec" not in wl or "seed" not in wl or "wakes" not in wl:
        raise RecordingError(f"{path}: workload needs spec, seed and wakes")
    try:
        parse_spec(wl["spec"])
    except SpecError as exc:
        raise RecordingError(f"{path}: workload spec: {exc}") from None
    kind = wl.get("kind", "msi")
    if kind not in ("msi", "ipi"):
        raise RecordingError(f"{path}: workload.kind must be 'msi' or 'ipi', not {kind!r}")
    if kind == "ipi" and (wl.get("targets") not in IPI_TARGETS
                          or not isinstance(wl.get("start_vcpu"), int)):
        raise RecordingError(f"{path}: an ipi workload needs targets "
                             f"({' or '.join(IPI_TARGETS)}) and start_vcpu")
    tr = meta["trace"]
    if not isinstance(tr, dict) or tr.get("mode") not in ("tracefs", "stats-only"):
        raise RecordingError(f"{path}: trace.mode must be 'tracefs' or 'stats-only'")


def _read_wakes(path: Path, nvcpus: int) -> dict:
    try:
        fh = open(path, newline="")
    except FileNotFoundError:
        raise RecordingError(f"{path}: missing (per-wake send and seen times)") from None
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    rows = []
    with fh:
        try:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != WAKE_COLUMNS:
                raise RecordingError(f"{path}: header must be {','.join(WAKE_COLUMNS)}, "
                                     f"found {','.join(header or []) or 'nothing'}")
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(WAKE_COLUMNS):
                    raise RecordingError(f"{path}, line {lineno}: {len(row)} fields, expected "
                                         f"{len(WAKE_COLUMNS)}")
                try:
                    rows.append([int(x) for x in row])
                except ValueError:
                    raise RecordingError(f"{path}, line {lineno}: non-integer field in "
                                         f"{row!r}") from None
        except UnicodeDecodeError:
            raise RecordingError(f"{path}: not text (corrupt file)") from None
        except csv.Error as exc:
            raise RecordingError(f"{path}: {exc}") from None
    if not rows:
        raise RecordingError(f"{path}: no wakes recorded")
    arr = np.array(rows, dtype=np.int64)
    out = {name: arr[:, i].copy() for i, name in enumerate(WAKE_COLUMNS)}
    if not np.array_equal(out["k"], np.arange(len(arr))):
        raise RecordingError(f"{path}: column k must count 0, 1, 2, ... (rows missing or "
                             f"out of order)")
    if out["vcpu"].min() < 0 or out["vcpu"].max() >= nvcpus:
        raise RecordingError(f"{path}: a wake names a vCPU outside 0..{nvcpus - 1}")
    return out


def _read_stats(path: Path, nvcpus: int) -> dict:
    stats = _json(path, "binary stats per vCPU")
    vc = stats.get("vcpus")
    if not isinstance(vc, list) or len(vc) != nvcpus:
        raise RecordingError(f"{path}: 'vcpus' must list {nvcpus} vCPUs")
    for i, row in enumerate(vc):
        for which in ("before", "after", "delta"):
            d = row.get(which) if isinstance(row, dict) else None
            if not isinstance(d, dict):
                raise RecordingError(f"{path}: vCPU {i} has no '{which}' stats")
            for name in HALT_STATS:
                if name not in d:
                    raise RecordingError(f"{path}: vCPU {i} '{which}' lacks {name}")
            for name in ("halt_wait_hist", "halt_poll_success_hist", "halt_poll_fail_hist"):
                if not isinstance(d[name], list) or len(d[name]) != 32:
                    raise RecordingError(f"{path}: vCPU {i} '{which}' {name} must have 32 "
                                         f"buckets")
    return stats


def load(path: str | Path, need_trace: bool = False) -> Recording:
    """Read and check a recording folder."""
    path = Path(path)
    if not path.exists():
        raise RecordingError(f"{path}: no such recording folder")
    if not path.is_dir():
        raise RecordingError(f"{path}: not a folder (give the DIR that 'kvmwake kernel "
                             f"record -o DIR' wrote)")
    meta = _json(path / METADATA, "the recording's metadata")
    _check_meta(meta, path / METADATA)
    n = meta["vcpus"]
    wakes = _read_wakes(path / WAKES, n)
    if len(wakes["k"]) != meta["workload"]["wakes"]:
        raise RecordingError(f"{path / WAKES}: {len(wakes['k'])} rows but the workload had "
                             f"{meta['workload']['wakes']} wakes")
    stats = _read_stats(path / STATS, n)
    events = None
    notes = []
    if meta["trace"]["mode"] == "tracefs":
        tp = path / TRACE
        if not tp.exists():
            raise RecordingError(f"{tp}: missing, but metadata says the run was traced")
        try:
            events = read_trace(tp)
        except TraceFormatError as exc:
            raise RecordingError(f"{tp}: {exc}") from None
    elif need_trace:
        raise RecordingError(f"{path}: recorded in stats-only mode "
                             f"({meta['trace'].get('reason', 'no tracefs')}); this needs a trace")
    else:
        notes.append(f"stats-only recording: {meta['trace'].get('reason', '')}")
    cal = None
    if (path / CALIBRATION).exists():
        cal = _json(path / CALIBRATION, "calibration")
    return Recording(path, meta, wakes, stats, events, cal, notes)


def workload_kind(meta: dict) -> str:
    """``"msi"`` (the injector's MSIs; recordings older than the key) or ``"ipi"``."""
    return meta["workload"].get("kind", "msi")


def regenerate_plan(rec: Recording):
    """An ipi recording's plan (``workload.ipi_plan``), drawn again from its parameters
    and checked against the recorded wakes."""
    wl = rec.meta["workload"]
    if workload_kind(rec.meta) != "ipi":
        raise RecordingError(f"{rec.path}: not an ipi recording")
    try:
        plan = ipi_plan(int(wl["seed"]), rec.nvcpus, int(wl["wakes"]), wl["spec"],
                        wl["targets"], int(wl["start_vcpu"]))
    except SpecError as exc:
        raise RecordingError(f"{rec.path / METADATA}: {exc}") from None
    if not (np.array_equal(plan.vcpu, rec.wakes["vcpu"])
            and np.array_equal(plan.index, rec.wakes["index"])
            and np.array_equal(plan.target_ns, rec.wakes["target_ns"])):
        raise RecordingError(f"{rec.path / WAKES}: the wakes differ from the plan that seed "
                             f"{wl['seed']} draws (edited file, or another kvmwake version)")
    return plan


def regenerate_schedule(rec: Recording):
    """The workload's schedule, drawn again from the spec and seed (and checked against
    the recorded targets)."""
    wl = rec.meta["workload"]
    sched = make_schedule(wl["spec"], int(wl["wakes"]), rec.nvcpus, int(wl["seed"]))
    if not (np.array_equal(sched.target_ns, rec.wakes["target_ns"])
            and np.array_equal(sched.vcpu, rec.wakes["vcpu"])):
        raise RecordingError(f"{rec.path / WAKES}: the targets differ from what spec "
                             f"{wl['spec']!r} with seed {wl['seed']} draws (edited file, or "
                             f"another kvmwake version)")
    return sched


def write_json(path: Path, data: dict) -> None:
    def default(o):
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return None if math.isnan(o) else float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=default) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- the recorder's pinning

def pinned_cpus(meta: dict) -> tuple[list, int | None]:
    """(host CPU of each vCPU thread or None, the injector's CPU or None), as the
    recorder pinned them: from ``meta["threads"]`` where present, else
    ``meta["pinning"]``; all None for an unpinned recording."""
    n = int(meta["vcpus"])
    vc: list = [None] * n
    inj = None
    if meta.get("threads"):
        for t in meta["threads"]:
            cpu = t.get("cpu")
            cpu = None if cpu is None or int(cpu) < 0 else int(cpu)
            if t.get("role") == "vcpu" and t.get("vcpu") is not None and 0 <= int(t["vcpu"]) < n:
                vc[int(t["vcpu"])] = cpu
            elif t.get("role") == "injector":
                inj = cpu
        return vc, inj
    pin = meta.get("pinning") or {}
    if pin.get("enabled", False) and meta.get("pinned", True):
        for i, c in enumerate(pin.get("vcpus", [])[:n]):
            vc[i] = None if c is None or int(c) < 0 else int(c)
        c = pin.get("injector")
        inj = None if c is None or int(c) < 0 else int(c)
    return vc, inj


def vcpu_pack(meta: dict) -> bool:
    """The recording's host kernel is the vendor's (its sysctl
    ``kernel.sched_vcpu_pack`` is there and non-zero), whose scheduler packs vCPU
    wake-ups and decides wake-up preemption past delayed sleepers: the simulation
    of the recording then runs ``Host(vcpu_pack=True, preempt_skips_delayed=True)``
    (``simulate.vendor_rules``, ``--host-rules``).  A recording made before the
    recorder kept the scheduler's sysctls says nothing: False, upstream rules."""
    v = (meta.get("sched_sysctls") or {}).get("sched_vcpu_pack", 0)
    return isinstance(v, int) and not isinstance(v, bool) and v != 0


def sim_placement(meta: dict) -> dict:
    """Where the simulation should put the recording's threads, in the terms of
    ``host.create_vm(affinity=...)``, ``vcpu.set_affinity`` and ``host.add_thread``:
    ``{"vm": "pinned" | "all", "vcpus": [cpu per vCPU] | None, "injector": cpu | "all"}``.

    An unpinned recording (``meta["pinned"]`` false, or the recorder's pinning off):
    every thread on every CPU ("all").  A pinned one: ``"pinned"`` where the recorder
    put vCPU g on CPU g % host_cpus (the model's own placement, results unchanged),
    else each vCPU's CPU in ``vcpus``; the injector on its CPU."""
    vc, inj = pinned_cpus(meta)
    if all(c is None for c in vc):
        return {"vm": "all", "vcpus": None, "injector": "all"}
    ncpu = int(meta["host_cpus"])
    cpu_ids = list(meta.get("host_cpu_ids") or range(ncpu))
    index = {c: i for i, c in enumerate(cpu_ids)}     # host CPU id -> the model's CPU
    model = [None if c is None else index.get(c, c % ncpu) for c in vc]
    same = all(c == g % ncpu for g, c in enumerate(model))
    return {"vm": "pinned", "vcpus": None if same else model,
            "injector": "all" if inj is None else index.get(inj, inj % ncpu)}
