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

from . import durations as _durations

from .model import (IPI_RESCHEDULE, MAX_LOOP_DEPTH, MAX_NR_SPIS, MAX_PROGRAM_OPS, OP_DTYPE,
                    SYNC_IMMEDIATE, Dist, Op, WakeTarget)

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


def compute(ns: int | str) -> _Ins:
    """Run guest code for exactly ``ns`` nanoseconds (an int, or a duration string as in
    scenario files: ``compute("20us")``; so do the other builders' durations)."""
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


def _vcpu_id(what, vcpu_id) -> int:
    if isinstance(vcpu_id, bool) or not isinstance(vcpu_id, (int, np.integer)) or vcpu_id < 0:
        raise ProgramError(f"{what}: vcpu_id must be a non-negative integer, not {vcpu_id!r}")
    return int(vcpu_id)


def _irq(what, irq) -> int:
    if isinstance(irq, bool) or not isinstance(irq, (int, np.integer)) or not 0 <= irq < 1024:
        raise ProgramError(f"{what}: interrupt number must be an integer in 0..1023, not {irq!r}")
    return int(irq)


def wake(vcpu_id: int) -> _Ins:
    """Send the reschedule IPI (arm64 SGI 0, x86 vector 0xFD) to vCPU ``vcpu_id``."""
    return _Ins(Op.SGI, WakeTarget.VCPU, IPI_RESCHEDULE, _vcpu_id("wake", vcpu_id), 0)


def wake_random_other() -> _Ins:
    """Send the reschedule IPI to a uniformly drawn other vCPU of the same VM."""
    return _Ins(Op.SGI, WakeTarget.RANDOM_OTHER, IPI_RESCHEDULE)


def wake_next() -> _Ins:
    """Send the reschedule IPI to vCPU ``(self + 1) % nr_vcpus``."""
    return _Ins(Op.SGI, WakeTarget.NEXT, IPI_RESCHEDULE)


def sgi(irq: int, targets) -> _Ins:
    """Send SGI ``irq`` (arm64, 0-15) or IPI vector ``irq`` (x86, 16-255).

    ``targets``: a vCPU id, a list of vCPU ids within 64 of each other,
    ``"all-but-self"``, ``"random-other"`` or ``"next"``.
    """
    irq = _irq("sgi", irq)
    if targets == "all-but-self":
        return _Ins(Op.SGI, WakeTarget.ALL_BUT_SELF, irq)
    if targets == "random-other":
        return _Ins(Op.SGI, WakeTarget.RANDOM_OTHER, irq)
    if targets == "next":
        return _Ins(Op.SGI, WakeTarget.NEXT, irq)
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        return _Ins(Op.SGI, WakeTarget.VCPU, irq, _vcpu_id("sgi", targets), 0)
    if isinstance(targets, (str, bytes, bool)) or not isinstance(targets, Iterable):
        raise ProgramError(f"sgi: targets must be a vCPU id, a list of vCPU ids, "
                           f"'all-but-self', 'random-other' or 'next', not {targets!r}")
    ids = sorted({_vcpu_id("sgi", v) for v in targets})
    if not ids:
        raise ProgramError("sgi: empty target list")
    if ids[-1] - ids[0] >= 64:
        raise ProgramError(f"sgi: targets {ids[0]}..{ids[-1]} span more than 64 vCPUs")
    mask = 0
    for v in ids:
        mask |= 1 << (v - ids[0])
    return _Ins(Op.SGI, WakeTarget.LIST, irq, mask, ids[0])


ipi = sgi


def irq_enable(intid: int) -> _Ins:
    """Enable an interrupt (GICD_ISENABLER / GICR_ISENABLER0; traps)."""
    return _Ins(Op.IRQ_ENABLE, 0, _irq("irq_enable", intid))


def irq_disable(intid: int) -> _Ins:
    """Disable an interrupt (GICD_ICENABLER / GICR_ICENABLER0; traps)."""
    return _Ins(Op.IRQ_DISABLE, 0, _irq("irq_disable", intid))


