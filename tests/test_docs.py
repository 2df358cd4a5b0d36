"""Every ```python and ```sh block of README.md and docs/tutorial-*.md runs as written,
in order, in one session per document: from another folder (a temporary one, kvmwake
from this source tree) and from the repository root (a temporary copy of it, where
``python`` and ``kvmwake`` import the source tree itself).

A block that cannot run here says so right above it, in the document:
``<!-- skip: reason -->`` (installing, a Dask cluster, full-size runs).  Python
blocks share one namespace; ``sh`` blocks run with ``bash -e`` and a ``kvmwake``
command (``python -m kvmwake``) on the PATH.  The documents name this file.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/outputs.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("tutorial-*.md"))]
BLOCK = re.compile(r"(?:<!--\s*skip:\s*(?P<skip>.*?)\s*-->\s*\n)?^```(?P<lang>python|sh)\n"
                   r"(?P<code>.*?)^```", re.S | re.M)

DRIVER = r'''
import json, os, subprocess, sys
blocks = json.loads(sys.stdin.read())
ns = {"__name__": "__doc__"}
for i, (lang, code, line) in enumerate(blocks):
    where = f"{sys.argv[1]}:{line}"
    print(f"--- {where} ({lang})", flush=True)
    if lang == "python":
        exec(compile(code, where, "exec"), ns)
    else:
        r = subprocess.run(["bash", "-e", "-c", code])
        if r.returncode:
            sys.exit(f"{where}: the sh block exited {r.returncode}")
    sys.stdout.flush()
'''


def blocks(doc: str) -> list:
    """[(lang, code, line, skip reason or None)] of a document, in order."""
    text = (ROOT / doc).read_text()
    return [(m["lang"], m["code"], text.count("\n", 0, m.start("code")), m["skip"])
            for m in BLOCK.finditer(text)]


def test_every_doc_has_runnable_blocks_and_reasons():
    for doc in DOCS:
        bs = blocks(doc)
        assert bs, doc
        assert any(skip is None for *_, skip in bs), doc
        assert all(skip is None or skip.strip() for *_, skip in bs), doc


def test_skip_marker_is_read():
    text = "a\n<!-- skip: needs a cluster -->\n```sh\nkvmwake x\n```\n```python\nprint(1)\n```\n"
    found = [(m["lang"], m["skip"]) for m in BLOCK.finditer(text)]
    assert found == [("sh", "needs a cluster"), ("python", None)]


def _shim(bindir: pathlib.Path) -> None:
    bindir.mkdir()
    k = bindir / "kvmwake"
    k.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kvmwake "$@"\n')
    k.chmod(0o755)
    py = bindir / "python"
    py.symlink_to(sys.executable)


def _copy_repo(dst: pathlib.Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "build", ".git", "*.c", ".hypothesis",
                                    ".pytest_cache", "kvmwake-out", ".benchmarks", "*.html")
    for name in ("kvmwake", "docs", "tools"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("README.md", "pyproject.toml", "setup.py"):
        shutil.copy2(ROOT / name, dst / name)


@pytest.mark.parametrize("where", ["other-folder", "repo-root"])
@pytest.mark.parametrize("doc", DOCS)
def test_doc_blocks_run(doc, where, tmp_path):
    run = [(lang, code, line) for lang, code, line, skip in blocks(doc) if skip is None]
    _shim(tmp_path / "bin")
    env = dict(os.environ)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    if where == "repo-root":
        cwd = tmp_path / "repo"
        cwd.mkdir()
        _copy_repo(cwd)
        env.pop("PYTHONPATH", None)              # the copy's own kvmwake, from its root
    else:
        cwd = tmp_path / "elsewhere"
        cwd.mkdir()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"))
                                            if p)
    r = subprocess.run([sys.executable, "-c", DRIVER, doc], input=json.dumps(run),
                       capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert r.returncode == 0, f"{doc} ({where}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if doc == "docs/tutorial-perf.md":           # the copied scenario runs under its new name
        assert "kvmwake run big-host:" in r.stdout, r.stdout[-3000:]
    if where == "repo-root":
        import kvmwake
        probe = subprocess.run([sys.executable, "-c", "import kvmwake; print(kvmwake.__file__)"],
                               capture_output=True, text=True, cwd=cwd, env=env)
        assert str(cwd) in probe.stdout, probe     # it ran the copy, not this tree
        assert kvmwake.__file__
