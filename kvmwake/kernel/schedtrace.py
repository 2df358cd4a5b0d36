"""The host scheduler's own tracepoints in a recording, and the same figures from the model.

``kvmwake kernel record`` (``--sched-trace auto|require|off``) enables, next to
the kvm halt events, ``sched:sched_switch``, ``sched:sched_wakeup``,
``sched:sched_wakeup_new`` and ``sched:sched_migrate_task`` and keeps the lines
of the recording's own threads (``filter_sched``) in ``DIR/sched.trace``; the
metadata's ``threads`` table names each thread's role (``"vcpu"`` with its
index, ``"injector"``, ``"main"``) and pinned CPU.  The lines are the kernel's
text form (``events/sched/*/format`` on the recording machine, Linux 6.18)::

    <comm>-<pid> [<cpu>] <flags> <secs>.<usecs>: sched_switch: prev_comm=<comm>
        prev_pid=<pid> prev_prio=<prio> prev_state=<S|D|R|R+|...> ==> next_comm=<comm>
        next_pid=<pid> next_prio=<prio>
    ... sched_wakeup: comm=<comm> pid=<pid> prio=<prio> target_cpu=<cpu, 3 digits>
    ... sched_migrate_task: comm=<comm> pid=<pid> prio=<prio> orig_cpu=<cpu> dest_cpu=<cpu>

``parse`` turns them into ``SchedEvent`` records; ``from_timeline`` makes the
same records from a model run's state timeline (``kvmwake.outputs.timeline``:
each thread state change with its CPU), so ``preemption_rate`` and
``migration_rate`` compute the kernel's and the model's figures with the same
code:

* **preemption rate** (per role pair ``A->B``): of the wake-ups of a recorded
  thread A onto a CPU where another recorded thread B is running, the share
  after which A is switched in on that CPU before B goes to sleep (B switched
  out in a sleeping state).  A wake-up is decided by whichever comes first; one
  that neither ends (the trace stops) is not counted.  ``injector->vcpu``: the
  woken injector preempted a running vCPU thread;
* **migration rate** (per vCPU thread, and pooled): of the consecutive run
  periods of a vCPU thread (each begins when it is switched in after sleeping,
  i.e. after a halt that blocked), the share that begin on another CPU than
  the previous one; also the thread's ``sched_migrate_task`` count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The tracepoints a recording enables for the scheduler (under ``events/``).
SCHED_EVENTS = ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_wakeup_new",
                "sched/sched_migrate_task")
#: The recording's file of these lines.
SCHED_TRACE = "sched.trace"
#: Roles of a recorded thread (``meta["threads"][i]["role"]``).
ROLES = ("vcpu", "injector", "main")
#: The role pairs ``preemption_rate`` reports first (waker role -> running role).
ROLE_PAIRS = ("injector->vcpu", "vcpu->injector", "vcpu->vcpu")

SWITCH, WAKEUP, MIGRATE = "switch", "wakeup", "migrate"

_HEAD = re.compile(r"^\s*(?P<task>.+?)-(?P<tid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]"
                   r"(?:\s+(?P<flags>[^\s:]{4,6}))?\s+(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s"
                   r"(?P<body>.*)$")
_SWITCH = re.compile(r"prev_comm=(?P<prev_comm>.*?) prev_pid=(?P<prev_pid>-?\d+) "
                     r"prev_prio=(?P<prev_prio>-?\d+) prev_state=(?P<prev_state>\S+) ==> "
                     r"next_comm=(?P<next_comm>.*?) next_pid=(?P<next_pid>-?\d+) "
                     r"next_prio=(?P<next_prio>-?\d+)\s*$")
_WAKE = re.compile(r"comm=(?P<comm>.*?) pid=(?P<pid>-?\d+) prio=(?P<prio>-?\d+)"
                   r"(?: success=\d+)? target_cpu=(?P<target>\d+)\s*$")
_MIGRATE = re.compile(r"comm=(?P<comm>.*?) pid=(?P<pid>-?\d+) prio=(?P<prio>-?\d+) "
                      r"orig_cpu=(?P<orig>\d+) dest_cpu=(?P<dest>\d+)\s*$")


class SchedTraceError(ValueError):
    """A sched trace line that does not parse; the message names the line."""


@dataclass(frozen=True)
class SchedEvent:
    """One scheduler event.

    ``switch``: on ``cpu``, ``pid`` (prev) leaves in ``prev_state`` (``R``/``R+``:
    still runnable, preempted; anything else: it sleeps) and ``next_pid`` runs
    (0: idle).  ``wakeup``: ``pid`` is woken onto ``target_cpu``.  ``migrate``:
    ``pid`` moves from ``orig_cpu`` to ``target_cpu``.  From a trace line also
    ``by``, the task the event was logged in (the line's ``<comm>-<pid>``), and
    ``flags``, the line's latency flags (``d..2.``, ``dNh3.``, ...; "" where
    unknown), which ``need_resched`` reads.
    """

    ts: int                    # ns (the trace's CLOCK_MONOTONIC, or model time)
    cpu: int                   # the CPU the event was logged on
    kind: str
    pid: int
    next_pid: int = -1
    prev_state: str = ""
    target_cpu: int = -1
    orig_cpu: int = -1
    by: int = -1
    flags: str = ""

    @property
    def need_resched(self) -> bool | None:
        """TIF_NEED_RESCHED was set when the line was logged (flag ``N``): for a
        wake-up logged on its target CPU, the kernel's wake-up preemption decision
        (``wakeup_preempt()`` runs just before the tracepoint).  None: no flags."""
        return ("N" in self.flags[:2]) if self.flags else None

    @property
    def sleeps(self) -> bool:
        """A switch whose prev thread leaves to sleep (not preempted)."""
        return self.kind == SWITCH and not self.prev_state.startswith("R")


def _ts_ns(text: str) -> int:
    sec, _, frac = text.partition(".")
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


def parse_line(line: str, line_no: int = 0) -> SchedEvent | None:
    """One line of trace text as a ``SchedEvent``; None for other events and comments."""
    if not line.strip() or line.startswith("#"):
        return None
    m = _HEAD.match(line)
    if m is None:
        return None
    ev = m.group("event")
    body = m.group("body")
    ts, cpu = _ts_ns(m.group("ts")), int(m.group("cpu"))
    ctx = {"by": int(m.group("tid")), "flags": m.group("flags") or ""}
    if ev == "sched_switch":
        b = _SWITCH.match(body)
        if b is None:
            raise SchedTraceError(f"line {line_no}: sched_switch fields do not parse: {body!r}")
        return SchedEvent(ts, cpu, SWITCH, int(b.group("prev_pid")),
                          next_pid=int(b.group("next_pid")), prev_state=b.group("prev_state"),
                          **ctx)
    if ev in ("sched_wakeup", "sched_wakeup_new"):
        b = _WAKE.match(body)
        if b is None:
            raise SchedTraceError(f"line {line_no}: {ev} fields do not parse: {body!r}")
        return SchedEvent(ts, cpu, WAKEUP, int(b.group("pid")), target_cpu=int(b.group("target")),
                          **ctx)
    if ev == "sched_migrate_task":
        b = _MIGRATE.match(body)
        if b is None:
            raise SchedTraceError(f"line {line_no}: sched_migrate_task fields do not parse: "
                                  f"{body!r}")
        return SchedEvent(ts, cpu, MIGRATE, int(b.group("pid")), target_cpu=int(b.group("dest")),
                          orig_cpu=int(b.group("orig")), **ctx)
    return None


def parse(text: str) -> list[SchedEvent]:
    """Every sched event of a trace text, in the order of the text."""
    out = []
    for no, line in enumerate(text.splitlines(), start=1):
        e = parse_line(line, no)
        if e is not None:
            out.append(e)
    return out


def format_line(e: SchedEvent, comm: dict[int, str]) -> str:
    """``e`` as the kernel prints it (the inverse of ``parse_line``; the time truncated
    to the microsecond as in the trace text, priority 120, flags ``d..2.``, or
    its own ``flags`` if it has them; logged in task ``by``, or ``pid`` where ``by``
    is unknown).  ``comm``: pid -> task name (pid 0: ``swapper/<cpu>``)."""
    def name(pid):
        return f"swapper/{e.cpu}" if pid == 0 else comm.get(pid, f"task{pid}")
    by = e.by if e.by >= 0 else e.pid
    flags = e.flags or "d..2."
    head = (f"{name(by):>16}-{by:<7} [{e.cpu:03d}] {flags} "
            f"{e.ts // 1_000_000_000:5d}.{e.ts // 1000 % 1_000_000:06d}: ")
    if e.kind == SWITCH:
        return (head + f"sched_switch: prev_comm={name(e.pid)} prev_pid={e.pid} prev_prio=120 "
                f"prev_state={e.prev_state} ==> next_comm={name(e.next_pid)} "
                f"next_pid={e.next_pid} next_prio=120")
    if e.kind == WAKEUP:
        return (head + f"sched_wakeup: comm={name(e.pid)} pid={e.pid} prio=120 "
                f"target_cpu={e.target_cpu:03d}")
    if e.kind == MIGRATE:
        return (head + f"sched_migrate_task: comm={name(e.pid)} pid={e.pid} prio=120 "
                f"orig_cpu={e.orig_cpu} dest_cpu={e.target_cpu}")
    raise ValueError(f"unknown sched event kind {e.kind!r}")


def involves(e: SchedEvent, pids: set[int]) -> bool:
    return e.pid in pids or (e.kind == SWITCH and e.next_pid in pids)


def filter_sched(text: str, pids: set[int]) -> tuple[str, int, int]:
    """Keep the header and the sched lines of ``pids`` (a switch from or to one of them);
    returns (text, kept, dropped).  Lines of other events are dropped."""
    out, kept, dropped = [], 0, 0
    for no, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            out.append(line)
            continue
        if not line.strip():
            continue
        e = parse_line(line, no)
        if e is not None and involves(e, pids):
            out.append(line)
            kept += 1
        else:
            dropped += 1
    return "\n".join(out) + "\n", kept, dropped


@dataclass
class SchedTrace:
    """Sched events and the threads they are about (``meta["threads"]`` rows)."""

    events: list[SchedEvent]
    threads: list[dict]
    pinned: bool | None = None

    def roles(self) -> dict[int, str]:
        return {int(t["tid"]): t["role"] for t in self.threads}

    def vcpu_tids(self) -> dict[int, int]:
        """tid -> vCPU index of the vCPU threads."""
        return {int(t["tid"]): int(t["vcpu"]) for t in self.threads if t["role"] == "vcpu"}


def load_sched(path: str | Path) -> SchedTrace | None:
    """A recording folder's sched trace and threads table (None: recorded without it)."""
    import json
    path = Path(path)
    meta = json.loads((path / "metadata.json").read_text())
    tp = path / SCHED_TRACE
    if "threads" not in meta or not tp.exists():
        return None
    return SchedTrace(sorted(parse(tp.read_text()), key=lambda e: e.ts), meta["threads"],
                      meta.get("pinned"))


