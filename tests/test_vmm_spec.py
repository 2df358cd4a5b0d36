"""A VMM policy of one's own: ``kvmwake.vmm.load_policy``, ``kvmwake run --vmm`` and a
scenario's ``vmm = "package.module:Class"``; and the uapi names at the top level."""

from __future__ import annotations

import sys
import textwrap

import pytest

import kvmwake as kw
from kvmwake.cli.main import main
from kvmwake.errors import ScenarioError
from kvmwake.scenarios import build, loads

POLICY_MODULE = textwrap.dedent('''
    import kvmwake as kw

    class Counting(kw.vmm.Vmm):
        made = 0

        def __init__(self):
            Counting.made += 1
            self.exits = 0

        def handle_exit(self, vcpu, ex):
            self.exits += 1
            return super().handle_exit(vcpu, ex)

    class NeedsArg(kw.vmm.Vmm):
        def __init__(self, x):
            self.x = x

    class NotAPolicy:
        pass
''')


@pytest.fixture
def policy_module(tmp_path, monkeypatch):
    (tmp_path / "kw_test_policies.py").write_text(POLICY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "kw_test_policies"
    sys.modules.pop("kw_test_policies", None)


def test_load_policy_names_and_errors(policy_module):
    assert kw.vmm.load_policy("reference") is kw.vmm.ReferenceVmm
    assert kw.vmm.load_policy("kvmwake.vmm:DenyAllVmm") is kw.vmm.DenyAllVmm
    cls = kw.vmm.load_policy(f"{policy_module}:Counting")
    assert issubclass(cls, kw.vmm.Vmm) and cls.__name__ == "Counting"
    assert kw.vmm.policy_spec(cls) == f"{policy_module}:Counting"
    assert kw.vmm.policy_spec(kw.vmm.ReferenceVmm) == "reference"
    for spec, words in ((f"{policy_module}:NeedsArg", "needs arguments"),
                        (f"{policy_module}:NotAPolicy", "not a subclass"),
                        (f"{policy_module}:Missing", "has no 'Missing'"),
                        ("no_such_module_kw:X", "cannot import"),
                        ("Counting", "package.module:Class"),
                        ("a b:C", "package.module:Class"),
                        (f"{policy_module}:", "package.module:Class"),
                        (3, "not 3")):
        with pytest.raises(ValueError, match=words):
            kw.vmm.load_policy(spec)


def test_cli_vmm_option(policy_module, capsys):
    assert main(["run", "default", "--sim-ms", "1", "--no-out", "-q",
                 "--vmm", f"{policy_module}:Counting"]) == 0
    mod = sys.modules[policy_module]
    assert mod.Counting.made >= 1
    assert main(["run", "default", "--sim-ms", "1", "--no-out", "-q",
                 "--vmm", f"{policy_module}:NeedsArg"]) == 2
    err = capsys.readouterr().err
    assert "NeedsArg() needs arguments" in err


def test_scenario_vmm_spec(policy_module):
    text = textwrap.dedent(f'''
        name = "own-policy"
        sim = "1ms"
        [vm]
        arch = "arm64"
        vcpus = 2
        vmm = "{policy_module}:Counting"
        [[vm.program]]
        ops = "loop {{ compute 20us ; wfi }}"
    ''')
    sc = loads(text, "own.toml")
    host, sim_ns, _ = build(sc)
    assert type(host.vms[0].vmm).__name__ == "Counting"
    host.run(sim_ns)
    bad = text.replace(f"{policy_module}:Counting", f"{policy_module}:Nope")
    with pytest.raises(ScenarioError, match=r"own.toml:\d+: vm.vmm: .*has no 'Nope'"):
        loads(bad, "own.toml")


def test_uapi_names_at_the_top_level():
    assert kw.MpState.HALTED == 3 and kw.ExitReason.INTR == 10
    assert kw.SystemEventType.SUSPEND == 5 and kw.PsciFn.FN64_CPU_ON == 0xC4000003
    assert kw.PsciRet.ALREADY_ON == -4 and kw.KvmReg.PC == 0x6030000000100040
    assert kw.VcpuFeature.PSCI_0_2 == 2 and kw.PsciVersion.V1_3 == 0x10003
    assert kw.vmm.ReferenceVmm is kw.vmm.load_policy("reference")
