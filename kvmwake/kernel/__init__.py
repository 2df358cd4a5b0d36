"""Drive and read the real KVM: micro-VMs, tracefs, binary stats, trace replay, comparison.

``available()`` says whether this machine can record (``/dev/kvm`` usable,
x86-64, the capabilities the micro-VM needs) and why not; ``tracefs`` is
reported apart, since a recording without it still works (stats only).

Modules: ``kvm`` (ioctl wrappers), ``microvm`` (the halt-loop guests: MSI
and IPI), ``stats`` (``KVM_GET_STATS_FD`` reader), ``tracefs`` (capture of
the tracepoints), ``workload`` (idle-time specs, the IPI plan), ``record``,
``schedtrace`` (the scheduler's tracepoints: preemption and migration rates),
``calibrate``, ``compare``, ``simulate``, ``analysis``, ``replay``, ``cli``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Availability:
    """``bool(a)`` is whether records can be made; ``reason`` says why not."""

    ok: bool
    reason: str
    tracefs: bool = False
    tracefs_reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def available(dev: str | None = None) -> Availability:
    """Can this machine record the real kernel?  No side effects (nothing is mounted)."""
    from .kvm import DEV_KVM, Kvm, KvmIoctlError
    from ..uapi import Cap
    dev = dev or DEV_KVM
    tr_ok, tr_reason = tracefs_status()
    if platform.machine() not in ("x86_64", "AMD64"):
        return Availability(False, f"the micro-VM is x86-64; this machine is "
                                   f"{platform.machine()}", tr_ok, tr_reason)
    if not os.path.exists(dev):
        return Availability(False, f"{dev} does not exist (no KVM on this machine)", tr_ok,
                            tr_reason)
    try:
        kvm = Kvm(dev)
    except PermissionError:
        return Availability(False, f"{dev}: permission denied (run as root or join the kvm "
                                   f"group)", tr_ok, tr_reason)
    except OSError as exc:
        return Availability(False, f"{dev}: {exc.strerror or exc}", tr_ok, tr_reason)
    try:
        missing = [c.name for c in (Cap.IRQCHIP, Cap.SIGNAL_MSI, Cap.BINARY_STATS_FD,
                                    Cap.MP_STATE) if not kvm.check_extension(c)]
    except KvmIoctlError as exc:
        return Availability(False, f"KVM_CHECK_EXTENSION failed: {exc}", tr_ok, tr_reason)
    finally:
        kvm.close()
    if missing:
        return Availability(False, "KVM lacks " + ", ".join("KVM_CAP_" + m for m in missing),
                            tr_ok, tr_reason)
    try:
        from . import _inject  # noqa: F401
    except ImportError as exc:
        return Availability(False, f"the native recorder kvmwake.kernel._inject is not built "
                                   f"({exc})", tr_ok, tr_reason)
    return Availability(True, "", tr_ok, tr_reason)


def tracefs_status() -> tuple[bool, str]:
    """(usable, why not) for tracefs, without mounting anything."""
    from .tracefs import DEFAULT_ROOT, EVENTS, tracefs_mounts
    for root in tracefs_mounts():
        if all((root / "events" / e / "enable").exists() for e in EVENTS):
            return True, f"mounted at {root}"
        return False, f"tracefs at {root} has no kvm halt events (kvm module not loaded?)"
    if not DEFAULT_ROOT.is_dir():
        return False, f"{DEFAULT_ROOT} does not exist (kernel without tracefs)"
    if os.geteuid() != 0:
        return False, "tracefs is not mounted and mounting it needs root"
    return True, f"not mounted; will be mounted on {DEFAULT_ROOT} for a recording"


__all__ = ["available", "Availability", "tracefs_status"]