def _events_roles(trace_or_events, roles):
    if isinstance(trace_or_events, SchedTrace):
        return trace_or_events.events, (roles or trace_or_events.roles())
    if roles is None:
        raise ValueError("roles (tid -> role) are needed with a plain event list")
    return list(trace_or_events), roles


def preemption_rate(events, roles: dict[int, str] | None = None) -> dict:
    """Wake-up preemption between recorded threads (module docstring), per role pair.

    ``events``: a ``SchedTrace`` or a time-ordered list of ``SchedEvent`` (then
    ``roles``: tid -> role).  Returns ``{pair: {"wakeups", "preempted", "rate"}}`` for
    ``ROLE_PAIRS`` (always present; rate None without wake-ups) and any other pair seen.
    """
    events, roles = _events_roles(events, roles)
    curr: dict[int, int] = {}                       # cpu -> running pid
    pending: dict[int, tuple[int, int, str]] = {}   # woken A -> (cpu, B, pair)
    counts = {p: [0, 0] for p in ROLE_PAIRS}

    def settle(a: int, won: bool) -> None:
        cpu, b, pair = pending.pop(a)
        c = counts.setdefault(pair, [0, 0])
        c[0] += 1
        c[1] += int(won)

    for e in events:
        if e.kind == WAKEUP:
            if e.pid in pending:
                continue                             # already waiting on its first wake-up
            b = curr.get(e.target_cpu)
            if e.pid in roles and b in roles and b != e.pid:
                pending[e.pid] = (e.target_cpu, b, f"{roles[e.pid]}->{roles[b]}")
        elif e.kind == SWITCH:
            # B going to sleep decides first: a switch from a sleeping B to A is A
            # getting a CPU B left, not a preemption.
            if e.sleeps:
                for a in [a for a, (_, b, _) in pending.items() if b == e.pid]:
                    settle(a, False)
            n = e.next_pid
            if n in pending:
                settle(n, pending[n][0] == e.cpu)
            curr[e.cpu] = n
    return {p: {"wakeups": w, "preempted": k, "rate": k / w if w else None}
            for p, (w, k) in counts.items()}


