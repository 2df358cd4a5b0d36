"""What `kvmwake run` writes: JSON summary, .npz arrays, trace, PNG plot, the default
kvmwake-out/ directory; the progress bar; Ctrl-C writes what was computed and exits 130."""

import importlib
import json
import sys
import types

import numpy as np
import pytest

from kvmwake.outputs import plots as outputs
from kvmwake.outputs import tracefmt

cli = importlib.import_module("kvmwake.cli.main")
from kvmwake.model import LAT_BUCKETS, NR_STATS, STAT_COUNTERS

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
        if len(chunks) == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_on_chunk", interrupt)
    j, n = tmp_path / "s.json", tmp_path / "a.npz"
    rc = cli.main(["run", "ipi-storm", "--vcpus", "8", "--sim-ms", "64", "--json", str(j),
                   "--npz", str(n)])
    assert rc == 130
    s = json.loads(j.read_text())
    assert s["interrupted"] is True and s["sim_ns"] == chunks[-1] == 10_000_000
    a = np.load(n)
    assert int(a["sim_ns"]) == 10_000_000 and int(a["halt_wakeup"].sum()) > 0
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and "interrupted at 10.000 ms" in captured.out
    # The stats are those of a run to where it stopped.
    monkeypatch.setattr(cli, "_on_chunk", lambda *a: None)
    k = tmp_path / "k.json"
    assert cli.main(["run", "ipi-storm", "--vcpus", "8", "--sim-ms", "10", "-q",
                     "--json", str(k)]) == 0
    assert json.loads(k.read_text())["stats"] == s["stats"]


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
                                             (False, False, False)])
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty, quiet, shown):
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=_FakeBar))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    _FakeBar.made.clear()
    argv = ["run", *SMALL, "--no-out"] + (["-q"] if quiet else [])
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
    for key in ("stats", "events", "halts", "wake_latency_ns"):
        assert sa[key] == sb[key]
    from kvmwake import scenarios
    host, end, _ = scenarios.build("default", vcpus=16, host_cpus=4, sim_ns=4_000_000)
    if not outputs.enable_cpu_time(host):
        pytest.skip("this engine keeps no state timeline")
    host.run(end)
    split = outputs.cpu_time_split(host)
    t0, t1 = split["window_ns"]
    assert split["running"] + split["polling"] + split["idle"] == 4 * (t1 - t0)
    assert split["running"] > 0
