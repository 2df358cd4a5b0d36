"""The guard in tests/conftest.py: a test that writes into the current folder fails."""

import subprocess
import sys
import textwrap

import _cwd_guard


def test_guard_sees_new_entries(tmp_path):
    g = _cwd_guard.Guard({tmp_path})
    assert g.new_entries() == {}
    (tmp_path / "kvmwake-out").mkdir()
    assert g.new_entries() == {str(tmp_path): ["kvmwake-out"]}
    assert g.new_entries() == {}                  # reported once


def test_a_test_writing_into_the_cwd_fails(tmp_path):
    """Run a small suite with this conftest from a scratch folder: the test that writes
    ./kvmwake-out fails, the one that writes into tmp_path passes."""
    suite = tmp_path / "suite"
    suite.mkdir()
    guard = (_cwd_guard.ROOT / "tests" / "_cwd_guard.py").read_text()
    (suite / "_cwd_guard.py").write_text(guard)
    (suite / "conftest.py").write_text((_cwd_guard.ROOT / "tests" / "conftest.py").read_text())
    (suite / "test_x.py").write_text(textwrap.dedent("""
        import os
        def test_bad():
            os.makedirs("kvmwake-out", exist_ok=True)
        def test_good(tmp_path):
            (tmp_path / "kvmwake-out").mkdir()
    """))
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(suite)], capture_output=True, text=True, cwd=work, timeout=120)
    assert r.returncode != 0 and "1 error" in r.stdout, r.stdout + r.stderr
    assert "ERROR at teardown of test_bad" in r.stdout and "test_good" not in r.stdout
    assert "this test created ['kvmwake-out']" in r.stdout