def busy_landing_rate(trace: SchedTrace, host_cpus: int) -> dict:
    """Wake placement against idle CPUs: of the wake-ups of unpinned vCPU threads
    (``cpu`` None in the threads table) made while some host CPU was idle, the
    share placed on a CPU where another recorded thread was running.  Upstream's
    ``select_task_rq_fair()`` takes an idle CPU then, but for a waker's CPU that a
    sync wake-up finds otherwise empty; the vendor's vCPU packing does not
    (docs/design.md, "Placement").  A CPU is idle from a switch to the idle task
    (pid 0, or ``IDLE_PID`` in a model's trace) until the next switch on it; one
    running a task that is not recorded is not idle.  Returns ``{"wakeups",
    "onto_busy", "rate"}`` (rate None without wake-ups)."""
    unpinned = {int(t["tid"]) for t in trace.threads
                if t["role"] == "vcpu" and t.get("cpu") is None}
    recorded = {int(t["tid"]) for t in trace.threads}
    curr = {c: 0 for c in range(host_cpus)}           # every CPU idle until seen
    n = busy = 0
    for e in trace.events:
        if e.kind == SWITCH:
            curr[e.cpu] = e.next_pid
        elif e.kind == WAKEUP and e.pid in unpinned:
            if any(p in (0, IDLE_PID) for c, p in curr.items() if c != e.target_cpu):
                n += 1
                p = curr.get(e.target_cpu, 0)
                busy += p in recorded and p != e.pid
    return {"wakeups": n, "onto_busy": busy, "rate": busy / n if n else None}


