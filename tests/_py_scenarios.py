"""The built-in scenarios as they were built in Python, kept to check the TOML files against.

``build(name, ...)`` returns a ready ``Host`` and the virtual time to run.

* ``default``: 4,096 arm64 vCPUs (64 VMs x 64) on 256 host CPUs.  Each VM
  mixes four vCPU roles by ``vcpu_id % 4``: a request server (short compute,
  wakes a random peer, WFI), a worker (longer compute, WFI, woken by peers),
  a batch job (long compute, wakes its neighbour, WFI) and a mostly idle vCPU
  (a little compute, WFI, woken by the 4 ms tick or by peers).
* ``irq-storm``: 4,096 arm64 vCPUs (8 VMs of 512) on 256 host CPUs.  Each VM
  has 988 SPIs (INTIDs 32..1019), each an edge-triggered device source with
  Poisson arrivals (mean 4 ms) routed to vCPU ``(intid - 32) % 512``; every
  vCPU's virtual timer ticks every 4 ms (periodic re-arm in its handler);
  handlers take 2 us; the vCPUs compute Exp(30 us) between WFIs.
* ``suspend-cycle``: 4,096 arm64 vCPUs (512 VMs x 8) on 256 host CPUs, each VM
  under ``vmm.ReferenceVmm``.  Each VM cycles: the primary (vCPU 0) brings its
  secondaries up with PSCI CPU_ON, works, then every 100 us arms its timer
  1 ms ahead and calls SYSTEM_SUSPEND, until the policy honours it (it denies
  while a secondary is still on); each secondary works four bursts of
  Exp(50 us), each followed by a WFI its timer ends 30 us later, and CPU_OFFs.  The suspended primary is woken by its timer or by a device SPI
  (Poisson, mean 5 ms); the policy resumes it at the entry point with the
  context ID in x0, and the cycle starts again.
* ``ipi-storm``: the canonical comparison workload.  N x86 vCPUs (default
  1,024, in VMs of at most KVM_MAX_VCPUS = 1024), each on its own host CPU
  unless ``host_cpus`` says otherwise; each loops: compute for Exp(mean
  20 us), wake a uniformly chosen other vCPU of its VM, WFI.  Halt-poll
  ceiling 200 us, grow 2, grow start 10 us, shrink 2; a 4 ms periodic tick
  (multiples of 4 ms of virtual time) wakes every halted vCPU; wake-to-run
  cost 5 us.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kvmwake import guest as g
from kvmwake.errors import ScenarioError
from kvmwake.host import Host, check_int
from kvmwake import vmm as _vmm
from kvmwake.model import DEFAULT_NR_SPIS, MAX_NR_SPIS, MAX_VCPUS, mpidr_of
from kvmwake.uapi import Cap, PsciFn

MS = 1_000_000
US = 1_000


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    arch: str
    vcpus: int
    vcpus_per_vm: int
    host_cpus: int | None          # None: one per vCPU
    sim_ns: int
    program: Callable[[int, int], g.Program]   # (vcpu_id, nr_vcpus) -> program
    tick_ns: int = 4 * MS
    module_params: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    nr_spis: int = DEFAULT_NR_SPIS
    setup_vm: Callable | None = None     # (vm) -> None: interrupt sources, routing
    vmm: Callable | None = None          # () -> a vmm.Vmm for each VM


IRQ_STORM_MEAN_NS = 4 * MS


def _irq_storm_program(vcpu_id: int, nr_vcpus: int) -> g.Program:
    return g.Program([
        g.set_handler(2 * US),
        g.timer_arm(4 * MS, period_ns=4 * MS),
        g.loop([g.compute_exp(30 * US), g.wfi()]),
    ])


SUSPEND_RETRY_NS = 100 * US
SUSPEND_DEVICE_SPI = 40


def _suspend_cycle_program(vcpu_id: int, nr_vcpus: int) -> g.Program:
    """Secondaries: up (masked, as after reset), four bursts of work each followed by
    a timer-woken WFI, then CPU_OFF; CPU_ON restarts them at op 0."""
    return g.Program([g.unmask(),
                      g.loop([g.compute_exp(50 * US), g.timer_arm(30 * US), g.wfi()], count=4),
                      g.psci(PsciFn.CPU_OFF), g.end()])


def _suspend_cycle_primary(vm) -> g.Program:
    base = vm.code_address(0)
    ops = [g.unmask(), g.set_handler(1 * US)]
    for vid in range(1, vm.nr_vcpus):
        ops += g.psci(PsciFn.FN64_CPU_ON, mpidr_of(vid), base, vid)
    ops.append(g.compute_exp(200 * US))
    # Until the policy honours it: re-arm the wake-up timer, try SYSTEM_SUSPEND.
    ops.append(g.loop([g.compute(SUSPEND_RETRY_NS), g.timer_arm(1 * MS),
                       g.psci(PsciFn.FN64_SYSTEM_SUSPEND, base, 0xC0FFEE)]))
    return g.Program(ops)


def _suspend_cycle_setup(vm) -> None:
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    for v in vm.vcpus[1:]:
        v.init(power_off=True)
    vm.vcpus[0].load(_suspend_cycle_primary(vm))
    vm.configure_irq(SUSPEND_DEVICE_SPI, enabled=True, level=False)
    vm.route_spi(SUSPEND_DEVICE_SPI, vcpu=0)
    vm.add_irq_source(SUSPEND_DEVICE_SPI, mean_ns=5 * MS)


def _irq_storm_setup(vm) -> None:
    for intid in range(32, 32 + vm.nr_spis):
        vm.configure_irq(intid, enabled=True, level=False)
        vm.route_spi(intid, vcpu=(intid - 32) % vm.nr_vcpus)
        vm.add_irq_source(intid, mean_ns=IRQ_STORM_MEAN_NS)


def _default_program(vcpu_id: int, nr_vcpus: int) -> g.Program:
    role = vcpu_id % 4
    if role == 0:      # request server
        body = [g.compute_exp(30 * US), g.wake_random_other(), g.wfi()]
    elif role == 1:    # worker
        body = [g.compute_exp(100 * US), g.wfi()]
    elif role == 2:    # batch job
        body = [g.compute_uniform(200 * US, 2 * MS), g.wake_next(), g.wfi()]
    else:              # mostly idle
        body = [g.compute(10 * US), g.wfi()]
    return g.Program([g.loop(body)])


def _ipi_storm_program(vcpu_id: int, nr_vcpus: int) -> g.Program:
    return g.Program([g.loop([g.compute_exp(20 * US), g.wake_random_other(), g.wfi()])])


BUILTIN: dict[str, Scenario] = {
    "default": Scenario(
        name="default",
        description="4,096 arm64 vCPUs (64 VMs x 64) on 256 host CPUs: servers, workers, "
                    "batch and idle vCPUs waking each other, 4 ms tick",
        arch="arm64", vcpus=4096, vcpus_per_vm=64, host_cpus=256, sim_ns=200 * MS,
        program=_default_program),
    "irq-storm": Scenario(
        name="irq-storm",
        description="4,096 arm64 vCPUs (8 VMs x 512) on 256 host CPUs: 988 Poisson device "
                    "SPIs per VM routed across the vCPUs, 4 ms timer ticks, 2 us handlers",
        arch="arm64", vcpus=4096, vcpus_per_vm=512, host_cpus=256, sim_ns=100 * MS,
        program=_irq_storm_program, tick_ns=0, nr_spis=MAX_NR_SPIS,
        setup_vm=_irq_storm_setup),
    "suspend-cycle": Scenario(
        name="suspend-cycle",
        description="4,096 arm64 vCPUs (512 VMs x 8) on 256 host CPUs cycling CPU_OFF, "
                    "SYSTEM_SUSPEND, wake-up and resume under the reference VMM policy",
        arch="arm64", vcpus=4096, vcpus_per_vm=8, host_cpus=256, sim_ns=50 * MS,
        program=_suspend_cycle_program, tick_ns=0, setup_vm=_suspend_cycle_setup,
        vmm=_vmm.ReferenceVmm),
    "ipi-storm": Scenario(
        name="ipi-storm",
        description="N x86 vCPUs, one per host CPU: compute Exp(20 us), wake a random "
                    "other vCPU, WFI; poll ceiling 200 us; 4 ms tick",
        arch="x86", vcpus=1024, vcpus_per_vm=MAX_VCPUS["x86"], host_cpus=None,
        sim_ns=100 * MS, program=_ipi_storm_program,
        module_params={"halt_poll_ns": 200_000, "halt_poll_ns_grow": 2,
                       "halt_poll_ns_grow_start": 10_000, "halt_poll_ns_shrink": 2},
        costs={"wake_to_run_ns": 5_000}),
}


def names() -> list[str]:
    return list(BUILTIN)


def get(name: str) -> Scenario:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ScenarioError(f"unknown scenario {name!r} (built-in: {', '.join(BUILTIN)})") from None


def build(name: str, *, vcpus: int | None = None, host_cpus: int | None = None,
          sim_ns: int | None = None, seed: int = 0, engine: str = "core",
          trace_capacity: int = 0) -> tuple[Host, int, Scenario]:
    """Build scenario ``name``; returns ``(host, sim_ns, scenario)``."""
    sc = get(name)
    total = sc.vcpus if vcpus is None else check_int("vcpus", vcpus, 1, 1 << 24)
    if host_cpus is None:
        host_cpus = sc.host_cpus if sc.host_cpus is not None else total
    sim_ns = sc.sim_ns if sim_ns is None else check_int("sim_ns", sim_ns, 1, 1 << 62)
    host = Host(host_cpus=host_cpus, arch=sc.arch, seed=seed, costs=sc.costs,
                engine=engine, trace_capacity=trace_capacity)
    for pname, value in sc.module_params.items():
        setattr(host, pname, value)
    per_vm = min(sc.vcpus_per_vm, total)
    left = total
    while left:
        n = min(per_vm, left)
        vm = host.create_vm(n, nr_spis=sc.nr_spis)
        for v in vm.vcpus:
            try:
                v.load(sc.program(v.id, n))
            except g.ProgramError as exc:
                raise ScenarioError(f"scenario {name}, VM {vm.index} of {n} vCPUs, "
                                    f"vCPU {v.id}: {exc}") from None
        if sc.tick_ns:
            vm.set_tick(sc.tick_ns)
        if sc.setup_vm is not None:
            sc.setup_vm(vm)
        if sc.vmm is not None:
            vm.vmm = sc.vmm()
            vm.vmm.attach(vm)
        left -= n
    return host, sim_ns, sc

