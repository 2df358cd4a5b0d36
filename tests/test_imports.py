"""The package's modules import each other without a circle.

``import_graph`` reads every module of kvmwake: the Python files with ``ast``, the
Cython ones (``.pyx``, and the ``.pxi`` files a ``.pyx`` includes) for their
Python-level import statements (``cimport`` is compile-time and left out).  Each
import of another kvmwake module is an edge, whether it sits at module level or
inside a function or method: an import hidden in a function is a dependency
all the same.  The graph must have no cycle.

How an import statement becomes edges:

* ``import kvmwake.a.b`` and ``from kvmwake.a import b`` (``b`` a module):
  an edge to ``kvmwake.a.b``;
* ``from kvmwake.a import name`` (``name`` not a module): an edge to
  ``kvmwake.a``, except for a name that the package ``kvmwake.a`` binds
  before its first import (``kvmwake.__version__``, the reference engine's
  ``EngineError``), which exists from the moment the package starts to load.

Importing ``kvmwake.a.b`` also runs ``kvmwake/a/__init__.py``; what that adds
is checked by importing every module first, on its own
(``test_every_module_imports_first``).
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "kvmwake"

_INCLUDE = re.compile(r"""^include\s+["']([^"']+)["']""", re.M)
_IMPORT_START = re.compile(r"^\s*(?:from\s+\S+\s+import\b|import\s)")


def _module_name(path: pathlib.Path, base: pathlib.Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _cython_imports(text: str) -> list[tuple[ast.stmt, int]]:
    """The Python import statements of Cython source, with their line numbers."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not _IMPORT_START.match(line) or re.search(r"\bcimport\b", line):
            i += 1
            continue
        stmt, start = line.strip(), i
        while (stmt.count("(") > stmt.count(")") or stmt.endswith("\\")) and i + 1 < len(lines):
            i += 1
            stmt = stmt.rstrip("\\") + " " + lines[i].strip()
        try:
            body = ast.parse(stmt.split("#", 1)[0]).body
        except SyntaxError:                     # prose in a docstring that starts like one
            body = []
        out += [(node, start + 1) for node in body]
        i += 1
    return out


def _sources(base: pathlib.Path, package: str) -> dict:
    """{module name: [(path, text, is_cython)]} of every module of the package."""
    mods: dict = {}
    for path in sorted((base / package).rglob("*")):
        if path.suffix not in (".py", ".pyx") or "__pycache__" in path.parts:
            continue
        name = _module_name(path, base)
        text = path.read_text(encoding="utf-8")
        files = [(path, text, path.suffix == ".pyx")]
        if path.suffix == ".pyx":
            for inc in _INCLUDE.findall(text):
                ipath = path.parent / inc
                files.append((ipath, ipath.read_text(encoding="utf-8"), True))
        mods.setdefault(name, []).extend(files)
    return mods


def _imports(path, text, is_cython) -> list:
    """[(ast node, line, inside a function)] of every import statement of a file."""
    if is_cython:
        return [(node, line, None) for node, line in _cython_imports(text)]
    out = []

    def walk(node, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, child.lineno, func))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else func
            walk(child, inner)
    walk(ast.parse(text, str(path)), None)
    return out


def _early_names(text: str) -> set:
    """The names a package's ``__init__`` binds before its first import statement."""
    names = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def import_graph(base: pathlib.Path = ROOT, package: str = PACKAGE) -> dict:
    """{module: {imported module: [where, ...]}} over the package's own modules."""
    mods = _sources(base, package)
    packages = {m for m, files in mods.items() if files[0][0].name == "__init__.py"}
    early = {m: _early_names(mods[m][0][1]) for m in packages}
    graph: dict = {m: {} for m in mods}

    def known(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    for mod, files in mods.items():
        pkg = mod if mod in packages else mod.rpartition(".")[0]
        for path, text, is_cython in files:
            for node, line, func in _imports(path, text, is_cython):
                where = f"{path.relative_to(base)}:{line}" + (f" (in {func})" if func else "")
                targets = []
                if isinstance(node, ast.Import):
                    targets = [known(a.name) for a in node.names
                               if a.name == package or a.name.startswith(package + ".")]
                else:
                    if node.level:
                        parts = pkg.split(".")
                        up = parts[:len(parts) - node.level + 1]
                        src = ".".join(up + ([node.module] if node.module else []))
                    else:
                        src = node.module or ""
                    if src != package and not src.startswith(package + "."):
                        continue
                    for a in node.names:
                        full = f"{src}.{a.name}"
                        if full in mods:
                            targets.append(full)
                        elif not (src in packages and a.name in early[src]):
                            targets.append(known(src))
                for t in targets:
                    if t and t != mod:
                        graph[mod].setdefault(t, []).append(where)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module, as
    ``(modules, cycle)``: the component's modules, sorted, and one cycle through it
    spelled out as [(module, next module, where), ...]."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append((sorted(comp), _one_cycle(graph, comp)))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def _one_cycle(graph, comp) -> list:
    start = min(comp)
    prev = {start: None}
    queue = [start]
    while queue:                                   # breadth first, inside the component
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w in comp and w not in prev:
                prev[w] = v
                queue.append(w)
    # Close the cycle with an edge back to start from the nearest module that has one.
    back = min((v for v in comp if start in graph[v]), key=lambda v: _depth(prev, v))
    path = [back]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    path.reverse()
    path.append(start)
    return [(a, b, graph[a][b][0]) for a, b in zip(path, path[1:])]


def _depth(prev, v) -> int:
    n = 0
    while prev[v] is not None:
        v, n = prev[v], n + 1
    return n


def _describe(cycle) -> str:
    return "\n  ".join(f"{a} -> {b}   ({where})" for a, b, where in cycle)


# -- the package ------------------------------------------------------------------------------

def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "kvmwake.host" in graph and "kvmwake._core" in graph
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        f"  among {', '.join(mods)}, e.g.\n  " + _describe(c) for mods, c in found)


