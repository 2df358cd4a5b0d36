"""Run a recording's workload in kvmwake: the same machine shape, costs and MSIs.

What is simulated (the kernel side is in ``record.py``):

* an x86 host with the recording's host CPU count and kvm module
  parameters, scheduled as the machine's kernel schedules it:
  ``SimParams.scheduler`` ``"eevdf"`` (default: Linux 6.18's fair class, wake-up
  preemption as ``check_preempt_wakeup_fair`` decides) or ``"fifo"`` (for
  comparison); one VM with the recording's vCPUs and ``KVM_CAP_HALT_POLL`` (if
  the recording set it).  Its vCPU threads are placed as the recorder placed
  the real ones (``recording.sim_placement``, ``Setup.create_vm``): pinned, vCPU
  i on host CPU ``i % host_cpus`` (or on its recorded CPU); unpinned, allowed
  on every CPU, so that wake placement (``select_task_rq``) and newly-idle
  balancing move them as the kernel's scheduler does;
* each vCPU runs the micro-VM's guest: ``set_handler(handler_ns, iret=False)``
  (its handler goes back to ``sti; hlt`` without an ``iret``), then
  ``loop([unmask(), hlt()])``.  ``handler_ns`` stands for everything between
  the guest entry after a wake and the next ``hlt`` exit other than that
  entry and exit: the handler, its port exit's trip to userspace and back,
  the EOI;
* each wake is a fixed-mode MSI to its vCPU with that wake's own vector (as
  in the guest), landing ``delivery_ns`` after it was sent;
* **the injector thread** is a host thread (``host.add_thread``, name
  "injector", role "injector" in ``SimResult.sched``), pinned where the
  recorder pinned the real injector (``Setup.injector_cpu``, from
  ``recording.sim_placement``; unpinned: affinity "all").  Its host program
  (``injector_program``), per wake with a send: ``sleep_until`` the wake's
  deadline, ``compute(delivery_ns)``, ``msi`` to the wake's vCPU with the wake's
  vector, ``compute`` for the rest of ``injector_ns``.  It shares its CPU with
  the vCPUs pinned there: its wake-up ends a vCPU's poll
  (``single_task_running()`` is false), under EEVDF it preempts a running vCPU
  as the kernel decides, and a vCPU woken by its MSI waits for it to sleep
  again;
* its deadlines (``injector_deadlines``): the engine has one wake-to-run cost,
  ``wake_to_run_ns``, fitted to a vCPU woken from another CPU (~40 us on the
  project's nested host); the real injector woken by its own timer runs ~17 us
  (``injector_idle_wake_ns``) after it fires.  The difference is folded into
  the deadline (with the cost's median, ``costs.cost_median``).  When it was
  sent (``arrivals``):

  - ``"sent"`` (default): the deadline is the real send (relative to the
    injector's start) less ``wake_to_run_ns``: woken on an idle CPU, it sends
    at the recorded time.  The workload is the spec's schedule as the harness
    delivered it;
  - ``"target"``: the schedule alone: the deadline is the spec's target plus
    ``injector_idle_wake_ns`` less ``wake_to_run_ns``: woken on an idle CPU, it
    sends ``injector_idle_wake_ns`` after the target, as the real one did.
    Without the injector (``injector=False``), at the target plus the median
    lateness ``lateness_ns``;

  woken onto a busy CPU it is queued at the deadline and the scheduler
  decides when it runs (EEVDF: mostly at once, a context switch later), so
  there it sends up to ``wake_to_run_ns`` early (the documented cost of one
  wake-up cost per host).  ``SimResult.send_ns`` is when the model's injector
  sent each wake (``injector_sends``, off the state timeline) and
  ``injector_idle`` whether it was woken onto an idle CPU.  The Python
  harness's main thread (asleep) is not modelled;
* ``lead_in`` (at least 2 ms and twice the ceiling) is the first halt before
  the first wake: long, as on the real machine where the guests halt while
  tracing is set up.

Without the injector (``injector=False``) the wakes are ``vm.add_msi_source``
trace sources, one per (vCPU, vector).  An ipi recording runs in
``simulate_ipi`` (no injector thread: it sleeps once the start MSI is sent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .. import guest as g
from .. import vmm as _vmm
from ..costs import cost_median
from ..host import Host
from ..model import SCHEDULERS
from ..model import COST_DEFAULTS
from ..uapi import Cap
from .microvm import msi_address, wake_vector
from .schedtrace import SchedTrace, from_timeline

PID_BASE = 1000

#: SimParams keys of earlier calibrations that ``from_dict`` accepts and ignores:
#: ``injector_busy_wake_ns`` timed the Python-stepped injector's wake-up onto a
#: busy CPU, which the host scheduler decides now.
RETIRED_PARAMS = ("injector_busy_wake_ns",)


@dataclass
class SimParams:
    """Everything the simulation of one recording needs, calibrated or not."""

    costs: dict = field(default_factory=lambda: dict(COST_DEFAULTS))
    handler_ns: int = 10_000             # guest work between the wake's entry and the next exit
    delivery_ns: int = 1_000             # send -> the MSI is pending in the LAPIC
    lateness_ns: int = 20_000            # "target" arrivals: target -> send
    arrivals: str = "sent"               # "sent" | "target"
    injector: bool = True                # model the injector thread
    injector_idle_wake_ns: int = 17_000  # "target" arrivals: target -> injector runs from idle
    injector_ns: int = 1_000             # the injector's work per send
    lead_in_ns: int | None = None        # first wake at lead_in + target (None: automatic)
    scheduler: str = "eevdf"             # the host scheduler (Host(scheduler=...)): eevdf | fifo
    # The host kernel's own scheduler rules (HOST_RULES): "recording" (the vendor's
    # vCPU packing and wake-up preemption past delayed sleepers where the recording's
    # kernel has them, vcpu_pack below), "upstream" (neither) or "vendor" (both).
    host_rules: str = "recording"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SimParams:
        known = set(cls.__dataclass_fields__)
        # Calibrations of the Python-stepped injector: its busy-CPU wake-up is the
        # host scheduler's now.
        d = {k: v for k, v in d.items() if k not in RETIRED_PARAMS}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown simulation parameters: {', '.join(sorted(extra))}")
        p = cls(**d)
        if not isinstance(p.costs, dict):
            raise ValueError("costs must be an object")
        unknown = set(p.costs) - set(COST_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown costs: {', '.join(sorted(unknown))}")
        p.costs = {**COST_DEFAULTS, **{k: int(v) for k, v in p.costs.items()}}
        if p.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not "
                             f"{p.scheduler!r}")
        if p.host_rules not in HOST_RULES:
            raise ValueError(f"host_rules must be one of {', '.join(HOST_RULES)}, not "
                             f"{p.host_rules!r}")
        if p.arrivals not in ("sent", "target"):
            raise ValueError(f"arrivals must be 'sent' or 'target', not {p.arrivals!r}")
        for name in ("handler_ns", "delivery_ns", "lateness_ns", "injector_idle_wake_ns",
                     "injector_ns"):
            v = getattr(p, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v > 1e10:
                raise ValueError(f"{name} = {v!r} is not a duration in ns")
            setattr(p, name, int(v))
        return p


#: ``SimParams.host_rules`` values (``--host-rules``), and what the option says.
HOST_RULES = ("recording", "upstream", "vendor")
HOST_RULES_HELP = ("the host kernel's own scheduler rules the model runs: recording (the "
                   "vendor's vCPU packing and wake-up preemption past delayed sleepers where "
                   "the recording's kernel has kernel.sched_vcpu_pack, default), upstream "
                   "(neither) or vendor (both)")


def vendor_rules(setup: Setup, params: SimParams) -> bool:
    """The simulated host has the vendor kernel's two rules (``Host(vcpu_pack=True,
    preempt_skips_delayed=True)``): as the recording's kernel, or as forced."""
    if params.host_rules == "recording":
        return setup.vcpu_pack
    return params.host_rules == "vendor"


