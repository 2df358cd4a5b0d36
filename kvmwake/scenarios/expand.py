"""A checked scenario expanded for one VM of ``n`` vCPUs: which vCPUs run which compiled
program, which start powered off, and where each interrupt source goes.

``programs_for(sc, vm, n)`` compiles every ``[[vm.program]]`` for the vCPUs its
selector picks (``ops.compile``, then ``guest`` validation); ``source_targets``
gives each ``[[vm.source]]``'s (INTID, vCPU) or (APIC ID, vector) pairs.
``parse.loads`` runs them once (``check_vm``) for a VM of the file's sizes, with
``AddrVm`` standing in for a VM; ``build.build`` runs them for every VM it makes.
Errors are ``ScenarioError``s naming the file, line and key (``sc.error``).
"""

from __future__ import annotations

from .. import guest as g
from ..model import MEM_BASE
from . import ops as _ops


def select(sel, n: int, fail) -> list:
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


def intids(spec, nr_spis, fail) -> list:
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
        if not first <= lo <= hi <= end:          # checked before the range is expanded
            raise fail(f"{v!r} is not an SPI range of the VM (within {first}:{end}, "
                       f"spis = {nr_spis}; FIRST <= END)")
        ids = list(range(lo, hi))
    else:
        raise fail(f"{v!r}: intids are \"spis\" (every SPI), an INTID, a list, or FIRST:END")
    for x in ids:
        if not first <= x < end:
            raise fail(f"INTID {x} is not an SPI of the VM (32..{end - 1}, spis = {nr_spis})")
    return ids


#: Ops (plus ``for`` iterations) compiled for all the vCPUs of one VM together, so
#: that a file of a few bytes cannot make the loader expand billions of ops (about a
#: second of compiling; 256 ops for each of 1,024 vCPUs).  A limit of scenario files
#: only: ``guest.Program`` itself takes up to ``MAX_PROGRAM_OPS`` ops per vCPU.
MAX_VM_OPS = 1 << 18


def programs_for(sc, vm_or_none, n: int) -> tuple[dict, set]:
    """vCPU id -> compiled guest.Program; the ids that start powered off."""
    budget = MAX_VM_OPS
    assigned: dict = {}
    off: set = set()
    ctxs = {}
    for p in sc.programs:
        ids = select(p.selector, n, lambda m, p=p: sc.error(p.key + ("vcpus",), m))
        for vid in ids:
            if vid in assigned:
                raise sc.error(p.key + ("vcpus",), f"vCPU {vid} already has a program "
                                                   f"(from an earlier [[vm.program]])")
            ctx = _ops.Ctx(vm_or_none, {"nr_vcpus": n, "vcpu": vid})
            ctx.budget, ctx.budget_total = budget, MAX_VM_OPS
            try:
                items = _ops.compile(p.nodes, ctx)
                budget = ctx.budget
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


class AddrVm:
    """Stands in for a VM when a file is checked before any VM exists."""

    def __init__(self, arch):
        self.base = MEM_BASE[arch]

    def code_address(self, i):
        return self.base + 4 * i


def check_vm(sc, n: int) -> None:
    programs_for(sc, AddrVm(sc.arch), n)
    for s in sc.sources:
        source_targets(sc, s, n)


def source_targets(sc, s, n: int) -> list:
    """[(intid, vcpu)] for SPI sources, [(apic_id, vector)] for MSI sources."""
    spec = s.spec
    if sc.arch == "arm64":
        out = []
        for intid in intids(spec["intids"], sc.nr_spis,
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
    ids = select(spec["apic_ids"], n, lambda m: sc.error(s.key + ("apic_ids",), m))
    return [(a, spec["vector"]) for a in ids]
