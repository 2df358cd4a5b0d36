"""The validation suite behind ``docs/results.md``: ``kvmwake kernel suite -o OUT``.

For each configuration (``Config``: workload ``msi`` or ``ipi``, vCPUs, pinned
or not, idle kind, polling ceiling, wakes) and each seed it records
(``record``), calibrates on that recording (``calibrate``) and compares
(``compare``), into ``OUT/<name>/seed<S>/``, then writes the validation table
``OUT/suite.md`` (one row per configuration and seed, every acceptance
criterion's value and whether it was met) and ``OUT/suite.json`` (the rows,
with every criterion and the figures behind it).

Configurations: the built-in list ``BUILTIN`` (``--matrix issue14``, the
default), the twelve of the first comparison (``--matrix first``), or a TOML
file (``--config FILE``)::

    [defaults]                  # optional: keys every [[config]] gets
    wakes = 3000
    [[config]]
    name = "msi-2vcpu-pinned-mixed-default"   # optional (made from the rest)
    workload = "msi"            # msi | ipi                      (default msi)
    vcpus = 2
    pinned = true               #                                (default true)
    idle = "mixed"              # short | mixed | long | periodic | near-ceiling | a spec
    cap = "default"             # "default" (the module's ceiling) | ns | "50us"
    wakes = 3000                #                                (default 3000)

``BUILTIN`` covers every value of issue 14's matrix - pinned and unpinned; 1,
2, 4, 6 and 8 vCPUs on the 2 host CPUs; short, mixed, long, periodic and
near-ceiling idle (``workload.suite_idle_spec``); the module's ceiling and
``KVM_CAP_HALT_POLL`` 0, 50 us and 400 us; host-injected MSIs and
vCPU-to-vCPU IPIs - in 16 configurations, not the full product (800): each
value appears at least twice, each vCPU count with both pinnings or both
workloads, and the known trouble spots of the issue (4 unpinned vCPUs on
mixed idle, 2 unpinned on short idle, 6 pinned on short idle, which
saturates) are in it.  ``--seeds N`` runs seeds 0..N-1 of each (default 2).

``--only NAME...`` runs the named configurations only; ``--reuse``
calibrates and compares the recordings already in ``OUT`` again without
recording; ``--record-only`` records without calibrating or comparing.
``--against OTHER`` neither records nor simulates: it scores the kernel of
each recording in ``OTHER`` (a second recording of the same list) against
the same configuration and seed in ``OUT``, as if it were the model
(``compare.kernel_vs_kernel``), into ``OUT/kernel-vs-kernel.md`` with the
misses per criterion: the kernel's own spread from one recording to the
next, against which the acceptance bounds can be read.  The machine is shared, so before each recording the suite waits
(up to ``--wait-s``) for a quiet moment (others below ``--quiet-pct`` of the
CPUs over half a second) and records again (up to ``--tries``) when others
were busy during the run (the last try is kept); their share is in the
table.  Rows of earlier runs into ``OUT`` are kept (a configuration and
seed run again replaces its row).  A run that cannot be made (the recorder
has no ``ipi`` workload, too many vCPUs, no ``/dev/kvm``) is a row saying
why, and the suite goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..haltpoll import HALT_POLL_NS_DEFAULT
from . import calibrate as C
from . import compare as CM
from .recording import METADATA, RecordingError, load, write_json
from .workload import SUITE_IDLE, SpecError, parse_duration, suite_idle_spec

SUITE_JSON = "suite.json"
SUITE_MD = "suite.md"
AGAINST_JSON = "kernel-vs-kernel.json"
AGAINST_MD = "kernel-vs-kernel.md"
WORKLOADS = ("msi", "ipi")
DEFAULT_WAKES = 3000
#: Long idle takes ~2 ms a wake: fewer of them.
LONG_WAKES = 1500


class SuiteError(ValueError):
    """A configuration list that cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class Config:
    """One configuration of the suite."""

    name: str
    vcpus: int
    idle: str                   # a SUITE_IDLE kind or a workload spec
    cap: int | None = None      # KVM_CAP_HALT_POLL; None: not set (the module's ceiling)
    pinned: bool = True
    workload: str = "msi"       # msi | ipi
    wakes: int = DEFAULT_WAKES

    def ceiling(self, module_halt_poll_ns: int) -> int:
        """The polling ceiling the idle kind is made for (the module's if the cap is 0)."""
        return module_halt_poll_ns if not self.cap else self.cap

    def idle_spec(self, module_halt_poll_ns: int) -> str:
        return suite_idle_spec(self.idle, self.ceiling(module_halt_poll_ns))


