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
"""

from __future__ import annotations

import numpy as np

from ..model import STAT_COUNTERS, lat_bucket_low


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


def write_plot(host, path, sim_ns: int, nr_vcpus_shown: int = 4) -> None:
    """Write the three-panel PNG described in the module docstring."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    # 1: wake latency
    ax = axes[0]
    hist = np.asarray(host.latency_histogram(), dtype=np.float64)
    nz = np.nonzero(hist)[0]
    if len(nz):
        lo = np.array([lat_bucket_low(i) for i in range(nz[0], nz[-1] + 1)], dtype=np.float64)
        ax.step(np.maximum(lo, 1) / 1e3, hist[nz[0]:nz[-1] + 1], where="post")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no wake-ups", ha="center", transform=ax.transAxes)
    ax.set_xlabel("wake-up to guest entry (us)")
    ax.set_ylabel("wake-ups")
    ax.set_title("wake latency")
    # 2: halt_poll_ns over time
    ax = axes[1]
    series: dict = {}
    if host.vms:
        for ev in host.vms[0].trace_events():
            if ev.event == "kvm_halt_poll_ns":
                series.setdefault(ev.vcpu_id, []).append((ev.ts_ns, ev.new))
    if series:
        for vid in sorted(series)[:nr_vcpus_shown]:
            pts = series[vid]
            ax.step([t / 1e6 for t, _ in pts], [v / 1e3 for _, v in pts], where="post",
                    label=f"vCPU {vid}")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no kvm_halt_poll_ns records\n(tracing off or no poll changes)",
                ha="center", transform=ax.transAxes)
    ax.set_xlabel("virtual time (ms)")
    ax.set_ylabel("halt_poll_ns (us)")
    ax.set_title("halt_poll_ns, VM 0")
    # 3: host CPU time
    ax = axes[2]
    total = host.host_cpus * sim_ns
    split = cpu_time_split(host)
    if split and split["window_ns"][1] > split["window_ns"][0]:
        t0, t1 = split["window_ns"]
        span = host.host_cpus * (t1 - t0)
        names = ["running", "polling", "idle"]
        ax.bar(["guest\n(vCPU running)", "polling", "idle"],
               [100 * split[k] / span for k in names])
        ax.set_title(f"host CPU time, {t0 / 1e6:,.1f}-{t1 / 1e6:,.1f} ms", fontsize="small")
    else:
        rows = np.concatenate([vm.stats_array() for vm in host.vms]).astype(np.float64)
        polling = rows[:, STAT_COUNTERS.index("halt_poll_success_ns")].sum() + \
            rows[:, STAT_COUNTERS.index("halt_poll_fail_ns")].sum()
        ax.bar(["polling", "guest, switches\nand idle"], [100 * polling / total,
                                                        100 * (total - polling) / total])
        ax.set_title("host CPU time (no timeline: guest and idle not separated)",
                     fontsize="small")
    ax.set_ylabel("% of host CPU time")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
