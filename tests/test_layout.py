"""The core and the reference engine are built of the same pieces, with the same names.

Each piece of the Cython core (``kvmwake/core/<name>.pxi``) has a plain-Python
twin ``kvmwake/reference/<name>.py``, and ``kvmwake/_core.pyx`` (the Engine and
the event loop) has ``kvmwake/reference/engine.py``.  A top-level function of
either side has a function of the same name in its twin, but for the names in
``ALIASES`` (spelt differently on each side) and ``CORE_ONLY`` / ``REFERENCE_ONLY``
(each with the reason it has no twin).  Every piece opens with a comment or
docstring that names its twin and says what kernel code it mirrors.

The checks read the sources (nothing is imported), so that the self-tests at the
end can run them on a copy with a piece or a function removed.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "kvmwake"

#: Reference pieces that pair with something other than a core/*.pxi of their name.
REFERENCE_ENGINE = "engine"          # pairs with kvmwake/_core.pyx

#: (piece, core name) -> reference name, where the two differ by a leading underscore
#: only: the core keeps the snapshot functions private to kvmwake.snapshot, the
#: reference's are its public interface.
ALIASES = {
    ("snapshot", "_engine_export"): "engine_export",
    ("snapshot", "_engine_import"): "engine_import",
    ("snapshot", "_check_state"): "check_state",
    ("snapshot", "_check_programs"): "check_programs",
    ("snapshot", "_check_links"): "check_links",
    ("snapshot", "_check_cost_tables"): "check_cost_tables",
    ("snapshot", "_engine_view"): "engine_view",
    ("snapshot", "_engine_exit_record"): "engine_exit_record",
    ("snapshot", "_is_trap_op"): "is_trap_op",
    ("snapshot", "_engine_rehost"): "engine_rehost",
    ("snapshot", "_check_sched"): "check_sched",
    ("snapshot", "_queue_imported"): "queue_imported",
    ("snapshot", "_state_events"): "state_events",
}

#: (piece, core name): why the reference has no twin of it.
CORE_ONLY = {
    ("islands", "isl_key_cmp"):
        "qsort's comparison for isl_join; the reference runs no islands",
    ("islands", "isl_gather"):
        "copies the C buckets' events out unsorted; the reference runs no islands",
    ("islands", "event_island"):
        "hands the host's events to the islands (isl_split); the reference runs no islands",
    ("islands", "isl_split"):
        "makes the islands' engines; the reference runs every host on its one queue",
    ("islands", "isl_discard"):
        "frees islands that could not be made; the reference runs no islands",
    ("islands", "isl_join"):
        "joins the islands' engines back; the reference runs every host on its one queue",
    ("queue", "ev_cmp"):
        "qsort's comparison for q_collect; the reference sorts its event tuples",
    ("queue", "q_init"):
        "C initialisation of the queue's buckets; the reference's is EventQueue.__init__",
    ("queue", "q_free"):
        "frees the C bucket arrays; the reference's lists are garbage-collected",
    ("queue", "q_grow"):
        "grows one C bucket array; the reference's are Python lists",
    ("queue", "q_shrink"):
        "gives back an emptied C bucket array's spare room; Python lists shrink themselves",
    ("queue", "q_collect"):
        "copies the queued events into a C array in order; the reference's is "
        "EventQueue.events()",
    ("queue", "_queue_bytes"):
        "bytes of the C bucket arrays, for Engine.state_bytes(); the reference has none",
    ("engine", "compiled_constants"):
        "the numbers compiled into the C code, for tests/test_core_mirrors.py; the reference "
        "imports them from kvmwake.model",
    ("snapshot", "_copy_trace"):
        "C noexcept copy of the trace ring, oldest first; the reference's ring is a deque "
        "copied by list()",
    ("snapshot", "_copy_timeline"):
        "C noexcept copy of the timeline ring, oldest first; the reference's ring is a deque "
        "copied by list()",
    ("snapshot", "struct_sizes"):
        "sizes of the C structs a snapshot file records; the reference has no C structs",
    ("snapshot", "_rq_last"):
        "walks the C run queue's linked list to its tail; the reference's run queue is a deque",
}

#: (piece, reference name): why the core has no twin of it.
REFERENCE_ONLY = {
    ("rng", "stream_seed"):
        "the (state, increment) pair that rng_seed stores; _core.pyx imports it to seed the "
        "device sources' streams",
    ("snapshot", "_index"):
        "the range check of an index read from plain Python, which the C code gets from its "
        "unsigned types",
    ("host", "_trunc_div"):
        "C's division of int64_t truncates toward zero (cdivision), Python's // floors",
    ("engine", "_link_pieces"):
        "gives each piece the other pieces' functions it calls: the core's pieces share one "
        "module, the reference's are modules whose calls go round in circles",
}

# A top-level function of a core piece: ``def name(``, ``cpdef ... name(`` or
# ``cdef [inline] [type] name(`` at column 0.
_CORE_DEF = re.compile(r"^(?:def\s+(\w+)\s*\(|c?p?def\b[^(=:#]*?\b(\w+)\s*\()", re.M)


def core_functions(path: Path) -> set[str]:
    names = set()
    for m in _CORE_DEF.finditer(path.read_text()):
        name = m.group(1) or m.group(2)
        if name not in ("class", "enum", "extern"):
            names.add(name)
    return names


def reference_functions(path: Path) -> tuple[set[str], set[str]]:
    """(functions defined at the top level, names imported from kvmwake.model)."""
    tree = ast.parse(path.read_text())
    defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    from_model = {a.asname or a.name for n in tree.body
                  if isinstance(n, ast.ImportFrom) and n.level == 2 and n.module == "model"
                  for a in n.names}
    return defs, from_model


def opening(path: Path) -> str:
    """The opening comment block of a .pxi, or the module docstring of a .py/.pyx."""
    text = path.read_text()
    if path.suffix == ".pxi":
        lines = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
        return "\n".join(lines)
    if path.suffix == ".pyx":
        m = re.search(r'^"""(.*?)"""', text, re.S | re.M)
        return m.group(1) if m else ""
    return ast.get_docstring(ast.parse(text)) or ""


def pairs(pkg: Path):
    """(piece, core path, reference path) of every piece, and the unpaired files."""
    core = {p.stem: p for p in sorted((pkg / "core").glob("*.pxi"))}
    ref = {p.stem: p for p in sorted((pkg / "reference").glob("*.py"))
           if p.stem not in ("__init__", REFERENCE_ENGINE)}
    problems = []
    for name in sorted(core.keys() - ref.keys()):
        problems.append(f"core/{name}.pxi has no twin kvmwake/reference/{name}.py")
    for name in sorted(ref.keys() - core.keys()):
        problems.append(f"reference/{name}.py has no twin kvmwake/core/{name}.pxi")
    out = [(name, core[name], ref[name]) for name in sorted(core.keys() & ref.keys())]
    engine_core, engine_ref = pkg / "_core.pyx", pkg / "reference" / f"{REFERENCE_ENGINE}.py"
    for p in (engine_core, engine_ref):
        if not p.exists():
            problems.append(f"{p.relative_to(pkg.parent)} is missing")
    if engine_core.exists() and engine_ref.exists():
        out.append((REFERENCE_ENGINE, engine_core, engine_ref))
    return out, problems


def function_problems(pkg: Path) -> list[str]:
    found, problems = pairs(pkg)
    for piece, core_path, ref_path in found:
        core = core_functions(core_path)
        defs, from_model = reference_functions(ref_path)
        twin_of = {c: ALIASES.get((piece, c), c) for c in core}
        for c in sorted(core):
            if (piece, c) in CORE_ONLY:
                continue
            if twin_of[c] not in defs | from_model:
                problems.append(f"{core_path.name}: {c}() has no twin {twin_of[c]}() "
                                f"in reference/{ref_path.name}")
        for r in sorted(defs - set(twin_of.values())):
            if (piece, r) not in REFERENCE_ONLY:
                problems.append(f"reference/{ref_path.name}: {r}() has no twin in "
                                f"{core_path.name}")
    return problems


def opening_problems(pkg: Path) -> list[str]:
    found, problems = pairs(pkg)
    for piece, core_path, ref_path in found:
        if piece == REFERENCE_ENGINE:
            # _core.pyx's docstring lists every piece and points at the reference package.
            if "kvmwake/reference/" not in opening(core_path):
                problems.append("_core.pyx: its docstring does not name kvmwake/reference/")
            want = [(ref_path, "(twin: kvmwake/_core.pyx)")]
        else:
            want = [(core_path, f"core/{piece}.pxi (twin: kvmwake/reference/{piece}.py)"),
                    (ref_path, f"reference/{piece}.py (twin: kvmwake/core/{piece}.pxi)")]
        for path, twin in want:
            head = opening(path)
            if twin not in head.splitlines()[0] if head else True:
                problems.append(f"{path.name}: does not open with {twin!r}")
            if "\nMirrors:" not in "\n" + head:
                problems.append(f"{path.name}: its opening says nothing under 'Mirrors:'")
    return problems


# -- the checks on the tree --------------------------------------------------------------

def test_every_piece_has_a_twin():
    _, problems = pairs(PKG)
    assert not problems, "\n".join(problems)


def test_every_function_has_a_twin():
    problems = function_problems(PKG)
    assert not problems, "\n".join(problems)


def test_every_piece_names_its_twin_and_what_it_mirrors():
    problems = opening_problems(PKG)
    assert not problems, "\n".join(problems)


def test_the_exemption_tables_name_real_functions():
    """An entry for a function that no longer exists (or gained a twin) is stale."""
    found, _ = pairs(PKG)
    by_piece = {piece: (core_functions(c), reference_functions(r)[0]) for piece, c, r in found}
    for (piece, c), r in ALIASES.items():
        assert c in by_piece[piece][0] and r in by_piece[piece][1], (piece, c, r)
        assert c.lstrip("_") == r.lstrip("_"), "an alias differs by more than the underscore"
    for piece, c in CORE_ONLY:
        assert c in by_piece[piece][0] and c not in by_piece[piece][1], (piece, c)
    for piece, r in REFERENCE_ONLY:
        assert r in by_piece[piece][1] and r not in by_piece[piece][0], (piece, r)


def test_the_core_parser_finds_the_pieces_functions():
    """The regular expression sees cdef, inline, typed, pointer-returning and def functions."""
    got = core_functions(PKG / "core" / "queue.pxi")
    assert {"ev_before", "ev_cmp", "ev_live", "q_bucket", "q_init", "q_insert", "heap_push",
            "q_peek", "heap_pop", "q_collect", "q_check", "push_thread", "_queue_bytes"} <= got
    assert {"_engine_export", "_check_state", "_rq_last", "struct_sizes"} \
        <= core_functions(PKG / "core" / "snapshot.pxi")
    assert core_functions(PKG / "_core.pyx") == {"compiled_constants", "run_loop", "loop_left"}


# -- the checks catch what they are for ----------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """A copy of the pieces (both sides) to break."""
    pkg = tmp_path / "kvmwake"
    shutil.copytree(PKG / "core", pkg / "core")
    shutil.copytree(PKG / "reference", pkg / "reference",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PKG / "_core.pyx", pkg / "_core.pyx")
    assert not pairs(pkg)[1] and not function_problems(pkg) and not opening_problems(pkg)
    return pkg


def _drop_function(path: Path, name: str) -> None:
    """Remove the top-level function ``name`` (its def line to the next top-level line)."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines)
                 if re.match(rf"(c?p?def\b[^(]*\b|def\s+){name}\s*\(", line))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t)"):
        end += 1
    path.write_text("".join(lines[:start] + lines[end:]))


