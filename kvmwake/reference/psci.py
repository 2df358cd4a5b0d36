"""reference/psci.py (twin: kvmwake/core/psci.pxi).
Mirrors: arch/arm64/kvm/psci.c kvm_psci_call, kvm_psci_0_1_call,
kvm_psci_0_2_call, kvm_psci_1_x_call, kvm_psci_vcpu_on,
kvm_psci_vcpu_affinity_info, kvm_psci_system_suspend.

PSCI as KVM emulates it (arch/arm64/kvm/psci.c): kvm_psci_call and its
0.1 / 0.2 / 1.x handlers, CPU_ON / CPU_OFF / AFFINITY_INFO, the system
events, and SYSTEM_SUSPEND's exit with the registers untouched.
"""

from __future__ import annotations

from ..model import (
    HALT_CPU_SUSPEND, KVM_REQUEST_MASK, KVM_REQUEST_NO_ACTION, KVM_REQUEST_NO_WAKEUP, Request,
    mpidr_of, vcpu_of_mpidr,
)
from ..uapi import (
    ARM_SMCCC_VERSION_FUNC_ID, KVM_PSCI_FN_CPU_OFF, KVM_PSCI_FN_CPU_ON,
    KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2, KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2,
    MPIDR_HWID_BITMASK, PSCI_0_2_TOS_MP, PSCI_1_1_RESET_TYPE_VENDOR_START,
    PSCI_1_3_OFF_TYPE_HIBERNATE_OFF, AffinityInfo, ExitReason, MpState, PsciFn, PsciRet,
    PsciVersion, SystemEventType, VcpuFeature,
)
from .rng import COST_VM_ENTRY, M64, cost_ns

# Functions of other pieces.  The pieces call each other in circles, as the
# kernel's functions do, and imports may not: engine.py sets these as the
# package loads (_link_pieces).
enter = exit_to_user = halt = kick = wake_up = None

U32 = 0xFFFF_FFFF

#: What kvm_psci_call leaves the vCPU to do: back to the guest, halt, or exit.
PSCI_RESUME, PSCI_HALT, PSCI_EXIT = 0, 1, 2

_PSCI_FEATURES_ALWAYS = frozenset({
    PsciFn.PSCI_VERSION, PsciFn.CPU_SUSPEND, PsciFn.FN64_CPU_SUSPEND, PsciFn.CPU_OFF,
    PsciFn.CPU_ON, PsciFn.FN64_CPU_ON, PsciFn.AFFINITY_INFO, PsciFn.FN64_AFFINITY_INFO,
    PsciFn.MIGRATE_INFO_TYPE, PsciFn.SYSTEM_OFF, PsciFn.SYSTEM_RESET, PsciFn.PSCI_FEATURES,
    ARM_SMCCC_VERSION_FUNC_ID})


def hvc(e, th, t):
    """An SMCCC call trapped by HVC: kvm_psci_call, then back to the guest,
    a halt (CPU_SUSPEND) or an exit to userspace."""
    r = psci_call(e, th, t)
    if r == PSCI_RESUME:
        enter(e, th, t, cost_ns(e, th, COST_VM_ENTRY))
    elif r == PSCI_HALT:
        halt(e, th, t, HALT_CPU_SUSPEND)


def psci_version(vm):
    """kvm_psci_version (include/kvm/arm_psci.h): the VM's stored version with the
    KVM_ARM_VCPU_PSCI_0_2 feature, else 0.1."""
    if vm.vcpu_features & (1 << VcpuFeature.PSCI_0_2):
        return vm.psci_version
    return PsciVersion.V0_1


def retval(th, val):
    """smccc_set_retval(vcpu, val, 0, 0, 0)."""
    th.regs[0:4] = [val & M64, 0, 0, 0]
    return PSCI_RESUME


def narrow(th):
    """kvm_psci_narrow_to_32bit: the 32-bit call's x1..x3 lose their top halves."""
    th.regs[1] &= U32
    th.regs[2] &= U32
    th.regs[3] &= U32


def ret_code(v):
    """A negative PSCI return code as the u64 register value."""
    return v & M64


