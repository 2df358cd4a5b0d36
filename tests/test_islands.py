"""Islands (core/islands.pxi, reference/islands.py): a host whose VMs share no host
CPU runs as independent simulations, one after another or on several threads.

Both engines find the same islands; the core run as islands (1 or 2 threads)
gives what the reference engine gives on its one queue (stats, halts, events,
latencies, scheduler state), the same snapshot bytes whatever the thread count,
and a snapshot continues bit for bit.  A host that may stop for the VMM (an exit
to userspace), or that records a trace or timeline, runs on its one queue as
before, and says why."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kvmwake as kw
from kvmwake import Host, guest as g, hostprog as hp
from kvmwake.reference import EngineError

US, MS = 1_000, 1_000_000
NO_ISLAND = 0xFFFF_FFFF


# ------------------------------------------------------------------ hosts


def storm(n: int, mean_us: int = 20):
    """compute Exp(mean), wake a random other vCPU (or none alone), halt; forever."""
    body = [g.compute_exp(mean_us * US)]
    if n > 1:
        body.append(g.wake_random_other())
    body.append(g.wfi())
    return [g.loop(body)]


def make_host(spec: dict, engine: str = "core", threads: int = 1, trace_capacity: int = 0,
              timeline_capacity: int = 0) -> Host:
    host = Host(host_cpus=spec["cpus"], arch=spec["arch"], seed=spec.get("seed", 1),
                engine=engine, scheduler=spec["sched"], threads=threads,
                trace_capacity=trace_capacity, timeline_capacity=timeline_capacity,
                costs=spec.get("costs"))
    for n, aff, progs in spec["vms"]:
        vm = host.create_vm(n, affinity=aff)
        for v, prog in zip(vm.vcpus, progs):
            v.load(prog)
    for target, aff in spec.get("injectors", ()):
        vm = host.vms[target]
        op = hp.msi(vm, 0, 0x30) if spec["arch"] == "x86" else hp.irq(vm, 40)
        host.add_thread([hp.loop([hp.sleep("exp 70us"), op])], affinity=aff)
    return host


def outcome(host: Host) -> dict:
    """Everything the run decided, read the same way from either engine."""
    eng = host._engine
    nth = len(host._engine.thread_kinds())
    return {
        "now": host.now, "events": host.events, "halts": host.halts,
        "stats": host.stats_array().tolist(),
        "lat": eng.lat_hist_array().tolist(),
        "threads": [eng.thread_info(i) for i in range(nth)],
        "sched": eng.sched_state(),
        "mp": [[v.get_mp_state() for v in vm.vcpus] for vm in host.vms],
    }


def pinned_spec(nvm=4, per_vm=3, arch="x86", sched="eevdf"):
    """nvm VMs of per_vm vCPUs, each VM on CPUs of its own (pinned), ipi-storm-like."""
    return {"cpus": nvm * per_vm, "arch": arch, "sched": sched,
            "vms": [(per_vm, "pinned", [storm(per_vm)] * per_vm) for _ in range(nvm)]}


# ------------------------------------------------------------------ the plan


def test_pinned_vms_on_cpus_of_their_own_are_islands():
    host = make_host(pinned_spec(nvm=3, per_vm=2))
    isl = host.islands()
    assert [i["vms"] for i in isl] == [[0], [1], [2]]
    assert [i["cpus"] for i in isl] == [[0, 1], [2, 3], [4, 5]]
    assert host.islands_blocked() is None


def test_shared_cpus_a_wide_affinity_and_an_injector_join_islands():
    spec = {"cpus": 6, "arch": "x86", "sched": "eevdf",
            "vms": [(1, [0, 1], [storm(1)]), (1, [1, 2], [storm(1)]),
                    (1, [4], [storm(1)]), (1, [5], [storm(1)])]}
    host = make_host(spec)
    # VMs 0 and 1 share CPU 1; CPU 3 is nobody's.
    assert [(i["vms"], i["cpus"]) for i in host.islands()] == \
        [([0, 1], [0, 1, 2]), ([2], [4]), ([3], [5])]
    th, cpu, _ = host._engine.island_plan()
    assert cpu[3] == NO_ISLAND
    # An injector that signals VMs 2 and 3 joins them (and its own CPU 3).
    vm2, vm3 = host.vms[2], host.vms[3]
    host.add_thread([hp.loop([hp.sleep("100us"), hp.msi(vm2, 0, 0x30), hp.msi(vm3, 0, 0x31)])],
                    affinity=[3])
    assert [(i["vms"], i["cpus"], i["threads"]) for i in host.islands()] == \
        [([0, 1], [0, 1, 2], []), ([2, 3], [3, 4, 5], [0])]
    # A VM allowed everywhere makes the whole host one island.
    host.create_vm(1, affinity="all")
    assert len(host.islands()) == 1
    assert host.islands_blocked() == "the host is one island"


def test_a_thread_joins_the_cpu_it_is_still_on_after_its_affinity_changed():
    host = make_host(pinned_spec(nvm=2, per_vm=2))
    host.run(1 * MS)
    # vCPU 0 of VM 0 may now run only on CPU 3 (VM 1's), but is still on CPU 0.
    host.vms[0].vcpus[0].set_affinity([3])
    assert len(host.islands()) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_both_engines_find_the_same_islands(data):
    spec = data.draw(host_specs())
    core, ref = make_host(spec, "core"), make_host(spec, "reference")
    for a, b in zip(core._engine.island_plan(), ref._engine.island_plan()):
        assert a.tolist() == b.tolist()
    starting = [v._g for vm in core.vms for v in vm.vcpus]
    assert core._engine.islands_blocked(starting) == ref._engine.islands_blocked(starting)


# ------------------------------------------------------------------ the runs


@st.composite
def programs(draw, n: int, exits: bool = False):
    """A guest program that never exits (a loop for ever), unless ``exits``."""
    body = [draw(st.sampled_from([g.compute_exp(draw(st.integers(2, 60)) * US),
                                  g.compute(draw(st.integers(1, 40)) * US)]))]
    for _ in range(draw(st.integers(0, 3))):
        body.append(draw(st.sampled_from(
            [g.wfi(), g.compute(draw(st.integers(1, 30)) * US)]
            + ([g.wake_random_other(), g.wake_next()] if n > 1 else []))))
    body.append(g.wfi())
    prog = [g.loop(body)]
    if exits:
        prog = [g.loop(body, count=draw(st.integers(1, 20)))]      # then END: an exit
    return prog


@st.composite
def host_specs(draw, max_vms: int = 4):
    arch = draw(st.sampled_from(["x86", "arm64"]))
    cpus = draw(st.integers(2, 8))
    vms = []
    for _ in range(draw(st.integers(1, max_vms))):
        n = draw(st.integers(1, 3))
        aff = draw(st.one_of(st.just("pinned"),
                             st.lists(st.integers(0, cpus - 1), min_size=1, max_size=2),
                             st.just("all") if draw(st.integers(0, 9)) == 0 else st.just("pinned")))
        vms.append((n, aff, [draw(programs(n)) for _ in range(n)]))
    injectors = draw(st.lists(st.tuples(st.integers(0, len(vms) - 1),
                                        st.lists(st.integers(0, cpus - 1), min_size=1, max_size=2)),
                              max_size=2))
    costs = draw(st.sampled_from([None, {"wake_to_run_ns": "3us", "vm_exit_ns": "1us"},
                                  {"vm_entry_ns": {"dist": "lognormal", "median": "1us",
                                                   "sigma": 0.5, "max": "50us"}}]))
    return {"cpus": cpus, "arch": arch, "sched": draw(st.sampled_from(["fifo", "eevdf"])),
            "vms": vms, "injectors": injectors, "seed": draw(st.integers(0, 1 << 32)),
            "costs": costs}


@st.composite
def island_specs(draw):
    """Hosts that are islands: each VM on a block of CPUs of its own (pinned, or a
    set in its block, migrating), injectors on their VM's block."""
    spec = draw(host_specs())
    vms, cpu, blocks = [], 0, []
    for n, _aff, progs in spec["vms"]:
        width = draw(st.integers(1, 3))
        block = list(range(cpu, cpu + width))
        cpu += width
        blocks.append(block)
        aff = draw(st.lists(st.sampled_from(block), min_size=1, max_size=width))
        vms.append((n, aff, progs))
    spec["vms"] = vms
    spec["cpus"] = cpu
    spec["injectors"] = [(v, [blocks[v][0]]) for v, _ in spec["injectors"]]
    return spec


