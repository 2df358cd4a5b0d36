"""The host: a virtual clock, host CPUs, the kvm module parameters, and its VMs.

Several VMs share one host, as on a real server.  vCPU threads are placed on
host CPUs round-robin by creation order: the g-th vCPU thread created on the
host (counting over all its VMs) runs on host CPU ``g % host_cpus``, for good
with the default affinity ``"pinned"``.  A thread allowed on several CPUs
(``create_vm(affinity=...)``, ``vcpu.set_affinity``) is placed at each wake-up
as ``select_task_rq_fair`` does and can be pulled by a CPU going idle, within
the host's LLC groups (``Host(llc=...)``; docs/design.md, "Placement").  Each
host CPU schedules its threads with the host's scheduler: ``"fifo"`` (FIFO run
queues, a fixed slice) or ``"eevdf"`` (Linux 6.18's fair class).
"""

from __future__ import annotations

import bisect
import copy
import errno
import numbers
import os

from . import costs as _costs
from . import haltpoll
from . import snapshot as _snapshot
from .errors import KvmError, SnapshotError
from .exits import from_engine
from .model import (ARCHES, DEFAULT_NR_SPIS, DEFAULT_SCHEDULER, HOST_STAT_NAMES,
                    MAX_NR_SPIS, MAX_VCPUS, SCHEDULERS, THREAD_HOST, ThreadState)

ENGINES = ("core", "reference")
#: Largest host the engines accept.
MAX_HOST_CPUS = 1 << 20
#: Most OS threads a host's run may use.
MAX_THREADS = 4096
#: A host CPU that no thread may use is in no island (``Host.islands``).
NO_ISLAND = 0xFFFF_FFFF
#: Most threads one host holds (vCPU threads over all its VMs, and host threads).
MAX_HOST_THREADS = 1 << 24
MAX_COST_NS = _costs.MAX_COST_NS
MAX_TIME_NS = 1 << 62


def _engine_class(engine: str):
    if engine == "core":
        from . import _core
        return _core.Engine
    if engine == "reference":
        from . import reference
        return reference.Engine
    raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")


def check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} = {value} is out of range {lo}..{hi}")
    return value


def check_scheduler(scheduler) -> str:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} "
                         f"(choose from {', '.join(SCHEDULERS)})")
    return scheduler


def check_llc(llc, host_cpus: int) -> tuple:
    """A host topology's LLC groups as a tuple of tuples (a partition of the CPUs):
    None, one LLC holding every CPU; an int k, groups of k consecutive CPUs (the
    last may be smaller); or a list of lists of CPUs."""
    if llc is None:
        return (tuple(range(host_cpus)),)
    if isinstance(llc, numbers.Integral) and not isinstance(llc, bool):
        k = check_int("llc", llc, 1, host_cpus)
        return tuple(tuple(range(i, min(i + k, host_cpus))) for i in range(0, host_cpus, k))
    if isinstance(llc, (str, bytes)) or not hasattr(llc, "__iter__"):
        raise TypeError(f"llc must be None, an int or a list of lists of CPUs, not "
                        f"{type(llc).__name__}")
    groups = []
    seen = set()
    for i, grp in enumerate(llc):
        if isinstance(grp, (str, bytes)) or not hasattr(grp, "__iter__"):
            raise TypeError(f"llc group {i} must be a list of CPUs, not {type(grp).__name__}")
        cpus = tuple(check_int(f"llc group {i}'s CPU", c, 0, host_cpus - 1) for c in grp)
        if not cpus:
            raise ValueError(f"llc group {i} is empty")
        dup = seen.intersection(cpus) or (len(set(cpus)) != len(cpus) and cpus)
        if dup:
            raise ValueError(f"llc: CPU {min(dup)} is in two groups")
        seen.update(cpus)
        groups.append(tuple(sorted(cpus)))
    if len(seen) != host_cpus:
        missing = min(set(range(host_cpus)) - seen)
        raise ValueError(f"llc: CPU {missing} is in no group (the groups must cover "
                         f"all {host_cpus} host CPUs)")
    return tuple(groups)


def check_affinity(cpus, host_cpus: int):
    """A CPU affinity: "pinned" (thread g on CPU g % host_cpus), "all", or a sorted
    tuple of CPUs (from an int or an iterable of ints)."""
    if isinstance(cpus, str):
        if cpus not in ("pinned", "all"):
            raise ValueError(f"unknown affinity {cpus!r} (\"pinned\", \"all\", or CPUs)")
        return cpus
    if isinstance(cpus, numbers.Integral) and not isinstance(cpus, bool):
        cpus = (cpus,)
    if not hasattr(cpus, "__iter__"):
        raise TypeError(f"affinity must be \"pinned\", \"all\", a CPU or a list of CPUs, "
                        f"not {type(cpus).__name__}")
    out = []
    for c in cpus:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"affinity: CPU {c!r} is not an integer")
        if not 0 <= c < host_cpus:
            raise ValueError(f"affinity: CPU {c} does not exist (the host has CPUs "
                             f"0..{host_cpus - 1})")
        out.append(int(c))
    if not out:
        raise ValueError("affinity: an empty CPU set")
    return tuple(sorted(set(out)))