def migration_rate(events, vcpus: dict[int, int] | None = None) -> dict:
    """Run periods of each vCPU thread starting on another CPU than its previous one.

    ``events``: a ``SchedTrace`` or a time-ordered ``SchedEvent`` list (then ``vcpus``:
    tid -> vCPU index).  Returns ``{"per_vcpu": [{"vcpu", "tid", "periods", "moved",
    "rate", "migrations"}], "pooled": {"periods", "moved", "rate", "migrations"}}``;
    ``periods`` counts the pairs of consecutive run periods compared.
    """
    if isinstance(events, SchedTrace):
        vcpus = vcpus or events.vcpu_tids()
        events = events.events
    elif vcpus is None:
        raise ValueError("vcpus (tid -> vCPU index) are needed with a plain event list")
    asleep = {t: True for t in vcpus}
    last_cpu: dict[int, int] = {}
    pairs = {t: [0, 0, 0] for t in vcpus}          # compared, moved, sched_migrate_task
    for e in events:
        if e.kind == SWITCH:
            if e.pid in vcpus and e.sleeps:
                asleep[e.pid] = True
            t = e.next_pid
            if t in vcpus and asleep[t]:
                asleep[t] = False
                if t in last_cpu:
                    pairs[t][0] += 1
                    pairs[t][1] += int(last_cpu[t] != e.cpu)
                last_cpu[t] = e.cpu
        elif e.kind == MIGRATE and e.pid in vcpus:
            pairs[e.pid][2] += 1
    rows = []
    for t, v in sorted(vcpus.items(), key=lambda kv: kv[1]):
        n, m, mig = pairs[t]
        rows.append({"vcpu": v, "tid": t, "periods": n, "moved": m,
                     "rate": m / n if n else None, "migrations": mig})
    n = sum(r["periods"] for r in rows)
    m = sum(r["moved"] for r in rows)
    return {"per_vcpu": rows,
            "pooled": {"periods": n, "moved": m, "rate": m / n if n else None,
                       "migrations": sum(r["migrations"] for r in rows)}}


# ---------------------------------------------------------------- the model's side

