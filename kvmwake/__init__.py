"""kvmwake: a fast, deterministic model of how Linux KVM blocks, polls, kicks and wakes vCPUs.

    import kvmwake as kw
    from kvmwake import guest as g

    vm = kw.VM(arch="arm64", nr_vcpus=2, host_cpus=2, seed=1)
    vm.enable_cap(kw.Cap.HALT_POLL, 100_000)
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(20_000), g.wake_random_other(), g.wfi()])])
    vm.run(until_ns=10_000_000)
    vm.stats()["halt_successful_poll"]
    print(vm.trace_text())
"""

__version__ = "0.1.0"

import time as _time  # noqa: E402

#: ``time.perf_counter()`` when kvmwake began to load: ``kvmwake run`` counts its
#: start-up (the imports) from here.
_LOAD_T0 = _time.perf_counter()


class CoreMissingError(ImportError):
    """The compiled core ``kvmwake._core`` is missing or does not load (an ImportError)."""


def _check_core() -> None:
    """Import the compiled core, or fail with one line that says what to do.

    The usual cause: Python runs in a source tree (the repository root, or with
    it on sys.path) where ``_core`` was never built, so the tree shadows an
    installed kvmwake.  ``pip install -e .`` builds the core in place there.
    """
    import importlib.util
    import os

    pkg = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(pkg)
    in_tree = os.path.exists(os.path.join(root, "pyproject.toml"))
    if in_tree:
        fix = (f"run pip install -e . in {root} (or pip install . and run from another "
               "folder)")
    else:
        fix = "reinstall it: pip install --force-reinstall kvmwake"
    try:
        spec = importlib.util.find_spec(__name__ + "._core")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise CoreMissingError(f"kvmwake: the compiled core kvmwake._core is missing from "
                               f"{pkg}: {fix}", name=__name__ + "._core")
    if os.path.realpath(os.path.dirname(spec.origin)) != os.path.realpath(pkg):
        # An editable install elsewhere maps kvmwake._core to its own tree: a core
        # built from other sources, which must not run this tree's Python.
        raise CoreMissingError(f"kvmwake: the compiled core kvmwake._core is missing from "
                               f"{pkg} (the one found, {spec.origin}, belongs to another "
                               f"copy of kvmwake): {fix}", name=__name__ + "._core")
    try:
        from . import _core  # noqa: F401
    except ImportError as exc:
        raise CoreMissingError(f"kvmwake: the compiled core {spec.origin} does not load "
                               f"({exc}): {fix}", name=__name__ + "._core") from None

from . import guest, hostprog, model, uapi, vmm  # noqa: E402
from .errors import (  # noqa: E402
    DeadlockError, EngineError, KvmError, ProgramError, ScenarioError, SnapshotError,
)
from .host import Host, HostThread  # noqa: E402
from .model import Request  # noqa: E402
from .uapi import (  # noqa: E402
    Cap, ExitReason, KvmReg, MpState, PsciFn, PsciRet, PsciVersion, SystemEventType,
    VcpuFeature,
)
from .vm import VCpu, VM  # noqa: E402
from .vcpu_threads import ClockHold  # noqa: E402

_check_core()

__all__ = [
    "Host", "HostThread", "VM", "VCpu", "Cap", "ExitReason", "KvmReg", "MpState", "PsciFn", "PsciRet",
    "PsciVersion", "SystemEventType", "VcpuFeature", "Request", "ClockHold", "KvmError", "ProgramError", "EngineError",
    "ScenarioError", "SnapshotError", "DeadlockError", "guest", "hostprog", "model", "uapi", "vmm",
    "CoreMissingError", "__version__",
]
