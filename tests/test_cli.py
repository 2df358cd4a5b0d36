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


# ---------------------------------------------------------------- through the real command line

def _kvmwake(*argv, cwd, timeout=120, **kw):
    import os
    env = dict(os.environ)
    root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "kvmwake", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env, **kw)


def _clean_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "kvmwake: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


SMALL = ["--vcpus", "8", "--host-cpus", "4", "--sim-ms", "1"]


def test_restore_empty_path_is_an_error(tmp_path):
    r = _kvmwake("run", "--restore", "", cwd=tmp_path)
    assert r.returncode == 2 and "empty path" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []         # the default scenario did not run


@pytest.mark.parametrize("opt", ["--json", "--out", "--trace", "--snapshot", "--npz"])
def test_empty_output_paths_are_errors(tmp_path, opt):
    r = _kvmwake("run", "ipi-storm", *SMALL, opt, "", cwd=tmp_path)
    assert r.returncode == 2 and "empty path" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_snapshot_and_restore_say_what_they_do(tmp_path):
    r = _kvmwake("run", "ipi-storm", "--vcpus", "8", "--sim-ms", "3", "--snapshot-at", "1",
                 "--snapshot", "s.kws", "--no-out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "snapshot at virtual time 1.000 ms (1000000 ns) written to s.kws" in r.stderr
    assert (tmp_path / "s.kws").is_file()
    r = _kvmwake("run", "--restore", "s.kws", "--no-out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "restored s.kws (scenario ipi-storm" in r.stderr
    assert "continuing from virtual time 1.000 ms (1000000 ns) to 3.000 ms" in r.stderr
    # options the snapshot fixes cannot apply
    r = _kvmwake("run", "ipi-storm", "--restore", "s.kws", "--vcpus", "8", "--seed", "5",
                 "--no-out", cwd=tmp_path)
    _clean_error(r)
    assert "a SCENARIO, --vcpus, --seed cannot apply" in r.stderr
    for extra in (["--engine", "reference"], ["--host-cpus", "2"]):
        r = _kvmwake("run", "--restore", "s.kws", *extra, "--no-out", cwd=tmp_path)
        _clean_error(r)
        assert extra[0] in r.stderr
    r = _kvmwake("run", "--restore", "missing.kws", cwd=tmp_path)
    _clean_error(r)
    assert "no such file" in r.stderr and not (tmp_path / "kvmwake-out").exists()


@pytest.mark.parametrize("shadow", ["dir", "file"])
def test_builtin_names_are_not_shadowed(tmp_path, shadow):
    """`kvmwake run --out default` made ./default first, which then shadowed the
    built-in; a file named like a built-in did the same."""
    if shadow == "file":
        (tmp_path / "default").write_text("not a scenario")
        r = _kvmwake("run", "default", "--vcpus", "64", "--host-cpus", "8", "--sim-ms", "1",
                     "--no-out", cwd=tmp_path)
    else:
        r = _kvmwake("run", "--vcpus", "64", "--host-cpus", "8", "--sim-ms", "1", "--out",
                     "default", cwd=tmp_path)
        assert (tmp_path / "default" / "summary.json").is_file()
    assert r.returncode == 0, r.stderr
    assert "kvmwake run default" in r.stdout
    # a path is a path: ./default is the file
    if shadow == "file":
        r = _kvmwake("run", "./default", "--no-out", cwd=tmp_path)
        _clean_error(r)
        assert "error: default:1: (syntax)" in r.stderr


@pytest.mark.parametrize("argv", [
    ["run", "no-such-scenario", "--out", "o"],
    ["run", "ipi-storm", "--vcpus", "1025", "--host-cpus", "2", "--sim-ms", "1", "--out", "o"],
    ["run", "ipi-storm", *SMALL, "--snapshot-at", "1"],
    ["run", "ipi-storm", *SMALL, "--snapshot-at", "5", "--snapshot", "s.kws", "--out", "o"],
    ["run", "ipi-storm", "--vcpus", "1025", "--host-cpus", "2", "--sim-ms", "1"],
    ["run", "ipi-storm", *SMALL, "--restore", "x.kws"],
])
def test_failed_runs_create_nothing(tmp_path, argv):
    r = _kvmwake(*argv, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []         # no empty output folder, no kvmwake-out


def test_sim_without_unit_is_an_error_through_the_cli(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text((scenarios.BUILTIN_DIR / "ipi-storm.toml").read_text()
                 .replace('sim = "100ms"', "sim = 20"))
    r = _kvmwake("run", str(f), "--no-out", cwd=tmp_path)
    _clean_error(r)
    assert f"{f}:3: sim: 20 has no unit" in r.stderr


def test_out_of_memory_is_a_runtime_error(tmp_path):
    import resource

    def limit():
        # a little above what importing kvmwake and numpy takes (about 150 MB)
        resource.setrlimit(resource.RLIMIT_AS, (240 << 20, 240 << 20))
    r = _kvmwake("run", "ipi-storm", "--vcpus", "16000000", "--host-cpus", "8", "--sim-ms",
                 "1", "--no-out", cwd=tmp_path, preexec_fn=limit)
    _clean_error(r, code=1)
    assert "out of memory" in r.stderr


@pytest.mark.parametrize("argv", [["scenarios"], ["--help"], ["run", "--help"]])
def test_closed_pipe_is_quiet(tmp_path, argv):
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parent.parent)
    p = subprocess.Popen([sys.executable, "-m", "kvmwake", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    p.stdout.close()                              # like `| head` that has had enough
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    # 141 = 128 + SIGPIPE; argparse's help swallows the write error itself and exits 0
    assert p.returncode in ((0, 141) if "--help" in argv else (141,)), (p.returncode, err)
    assert err == "", err


def test_help_names_the_model_policies_and_tutorials(tmp_path):
    for argv in (["--help"], ["run", "--help"]):
        r = _kvmwake(*argv, cwd=tmp_path)
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        for words in ("SYSTEM_SUSPEND", "VMM polic", "docs/tutorial-perf.md",
                      "docs/tutorial-vmm.md", "docs/outputs.md"):
            assert words in text, (argv, words)


def test_outputs_schema_is_documented(tmp_path):
    """docs/outputs.md lists every key of summary.json and every .npz array, and the npz
    names the stats matrix's columns."""
    import numpy as np
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "outputs.md").read_text()
    r = _kvmwake("run", "suspend-cycle", "--vcpus", "8", "--host-cpus", "4", "--sim-ms", "2",
                 "--json", "s.json", "--npz", "a.npz", "--trace", "t", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    for key in list(s) + list(s["stats"]) + list(s["wake_latency_ns"]) + list(s["vmm"]):
        assert f"`{key}`" in doc, key
    a = np.load(tmp_path / "a.npz")
    for name in a.files:
        assert f"`{name}`" in doc or name in ("halt_attempted_poll", "halt_poll_invalid",
                                              "halt_wakeup", "halt_poll_success_ns",
                                              "halt_poll_fail_ns"), name
    cols = list(a["stats_columns"])
    assert len(cols) == a["stats"].shape[1] == 105
    assert cols[3] == "halt_wakeup" and cols[-1] == "wfi_exit_stat" and cols[103] == "blocking"
    assert (a["stats"][:, cols.index("halt_wakeup")] == a["halt_wakeup"]).all()
    assert (a["stats"][:, cols.index("halt_wait_hist[5]")] == a["halt_wait_hist"][:, 5]).all()
