"""The numbers compiled into kvmwake._core are those of kvmwake.model."""

from __future__ import annotations

import pytest

import numpy as np

from kvmwake import _core, model, reference
from kvmwake.model import (
    CONT_END, CONT_EOI, CONT_HALT, CONT_IRQ, CONT_NEXT, CONT_TRAP, RESUME_HALT, RESUME_SEGMENT,
    RESUME_START, Dist, EventClass, Op, SourceKind, ThreadState, WakeTarget,
)


@pytest.fixture(scope="module")
def compiled():
    return _core.compiled_constants()


def _in_order(enum):
    return tuple(int(m) for m in sorted(enum, key=int))


def _model_constants(prefix):
    """The values of model's module constants named ``prefix...``, in order."""
    return tuple(sorted(v for k, v in vars(model).items()
                        if k.startswith(prefix) and isinstance(v, int)))


def test_op_codes(compiled):
    assert compiled["ops"][:17] == (Op.END, Op.COMPUTE, Op.WFI, Op.SGI, Op.LOOP, Op.ENDLOOP,
                               Op.IRQ_ENABLE, Op.IRQ_DISABLE, Op.SET_PRIORITY, Op.SET_PMR,
                               Op.MASK, Op.UNMASK, Op.SET_HANDLER, Op.TIMER_ARM,
                               Op.TIMER_CANCEL, Op.DIST_ENABLE, Op.ROUTE_SPI)
    assert compiled["ops"] == _in_order(Op)
    assert Op.WAKE is Op.SGI                    # the first name is an alias, not a new code
    # Every op is either a trap, an instant op or one of the structural ones.
    structural = {Op.END, Op.COMPUTE, Op.LOOP, Op.ENDLOOP}
    assert model.TRAPPING_OPS.isdisjoint(model.INSTANT_OPS)
    assert model.TRAPPING_OPS | model.INSTANT_OPS | structural == set(Op)
    # The interpreter treats SET_PMR..TIMER_CANCEL as one range of instant ops.
    assert {Op(c) for c in range(Op.SET_PMR, Op.TIMER_CANCEL + 1)} <= model.INSTANT_OPS


def test_distributions(compiled):
    assert compiled["dists"] == (Dist.FIXED, Dist.EXPONENTIAL, Dist.UNIFORM) == _in_order(Dist)


def test_wake_targets(compiled):
    assert compiled["wake_targets"] == (WakeTarget.VCPU, WakeTarget.RANDOM_OTHER,
                                        WakeTarget.NEXT, WakeTarget.LIST,
                                        WakeTarget.ALL_BUT_SELF) == _in_order(WakeTarget)


def test_source_kinds(compiled):
    assert compiled["source_kinds"] == (SourceKind.PERIODIC, SourceKind.POISSON,
                                        SourceKind.TRACE) == _in_order(SourceKind)


def test_irq_constants(compiled):
    assert compiled["irq"] == {
        "IPI_RESCHEDULE": model.IPI_RESCHEDULE, "VTIMER_IRQ": model.VTIMER_IRQ,
        "VGIC_PRI_MASK": model.VGIC_PRI_MASK,
        "ARCH_TIMER_CTRL_ENABLE": model.ARCH_TIMER_CTRL_ENABLE,
        "ARCH_TIMER_CTRL_IT_MASK": model.ARCH_TIMER_CTRL_IT_MASK,
        "MAX_TAKES_PER_INSTANT": model.MAX_TAKES_PER_INSTANT,
        "GIC_DEFAULT_PRIORITY": model.GIC_DEFAULT_PRIORITY,
        "GIC_DEFAULT_PMR": model.GIC_DEFAULT_PMR,
    }
    # The sentinel is the all-ones u32 of the op's ``arg`` field, no valid INTID or vector.
    assert model.IPI_RESCHEDULE == np.iinfo(model.OP_DTYPE["arg"]).max
    assert model.IPI_RESCHEDULE >= model.NR_INTIDS


def test_thread_states(compiled):
    assert compiled["thread_states"] == (ThreadState.USER, ThreadState.RUNNING,
                                         ThreadState.POLLING, ThreadState.BLOCKED,
                                         ThreadState.RUNNABLE) == _in_order(ThreadState)


def test_resume_and_continuations(compiled):
    assert compiled["resume"][:3] == (RESUME_START, RESUME_HALT, RESUME_SEGMENT)
    assert compiled["resume"] == _model_constants("RESUME_")
    assert compiled["cont"][:6] == (CONT_NEXT, CONT_HALT, CONT_TRAP, CONT_END, CONT_IRQ,
                                    CONT_EOI)
    assert compiled["cont"] == _model_constants("CONT_") == tuple(range(len(compiled["cont"])))


def test_event_classes(compiled):
    assert compiled["event_classes"] == (EventClass.TICK, EventClass.SOURCE, EventClass.TIMER,
                                         EventClass.SEGMENT, EventClass.POLL_END,
                                         EventClass.RUN, EventClass.SLICE) == _in_order(EventClass)
    # External wake sources (tick, device sources, timers) come before everything a
    # thread does at the same instant, so a wake that lands when a poll ends is seen.
    assert max(EventClass.TICK, EventClass.SOURCE, EventClass.TIMER) < EventClass.SEGMENT
    assert EventClass.SEGMENT < EventClass.POLL_END


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
    assert compiled["queue"] == {"SEQ_BITS": model.SEQ_BITS, "MAX_SEQ": model.MAX_SEQ,
                                 "QUEUE_SHIFT": model.QUEUE_SHIFT}


def test_op_record_size(compiled):
    assert compiled["sizes"]["op_t"] == model.OP_DTYPE.itemsize == 24


