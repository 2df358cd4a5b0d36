"""kvmwake's exceptions."""

from __future__ import annotations

import errno as _errno
import os

from .guest import ProgramError
from .reference import EngineError

__all__ = ["KvmError", "ProgramError", "EngineError", "ScenarioError", "SnapshotError",
           "DeadlockError"]


class KvmError(OSError):
    """A call that the kernel would reject, with the kernel's errno.

    ``err.errno`` is the errno value (``errno.EINVAL`` ...).  The object the
    call was made on is left exactly as it was.
    """

    def __init__(self, errno: int, message: str):
        super().__init__(errno, f"{_errno.errorcode.get(errno, errno)}: {message}")
        self.message = message

    def __str__(self):
        return f"[{os.strerror(self.errno)}] {self.message}"


class ScenarioError(ValueError):
    """A scenario (built-in or from a file) is invalid; the message says where."""


class SnapshotError(ValueError):
    """A snapshot cannot be read or restored; the message says what is wrong."""


class DeadlockError(RuntimeError):
    """A VMM's threads wait on each other through the model: the clock is held by a
    thread in userspace that makes no progress while others wait for it."""
