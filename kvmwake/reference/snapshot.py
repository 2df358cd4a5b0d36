"""reference/snapshot.py (twin: kvmwake/core/snapshot.pxi).
Mirrors: no kernel code; the state a VMM saves with KVM_GET_* ioctls, plus
the engine's own, out and in.

Engine state out and in.  ``engine_export`` deep-copies everything that
decides a reference engine's future into plain Python (dicts, lists, tuples,
ints); ``engine_import`` loads such a copy into an engine, which then goes on
exactly as the exported one would have.  The import checks every index and
link first (``check_state``, the checks of the core's ``_check_state`` and
``_check_links``) and raises ``EngineError`` naming the first inconsistency.
``engine_rehost`` moves the threads to another number of host CPUs as the
core's ``_engine_rehost`` does.
"""

from __future__ import annotations

import copy
from collections import deque

import numpy as np

from ..model import (
    CONT_EOI, CONT_IRQ, CONT_TRAP, HALT_MP_HALTED, LAT_BUCKETS, MAX_LOOP_DEPTH, MAX_NOW,
    MAX_NR_SPIS, MAX_SEQ, MAX_SPAN, MAX_TIME,
    NO_VM, NR_INTIDS, NR_STATS, OP_DTYPE, RESUME_HALT, RESUME_SEGMENT, RESUME_SLEEP,
    RESUME_START, S_BLOCKING, THREAD_HOST, THREAD_VCPU,
    EventClass, Op, SourceKind, ThreadState, sched_base_slice,
)
from ..uapi import PSR_I_BIT, SUPPORTED_VCPU_FEATURES, MpState, PsciVersion
from . import EngineError, halt, host, queue
from ..costs import COST_TABLE_N, DRAWN_COSTS, MAX_COST_NS
from .rng import COST_CONTEXT_SWITCH, cost_ns
from .engine import _Source, _Thread, _Vm

_USER, _RUNNING, _POLLING, _BLOCKED, _RUNNABLE = (
    ThreadState.USER, ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED,
    ThreadState.RUNNABLE)
_EV_TICK, _EV_SOURCE, _EV_TIMER, _EV_SEG, _EV_POLL, _EV_RUN, _EV_SLICE = (
    EventClass.TICK, EventClass.SOURCE, EventClass.TIMER, EventClass.SEGMENT,
    EventClass.POLL_END, EventClass.RUN, EventClass.SLICE)
_MAX_CPUS = 1 << 20

_MAX_VCPUS_PER_VM = 1024
_PSCI_VERSIONS = frozenset(int(v) for v in PsciVersion)

#: The fields of each state object, as exported (the random stream's included).
THREAD_FIELDS = _Thread.__slots__ + ("rng_state", "rng_inc")
VM_FIELDS = _Vm.__slots__
SOURCE_FIELDS = _Source.__slots__ + ("rng_state", "rng_inc")
#: Engine attributes exported in their own form; every other one is a scalar.
_STRUCTURED = frozenset({"costs", "cost_tabs", "cpus", "vms", "threads", "sources", "q",
                         "lat_hist", "trace", "timeline", "tl_base", "exits", "failed", "llc",
                         "held", "cur_key", "nlazy"})


def _index(x, n: int) -> bool:
    """``x`` is an int in 0..n-1."""
    return isinstance(x, int) and 0 <= x < n


# -- out and in ---------------------------------------------------------------------------

def engine_export(e) -> dict:
    """Everything that decides the engine's future, as a deep copy in plain Python."""
    if e.failed:
        raise EngineError("this engine stopped on an earlier error; it cannot be saved")
    state = {
        "engine": {k: v for k, v in vars(e).items() if k not in _STRUCTURED},
        "costs": e.costs,
        "cost_tabs": e.cost_tabs,
        "cpus": [{"cur": cpu.cur, "runq": list(cpu.runq), "zero_v": cpu.zero_v,
                  "sum_v": cpu.sum_v, "need_resched": cpu.need_resched} for cpu in e.cpus],
        "vms": [{f: getattr(vm, f) for f in VM_FIELDS} for vm in e.vms],
        "threads": [dict({f: getattr(th, f) for f in THREAD_FIELDS},
                         vm=th.vm.index if th.vm is not None else NO_VM)
                    for th in e.threads],
        "sources": [{f: getattr(s, f) for f in SOURCE_FIELDS} for s in e.sources],
        # The live events in (t, class, sequence) order: void ones are left out, so
        # that equal histories give equal states whatever the queue's layout.
        "heap": [ev for ev in e.q.events() if queue.ev_live(e, ev)],
        "lat_hist": e.lat_hist,
        "trace": {"capacity": e.trace.maxlen if e.trace is not None else 0,
                  "records": list(e.trace) if e.trace is not None else []},
        "timeline": list(e.timeline),
        "tl_base": e.tl_base,
        "exits": list(e.exits),
        "llc": list(e.llc),
    }
    return copy.deepcopy(state)


