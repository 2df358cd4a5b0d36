"""Scenario files, checked: TOML text in, a ``Scenario`` out.

``loads(text, path)`` parses the TOML, checks every key, type and range, parses
the ``ops`` of each ``[[vm.program]]`` (``ops.parse``) and expands the programs
and sources once for a VM of the file's size (``expand.check_vm``), so that a
bad file fails when it is loaded rather than when it is built.  Every error is
a ``ScenarioError`` reading ``FILE:LINE: KEY: message`` (the lines come from
``lines.key_lines``; tomllib gives none).  The file format is described in
``kvmwake.scenarios``.
"""

from __future__ import annotations

import pathlib
import re
import sys
from dataclasses import dataclass, field

from .. import vmm as _vmm
from ..haltpoll import MODULE_PARAMS
from ..errors import ScenarioError
from ..costs import parse_cost
from ..host import MAX_COST_NS, MAX_HOST_CPUS
from ..model import (COST_DEFAULTS, DEFAULT_NR_SPIS, DEFAULT_SCHEDULER, MAX_NR_SPIS, MAX_VCPUS,
                     SCHEDULERS)
from . import ops as _ops
from .expand import check_vm, intids, select
from .lines import content_line, key_lines

if sys.version_info >= (3, 11):
    import tomllib
else:                                    # pragma: no cover
    import tomli as tomllib

#: The policies a scenario names by a word; ``vmm = "package.module:Class"`` names one
#: of the user's own (``kvmwake.vmm.load_policy``).
VMM_POLICIES = _vmm.POLICIES
_DURATION_PARAMS = ("halt_poll_ns", "halt_poll_ns_grow_start")
#: Virtual times (sim, tick, period, phase, times) end below 2**62 ns (the engines' bound).
MAX_TIME_NS = 1 << 62
#: The longest Poisson mean an interrupt source takes (``VM.add_irq_source``).
MAX_POISSON_MEAN_NS = 1 << 50

_KEYS = {
    (): {"name", "description", "sim", "seed", "host", "vm"},
    ("host",): {"cpus", "costs", "scheduler", "vcpu_pack", "preempt_skips_delayed", "thread",
                "load", *MODULE_PARAMS},
    ("host", "thread"): {"ops", "affinity", "count", "name"},
    ("host", "load"): {"duty", "period", "affinity", "count", "name"},
    ("vm",): {"arch", "vcpus", "per_vm", "tick", "halt_poll", "caps", "spis", "vmm",
              "program", "source", "affinity"},
    ("vm", "program"): {"vcpus", "power_off", "ops"},
    ("vm", "source"): {"intids", "trigger", "route", "apic_ids", "vector", "poisson", "period",
                       "phase", "times"},
}


@dataclass
class Program:
    selector: object
    power_off: bool
    nodes: list
    key: tuple


@dataclass
class Source:
    spec: dict
    key: tuple


#: Most host threads one [[host.thread]] or [[host.load]] table makes (its count).
MAX_THREAD_COUNT = 4096


@dataclass
class HostThreadSpec:
    """A ``[[host.thread]]`` (``nodes``: its host program) or ``[[host.load]]``
    (``duty``, ``period_ns``) table: ``count`` host threads."""

    nodes: list | None
    duty: float | None
    period_ns: int | None
    affinity: object               # "all", a CPU, or a list of CPUs
    count: int
    name: str | None
    key: tuple


@dataclass
class Scenario:
    """A checked scenario file."""

    name: str
    description: str
    path: str
    arch: str
    vcpus: int
    vcpus_per_vm: int
    host_cpus: int | None          # None: one per vCPU
    sim_ns: int
    seed: int = 0
    scheduler: str = DEFAULT_SCHEDULER   # the host scheduler (model.SCHEDULERS)
    vcpu_pack: bool = False              # the vCPU-pack wake placement (Host(vcpu_pack=...))
    preempt_skips_delayed: bool = False  # Host(preempt_skips_delayed=...)
    tick_ns: int = 0
    module_params: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    nr_spis: int = DEFAULT_NR_SPIS
    halt_poll: int | None = None
    caps: list = field(default_factory=list)
    vmm: str = "default"
    affinity: object = "pinned"        # "pinned", "all" or a list of host CPUs
    programs: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    host_threads: list = field(default_factory=list)   # HostThreadSpec, in file order
    _lines: dict = field(default_factory=dict, repr=False)
    _text: str = field(default="", repr=False)

    def error(self, key: tuple, message: str, line: int | None = None) -> ScenarioError:
        return _error(self.path, self._lines, key, message, line)


