"""The Cython core and the plain-Python reference engine agree, event for event.

Hypothesis builds random set-ups (VMs, host CPUs, costs, module parameters,
KVM_CAP_HALT_POLL ceilings, ticks, guest programs with interrupt ops, vGIC
sizes, device interrupt sources, run splits with interventions) and plays each
one on both engines; every observable must be identical: stats, trace,
latency histogram, counters, clock, per-thread state, and the interrupt
controller and timer state of every vCPU.  Splitting a run must not change its
outcome.

The strategies reach the edges of every integer the engines hold: durations of
2^61 ns and sums of them past 2^62 and 2^64 in one segment, loop counts of
2^32 - 1, timer periods of 2^32 - 1, u64 register values, PSCI calls, PCs set
into loop bodies whose LOOP op never ran, every request number 0..63 with its
flags, and module parameters at the edges of their unsigned int.  The default
run is a few hundred examples; ``KVMWAKE_DIFF_EXAMPLES=N`` (or
``tools/diff_campaign.py``) runs a long campaign.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field

import pytest

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvmwake import _core, reference
from kvmwake import costs as _costs
from kvmwake import guest as G
from kvmwake import hostprog as HP
from kvmwake.guest import ProgramError
from kvmwake.guest import MAX_DURATION_NS
from kvmwake.model import (ARCHES, COST_NAMES, KVM_REQUEST_NO_ACTION, KVM_REQUEST_NO_WAKEUP,
                           KVM_REQUEST_WAIT, MAX_LOOP_DEPTH, MAX_NR_SPIS, MEM_BASE, Op, Request,
                           SourceKind, mpidr_of)
from kvmwake.reference import EngineError
from kvmwake.uapi import KvmReg, PsciFn
from kvmwake.vm import _CORE_INDEX
from kvmwake.reference import snapshot as reference_snapshot

ENGINES = {"core": _core.Engine, "reference": reference.Engine}
#: Examples of the main property: a few hundred by default; the long campaign
#: (tools/diff_campaign.py) sets KVMWAKE_DIFF_EXAMPLES.
DIFF_EXAMPLES = int(os.environ.get("KVMWAKE_DIFF_EXAMPLES", "200"))
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
#: Boundary durations: the largest a program may hold, and sums of them that pass
#: 2^62 and 2^64 within one segment.
BIG_NS = (MAX_DURATION_NS, MAX_DURATION_NS - 1, 1 << 60, (1 << 50) + 1)
#: The engines' index of the PC among the core registers (x0-x30, SP, PC, PSTATE).
PC_INDEX = _CORE_INDEX[KvmReg.PC]
#: PSCI function IDs for x0 (32- and 64-bit calling conventions, KVM's 0.1 IDs).
PSCI_FNS = tuple(int(f) for f in PsciFn) + (0x95C1BA5F, 0x95C1BA60, 0x80000000)
ZERO_COSTS = dict.fromkeys(COST_NAMES, 0)
#: Scenarios with more events than this (on the core) are skipped.
EVENT_BUDGET = 30_000
PARAMS = ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink")
PARAM_MAX = {"halt_poll_ns": 600_000, "halt_poll_ns_grow": 4,
             "halt_poll_ns_grow_start": 50_000, "halt_poll_ns_shrink": 4}

# Interrupt numbers the generated programs and interventions use: few, so that
# they meet.  arm64: SGIs (0 is the reschedule IPI), PPIs (16 level, 27 the
# timer, 30 the tick) and up to three SPIs; x86: LAPIC vectors (0xEC the
# tick, 0xFD the reschedule IPI).
SGIS = {"arm64": (0, 1, 2, 15), "x86": (0x20, 0x41, 0x80, 0xEC, 0xFD, 0xFE)}
PPIS = (16, 27, 30)
NR_SPIS_CHOICES = (0, 1, 2, 32, 224, MAX_NR_SPIS)


def spis(nr_spis):
    return tuple(sorted({i for i in (32, 33, 32 + nr_spis - 1) if 32 <= i < 32 + nr_spis}))


def intids(arch, nr_spis):
    """The INTIDs (vectors on x86) whose state is compared after every run."""
    if arch == "x86":
        return SGIS["x86"]
    return SGIS["arm64"] + PPIS + spis(nr_spis)


# ---------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    arch: str
    host_cpus: int
    seed: int
    costs: dict
    trace_capacity: int
    params: dict
    vm_sizes: list
    caps: list                  # per VM: KVM_CAP_HALT_POLL value or None
    ticks: list                 # per VM: tick period or 0
    programs: list              # per global thread: op array or None
    start: list                 # per global thread: start at t = 0
    end_ns: int
    splits: list = field(default_factory=list)   # [(t, [intervention, ...]), ...]
    nr_spis: list = None        # per VM (default: the engine's default)
    # [(vm, intid, kind, p0, p1, times, target), ...]; target: x86 MSI destination thread
    sources: list = field(default_factory=list)
    setup: list = field(default_factory=list)    # interventions made before anything runs
    pcs: list = field(default_factory=list)      # set_pc / set_reg made before the start
    suspend_caps: list = field(default_factory=list)   # VMs with KVM_CAP_ARM_SYSTEM_SUSPEND
    scheduler: str = "fifo"     # the host scheduler (kvmwake.model.SCHEDULERS)
    affinity: list = None       # per global thread: "pinned", "all" or a tuple of CPUs
    llc: list = None            # per host CPU: its LLC group (None: one LLC)
    vcpu_pack: bool = False     # Host(vcpu_pack=...): the vCPU-pack wake placement
    preempt_skips_delayed: bool = False   # Host(preempt_skips_delayed=...)
    # Host threads that are not vCPUs, added after the vCPU threads (so they are
    # threads n_threads, n_threads + 1, ...) and started at t = 0: [(ops, cpu), ...].
    host_threads: list = field(default_factory=list)

    @property
    def n_threads(self):
        return sum(self.vm_sizes)

    def has_interventions(self):
        return any(acts for _, acts in self.splits)

    def vm_of(self, g):
        for vm, nr in enumerate(self.vm_sizes):
            if g < nr:
                return vm
            g -= nr
        raise IndexError(g)

    def first(self, vm):
        return sum(self.vm_sizes[:vm])

    def spis_of(self, vm):
        return 224 if self.nr_spis is None else self.nr_spis[vm]


def _maybe_zero(hi):
    return st.one_of(st.just(0), st.integers(1, hi))


def _drawn_cost(hi):
    """A cost: mostly a constant, else a distribution (kvmwake.costs) with a tail."""
    lognormal = st.builds(
        lambda median, sigma, mx: {"dist": "lognormal", "median": median, "sigma": sigma,
                                   **({} if mx is None else {"max": median + mx})},
        st.integers(1, hi), st.sampled_from([0.05, 0.5, 1.0, 2.5]),
        st.one_of(st.none(), st.integers(0, 20 * hi)))
    quantiles = st.builds(lambda q: {"dist": "quantiles", "q": sorted(q)},
                          st.lists(st.one_of(st.integers(0, hi), st.integers(0, 30 * hi)),
                                   min_size=2, max_size=9))
    return st.one_of(_maybe_zero(hi), _maybe_zero(hi), lognormal, quantiles)


def engine_costs(costs: dict) -> dict:
    """What an engine takes for ``costs`` (specs): constants, and tables."""
    return _costs.engine_costs(_costs.normalize_costs(costs))


costs_st = st.fixed_dictionaries({
    "vm_exit_ns": _drawn_cost(3_000),
    "vm_entry_ns": _drawn_cost(3_000),
    "ipi_send_ns": _drawn_cost(1_500),
    "wake_to_run_ns": _drawn_cost(10_000),
    "context_switch_ns": _drawn_cost(5_000),
    # small slices so that preemption happens within a few ms
    "sched_slice_ns": st.one_of(st.just(0), st.integers(1, 300_000)),
})


# Mostly values that let vCPUs poll and adapt; any value in range otherwise.
# ... and, now and then, the edges of their unsigned int: a grow that wraps the u32
# multiply, a poll window of 4.29 s.
_U32_EDGES = st.sampled_from([(1 << 32) - 1, 1 << 31, 65_537])
params_st = st.fixed_dictionaries({
    "halt_poll_ns": st.one_of(st.sampled_from([500_000, 200_000, 600_000]),
                              st.integers(0, PARAM_MAX["halt_poll_ns"]), _U32_EDGES),
    "halt_poll_ns_grow": st.one_of(st.sampled_from([2, 2, 0, 1, 3, 4]), _U32_EDGES),
    "halt_poll_ns_grow_start": st.one_of(st.sampled_from([10_000, 1_000]),
                                         st.integers(0, PARAM_MAX["halt_poll_ns_grow_start"]),
                                         _U32_EDGES),
    "halt_poll_ns_shrink": st.one_of(st.sampled_from([2, 0, 1, 3, 4]), _U32_EDGES),
})

#: Interrupt ops per arch (the GIC and timer ops exist on arm64 only).
IRQ_KINDS = {
    "arm64": ["sgi", "sgi", "irq_enable", "irq_disable", "set_priority", "set_pmr", "mask",
              "unmask", "unmask", "set_handler", "timer_arm", "timer_arm", "timer_arm_exp",
              "timer_cancel", "dist_enable", "route_spi"],
    "x86": ["sgi", "sgi", "sgi", "set_pmr", "mask", "unmask", "unmask", "set_handler"],
}


def _priority(draw):
    return draw(st.one_of(st.sampled_from([0x00, 0x80, 0xA0, 0xA7, 0xE8, 0xF0, 0xF8, 0xFF]),
                          st.integers(0, 255)))


def _mpidr(draw, nr_vcpus):
    """IROUTER values: a vCPU's MPIDR, one nobody has, or with bits IROUTER ignores."""
    return draw(st.one_of(
        st.builds(mpidr_of, st.integers(0, nr_vcpus)),           # nr_vcpus: nobody
        st.sampled_from([0x10, 0xFF, 0x0100, 0x01_0000, 0x8000_0000, 0xAB_0000_0001]),
        st.integers(0, 2**64 - 1)))


