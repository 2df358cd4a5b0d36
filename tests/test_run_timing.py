"""``kvmwake run`` prints the wall time of the whole command split into start-up,
build, run, summary and outputs, the phases add up to the total, and summary.json's
``timing`` holds the same figures (no timed assertions: only sums and agreement)."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from kvmwake import cli
from kvmwake.outputs import summary as _summary

cli_main = importlib.import_module("kvmwake.cli.main")   # the module (cli.main is a function)
ROOT = pathlib.Path(__file__).resolve().parent.parent
PHASES = ("startup_s", "build_s", "run_s", "summary_s", "outputs_s")
LINE = re.compile(r"wall time ([\d,.]+) s in all: start-up ([\d,.]+) \+ build ([\d,.]+) \+ "
                  r"run ([\d,.]+) \+ summary ([\d,.]+) \+ outputs ([\d,.]+) s")


def _kvmwake(tmp_path, *argv):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "kvmwake", *argv], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=300)
    return r, time.perf_counter() - t


def _ms(x: str) -> int:
    return round(1000 * float(x.replace(",", "")))


def _printed(text: str) -> list:
    """[total, start-up, build, run, summary, outputs] in ms, from the printed line."""
    m = LINE.search(text)
    assert m, text
    return [_ms(x) for x in m.groups()]


def _check(timing: dict) -> None:
    assert set(timing) == set(PHASES) | {"total_s"}
    assert all(timing[k] >= 0 for k in timing)
    assert sum(round(1000 * timing[k]) for k in PHASES) == round(1000 * timing["total_s"])


def test_the_printed_split_adds_up_through_the_command_line(tmp_path):
    out = tmp_path / "out"
    r, outside = _kvmwake(tmp_path, "run", "ipi-storm", "--vcpus", "16", "--sim-ms", "3",
                          "--out", str(out), "--npz", str(tmp_path / "a.npz"))
    assert r.returncode == 0, r.stderr
    total, *parts = _printed(r.stdout)
    assert sum(parts) == total
    assert total <= round(1000 * outside) + 1    # the process outlived the command
    assert parts[0] > 0                          # loading kvmwake (the imports) counts
    # The old line keeps its meaning: the simulation's wall time, and the build's.
    m = re.search(r"simulated 3\.000 ms in ([\d.]+) s wall \(build ([\d.]+) s\)", r.stdout)
    assert m, r.stdout
    s = json.loads((out / "summary.json").read_text())
    _check(s["timing"])
    # summary.json, written last, holds the printed figures.
    assert [round(1000 * s["timing"][k]) for k in ("total_s",) + PHASES] == [total, *parts]
    assert abs(s["timing"]["run_s"] - s["wall_s"]) <= 0.0015
    assert abs(s["timing"]["build_s"] - s["build_s"]) <= 0.0015
    assert abs(s["timing"]["run_s"] - float(m.group(1))) <= 0.0015
    assert s["npz"] and s["trace"]


def test_json_on_stdout_carries_the_split(tmp_path):
    r, _ = _kvmwake(tmp_path, "run", "ipi-storm", "--vcpus", "8", "--sim-ms", "2",
                    "--json", "-")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    _check(s["timing"])
    assert s["timing"]["startup_s"] > 0


def test_no_files_still_prints_the_split(tmp_path):
    r, _ = _kvmwake(tmp_path, "run", "ipi-storm", "--vcpus", "8", "--sim-ms", "2", "--no-out")
    assert r.returncode == 0, r.stderr
    total, *parts = _printed(r.stdout)
    assert sum(parts) == total
    assert not any(tmp_path.iterdir())


def test_restored_run_prints_the_split(tmp_path):
    snap = tmp_path / "s.snap"
    r, _ = _kvmwake(tmp_path, "run", "ipi-storm", "--vcpus", "8", "--sim-ms", "4",
                    "--snapshot-at", "2", "--snapshot", str(snap), "--no-out")
    assert r.returncode == 0, r.stderr
    r, _ = _kvmwake(tmp_path, "run", "--restore", str(snap), "--json", "-")
    assert r.returncode == 0, r.stderr
    _check(json.loads(r.stdout)["timing"])


def test_in_process_commands_start_at_their_call(tmp_path, capsys):
    """main(argv) from Python counts from its call, not from when kvmwake was loaded."""
    path = tmp_path / "s.json"
    t = time.perf_counter()
    assert cli.main(["run", "ipi-storm", "--vcpus", "4", "--sim-ms", "1", "--json",
                     str(path)]) == 0
    outside = time.perf_counter() - t
    s = json.loads(path.read_text())
    _check(s["timing"])
    assert s["timing"]["total_s"] <= outside + 0.001
    total, *parts = _printed(capsys.readouterr().out)
    assert [total, *parts] == [round(1000 * s["timing"][k]) for k in ("total_s",) + PHASES]


def test_timing_splits_marks_into_whole_milliseconds():
    t = cli_main.timing([10.0, 10.2004, 10.5, 12.0006, 12.1], 13.0)
    assert t == {"total_s": 3.0, "startup_s": 0.2, "build_s": 0.3, "run_s": 1.501,
                 "summary_s": 0.099, "outputs_s": 0.9}
    assert sum(round(1000 * t[k]) for k in PHASES) == round(1000 * t["total_s"]) == 3000


@pytest.mark.parametrize("timing, text", [
    ({"total_s": 1.5, "startup_s": 0.25, "build_s": 0.5, "run_s": 0.5, "summary_s": 0.125,
      "outputs_s": 0.125},
     "wall time 1.500 s in all: start-up 0.250 + build 0.500 + run 0.500 + summary 0.125 + "
     "outputs 0.125 s"),
])
def test_format_timing(timing, text):
    assert _summary.format_timing(timing) == text
