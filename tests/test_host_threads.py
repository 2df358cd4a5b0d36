"""Host threads that are not vCPUs (kvmwake.hostprog, Host.add_thread / add_load):
hand-computed cases in both engines and both schedulers, determinism, and
argument checking (a clear error, the host unchanged)."""

from __future__ import annotations

import numpy as np
import pytest

from kvmwake import Host, guest as g, hostprog as hp
from kvmwake.guest import ProgramError
from kvmwake.model import S_ATTEMPTED_POLL, S_POLL_FAIL_NS, S_SUCCESSFUL_POLL, S_WAIT_NS, \
    ThreadState

ENGINES = ("core", "reference")
SCHEDS = ("fifo", "eevdf")
ZERO = {"vm_exit_ns": 0, "vm_entry_ns": 0, "ipi_send_ns": 0, "wake_to_run_ns": 0,
        "context_switch_ns": 0}
US, MS = 1_000, 1_000_000


def running_ns(host, g_, now):
    """ns thread g_ spent RUNNING, from the state timeline (recorded from t=0)."""
    tl = host.timeline_array()
    t0, base = host._engine.timeline_window()
    assert t0 == 0 and host.timeline_dropped == 0
    state, last, total = int(base[g_]), 0, 0
    for r in tl[tl["g"] == g_]:
        if state == ThreadState.RUNNING:
            total += int(r["t"]) - last
        state, last = int(r["state"]), int(r["t"])
    if state == ThreadState.RUNNING:
        total += now - last
    return total


@pytest.mark.parametrize("engine", ENGINES)
def test_load_at_half_duty_halves_a_vcpus_cpu_share(engine):
    """FIFO, 1 ms slice, no switch costs; a vCPU that never halts shares CPU 0 with a
    load of duty 0.5 and period 2 ms.  The load starts first (added before the run):
    it computes 1 ms and sleeps 1 ms; the vCPU runs while it sleeps; the load's
    timer fires as the vCPU's slice runs out (run_start + 1 ms), so the two
    alternate exactly, 1 ms each: the vCPU gets half the CPU it had alone."""
    costs = dict(ZERO, sched_slice_ns=1 * MS)
    alone = Host(host_cpus=1, engine=engine, costs=costs, timeline_capacity=1 << 16)
    vm = alone.create_vm(1)
    vm.vcpus[0].load(g.Program([g.loop([g.compute(100 * US)])]))
    alone.run(10 * MS)
    assert running_ns(alone, 0, 10 * MS) == 10 * MS

    host = Host(host_cpus=1, engine=engine, costs=costs, timeline_capacity=1 << 16)
    vm = host.create_vm(1)
    vm.vcpus[0].load(g.Program([g.loop([g.compute(100 * US)])]))
    load = host.add_load(0.5, 2 * MS, name="load")
    assert (load.g, load.name, load.affinity, load.cpu) == (1, "load", (0,), 0)
    host.run(10 * MS)
    assert running_ns(host, 0, 10 * MS) == 5 * MS
    assert running_ns(host, 1, 10 * MS) == 5 * MS
    st = load.stats()
    assert st == {"run_ns": 5 * MS, "wait_ns": 0, "sleep_ns": 4 * MS, "nr_runs": 5,
                  "nr_preempted": 0, "nr_sleeps": 5, "nr_injects": 0}
    assert load.state == "BLOCKED"
    # The host's stats rows are the vCPUs' only.
    assert host.stats_array().shape[0] == 1


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sched", SCHEDS)
def test_injector_msi_wakes_a_polling_vcpu_on_another_cpu(engine, sched):
    """x86, 2 CPUs, no costs: the vCPU (CPU 0) halts in a loop; an injector on CPU 1
    sleeps 100 us and sends an MSI, forever.  halt_poll_ns grows 0 -> 10, 20, 40, 80
    (each poll fails: the gap is 100 us) -> 160 us, from which every halt is a
    successful poll: of the 10 halts ended by t = 1 ms, 9 polled and 5 succeeded;
    every halt ends at an MSI, at k x 100 us."""
    host = Host(host_cpus=2, arch="x86", engine=engine, scheduler=sched, costs=ZERO)
    vm = host.create_vm(1)
    vm.vcpus[0].load(g.Program([g.loop([g.hlt()])]))
    inj = host.add_thread([hp.loop([hp.sleep("100us"), hp.msi(vm, 0, 0x30)])],
                          name="injector")
    assert inj.cpu == 1
    host.run(1 * MS + 1)
    st = host.stats_array()[0]
    assert st[S_ATTEMPTED_POLL] == 9 and st[S_SUCCESSFUL_POLL] == 5
    wakes = [e for e in vm.trace_events() if e.event == "kvm_vcpu_wakeup"]
    assert [e.ts_ns for e in wakes] == [k * 100 * US for k in range(1, 11)]
    s = inj.stats()
    assert s["nr_injects"] == 10 and s["nr_sleeps"] == 11 and s["run_ns"] == 0
    assert s["sleep_ns"] == 10 * 100 * US and s["wait_ns"] == 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sched", SCHEDS)