@dataclass
class Setup:
    """The machine and the workload, from a recording."""

    nvcpus: int
    host_cpus: int
    module_params: dict
    cap: int | None
    target_ns: np.ndarray
    vcpu: np.ndarray
    index: np.ndarray
    sent_ns: np.ndarray | None = None   # the real send, after the injector's start (-1: none)
    ipi: object = None                  # an ipi recording's plan (workload.IpiPlan): simulate_ipi
    injector_cpu: int | None = None     # where the recorder pinned the injector (None: unpinned)
    vm_affinity: str = "pinned"         # the vCPU threads' create_vm affinity: "pinned" | "all"
    vcpu_cpus: list | None = None       # pinned elsewhere than g % host_cpus: each vCPU's CPU
    # The host kernel is the vendor's (sched_vcpu_pack): Host(vcpu_pack=...,
    # preempt_skips_delayed=...), the two rules seen in its scheduler's tracepoints.
    vcpu_pack: bool = False

    @property
    def injector_affinity(self):
        """The injector thread's ``add_thread`` affinity: its CPU, or "all" (unpinned)."""
        return "all" if self.injector_cpu is None else int(self.injector_cpu)

    @classmethod
    def from_recording(cls, rec) -> Setup:
        w = rec.wakes
        t0 = int(rec.meta["t0_ns"])
        sent = np.where(w["sent_ns"] > 0, w["sent_ns"] - t0, -1)
        from .recording import regenerate_plan, sim_placement, vcpu_pack, workload_kind
        plan = regenerate_plan(rec) if workload_kind(rec.meta) == "ipi" else None
        place = sim_placement(rec.meta)
        inj = place["injector"]
        return cls(rec.nvcpus, int(rec.meta["host_cpus"]), dict(rec.module_params), rec.cap,
                   w["target_ns"], w["vcpu"].astype(np.int32), w["index"], sent, plan,
                   None if inj == "all" else int(inj), place["vm"], place["vcpus"],
                   vcpu_pack(rec.meta))

    def create_vm(self, host):
        """The recording's VM on ``host``, its vCPU threads placed as the recorder
        placed the real ones: pinned (to CPU i % host_cpus, or each to its recorded
        CPU) or, unpinned, allowed on every CPU (wake placement and newly-idle
        balancing then move them, as the kernel's scheduler does)."""
        vm = host.create_vm(self.nvcpus, affinity=self.vm_affinity)
        if self.vm_affinity != "all" and self.vcpu_cpus is not None:
            for v, c in zip(vm.vcpus, self.vcpu_cpus):
                v.set_affinity("all" if c is None else [int(c)])
        return vm

    def ceiling(self) -> int:
        return self.cap if self.cap is not None else int(self.module_params["halt_poll_ns"])


