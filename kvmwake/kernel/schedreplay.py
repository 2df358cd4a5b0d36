"""The model's EEVDF rules replayed on the kernel's own scheduler trace.

``compare`` holds the model's whole run against the kernel's; this module holds
the scheduler's rules alone against the kernel's decisions, with the kernel's own
timing.  A recording's ``sched.trace`` (``schedtrace``) says, per host CPU, when
each recorded thread was woken, got the CPU, was preempted or slept.  Driving the
reference engine's EEVDF functions (``kvmwake.reference.host``: ``update_curr``,
``place_entity``, ``update_entity_lag``, the delayed dequeue, ``pick_eevdf``,
``pick_next_task_fair``) with those times rebuilds each CPU's run queue of the
recording's threads (vruntime, lag, deadline, the delayed flag).  Then:

* at each wake-up of a recorded thread A onto a CPU where another recorded thread
  B runs, ``check_preempt_wakeup_fair`` says whether A preempts B.  The kernel's
  answer is in the trace twice: its *decision*, where the wake-up was logged on
  the target CPU (by B, or in an interrupt there), is the line's need-resched
  flag (``N``, set by ``wakeup_preempt()`` just before the tracepoint); its
  *outcome* is what ``schedtrace.preemption_rate`` reads (A switched in there
  before B sleeps: a B that sleeps first, say a polling vCPU that stops polling
  on need_resched and blocks, was not preempted whatever the decision).  Both
  rules are asked: upstream's (the pick among every queued thread) and
  ``preempt_skips_delayed``'s (the pick among those that are not delayed-dequeue
  sleepers);
* at each switch to a recorded thread after the CPU's current one left,
  ``pick_next_task_fair`` says which thread runs next; the trace says which did.

``replay(trace, host_cpus)`` returns, per role pair, the kernel's preemption rate,
each rule's, and how often each rule agrees with the kernel's outcome (with the
2 x 2 counts) and with its decision; and the picks that agree.  ``kvmwake kernel sched-replay DIR`` prints it.

Simplifications (each a source of disagreement that is not the rules'): the
recorder's threads share one task group (one session: one autogroup), so the run
queue holds them alone, and a foreign task (another group) only takes the CPU
from them; ``rq_clock_task`` is taken as the trace's clock (no steal or IRQ time
subtracted); ``update_curr`` runs at the traced events, and at the ticks it
accounts for between them (``reference.host.update_curr``), whose phase the
trace does not give (the model's HZ=250 grid is used).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from ..model import sched_base_slice
from ..reference import host as H
from . import schedtrace as ST

#: The rules asked at each wake-up: upstream's, and preempt_skips_delayed's.
RULES = ("upstream", "skips_delayed")


@dataclass
class _Entity:
    """A recorded thread's sched_entity, as reference.host's functions use it."""
    g: int
    vruntime: int = 0
    deadline: int = 0
    vlag: int = 0
    vprot: int = 0
    exec_start: int = 0
    on_rq: bool = False
    sched_delayed: bool = False


@dataclass
class _Rq:
    """The run queues of the recorded threads, in reference.host's terms."""
    threads: list
    cpus: list
    base_slice: int
    where: dict = field(default_factory=dict)     # g -> the CPU it is queued on


def _enqueue(e: _Rq, c: int, th: _Entity, t: int) -> None:
    """enqueue_entity(ENQUEUE_WAKEUP) of a thread that is not queued onto CPU ``c``
    (on an empty queue place_entity() puts it at V, as the engines' idle-CPU path)."""
    H.enqueue_entity(e, e.cpus[c], th, t)
    e.where[th.g] = c


def _dequeue(e: _Rq, th: _Entity, t: int) -> None:
    """A queued thread leaves its CPU's queue with its lag (a migration)."""
    cpu = e.cpus[e.where[th.g]]
    if th.sched_delayed:
        H.finish_delayed_dequeue(e, cpu, th.g)
        return
    if cpu.cur >= 0:
        H.update_curr(e, cpu, t)
    H.update_entity_lag(e, cpu, th)
    cpu.sum_v -= th.vruntime - cpu.zero_v
    H.rq_remove(e, cpu, th.g)
    th.on_rq = False


def _wake(e: _Rq, c: int, th: _Entity, t: int) -> None:
    """try_to_wake_up() of ``th`` onto CPU ``c``: a delayed sleeper there is requeued
    in place (requeue_delayed_entity); one delayed elsewhere is dequeued there first."""
    if th.on_rq and e.where.get(th.g) == c:
        if th.sched_delayed:
            H.requeue_delayed_entity(e, e.cpus[c], th)
        return
    if th.on_rq:
        _dequeue(e, th, t)
    _enqueue(e, c, th, t)


def _put_back(e: _Rq, c: int, t: int) -> None:
    """The CPU's current thread stays queued but leaves the CPU (put_prev_entity)."""
    cpu = e.cpus[c]
    H.update_curr(e, cpu, t)
    cpu.runq.append(cpu.cur)
    cpu.cur = -1


