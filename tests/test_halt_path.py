"""kvm_vcpu_halt, kvm_vcpu_block and the kicks, hand-computed, on both engines.

Spec: /work/shared/spec/kvm-semantics.md sections 8.4-8.7 and 15 items 12-14.
Most tests set every cost to 0 so that durations are exactly the computes in
the guest programs.  The usual set-up is one VM with a "halter" vCPU 0 that
runs WFIs and a "waker" vCPU 1 on its own host CPU that computes D ns and
then wakes vCPU 0 (``G.wake``: the reschedule IPI, SGI 0 on arm64, which the
woken vCPU takes at its guest entry): with zero costs vCPU 0 resumes at once
and halts again at the same instant, so halt k lasts exactly D_k.
"""

from __future__ import annotations

import pytest

from kvmwake import _core, reference
from kvmwake import guest as G
from kvmwake.model import (
    COST_NAMES, S_ATTEMPTED_POLL, S_BLOCKING, S_HALT_EXITS, S_POLL_FAIL_HIST, S_POLL_FAIL_NS,
    S_POLL_INVALID, S_POLL_SUCCESS_HIST, S_POLL_SUCCESS_NS, S_SUCCESSFUL_POLL, S_WAIT_HIST,
    S_WAIT_NS, S_WAKEUP, TICK_IRQ, TR_HALT_POLL_NS, TR_WAKEUP, Request, ThreadState, lat_bucket,
)
from kvmwake.reference import PID_BASE

ZERO = dict.fromkeys(COST_NAMES, 0)
U32_MAX = 2**32 - 1

USER, RUNNING, POLLING, BLOCKED, RUNNABLE = (
    ThreadState.USER, ThreadState.RUNNING, ThreadState.POLLING, ThreadState.BLOCKED,
    ThreadState.RUNNABLE)


@pytest.fixture(params=[_core.Engine, reference.Engine], ids=["core", "reference"])
def engine_cls(request):
    return request.param


# ---------------------------------------------------------------- helpers

def make(engine_cls, *programs, host_cpus=None, costs=None, vms=None, **params):
    """An engine with zero costs (unless overridden) and one vCPU per program.

    ``vms``: vCPUs per VM (default: one VM with all of them).  Each vCPU gets
    its own host CPU unless ``host_cpus`` is given.  ``params`` are module
    parameters set before anything runs.  A program of None: no program, not
    started.
    """
    e = engine_cls("arm64", host_cpus or len(programs), 0, costs=dict(ZERO, **(costs or {})))
    for name, value in params.items():
        setattr(e, name, value)
    for nr in vms or [len(programs)]:
        e.add_vm(nr)
    for g, prog in enumerate(programs):
        if prog is not None:
            e.load_program(g, G.Program(prog).ops)
            e.start_vcpu(g)
    return e


def waker(*durations, target=0):
    """compute(D1), wake(target), compute(D2), wake(target), ..."""
    ops = []
    for d in durations:
        ops += [G.compute(d), G.wake(target)]
    return ops


def stat(e, g, index):
    return int(e.stats_array()[g, index])


def hist(e, g, base):
    """The non-zero buckets of one of vCPU g's halt histograms."""
    row = e.stats_array()[g]
    return {i: int(row[base + i]) for i in range(32) if row[base + i]}


def state(e, g):
    return e.thread_info(g)["state"]


def resched_pending(e, g):
    """The reschedule IPI (arm64 SGI 0, what raise_pending and G.wake send) is pending on g.

    Checked against the wake condition: with nothing else pending (these tests
    raise nothing else), vCPU g is runnable exactly when the SGI is pending.
    """
    pending = e.irq_state(g, 0)["pending"]
    assert e.thread_info(g)["runnable"] == pending
    return pending


def lines(e, g=0):
    """vCPU g's trace lines as (ts, kind, flag, a, b), after checking the fixed fields."""
    out = []
    for ts, pid, cpu, kind, flag, valid, vcpu_id, a, b in e.trace_list():
        assert valid == 1   # vcpu_valid_wakeup() is always true outside s390
        if pid == PID_BASE + g:
            assert cpu == e.thread_info(g)["pcpu"]
            out.append((ts, kind, flag, a, b))
    return out


def WAKEUP(ts, waited, halt_ns):
    return (ts, TR_WAKEUP, int(waited), halt_ns, 0)


def GROW(ts, new, old):
    return (ts, TR_HALT_POLL_NS, 1, new, old)


def SHRINK(ts, new, old):
    return (ts, TR_HALT_POLL_NS, 0, new, old)


# ---------------------------------------------------------------- adaptation

# (halt_ns, poll window at entry, outcome, trace line of the adaptation or None)
SEQUENCE = [
    (5_000, 0, "wait", ("grow", 10_000, 0)),          # grow from 0 to grow_start
    (15_000, 10_000, "wait", ("grow", 20_000, 10_000)),  # doubling
    (30_000, 20_000, "wait", ("grow", 40_000, 20_000)),
    (50_000, 40_000, "wait", ("grow", 80_000, 40_000)),
    (90_000, 80_000, "wait", ("grow", 160_000, 80_000)),  # grows past the ceiling ...
    (50_000, 100_000, "poll", None),                  # ... clamped at entry; poll succeeds
    (200_000, 100_000, "wait", ("shrink", 50_000, 100_000)),  # long halt: shrink
    (300_000, 50_000, "wait", ("shrink", 25_000, 50_000)),
    (300_000, 25_000, "wait", ("shrink", 12_500, 25_000)),
    (300_000, 12_500, "wait", ("shrink", 0, 12_500)),  # 6250 < grow_start: 0
    (300_000, 0, "wait", None),                       # poll 0 and halt > max: keep
    (100_000, 0, "wait", None),                       # halt == max: no grow
    (99_999, 0, "wait", ("grow", 10_000, 0)),         # halt < max: grow
    (10_000, 10_000, "poll", None),                   # halt == poll (wake at the poll's end)
]


