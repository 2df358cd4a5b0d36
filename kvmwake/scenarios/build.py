"""A checked scenario built: a ``Host`` with its VMs, programs, capabilities, wake sources
and VMM policies, ready to run."""

from __future__ import annotations

from .. import guest as g
from ..errors import KvmError, ScenarioError
from ..host import Host, check_int
from ..uapi import Cap
from .catalog import get
from .expand import programs_for, source_targets
from ..vmm import load_policy
from .parse import Scenario, host_program


def build(name_or_path, *, vcpus: int | None = None, host_cpus: int | None = None,
          sim_ns: int | None = None, seed: int | None = None, engine: str = "core",
          trace_capacity: int = 0, scheduler: str | None = None,
          affinity=None, threads: int | None = None) -> tuple[Host, int, Scenario]:
    """Build a built-in scenario (by name) or a scenario file (by path, or a ``Scenario``).

    ``vcpus`` overrides the total vCPU count (still split into VMs of at most
    the file's ``per_vm``), ``host_cpus`` the host's CPUs, ``sim_ns`` the run
    length, ``seed`` the file's seed, ``scheduler`` the file's host scheduler
    (``[host] scheduler``), ``affinity`` the file's ``[vm] affinity`` ("pinned",
    "all" or a list of host CPUs), ``threads`` the host's ``threads`` (the OS
    threads its islands may run on).  Returns ``(host, sim_ns, scenario)``.
    """
    sc = name_or_path if isinstance(name_or_path, Scenario) else get(name_or_path)
    total = sc.vcpus if vcpus is None else check_int("vcpus", vcpus, 1, 1 << 24)
    if host_cpus is None:
        host_cpus = sc.host_cpus if sc.host_cpus is not None else total
    sim_ns = sc.sim_ns if sim_ns is None else check_int("sim_ns", sim_ns, 1, 1 << 62)
    seed = sc.seed if seed is None else seed
    host = Host(host_cpus=host_cpus, arch=sc.arch, seed=seed, costs=sc.costs,
                engine=engine, trace_capacity=trace_capacity,
                scheduler=sc.scheduler if scheduler is None else scheduler, threads=threads,
                vcpu_pack=sc.vcpu_pack, preempt_skips_delayed=sc.preempt_skips_delayed)
    for pname, value in sc.module_params.items():
        setattr(host, pname, value)
    per_vm = min(sc.vcpus_per_vm, total)
    left = total
    while left:
        n = min(per_vm, left)
        try:
            vm = host.create_vm(n, nr_spis=sc.nr_spis,
                                affinity=sc.affinity if affinity is None else affinity)
        except ValueError as exc:
            if "affinity" not in str(exc):
                raise
            raise ScenarioError(f"{sc.path}: scenario {sc.name}: vm.affinity: {exc}") from None
        progs, off = programs_for(sc, vm, n)
        try:
            for v in vm.vcpus:
                if v.id in progs:
                    v.load(progs[v.id])
        except (g.ProgramError, KvmError) as exc:
            raise ScenarioError(f"{sc.path}: scenario {sc.name}, VM {vm.index} of {n} "
                                f"vCPUs: {exc}") from None
        if sc.tick_ns:
            vm.set_tick(sc.tick_ns)
        for c in sc.caps:
            vm.enable_cap(Cap[c])
        if sc.halt_poll is not None:
            vm.enable_cap(Cap.HALT_POLL, sc.halt_poll)
        for vid in sorted(off):
            vm.vcpus[vid].init(power_off=True)
        for s in sc.sources:
            spec = s.spec
            timing = {k: spec[k] for k in ("mean_ns", "period_ns", "phase_ns", "times_ns")
                      if k in spec}
            for a, b in source_targets(sc, s, n):
                if sc.arch == "arm64":
                    vm.configure_irq(a, enabled=True, level=spec["level"])
                    vm.route_spi(a, vcpu=b)
                    vm.add_irq_source(a, **timing)
                else:
                    vm.add_msi_source(a, b, **timing)
        if sc.vmm != "default":
            vm.vmm = load_policy(sc.vmm)()
            vm.vmm.attach(vm)
        left -= n
    # Host threads after the VMs (the vCPU threads keep their indices, CPUs and pids).
    sizes = [vm.nr_vcpus for vm in host.vms]
    for spec in sc.host_threads:
        items = host_program(sc, spec, sizes) if spec.nodes is not None else None
        for i in range(spec.count):
            name = spec.name if spec.name is None or spec.count == 1 else f"{spec.name}-{i}"
            try:
                if items is not None:
                    host.add_thread(items, spec.affinity, name)
                else:
                    host.add_load(spec.duty, spec.period_ns, spec.affinity, name)
            except (ValueError, TypeError) as exc:
                raise sc.error(spec.key, str(exc)) from None
    return host, sim_ns, sc