@dataclass
class SimResult:
    setup: Setup
    params: SimParams
    lead_in_ns: int
    send_ns: np.ndarray             # when the simulated injector sent each wake
    arrival_ns: np.ndarray          # when each wake's MSI landed
    target_abs_ns: np.ndarray       # lead_in + target
    events: list                    # the main VM's trace events
    stats: list[dict]               # per vCPU, kernel names
    injector_idle: np.ndarray       # per wake: the injector was taken to wake from idle
    sched: SchedTrace | None = None  # the host's thread timeline as scheduler events

    def pid_to_vcpu(self) -> dict[int, int]:
        return {PID_BASE + i: i for i in range(self.setup.nvcpus)}

    @property
    def lateness_ns(self) -> np.ndarray:
        return self.send_ns - self.target_abs_ns


def lead_in(setup: Setup, params: SimParams) -> int:
    if params.lead_in_ns is not None:
        return int(params.lead_in_ns)
    costs = {**COST_DEFAULTS, **params.costs}
    return max(2_000_000, 2 * setup.ceiling(),
               cost_median(costs["wake_to_run_ns"]) + cost_median(costs["vm_entry_ns"])
               + 100_000)


def _program(handler_ns: int, iret: bool = True):
    return [g.set_handler(max(0, int(handler_ns)), iret=iret), g.loop([g.unmask(), g.hlt()])]


