"""The kvmwake command line: run, scenarios, kernel replay; errors exit 2 with a message."""

import json
import pathlib
import subprocess
import sys

import pytest

from kvmwake import cli, scenarios
from kvmwake.outputs import tracefmt

DATA = pathlib.Path(__file__).parent / "data"


def test_run_ipi_storm_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = cli.main(["run", "ipi-storm", "--vcpus", "16", "--sim-ms", "5", "--json", str(out)])
    assert rc == 0
    s = json.loads(out.read_text())
    for key in ("halts", "events", "wall_s", "sim_ns", "stats", "wake_latency_ns",
                "halts_per_s", "events_per_s"):
        assert key in s
    assert s["sim_ns"] == 5_000_000 and s["vcpus"] == 16 and s["arch"] == "x86"
    assert s["halts"] > 0 and s["events"] > s["halts"]
    assert s["stats"]["halt_exits"] >= s["halts"]
    assert len(s["stats"]["halt_wait_hist"]) == 32
    text = capsys.readouterr().out
    assert "halt_successful_poll" in text and "halts per wall second" in text
    assert "p50" in text


def test_run_default_small_with_trace(tmp_path, capsys):
    trace = tmp_path / "vm0.trace"
    rc = cli.main(["run", "--vcpus", "128", "--host-cpus", "8", "--sim-ms", "3",
                   "--trace", str(trace), "--seed", "7"])
    assert rc == 0
    events = tracefmt.read(trace)
    assert events and all(e.comm.endswith("/KVM") for e in events)
    assert "kvmwake run default" in capsys.readouterr().out


def test_engines_agree_through_the_cli(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["run", "ipi-storm", "--vcpus", "8", "--sim-ms", "3", "--seed", "3", "-q"]
    assert cli.main(common + ["--json", str(a)]) == 0
    assert cli.main(common + ["--engine", "reference", "--json", str(b)]) == 0
    sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("halts", "events", "stats", "wake_latency_ns"):
        assert sa[key] == sb[key]


def test_json_to_stdout(capsys):
    assert cli.main(["run", "ipi-storm", "--vcpus", "4", "--sim-ms", "1", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["vcpus"] == 4


def test_scenarios_lists_builtins(capsys):
    assert cli.main(["scenarios"]) == 0
    out = capsys.readouterr().out
    for name in scenarios.names():
        assert name in out


def test_kernel_replay_of_shared_traces(capsys):
    rc = cli.main(["kernel", "replay", str(DATA / "mixed-2vcpu-default.trace"),
                   "--halt-poll-ns", "200000", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mismatched"] == 0 and r["halts"] > 0


@pytest.mark.parametrize("argv", [
    ["run", "--vcpus", "0"], ["run", "--vcpus", "-4"], ["run", "--sim-ms", "nan"],
    ["run", "--host-cpus", "x"], ["run", "--engine", "turbo"], ["bogus"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_scenario_is_a_clean_error(capsys):
    assert cli.main(["run", "no-such-scenario"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmwake: error:") and "unknown scenario" in err
    assert "Traceback" not in err


def test_oversized_vm_split_and_bad_sizes(capsys):
    # ipi-storm splits more than 1024 vCPUs into several VMs.
    host, _, _ = scenarios.build("ipi-storm", vcpus=1500, host_cpus=8)
    assert [vm.nr_vcpus for vm in host.vms] == [1024, 476]
    # A remainder VM of one vCPU cannot wake "another" vCPU.
    assert cli.main(["run", "ipi-storm", "--vcpus", "1025", "--host-cpus", "2"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_unwritable_json_path_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["run", "ipi-storm", "--vcpus", "4", "--sim-ms", "1", "-q",
                     "--json", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert "kvmwake: error:" in capsys.readouterr().err


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvmwake", "scenarios"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "ipi-storm" in r.stdout


def test_run_writes_perfetto_trace(tmp_path):
    out = tmp_path / "p.json"
    assert cli.main(["run", "ipi-storm", "--vcpus", "8", "--sim-ms", "2", "-q",
                     "--perfetto", str(out)]) == 0
    events = json.loads(out.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 for e in spans)
    assert {e["name"] for e in spans} <= {"RUNNING", "POLLING", "BLOCKED", "RUNNABLE"}


def test_sweep_is_mounted(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["sweep", "--help"])
    assert ei.value.code == 0
    assert "--scheduler" in capsys.readouterr().out