def _decide(e: _Rq, cpu, g: int, t: int) -> dict:
    """check_preempt_wakeup_fair() under each rule: does g preempt the current thread?"""
    resched = H.update_curr(e, cpu, t)
    return {"upstream": resched or H.pick_eevdf(e, cpu) == g,
            "skips_delayed": resched or H.pick_eevdf(e, cpu, True) == g}


def replay(trace: ST.SchedTrace, host_cpus: int, base_slice: int | None = None) -> dict:
    """The rules against the kernel's decisions (module docstring).

    ``host_cpus`` sets the base slice (``model.sched_base_slice``) unless
    ``base_slice`` is given.  Returns ``{"pairs": {pair: {"n", "kernel_rate",
    "decided", "kernel_decided_rate", "<rule>_rate", "<rule>_agree",
    "<rule>_agree_decided", "<rule>_counts": {"both", "rule_only", "kernel_only",
    "neither"}, "counts": the raw counts}}, "picks": {"n", "agreed", "agree"},
    "placement": schedtrace.busy_landing_rate(...)}``.
    """
    roles = trace.roles()
    pids = sorted(roles)
    g_of = {p: i for i, p in enumerate(pids)}
    ncpu = max([host_cpus] + [ev.cpu + 1 for ev in trace.events]
               + [ev.target_cpu + 1 for ev in trace.events])
    e = _Rq([_Entity(i) for i in range(len(pids))], [H._Cpu() for _ in range(ncpu)],
            sched_base_slice(host_cpus) if base_slice is None else int(base_slice))
    pending: dict[int, tuple] = {}      # woken pid -> (cpu, running pid, pair, decisions)
    counts: dict[str, dict] = {}
    picks = [0, 0]

    def row(pair: str) -> dict:
        return counts.setdefault(pair, {"n": 0, "kernel": 0, "decided": 0, "kernel_decided": 0,
                                        **{r: [0, 0, 0, 0] for r in RULES},
                                        **{r + "_decided": 0 for r in RULES}})

    def settle(a: int, won: bool) -> None:
        c, b, pair, dec = pending.pop(a)
        k = row(pair)
        k["n"] += 1
        k["kernel"] += won
        for r in RULES:
            k[r][(0 if dec[r] else 2) + (0 if won else 1)] += 1

    for ev in trace.events:
        t = ev.ts
        if ev.kind == ST.WAKEUP:
            if ev.pid not in g_of:
                continue
            th = e.threads[g_of[ev.pid]]
            c = ev.target_cpu
            _wake(e, c, th, t)
            cpu = e.cpus[c]
            if cpu.cur >= 0 and cpu.cur != th.g and ev.pid not in pending:
                b = pids[cpu.cur]
                pair = f"{roles[ev.pid]}->{roles[b]}"
                dec = _decide(e, cpu, th.g, t)
                pending[ev.pid] = (c, b, pair, dec)
                if ev.cpu == c and ev.need_resched is not None:
                    k = row(pair)           # the kernel's decision, logged on the CPU
                    k["decided"] += 1
                    k["kernel_decided"] += ev.need_resched
                    for r in RULES:
                        k[r + "_decided"] += dec[r] == ev.need_resched
        elif ev.kind == ST.MIGRATE:
            if ev.pid not in g_of:
                continue
            th = e.threads[g_of[ev.pid]]
            c0 = e.where.get(th.g)
            if th.on_rq and c0 is not None and e.cpus[c0].cur != th.g:
                delayed = th.sched_delayed
                _dequeue(e, th, t)
                if not delayed:
                    _enqueue(e, ev.target_cpu, th, t)
            e.where[th.g] = ev.target_cpu
        elif ev.kind == ST.SWITCH:
            c = ev.cpu
            cpu = e.cpus[c]
            prev, nxt = ev.pid, ev.next_pid
            if prev in g_of and cpu.cur == g_of[prev]:
                if ev.sleeps:
                    H.dequeue_sleep(e, cpu, e.threads[cpu.cur], t)
                    for a in [a for a, d in pending.items() if d[1] == prev]:
                        settle(a, False)
                else:
                    _put_back(e, c, t)
            elif cpu.cur >= 0:
                _put_back(e, c, t)           # a thread the trace lost track of
            if nxt in g_of:
                th = e.threads[g_of[nxt]]
                if nxt in pending:
                    settle(nxt, pending[nxt][0] == c)
                if not (th.on_rq and e.where.get(th.g) == c):
                    _wake(e, c, th, t)       # its wake-up is not in the trace
                x = H.pick_next_task_fair(e, cpu)
                picks[0] += 1
                picks[1] += x == th.g
                if th.g in cpu.runq:
                    H.rq_remove(e, cpu, th.g)
                th.sched_delayed = False
                cpu.cur = th.g
                th.exec_start = t
                th.vprot = th.deadline
            elif nxt in (0, ST.IDLE_PID):
                # Idle: pick_next_task_fair() found nothing of the group to run, so
                # its delayed sleepers there were dequeued on the way.
                H.pick_next_task_fair(e, cpu)
    return {"pairs": {pair: _row(k) for pair, k in sorted(counts.items()) if k["n"]},
            "picks": _picks(*picks),
            "placement": ST.busy_landing_rate(trace, host_cpus)}