def simulate(setup: Setup, params: SimParams, seed: int = 0, engine: str = "core",
             drain_ns: int = 20_000_000, host_costs: dict | None = None) -> SimResult:
    """Run the workload (see the module docstring); an ipi recording's in ``simulate_ipi``.

    ``host_costs``: what ``Host(costs=...)`` gets (``calibrate.sim_costs``: a
    calibration's costs); None: ``params.costs``.  ``params.costs`` (constants) also
    time the modelled injector and the lead-in.  The host runs with the state
    timeline on; ``SimResult.sched`` is it as scheduler events (``sched_trace``), for
    the preemption and migration rates."""
    if setup.ipi is not None:
        return simulate_ipi(setup, params, seed, engine, drain_ns, host_costs)
    return _sized(lambda cap: _simulate_msi(setup, params, seed, engine, drain_ns, cap,
                                            host_costs), len(setup.target_ns))


def _simulate_msi(setup: Setup, params: SimParams, seed: int, engine: str, drain_ns: int,
                  tl_capacity: int, host_costs: dict | None = None) -> tuple[SimResult, int]:
    lead = lead_in(setup, params)
    costs = {**COST_DEFAULTS, **params.costs}
    w2r = cost_median(costs["wake_to_run_ns"])
    target = lead + setup.target_ns.astype(np.int64)
    n = len(target)
    if params.arrivals == "sent" and setup.sent_ns is not None:
        have = setup.sent_ns >= 0
        send = np.where(have, lead + setup.sent_ns.astype(np.int64), -1)
    else:
        have = np.ones(n, dtype=bool)
        send = target + params.lateness_ns
    host, vm = _build(setup, params, seed, engine, tl_capacity, host_costs)
    idle = np.zeros(n, dtype=bool)
    th = None
    if not params.injector:
        _deliver_fixed(host, vm, setup, send + params.delivery_ns, have, drain_ns)
    else:
        deadline = injector_deadlines(setup, params, target, send, have, w2r)
        th = host.add_thread(injector_program(vm, setup, params, deadline),
                             affinity=setup.injector_affinity, name="injector")
        last = int(deadline.max()) if (deadline >= 0).any() else 0
        host.run(last + w2r + drain_ns)
        send = injector_sends(host, th, deadline, params)
        idle = _woke_from_idle(host, th, deadline)
    events = vm.trace_events()
    stats = [v.stats() for v in vm.vcpus]
    if host.timeline_dropped:
        return None, host.timeline_dropped
    return SimResult(setup, params, lead, send, send + params.delivery_ns, target, events,
                     stats, idle, sched_trace(host, vm, th)), 0


def _woke_from_idle(host, th, deadline: np.ndarray) -> np.ndarray:
    """Per wake: the injector slept to its deadline and was woken onto an idle CPU
    (no other thread running, polling or queued there at that instant)."""
    from ..model import ThreadState as TS
    tl = host.timeline_array()
    out = np.zeros(len(deadline), dtype=bool)
    if not len(tl):
        return out
    mine = tl[(tl["g"] == th.g) & (tl["state"] == TS.RUNNABLE)]
    woke_cpu = {int(t): int(c) for t, c in zip(mine["t"], mine["cpu"])}
    others = [tl[tl["g"] == g] for g in np.unique(tl["g"]).tolist() if g != th.g]
    busy = (TS.RUNNING, TS.POLLING, TS.RUNNABLE)
    for k in np.nonzero(deadline >= 0)[0].tolist():
        d = int(deadline[k])
        if d not in woke_cpu:
            continue
        out[k] = True
        for o in others:
            i = int(np.searchsorted(o["t"], d, side="right")) - 1
            if i >= 0 and int(o["cpu"][i]) == woke_cpu[d] and int(o["state"][i]) in busy:
                out[k] = False
                break
    return out


#: The state timeline's records per wake, to start with: a wake changes its vCPU's
#: state a handful of times (runnable, running, polling, blocked; the injector's as
#: many), more where a shared CPU preempts.  The timeline is a ring: a run that
#: overflows it is run again (same seed, same result) with room for what it dropped.
TIMELINE_RECORDS_PER_WAKE = 16
#: ... plus this many (the lead-in, the drain).
TIMELINE_BASE = 4096