def _targets(draw, nr_vcpus):
    kinds = [st.integers(0, nr_vcpus - 1),
             st.lists(st.integers(0, nr_vcpus - 1), min_size=1, max_size=nr_vcpus),
             st.just("all-but-self"), st.just("next")]
    if nr_vcpus >= 2:
        kinds.append(st.just("random-other"))
    return draw(st.one_of(*kinds))


@st.composite
def guest_op(draw, arch, nr_vcpus, nr_spis, irq_weight):
    kinds = ["compute", "compute", "compute_exp", "compute_exp", "compute_uniform",
             "wfi", "wfi", "wfi", "wake", "wake", "wake_next"]
    if nr_vcpus >= 2:
        kinds += ["wake_random_other", "wake_random_other"]
    kinds += IRQ_KINDS[arch] * irq_weight
    kinds += ["set_reg", "sync"]
    if arch == "arm64":
        kinds += ["hvc"]
    if draw(st.integers(0, 15)) == 15:
        kinds = ["end"]
    kind = draw(st.sampled_from(kinds))
    # One op in 20 takes its numbers at the edges of their ranges.
    edge = draw(st.integers(0, 19)) == 0
    if kind == "compute":
        return G.compute(draw(st.sampled_from(BIG_NS)) if edge else draw(st.integers(0, 30_000)))
    if kind == "compute_exp":
        return G.compute_exp(draw(st.sampled_from(BIG_NS)) if edge
                             else draw(st.integers(0, 30_000)))
    if kind == "compute_uniform":
        if edge:
            return G.compute_uniform(draw(st.sampled_from([0, 1, MAX_DURATION_NS])),
                                     MAX_DURATION_NS)
        lo, hi = sorted(draw(st.lists(st.integers(0, 30_000), min_size=2, max_size=2)))
        return G.compute_uniform(lo, hi)
    if kind == "set_reg":
        return G.set_reg(draw(st.integers(0, 3)),
                         draw(st.one_of(st.sampled_from([0, 1, U32_MAX, U32_MAX + 1, U64_MAX]),
                                        st.sampled_from(PSCI_FNS),
                                        st.builds(mpidr_of, st.integers(0, nr_vcpus)),
                                        st.integers(0, U64_MAX))))
    if kind == "hvc":
        # An SMCCC call with x0..x3 as the program left them (PSCI IDs among the
        # values set_reg writes).
        return G.hvc()
    if kind == "sync":
        return (G.sync(draw(st.sampled_from([0, U64_MAX]))) if draw(st.booleans())
                else G.sync_reg(draw(st.integers(0, 3))))
    if kind == "wfi":
        return G.wfi()
    if kind == "wake":
        return G.wake(draw(st.integers(0, nr_vcpus - 1)))
    if kind == "wake_next":
        return G.wake_next()
    if kind == "wake_random_other":
        return G.wake_random_other()
    if kind == "sgi":
        return G.sgi(draw(st.sampled_from(SGIS[arch])), _targets(draw, nr_vcpus))
    if kind in ("irq_enable", "irq_disable", "set_priority"):
        intid = draw(st.sampled_from(SGIS[arch] + PPIS + spis(nr_spis)))
        if kind == "set_priority":
            return G.set_priority(intid, _priority(draw))
        return (G.irq_enable if kind == "irq_enable" else G.irq_disable)(intid)
    if kind == "set_pmr":
        return G.set_pmr(_priority(draw))
    if kind == "mask":
        return G.mask()
    if kind == "unmask":
        return G.unmask()
    if kind == "set_handler":
        return G.set_handler(draw(st.sampled_from([0, 0, 1, 500, 3_000, 20_000]
                                                  + ([MAX_DURATION_NS] if edge else []))),
                             iret=draw(st.sampled_from([True, True, False])))
    if kind in ("timer_arm", "timer_arm_exp"):
        # Short periods let a late handler find the next deadline already due.
        period = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 60_000),
                                st.integers(1, 2_000)))
        delay = draw(st.one_of(st.just(0), st.integers(1, 60_000)))
        if edge:
            period = draw(st.sampled_from([period, U32_MAX]))
            delay = draw(st.sampled_from(BIG_NS))
        return (G.timer_arm if kind == "timer_arm" else G.timer_arm_exp)(delay, period)
    if kind == "timer_cancel":
        return G.timer_cancel()
    if kind == "dist_enable":
        return G.dist_enable(draw(st.integers(0, 3)) != 0)
    if kind == "route_spi":
        if not spis(nr_spis):
            return G.compute(1)
        return G.route_spi(draw(st.sampled_from(spis(nr_spis))), _mpidr(draw, nr_vcpus))
    return G.end()