def check_threads(threads) -> int:
    """``threads`` for ``Host``: None (the CPUs this process may run on) or 1 to 4096."""
    if threads is None:
        return default_threads()
    return check_int("threads", threads, 1, MAX_THREADS)


def default_threads() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_arch(arch) -> str:
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHES)})")
    return arch


class Host:
    """A host machine: clock, host CPUs, module parameters, VMs.

    Parameters
    ----------
    host_cpus : int
        Number of host CPUs.
    arch : {"arm64", "x86"}
        Architecture; decides ``halt_poll_ns``'s default and the vCPU limit.
    seed : int
        Seed of every random stream (one per vCPU, derived from the seed, the
        VM's index on the host and the vCPU id).
    costs : dict, optional
        Modelled costs, overriding ``model.COST_DEFAULTS``: each an int (ns) or a
        duration string (a constant), or a distribution,
        ``{"dist": "lognormal", "median": ..., "sigma": ..., "max": ...}`` or
        ``{"dist": "quantiles", "q": [...]}``, drawn from a seeded stream of the
        charged thread's own (see ``kvmwake.costs``; ``sched_slice_ns`` is a
        constant).
    engine : {"core", "reference"}
        The Cython core (default) or the plain-Python reference engine.
    trace_capacity : int
        Tracepoint records kept (the newest, like ftrace's ring buffer); 0
        turns tracing off.
    timeline_capacity : int
        State-timeline records kept (the newest; see ``kvmwake.outputs.timeline``);
        0, the default, turns the timeline off.
    scheduler : {"fifo", "eevdf"}
        The host scheduler: ``"fifo"`` (default), FIFO run queues where a
        running thread is preempted only when its ``sched_slice_ns`` ends; or
        ``"eevdf"``, Linux 6.18's fair class (kernel/sched/fair.c: virtual
        runtime, lag, virtual deadlines, wake-up preemption, slice ends at
        HZ=250 ticks, delayed dequeue), every thread nice 0, with the base
        slice 0.7 ms x (1 + ilog2(min(host_cpus, 8))) (``sched_slice_ns`` is
        then unused).
    llc : None, int or list of lists
        The host's topology: which CPUs share a last-level cache (placement's
        LLC domain, docs/design.md "Placement").  None: one LLC holding every
        CPU; k: groups of k consecutive CPUs; or the groups, a partition of the
        CPUs.  ``host.llc_groups`` gives them as a tuple of tuples.
    threads : int, optional
        How many OS threads ``run`` may use (default: the CPUs this process may
        run on).  A host whose VMs share no host CPU runs as independent
        islands (``islands()``), one after another or on these threads at once,
        when nothing in the run can stop it for the VMM (no vCPU can exit to
        userspace), the state timeline is off and the trace ring is off or
        records one island's threads (``trace_vm``); the results are the same
        whatever the thread count.  Not part of a snapshot.
    split_islands : bool
        True (default): run islands as such when they can; False: always on the
        host's one queue (the same results, slower; for comparisons).
    vcpu_pack : bool
        False (default): wake placement as upstream Linux does it.  True (under
        ``"eevdf"`` only): also the vCPU-pack rule of the host kernels kvmwake is
        held against (the vendor sysctl ``kernel.sched_vcpu_pack``, not in
        upstream Linux): a vCPU thread woken by another vCPU thread of its VM
        goes to the waker's CPU when the waker is alone there and the wakee may
        run there (docs/design.md, "Placement").
    preempt_skips_delayed : bool
        False (default): wake-up preemption as upstream Linux decides it.  True
        (under ``"eevdf"`` only): as the host kernels kvmwake is held against
        decide it: the woken thread preempts if it is what ``pick_eevdf()``
        would run among the threads that are not delayed-dequeue sleepers
        (docs/design.md, "The EEVDF scheduler").
    """

    #: The class of the VMs ``create_vm`` and ``restore`` make: ``kvmwake.vm.VM``,
    #: which sets it (vm.py builds on this module, not the other way round).
    vm_class = None

    def __init__(self, host_cpus: int = 1, arch: str = "arm64", seed: int = 0,
                 costs: dict | None = None, engine: str = "core",
                 trace_capacity: int = 1 << 20, timeline_capacity: int = 0,
                 scheduler: str = DEFAULT_SCHEDULER, llc=None, threads: int | None = None,
                 split_islands: bool = True, vcpu_pack: bool = False,
                 preempt_skips_delayed: bool = False):
        host_cpus = check_int("host_cpus", host_cpus, 1, MAX_HOST_CPUS)
        self.sim_threads = check_threads(threads)
        if not isinstance(split_islands, bool):
            raise TypeError(f"split_islands must be True or False, not {split_islands!r}")
        #: False: ``run`` keeps the host on its one queue even when it is islands
        #: (the same results; for comparisons).
        self.split_islands = split_islands
        for name, value in (("vcpu_pack", vcpu_pack),
                            ("preempt_skips_delayed", preempt_skips_delayed)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, not {value!r}")
        scheduler = check_scheduler(scheduler)
        llc_groups = check_llc(llc, host_cpus)
        arch = check_arch(arch)
        seed = check_int("seed", seed, 0, (1 << 64) - 1)
        trace_capacity = check_int("trace_capacity", trace_capacity, 0, 1 << 32)
        timeline_capacity = check_int("timeline_capacity", timeline_capacity, 0, 1 << 32)
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
        specs = _costs.normalize_costs(costs)
        self._cost_specs = specs
        self.arch = arch
        self.seed = seed
        self.engine_name = engine
        self._engine = _engine_class(engine)(arch, host_cpus, seed, _costs.engine_costs(specs),
                                             trace_capacity,
                                             timeline_capacity, scheduler)
        self.scheduler = scheduler
        self.host_cpus = host_cpus
        self._llc = llc if llc is None or isinstance(llc, numbers.Integral) \
            else [list(g) for g in llc_groups]
        self._set_llc(llc_groups)
        self._engine.set_vcpu_pack(vcpu_pack)
        self._engine.set_preempt_skips_delayed(preempt_skips_delayed)
        self.vms: list = []
        #: Host threads that are not vCPUs (``add_thread``, ``add_load``), in order.
        self.threads: list = []
        self._nthreads = 0
        #: The VM whose vCPU threads alone the trace ring records (``trace_vm``), or None.
        self.traced_vm = None
        #: How many islands the last ``run`` ran as (0: on the host's one queue).
        self.islands_used = 0
        # The VMM policy call in progress (vm, vcpu id), or None: run() from inside
        # a policy is refused (see _no_policy_reentry).
        self._in_policy = None
        # The VMM's own vCPU threads (vcpu_threads.py), once a vCPU is attached.
        self._threads = None

    # -- module parameters (/sys/module/kvm/parameters) ---------------------------

    def _param(name):  # noqa: N805  (a property factory used in the class body)
        def get(self):
            return getattr(self._engine, name)

        def set_(self, value):
            setattr(self._engine, name, haltpoll.check_u32(name, value))
        return property(get, set_, doc=f"The kvm module parameter ``{name}`` (unsigned int).")

    halt_poll_ns = _param("halt_poll_ns")
    halt_poll_ns_grow = _param("halt_poll_ns_grow")
    halt_poll_ns_grow_start = _param("halt_poll_ns_grow_start")
    halt_poll_ns_shrink = _param("halt_poll_ns_shrink")
    del _param

    def _set_llc(self, groups) -> None:
        ids = [0] * sum(len(g) for g in groups)
        for i, grp in enumerate(groups):
            for c in grp:
                ids[c] = i
        self._engine.set_llc(ids)
        self.llc_groups = tuple(groups)

    def thread_info(self, g: int) -> dict:
        """Thread g of the host (vCPU threads in creation order, over all VMs): its
        state, host CPU (``pcpu``), ``nr_migrations`` (se.nr_migrations: wake-ups
        placed on another CPU, and pulls by a newly idle CPU) and more."""
        g = check_int("g", g, 0, self._nthreads - 1)
        return self._engine.thread_info(g)

    def sched_state(self) -> dict:
        """The host scheduler's state: per thread (vruntime, deadline, vlag, vprot,
        exec_start, on_rq, sched_delayed; EEVDF only) and per host CPU (current
        thread, run-queue list in order, nr_running, V)."""
        return self._engine.sched_state()

    @property
    def vcpu_pack(self) -> bool:
        """The vCPU-pack wake placement is on (``Host(vcpu_pack=...)``)."""
        return bool(self._engine.vcpu_pack)

    @property
    def preempt_skips_delayed(self) -> bool:
        """Wake-up preemption looks past delayed-dequeue sleepers
        (``Host(preempt_skips_delayed=...)``)."""
        return bool(self._engine.preempt_skips_delayed)

    @property
    def costs(self) -> dict:
        """Every modelled cost as its normalised spec (``kvmwake.costs.parse_cost``):
        an int in ns for a constant, a dict for a distribution."""
        return copy.deepcopy(self._cost_specs)

    @property
    def now(self) -> int:
        """Virtual time, ns."""
        return self._engine.now

    @property
    def events(self) -> int:
        return self._engine.events

    @property
    def halts(self) -> int:
        return self._engine.halts

    # -- VMs -------------------------------------------------------------------------

    def create_vm(self, nr_vcpus: int, arch: str | None = None,
                  nr_spis: int = DEFAULT_NR_SPIS, memory_size: int | None = None,
                  affinity="pinned"):
        """``KVM_CREATE_VM`` plus ``nr_vcpus`` x ``KVM_CREATE_VCPU`` (and the vGIC's SPIs).

        ``affinity``: where the vCPU threads may run: ``"pinned"`` (thread g on
        CPU g % host_cpus), ``"all"``, or a list of CPUs (see ``VM``).
        On any invalid argument it raises and the host is left as it was.
        """
        kw = {} if memory_size is None else {"memory_size": memory_size}
        return self.vm_class(nr_vcpus=nr_vcpus, arch=self.arch if arch is None else arch,
                             host=self, nr_spis=nr_spis, affinity=affinity, **kw)

    @staticmethod
    def _check_vm_args(nr_vcpus, arch: str, nr_spis) -> int:
        """Validate a new VM's vCPU and SPI counts; returns nr_spis."""
        if isinstance(nr_vcpus, bool) or not isinstance(nr_vcpus, numbers.Integral):
            raise TypeError(f"nr_vcpus must be an integer, not {type(nr_vcpus).__name__}")
        if nr_vcpus < 1:
            raise ValueError(f"nr_vcpus = {nr_vcpus}: a VM needs at least one vCPU")
        if nr_vcpus > MAX_VCPUS[arch]:
            raise KvmError(errno.EINVAL, f"nr_vcpus = {nr_vcpus} exceeds KVM_MAX_VCPUS "
                                         f"({MAX_VCPUS[arch]} on {arch})")
        return check_int("nr_spis", nr_spis, 0, MAX_NR_SPIS)

    def _check_vm(self, nr_vcpus, arch: str, nr_spis) -> int:
        """Validate a new VM's arguments against this host; returns nr_spis."""
        if arch != self.arch:
            raise ValueError(f"a {arch} VM cannot run on an {self.arch} host")
        nr_spis = self._check_vm_args(nr_vcpus, arch, nr_spis)
        if self._nthreads + nr_vcpus > MAX_HOST_THREADS:
            raise ValueError(f"a host holds at most {MAX_HOST_THREADS} threads")
        return nr_spis

    def _add_vm(self, vm, nr_vcpus: int, arch: str, nr_spis: int) -> int:
        """Add ``vm`` (whose other arguments its constructor validated already)."""
        nr_spis = self._check_vm(nr_vcpus, arch, nr_spis)
        index = self._engine.add_vm(int(nr_vcpus), nr_spis)
        first = self._nthreads
        self._nthreads += int(nr_vcpus)
        self.vms.append(vm)
        return index, first

    # -- host threads that are not vCPUs ------------------------------------------------------

    def add_thread(self, program, affinity="all", name: str | None = None) -> "HostThread":
        """A host thread that is not a vCPU (a device or injector thread, background
        load), running ``program`` (a ``kvmwake.hostprog`` program or list of its ops).

        The host scheduler runs it exactly as a vCPU thread, on the same run
        queues.  It takes the next thread index of the host (``.g``; a VM created
        later has its vCPU threads after it, so add host threads after the VMs
        to keep the vCPUs' placement and trace pids as without them), and
        starts at once, at ``host.now``: before the first run or at any time
        between runs.  ``affinity``: "all" (default), a CPU, or CPUs; it starts on
        the CPU ``host_thread_cpu`` says and each wake-up is placed as a vCPU
        thread's is (``select_task_rq``).
        On any invalid argument it raises and the host is left as it was.
        """
        from . import hostprog
        prog = hostprog.HostProgram(program)
        aff = check_thread_affinity(affinity, self.host_cpus)
        if name is None:
            name = f"host-thread-{len(self.threads)}"
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"name must be a non-empty string, not {name!r}")
        if any(t.name == name for t in self.threads):
            raise ValueError(f"a host thread named {name!r} exists already")
        ops = prog.ops.copy()
        for i, ref in prog.vm_refs.items():
            ops["p0"][i] = self._vm_index_of(ref, f"host op {i}")
        hostprog.validate(ops, [(vm.nr_vcpus, vm.nr_spis) for vm in self.vms], self.arch)
        if self._nthreads + 1 > MAX_HOST_THREADS:
            raise ValueError(f"a host holds at most {MAX_HOST_THREADS} threads")
        if self._engine.failed:
            from .reference import EngineError
            raise EngineError("this engine stopped on an earlier error")
        g = self._engine.add_host_thread(ops, host_thread_cpu(aff, self._nthreads,
                                                              self.host_cpus))
        self._engine.set_affinity(g, "all" if len(aff) == self.host_cpus else list(aff), True)
        self._nthreads += 1
        th = HostThread(self, g, name, aff)
        self.threads.append(th)
        self._engine.start_host_thread(g)
        return th

    def add_load(self, duty: float, period_ns, affinity="all",
                 name: str | None = None) -> "HostThread":
        """Background load: a host thread that computes ``duty * period_ns`` then sleeps
        the rest of the period, forever (``duty`` in (0, 1]; 1: it never sleeps)."""
        from . import hostprog as hp
        from .guest import _dur
        if isinstance(duty, bool) or not isinstance(duty, numbers.Real) \
                or not 0 < duty <= 1:
            raise ValueError(f"duty must be a number in (0, 1], not {duty!r}")
        period = _dur("period_ns", period_ns)
        if period == 0:
            raise ValueError("period_ns must be positive")
        busy = int(round(duty * period))
        if busy == 0:
            raise ValueError(f"duty {duty} of a {period} ns period rounds to 0 ns of work")
        body = [hp.compute(busy)]
        if busy < period:
            body.append(hp.sleep(period - busy))
        return self.add_thread([hp.loop(body)], affinity,
                               name if name is not None else f"load-{len(self.threads)}")

    def _vm_index_of(self, ref, where: str) -> int:
        if isinstance(ref, numbers.Integral):
            if not 0 <= ref < len(self.vms):
                raise ValueError(f"{where}: VM {ref} does not exist on this host "
                                 f"({len(self.vms)} VMs)")
            return int(ref)
        for vm in self.vms:
            if vm is ref:
                return vm.index
        raise ValueError(f"{where}: the VM it names is not one of this host's")

    def trace_vm(self, vm) -> None:
        """Record only ``vm``'s vCPU threads in the trace ring from now on (a ``VM`` of
        this host or its index); None: every thread again.  A host of islands whose
        trace ring records one VM can still run as islands (see ``threads``).  Kept
        in snapshots."""
        if isinstance(vm, bool):
            raise TypeError("trace_vm: a VM, its index or None, not a bool")
        if vm is None:
            self._engine.set_trace_threads(0, 0xFFFF_FFFF)
            self.traced_vm = None
            return
        i = self._vm_index_of(vm, "trace_vm")
        first = self.vms[i]._first
        self._engine.set_trace_threads(first, first + self.vms[i].nr_vcpus)
        self.traced_vm = i

    # -- a VMM's own threads (vcpu_threads.py) -------------------------------------------

    @property
    def vcpu_threads(self):
        """The host's ``vcpu_threads.VcpuThreads``: the vCPUs attached to threads of
        the VMM (``VCpu.attach``), and the userspace token."""
        if self._threads is None:
            from .vcpu_threads import VcpuThreads
            self._threads = VcpuThreads(self)
        return self._threads

    def hold_clock(self, at_ns: int | None = None, wait: bool = True):
        """Take the userspace token from a thread that is not a vCPU's (a control
        thread): the clock stands still until the returned ``ClockHold`` is
        released (a context manager).  ``at_ns``: first wait, blocked, until
        virtual time reaches it (the clock stops there exactly); a time already
        past is a ValueError.  With attached vCPU threads, this is how a control
        thread acts at a deterministic time; the token is queued for in call
        order (``vcpu_threads.VcpuThreads``).

        ``wait=False`` registers the hold and returns at once; ``hold.wait()``
        then blocks until it is granted.  Made before the vCPU threads start, it
        cannot come late.  From one hold to the next time, ``hold.wait_until``."""
        if at_ns is not None:
            at_ns = check_int("at_ns", at_ns, 0, MAX_TIME_NS)
        return self.vcpu_threads.hold_clock(at_ns, bool(wait))

    def set_realtime(self, rate: float | None = 1.0) -> None:
        """Pace the virtual clock to the monotonic clock while VMM threads run it
        (``rate`` virtual ns per wall ns; None: back to the deterministic clock).
        Threads outside the model (a device thread, a timer) then act at wall-clock
        times, and a kick wakes the thread blocked in the target's ``run()``
        through its real wait queue; see ``vcpu_threads.VcpuThreads.set_realtime``.
        Runs in real time are not deterministic."""
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
                                 or not 0 < rate <= 1e6):
            raise ValueError(f"rate must be a positive number of virtual ns per wall ns "
                             f"(at most 1e6) or None, not {rate!r}")
        self.vcpu_threads.set_realtime(rate)

    @property
    def realtime(self) -> float | None:
        """The real-time rate (``set_realtime``), or None on the deterministic clock."""
        return None if self._threads is None or self._threads.rt is None \
            else self._threads.rt[0]

    def set_deadlock_timeout(self, seconds: float | None) -> None:
        """Wall seconds a thread may hold the clock without progress while others
        wait on it, before every waiting thread raises ``DeadlockError``
        (default ``vcpu_threads.DEFAULT_DEADLOCK_TIMEOUT_S``; None or 0: never)."""
        if seconds is not None and (isinstance(seconds, bool)
                                    or not isinstance(seconds, numbers.Real) or seconds < 0):
            raise ValueError(f"deadlock timeout must be a number of seconds >= 0 or None, "
                             f"not {seconds!r}")
        self.vcpu_threads.deadlock_timeout_s = float(seconds or 0)

    def _no_vcpu_threads(self, what: str) -> None:
        """A run driven from one thread would race the attached vCPU threads."""
        if self._threads is not None and self._threads.active:
            raise RuntimeError(f"{what}: vCPUs of this host are attached to threads of the "
                               "VMM (VCpu.attach); their own run() calls drive the clock. "
                               "Detach them first")

    # -- running ------------------------------------------------------------------------

    def run(self, until_ns: int) -> None:
        """Run every VM on the host until virtual time ``until_ns``.

        Every vCPU with a program enters ``KVM_RUN``; each exit to userspace
        goes to its VM's policy (``vm.vmm``, a ``vmm.Vmm``), which re-enters
        the vCPU or leaves it outside.  An exit whose policy raised stays
        pending and is offered again first.  From inside a policy:
        ``KvmError(EBUSY)``.

        A host of several islands (``islands()``) that nothing can stop for the
        VMM runs them as separate simulations on up to ``threads`` OS threads
        (``islands_blocked()`` says why not; ``islands_used`` how many ran): the
        same results.  A Ctrl-C then takes effect once every island is done.
        """
        self._no_policy_reentry("host.run()")
        self._no_vcpu_threads("host.run()")
        until_ns = check_int("until_ns", until_ns, 0, MAX_TIME_NS)
        if until_ns < self.now:
            raise ValueError(f"until_ns = {until_ns} is before the current time {self.now}")
        for vm in self.vms:
            vm._start_loaded()
        eng = self._engine
        self._dispatch_held()
        self.islands_used = 0
        self.islands_used = self._run_islands(until_ns)
        if self.islands_used:
            return
        while eng.run_until_exit(until_ns) >= 0:
            self._collect_exits()
            self._dispatch_held()

    def _run_islands(self, until_ns: int) -> int:
        """The run as islands, if the host can run as islands now: their count, else 0."""
        if not self.split_islands:
            return 0
        return self._engine.run_islands(until_ns, self.sim_threads)

    def islands(self) -> list:
        """The host's independent islands: a list of dicts, each with the ``vms``
        (indices), the host ``cpus`` and the host ``threads`` (``add_thread``
        order) of one island, in the order of their lowest CPU.  VMs in
        different islands share no host CPU and no host thread injects into
        two of them, so they run as separate simulations (see ``threads``)."""
        th, cpu, vm = self._engine.island_plan()
        n = 1 + max([int(x) for x in vm] + [int(x) for x in cpu if x != NO_ISLAND] + [-1])
        out = [{"vms": [], "cpus": [], "threads": []} for _ in range(n)]
        for i, k in enumerate(vm):
            out[k]["vms"].append(i)
        for c, k in enumerate(cpu):
            if k != NO_ISLAND:
                out[k]["cpus"].append(c)
        for i, t in enumerate(self.threads):
            out[th[t.g]]["threads"].append(i)
        return out

    def islands_blocked(self) -> str | None:
        """Why ``run`` would not run the host as islands now (the timeline, a trace
        ring of several islands' threads, a vCPU that may exit to userspace, ...),
        or None.  The vCPUs
        with a program that ``run`` would start count as started."""
        if self.engine_name == "reference":
            return "the reference engine runs every host on its one queue"
        if len(self.islands()) < 2:
            return "the host is one island"
        starting = [v._g for vm in self.vms for v in vm.vcpus if v._loaded and not v._started]
        return self._engine.islands_blocked(starting)

    def _no_policy_reentry(self, what: str) -> None:
        """KVM_RUN from inside a VMM policy would run the engine under the policy's
        feet (and the exit it handles would be lost): refused with EBUSY."""
        if self._in_policy is not None:
            vm, vid = self._in_policy
            raise KvmError(errno.EBUSY, f"{what} called from inside a VMM policy (the "
                                        f"handle_exit of vCPU {vid} of VM {vm}): return "
                                        "from the policy instead; the run goes on after it")

    def _collect_exits(self) -> None:
        """The engine's exits, each held by its vCPU (as kvm_run stays filled) until
        its policy has handled it or its vCPU runs again."""
        eng = self._engine
        for g in eng.pending_exits():
            self._vcpu_of(g)._held = eng.take_exit(g)

    def _vcpu_of(self, g):
        """The VCpu of engine thread g (VMs hold consecutive threads, in order)."""
        i = bisect.bisect_right(self.vms, g, key=lambda vm: vm._first) - 1
        if i < 0 or g >= self.vms[i]._first + self.vms[i].nr_vcpus:
            raise KeyError(g)
        return self.vms[i].vcpus[g - self.vms[i]._first]

    def _dispatch(self, vcpu):
        """Offer ``vcpu``'s held exit to its VM's policy.

        The exit stays held until the policy returns: if it raises (or is
        interrupted), the exit is still pending, as KVM leaves ``kvm_run``
        filled until the next KVM_RUN; the next ``run`` offers it again (and
        ``vcpu.run()`` returns it).  A snapshot taken inside the policy saves
        it as pending too.
        """
        held = vcpu._held
        vm = vcpu.vm
        self._in_policy = (vm.index, vcpu.id)
        try:
            again = vm.vmm.handle_exit(vcpu, from_engine(held))
        finally:
            self._in_policy = None
        vm.exits += 1
        if vcpu._held is held:
            vcpu._held = None
        if again:
            vm._reenter(vcpu)

    def _dispatch_held(self):
        """Every held exit goes to its policy, in VM and vCPU order (the order a
        restored snapshot's held exits are offered in, too)."""
        for vm in self.vms:
            for v in vm.vcpus:
                if v._held is not None:
                    self._dispatch(v)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole host, every VM and policy, as bytes (see ``kvmwake.snapshot``)."""
        return host_to_bytes(self)

    def save(self, path) -> None:
        """Write ``snapshot()`` to ``path``."""
        data = self.snapshot()
        with open(path, "wb") as fh:
            fh.write(data)

    @classmethod
    def restore(cls, src, vmm_classes: dict | None = None, host_cpus: int | None = None,
                threads: int | None = None, **module_params) -> "Host":
        """A host from a snapshot (bytes or a path); it continues bit for bit.

        ``module_params`` (e.g. ``halt_poll_ns=...``) set the destination's kvm
        module parameters; ``vmm_classes`` maps "module:QualName" to the class of
        a user-written VMM policy; ``threads`` is as for ``Host``.
        """
        host, _ = restore_host(src, vmm_classes, host_cpus, threads=threads, **module_params)
        return host

    def __reduce__(self):
        return (Host.restore, (self.snapshot(),))

    # -- the state timeline (kvmwake.outputs.timeline) --------------------------------------

    def enable_timeline(self, capacity: int) -> None:
        """Turn the state timeline on (``capacity`` records; 0: off), at any time before
        it has recorded anything (e.g. after building or restoring a host); its window
        starts now, with every thread in its present state."""
        capacity = check_int("timeline_capacity", capacity, 0, 1 << 32)
        self._engine.set_timeline_capacity(capacity)

    @property
    def timeline_capacity(self) -> int:
        return self._engine.timeline_capacity

    @property
    def timeline_dropped(self) -> int:
        return self._engine.timeline_dropped

    def timeline_array(self):
        """Recorded thread state changes, oldest first (``outputs.timeline.TIMELINE_DTYPE``)."""
        return self._engine.timeline_array()

    def timeline_totals(self, now: int | None = None) -> dict:
        """Per host CPU, ns running, polling and idle over the recorded window."""
        return self._engine.timeline_totals(self.now if now is None else now)

    def stats_array(self, copy: bool = True) -> "np.ndarray":
        """Every vCPU's stats row, VM after VM (vCPUs x model.NR_STATS, uint64): one
        copy for the whole host (``vm.stats_array()`` copies only its VM's rows).
        Host threads' rows (their own counters) are not among them.

        ``copy=False``: the same rows read-only, without a copy where the engine can
        share its memory (the core engine, when the host has no host threads): for
        reading at once, as sums over the host do; it cannot be made writeable, and
        the next ``run`` may change it."""
        rows = self._engine.stats_view()
        if self.threads:
            keep = [g for g, k in enumerate(self._engine.thread_kinds()) if k != THREAD_HOST]
            rows = rows[keep]                    # a copy, of the vCPUs' rows only
            if not copy:
                rows.flags.writeable = False
        elif copy:
            rows = rows.copy()
        return rows

    def latency_histogram(self):
        """Wake-latency histogram over the host (see ``model.lat_bucket``)."""
        return self._engine.lat_hist_array()

    def __repr__(self):
        return (f"Host(arch={self.arch!r}, host_cpus={self.host_cpus}, vms={len(self.vms)}, "
                f"now={self.now} ns, engine={self.engine_name!r}, "
                f"scheduler={self.scheduler!r})")


# -- host threads ---------------------------------------------------------------------------


def check_thread_affinity(affinity, host_cpus: int) -> tuple:
    """A host thread's CPU affinity: "all", a CPU, or an iterable of CPUs -> the sorted
    tuple of its CPUs (``check_affinity``; "pinned" is for vCPU threads)."""
    if isinstance(affinity, str) and affinity == "pinned":
        raise ValueError("affinity 'pinned' is for vCPU threads; a host thread takes "
                         "'all', a CPU or a list of CPUs")
    aff = check_affinity(affinity, host_cpus)
    return tuple(range(host_cpus)) if aff == "all" else aff


def host_thread_cpu(affinity: tuple, g: int, host_cpus: int) -> int:
    """The CPU a new host thread starts on, as the engines' select_task_rq_fork()
    places it: the (g mod n)-th of its n allowed CPUs (every CPU: g % host_cpus,
    as for vCPU threads).  Later wake-ups are placed by select_task_rq()."""
    return affinity[g % len(affinity)]


class HostThread:
    """A host thread that is not a vCPU (``Host.add_thread``).

    ``g``: its thread index on the host; ``name``; ``affinity``: the CPUs it may
    run on (a sorted tuple).
    """

    def __init__(self, host: Host, g: int, name: str, affinity: tuple):
        self.host = host
        self.g = g
        self.name = name
        self.affinity = affinity

    @property
    def cpu(self) -> int:
        """The host CPU it is on."""
        return self.host._engine.thread_info(self.g)["pcpu"]

    @property
    def state(self) -> str:
        """RUNNING, RUNNABLE, BLOCKED (asleep) or USER (exited)."""
        return ThreadState(self.host._engine.thread_info(self.g)["state"]).name

    def stats(self) -> dict:
        """Its counters: run_ns (on its CPU), wait_ns (runnable, waiting for it, the
        context switch included), sleep_ns, nr_runs (times it got its CPU),
        nr_preempted, nr_sleeps, nr_injects (MSIs / irqfd writes made).  Time on
        the CPU or asleep counts up to the thread's latest switch, not to now."""
        row = self.host._engine.stats_rows(self.g, 1)[0]
        return {n: int(row[i]) for i, n in enumerate(HOST_STAT_NAMES)}

    def __repr__(self):
        return (f"HostThread(g={self.g}, name={self.name!r}, cpu={self.cpu}, "
                f"state={self.state})")


# -- snapshots: the host's side of kvmwake.snapshot ---------------------------------------------

MODULE_PARAMS = haltpoll.MODULE_PARAMS


def host_to_bytes(host: Host, vm_index: int | None = None, run: dict | None = None) -> bytes:
    """Snapshot ``host`` (saying which of its VMs the snapshot is of, if any, and
    ``run``: free data about the run, kept in the header)."""
    if host._threads is not None:
        host._threads.check_all_outside("snapshot")
    desc = {"arch": host.arch, "host_cpus": host.host_cpus, "seed": host.seed,
            "costs": host.costs, "engine": host.engine_name}
    if host.scheduler != "fifo":
        desc["scheduler"] = host.scheduler      # absent: fifo (older snapshots)
    if host._llc is not None:
        desc["llc"] = host._llc                 # absent: one LLC
    if host.vcpu_pack:
        desc["vcpu_pack"] = True                # absent: upstream placement
    if host.preempt_skips_delayed:
        desc["preempt_skips_delayed"] = True    # absent: upstream wake-up preemption
    if host.traced_vm is not None:
        desc["trace_vm"] = host.traced_vm       # absent: every thread traced
    if host.threads:                            # absent: none
        desc["threads"] = [{"g": t.g, "name": t.name, "affinity": list(t.affinity)}
                           for t in host.threads]
    return _snapshot.encode(host._engine, desc, [vm._snapshot_record() for vm in host.vms],
                            vm_index=vm_index, run=run)


def restore_host(src, vmm_classes: dict | None = None, host_cpus: int | None = None,
                 threads: int | None = None, **module_params) -> tuple[Host, dict]:
    """Rebuild a ``Host`` and its VMs from a snapshot (bytes or a path); returns the
    host and the snapshot's header (``header["vm_index"]``, ``header["run"]``).

    ``host_cpus``: restore onto a host with another CPU count (see
    ``Engine.rehost``: thread g goes to CPU g % host_cpus; threads that lose
    their CPU are preempted or stop polling, as on a migration).
    """
    if host_cpus is not None:
        host_cpus = check_int("host_cpus", host_cpus, 1, MAX_HOST_CPUS)
    snap = _snapshot.decode(src)
    hc = snap.host
    try:
        host = Host(host_cpus=hc["host_cpus"], arch=hc["arch"], seed=hc["seed"],
                    costs=hc["costs"], engine="core", trace_capacity=snap.scalars["tcap"],
                    scheduler=hc.get("scheduler", "fifo"), llc=hc.get("llc"),
                    threads=threads, vcpu_pack=hc.get("vcpu_pack", False),
                    preempt_skips_delayed=hc.get("preempt_skips_delayed", False))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"snapshot host configuration is invalid: {exc}") from None
    _snapshot.check_host_cpus(snap, host.host_cpus)
    with _snapshot.inconsistent("state"):
        for rec in snap.vms:
            host.vm_class._from_record(host, rec)
        records = _snapshot.host_thread_records(snap.header)
        host._nthreads = sum(rec["nr_vcpus"] for rec in snap.vms) + len(records)
        host._engine.import_state(snap.scalars, snap.arrays)
        flags = _snapshot.check_engine(snap, host._engine)
        host.threads = [HostThread(host, r["g"], r["name"], r["affinity"]) for r in records]
        for vm in host.vms:                 # recomputed from the engine, not trusted
            for v in vm.vcpus:
                v._loaded, v._started = flags[v._g]
        for vm, rec in zip(host.vms, snap.vms):
            vm._restore_policy(rec["vmm"], vmm_classes or {})
    if "trace_vm" in hc:
        try:
            host.trace_vm(hc["trace_vm"])
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot host configuration is invalid: {exc}") from None
    for name in module_params:
        if name not in MODULE_PARAMS:
            raise TypeError(f"restore() got an unknown module parameter {name!r}")
    for name, value in module_params.items():
        setattr(host, name, value)
    if host_cpus is not None and host_cpus != host.host_cpus:
        if host.threads:
            raise SnapshotError("restoring onto another host CPU count is not implemented "
                                "with host threads")
        if host.scheduler != "fifo":
            raise SnapshotError(f"restoring onto another host CPU count is only "
                                f"implemented for the fifo scheduler, not "
                                f"{host.scheduler!r}")
        if isinstance(host._llc, list):
            raise SnapshotError(f"the snapshot's host has explicit LLC groups "
                                f"{host._llc}, which do not carry over to {host_cpus} CPUs")
        try:
            host._engine.rehost(host_cpus)
        except ValueError as exc:
            raise SnapshotError(f"cannot restore onto {host_cpus} host CPUs: {exc}") from None
        host.host_cpus = host_cpus
        if host._llc is not None:
            host._llc = min(host._llc, host_cpus)
        host._set_llc(check_llc(host._llc, host_cpus))
    return host, snap.header