def engine_import(e, state: dict) -> None:
    """Load ``engine_export``'s output into ``e`` (whatever it held before).

    Raises ``EngineError`` naming the first inconsistency; the engine is then
    unusable (its ``failed`` flag stays set).
    """
    def restore(cls, fields, d: dict):
        obj = cls.__new__(cls)
        if set(d) != set(fields):
            raise EngineError(f"{cls.__name__.strip('_').lower()} fields "
                              f"{sorted(set(d) ^ set(fields))} missing or unknown")
        for f in fields:
            setattr(obj, f, d[f])
        return obj

    e.failed = True                    # until every check has passed
    try:
        s = copy.deepcopy(state)
        scalars = {k for k in vars(e) if k not in _STRUCTURED}
        if set(s["engine"]) != scalars:
            raise EngineError(f"engine fields {sorted(set(s['engine']) ^ scalars)} "
                              "missing or unknown")
        for k, v in s["engine"].items():
            setattr(e, k, v)
        e.costs = dict(s["costs"])
        e.cost_tabs = [list(t) for t in s["cost_tabs"]]
        e.cpus = []
        for c in s["cpus"]:
            cpu = host._Cpu()
            cpu.cur = c["cur"]
            cpu.runq = deque(c["runq"])
            cpu.zero_v, cpu.sum_v = c["zero_v"], c["sum_v"]
            cpu.need_resched = c["need_resched"]
            e.cpus.append(cpu)
        e.vms = [restore(_Vm, VM_FIELDS, d) for d in s["vms"]]
        e.threads = []
        for d in s["threads"]:
            th = restore(_Thread, THREAD_FIELDS, d)
            if th.vm == NO_VM and th.kind == THREAD_HOST:
                th.vm = None                # a host thread (hostthread.py) has no VM
            elif not _index(th.vm, len(e.vms)):
                raise EngineError(f"thread {len(e.threads)}: VM {th.vm!r} does not exist")
            else:
                th.vm = e.vms[th.vm]
            e.threads.append(th)
        e.sources = [restore(_Source, SOURCE_FIELDS, d) for d in s["sources"]]
        events = list(s["heap"])
        e.lat_hist = list(s["lat_hist"])
        cap = s["trace"]["capacity"]
        e.trace = deque(s["trace"]["records"], maxlen=cap) if cap else None
        if e.trace is None and s["trace"]["records"]:
            raise EngineError("a trace without a trace capacity")
        e.timeline = deque(s["timeline"])
        e.tl_base = list(s["tl_base"])
        e.exits = deque(s["exits"])
        e.llc = s["llc"]
        e.cur_key = 0                       # (run_loop's: not handling an event)
        e.nlazy = sum(1 for th in e.threads if th.poll_seq)     # derived
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EngineError(f"malformed engine state: {exc!r}") from None
    check_state(e, events=events)
    queue_imported(e, events)
    derive_held(e)
    e.failed = False


def queue_imported(e, events: list) -> None:
    """Queue the checked events of an imported state (any order: the queue orders them)."""
    e.q = queue.EventQueue(e.now)
    for ev in events:
        queue.q_insert(e.q, ev)


def state_events(e) -> list:
    """Every queued event (void ones included) in (t, class, sequence) order, after
    the queue's own check: what check_state checks of a running engine."""
    queue.q_check(e.q)
    return e.q.events()


def derive_held(e) -> None:
    """e.held from the state: the vCPU threads in userspace that are still their
    CPU's current thread (host.hold_cpu), in thread order; never stored."""
    e.held = [g for g, th in enumerate(e.threads) if host.is_held(e, th)]


def check_held(e) -> None:
    """e.held is what the state says (derive_held)."""
    want = [g for g, th in enumerate(e.threads) if host.is_held(e, th)]
    if e.held != want:
        raise EngineError(f"held threads {e.held}, but the state says {want}")


def engine_view(e):
    """Per VM (first thread, vCPUs, SPIs, KVM_CAP_HALT_POLL ceiling or None, tick,
    suspend cap), per thread (has a program, thread state), and the threads in
    the exit queue: what the core's ``_engine_view`` gives the restore checks."""
    vms = [(v.first, v.nr_vcpus, v.nr_spis, v.max_halt_poll_ns if v.override else None,
            v.tick_ns, bool(v.suspend_cap)) for v in e.vms]
    threads = [(th.prog is not None, int(th.state)) for th in e.threads]
    return vms, threads, list(e.exits)


def engine_exit_record(e, g: int) -> dict:
    """Thread g's last exit to userspace as take_exit() gives it, without taking it."""
    if not 0 <= g < len(e.threads):
        raise IndexError(f"thread {g} does not exist")
    th = e.threads[g]
    return {"reason": th.exit_reason, "type": th.exit_type, "ndata": th.exit_ndata,
            "data0": th.exit_data0, "ucall": th.exit_ucall, "value": th.exit_value,
            "time": th.exit_time}


# -- the checks ---------------------------------------------------------------------------