def _takes_time(items):
    """guest.py's rule: a WFI or a compute whose first parameter is positive."""
    for it in items:
        if isinstance(it, G._Loop):
            if _takes_time(it.body):
                return True
        elif it.code in (Op.WFI, Op.SYNC, Op.HVC) or (it.code == Op.COMPUTE and it.p0 > 0):
            return True
    return False


@st.composite
def guest_items(draw, arch, nr_vcpus, nr_spis, irq_weight, depth=0):
    items = []
    for _ in range(draw(st.integers(1, 5 if depth <= 1 else 3))):
        if depth < MAX_LOOP_DEPTH and draw(st.integers(0, 3)) == 3:
            body = draw(guest_items(arch, nr_vcpus, nr_spis, irq_weight, depth + 1))
            if not _takes_time(body):
                # guest.Program would reject it: give the body some time.
                body.append(draw(st.sampled_from([G.wfi(), G.compute(1), G.compute(2_500)])))
            items.append(G.loop(body, draw(st.sampled_from([0, 0, 1, 2, 3, 7, U32_MAX]))))
        else:
            items.append(draw(guest_op(arch, nr_vcpus, nr_spis, irq_weight)))
    return items


@st.composite
def program_ops(draw, arch, nr_vcpus, nr_spis, irq_weight):
    idle_loop = draw(st.integers(0, 3)) != 3
    items = draw(guest_items(arch, nr_vcpus, nr_spis, irq_weight, depth=1 if idle_loop else 0))
    if idle_loop:
        # Most vCPUs run an idle loop (as guests do) rather than ending at once.
        if not _takes_time(items):
            items.append(G.wfi())
        items = [G.loop(items, draw(st.sampled_from([0, 0, 0, 5, 50, U32_MAX])))]
    try:
        prog = G.Program(items)
    except ProgramError:   # not expected: guest_items builds valid programs
        assume(False)
    G.validate(prog.ops, nr_vcpus, arch, nr_spis)
    return prog.ops


@st.composite
def source(draw, arch, vm, first, nr_vcpus, nr_spis, end_ns):
    """A device source: on one of the VM's SPIs (arm64) or MSIs of a vector to one of
    its vCPUs (x86): (vm, intid, kind, p0, p1, times, target thread)."""
    if arch == "x86":
        intid = draw(st.one_of(st.sampled_from(SGIS["x86"]), st.integers(16, 255)))
        target = first + draw(st.integers(0, nr_vcpus - 1))
    else:
        intid, target = draw(st.sampled_from(spis(nr_spis))), 0
    kind = draw(st.sampled_from(list(SourceKind)))
    if kind == SourceKind.PERIODIC:
        return (vm, intid, int(kind), draw(st.integers(2_000, 400_000)),
                draw(st.integers(0, max(end_ns, 1))), None, target)
    if kind == SourceKind.POISSON:
        return (vm, intid, int(kind), draw(st.integers(2_000, 400_000)), 0, None, target)
    times = sorted(draw(st.lists(st.integers(0, max(end_ns, 1)), max_size=12)))
    if times and draw(st.booleans()):
        times.insert(draw(st.integers(0, len(times) - 1)), times[0])   # a repeated time
        times.sort()
    return (vm, intid, int(kind), 0, 0, times, target)


def _host_dist(draw):
    kind = draw(st.sampled_from(["fixed", "fixed", "exp", "uniform"]))
    if kind == "fixed":
        return draw(st.one_of(st.integers(0, 40_000), st.integers(1, 2_000)))
    if kind == "exp":
        return ("exp", draw(st.integers(0, 60_000)))
    lo, hi = sorted(draw(st.lists(st.integers(0, 40_000), min_size=2, max_size=2)))
    return ("uniform", lo, hi)


@st.composite
def host_items(draw, arch, vm_sizes, nr_spis, depth=0):
    items = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["compute", "sleep", "sleep", "sleep_until", "inject",
                                     "inject", "loop"]))
        if kind == "compute":
            items.append(HP.compute(_host_dist(draw)))
        elif kind == "sleep":
            items.append(HP.sleep(_host_dist(draw)))
        elif kind == "sleep_until":
            items.append(HP.sleep_until(_host_dist(draw)))
        elif kind == "inject":
            vm = draw(st.integers(0, len(vm_sizes) - 1))
            if arch == "x86":
                items.append(HP.msi(vm, draw(st.integers(0, vm_sizes[vm] - 1)),
                                    draw(st.one_of(st.sampled_from(SGIS["x86"]),
                                                   st.integers(16, 255)))))
            elif spis(nr_spis[vm]):
                items.append(HP.irq(vm, draw(st.sampled_from(spis(nr_spis[vm])))))
        elif depth < MAX_LOOP_DEPTH - 1:
            body = draw(host_items(arch, vm_sizes, nr_spis, depth + 1))
            # hostprog would reject a loop in which no time passes.
            body.append(draw(st.sampled_from([HP.compute(1), HP.sleep(3_000),
                                              HP.compute(20_000), HP.sleep(50_000)])))
            items.append(HP.loop(body, draw(st.sampled_from([None, None, 1, 3, U32_MAX]))))
    return items


@st.composite
def host_thread(draw, arch, vm_sizes, nr_spis, host_cpus):
    """A host thread's program (its MSI / IRQ ops name VMs by index) and CPU."""
    items = draw(host_items(arch, vm_sizes, nr_spis))
    if draw(st.integers(0, 3)) != 0:
        items = [HP.loop(items + [HP.sleep(draw(st.integers(1, 200_000)))])]
    prog = HP.HostProgram(items)
    ops = prog.ops.copy()
    for i, vm in prog.vm_refs.items():
        ops["p0"][i] = vm
    return ops, draw(st.integers(0, host_cpus - 1))