def test_adaptation_sequence(engine_cls):
    """Every branch of the adaptation, with exact stats and trace lines."""
    durations = [d for d, *_ in SEQUENCE]
    e = make(engine_cls, [G.wfi()] * len(SEQUENCE), waker(*durations),
             halt_poll_ns=100_000, halt_poll_ns_grow=2, halt_poll_ns_grow_start=10_000,
             halt_poll_ns_shrink=2)
    ends = [sum(durations[:k + 1]) for k in range(len(durations))]
    assert ends[-1] == 1_849_999

    # While halts 2 and 6 are in progress: the state, blocking and the clamp.
    e.run(10_000)                      # halt 2 polls from 5000 to 15000
    assert state(e, 0) == POLLING and stat(e, 0, S_BLOCKING) == 0
    assert e.thread_info(0)["halt_poll_ns"] == 10_000
    e.run(17_000)                      # ... then blocks until 20000
    assert state(e, 0) == BLOCKED and stat(e, 0, S_BLOCKING) == 1
    e.run(ends[4] + 1)                 # halt 6 polls from 190000 on, clamped to the max
    assert e.trace_list()[-2][3:] == (TR_HALT_POLL_NS, 1, 1, 0, 160_000, 80_000)
    assert state(e, 0) == POLLING and e.thread_info(0)["halt_poll_ns"] == 100_000
    e.run(2_000_000)

    expected = []
    for (d, _, outcome, adapt), end in zip(SEQUENCE, ends):
        if adapt:
            kind, new, old = adapt
            expected.append((GROW if kind == "grow" else SHRINK)(end, new, old))
        expected.append(WAKEUP(end, outcome == "wait", d))
    assert lines(e, 0) == expected
    assert lines(e, 1) == []
    assert e.halts == 14
    assert state(e, 0) == USER and e.thread_info(0)["halt_poll_ns"] == 10_000

    polled = [(d, w) for d, w, _, _ in SEQUENCE if w]
    assert stat(e, 0, S_HALT_EXITS) == 14
    assert stat(e, 0, S_ATTEMPTED_POLL) == len(polled) == 10
    assert stat(e, 0, S_SUCCESSFUL_POLL) == 2
    assert stat(e, 0, S_POLL_INVALID) == 0
    assert stat(e, 0, S_WAKEUP) == 12          # the waited halts
    assert stat(e, 0, S_POLL_SUCCESS_NS) == 50_000 + 10_000
    assert stat(e, 0, S_POLL_FAIL_NS) == (10_000 + 20_000 + 40_000 + 80_000 + 100_000 +
                                         50_000 + 25_000 + 12_500)
    assert stat(e, 0, S_WAIT_NS) == (5_000 + 5_000 + 10_000 + 10_000 + 10_000 + 100_000 +
                                    250_000 + 275_000 + 287_500 + 300_000 + 100_000 + 99_999)
    assert stat(e, 0, S_BLOCKING) == 0
    assert hist(e, 0, S_POLL_SUCCESS_HIST) == {16: 1, 14: 1}       # 50000, 10000
    assert hist(e, 0, S_POLL_FAIL_HIST) == {14: 2, 15: 2, 16: 2, 17: 2}
    assert hist(e, 0, S_WAIT_HIST) == {13: 2, 14: 3, 17: 3, 18: 1, 19: 3}
    # Every halt that did not complete at its start recorded a wake latency of 0.
    assert e.lat_hist_array()[0] == 14 and e.lat_hist_array().sum() == 14
    # The waker never halted.
    assert e.stats_array()[1].sum() == 0


def test_grow_past_ceiling_then_clamp_on_entry(engine_cls):
    """Grow does not clamp; the next halt does (visible as its poll window and 'old')."""
    e = make(engine_cls, [G.wfi(), G.wfi(), G.compute(1_000), G.wfi()],
             waker(5_000, 12_000, 21_000), halt_poll_ns=15_000)
    e.run(17_500)                      # vCPU 0 computes from 17000 to 18000
    assert state(e, 0) == RUNNING and e.thread_info(0)["halt_poll_ns"] == 20_000
    e.run(20_000)                      # halt 3 polls from 18000, clamped
    assert state(e, 0) == POLLING and e.thread_info(0)["halt_poll_ns"] == 15_000
    e.run(40_000)
    assert lines(e) == [GROW(5_000, 10_000, 0), WAKEUP(5_000, True, 5_000),
                        GROW(17_000, 20_000, 10_000), WAKEUP(17_000, True, 12_000),
                        SHRINK(38_000, 0, 15_000), WAKEUP(38_000, True, 20_000)]
    assert stat(e, 0, S_POLL_FAIL_NS) == 10_000 + 15_000      # the second window: 15000
    assert stat(e, 0, S_WAIT_NS) == 5_000 + 2_000 + 5_000


@pytest.mark.parametrize("shrink, after_long_halt", [(0, 0), (2, 10_000), (4, 0), (1, 20_000)])
def test_shrink_factor(engine_cls, shrink, after_long_halt):
    """shrink = 0 goes straight to 0; otherwise divide, and 0 below grow_start."""
    e = make(engine_cls, [G.wfi()] * 4, waker(5_000, 15_000, 200_000, 5_000),
             halt_poll_ns=100_000, halt_poll_ns_shrink=shrink)
    e.run(1_000_000)
    t = [5_000, 20_000, 220_000, 225_000]
    third = [SHRINK(t[2], after_long_halt, 20_000)]
    fourth = ([GROW(t[3], 10_000, 0)] if after_long_halt == 0 else [])
    assert lines(e) == ([GROW(t[0], 10_000, 0), WAKEUP(t[0], True, 5_000),
                         GROW(t[1], 20_000, 10_000), WAKEUP(t[1], True, 15_000)] +
                        third + [WAKEUP(t[2], True, 200_000)] +
                        fourth + [WAKEUP(t[3], after_long_halt < 5_000, 5_000)])
    # After a shrink to 0 the last halt does not poll; otherwise it polls and succeeds.
    assert stat(e, 0, S_ATTEMPTED_POLL) == (2 if after_long_halt == 0 else 3)
    assert stat(e, 0, S_SUCCESSFUL_POLL) == (0 if after_long_halt == 0 else 1)


