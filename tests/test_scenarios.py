"""Scenario files: the built-ins as TOML build exactly the hosts the Python builders built,
the op syntax, and errors that name file, line and key."""

import pathlib
import sys

import numpy as np
import pytest

from kvmwake import ScenarioError, cli, scenarios
from kvmwake import guest as g
from kvmwake.scenarios import ops as _ops
from kvmwake.scenarios.expand import AddrVm, programs_for

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _py_scenarios as py  # noqa: E402

SIZES = {
    "default": dict(vcpus=130, host_cpus=8, sim_ns=6_000_000),
    "irq-storm": dict(vcpus=40, host_cpus=8, sim_ns=6_000_000),
    "suspend-cycle": dict(vcpus=44, host_cpus=8, sim_ns=12_000_000),
    "ipi-storm": dict(vcpus=1030, host_cpus=16, sim_ns=6_000_000),
}


def _result(host):
    return (np.concatenate([vm.stats_array() for vm in host.vms]), host.halts, host.events,
            np.asarray(host.latency_histogram()), [vm.trace_text() for vm in host.vms[:2]],
            [vm.nr_vcpus for vm in host.vms], [vm.exits for vm in host.vms])


def test_the_builtins_are_the_toml_files():
    assert scenarios.names() == ["default", "irq-storm", "suspend-cycle", "ipi-storm"]
    assert sorted(scenarios.names()) == sorted(py.names())
    for name in scenarios.names():
        assert scenarios.path_of(name).suffix == ".toml"
        sc = scenarios.get(name)
        old = py.get(name)
        assert (sc.arch, sc.vcpus, sc.vcpus_per_vm, sc.host_cpus, sc.sim_ns, sc.tick_ns,
                sc.module_params, sc.costs, sc.nr_spis) == \
            (old.arch, old.vcpus, old.vcpus_per_vm, old.host_cpus, old.sim_ns, old.tick_ns,
             old.module_params, old.costs, old.nr_spis)
        assert sc.description == old.description


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("seed", [0, 5])
def test_toml_host_equals_python_host(name, seed):
    kw = SIZES[name]
    h1, s1, _ = py.build(name, seed=seed, trace_capacity=4096, **kw)
    h2, s2, _ = scenarios.build(name, seed=seed, trace_capacity=4096, **kw)
    assert s1 == s2
    h1.run(s1)
    h2.run(s2)
    r1, r2 = _result(h1), _result(h2)
    assert np.array_equal(r1[0], r2[0])
    assert r1[1:3] == r2[1:3] and r1[1] > 0
    assert np.array_equal(r1[3], r2[3])
    assert r1[4:] == r2[4:]


def test_builtin_programs_compile_to_the_same_ops():
    host, _, _ = scenarios.build("suspend-cycle", vcpus=8, host_cpus=2)
    vm = host.vms[0]
    progs, off = programs_for(scenarios.get("suspend-cycle"), vm, 8)
    assert progs[0] == py._suspend_cycle_primary(vm)
    assert progs[3] == py._suspend_cycle_program(3, 8)
    assert off == set(range(1, 8))
    sc = scenarios.get("default")
    progs, off = programs_for(sc, None, 64)
    assert all(progs[v] == py._default_program(v, 64) for v in range(64)) and not off


def test_chunked_runs_equal_one_run():
    h1, s, _ = scenarios.build("suspend-cycle", vcpus=16, host_cpus=4, sim_ns=8_000_000,
                               trace_capacity=4096)
    h2, _, _ = scenarios.build("suspend-cycle", vcpus=16, host_cpus=4, sim_ns=8_000_000,
                               trace_capacity=4096)
    h1.run(s)
    for t in (1, 999_999, 3_000_000, 3_000_000, 7_123_457, s):
        h2.run(t)
    assert _result(h1)[1:3] == _result(h2)[1:3]
    assert np.array_equal(_result(h1)[0], _result(h2)[0])
    assert _result(h1)[4] == _result(h2)[4]
    h3, _, _ = scenarios.build("suspend-cycle", vcpus=16, host_cpus=4, sim_ns=8_000_000,
                               trace_capacity=4096)
    cli.run_chunked(h3, s)
    assert np.array_equal(_result(h1)[0], _result(h3)[0]) and h1.events == h3.events


def test_cli_runs_a_file_and_a_name(tmp_path, capsys):
    f = tmp_path / "mine.toml"
    f.write_text(scenarios.path_of("ipi-storm").read_text())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli.main(["run", str(f), "--vcpus", "8", "--sim-ms", "2", "-q", "--json", str(a)]) == 0
    assert cli.main(["run", "ipi-storm", "--vcpus", "8", "--sim-ms", "2", "-q",
                     "--json", str(b)]) == 0
    import json
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja["stats"] == jb["stats"] and ja["events"] == jb["events"]
    assert ja["scenario_file"] == str(f)