def set_priority(intid: int, priority: int) -> _Ins:
    """Set an interrupt's priority (IPRIORITYR; 5 bits kept; traps)."""
    return _Ins(Op.SET_PRIORITY, 0, _irq("set_priority", intid), _byte("priority", priority))


def set_pmr(pmr: int) -> _Ins:
    """Write ICC_PMR_EL1 (arm64) or the TPR (x86); no trap."""
    return _Ins(Op.SET_PMR, 0, 0, _byte("pmr", pmr))


set_tpr = set_pmr


def mask() -> _Ins:
    """Mask interrupts: PSTATE.I = 1 (arm64), cli (x86)."""
    return _Ins(Op.MASK)


def unmask() -> _Ins:
    """Unmask interrupts: PSTATE.I = 0 (arm64), sti (x86)."""
    return _Ins(Op.UNMASK)


#: x86's words for mask / unmask (RFLAGS.IF; ``VCpu.set_interrupt_flag`` from outside).
cli = mask
sti = unmask


def set_handler(ns: int, iret: bool = True) -> _Ins:
    """From now on the guest's interrupt handler runs for ``ns`` ns (then EOI).

    ``iret`` (default): the handler returns as Linux's do (x86 ``iret``, arm64
    ``eret``), unmasking again, so an interrupt that arrived meanwhile is taken at
    once.  ``iret=False``: it does not return; the guest goes on with interrupts
    masked (x86: IF = 0, as the interrupt gate left it) until its next
    ``unmask()``; the ``kvmwake kernel`` micro-VM's handler, which EOIs and jumps
    back to ``sti; hlt``, is ``set_handler(ns, iret=False)`` with
    ``loop([unmask(), hlt()])``.
    """
    if not isinstance(iret, bool):
        raise ProgramError(f"set_handler: iret must be True or False, not {iret!r}")
    return _Ins(Op.SET_HANDLER, 0, 0 if iret else 1, _dur("set_handler", ns))


def timer_arm(delay_ns: int, period_ns: int = 0) -> _Ins:
    """Arm the virtual timer ``delay_ns`` from now (CVAL, CTL.ENABLE).

    ``period_ns`` > 0: each time the guest takes the timer interrupt, its
    handler moves CVAL one period on (a periodic tick); 0: the handler masks
    the timer (CTL.IMASK), as Linux's does.
    """
    return _Ins(Op.TIMER_ARM, Dist.FIXED, _period(period_ns), _dur("timer_arm", delay_ns))


def timer_arm_exp(mean_ns: int, period_ns: int = 0) -> _Ins:
    """Arm the virtual timer an exponentially drawn delay of mean ``mean_ns`` from now."""
    return _Ins(Op.TIMER_ARM, Dist.EXPONENTIAL, _period(period_ns),
                _dur("timer_arm_exp mean", mean_ns))


def timer_cancel() -> _Ins:
    """Disable the virtual timer (CTL.ENABLE = 0)."""
    return _Ins(Op.TIMER_CANCEL)


def dist_enable(on: bool = True) -> _Ins:
    """Write GICD_CTLR's enable (traps); enabling kicks every vCPU with a pending interrupt."""
    return _Ins(Op.DIST_ENABLE, 0, 0, 1 if on else 0)


def route_spi(intid: int, mpidr: int) -> _Ins:
    """Write GICD_IROUTER of SPI ``intid``: route it to the vCPU with this MPIDR (traps)."""
    if isinstance(mpidr, bool) or not isinstance(mpidr, (int, np.integer)) or \
            not 0 <= mpidr < (1 << 64):
        raise ProgramError(f"route_spi: mpidr must be a 64-bit value, not {mpidr!r}")
    return _Ins(Op.ROUTE_SPI, 0, _irq("route_spi", intid), int(mpidr))


