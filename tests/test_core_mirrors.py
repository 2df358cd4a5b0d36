"""The numbers compiled into kvmwake._core are those of kvmwake.model."""

from __future__ import annotations

import pytest

from kvmwake import _core, model, reference
from kvmwake.model import (
    CONT_DELIVER, CONT_END, CONT_HALT, CONT_NEXT, RESUME_HALT, RESUME_SEGMENT, RESUME_START,
    Dist, EventClass, Op, ThreadState, WakeTarget,
)


@pytest.fixture(scope="module")
def compiled():
    return _core.compiled_constants()


def _in_order(enum):
    return tuple(int(m) for m in sorted(enum, key=int))


def test_op_codes(compiled):
    assert compiled["ops"] == (Op.END, Op.COMPUTE, Op.WFI, Op.WAKE, Op.LOOP, Op.ENDLOOP)
    assert compiled["ops"] == _in_order(Op)


def test_distributions(compiled):
    assert compiled["dists"] == (Dist.FIXED, Dist.EXPONENTIAL, Dist.UNIFORM) == _in_order(Dist)


def test_wake_targets(compiled):
    assert compiled["wake_targets"] == (WakeTarget.VCPU, WakeTarget.RANDOM_OTHER,
                                        WakeTarget.NEXT) == _in_order(WakeTarget)


def test_thread_states(compiled):
    assert compiled["thread_states"] == (ThreadState.USER, ThreadState.RUNNING,
                                         ThreadState.POLLING, ThreadState.BLOCKED,
                                         ThreadState.RUNNABLE) == _in_order(ThreadState)


def test_resume_and_continuations(compiled):
    assert compiled["resume"] == (RESUME_START, RESUME_HALT, RESUME_SEGMENT)
    assert compiled["cont"] == (CONT_NEXT, CONT_HALT, CONT_DELIVER, CONT_END)


def test_event_classes(compiled):
    assert compiled["event_classes"] == (EventClass.TICK, EventClass.SEGMENT,
                                         EventClass.POLL_END, EventClass.RUN,
                                         EventClass.SLICE) == _in_order(EventClass)


def test_request_flags(compiled):
    assert compiled["request_flags"] == (model.KVM_REQUEST_MASK, model.KVM_REQUEST_NO_WAKEUP,
                                         model.KVM_REQUEST_WAIT, model.KVM_REQUEST_NO_ACTION)


def test_stat_indices(compiled):
    assert compiled["stats"] == (
        model.S_SUCCESSFUL_POLL, model.S_ATTEMPTED_POLL, model.S_POLL_INVALID, model.S_WAKEUP,
        model.S_POLL_SUCCESS_NS, model.S_POLL_FAIL_NS, model.S_WAIT_NS,
        model.S_POLL_SUCCESS_HIST, model.S_POLL_FAIL_HIST, model.S_WAIT_HIST,
        model.S_BLOCKING, model.S_HALT_EXITS, model.NR_STATS)
    # The counters come in the kernel's order, then three histograms of 32.
    assert model.STAT_COUNTERS[model.S_WAKEUP] == "halt_wakeup"
    assert model.S_POLL_FAIL_HIST - model.S_POLL_SUCCESS_HIST == model.HALT_POLL_HIST_COUNT == 32


def test_stats_array_shape_matches_nr_stats():
    for cls in (_core.Engine, reference.Engine):
        e = cls("arm64", 1, 0)
        e.add_vm(3)
        a = e.stats_array()
        assert a.shape == (3, model.NR_STATS) and a.dtype.name == "uint64"
        assert e.lat_hist_array().shape == (model.LAT_BUCKETS,)


def test_scalars(compiled):
    assert compiled["lat_buckets"] == model.LAT_BUCKETS
    assert compiled["max_ops_per_instant"] == model.MAX_OPS_PER_INSTANT
    assert compiled["pid_base"] == reference.PID_BASE


def test_op_record_size(compiled):
    assert compiled["sizes"]["op_t"] == model.OP_DTYPE.itemsize == 24


def test_trace_pids_use_pid_base():
    """Both engines put PID_BASE + thread index in the trace."""
    from kvmwake import guest as G
    for cls in (_core.Engine, reference.Engine):
        e = cls("x86", 2, 0, costs=dict.fromkeys(model.COST_NAMES, 0))
        e.halt_poll_ns = 0                 # no kvm_halt_poll_ns line
        e.add_vm(1)
        e.add_vm(1)
        e.load_program(1, G.Program([G.wfi()]).ops)
        e.start_vcpu(1)
        e.run(10)
        e.raise_pending(1)
        e.run(20)
        (rec,) = e.trace_list()
        assert rec[1] == reference.PID_BASE + 1 and rec[2] == 1 and rec[6] == 0