@st.composite
def vm_setup(draw, arch, vm, first, nr_vcpus, nr_spis):
    """How the VM's interrupts are set up before it runs (interventions)."""
    acts = []
    if arch == "x86":
        for g in range(first, first + nr_vcpus):
            if draw(st.integers(0, 3)) == 0:
                acts.append(("set_pmr", g, draw(st.sampled_from([0x10, 0x40, 0xE0, 0xF0]))))
            if draw(st.integers(0, 7)) == 0:
                acts.append(("set_masked", g, True))
        return acts
    if draw(st.integers(0, 7)) == 0:
        acts.append(("dist", vm, False))                 # enabled later, or never
    for intid in spis(nr_spis):
        if draw(st.integers(0, 3)) != 0:
            acts.append(("configure", vm, -1, intid, draw(st.sampled_from([1, 1, 1, 0])),
                         draw(st.one_of(st.just(-1), st.just(0xF0), st.integers(0, 255))),
                         draw(st.sampled_from([-1, 0, 0, 1]))))
        if draw(st.booleans()):
            acts.append(("route", vm, intid, _mpidr(draw, nr_vcpus)))
    for g in range(first, first + nr_vcpus):
        if draw(st.integers(0, 3)) == 0:
            # A private interrupt of this vCPU: the timer PPI off, a priority at or
            # above the PMR, the level PPI 16 on ...
            acts.append(("configure", vm, g, draw(st.sampled_from(SGIS["arm64"] + PPIS)),
                         draw(st.sampled_from([-1, 0, 1])),
                         draw(st.one_of(st.just(-1), st.just(0xF0), st.integers(0, 255))), -1))
        if draw(st.integers(0, 5)) == 0:
            acts.append(("set_pmr", g, _priority(draw)))
    return acts


@st.composite
def reg_write(draw, n_threads, kind=None):
    """KVM_SET_ONE_REG on a vCPU outside KVM_RUN: its PC at an op of its program (a
    loop body whose LOOP op never ran, ...) or at an address with no op; or x0..x3."""
    kind = kind or draw(st.sampled_from(["set_pc", "set_pc", "set_reg"]))
    g = draw(st.integers(0, n_threads - 1))
    if kind == "set_pc":
        return ("set_pc", g, draw(st.one_of(st.integers(0, 12).map(lambda i: ("op", i)),
                                            st.sampled_from([("raw", 0), ("raw", U64_MAX),
                                                             ("op", 1 << 40)]))))
    return ("set_reg", g, draw(st.integers(0, 3)),
            draw(st.sampled_from([0, U32_MAX, U64_MAX, 0x84000001])))


@st.composite
def intervention(draw, arch, vm_sizes, nr_spis, end_ns):
    n_threads, n_vms = sum(vm_sizes), len(vm_sizes)
    kinds = ["request", "request", "kick", "raise", "param", "cap", "start", "tick", "set_pmr",
             "set_masked", "signal", "set_pc", "set_reg"]
    if arch == "x86":
        kinds += ["msi", "msi", "source"]
    else:
        kinds += ["irq_line", "irq_line", "configure", "configure", "dist", "dist", "route",
                  "source", "source"]
    kind = draw(st.sampled_from(kinds))
    if kind == "request":
        # The kernel's requests, or any request number 0..63 (vcpu->requests is a
        # u64) with any of the flags.
        req = draw(st.one_of(st.sampled_from(list(Request)).map(int),
                             st.builds(lambda nr, fl: nr | fl, st.integers(0, 63),
                                       st.sampled_from([0, KVM_REQUEST_NO_WAKEUP,
                                                        KVM_REQUEST_WAIT,
                                                        KVM_REQUEST_NO_ACTION,
                                                        KVM_REQUEST_WAIT
                                                        | KVM_REQUEST_NO_WAKEUP]))))
        return ("request", draw(st.integers(0, n_threads - 1)), req)
    if kind in ("kick", "raise", "start", "signal"):
        return (kind, draw(st.integers(0, n_threads - 1)))
    if kind in ("set_pc", "set_reg"):
        return draw(reg_write(n_threads, kind))
    if kind == "param":
        name = draw(st.sampled_from(PARAMS))
        return ("param", name, draw(st.one_of(st.integers(0, PARAM_MAX[name]), _U32_EDGES)))
    if kind == "cap":
        # lower the VM's current ceiling to pct % of it
        return ("cap", draw(st.integers(0, n_vms - 1)), draw(st.integers(0, 100)))
    if kind == "tick":
        return ("tick", draw(st.integers(0, n_vms - 1)),
                draw(st.one_of(st.just(0), st.integers(5_000, 400_000))))
    if kind == "set_pmr":
        return ("set_pmr", draw(st.integers(0, n_threads - 1)), _priority(draw))
    if kind == "set_masked":
        return ("set_masked", draw(st.integers(0, n_threads - 1)), draw(st.booleans()))
    if kind == "msi":
        return ("msi", draw(st.integers(0, n_threads - 1)),
                draw(st.one_of(st.sampled_from(SGIS["x86"]), st.integers(16, 255))))
    vm = draw(st.integers(0, n_vms - 1))
    first = sum(vm_sizes[:vm])
    if kind == "dist":
        return ("dist", vm, draw(st.sampled_from([True, True, False])))
    vm_spis = spis(nr_spis[vm])
    if kind in ("route", "source") and arch == "arm64" and not vm_spis:
        return ("dist", vm, True)
    if kind == "route":
        return ("route", vm, draw(st.sampled_from(vm_spis)), _mpidr(draw, vm_sizes[vm]))
    if kind == "source":
        return ("source", draw(source(arch, vm, first, vm_sizes[vm], nr_spis[vm], end_ns)))
    # A PPI of one of the VM's vCPUs, or one of its SPIs (no vCPU: -1).
    g = first + draw(st.integers(0, vm_sizes[vm] - 1))
    intid = draw(st.sampled_from(PPIS + vm_spis if kind == "irq_line"
                                 else SGIS["arm64"] + PPIS + vm_spis))
    if intid >= 32:
        g = -1
    if kind == "irq_line":
        return ("irq_line", vm, intid, draw(st.booleans()), g)
    return ("configure", vm, g, intid, draw(st.sampled_from([-1, 0, 1, 1])),
            draw(st.one_of(st.just(-1), st.integers(0, 255))),
            draw(st.sampled_from([-1, 0, 1])) if intid >= 32 else -1)


