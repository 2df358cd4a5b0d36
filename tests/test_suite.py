"""``kvmwake kernel suite``: configuration lists, ``--only``, the validation table,
and runs (on synthetic recordings with ``--reuse`` everywhere; one real run on tiny
configurations where ``/dev/kvm`` works)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import kvmwake.kernel as K
from kvmwake.kernel import cli as KC
from kvmwake.kernel import compare as CM
from kvmwake.kernel import suite as S
from kvmwake.kernel import synthetic as Y
from kvmwake.kernel import workload as W
from kvmwake.kernel.simulate import SimParams
from kvmwake.model import COST_DEFAULTS


# ---------------------------------------------------------------- configurations

def test_builtin_list_covers_every_value_of_the_matrix():
    cs = S.BUILTIN
    assert {c.vcpus for c in cs} == {1, 2, 4, 6, 8}
    assert {c.pinned for c in cs} == {True, False}
    assert {c.idle for c in cs} == set(W.SUITE_IDLE)
    assert {c.cap for c in cs} == {None, 0, 50_000, 400_000}
    assert {c.workload for c in cs} == {"msi", "ipi"}
    assert len({c.name for c in cs}) == len(cs) < 40        # a subset, not the product
    for c in cs:
        W.parse(c.idle_spec(200_000))                        # every idle spec is valid
        assert c.workload == "msi" or c.vcpus >= 2
        assert S.config_from_dict({k: v for k, v in c.__dict__.items()}) == c
    assert len(S.FIRST) == 12 and S.FIRST[0].name == "short-1vcpu-default"


def test_suite_idle_specs():
    assert W.suite_idle_spec("periodic", 0) == "fixed:100us"
    assert W.suite_idle_spec("near-ceiling", 200_000) == "uniform:150us-250us"
    assert W.suite_idle_spec("near-ceiling", 50_000) == "uniform:38us-62us"
    assert W.suite_idle_spec("mixed", 1) == "mixed"
    assert W.suite_idle_spec("exp:30us", 1) == "exp:30us"
    with pytest.raises(W.SpecError, match="positive polling ceiling"):
        W.suite_idle_spec("near-ceiling", 0)
    with pytest.raises(W.SpecError):
        W.suite_idle_spec("bogus", 1)
    # cap 0: near-ceiling is made for the module's ceiling
    c = S.config_from_dict({"vcpus": 1, "idle": "near-ceiling", "cap": 0})
    assert c.idle_spec(200_000) == "uniform:150us-250us"
    c = S.config_from_dict({"vcpus": 1, "idle": "near-ceiling", "cap": "400us"})
    assert c.cap == 400_000 and c.idle_spec(200_000) == "uniform:300us-500us"


GOOD = """
[defaults]
wakes = 500
pinned = false
[[config]]
vcpus = 2
idle = "mixed"
[[config]]
name = "mine"
workload = "ipi"
vcpus = 4
idle = "uniform:10us-20us"
cap = 50000
pinned = true
wakes = 100
[[config]]
vcpus = 1
idle = "long"
cap = "default"
"""


def test_parse_configs():
    a, b, c = S.parse_configs(GOOD)
    assert a == S.Config("msi-2vcpu-unpinned-mixed-default", 2, "mixed", None, False, "msi", 500)
    assert b == S.Config("mine", 4, "uniform:10us-20us", 50_000, True, "ipi", 100)
    assert c.name == "msi-1vcpu-unpinned-long-default" and c.wakes == 500


@pytest.mark.parametrize("text, message", [
    ("[[config]]\nvcpus = 1\n", "idle is missing"),
    ("[[config]]\nidle = 'short'\n", "vcpus is missing"),
    ("[[config]]\nvcpus = 0\nidle = 'short'\n", "vcpus must be"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\ncolour = 1\n", "unknown keys colour"),
    ("[[config]]\nvcpus = 2\nidle = 'short'\nworkload = 'udp'\n", "workload must be"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\nworkload = 'ipi'\n", "at least 2 vCPUs"),
    ("[[config]]\nvcpus = 1\nidle = 'sometimes'\n", "idle:"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\ncap = 'soon'\n", "cap"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\ncap = -1\n", "cap -1"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\ncap = true\n", "cap True"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\npinned = 'yes'\n", "pinned must be"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\nwakes = 0\n", "wakes must be"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\nname = '../x'\n", "names a folder"),
    ("[[config]]\nvcpus = 1\nidle = 'short'\n[[config]]\nvcpus = 1\nidle = 'short'\n",
     "is used by config 1"),
    ("vcpus = 1\n", "unknown top-level keys vcpus"),
    ("[defaults]\nwakes = 1\n", "no \\[\\[config\\]\\]"),
    ("[defaults]\nname = 'x'\n[[config]]\nvcpus = 1\nidle = 'short'\n", "without a name"),
    ("[[config]\n", "not TOML"),
])
def test_config_errors(text, message):
    with pytest.raises(S.SuiteError, match=message):
        S.parse_configs(text, "f.toml")


def test_only_selects_in_list_order():
    cs = S.parse_configs(GOOD)
    assert [c.name for c in S.select(cs, ["msi-1vcpu-unpinned-long-default", "mine"])] == [
        "mine", "msi-1vcpu-unpinned-long-default"]
    assert S.select(cs, None) == cs
    with pytest.raises(S.SuiteError, match="no configuration named nope"):
        S.select(cs, ["nope"])


def test_cli_list_only_and_bad_input(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text(GOOD)
    assert KC.main(["suite", "-o", str(tmp_path / "o"), "--config", str(f), "--list",
                    "--only", "mine"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mine: ipi, 4 vCPU(s), pinned") and out.count("\n") == 1
    assert KC.main(["suite", "-o", str(tmp_path / "o"), "--list"]) == 0
    assert capsys.readouterr().out.count("\n") == len(S.BUILTIN)
    assert KC.main(["suite", "-o", str(tmp_path / "o"), "--only", "nope"]) == 2
    assert "no configuration named nope" in capsys.readouterr().err
    assert KC.main(["suite", "-o", str(tmp_path / "o"), "--config", str(tmp_path / "x")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert KC.main(["suite", "-o", str(tmp_path / "o"), "--seeds", "0"]) == 2
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the table

def _crit(**status):
    out = []
    for key, label, bound in CM.CRITERIA:
        st, val = status.get(key, ("met", 1.02 if key not in ("split", "split_per_vcpu",
                                                               "preemption", "migration",
                                                               "replay") else 0))
        out.append({"name": key, "label": label, "bound": bound, "value": val, "status": st,
                    "reason": None})
    return out


def _row(name, seed, status, **kw):
    cfg = S.Config(name, 2, "mixed").__dict__
    return {"name": name, "seed": seed, "config": cfg, "status": status, "halts_k": 100,
            "halts_m": 98, "foreign_pct": 1.25, "criteria": kw.pop("criteria", _crit()),
            "saturated_reason": kw.pop("saturated_reason", None), **kw}


def test_a_recorded_only_row_in_the_table():
    md = S.markdown([{"name": "x", "seed": 0, "config": {"wakes": 10}, "status": "recorded",
                      "foreign_pct": 0.5}])
    assert md.splitlines()[3].endswith("| 0.5 | recorded, not compared |")


def test_markdown_table_on_synthetic_rows():
    rows = [_row("a", 0, "pass"),
            _row("a", 1, "fail", criteria=_crit(p99=("missed", 0.41),
                                                 preemption=("not checked", None))),
            _row("b", 0, CM.SATURATED, saturated_reason="60 halts for 3000 wakes",
                 criteria=_crit(**{k: (CM.SATURATED, 1.0) for k, _, _ in CM.CRITERIA})),
            {"name": "c", "seed": 0, "config": S.Config("c", 2, "mixed").__dict__,
             "status": "error", "error": "RecordError: no | /dev/kvm"}]
    md = S.markdown(rows).splitlines()
    assert len(md) == 3 + 4
    head = md[0].split(" | ")
    assert "send -> halt end p99" in head and "migration rate" in head
    assert md[2].startswith("|  |  |  | bound | 5 pp | 5 pp | 15 % | 25 % | 40 %")
    cells = [c.strip() for c in md[3].strip("|").split("|")]
    assert cells[:4] == ["a", "0", "3000", "100 / 98"] and cells[-1] == "**pass**"
    assert cells[4] == "+0.0 pp" and cells[6] == "x1.02" and cells[-2] == "1.2"
    assert len(cells) == len(head)
    row1 = md[4]
    assert "x0.41 **missed**" in row1 and "not checked" in row1 and row1.endswith("**FAIL** |")
    assert "saturated, not scored (60 halts for 3000 wakes)" in md[5]
    assert "(not scored)" in md[5]
    assert "error: RecordError: no / /dev/kvm" in md[6]               # no stray column
    assert len(md[6].strip("|").split("|")) == len(head)


# ---------------------------------------------------------------- runs

def _made_with():
    costs = {**COST_DEFAULTS, "wake_to_run_ns": 30_000, "context_switch_ns": 6_000,
             "vm_entry_ns": 800, "vm_exit_ns": 800}
    return SimParams(costs=costs, handler_ns=12_000, delivery_ns=900, lateness_ns=15_000,
                     arrivals="target", injector_idle_wake_ns=15_000, injector_ns=1_000)


def test_reuse_runs_calibrate_and_compare_on_recordings(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[config]]\nname = "two"\nvcpus = 2\nidle = "mixed"\n'
                   '[[config]]\nname = "sat"\nvcpus = 6\nidle = "short"\n'
                   '[[config]]\nname = "none"\nvcpus = 1\nidle = "long"\n')
    out = tmp_path / "out"
    Y.make_recording(out / "two" / "seed0", "mixed", 300, 2, 2, None, _made_with(), seed=0)
    Y.make_recording(out / "sat" / "seed0", "short", 300, 6, 2, None, _made_with())
    argv = ["suite", "-o", str(out), "--config", str(cfg), "--reuse", "--seeds", "1",
            "--quick", "--no-png"]
    assert KC.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 runs: 1 pass, 1 saturated, not scored, 1 not recorded" in printed
    doc = json.loads((out / "suite.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["two"]["status"] == "pass" and rows["two"]["missed"] == []
    assert rows["sat"]["status"] == CM.SATURATED
    assert rows["none"]["status"] == "not recorded"
    assert (out / "two" / "seed0" / "compare.json").exists()
    md = (out / "suite.md").read_text()
    assert md.count("\n") == 3 + 3 and "| two | 0 |" in md
    # --only runs one again and keeps the other rows
    assert KC.main(argv + ["--only", "two"]) == 0
    doc2 = json.loads((out / "suite.json").read_text())
    assert [r["name"] for r in doc2["rows"]] == ["two", "sat", "none"]


def test_ipi_needs_a_recorder_with_the_workload(tmp_path):
    from kvmwake.kernel import record as REC
    cfg = S.config_from_dict({"vcpus": 2, "idle": "short", "workload": "ipi"})
    has = "workload" in REC.RecordOptions.__dataclass_fields__
    if has:
        assert S.record_options(cfg, 0, tmp_path, 200_000).workload == "ipi"
    else:
        with pytest.raises(S.SuiteError, match="no '--workload ipi'"):
            S.record_options(cfg, 0, tmp_path, 200_000)
    o = S.record_options(S.config_from_dict({"vcpus": 3, "idle": "periodic", "cap": "50us",
                                             "pinned": False}), 1, tmp_path, 200_000)
    assert (o.vcpus, o.idle, o.halt_poll_ns, o.seed, o.pin) == (3, "fixed:100us", 50_000, 1,
                                                                False)


AVAIL = K.available()


@pytest.mark.kvm
def test_suite_end_to_end_on_tiny_configurations(tmp_path, capsys):
    if not AVAIL:
        pytest.skip(f"no usable /dev/kvm: {AVAIL.reason}")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[defaults]\nwakes = 60\n[[config]]\nname = "tiny"\nvcpus = 1\n'
                   'idle = "short"\n[[config]]\nname = "tiny-unpinned"\nvcpus = 2\n'
                   'idle = "periodic"\npinned = false\ncap = "50us"\n')
    out = tmp_path / "out"
    assert KC.main(["suite", "-o", str(out), "--config", str(cfg), "--seeds", "1", "--tries",
                    "1", "--quiet-pct", "100", "--wait-s", "0", "--quick", "--no-png"]) == 0
    rows = json.loads((out / "suite.json").read_text())["rows"]
    for r in rows:
        if r["status"] == "error" and r["error"].startswith("RecordError"):
            # the recorder could not record here now (another recording holds the lock,
            # tracefs busy): the machine's state, not the suite's
            pytest.skip(f"the recorder refused: {r['error']}")
    assert [r["name"] for r in rows] == ["tiny", "tiny-unpinned"]
    for r in rows:
        assert r["status"] in ("pass", "fail", CM.SATURATED), r
        assert len(r["criteria"]) == len(CM.CRITERIA)
        meta = json.loads((out / r["name"] / "seed0" / "metadata.json").read_text())
        assert meta["workload"]["wakes"] == 60
        # the scheduler's rates: the recording's trace against the model's timeline
        c = json.loads((out / r["name"] / "seed0" / CM.COMPARE_JSON).read_text())
        if meta["sched_trace"]["mode"] == "tracefs":
            assert c["sched"]["reason"] is None
            for side in ("kernel", "model"):
                assert c["sched"][side]["migration"]["pooled"]["n"] > 0, side
        else:
            assert c["sched"]["reason"] == "the recording has no scheduler trace"
    meta = json.loads((out / "tiny-unpinned" / "seed0" / "metadata.json").read_text())
    assert meta["workload"]["canonical"] == "fixed:100us" and meta["halt_poll_cap"] == 50_000
    assert meta["pinning"]["enabled"] is False
    assert (out / "suite.md").read_text().count("\n") == 3 + 2


def test_against_scores_one_recording_of_the_kernel_against_another(tmp_path, capsys):
    """--against: the kernel's own spread.  A recording against a copy of itself meets
    every criterion exactly; against one made with other costs it misses; against
    another configuration it is an error row, not a score."""
    import shutil
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[config]]\nname = "two"\nvcpus = 2\nidle = "mixed"\n'
                   '[[config]]\nname = "one"\nvcpus = 1\nidle = "mixed"\n')
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    Y.make_recording(a / "two" / "seed0", "mixed", 300, 2, 2, None, _made_with(), seed=0)
    Y.make_recording(a / "one" / "seed0", "mixed", 300, 1, 2, None, _made_with(), seed=0)
    shutil.copytree(a, b)
    slow = _made_with()
    slow.costs["wake_to_run_ns"] = 90_000
    Y.make_recording(c / "two" / "seed0", "mixed", 300, 2, 2, None, slow, seed=0)
    Y.make_recording(c / "one" / "seed0", "mixed", 200, 1, 2, None, _made_with(), seed=0)
    base = ["suite", "-o", str(a), "--config", str(cfg), "--seeds", "1"]
    assert KC.main(base + ["--against", str(b)]) == 0
    printed = capsys.readouterr().out
    assert "2 pairs of recordings: 2 pass" in printed
    doc = json.loads((a / S.AGAINST_JSON).read_text())
    for row in doc["rows"]:
        for e in row["criteria"]:
            assert e["status"] in ("met", "not checked"), e
            if e["name"] in ("median_wait", "p90", "p99") and e["value"] is not None:
                assert e["value"] == 1.0
    assert KC.main(base + ["--against", str(c)]) == 0
    rows = {r["name"]: r for r in json.loads((a / S.AGAINST_JSON).read_text())["rows"]}
    assert rows["two"]["status"] == "fail" and "median_wait" in rows["two"]["missed"]
    assert rows["one"]["status"] == "error" and "its wakes is 200, not 300" in rows["one"]["error"]
    md = (a / S.AGAINST_MD).read_text()
    label, bound = next((lb, b) for k, lb, b in CM.CRITERIA if k == "median_wait")
    assert f"| {label} | {bound} | 1 | 1 |" in md       # missed once, in one scored pair
    assert not (a / "suite.json").exists()          # nothing recorded or simulated
    assert KC.main(["suite", "-o", str(tmp_path / "empty"), "--config", str(cfg),
                    "--against", str(b)]) != 0