def test_the_snapshot_format_stands_below_host_and_vm():
    """snapshot.py is the format: it reads engine state and plain data, and builds
    nothing; Host and VM call into it."""
    graph = import_graph()
    # (kvmwake.costs: the cost tables' shape, a leaf below the host like model.)
    allowed = {"kvmwake._core", "kvmwake.costs", "kvmwake.errors", "kvmwake.exits",
               "kvmwake.model", "kvmwake.uapi", "kvmwake.vmm"}
    assert set(graph["kvmwake.costs"]) <= {"kvmwake.durations", "kvmwake.model"}
    assert set(graph["kvmwake.snapshot"]) <= allowed, graph["kvmwake.snapshot"]
    assert "kvmwake.snapshot" in graph["kvmwake.host"]
    assert "kvmwake.host" in graph["kvmwake.vm"] and "kvmwake.vm" not in graph["kvmwake.host"]


# -- the checker ------------------------------------------------------------------------------

def _write(base: pathlib.Path, files: dict) -> None:
    for rel, text in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": 'from __future__ import annotations\n__version__ = "1"\n'
                           'from .a import A\n',
        "pkg/a.py": "from . import __version__\nfrom .b import helper\nclass A: pass\n",
        "pkg/b.py": "def helper():\n    from .a import A\n    return A\n",
        "pkg/c.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg"] == {"pkg.a": ["pkg/__init__.py:3"]}
    assert "pkg" not in graph["pkg.a"]                  # __version__ is bound before imports
    assert graph["pkg.b"] == {"pkg.a": ["pkg/b.py:2 (in helper)"]}
    [(mods, cycle)] = cycles(graph)
    assert mods == ["pkg.a", "pkg.b"]
    assert [(a, b) for a, b, _ in cycle] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.a")]


def test_a_cycle_through_a_package_name_and_cython_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .sub import thing\n",
        "pkg/sub/__init__.py": "from .leaf import thing\n",
        "pkg/sub/leaf.py": "from ..core import fast\nthing = 1\n",
        "pkg/core.pyx": 'from libc.stdint cimport uint32_t\ninclude "parts/x.pxi"\n',
        "pkg/parts/x.pxi": "def fast():\n    from pkg import (\n        thing)\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.core"] == {"pkg": ["pkg/parts/x.pxi:2"]}
    [(mods, cycle)] = cycles(graph)
    assert mods == ["pkg", "pkg.core", "pkg.sub", "pkg.sub.leaf"]
    assert [a for a, _, _ in cycle] == ["pkg", "pkg.sub", "pkg.sub.leaf", "pkg.core"]


# -- every module on its own --------------------------------------------------------------------

_IMPORT_EACH = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    for k in [k for k in sys.modules if k == "kvmwake" or k.startswith("kvmwake.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == "kvmwake" or exc.name.startswith("kvmwake.")):
            failed[name] = repr(exc)
    except Exception as exc:
        failed[name] = repr(exc)
print(json.dumps(failed))
"""


def test_every_module_imports_first():
    """Each module imported first, before any other of the package's (but the packages
    above it, which Python loads first), so no import order depends on another."""
    names = sorted(m for m in import_graph() if not m.endswith("__main__"))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, failed

