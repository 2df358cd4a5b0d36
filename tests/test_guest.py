"""kvmwake.guest: program building and validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from kvmwake import guest as G
from kvmwake.guest import MAX_DURATION_NS, ProgramError
from kvmwake.model import (IPI_RESCHEDULE, MAX_LOOP_DEPTH, MAX_NR_SPIS, OP_DTYPE, Dist, Op,
                           WakeTarget)


def raw(*ops):
    """An OP_DTYPE array from (code, dist, arg, p0, p1) tuples."""
    return np.array([tuple(int(x) for x in op) for op in ops], dtype=OP_DTYPE)


END = (Op.END, 0, 0, 0, 0)


def compute_op(ns, dist=Dist.FIXED, p1=0):
    return (Op.COMPUTE, dist, 0, ns, p1)


def test_program_error_is_a_value_error():
    assert issubclass(ProgramError, ValueError)


# ---------------------------------------------------------------- valid programs

def test_builder_layout():
    prog = G.Program([G.compute(5), G.loop([G.wfi(), G.loop([G.compute(1)], 3)], 2)])
    assert prog.ops.dtype == OP_DTYPE and not prog.ops.flags.writeable
    assert [tuple(int(x) for x in op) for op in prog.ops] == [
        (Op.COMPUTE, Dist.FIXED, 0, 5, 0),
        (Op.LOOP, 0, 0, 2, 0),            # arg = counter slot, p0 = count
        (Op.WFI, 0, 0, 0, 0),
        (Op.LOOP, 0, 1, 3, 0),
        (Op.COMPUTE, Dist.FIXED, 0, 1, 0),
        (Op.ENDLOOP, 0, 3, 3, 1),         # arg = its LOOP, p0 = count, p1 = slot
        (Op.ENDLOOP, 0, 1, 2, 0),
        END,
    ]
    assert G.Program.from_array(prog.ops) == prog


def test_end_is_appended_once():
    assert len(G.Program([G.wfi()])) == 2
    assert len(G.Program([G.wfi(), G.end()])) == 2
    assert len(G.Program([])) == 1          # the builder makes [END] of nothing


def test_loops_nest_up_to_the_limit():
    body = [G.wfi()]
    for _ in range(MAX_LOOP_DEPTH):
        body = [G.loop(body, 2)]
    G.Program(body)


def test_timed_loop_bodies_are_accepted():
    for body in ([G.wfi()], [G.compute(1)], [G.compute_exp(1)], [G.compute_uniform(1, 2)],
                 [G.wake(0), G.compute(1)], [G.loop([G.wfi()], 2)]):
        G.Program([G.loop(body)])


def test_validate_with_vcpu_count_accepts_valid_targets():
    ops = G.Program([G.wake(1), G.wake_next(), G.wake_random_other()]).ops
    G.validate(ops, 2)


# ---------------------------------------------------------------- raw arrays

@pytest.mark.parametrize("code", [max(Op) + 1, 32, 0xFFFF])
def test_unknown_op_code(code):
    # Codes up to 31 are taken or reserved (7 is IRQ_DISABLE now); none above is an op.
    assert code not in set(Op)
    with pytest.raises(ProgramError, match=rf"op 1: unknown op code {code}"):
        G.Program.from_array(raw(compute_op(5), (code, 0, 0, 0, 0), END))


def test_unknown_distribution():
    with pytest.raises(ProgramError, match=r"op 0: unknown distribution 3"):
        G.Program.from_array(raw(compute_op(5, dist=3), END))


@pytest.mark.parametrize("kind", [5, 9])
def test_unknown_wake_target_kind(kind):
    with pytest.raises(ProgramError, match=rf"op 0: unknown SGI target kind {kind}"):
        G.Program.from_array(raw((Op.WAKE, kind, IPI_RESCHEDULE, 0, 0), END))


def test_endloop_jump_out_of_range():
    ops = G.Program([G.compute(1), G.loop([G.wfi()], 2)]).ops.copy()
    assert ops["code"][3] == Op.ENDLOOP and ops["arg"][3] == 1
    ops["arg"][3] = 0                      # points at the COMPUTE, not at its LOOP
    with pytest.raises(ProgramError,
                       match=r"op 3: jump to op 0 out of range \(its loop starts at op 1\)"):
        G.Program.from_array(ops)
    ops["arg"][3] = 100                    # beyond the program
    with pytest.raises(ProgramError, match=r"op 3: jump to op 100 out of range"):
        G.Program.from_array(ops)


def test_endloop_count_or_slot_differs():
    ops = G.Program([G.loop([G.wfi()], 2)]).ops.copy()
    ops["p0"][2] = 3
    with pytest.raises(ProgramError, match=r"op 2: loop count or slot differs from op 0"):
        G.Program.from_array(ops)


def test_loop_never_closed():
    with pytest.raises(ProgramError, match=r"op 0: loop is never closed"):
        G.Program.from_array(raw((Op.LOOP, 0, 0, 2, 0), compute_op(5), END))


def test_end_of_loop_without_loop():
    with pytest.raises(ProgramError, match=r"op 1: end of loop without a loop"):
        G.Program.from_array(raw(compute_op(5), (Op.ENDLOOP, 0, 0, 2, 0), END))


def test_loop_slot_must_match_nesting_depth():
    with pytest.raises(ProgramError,
                       match=r"op 0: loop counter slot 1 does not match nesting depth 0"):
        G.Program.from_array(raw((Op.LOOP, 0, 1, 2, 0), compute_op(5),
                                 (Op.ENDLOOP, 0, 0, 2, 1), END))


def test_raw_nesting_deeper_than_max():
    depth = MAX_LOOP_DEPTH + 1
    heads = [(Op.LOOP, 0, d, 2, 0) for d in range(depth)]
    tails = [(Op.ENDLOOP, 0, d, 2, d) for d in reversed(range(depth))]
    with pytest.raises(ProgramError,
                       match=rf"op {MAX_LOOP_DEPTH}: loop counter slot {MAX_LOOP_DEPTH}"):
        G.Program.from_array(raw(*heads, compute_op(5), *tails, END))


def test_raw_loop_body_without_time():
    with pytest.raises(ProgramError, match=r"op 0: loop body lets no virtual time pass"):
        G.Program.from_array(raw((Op.LOOP, 0, 0, 0, 0), (Op.WAKE, WakeTarget.NEXT, 0, 0, 0),
                                 (Op.ENDLOOP, 0, 0, 0, 0), END))


def test_raw_uniform_lo_above_hi():
    with pytest.raises(ProgramError, match=r"op 0: uniform lo 10 > hi 5"):
        G.Program.from_array(raw(compute_op(10, Dist.UNIFORM, 5), END))


@pytest.mark.parametrize("p0, p1", [(MAX_DURATION_NS + 1, 0), (0, MAX_DURATION_NS + 1),
                                    (2**64 - 1, 2**64 - 1)])
def test_raw_duration_out_of_range(p0, p1):
    with pytest.raises(ProgramError, match=r"op 0: duration out of range"):
        G.Program.from_array(raw(compute_op(p0, Dist.UNIFORM, p1), END))


def test_empty_program():
    with pytest.raises(ProgramError, match=r"empty program"):
        G.Program.from_array(np.zeros(0, dtype=OP_DTYPE))
    with pytest.raises(ProgramError, match=r"empty program"):
        G.validate(np.zeros(0, dtype=OP_DTYPE))


def test_program_must_end():
    with pytest.raises(ProgramError, match=r"op 0: program runs past its last op"):
        G.Program.from_array(raw(compute_op(5)))
    # A counted loop at the end falls through past the last op too.
    with pytest.raises(ProgramError, match=r"op 2: program runs past its last op"):
        G.Program.from_array(raw((Op.LOOP, 0, 0, 2, 0), compute_op(5), (Op.ENDLOOP, 0, 0, 2, 0)))
    # An endless loop at the end is fine.
    G.Program.from_array(raw((Op.LOOP, 0, 0, 0, 0), compute_op(5), (Op.ENDLOOP, 0, 0, 0, 0)))


@pytest.mark.parametrize("arr, problem", [
    (np.zeros((2, 3)), r"program array has dtype float64"),
    (np.zeros(3, dtype=np.int64), r"program array has dtype int64"),
    ([(0, 0, 0, 0, 0)], r"program array has dtype int64"),
    (np.zeros((2, 2), dtype=OP_DTYPE), r"must be one-dimensional, not shape \(2, 2\)"),
    (np.zeros((), dtype=OP_DTYPE), r"must be one-dimensional, not shape \(\)"),
], ids=["float-2d", "int-1d", "list-of-tuples", "2d", "0d"])
def test_from_array_wrong_dtype_or_shape(arr, problem):
    with pytest.raises(ProgramError, match=problem):
        G.Program.from_array(arr)


def test_from_array_rejects_other_field_names():
    other = np.zeros(2, dtype=[("a", "<u2"), ("b", "<u2"), ("c", "<u4"), ("d", "<u8"),
                               ("e", "<u8")])
    with pytest.raises(ProgramError, match="fields"):
        G.Program.from_array(other)


def test_from_array_copies_and_freezes():
    ops = G.Program([G.wfi()]).ops.copy()
    prog = G.Program.from_array(ops)
    ops["code"][0] = 99
    assert prog.ops["code"][0] == Op.WFI and not prog.ops.flags.writeable


def test_raw_loop_count_beyond_u32():
    # The core keeps u32 loop counters: a larger count is refused, not truncated.
    with pytest.raises(ProgramError, match="32 bits"):
        G.Program.from_array(raw((Op.LOOP, 0, 0, 2**32 + 1, 0), compute_op(5),
                                 (Op.ENDLOOP, 0, 0, 2**32 + 1, 0), END))


# ---------------------------------------------------------------- builder helpers

@pytest.mark.parametrize("body", [[G.wake(1)], [G.wake_next(), G.wake_random_other()],
                                  [G.compute(0)], [G.compute_exp(0)],
                                  [G.compute_uniform(0, 1_000)], [G.compute(0), G.end()]],
                         ids=["wake", "wakes", "compute0", "exp0", "uniform-from-0", "end"])
def test_loop_body_with_no_time(body):
    with pytest.raises(ProgramError, match=r"op 1: loop body lets no virtual time pass"):
        G.Program([G.compute(5), G.loop(body)])


def test_nesting_deeper_than_max():
    body = [G.wfi()]
    for _ in range(MAX_LOOP_DEPTH + 1):
        body = [G.loop(body, 2)]
    with pytest.raises(ProgramError, match=rf"loops nest deeper than {MAX_LOOP_DEPTH}"):
        G.Program(body)


def test_uniform_lo_above_hi():
    with pytest.raises(ProgramError, match=r"compute_uniform: lo 10 > hi 5"):
        G.compute_uniform(10, 5)


@pytest.mark.parametrize("make, value, problem", [
    (G.compute, -1, r"compute: duration -1 ns out of range"),
    (G.compute, MAX_DURATION_NS + 1, r"compute: duration \d+ ns out of range"),
    (G.compute, 1.5, r"compute: duration must be an integer number of ns or a string "
                     r"like \"20us\", not 1.5"),
    (G.compute, True, r"compute: duration must be an integer number of ns or a string "
                      r"like \"20us\", not True"),
    (G.compute, "10", r"compute: '10' has no unit"),
    (G.compute_exp, -5, r"compute_exp mean: duration -5 ns out of range"),
    (G.compute_exp, 2.0, r"compute_exp mean: duration must be an integer"),
    (lambda v: G.compute_uniform(v, 10), -1, r"compute_uniform lo: duration -1 ns"),
    (lambda v: G.compute_uniform(0, v), MAX_DURATION_NS + 1, r"compute_uniform hi: duration"),
], ids=["negative", "oversized", "float", "bool", "str", "exp-negative", "exp-float",
        "uniform-lo", "uniform-hi"])
def test_bad_durations(make, value, problem):
    with pytest.raises(ProgramError, match=problem):
        make(value)


def test_numpy_integer_durations_are_accepted():
    assert G.compute(np.int64(5)).p0 == 5 and isinstance(G.compute(np.uint32(7)).p0, int)
    assert G.compute(MAX_DURATION_NS).p0 == MAX_DURATION_NS


@pytest.mark.parametrize("count", [-1, 2**32, 1.0, True, None])
def test_bad_loop_counts(count):
    with pytest.raises(ProgramError, match=r"loop count must be an integer in 0..2\*\*32-1"):
        G.loop([G.wfi()], count)


@pytest.mark.parametrize("target", [-1, True, 1.0, "0"])
def test_bad_wake_targets(target):
    with pytest.raises(ProgramError, match=r"wake: vcpu_id must be a non-negative integer"):
        G.wake(target)


def test_not_an_op():
    with pytest.raises(ProgramError, match=r"not a guest op or loop: 42"):
        G.Program([G.wfi(), 42])


def test_wake_target_checked_against_vcpu_count():
    ops = G.Program([G.compute(1), G.wake(3)]).ops
    G.validate(ops)                         # no vCPU count: not checked
    G.validate(ops, 4)
    with pytest.raises(ProgramError,
                       match=r"op 1: wake target vCPU 3 does not exist \(the VM has 3\)"):
        G.validate(ops, 3)


def test_wake_random_other_needs_two_vcpus():
    ops = G.Program([G.compute(1), G.loop([G.wfi(), G.wake_random_other()])]).ops
    G.validate(ops, 2)
    with pytest.raises(ProgramError, match=r"op 3: wake_random_other needs at least 2 vCPUs"):
        G.validate(ops, 1)
    # wake_next wraps around and is fine with one vCPU.
    G.validate(G.Program([G.wake_next(), G.wfi()]).ops, 1)


# ---------------------------------------------------------------- interrupt ops

def _fields(ins):
    return (ins.code, ins.dist, ins.arg, ins.p0, ins.p1)


def test_wake_ops_send_the_reschedule_ipi():
    """wake / wake_next / wake_random_other: target kind in dist, the sentinel IRQ in arg,
    the vCPU id in p0."""
    assert _fields(G.wake(3)) == (Op.SGI, WakeTarget.VCPU, IPI_RESCHEDULE, 3, 0)
    assert _fields(G.wake_next()) == (Op.SGI, WakeTarget.NEXT, IPI_RESCHEDULE, 0, 0)
    assert _fields(G.wake_random_other()) == (Op.SGI, WakeTarget.RANDOM_OTHER,
                                              IPI_RESCHEDULE, 0, 0)
    assert Op.WAKE == Op.SGI == 3


def test_sgi_target_kinds():
    assert _fields(G.sgi(5, 2)) == (Op.SGI, WakeTarget.VCPU, 5, 2, 0)
    assert _fields(G.sgi(5, np.int64(2))) == (Op.SGI, WakeTarget.VCPU, 5, 2, 0)
    assert _fields(G.sgi(1, "all-but-self")) == (Op.SGI, WakeTarget.ALL_BUT_SELF, 1, 0, 0)
    assert _fields(G.sgi(1, "random-other")) == (Op.SGI, WakeTarget.RANDOM_OTHER, 1, 0, 0)
    assert _fields(G.sgi(1, "next")) == (Op.SGI, WakeTarget.NEXT, 1, 0, 0)
    # A list: the lowest id in p1, one bit per vCPU from there in p0; duplicates merge.
    assert _fields(G.sgi(2, [7, 3, 4, 3])) == (Op.SGI, WakeTarget.LIST, 2, 0b10011, 3)
    assert _fields(G.sgi(2, [10, 73])) == (Op.SGI, WakeTarget.LIST, 2, 1 | 1 << 63, 10)
    assert G.ipi is G.sgi


@pytest.mark.parametrize("targets, problem", [
    ([], r"sgi: empty target list"),
    ([0, 64], r"sgi: targets 0..64 span more than 64 vCPUs"),
    ([-1], r"sgi: vcpu_id must be a non-negative integer"),
    ([1.5], r"sgi: vcpu_id must be a non-negative integer"),
    (-1, r"sgi: vcpu_id must be a non-negative integer"),
    (True, r"sgi: targets must be a vCPU id, a list of vCPU ids"),
    (1.5, r"sgi: targets must be a vCPU id, a list of vCPU ids"),
    (None, r"sgi: targets must be a vCPU id, a list of vCPU ids"),
    ("everyone", r"sgi: targets must be a vCPU id, a list of vCPU ids"),
])
def test_sgi_bad_targets(targets, problem):
    with pytest.raises(ProgramError, match=problem):
        G.sgi(1, targets)


@pytest.mark.parametrize("irq", [-1, 1024, 1.0, True])
def test_sgi_bad_irq_number(irq):
    with pytest.raises(ProgramError, match=r"sgi: interrupt number must be an integer in 0..1023"):
        G.sgi(irq, 0)


def test_irq_op_layout():
    assert _fields(G.irq_enable(40)) == (Op.IRQ_ENABLE, 0, 40, 0, 0)
    assert _fields(G.irq_disable(27)) == (Op.IRQ_DISABLE, 0, 27, 0, 0)
    assert _fields(G.set_priority(33, 0x87)) == (Op.SET_PRIORITY, 0, 33, 0x87, 0)
    assert _fields(G.set_pmr(0x80)) == (Op.SET_PMR, 0, 0, 0x80, 0)
    assert G.set_tpr is G.set_pmr
    assert _fields(G.mask()) == (Op.MASK, 0, 0, 0, 0)
    assert _fields(G.unmask()) == (Op.UNMASK, 0, 0, 0, 0)
    assert _fields(G.set_handler(2_000)) == (Op.SET_HANDLER, 0, 0, 2_000, 0)
    assert _fields(G.timer_arm(5_000)) == (Op.TIMER_ARM, Dist.FIXED, 0, 5_000, 0)
    assert _fields(G.timer_arm(5_000, 7_000)) == (Op.TIMER_ARM, Dist.FIXED, 7_000, 5_000, 0)
    assert _fields(G.timer_arm_exp(9_000, 1)) == (Op.TIMER_ARM, Dist.EXPONENTIAL, 1, 9_000, 0)
    assert _fields(G.timer_cancel()) == (Op.TIMER_CANCEL, 0, 0, 0, 0)
    assert _fields(G.dist_enable()) == (Op.DIST_ENABLE, 0, 0, 1, 0)
    assert _fields(G.dist_enable(False)) == (Op.DIST_ENABLE, 0, 0, 0, 0)
    assert _fields(G.route_spi(40, 0x0102)) == (Op.ROUTE_SPI, 0, 40, 0x0102, 0)


@pytest.mark.parametrize("make, problem", [
    (lambda: G.set_priority(40, 256), r"priority must be an integer in 0..255, not 256"),
    (lambda: G.set_priority(40, -1), r"priority must be an integer in 0..255"),
    (lambda: G.set_pmr(256), r"pmr must be an integer in 0..255, not 256"),
    (lambda: G.set_pmr(True), r"pmr must be an integer in 0..255, not True"),
    (lambda: G.irq_enable(1024), r"irq_enable: interrupt number must be an integer"),
    (lambda: G.irq_disable(-1), r"irq_disable: interrupt number must be an integer"),
    (lambda: G.timer_arm(-1), r"timer_arm: duration -1 ns out of range"),
    (lambda: G.timer_arm(1, 2**32), r"timer period must be an integer in 0..2\*\*32-1 ns"),
    (lambda: G.timer_arm_exp(1, -1), r"timer period must be an integer"),
    (lambda: G.set_handler(MAX_DURATION_NS + 1), r"set_handler: duration \d+ ns out of range"),
    (lambda: G.route_spi(40, -1), r"route_spi: mpidr must be a 64-bit value"),
    (lambda: G.route_spi(40, 1 << 64), r"route_spi: mpidr must be a 64-bit value"),
], ids=["prio-256", "prio-neg", "pmr-256", "pmr-bool", "enable-1024", "disable-neg",
        "timer-neg", "period-big", "period-neg", "handler-big", "mpidr-neg", "mpidr-big"])
def test_irq_op_bad_arguments(make, problem):
    with pytest.raises(ProgramError, match=problem):
        make()


def test_instant_ops_alone_do_not_make_a_loop_take_time():
    for body in ([G.set_pmr(0x80), G.mask(), G.unmask()], [G.timer_arm(1_000)],
                 [G.sgi(1, 0), G.irq_enable(40)], [G.set_handler(5_000)]):
        with pytest.raises(ProgramError, match=r"op 0: loop body lets no virtual time pass"):
            G.Program([G.loop(body)])


@pytest.mark.parametrize("arch, irq, ok", [
    ("arm64", 0, True), ("arm64", 15, True), ("arm64", 16, False), ("arm64", 255, False),
    ("x86", 15, False), ("x86", 16, True), ("x86", 0xFD, True), ("x86", 255, True),
    (None, 255, True),
])
def test_sgi_number_checked_against_arch(arch, irq, ok):
    ops = G.Program([G.sgi(irq, 0), G.wfi()]).ops
    if ok:
        G.validate(ops, 1, arch)
    else:
        with pytest.raises(ProgramError, match=rf"op 0: (SGI|IPI vector|SGI/vector) {irq} out "
                                               r"of range"):
            G.validate(ops, 1, arch)
    # The reschedule sentinel is valid on every arch.
    G.validate(G.Program([G.wake(0)]).ops, 1, arch)


def test_sgi_number_beyond_255_is_no_sgi_or_vector_anywhere():
    with pytest.raises(ProgramError, match=r"op 1: SGI/vector 256 out of range"):
        G.Program([G.compute(1), G.sgi(256, 0)])


@pytest.mark.parametrize("item", [G.irq_enable(40), G.irq_disable(40), G.set_priority(40, 0),
                                  G.dist_enable(), G.route_spi(40, 0)],
                         ids=["enable", "disable", "priority", "dist", "route"])
def test_gic_ops_rejected_on_x86(item):
    ops = G.Program([item]).ops
    G.validate(ops, 1, "arm64")
    with pytest.raises(ProgramError, match=r"op 0: \w+ is an arm64 GIC op; x86 has none"):
        G.validate(ops, 1, "x86")


@pytest.mark.parametrize("item", [G.timer_arm(5), G.timer_arm_exp(5), G.timer_cancel()])
def test_timer_ops_rejected_on_x86(item):
    ops = G.Program([item]).ops
    G.validate(ops, 1, "arm64")
    with pytest.raises(ProgramError, match=r"op 0: TIMER_\w+: the arch timer is arm64's"):
        G.validate(ops, 1, "x86")


def test_intid_checked_against_nr_spis():
    ops = G.Program([G.compute(1), G.irq_enable(32 + 64)]).ops
    G.validate(ops, 1, "arm64", 65)
    with pytest.raises(ProgramError, match=r"op 1: IRQ_ENABLE: INTID 96 does not exist "
                                           r"\(the VM has INTIDs 0..95\)"):
        G.validate(ops, 1, "arm64", 64)
    # Without nr_spis the limit is the largest vGIC's (INTID 1019).
    G.validate(G.Program([G.irq_enable(32 + MAX_NR_SPIS - 1)]).ops)
    with pytest.raises(ProgramError, match=r"INTID 1020 does not exist"):
        G.validate(G.Program([G.irq_enable(1020)]).ops)
    with pytest.raises(ProgramError, match=r"op 0: ROUTE_SPI: INTID 31 is not an SPI"):
        G.validate(G.Program([G.route_spi(31, 0)]).ops)


def test_raw_irq_op_fields_checked():
    with pytest.raises(ProgramError, match=r"op 0: priority 256 out of range 0..255"):
        G.Program.from_array(raw((Op.SET_PRIORITY, 0, 40, 256, 0), END))
    with pytest.raises(ProgramError, match=r"op 0: PMR/TPR 256 out of range 0..255"):
        G.Program.from_array(raw((Op.SET_PMR, 0, 0, 256, 0), END))
    with pytest.raises(ProgramError, match=r"op 0: DIST_ENABLE takes 0 or 1, not 2"):
        G.Program.from_array(raw((Op.DIST_ENABLE, 0, 0, 2, 0), END))
    with pytest.raises(ProgramError, match=r"op 0: unknown distribution 3"):
        G.Program.from_array(raw((Op.TIMER_ARM, 3, 0, 5, 0), END))
    with pytest.raises(ProgramError, match=r"op 0: SGI with an empty target list"):
        G.Program.from_array(raw((Op.SGI, WakeTarget.LIST, 1, 0, 0), END))


def test_sgi_list_checked_against_vcpu_count():
    ops = G.Program([G.sgi(1, [2, 5])]).ops
    G.validate(ops, 6)
    with pytest.raises(ProgramError, match=r"op 0: SGI target vCPU 5 does not exist "
                                           r"\(the VM has 5\)"):
        G.validate(ops, 5)


def test_validate_remembers_only_what_it_checked():
    """A program found valid for one VM is checked again for another: the memo of valid
    programs is keyed by the VM's vCPUs, arch and SPIs too."""
    prog = G.Program([G.loop([G.compute(1000), G.wake(3), G.wfi()])])
    G.validate(prog.ops, 4, "arm64", 32)
    G.validate(prog.ops, 4, "arm64", 32)           # remembered
    with pytest.raises(G.ProgramError, match="vCPU 3 does not exist"):
        G.validate(prog.ops, 2, "arm64", 32)
    with pytest.raises(G.ProgramError, match="vCPU 3 does not exist"):
        G.validate(prog.ops, 2, "arm64", 32)       # a failure is never remembered
    bad = prog.ops.copy()
    bad["code"][1] = 999
    with pytest.raises(G.ProgramError, match="unknown op code"):
        G.validate(bad, 4, "arm64", 32)
