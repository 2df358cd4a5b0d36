"""Scenarios: whole hosts of VMs with guest programs and wake sources, from TOML files.

``build(name_or_path, ...)`` returns ``(host, sim_ns, scenario)``; ``load(path)``
reads and checks a file; ``names()`` lists the built-ins (the ``.toml`` files
next to this module: default, irq-storm, suspend-cycle, ipi-storm).

A scenario file::

    name = "ipi-storm"
    description = "one line for 'kvmwake scenarios'"
    sim = "100ms"                 # virtual time to run
    seed = 0

    [host]
    cpus = "per-vcpu"             # or a number
    halt_poll_ns = "200us"        # kvm module parameters (and _grow, _grow_start, _shrink)
    costs = { wake_to_run_ns = "5us" }

    [vm]                          # every VM of the host
    arch = "x86"                  # or "arm64"
    vcpus = 1024                  # in all; split into VMs of at most per_vm
    per_vm = 1024
    tick = "4ms"                  # periodic wake of every halted vCPU
    halt_poll = "100us"           # KVM_CAP_HALT_POLL on each VM (optional)
    caps = ["ARM_SYSTEM_SUSPEND"]
    spis = 224                    # arm64 vGIC SPIs
    vmm = "default"               # or "reference", "deny-all"

    [[vm.program]]
    vcpus = "all"                 # or 3, [0, 2], "1:", "0::4" (Python slices of the VM's ids)
    power_off = false             # start STOPPED (arm64 KVM_ARM_VCPU_INIT power_off)
    ops = '''
    loop {
        compute exp 20us
        wake random-other
        hlt
    }
    '''

    [[vm.source]]                 # device interrupts (arm64 SPIs)
    intids = "spis"               # every SPI; or 40, "32:64", [40, 41]
    trigger = "edge"              # or "level"
    route = "(intid - 32) % nr_vcpus"
    poisson = "4ms"               # or period = "1ms" (phase = ...), or times = [...]

    [[vm.source]]                 # x86: MSIs
    apic_ids = "all"
    vector = 0x40
    period = "1ms"

Every error is a ``ScenarioError`` reading ``FILE:LINE: KEY: message``.
"""

from __future__ import annotations

import os
import pathlib
import sys
from dataclasses import dataclass, field

from .. import guest as g
from .. import vmm as _vmm
from ..errors import KvmError, ScenarioError
from ..host import Host, check_int
from ..model import COST_DEFAULTS, DEFAULT_NR_SPIS, MAX_NR_SPIS, MAX_VCPUS
from ..uapi import Cap
from . import _ops
from ._lines import content_line, key_lines

if sys.version_info >= (3, 11):
    import tomllib
else:                                    # pragma: no cover
    import tomli as tomllib

__all__ = ["Scenario", "ScenarioError", "build", "load", "loads", "names", "get", "path_of",
           "BUILTIN_DIR"]

BUILTIN_DIR = pathlib.Path(__file__).with_name("builtin")
VMM_POLICIES = {"default": _vmm.Vmm, "reference": _vmm.ReferenceVmm,
                "deny-all": _vmm.DenyAllVmm}
MODULE_PARAMS = ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start",
                 "halt_poll_ns_shrink")
_DURATION_PARAMS = ("halt_poll_ns", "halt_poll_ns_grow_start")

_KEYS = {
    (): {"name", "description", "sim", "seed", "host", "vm"},
    ("host",): {"cpus", "costs", *MODULE_PARAMS},
    ("vm",): {"arch", "vcpus", "per_vm", "tick", "halt_poll", "caps", "spis", "vmm",
              "program", "source"},
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
    tick_ns: int = 0
    module_params: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    nr_spis: int = DEFAULT_NR_SPIS
    halt_poll: int | None = None
    caps: list = field(default_factory=list)
    vmm: str = "default"
    programs: list = field(default_factory=list)
    sources: list = field(default_factory=list)
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


def names() -> list[str]:
    """The built-in scenarios, in a fixed order."""
    order = ["default", "irq-storm", "suspend-cycle", "ipi-storm"]
    found = sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))
    return [n for n in order if n in found] + [n for n in found if n not in order]


def path_of(name_or_path) -> pathlib.Path:
    """The file of a built-in name, or the path itself if it names a file."""
    p = pathlib.Path(os.fspath(name_or_path))
    if p.suffix == ".toml" or p.exists() or os.sep in str(name_or_path):
        if not p.is_file():
            raise ScenarioError(f"{p}: no such scenario file")
        return p
    b = BUILTIN_DIR / f"{name_or_path}.toml"
    if not b.is_file():
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r} (built-in: "
                            f"{', '.join(names())}; or give a .toml file)")
    return b