def _sized(run_once, wakes: int) -> SimResult:
    """``run_once(timeline_capacity) -> (SimResult, 0) | (None, records dropped)``, with
    a capacity sized from the run: ``TIMELINE_RECORDS_PER_WAKE`` per wake, then grown
    by what a run dropped until one keeps every record."""
    cap = TIMELINE_RECORDS_PER_WAKE * wakes + TIMELINE_BASE
    while True:
        r, dropped = run_once(cap)
        if r is not None:
            return r
        cap += 2 * dropped


def sched_trace(host, vm, inj=None) -> SchedTrace:
    """The simulated host's thread timeline as scheduler events
    (``schedtrace.from_timeline``), with the recording's roles: the vCPUs of ``vm``
    ("vcpu", numbered as in the VM) and the injector host thread (``inj``, a
    ``HostThread``: role "injector").  A thread's ``cpu`` is its one allowed CPU
    when pinned, or None when it may run on several."""
    threads = [{"tid": int(v._g), "role": "vcpu", "vcpu": int(v.id),
                "cpu": v.affinity[0] if len(v.affinity) == 1 else None}
               for v in vm.vcpus]
    if inj is not None:
        threads.append({"tid": int(inj.g), "role": "injector", "vcpu": None,
                        "cpu": int(inj.affinity[0]) if len(inj.affinity) == 1 else None})
    return from_timeline(host, threads)


def _machine(setup: Setup, params: SimParams, seed: int, engine: str, tl_capacity: int,
             host_costs: dict | None, n: int):
    """The recording's host (CPUs, costs, scheduler, kvm module parameters) and its
    VM (vCPU threads placed as recorded, ``KVM_CAP_HALT_POLL`` if set), without
    programs; ``n`` wakes size the trace ring."""
    mp = setup.module_params
    vendor = vendor_rules(setup, params)
    host = Host(host_cpus=setup.host_cpus, arch="x86", seed=seed,
                costs=params.costs if host_costs is None else host_costs,
                engine=engine, trace_capacity=max(1 << 12, 8 * n + 1024),
                timeline_capacity=tl_capacity, scheduler=params.scheduler,
                vcpu_pack=vendor, preempt_skips_delayed=vendor)
    host.halt_poll_ns = int(mp["halt_poll_ns"])
    for name in ("halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink"):
        if name in mp:
            setattr(host, name, int(mp[name]))
    vm = setup.create_vm(host)
    if setup.cap is not None:
        vm.enable_cap(Cap.HALT_POLL, int(setup.cap))
    return host, vm


def _build(setup: Setup, params: SimParams, seed: int, engine: str, tl_capacity: int,
           host_costs: dict | None = None):
    host, vm = _machine(setup, params, seed, engine, tl_capacity, host_costs,
                        len(setup.target_ns))
    for v in vm.vcpus:
        # The micro-VM's handler jumps back to sti; hlt without an iret: every
        # wake is taken after a HLT exit (one halt_exits per wake, as in the kernel).
        v.load(_program(params.handler_ns, iret=False))
    return host, vm


def _deliver_fixed(host, vm, setup, at, keep, drain_ns) -> None:
    """MSIs at fixed times, no injector: one MSI source per (vCPU, vector) when the
    engine has ``add_msi_source``, else MSIs between ``run`` calls."""
    msis = [(int(t), int(v), wake_vector(int(j)))
            for t, v, j, ok in zip(at, setup.vcpu, setup.index, keep) if ok]
    if not msis:
        host.run(host.now + drain_ns)
        return
    if hasattr(vm, "add_msi_source"):
        groups: dict = {}
        for t, apic, vec in msis:
            groups.setdefault((apic, vec), []).append(t)
        for (apic, vec), times in sorted(groups.items()):
            vm.add_msi_source(apic, vec, times_ns=np.array(sorted(times), dtype=np.uint64))
        host.run(max(t for t, *_ in msis) + drain_ns)
        return
    msis.sort()
    for t, apic, vec in msis:
        if t > host.now:
            host.run(t)
        vm.signal_msi(msi_address(apic), vec)
    host.run(host.now + drain_ns)


