"""``kvmwake run --plot``: wake latency, ``halt_poll_ns`` over time and host CPU time, as a PNG.

``write_plot(host, path, sim_ns)`` (needs matplotlib: ``pip install
"kvmwake[plot]"``) draws the wake-latency histogram, ``halt_poll_ns`` over
time for a few vCPUs of VM 0 (from its ``kvm_halt_poll_ns`` trace records;
the host needs a trace capacity), and host CPU time split into guest
(a vCPU thread running), polling and idle from the host's state timeline
(``host.timeline_totals()``; ``enable_cpu_time(host)`` switches it on before
the run, keeping the newest ``PLOT_TIMELINE_CAPACITY`` records, so on long
runs the panel covers the end of the run and says which window).  Without a
timeline only the polling share is known exactly (``halt_poll_success_ns +
halt_poll_fail_ns``) and the panel says so instead of guessing the rest.

Every picture says what was run in its title (scenario, vCPUs, VMs, host
CPUs, seed, simulated time), in us/ms with log axes where the values span
decades: the latency histogram is drawn as % of wake-ups per 1/8 octave with
p50/p90/p99 markers and the histogram's precision (±1.6%); a panel with
nothing to draw says why instead of staying empty.  ``plot_figure`` and
``tradeoff_figure`` return the matplotlib Figure (tests inspect it);
``write_tradeoff`` draws a sweep's ``tradeoff.png`` (polling CPU cost against
wake latency, mean and 95% confidence interval over seeds).
"""

from __future__ import annotations

import numpy as np

from ..model import LAT_BUCKETS, LAT_SUB, STAT_COUNTERS, lat_bucket_low
from . import stats as _stats


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


#: Timeline records ``kvmwake run --plot`` keeps for the CPU-time panel (the newest).
PLOT_TIMELINE_CAPACITY = 1 << 18


def enable_cpu_time(host, capacity: int = PLOT_TIMELINE_CAPACITY) -> bool:
    """Switch on the host's state timeline (before it runs) if the engine has one."""
    enable = getattr(host, "enable_timeline", None)
    if enable is None or getattr(host, "timeline_capacity", 0):
        return bool(getattr(host, "timeline_capacity", 0))
    try:
        enable(capacity)
    except ValueError:         # it has recorded already
        return False
    return True


def cpu_time_split(host) -> dict | None:
    """Host CPU time over the timeline's recorded window, summed over the host CPUs:
    ``{"window_ns": (t0, now), "running": ns, "polling": ns, "idle": ns}``; None when
    the host keeps no timeline.  "running" is a vCPU thread on the CPU (guest code
    and KVM's work for it)."""
    if not getattr(host, "timeline_capacity", 0) or not hasattr(host, "timeline_totals"):
        return None
    t = host.timeline_totals()
    return {"window_ns": (int(t["t0"]), int(t["now"])),
            "running": int(np.sum(t["running_ns"], dtype=np.uint64)),
            "polling": int(np.sum(t["polling_ns"], dtype=np.uint64)),
            "idle": int(np.sum(t["idle_ns"], dtype=np.uint64))}


#: Display bins per power of two on the latency panel (8 of the histogram's 64 sub-buckets
#: each; equal widths on the log axis).
PLOT_BINS_PER_OCTAVE = 8
#: Figure size (inches) and resolution of plot.png and tradeoff.png.
PLOT_SIZE, PLOT_DPI = (17.0, 5.2), 90
TRADEOFF_SIZE, TRADEOFF_DPI = (9.0, 6.0), 110


def _run_title(host, sim_ns: int, summary: dict | None) -> str:
    """What was run, for a figure's title."""
    s = summary or {}
    nr = s.get("vcpus", sum(vm.nr_vcpus for vm in host.vms))
    vms = len(host.vms)
    head = f"kvmwake run {s['scenario']}: " if s.get("scenario") else "kvmwake: "
    seed = s.get("seed", getattr(host, "seed", None))
    engine = s.get("engine", getattr(host, "engine_name", None))
    t = (f"{head}{nr:,} {host.arch} vCPUs in {vms:,} VM{'s' if vms != 1 else ''} on "
         f"{host.host_cpus:,} host CPUs, seed {seed}, {sim_ns / 1e6:,.3f} ms simulated"
         f"{f', engine {engine}' if engine else ''}")
    if s.get("interrupted"):
        t += " (interrupted: results up to there)"
    return t