@st.composite
def scenarios(draw):
    arch = draw(st.sampled_from(ARCHES))
    irq_weight = draw(st.sampled_from([0, 1, 1, 2]))
    n_vms = draw(st.integers(1, 3))
    vm_sizes = [draw(st.integers(1, 12)) for _ in range(n_vms)]
    nr_spis = [draw(st.sampled_from(NR_SPIS_CHOICES)) if arch == "arm64" else 224
               for _ in vm_sizes]
    programs, start = [], []
    for nr, ns in zip(vm_sizes, nr_spis):
        for _ in range(nr):
            if draw(st.integers(0, 5)) == 5:
                programs.append(None)           # a vCPU thread that never runs
                start.append(False)
            else:
                programs.append(draw(program_ops(arch, nr, ns, irq_weight)))
                start.append(draw(st.integers(0, 7)) != 7)
    if draw(st.integers(0, 5)) == 5:
        end_ns = draw(st.integers(0, 50_000))
    else:
        end_ns = draw(st.integers(300, 3_000)) * 1_000
    sources, setup = [], []
    for vm, (nr, ns) in enumerate(zip(vm_sizes, nr_spis)):
        first = sum(vm_sizes[:vm])
        if arch == "x86" or spis(ns):
            sources += draw(st.lists(source(arch, vm, first, nr, ns, end_ns), max_size=3))
        setup += draw(vm_setup(arch, vm, first, nr, ns))
    pcs = draw(st.lists(reg_write(sum(vm_sizes)), max_size=2))
    host_cpus = draw(st.integers(1, 8))
    host_threads = draw(st.lists(host_thread(arch, vm_sizes, nr_spis, host_cpus),
                                 max_size=3)) if draw(st.integers(0, 2)) == 0 else []
    split_times = sorted(draw(st.lists(st.integers(0, end_ns), max_size=3)))
    splits = [(t, draw(st.lists(intervention(arch, vm_sizes, nr_spis, end_ns), max_size=4)))
              for t in split_times]
    return Scenario(
        arch=arch,
        host_cpus=host_cpus,
        host_threads=host_threads,
        seed=draw(st.integers(0, 2**64 - 1)),
        costs=draw(costs_st),
        trace_capacity=draw(st.sampled_from([0, 1, 7, 64, 1 << 20])),
        params=draw(params_st),
        vm_sizes=vm_sizes,
        caps=[draw(st.one_of(st.none(), st.integers(0, 600_000), st.just(U32_MAX)))
              for _ in vm_sizes],
        ticks=[0 if draw(st.booleans()) else draw(st.integers(5_000, 400_000))
               for _ in vm_sizes],
        programs=programs,
        start=start,
        end_ns=end_ns,
        splits=splits,
        nr_spis=nr_spis,
        sources=sources,
        setup=setup,
        pcs=pcs,
        suspend_caps=[vm for vm in range(n_vms) if arch == "arm64" and draw(st.booleans())],
    )


# ---------------------------------------------------------------- playing

def build(engine_cls, sc: Scenario):
    e = engine_cls(sc.arch, sc.host_cpus, sc.seed, costs=engine_costs(sc.costs),
                   trace_capacity=sc.trace_capacity, scheduler=sc.scheduler)
    if sc.llc is not None:
        e.set_llc(sc.llc)
    e.set_vcpu_pack(sc.vcpu_pack)
    e.set_preempt_skips_delayed(sc.preempt_skips_delayed)
    for name, value in sc.params.items():
        setattr(e, name, value)
    for vm, nr in enumerate(sc.vm_sizes):
        if sc.nr_spis is None:
            e.add_vm(nr)
        else:
            e.add_vm(nr, sc.nr_spis[vm])
    for g, aff in enumerate(sc.affinity or ()):
        if aff != "pinned":
            e.set_affinity(g, aff, True)
    for vm, cap in enumerate(sc.caps):
        if cap is not None:
            e.set_vm_halt_poll(vm, cap)
    for vm in sc.suspend_caps:
        e.enable_system_suspend(vm)
    for vm, period in enumerate(sc.ticks):
        if period:
            e.set_tick(vm, period)
    for act in sc.setup:
        apply(e, sc, None, act)
    for src in sc.sources:
        e.add_source(*src)
    for g, ops in enumerate(sc.programs):
        if ops is not None:
            e.load_program(g, ops)
    for act in sc.pcs:
        apply(e, sc, None, act)
    for g, go in enumerate(sc.start):
        if go:
            e.start_vcpu(g)
    for ops, cpu in sc.host_threads:
        e.start_host_thread(e.add_host_thread(ops, cpu))
    return e


def apply(e, sc: Scenario, book: dict, act):
    """One intervention at the current virtual time; ``book`` tracks ceilings."""
    kind = act[0]
    if kind == "request":
        e.make_request(act[1], act[2])
    elif kind == "signal":
        e.signal(act[1])
    elif kind in ("set_pc", "set_reg"):
        # Only outside KVM_RUN, as the API allows it (the thread states are the
        # same in both engines, so both skip the same calls).
        if e.thread_info(act[1])["state"] != 0:
            return
        if kind == "set_reg":
            e.set_reg(act[1], act[2], act[3])
        else:
            where, v = act[2]
            base = MEM_BASE[sc.arch]
            e.set_reg(act[1], PC_INDEX, base + 4 * v if where == "op" else v)
    elif kind == "kick":
        e.kick(act[1])
    elif kind == "raise":
        e.raise_pending(act[1])
    elif kind == "start":
        if sc.programs[act[1]] is not None:
            # KVM_RUN again, as VCpu.run does it: the thread's last exit is taken
            # (kvm_run is refilled) before it re-enters.
            if act[1] in e.pending_exits():
                e.take_exit(act[1])
            e.start_vcpu(act[1])
    elif kind == "param":
        setattr(e, act[1], act[2])
        book["module"] = e.halt_poll_ns
    elif kind == "cap":
        vm, pct = act[1], act[2]
        cur = book["caps"][vm] if book["caps"][vm] is not None else book["module"]
        book["caps"][vm] = cur * pct // 100
        e.set_vm_halt_poll(vm, book["caps"][vm])
    elif kind == "tick":
        e.set_tick(act[1], act[2])
    elif kind == "set_pmr":
        e.set_pmr(act[1], act[2])
    elif kind == "set_masked":
        e.set_masked(act[1], act[2])
    elif kind == "msi":
        e.signal_msi(act[1], act[2])
    elif kind == "irq_line":
        e.irq_line(*act[1:])
    elif kind == "configure":
        e.configure_irq(*act[1:])
    elif kind == "dist":
        e.set_dist_enabled(act[1], act[2])
    elif kind == "route":
        e.route_spi(*act[1:])
    elif kind == "set_affinity":
        e.set_affinity(act[1], act[2])
    else:
        assert kind == "source"
        e.add_source(*act[1])


def snapshot(e, sc: Scenario):
    n_threads = sc.n_threads
    return {
        "now": e.now,
        "events": e.events,
        "halts": e.halts,
        "trace_dropped": e.trace_dropped,
        "stats": e.stats_array().tolist(),
        "lat_hist": e.lat_hist_array().tolist(),
        "trace": e.trace_list(),
        "thread_info": [e.thread_info(g) for g in range(n_threads + len(sc.host_threads))],
        "params": tuple(getattr(e, name) for name in PARAMS),
        "costs": dict(e.costs),
        "cost_tables": e.cost_tables(),
        "irq_state": [[e.irq_state(g, i) for i in intids(sc.arch, sc.spis_of(sc.vm_of(g)))]
                      for g in range(n_threads)],
        "timer_state": [e.timer_state(g) for g in range(n_threads)],
        "distributor": [e.vm_gic_enabled(vm) for vm in range(len(sc.vm_sizes))],
        "sched": e.sched_state(),
        "affinity": [e.affinity(g) for g in range(n_threads)],
    }


