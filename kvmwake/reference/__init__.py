"""The reference engine: kvmwake's model in plain Python.

Slow and meant to be obviously right.  The Cython core (``kvmwake._core``)
implements the same model; for the same inputs both give the same stats, the
same trace and the same counters, event for event (``tests/test_differential.py``).
The model is described in ``docs/design.md``.

The package has one module per piece of the core, with the same name and the
same functions (``tests/test_layout.py`` keeps the pairs whole):

* ``engine.py``    ``Engine`` and the event loop ``run_loop``  (``_core.pyx``)
* ``rng.py``       per-vCPU and per-source random streams      (``core/rng.pxi``)
* ``queue.py``     the event queue                             (``core/queue.pxi``)
* ``host.py``      host CPUs, run queues, time slices          (``core/host.pxi``)
* ``guest.py``     the guest program interpreter               (``core/guest.pxi``)
* ``halt.py``      kvm_vcpu_halt / kvm_vcpu_block              (``core/halt.pxi``)
* ``run.py``       KVM_RUN's loop, exits to userspace          (``core/run.pxi``)
* ``psci.py``      PSCI                                        (``core/psci.pxi``)
* ``gic.py``       the vGICv3 and LAPIC subsets                (``core/gic.pxi``)
* ``timer.py``     the arm64 virtual timer                     (``core/timer.pxi``)
* ``kick.py``      wake-ups, kicks, requests, ticks, sources   (``core/kick.pxi``)
* ``hostthread.py`` host threads that are not vCPUs            (``core/hostthread.pxi``)
* ``islands.py``   a host's independent islands                (``core/islands.pxi``)
* ``snapshot.py``  state out and in, consistency checks        (``core/snapshot.pxi``)
* ``bench.py``     micro-benchmark hooks                       (``core/bench.pxi``)

Each model function is a module-level function named as its Cython twin,
taking the engine ``e`` first; where the core passes a thread's global index,
the reference passes the thread object.  The pieces call each other by name,
as the core's do inside their one module; since those calls go round in
circles and imports may not, a piece imports only ``rng`` and ``queue`` and
names what it takes from the others as module globals, which
``engine._link_pieces`` sets as the package loads.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """The simulation cannot go on (e.g. a program that lets no time pass)."""


# EngineError is defined before the pieces are imported: they raise it.
from .rng import SOURCE_STREAM_BASE, draw_ns, fmix64, splitmix64, stream_seed  # noqa: E402
from .halt import PID_BASE  # noqa: E402
from .engine import Engine, run_loop  # noqa: E402

#: The name the draw function had before the pieces were split out.
draw = draw_ns

__all__ = ["Engine", "EngineError", "PID_BASE", "SOURCE_STREAM_BASE", "draw", "draw_ns",
           "fmix64", "run_loop", "splitmix64", "stream_seed"]