def get(name_or_path) -> Scenario:
    """The built-in scenario ``name`` (or the scenario file at a path), checked."""
    return load(path_of(name_or_path))


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
        import re
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
                                list: "an array", dict: "a table"}[t] for t in types)
            raise err(key + (name,), f"must be {want}, not {v!r}")
        return v

    def dur(table, key, name, default=None, required=False):
        v = typed(table, key, name, (int, str), default, required)
        if v is None or v is default:
            return v
        try:
            return _ops.duration(v, name)
        except ValueError as exc:
            raise err(key + (name,), str(exc)) from None

    def count(table, key, name, lo, hi, default=None, required=False):
        v = typed(table, key, name, (int,), default, required)
        if v is not None and v is not default and not lo <= v <= hi:
            raise err(key + (name,), f"{v} is outside {lo}..{hi}")
        return v

    check_keys(data, (), ())
    name = typed(data, (), "name", (str,), pathlib.Path(path).stem)
    description = typed(data, (), "description", (str,), "")
    sim_ns = dur(data, (), "sim", required=True)
    if sim_ns < 1:
        raise err(("sim",), "must be positive")
    seed = count(data, (), "seed", 0, (1 << 64) - 1, 0)

    host = typed(data, (), "host", (dict,), {})
    check_keys(host, ("host",), ("host",))
    cpus = typed(host, ("host",), "cpus", (int, str), "per-vcpu")
    if isinstance(cpus, str) and cpus != "per-vcpu":
        raise err(("host", "cpus"), f"must be a number or \"per-vcpu\", not {cpus!r}")
    if isinstance(cpus, int) and not 1 <= cpus <= 1 << 20:
        raise err(("host", "cpus"), f"{cpus} is outside 1..{1 << 20}")
    params = {}
    for p in MODULE_PARAMS:
        if p in host:
            v = dur(host, ("host",), p) if p in _DURATION_PARAMS else \
                count(host, ("host",), p, 0, 0xFFFF_FFFF)
            if v > 0xFFFF_FFFF:
                raise err(("host", p), f"{v} does not fit an unsigned int")
            params[p] = v
    costs = {}
    for k, v in typed(host, ("host",), "costs", (dict,), {}).items():
        if k not in COST_DEFAULTS:
            raise err(("host", "costs", k), f"unknown cost (known: {', '.join(COST_DEFAULTS)})")
        costs[k] = dur(host["costs"], ("host", "costs"), k)

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
    halt_poll = dur(vm, ("vm",), "halt_poll")
    if halt_poll is not None and halt_poll > 0xFFFF_FFFF:
        raise err(("vm", "halt_poll"), f"{halt_poll} does not fit an unsigned int")
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
    vmm = typed(vm, ("vm",), "vmm", (str,), "default")
    if vmm not in VMM_POLICIES:
        raise err(("vm", "vmm"), f"must be one of {', '.join(VMM_POLICIES)}, not {vmm!r}")

    programs = []
    for i, p in enumerate(typed(vm, ("vm",), "program", (list,), [])):
        key = ("vm", "program", i)
        check_keys(p, key, ("vm", "program"))
        sel = typed(p, key, "vcpus", (int, str, list), "all")
        _select(sel, per_vm, lambda m: err(key + ("vcpus",), m))     # check the syntax now
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
            spec["mean_ns"] = dur(s, key, "poisson")
            if spec["mean_ns"] < 1:
                raise err(key + ("poisson",), "must be positive")
        if "period" in s:
            spec["period_ns"] = dur(s, key, "period")
            if spec["period_ns"] < 1:
                raise err(key + ("period",), "must be positive")
            spec["phase_ns"] = dur(s, key, "phase", 0)
        elif "phase" in s:
            raise err(key + ("phase",), "phase goes with period")
        if "times" in s:
            t = typed(s, key, "times", (list,))
            try:
                spec["times_ns"] = [_ops.duration(x, "times") for x in t]
            except ValueError as exc:
                raise err(key + ("times",), str(exc)) from None
        if arch == "arm64":
            for bad in ("apic_ids", "vector"):
                if bad in s:
                    raise err(key + (bad,), "x86 MSI sources only; arm64 sources have intids")
            typed(s, key, "intids", (int, str, list), required=True)
            spec["intids"] = s["intids"]
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
                  sim_ns=sim_ns, seed=seed, tick_ns=tick, module_params=params, costs=costs,
                  nr_spis=nr_spis if arch == "arm64" else DEFAULT_NR_SPIS, halt_poll=halt_poll,
                  caps=caps, vmm=vmm, programs=programs, sources=sources, _lines=lines,
                  _text=text)
    # Expand everything once for a VM of the usual size, so that a bad file fails at load.
    _check_vm(sc, per_vm)
    if total % per_vm:
        _check_vm(sc, total % per_vm)
    return sc