@pytest.mark.parametrize("side", ["core", "reference"])
def test_a_removed_piece_is_caught(tree, side):
    (tree / "core" / "timer.pxi" if side == "core" else tree / "reference" / "timer.py").unlink()
    assert any("timer" in p for p in pairs(tree)[1])


def test_a_removed_engine_is_caught(tree):
    (tree / "reference" / "engine.py").unlink()
    assert any("engine.py is missing" in p for p in pairs(tree)[1])


@pytest.mark.parametrize("path, name", [
    ("core/halt.pxi", "block"), ("reference/halt.py", "block"),
    ("core/gic.pxi", "gic_pending"), ("reference/gic.py", "gic_pending"),
    ("core/snapshot.pxi", "_check_links"), ("reference/snapshot.py", "check_links"),
    ("_core.pyx", "run_loop"), ("reference/engine.py", "run_loop"),
    ("core/bench.pxi", "bench_kick"), ("reference/bench.py", "bench_kick"),
])
def test_a_removed_function_is_caught(tree, path, name):
    _drop_function(tree / path, name)
    problems = function_problems(tree)
    assert len(problems) == 1 and name.lstrip("_") in problems[0], problems


def test_a_renamed_function_is_caught(tree):
    p = tree / "reference" / "kick.py"
    p.write_text(p.read_text().replace("def wake_up(", "def wakeup("))
    problems = function_problems(tree)
    assert len(problems) == 2, problems      # wake_up has no twin, wakeup has none either


@pytest.mark.parametrize("path", ["core/run.pxi", "reference/run.py", "reference/engine.py"])
def test_an_opening_without_mirrors_or_twin_is_caught(tree, path):
    p = tree / path
    text = p.read_text()
    p.write_text(text.replace("Mirrors:", "Models:", 1))
    assert len(opening_problems(tree)) == 1
    p.write_text(text.replace("twin: kvmwake/", "see kvmwake/", 1))
    assert len(opening_problems(tree)) == 1