def psci_call(e, th, t):
    """kvm_psci_call: the function ID in x0, the version's handler."""
    vm = th.vm
    regs = th.regs
    fn = regs[0] & U32
    ver = psci_version(vm)
    if ver == PsciVersion.V0_1:
        # kvm_psci_0_1_call: KVM's private function IDs.
        if fn == KVM_PSCI_FN_CPU_OFF:
            power_off(e, th, t)
            return retval(th, PsciRet.SUCCESS)
        if fn == KVM_PSCI_FN_CPU_ON:
            return retval(th, cpu_on(e, th, t, regs[1], regs[2], regs[3], True))
        return retval(th, PsciRet.NOT_SUPPORTED)
    if ver >= PsciVersion.V1_0:
        # kvm_psci_1_x_call
        minor = ver & 0xFFFF
        if fn == PsciFn.PSCI_VERSION:
            return retval(th, (1 << 16) | minor)
        if fn == PsciFn.PSCI_FEATURES:
            return retval(th, psci_features(vm, regs[1] & U32, minor))
        if fn in (PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND):
            if fn == PsciFn.SYSTEM_SUSPEND:
                narrow(th)
            if vm.suspend_cap:
                # Registers untouched: userspace reads the SMCCC arguments.
                exit_to_user(e, th, t, ExitReason.SYSTEM_EVENT, SystemEventType.SUSPEND)
                return PSCI_EXIT
            return retval(th, PsciRet.NOT_SUPPORTED)
        if fn in (PsciFn.SYSTEM_RESET2, PsciFn.FN64_SYSTEM_RESET2) and minor >= 1:
            if fn == PsciFn.SYSTEM_RESET2:
                narrow(th)
            arg = regs[1] & U32
            if arg == 0 or arg >= PSCI_1_1_RESET_TYPE_VENDOR_START:
                system_event(e, th, t, SystemEventType.RESET,
                             KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2)
                regs[0] = ret_code(PsciRet.INTERNAL_FAILURE)
                return PSCI_EXIT
            return retval(th, PsciRet.INVALID_PARAMS)
        if fn in (PsciFn.SYSTEM_OFF2, PsciFn.FN64_SYSTEM_OFF2) and minor >= 3:
            if fn == PsciFn.SYSTEM_OFF2:
                narrow(th)
            arg = regs[1] & U32
            if arg not in (0, PSCI_1_3_OFF_TYPE_HIBERNATE_OFF) or regs[2] != 0:
                return retval(th, PsciRet.INVALID_PARAMS)
            system_event(e, th, t, SystemEventType.SHUTDOWN,
                         KVM_SYSTEM_EVENT_SHUTDOWN_FLAG_PSCI_OFF2)
            retval(th, PsciRet.INTERNAL_FAILURE)
            return PSCI_EXIT
    # kvm_psci_0_2_call (and what 1.x leaves to it)
    if fn == PsciFn.PSCI_VERSION:
        return retval(th, PsciVersion.V0_2)
    if fn in (PsciFn.CPU_SUSPEND, PsciFn.FN64_CPU_SUSPEND):
        return PSCI_HALT
    if fn == PsciFn.CPU_OFF:
        power_off(e, th, t)
        return retval(th, PsciRet.SUCCESS)
    if fn in (PsciFn.CPU_ON, PsciFn.FN64_CPU_ON):
        if fn == PsciFn.CPU_ON:
            narrow(th)
        return retval(th, cpu_on(e, th, t, regs[1], regs[2], regs[3], False))
    if fn in (PsciFn.AFFINITY_INFO, PsciFn.FN64_AFFINITY_INFO):
        if fn == PsciFn.AFFINITY_INFO:
            narrow(th)
        return retval(th, affinity_info(e, vm, regs[1], regs[2]))
    if fn == PsciFn.MIGRATE_INFO_TYPE:
        return retval(th, PSCI_0_2_TOS_MP)
    if fn in (PsciFn.SYSTEM_OFF, PsciFn.SYSTEM_RESET):
        system_event(e, th, t, SystemEventType.SHUTDOWN if fn == PsciFn.SYSTEM_OFF
                     else SystemEventType.RESET, 0)
        retval(th, PsciRet.INTERNAL_FAILURE)
        return PSCI_EXIT
    return retval(th, PsciRet.NOT_SUPPORTED)