def test_host_thread_woken_on_a_polling_cpu_stops_the_poll(engine, sched):
    """x86, 1 CPU, no costs.  MSIs at 1, 2, 3 ms; halt_poll_ns 2 ms, grow_start
    1.5 ms.  Halt 1 (from 0) does not poll and waits 1 ms; halt 2 polls 1.5 ms
    and its MSI at 2 ms ends it (success); halt 3 polls from 2 ms until the host
    thread's hrtimer wakes it on this CPU at 2.5 ms: single_task_running() is
    false, the poll stops (0.5 ms, failed), the vCPU blocks, the thread runs
    0.1 ms and exits, and the MSI at 3 ms wakes the vCPU (0.5 ms of waiting)."""
    host = Host(host_cpus=1, arch="x86", engine=engine, scheduler=sched, costs=ZERO)
    host.halt_poll_ns = 2 * MS
    host.halt_poll_ns_grow_start = 1_500_000
    vm = host.create_vm(1)
    vm.vcpus[0].load(g.Program([g.loop([g.hlt()])]))
    vm.add_msi_source(0, 0x30, period_ns=1 * MS, phase_ns=1 * MS)
    th = host.add_thread([hp.sleep("2.5ms"), hp.compute("100us")])
    host.run(3 * MS + 1)
    st = host.stats_array()[0]
    assert st[S_ATTEMPTED_POLL] == 2 and st[S_SUCCESSFUL_POLL] == 1
    assert st[S_POLL_FAIL_NS] == 500 * US
    assert st[S_WAIT_NS] == 1 * MS + 500 * US
    assert th.state == "USER"
    assert th.stats() == {"run_ns": 100 * US, "wait_ns": 0, "sleep_ns": 2_500 * US,
                          "nr_runs": 2, "nr_preempted": 0, "nr_sleeps": 1, "nr_injects": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_injector_preempts_a_running_vcpu_under_eevdf(engine):
    """1 CPU, a vCPU that never halts.  A thread that slept 1 ms wakes with lag 0 at
    V = 1 ms: the vCPU's request is used up (deadline 0.7 ms) and it is past its
    protected slice, so check_preempt_wakeup_fair preempts it: the thread gets
    the CPU after one context switch.  Under FIFO with a 10 ms slice it waits
    for the slice's end."""
    waits = {}
    for sched in SCHEDS:
        host = Host(host_cpus=1, engine=engine, scheduler=sched,
                    costs={"sched_slice_ns": 10 * MS})
        vm = host.create_vm(1)
        vm.vcpus[0].load(g.Program([g.loop([g.compute(100 * US)])]))
        th = host.add_thread([hp.sleep("1ms"), hp.compute("50us")])
        host.run(20 * MS)
        st = th.stats()
        assert st["run_ns"] == 50 * US and st["nr_runs"] == 2 and th.state == "USER"
        waits[sched] = st["wait_ns"]
    cs = Host().costs["context_switch_ns"]
    assert waits["eevdf"] == cs
    # FIFO: the vCPU took the CPU at 0 + one switch (after the thread slept); its
    # slice ends 10 ms later, and the thread runs one switch after that.
    assert waits["fifo"] == cs + 10 * MS + cs - 1 * MS


@pytest.mark.parametrize("engine", ENGINES)
def test_injector_pays_ipi_send_for_a_vcpu_in_guest_mode(engine):
    """An MSI to a vCPU in guest mode on another CPU IPIs it: the sender pays
    ipi_send_ns on its CPU."""
    host = Host(host_cpus=2, arch="x86", engine=engine, costs=dict(ZERO, ipi_send_ns=700))
    vm = host.create_vm(1)
    vm.vcpus[0].load(g.Program([g.loop([g.compute(100 * US)])]))
    inj = host.add_thread([hp.loop([hp.sleep("100us"), hp.msi(vm, vm.vcpus[0], 0x30)],
                                   count=3)])
    host.run(1 * MS)
    assert inj.stats()["nr_injects"] == 3 and inj.stats()["run_ns"] == 3 * 700


@pytest.mark.parametrize("sched", SCHEDS)
def test_arm64_irqfd_thread_and_engines_agree(sched):
    """arm64: an irqfd thread pulsing an edge SPI routed to vCPU 1, with load and
    drawn durations: both engines give the same stats, trace and timeline."""
    out = []
    for engine in ENGINES:
        host = Host(host_cpus=2, engine=engine, scheduler=sched, seed=7,
                    timeline_capacity=1 << 16)
        vm = host.create_vm(3)
        for v in vm.vcpus:
            v.load(g.Program([g.loop([g.compute_exp(30 * US), g.wfi()])]))
        vm.configure_irq(40, enabled=True, level=False)
        vm.route_spi(40, vcpu=1)
        inj = host.add_thread([hp.loop([hp.sleep("exp 80us"), hp.irq(vm, 40),
                                        hp.compute(("uniform", "1us", "5us"))])],
                              affinity=[1], name="irqfd")
        load = host.add_load(0.3, "1ms", affinity=0)
        host.run(20 * MS)
        assert inj.stats()["nr_injects"] > 50
        out.append((host.stats_array().tolist(), inj.stats(), load.stats(),
                    host._engine.trace_list(), host.timeline_array().tolist(),
                    host.events, host.halts))
    assert out[0] == out[1]


def test_determinism_and_own_stream():
    def run(seed, with_thread=True):
        host = Host(host_cpus=1, seed=seed, scheduler="eevdf")
        vm = host.create_vm(2)
        for v in vm.vcpus:
            v.load(g.Program([g.loop([g.compute_exp(20 * US), g.wfi()])]))
        vm.set_tick(250 * US)
        t = host.add_thread([hp.loop([hp.compute("exp 30us"), hp.sleep("exp 100us")])]) \
            if with_thread else None
        host.run(5 * MS)
        return host.stats_array().tolist(), t.stats() if t else None
    assert run(1) == run(1)
    assert run(1)[1] != run(2)[1]


def test_no_host_threads_changes_nothing():
    """Adding then not using the API leaves the engine's thread table as it was."""
    host = Host(host_cpus=2)
    vm = host.create_vm(2)
    assert host.threads == [] and host._engine.thread_kinds() == [0, 0]
    assert vm.vcpus[1]._g == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_arguments_leave_the_host_unchanged(engine):
    host = Host(host_cpus=2, arch="x86", engine=engine)
    vm = host.create_vm(2)
    other = Host(host_cpus=1, arch="x86").create_vm(1)
    before = (host._engine.thread_kinds(), host.now, host._nthreads)
    cases = [
        (lambda: host.add_thread([hp.compute("10us")], affinity=[2]), ValueError, "2"),
        (lambda: host.add_thread([hp.compute("10us")], affinity=[]), ValueError, "empty"),
        (lambda: host.add_thread([hp.compute("10us")], affinity="some"), ValueError,
         "affinity"),
        (lambda: host.add_thread([hp.compute("10us")], name=""), TypeError, "name"),
        (lambda: host.add_thread([hp.msi(vm, 2, 0x30)]), ProgramError, "APIC ID 2"),
        (lambda: host.add_thread([hp.msi(other, 0, 0x30)]), ValueError, "not one of"),
        (lambda: host.add_thread([hp.msi(5, 0, 0x30)]), ValueError, "VM 5"),
        (lambda: host.add_thread([hp.irq(vm, 40)]), ProgramError, "arm64"),
        (lambda: host.add_thread([hp.loop([hp.msi(vm, 0, 0x30)])]), ProgramError,
         "no virtual time"),
        (lambda: host.add_thread([g.compute(10)]), ProgramError, "not a host op"),
        (lambda: host.add_thread("compute 1us"), ProgramError, "list of host ops"),
        (lambda: host.add_load(0, 1000), ValueError, "duty"),
        (lambda: host.add_load(1.5, 1000), ValueError, "duty"),
        (lambda: host.add_load(0.5, 0), ValueError, "period"),
        (lambda: host.add_load(1e-9, 1000), ValueError, "rounds to 0"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()
        assert (host._engine.thread_kinds(), host.now, host._nthreads) == before
        assert host.threads == []
    with pytest.raises(ProgramError, match="16..255"):
        hp.msi(vm, 0, 3)
    with pytest.raises(ProgramError, match="SPI"):
        hp.irq(vm, 20)
    with pytest.raises(ProgramError, match="uniform lo"):
        hp.compute(("uniform", 10, 5))
    with pytest.raises(ProgramError, match="unit"):
        hp.sleep("100")
    with pytest.raises(ProgramError, match="loop count"):
        hp.loop([hp.compute(1)], count=0)
    host.add_thread([hp.compute("1us")], name="a")
    with pytest.raises(ValueError, match="exists already"):
        host.add_thread([hp.compute("1us")], name="a")


def test_threads_added_later_and_vms_after_threads():
    """A host thread may be added between runs (it starts at host.now); a VM created
    after it has its vCPU threads after it in the host's thread table."""
    host = Host(host_cpus=2, scheduler="eevdf")
    t0 = host.add_load(0.5, "100us")
    vm = host.create_vm(2)
    assert t0.g == 0 and [v._g for v in vm.vcpus] == [1, 2]
    for v in vm.vcpus:
        v.load(g.Program([g.loop([g.compute(10 * US), g.wfi()])]))
    vm.set_tick(100 * US)
    host.run(1 * MS)
    t1 = host.add_thread([hp.compute("30us")], affinity=1)
    assert t1.g == 3 and t1.cpu == 1
    host.run(2 * MS)
    assert t1.state == "USER" and t1.stats()["run_ns"] == 30 * US
    assert host.stats_array().shape[0] == 2
    assert t0.stats()["nr_runs"] > 5
    assert np.all(host.stats_array()[:, S_ATTEMPTED_POLL] + 1 > 0)


# -- snapshots -------------------------------------------------------------------------------

def _snap_host(sched):
    host = Host(host_cpus=2, arch="x86", scheduler=sched, seed=5, timeline_capacity=1 << 14)
    vm = host.create_vm(3)
    for v in vm.vcpus:
        v.load(g.Program([g.loop([g.compute_exp(20 * US), g.hlt()])]))
    host.add_thread([hp.loop([hp.sleep("exp 50us"), hp.msi(vm, 1, 0x30),
                              hp.compute("exp 3us")])], name="inj")
    host.add_load(0.4, "300us", affinity=[1])
    return host


def _observe(host):
    return (host.stats_array().tolist(), [t.stats() for t in host.threads],
            [(t.g, t.name, t.affinity, t.state, t.cpu) for t in host.threads],
            host.timeline_array().tolist(), host.events, host.halts,
            host.latency_histogram().tolist())


@pytest.mark.parametrize("sched", SCHEDS)
def test_snapshot_mid_run_continues_bit_identically(sched):
    ref = _snap_host(sched)
    ref.run(8 * MS)
    for cut in (1, 1_234_567, 3 * MS):
        a = _snap_host(sched)
        a.run(cut)
        b = Host.restore(a.snapshot())
        assert _observe(b)[2] == _observe(a)[2]
        b.run(8 * MS)
        assert _observe(b) == _observe(ref)
    # A host thread added after a restore continues the numbering.
    b.add_thread([hp.compute("5us")], name="late")
    assert b.threads[-1].g == 5


def test_reference_engine_state_round_trip_with_host_threads():
    from kvmwake.reference import snapshot as rs
    a = Host(host_cpus=1, engine="reference", scheduler="eevdf", seed=3)
    vm = a.create_vm(2)
    for v in vm.vcpus:
        v.load(g.Program([g.loop([g.compute_exp(20 * US), g.wfi()])]))
    vm.configure_irq(40, enabled=True, level=False)
    a.add_thread([hp.loop([hp.sleep("exp 40us"), hp.irq(vm, 40), hp.compute("2us")])])
    a.run(2 * MS)
    state = rs.engine_export(a._engine)
    other = type(a._engine)("arm64", 1, 3, scheduler="eevdf")
    rs.engine_import(other, state)
    a._engine.run(5 * MS)
    other.run(5 * MS)
    assert a._engine.stats_array().tolist() == other.stats_array().tolist()
    assert a._engine.trace_list() == other.trace_list()


def test_hostile_snapshots_with_host_threads_are_refused():
    from test_snapshot import edit_records, logical, refuses
    host = _snap_host("eevdf")
    host.run(2 * MS)
    while not any(t.state == "BLOCKED" for t in host.threads):
        host.run(host.now + 7 * US)
    data = host.snapshot()
    inj, load = host.threads[0].g, host.threads[1].g

    def field(name, i, f, value):
        def fn(recs):
            recs[f][i] = value
        return edit_records(data, name, fn)

    refuses(field("threads", inj, "kind", 0), f"thread {inj}", "out of range")
    refuses(field("threads", 0, "kind", 1), "thread 0", "host thread")
    refuses(field("threads", inj, "kind", 7), f"thread {inj}", "thread kind")
    refuses(field("threads", inj, "state", 2), f"thread {inj}", "host thread")
    refuses(field("threads", inj, "vcpu_id", 5), f"thread {inj}", "host thread")
    refuses(field("threads", inj, "cont", 2), f"thread {inj}", "host thread")
    refuses(field("threads", inj, "resume", 1), f"thread {inj}", "host thread")
    refuses(field("threads", inj, "exit_time", (1 << 64) - 1), f"thread {inj}", "deadline")
    asleep = [t.g for t in host.threads if t.state == "BLOCKED"]
    refuses(field("irqs", asleep[0], "timer_gen", 12345), f"thread {asleep[0]}", "hrtimer")

    def threads_edit(fn):
        def edit(h):
            fn(h["host"]["threads"])
        return logical(data, header_edit=edit)
    refuses(threads_edit(lambda r: r.pop()), "array sizes")
    refuses(threads_edit(lambda r: r[1].update(g=0)), "host thread")
    refuses(threads_edit(lambda r: r[1].update(name="inj")), "host thread 1")
    refuses(threads_edit(lambda r: r[0].update(affinity=[9])), "host thread 0")
    refuses(threads_edit(lambda r: r[0].update(extra=1)), "host thread 0", "fields")
    with pytest.raises(Exception, match="host CPU count"):
        Host.restore(data, host_cpus=4)
    del load


def test_timeline_and_perfetto_show_host_threads():
    from kvmwake.outputs.perfetto import trace_events
    host = Host(host_cpus=2, costs=ZERO, timeline_capacity=1 << 12)
    vm = host.create_vm(1)
    vm.vcpus[0].load(g.Program([g.loop([g.compute(50 * US), g.wfi()])]))
    vm.set_tick(100 * US)
    t = host.add_load(0.25, "400us", affinity=[1], name="bg")
    host.run(4 * MS)
    # CPU 1 runs only the load: 1/4 of the time (the thread is g = 1, on CPU 1).
    tot = host.timeline_totals()
    assert int(tot["running_ns"][1]) == 1 * MS and int(tot["polling_ns"][1]) == 0
    assert running_ns(host, t.g, 4 * MS) == t.stats()["run_ns"] == 1 * MS
    ev = trace_events(host)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    assert names == {(0, 0): "CPU 0/KVM (VM 0)", (1, 1): "bg"}
    runs = [e for e in ev if e["ph"] == "X" and e["tid"] == 1 and e["name"] == "RUNNING"]
    assert len(runs) == 10 and all(e["cat"] == "host" and e["pid"] == 1 for e in runs)
    assert sum(e["args"]["end_ns"] - e["args"]["start_ns"] for e in runs) == 1 * MS


# -- scenario files --------------------------------------------------------------------------

SCENARIO = '''
sim = "5ms"
seed = 3
[host]
cpus = 2
scheduler = "eevdf"
costs = { context_switch_ns = 0 }

[[host.thread]]
name = "inj"
affinity = [1]
ops = """
loop {
    sleep exp 100us
    msi 0 0x30
    msi nr_vcpus-1 0x31 vm=0
    compute uniform 1us 3us
}
"""

[[host.load]]
duty = 0.5
period = "1ms"
count = 2
name = "bg"

[vm]
arch = "x86"
vcpus = 4

[[vm.program]]
ops = "loop { compute exp 20us; hlt }"
'''


def test_scenario_host_threads_build_and_run():
    from kvmwake import scenarios
    host, sim, sc = scenarios.build(scenarios.loads(SCENARIO))
    assert [(t.name, t.g, t.affinity, t.cpu) for t in host.threads] == [
        ("inj", 4, (1,), 1), ("bg-0", 5, (0, 1), 1), ("bg-1", 6, (0, 1), 0)]
    assert [v._g for v in host.vms[0].vcpus] == [0, 1, 2, 3]
    host.run(sim)
    inj = host.threads[0].stats()
    assert inj["nr_injects"] >= 2 * (inj["nr_sleeps"] - 1) and inj["nr_injects"] > 20
    for t in host.threads[1:]:
        assert t.stats()["run_ns"] == 2_500 * US     # 5 periods of 0.5 ms each
    # The same file as a Python-built host gives the same run.
    h2 = Host(host_cpus=2, arch="x86", seed=3, scheduler="eevdf",
              costs={"context_switch_ns": 0})
    vm = h2.create_vm(4)
    for v in vm.vcpus:
        v.load(g.Program([g.loop([g.compute_exp(20 * US), g.hlt()])]))
    h2.add_thread([hp.loop([hp.sleep(("exp", "100us")), hp.msi(vm, 0, 0x30),
                            hp.msi(0, 3, 0x31), hp.compute("uniform 1us 3us")])],
                  affinity=[1], name="inj")
    h2.add_load(0.5, "1ms", name="bg-0")
    h2.add_load(0.5, "1ms", name="bg-1")
    h2.run(sim)
    assert h2.stats_array().tolist() == host.stats_array().tolist()
    assert [t.stats() for t in h2.threads] == [t.stats() for t in host.threads]


@pytest.mark.parametrize("old, new, words", [
    ("msi 0 0x30", "msi 9 0x30", ("host.thread[0].ops", "APIC ID 9")),
    ("msi 0 0x30", "irq 40", ("host.thread[0].ops", "arm64")),
    ("msi 0 0x30", "msi 0 0x30 vm=3", ("VM 3",)),
    ("msi 0 0x30", "msi 0 0x3", ("vector",)),
    ("msi 0 0x30", "for i in 0..2 { compute 1us }", ("no 'for'",)),
    ("msi 0 0x30", "wfi", ("unknown host op 'wfi'",)),
    ("compute uniform 1us 3us", "compute 10", ("unit",)),
    ("sleep exp 100us\n    msi 0 0x30", "msi 0 0x30\n}\nloop {", ("no virtual time",)),
    ('duty = 0.5', 'duty = 1.5', ("host.load[0].duty", "(0, 1]")),
    ('duty = 0.5', 'duty = "half"', ("host.load[0].duty",)),
    ('period = "1ms"', 'period = 1000', ("host.load[0].period", "unit")),
    ('affinity = [1]', 'affinity = [3]', ("host.thread[0].affinity[0]", "0..1")),
    ('affinity = [1]', 'affinity = []', ("empty",)),
    ('affinity = [1]', 'affinity = "some"', ("affinity",)),
    ('count = 2', 'count = 0', ("host.load[0].count",)),
    ('name = "bg"', 'name = "inj"', ("named 'inj'",)),
    ('name = "bg"', 'nme = "bg"', ("host.load[0].nme", "unknown key")),
])
def test_scenario_host_thread_errors(old, new, words):
    from kvmwake import ScenarioError, scenarios
    assert SCENARIO.count(old) >= 1
    with pytest.raises(ScenarioError) as exc:
        scenarios.loads(SCENARIO.replace(old, new, 1))
    for w in words:
        assert w in str(exc.value), str(exc.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_rehost_is_refused_with_host_threads(engine):
    host = Host(host_cpus=2, engine=engine)
    host.create_vm(1)
    host.add_load(0.5, "1ms")
    if engine == "core":
        with pytest.raises(ValueError, match="host threads"):
            host._engine.rehost(3)
    else:
        from kvmwake.reference import snapshot as rs
        with pytest.raises(ValueError, match="host threads"):
            rs.engine_rehost(host._engine, 3)


def test_snapshot_with_a_host_thread_before_the_vms():
    """A host thread added before the VMs is thread 0; the VMs' vCPU threads come after
    it, and a snapshot restores that layout."""
    host = Host(host_cpus=2, arch="x86", scheduler="eevdf", seed=9)
    t = host.add_load(0.3, "200us", name="early")
    vm = host.create_vm(2)
    assert t.g == 0 and vm._first == 1
    for v in vm.vcpus:
        v.load(g.Program([g.loop([g.compute_exp(20 * US), g.hlt()])]))
    host.add_thread([hp.loop([hp.sleep("exp 70us"), hp.msi(vm, vm.vcpus[1], 0x40)])])
    vm2 = host.create_vm(1)
    vm2.vcpus[0].load(g.Program([g.loop([g.compute(30 * US), g.hlt()])]))
    vm2.set_tick(100 * US)
    assert vm2._first == 4
    host.run(1 * MS)
    b = Host.restore(host.snapshot())
    assert [v._first for v in b.vms] == [1, 4] and [x.g for x in b.threads] == [0, 3]
    host.run(3 * MS)
    b.run(3 * MS)
    assert _observe(b) == _observe(host)
    with pytest.raises(ProgramError, match="not a vCPU of that VM"):
        hp.msi(vm, vm2.vcpus[0], 0x40)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sched", SCHEDS)
def test_sleep_until_keeps_an_absolute_schedule(engine, sched):
    """Alone on CPU 1, no costs: with sleep_until 100us the thread's 30 us bursts start
    at 0, 100, 200, ... us (10 by 1 ms); with sleep 100us at 0, 130, 260, ... (8).
    A 150 us burst with sleep_until 100us is late every time: it never sleeps."""
    runs = {}
    for op in (hp.sleep_until, hp.sleep):
        host = Host(host_cpus=2, engine=engine, scheduler=sched, costs=ZERO)
        host.create_vm(1)
        t = host.add_thread([hp.loop([op("100us"), hp.compute("30us")])], affinity=1)
        host.run(1 * MS)
        runs[op.__name__] = t.stats()
    assert runs["sleep_until"]["nr_sleeps"] == 10 and runs["sleep_until"]["run_ns"] == 9 * 30 * US
    # (The sleep from 930 us ends at 1 ms, after the run: 9 sleeps ended.)
    assert runs["sleep_until"]["sleep_ns"] == 100 * US + 8 * 70 * US
    assert runs["sleep"]["nr_sleeps"] == 8 and runs["sleep"]["run_ns"] == 7 * 30 * US
    host = Host(host_cpus=2, engine=engine, scheduler=sched, costs=ZERO)
    host.create_vm(1)
    t = host.add_thread([hp.loop([hp.sleep_until("100us"), hp.compute("150us")])], affinity=1)
    host.run(1 * MS)
    st = t.stats()
    assert st["nr_sleeps"] == 1 and st["sleep_ns"] == 100 * US and st["nr_runs"] == 2


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sched", SCHEDS)
def test_a_host_thread_wakes_onto_an_idle_cpu_of_its_set(engine, sched):
    """Placement applies to host threads: thread 2 (affinity "all" on 2 CPUs) starts
    on CPU 2 % 2 = 0, where vCPU 0 computes without end; vCPU 1 halts for good on
    CPU 1 (no polling: its CPU is idle).  At its first hrtimer wake-up
    select_task_rq() finds its previous CPU busy and CPU 1 idle, and it moves there
    (one migration) and stays for every later wake-up."""
    host = Host(host_cpus=2, arch="x86", engine=engine, scheduler=sched, costs=ZERO)
    vm = host.create_vm(2)
    vm.enable_cap(__import__("kvmwake").Cap.HALT_POLL, 0)
    vm.vcpus[0].load([g.loop([g.compute(1 * MS)])])
    vm.vcpus[1].load([g.hlt()])
    th = host.add_thread([hp.loop([hp.compute(5 * US), hp.sleep(20 * US)])])
    assert th.g == 2 and th.cpu == 0
    host.run(until_ns=1 * MS)
    assert th.cpu == 1
    assert host.thread_info(th.g)["nr_migrations"] == 1
    assert vm.vcpus[0].nr_migrations == 0 and vm.vcpus[1].nr_migrations == 0
