"""The ``kvmwake`` command line and its tools.

* ``main``: the ``kvmwake`` command (``kvmwake run``, ``scenarios``, ``kernel``,
  ``sweep``); ``main(argv)`` returns the exit status, ``run_chunked(host, until_ns)``
  runs a host as ``kvmwake run`` does (in chunks, with a progress bar);
* ``argtypes``: argument types of the command lines (integers and floats with
  their ranges), shared with ``kvmwake kernel``;
* ``sweep``: ``kvmwake sweep``, parameter sweeps run in local processes or on
  a Dask cluster.

The summary, arrays, trace and plot that ``kvmwake run`` writes are made by
``kvmwake.outputs``.
"""

from .main import main, run_chunked

__all__ = ["main", "run_chunked"]