def run_in_parts(host: Host, ends) -> None:
    for t in ends:
        host.run(t)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=host_specs(), ends=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_islands_give_what_one_queue_gives(spec, ends):
    """The core as islands, on 1 and on 2 threads, against the reference engine on its
    one queue: the same outcome; and the same snapshot bytes on 1 and 2 threads."""
    ends = [sum(ends[:i + 1]) * MS for i in range(len(ends))]
    one, two = make_host(spec, threads=1), make_host(spec, threads=2)
    ref = make_host(spec, "reference")
    as_islands = one.islands_blocked() is None
    run_in_parts(one, ends)
    run_in_parts(two, ends)
    run_in_parts(ref, ends)
    assert outcome(one) == outcome(ref)
    assert outcome(two) == outcome(ref)
    assert one.snapshot() == two.snapshot()
    if as_islands:
        # The core's own one queue (a trace ring on) agrees too.
        traced = make_host(spec, trace_capacity=64)
        run_in_parts(traced, ends)
        assert outcome(traced) == outcome(one)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=island_specs(), ends=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_hosts_of_islands_give_what_one_queue_gives(spec, ends):
    """As above, on hosts made of islands (threads migrating inside their VM's CPUs)."""
    test_islands_give_what_one_queue_gives.hypothesis.inner_test(spec, ends)


