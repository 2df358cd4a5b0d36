"""What `kvmwake run` writes: JSON summary, .npz arrays, trace, PNG plot, the default
kvmwake-out/ directory; the progress bar; Ctrl-C writes what was computed and exits 130."""

import importlib
import json
import re
import sys
import types

import numpy as np
import pytest

from kvmwake.outputs import plots as outputs
from kvmwake.outputs import tracefmt

cli = importlib.import_module("kvmwake.cli.main")
from kvmwake.model import LAT_BUCKETS, NR_STATS, STAT_COUNTERS

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--vcpus", "16", "--host-cpus", "4", "--sim-ms", "4", "--seed", "2"]
needs_mpl = pytest.mark.skipif(not outputs.have_matplotlib(), reason="matplotlib not installed")


@needs_mpl
def test_every_output_file_is_written_and_reads_back(tmp_path, capsys):
    j, n, t, p = (tmp_path / x for x in ("s.json", "a.npz", "vm0.trace", "p.png"))
    rc = cli.main(["run", "suspend-cycle", *SMALL, "--json", str(j), "--npz", str(n),
                   "--trace", str(t), "--plot", str(p)])
    assert rc == 0
    s = json.loads(j.read_text())
    assert s["vcpus"] == 16 and s["npz"] == str(n) and s["plot"] == str(p)
    a = np.load(n)
    assert a["stats"].shape == (16, NR_STATS) and a["vcpu_id"].tolist() == list(range(8)) * 2
    assert a["vm"].tolist() == [0] * 8 + [1] * 8
    assert a["halt_wait_hist"].shape == (16, 32)
    assert a["latency_hist"].shape == (LAT_BUCKETS,) and a["latency_bucket_low_ns"][0] == 0
    for name in STAT_COUNTERS:
        assert int(a[name].sum()) == s["stats"][name]
    assert int(a["latency_hist"].sum()) == s["wake_latency_ns"]["count"]
    assert int(a["sim_ns"]) == 4_000_000
    assert p.read_bytes()[:8] == PNG_MAGIC
    assert all(e.comm.endswith("/KVM") for e in tracefmt.read(t))
    out = capsys.readouterr().out
    assert f"plot written to {p}" in out and f"arrays written to {n}" in out


def test_plain_run_writes_kvmwake_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--vcpus", "64", "--host-cpus", "8", "--sim-ms", "3"]) == 0
    d = tmp_path / "kvmwake-out"
    s = json.loads((d / "summary.json").read_text())
    assert s["scenario"] == "default" and s["trace"] == "kvmwake-out/vm0.trace"
    assert tracefmt.read(d / "vm0.trace")
    out = capsys.readouterr().out
    assert "summary written to kvmwake-out/summary.json" in out
    assert "trace of VM 0 written to kvmwake-out/vm0.trace" in out
    if outputs.have_matplotlib():
        assert (d / "plot.png").read_bytes()[:8] == PNG_MAGIC
        assert "plot written to kvmwake-out/plot.png" in out
    else:
        assert "no plot: matplotlib is not installed" in out


