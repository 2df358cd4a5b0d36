"""reference/bench.py (twin: kvmwake/core/bench.pxi).
Mirrors: no kernel code; micro-benchmark hooks that leave the model
untouched.

The core's micro-benchmark hooks, in plain Python: each runs its loop and
returns the elapsed wall time in ns (``time.perf_counter_ns``), so that a
benchmark can set a cost per operation of the reference beside the core's.
Nothing here is used by the engine itself, and none of it changes the
model: a hook either works on private state or puts a real Engine back
exactly as it found it.

bench_heap(n, seed)            n heap_push of pseudo-random times into an
                               empty queue, then pop them all (order checked)
bench_wake_scan(engine, g, n)  the wake condition of one vCPU (the vGIC scan)
bench_vm_scan(engine, vm, n)   the wake condition of every vCPU of a VM
bench_kick(engine, g, n)       reschedule IPI + kvm_vcpu_kick of a BLOCKED vCPU
bench_halt_path(n, poll)       a 2-vCPU engine: n complete halts of vCPU 0,
                               each ended by vCPU 1's wake
bench_counters(engine)         the event queue's counters
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from ..model import RESUME_HALT, S_WAKEUP, ThreadState
from . import gic, queue
from .engine import Engine, run_loop
from .rng import M64, fmix64, splitmix64

_BLOCKED, _RUNNABLE = ThreadState.BLOCKED, ThreadState.RUNNABLE


def _bench_now_ns() -> int:
    return time.perf_counter_ns()


def bench_heap(n: int, seed: int = 0) -> int:
    """Push ``n`` events with pseudo-random times into an empty queue, pop them all.

    Works on a private queue (and sequence counter) whose one thread, VM and
    source own every event, so that none is void.  Every popped event is
    checked to come no earlier, in (time, class, sequence) order, than the
    one before; a disorder raises ``AssertionError``.  Returns the wall ns of
    the pushes and pops together.
    """
    e = SimpleNamespace(q=queue.EventQueue(), seq=0, vms=[SimpleNamespace(tick_gen=0)],
                        sources=[SimpleNamespace(gen=0)],
                        threads=[SimpleNamespace(timer_gen=0, run_gen=0, gen=0)])
    x = splitmix64(seed & M64)
    prev = None
    bad = False
    popped = 0
    t0 = _bench_now_ns()
    for i in range(n):
        x = fmix64((x + 0x9E3779B97F4A7C15) & M64)
        # Times within ~1.1 ms, so that equal times (ordered by class and
        # sequence) occur too; the class is one of the five.
        queue.heap_push(e, x & 0xFFFFF, (x >> 32) % 5, 0, 0)
    while e.q.len:
        ev = queue.heap_pop(e)
        if ev is None:
            continue
        if popped and queue.ev_before(ev, prev):
            bad = True
            break
        prev = ev
        popped += 1
    t1 = _bench_now_ns()
    if bad:
        raise AssertionError(f"the queue popped out of order after {popped} pops")
    if popped != n:
        raise AssertionError(f"{popped} events popped of {n} pushed")
    return t1 - t0


def bench_wake_scan(engine: Engine, g: int, n: int):
    """``n`` wake-condition checks (``kvm_arch_vcpu_runnable``) of thread ``g``.

    Read-only: the vGIC scan (or the LAPIC's) over whatever state the engine
    holds.  Returns (wall ns of the n scans, the answer).
    """
    if not 0 <= g < len(engine.threads):
        raise ValueError(f"no thread {g} (the engine has {len(engine.threads)})")
    th = engine.threads[g]
    runnable = gic.runnable
    hits = 0
    t0 = _bench_now_ns()
    for _ in range(n):
        hits += bool(runnable(engine, th))
    t1 = _bench_now_ns()
    return t1 - t0, hits == n


def bench_vm_scan(engine: Engine, vmi: int, n: int):
    """``n`` scans of the wake condition of every vCPU of VM ``vmi`` (read-only).

    Returns (wall ns of the n whole-VM scans, vCPUs found runnable in one scan).
    """
    if not 0 <= vmi < len(engine.vms):
        raise ValueError(f"no VM {vmi} (the engine has {len(engine.vms)})")
    vm = engine.vms[vmi]
    ths = engine.threads[vm.first:vm.first + vm.nr_vcpus]
    runnable = gic.runnable
    hits = 0
    t0 = _bench_now_ns()
    for _ in range(n):
        hits = 0
        for th in ths:
            hits += bool(runnable(engine, th))
    t1 = _bench_now_ns()
    return t1 - t0, hits


def bench_kick(engine: Engine, g: int, n: int) -> int:
    """The reschedule IPI + ``kvm_vcpu_kick`` of thread ``g``, ``n`` times.

    ``g`` must be BLOCKED in a halt on an idle host CPU, with nothing pending
    (e.g. a vCPU whose program is ``wfi`` with polling off, run past its
    halt): each iteration raises SGI 0 (arm64) or vector 0xFD (x86) and kicks
    it, which is ``kvm_vcpu_wake_up`` (the halt_wakeup stat, RUNNABLE) and
    ``try_to_wake_up`` (it takes the idle host CPU and its EV_RUN event is
    pushed).  Then the fields the kick changed are put back and the event is
    dropped, so the next iteration kicks the same blocked vCPU.

    The EV_RUN events go to a private queue emptied each time.  On return the
    engine is exactly as before.  Returns the wall ns of the n kicks.
    """
    e = engine
    if e.failed:
        raise ValueError("this engine stopped on an earlier error")
    if not 0 <= g < len(e.threads):
        raise ValueError(f"no thread {g} (the engine has {len(e.threads)})")
    th = e.threads[g]
    cpu = e.cpus[th.pcpu]
    if th.state != _BLOCKED or th.resume != RESUME_HALT or cpu.cur >= 0 \
            or gic.runnable(e, th):
        raise ValueError(f"thread {g} must be BLOCKED in a halt on an idle host CPU with "
                         f"nothing pending (state {int(th.state)}, host CPU {th.pcpu} "
                         f"runs {cpu.cur})")
    saved_th = {f: getattr(th, f)
                for cls in type(th).__mro__ for f in getattr(cls, "__slots__", ())}
    saved_lists = {f: list(v) for f, v in saved_th.items() if isinstance(v, list)}
    saved_cpu = (cpu.cur, list(cpu.runq))
    saved_wakeups = th.stats[S_WAKEUP]
    saved_q, saved_seq, saved_tlcap = e.q, e.seq, e.tl_cap
    req0, ap0, latch0, irr0 = th.requests, th.ap, th.priv_latch, th.irr
    priv = queue.EventQueue(e.now)      # a private queue, emptied after each kick
    e.q = priv
    e.tl_cap = 0                  # the kicks are undone: keep them off the timeline
    raise_irq = gic.raise_irq
    done = 0
    try:
        t0 = _bench_now_ns()
        for _ in range(n):
            rc = raise_irq(e, th, e.resched_irq, e.now)
            if rc or th.state != _RUNNABLE or priv.len != 1:
                break
            done += 1
            th.state = _BLOCKED
            th.requests = req0
            th.ap = ap0
            th.priv_latch = latch0
            th.irr = irr0
            cpu.cur = -1
            queue.q_clear(priv, e.now)
        t1 = _bench_now_ns()
    finally:
        e.tl_cap = saved_tlcap
        for f, v in saved_th.items():
            setattr(th, f, v)
        for f, v in saved_lists.items():
            getattr(th, f)[:] = v
        cpu.cur = saved_cpu[0]
        cpu.runq.clear()
        cpu.runq.extend(saved_cpu[1])
        th.stats[S_WAKEUP] = saved_wakeups
        e.q, e.seq = saved_q, saved_seq
    if done != n:
        raise AssertionError(f"kick {done} did not wake thread {g}")
    return t1 - t0


def bench_halt_path(n: int, poll: bool = False, seed: int = 0) -> int:
    """``n`` complete halts on a private 2-vCPU x86 engine (2 host CPUs).

    vCPU 0 loops ``n`` times over {compute 100 ns, HLT}; vCPU 1 loops ``n``
    times over {compute 10 us, wake vCPU 0}.  With ``poll`` false
    (halt_poll_ns = 0) every halt is the block path; with ``poll`` true
    (halt_poll_ns 200 us) the halts end in the poll window.  Runs the event
    loop until both programs end, checks that there were exactly ``n``
    halts, and returns the wall ns of the run.
    """
    from .. import guest as _g
    if not 1 <= n <= 0xFFFFFFFF:
        raise ValueError(f"n = {n} is out of range 1..2**32-1")
    eng = Engine("x86", 2, seed, None, 0)
    eng.halt_poll_ns = 200_000 if poll else 0
    eng.add_vm(2)
    eng.load_program(0, _g.Program([_g.loop([_g.compute(100), _g.wfi()], n)]).ops)
    eng.load_program(1, _g.Program([_g.loop([_g.compute(10_000), _g.wake(0)], n)]).ops)
    eng.start_vcpu(0)
    eng.start_vcpu(1)
    t0 = _bench_now_ns()
    eng._guard(run_loop, eng, 1 << 62, False)
    t1 = _bench_now_ns()
    if eng.halts != n:
        raise AssertionError(f"{eng.halts} halts, expected {n}")
    return t1 - t0


def bench_counters(engine: Engine) -> dict:
    """Read-only counters of an engine's event queue, for the benchmark reports.

    ``pushes`` events were pushed in all (cancelled ones included), ``heap_len``
    are still queued, and ``dropped`` were cancelled ones dropped unpopped, so
    ``pushes - heap_len - dropped`` were popped, of which ``events`` were live
    (the others were cancelled by a newer generation after they reached the
    queue's bucket 0).  The buckets are Python lists: ``heap_cap`` is their
    total length.
    """
    q = engine.q
    return {"pushes": engine.seq, "heap_len": q.len, "dropped": q.dropped,
            "heap_cap": q.len, "events": engine.events, "halts": engine.halts,
            "threads": len(engine.threads)}