def test_grow_factor_zero(engine_cls):
    """grow = 0: the kvm_halt_poll_ns line is emitted with the value unchanged."""
    e = make(engine_cls, [G.wfi()] * 3, waker(5_000, 5_000, 15_000), halt_poll_ns=100_000,
             halt_poll_ns_grow=0)
    e.run(6_000)
    e.halt_poll_ns_grow = 2            # the first halt stayed at 0; now grow once ...
    e.run(10_001)
    e.halt_poll_ns_grow = 0            # ... and then not any more
    e.run(100_000)
    assert lines(e) == [GROW(5_000, 0, 0), WAKEUP(5_000, True, 5_000),
                        GROW(10_000, 10_000, 0), WAKEUP(10_000, True, 5_000),
                        GROW(25_000, 10_000, 10_000), WAKEUP(25_000, True, 15_000)]
    assert e.thread_info(0)["halt_poll_ns"] == 10_000
    assert stat(e, 0, S_ATTEMPTED_POLL) == 1 and stat(e, 0, S_POLL_FAIL_NS) == 10_000


def test_ceiling_zero_never_polls(engine_cls):
    """max = 0: no poll, no kvm_halt_poll_ns line, the value stays 0."""
    e = make(engine_cls, [G.wfi()] * 3, waker(5_000, 15_000, 1), halt_poll_ns=0)
    e.run(100_000)
    assert lines(e) == [WAKEUP(5_000, True, 5_000), WAKEUP(20_000, True, 15_000),
                        WAKEUP(20_001, True, 1)]
    assert e.thread_info(0)["halt_poll_ns"] == 0
    assert stat(e, 0, S_ATTEMPTED_POLL) == 0 and stat(e, 0, S_SUCCESSFUL_POLL) == 0
    assert stat(e, 0, S_POLL_FAIL_NS) == stat(e, 0, S_POLL_SUCCESS_NS) == 0
    assert hist(e, 0, S_POLL_FAIL_HIST) == hist(e, 0, S_POLL_SUCCESS_HIST) == {}
    assert stat(e, 0, S_WAIT_NS) == 20_001 and stat(e, 0, S_WAKEUP) == 3


def test_ceiling_set_to_zero_during_a_halt(engine_cls):
    """The max is read again at the end: 0 then forces the value to 0 without a trace line."""
    e = make(engine_cls, [G.wfi()] * 3, waker(5_000, 15_000, 15_000), halt_poll_ns=100_000)
    e.run(17_000)                      # halt 2 polled 10000 ns and blocks until 20000
    assert state(e, 0) == BLOCKED and e.thread_info(0)["halt_poll_ns"] == 10_000
    e.halt_poll_ns = 0
    e.run(100_000)
    assert lines(e) == [GROW(5_000, 10_000, 0), WAKEUP(5_000, True, 5_000),
                        WAKEUP(20_000, True, 15_000), WAKEUP(35_000, True, 15_000)]
    assert e.thread_info(0)["halt_poll_ns"] == 0
    assert stat(e, 0, S_ATTEMPTED_POLL) == 1 and stat(e, 0, S_POLL_FAIL_NS) == 10_000


@pytest.mark.parametrize("how", ["module", "cap"])
def test_ceiling_lowered_between_halts(engine_cls, how):
    """A lower max (module parameter or KVM_CAP_HALT_POLL) clamps the next poll window."""
    e = make(engine_cls, [G.wfi(), G.wfi(), G.wfi(), G.compute(10_000), G.wfi()],
             waker(5_000, 15_000, 30_000, 35_000), halt_poll_ns=100_000)
    e.run(55_000)                      # vCPU 0 computes from 50000 to 60000
    assert state(e, 0) == RUNNING and e.thread_info(0)["halt_poll_ns"] == 40_000
    if how == "module":
        e.halt_poll_ns = 25_000
    else:
        e.set_vm_halt_poll(0, 25_000)
    e.run(70_000)
    assert state(e, 0) == POLLING and e.thread_info(0)["halt_poll_ns"] == 25_000
    e.run(200_000)
    # The waker's wake lands at 85000, exactly when the 25000 ns window ends:
    # the poll sees it (success) and halt_ns == halt_poll_ns keeps the value.
    assert lines(e)[-1:] == [WAKEUP(85_000, False, 25_000)]
    assert lines(e)[-2] == WAKEUP(50_000, True, 30_000)
    assert stat(e, 0, S_POLL_SUCCESS_NS) == 25_000
    assert hist(e, 0, S_POLL_SUCCESS_HIST) == {15: 1}
    assert e.thread_info(0)["halt_poll_ns"] == 25_000


@pytest.mark.parametrize("how", ["module", "cap"])
def test_ceiling_lowered_during_a_halt(engine_cls, how):
    """The max is re-read at the end of the halt: a long halt then shrinks instead of growing."""
    e = make(engine_cls, [G.wfi()] * 4, waker(5_000, 15_000, 30_000, 50_000),
             halt_poll_ns=100_000)
    e.run(95_000)                      # halt 4 polled 40000 ns (50000-90000), now blocked
    assert state(e, 0) == BLOCKED and e.thread_info(0)["halt_poll_ns"] == 40_000
    if how == "module":
        e.halt_poll_ns = 20_000
    else:
        e.set_vm_halt_poll(0, 20_000)
    e.run(200_000)
    assert lines(e)[-2:] == [SHRINK(100_000, 20_000, 40_000), WAKEUP(100_000, True, 50_000)]