def _picks(n: int, agreed: int) -> dict:
    return {"n": n, "agreed": agreed, "agree": agreed / n if n else None}


def _row(k: dict) -> dict:
    """One role pair's figures from its raw counts (``replay``'s, or ``pooled``'s sums):
    the counts are kept (``counts``) so that recordings can be summed."""
    n, d = k["n"], k["decided"]
    res = {"n": n, "kernel_rate": k["kernel"] / n, "decided": d,
           "kernel_decided_rate": k["kernel_decided"] / d if d else None, "counts": k}
    for r in RULES:
        both, rule_only, kernel_only, neither = k[r]
        res[f"{r}_rate"] = (both + rule_only) / n
        res[f"{r}_agree"] = (both + neither) / n
        res[f"{r}_counts"] = {"both": both, "rule_only": rule_only,
                              "kernel_only": kernel_only, "neither": neither}
        res[f"{r}_agree_decided"] = k[r + "_decided"] / d if d else None
    return res


def replay_recording(path) -> dict:
    """``replay`` on a recording folder's scheduler trace (its host CPU count)."""
    from .recording import load
    rec = load(path)
    trace = ST.load_sched(rec.path)
    if trace is None:
        raise ValueError(f"{rec.path}: the recording has no scheduler trace "
                         f"({ST.SCHED_TRACE}); record with --sched-trace")
    return {"recording": str(rec.path), "host_cpus": int(rec.meta["host_cpus"]),
            **replay(trace, int(rec.meta["host_cpus"]))}


def format_report(r: dict, min_n: int = 1) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"
    lines = [f"{r.get('recording', 'trace')}: the EEVDF rules on the kernel's own timing",
             "  preempted: the kernel's outcome, each rule's rate and agreement; decided: "
             "wake-ups whose decision the trace shows (N), the kernel's rate and each "
             "rule's agreement",
             f"  {'wake-up':<16} {'n':>5} {'kernel':>6} "
             + " ".join(f"{x:>14} {'agree':>5}" for x in RULES)
             + f" | {'decided':>7} {'kernel':>6} " + " ".join(f"{x:>14}" for x in RULES)]
    for pair, row in r["pairs"].items():
        if row["n"] < min_n:
            continue
        lines.append(f"  {pair:<16} {row['n']:>5} {pct(row['kernel_rate']):>6} "
                     + " ".join(f"{pct(row[x + '_rate']):>14} {pct(row[x + '_agree']):>5}"
                                for x in RULES)
                     + f" | {row['decided']:>7} {pct(row['kernel_decided_rate']):>6} "
                     + " ".join(f"{pct(row[x + '_agree_decided']):>14}" for x in RULES))
    p = r["picks"]
    if p["n"]:
        lines.append(f"  picks after a switch: {p['agree']:.1%} of {p['n']} agree")
    pl = r.get("placement") or {}
    if pl.get("wakeups"):
        lines.append(f"  placement: of {pl['wakeups']} wake-ups of unpinned vCPU threads "
                     f"with another CPU idle, {pl['rate']:.0%} onto a CPU running a "
                     f"recorded thread (schedtrace.busy_landing_rate)")
    return "\n".join(lines)


def pooled(results: list[dict]) -> dict:
    """``replay`` results of several recordings summed per role pair: the kernel's
    and each rule's rates and agreements over all their wake-ups (and picks, and
    the placement counts)."""
    acc: dict[str, dict] = {}
    for r in results:
        for pair, row in r["pairs"].items():
            k = row["counts"]
            a = acc.setdefault(pair, {key: [0] * len(v) if isinstance(v, list) else 0
                                      for key, v in k.items()})
            for key, v in k.items():
                a[key] = [x + y for x, y in zip(a[key], v)] if isinstance(v, list) \
                    else a[key] + v
    n = sum(r["placement"]["wakeups"] for r in results)
    busy = sum(r["placement"]["onto_busy"] for r in results)
    return {"recording": f"{len(results)} recordings pooled",
            "pairs": {pair: _row(k) for pair, k in sorted(acc.items())},
            "picks": _picks(sum(r["picks"]["n"] for r in results),
                            sum(r["picks"]["agreed"] for r in results)),
            "placement": {"wakeups": n, "onto_busy": busy, "rate": busy / n if n else None}}


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="recording folders")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--pooled", action="store_true",
                   help="also sum the recordings' wake-ups per role pair (the last report)")
    p.add_argument("--min-n", type=int, default=20,
                   help="leave out role pairs with fewer wake-ups (default 20)")
    return p


def main(args) -> int:
    out = []
    for d in args.dirs:
        try:
            out.append(replay_recording(d))
        except (OSError, ValueError) as exc:
            print(f"kvmwake kernel sched-replay: {exc}", file=sys.stderr)
            return 2
    if args.pooled:
        out.append(pooled(out))
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=1))
    else:
        print("\n".join(format_report(r, args.min_n) for r in out))
    return 0
