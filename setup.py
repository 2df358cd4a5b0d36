"""Build the kvmwake._core and kvmwake.kernel._inject extensions.

Cython directives live here and only here.  ``KVMWAKE_DEBUG=1 pip install .``
builds a debug variant: bounds and wraparound checks on, C asserts kept, and
the engine's whole state checked every ``kvmwake._core.CHECK_EVERY`` events
of a run (``kvmwake._core.DEBUG`` is then True).
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KVMWAKE_DEBUG", "") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

extensions = [
    Extension(
        "kvmwake._core",
        ["kvmwake/_core.pyx"],
        include_dirs=[np.get_include()],
        # KVMWAKE_DEBUG: kvmwake._core.DEBUG, and run_loop's periodic state checks.
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("KVMWAKE_DEBUG", "1" if DEBUG else "0")],
        extra_compile_args=(["-O0", "-g"] if DEBUG else ["-O3"]),
        undef_macros=(["NDEBUG"] if DEBUG else []),
    ),
    # The real-kernel recorder's native threads (vCPU run loops, MSI injector).
    Extension(
        "kvmwake.kernel._inject",
        ["kvmwake/kernel/_inject.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=(["-O0", "-g"] if DEBUG else ["-O2"]),
        undef_macros=(["NDEBUG"] if DEBUG else []),
    ),
]

# The debug build's C in a directory of its own: cythonize regenerates C only when the
# .pyx is newer, not when the directives change.
setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES,
                            build_dir="build/cython-debug" if DEBUG else "build/cython"))
