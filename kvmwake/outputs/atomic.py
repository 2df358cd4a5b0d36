"""Atomic output files: write to a temporary file beside the target, then ``os.replace``.

A reader (or a second Ctrl-C) never sees a half-written ``summary.json``,
trace, ``.npz`` or PNG: the target is either the previous file (or absent) or
the complete new one.  A target that exists and is not a regular file (a
FIFO, ``/dev/stdout``) is written in place, as there is nothing to replace.
"""

from __future__ import annotations

import contextlib
import os

#: Marker in the names of the temporary files (``.NAME.PID.kvmwake-tmp``).
TMP_MARK = ".kvmwake-tmp"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path to write; on success it becomes ``path`` (``os.replace``),
    on any exception (KeyboardInterrupt too) it is removed and ``path`` is untouched."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        yield path
        return
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{base}.{os.getpid()}{TMP_MARK}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
