"""A recording folder made by the model itself, for testing calibrate/compare without KVM.

``make_recording(DIR, ...)`` runs a workload through ``simulate`` with known
costs and writes what ``kvmwake kernel record`` would have written: the
trace (the model's own tracepoint text, microsecond timestamps like the
kernel's), per-vCPU stats, ``wakes.csv`` (send times from the simulated
injector; "seen" times from the halt ends plus a port-exit time, and one
handler time after the previous one for wakes that found the vCPU busy) and
a ``metadata.json`` marked ``"synthetic": true``.  Calibrating it should
give back the costs it was made with.  With ``sched_trace=True`` it also has the
scheduler's tracepoints: the simulated host's thread timeline
(``SimResult.sched``) in the kernel's text form in ``sched.trace``, with the
recording's tids (idle as pid 0), and the threads table in the metadata.
"""

from __future__ import annotations

import csv
import datetime
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..haltpoll import HALT_POLL_NS_DEFAULT
from ..outputs.tracefmt import WAKEUP, events_to_text
from . import analysis as A
from . import schedtrace as ST
from .microvm import wake_vector
from .recording import FORMAT, METADATA, STATS, TRACE, WAKES, WAKE_COLUMNS, write_json
from .simulate import PID_BASE, SimParams, Setup, simulate
from .stats import to_jsonable
from .workload import ipi_plan
from .workload import schedule as make_schedule


def make_recording(path, spec: str = "mixed", wakes: int = 400, vcpus: int = 2,
                   host_cpus: int = 2, cap: int | None = None, params: SimParams | None = None,
                   port_exit_ns: int = 5000, seed: int = 0, traced: bool = True,
                   sched_trace: bool = False, workload: str = "msi") -> dict:
    """Write a synthetic recording into ``path``; returns its metadata.

    ``workload``: ``"msi"`` (``spec`` the idle between MSIs) or ``"ipi"`` (``spec``
    the vCPUs' compute between IPIs, ``workload.ipi_plan``; run by ``simulate_ipi``)."""
    path = Path(path)
    params = params or SimParams(arrivals="target")
    module = {"halt_poll_ns": HALT_POLL_NS_DEFAULT["x86"], "halt_poll_ns_grow": 2,
              "halt_poll_ns_grow_start": 10_000, "halt_poll_ns_shrink": 2}
    if workload == "ipi":
        sched = ipi_plan(seed, vcpus, wakes, spec)
        setup = Setup(vcpus, host_cpus, module, cap, sched.target_ns, sched.vcpu, sched.index,
                      None, sched)
        vectors = sched.vector.tolist()
    elif workload == "msi":
        sched = make_schedule(spec, wakes, vcpus, seed)
        # The injector pinned to CPU vcpus % host_cpus, as the metadata's "pinning" says.
        setup = Setup(vcpus, host_cpus, module, cap, sched.target_ns, sched.vcpu, sched.index,
                      injector_cpu=vcpus % host_cpus)
        vectors = [wake_vector(int(i)) for i in sched.index]
    else:
        raise ValueError(f"workload must be 'msi' or 'ipi', not {workload!r}")
    r = simulate(setup, params, seed=seed)
    # As the x86 kernel, which never calls kvm_vcpu_halt() for a vCPU already runnable.
    r.events = [e for e in r.events if not (e.event == WAKEUP and e.ns == 0)]
    t0 = r.lead_in_ns
    sent = r.send_ns.astype(np.int64)
    h = A.halts_from_events(r.events, r.pid_to_vcpu())
    wk = A.match_wakers(h, sent, sched.vcpu, end_slack_ns=0)
    seen = np.zeros(len(sent), dtype=np.int64)
    for j in np.nonzero(wk >= 0)[0]:
        seen[wk[j]] = h.end[j] + port_exit_ns
    for v in range(vcpus):
        last = 0
        for k in np.nonzero(sched.vcpu == v)[0]:
            if seen[k] == 0:
                seen[k] = max(int(sent[k]) + params.delivery_ns + port_exit_ns,
                              last + params.handler_ns)
            last = int(seen[k])
    path.mkdir(parents=True, exist_ok=True)
    tids = [PID_BASE + i for i in range(vcpus)]
    if traced:
        (path / TRACE).write_text(events_to_text(r.events))
    with open(path / WAKES, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(WAKE_COLUMNS)
        for k in range(len(sent)):
            wr.writerow((k, int(sched.vcpu[k]), int(sched.index[k]),
                         int(vectors[k]), int(sched.target_ns[k]),
                         int(sent[k]), int(sent[k]) + params.injector_ns, 1, int(seen[k])))
    threads = None
    if sched_trace:
        threads = _write_sched(path, r, vcpus)
    zero = {k: (np.zeros_like(v) if isinstance(v, np.ndarray) else 0)
            for k, v in r.stats[0].items()}
    write_json(path / STATS, {"vcpus": [
        {"vcpu": i, "before": to_jsonable(zero), "after": to_jsonable(s),
         "delta": to_jsonable(s)} for i, s in enumerate(r.stats)]})
    late = sent - (t0 + sched.target_ns)
    meta = {
        "format": FORMAT, "kvmwake": __version__, "synthetic": True,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "kernel": {"release": "synthetic (kvmwake model)", "version": "", "machine": "x86_64"},
        "cpu_model": "model", "host_cpus": host_cpus, "host_cpu_ids": list(range(host_cpus)),
        "pinning": {"vcpus": [i % host_cpus for i in range(vcpus)],
                    "injector": vcpus % host_cpus, "enabled": True},
        "module_params": module, "caps": {}, "halt_poll_cap": cap, "vcpus": vcpus,
        "workload": sched.to_dict(),
        "trace": ({"mode": "tracefs", "clock": "virtual"} if traced
                  else {"mode": "stats-only", "reason": "synthetic, made without a trace"}),
        "t0_ns": int(t0), "vcpu_tids": tids, "injector_tid": PID_BASE + vcpus,
        "harness": {"msi_ioctl_delivered_ns": {"p50": float(params.injector_ns)},
                    "timer_lateness_idle_ns": {"p50": float(params.injector_idle_wake_ns)},
                    "injector_lateness_ns": {"p50": float(np.median(late))}},
        "wakes": {"sent": len(sent), "delivered": len(sent), "seen": int((seen > 0).sum()),
                  "not_seen": 0},
        "made_with": params.to_dict(), "port_exit_ns": port_exit_ns,
    }
    if threads is not None:
        meta.update(threads=threads, pinned=True,
                    sched_trace={"mode": "synthetic", "events": list(ST.SCHED_EVENTS)})
    write_json(path / METADATA, meta)
    return meta


def _write_sched(path: Path, r, vcpus: int) -> list[dict]:
    """``sched.trace`` from the simulated host's timeline; returns the threads table."""
    tid = {t["tid"]: (PID_BASE + t["vcpu"] if t["role"] == "vcpu" else PID_BASE + vcpus)
           for t in r.sched.threads}
    tid[ST.IDLE_PID] = 0
    comm = {PID_BASE + i: f"vcpu{i}" for i in range(vcpus)} | {PID_BASE + vcpus: "injector"}
    lines = [ST.format_line(replace(e, pid=tid[e.pid],
                                    next_pid=tid.get(e.next_pid, e.next_pid)), comm)
             for e in r.sched.events]
    (path / ST.SCHED_TRACE).write_text("# tracer: nop\n" + "\n".join(lines) + "\n")
    return [{**t, "tid": tid[t["tid"]]} for t in r.sched.threads]