def test_cap_overrides_module_parameter_for_good(engine_cls):
    """Once KVM_CAP_HALT_POLL is set, the module halt_poll_ns no longer matters for that VM."""
    halter = [G.wfi()] * 5
    drive = waker(5_000, 12_000, 30_000, 30_000, 20_000)
    e = make(engine_cls, halter, drive, halter, drive, vms=[2, 2], halt_poll_ns=100_000)
    e.set_vm_halt_poll(0, 15_000)
    e.run(20_000)
    # Both grew to 20000 at 17000; VM 0's third halt (from 17000) clamped it to its cap.
    assert e.thread_info(0)["halt_poll_ns"] == 15_000
    assert e.thread_info(2)["halt_poll_ns"] == 20_000
    e.halt_poll_ns = 0
    e.run(80_000)
    e.halt_poll_ns = 1_000_000
    e.run(200_000)
    # VM 0: halt 3 polls its cap (15000) and shrinks to 0; halt 4 does not poll;
    # halt 5 (20000 ns, above the cap) keeps 0.
    assert lines(e, 0) == [GROW(5_000, 10_000, 0), WAKEUP(5_000, True, 5_000),
                           GROW(17_000, 20_000, 10_000), WAKEUP(17_000, True, 12_000),
                           SHRINK(47_000, 0, 15_000), WAKEUP(47_000, True, 30_000),
                           WAKEUP(77_000, True, 30_000), WAKEUP(97_000, True, 20_000)]
    assert stat(e, 0, S_POLL_FAIL_NS) == 10_000 + 15_000
    assert e.thread_info(0)["halt_poll_ns"] == 0
    # VM 1 follows the module parameter: halt 3 still polls the window it
    # started with (20000) but ends with max 0, so 0 without a trace line;
    # halt 4 does not poll; halt 5 ends with max 1000000 and grows.
    assert lines(e, 2) == [GROW(5_000, 10_000, 0), WAKEUP(5_000, True, 5_000),
                           GROW(17_000, 20_000, 10_000), WAKEUP(17_000, True, 12_000),
                           WAKEUP(47_000, True, 30_000), WAKEUP(77_000, True, 30_000),
                           GROW(97_000, 10_000, 0), WAKEUP(97_000, True, 20_000)]
    assert stat(e, 2, S_POLL_FAIL_NS) == 10_000 + 20_000
    assert e.thread_info(2)["halt_poll_ns"] == 10_000


@pytest.mark.parametrize("grow_start, new", [(10_000, 1_705_032_704),
                                             (3_000_000_000, 3_000_000_000)])
def test_grow_wraps_like_unsigned_int(engine_cls, grow_start, new):
    """3e9 * 2 wraps to 1705032704 (u32); below grow_start it is raised to grow_start."""
    e = make(engine_cls, [G.wfi(), G.wfi()], waker(1, 3_500_000_000),
             halt_poll_ns=U32_MAX, halt_poll_ns_grow=2, halt_poll_ns_grow_start=3_000_000_000)
    e.run(2)
    assert e.thread_info(0)["halt_poll_ns"] == 3_000_000_000 and state(e, 0) == POLLING
    e.halt_poll_ns_grow_start = grow_start
    e.run(4_000_000_000)
    assert lines(e) == [GROW(1, 3_000_000_000, 0), WAKEUP(1, True, 1),
                        GROW(3_500_000_001, new, 3_000_000_000),
                        WAKEUP(3_500_000_001, True, 3_500_000_000)]
    assert e.thread_info(0)["halt_poll_ns"] == new
    assert stat(e, 0, S_POLL_FAIL_NS) == 3_000_000_000
    assert stat(e, 0, S_WAIT_NS) == 1 + 500_000_000
    assert hist(e, 0, S_POLL_FAIL_HIST) == {31: 1}


def test_halt_with_wake_already_pending(engine_cls):
    """A wake pending at the halt: a successful poll of 0 ns, halt_ns 0, no latency sample."""
    e = make(engine_cls, [G.wfi(), G.wfi(), G.wfi()], costs={"vm_exit_ns": 100},
             halt_poll_ns=100_000)
    e.run(1_000)                       # the first WFI's trap ended at 100: blocked since
    e.raise_pending(0)                 # runs at once; its next WFI traps from 1000 to 1100
    e.run(1_050)
    assert state(e, 0) == RUNNING
    assert e.raise_pending(0) is False  # during the exit: no IPI, it stays pending ...
    assert resched_pending(e, 0)
    e.run(12_000)
    # ... and the halt at 1100 finds it at once.
    assert lines(e) == [GROW(1_000, 10_000, 0), WAKEUP(1_000, True, 900),
                        WAKEUP(1_100, False, 0)]
    assert stat(e, 0, S_HALT_EXITS) == 3 and e.halts == 2
    assert stat(e, 0, S_ATTEMPTED_POLL) == stat(e, 0, S_SUCCESSFUL_POLL) == 1
    assert stat(e, 0, S_POLL_SUCCESS_NS) == 0 and hist(e, 0, S_POLL_SUCCESS_HIST) == {0: 1}
    assert stat(e, 0, S_WAKEUP) == 1
    assert e.lat_hist_array().sum() == 1
    # The wake was taken by the guest on entry: the third WFI (trap until 1200)
    # polls until 11200 and then blocks.
    assert state(e, 0) == BLOCKED and not resched_pending(e, 0)