def cap_name(cap: int | None) -> str:
    if cap is None:
        return "default"
    if cap and cap % 1000 == 0:
        return f"cap{cap // 1000}us"
    return f"cap{cap}"


def default_name(workload: str, vcpus: int, pinned: bool, idle: str, cap: int | None) -> str:
    idle_part = re.sub(r"[^a-z0-9.-]+", "_", idle.lower()).strip("_")
    return (f"{workload}-{vcpus}vcpu-{'pinned' if pinned else 'unpinned'}-{idle_part}-"
            f"{cap_name(cap)}")


def _cfg(workload, vcpus, pinned, idle, cap, wakes=None) -> Config:
    if wakes is None:
        wakes = LONG_WAKES if idle == "long" else DEFAULT_WAKES
    return Config(default_name(workload, vcpus, pinned, idle, cap), vcpus, idle, cap, pinned,
                  workload, wakes)


#: Issue 14's matrix, a subset covering every value (see the module docstring).
BUILTIN = (
    _cfg("msi", 1, True, "short", None),
    _cfg("msi", 1, True, "mixed", 0),
    _cfg("msi", 2, True, "mixed", None),
    _cfg("msi", 2, False, "short", None),
    _cfg("msi", 2, True, "long", 400_000),
    _cfg("msi", 2, True, "periodic", 50_000),
    _cfg("msi", 2, True, "near-ceiling", None),
    _cfg("msi", 4, False, "mixed", None),
    _cfg("msi", 4, True, "mixed", 50_000),
    _cfg("msi", 6, True, "short", None),
    _cfg("msi", 8, False, "long", None),
    _cfg("ipi", 2, True, "mixed", None),
    _cfg("ipi", 4, False, "short", 0),
    _cfg("ipi", 4, True, "periodic", None),
    _cfg("ipi", 6, False, "mixed", 50_000),
    _cfg("ipi", 8, True, "near-ceiling", 400_000),
)

#: The twelve configurations of the first comparison (docs/results.md), by their
#: names there.
FIRST = tuple(
    Config(f"{w}-{n}vcpu-{'default' if c is None else 'cap0'}", n, w, c, True, "msi",
           LONG_WAKES if w == "long" else DEFAULT_WAKES)
    for w in ("short", "mixed", "long") for n in (1, 2) for c in (None, 0))

MATRICES = {"issue14": BUILTIN, "first": FIRST}
CONFIG_KEYS = {f.name for f in fields(Config)}


# ---------------------------------------------------------------- configuration files

def _parse_cap(v, where: str) -> int | None:
    if v is None or v == "default":
        return None
    if isinstance(v, bool):
        raise SuiteError(f"{where}: cap {v!r} is not \"default\", a number of ns or a "
                         f"duration")
    if isinstance(v, int):
        if not 0 <= v <= 0xFFFF_FFFF:
            raise SuiteError(f"{where}: cap {v} is outside 0..4294967295 ns")
        return v
    if isinstance(v, str):
        try:
            return parse_duration(v, f"{where}: cap")
        except SpecError as exc:
            raise SuiteError(str(exc)) from None
    raise SuiteError(f"{where}: cap {v!r} is not \"default\", a number of ns or a duration")