def _on_cpu(state: int) -> bool:
    from ..model import ThreadState
    return state in (ThreadState.RUNNING, ThreadState.POLLING, ThreadState.USER)


def from_timeline(host_or_timeline, threads: list[dict] | None = None) -> SchedTrace:
    """The ``SchedEvent`` form of a model run's state timeline.

    ``host_or_timeline``: a ``Host`` run with ``timeline_capacity`` (its
    ``timeline_array()``; the threads table then lists every vCPU of its VMs as
    ``vcpu``, numbered across VMs, with tid = the host thread index g) or a
    ``TIMELINE_DTYPE`` array (then give ``threads``, tid = g).  A thread state change
    becomes: to RUNNING/POLLING/USER from off-CPU: a switch in (``next_pid`` g, after
    a switch out of whatever the CPU ran); to BLOCKED: a switch out, sleeping (``S``);
    to RUNNABLE from on-CPU: a switch out, preempted (``R``); to RUNNABLE from BLOCKED,
    or as a thread's first record (its first entry into KVM_RUN, a host thread's
    start: ``sched_wakeup_new``): a wake-up onto the record's CPU; a record on
    another CPU than the thread's
    previous one: a migration.  Idle is ``IDLE_PID`` (-1: the model's thread 0 is a
    vCPU, so 0 cannot stand for the idle task as in the kernel's trace).
    """
    from ..model import ThreadState
    if hasattr(host_or_timeline, "timeline_array"):
        host = host_or_timeline
        tl = host.timeline_array()
        if threads is None:
            threads, i = [], 0
            for vm in host.vms:
                for v in vm.vcpus:
                    threads.append({"tid": int(v._g), "role": "vcpu", "vcpu": i, "cpu": None})
                    i += 1
    else:
        tl = np.asarray(host_or_timeline)
        if threads is None:
            raise ValueError("threads are needed with a plain timeline array")
    idle = IDLE_PID
    state: dict[int, int] = {}
    cpu_of: dict[int, int] = {}
    curr: dict[int, int] = {}
    out: list[SchedEvent] = []
    blocked = int(ThreadState.BLOCKED)
    runnable = int(ThreadState.RUNNABLE)
    for t, g, cpu, s in zip(tl["t"].tolist(), tl["g"].tolist(), tl["cpu"].tolist(),
                            tl["state"].tolist()):
        prev = state.get(g)
        was_on = prev is not None and _on_cpu(prev)
        if g in cpu_of and cpu_of[g] != cpu:
            out.append(SchedEvent(t, cpu, MIGRATE, g, target_cpu=cpu, orig_cpu=cpu_of[g]))
        if _on_cpu(s):
            if not was_on:
                if prev == blocked:
                    out.append(SchedEvent(t, cpu, WAKEUP, g, target_cpu=cpu))
                p = curr.get(cpu, idle)
                if p != idle and p != g:
                    out.append(SchedEvent(t, cpu, SWITCH, p, next_pid=idle, prev_state="R"))
                out.append(SchedEvent(t, cpu, SWITCH, idle, next_pid=g, prev_state="R"))
                curr[cpu] = g
        elif s == blocked:
            if was_on and curr.get(cpu_of.get(g, cpu)) == g:
                c = cpu_of.get(g, cpu)
                out.append(SchedEvent(t, c, SWITCH, g, next_pid=idle, prev_state="S"))
                curr[c] = idle
        elif s == runnable:
            if was_on and curr.get(cpu_of.get(g, cpu)) == g:
                c = cpu_of.get(g, cpu)
                out.append(SchedEvent(t, c, SWITCH, g, next_pid=idle, prev_state="R"))
                curr[c] = idle
            elif prev == blocked or prev is None:
                out.append(SchedEvent(t, cpu, WAKEUP, g, target_cpu=cpu))
        state[g] = s
        cpu_of[g] = cpu
    return SchedTrace(out, threads, None)


#: The idle task in ``from_timeline``'s events (the model's thread indices start at 0).
IDLE_PID = -1


def figures(trace: SchedTrace) -> dict:
    """Both rates of one trace (a recording's ``load_sched`` or a model's ``from_timeline``),
    as compare puts them side by side: ``{"preemption": ..., "migration": ...}``."""
    return {"preemption": preemption_rate(trace), "migration": migration_rate(trace)}