def _parse_list(items, lines, key):
    """Ops given as an array of strings (a block's '{' and '}' may be separate items)."""
    idx = []
    for j, item in enumerate(items):
        idx += [_line_of(lines, key + (j,))] * (item.count("\n") + 1)
    try:
        root = _ops.parse("\n".join(items), 0)
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


def _select(sel, n: int, fail) -> list:
    """The vCPU ids of a VM of ``n`` vCPUs that a selector picks."""
    if isinstance(sel, bool):
        raise fail(f"not a vCPU selector: {sel!r}")
    if isinstance(sel, int):
        ids = [sel]
    elif isinstance(sel, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in sel):
            raise fail(f"a list of vCPU ids must hold integers, not {sel!r}")
        ids = list(sel)
    elif sel == "all":
        return list(range(n))
    else:
        parts = sel.split(":")
        try:
            if len(parts) == 1:
                ids = [int(parts[0])]
            elif len(parts) <= 3:
                nums = [int(x) if x.strip() else None for x in parts]
                if len(nums) == 3 and nums[2] is not None and nums[2] <= 0:
                    raise ValueError
                return list(range(n))[slice(*nums)]
            else:
                raise ValueError
        except ValueError:
            raise fail(f"{sel!r} is not a vCPU selector (\"all\", an id, a list of ids, "
                       "or a slice like \"1:\" or \"0::4\")") from None
    for x in ids:
        if not 0 <= x < n:
            raise fail(f"vCPU {x} is not in a VM of {n} vCPUs (ids 0..{n - 1})")
    return ids


def _intids(spec, nr_spis, fail) -> list:
    v = spec
    first, end = 32, 32 + nr_spis
    if v == "spis":
        ids = list(range(first, end))
    elif isinstance(v, int) and not isinstance(v, bool):
        ids = [v]
    elif isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        ids = v
    elif isinstance(v, str) and ":" in v:
        try:
            lo, hi = (int(x, 0) for x in v.split(":"))
        except ValueError:
            raise fail(f"{v!r} is not a range FIRST:END") from None
        ids = list(range(lo, hi))
    else:
        raise fail(f"{v!r}: intids are \"spis\" (every SPI), an INTID, a list, or FIRST:END")
    for x in ids:
        if not first <= x < end:
            raise fail(f"INTID {x} is not an SPI of the VM (32..{end - 1}, spis = {nr_spis})")
    return ids


def _programs_for(sc: Scenario, vm_or_none, n: int) -> tuple[dict, set]:
    """vCPU id -> compiled guest.Program; the ids that start powered off."""
    assigned: dict = {}
    off: set = set()
    ctxs = {}
    for p in sc.programs:
        ids = _select(p.selector, n, lambda m, p=p: sc.error(p.key + ("vcpus",), m))
        for vid in ids:
            if vid in assigned:
                raise sc.error(p.key + ("vcpus",), f"vCPU {vid} already has a program "
                                                   f"(from an earlier [[vm.program]])")
            ctx = _ops.Ctx(vm_or_none, {"nr_vcpus": n, "vcpu": vid})
            try:
                items = _ops.compile(p.nodes, ctx)
                prog = g.Program(items)
            except g.ProgramError as exc:
                raise sc.error(p.key + ("ops",), f"vCPU {vid} of a VM of {n}: {exc}") from None
            except _ops.OpError as exc:
                raise sc.error(p.key + ("ops",), exc.message, exc.line) from None
            try:
                g.validate(prog.ops, n, sc.arch, sc.nr_spis)
            except g.ProgramError as exc:
                raise sc.error(p.key + ("ops",), f"vCPU {vid} of a VM of {n}: {exc}") from None
            assigned[vid] = (prog, p)
            ctxs[vid] = ctx
            if p.power_off:
                off.add(vid)
    longest = max((len(pr) for pr, _ in assigned.values()), default=0)
    for vid, ctx in ctxs.items():
        for line, idx in ctx.entries:
            if idx >= longest:
                prog, p = assigned[vid]
                raise sc.error(p.key + ("ops",), f"@{idx} jumps out of range: the programs "
                                                 f"of this VM have at most {longest} ops", line)
    return {k: v[0] for k, v in assigned.items()}, off