@pytest.mark.parametrize("sched", ["fifo", "eevdf"])
def test_islands_run_and_match_the_reference(sched):
    spec = pinned_spec(nvm=4, per_vm=3, sched=sched)
    spec["injectors"] = [(1, [3, 4])]
    host, ref = make_host(spec, threads=2), make_host(spec, "reference")
    assert len(host.islands()) == 4 and host.islands_blocked() is None
    host.run(20 * MS)
    ref.run(20 * MS)
    assert host.halts > 1000
    assert outcome(host) == outcome(ref)


def test_snapshot_after_islands_continues_bit_for_bit():
    spec = pinned_spec(nvm=3, per_vm=4)
    whole = make_host(spec, threads=2)
    whole.run(10 * MS)
    # A run made in several calls leaves the same state, byte for byte.
    parts = make_host(spec, threads=2)
    run_in_parts(parts, [1 * MS, 3 * MS, 7 * MS, 10 * MS])
    assert parts.snapshot() == whole.snapshot()
    half = make_host(spec, threads=1)
    half.run(4 * MS)
    snap = half.snapshot()
    back = Host.restore(snap, threads=2)
    assert back.islands_blocked() is None
    back.run(10 * MS)
    assert back.snapshot() == whole.snapshot()
    assert outcome(back) == outcome(whole)
    # Sequence numbers stay distinct after the islands are joined.
    ev = back._engine.export_state()[1]["heap"]
    assert len(ev) > 0


def test_thread_count_does_not_change_the_result_at_scale():
    spec = pinned_spec(nvm=8, per_vm=16)
    snaps = []
    for threads in (1, 2, 3):
        host = make_host(spec, threads=threads)
        host.run(5 * MS)
        snaps.append(host.snapshot())
    assert snaps[0] == snaps[1] == snaps[2]


# ------------------------------------------------------------------ when not


def test_a_vcpu_that_may_exit_keeps_the_host_on_one_queue():
    spec = pinned_spec(nvm=2, per_vm=2)
    spec["vms"][1] = (2, "pinned", [[g.loop([g.compute(10 * US)], count=5)]] * 2)
    host, ref = make_host(spec), make_host(spec, "reference")
    assert "may exit to userspace" in host.islands_blocked()
    host.run(5 * MS)
    ref.run(5 * MS)
    assert outcome(host) == outcome(ref)
    # Both vCPUs of VM 1 left KVM_RUN (GUEST_DONE); they stay out, so the host
    # can now run as islands.
    assert host.vms[1].exits == 2
    assert host.islands_blocked() is None


@pytest.mark.parametrize("prog, why", [
    ([g.loop([g.compute(10 * US), g.sync(7), g.wfi()])], "may exit"),
    ([g.loop([g.compute(10 * US), g.hvc(), g.wfi()])], "may exit"),
    ([g.compute(10 * US), g.loop([g.compute(10 * US), g.wfi()])], None),
])
def test_may_exit_reads_the_program_from_its_pc(prog, why):
    spec = pinned_spec(nvm=2, per_vm=1, arch="arm64")
    spec["vms"][0] = (1, "pinned", [prog])
    host = make_host(spec)
    for vm in host.vms:
        vm._start_loaded()
    got = host._engine.islands_blocked()
    ref = make_host(spec, "reference")
    for vm in ref.vms:
        vm._start_loaded()
    assert got == ref._engine.islands_blocked()
    assert (got is None) if why is None else (why in got)


@pytest.mark.parametrize("kw_, why", [({"trace_capacity": 16}, "trace ring"),
                                      ({"timeline_capacity": 16}, "timeline")])
