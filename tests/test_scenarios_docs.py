"""The tutorials' python code blocks run as written; docs/api.md is up to date."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _blocks(name):
    text = (ROOT / "docs" / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"{name} has no python blocks"
    return blocks


@pytest.mark.parametrize("name", ["tutorial-vmm.md", "tutorial-perf.md"])
def test_tutorial_code_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "tutorial"}
    for i, block in enumerate(_blocks(name)):
        exec(compile(block, f"{name} block {i + 1}", "exec"), ns)   # noqa: S102
    assert capsys.readouterr().out


def test_tutorials_mention_only_real_scenario_names():
    from kvmwake import scenarios
    for name in ("tutorial-vmm.md", "tutorial-perf.md"):
        for m in re.findall(r"built-in `([a-z-]+)`", (ROOT / "docs" / name).read_text()):
            assert m in scenarios.names()


def test_api_md_is_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_api.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr + " (run: python tools/gen_api.py)"