def psci_features(vm, arg, minor):
    """PSCI_FEATURES: SUCCESS (or the feature flags) for what this VM's version has."""
    if arg in _PSCI_FEATURES_ALWAYS:
        return PsciRet.SUCCESS
    if arg in (PsciFn.SYSTEM_SUSPEND, PsciFn.FN64_SYSTEM_SUSPEND):
        return PsciRet.SUCCESS if vm.suspend_cap else PsciRet.NOT_SUPPORTED
    if arg in (PsciFn.SYSTEM_RESET2, PsciFn.FN64_SYSTEM_RESET2):
        return PsciRet.SUCCESS if minor >= 1 else PsciRet.NOT_SUPPORTED
    if arg in (PsciFn.SYSTEM_OFF2, PsciFn.FN64_SYSTEM_OFF2):
        return PSCI_1_3_OFF_TYPE_HIBERNATE_OFF if minor >= 3 else PsciRet.NOT_SUPPORTED
    return PsciRet.NOT_SUPPORTED


def mpidr_to_vcpu(e, vm, mpidr):
    """kvm_mpidr_to_vcpu: the vCPU whose MPIDR affinity (Aff3..Aff0) is ``mpidr``."""
    if mpidr >> 24:
        return None                  # Aff3 is 0 for every vCPU here
    vid = vcpu_of_mpidr(mpidr, vm.nr_vcpus)
    return None if vid < 0 else e.threads[vm.first + vid]


def cpu_on(e, th, t, target, entry, context, v0_1):
    """kvm_psci_vcpu_on."""
    if target & ~MPIDR_HWID_BITMASK:
        return PsciRet.INVALID_PARAMS
    tgt = mpidr_to_vcpu(e, th.vm, target)
    if tgt is None:
        return PsciRet.INVALID_PARAMS
    if tgt.mp_state != MpState.STOPPED:
        return PsciRet.INVALID_PARAMS if v0_1 else PsciRet.ALREADY_ON
    tgt.reset_pc = entry
    tgt.reset_r0 = context
    tgt.reset_pending = True         # KVM_REQ_VCPU_RESET
    tgt.mp_state = MpState.RUNNABLE
    wake_up(e, tgt, t)
    return PsciRet.SUCCESS


def affinity_info(e, vm, target, level):
    """kvm_psci_vcpu_affinity_info: ON if any matching vCPU is not STOPPED."""
    if target & ~MPIDR_HWID_BITMASK or level > 3:
        return PsciRet.INVALID_PARAMS
    mask = MPIDR_HWID_BITMASK & ~((1 << (level * 8)) - 1)
    matched = False
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        th = e.threads[g]
        if mpidr_of(th.vcpu_id) & mask == target & mask:
            matched = True
            if th.mp_state != MpState.STOPPED:
                return AffinityInfo.ON
    return AffinityInfo.OFF if matched else PsciRet.INVALID_PARAMS


def power_off(e, th, t):
    """kvm_arm_vcpu_power_off: STOPPED, KVM_REQ_SLEEP, kick."""
    th.mp_state = MpState.STOPPED
    request(e, th, Request.SLEEP, t)


def system_event(e, th, t, type_, flags):
    """kvm_prepare_system_event: every vCPU STOPPED with KVM_REQ_SLEEP (which
    does not wake a vCPU blocked in WFI), and the caller exits."""
    vm = th.vm
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        e.threads[g].mp_state = MpState.STOPPED
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        request(e, e.threads[g], Request.SLEEP, t)
    exit_to_user(e, th, t, ExitReason.SYSTEM_EVENT, type_, 1, flags)


def request(e, th, req, t):
    """kvm_make_request + kvm_vcpu_kick, as kvm_make_vcpu_request does it."""
    bit = req & KVM_REQUEST_MASK
    # vcpu->requests is a u64: request numbers 0..63 (the API rejects the rest;
    # the core cannot shift by 64 or more, so they set nothing here either).
    if not req & KVM_REQUEST_NO_ACTION and bit < 64:
        th.requests |= 1 << bit
    return kick(e, th, t, not req & KVM_REQUEST_NO_WAKEUP)
