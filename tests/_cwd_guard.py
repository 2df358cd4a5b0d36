"""A guard the test suites load from their conftest: a test that creates anything in
the current folder or the repository root fails (tests write only to temporary
folders: ``tmp_path``).  It once wrote ``./kvmwake-out`` over the output of the
README's first command."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Caches that pytest and Python themselves keep (not written by a test).
IGNORED = {".pytest_cache", "__pycache__", ".benchmarks"}


def entries(d) -> set:
    try:
        return {n for n in os.listdir(d) if n not in IGNORED}
    except OSError:
        return set()


class Guard:
    def __init__(self, folders=None):
        self.before = {str(d): entries(d) for d in (folders or {ROOT, pathlib.Path.cwd()})}

    def new_entries(self) -> dict:
        out = {}
        for d, before in self.before.items():
            new = entries(d) - before
            if new:
                out[d] = sorted(new)
                before |= new                    # report each once
        return out

    def fixture(self):
        @pytest.fixture(autouse=True)
        def _writes_nothing_in_cwd_or_root():
            yield
            new = self.new_entries()
            if new:
                where = "; ".join(f"{sorted(v)} in {d}" for d, v in new.items())
                pytest.fail(f"this test created {where}: tests write only to temporary "
                            f"folders (tmp_path)", pytrace=False)
        return _writes_nothing_in_cwd_or_root


def no_hypothesis_database() -> None:
    """Hypothesis keeps its example database and caches in ./.hypothesis: not in the
    repository.  Its home goes to a temporary folder, and no database is kept."""
    try:
        from hypothesis import settings
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    import atexit
    import shutil
    import tempfile
    home = tempfile.mkdtemp(prefix="kvmwake-hypothesis-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    set_hypothesis_home_dir(home)
    settings.register_profile("kvmwake-tests", database=None)
    settings.load_profile("kvmwake-tests")