def test_entry_takes_pending_wake_even_at_zero_cost(engine_cls):
    """Regression: with vm_entry_ns = 0 the guest still takes the wake on entry.

    (It used to stay pending for good, so every later WFI returned at once.)
    """
    e = make(engine_cls, [G.loop([G.compute(1_000), G.wfi()], 5)],
             [G.compute(1_500), G.wake(0), G.compute(10_000), G.wake(0)], halt_poll_ns=0)
    e.run(20_000)
    assert lines(e) == [WAKEUP(1_500, True, 500), WAKEUP(11_500, True, 9_000)]
    assert state(e, 0) == BLOCKED and not resched_pending(e, 0)
    assert stat(e, 0, S_HALT_EXITS) == 3


def test_reentry_after_preemption_takes_pending_wake_at_zero_cost(engine_cls):
    """Regression: a vCPU preempted in guest mode re-enters (for 0 ns) and takes the wake."""
    e = make(engine_cls, [G.compute(30_000), G.wfi()], [G.compute(100_000)], host_cpus=1,
             costs={"sched_slice_ns": 10_000}, halt_poll_ns=0)
    e.run(15_000)                      # vCPU 0 was preempted at 10000 with 20000 ns to go
    assert state(e, 0) == RUNNABLE
    e.raise_pending(0)
    assert resched_pending(e, 0)
    e.run(20_000)
    assert state(e, 0) == RUNNABLE and resched_pending(e, 0)
    e.run(20_001)                      # resumed at 20000 and took it on entry
    assert state(e, 0) == RUNNING and not resched_pending(e, 0)
    e.run(25_000)
    assert state(e, 0) == RUNNING and not resched_pending(e, 0)
    e.run(50_001)                      # its WFI at 50000 blocks
    assert state(e, 0) == BLOCKED and e.trace_list() == []


# ---------------------------------------------------------------- histograms

# value -> min(fls64(value), 31)
BUCKETS = {0: 0, 1: 1, 2: 2, 3: 2, 4: 3, 7: 3, 8: 4, 1023: 10, 1024: 11, 2**20: 21,
           2**29 - 1: 29, 2**29: 30, 2**30 - 1: 30, 2**30: 31, 2**31: 31, U32_MAX: 31,
           2**40: 31}


@pytest.mark.parametrize("ns", sorted(BUCKETS))
def test_wait_hist_bucket(engine_cls, ns):
    """vCPU 0 blocks (no polling) for exactly ns: halt_wait_hist[min(fls64(ns), 31)]."""
    e = make(engine_cls, [G.wfi()], waker(ns), halt_poll_ns=0)
    e.run(ns + 1)
    assert lines(e) == [WAKEUP(ns, True, ns)]
    assert stat(e, 0, S_WAIT_NS) == ns
    assert hist(e, 0, S_WAIT_HIST) == {BUCKETS[ns]: 1}


@pytest.mark.parametrize("ns", [n for n in sorted(BUCKETS) if 0 < n <= U32_MAX])
def test_poll_success_hist_bucket(engine_cls, ns):
    """vCPU 0 polls (window 2**32-1) and is woken after exactly ns.

    (A 0 ns successful poll, bucket 0: test_halt_with_wake_already_pending.)
    """
    e = make(engine_cls, [G.wfi(), G.wfi()], waker(1, ns), halt_poll_ns=U32_MAX,
             halt_poll_ns_grow_start=U32_MAX)
    e.run(ns + 2)
    assert lines(e)[-1] == WAKEUP(1 + ns, False, ns)
    assert stat(e, 0, S_SUCCESSFUL_POLL) == 1 and stat(e, 0, S_POLL_SUCCESS_NS) == ns
    assert hist(e, 0, S_POLL_SUCCESS_HIST) == {BUCKETS[ns]: 1}
    assert hist(e, 0, S_POLL_FAIL_HIST) == {}


@pytest.mark.parametrize("ns", [n for n in sorted(BUCKETS) if 0 < n <= U32_MAX])
def test_poll_fail_hist_bucket(engine_cls, ns):
    """vCPU 0 polls a window of exactly ns (grow_start), then blocks for 5 ns more."""
    e = make(engine_cls, [G.wfi(), G.wfi()], waker(1, ns + 5), halt_poll_ns=U32_MAX,
             halt_poll_ns_grow_start=ns)
    e.run(ns + 7)
    assert lines(e)[-1] == WAKEUP(1 + ns + 5, True, ns + 5)
    assert stat(e, 0, S_ATTEMPTED_POLL) == 1 and stat(e, 0, S_SUCCESSFUL_POLL) == 0
    assert stat(e, 0, S_POLL_FAIL_NS) == ns
    assert hist(e, 0, S_POLL_FAIL_HIST) == {BUCKETS[ns]: 1}
    assert stat(e, 0, S_WAIT_NS) == 1 + 5


# ---------------------------------------------------------------- kicks

def test_wake_of_blocked_vcpu(engine_cls):
    """The reschedule IPI to a blocked vCPU: woken, runs after wake_to_run_ns, waited."""
    e = make(engine_cls, [G.wfi()], costs={"wake_to_run_ns": 7_000}, halt_poll_ns=0)
    # Entering KVM_RUN is a system call, not a wake-up: it runs at once and halts at 0.
    e.run(1)
    assert state(e, 0) == BLOCKED
    e.run(50_000)
    assert state(e, 0) == BLOCKED and stat(e, 0, S_BLOCKING) == 1
    assert e.raise_pending(0) is False                 # no IPI
    assert state(e, 0) == RUNNABLE and stat(e, 0, S_WAKEUP) == 1
    assert e.raise_pending(0) is False                 # already woken: no second count
    assert e.kick(0) is False
    assert stat(e, 0, S_WAKEUP) == 1
    e.run(57_000)                                      # runs at 57000, not before
    assert state(e, 0) == RUNNABLE and stat(e, 0, S_BLOCKING) == 1 and lines(e) == []
    e.run(57_001)
    # It halted at 0; the wake-up at 50000 ran it at 57000 (wake_to_run_ns).
    assert lines(e) == [WAKEUP(57_000, True, 57_000)]
    assert stat(e, 0, S_WAIT_NS) == 57_000 and stat(e, 0, S_BLOCKING) == 0
    lat = e.lat_hist_array()
    assert lat[lat_bucket(7_000)] == 1 and lat.sum() == 1


