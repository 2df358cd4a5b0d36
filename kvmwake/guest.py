"""Guest programs: what each vCPU executes, as data the engine interprets.

A program is a flat array of ``model.OP_DTYPE`` records.  Build one from
Python with the helpers here::

    from kvmwake import guest as g
    prog = g.Program([
        g.loop([g.compute_exp(20_000), g.wake_random_other(), g.wfi()]),
    ])

``Program`` checks the program when it is built (unknown ops, loops out of
range, loops in which no virtual time can pass, ...) and raises
``ProgramError`` naming the op at fault.  The same checks run on raw op
arrays handed to ``Program.from_array``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np

from .model import (MAX_LOOP_DEPTH, MAX_PROGRAM_OPS, OP_DTYPE, Dist, Op, WakeTarget)

U64_MAX = (1 << 64) - 1
#: Largest duration parameter accepted (about 73 years of virtual time).
MAX_DURATION_NS = 1 << 61


class ProgramError(ValueError):
    """A guest program is malformed."""


@dataclass(frozen=True)
class _Ins:
    code: int
    dist: int = 0
    arg: int = 0
    p0: int = 0
    p1: int = 0


@dataclass(frozen=True)
class _Loop:
    body: tuple
    count: int


Item = Union[_Ins, _Loop]


def compute(ns: int) -> _Ins:
    """Run guest code for exactly ``ns`` nanoseconds."""
    return _Ins(Op.COMPUTE, Dist.FIXED, 0, _dur("compute", ns), 0)


def compute_exp(mean_ns: int) -> _Ins:
    """Run guest code for an exponentially distributed time of mean ``mean_ns``."""
    return _Ins(Op.COMPUTE, Dist.EXPONENTIAL, 0, _dur("compute_exp mean", mean_ns), 0)


def compute_uniform(lo_ns: int, hi_ns: int) -> _Ins:
    """Run guest code for a time drawn uniformly from ``[lo_ns, hi_ns]``."""
    lo, hi = _dur("compute_uniform lo", lo_ns), _dur("compute_uniform hi", hi_ns)
    if lo > hi:
        raise ProgramError(f"compute_uniform: lo {lo} > hi {hi}")
    return _Ins(Op.COMPUTE, Dist.UNIFORM, 0, lo, hi)


def wfi() -> _Ins:
    """``WFI`` on arm64 (``HLT`` on x86): trap to KVM and halt until woken."""
    return _Ins(Op.WFI)


hlt = wfi


def wake(vcpu_id: int) -> _Ins:
    """Make the plain wake source pending on vCPU ``vcpu_id`` and kick it."""
    if isinstance(vcpu_id, bool) or not isinstance(vcpu_id, int) or vcpu_id < 0:
        raise ProgramError(f"wake: vcpu_id must be a non-negative integer, not {vcpu_id!r}")
    return _Ins(Op.WAKE, WakeTarget.VCPU, vcpu_id)


def wake_random_other() -> _Ins:
    """Wake a uniformly drawn other vCPU of the same VM."""
    return _Ins(Op.WAKE, WakeTarget.RANDOM_OTHER)


def wake_next() -> _Ins:
    """Wake vCPU ``(self + 1) % nr_vcpus``."""
    return _Ins(Op.WAKE, WakeTarget.NEXT)


def loop(body: Sequence[Item], count: int = 0) -> _Loop:
    """Repeat ``body`` ``count`` times (0: forever)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 0xFFFF_FFFF:
        raise ProgramError(f"loop count must be an integer in 0..2**32-1, not {count!r}")
    return _Loop(tuple(body), count)


def end() -> _Ins:
    """End the program: the vCPU thread leaves KVM_RUN."""
    return _Ins(Op.END)


def _dur(what: str, ns) -> int:
    if isinstance(ns, bool) or not isinstance(ns, (int, np.integer)):
        raise ProgramError(f"{what}: duration must be an integer number of ns, not {ns!r}")
    ns = int(ns)
    if not 0 <= ns <= MAX_DURATION_NS:
        raise ProgramError(f"{what}: duration {ns} ns out of range 0..{MAX_DURATION_NS}")
    return ns


