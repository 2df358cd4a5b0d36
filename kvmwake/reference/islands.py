"""reference/islands.py (twin: kvmwake/core/islands.pxi).
Mirrors: no kernel code; which independent islands a host falls into, and
whether it may run as islands now.

The core runs a host of several islands as that many independent simulations
(``Engine.run_islands``); the reference runs every host on its one queue, and
the tests hold the core's islands against it.  The plan itself is computed the
same way here, so that both engines name the same islands (see the core file's
header for what joins what, and when islands are used).
"""

from __future__ import annotations

import numpy as np

from ..model import HostOp, Op, ThreadState
from ..uapi import MpState
from .host import AFF_ALL, AFF_PINNED

# From the other pieces (engine._link_pieces).
nth_allowed = None

#: A host CPU no thread may use belongs to no island.
NO_ISLAND = 0xFFFF_FFFF


def uf_find(p: list, x: int) -> int:
    while p[x] != x:
        p[x] = p[p[x]]
        x = p[x]
    return x


def uf_union(p: list, a: int, b: int) -> None:
    a, b = uf_find(p, a), uf_find(p, b)
    if a < b:
        p[b] = a
    elif b < a:
        p[a] = b


def ops_may_exit(e, th) -> bool:
    """Whether the program can reach an op that exits to userspace (SYNC, HVC,
    END) from its PC (core: ops_may_exit)."""
    prog, n = th.prog, len(th.prog)
    j = next((i for i in range(th.pc, n)
              if prog[i][0] == Op.ENDLOOP and prog[i][3] == 0), n)
    if j == n:
        return True
    lo = min(prog[j][2], th.pc)
    return any(prog[i][0] in (Op.SYNC, Op.HVC, Op.END) for i in range(lo, j + 1))


def may_exit(e, th, starting: bool) -> bool:
    """Whether a vCPU thread in KVM_RUN (or ``starting``: that the run starts) can
    exit to userspace in a run no VMM interrupts (core: may_exit)."""
    if th.vm is None or (th.state == ThreadState.USER and not starting):
        return False
    if th.sig_pending or th.mp_state == MpState.SUSPENDED or not th.pc_valid or th.prog is None:
        return True
    return ops_may_exit(e, th)


def isl_plan(e) -> tuple:
    """Each thread's, host CPU's and VM's island, as three u4 arrays (core: isl_plan)."""
    ncpu, nvm = len(e.cpus), len(e.vms)
    p = list(range(ncpu + nvm))
    used = [False] * ncpu
    all_joined = False
    for th in e.threads:
        anchor = ncpu + th.vm.index if th.vm is not None else nth_allowed(e, th, 0)
        uf_union(p, anchor, th.pcpu)
        used[th.pcpu] = True
        if th.aff_kind == AFF_ALL:
            if not all_joined:                # (once: every CPU in one group)
                for c in range(1, ncpu):
                    uf_union(p, 0, c)
                used = [True] * ncpu
                all_joined = True
            uf_union(p, anchor, 0)
        elif th.aff_kind == AFF_PINNED:
            c = th.g % ncpu
            uf_union(p, anchor, c)
            used[c] = True
        else:
            for c in range(ncpu):
                if (th.aff_mask >> c) & 1:
                    uf_union(p, anchor, c)
                    used[c] = True
        if th.vm is None and th.prog is not None:
            for code, _dist, _arg, p0, _p1 in th.prog:
                if code in (HostOp.MSI, HostOp.IRQ) and p0 < nvm:
                    uf_union(p, anchor, ncpu + p0)
    num: dict = {}
    cpu_isl = np.full(ncpu, NO_ISLAND, dtype=np.uint32)
    vm_isl = np.zeros(nvm, dtype=np.uint32)
    for node in range(ncpu + nvm):
        if node < ncpu and not used[node]:
            continue
        k = num.setdefault(uf_find(p, node), len(num))
        if node < ncpu:
            cpu_isl[node] = k
        else:
            vm_isl[node - ncpu] = k
    th_isl = np.array([vm_isl[th.vm.index] if th.vm is not None
                       else cpu_isl[nth_allowed(e, th, 0)] for th in e.threads], dtype=np.uint32)
    return th_isl, cpu_isl, vm_isl


def trace_island(e, th_isl) -> int:
    """The island of the threads the trace ring records: -1 if none, -2 if they are
    in more than one island (core: trace_island)."""
    ks = {int(th_isl[g]) for g in range(e.tr_lo, min(e.tr_hi, len(e.threads)))}
    return -1 if not ks else (ks.pop() if len(ks) == 1 else -2)


def isl_blocked(e, starting=()):
    """Why the host cannot run as islands now, or None (core: isl_blocked)."""
    if e.tracing:
        th_isl = isl_plan(e)[0]
        if len(th_isl) and trace_island(e, th_isl) == -2:
            return ("the trace ring records threads of more than one island (trace_capacity > 0; "
                    "Host.trace_vm records one VM's)")
    if e.tl_cap:
        return "the state timeline is on"
    if e.exits:
        return "exits wait for the VMM"
    start = set(starting)
    for th in e.threads:
        if may_exit(e, th, th.g in start):
            return (f"vCPU {th.vcpu_id} of VM {th.vm.index} may exit to userspace "
                    "(a signal, SUSPENDED, no valid PC, or an HVC, SYNC or END its "
                    "program can reach)")
    return None
