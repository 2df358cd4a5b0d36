"""What ``kvmwake run`` writes besides its JSON summary: ``.npz`` arrays and a plot.

``write_npz(host, path)`` stores, per vCPU of every VM (rows in host order):

* ``vm``, ``vcpu_id``: which vCPU each row is;
* ``stats``: the raw ``model.NR_STATS`` u64 row; every counter of
  ``model.STAT_COUNTERS`` also under its kernel name (one value per vCPU);
* ``halt_poll_success_hist``, ``halt_poll_fail_hist``, ``halt_wait_hist``:
  the 32-bucket log2 histograms, one row per vCPU;
* ``halt_poll_ns``: each vCPU's poll window at the end of the run;
* ``latency_hist`` and ``latency_bucket_low_ns``: the host's wake-latency
  histogram and each bucket's lower bound;
* ``sim_ns``, ``host_cpus``.

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

from .model import (HALT_POLL_HIST_COUNT, LAT_BUCKETS, S_POLL_FAIL_HIST, S_POLL_SUCCESS_HIST,
                    S_WAIT_HIST, STAT_COUNTERS, lat_bucket_low)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def arrays(host, sim_ns: int) -> dict:
    """The arrays ``write_npz`` stores, as a dict."""
    rows = np.concatenate([vm.stats_array() for vm in host.vms]).astype(np.uint64)
    out = {
        "vm": np.concatenate([np.full(vm.nr_vcpus, vm.index, np.int32) for vm in host.vms]),
        "vcpu_id": np.concatenate([np.arange(vm.nr_vcpus, dtype=np.int32) for vm in host.vms]),
        "stats": rows,
        "halt_poll_ns": np.array([v.halt_poll_ns for vm in host.vms for v in vm.vcpus],
                                 dtype=np.uint64),
        "latency_hist": np.asarray(host.latency_histogram(), dtype=np.uint64),
        "latency_bucket_low_ns": np.array([lat_bucket_low(i) for i in range(LAT_BUCKETS)],
                                          dtype=np.uint64),
        "sim_ns": np.uint64(sim_ns),
        "host_cpus": np.uint32(host.host_cpus),
    }
    for i, name in enumerate(STAT_COUNTERS):
        out[name] = rows[:, i].copy()
    for name, base in (("halt_poll_success_hist", S_POLL_SUCCESS_HIST),
                       ("halt_poll_fail_hist", S_POLL_FAIL_HIST),
                       ("halt_wait_hist", S_WAIT_HIST)):
        out[name] = rows[:, base:base + HALT_POLL_HIST_COUNT].copy()
    return out


def write_npz(host, path, sim_ns: int) -> None:
    """Write ``arrays(host, sim_ns)`` to ``path`` (``np.savez_compressed``)."""
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays(host, sim_ns))


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