def test_plain_kick_of_blocked_vcpu(engine_cls):
    """kvm_vcpu_kick without a wake condition: woken (halt_wakeup +1) but blocks again."""
    e = make(engine_cls, [G.wfi()], costs={"wake_to_run_ns": 7_000}, halt_poll_ns=0)
    e.run(50_000)
    assert e.kick(0) is False
    assert state(e, 0) == RUNNABLE and stat(e, 0, S_WAKEUP) == 1
    e.run(60_000)
    assert state(e, 0) == BLOCKED and stat(e, 0, S_BLOCKING) == 1
    assert lines(e) == [] and e.halts == 0
    e.raise_pending(0)
    e.run(70_000)
    assert lines(e) == [WAKEUP(67_000, True, 67_000)]     # halted at 0
    assert stat(e, 0, S_WAKEUP) == 2


def test_wake_of_polling_vcpu(engine_cls):
    """A polling vCPU sees the wake in its poll loop: success, no halt_wakeup."""
    e = make(engine_cls, [G.wfi(), G.wfi(), G.compute(100_000)], halt_poll_ns=100_000)
    e.run(1_000)
    e.raise_pending(0)                 # ends the first (non-polling) halt
    e.run(5_000)
    assert state(e, 0) == POLLING and e.thread_info(0)["halt_poll_ns"] == 10_000
    assert e.kick(0) is False          # nothing to see: it keeps polling
    assert state(e, 0) == POLLING
    assert e.raise_pending(0) is False
    assert state(e, 0) == RUNNING      # at once, in the poll loop
    assert lines(e) == [GROW(1_000, 10_000, 0), WAKEUP(1_000, True, 1_000),
                        WAKEUP(5_000, False, 4_000)]
    assert stat(e, 0, S_WAKEUP) == 1
    assert stat(e, 0, S_SUCCESSFUL_POLL) == 1 and stat(e, 0, S_POLL_SUCCESS_NS) == 4_000
    assert stat(e, 0, S_WAIT_NS) == 1_000


@pytest.mark.parametrize("action", ["raise_pending", "kick", "tlb_flush"])
def test_kick_in_guest_mode_sends_ipi(engine_cls, action):
    """A vCPU in guest mode is IPI'd: its compute is extended by vm_exit_ns + vm_entry_ns."""
    costs = {"vm_exit_ns": 300, "vm_entry_ns": 200}
    e = make(engine_cls, [G.compute(100_000), G.wfi()], costs=costs, halt_poll_ns=0)
    e.run(50_000)                      # guest mode from 200 to 100200, exit until 100500
    if action == "raise_pending":
        assert e.raise_pending(0) is True
    elif action == "kick":
        assert e.kick(0) is True
    else:
        assert e.make_request(0, Request.TLB_FLUSH) is True
    # The IPI stops guest mode at 50000; the vCPU takes its interrupts (and
    # handles its requests) after the exit and the entry, at 50500.
    info = e.thread_info(0)
    assert info["state"] == RUNNING
    assert resched_pending(e, 0) == (action == "raise_pending")
    assert info["requests"] == {"raise_pending": 1 << (Request.IRQ_PENDING & 0xFF),
                                "kick": 0, "tlb_flush": 1 << (Request.TLB_FLUSH & 0xFF)}[action]
    e.run(50_500)
    assert e.thread_info(0)["requests"] == info["requests"]
    assert resched_pending(e, 0) == (action == "raise_pending")
    e.run(50_501)
    assert e.thread_info(0)["requests"] == 0 and not resched_pending(e, 0)
    assert state(e, 0) == RUNNING
    e.run(100_999)
    assert state(e, 0) == RUNNING      # the trap now ends at 101000
    e.run(101_001)
    assert state(e, 0) == BLOCKED and stat(e, 0, S_HALT_EXITS) == 1
    e.run(150_000)
    e.raise_pending(0)
    e.run(150_001)
    # The halt began at 101000 (it would have begun at 100500 without the IPI);
    # the wake-up runs the entry (200 ns) before the guest.
    assert lines(e) == [WAKEUP(150_000, True, 49_000)]
    assert stat(e, 0, S_WAKEUP) == 1
    assert e.lat_hist_array()[lat_bucket(200)] == 1


def test_kick_during_entry_is_taken_at_entry(engine_cls):
    """A kick before the vCPU reaches guest mode sends no IPI and costs nothing."""
    costs = {"vm_exit_ns": 300, "vm_entry_ns": 200}
    e = make(engine_cls, [G.compute(100_000), G.wfi()], costs=costs, halt_poll_ns=0)
    e.run(100)
    assert e.raise_pending(0) is False
    # Pending until the entry ends at 200; the guest takes it then (ack + EOI).
    assert resched_pending(e, 0) and e.thread_info(0)["requests"] == 1 << Request.IRQ_PENDING
    e.run(200)
    assert resched_pending(e, 0)
    e.run(201)
    assert not resched_pending(e, 0) and e.thread_info(0)["requests"] == 0
    assert state(e, 0) == RUNNING
    e.run(100_500)
    assert state(e, 0) == RUNNING
    e.run(100_501)
    assert state(e, 0) == BLOCKED      # the halt began at 100500
    e.raise_pending(0)
    e.run(150_001)
    assert lines(e) == [WAKEUP(100_501, True, 1)]


