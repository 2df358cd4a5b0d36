"""The built-in scenarios (``builtin/*.toml``), and finding a scenario by name or path."""

from __future__ import annotations

import os
import pathlib

from ..errors import ScenarioError
from .parse import Scenario, load

BUILTIN_DIR = pathlib.Path(__file__).with_name("builtin")


def names() -> list[str]:
    """The built-in scenarios, in a fixed order."""
    order = ["default", "irq-storm", "suspend-cycle", "ipi-storm"]
    found = sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))
    return [n for n in order if n in found] + [n for n in found if n not in order]


def looks_like_path(name_or_path) -> bool:
    """A name is a built-in unless it looks like a path: it contains a '/' (or the
    system's separator) or ends in '.toml'.  A file or folder in the current folder
    named like a built-in never shadows it (write ./default to mean the file)."""
    if isinstance(name_or_path, pathlib.PurePath):
        return True
    text = os.fspath(name_or_path)
    return "/" in text or os.sep in text or text.endswith(".toml")


def path_of(name_or_path) -> pathlib.Path:
    """The file of a built-in name, or the path itself if it looks like a path."""
    p = pathlib.Path(os.fspath(name_or_path))
    if looks_like_path(name_or_path):
        if not p.is_file():
            raise ScenarioError(f"{p}: no such scenario file")
        return p
    b = BUILTIN_DIR / f"{name_or_path}.toml"
    if not b.is_file():
        hint = f"; for the file here write ./{name_or_path}" if p.is_file() else ""
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r} (built-in: "
                            f"{', '.join(names())}; or give a .toml file{hint})")
    return b


def get(name_or_path) -> Scenario:
    """The built-in scenario ``name`` (or the scenario file at a path), checked."""
    return load(path_of(name_or_path))
