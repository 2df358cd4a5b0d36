"""Capture ``kvm_vcpu_wakeup`` and ``kvm_halt_poll_ns`` from tracefs, and leave tracing as found.

``TraceCapture`` mounts tracefs at ``/sys/kernel/tracing`` when no tracefs is
mounted (and unmounts it again on ``close``), then records into a private
ftrace *instance* (``instances/kvmwake-<pid>``): its own ring buffer, event
enables, ``tracing_on`` and ``trace_clock``, so the global tracing state is
never touched; ``close`` removes the instance.  Where instances cannot be
made it falls back to the top-level buffer, saving ``tracing_on``, the two
events' ``enable``, ``trace_clock`` and ``buffer_size_kb`` first and writing
them back on ``close`` (clearing the top-level buffer cannot be undone;
``fallback_note`` says so).

The clock is ``mono``, so the trace's timestamps are ``CLOCK_MONOTONIC``,
the clock the injector and the vCPU threads timestamp with.

Any failure to mount or set up raises ``TracefsUnavailable`` with the
reason; the recorder then runs in stats-only mode and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import time
from pathlib import Path

DEFAULT_ROOT = Path("/sys/kernel/tracing")
DEBUGFS_ROOT = Path("/sys/kernel/debug/tracing")
EVENTS = ("kvm/kvm_vcpu_wakeup", "kvm/kvm_halt_poll_ns")
INSTANCE_PREFIX = "kvmwake-"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class TracefsUnavailable(RuntimeError):
    """tracefs (or the kvm events) cannot be used here; ``str()`` is the reason."""


def tracefs_mounts(mounts: str = "/proc/self/mounts") -> list[Path]:
    """Mount points of tracefs (and debugfs ``.../tracing``) in the order listed."""
    out = []
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs":
            out.append(Path(parts[1].replace("\\040", " ")))
        elif len(parts) >= 3 and parts[2] == "debugfs":
            p = Path(parts[1]) / "tracing"
            if (p / "trace").exists():
                out.append(p)
    return out


def _mount_tracefs(target: Path) -> None:
    rc = _libc.mount(b"nodev", os.fsencode(target), b"tracefs", 0, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise TracefsUnavailable(f"cannot mount tracefs on {target}: {os.strerror(err)}")


def _umount(target: Path) -> bool:
    return _libc.umount2(os.fsencode(target), 0) == 0


def _read(p: Path) -> str:
    return p.read_text()


def _write(p: Path, text: str) -> None:
    with open(p, "w") as fh:
        fh.write(text)


def _current_clock(text: str) -> str:
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else text.split()[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TraceCapture:
    """Record the kvm halt tracepoints; ``with TraceCapture() as tc: tc.start() ... tc.read()``.

    Parameters
    ----------
    root : path, optional
        A tracefs directory to use instead of finding or mounting one.
    clock : str
        ``trace_clock`` for the capture (default ``mono``).
    buffer_kb : int
        Per-CPU ring-buffer size of the instance, KiB.
    use_instance : bool
        Record in a private instance (default) or in the top-level buffer.
    """

    def __init__(self, root: str | os.PathLike | None = None, clock: str = "mono",
                 buffer_kb: int = 8192, use_instance: bool = True,
                 events: tuple[str, ...] = EVENTS):
        self.clock = clock
        self.buffer_kb = buffer_kb
        self.events = events
        self.mounted_by_us: Path | None = None
        self.instance: Path | None = None
        self._saved: dict[Path, str] = {}
        self.fallback_note = ""
        self.dir: Path | None = None
        self._closed = False
        try:
            self.root = self._find_root(Path(root) if root is not None else None)
            for ev in events:
                if not (self.root / "events" / ev / "enable").exists():
                    raise TracefsUnavailable(
                        f"{self.root}/events/{ev} does not exist (kvm tracepoints missing: "
                        f"is the kvm module loaded?)")
            self._clean_stale_instances()
            if use_instance:
                self._make_instance()
            if self.instance is None:
                self.dir = self.root
                self.fallback_note = ("recorded in the top-level ftrace buffer (no instance "
                                      "could be made); its earlier contents were cleared")
            if self.clock not in _read(self.dir / "trace_clock").replace("[", " ").replace(
                    "]", " ").split():
                raise TracefsUnavailable(f"trace clock {self.clock!r} is not offered by "
                                         f"{self.dir}/trace_clock")
        except TracefsUnavailable:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise TracefsUnavailable(f"tracefs setup failed: {exc}") from None

    # -- setup ---------------------------------------------------------------------------

    def _find_root(self, root: Path | None) -> Path:
        if root is not None:
            if not (root / "trace").exists():
                raise TracefsUnavailable(f"{root} is not a tracefs directory (no 'trace' file)")
            return root
        for p in tracefs_mounts():
            if (p / "trace").exists():
                return p
        target = DEFAULT_ROOT
        if not target.is_dir():
            raise TracefsUnavailable(f"{target} does not exist (kernel without tracefs?)")
        if os.geteuid() != 0:
            raise TracefsUnavailable("tracefs is not mounted and mounting it needs root")
        _mount_tracefs(target)
        self.mounted_by_us = target
        if not (target / "trace").exists():
            raise TracefsUnavailable(f"mounted tracefs on {target} but it has no 'trace' file")
        return target

    def _clean_stale_instances(self) -> None:
        inst = self.root / "instances"
        if not inst.is_dir():
            return
        for d in inst.iterdir():
            if d.name.startswith(INSTANCE_PREFIX):
                try:
                    pid = int(d.name[len(INSTANCE_PREFIX):].split("-")[0])
                except ValueError:
                    continue
                if not _pid_alive(pid):
                    self._remove_instance(d)

    def _make_instance(self) -> None:
        inst = self.root / "instances"
        if not inst.is_dir():
            return
        name = f"{INSTANCE_PREFIX}{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
        try:
            os.mkdir(inst / name)
        except OSError:
            return
        self.instance = inst / name
        self.dir = self.instance

    def _save(self, p: Path) -> None:
        if p not in self._saved:
            self._saved[p] = _read(p).strip()

    # -- capture -------------------------------------------------------------------------

    def start(self) -> None:
        """Clear the buffer, set the clock, enable the events, switch tracing on."""
        d = self.dir
        if self.instance is None:
            self._save(d / "tracing_on")
            self._save(d / "trace_clock")
            self._save(d / "buffer_size_kb")
            for ev in self.events:
                self._save(d / "events" / ev / "enable")
        _write(d / "tracing_on", "0")
        _write(d / "trace_clock", self.clock)
        try:
            _write(d / "buffer_size_kb", str(self.buffer_kb))
        except OSError:
            pass                                    # keep the size it has
        for ev in self.events:
            _write(d / "events" / ev / "enable", "1")
        _write(d / "trace", "")                    # clear
        _write(d / "tracing_on", "1")

    def stop(self) -> None:
        """Switch tracing off (the buffer is kept for ``read``)."""
        if self.dir is not None:
            _write(self.dir / "tracing_on", "0")

    def read(self) -> str:
        return _read(self.dir / "trace")

    def lost_events(self) -> int:
        """Events the ring buffer overwrote or dropped (from ``per_cpu/*/stats``)."""
        lost = 0
        for stats in (self.dir / "per_cpu").glob("cpu*/stats"):
            try:
                text = _read(stats)
            except OSError:
                continue
            for key in ("overrun", "dropped events"):
                m = re.search(rf"^{key}: (\d+)", text, re.M)
                if m:
                    lost += int(m.group(1))
        return lost

    # -- teardown ------------------------------------------------------------------------

    @staticmethod
    def _remove_instance(d: Path) -> None:
        try:
            _write(d / "tracing_on", "0")
        except OSError:
            pass
        for _ in range(50):
            try:
                os.rmdir(d)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return
                time.sleep(0.01)

    def close(self) -> list[str]:
        """Tracing off, the instance removed (or the saved state written back), tracefs
        unmounted if we mounted it.  Returns what could not be restored (normally [])."""
        if self._closed:
            return []
        self._closed = True
        problems = []
        if self.instance is not None:
            for ev in self.events:
                try:
                    _write(self.instance / "events" / ev / "enable", "0")
                except OSError:
                    pass
            self._remove_instance(self.instance)
            if self.instance.exists():
                problems.append(f"could not remove {self.instance}")
        elif self.dir is not None:
            try:
                _write(self.dir / "tracing_on", "0")
            except OSError as exc:
                problems.append(f"tracing_on: {exc}")
            for p, value in reversed(list(self._saved.items())):
                try:
                    _write(p, _current_clock(value) if p.name == "trace_clock" else value)
                except OSError as exc:
                    problems.append(f"{p}: {exc}")
        if self.mounted_by_us is not None and self._others_recording():
            problems.append(f"left tracefs mounted on {self.mounted_by_us}: another kvmwake "
                            f"recording is using it")
            self.mounted_by_us = None
        if self.mounted_by_us is not None:
            for _ in range(20):
                if _umount(self.mounted_by_us):
                    break
                time.sleep(0.02)
            else:
                problems.append(f"could not unmount {self.mounted_by_us}")
            self.mounted_by_us = None
        return problems

    def _others_recording(self) -> bool:
        inst = self.root / "instances"
        if not inst.is_dir():
            return False
        for d in inst.iterdir():
            if d.name.startswith(INSTANCE_PREFIX) and d != self.instance:
                try:
                    pid = int(d.name[len(INSTANCE_PREFIX):].split("-")[0])
                except ValueError:
                    continue
                if pid != os.getpid() and _pid_alive(pid):
                    return True
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def state_snapshot(root: Path | None = None) -> dict:
    """The global tracing state a capture must leave unchanged (for tests)."""
    mounts = tracefs_mounts()
    root = root or (mounts[0] if mounts else None)
    out = {"mounts": [str(m) for m in mounts]}
    if root is None or not (root / "trace").exists():
        return out
    out["tracing_on"] = _read(root / "tracing_on").strip()
    out["trace_clock"] = _current_clock(_read(root / "trace_clock"))
    for ev in EVENTS:
        p = root / "events" / ev / "enable"
        if p.exists():
            out[ev] = _read(p).strip()
    inst = root / "instances"
    out["instances"] = sorted(d.name for d in inst.iterdir()) if inst.is_dir() else []
    return out