def test_kick_of_runnable_vcpu_only_sets_pending(engine_cls):
    """A vCPU waiting for its host CPU: the reschedule IPI is only made pending (no kick)."""
    e = make(engine_cls, [G.compute(100_000)], [G.compute(1_000), G.wfi()], host_cpus=1)
    e.run(50_000)
    assert state(e, 0) == RUNNING and state(e, 1) == RUNNABLE
    assert e.raise_pending(1) is False
    assert e.kick(1) is False
    info = e.thread_info(1)
    assert info["state"] == RUNNABLE and resched_pending(e, 1)
    assert info["requests"] == 1 << Request.IRQ_PENDING
    assert e.stats_array().sum() == 0
    e.run(100_000)
    assert state(e, 1) == RUNNABLE and resched_pending(e, 1)
    e.run(100_500)                     # vCPU 1 entered the guest at 100000: taken on entry
    assert state(e, 1) == RUNNING and not resched_pending(e, 1)
    assert e.thread_info(1)["requests"] == 0
    e.run(200_000)
    # So its WFI at 101000 blocks.
    assert state(e, 1) == BLOCKED and e.trace_list() == []
    assert stat(e, 1, S_HALT_EXITS) == 1 and stat(e, 1, S_WAKEUP) == 0


@pytest.mark.parametrize("req", [Request.TLB_FLUSH, Request.VM_DEAD, Request.SLEEP],
                         ids=["TLB_FLUSH", "VM_DEAD", "SLEEP"])
def test_no_wakeup_request_leaves_blocked_vcpu(engine_cls, req):
    """A NO_WAKEUP request sets its bit and nothing else; KVM_REQ_UNBLOCK ends the halt."""
    e = make(engine_cls, [G.wfi(), G.compute(1_000), G.wfi()],
             costs={"wake_to_run_ns": 7_000}, halt_poll_ns=0)
    e.run(10_000)
    bit = 1 << (req & 0xFF)
    assert e.make_request(0, req) is False
    info = e.thread_info(0)
    assert info["state"] == BLOCKED and info["requests"] == bit
    assert stat(e, 0, S_WAKEUP) == 0 and stat(e, 0, S_BLOCKING) == 1
    e.run(12_000)
    assert state(e, 0) == BLOCKED and e.trace_list() == []

    assert e.make_request(0, Request.UNBLOCK) is False
    info = e.thread_info(0)
    assert info["state"] == RUNNABLE and info["requests"] == bit | (1 << 2)
    assert stat(e, 0, S_WAKEUP) == 1
    e.run(19_001)                      # runs at 19000: the UNBLOCK request ends the halt
    assert lines(e) == [WAKEUP(19_000, True, 19_000)]     # halted at 0
    assert e.thread_info(0)["requests"] == 0
    e.run(30_000)                      # the request was consumed: the next WFI blocks
    assert state(e, 0) == BLOCKED and len(lines(e)) == 1


# ---------------------------------------------------------------- host CPU sharing

def test_poll_aborted_when_another_thread_is_woken_on_the_host_cpu(engine_cls):
    """single_task_running() turns false: the poll ends at once and the halt waits."""
    e = make(engine_cls, [G.wfi(), G.wfi()], [G.wfi()], host_cpus=1, halt_poll_ns=500_000)
    e.run(1_000)
    assert state(e, 0) == BLOCKED and state(e, 1) == BLOCKED
    e.raise_pending(0)
    e.run(4_000)
    assert state(e, 0) == POLLING      # second halt: polls 10000 ns from 1000
    e.raise_pending(1)                 # vCPU 1 is woken onto vCPU 0's host CPU
    assert state(e, 0) == BLOCKED and stat(e, 0, S_BLOCKING) == 1
    assert state(e, 1) == RUNNABLE
    e.run(20_000)
    assert state(e, 1) == USER         # it ran its halt's end and its END
    e.raise_pending(0)
    e.run(20_001)
    assert lines(e, 0) == [GROW(1_000, 10_000, 0), WAKEUP(1_000, True, 1_000),
                           GROW(20_000, 20_000, 10_000), WAKEUP(20_000, True, 19_000)]
    assert lines(e, 1) == [GROW(4_000, 10_000, 0), WAKEUP(4_000, True, 4_000)]
    assert stat(e, 0, S_ATTEMPTED_POLL) == 1 and stat(e, 0, S_SUCCESSFUL_POLL) == 0
    assert stat(e, 0, S_POLL_FAIL_NS) == 3_000           # 1000 -> 4000
    assert hist(e, 0, S_POLL_FAIL_HIST) == {12: 1}
    assert stat(e, 0, S_WAIT_NS) == 1_000 + 16_000
    assert hist(e, 0, S_WAIT_HIST) == {10: 1, 14: 1}
    assert stat(e, 0, S_WAKEUP) == 2


