"""kvmwake.guest: program building and validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from kvmwake import guest as G
from kvmwake.guest import MAX_DURATION_NS, ProgramError
from kvmwake.model import MAX_LOOP_DEPTH, OP_DTYPE, Dist, Op, WakeTarget


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

def test_unknown_op_code():
    with pytest.raises(ProgramError, match=r"op 1: unknown op code 7"):
        G.Program.from_array(raw(compute_op(5), (7, 0, 0, 0, 0), END))


def test_unknown_distribution():
    with pytest.raises(ProgramError, match=r"op 0: unknown distribution 3"):
        G.Program.from_array(raw(compute_op(5, dist=3), END))


def test_unknown_wake_target_kind():
    with pytest.raises(ProgramError, match=r"op 0: unknown wake target kind 9"):
        G.Program.from_array(raw((Op.WAKE, 9, 0, 0, 0), END))


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
    (G.compute, 1.5, r"compute: duration must be an integer number of ns, not 1.5"),
    (G.compute, True, r"compute: duration must be an integer number of ns, not True"),
    (G.compute, "10", r"compute: duration must be an integer"),
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
