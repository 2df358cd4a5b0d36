"""The test suite's shared setup: every test is checked to create nothing in the
current folder or the repository root (``_cwd_guard``), and Hypothesis keeps no
example database there."""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _cwd_guard  # noqa: E402

_cwd_guard.no_hypothesis_database()
GUARD = _cwd_guard.Guard()
_writes_nothing_in_cwd_or_root = GUARD.fixture()