def injector_deadlines(setup: Setup, params: SimParams, target: np.ndarray, send: np.ndarray,
                       have: np.ndarray, w2r: int) -> np.ndarray:
    """The injector thread's ``sleep_until`` deadline per wake (-1: no send), from the
    run's absolute ``target`` and ``send`` times and ``w2r`` (``wake_to_run_ns``).

    The engine charges a thread woken on an idle CPU one cost, ``wake_to_run_ns``
    (fitted to the vCPUs, woken from another CPU: ~40 us here); the real injector,
    woken by its own timer, takes ``injector_idle_wake_ns`` (~17 us).  That
    difference is folded into the deadline, so that woken from idle it runs when
    the real one did: "sent": at the recorded send (deadline ``send - w2r``);
    "target": ``injector_idle_wake_ns`` after the target (deadline ``target +
    injector_idle_wake_ns - w2r``).  Woken onto a busy CPU it is queued at the
    deadline and the scheduler decides (EEVDF: wake-up preemption,
    ``check_preempt_wakeup_fair``), so there it can send up to ``w2r`` early."""
    if params.arrivals == "sent" and setup.sent_ns is not None:
        at = send - w2r
    else:
        at = target + params.injector_idle_wake_ns - w2r
    return np.where(have, np.maximum(at, 0), -1).astype(np.int64)


def injector_program(vm, setup: Setup, params: SimParams, deadline: np.ndarray) -> list:
    """The injector as a host program: for each wake with a send, in order,
    ``sleep_until`` its deadline (``clock_nanosleep(TIMER_ABSTIME)``, as the
    recorder's injector sleeps), ``compute(delivery_ns)`` (the write's path until
    the MSI is pending in the LAPIC), ``msi`` to the wake's vCPU with its vector
    (``kvm_set_msi`` -> ``kvm_apic_set_irq`` -> ``kvm_vcpu_kick``), then the rest of
    its work per send (``injector_ns`` less the delivery)."""
    from .. import hostprog as hp
    ops: list = []
    prev = 0
    rest = max(0, params.injector_ns - params.delivery_ns)
    for k in np.nonzero(deadline >= 0)[0].tolist():
        d = int(deadline[k])
        ops.append(hp.sleep_until(max(0, d - prev)))
        prev = max(prev, d)
        if params.delivery_ns:
            ops.append(hp.compute(params.delivery_ns))
        ops.append(hp.msi(vm, int(setup.vcpu[k]), wake_vector(int(setup.index[k]))))
        if rest:
            ops.append(hp.compute(rest))
    ops.append(hp.end())
    return ops


def injector_sends(host, th, deadline: np.ndarray, params: SimParams) -> np.ndarray:
    """When the injector thread ``th`` sent each wake (-1: no send), from the
    host's state timeline: a wake whose deadline it slept to was sent when the
    thread next got its CPU after that timer (its RUNNABLE record at the deadline);
    one whose deadline had passed (no sleep) right after the previous send's work
    (``delivery_ns + injector_ns`` later, preemption in between not counted)."""
    tl = host.timeline_array()
    mine = tl[tl["g"] == th.g] if len(tl) else tl
    t, st = mine["t"].astype(np.int64), mine["state"].astype(np.int64)
    from ..model import ThreadState as TS
    runnable = {}
    for i in range(len(mine) - 1):
        if st[i] == TS.RUNNABLE and i > 0 and st[i - 1] == TS.BLOCKED:
            j = i + 1
            while j < len(mine) and st[j] != TS.RUNNING:
                j += 1
            if j < len(mine):
                runnable.setdefault(int(t[i]), int(t[j]))
    out = np.full(len(deadline), -1, dtype=np.int64)
    prev = None
    step = params.delivery_ns + max(0, params.injector_ns - params.delivery_ns)
    for k in np.nonzero(deadline >= 0)[0].tolist():
        d = int(deadline[k])
        if d in runnable and (prev is None or d > prev):
            out[k] = runnable.pop(d)
        else:
            out[k] = d if prev is None else max(d, prev + step)
        prev = int(out[k])
    return out


# ---------------------------------------------------------------- the ipi workload

