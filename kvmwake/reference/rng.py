"""reference/rng.py (twin: kvmwake/core/rng.pxi).
Mirrors: no kernel code; the model's own seeded streams (the draws of guest
compute times and device sources).

Per-vCPU random streams, and one per device source: a 64-bit LCG with a
per-stream increment and the SplitMix64 finaliser as output function.
"""

from __future__ import annotations

import math

from ..costs import DRAWN_COSTS, sample
from ..model import Dist

M64 = (1 << 64) - 1
LCG_MULT = 6364136223846793005
MAX_DRAW_NS = 1 << 62
#: Stream number of device source i of a VM (vCPU streams use the vCPU id).
SOURCE_STREAM_BASE = 1 << 31


class _Stream:
    """A random stream's state (a vCPU thread and a device source each have one)."""

    __slots__ = ("rng_state", "rng_inc")


def fmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    return fmix64(x)


def stream_seed(seed: int, vm_index: int, stream: int) -> tuple[int, int]:
    """(state, increment) of stream ``stream`` of VM ``vm_index``."""
    h = splitmix64(seed & M64)
    h = splitmix64(h ^ ((vm_index << 32) | stream))
    state = splitmix64(h ^ 0x5851F42D4C957F2D)
    inc = ((splitmix64(h ^ 0x14057B7EF767814F) << 1) | 1) & M64
    return state, inc


def rng_seed(st: _Stream, seed: int, vm_index: int, stream: int) -> None:
    """Seed ``st`` as stream ``stream`` of VM ``vm_index``."""
    st.rng_state, st.rng_inc = stream_seed(seed, vm_index, stream)


def rng_next(st: _Stream) -> int:
    st.rng_state = (st.rng_state * LCG_MULT + st.rng_inc) & M64
    return fmix64(st.rng_state)


def draw_ns(st: _Stream, dist: int, p0: int, p1: int) -> int:
    """A duration from ``st``: fixed p0, exponential of mean p0, uniform [p0, p1]."""
    if dist == Dist.FIXED:
        return p0
    if dist == Dist.EXPONENTIAL:
        u = (rng_next(st) >> 11) * (1.0 / 9007199254740992.0)
        d = -math.log(1.0 - u) * p0 + 0.5
        return MAX_DRAW_NS if d >= MAX_DRAW_NS else int(d)
    return p0 + rng_next(st) % (p1 - p0 + 1)


# Costs with tails (kvmwake.costs): each thread's cost stream, stream
# COST_STREAM_BASE + vCPU id of its VM, apart from the guest's draws; constant
# costs draw nothing.

#: Stream number of a vCPU's cost stream, over its vCPU id.
COST_STREAM_BASE = 0xC000_0000
#: The drawn costs (kvmwake.costs.DRAWN_COSTS), by index.
COST_VM_EXIT, COST_VM_ENTRY, COST_IPI_SEND, COST_WAKE_TO_RUN, COST_CONTEXT_SWITCH = range(5)


def cost_rng_seed(th, seed: int, vm_index: int, vcpu_id: int) -> None:
    """Seed ``th``'s cost stream."""
    th.cost_rng_state, th.cost_rng_inc = stream_seed(seed, vm_index, COST_STREAM_BASE + vcpu_id)


def cost_ns(e, th, c: int) -> int:
    """The cost ``c`` (COST_*) charged to thread ``th``: the constant, or a draw
    from the cost's table by 32 bits of ``th``'s cost stream (costs.sample)."""
    if not (e.cost_dist >> c) & 1:
        return e.costs[DRAWN_COSTS[c]]
    th.cost_rng_state = (th.cost_rng_state * LCG_MULT + th.cost_rng_inc) & M64
    return sample(e.cost_tabs[c], fmix64(th.cost_rng_state) >> 32)