# Mirrors of the core's interrupt structs (kvmwake/_core.pxd), each array sized
# from the model's numbers: the compiled sizes must equal these.
_WORDS = model.NR_INTIDS // 64
VIRQ_DTYPE = np.dtype([
    ("ap", "<u8", (_WORDS,)), ("irr", "<u8", (4,)), ("isr", "<u8", (4,)),
    ("timer_cval", "<u8"), ("handler_ns", "<u8"), ("sv_guest", "<u8"),
    ("priv_en", "<u4"), ("priv_act", "<u4"), ("priv_latch", "<u4"), ("priv_line", "<u4"),
    ("priv_level", "<u4"), ("timer_gen", "<u4"), ("timer_period", "<u4"), ("cur_irq", "<i4"),
    ("priv_prio", "u1", (model.NR_PRIVATE_IRQS,)), ("pmr", "u1"), ("masked", "u1"),
    ("timer_ctl", "u1"), ("sv_cont", "u1"), ("sv_valid", "u1"), ("tpr", "u1"),
    ("_pad", "u1", (2,)),
], align=True)
GIC_DTYPE = np.dtype([
    ("spi_en", "<u8", (_WORDS,)), ("spi_act", "<u8", (_WORDS,)), ("spi_latch", "<u8", (_WORDS,)),
    ("spi_line", "<u8", (_WORDS,)), ("spi_level", "<u8", (_WORDS,)),
    ("spi_target", "<i4", (model.NR_INTIDS,)), ("spi_mpidr", "<u4", (model.NR_INTIDS,)),
    ("spi_prio", "u1", (model.NR_INTIDS,)), ("enabled", "<u4"), ("_pad", "<u4"),
], align=True)


def test_interrupt_struct_sizes(compiled):
    # 1024 INTIDs in 16 words; 256 LAPIC vectors in 4 words; 32 private priorities.
    assert _WORDS == 16 and 32 + model.MAX_NR_SPIS <= model.NR_INTIDS
    assert compiled["sizes"]["virq_t"] == VIRQ_DTYPE.itemsize == 288
    assert compiled["sizes"]["gic_t"] == GIC_DTYPE.itemsize == 9864
    assert compiled["sizes"]["event_t"] == 24


def test_state_bytes_report_the_struct_sizes():
    e = _core.Engine("arm64", 1, 0)
    e.add_vm(3)
    e.add_vm(2, 988)
    b = e.state_bytes()
    assert b["virq_t"] == VIRQ_DTYPE.itemsize and b["irqs"] == 5 * VIRQ_DTYPE.itemsize
    assert b["gics"] == 2 * GIC_DTYPE.itemsize


@pytest.mark.parametrize("vid", [0, 1, 15, 16, 17, 255, 256, 4095, 4096, 4097, 70000])
def test_mpidr_round_trip(vid):
    """reset_mpidr: Aff0 = id & 0xf, Aff1 = (id >> 4) & 0xff, Aff2 = (id >> 12) & 0xff."""
    m = model.mpidr_of(vid)
    assert m == (vid & 0xF) | (((vid >> 4) & 0xFF) << 8) | (((vid >> 12) & 0xFF) << 16)
    assert model.vcpu_of_mpidr(m, vid + 1) == vid
    assert model.vcpu_of_mpidr(m, vid) == -1          # no such vCPU in a smaller VM
    # Bits outside Aff2.Aff1.Aff0 (IRM, Aff3, RES1) are ignored by IROUTER.
    assert model.vcpu_of_mpidr(m | (1 << 31) | (0xAB << 32), vid + 1) == vid


def test_mpidr_with_aff0_beyond_15_is_nobody():
    assert model.vcpu_of_mpidr(0x10, 1 << 20) == -1
    assert model.vcpu_of_mpidr(0xFF, 1 << 20) == -1
    assert model.vcpu_of_mpidr(0x0100, 17) == 16 and model.vcpu_of_mpidr(0x0100, 16) == -1


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


# -- the core's copies of the uapi numbers (include/uapi/linux/kvm.h, psci.h) ------------

def test_uapi_mp_states_exits_and_events(compiled):
    from kvmwake.uapi import ExitReason, MpState, SystemEventType
    for name, value in compiled["mp_states"].items():
        assert MpState[name] == value
    for name, value in compiled["exits"].items():
        assert ExitReason[name] == value
    for name, value in compiled["system_events"].items():
        assert SystemEventType[name] == value


def test_uapi_psci_function_ids_and_returns(compiled):
    from kvmwake.uapi import MPIDR_HWID_BITMASK, PsciFn, PsciRet
    assert len(compiled["psci"]) == 18
    for name, value in compiled["psci"].items():
        # C enums above INT_MAX come out negative: compare as the u32 the core uses.
        assert PsciFn[name] == value & 0xFFFF_FFFF
    for name, value in compiled["psci_ret"].items():
        assert PsciRet[name] == value
    assert compiled["mpidr_hwid_bitmask"] == MPIDR_HWID_BITMASK


def test_request_bits_the_core_uses(compiled):
    from kvmwake.model import Request
    assert compiled["requests"]["SLEEP"] == Request.SLEEP
    assert compiled["requests"]["SUSPEND"] == Request.SUSPEND


def test_host_thread_constants(compiled):
    """Host-thread ops, thread kinds and a host thread's stats row (core/hostthread.pxi)."""
    assert compiled["host_ops"] == _in_order(model.HostOp)
    assert min(model.HostOp) > max(Op)          # no code shared with a guest op
    assert compiled["thread_kinds"] == (model.THREAD_VCPU, model.THREAD_HOST)
    assert compiled["host_stats"] == tuple(range(len(model.HOST_STAT_NAMES)))
    assert compiled["host_stats"] == _model_constants("HS_")
    assert compiled["no_vm"] == model.NO_VM == model.HOST_STREAM_VM