def config_from_dict(d: dict, where: str = "config") -> Config:
    """One ``Config`` from a TOML table (checked; see the module docstring)."""
    if not isinstance(d, dict):
        raise SuiteError(f"{where}: not a table")
    extra = set(d) - CONFIG_KEYS
    if extra:
        raise SuiteError(f"{where}: unknown keys {', '.join(sorted(extra))} (known: "
                         f"{', '.join(sorted(CONFIG_KEYS))})")
    for key in ("vcpus", "idle"):
        if key not in d:
            raise SuiteError(f"{where}: {key} is missing")
    vcpus = d["vcpus"]
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= 1024:
        raise SuiteError(f"{where}: vcpus must be an integer in 1..1024, not {vcpus!r}")
    workload = d.get("workload", "msi")
    if workload not in WORKLOADS:
        raise SuiteError(f"{where}: workload must be one of {', '.join(WORKLOADS)}, not "
                         f"{workload!r}")
    if workload == "ipi" and vcpus < 2:
        raise SuiteError(f"{where}: the ipi workload needs at least 2 vCPUs")
    pinned = d.get("pinned", True)
    if not isinstance(pinned, bool):
        raise SuiteError(f"{where}: pinned must be true or false, not {pinned!r}")
    cap = _parse_cap(d.get("cap"), where)
    idle = d["idle"]
    if not isinstance(idle, str):
        raise SuiteError(f"{where}: idle must be a string, not {idle!r}")
    try:
        suite_idle_spec(idle, cap or HALT_POLL_NS_DEFAULT["x86"])
    except SpecError as exc:
        raise SuiteError(f"{where}: idle: {exc} (kinds: {', '.join(SUITE_IDLE)}, or a "
                         f"spec)") from None
    wakes = d.get("wakes", LONG_WAKES if idle == "long" else DEFAULT_WAKES)
    if isinstance(wakes, bool) or not isinstance(wakes, int) or not 1 <= wakes <= 10_000_000:
        raise SuiteError(f"{where}: wakes must be an integer in 1..10000000, not {wakes!r}")
    name = d.get("name") or default_name(workload, vcpus, pinned, idle, cap)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SuiteError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' "
                         f"(it names a folder)")
    return Config(name, vcpus, idle, cap, pinned, workload, wakes)


def parse_configs(text: str, source: str = "config") -> list[Config]:
    """The configurations of a TOML text: ``[[config]]`` tables, with ``[defaults]``."""
    try:
        import tomllib
    except ImportError:                      # Python < 3.11
        import tomli as tomllib
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{source}: not TOML: {exc}") from None
    extra = set(doc) - {"config", "defaults"}
    if extra:
        raise SuiteError(f"{source}: unknown top-level keys {', '.join(sorted(extra))} "
                         f"(expected [[config]] tables and an optional [defaults])")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict) or "name" in defaults:
        raise SuiteError(f"{source}: [defaults] must be a table without a name")
    items = doc.get("config")
    if not isinstance(items, list) or not items:
        raise SuiteError(f"{source}: no [[config]] table")
    out = [config_from_dict({**defaults, **d} if isinstance(d, dict) else d,
                            f"{source}: config {i + 1}") for i, d in enumerate(items)]
    seen: dict = {}
    for i, c in enumerate(out):
        if c.name in seen:
            raise SuiteError(f"{source}: config {i + 1}: name {c.name!r} is used by config "
                             f"{seen[c.name] + 1} too")
        seen[c.name] = i
    return out


def load_configs(path) -> list[Config]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SuiteError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_configs(text, str(p))


