#!/usr/bin/env python3
"""Generate docs/api.md from the public API's docstrings.

    python tools/gen_api.py            # rewrite docs/api.md
    python tools/gen_api.py --check    # exit 1 if docs/api.md is out of date

``tests/test_scenarios_docs.py`` runs the check.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"

#: (module, names documented; None: the module's __all__ or its public functions and classes)
SECTIONS = [
    ("kvmwake", ["Host", "HostThread", "VM", "VCpu", "ClockHold", "KvmError", "ProgramError",
                 "EngineError", "ScenarioError", "SnapshotError", "DeadlockError"]),
    ("kvmwake.vcpu_threads", ["VcpuThreads", "DEFAULT_DEADLOCK_TIMEOUT_S"]),
    ("kvmwake.guest", None),
    ("kvmwake.hostprog", None),
    ("kvmwake.host", ["check_affinity", "host_thread_cpu"]),
    ("kvmwake.vmm", ["Vmm", "DenyAllVmm", "ReferenceVmm", "u64", "load_policy", "policy_spec"]),
    ("kvmwake.uapi", ["KvmReg", "VcpuFeature", "vcpu_features", "arm64_core_reg",
                      "arm64_sys_reg"]),
    ("kvmwake.exits", ["Exit", "SystemEvent"]),
    ("kvmwake.scenarios", ["build", "load", "loads", "get", "names", "path_of", "Scenario"]),
    ("kvmwake.outputs", []),
    ("kvmwake.outputs.stats", ["HaltStats", "row_to_dict", "sum_rows", "latency_percentiles",
                               "format_ns"]),
    ("kvmwake.outputs.arrays", ["arrays", "write_npz"]),
    ("kvmwake.outputs.plots", ["plot_figure", "write_plot", "cpu_time_split",
                               "tradeoff_figure", "write_tradeoff"]),
    ("kvmwake.outputs.summary", ["summarize", "to_json", "print_summary"]),
    ("kvmwake.outputs.tracefmt", ["TraceEvent", "parse", "read", "write", "events_to_text",
                                  "records_to_events", "format_event"]),
    ("kvmwake.cli", ["main", "run_chunked"]),
]


def _public(mod):
    names = getattr(mod, "__all__", None)
    if names:
        return list(names)
    out = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out.append(name)
    return out


def _sig(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    d = inspect.getdoc(obj)
    return d.strip() if d else "(no docstring)"


def _members(cls):
    out = []
    for name, obj in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if name == "__init__":
            continue
        if isinstance(obj, property):
            out.append((name, "", obj.__doc__, True))
        elif isinstance(obj, (classmethod, staticmethod)):
            out.append((name, _sig(obj.__func__), inspect.getdoc(obj.__func__), False))
        elif inspect.isfunction(obj):
            out.append((name, _sig(obj), inspect.getdoc(obj), False))
    return out


def generate() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python tools/gen_api.py`; do not edit.", ""]
    for modname, names in SECTIONS:
        mod = importlib.import_module(modname)
        lines += [f"## `{modname}`", ""]
        if modname != "kvmwake" and mod.__doc__:
            lines += [inspect.cleandoc(mod.__doc__), ""]
        for name in names or _public(mod):
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                lines += [f"### class `{modname}.{name}{_sig(obj)}`", "", _doc(obj), ""]
                for mname, sig, doc, is_prop in _members(obj):
                    head = f"#### `{name}.{mname}` (property)" if is_prop else \
                        f"#### `{name}.{mname}{sig}`"
                    lines += [head, ""]
                    if doc:
                        lines += [inspect.cleandoc(doc), ""]
            elif callable(obj):
                lines += [f"### `{modname}.{name}{_sig(obj)}`", "", _doc(obj), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = generate()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
