"""The pictures kvmwake draws: plot.png of ``kvmwake run`` and tradeoff.png of
``kvmwake sweep``.  Each is rendered to a temporary folder and checked as a PNG of the
expected size; the matplotlib Figure is checked for what it says (title, units, markers,
no empty panel)."""

from __future__ import annotations

import struct

import pytest

pytest.importorskip("matplotlib")

from kvmwake import scenarios  # noqa: E402
from kvmwake.outputs import plots, summary as _summary  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def _run(name="ipi-storm", vcpus=16, sim_ns=20_000_000, seed=4, trace_capacity=1 << 16):
    host, sim_ns, sc = scenarios.build(name, vcpus=vcpus, host_cpus=4, sim_ns=sim_ns, seed=seed,
                                       trace_capacity=trace_capacity)
    plots.enable_cpu_time(host)
    host.run(sim_ns)
    s = _summary.summarize(host, scenario=sc.name, scenario_file=None, engine="core", seed=seed,
                           sim_ns=sim_ns, build_s=0.0, wall_s=1.0)
    return host, sim_ns, s


def test_plot_png_says_what_was_run(tmp_path):
    host, sim_ns, s = _run()
    fig = plots.plot_figure(host, sim_ns, s)
    title = fig.get_suptitle()
    for part in ("ipi-storm", "16 ", "vCPUs", "4 host CPUs", "seed 4", "20.000 ms simulated"):
        assert part in title, (part, title)
    lat, poll, cpu = fig.axes
    # Latency: log axis in us, p50/p90/p99 markers with their values, precision stated.
    assert lat.get_xscale() == "log" and "us" in lat.get_xlabel()
    labels = [t.get_text() for t in lat.get_legend().get_texts()]
    assert [lb.split()[0] for lb in labels] == ["p50", "p90", "p99"]
    assert all(lb.endswith(("ns", "us", "ms")) for lb in labels)
    assert "±1.6%" in lat.get_legend().get_title().get_text()
    assert len(lat.lines) == 3                       # the three axvlines
    # halt_poll_ns over time: lines (ipi-storm polls), units.
    assert poll.lines and "(us)" in poll.get_ylabel() and "(ms)" in poll.get_xlabel()
    # CPU time: bars with their %, and the window said.
    assert len(cpu.patches) == 3 and "over the whole run" in cpu.get_xlabel()
    assert "%" in cpu.get_ylabel()
    for ax in fig.axes:
        assert ax.get_title()
    path = tmp_path / "plot.png"
    plots.write_plot(host, path, sim_ns, summary=s)
    w, h = _png_size(path)
    assert (w, h) == (round(plots.PLOT_SIZE[0] * plots.PLOT_DPI),
                      round(plots.PLOT_SIZE[1] * plots.PLOT_DPI))


def test_no_empty_panel_without_poll_changes_or_wakeups(tmp_path):
    # No tracing: no halt_poll_ns records, and the panel says so instead of staying empty.
    host, sim_ns, s = _run(trace_capacity=0)
    fig = plots.plot_figure(host, sim_ns, s)
    poll = fig.axes[1]
    assert not poll.lines and any("no halt_poll_ns changes" in t for t in _texts(poll))
    # A host that never ran: no wake-ups, said in the latency panel.
    host2, sim2, _ = scenarios.build("ipi-storm", vcpus=2, host_cpus=1, sim_ns=1, seed=0)
    fig2 = plots.plot_figure(host2, 0, None)
    assert any("no wake-ups" in t for t in _texts(fig2.axes[0]))
    assert "2 " in fig2.get_suptitle() and "0.000 ms simulated" in fig2.get_suptitle()
    plots.write_plot(host2, tmp_path / "p.png", 0)
    _png_size(tmp_path / "p.png")


def test_cpu_time_window_is_explained_when_the_timeline_wrapped():
    host, sim_ns, sc = scenarios.build("ipi-storm", vcpus=16, host_cpus=4, sim_ns=20_000_000,
                                       seed=1)
    plots.enable_cpu_time(host, capacity=2_000)   # keeps the newest 2,000 state changes only
    host.run(sim_ns)
    xl = plots.plot_figure(host, sim_ns).axes[2].get_xlabel()
    assert "over the last" in xl and "keeps only the newest" in xl


def _rows():
    rows = []
    for hp, cpu, p50 in ((0, 0.0, 6_000), (20_000, 0.02, 5_900), (200_000, 0.25, 5_800)):
        for k in range(3):
            rows.append({"halt_poll_ns": hp, "vcpus": 8, "scenario": "ipi-storm", "arch": "x86",
                         "host_cpus": 8, "sim_ns": 5_000_000, "seed": k,
                         "poll_cpu_fraction": cpu + 0.01 * k, "wake_p50_ns": p50 + 10 * k,
                         "wake_p99_ns": 3 * p50 + 30 * k})
    return rows


def test_tradeoff_png_says_what_was_swept(tmp_path):
    rows = _rows()
    fig = plots.tradeoff_figure(rows, ["halt_poll_ns", "vcpus"])
    title = fig.get_suptitle()
    for part in ("ipi-storm", "8 vCPUs on 8 host CPUs", "5 ms simulated", "vcpus=8",
                 "3 points x 3 seed(s)", "95% CI"):
        assert part in title, (part, title)
    ax = fig.axes[0]
    assert "(us" in ax.get_ylabel() and "%" in ax.get_xlabel()
    # one error bar per point and percentile, with a seed spread (non-zero)
    assert len(ax.containers) == 6
    segs = ax.containers[0].lines[2][1].get_segments()
    assert segs and segs[0][1][1] > segs[0][0][1]
    # labels name only what varies
    notes = _texts(ax)
    assert sorted(notes) == ["halt_poll_ns=0", "halt_poll_ns=20000", "halt_poll_ns=200000"]
    path = tmp_path / "tradeoff.png"
    plots.write_tradeoff(rows, ["halt_poll_ns", "vcpus"], path)
    assert _png_size(path) == (round(plots.TRADEOFF_SIZE[0] * plots.TRADEOFF_DPI),
                               round(plots.TRADEOFF_SIZE[1] * plots.TRADEOFF_DPI))


def test_mean_ci():
    m, h = plots._mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(h - 4.302653 * 1.0 / 3 ** 0.5) < 1e-9      # t(0.975, 2 df)
    assert plots._mean_ci([5.0]) == (5.0, 0.0)