def set_reg(reg: int, value: int) -> _Ins:
    """x<reg> = value (reg 0..3); no trap."""
    if isinstance(reg, bool) or reg not in (0, 1, 2, 3):
        raise ProgramError(f"set_reg: register must be 0..3, not {reg!r}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            not 0 <= value < (1 << 64):
        raise ProgramError(f"set_reg: value must be a u64, not {value!r}")
    return _Ins(Op.SET_REG, 0, reg, int(value))


def hvc() -> _Ins:
    """An SMCCC call through HVC with x0..x3 as they are (PSCI on arm64)."""
    return _Ins(Op.HVC)


def psci(fn: int, *args: int) -> list:
    """A PSCI call: x0 = fn, x1.. = args, HVC.  The result is in x0 afterwards."""
    if len(args) > 3:
        raise ProgramError(f"psci: at most 3 arguments, not {len(args)}")
    regs = [fn, *args] + [0] * (3 - len(args))
    return [set_reg(i, v if v >= 0 else v & ((1 << 64) - 1)) for i, v in enumerate(regs)] \
        + [hvc()]


def sync_reg(reg: int = 0) -> _Ins:
    """The selftests' GUEST_SYNC(x<reg>): exit to userspace with the register's value."""
    if isinstance(reg, bool) or reg not in (0, 1, 2, 3):
        raise ProgramError(f"sync_reg: register must be 0..3, not {reg!r}")
    return _Ins(Op.SYNC, 0, reg)


def sync(value: int) -> _Ins:
    """GUEST_SYNC(value): exit to userspace with an immediate value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            not 0 <= value < (1 << 64):
        raise ProgramError(f"sync: value must be a u64, not {value!r}")
    return _Ins(Op.SYNC, 0, SYNC_IMMEDIATE, int(value))


def _byte(what, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 255:
        raise ProgramError(f"{what} must be an integer in 0..255, not {v!r}")
    return int(v)


def _period(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 0xFFFF_FFFF:
        raise ProgramError(f"timer period must be an integer in 0..2**32-1 ns, not {v!r}")
    return int(v)


def loop(body: Sequence[Item], count: int = 0) -> _Loop:
    """Repeat ``body`` ``count`` times (0: forever)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 0xFFFF_FFFF:
        raise ProgramError(f"loop count must be an integer in 0..2**32-1, not {count!r}")
    return _Loop(tuple(body), count)


def end() -> _Ins:
    """End the program: the vCPU thread leaves KVM_RUN."""
    return _Ins(Op.END)


def _dur(what: str, ns) -> int:
    """A duration argument: an integer number of ns, or a string with its unit as
    scenario files write it (``"20us"``, ``"1.5ms"``; ``kvmwake.durations``)."""
    if isinstance(ns, str):
        if ns.strip().isdigit():
            raise ProgramError(f"{what}: {ns!r} has no unit: give an integer number of ns "
                               "or a string with its unit, like \"20us\"")
        try:
            ns = _durations.duration(ns, what)
        except ValueError as exc:
            raise ProgramError(str(exc)) from None
    if isinstance(ns, bool) or not isinstance(ns, (int, np.integer)):
        raise ProgramError(f"{what}: duration must be an integer number of ns or a string "
                           f"like \"20us\", not {ns!r}")
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
            if isinstance(it, (list, tuple)):
                self._emit(list(it), ops, depth)       # e.g. what psci() returns
                continue
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


#: Op arrays found valid, keyed by (their bytes, nr_vcpus, arch, nr_spis): a big host
#: loads the same few programs on thousands of vCPUs, and each is checked when it is
#: built, compiled for its VM and loaded.  Programs of at most ``_VALID_MAX_OPS`` ops,
#: at most ``_VALID_MAX`` of them (then the memo starts again).
_valid: dict = {}
_VALID_MAX, _VALID_MAX_OPS = 4096, 1024


def validate(ops: np.ndarray, nr_vcpus: int | None = None, arch: str | None = None,
             nr_spis: int | None = None) -> None:
    """Check an op array; with the VM's ``nr_vcpus``, ``arch`` and ``nr_spis``,
    also check targets and interrupt numbers against that VM.

    Raises ``ProgramError`` naming the first op at fault.
    """
    key = None
    if isinstance(ops, np.ndarray) and ops.dtype == OP_DTYPE and ops.ndim == 1 \
            and len(ops) <= _VALID_MAX_OPS:
        key = (ops.tobytes(), nr_vcpus, arch, nr_spis)
        if key in _valid:
            return
    _validate(ops, nr_vcpus, arch, nr_spis)
    if key is not None:
        if len(_valid) >= _VALID_MAX:
            _valid.clear()
        _valid[key] = True


def _validate(ops, nr_vcpus, arch, nr_spis) -> None:
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
        elif code == Op.SGI:
            _check_sgi(where, dist, arg, p0, p1, nr_vcpus, arch)
        elif code in _GIC_OPS:
            if arch == "x86":
                raise ProgramError(f"{where}: {code.name} is an arm64 GIC op; x86 has none")
            limit = 32 + (MAX_NR_SPIS if nr_spis is None else nr_spis)
            if code != Op.DIST_ENABLE and arg >= limit:
                raise ProgramError(f"{where}: {code.name}: INTID {arg} does not exist "
                                   f"(the VM has INTIDs 0..{limit - 1})")
            if code == Op.ROUTE_SPI and arg < 32:
                raise ProgramError(f"{where}: ROUTE_SPI: INTID {arg} is not an SPI")
            if code == Op.SET_PRIORITY and p0 > 255:
                raise ProgramError(f"{where}: priority {p0} out of range 0..255")
            if code == Op.DIST_ENABLE and p0 > 1:
                raise ProgramError(f"{where}: DIST_ENABLE takes 0 or 1, not {p0}")
        elif code == Op.HVC:
            if arch == "x86":
                raise ProgramError(f"{where}: HVC (PSCI) is arm64's")
        elif code == Op.SET_REG:
            if arg > 3:
                raise ProgramError(f"{where}: SET_REG: register {arg} out of range 0..3")
        elif code == Op.SYNC:
            if arg > 3 and arg != SYNC_IMMEDIATE:
                raise ProgramError(f"{where}: SYNC: register {arg} out of range 0..3")
        elif code == Op.SET_PMR:
            if p0 > 255:
                raise ProgramError(f"{where}: PMR/TPR {p0} out of range 0..255")
        elif code == Op.SET_HANDLER:
            if p0 > MAX_DURATION_NS:
                raise ProgramError(f"{where}: handler time out of range 0..{MAX_DURATION_NS}")
            if arg > 1:
                raise ProgramError(f"{where}: SET_HANDLER: iret flag {arg} is not 0 or 1")
        elif code in (Op.TIMER_ARM, Op.TIMER_CANCEL):
            if arch == "x86":
                raise ProgramError(f"{where}: {code.name}: the arch timer is arm64's")
            if code == Op.TIMER_ARM:
                if dist not in tuple(Dist):
                    raise ProgramError(f"{where}: unknown distribution {dist}")
                if p0 > MAX_DURATION_NS or p1 > MAX_DURATION_NS:
                    raise ProgramError(f"{where}: duration out of range 0..{MAX_DURATION_NS}")
                if dist == Dist.UNIFORM and p0 > p1:
                    raise ProgramError(f"{where}: uniform lo {p0} > hi {p1}")
        elif code in (Op.LOOP, Op.ENDLOOP):
            _check_loop_op(ops, i, code == Op.LOOP, open_loops, "op", _body_takes_time,
                          "a WFI or a compute of positive duration")
    _check_program_end(ops, open_loops, "op", Op.END, Op.ENDLOOP)


def _check_loop_op(ops, i: int, is_loop: bool, open_loops: list, label: str, body_takes_time,
                  needs: str) -> None:
    """Op i, a LOOP (``is_loop``) or an ENDLOOP of a guest or host program: the loop
    counter slot is the nesting depth, the count fits 32 bits, the ENDLOOP jumps
    back to its own LOOP with the same count and slot, and the body lets virtual
    time pass (``body_takes_time(ops, lo, hi)``; ``needs`` says what would).
    ``open_loops`` holds the open LOOPs' indices; ``label`` names ops in messages."""
    arg, p0, p1 = int(ops["arg"][i]), int(ops["p0"][i]), int(ops["p1"][i])
    where = f"{label} {i}"
    if is_loop:
        if p0 > 0xFFFF_FFFF:
            raise ProgramError(f"{where}: loop count {p0} does not fit 32 bits")
        if arg != len(open_loops) or arg >= MAX_LOOP_DEPTH:
            raise ProgramError(f"{where}: loop counter slot {arg} does not match "
                               f"nesting depth {len(open_loops)} (max {MAX_LOOP_DEPTH})")
        open_loops.append(i)
        return
    if not open_loops:
        raise ProgramError(f"{where}: end of loop without a loop")
    head = open_loops.pop()
    if arg != head:
        raise ProgramError(f"{where}: jump to op {arg} out of range "
                           f"(its loop starts at op {head})")
    if p0 != int(ops["p0"][head]) or p1 != len(open_loops):
        raise ProgramError(f"{where}: loop count or slot differs from op {head}")
    if not body_takes_time(ops, head + 1, i):
        raise ProgramError(f"{label} {head}: loop body lets no virtual time pass "
                           f"(it needs {needs})")


def _check_program_end(ops, open_loops: list, label: str, end_code: int,
                      endloop_code: int) -> None:
    """Every loop closed, and the program ends with END or an endless loop's ENDLOOP."""
    n = len(ops)
    if open_loops:
        raise ProgramError(f"{label} {open_loops[-1]}: loop is never closed")
    last = int(ops["code"][n - 1])
    if last not in (end_code, endloop_code) or \
            (last == endloop_code and int(ops["p0"][n - 1]) != 0):
        raise ProgramError(f"{label} {n - 1}: program runs past its last op (end it with END)")


_GIC_OPS = frozenset({Op.IRQ_ENABLE, Op.IRQ_DISABLE, Op.SET_PRIORITY, Op.DIST_ENABLE,
                      Op.ROUTE_SPI})


def _check_sgi(where, kind, irq, p0, p1, nr_vcpus, arch):
    if kind not in tuple(WakeTarget):
        raise ProgramError(f"{where}: unknown SGI target kind {kind}")
    if irq != IPI_RESCHEDULE:
        if arch == "arm64" and irq >= 16:
            raise ProgramError(f"{where}: SGI {irq} out of range 0..15")
        if arch == "x86" and not 16 <= irq <= 255:
            raise ProgramError(f"{where}: IPI vector {irq} out of range 16..255")
        if arch is None and irq > 255:
            raise ProgramError(f"{where}: SGI/vector {irq} out of range")
    if kind == WakeTarget.LIST and p0 == 0:
        raise ProgramError(f"{where}: SGI with an empty target list")
    if kind == WakeTarget.LIST and p1 + p0.bit_length() - 1 > 0xFFFF_FFFF:
        raise ProgramError(f"{where}: SGI target list out of range")
    if nr_vcpus is None:
        return
    if kind == WakeTarget.VCPU and p0 >= nr_vcpus:
        raise ProgramError(f"{where}: wake target vCPU {p0} does not exist "
                           f"(the VM has {nr_vcpus})")
    if kind == WakeTarget.LIST and p1 + p0.bit_length() - 1 >= nr_vcpus:
        raise ProgramError(f"{where}: SGI target vCPU {p1 + p0.bit_length() - 1} does not "
                           f"exist (the VM has {nr_vcpus})")
    if kind == WakeTarget.RANDOM_OTHER and nr_vcpus < 2:
        raise ProgramError(f"{where}: wake_random_other needs at least 2 vCPUs")


def _body_takes_time(ops, lo, hi) -> bool:
    for j in range(lo, hi):
        code = int(ops["code"][j])
        if code in (Op.WFI, Op.HVC, Op.SYNC):
            return True
        if code == Op.COMPUTE:
            dist, p0 = int(ops["dist"][j]), int(ops["p0"][j])
            if (dist in (Dist.FIXED, Dist.EXPONENTIAL) and p0 > 0) or (dist == Dist.UNIFORM and p0 > 0):
                return True
    return False