def test_scenarios_lists_one_line_each(capsys):
    assert cli.main(["scenarios"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == scenarios.names()


# ---------------------------------------------------------------- the op syntax

MINIMAL = '''\
name = "t"
sim = "1ms"
[vm]
arch = "arm64"
vcpus = 4
[[vm.program]]
ops = """
{ops}
"""
'''


def _prog(ops, n=4):
    sc = scenarios.loads(MINIMAL.replace("{ops}", ops), "t.toml")
    progs, _ = programs_for(sc, AddrVm("arm64"), n)
    return progs


def test_op_syntax_covers_the_builders():
    progs = _prog("""set_handler 1.5us
        timer_arm exp 2ms period=4ms
        sgi 3 1,2 ; sgi 4 all-but-self; ipi 5 next
        irq_enable 40 ; irq_disable 41 ; set_priority 40 0x80 ; set_pmr 0xF0
        mask ; unmask ; dist_enable off ; dist_enable
        route_spi 40 vcpu:1 ; set_reg x2 7 ; sync x1 ; sync 9
        loop 3 { compute uniform 1us 2us
        }
        timer_cancel
        wake $vcpu
        psci CPU_OFF""")
    want = g.Program([g.set_handler(1500), g.timer_arm_exp(2_000_000, 4_000_000),
                      g.sgi(3, [1, 2]), g.sgi(4, "all-but-self"), g.sgi(5, "next"),
                      g.irq_enable(40), g.irq_disable(41), g.set_priority(40, 0x80),
                      g.set_pmr(0xF0), g.mask(), g.unmask(), g.dist_enable(False),
                      g.dist_enable(True), g.route_spi(40, 0x1), g.set_reg(2, 7),
                      g.sync_reg(1), g.sync(9),
                      g.loop([g.compute_uniform(1000, 2000)], count=3),
                      g.timer_cancel(), g.wake(2), g.psci(0x84000002)])
    assert progs[2] == want


def test_set_handler_iret_option():
    progs = _prog("set_handler 2us iret=no\nset_handler 3us iret=yes\nloop { unmask ; wfi }")
    assert progs[0] == g.Program([g.set_handler(2000, iret=False), g.set_handler(3000),
                                  g.loop([g.unmask(), g.wfi()])])
    with pytest.raises(scenarios.ScenarioError, match="iret=maybe"):
        _prog("set_handler 2us iret=maybe\nloop { wfi }")


def test_ops_as_an_array_of_strings():
    text = ('name = "t"\nsim = "1ms"\n[vm]\nvcpus = 2\n[[vm.program]]\n'
            'ops = ["loop {", "compute exp 20us", "wake random-other", "wfi", "}"]\n')
    sc = scenarios.loads(text, "t.toml")
    progs, _ = programs_for(sc, None, 2)
    assert progs[0] == g.Program([g.loop([g.compute_exp(20_000), g.wake_random_other(),
                                          g.wfi()])])


def test_durations():
    assert _ops.duration("20us") == 20_000 and _ops.duration("4ms") == 4_000_000
    assert _ops.duration("1s") == 10 ** 9 and _ops.duration(7, bare_ns=True) == 7
    assert _ops.duration("0.5us") == 500 and _ops.duration("3ns") == 3
    assert _ops.duration(0) == 0 and _ops.duration("0") == 0
    for bad in ("0.5ns", "5 parsecs", "-1us", -1, True, 1.5, 7, "7", "3 ns", " 3ns", "5 ms",
                "4611686018427387905ns", "1" * 60 + "s", "²ms"):
        with pytest.raises(ValueError):
            _ops.duration(bad)


# ---------------------------------------------------------------- errors: FILE:LINE: KEY:

GOOD = '''\
name = "bad"
sim = "1ms"

[host]
cpus = 4

[vm]
arch = "arm64"
vcpus = 8
per_vm = 4

[[vm.program]]
vcpus = "all"
ops = """
loop {
    compute exp 20us
    wake random-other
    wfi
}
"""

[[vm.source]]
intids = "32:40"
route = "(intid - 32) % nr_vcpus"
poisson = "4ms"
'''


def _err(tmp_path, text):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ScenarioError) as ei:
        scenarios.build(str(f))
    return str(ei.value), str(f)


def test_good_file_builds(tmp_path):
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    host, sim_ns, sc = scenarios.build(str(f))
    assert [vm.nr_vcpus for vm in host.vms] == [4, 4] and sim_ns == 1_000_000
    host.run(sim_ns)
    assert host.halts > 0


@pytest.mark.parametrize("old,new,line,key,words", [
    # unknown keys, at every level
    ('cpus = 4', 'cpus = 4\nturbo = true', 6, "host.turbo", "unknown key"),
    ('per_vm = 4', 'per_vm = 4\nvcpu = 3', 11, "vm.vcpu", "unknown key"),
    ('vcpus = "all"', 'vcpus = "all"\nwho = 1', 14, "vm.program[0].who", "unknown key"),
    ('poisson = "4ms"', 'poisson = "4ms"\nrate = 3', 26, "vm.source[0].rate", "unknown key"),
    # wrong types
    ('cpus = 4', 'cpus = "four"', 5, "host.cpus", "per-vcpu"),
    ('vcpus = 8', 'vcpus = "8"', 9, "vm.vcpus", "must be an integer"),
    ('sim = "1ms"', 'sim = "1 fortnight"', 2, "sim", "not a duration"),
    ('vcpus = "all"', 'vcpus = true', 13, "vm.program[0].vcpus", "must be"),
    # vCPU counts over the arch limit
    ('per_vm = 4', 'per_vm = 600', 10, "vm.per_vm", "KVM_MAX_VCPUS"),
    ('vcpus = 8\nper_vm = 4', 'vcpus = 600', 9, "vm.vcpus", "over the arm64 limit"),
    # programs that jump out of range, and other op errors
    ('    wfi\n}', '    wfi\n    psci FN64_CPU_ON target=vcpu:1 entry=@99 context=1\n}',
     19, "vm.program[0].ops", "jumps out of range"),
    ('    wake random-other', '    wake_up random-other', 17, "vm.program[0].ops",
     "unknown op"),
    ('    compute exp 20us', '    compute exp 20 parsecs', 16, "vm.program[0].ops",
     "takes 2 argument"),
    ('    wfi\n}', '    wfi\n', 15, "vm.program[0].ops", "never closed"),
    ('    wfi\n}', '    wfi\n    wake 9\n}', 14, "vm.program[0].ops", "vCPU 0 of a VM of 4"),
    ('    wfi\n}', '    wfi\n    wake vcpu:9\n}', 19, "vm.program[0].ops", "integer expression"),
    # sources routed to nothing
    ('route = "(intid - 32) % nr_vcpus"', 'route = "intid - 32"', 24, "vm.source[0].route",
     "does not have"),
    ('intids = "32:40"', 'intids = "32:400"', 23, "vm.source[0].intids", "not an SPI"),
    ('route = "(intid - 32) % nr_vcpus"', 'route = "intid % cpus"', 24, "vm.source[0].route",
     "unknown name"),
    ('poisson = "4ms"', '', 22, "vm.source[0]", "exactly one of"),
    ('vcpus = "all"', 'vcpus = [5]', 13, "vm.program[0].vcpus", "not in a VM of 4"),
])
def test_errors_name_file_line_and_key(tmp_path, old, new, line, key, words):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    msg, path = _err(tmp_path, text)
    assert msg.startswith(f"{path}:{line}: {key}: "), msg
    if words:
        assert words in msg, msg


def test_selector_picking_nothing_is_allowed_but_double_programs_are_not(tmp_path):
    text = GOOD.replace('vcpus = "all"', 'vcpus = "0::2"') + \
        '\n[[vm.program]]\nvcpus = "0:2"\nops = "wfi"\n'
    msg, path = _err(tmp_path, text)
    assert msg.startswith(f"{path}:28: vm.program[1].vcpus: vCPU 0 already has a program")


def test_syntax_error_names_the_line(tmp_path):
    msg, path = _err(tmp_path, GOOD.replace('cpus = 4', 'cpus = = 4'))
    assert msg.startswith(f"{path}:5: ")


def test_unknown_scenario_and_missing_file():
    with pytest.raises(ScenarioError, match="unknown scenario"):
        scenarios.build("no-such")
    with pytest.raises(ScenarioError, match="no such scenario file"):
        scenarios.build("/no/such/file.toml")


def test_x86_msi_sources(tmp_path):
    text = ('name = "msi"\nsim = "2ms"\n[vm]\narch = "x86"\nvcpus = 4\n'
            '[[vm.program]]\nops = "loop { compute 10us ; hlt\\n }"\n'
            '[[vm.source]]\napic_ids = "all"\nvector = 0x40\nperiod = "100us"\n')
    f = tmp_path / "msi.toml"
    f.write_text(text)
    host, sim_ns, _ = scenarios.build(str(f))
    host.run(sim_ns)
    assert host.halts > 0
    f.write_text(text.replace("0x40", "3"))
    with pytest.raises(ScenarioError, match=r"msi.toml:10: vm.source\[0\].vector: 3 is outside"):
        scenarios.build(str(f))