class _AddrVm:
    """Stands in for a VM when a file is checked before any VM exists."""

    def __init__(self, arch):
        from ..vm import MEM_BASE
        self.base = MEM_BASE[arch]

    def code_address(self, i):
        return self.base + 4 * i


def _check_vm(sc: Scenario, n: int) -> None:
    _programs_for(sc, _AddrVm(sc.arch), n)
    for s in sc.sources:
        _source_targets(sc, s, n)


def _source_targets(sc, s: Source, n: int) -> list:
    """[(intid, vcpu)] for SPI sources, [(apic_id, vector)] for MSI sources."""
    spec = s.spec
    if sc.arch == "arm64":
        out = []
        for intid in _intids(spec["intids"], sc.nr_spis,
                             lambda m: sc.error(s.key + ("intids",), m)):
            try:
                vid = _ops.expr(spec["route"], {"intid": intid, "nr_vcpus": n})
            except ValueError as exc:
                raise sc.error(s.key + ("route",), str(exc)) from None
            if not 0 <= vid < n:
                raise sc.error(s.key + ("route",), f"INTID {intid} is routed to vCPU {vid}, "
                                                   f"which a VM of {n} vCPUs does not have")
            out.append((intid, vid))
        return out
    ids = _select(spec["apic_ids"], n, lambda m: sc.error(s.key + ("apic_ids",), m))
    return [(a, spec["vector"]) for a in ids]


def build(name_or_path, *, vcpus: int | None = None, host_cpus: int | None = None,
          sim_ns: int | None = None, seed: int | None = None, engine: str = "core",
          trace_capacity: int = 0) -> tuple[Host, int, Scenario]:
    """Build a built-in scenario (by name) or a scenario file (by path, or a ``Scenario``).

    ``vcpus`` overrides the total vCPU count (still split into VMs of at most
    the file's ``per_vm``), ``host_cpus`` the host's CPUs, ``sim_ns`` the run
    length, ``seed`` the file's seed.  Returns ``(host, sim_ns, scenario)``.
    """
    sc = name_or_path if isinstance(name_or_path, Scenario) else get(name_or_path)
    total = sc.vcpus if vcpus is None else check_int("vcpus", vcpus, 1, 1 << 24)
    if host_cpus is None:
        host_cpus = sc.host_cpus if sc.host_cpus is not None else total
    sim_ns = sc.sim_ns if sim_ns is None else check_int("sim_ns", sim_ns, 1, 1 << 62)
    seed = sc.seed if seed is None else seed
    host = Host(host_cpus=host_cpus, arch=sc.arch, seed=seed, costs=sc.costs,
                engine=engine, trace_capacity=trace_capacity)
    for pname, value in sc.module_params.items():
        setattr(host, pname, value)
    per_vm = min(sc.vcpus_per_vm, total)
    left = total
    while left:
        n = min(per_vm, left)
        vm = host.create_vm(n, nr_spis=sc.nr_spis)
        progs, off = _programs_for(sc, vm, n)
        try:
            for v in vm.vcpus:
                if v.id in progs:
                    v.load(progs[v.id])
        except (g.ProgramError, KvmError) as exc:
            raise ScenarioError(f"{sc.path}: scenario {sc.name}, VM {vm.index} of {n} "
                                f"vCPUs: {exc}") from None
        if sc.tick_ns:
            vm.set_tick(sc.tick_ns)
        for c in sc.caps:
            vm.enable_cap(Cap[c])
        if sc.halt_poll is not None:
            vm.enable_cap(Cap.HALT_POLL, sc.halt_poll)
        for vid in sorted(off):
            vm.vcpus[vid].init(power_off=True)
        for s in sc.sources:
            spec = s.spec
            timing = {k: spec[k] for k in ("mean_ns", "period_ns", "phase_ns", "times_ns")
                      if k in spec}
            for a, b in _source_targets(sc, s, n):
                if sc.arch == "arm64":
                    vm.configure_irq(a, enabled=True, level=spec["level"])
                    vm.route_spi(a, vcpu=b)
                    vm.add_irq_source(a, **timing)
                else:
                    vm.add_msi_source(a, b, **timing)
        if sc.vmm != "default":
            vm.vmm = VMM_POLICIES[sc.vmm]()
            vm.vmm.attach(vm)
        left -= n
    return host, sim_ns, sc
