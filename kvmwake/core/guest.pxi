# core/guest.pxi (twin: kvmwake/reference/guest.py).
# Mirrors: the guest CPU itself; trapping ops are handled by KVM as
# arch/arm64/kvm/handle_exit.c (kvm_handle_wfx, kvm_handle_hvc) and
# arch/x86/kvm/x86.c (kvm_emulate_halt) do.
#
# The guest program interpreter.  A thread runs ops from its pc, adding up
# guest time, until an op that must act at an instant of its own (a trap, a
# halt, a system register write, the end); then the segment's end goes on the
# heap.  Trapping ops are carried out in KVM when the segment ends.


cdef inline int segment(engine_t* e, thread_t* th, uint32_t g, uint64_t t, uint64_t pre,
                        uint64_t guest, uint8_t cont) noexcept nogil:
    th.seg_gfrom = t + pre
    th.seg_gto = th.seg_gfrom + guest
    th.seg_end = th.seg_gto
    if cont == CONT_HALT or cont == CONT_TRAP or cont == CONT_END:
        th.seg_end += cost_ns(e, th, COST_VM_EXIT)
    th.cont = cont
    return push_thread(e, th, g, th.seg_end, EV_SEGMENT)


cdef int advance(engine_t* e, uint32_t g, uint64_t t, uint64_t pre) noexcept nogil:
    """Run guest ops from th.pc from t + pre on."""
    cdef thread_t* th = &e.th[g]
    cdef const op_t* ops = &e.ops[th.prog]
    cdef const op_t* op
    cdef uint64_t guest = 0, d
    cdef uint32_t n = 0
    cdef int rc = 0
    while True:
        op = &ops[th.pc]
        n += 1
        if op.code == OP_COMPUTE:
            # A segment's guest time saturates at KW_MAX_DRAW_NS (2^62 ns), as a
            # single draw does: a sum of many long computes cannot wrap.
            d = draw_ns(th, op.dist, op.p0, op.p1)
            guest = guest + d if d < KW_MAX_DRAW_NS - guest else KW_MAX_DRAW_NS
            th.pc += 1
        elif op.code == OP_WFI:
            if not e.x86:
                # kvm_handle_wfx's wfi_exit_stat (x86's halt_exits is counted by
                # kvm_emulate_halt, at the exit: emulate_halt).
                e.stats[<uint64_t>g * NR_STATS + S_HALT_EXITS] += 1
            th.pc += 1
            rc = segment(e, th, g, t, pre, guest, CONT_HALT)
            break
        elif op.code == OP_LOOP:
            th.loops[op.arg] = <uint32_t>op.p0
            th.pc += 1
        elif op.code == OP_ENDLOOP:
            if op.p0 == 0:
                th.pc = op.arg + 1
            else:
                th.loops[op.p1] -= 1
                th.pc = op.arg + 1 if th.loops[op.p1] > 0 else th.pc + 1
            if guest and th.pc == op.arg + 1:
                # A loop back-edge after guest time ends the segment.
                rc = segment(e, th, g, t, pre, guest, CONT_NEXT)
                break
        elif op.code == OP_END:
            rc = segment(e, th, g, t, pre, guest, CONT_END)
            break
        elif (op.code >= OP_SET_PMR and op.code <= OP_TIMER_CANCEL) or op.code == OP_SET_REG:
            # A system register or PSTATE write: it acts at its instant.
            if pre or guest:
                rc = segment(e, th, g, t, pre, guest, CONT_NEXT)
                break
            th.pc += 1
            rc = instant_op(e, g, t, op)
            if rc == 0 and not sti_shadow(e, th, op):
                rc = take_irqs(e, g, t, 0)
            if rc:
                rc = -1 if rc < 0 else 0
                break
        else:
            # SGI and the GIC register writes trap; done at the trap.
            rc = segment(e, th, g, t, pre, guest, CONT_TRAP)
            break
    if rc < 0:
        return -1
    if t == th.stall_t:
        th.stall_n += n
        if th.stall_n > MAX_OPS_PER_INSTANT:
            e.error = KW_ERR_STALL
            e.err_thread = g
            e.err_t = t
            e.err_n = th.stall_n
            return -1
    else:
        th.stall_t = t
        th.stall_n = n
    return 0


cdef inline bint sti_shadow(engine_t* e, thread_t* th, const op_t* op) noexcept nogil:
    """x86 ``sti; hlt``: STI blocks interrupts until after the next instruction
    (the interrupt shadow), so an interrupt pending at an unmask that the HLT
    follows is not taken before the HLT: the HLT exits (halt_exits), and
    __kvm_emulate_halt finds the event (kvm_skip_emulated_instruction has
    ended the shadow) and re-enters the guest, which takes it then."""
    return (e.x86 and op.code == OP_UNMASK and th.pc < th.prog_n
            and e.ops[th.prog + th.pc].code == OP_WFI)