def play(engine_cls, sc: Scenario, split=True, interventions=True, keep=None):
    """Play the scenario; returns (error message or None, snapshot); ``keep``: a
    list to append the engine to."""
    e = build(engine_cls, sc)
    if keep is not None:
        keep.append(e)
    book = {"module": sc.params["halt_poll_ns"], "caps": list(sc.caps)}
    err = None
    try:
        if split:
            for t, acts in sc.splits:
                e.run(t)
                assert e.now == t
                if interventions:
                    for act in acts:
                        apply(e, sc, book, act)
        e.run(sc.end_ns)
    except EngineError as exc:
        err = str(exc)
    return err, snapshot(e, sc)


def within_budget(sc: Scenario, split=True) -> bool:
    """Whether the core plays ``sc`` (as ``play`` does) in at most EVENT_BUDGET events.

    The run goes in sixteenths of each stretch between split points and stops as
    soon as the budget is spent, so that a scenario of millions of events (a 1 ns
    compute loop with zero costs makes an event per ns) is turned down after a
    few ten thousand, in the debug build (the whole state checked every
    CHECK_EVERY events) as in the release one.  Split runs equal direct ones, so
    the stepping changes nothing of what it counts."""
    e = build(_core.Engine, sc)
    book = {"module": sc.params["halt_poll_ns"], "caps": list(sc.caps)}
    stops = (list(sc.splits) if split else []) + [(sc.end_ns, [])]
    try:
        for t, acts in stops:
            t0 = e.now
            for k in range(1, 17):
                e.run(t0 + (t - t0) * k // 16)
                if e.events > EVENT_BUDGET:
                    return False
            for act in acts:
                apply(e, sc, book, act)
    except EngineError:
        pass
    return True


def assert_same(a, b, what):
    err_a, snap_a = a
    err_b, snap_b = b
    assert err_a == err_b, f"{what}: errors differ"
    for key in snap_a:
        assert snap_a[key] == snap_b[key], f"{what}: {key} differs"


# ---------------------------------------------------------------- properties

@settings(max_examples=DIFF_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=scenarios())
def test_core_and_reference_agree(sc):
    assume(within_budget(sc))
    core = play(_core.Engine, sc)
    # Keep the slow reference engine's share small (a 1 ns compute loop with
    # zero costs makes an event per ns).
    assume(core[1]["events"] <= EVENT_BUDGET)
    ref = play(reference.Engine, sc)
    assert_same(core, ref, "core vs reference")
    # Splitting a run (without interventions) changes nothing.
    direct = play(_core.Engine, sc, split=False)
    assert_same(play(_core.Engine, sc, interventions=False), direct, "split vs direct")
    if not sc.has_interventions():
        assert_same(ref, direct, "reference split vs core direct")


def _eevdf(sc, skip=False):
    """The scenario on an EEVDF host, run 4 times as long (ticks are 4 ms apart);
    ``skip``: wake-up preemption past delayed sleepers (preempt_skips_delayed)."""
    return dataclasses.replace(sc, scheduler="eevdf", end_ns=sc.end_ns * 4,
                               preempt_skips_delayed=skip)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=st.tuples(scenarios(), st.booleans()).map(lambda a: _eevdf(*a)))
def test_core_and_reference_agree_eevdf(sc):
    """The EEVDF host scheduler (core/host.pxi, reference/host.py): both engines
    identical event for event, split runs equal to direct ones."""
    assume(within_budget(sc))
    core = play(_core.Engine, sc)
    assume(core[1]["events"] <= EVENT_BUDGET)
    kept = []
    ref = play(reference.Engine, sc, keep=kept)
    assert_same(core, ref, "core vs reference (eevdf)")
    if ref[0] is None:
        # Every run queue, on_rq/delayed flag and vruntime sum still consistent.
        reference_snapshot.check_state(kept[0])
    direct = play(_core.Engine, sc, split=False)
    assert_same(play(_core.Engine, sc, interventions=False), direct, "split vs direct (eevdf)")


def cpu_sets(n_cpus):
    """An affinity: all (half the time), pinned, or a set of CPUs."""
    return st.one_of(st.just("pinned"), st.just("all"), st.just("all"),
                     st.sets(st.integers(0, n_cpus - 1), min_size=1).map(lambda c: tuple(sorted(c))))


