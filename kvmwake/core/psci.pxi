# core/psci.pxi (twin: kvmwake/reference/psci.py).
# Mirrors: arch/arm64/kvm/psci.c kvm_psci_call, kvm_psci_0_1_call,
# kvm_psci_0_2_call, kvm_psci_1_x_call, kvm_psci_vcpu_on,
# kvm_psci_vcpu_affinity_info, kvm_psci_system_suspend.
#
# PSCI as KVM emulates it (arch/arm64/kvm/psci.c): kvm_psci_call and its
# 0.1 / 0.2 / 1.x handlers, CPU_ON / CPU_OFF / AFFINITY_INFO, the system
# events, and SYSTEM_SUSPEND's exit with the registers untouched.

cdef enum:
    PSCI_RESUME = 0
    PSCI_HALT = 1
    PSCI_EXIT = 2


cdef int hvc(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """An SMCCC call trapped by HVC: back to the guest, a halt or an exit."""
    cdef int r = psci_call(e, g, t)
    if r < 0:
        return -1
    if r == PSCI_RESUME:
        return enter(e, g, t, cost_ns(e, &e.th[g], COST_VM_ENTRY))
    if r == PSCI_HALT:
        return halt(e, g, t, HALT_CPU_SUSPEND)
    return 0


cdef inline int retval(thread_t* th, uint64_t val) noexcept nogil:
    """smccc_set_retval(vcpu, val, 0, 0, 0)."""
    th.regs[0] = val
    th.regs[1] = 0
    th.regs[2] = 0
    th.regs[3] = 0
    return PSCI_RESUME


cdef inline void narrow(thread_t* th) noexcept nogil:
    """kvm_psci_narrow_to_32bit."""
    th.regs[1] &= KW_U32MASK
    th.regs[2] &= KW_U32MASK
    th.regs[3] &= KW_U32MASK


cdef inline uint64_t ret_code(int64_t v) noexcept nogil:
    return <uint64_t>v


cdef int psci_call(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    cdef vm_t* vm = &e.vms[th.vm]
    cdef uint64_t fn = th.regs[0] & KW_U32MASK, arg
    cdef uint32_t ver = psci_version(vm), minor
    cdef int64_t r
    if ver == PSCI_V0_1:
        # kvm_psci_0_1_call: KVM's private function IDs.
        if fn == KVM_PSCI_FN_CPU_OFF:
            if power_off(e, g, t) < 0:
                return -1
            return retval(th, 0)
        if fn == KVM_PSCI_FN_CPU_ON:
            r = cpu_on(e, g, t, th.regs[1], th.regs[2], th.regs[3], 1)
            if r == -100:
                return -1
            return retval(th, ret_code(r))
        return retval(th, ret_code(PSCI_RET_NOT_SUPPORTED))
    if ver >= PSCI_V1_0:
        # kvm_psci_1_x_call
        minor = ver & 0xFFFF
        if fn == PSCI_FN_PSCI_VERSION:
            return retval(th, (1 << 16) | minor)
        if fn == PSCI_FN_PSCI_FEATURES:
            return retval(th, ret_code(psci_features(vm, th.regs[1] & KW_U32MASK, minor)))
        if fn == PSCI_FN_SYSTEM_SUSPEND or fn == PSCI_FN64_SYSTEM_SUSPEND:
            if fn == PSCI_FN_SYSTEM_SUSPEND:
                narrow(th)
            if vm.suspend_cap:
                # Registers untouched: userspace reads the SMCCC arguments.
                if exit_to_user(e, g, t, EXIT_SYSTEM_EVENT, SYSTEM_EVENT_SUSPEND, 0, 0, 0, 0):
                    return -1
                return PSCI_EXIT
            return retval(th, ret_code(PSCI_RET_NOT_SUPPORTED))
        if (fn == PSCI_FN_SYSTEM_RESET2 or fn == PSCI_FN64_SYSTEM_RESET2) and minor >= 1:
            if fn == PSCI_FN_SYSTEM_RESET2:
                narrow(th)
            arg = th.regs[1] & KW_U32MASK
            if arg == 0 or arg >= PSCI_RESET_TYPE_VENDOR_START:
                if system_event(e, g, t, SYSTEM_EVENT_RESET, 1):
                    return -1
                th.regs[0] = ret_code(PSCI_RET_INTERNAL_FAILURE)
                return PSCI_EXIT
            return retval(th, ret_code(PSCI_RET_INVALID_PARAMS))
        if (fn == PSCI_FN_SYSTEM_OFF2 or fn == PSCI_FN64_SYSTEM_OFF2) and minor >= 3:
            if fn == PSCI_FN_SYSTEM_OFF2:
                narrow(th)
            arg = th.regs[1] & KW_U32MASK
            if (arg != 0 and arg != 1) or th.regs[2] != 0:
                return retval(th, ret_code(PSCI_RET_INVALID_PARAMS))
            if system_event(e, g, t, SYSTEM_EVENT_SHUTDOWN, 1):
                return -1
            retval(th, ret_code(PSCI_RET_INTERNAL_FAILURE))
            return PSCI_EXIT
    # kvm_psci_0_2_call (and what 1.x leaves to it)
    if fn == PSCI_FN_PSCI_VERSION:
        return retval(th, PSCI_V0_2)
    if fn == PSCI_FN_CPU_SUSPEND or fn == PSCI_FN64_CPU_SUSPEND:
        return PSCI_HALT
    if fn == PSCI_FN_CPU_OFF:
        if power_off(e, g, t) < 0:
            return -1
        return retval(th, 0)
    if fn == PSCI_FN_CPU_ON or fn == PSCI_FN64_CPU_ON:
        if fn == PSCI_FN_CPU_ON:
            narrow(th)
        r = cpu_on(e, g, t, th.regs[1], th.regs[2], th.regs[3], 0)
        if r == -100:
            return -1
        return retval(th, ret_code(r))
    if fn == PSCI_FN_AFFINITY_INFO or fn == PSCI_FN64_AFFINITY_INFO:
        if fn == PSCI_FN_AFFINITY_INFO:
            narrow(th)
        return retval(th, ret_code(affinity_info(e, th.vm, th.regs[1], th.regs[2])))
    if fn == PSCI_FN_MIGRATE_INFO_TYPE:
        return retval(th, PSCI_TOS_MP)
    if fn == PSCI_FN_SYSTEM_OFF or fn == PSCI_FN_SYSTEM_RESET:
        if system_event(e, g, t, SYSTEM_EVENT_SHUTDOWN if fn == PSCI_FN_SYSTEM_OFF
                        else SYSTEM_EVENT_RESET, 0):
            return -1
        retval(th, ret_code(PSCI_RET_INTERNAL_FAILURE))
        return PSCI_EXIT
    return retval(th, ret_code(PSCI_RET_NOT_SUPPORTED))


cdef inline uint32_t psci_version(vm_t* vm) noexcept nogil:
    """kvm_psci_version (include/kvm/arm_psci.h): the VM's stored version with the
    KVM_ARM_VCPU_PSCI_0_2 feature, else 0.1."""
    if vm.vcpu_features & KVM_ARM_VCPU_PSCI_0_2_BIT:
        return vm.psci_version
    return PSCI_V0_1


cdef int64_t psci_features(vm_t* vm, uint64_t arg, uint32_t minor) noexcept nogil:
    if (arg == PSCI_FN_PSCI_VERSION or arg == PSCI_FN_CPU_SUSPEND or
            arg == PSCI_FN64_CPU_SUSPEND or arg == PSCI_FN_CPU_OFF or arg == PSCI_FN_CPU_ON or
            arg == PSCI_FN64_CPU_ON or arg == PSCI_FN_AFFINITY_INFO or
            arg == PSCI_FN64_AFFINITY_INFO or arg == PSCI_FN_MIGRATE_INFO_TYPE or
            arg == PSCI_FN_SYSTEM_OFF or arg == PSCI_FN_SYSTEM_RESET or
            arg == PSCI_FN_PSCI_FEATURES or arg == SMCCC_VERSION_FUNC_ID):
        return 0
    if arg == PSCI_FN_SYSTEM_SUSPEND or arg == PSCI_FN64_SYSTEM_SUSPEND:
        return 0 if vm.suspend_cap else PSCI_RET_NOT_SUPPORTED
    if arg == PSCI_FN_SYSTEM_RESET2 or arg == PSCI_FN64_SYSTEM_RESET2:
        return 0 if minor >= 1 else PSCI_RET_NOT_SUPPORTED
    if arg == PSCI_FN_SYSTEM_OFF2 or arg == PSCI_FN64_SYSTEM_OFF2:
        return 1 if minor >= 3 else PSCI_RET_NOT_SUPPORTED
    return PSCI_RET_NOT_SUPPORTED


cdef int64_t mpidr_to_vcpu(engine_t* e, uint32_t vmi, uint64_t mpidr) noexcept nogil:
    """kvm_mpidr_to_vcpu: the global thread whose MPIDR affinity is ``mpidr``, or -1."""
    cdef int32_t vid
    if mpidr >> 24:
        return -1                 # Aff3 is 0 for every vCPU here
    vid = vcpu_of_mpidr(mpidr, e.vms[vmi].nr_vcpus)
    return -1 if vid < 0 else <int64_t>e.vms[vmi].first + vid


cdef int64_t cpu_on(engine_t* e, uint32_t g, uint64_t t, uint64_t target, uint64_t entry,
                    uint64_t context, bint v0_1) noexcept nogil:
    """kvm_psci_vcpu_on.  -100 on an engine error."""
    cdef int64_t h
    cdef thread_t* tgt
    if target & ~(<uint64_t>MPIDR_HWID_BITMASK):
        return PSCI_RET_INVALID_PARAMS
    h = mpidr_to_vcpu(e, e.th[g].vm, target)
    if h < 0:
        return PSCI_RET_INVALID_PARAMS
    tgt = &e.th[h]
    if tgt.mp_state != MP_STOPPED:
        return PSCI_RET_INVALID_PARAMS if v0_1 else PSCI_RET_ALREADY_ON
    tgt.reset_pc = entry
    tgt.reset_r0 = context
    tgt.reset_pending = 1         # KVM_REQ_VCPU_RESET
    tgt.mp_state = MP_RUNNABLE
    if wake_up(e, <uint32_t>h, t) < 0:
        return -100
    return 0


cdef int64_t affinity_info(engine_t* e, uint32_t vmi, uint64_t target,
                           uint64_t level) noexcept nogil:
    """kvm_psci_vcpu_affinity_info: ON if any matching vCPU is not STOPPED."""
    cdef vm_t* vm = &e.vms[vmi]
    cdef uint64_t mask, mp
    cdef uint32_t g, vid
    cdef bint matched = False
    if (target & ~(<uint64_t>MPIDR_HWID_BITMASK)) or level > 3:
        return PSCI_RET_INVALID_PARAMS
    mask = (<uint64_t>MPIDR_HWID_BITMASK) & ~(((<uint64_t>1) << (level * 8)) - 1)
    for g in range(vm.first, vm.first + vm.nr_vcpus):
        vid = e.th[g].vcpu_id
        mp = (vid & 0xF) | (((vid >> 4) & 0xFF) << 8) | (((vid >> 12) & 0xFF) << 16)
        if (mp & mask) == (target & mask):
            matched = True
            if e.th[g].mp_state != MP_STOPPED:
                return 0
    return 1 if matched else PSCI_RET_INVALID_PARAMS


cdef int power_off(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """kvm_arm_vcpu_power_off: STOPPED, KVM_REQ_SLEEP, kick."""
    e.th[g].mp_state = MP_STOPPED
    return request(e, g, REQ_SLEEP, t)


cdef int system_event(engine_t* e, uint32_t g, uint64_t t, uint32_t type_,
                      uint64_t flags) noexcept nogil:
    """kvm_prepare_system_event: every vCPU STOPPED with KVM_REQ_SLEEP (which does
    not wake a vCPU blocked in WFI), and the caller exits."""
    cdef vm_t* vm = &e.vms[e.th[g].vm]
    cdef uint32_t h
    for h in range(vm.first, vm.first + vm.nr_vcpus):
        e.th[h].mp_state = MP_STOPPED
    for h in range(vm.first, vm.first + vm.nr_vcpus):
        if request(e, h, REQ_SLEEP, t) < 0:
            return -1
    return exit_to_user(e, g, t, EXIT_SYSTEM_EVENT, type_, 1, flags, 0, 0)


cdef inline int request(engine_t* e, uint32_t g, uint32_t req, uint64_t t) noexcept nogil:
    """kvm_make_request + kick, as kvm_make_vcpu_request does it."""
    cdef uint32_t bit = req & KVM_REQUEST_MASK
    # vcpu->requests is a u64: request numbers 0..63 (the API rejects the rest;
    # a shift by 64 or more would be undefined, so they set nothing here).
    if not (req & KVM_REQUEST_NO_ACTION) and bit < 64:
        e.th[g].requests |= (<uint64_t>1) << bit
    return kick(e, g, t, not (req & KVM_REQUEST_NO_WAKEUP))
