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


def path_of(name_or_path) -> pathlib.Path:
    """The file of a built-in name, or the path itself if it names a file."""
    p = pathlib.Path(os.fspath(name_or_path))
    if p.suffix == ".toml" or p.exists() or os.sep in str(name_or_path):
        if not p.is_file():
            raise ScenarioError(f"{p}: no such scenario file")
        return p
    b = BUILTIN_DIR / f"{name_or_path}.toml"
    if not b.is_file():
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r} (built-in: "
                            f"{', '.join(names())}; or give a .toml file)")
    return b


def get(name_or_path) -> Scenario:
    """The built-in scenario ``name`` (or the scenario file at a path), checked."""
    return load(path_of(name_or_path))