cdef int trap_op(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """A trapping op, carried out in KVM after the exit; then the entry."""
    cdef thread_t* th = &e.th[g]
    cdef const op_t* op = &e.ops[th.prog + th.pc]
    cdef vm_t* vm = &e.vms[th.vm]
    cdef gic_t* gic = &e.gic[th.vm]
    cdef int rc = 0, ipi = 0
    cdef uint32_t irq, vid, n = vm.nr_vcpus
    cdef uint64_t mask, r, pre
    th.pc += 1
    if op.code == OP_HVC:
        return hvc(e, g, t)
    if op.code == OP_SYNC:
        return exit_to_user(e, g, t, EXIT_MMIO, 0, 0, 0, UCALL_SYNC,
                            th.regs[op.arg] if op.arg < 4 else op.p0)
    if op.code == OP_SGI:
        irq = e.resched_irq if op.arg == IPI_RESCHEDULE else op.arg
        if op.dist == WT_VCPU:
            rc = raise_irq(e, vm.first + <uint32_t>op.p0, irq, t)
        elif op.dist == WT_NEXT:
            rc = raise_irq(e, vm.first + (th.vcpu_id + 1) % n, irq, t)
        elif op.dist == WT_RANDOM_OTHER:
            r = rng_next(th) % (n - 1)
            vid = <uint32_t>r if r < th.vcpu_id else <uint32_t>(r + 1)
            rc = raise_irq(e, vm.first + vid, irq, t)
        elif op.dist == WT_LIST:
            mask = op.p0
            while mask:
                vid = <uint32_t>op.p1 + <uint32_t>__builtin_ctzll(mask)
                rc = raise_irq(e, vm.first + vid, irq, t)
                if rc < 0:
                    return -1
                ipi |= rc
                mask &= mask - 1
            rc = 0
        else:
            for vid in range(n):
                if vid != th.vcpu_id:
                    rc = raise_irq(e, vm.first + vid, irq, t)
                    if rc < 0:
                        return -1
                    ipi |= rc
            rc = 0
        if rc < 0:
            return -1
        ipi |= rc
    elif op.code == OP_IRQ_ENABLE:
        if set_enabled(e, g, th.vm, op.arg, 1, t) < 0:
            return -1
    elif op.code == OP_IRQ_DISABLE:
        set_enabled(e, g, th.vm, op.arg, 0, t)
    elif op.code == OP_SET_PRIORITY:
        if op.arg < 32:
            e.irq[g].priv_prio[op.arg] = <uint8_t>(op.p0 & VGIC_PRI_MASK)
        else:
            gic.spi_prio[op.arg] = <uint8_t>(op.p0 & VGIC_PRI_MASK)
    elif op.code == OP_DIST_ENABLE:
        if set_dist_enabled(e, th.vm, op.p0 != 0, t) < 0:
            return -1
    else:
        if route_spi(e, th.vm, op.arg, op.p0, t) < 0:
            return -1
    pre = cost_ns(e, th, COST_VM_ENTRY)
    if ipi:
        pre += cost_ns(e, th, COST_IPI_SEND)
    return enter(e, g, t, pre)


cdef int instant_op(engine_t* e, uint32_t g, uint64_t t, const op_t* op) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    cdef virq_t* q = &e.irq[g]
    if op.code == OP_SET_PMR:
        if e.x86:
            q.tpr = <uint8_t>op.p0
        else:
            q.pmr = <uint8_t>(op.p0 & VGIC_PRI_MASK)
    elif op.code == OP_MASK:
        q.masked = 1
    elif op.code == OP_UNMASK:
        q.masked = 0
    elif op.code == OP_SET_HANDLER:
        q.handler_ns = op.p0
        q.handler_noiret = <uint8_t>op.arg
    elif op.code == OP_TIMER_ARM:
        q.timer_cval = t + draw_ns(th, op.dist, op.p0, op.p1)
        q.timer_period = op.arg
        q.timer_ctl = ARCH_TIMER_CTRL_ENABLE
        return timer_program(e, g, t)
    elif op.code == OP_TIMER_CANCEL:
        q.timer_ctl &= ~ARCH_TIMER_CTRL_ENABLE
        return timer_program(e, g, t)
    else:
        th.regs[op.arg] = op.p0
    return 0


cdef int resume_program(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    """After interrupt handling: the interrupted segment, or the next op."""
    cdef virq_t* q = &e.irq[g]
    if q.sv_valid:
        q.sv_valid = 0
        return segment(e, &e.th[g], g, t, 0, q.sv_guest, q.sv_cont)
    return advance(e, g, t, 0)


cdef int interrupt_segment(engine_t* e, uint32_t g, uint64_t base, uint64_t cost) noexcept nogil:
    """Stop the current segment at ``base``: take interrupts ``cost`` ns later."""
    cdef thread_t* th = &e.th[g]
    cdef virq_t* q = &e.irq[g]
    q.sv_guest = th.seg_gto - base
    q.sv_cont = th.cont
    q.sv_valid = 1
    th.seg_gfrom = base + cost
    th.seg_gto = th.seg_gfrom
    th.seg_end = th.seg_gfrom
    th.cont = CONT_IRQ
    return push_thread(e, th, g, th.seg_end, EV_SEGMENT)


cdef int segment_end(engine_t* e, uint32_t g, uint64_t t) noexcept nogil:
    cdef thread_t* th = &e.th[g]
    cdef uint8_t cont = th.cont
    cdef int rc
    if cont == CONT_HALT:
        return emulate_halt(e, g, t)
    if cont == CONT_TRAP:
        return trap_op(e, g, t)
    if cont == CONT_END:
        return exit_to_user(e, g, t, EXIT_MMIO, 0, 0, 0, UCALL_DONE, 0)   # GUEST_DONE
    if cont == CONT_IRQ:
        # Out of the guest for the IPI: a trip round KVM_RUN's loop.
        return enter(e, g, t, 0)
    if cont == CONT_EOI:
        if eoi(e, g, e.irq[g].cur_irq, t) < 0:
            return -1
        e.irq[g].cur_irq = -1
        if e.irq[g].handler_noiret:
            e.irq[g].masked = 1            # no iret: IF stays 0 until the next unmask
        if th.sig_pending or asleep(e, th):
            # A kick during the handler IPI'd the vCPU out (kick() added the exit
            # and entry to the handler's time); KVM_RUN's loop has work to do
            # before the guest continues: a signal, a power-off.
            return enter(e, g, t, 0)
        rc = take_irqs(e, g, t, 0)
        if rc:
            return -1 if rc < 0 else 0
        return resume_program(e, g, t)
    return advance(e, g, t, 0)
