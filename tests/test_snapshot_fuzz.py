"""The structure-aware snapshot fuzzer (tests/fuzz_snapshot.py): a short campaign over
every seed state, and the harness itself (one field per mutation, determinism, and a
crashing or hanging child isolated and named).  Long campaigns: tools/fuzz_snapshots.py.
"""

from __future__ import annotations

import os

import pytest

import fuzz_snapshot as F
import kvmwake as kw
from kvmwake import snapshot as S

#: Cases of the short campaign (tools/fuzz_snapshots.py runs long ones).
SHORT_CASES = 300


@pytest.fixture(scope="module")
def seeds():
    return F.seed_states(sorted(F.SEEDS))


def test_the_struct_mirrors_match_the_engine():
    F.check_layouts()


def test_at_least_six_seed_states_each_restores_and_runs(seeds):
    assert len(seeds) >= 6
    archs = set()
    for name, data in seeds.items():
        host = kw.Host.restore(data)
        archs.add(host.arch)
        host.run(host.now + F.RUN_NS)
        kw.Host.restore(host.snapshot())
    assert archs == {"arm64", "x86"}
    # The arm64 seed holds what the brief of the fuzzer asks for.
    h = kw.Host.restore(seeds["arm64-suspended"])
    vm = h.vms[0]
    assert vm.vcpus[0]._held is not None
    assert vm.vcpus[0].get_mp_state() == kw.uapi.MpState.SUSPENDED
    assert vm.vcpus[1].irq_state(40)["target"] == 1
    h = kw.Host.restore(seeds["x86-mid-halt"])
    assert {v.thread_state for v in h.vms[0].vcpus} & {"POLLING", "BLOCKED"}


def test_a_mutation_changes_one_field_and_keeps_a_valid_checksum(seeds):
    for i in range(60):
        name, desc, data = F.make_case(seeds, 3, i)
        assert F.make_case(seeds, 3, i) == (name, desc, data)          # deterministic
        assert data != seeds[name]
        try:
            S.parse(data)
        except kw.SnapshotError as exc:
            assert "checksum" not in str(exc)
        h0, b0 = F.unframe(seeds[name])
        h1, b1 = F.unframe(data)
        if b0 != b1:
            # One field of one record: the changed bytes lie within one field.
            diff = [k for k in range(min(len(b0), len(b1))) if b0[k] != b1[k]]
            assert h0 == h1 and len(b0) == len(b1)
            assert diff[-1] - diff[0] < 8 or "[" in desc.split(":")[0], desc
        else:
            assert h0 != h1, desc


def test_a_short_campaign_finds_no_crash_hang_or_broken_state(seeds):
    res = F.campaign(seeds, seed=20261204, cases=SHORT_CASES, jobs=2, batch=SHORT_CASES // 2)
    c = res["counts"]
    assert sum(c.values()) == SHORT_CASES
    assert res["findings"] == [], res["findings"][:5]
    assert c["crash"] == c["hang"] == c["broken"] == 0
    # Both sides are exercised: mutations that are refused and ones that run.
    assert c["rejected"] > SHORT_CASES // 10 and c["ran"] > SHORT_CASES // 10, c


def test_the_harness_isolates_a_crashing_and_a_hanging_case(seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMWAKE_FUZZ_SELFTEST", "1")
    spec = str(tmp_path / "spec.json")
    F.write_spec(spec, {k: seeds[k] for k in ("default",)}, 5)
    answers = F.run_batch(spec, [0, 1, -1, 2, -2, 3], timeout=10)
    got = {a["i"]: a["outcome"] for a in answers}
    assert got[-1] == "crash" and got[-2] == "hang"
    assert all(got[i] in ("rejected", "ran", "stopped") for i in (0, 1, 2, 3)), got


def test_the_build_flag_is_visible():
    import kvmwake._core as core
    assert isinstance(core.DEBUG, bool) and core.CHECK_EVERY >= 1
    want = os.environ.get("KVMWAKE_EXPECT_DEBUG")
    if want is not None:                  # .ci/run says which build it runs
        assert core.DEBUG == (want == "1")
    assert (core.MAX_NOW, core.MAX_TIME, core.MAX_SPAN, core.MAX_SEQ) == (
        kw.model.MAX_NOW, kw.model.MAX_TIME, kw.model.MAX_SPAN, kw.model.MAX_SEQ)


def test_the_debug_build_checks_the_state_during_runs():
    """In the debug build a run checks the whole state every CHECK_EVERY events (and
    the run goes on identically: the same events as the reference engine)."""
    import kvmwake._core as core
    if not core.DEBUG:
        pytest.skip("the periodic checks exist in the debug build only")
    from kvmwake import scenarios
    host, _, _ = scenarios.build("ipi-storm", vcpus=8, host_cpus=2, seed=1)
    before = core.DEBUG_CHECKS
    host.run(20_000_000)
    assert host.events > 2 * core.CHECK_EVERY
    assert core.DEBUG_CHECKS - before >= host.events // core.CHECK_EVERY - 1
    ref, _, _ = scenarios.build("ipi-storm", vcpus=8, host_cpus=2, seed=1, engine="reference")
    ref.run(20_000_000)
    assert (ref.events, ref.halts) == (host.events, host.halts)