def _latency_panel(ax, hist) -> None:
    from . import stats as _stats
    hist = np.asarray(hist, dtype=np.uint64)
    total = int(hist.sum())
    ax.set_title("wake latency (wake-up to guest entry)")
    ax.set_xlabel("latency (us, log scale)")
    ax.set_ylabel(f"% of wake-ups per 1/{PLOT_BINS_PER_OCTAVE} octave")
    if not total:
        ax.text(0.5, 0.5, "no wake-ups", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log")
        return
    # Regroup the 64 sub-buckets per power of two into PLOT_BINS_PER_OCTAVE display bins
    # (buckets below 64 ns are single values: group them by the same octaves).
    step = LAT_SUB // PLOT_BINS_PER_OCTAVE
    nz = np.nonzero(hist)[0]
    edges, heights = [], []
    i = int(nz[0])
    i -= i % step if i >= LAT_SUB else 0
    last = int(nz[-1])
    while i <= last:
        j = i + (step if i >= LAT_SUB else max(1, min(step, LAT_SUB - i)))
        lo = lat_bucket_low(i)
        edges.append(lo)
        heights.append(int(hist[i:j].sum()))
        i = j
    edges.append(lat_bucket_low(i) if i < LAT_BUCKETS else 2 * edges[-1])
    x = np.maximum(np.array(edges, dtype=np.float64), 1.0) / 1e3
    y = 100.0 * np.array(heights, dtype=np.float64) / total
    ax.stairs(y, x, fill=True, alpha=0.35, color="C0")
    ax.stairs(y, x, color="C0")
    ax.set_xscale("log")
    lat = _stats.latency_percentiles(hist)
    top = float(y.max())
    for k, color in (("p50", "C2"), ("p90", "C1"), ("p99", "C3")):
        v = max(lat[k], 1) / 1e3
        ax.axvline(v, color=color, linestyle="--", linewidth=1.2,
                   label=f"{k} {_stats.format_ns(lat[k])}")
    ax.set_ylim(0, top * 1.15)
    ax.legend(fontsize="small", loc="upper right",
              title=f"{total:,} wake-ups, ±{100 * lat['rel_error']:.1f}%",
              title_fontsize="small")


def _poll_panel(ax, host, sim_ns: int, nr_vcpus_shown: int) -> None:
    series: dict = {}
    if host.vms:
        # Read the records as arrays (no event objects: a big trace has ~10^6 of them).
        from .tracefmt import KIND_HALT_POLL_NS
        recs = host.vms[0].trace_records()
        recs = recs[recs["kind"] == KIND_HALT_POLL_NS]
        for vid, ts, new in zip(recs["vcpu_id"].tolist(), recs["ts"].tolist(),
                                recs["a"].tolist()):
            series.setdefault(vid, []).append((ts, new))
    # The vCPUs whose halt_poll_ns changed most often, each line to the end of the run.
    shown = sorted(sorted(series, key=lambda v: (-len(series[v]), v))[:nr_vcpus_shown])
    title = "halt_poll_ns over time, VM 0"
    if shown:
        title += f" (vCPUs {', '.join(map(str, shown))}" + \
            (f"; {len(series)} changed)" if len(series) > len(shown) else ")")
        for k, vid in enumerate(shown):
            pts = series[vid] + [(max(sim_ns, series[vid][-1][0]), series[vid][-1][1])]
            ax.step([t / 1e6 for t, _ in pts], [v / 1e3 for _, v in pts], where="post",
                    label=f"vCPU {vid} ({len(series[vid])} changes)",
                    linewidth=max(1.0, 3.0 - 0.7 * k), alpha=0.85)
        ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no halt_poll_ns changes\n(no kvm_halt_poll_ns records: the poll "
                "window never moved,\nor tracing was off; kvmwake run --plot records them)",
                ha="center", va="center", fontsize="small",
                transform=ax.transAxes)
        ax.set_xlim(0, max(sim_ns, 1) / 1e6)
        ax.set_yticks([])
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("virtual time (ms)")
    ax.set_ylabel("halt_poll_ns (us)")


def _cpu_panel(ax, host, sim_ns: int) -> None:
    split = cpu_time_split(host)
    if split and split["window_ns"][1] > split["window_ns"][0]:
        t0, t1 = split["window_ns"]
        span = host.host_cpus * (t1 - t0)
        names = ["running", "polling", "idle"]
        vals = [100 * split[k] / span for k in names]
        bars = ax.bar(["guest\n(vCPU thread running)", "halt polling", "idle"], vals,
                      color=["C0", "C1", "C7"])
        whole = t0 == 0 and t1 >= sim_ns
        window = ("the whole run" if whole else
                  f"the last {(t1 - t0) / 1e6:,.3f} ms ({t0 / 1e6:,.3f}-{t1 / 1e6:,.3f} ms): "
                  "the state timeline keeps only the newest changes")
        ax.set_xlabel(f"over {window}, {host.host_cpus:,} host CPUs", wrap=True)
    else:
        total = max(1, host.host_cpus * sim_ns)
        rows = host.stats_array(copy=False)
        polling = float(rows[:, STAT_COUNTERS.index("halt_poll_success_ns")].sum()) + \
            float(rows[:, STAT_COUNTERS.index("halt_poll_fail_ns")].sum())
        vals = [100 * polling / total, 100 * (total - polling) / total]
        bars = ax.bar(["halt polling", "guest, switches\nand idle (not separated)"], vals,
                      color=["C1", "C7"])
        ax.set_xlabel(f"over the whole run ({sim_ns / 1e6:,.3f} ms), {host.host_cpus:,} host "
                      "CPUs; no state timeline, so only polling is known exactly")
    ax.bar_label(bars, fmt="%.1f%%", fontsize="small")
    ax.set_ylim(0, max(100.0, max(vals) * 1.1))
    ax.set_ylabel("% of host CPU time")
    ax.set_title("host CPU time")


def plot_figure(host, sim_ns: int, summary: dict | None = None, nr_vcpus_shown: int = 4):
    """The figure of ``plot.png`` (a matplotlib Figure, not yet saved): a title saying
    what was run, the wake-latency histogram with its p50/p90/p99, ``halt_poll_ns``
    over time for a few vCPUs of VM 0, and host CPU time over a stated window."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    fig.suptitle(_run_title(host, sim_ns, summary))
    _latency_panel(axes[0], host.latency_histogram())
    _poll_panel(axes[1], host, sim_ns, nr_vcpus_shown)
    _cpu_panel(axes[2], host, sim_ns)
    return fig


def write_plot(host, path, sim_ns: int, nr_vcpus_shown: int = 4,
               summary: dict | None = None) -> None:
    """Write ``plot_figure(...)`` to ``path`` as a PNG."""
    fig = plot_figure(host, sim_ns, summary, nr_vcpus_shown)
    fig.savefig(path, format="png", dpi=PLOT_DPI)


def _mean_ci(vals) -> tuple:
    """Mean and the half-width of its 95% confidence interval (``stats.mean_ci``; 0 for
    one value)."""
    st = _stats.mean_ci(vals)
    return st["mean"], st["ci95"] or 0.0


def tradeoff_figure(rows: list, names: list):
    """The figure of a sweep's ``tradeoff.png``: host CPU spent polling against wake
    latency p50 and p99, one point per parameter assignment: the mean over its seeds
    with 95% confidence intervals as error bars (both axes); the title says the
    scenario, its size, the simulated time and the seeds."""
    from matplotlib.figure import Figure
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[n] for n in names), []).append(r)
    fig = Figure(figsize=TRADEOFF_SIZE, dpi=TRADEOFF_DPI, layout="constrained")
    ax = fig.subplots()
    r0 = rows[0]
    seeds = sorted({len(rs) for rs in groups.values()})
    sizes = sorted({(r["vcpus"], r["host_cpus"], r["sim_ns"]) for r in rows})
    if len(sizes) == 1:
        v, h, ns = sizes[0]
        size = f"{v:,} vCPUs on {h:,} host CPUs, {ns / 1e6:,.3g} ms simulated"
    else:
        size = "sizes as swept"
    varying = [n for n in names if len({r[n] for r in rows}) > 1]
    fixed = ", ".join(f"{n}={r0[n]}" for n in names if n not in varying)
    fig.suptitle(f"kvmwake sweep {r0['scenario']} ({r0['arch']}): halt polling, CPU cost "
                 f"vs wake latency\n{size}{'; ' + fixed if fixed else ''}\n{len(groups)} "
                 f"points x {'/'.join(map(str, seeds))} seed(s), mean ± 95% CI over seeds",
                 fontsize="medium")
    ys_all = []
    for n_i, (q, marker, color) in enumerate((("wake_p50_ns", "o", "C0"),
                                              ("wake_p99_ns", "^", "C3"))):
        for k, (key, rs) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
            vals = [r[q] / 1e3 for r in rs if r[q] is not None]
            if not vals:
                continue
            x, xe = _mean_ci([100 * r["poll_cpu_fraction"] for r in rs])
            y, ye = _mean_ci(vals)
            ys_all += [y - ye, y + ye]
            ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt=marker, color=color, capsize=3,
                        markersize=5, label=q[5:8] if k == 0 else None)
            if n_i == 0 and varying:
                label = ", ".join(f"{n}={v}" for n, v in zip(names, key) if n in varying)
                ax.annotate(label, (x, y), fontsize=7, textcoords="offset points",
                            xytext=(5, -12 if k % 2 == 0 else 6))
    ax.set_xlabel("host CPU spent polling (% of simulated time x host CPUs)")
    positive = [y for y in ys_all if y > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
        ax.set_ylabel("wake latency (us, log scale)")
    else:
        ax.set_ylabel("wake latency (us)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="wake latency", fontsize="small")
    return fig


def write_tradeoff(rows: list, names: list, path) -> None:
    """Write ``tradeoff_figure(rows, names)`` to ``path`` as a PNG."""
    tradeoff_figure(rows, names).savefig(path, format="png", dpi=TRADEOFF_DPI)
