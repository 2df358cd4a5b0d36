"""Hostile scenario files: every case loads or fails with ``FILE:LINE: KEY: message``,
ranges and sizes are checked before anything is expanded, and a short run of the
fuzzer (``tools/fuzz_scenarios.py``) finds nothing."""

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from kvmwake import scenarios
from kvmwake.errors import ScenarioError

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))           # the workers import it by name
import fuzz_scenarios as fuzz  # noqa: E402

IPI = (scenarios.BUILTIN_DIR / "ipi-storm.toml").read_text()
SUSPEND = (scenarios.BUILTIN_DIR / "suspend-cycle.toml").read_text()


def _reject(tmp_path, text, key, words=""):
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(ScenarioError) as ei:
        scenarios.load(f)
    msg = str(ei.value)
    m = fuzz.ERROR_FORM.match(msg)
    assert m and m.group("file") == str(f), msg
    assert m.group("key") == key, msg
    assert words in msg, msg
    return msg


@pytest.mark.parametrize("insert, key", [
    ('"a=b" = 1', "host.a=b"), ('"a]b" = 1', "host.a]b"), ("'x]y' = 2", "host.x]y"),
    ('"q\\"]" = 3', 'host.q"]'), ('"= ]" = 1', "host.= ]")])
def test_quoted_keys_with_equals_and_brackets(tmp_path, insert, key):
    msg = _reject(tmp_path, IPI.replace("[host]\n", "[host]\n" + insert + "\n"), key,
                  "unknown key")
    line = IPI.split("\n").index("[host]") + 2                # the inserted line
    assert f"s.toml:{line}: " in msg


def test_quoted_table_name_with_bracket(tmp_path):
    _reject(tmp_path, IPI.replace("[host]", '["ho]st"]\nx = 1\n[host]'), "ho]st", "unknown key")


def test_huge_intid_range_is_checked_before_expanding(tmp_path):
    # A 120-byte file used to expand 4e9 INTIDs (MemoryError).
    _reject(tmp_path, SUSPEND.replace("intids = 40", 'intids = "32:4000000000"'),
            "vm.source[0].intids", "not an SPI range")


def _bounded(code, seconds=30, mem=1 << 30):
    """Run code in a subprocess with an address-space limit; (rc, stderr)."""
    pre = textwrap.dedent(f"""
        import resource, kvmwake.scenarios, numpy
        soft = int(open('/proc/self/statm').read().split()[0]) * 4096 + {mem}
        resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
    """)
    p = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=seconds, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("plant", [
    "for v in 0..4000000000 {\n}", "for v in 0..4000000000 {\n    compute 1us\n}",
    "for a in 0..100000 {\n    for b in 0..100000 {\n        hvc\n    }\n}"])
def test_huge_for_ranges_fail_fast_and_small(tmp_path, plant):
    # An 81-byte file with `for v in 0..4000000000` ran for minutes and grew past 2.7 GB.
    text = 'sim = "1ms"\n[vm]\nvcpus = 4\n[[vm.program]]\nops = \'\'\'\n' + plant + "\nwfi\n'''\n"
    f = tmp_path / "for.toml"
    f.write_text(text)
    rc, out = _bounded(f"""
        from kvmwake import scenarios
        try:
            scenarios.load({str(f)!r})
        except scenarios.ScenarioError as e:
            print(e)
    """, seconds=60)
    assert rc == 0, out
    assert re.search(rf"^{re.escape(str(f))}:[678]: vm.program\[0\].ops: .*would exceed", out,
                     re.M), out


@pytest.mark.parametrize("old, new, key, words", [
    ('sim = "100ms"', "sim = 20", "sim", "no unit"),
    ('sim = "100ms"', 'sim = "20"', "sim", "no unit"),
    ('sim = "100ms"', 'sim = "5 ms"', "sim", "not a duration"),
    ('tick = "4ms"', 'tick = "99999999999s"', "vm.tick", "longest duration"),
    ('tick = "4ms"', 'tick = 4', "vm.tick", "no unit"),
    ('halt_poll_ns = "200us"', 'halt_poll_ns = "5s"', "host.halt_poll_ns", "outside"),
    ('costs = { wake_to_run_ns = "5us" }', 'costs = { wake_to_run_ns = "2000s" }',
     "host.costs.wake_to_run_ns", "outside"),
])
def test_ranges_and_units_at_load(tmp_path, old, new, key, words):
    assert old in IPI
    _reject(tmp_path, IPI.replace(old, new, 1), key, words)


@pytest.mark.parametrize("old, new, key, words", [
    ('poisson = "5ms"', 'poisson = "2000000000s"', "vm.source[0].poisson", "outside"),
    ('poisson = "5ms"', 'period = "0ms"', "vm.source[0].period", "outside"),
    ('poisson = "5ms"', 'period = "1ms"\nphase = "99999999999999s"', "vm.source[0].phase",
     "longest"),
    ('poisson = "5ms"', 'times = ["2ms", "1ms"]', "vm.source[0].times[1]", "earlier"),
    ('poisson = "5ms"', 'times = ["1ms", 5]', "vm.source[0].times[1]", "no unit"),
])
def test_source_ranges_at_load(tmp_path, old, new, key, words):
    # These were plain ValueErrors from the build, without FILE:LINE.
    assert old in SUSPEND
    _reject(tmp_path, SUSPEND.replace(old, new, 1), key, words)


def test_bare_ns_keys_take_numbers(tmp_path):
    f = tmp_path / "ok.toml"
    f.write_text(IPI.replace('halt_poll_ns = "200us"', "halt_poll_ns = 200000"))
    assert scenarios.load(f).module_params["halt_poll_ns"] == 200_000


def test_fuzz_short_campaign(tmp_path):
    """A short run of the fuzzer: every case loads and builds or is rejected cleanly
    (tools/fuzz_scenarios.py runs the long campaigns)."""
    res = fuzz.campaign(240, seed=1, workers=2, tmpdir=str(tmp_path))
    c = res["counts"]
    assert sum(c.values()) == 240
    assert all(c[k] == 0 for k in fuzz.FAILURES), res["failures"][:3]
    assert c["loaded"] > 10 and c["rejected"] > 100


def test_fuzzer_flags_bad_errors(tmp_path):
    """The fuzzer's check is not vacuous: a plain ValueError and a message without
    FILE:LINE: KEY: are failures."""
    f = tmp_path / "x.toml"
    f.write_text("not toml = = =")
    assert fuzz.check_case(str(f))[0] == "rejected"
    assert fuzz.ERROR_FORM.match("x.toml:3: sim: bad")
    assert not fuzz.ERROR_FORM.match("period_ns = 5 is out of range")