def check_cost_tables(e) -> None:
    """Every drawn cost's table (as the core's _check_cost_tables): whole, at most
    MAX_COST_NS, nondecreasing; its median is the cost's constant."""
    if not isinstance(e.cost_dist, int) or not 0 <= e.cost_dist < 1 << len(DRAWN_COSTS):
        raise EngineError(f"drawn-cost mask {e.cost_dist!r} names unknown costs")
    if not isinstance(e.cost_tabs, list) or len(e.cost_tabs) != len(DRAWN_COSTS):
        raise EngineError("the cost tables are not one per drawn cost")
    for c, name in enumerate(DRAWN_COSTS):
        tab = e.cost_tabs[c]
        if not isinstance(tab, list) or len(tab) != COST_TABLE_N \
                or not all(isinstance(v, int) for v in tab):
            raise EngineError(f"cost table {c}: not {COST_TABLE_N} integers")
        if not (e.cost_dist >> c) & 1:
            continue
        for k, v in enumerate(tab):
            if not 0 <= v <= MAX_COST_NS or (k and v < tab[k - 1]):
                raise EngineError(f"cost table {c}: value {k} ({v}) out of range "
                                  f"0..2**40 or below the one before")
        e.costs[name] = tab[COST_TABLE_N // 2]


def check_state(e, programs: bool = True, events: list | None = None) -> None:
    """Every index, count and link of the state, checked before the engine may run.

    ``programs`` False skips the programs' validation (a run cannot change them).

    Raises ``EngineError`` naming the first thing found wrong.
    """
    threads, vms, cpus, sources = e.threads, e.vms, e.cpus, e.sources
    nth, nvm, ncpu = len(threads), len(vms), len(cpus)
    if len(e.tl_base) != nth:
        raise EngineError("the timeline's base states disagree on the vCPU count")
    if len(e.lat_hist) != LAT_BUCKETS:
        raise EngineError(f"the latency histogram has {len(e.lat_hist)} buckets, "
                          f"not {LAT_BUCKETS}")
    if not 1 <= ncpu <= _MAX_CPUS:
        raise EngineError(f"host CPU count {ncpu} out of range")
    if bool(e.tracing) != (e.trace is not None):
        raise EngineError("tracing on without a trace ring, or off with one")
    if len(e.exits) > nth or not all(_index(g, nth) for g in e.exits):
        raise EngineError("exit queue names a thread that does not exist")
    if not isinstance(e.now, int) or e.now < 0 or not isinstance(e.seq, int) or e.seq < 0:
        raise EngineError("clock or sequence number out of range")
    if e.now > MAX_NOW:
        raise EngineError(f"clock {e.now} ns beyond the engine's limit 2**62 ns")
    if e.seq > MAX_SEQ:
        raise EngineError(f"event sequence number {e.seq} beyond the limit 2**55")
    check_cost_tables(e)
    # The state timeline.
    tl = e.timeline
    if len(tl) > e.tl_cap or e.tl_t0 > e.now or (e.timeline_dropped and len(tl) != e.tl_cap):
        raise EngineError("timeline ring positions out of range")
    for g in range(nth):
        if not _index(e.tl_base[g], _RUNNABLE + 1):
            raise EngineError(f"thread {g}: an unknown timeline base state")
    prev = None
    for i, rec in enumerate(tl):
        ok = isinstance(rec, tuple) and len(rec) == 4
        if ok:
            t, g, cpu, st = rec
            # (A record keeps the CPU of its time: threads migrate.)
            ok = (_index(g, nth) and _index(cpu, ncpu) and _index(threads[g].pcpu, ncpu)
                  and _index(st, _RUNNABLE + 1)
                  and isinstance(t, int) and e.tl_t0 <= t <= e.now
                  and (prev is None or t >= prev))
            prev = t
        if not ok:
            raise EngineError(f"timeline record {i}: out of range or out of order")
    # Placement: the LLC groups, each thread's affinity (derived: nunpinned).
    if not isinstance(e.llc, list) or len(e.llc) != ncpu \
            or not all(_index(x, ncpu) for x in e.llc):
        raise EngineError("the host's LLC groups disagree with its CPU count")
    for g, th in enumerate(threads):
        check_affinity(e, th, g)
    index_affinity(e)
    # VMs and their distributors.
    n = 0
    w = 0                               # where the previous VM's threads end
    for v, vm in enumerate(vms):
        if vm.index != v or not isinstance(vm.first, int) or vm.first < w \
                or not 1 <= vm.nr_vcpus <= _MAX_VCPUS_PER_VM \
                or vm.first > nth or not 0 <= vm.nr_spis <= MAX_NR_SPIS:
            raise EngineError(f"VM {v}: vCPU range or SPI count inconsistent")
        for x in range(w, vm.first):    # only host threads lie between two VMs' vCPUs
            if getattr(threads[x], "kind", None) != THREAD_HOST:
                raise EngineError(f"VM {v}: vCPU range inconsistent (thread {x} before it "
                                  "is neither its nor a host thread)")
        w = vm.first + vm.nr_vcpus
        if vm.psci_version not in _PSCI_VERSIONS:
            raise EngineError(f"VM {v}: PSCI version {vm.psci_version:#x} unknown")
        if not isinstance(vm.vcpu_features, int) \
                or vm.vcpu_features & ~SUPPORTED_VCPU_FEATURES or vm.vcpu_features < 0 \
                or not isinstance(vm.features_set, bool):
            raise EngineError(f"VM {v}: vCPU features {vm.vcpu_features!r} not supported")
        if any(len(a) != NR_INTIDS for a in (vm.spi_prio, vm.spi_target, vm.spi_mpidr)):
            raise EngineError(f"VM {v}: SPI tables of the wrong size")
        for k, x in enumerate(vm.spi_target):
            if not isinstance(x, int) or x < -1 or x >= vm.nr_vcpus:
                raise EngineError(f"VM {v}: SPI {k} routed to vCPU {x}, which does not exist")
        n += vm.nr_vcpus
    # Threads.
    k = 0                               # host threads so far
    for g, th in enumerate(threads):
        vm = th.vm
        if th.kind not in (THREAD_VCPU, THREAD_HOST):
            raise EngineError(f"thread {g}: an unknown thread kind {th.kind!r}")
        if th.kind == THREAD_HOST:
            # A host thread (hostthread.py): no VM, numbered among the host threads,
            # always with its program, never polling, inside a guest or with a
            # trap or an interrupt to go on with.
            if th.g != g or vm is not None or th.vcpu_id != k or not _index(th.pcpu, ncpu):
                raise EngineError(f"thread {g}: a host thread's VM, number or host CPU "
                                  "out of range")
            if th.prog is None or not th.pc_valid or th.state == _POLLING \
                    or not _index(th.state, _RUNNABLE + 1) \
                    or th.resume not in (RESUME_START, RESUME_SEGMENT) or th.cont != 0 \
                    or not isinstance(th.exit_time, int) or not 0 <= th.exit_time <= MAX_TIME:
                raise EngineError(f"thread {g}: a host thread's state, program, "
                                  "continuation or deadline holds an unknown value")
            k += 1
        elif th.g != g or not isinstance(vm, _Vm) or not _index(vm.index, nvm) \
                or vms[vm.index] is not vm or th.vcpu_id != g - vm.first \
                or not _index(th.vcpu_id, vm.nr_vcpus) or not _index(th.pcpu, ncpu):
            raise EngineError(f"thread {g}: VM, vCPU id or host CPU out of range")
        if not _index(th.state, _RUNNABLE + 1) or not _index(th.resume, RESUME_SLEEP + 1) \
                or not _index(th.cont, CONT_EOI + 1) \
                or not _index(th.halt_kind, HALT_MP_HALTED + 1) \
                or not _index(th.mp_state, MpState.SUSPENDED + 1):
            raise EngineError(f"thread {g}: a state field holds an unknown value")
        if len(th.stats) != NR_STATS or len(th.loops) != MAX_LOOP_DEPTH \
                or len(th.priv_prio) != 32 or len(th.regs) != 31:
            raise EngineError(f"thread {g}: stats, loop counters, priorities or registers "
                              "of the wrong size")
        if not isinstance(th.pstate, int) or th.pstate & 0x1F not in (0x0, 0x4, 0x5) \
                or th.pstate & PSR_I_BIT:
            raise EngineError(f"thread {g}: PSTATE {th.pstate!r} has a mode KVM refuses")
        if th.prog is not None:
            if not th.prog or (th.pc_valid and not _index(th.pc, len(th.prog))):
                raise EngineError(f"thread {g}: program or PC out of range")
        elif th.state != _USER:
            raise EngineError(f"thread {g}: in KVM_RUN without a program")
        if not isinstance(th.cur_irq, int) or th.cur_irq < -1 or th.cur_irq > 1023 \
                or not _index(th.sv_cont, CONT_EOI + 1):
            raise EngineError(f"thread {g}: interrupt bookkeeping out of range")
    if n + k != nth:
        raise EngineError("the VMs' vCPUs and the host threads do not add up to the "
                          "thread count")
    if vms and vms[-1].first + vms[-1].nr_vcpus > nth:
        raise EngineError(f"VM {nvm - 1}: vCPU range beyond the thread count")
    if any(threads[g].kind == THREAD_HOST for g in e.exits):
        raise EngineError("exit queue names a thread that is no vCPU")
    if programs:
        check_programs(e)
    # Host CPUs and their run queues.
    for c, cpu in enumerate(cpus):
        if not isinstance(cpu.cur, int) or cpu.cur < -1 or cpu.cur >= nth \
                or not all(_index(x, nth) for x in cpu.runq):
            raise EngineError(f"host CPU {c}: thread index out of range")
        if any(threads[x].pcpu != c for x in cpu.runq):
            raise EngineError(f"host CPU {c}: run queue broken")
        if cpu.cur >= 0 and threads[cpu.cur].pcpu != c:
            raise EngineError(f"host CPU {c}: runs a thread placed elsewhere")
    # Interrupt sources.
    for i, src in enumerate(sources):
        svm = vms[src.vm] if _index(src.vm, nvm) else None
        if svm is None or src.index != i or not _index(src.kind, SourceKind.TRACE + 1) \
                or not _index(src.intid, 1024) or not 0 <= src.idx <= len(src.times) \
                or (e.x86 and not svm.first <= src.target < svm.first + svm.nr_vcpus) \
                or (src.kind == SourceKind.PERIODIC and src.p0 == 0) \
                or (not e.x86 and not 32 <= src.intid < 32 + svm.nr_spis) \
                or (e.x86 and src.intid > 255):
            raise EngineError(f"interrupt source {i}: out of range")
    # The events: an imported state's, or else every queued one (void ones
    # included) in (t, class, sequence) order, after the queue's own check.
    if events is None:
        events = state_events(e)
    for i, ev in enumerate(events):
        if not isinstance(ev, tuple) or len(ev) != 5:
            raise EngineError(f"event {i}: not a (t, class, sequence, who, gen) record")
        t, cls, seq, who, gen = ev
        if not _index(cls, _EV_SLICE + 1) or not isinstance(t, int) or t < e.now \
                or t > MAX_TIME or not isinstance(seq, int) or seq > e.seq:
            raise EngineError(f"event {i}: class, time or sequence out of range")
        if (cls == _EV_TICK and not _index(who, nvm)) \
                or (cls == _EV_SOURCE and not _index(who, len(sources))) \
                or (cls >= _EV_TIMER and not _index(who, nth)):
            raise EngineError(f"event {i}: names something that does not exist")
        if cls == _EV_TICK and gen == vms[who].tick_gen and vms[who].tick_ns == 0:
            raise EngineError(f"event {i}: a live tick of period 0")
    check_links(e, events)


def check_affinity(e, th, g) -> None:
    """The thread's CPU affinity: a known kind; a list's mask naming at least one CPU
    and none beyond the host's; its migration count a count."""
    ncpu = len(e.cpus)
    if not _index(th.aff_kind, host.AFF_LIST + 1) or not isinstance(th.aff_mask, int) \
            or isinstance(th.aff_mask, bool) or not isinstance(th.nr_migrations, int) \
            or isinstance(th.nr_migrations, bool) or th.nr_migrations < 0:
        raise EngineError(f"thread {g}: an unknown CPU affinity kind or migration count")
    if th.aff_kind == host.AFF_LIST and not 0 < th.aff_mask < (1 << ncpu):
        raise EngineError(f"thread {g}: an empty CPU affinity, or one naming a CPU "
                          f"the host ({ncpu} CPUs) does not have")
    if th.aff_kind != host.AFF_LIST and th.aff_mask:
        raise EngineError(f"thread {g}: a CPU mask without an affinity list")


def index_affinity(e) -> None:
    """After an import: the count of threads that are not pinned (derived)."""
    e.nunpinned = sum(th.aff_kind != host.AFF_PINNED for th in e.threads)


def check_times(e, th) -> None:
    """A thread's times against the clock, so that no difference the engine takes
    (slice_end's seg_end - t, halt_done's cur - halt_start, cur - poll_end and
    poll_end - start, the latency's cur + entry - wake_ts) goes negative, and no
    sum (got_cpu's t + rem_end) leaves the core's uint64."""
    now, g = e.now, th.g
    times = (th.run_start, th.halt_start, th.poll_end, th.wake_ts, th.seg_end, th.seg_gfrom,
             th.seg_gto, th.rem_end, th.rem_gfrom, th.rem_gto)
    if not all(isinstance(x, int) and x >= 0 for x in times):
        raise EngineError(f"thread {g}: a time that is not a non-negative integer")
    if th.run_start > now or th.halt_start > now or th.poll_end > now or th.wake_ts > now:
        raise EngineError(f"thread {g}: a time of its past lies in the future")
    if th.seg_end > MAX_TIME or th.seg_gfrom > th.seg_gto or th.seg_gto > th.seg_end \
            or th.rem_gfrom > th.rem_gto or th.rem_gto > th.rem_end or th.rem_end > MAX_SPAN:
        raise EngineError(f"thread {g}: segment times out of order or out of range")
    if th.state == _RUNNING and th.seg_end < now:
        raise EngineError(f"thread {g}: running a segment that ended before the clock")
    if not all(isinstance(x, int) for x in (th.timer_cval, th.handler_ns, th.sv_guest,
                                            th.handler_noiret)) \
            or th.timer_cval > MAX_TIME or th.handler_ns > MAX_SPAN or th.sv_guest > MAX_SPAN \
            or th.handler_noiret not in (0, 1):
        raise EngineError(f"thread {g}: its timer, handler (time, iret flag) or "
                          "interrupted segment out of range")
    if th.resume == RESUME_HALT and th.state in (_BLOCKED, _RUNNABLE) \
            and th.poll_end < th.halt_start:
        raise EngineError(f"thread {g}: its halt-polling ended before its halt began")


def check_programs(e) -> None:
    """Each distinct program must pass the guest validation against its VM (a host
    thread's, the host-program validation against the host's VMs)."""
    from .. import guest as _guest
    from .. import hostprog as _hostprog
    done = set()
    vms = [(vm.nr_vcpus, vm.nr_spis) for vm in e.vms]
    for g, th in enumerate(e.threads):
        if th.prog is None:
            continue
        if th.kind == THREAD_HOST:
            key = (tuple(th.prog), None, None)
            if key in done:
                continue
            done.add(key)
            try:
                _hostprog.validate(np.array(th.prog, dtype=OP_DTYPE), vms, e.arch)
            except (_guest.ProgramError, TypeError, ValueError, OverflowError) as exc:
                raise EngineError(f"thread {g}'s host program: {exc}")
            continue
        key = (tuple(th.prog), th.vm.nr_vcpus, th.vm.nr_spis)
        if key in done:
            continue
        done.add(key)
        try:
            ops = np.array(th.prog, dtype=OP_DTYPE)
            _guest.validate(ops, th.vm.nr_vcpus, e.arch, th.vm.nr_spis)
        except (_guest.ProgramError, TypeError, ValueError, OverflowError) as exc:
            raise EngineError(f"thread {g}'s program: {exc}")


def is_trap_op(code) -> bool:
    """The ops advance() ends a segment on with CONT_TRAP, for trap_op to carry out."""
    return code in (Op.SGI, Op.IRQ_ENABLE, Op.IRQ_DISABLE, Op.SET_PRIORITY, Op.DIST_ENABLE,
                    Op.ROUTE_SPI, Op.HVC, Op.SYNC)


def check_sched(e, where) -> None:
    """The host scheduler's fields (host.py) against the run queues: FIFO leaves
    them zero; under EEVDF on_rq is "current or queued", only a queued sleeper
    is delayed (and every queued sleeper is), need_resched needs a
    current thread, and sum_v is the queued vruntimes' sum."""
    if e.sched not in (host.SCHED_POLICY_FIFO, host.SCHED_POLICY_EEVDF) \
            or e.base_slice != sched_base_slice(len(e.cpus)):
        raise EngineError(f"scheduler {e.sched!r} or base slice {e.base_slice!r} unknown")
    for name in ("vcpu_pack", "preempt_skips_delayed"):
        if not isinstance(getattr(e, name), bool):
            raise EngineError(f"{name} {getattr(e, name)!r} is not a bool")
    fifo = e.sched == host.SCHED_POLICY_FIFO
    sums = [0] * len(e.cpus)
    for g, th in enumerate(e.threads):
        if not all(isinstance(getattr(th, f), int) for f in
                   ("vruntime", "deadline", "vlag", "vprot", "exec_start", "on_rq",
                    "sched_delayed")):
            raise EngineError(f"thread {g}: a scheduler field is not an integer")
        if fifo:
            if th.on_rq or th.sched_delayed:
                raise EngineError(f"thread {g}: EEVDF state on a fifo host")
            continue
        if th.on_rq not in (0, 1) or th.sched_delayed not in (0, 1) \
                or bool(th.on_rq) != (where[g] != 0) \
                or bool(th.sched_delayed) != (where[g] == 2 and th.state != _RUNNABLE):
            raise EngineError(f"thread {g}: on_rq or sched_delayed disagrees with its "
                              "host CPU's run queue")
        if th.on_rq:
            sums[th.pcpu] += th.vruntime - e.cpus[th.pcpu].zero_v
    for c, cpu in enumerate(e.cpus):
        if not all(isinstance(x, int) for x in (cpu.zero_v, cpu.sum_v, cpu.need_resched)):
            raise EngineError(f"host CPU {c}: a scheduler field is not an integer")
        if fifo:
            if cpu.need_resched or cpu.sum_v or cpu.zero_v:
                raise EngineError(f"host CPU {c}: EEVDF state on a fifo host")
            continue
        if cpu.need_resched not in (0, 1) or cpu.need_resched and (
                cpu.cur < 0 or e.threads[cpu.cur].state not in (_RUNNABLE, _RUNNING, _USER)):
            raise EngineError(f"host CPU {c}: a pending reschedule without a current "
                              "thread")
        if sums[c] != cpu.sum_v:
            raise EngineError(f"host CPU {c}: its vruntime sum disagrees with its queue")
        if cpu.runq and cpu.cur < 0:
            raise EngineError(f"host CPU {c}: threads queued on an idle CPU")


def check_links(e, events: list) -> None:
    """Each thread's state against where it is and what the heap holds for it.

    Called at the end of check_state, once every index is known to be in range.
    """
    threads = e.threads
    nth = len(threads)
    where = [0] * nth        # 1: a host CPU's current, 2: queued
    live = [0] * nth         # its live SEGMENT/POLL_END/RUN event
    slices = [0] * nth       # its live SLICE event
    timers = [0] * nth       # a host thread's live hrtimer
    for c, cpu in enumerate(e.cpus):
        x = cpu.cur
        if x >= 0:
            if threads[x].state not in (_RUNNABLE, _RUNNING, _POLLING) and not (
                    threads[x].state == _USER and threads[x].kind == THREAD_VCPU
                    and e.sched == host.SCHED_POLICY_EEVDF and threads[x].pcpu == c):
                # (EEVDF: a vCPU thread in userspace keeps its CPU, host.hold_cpu.)
                raise EngineError(f"host CPU {c}: its current thread {x} is neither running "
                                  "nor about to, nor a vCPU thread in userspace")
            where[x] = 1
        for x in cpu.runq:
            # (EEVDF: a delayed-dequeue sleeper stays queued.)
            if where[x] or (threads[x].state != _RUNNABLE and not threads[x].sched_delayed):
                raise EngineError(f"host CPU {c}: run queue holds thread {x}, which is "
                                  "current or not runnable")
            where[x] = 2
    # The exit queue: threads that left KVM_RUN, each once (take_exit removes one).
    if len(set(e.exits)) != len(e.exits) or any(threads[g].state != _USER for g in e.exits):
        raise EngineError("a thread in the exit queue twice, or inside KVM_RUN")
    check_sched(e, where)
    for g, th in enumerate(threads):
        if th.state in (_RUNNING, _POLLING) and where[g] != 1 \
                or th.state == _RUNNABLE and where[g] == 0 \
                or th.state == _BLOCKED and where[g] != 0 and not th.sched_delayed \
                or th.state == _USER and where[g] == 2 and not th.sched_delayed:
            raise EngineError(f"thread {g}: its state disagrees with its host CPU's run queue")
    for i, (t, cls, _seq, who, gen) in enumerate(events):
        if cls == _EV_TIMER and threads[who].kind == THREAD_HOST \
                and gen == threads[who].timer_gen:
            if timers[who] or threads[who].state != _BLOCKED:
                raise EngineError(f"event {i}: an hrtimer of host thread {who}, which is "
                                  "not asleep or has another")
            timers[who] = 1
        if cls == _EV_SLICE and gen == threads[who].run_gen:
            if slices[who] or not threads[who].slice_armed or where[who] != 1:
                raise EngineError(f"event {i}: a time slice of thread {who}, which is not "
                                  "on its host CPU with one slice armed")
            slices[who] = 1
        if cls < _EV_SEG or cls > _EV_RUN or gen != threads[who].gen:
            continue
        th = threads[who]
        if live[who]:
            raise EngineError(f"event {i}: a second live event of thread {who}")
        live[who] = 1
        if cls == _EV_RUN and (th.state != _RUNNABLE or where[who] != 1) \
                or cls == _EV_SEG and th.state != _RUNNING \
                or cls == _EV_POLL and th.state != _POLLING:
            raise EngineError(f"event {i}: thread {who}'s state does not expect it")
        if cls == _EV_SEG and t != th.seg_end:
            raise EngineError(f"event {i}: thread {who}'s segment ends at another time")
    all_pinned = all(th.aff_kind == host.AFF_PINNED for th in threads)
    for g, th in enumerate(threads):
        # A lazy poll window (halt.py): a polling thread's, open (its end not
        # before the clock), standing where an event queued after the last one
        # would (at most seq + 1), only while poll ends need no event (no
        # timeline, every thread pinned: lazy_polls()).
        for f in ("poll_stop", "poll_seq"):
            if not isinstance(getattr(th, f), int) or getattr(th, f) < 0:
                raise EngineError(f"thread {g}: {f} is not a count")
        if th.poll_seq and (th.state != _POLLING or th.poll_stop < e.now
                            or th.poll_stop > MAX_TIME or th.poll_seq > e.seq + 1
                            or e.tl_cap or not all_pinned):
            raise EngineError(f"thread {g}: a lazy poll window out of place or range")
        if not th.poll_seq and th.poll_stop:
            raise EngineError(f"thread {g}: a lazy poll window's end without the window")
        # The thread's own event, both ways: a running, polling (but in a lazy
        # window) or about-to-run thread has exactly one live event (checked
        # above), every other none.
        if live[g] != (th.state == _RUNNING or th.state == _POLLING and not th.poll_seq
                       or th.state == _RUNNABLE and where[g] == 1):
            raise EngineError(f"thread {g}: {'no' if not live[g] else 'a'} live event in "
                              f"state {int(th.state)}")
        if th.slice_armed and not slices[g]:
            raise EngineError(f"thread {g}: a time slice armed without its event")
        if th.kind == THREAD_HOST and th.state == _BLOCKED and not timers[g]:
            raise EngineError(f"thread {g}: a host thread asleep without its hrtimer")
        check_times(e, th)
    for g, th in enumerate(threads):
        if th.cur_irq > (255 if e.x86 else 1023):
            raise EngineError(f"thread {g}: interrupt in service {th.cur_irq} out of range")
        if th.sv_valid and th.sv_cont in (CONT_IRQ, CONT_EOI):
            raise EngineError(f"thread {g}: an interrupted segment that was itself an interrupt's")
        if th.cont == CONT_EOI and th.cur_irq < 0 and (
                live[g] and th.state == _RUNNING
                or th.state == _RUNNABLE and th.resume == RESUME_SEGMENT):
            raise EngineError(f"thread {g}: ends an interrupt handler with no interrupt in service")
        if th.prog is not None and not _index(th.pc, len(th.prog)):
            raise EngineError(f"thread {g}: program counter out of range")
        # A segment that ends in a trap carries out the op at the PC (trap_op),
        # which must then be a trapping op.  (Outside KVM_RUN userspace may move
        # the PC.)
        if th.prog is not None and th.state != _USER and not th.reset_pending and (
                th.cont == CONT_TRAP and (live[g] and th.state == _RUNNING
                                          or th.state == _RUNNABLE
                                          and th.resume == RESUME_SEGMENT)
                or th.sv_valid and th.sv_cont == CONT_TRAP) \
                and not is_trap_op(th.prog[th.pc][0]):
            raise EngineError(f"thread {g}: traps on op {th.pc}, which does not trap")


# -- migration ----------------------------------------------------------------------------

def engine_rehost(e, ncpu: int) -> None:
    """Move every vCPU thread to a host of ``ncpu`` CPUs, as a migration would.

    Thread g goes to host CPU g % ncpu (one with an affinity list: the
    (g mod n)-th of the n CPUs of its list that the new host has; a list left
    empty is refused).  Threads that had a CPU keep one if
    their new CPU is free (in the old CPU order); otherwise a running thread
    is preempted (the rest of its segment waits in the run queue), a polling
    one stops polling and blocks (another thread is runnable on its CPU), and
    one about to get its CPU queues instead.  Queued threads keep their order
    behind them.  A CPU left idle with threads queued gives the first one the
    CPU after a context switch.  The result is checked like an imported state.
    """
    if e.failed:
        raise EngineError("this engine stopped on an earlier error")
    if not isinstance(ncpu, int) or not 1 <= ncpu <= _MAX_CPUS:
        raise ValueError(f"host_cpus = {ncpu} out of range 1..{_MAX_CPUS}")
    if e.sched != host.SCHED_POLICY_FIFO:
        raise ValueError("restoring onto another host CPU count is only "
                         "implemented for the fifo scheduler")
    if any(th.kind == THREAD_HOST for th in e.threads):
        raise ValueError("restoring onto another host CPU count is not implemented "
                         "with host threads")
    threads = e.threads
    for g, th in enumerate(threads):
        if th.aff_kind == host.AFF_LIST and not th.aff_mask & ((1 << ncpu) - 1):
            raise ValueError(f"thread {g}'s CPU affinity "
                             f"{[c for c in range(th.aff_mask.bit_length()) if th.aff_mask >> c & 1]} "
                             f"names no CPU of a {ncpu}-CPU host")
    # Open lazy poll windows get their events first (a polling thread whose CPU is
    # taken stops polling, which cancels its POLL_END event).
    halt.queue_lazy_polls(e)
    e.base_slice = sched_base_slice(ncpu)        # update_sysctl() on CPU hotplug
    t = e.now
    curs = [cpu.cur for cpu in e.cpus if cpu.cur >= 0]
    queues = [list(cpu.runq) for cpu in e.cpus]
    e.cpus = [host._Cpu() for _ in range(ncpu)]
    e.llc = [0] * ncpu                              # one LLC until set_llc()
    for g, th in enumerate(threads):
        th.aff_mask &= (1 << ncpu) - 1
        th.pcpu = host.select_task_rq_fork(e, th)   # g % ncpu unless a list says
    for g in curs:
        th = threads[g]
        cpu = e.cpus[th.pcpu]
        if cpu.cur < 0:
            cpu.cur = g
            continue
        th.run_gen += 1
        th.slice_armed = False
        if th.state == _RUNNING:
            # Preempted, as slice_end does it.
            host.keep_segment_rest(e, th, t)
            th.state = _RUNNABLE
            th.resume = RESUME_SEGMENT
            host.rq_append(e, cpu, g)
        elif th.state == _POLLING:
            # kvm_vcpu_block: the poll ends now, without the CPU to release.
            th.poll_end = t
            th.stats[S_BLOCKING] = 1
            th.state = _BLOCKED
            th.gen += 1
        else:
            th.gen += 1                    # its EV_RUN is void: it queues instead
            host.rq_append(e, cpu, g)
    for q in queues:
        for g in q:
            host.rq_append(e, e.cpus[threads[g].pcpu], g)
    for cpu in e.cpus:
        if not cpu.runq:
            continue
        if cpu.cur < 0:
            g = host.rq_popleft(e, cpu)
            cpu.cur = g
            th = threads[g]
            queue.push_thread(e, th, t + cost_ns(e, th, COST_CONTEXT_SWITCH), _EV_RUN)
        elif threads[cpu.cur].state == _POLLING:
            halt.block(e, threads[cpu.cur], t, t)
        elif threads[cpu.cur].state == _RUNNING:
            host.arm_slice(e, threads[cpu.cur], t)
    check_state(e)
