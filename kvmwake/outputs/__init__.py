"""What kvmwake writes: the results of a run, read off a ``Host``, in each output form.

Each module turns a host (or its engine's records) into one kind of output:

* ``stats``: halt stats as dicts under the kernel's binary-stats names (one
  vCPU, or summed over a VM), and wake-latency percentiles;
* ``tracefmt``: the kernel's ``kvm_vcpu_wakeup`` / ``kvm_halt_poll_ns``
  tracepoint text, written from the engines' trace records and read back
  (from a simulated run or a real kernel's ``trace``/``trace-cmd report``);
* ``timeline``: the state timeline's record layout (``TIMELINE_DTYPE``) and
  its per-host-CPU running / polling / idle totals;
* ``perfetto``: the state timeline as Chrome trace-event JSON (Perfetto,
  chrome://tracing) for ``kvmwake run --perfetto``;
* ``arrays``: per-vCPU stats, histograms and wake latencies as ``.npz``
  arrays for ``kvmwake run --npz``;
* ``plots``: the three-panel PNG of ``kvmwake run --plot`` (wake latency,
  ``halt_poll_ns`` over time, host CPU time; needs matplotlib);
* ``summary``: the run summary of ``kvmwake run``, as JSON (``--json``,
  ``summary.json``) and as the text printed at the end of a run.

They read a host after (or during) a run and leave its results alone; the one
setting they make, ``plots.enable_cpu_time`` switching the state timeline on
before a run, changes no result either.
"""
