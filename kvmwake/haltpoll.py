"""The kernel's halt-polling rule, in plain Python.

Mirrors ``virt/kvm/kvm_main.c``: ``grow_halt_poll_ns``, ``shrink_halt_poll_ns``
and the adaptation at the end of ``kvm_vcpu_halt``.  All arithmetic on the
per-vCPU value is ``unsigned int`` (u32, wrapping), as in the kernel.

This module is the single Python statement of the rule: the reference engine
and trace replay use it, and the Cython core mirrors it (``_halt.pxi``).
"""

from __future__ import annotations

from dataclasses import dataclass

U32_MASK = 0xFFFF_FFFF

#: ``KVM_HALT_POLL_NS_DEFAULT`` per architecture.
HALT_POLL_NS_DEFAULT = {"arm64": 500_000, "x86": 200_000}
#: ``halt_poll_ns_grow`` default ("Default doubles per-vcpu halt_poll_ns.").
HALT_POLL_NS_GROW_DEFAULT = 2
#: ``halt_poll_ns_grow_start`` default (10 us).
HALT_POLL_NS_GROW_START_DEFAULT = 10_000
#: ``halt_poll_ns_shrink`` default: 2 since v6.11 (commit aeb1b22a3ac8).
HALT_POLL_NS_SHRINK_DEFAULT = 2
#: The kvm module parameters that steer halt polling (``/sys/module/kvm/parameters/``).
MODULE_PARAMS = ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start",
                 "halt_poll_ns_shrink")


@dataclass(frozen=True)
class HaltPollParams:
    """The kvm module parameters that steer halt polling (all ``uint``)."""

    halt_poll_ns: int
    halt_poll_ns_grow: int = HALT_POLL_NS_GROW_DEFAULT
    halt_poll_ns_grow_start: int = HALT_POLL_NS_GROW_START_DEFAULT
    halt_poll_ns_shrink: int = HALT_POLL_NS_SHRINK_DEFAULT

    def __post_init__(self):
        for name in MODULE_PARAMS:
            check_u32(name, getattr(self, name))


def check_u32(name: str, value) -> int:
    """Return ``value`` as an int if it fits a kernel ``uint``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if not 0 <= value <= U32_MASK:
        raise ValueError(f"{name} = {value} does not fit an unsigned int (0..{U32_MASK})")
    return value


def grow(val: int, grow_by: int, grow_start: int) -> int:
    """``grow_halt_poll_ns``: multiply (u32), raise to ``grow_start``; no-op if grow is 0."""
    if grow_by == 0:
        return val
    val = (val * grow_by) & U32_MASK
    if val < grow_start:
        val = grow_start
    return val


def shrink(val: int, shrink_by: int, grow_start: int) -> int:
    """``shrink_halt_poll_ns``: divide (or zero when shrink is 0), zero below ``grow_start``."""
    val = 0 if shrink_by == 0 else val // shrink_by
    if val < grow_start:
        val = 0
    return val


#: Kinds of adaptation step, as ``adapt`` reports them.
KEEP, GROW, SHRINK, ZERO = 0, 1, 2, 3


def adapt(halt_poll_ns: int, halt_ns: int, max_halt_poll_ns: int,
          params: HaltPollParams) -> tuple[int, int]:
    """The adaptation at the end of ``kvm_vcpu_halt`` (valid wakeup, polling allowed).

    Returns ``(new_value, kind)``.  ``kind`` is ``GROW`` or ``SHRINK`` when the
    kernel calls ``grow_halt_poll_ns`` / ``shrink_halt_poll_ns`` (and so emits a
    ``kvm_halt_poll_ns`` tracepoint, even when the value is unchanged),
    ``ZERO`` when the ceiling is 0 (value forced to 0, no tracepoint) and
    ``KEEP`` otherwise.
    """
    if max_halt_poll_ns:
        if halt_ns <= halt_poll_ns:
            return halt_poll_ns, KEEP
        if halt_poll_ns and halt_ns > max_halt_poll_ns:
            return shrink(halt_poll_ns, params.halt_poll_ns_shrink,
                          params.halt_poll_ns_grow_start), SHRINK
        if halt_poll_ns < max_halt_poll_ns and halt_ns < max_halt_poll_ns:
            return grow(halt_poll_ns, params.halt_poll_ns_grow,
                        params.halt_poll_ns_grow_start), GROW
        return halt_poll_ns, KEEP
    return 0, ZERO


def clamp_on_entry(halt_poll_ns: int, max_halt_poll_ns: int) -> int:
    """The clamp at the start of ``kvm_vcpu_halt``."""
    return max_halt_poll_ns if halt_poll_ns > max_halt_poll_ns else halt_poll_ns
