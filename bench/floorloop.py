"""Load the floor (``bench/_floor.pyx``), compiling it with pyximport on first use.

The build goes to ``bench/__pycache__/pyxbld`` (ignored by git).  Needs
Cython and a C compiler; ``load()`` raises ``ImportError`` without them.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(HERE, "__pycache__", "pyxbld")


def load():
    """The compiled ``_floor`` module (its ``hold`` function)."""
    if "_floor" in sys.modules:
        return sys.modules["_floor"]
    import pyximport  # Cython's; ImportError without Cython
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    pyximport.install(build_dir=BUILD_DIR, language_level=3, inplace=False)
    import _floor
    return _floor
