"""Smoke test of ``bench/scheduler_cost.py`` (the scheduler's cost per halt on
``ipi-storm``): every setting runs, in fresh processes, deterministically, and the
report names the EEVDF/FIFO ratio.  The figures themselves are in docs/results.md."""

from __future__ import annotations

import scheduler_cost


def test_scheduler_cost_runs_every_setting(capsys):
    assert scheduler_cost.main(["--vcpus", "16", "--sim-ms", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for sched, aff in scheduler_cost.SETTINGS:
        assert any(line.split()[:2] == [sched, aff] for line in out.splitlines())
    assert "EEVDF / FIFO (pinned) per halt" in out