def _ipi_program(plan, v: int, handler_ns: int) -> list:
    """vCPU ``v``'s guest in the model: the recorder's IPI guest step for step.

    For each wake it receives: ``sti; hlt``, the handler (``handler_ns``: its port
    exit and EOI; no ``iret``, so interrupts stay masked until the next ``sti; hlt``,
    as in the micro-VM), the step's compute, the send port exit (``sync(k)``: an exit to
    userspace carrying the number k of the wake it is about to send) and the ICR write
    (``sgi(vector, destination)``); the vCPU woken by the plan's last wake only halts.
    The trailing ``hlt`` is the halt the recorder stops the vCPU in."""
    prog = [g.set_handler(max(0, int(handler_ns)), iret=False)]
    sel = np.nonzero(plan.vcpu == v)[0].tolist()
    for (c, dest, vec), k in zip(plan.steps(v), sel):
        prog += [g.unmask(), g.hlt()]
        if dest < 0:
            continue
        if c > 0:
            prog.append(g.compute(int(c)))
        prog += [g.sync(k + 1), g.sgi(int(vec), int(dest))]
    prog += [g.unmask(), g.hlt(), g.end()]
    return prog


class _SendLog(_vmm.Vmm):
    """Re-enters after every exit, as the recorder's vCPU threads do; notes the time of
    each send port exit (``sync(k)``): the send time of wake k."""

    def __init__(self, n: int):
        self.sent = [-1] * n

    def handle_exit(self, vcpu, ex) -> bool:
        if ex.ucall == "SYNC" and ex.value is not None and 0 <= ex.value < len(self.sent):
            self.sent[int(ex.value)] = int(vcpu.vm.host.now)
        return super().handle_exit(vcpu, ex)

    def to_state(self) -> dict:
        return {"sent": list(self.sent)}


def simulate_ipi(setup: Setup, params: SimParams, seed: int = 0, engine: str = "core",
                 drain_ns: int = 20_000_000, host_costs: dict | None = None) -> SimResult:
    """The model's run of an ipi recording (``workload.ipi_plan`` in ``setup.ipi``).

    The machine is ``simulate``'s (host CPUs, module parameters, cap, costs); each
    vCPU runs ``_ipi_program``: the same plan the recorded guest ran, so the same
    vCPU computes as long and wakes the same vCPU with the same vector at every
    step.  The chain starts with one MSI (wake 0) to the plan's first vCPU,
    ``lead_in`` after the start; there is no injector thread (it sleeps once the
    start MSI is sent).  ``send_ns[k]`` is the time of the send port exit of wake
    k (the recorder's ``sent_ns``), ``arrival_ns`` adds ``delivery_ns``.
    ``sched``: the host's state timeline as scheduler events, and ``host_costs``, as
    in ``simulate``.
    """
    return _sized(lambda cap: _simulate_ipi(setup, params, seed, engine, drain_ns, cap,
                                            host_costs), len(setup.ipi))


def _simulate_ipi(setup: Setup, params: SimParams, seed: int, engine: str, drain_ns: int,
                  tl_capacity: int, host_costs: dict | None = None) -> tuple[SimResult, int]:
    plan = setup.ipi
    n = len(plan)
    lead = lead_in(setup, params)
    host, vm = _machine(setup, params, seed, engine, tl_capacity, host_costs, n)
    for v in vm.vcpus:
        v.load(_ipi_program(plan, v.id, params.handler_ns))
    log = _SendLog(n)
    vm.vmm = log
    log.attach(vm)
    host.run(lead)
    log.sent[0] = lead
    vm.signal_msi(msi_address(int(plan.vcpu[0])), int(plan.vector[0]))
    horizon = lead + 4 * plan.duration_ns + n * 2_000_000 + drain_ns
    step = max(1_000_000, plan.duration_ns // 8)
    while host.now < horizon:
        host.run(min(horizon, host.now + step))
        if min(log.sent) >= 0:
            break                              # every wake sent; the drain delivers the last
    host.run(host.now + drain_ns)
    send = np.asarray(log.sent, dtype=np.int64)
    target = lead + plan.target_ns.astype(np.int64)
    if host.timeline_dropped:
        return None, host.timeline_dropped
    return SimResult(setup, params, lead, send, send + params.delivery_ns, target,
                     vm.trace_events(), [v.stats() for v in vm.vcpus],
                     np.zeros(n, dtype=bool), sched_trace(host, vm, None)), 0
