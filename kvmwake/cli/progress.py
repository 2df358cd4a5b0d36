"""Progress of ``kvmwake run``'s long phases on stderr, on a terminal only.

Each phase (building the VMs, simulating, summarizing, writing the outputs)
gets a tqdm line while it runs; one without a known size (the build) shows
its elapsed time, refreshed by a small thread.  Nothing is shown when stderr
is not a terminal, with ``--quiet`` or ``--no-progress``, or when tqdm cannot
be imported.  A line appears only once its phase has lasted ``DELAY_S``, so
short runs print nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading

#: Seconds a phase runs before its line appears.
DELAY_S = 0.5
#: Seconds between refreshes of a phase with no known size.
REFRESH_S = 0.25


def enabled(quiet: bool, no_progress: bool = False) -> bool:
    """Show progress? Only on a terminal, and only when not asked to keep quiet."""
    if quiet or no_progress:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(on: bool, **kw):
    """A tqdm bar on stderr (``kw`` passed on), or None when off or tqdm is missing."""
    if not on:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    kw.setdefault("delay", DELAY_S)
    kw.setdefault("leave", False)
    kw.setdefault("file", sys.stderr)
    return tqdm(**kw)


class _Ticker:
    """Keeps a size-less bar's elapsed time moving."""

    def __init__(self, b):
        self.b, self.stop = b, threading.Event()
        self.t = threading.Thread(target=self._loop, name="kvmwake-progress", daemon=True)
        self.t.start()

    def _loop(self):
        while not self.stop.wait(REFRESH_S):
            try:
                if self.b.format_dict["elapsed"] >= DELAY_S:
                    self.b.refresh()
            except Exception:   # a closed bar: nothing more to show
                return

    def close(self):
        self.stop.set()
        self.t.join()


@contextlib.contextmanager
def phase(on: bool, desc: str):
    """A phase of unknown size: ``desc`` and its elapsed time, while it runs."""
    b = bar(on, desc=desc, total=None, bar_format="{desc} [{elapsed}]")
    if b is None:
        yield
        return
    ticker = _Ticker(b)
    try:
        yield
    finally:
        ticker.close()
        b.close()