class Program:
    """A validated guest program.

    Parameters
    ----------
    items : sequence of ops and loops
        Built with the helpers of this module.  An ``END`` is appended when
        the program does not end with one (or with an endless loop).
    """

    def __init__(self, items: Iterable[Item]):
        ops: list[tuple] = []
        self._emit(list(items), ops, depth=0)
        if not ops or ops[-1][0] != Op.END:
            ops.append((Op.END, 0, 0, 0, 0))
        self.ops = _freeze(np.array(ops, dtype=OP_DTYPE))
        validate(self.ops)

    @classmethod
    def from_array(cls, ops) -> "Program":
        """Wrap a raw ``OP_DTYPE`` array after validating it."""
        arr = np.asarray(ops)
        if arr.dtype.names is not None and arr.dtype.names != OP_DTYPE.names:
            raise ProgramError(f"program array has fields {arr.dtype.names}, "
                               f"expected {OP_DTYPE.names}")
        if arr.dtype != OP_DTYPE:
            try:
                arr = arr.astype(OP_DTYPE, casting="same_kind")
            except (TypeError, ValueError) as exc:
                raise ProgramError(f"program array has dtype {arr.dtype}, expected {OP_DTYPE}") from exc
        if arr.ndim != 1:
            raise ProgramError(f"program array must be one-dimensional, not shape {arr.shape}")
        self = cls.__new__(cls)
        self.ops = _freeze(arr.copy())
        validate(self.ops)
        return self

    def _emit(self, items, ops, depth):
        for it in items:
            if isinstance(it, _Ins):
                ops.append((it.code, it.dist, it.arg, it.p0, it.p1))
            elif isinstance(it, _Loop):
                if depth >= MAX_LOOP_DEPTH:
                    raise ProgramError(f"loops nest deeper than {MAX_LOOP_DEPTH}")
                head = len(ops)
                ops.append((Op.LOOP, 0, depth, it.count, 0))
                self._emit(list(it.body), ops, depth + 1)
                ops.append((Op.ENDLOOP, 0, head, it.count, depth))
            else:
                raise ProgramError(f"not a guest op or loop: {it!r}")
            if len(ops) > MAX_PROGRAM_OPS:
                raise ProgramError(f"program longer than {MAX_PROGRAM_OPS} ops")

    def __len__(self):
        return len(self.ops)

    def __eq__(self, other):
        return isinstance(other, Program) and np.array_equal(self.ops, other.ops)

    def __hash__(self):
        return hash(self.ops.tobytes())

    def __repr__(self):
        return f"Program({len(self.ops)} ops)"


def _freeze(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def validate(ops: np.ndarray, nr_vcpus: int | None = None) -> None:
    """Check an op array; with ``nr_vcpus``, also check wake targets.

    Raises ``ProgramError`` naming the first op at fault.
    """
    n = len(ops)
    if n == 0:
        raise ProgramError("empty program")
    if n > MAX_PROGRAM_OPS:
        raise ProgramError(f"program longer than {MAX_PROGRAM_OPS} ops")
    open_loops: list[int] = []
    for i in range(n):
        code, dist, arg = int(ops["code"][i]), int(ops["dist"][i]), int(ops["arg"][i])
        p0, p1 = int(ops["p0"][i]), int(ops["p1"][i])
        where = f"op {i}"
        try:
            code = Op(code)
        except ValueError:
            raise ProgramError(f"{where}: unknown op code {code}") from None
        if code == Op.COMPUTE:
            if dist not in tuple(Dist):
                raise ProgramError(f"{where}: unknown distribution {dist}")
            if p0 > MAX_DURATION_NS or p1 > MAX_DURATION_NS:
                raise ProgramError(f"{where}: duration out of range 0..{MAX_DURATION_NS}")
            if dist == Dist.UNIFORM and p0 > p1:
                raise ProgramError(f"{where}: uniform lo {p0} > hi {p1}")
        elif code == Op.WAKE:
            if dist not in tuple(WakeTarget):
                raise ProgramError(f"{where}: unknown wake target kind {dist}")
            if nr_vcpus is not None:
                if dist == WakeTarget.VCPU and arg >= nr_vcpus:
                    raise ProgramError(f"{where}: wake target vCPU {arg} does not exist "
                                       f"(the VM has {nr_vcpus})")
                if dist == WakeTarget.RANDOM_OTHER and nr_vcpus < 2:
                    raise ProgramError(f"{where}: wake_random_other needs at least 2 vCPUs")
        elif code == Op.LOOP:
            if p0 > 0xFFFF_FFFF:
                raise ProgramError(f"{where}: loop count {p0} does not fit 32 bits")
            if arg != len(open_loops) or arg >= MAX_LOOP_DEPTH:
                raise ProgramError(f"{where}: loop counter slot {arg} does not match "
                                   f"nesting depth {len(open_loops)} (max {MAX_LOOP_DEPTH})")
            open_loops.append(i)
        elif code == Op.ENDLOOP:
            if not open_loops:
                raise ProgramError(f"{where}: end of loop without a loop")
            head = open_loops.pop()
            if arg != head:
                raise ProgramError(f"{where}: jump to op {arg} out of range "
                                   f"(its loop starts at op {head})")
            if p0 != int(ops["p0"][head]) or p1 != len(open_loops):
                raise ProgramError(f"{where}: loop count or slot differs from op {head}")
            if not _body_takes_time(ops, head + 1, i):
                raise ProgramError(f"op {head}: loop body lets no virtual time pass "
                                   "(it needs a WFI or a compute of positive duration)")
    if open_loops:
        raise ProgramError(f"op {open_loops[-1]}: loop is never closed")
    last = Op(int(ops["code"][n - 1]))
    if last not in (Op.END, Op.ENDLOOP) or (last == Op.ENDLOOP and int(ops["p0"][n - 1]) != 0):
        raise ProgramError(f"op {n - 1}: program runs past its last op (end it with END)")


def _body_takes_time(ops, lo, hi) -> bool:
    for j in range(lo, hi):
        code = int(ops["code"][j])
        if code == Op.WFI:
            return True
        if code == Op.COMPUTE:
            dist, p0 = int(ops["dist"][j]), int(ops["p0"][j])
            if (dist in (Dist.FIXED, Dist.EXPONENTIAL) and p0 > 0) or (dist == Dist.UNIFORM and p0 > 0):
                return True
    return False