def select(configs, only) -> list[Config]:
    """The configurations named in ``only`` (all for None), in the list's order."""
    if not only:
        return list(configs)
    names = [c.name for c in configs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SuiteError(f"--only: no configuration named {', '.join(unknown)} (known: "
                         f"{', '.join(names)})")
    return [c for c in configs if c.name in set(only)]


# ---------------------------------------------------------------- running

def wait_quiet(limit_pct: float, max_wait_s: float, log) -> float:
    """Wait until others use less than ``limit_pct`` of the CPUs for half a second."""
    import os
    from .record import cpu_times, foreign_load
    end = time.monotonic() + max_wait_s
    while True:
        a = cpu_times()
        time.sleep(0.5)
        f = foreign_load(a, cpu_times(), os.cpu_count() or 1)["foreign_pct"]
        if f < limit_pct or time.monotonic() > end:
            return f
        log(f"  waiting for a quiet moment (others use {f:.0f} % of the CPUs)")
        time.sleep(2.0)


def foreign_of(meta: dict) -> float | None:
    """The worst of others' CPU share before, during and after the run."""
    hl = meta.get("host_load")
    if not hl:
        return None
    return max(hl["foreign_pct"], hl.get("foreign_before_pct", 0.0),
               hl.get("foreign_after_pct", 0.0))


def module_halt_poll_ns() -> int:
    """The kvm module's ``halt_poll_ns`` here (x86's default where it cannot be read)."""
    try:
        return int(Path("/sys/module/kvm/parameters/halt_poll_ns").read_text())
    except (OSError, ValueError):
        return HALT_POLL_NS_DEFAULT["x86"]


def record_options(cfg: Config, seed: int, out: Path, module_ns: int):
    """The recorder's options for one run.  ``workload`` is passed only for ``ipi``
    (a recorder without the ``ipi`` workload refuses it here, clearly)."""
    from .record import RecordOptions
    kw = dict(vcpus=cfg.vcpus, wakes=cfg.wakes, idle=cfg.idle_spec(module_ns), out=out,
              halt_poll_ns=cfg.cap, seed=seed, force=True, pin=cfg.pinned)
    if cfg.workload != "msi":
        if "workload" not in {f.name for f in fields(RecordOptions)}:
            raise SuiteError(f"this recorder has no '--workload {cfg.workload}'")
        kw["workload"] = cfg.workload
    return RecordOptions(**kw)


def run_dir(out: Path, cfg: Config, seed: int) -> Path:
    return out / cfg.name / f"seed{seed}"


def run_one(out: Path, cfg: Config, seed: int, args, log) -> dict:
    """Record (unless ``--reuse``), calibrate and compare one configuration and seed;
    returns its row (an error row, saying why, where a step could not be done)."""
    from .record import record
    d = run_dir(out, cfg, seed)
    row = {"name": cfg.name, "seed": seed, "config": asdict(cfg)}
    attempt = 0
    try:
        if args.reuse:
            if not (d / METADATA).exists():
                return row | {"status": "not recorded", "error": f"{d}: no recording"}
        else:
            opts = record_options(cfg, seed, d, module_halt_poll_ns())
            for attempt in range(1, args.tries + 1):
                wait_quiet(args.quiet_pct, args.wait_s, log)
                meta = record(opts, log=lambda m: None)
                f = foreign_of(meta)
                log(f"{cfg.name} seed {seed}: attempt {attempt}, others used "
                    f"{'-' if f is None else f'{f:.1f}'} % of the CPUs")
                if f is None or f <= args.quiet_pct:
                    break
        rec = load(d)
        if getattr(args, "record_only", False):
            return row | {"status": "recorded", "dir": str(d), "tries": attempt,
                          "foreign_pct": foreign_of(rec.meta), "traced": rec.traced}
        cal = C.fit(rec, arrivals=args.arrivals, quick=args.quick, tails=args.tails,
                    host_rules=getattr(args, "host_rules", "recording"),
                    log=lambda m: log(f"  {cfg.name} seed {seed}: {m}"))
        if args.arrivals == "sent":
            C.save(rec, cal)
            c = CM.compare_dir(load(d), png=not args.no_png)
        else:                               # a side study: leave the folder's files alone
            c = CM.run(rec, cal)
    except Exception as exc:                # one broken run does not stop the suite
        # (Ctrl-C, SIGTERM and SIGHUP are KeyboardInterrupt: they do stop it)
        log(f"{cfg.name} seed {seed}: {type(exc).__name__}: {exc}")
        return row | {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    v = c["verdict"]
    k, m = c["kernel"], c["model"]
    return row | {
        "status": v["status"], "dir": str(d), "tries": attempt,
        "foreign_pct": foreign_of(rec.meta), "traced": rec.traced,
        "halts_k": k.get("halts"), "halts_m": m.get("halts"),
        "saturated_reason": v.get("saturated_reason"),
        "criteria": v["criteria"], "missed": v.get("missed", []),
        "costs": cal["params"]["costs"], "handler_ns": cal["params"]["handler_ns"],
        "tails": cal.get("costs", {}),
    }


# ---------------------------------------------------------------- the table

def _cell(e: dict | None) -> str:
    if e is None:
        return "-"
    if e["status"] == "not checked":
        return "not checked"
    val = CM.criterion_value(e)
    if e["status"] == "met":
        return val
    if e["status"] == "missed":
        return f"{val} **missed**"
    return f"{val} (not scored)"


def markdown(rows: list[dict]) -> str:
    """The validation table: one row per configuration and seed, every criterion's
    value (pp differences, model/kernel ratios), missed ones in bold."""
    head = ["configuration", "seed", "wakes", "halts k / m"] + \
           [label for _, label, _ in CM.CRITERIA] + ["others' CPU %", "outcome"]
    bounds = ["", "", "", "bound"] + [b for _, _, b in CM.CRITERIA] + ["", ""]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if i in (1, 2) else "---" for i in range(len(head))) + "|",
             "| " + " | ".join(bounds) + " |"]
    for r in rows:
        cfg = r["config"]
        by = {e["name"]: e for e in r.get("criteria", [])}
        if r["status"] in ("error", "not recorded", "recorded"):
            cells = ["-"] * len(CM.CRITERIA)
            outcome = (f"{r['status']}: {r.get('error', '')}".replace("|", "/")
                       if r["status"] != "recorded" else "recorded, not compared")
            halts = "-"
        else:
            cells = [_cell(by.get(key)) for key, _, _ in CM.CRITERIA]
            outcome = {"pass": "**pass**", "fail": "**FAIL**"}.get(r["status"], r["status"])
            if r["status"] == CM.SATURATED and r.get("saturated_reason"):
                outcome += f" ({r['saturated_reason']})"
            halts = (f"{'-' if r['halts_k'] is None else r['halts_k']} / "
                     f"{'-' if r['halts_m'] is None else r['halts_m']}")
        f = r.get("foreign_pct")
        lines.append("| " + " | ".join(
            [r["name"], str(r["seed"]), str(cfg["wakes"]), halts] + cells +
            ["-" if f is None or (isinstance(f, float) and math.isnan(f)) else f"{f:.1f}",
             outcome]) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    counts: dict = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def against_rows(out: Path, other: Path, configs: list[Config], seeds: int, log) -> list[dict]:
    """``--against OTHER``: for each configuration and seed recorded in both folders, the
    kernel of OTHER's recording scored against OUT's (``compare.kernel_vs_kernel``),
    as rows of the validation table."""
    rows = []
    for cfg in configs:
        for seed in range(seeds):
            da, db = run_dir(out, cfg, seed), run_dir(other, cfg, seed)
            row = {"name": cfg.name, "seed": seed, "config": asdict(cfg)}
            if not (da / METADATA).exists() or not (db / METADATA).exists():
                continue
            try:
                a, b = load(da), load(db)
                c = CM.kernel_vs_kernel(a, b)
            except (RecordingError, OSError, ValueError) as exc:
                log(f"{cfg.name} seed {seed}: {type(exc).__name__}: {exc}")
                rows.append(row | {"status": "error", "error": f"{type(exc).__name__}: {exc}"})
                continue
            v, k, m = c["verdict"], c["kernel"], c["model"]
            fa, fb = foreign_of(a.meta), foreign_of(b.meta)
            rows.append(row | {
                "status": v["status"], "dir": str(da), "against": str(db),
                "foreign_pct": None if fa is None or fb is None else max(fa, fb),
                "traced": c["recording"]["traced"],
                "halts_k": k.get("halts"), "halts_m": m.get("halts"),
                "saturated_reason": v.get("saturated_reason"),
                "criteria": v["criteria"], "missed": v.get("missed", [])})
    return rows


def misses_per_criterion(rows: list[dict]) -> str:
    """Per criterion: how many scored rows missed it, of how many checked it."""
    lines = ["| criterion | bound | missed | checked |", "|---|---|---:|---:|"]
    for key, label, bound in CM.CRITERIA:
        st = [e["status"] for r in rows for e in r.get("criteria", []) if e["name"] == key]
        lines.append(f"| {label} | {bound} | {st.count('missed')} | "
                     f"{st.count('missed') + st.count('met')} |")
    return "\n".join(lines)


def write_outputs(out: Path, configs: list[Config], rows: list[dict]) -> None:
    write_json(out / SUITE_JSON, {"format": 1, "configs": [asdict(c) for c in configs],
                                  "rows": rows, "summary": summary(rows)})
    (out / SUITE_MD).write_text(markdown(rows) + "\n")


def run_suite(out: Path, configs: list[Config], seeds: int, args, log,
              listed: list[Config] | None = None) -> list[dict]:
    """Run every configuration of ``configs`` and seed; returns the table's rows
    (earlier runs' rows in ``OUT/suite.json`` kept), in the order of ``listed`` (the
    whole list ``--only`` chose from; default ``configs``)."""
    listed = list(listed or configs)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SUITE_JSON
    done: dict = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            done = {(r["name"], r["seed"]): r for r in old.get("rows", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SuiteError(f"{path}: not a suite table; remove it or use another -o") \
                from None
    order = {c.name: i for i, c in enumerate(listed)}

    def ordered():
        return sorted(done.values(), key=lambda r: (order.get(r["name"], len(order)),
                                                    r["name"], r["seed"]))
    for cfg in configs:
        for seed in range(seeds):
            done[(cfg.name, seed)] = run_one(out, cfg, seed, args, log)
            write_outputs(out, listed, ordered())
    return ordered()


# ---------------------------------------------------------------- the command line

def build_parser(p: argparse.ArgumentParser) -> None:
    """The options of ``kvmwake kernel suite``."""
    p.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="folder of the recordings and the table (suite.md, suite.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE",
                     help="TOML list of configurations ([[config]] tables) instead of the "
                          "built-in one")
    src.add_argument("--matrix", choices=sorted(MATRICES), default="issue14",
                     help="the built-in list: issue14 (16 configurations covering issue 14's "
                          "matrix, default) or first (the twelve of the first comparison)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these configurations only")
    p.add_argument("--seeds", type=int, default=2, metavar="N",
                   help="seeds 0..N-1 of each configuration (default 2)")
    p.add_argument("--reuse", action="store_true",
                   help="do not record: calibrate and compare the recordings in OUT again")
    p.add_argument("--list", action="store_true", help="print the configurations and stop")
    p.add_argument("--tries", type=int, default=4,
                   help="recordings per run at most while others are busy (default 4)")
    p.add_argument("--quiet-pct", type=float, default=5.0,
                   help="others' CPU share above which a recording is made again (default 5)")
    p.add_argument("--wait-s", type=float, default=120.0,
                   help="longest wait for a quiet moment before a recording (default 120)")
    p.add_argument("--quick", action="store_true", help="a coarser calibration search")
    p.add_argument("--tails", action="store_true", help="calibrate with --tails")
    p.add_argument("--no-png", action="store_true", help="no compare.png per run")
    p.add_argument("--record-only", action="store_true",
                   help="record, but do not calibrate or compare (a second recording of "
                        "the list, for --against)")
    p.add_argument("--against", metavar="OTHER",
                   help="do not record or simulate: score the kernel of each recording in "
                        "OTHER (another suite run's folder) against the same configuration "
                        "and seed in OUT, as if it were the model: the kernel's own spread "
                        "(writes OUT/kernel-vs-kernel.md and .json)")
    from .simulate import HOST_RULES, HOST_RULES_HELP
    p.add_argument("--host-rules", choices=HOST_RULES, default="recording",
                   help="calibrate and compare with " + HOST_RULES_HELP)
    p.add_argument("--arrivals", choices=("sent", "target"), default="sent",
                   help="calibrate and compare with these arrivals ('target' leaves "
                        "calibration.json and compare.json as they are)")


def configs_of(args) -> tuple[list[Config], list[Config]]:
    """(the configurations to run, the whole list they were chosen from)."""
    listed = load_configs(args.config) if args.config else list(MATRICES[args.matrix])
    return select(listed, args.only), listed


def run_cli(args) -> int:
    """Carry out a parsed ``kernel suite``."""
    if args.seeds < 1:
        raise SuiteError(f"--seeds must be at least 1, not {args.seeds}")
    if args.tries < 1:
        raise SuiteError(f"--tries must be at least 1, not {args.tries}")
    configs, listed = configs_of(args)
    if args.list:
        for c in configs:
            print(f"{c.name}: {c.workload}, {c.vcpus} vCPU(s), "
                  f"{'pinned' if c.pinned else 'unpinned'}, idle {c.idle}, "
                  f"{cap_name(c.cap)}, {c.wakes} wakes")
        return 0

    def log(m):
        print(m, file=sys.stderr, flush=True)
    out = Path(args.out)
    if args.against:
        rows = against_rows(out, Path(args.against), configs, args.seeds, log)
        if not rows:
            raise SuiteError(f"no configuration and seed is recorded in both {out} and "
                             f"{args.against}")
        write_json(out / AGAINST_JSON, {"format": 1, "against": str(args.against),
                                        "rows": rows, "summary": summary(rows)})
        text = markdown(rows) + "\n\n" + misses_per_criterion(rows)
        (out / AGAINST_MD).write_text(text + "\n")
        print(text)
        s = summary(rows)
        print(f"\n{len(rows)} pairs of recordings: " + ", ".join(f"{n} {k}" for k, n in s.items())
              + f"; in {out / AGAINST_MD}")
        return 0
    rows = run_suite(out, configs, args.seeds, args, log, listed)
    print(markdown(rows))
    s = summary(rows)
    print(f"\n{len(rows)} runs: " + ", ".join(f"{n} {k}" for k, n in s.items()) +
          f"; table in {out / SUITE_MD}, rows in {out / SUITE_JSON}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmwake.kernel.suite",
                                 description="Record, calibrate and compare a list of "
                                             "configurations; write the validation table.")
    build_parser(ap)
    args = ap.parse_args(argv)
    try:
        return run_cli(args)
    except (SuiteError, RecordingError, OSError) as exc:
        print(f"kvmwake: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