def test_a_trace_or_timeline_keeps_the_host_on_one_queue(kw_, why):
    host = make_host(pinned_spec(nvm=2, per_vm=2), **kw_)
    assert why in host.islands_blocked()


def test_the_reference_says_it_runs_one_queue():
    host = make_host(pinned_spec(nvm=2, per_vm=2), "reference")
    assert "one queue" in host.islands_blocked()
    assert len(host.islands()) == 2


def test_an_error_in_an_island_is_reported_as_on_one_queue():
    # VM 1's vCPUs wake each other at no cost once one is woken: no virtual time
    # passes, a stall, in both engines (tests/test_differential.py's ping-pong).
    spec = pinned_spec(nvm=2, per_vm=2, arch="arm64")
    spec["costs"] = {"vm_exit_ns": 0, "vm_entry_ns": 0, "ipi_send_ns": 0, "wake_to_run_ns": 0,
                     "context_switch_ns": 0}
    spec["vms"][1] = (2, "pinned", [[g.wfi(), g.loop([g.wake(1), g.wfi()])],
                                    [g.loop([g.wfi(), g.wake(0)])]])
    msgs = []
    for engine in ("core", "reference"):
        host = make_host(spec, engine, threads=2)
        host.halt_poll_ns = 0
        host.run(1 * MS)
        assert host.islands_used == (2 if engine == "core" else 0)
        host._engine.raise_irq_at(host.vms[1].vcpus[0]._g, 1)
        with pytest.raises(EngineError) as exc:
            host.run(2 * MS)
        msgs.append(str(exc.value))
    assert msgs[0] == msgs[1]
    assert "makes no progress" in msgs[0]


@pytest.mark.parametrize("bad", [0, -1, 4097, 1.5, "2", True])
def test_threads_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="threads"):
        Host(threads=bad)


def test_threads_default_is_the_cpus_this_process_may_use():
    assert Host().sim_threads == kw.host.default_threads() >= 1


# ------------------------------------------------------------------ the command line