def _dotted(key: tuple) -> str:
    out = ""
    for k in key:
        out += f"[{k}]" if isinstance(k, int) else (("." if out else "") + str(k))
    return out or "(top)"


def _line_of(lines: dict, key: tuple) -> int:
    k = tuple(key)
    while k:
        if k in lines:
            return lines[k]
        k = k[:-1]
    return 1


def _error(path, lines, key, message, line=None) -> ScenarioError:
    line = _line_of(lines, key) if line is None else line
    return ScenarioError(f"{path}:{line}: {_dotted(key)}: {message}")


def load(path) -> Scenario:
    """Read and check a scenario file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: {exc.strerror or exc}") from None
    return loads(text, str(path))


def loads(text: str, path: str = "<string>") -> Scenario:
    """Check a scenario given as TOML text; ``path`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = m.group(1) if m else "1"
        raise ScenarioError(f"{path}:{line}: (syntax): {re.sub(r' [(]at line.*', '', msg)}") \
            from None
    lines = key_lines(text)

    def err(key, message, line=None):
        return _error(path, lines, key, message, line)

    def check_keys(table, key, kind):
        if not isinstance(table, dict):
            raise err(key, f"must be a table, not {type(table).__name__}")
        for k in table:
            if k not in _KEYS[kind]:
                raise err(key + (k,), f"unknown key (known here: {', '.join(sorted(_KEYS[kind]))})")

    def typed(table, key, name, types, default=None, required=False):
        if name not in table:
            if required:
                raise err(key, f"missing key {name!r}")
            return default
        v = table[name]
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            want = " or ".join({int: "an integer", str: "a string", bool: "true or false",
                                list: "an array", dict: "a table", float: "a number"}[t]
                               for t in types)
            raise err(key + (name,), f"must be {want}, not {v!r}")
        return v

    def dur(table, key, name, default=None, required=False, lo=0, hi=MAX_TIME_NS):
        v = typed(table, key, name, (int, str), default, required)
        if v is None or v is default:
            return v
        try:
            ns = _ops.duration(v, None, bare_ns=name.endswith("_ns"))
        except ValueError as exc:
            raise err(key + (name,), str(exc)) from None
        if not lo <= ns <= hi:
            raise err(key + (name,), f"{v!r} ({ns} ns) is outside {lo}..{hi} ns")
        return ns

    def count(table, key, name, lo, hi, default=None, required=False):
        v = typed(table, key, name, (int,), default, required)
        if v is not None and v is not default and not lo <= v <= hi:
            raise err(key + (name,), f"{v} is outside {lo}..{hi}")
        return v

    check_keys(data, (), ())
    name = typed(data, (), "name", (str,), pathlib.Path(path).stem)
    description = typed(data, (), "description", (str,), "")
    sim_ns = dur(data, (), "sim", required=True, lo=1)
    seed = count(data, (), "seed", 0, (1 << 64) - 1, 0)

    host = typed(data, (), "host", (dict,), {})
    check_keys(host, ("host",), ("host",))
    cpus = typed(host, ("host",), "cpus", (int, str), "per-vcpu")
    if isinstance(cpus, str) and cpus != "per-vcpu":
        raise err(("host", "cpus"), f"must be a number or \"per-vcpu\", not {cpus!r}")
    if isinstance(cpus, int) and not 1 <= cpus <= MAX_HOST_CPUS:
        raise err(("host", "cpus"), f"{cpus} is outside 1..{MAX_HOST_CPUS}")
    params = {}
    for p in MODULE_PARAMS:
        if p in host:
            params[p] = dur(host, ("host",), p, hi=0xFFFF_FFFF) if p in _DURATION_PARAMS \
                else count(host, ("host",), p, 0, 0xFFFF_FFFF)
    costs = {}
    scheduler = typed(host, ("host",), "scheduler", (str,), DEFAULT_SCHEDULER)
    if scheduler not in SCHEDULERS:
        raise err(("host", "scheduler"), f"unknown scheduler {scheduler!r} "
                                         f"(choose from {', '.join(SCHEDULERS)})")
    vendor = {}
    for key in ("vcpu_pack", "preempt_skips_delayed"):
        vendor[key] = typed(host, ("host",), key, (bool,), False)
        if vendor[key] and scheduler != "eevdf":
            raise err(("host", key), f"is a rule of the eevdf scheduler, not of {scheduler!r}")
    for k, v in typed(host, ("host",), "costs", (dict,), {}).items():
        if k not in COST_DEFAULTS:
            raise err(("host", "costs", k), f"unknown cost (known: {', '.join(COST_DEFAULTS)})")
        if isinstance(v, dict):
            # A distribution (kvmwake.costs): lognormal or quantiles.
            try:
                costs[k] = parse_cost(k, v)
            except (TypeError, ValueError) as exc:
                raise err(("host", "costs", k), str(exc)) from None
        else:
            costs[k] = dur(host["costs"], ("host", "costs"), k, hi=MAX_COST_NS)

    host_threads = []
    for kind in ("thread", "load"):
        for i, t in enumerate(typed(host, ("host",), kind, (list,), [])):
            key = ("host", kind, i)
            check_keys(t, key, ("host", kind))
            aff = typed(t, key, "affinity", (str, int, list), "all")
            if isinstance(aff, str) and aff != "all":
                raise err(key + ("affinity",), f"must be \"all\", a CPU or a list of CPUs, "
                                               f"not {aff!r}")
            for j, c in enumerate(aff if isinstance(aff, list) else
                                  [] if isinstance(aff, str) else [aff]):
                hi = cpus - 1 if isinstance(cpus, int) else MAX_HOST_CPUS - 1
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= hi:
                    raise err(key + ("affinity",) + ((j,) if isinstance(aff, list) else ()),
                              f"{c!r} is not a host CPU (0..{hi})")
            if isinstance(aff, list) and not aff:
                raise err(key + ("affinity",), "an empty CPU set")
            n = count(t, key, "count", 1, MAX_THREAD_COUNT, 1)
            tname = typed(t, key, "name", (str,), None)
            if tname is not None and not tname.strip():
                raise err(key + ("name",), "must not be empty")
            nodes = duty = period = None
            if kind == "thread":
                ops = typed(t, key, "ops", (str, list), required=True)
                try:
                    if isinstance(ops, str):
                        nodes = _ops.parse(ops, content_line(text, _line_of(lines, key + ("ops",))),
                                           host=True)
                    else:
                        for j, item in enumerate(ops):
                            if not isinstance(item, str):
                                raise err(key + ("ops", j), f"an op must be a string, not "
                                                            f"{item!r}")
                        nodes = _parse_list(ops, lines, key + ("ops",), host=True)
                except _ops.OpError as exc:
                    raise err(key + ("ops",), exc.message, exc.line) from None
            else:
                duty = typed(t, key, "duty", (int, float), required=True)
                if not 0 < duty <= 1:
                    raise err(key + ("duty",), f"{duty!r} is outside (0, 1]")
                period = dur(t, key, "period", required=True, lo=1, hi=1 << 61)
                if round(duty * period) == 0:
                    raise err(key + ("duty",), f"duty {duty} of a {period} ns period rounds "
                                               "to 0 ns of work")
            host_threads.append(HostThreadSpec(nodes, duty, period, aff, n, tname, key))
    names = [h.name for h in host_threads if h.name is not None]
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise err(("host",), f"two host thread tables are named {dup!r}")

    vm = typed(data, (), "vm", (dict,), required=True)
    check_keys(vm, ("vm",), ("vm",))
    arch = typed(vm, ("vm",), "arch", (str,), "arm64")
    if arch not in MAX_VCPUS:
        raise err(("vm", "arch"), f"must be one of {', '.join(MAX_VCPUS)}, not {arch!r}")
    limit = MAX_VCPUS[arch]
    total = count(vm, ("vm",), "vcpus", 1, 1 << 24, required=True)
    per_vm = typed(vm, ("vm",), "per_vm", (int,), None)
    if per_vm is None:
        if total > limit:
            raise err(("vm", "vcpus"), f"{total} vCPUs is over the {arch} limit of {limit} "
                                       "per VM (KVM_MAX_VCPUS); set per_vm to split them")
        per_vm = total
    elif not 1 <= per_vm <= limit:
        raise err(("vm", "per_vm"), f"{per_vm} vCPUs per VM is outside 1..{limit} "
                                    f"(KVM_MAX_VCPUS on {arch})")
    tick = dur(vm, ("vm",), "tick", 0)
    halt_poll = dur(vm, ("vm",), "halt_poll", hi=0xFFFF_FFFF)
    nr_spis = count(vm, ("vm",), "spis", 0, MAX_NR_SPIS, DEFAULT_NR_SPIS)
    if "spis" in vm and arch != "arm64":
        raise err(("vm", "spis"), "SPIs are arm64 only")
    caps = []
    for i, c in enumerate(typed(vm, ("vm",), "caps", (list,), [])):
        if c not in ("ARM_SYSTEM_SUSPEND",):
            raise err(("vm", "caps", i), f"{c!r}: the capabilities a scenario can enable are "
                                         "ARM_SYSTEM_SUSPEND (and halt_poll = ...)")
        if arch != "arm64":
            raise err(("vm", "caps", i), f"{c} is arm64 only")
        caps.append(c)
    affinity = typed(vm, ("vm",), "affinity", (str, list), "pinned")
    if isinstance(affinity, str) and affinity not in ("pinned", "all"):
        raise err(("vm", "affinity"), f"must be \"pinned\", \"all\" or a list of host "
                                      f"CPUs, not {affinity!r}")
    if isinstance(affinity, list):
        if not affinity:
            raise err(("vm", "affinity"), "an empty list of host CPUs")
        for i, c in enumerate(affinity):
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < MAX_HOST_CPUS:
                raise err(("vm", "affinity", i), f"{c!r} is not a host CPU number")
    vmm = typed(vm, ("vm",), "vmm", (str,), "default")
    try:
        _vmm.load_policy(vmm)            # imported and checked now, not when built
    except ValueError as exc:
        raise err(("vm", "vmm"), str(exc)) from None

    programs = []
    for i, p in enumerate(typed(vm, ("vm",), "program", (list,), [])):
        key = ("vm", "program", i)
        check_keys(p, key, ("vm", "program"))
        sel = typed(p, key, "vcpus", (int, str, list), "all")
        select(sel, per_vm, lambda m: err(key + ("vcpus",), m))      # check the syntax now
        power_off = typed(p, key, "power_off", (bool,), False)
        if power_off and arch != "arm64":
            raise err(key + ("power_off",), "power_off (KVM_ARM_VCPU_INIT) is arm64 only")
        ops = typed(p, key, "ops", (str, list), required=True)
        try:
            if isinstance(ops, str):
                nodes = _ops.parse(ops, content_line(text, _line_of(lines, key + ("ops",))))
            else:
                for j, item in enumerate(ops):
                    if not isinstance(item, str):
                        raise err(key + ("ops", j), f"an op must be a string, not {item!r}")
                nodes = _parse_list(ops, lines, key + ("ops",))
        except _ops.OpError as exc:
            raise err(key + ("ops",), exc.message, exc.line) from None
        programs.append(Program(sel, power_off, nodes, key))

    sources = []
    for i, s in enumerate(typed(vm, ("vm",), "source", (list,), [])):
        key = ("vm", "source", i)
        check_keys(s, key, ("vm", "source"))
        spec = {}
        kinds = [k for k in ("poisson", "period", "times") if k in s]
        if len(kinds) != 1:
            raise err(key, "a source needs exactly one of poisson, period, times")
        if "poisson" in s:
            spec["mean_ns"] = dur(s, key, "poisson", lo=1, hi=MAX_POISSON_MEAN_NS)
        if "period" in s:
            spec["period_ns"] = dur(s, key, "period", lo=1)
            spec["phase_ns"] = dur(s, key, "phase", 0)
        elif "phase" in s:
            raise err(key + ("phase",), "phase goes with period")
        if "times" in s:
            t = typed(s, key, "times", (list,))
            spec["times_ns"] = []
            for j, x in enumerate(t):
                try:
                    ns = _ops.duration(x, None)
                except ValueError as exc:
                    raise err(key + ("times", j), str(exc)) from None
                if spec["times_ns"] and ns < spec["times_ns"][-1]:
                    raise err(key + ("times", j), f"{x!r} is earlier than the time before it "
                                                  "(times must not decrease)")
                spec["times_ns"].append(ns)
        if arch == "arm64":
            for bad in ("apic_ids", "vector"):
                if bad in s:
                    raise err(key + (bad,), "x86 MSI sources only; arm64 sources have intids")
            typed(s, key, "intids", (int, str, list), required=True)
            spec["intids"] = s["intids"]
            intids(s["intids"], nr_spis if arch == "arm64" else DEFAULT_NR_SPIS,
                   lambda m: err(key + ("intids",), m))            # before anything expands
            trig = typed(s, key, "trigger", (str,), "edge")
            if trig not in ("edge", "level"):
                raise err(key + ("trigger",), f"must be \"edge\" or \"level\", not {trig!r}")
            spec["level"] = trig == "level"
            spec["route"] = str(typed(s, key, "route", (str, int), required=True))
        else:
            for bad in ("intids", "trigger", "route"):
                if bad in s:
                    raise err(key + (bad,), "arm64 SPI sources only; x86 sources have "
                                            "apic_ids and vector")
            spec["apic_ids"] = typed(s, key, "apic_ids", (int, str, list), required=True)
            spec["vector"] = count(s, key, "vector", 16, 255, required=True)
        sources.append(Source(spec, key))

    sc = Scenario(name=name, description=description, path=path, arch=arch, vcpus=total,
                  vcpus_per_vm=per_vm, host_cpus=None if cpus == "per-vcpu" else cpus,
                  scheduler=scheduler, **vendor, sim_ns=sim_ns, seed=seed, tick_ns=tick, module_params=params, costs=costs,
                  nr_spis=nr_spis if arch == "arm64" else DEFAULT_NR_SPIS, halt_poll=halt_poll,
                  caps=caps, vmm=vmm, affinity=affinity, programs=programs, sources=sources,
                  host_threads=host_threads, _lines=lines, _text=text)
    # Expand everything once for a VM of the usual size, so that a bad file fails at load.
    check_vm(sc, per_vm)
    if total % per_vm:
        check_vm(sc, total % per_vm)
    for spec in host_threads:
        if spec.nodes is not None:
            host_program(sc, spec, [min(per_vm, total - k * per_vm)
                                    for k in range(-(-total // per_vm))])
    return sc


def host_program(sc: Scenario, spec: HostThreadSpec, vm_sizes: list):
    """The ``kvmwake.hostprog`` items of a ``[[host.thread]]`` for a host whose VMs
    have ``vm_sizes`` vCPUs (``nr_vcpus`` in its expressions: the first VM's), its
    MSI / IRQ targets checked against them."""
    import numpy as np
    from .. import hostprog as _hp
    ctx = _ops.Ctx(None, {"nr_vcpus": vm_sizes[0]})
    try:
        items = _ops.compile_host(spec.nodes, ctx)
        prog = _hp.HostProgram(items)
        ops = np.array(prog.ops)
        for i, vmi in prog.vm_refs.items():
            ops["p0"][i] = vmi
        _hp.validate(ops, [(n, sc.nr_spis) for n in vm_sizes], sc.arch)
    except _ops.OpError as exc:
        raise sc.error(spec.key + ("ops",), exc.message, exc.line) from None
    except ValueError as exc:
        raise sc.error(spec.key + ("ops",), str(exc)) from None
    return items


def _parse_list(items, lines, key, host=False):
    """Ops given as an array of strings (a block's '{' and '}' may be separate items)."""
    idx = []
    for j, item in enumerate(items):
        idx += [_line_of(lines, key + (j,))] * (item.count("\n") + 1)
    try:
        root = _ops.parse("\n".join(items), 0, host=host)
    except _ops.OpError as exc:
        raise _ops.OpError(idx[exc.line] if 0 <= exc.line < len(idx) else exc.line,
                           exc.message) from None
    _renumber(root, idx)
    return root


def _renumber(nodes, idx):
    for n in nodes:
        n.line = idx[n.line] if 0 <= n.line < len(idx) else n.line
        if n.body:
            _renumber(n.body, idx)