def test_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(outputs, "have_matplotlib", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", *SMALL]) == 0
    assert not (tmp_path / "kvmwake-out" / "plot.png").exists()
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
    assert cli.main(["run", *SMALL, "--plot", str(tmp_path / "p.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_no_out_and_explicit_outputs_write_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", *SMALL, "-q", "--no-out"]) == 0
    assert cli.main(["run", *SMALL, "-q", "--npz", "x.npz"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
    assert cli.main(["run", *SMALL, "-q", "--out", "d"]) == 0
    assert {p.name for p in (tmp_path / "d").iterdir()} >= {"summary.json", "vm0.trace"}


def test_ctrl_c_writes_what_was_computed_and_exits_130(tmp_path, monkeypatch, capsys):
    chunks = []

    def interrupt(host, now, end):
        chunks.append(now)
        if now >= 10_000_000:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_on_chunk", interrupt)
    j, n = tmp_path / "s.json", tmp_path / "a.npz"
    rc = cli.main(["run", "ipi-storm", "--vcpus", "8", "--sim-ms", "64", "--json", str(j),
                   "--npz", str(n)])
    assert rc == 130
    stop = chunks[-1]
    s = json.loads(j.read_text())
    assert s["interrupted"] is True and s["sim_ns"] == stop and 10_000_000 <= stop < 64_000_000
    a = np.load(n)
    assert int(a["sim_ns"]) == stop and int(a["halt_wakeup"].sum()) > 0
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and f"interrupted at {stop / 1e6:,.3f} ms" in captured.out
    # The stats are those of a run to where it stopped (chunks do not change results).
    monkeypatch.setattr(cli, "_on_chunk", lambda *a: None)
    k = tmp_path / "k.json"
    assert cli.main(["run", "ipi-storm", "--vcpus", "8", "--sim-ms", repr(stop / 1e6), "-q",
                     "--json", str(k)]) == 0
    assert json.loads(k.read_text())["stats"] == s["stats"]


class _FakeHost:
    """A host whose run() costs ``ns_cost`` wall seconds per virtual ns (on a fake clock)."""

    def __init__(self, ns_cost, clock):
        self.now, self.ns_cost, self.clock = 0, ns_cost, clock

    def run(self, t):
        self.clock[0] += (t - self.now) * self.ns_cost
        self.now = t


@pytest.mark.parametrize("ns_cost,expect", [(1e-7, 1_000_000), (1e-13, 100_000_000)])
def test_chunks_are_sized_by_wall_time(monkeypatch, ns_cost, expect):
    """Ctrl-C waits for the running chunk: chunks adapt to take ~CHUNK_WALL_S (0.1 s)
    each, at most 1/RUN_CHUNKS of the run, instead of 64 chunks of many seconds."""
    clock = [0.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])
    ends = []
    monkeypatch.setattr(cli, "_on_chunk", lambda h, now, end: ends.append(now))
    span = 6_400_000_000
    host = _FakeHost(ns_cost, clock)
    cli.run_chunked(host, span)
    steps = np.diff([0] + ends)
    assert host.now == span and ends[-1] == span
    assert steps[0] == span // (cli.RUN_CHUNKS * 64)
    # After a few chunks each takes ~0.1 s of wall time (or is capped at span / 64).
    assert all(expect / 2 <= st <= expect * 2 for st in steps[6:-1]), steps[:12]
    assert steps.max() <= span // cli.RUN_CHUNKS


def test_atomic_write_keeps_the_old_file_on_interrupt(tmp_path):
    from kvmwake.outputs import atomic
    f = tmp_path / "summary.json"
    f.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(f) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half of the new")
            raise KeyboardInterrupt
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    atomic.write_text(f, "new")
    assert f.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


# -- Ctrl-C to a real `kvmwake run` on a terminal ----------------------------------------------

def _pty_run(argv, cwd, on_output=None, timeout=240):
    """Run ``python -m kvmwake`` with stderr on a pseudo-terminal (120 columns); call
    ``on_output(proc, text_so_far)`` as stderr grows.  Returns (rc, stdout, stderr)."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time
    m, s = pty.openpty()
    fcntl.ioctl(s, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kvmwake", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=s, stdin=subprocess.DEVNULL)
    os.close(s)
    err = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([m], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(m, 65536)
                except OSError:
                    chunk = b""
                if not chunk and proc.poll() is not None:
                    break
                err += chunk
                if on_output is not None:
                    on_output(proc, err.decode(errors="replace"))
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError("kvmwake run did not finish")
        out = proc.stdout.read().decode()
        return proc.wait(), out, err.decode(errors="replace")
    finally:
        os.close(m)
        proc.stdout.close()


LONG = ["run", "ipi-storm", "--vcpus", "64", "--sim-ms", "100000", "--seed", "3",
        "--trace-capacity", "20000"]


def _check_complete(out_dir):
    """Every file in out_dir is whole: no temporary leftovers, each one parses."""
    names = sorted(p.name for p in out_dir.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    s = json.loads((out_dir / "summary.json").read_text())
    if "vm0.trace" in names:
        text = (out_dir / "vm0.trace").read_text()
        assert text.endswith("\n") and tracefmt.parse(text) is not None
    if "a.npz" in names:
        assert int(np.load(out_dir / "a.npz")["sim_ns"]) == s["sim_ns"]
    if "plot.png" in names:
        data = (out_dir / "plot.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and data.endswith(b"IEND\xaeB`\x82")
    return names, s


def test_sigint_mid_run_writes_the_partial_summary_and_exits_130(tmp_path):
    out = tmp_path / "o"
    sent = []

    def interrupt(proc, err):
        if not sent and "simulating" in err:
            proc.send_signal(__import__("signal").SIGINT)
            sent.append(err)

    rc, stdout, err = _pty_run(LONG + ["--out", str(out), "--npz", str(out / "a.npz")],
                               tmp_path, interrupt)
    assert sent, err
    assert rc == 130, err
    names, s = _check_complete(out)
    assert {"summary.json", "vm0.trace", "a.npz"} <= set(names)
    assert s["interrupted"] is True and 0 < s["sim_ns"] < 100_000 * 1_000_000
    assert s["stats"]["halt_wakeup"] > 0
    assert "interrupted at" in stdout and "kvmwake: interrupted; wrote what was computed" in err


@needs_mpl
def test_second_sigint_while_writing_leaves_complete_files_only(tmp_path):
    import signal
    out = tmp_path / "o"
    sent = []

    def interrupt(proc, err):
        if not sent and "simulating" in err:
            proc.send_signal(signal.SIGINT)
            sent.append("run")
        elif len(sent) == 1 and re.search(r"writing (?!summary)", err.split("simulating")[-1]):
            proc.send_signal(signal.SIGINT)
            sent.append("write")

    rc, stdout, err = _pty_run(LONG + ["--out", str(out), "--npz", str(out / "a.npz"),
                                       "--perfetto", str(out / "p.json")], tmp_path, interrupt)
    assert sent == ["run", "write"], err
    assert rc == 130
    assert "kvmwake: interrupted while writing: kept " in err
    names, s = _check_complete(out)
    # The summary is written first, so it survives; what came after may be missing.
    assert "summary.json" in names and s["interrupted"] is True
    missing = err.split("not written: ")[1].split("\r")[0].split("\n")[0]
    for p in missing.split(", "):
        if p.startswith(str(out)):
            assert not __import__("os").path.exists(p), p


def test_no_progress_on_a_terminal_with_no_progress_or_quiet(tmp_path):
    for flag in ("--no-progress", "--quiet"):
        rc, stdout, err = _pty_run(["run", "ipi-storm", "--vcpus", "64", "--sim-ms", "1500",
                                    "--no-out", flag], tmp_path)
        assert rc == 0 and "simulating" not in err and "building" not in err, err


class _FakeBar:
    made: list = []

    def __init__(self, **kw):
        self.kw, self.n, self.closed = kw, 0.0, False
        _FakeBar.made.append(self)

    def update(self, d):
        self.n += d

    def refresh(self):
        pass

    def set_description(self, desc):
        self.kw["desc"] = desc

    def close(self):
        self.closed = True


@pytest.mark.parametrize("tty,quiet,shown", [(True, False, True), (True, True, False),
                                             (True, "--no-progress", False),
                                             (False, False, False)])
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty, quiet, shown):
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=_FakeBar))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    _FakeBar.made.clear()
    argv = ["run", *SMALL, "--no-out"] + ([quiet if isinstance(quiet, str) else "-q"]
                                          if quiet else [])
    assert cli.main(argv) == 0
    assert bool(_FakeBar.made) == shown
    if shown:
        # One line per phase: build, simulation, summary, writing; all closed.
        descs = [b.kw["desc"] for b in _FakeBar.made]
        assert descs[0].startswith("building default") and "summarizing" in descs
        assert all(b.closed and b.kw["file"] is sys.stderr for b in _FakeBar.made)
        bar = next(b for b in _FakeBar.made if b.kw["desc"] == "simulating")
        assert bar.kw["delay"] > 0 and abs(bar.n - 4.0) < 1e-9


def test_no_tqdm_no_bar(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)      # import tqdm -> ImportError
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli._progress(10, quiet=False) is None


@needs_mpl
def test_plot_leaves_the_results_alone_and_splits_cpu_time(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli.main(["run", "default", *SMALL, "-q", "--json", str(a)]) == 0
    assert cli.main(["run", "default", *SMALL, "-q", "--json", str(b),
                     "--plot", str(tmp_path / "p.png")]) == 0
    sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("stats", "halts", "wake_latency_ns"):
        assert sa[key] == sb[key]
    # The timeline queues every poll window's end as an event; without it a poll
    # end nobody sees needs none (docs/design.md, "Time and events").
    assert sa["events"] <= sb["events"]
    from kvmwake import scenarios
    host, end, _ = scenarios.build("default", vcpus=16, host_cpus=4, sim_ns=4_000_000)
    if not outputs.enable_cpu_time(host):
        pytest.skip("this engine keeps no state timeline")
    host.run(end)
    split = outputs.cpu_time_split(host)
    t0, t1 = split["window_ns"]
    assert split["running"] + split["polling"] + split["idle"] == 4 * (t1 - t0)
    assert split["running"] > 0