@st.composite
def placed_scenarios(draw, scheduler):
    """A scenario with unpinned threads (affinity "all" or CPU sets), LLC groups and
    set_affinity interventions, on a host of the given scheduler."""
    sc = draw(scenarios())
    n = sc.host_cpus
    k = draw(st.integers(1, n))
    llc = draw(st.sampled_from([None, [c // k for c in range(n)]]))
    affinity = [draw(cpu_sets(n)) for _ in range(sc.n_threads)]
    splits = [(t, acts + draw(st.lists(st.tuples(st.just("set_affinity"),
                                                 st.integers(0, sc.n_threads - 1),
                                                 cpu_sets(n)), max_size=2)))
              for t, acts in sc.splits]
    end = sc.end_ns * (4 if scheduler == "eevdf" else 1)
    pack, skip = draw(st.booleans()), draw(st.booleans())
    return dataclasses.replace(sc, scheduler=scheduler, affinity=affinity, llc=llc,
                               splits=splits, end_ns=end, vcpu_pack=pack,
                               preempt_skips_delayed=skip)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(sc=st.sampled_from(["fifo", "eevdf"]).flatmap(placed_scenarios))
def test_core_and_reference_agree_placement(sc):
    """Placement (affinity sets, LLC groups, wake placement, newly-idle pulls,
    set_affinity at run time; the vCPU-pack placement and wake-up preemption past
    delayed sleepers, on or off) on FIFO and EEVDF hosts: both engines identical
    event for event (host CPUs and nr_migrations included), the state consistent."""
    assume(within_budget(sc))
    core = play(_core.Engine, sc)
    assume(core[1]["events"] <= EVENT_BUDGET)
    kept = []
    ref = play(reference.Engine, sc, keep=kept)
    assert_same(core, ref, f"core vs reference (placement, {sc.scheduler})")
    if ref[0] is None:
        reference_snapshot.check_state(kept[0])
    direct = play(_core.Engine, sc, split=False)
    assert_same(play(_core.Engine, sc, interventions=False), direct,
                f"split vs direct (placement, {sc.scheduler})")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(sc=scenarios())
def test_reference_split_equals_direct(sc):
    assume(within_budget(sc, split=False))
    assert_same(play(reference.Engine, sc, interventions=False),
                play(reference.Engine, sc, split=False), "reference split vs direct")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_same_inputs_same_outputs(name):
    """Each engine is deterministic: the same scenario twice gives the same result."""
    cls = ENGINES[name]
    progs = [G.Program([G.loop([G.compute_exp(5_000), G.wake_random_other(), G.wfi()])]).ops] * 4
    sc = Scenario(arch="arm64", host_cpus=2, seed=12345, costs={"sched_slice_ns": 20_000},
                  trace_capacity=1 << 20, params={"halt_poll_ns": 100_000}, vm_sizes=[4],
                  caps=[None], ticks=[100_000], programs=progs, start=[True] * 4,
                  end_ns=2_000_000)
    first = play(cls, sc)
    assert first[0] is None and first[1]["halts"] > 50
    assert_same(first, play(cls, sc), name)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_same_inputs_same_outputs_with_interrupts(name):
    """... also with Poisson device sources, handlers, timers and SGIs to lists."""
    cls = ENGINES[name]
    progs = [G.Program([G.set_handler(1_500), G.timer_arm_exp(50_000, period_ns=40_000),
                        G.loop([G.compute_exp(5_000), G.sgi(3, [0, 2]), G.wfi()])]).ops] * 4
    sc = Scenario(arch="arm64", host_cpus=2, seed=54321, costs={"sched_slice_ns": 20_000},
                  trace_capacity=1 << 20, params={"halt_poll_ns": 100_000}, vm_sizes=[4],
                  caps=[None], ticks=[0], programs=progs, start=[True] * 4,
                  end_ns=2_000_000, nr_spis=[32],
                  setup=[("configure", 0, -1, 40, 1, 0x80, 0), ("route", 0, 40, mpidr_of(3)),
                         ("configure", 0, -1, 63, 1, -1, -1)],
                  sources=[(0, 40, 1, 20_000, 0, None, 0), (0, 63, 1, 70_000, 0, None, 0)])
    first = play(cls, sc)
    assert first[0] is None and first[1]["halts"] > 50
    assert all(t["cval"] > 1_900_000 for t in first[1]["timer_state"])
    assert_same(first, play(cls, sc), name)


def test_trace_ring_beyond_first_allocation():
    """A ring larger than the core's first allocation (4096 records) wraps identically."""
    sc = Scenario(arch="x86", host_cpus=1, seed=7, costs=dict(ZERO_COSTS), trace_capacity=5_000,
                  params={"halt_poll_ns": 0}, vm_sizes=[1], caps=[None], ticks=[1_000],
                  programs=[G.Program([G.loop([G.wfi()])]).ops], start=[True],
                  end_ns=6_500_000)
    core, ref = play(_core.Engine, sc), play(reference.Engine, sc)
    assert_same(core, ref, "core vs reference")
    snap = core[1]
    assert snap["halts"] == 6_499
    assert len(snap["trace"]) == 5_000
    assert snap["trace_dropped"] == 1_499
    assert snap["trace"][0][0] == 1_500_000 and snap["trace"][-1][0] == 6_499_000


# ---------------------------------------------------------------- errors

PING_PONG = [G.Program([G.loop([G.wake(1), G.wfi()])]).ops,
             G.Program([G.loop([G.wake(0), G.wfi()])]).ops]
RING3 = [G.Program([G.loop([G.wake_next(), G.wfi()])]).ops] * 3


@pytest.mark.parametrize("programs, host_cpus, halt_poll_ns", [
    (PING_PONG, 2, 500_000),   # two vCPUs wake each other at one instant forever
    (PING_PONG, 2, 0),
    (PING_PONG, 1, 500_000),   # ... also when they share a host CPU
    (RING3, 3, 0),
], ids=["ping-pong", "ping-pong-nopoll", "ping-pong-one-cpu", "ring3"])
def test_engine_errors_match(programs, host_cpus, halt_poll_ns):
    """With every cost 0 a program that lets no time pass is an EngineError in both engines."""
    sc = Scenario(arch="arm64", host_cpus=host_cpus, seed=1, costs=dict(ZERO_COSTS),
                  trace_capacity=1 << 20, params={"halt_poll_ns": halt_poll_ns},
                  vm_sizes=[len(programs)], caps=[None], ticks=[0], programs=programs,
                  start=[True] * len(programs), end_ns=1_000_000)
    engines = {}
    for name, cls in ENGINES.items():
        e = build(cls, sc)
        with pytest.raises(EngineError, match="makes no progress") as info:
            e.run(sc.end_ns)
        engines[name] = (str(info.value), snapshot(e, sc))
        # The engine stays stopped: a second run raises again.
        with pytest.raises(EngineError):
            e.run(sc.end_ns + 1)
    assert_same(engines["core"], engines["reference"], "at the error")
    assert engines["core"][1]["now"] == 0


def test_error_after_intervention_matches():
    """A zero-time ping-pong started by an intervention fails the same way in both engines."""
    sc = Scenario(arch="arm64", host_cpus=2, seed=1, costs=dict(ZERO_COSTS),
                  trace_capacity=1 << 20, params={"halt_poll_ns": 0}, vm_sizes=[2],
                  caps=[None], ticks=[0],
                  programs=[G.Program([G.wfi(), G.loop([G.wake(1), G.wfi()])]).ops,
                            G.Program([G.loop([G.wfi(), G.wake(0)])]).ops],
                  start=[True, True], end_ns=100,
                  splits=[(50, [("raise", 0)])])
    core, ref = play(_core.Engine, sc), play(reference.Engine, sc)
    assert core[0] is not None and "makes no progress" in core[0]
    assert core[1]["now"] == 50
    assert_same(core, ref, "core vs reference")


# ---------------------------------------------------------------- interrupt corner cases

def _progs(*items_lists):
    return [G.Program(items).ops for items in items_lists]


RARE = {
    # An SPI re-routed and raised again while it is active in vCPU 0's handler: its EOI
    # kicks vCPU 1, where the SPI now is (vgic_prune_ap_list's migration).
    "eoi-after-reroute": dict(
        arch="arm64", vm_sizes=[3], end_ns=400_000,
        programs=_progs([G.set_handler(50_000), G.compute(200_000)],
                        [G.compute(20_000), G.wfi(), G.compute(1_000), G.wfi()],
                        [G.loop([G.wfi()])]),
        setup=[("configure", 0, -1, 40, 1, -1, -1)],
        splits=[(10_000, [("irq_line", 0, 40, True, -1)]),
                (10_001, [("route", 0, 40, mpidr_of(1)), ("irq_line", 0, 40, True, -1)])],
        error=None),
    # A level PPI whose line stays high, no handler time: an interrupt storm.
    "storm": dict(
        arch="arm64", vm_sizes=[2], end_ns=100_000,
        programs=_progs([G.compute(100_000)], [G.loop([G.wfi()])]),
        setup=[("configure", 0, 0, 16, 1, -1, -1)],
        splits=[(10_000, [("irq_line", 0, 16, True, 0)])],
        error="interrupt storm"),
    # A 1 ns periodic timer taken 10 us late: 10000 deadlines due at once, a storm too.
    "timer-catch-up": dict(
        arch="arm64", vm_sizes=[1], end_ns=100_000,
        programs=_progs([G.mask(), G.timer_arm(1, period_ns=1), G.compute(10_000), G.unmask(),
                         G.wfi()]),
        setup=[], splits=[], error="interrupt storm"),
    # A masked WFI with an interrupt pending returns at once: with zero costs and a loop of
    # WFIs no time passes.
    "masked-wfi-loop": dict(
        arch="arm64", vm_sizes=[1], end_ns=100_000,
        programs=_progs([G.mask(), G.loop([G.wfi()])]),
        setup=[], splits=[(5_000, [("raise", 0)])], error="makes no progress"),
    # The same on x86 only kicks: HLT with IF = 0 blocks again (no error).
    "masked-hlt-loop": dict(
        arch="x86", vm_sizes=[1], end_ns=100_000,
        programs=_progs([G.mask(), G.loop([G.wfi()])]),
        setup=[], splits=[(5_000, [("raise", 0), ("msi", 0, 0x30)])], error=None),
}


@pytest.mark.parametrize("name", sorted(RARE))
def test_interrupt_corner_cases_agree(name):
    spec = dict(RARE[name])
    error = spec.pop("error")
    n = sum(spec["vm_sizes"])
    sc = Scenario(host_cpus=n, seed=5, costs=dict(ZERO_COSTS), trace_capacity=1 << 20,
                  params={"halt_poll_ns": 0}, caps=[None] * len(spec["vm_sizes"]),
                  ticks=[0] * len(spec["vm_sizes"]), start=[True] * n,
                  nr_spis=[224] * len(spec["vm_sizes"]), **spec)
    core, ref = play(_core.Engine, sc), play(reference.Engine, sc)
    assert_same(core, ref, "core vs reference")
    if error is None:
        assert core[0] is None
    else:
        assert core[0] is not None and error in core[0]
    if name == "eoi-after-reroute":
        # vCPU 1 blocked at 20000 and was woken by vCPU 0's EOI at 60000.
        wakeups = [(r[0], r[7]) for r in core[1]["trace"] if r[6] == 1 and r[3] == 0]
        assert wakeups == [(60_000, 40_000)]
    if name == "masked-hlt-loop":
        assert core[1]["stats"][0][3] == 1 and core[1]["halts"] == 0


# ---------------------------------------------------------------- integer widths (issue 12 item 9)

def _both(arch, programs, setup=None, n_vcpus=None, costs=None, host_cpus=1):
    """Both engines with one VM running ``programs``; ``setup(e)`` before the start."""
    out = {}
    for name, cls in ENGINES.items():
        e = cls(arch, host_cpus, 3, costs=costs)
        e.add_vm(n_vcpus or len(programs))
        for g, items in enumerate(programs):
            e.load_program(g, G.Program(items).ops)
        if setup:
            setup(e)
        out[name] = e
    return out


def _state(e, n):
    return {"now": e.now, "events": e.events, "halts": e.halts,
            "exits": [(g, e.take_exit(g)) for g in e.pending_exits()],
            "threads": [e.thread_info(g) for g in range(n)],
            "stats": e.stats_array().tolist(), "trace": e.trace_list()}


def test_pc_into_a_loop_body_whose_loop_never_ran():
    """The counter of a loop whose LOOP op never ran is 0: ENDLOOP takes it to 2^32 - 1
    in both engines (a u32, as the core holds it), so the loop goes on."""
    prog = [G.loop([G.compute(1_000), G.sync(7)], count=3), G.end()]
    engines = _both("arm64", [prog],
                    setup=lambda e: (e.set_reg(0, PC_INDEX, MEM_BASE["arm64"] + 4 * 1),
                                     e.start_vcpu(0)))
    seen = {}
    for name, e in engines.items():
        syncs = 0
        while syncs < 5:
            assert e.run_until_exit(10_000_000) == 0
            rec = e.take_exit(0)
            assert rec["ucall"] == 1 and rec["value"] == 7, (name, rec)   # SYNC, never DONE
            syncs += 1
            e.start_vcpu(0)
        seen[name] = _state(e, 1)
    assert seen["core"] == seen["reference"]


def test_guest_time_of_a_segment_saturates_at_2_62():
    """Nine computes of 2^61 ns in one segment sum past 2^64: both engines saturate the
    segment's guest time at 2^62 ns (the core's u64 sum used to wrap)."""
    prog = [G.compute(MAX_DURATION_NS)] * 9 + [G.sync(1), G.end()]
    engines = _both("arm64", [prog], setup=lambda e: e.start_vcpu(0))
    seen = {}
    for name, e in engines.items():
        assert e.run_until_exit(1 << 62) == -1, name          # not out before 2^62
        assert e.run_until_exit((1 << 62) + 10_000) == 0, name
        seen[name] = _state(e, 1)
        assert seen[name]["exits"][0][1]["time"] == (1 << 62) + e.costs["vm_entry_ns"] \
            + e.costs["vm_exit_ns"]
    assert seen["core"] == seen["reference"]


def test_exp_computes_saturate_alike():
    """Exponential draws of a huge mean are each capped at 2^62; their sum is too."""
    prog = [G.loop([G.compute_exp(MAX_DURATION_NS)] * 6 + [G.sync_reg(0)], count=3), G.end()]
    engines = _both("x86", [prog], setup=lambda e: e.start_vcpu(0))
    seen = {}
    for name, e in engines.items():
        e.run(1 << 62)
        seen[name] = _state(e, 1)
    assert seen["core"] == seen["reference"]


@pytest.mark.parametrize("flags", [0, KVM_REQUEST_NO_WAKEUP])
def test_every_request_bit_agrees(flags):
    """make_request of every request number 0..63 on a blocked vCPU: only UNBLOCK (2)
    ends the halt; the bit lands in vcpu->requests (a u64) in both engines."""
    for nr in range(64):
        engines = _both("arm64", [[G.loop([G.wfi()])]],
                        costs={"sched_slice_ns": 0},
                        setup=lambda e: e.start_vcpu(0))
        seen = {}
        for name, e in engines.items():
            e.halt_poll_ns = 0
            e.run(50_000)
            assert e.thread_info(0)["state"] == 3             # BLOCKED
            e.make_request(0, nr | flags)
            info = e.thread_info(0)
            assert info["requests"] == 1 << nr, (name, nr)
            e.run(100_000)
            seen[name] = _state(e, 1)
        assert seen["core"] == seen["reference"], nr
        stats = seen["core"]["stats"][0]
        assert stats[3] == (0 if flags else 1), nr             # halt_wakeup: the kick
        # Only KVM_REQ_UNBLOCK ends the halt (kvm_vcpu_check_block): a second WFI exit.
        assert stats[104] == (2 if nr == Request.UNBLOCK and not flags else 1), nr