def test_halt_with_busy_run_queue_polls_zero_ns(engine_cls):
    """A halt that starts with a queued thread on its host CPU attempts a 0 ns poll and blocks."""
    e = make(engine_cls, [G.wfi(), G.compute(5_000), G.wfi()], [G.wfi()], host_cpus=1,
             halt_poll_ns=500_000)
    e.run(1_000)
    e.raise_pending(0)                 # vCPU 0 runs from 1000, computes until 6000
    e.run(2_000)
    e.raise_pending(1)                 # queued behind vCPU 0
    assert state(e, 0) == RUNNING and state(e, 1) == RUNNABLE
    e.run(6_001)
    assert state(e, 0) == BLOCKED and state(e, 1) == USER
    e.run(9_000)
    e.raise_pending(0)
    e.run(9_001)
    assert lines(e, 0) == [GROW(1_000, 10_000, 0), WAKEUP(1_000, True, 1_000),
                           WAKEUP(9_000, True, 3_000)]
    assert stat(e, 0, S_ATTEMPTED_POLL) == 1 and stat(e, 0, S_SUCCESSFUL_POLL) == 0
    assert stat(e, 0, S_POLL_FAIL_NS) == 0 and hist(e, 0, S_POLL_FAIL_HIST) == {0: 1}
    assert hist(e, 0, S_WAIT_HIST) == {10: 1, 12: 1}
    # vCPU 1 was woken at 2000 but got its CPU at 6000: a 4000 ns wake latency.
    assert lines(e, 1) == [GROW(6_000, 10_000, 0), WAKEUP(6_000, True, 6_000)]
    assert e.lat_hist_array()[lat_bucket(4_000)] == 1


def test_time_slices_share_a_host_cpu(engine_cls):
    """Two computing vCPUs on one host CPU take turns of sched_slice_ns."""
    prog = [G.compute(100_000)]
    e = make(engine_cls, prog, prog, host_cpus=1, costs={"sched_slice_ns": 10_000})
    e.run(5_000)
    assert (state(e, 0), state(e, 1)) == (RUNNING, RUNNABLE)
    e.run(15_000)
    assert (state(e, 0), state(e, 1)) == (RUNNABLE, RUNNING)
    e.run(25_000)
    assert (state(e, 0), state(e, 1)) == (RUNNING, RUNNABLE)
    e.run(190_000)
    assert state(e, 0) == RUNNING     # its tenth slice ends its 100000 ns at 190000
    e.run(190_001)
    assert (state(e, 0), state(e, 1)) == (USER, RUNNING)
    e.run(200_000)
    assert state(e, 1) == RUNNING
    e.run(200_001)
    assert state(e, 1) == USER


def test_no_slice_runs_to_completion(engine_cls):
    """sched_slice_ns = 0: no preemption, the second vCPU waits for the first to end."""
    prog = [G.compute(100_000)]
    e = make(engine_cls, prog, prog, host_cpus=1)
    e.run(100_000)
    assert (state(e, 0), state(e, 1)) == (RUNNING, RUNNABLE)
    e.run(100_001)
    assert (state(e, 0), state(e, 1)) == (USER, RUNNING)
    e.run(200_001)
    assert state(e, 1) == USER


def test_preempted_in_guest_pays_exit_and_entry(engine_cls):
    """Preemption in guest mode costs the preempted vCPU an exit and an entry when it resumes."""
    costs = {"sched_slice_ns": 10_000, "vm_exit_ns": 100, "vm_entry_ns": 200}
    e = make(engine_cls, [G.compute(15_000)], [G.compute(50_000)], host_cpus=1, costs=costs)
    # vCPU 0: entry 0-200, guest from 200; preempted at 10000 with 5200 ns of
    # guest left, + 300.  vCPU 1 runs 10000-20000 (preempted), vCPU 0 resumes at
    # 20000 and ends at 20000 + 5200 + 300 + 100 (its END exit) = 25600.
    e.run(25_600)
    assert state(e, 0) == RUNNING
    e.run(25_601)
    assert state(e, 0) == USER and state(e, 1) == RUNNING


# ---------------------------------------------------------------- ticks

def test_tick_wakes_halted_vcpus_at_multiples_of_the_period(engine_cls):
    e = make(engine_cls, [G.loop([G.wfi()])], [G.compute(1_000_000)], [G.wfi()],
             vms=[2, 1], halt_poll_ns=0)
    e.run(30_000)
    e.set_tick(0, 100_000)             # first at 100000, not at 130000
    e.run(350_000)
    e.set_tick(0, 0)                   # stopped
    e.run(1_000_000)
    assert lines(e, 0) == [WAKEUP(100_000, True, 100_000), WAKEUP(200_000, True, 100_000),
                           WAKEUP(300_000, True, 100_000)]
    assert state(e, 0) == BLOCKED and stat(e, 0, S_WAKEUP) == 3
    # A running vCPU of the ticking VM is not touched; the other VM's vCPU is not woken.
    assert state(e, 1) == RUNNING and not resched_pending(e, 1)
    assert not e.irq_state(1, TICK_IRQ["arm64"])["pending"]
    # vCPU 0 took each tick (PPI 30, edge) at its guest entry: acknowledged and ended.
    tick0 = e.irq_state(0, TICK_IRQ["arm64"])
    assert not tick0["pending"] and not tick0["active"] and not tick0["level"]
    assert e.stats_array()[1].sum() == 0
    assert state(e, 2) == BLOCKED and stat(e, 2, S_WAKEUP) == 0
    e.set_tick(0, 250_000)             # restarted: the next multiple after now
    e.run(1_600_000)
    assert [ts for ts, *_ in lines(e, 0)][3:] == [1_250_000, 1_500_000]


def test_tick_seen_by_a_polling_vcpu_at_the_end_of_its_window(engine_cls):
    e = make(engine_cls, [G.loop([G.wfi()])], halt_poll_ns=100_000)
    e.set_tick(0, 20_000)
    e.run(80_001)
    assert lines(e) == [GROW(20_000, 10_000, 0), WAKEUP(20_000, True, 20_000),
                        GROW(40_000, 20_000, 10_000), WAKEUP(40_000, True, 20_000),
                        WAKEUP(60_000, False, 20_000), WAKEUP(80_000, False, 20_000)]
    assert stat(e, 0, S_WAKEUP) == 2 and stat(e, 0, S_SUCCESSFUL_POLL) == 2
    assert stat(e, 0, S_POLL_SUCCESS_NS) == 40_000 and stat(e, 0, S_POLL_FAIL_NS) == 10_000
