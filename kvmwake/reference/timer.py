"""reference/timer.py (twin: kvmwake/core/timer.pxi).
Mirrors: arch/arm64/kvm/arch_timer.c kvm_timer_should_fire,
kvm_bg_timer_expire, timer_emulate.

The virtual timer of each arm64 vCPU (arch/arm64/kvm/arch_timer.c): CVAL
in virtual-time ns, CTL's ENABLE and IMASK, the level-triggered PPI 27.
A blocked vCPU is woken at the deadline as kvm_bg_timer_expire does.
"""

from __future__ import annotations

from ..model import (
    ARCH_TIMER_CTRL_ENABLE, ARCH_TIMER_CTRL_IT_MASK, VTIMER_IRQ, EventClass, ThreadState,
)
from .queue import heap_push

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
inject = poll_settle = wake_up = None

_EV_TIMER = EventClass.TIMER
_BLOCKED = ThreadState.BLOCKED


def timer_level(th, t):
    """kvm_timer_should_fire: enabled, not masked, and the deadline reached."""
    ctl = th.timer_ctl
    return (ctl & ARCH_TIMER_CTRL_ENABLE) and not (ctl & ARCH_TIMER_CTRL_IT_MASK) \
        and t >= th.timer_cval


def timer_program(e, th, t):
    """CNTV_CTL / CVAL written: new deadline event, new line level."""
    th.timer_gen += 1
    ctl = th.timer_ctl
    if (ctl & ARCH_TIMER_CTRL_ENABLE) and not (ctl & ARCH_TIMER_CTRL_IT_MASK) \
            and th.timer_cval > t:
        heap_push(e, th.timer_cval, _EV_TIMER, th.g, th.timer_gen)
    inject(e, th.vm, th, VTIMER_IRQ, timer_level(th, t), t)


def timer_fire(e, th, t):
    """The deadline: the PPI's line rises; a blocked vCPU is woken (kvm_bg_timer_expire)."""
    poll_settle(e, th)
    inject(e, th.vm, th, VTIMER_IRQ, True, t)
    if th.state == _BLOCKED:
        wake_up(e, th, t)


def timer_ack(e, th, t):
    """The handler masks the timer, or re-arms it one period on (a periodic tick)."""
    th.timer_gen += 1
    if not th.timer_period:
        th.timer_ctl |= ARCH_TIMER_CTRL_IT_MASK
        return
    th.timer_cval += th.timer_period
    th.timer_ctl = ARCH_TIMER_CTRL_ENABLE
    if th.timer_cval > t:
        heap_push(e, th.timer_cval, _EV_TIMER, th.g, th.timer_gen)
    else:
        th.priv_line |= 1 << VTIMER_IRQ        # already due again
