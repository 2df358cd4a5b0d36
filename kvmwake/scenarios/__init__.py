"""Scenarios: whole hosts of VMs with guest programs and wake sources, from TOML files.

``build(name_or_path, ...)`` returns ``(host, sim_ns, scenario)``; ``load(path)``
reads and checks a file; ``names()`` lists the built-ins (the ``.toml`` files
in ``builtin/``: default, irq-storm, suspend-cycle, ipi-storm).

A scenario file::

    name = "ipi-storm"
    description = "one line for 'kvmwake scenarios'"
    sim = "100ms"                 # virtual time to run
    seed = 0

    [host]
    cpus = "per-vcpu"             # or a number
    scheduler = "fifo"            # or "eevdf": Linux 6.18's fair class (default fifo)
    vcpu_pack = false             # eevdf: the vCPU-pack wake placement, and wake-up
    preempt_skips_delayed = false #   preemption past delayed sleepers, of the host kernels
                                  #   kvmwake is held against (docs/design.md)
    halt_poll_ns = "200us"        # kvm module parameters (and _grow, _grow_start, _shrink)
    costs = { wake_to_run_ns = "5us" }   # or a distribution (kvmwake.costs), e.g.
    # costs = { wake_to_run_ns = { dist = "lognormal", median = "3us", sigma = 0.5,
    #                              max = "200us" },
    #           vm_exit_ns = { dist = "quantiles", q = ["800ns", "1us", "1.5us", "9us"] } }

    [[host.thread]]               # a host thread that is not a vCPU (Host.add_thread)
    name = "injector"             # optional; with count > 1, "injector-0", ...
    count = 1
    affinity = "all"              # or a CPU, or a list of CPUs
    ops = '''
    loop {                        # loop N { ... } repeats N times; no 'for' here
        sleep exp 200us           # blocks; an hrtimer wakes it (also: sleep 1ms,
                                  #   sleep uniform 10us 50us; sleep_until D: an
                                  #   absolute deadline moved on by D each time)
        msi 0 0x30                # x86 MSI to APIC ID 0,
        compute 2us               #   vector 0x30 of VM 0 (msi ID VEC vm=N); arm64:
    }                             #   irq INTID [vm=N], an irqfd write on an SPI
    '''

    [[host.load]]                 # background load (Host.add_load)
    duty = 0.5                    # computes duty x period, sleeps the rest, forever
    period = "1ms"
    affinity = [1]
    count = 1

    [vm]                          # every VM of the host
    arch = "x86"                  # or "arm64"
    vcpus = 1024                  # in all; split into VMs of at most per_vm
    per_vm = 1024
    tick = "4ms"                  # periodic wake of every halted vCPU
    halt_poll = "100us"           # KVM_CAP_HALT_POLL on each VM (optional)
    caps = ["ARM_SYSTEM_SUSPEND"]
    spis = 224                    # arm64 vGIC SPIs
    vmm = "default"               # or "reference", "deny-all", "package.module:Class"
    affinity = "pinned"           # vCPU threads: "pinned" (g % host CPUs), "all", or [0, 1]

    [[vm.program]]
    vcpus = "all"                 # or 3, [0, 2], "1:", "0::4" (Python slices of the VM's ids)
    power_off = false             # start STOPPED (arm64 KVM_ARM_VCPU_INIT power_off)
    ops = '''
    loop {
        compute exp 20us
        wake random-other
        hlt
    }
    '''

    [[vm.source]]                 # device interrupts (arm64 SPIs)
    intids = "spis"               # every SPI; or 40, "32:64", [40, 41]
    trigger = "edge"              # or "level"
    route = "(intid - 32) % nr_vcpus"
    poisson = "4ms"               # or period = "1ms" (phase = ...), or times = [...]

    [[vm.source]]                 # x86: MSIs
    apic_ids = "all"
    vector = 0x40
    period = "1ms"

Host threads are added after the VMs (their vCPU threads keep their indices,
CPUs and trace pids); ``nr_vcpus`` in a host program is the first VM's size.

Durations need their unit, written against the number (``"20us"``, ``"4ms"``,
``"1.5s"``): a bare number is an error naming the key and the units, except 0
and keys whose name ends in ``_ns`` (``halt_poll_ns = 200000``).  Ranges and
sizes are checked when the file is loaded, before anything is expanded:
times below 2**62 ns, INTID ranges within the VM's SPIs, and at most
``expand.MAX_VM_OPS`` ops (plus ``for`` iterations) compiled per VM.

Every error is a ``ScenarioError`` reading ``FILE:LINE: KEY: message``.

The modules: ``parse`` (TOML text -> checked ``Scenario``), ``lines`` (the line
of each TOML key), ``ops`` (the op syntax of ``ops = ...``), ``expand`` (a
scenario's programs and sources for one VM), ``catalog`` (the built-ins,
lookup by name or path) and ``build`` (a scenario -> a host and its VMs).
"""

from __future__ import annotations

from ..errors import ScenarioError
from .build import build
from .catalog import BUILTIN_DIR, get, names, path_of
from .parse import Scenario, load, loads

__all__ = ["Scenario", "ScenarioError", "build", "load", "loads", "names", "get", "path_of",
           "BUILTIN_DIR"]
