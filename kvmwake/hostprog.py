"""Host programs: what a host thread that is not a vCPU executes.

A host thread (``Host.add_thread``) is a thread of the host, such as a VMM's
device or injector thread, or background load: the host scheduler runs it on
the same CPUs and run queues as the vCPU threads.  Its program is a list of
ops built with the helpers here::

    from kvmwake import hostprog as hp
    injector = host.add_thread([
        hp.loop([hp.sleep("exp 200us"), hp.msi(vm, 0, 0x30), hp.compute("2us")]),
    ], name="injector")

Durations are as in guest programs (``kvmwake.guest``): an integer number of
ns or a string with its unit (``"20us"``), and for a drawn time
``"exp MEAN"``, ``"uniform LO HI"``, or the tuples ``("exp", mean)``,
``("uniform", lo, hi)``.  Draws come from the thread's own seeded stream.

* ``compute(dist)``: run on the CPU for the drawn time (preemptible).
* ``sleep(dist)``: block; an hrtimer wakes it after the drawn time
  (``hrtimer_nanosleep``), through the scheduler's normal wake-up.
* ``sleep_until(dist)``: ``clock_nanosleep(TIMER_ABSTIME)``: the thread's
  deadline (its start time at first) moves on by the drawn time and it
  sleeps until then, not at all if the deadline has passed: a schedule of
  absolute times that its own work does not delay (as ``kvmwake kernel
  record``'s injector thread runs).  Timer slack is not modelled (the
  recorder sets ``PR_SET_TIMERSLACK`` to 1 ns).
* ``msi(vm, apic_id, vector)`` (x86): the injection an irqfd (or
  ``KVM_SIGNAL_MSI``) write makes in the writer's context
  (``kvm_arch_set_irq_inatomic`` -> ``kvm_apic_set_irq`` ->
  ``kvm_vcpu_kick``); the thread pays ``ipi_send_ns`` when the kick IPIs a
  vCPU in guest mode.
* ``irq(vm, intid)`` (arm64): an irqfd write on SPI ``intid``
  (``kvm_arch_set_irq_inatomic`` -> ``vgic_irqfd_set_irq``, level 1: an edge
  SPI latches pending; a level one stays asserted until userspace lowers
  it, as with a device source).
* ``loop(ops, count=None)``: repeat (None: forever).
* ``end()``: the thread exits (appended when a program does not end in an
  endless loop).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .guest import MAX_DURATION_NS, ProgramError, _dur, _check_loop_op, _check_program_end
from .model import MAX_LOOP_DEPTH, MAX_PROGRAM_OPS, OP_DTYPE, Dist, HostOp

__all__ = ["HostProgram", "compute", "sleep", "sleep_until", "msi", "irq", "loop", "end",
           "validate", "ProgramError"]


@dataclass(frozen=True)
class _HIns:
    code: int
    dist: int = 0
    arg: int = 0
    p0: int = 0
    p1: int = 0
    vm: object = None         # MSI / IRQ: the VM (object or index), resolved by the host


@dataclass(frozen=True)
class _HLoop:
    body: tuple
    count: int


def _dist(what: str, spec) -> tuple:
    """(Dist, p0, p1) of a duration spec."""
    if isinstance(spec, str) and spec.split() and spec.split()[0] in ("exp", "uniform"):
        spec = tuple(spec.split())
    if isinstance(spec, tuple) and spec and spec[0] == "exp":
        if len(spec) != 2:
            raise ProgramError(f"{what}: ('exp', mean) takes one duration, not {spec!r}")
        return Dist.EXPONENTIAL, _dur(f"{what} exp mean", spec[1]), 0
    if isinstance(spec, tuple) and spec and spec[0] == "uniform":
        if len(spec) != 3:
            raise ProgramError(f"{what}: ('uniform', lo, hi) takes two durations, not {spec!r}")
        lo, hi = _dur(f"{what} uniform lo", spec[1]), _dur(f"{what} uniform hi", spec[2])
        if lo > hi:
            raise ProgramError(f"{what}: uniform lo {lo} > hi {hi}")
        return Dist.UNIFORM, lo, hi
    if isinstance(spec, tuple):
        raise ProgramError(f"{what}: a duration is ns, \"20us\", ('exp', mean) or "
                           f"('uniform', lo, hi), not {spec!r}")
    return Dist.FIXED, _dur(what, spec), 0


def compute(dist) -> _HIns:
    """Run on the host CPU for a drawn time (preemptible, like a vCPU's segment)."""
    d, p0, p1 = _dist("compute", dist)
    return _HIns(HostOp.COMPUTE, d, 0, p0, p1)


def sleep(dist) -> _HIns:
    """Sleep for a drawn time: dequeued at once; an hrtimer wakes it (try_to_wake_up)."""
    d, p0, p1 = _dist("sleep", dist)
    return _HIns(HostOp.SLEEP, d, 0, p0, p1)


def sleep_until(dist) -> _HIns:
    """clock_nanosleep(TIMER_ABSTIME): the deadline moves on by a drawn time; sleep
    until it (not at all if it has passed)."""
    d, p0, p1 = _dist("sleep_until", dist)
    return _HIns(HostOp.SLEEP_UNTIL, d, 0, p0, p1)


def _vm_ref(what, vm):
    if isinstance(vm, bool) or not (isinstance(vm, numbers.Integral)
                                    or hasattr(vm, "_first") and hasattr(vm, "index")):
        raise ProgramError(f"{what}: vm must be a VM of the host or its index, not {vm!r}")
    return vm


def msi(vm, apic_id, vector: int) -> _HIns:
    """x86: a fixed-mode MSI of ``vector`` (16..255) to APIC ID ``apic_id`` (the vCPU
    id, or a VCpu) of ``vm`` (a VM or its index on the host), as an irqfd or
    KVM_SIGNAL_MSI write injects it."""
    vm = _vm_ref("msi", vm)
    if hasattr(apic_id, "id") and hasattr(apic_id, "vm"):
        if apic_id.vm is not vm and not (isinstance(vm, numbers.Integral)
                                         and apic_id.vm.index == vm):
            raise ProgramError(f"msi: vCPU {apic_id.id} is not a vCPU of that VM")
        apic_id = apic_id.id
    if isinstance(apic_id, bool) or not isinstance(apic_id, numbers.Integral) or apic_id < 0:
        raise ProgramError(f"msi: apic_id must be a non-negative integer, not {apic_id!r}")
    if isinstance(vector, bool) or not isinstance(vector, numbers.Integral) \
            or not 16 <= vector <= 255:
        raise ProgramError(f"msi: vector must be an integer in 16..255, not {vector!r}")
    return _HIns(HostOp.MSI, 0, int(vector), 0, int(apic_id), vm)


def irq(vm, intid: int) -> _HIns:
    """arm64: an irqfd write on SPI ``intid`` of ``vm`` (a VM or its index)."""
    vm = _vm_ref("irq", vm)
    if isinstance(intid, bool) or not isinstance(intid, numbers.Integral) \
            or not 32 <= intid <= 1019:
        raise ProgramError(f"irq: intid must be an SPI, an integer in 32..1019, not {intid!r}")
    return _HIns(HostOp.IRQ, 0, int(intid), 0, 0, vm)


def loop(ops: Sequence, count: int | None = None) -> _HLoop:
    """Repeat ``ops`` ``count`` times (None: forever)."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral)
                              or not 1 <= count <= 0xFFFF_FFFF):
        raise ProgramError(f"loop count must be None (forever) or an integer in "
                           f"1..2**32-1, not {count!r}")
    if isinstance(ops, (str, bytes)) or not isinstance(ops, Sequence):
        raise ProgramError(f"loop: ops must be a list of host ops, not {ops!r}")
    return _HLoop(tuple(ops), 0 if count is None else int(count))


def end() -> _HIns:
    """The thread exits."""
    return _HIns(HostOp.END)


class HostProgram:
    """A validated host program: ``ops`` (``model.OP_DTYPE``) and, per MSI/IRQ op,
    the VM it names (``vm_refs``, op index -> VM object or index), which
    ``Host.add_thread`` resolves and checks against the host."""

    def __init__(self, items):
        ops: list = []
        refs: dict = {}
        if isinstance(items, HostProgram):
            self.ops, self.vm_refs = items.ops, dict(items.vm_refs)
            return
        if isinstance(items, (_HIns, _HLoop)):
            items = [items]
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ProgramError(f"a host program is a list of host ops, not {items!r}")
        self._emit(list(items), ops, refs, 0)
        if not ops or ops[-1][0] != HostOp.END and not (
                ops[-1][0] == HostOp.ENDLOOP and ops[-1][3] == 0):
            ops.append((HostOp.END, 0, 0, 0, 0))
        arr = np.array(ops, dtype=OP_DTYPE)
        arr.setflags(write=False)
        self.ops = arr
        self.vm_refs = refs
        validate(arr)

    def _emit(self, items, ops, refs, depth):
        for it in items:
            if isinstance(it, list):
                self._emit(it, ops, refs, depth)
                continue
            if isinstance(it, _HIns):
                if it.vm is not None:
                    refs[len(ops)] = it.vm
                ops.append((it.code, it.dist, it.arg, it.p0, it.p1))
            elif isinstance(it, _HLoop):
                if depth >= MAX_LOOP_DEPTH:
                    raise ProgramError(f"loops nest deeper than {MAX_LOOP_DEPTH}")
                head = len(ops)
                ops.append((HostOp.LOOP, 0, depth, it.count, 0))
                self._emit(list(it.body), ops, refs, depth + 1)
                ops.append((HostOp.ENDLOOP, 0, head, it.count, depth))
            else:
                raise ProgramError(f"not a host op or loop: {it!r} (build host programs "
                                   "with kvmwake.hostprog, not kvmwake.guest)")
            if len(ops) > MAX_PROGRAM_OPS:
                raise ProgramError(f"program longer than {MAX_PROGRAM_OPS} ops")

    def __len__(self):
        return len(self.ops)

    def __repr__(self):
        return f"HostProgram({len(self.ops)} ops)"


def validate(ops: np.ndarray, vms: Sequence | None = None, arch: str | None = None) -> None:
    """Check a host op array; with the host's VMs (a list of (nr_vcpus, nr_spis)) and
    arch, also the targets of MSI/IRQ ops.  Raises ``ProgramError`` naming the op."""
    n = len(ops)
    if n == 0:
        raise ProgramError("empty host program")
    if n > MAX_PROGRAM_OPS:
        raise ProgramError(f"program longer than {MAX_PROGRAM_OPS} ops")
    open_loops: list = []
    for i in range(n):
        code, dist, arg = int(ops["code"][i]), int(ops["dist"][i]), int(ops["arg"][i])
        p0, p1 = int(ops["p0"][i]), int(ops["p1"][i])
        where = f"host op {i}"
        try:
            code = HostOp(code)
        except ValueError:
            raise ProgramError(f"{where}: unknown host op code {code}") from None
        if code in (HostOp.COMPUTE, HostOp.SLEEP, HostOp.SLEEP_UNTIL):
            if dist not in tuple(Dist):
                raise ProgramError(f"{where}: unknown distribution {dist}")
            if p0 > MAX_DURATION_NS or p1 > MAX_DURATION_NS:
                raise ProgramError(f"{where}: duration out of range 0..{MAX_DURATION_NS}")
            if dist == Dist.UNIFORM and p0 > p1:
                raise ProgramError(f"{where}: uniform lo {p0} > hi {p1}")
        elif code in (HostOp.MSI, HostOp.IRQ):
            if arch is not None and (code == HostOp.MSI) != (arch == "x86"):
                raise ProgramError(f"{where}: {code.name.lower()} is "
                                   f"{'x86' if code == HostOp.MSI else 'arm64'}'s; this "
                                   f"host is {arch} (use "
                                   f"{'irq' if arch == 'arm64' else 'msi'})")
            if code == HostOp.MSI and not 16 <= arg <= 255:
                raise ProgramError(f"{where}: MSI vector {arg} out of range 16..255")
            if code == HostOp.IRQ and not 32 <= arg <= 1019:
                raise ProgramError(f"{where}: INTID {arg} is not an SPI (32..1019)")
            if vms is not None:
                if p0 >= len(vms):
                    raise ProgramError(f"{where}: VM {p0} does not exist on this host")
                nr_vcpus, nr_spis = vms[p0]
                if code == HostOp.MSI and p1 >= nr_vcpus:
                    raise ProgramError(f"{where}: MSI to APIC ID {p1}: VM {p0} has APIC "
                                       f"IDs 0..{nr_vcpus - 1}")
                if code == HostOp.IRQ and arg >= 32 + nr_spis:
                    raise ProgramError(f"{where}: SPI {arg} does not exist (VM {p0} has "
                                       f"INTIDs 32..{32 + nr_spis - 1})")
        elif code in (HostOp.LOOP, HostOp.ENDLOOP):
            _check_loop_op(ops, i, code == HostOp.LOOP, open_loops, "host op", _body_takes_time,
                          "a compute, sleep or sleep_until of positive duration")
    _check_program_end(ops, open_loops, "host op", HostOp.END, HostOp.ENDLOOP)


def _body_takes_time(ops, lo, hi) -> bool:
    for j in range(lo, hi):
        if int(ops["code"][j]) in (HostOp.COMPUTE, HostOp.SLEEP, HostOp.SLEEP_UNTIL) \
                and int(ops["p0"][j]) > 0:
            return True
    return False
