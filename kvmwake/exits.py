"""What ``vcpu.run()`` returns: the ``struct kvm_run`` fields of one exit."""

from __future__ import annotations

from dataclasses import dataclass, field

from .uapi import ExitReason, SystemEventType

#: ucall kinds carried by an MMIO exit (tools/testing/selftests/kvm: UCALL_SYNC, UCALL_DONE).
UCALL_SYNC = 1
UCALL_DONE = 2
UCALL_NAMES = {UCALL_SYNC: "SYNC", UCALL_DONE: "DONE"}


@dataclass(frozen=True)
class SystemEvent:
    """``run->system_event``: type, ndata and the first ``ndata`` data words."""

    type: SystemEventType
    ndata: int = 0
    data: tuple = field(default_factory=tuple)

    @property
    def flags(self) -> int:
        """The old ``flags`` member, aliased to ``data[0]`` (valid only if ndata > 0)."""
        return self.data[0] if self.ndata else 0


@dataclass(frozen=True)
class Exit:
    """One return of ``KVM_RUN``.

    ``reason`` is a ``uapi.ExitReason``.  For ``SYSTEM_EVENT``,
    ``system_event`` holds the event; for ``MMIO`` (the selftests' ucall
    channel) ``ucall`` is ``"SYNC"`` or ``"DONE"`` and ``value`` the synced
    value; ``INTR`` is a signal's ``-EINTR`` return with ``KVM_EXIT_INTR``
    (``immediate_exit`` raises ``KvmError(EINTR)`` instead: no exit reason);
    ``INTERNAL_ERROR`` means the guest's PC held no code.
    """

    reason: ExitReason
    system_event: SystemEvent | None = None
    ucall: str | None = None
    value: int | None = None
    time_ns: int = 0

    def __repr__(self):
        extra = ""
        if self.system_event is not None:
            extra = f", {self.system_event.type.name}, ndata={self.system_event.ndata}"
        elif self.ucall is not None:
            extra = f", ucall {self.ucall}" + (f" {self.value:#x}" if self.value is not None else "")
        return f"Exit({self.reason.name}{extra} at {self.time_ns} ns)"


def from_engine(d: dict) -> Exit:
    """Build an ``Exit`` from the engine's exit record."""
    reason = ExitReason(d["reason"])
    if reason == ExitReason.SYSTEM_EVENT:
        ndata = d["ndata"]
        ev = SystemEvent(SystemEventType(d["type"]), ndata, tuple([d["data0"]][:ndata]))
        return Exit(reason, system_event=ev, time_ns=d["time"])
    if reason == ExitReason.MMIO:
        kind = UCALL_NAMES[d["ucall"]]
        return Exit(reason, ucall=kind, value=d["value"] if kind == "SYNC" else None,
                    time_ns=d["time"])
    return Exit(reason, time_ns=d["time"])
