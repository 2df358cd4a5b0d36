"""reference/run.py (twin: kvmwake/core/run.pxi).
Mirrors: arch/arm64/kvm/arm.c kvm_arch_vcpu_ioctl_run, kvm_vcpu_suspend,
kvm_vcpu_sleep, check_vcpu_requests; arch/arm64/kvm/reset.c kvm_reset_vcpu;
arch/x86/kvm/x86.c vcpu_run, vcpu_block.

KVM_RUN's loop (arch/arm64/kvm/arm.c kvm_arch_vcpu_ioctl_run): what happens
before each guest entry (a signal, a STOPPED vCPU's sleep, a pending reset,
a SUSPENDED vCPU's WFI emulation), and the exits to userspace.
"""

from __future__ import annotations

from ..model import (
    HALT_MP_HALTED, HALT_SUSPEND, RESUME_SLEEP, RESUME_START, S_BLOCKING, ThreadState,
)
from ..uapi import PSR_I_BIT, VCPU_RESET_PSTATE_EL1, ExitReason, MpState
from .host import SCHED_POLICY_EEVDF

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
advance = halt = hold_cpu = prune_ap_list = release_cpu = runnable = segment = None
take_irqs = tl_note = None

_USER, _BLOCKED = ThreadState.USER, ThreadState.BLOCKED


def asleep(e, th) -> bool:
    """A vCPU that kvm_vcpu_sleep (arm64 STOPPED) or kvm_vcpu_block (x86 waiting
    for INIT/SIPI) keeps out of the guest."""
    if e.x86:
        return th.mp_state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED,
                               MpState.AP_RESET_HOLD)
    return th.mp_state == MpState.STOPPED


def enter(e, th, t, pre):
    """One trip round KVM_RUN's loop up to the guest entry (arm64:
    xfer_to_guest_mode_handle_work, then check_vcpu_requests)."""
    if th.sig_pending:
        exit_to_user(e, th, t, ExitReason.INTR)
        return
    if asleep(e, th):
        vcpu_sleep(e, th, t)
        return
    if th.reset_pending:
        reset_vcpu(e, th)
    if th.mp_state == MpState.SUSPENDED:
        halt(e, th, t, HALT_SUSPEND)
        return
    if th.mp_state == MpState.HALTED:
        # x86 vcpu_block: kvm_vcpu_halt only if not kvm_arch_vcpu_runnable; a
        # runnable vCPU becomes RUNNABLE and enters the guest at once.
        if not runnable(e, th):
            halt(e, th, t, HALT_MP_HALTED)
            return
        th.mp_state = MpState.RUNNABLE
    if not th.pc_valid:
        exit_to_user(e, th, t, ExitReason.INTERNAL_ERROR)
        return
    guest_entry(e, th, t, pre)


def guest_entry(e, th, t, pre):
    """Into the guest after ``pre`` ns: requests are handled, pending
    interrupts taken, then the interrupted segment or the next op goes on."""
    th.requests = 0              # check_vcpu_requests on the way in
    if not e.x86 and not th.vm.gic_enabled:
        prune_ap_list(e, th)
    if take_irqs(e, th, t, pre):
        return
    if th.sv_valid:
        th.sv_valid = False
        segment(e, th, t, pre, th.sv_guest, th.sv_cont)
    else:
        advance(e, th, t, pre)


def vcpu_sleep(e, th, t):
    """kvm_vcpu_sleep (arm64): wait on the rcuwait until no longer STOPPED (or a
    signal).  x86 waits for INIT/SIPI in kvm_vcpu_block, which sets the blocking
    stat (only a signal ends that wait here: no INIT/SIPI is modelled)."""
    if e.x86:
        th.stats[S_BLOCKING] = 1
    if e.tl_cap:
        tl_note(e, th, t, _BLOCKED)
    th.state = _BLOCKED
    th.resume = RESUME_SLEEP
    th.gen += 1
    release_cpu(e, th, t)


def exit_to_user(e, th, t, reason, type_=0, ndata=0, data0=0, ucall=0, value=0):
    """KVM_RUN returns to userspace with an exit.  Under EEVDF the thread keeps
    its CPU while userspace handles it (host.hold_cpu); under FIFO it leaves."""
    if reason == ExitReason.INTR:
        th.sig_pending = False
    th.stats[S_BLOCKING] = 0
    th.exit_reason, th.exit_type, th.exit_ndata = int(reason), int(type_), ndata
    th.exit_data0, th.exit_ucall, th.exit_value, th.exit_time = data0, ucall, value, t
    hold = e.sched == SCHED_POLICY_EEVDF and e.cpus[th.pcpu].cur == th.g
    if e.tl_cap and not hold:
        tl_note(e, th, t, _USER)
    th.state = _USER
    th.resume = RESUME_START
    th.gen += 1
    e.exits.append(th.g)
    if hold:
        hold_cpu(e, th)
    else:
        release_cpu(e, th, t)


def reset_vcpu(e, th):
    """kvm_reset_vcpu (arch/arm64/kvm/reset.c): the core registers zeroed (x0-x30,
    SP, PC), PSTATE = VCPU_RESET_PSTATE_EL1 (EL1h, D, A, I, F set), the timer
    off (kvm_timer_vcpu_reset); then the reset state a PSCI CPU_ON left
    (KVM_REQ_VCPU_RESET) is taken and applied: PC = entry, x0 = context."""
    owed = th.reset_pending
    th.reset_pending = False
    th.regs = [0] * 31
    th.sp = 0
    th.pstate = VCPU_RESET_PSTATE_EL1 & ~PSR_I_BIT
    th.masked = True                 # PSTATE.I (the rest of DAIF is in th.pstate)
    th.timer_ctl = 0
    th.timer_gen += 1
    th.sv_valid = False
    if owed:
        set_pc(e, th, th.reset_pc)
        th.regs[0] = th.reset_r0
    else:
        set_pc(e, th, 0)


def get_pstate(e, th):
    """PSTATE as KVM_GET_ONE_REG reads it: its I bit is the mask the GIC side uses."""
    return (th.pstate & ~PSR_I_BIT) | (PSR_I_BIT if th.masked else 0)


def set_pstate(e, th, v):
    th.pstate = v & ~PSR_I_BIT
    th.masked = bool(v & PSR_I_BIT)


def set_pc(e, th, v):
    """The PC: op i of the program is at code_base + 4 * i."""
    off = v - th.vm.code_base
    # A new PC discards the rest of an interrupted segment: it belonged to
    # the old instruction stream (its trap would run the op at the new PC).
    th.sv_valid = False
    if th.prog is not None and off >= 0 and off % 4 == 0 and off // 4 < len(th.prog):
        th.pc = off // 4
        th.pc_valid = True
    else:
        th.pc_valid = False
        th.pc_raw = v


def get_pc(e, th):
    return th.vm.code_base + 4 * th.pc if th.pc_valid else th.pc_raw