def test_cli_threads_give_the_same_summary():
    outs = []
    for threads in ("1", "2"):
        r = subprocess.run([sys.executable, "-m", "kvmwake", "run", "ipi-storm", "--vcpus", "2048",
                            "--sim-ms", "2", "--threads", threads, "--json", "-", "-q"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        for key in ("timing", "wall_s", "build_s", "halts_per_s", "events_per_s"):
            s.pop(key)
        outs.append(s)
    assert outs[0]["islands"] == 2 and outs[0]["threads"] == 1 and outs[1]["threads"] == 2
    outs[0].pop("threads")
    outs[1].pop("threads")
    assert outs[0] == outs[1]


def test_cli_rejects_a_bad_thread_count():
    r = subprocess.run([sys.executable, "-m", "kvmwake", "run", "ipi-storm", "--threads", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--threads" in r.stderr


def test_a_sweep_point_gives_the_same_row_on_its_threads():
    from kvmwake.cli import sweep
    [spec] = sweep.make_points("ipi-storm", {"vcpus": [2048], "sim_ms": [1.0]}, 1)
    rows = [sweep.run_point({**spec, "threads": t}) for t in (1, 2)]
    assert rows[0] == rows[1] and rows[0]["halts"] > 0


# ------------------------------------------------------------------ a trace of one VM


def test_a_trace_of_one_vm_lets_the_islands_run_and_is_the_one_queue_trace():
    spec = pinned_spec(nvm=3, per_vm=3, sched="eevdf")
    hosts = {}
    for name, engine, split in (("islands", "core", True), ("one queue", "core", False),
                                ("reference", "reference", True)):
        host = make_host(spec, engine, threads=2, trace_capacity=1 << 16)
        host.split_islands = split
        if engine == "core":
            assert "more than one island" in host.islands_blocked()
        host.trace_vm(host.vms[1])
        host.run(10 * MS)
        hosts[name] = host
    assert hosts["islands"].islands_used == 3 and hosts["one queue"].islands_used == 0
    recs = {k: h.vms[1].trace_records() for k, h in hosts.items()}
    assert len(recs["islands"]) > 100
    assert recs["islands"].tobytes() == recs["one queue"].tobytes()
    assert recs["islands"].tolist() == recs["reference"].tolist()
    for h in hosts.values():
        assert len(h.vms[0].trace_records()) == 0 and len(h.vms[2].trace_records()) == 0
    assert outcome(hosts["islands"]) == outcome(hosts["reference"])


def test_a_trace_of_every_thread_keeps_a_host_of_islands_on_one_queue():
    host = make_host(pinned_spec(nvm=2, per_vm=2), trace_capacity=16)
    assert "more than one island" in host.islands_blocked()
    host.trace_vm(None)
    assert "more than one island" in host.islands_blocked()
    host.trace_vm(0)
    assert host.islands_blocked() is None and host.traced_vm == 0


def test_the_traced_vm_is_kept_in_snapshots_and_the_trace_continues():
    spec = pinned_spec(nvm=2, per_vm=3)
    whole = make_host(spec, threads=2, trace_capacity=1 << 12)
    whole.trace_vm(1)
    whole.run(4 * MS)
    whole.run(9 * MS)
    half = make_host(spec, threads=2, trace_capacity=1 << 12)
    half.trace_vm(1)
    half.run(4 * MS)
    back = Host.restore(half.snapshot(), threads=1)
    assert back.traced_vm == 1
    back.run(9 * MS)
    assert back.snapshot() == whole.snapshot()
    assert back.vms[1].trace_records().tobytes() == whole.vms[1].trace_records().tobytes()


@pytest.mark.parametrize("bad, err", [(2, ValueError), (-1, ValueError), (True, TypeError)])
def test_trace_vm_is_checked(bad, err):
    host = make_host(pinned_spec(nvm=2, per_vm=1), trace_capacity=16)
    with pytest.raises(err, match="trace_vm"):
        host.trace_vm(bad)
    assert host.traced_vm is None and host._engine.trace_threads == (0, 0xFFFF_FFFF)


def test_cli_default_outputs_run_a_host_of_islands(tmp_path):
    outs = {}
    for flag in ([], ["--one-queue"]):
        d = tmp_path / ("one" if flag else "isl")
        r = subprocess.run([sys.executable, "-m", "kvmwake", "run", "ipi-storm", "--vcpus", "2048",
                            "--sim-ms", "2", "-q", "--out", str(d)] + flag,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs[bool(flag)] = (json.loads((d / "summary.json").read_text()),
                            (d / "vm0.trace").read_text())
    assert outs[False][0]["islands"] == 2 and outs[True][0]["islands"] == 0
    assert outs[False][1] == outs[True][1] and outs[False][1].count("kvm_vcpu_wakeup") > 100
    assert outs[False][0]["stats"] == outs[True][0]["stats"]


@pytest.mark.parametrize("threads", [1, 2])
def test_ctrl_c_during_islands_leaves_the_host_whole(threads):
    """SIGINT while the islands run: every island still reaches the run's end, then
    KeyboardInterrupt is raised; the host is the uninterrupted one."""
    import signal
    import threading
    spec = pinned_spec(nvm=64, per_vm=64)
    until = 1000 * MS
    host = make_host(spec, threads=threads)
    assert host.islands_blocked() is None and len(host.islands()) == 64
    running, lock = [True], threading.Lock()

    def interrupt():                  # only while host.run runs: never into pytest
        with lock:
            if running[0]:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    timer = threading.Timer(0.02, interrupt)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            host.run(until)
        finally:
            with lock:
                running[0] = False
            timer.cancel()
    assert host.now == until
    quiet = make_host(spec, threads=threads)
    quiet.run(until)
    assert host.snapshot() == quiet.snapshot()


@pytest.mark.parametrize("bad", [2, -1, "0", 1.0, True, [0], None])
def test_restore_refuses_a_bad_traced_vm(bad):
    from test_snapshot import reframe

    host = make_host(pinned_spec(nvm=2, per_vm=1), trace_capacity=16)
    host.trace_vm(1)

    def edit(header):
        header["host"]["trace_vm"] = bad
    if bad is None:           # None: every thread traced, as when the key is absent
        back = Host.restore(reframe(host.snapshot(), edit_header=edit))
        assert back.traced_vm is None
        return
    with pytest.raises(kw.SnapshotError, match="host configuration is invalid"):
        Host.restore(reframe(host.snapshot(), edit_header=edit))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=island_specs(), ends=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_islands_with_lazy_poll_ends_give_the_eager_one_queue_outcome(spec, ends):
    """Islands of pinned threads end their poll windows lazily (core/halt.pxi); the
    state timeline queues every window's end and keeps the host on one queue: the
    same outcome, with no more events."""
    ends = [sum(ends[:i + 1]) * MS for i in range(len(ends))]
    islands = make_host(spec, threads=2)
    eager = make_host(spec, timeline_capacity=1 << 16)
    run_in_parts(islands, ends)
    run_in_parts(eager, ends)
    a, b = outcome(islands), outcome(eager)
    assert a.pop("events") <= b.pop("events")
    assert a == b
