"""VM and VCpu: the ioctl-shaped objects a VMM developer drives."""

from __future__ import annotations

import contextlib
import errno
import functools
import numbers
import warnings

import numpy as np

from . import guest as _guest
from . import snapshot as _snapshot
from . import vmm as _vmm
from .errors import KvmError, SnapshotError
from .costs import cost_bound
from .exits import Exit, from_engine
from .host import Host, check_affinity, check_arch, check_int, host_to_bytes, restore_host
from .model import (DEFAULT_MEM_SIZE, DEFAULT_NR_SPIS, KVM_REQUEST_MASK, MEM_BASE, S_BLOCKING,
                    SourceKind, ThreadState, mpidr_of)
from .outputs import stats as _stats
from .outputs import tracefmt
from .uapi import (
    DEFAULT_VCPU_FEATURES, GICD_CTLR_ENABLE_SS_G1, KVM_ARM_TARGET_GENERIC_V8,
    KVM_REG_SIZE_MASK, KVM_REG_SIZE_U64, KVM_VCPU_VALID_FEATURES, PSR_AA32_MODE_MASK,
    PSR_MODE_EL0t, PSR_MODE_EL1h, PSR_MODE_EL1t, SUPPORTED_VCPU_FEATURES, Cap, ExitReason,
    KvmReg, MpState, PsciVersion, VcpuFeature,
)

#: Capabilities answered by check_extension, per arch (value returned).
_EXTENSIONS = {
    "arm64": {Cap.IRQCHIP: 1, Cap.MP_STATE: 1, Cap.ARM_PSCI: 1, Cap.ARM_PSCI_0_2: 1,
              Cap.IMMEDIATE_EXIT: 1, Cap.HALT_POLL: 1, Cap.BINARY_STATS_FD: 1,
              Cap.SYSTEM_EVENT_DATA: 1, Cap.ARM_SYSTEM_SUSPEND: 1},
    "x86": {Cap.IRQCHIP: 1, Cap.HLT: 1, Cap.MP_STATE: 1, Cap.SIGNAL_MSI: 1,
            Cap.IMMEDIATE_EXIT: 1, Cap.HALT_POLL: 1, Cap.BINARY_STATS_FD: 1,
            Cap.SYSTEM_EVENT_DATA: 1},
}
#: KVM_SET_MP_STATE's accepted values (arch/arm64/kvm/arm.c; arch/x86/kvm/x86.c with an
#: in-kernel LAPIC).
MP_STATES = {
    "arm64": frozenset({MpState.RUNNABLE, MpState.STOPPED, MpState.SUSPENDED}),
    "x86": frozenset({MpState.RUNNABLE, MpState.UNINITIALIZED, MpState.INIT_RECEIVED,
                      MpState.HALTED, MpState.SIPI_RECEIVED, MpState.AP_RESET_HOLD}),
}
#: KVM_GET/SET_ONE_REG: each register's name (``KvmReg`` member name, lower case) and
#: its kernel ID.  x0-x30, sp, pc and pstate are ``struct kvm_regs`` core registers
#: (engine indices 0-33); mpidr_el1 a system register; psci_version a firmware one.
REGS = {r.name.lower(): r for r in KvmReg}
_CORE_INDEX = {**{KvmReg[f"X{i}"]: i for i in range(31)}, KvmReg.SP: 31, KvmReg.PC: 32,
               KvmReg.PSTATE: 33}
#: PSTATE modes set_core_reg accepts for an AArch64 vCPU without nested virtualisation.
_PSTATE_MODES = frozenset({PSR_MODE_EL0t, PSR_MODE_EL1t, PSR_MODE_EL1h})
#: Values KVM_REG_ARM_PSCI_VERSION accepts (with the PSCI 0.2 feature, and without).
PSCI_VERSIONS = frozenset(PsciVersion)


def _paced(fn):
    """An injection from userspace.  In real time (``Host.set_realtime``) it acts at
    the wall clock's virtual time, and the thread driving the clock looks again
    at when the next event is due."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        host = self.host if isinstance(self, VM) else self.vm.host
        th = host._threads
        if th is None or th.rt is None:
            return fn(self, *args, **kwargs)
        th.sync_to_wall()
        try:
            return fn(self, *args, **kwargs)
        finally:
            th.poke()
    return call


def _is_int(v) -> bool:
    """An integer argument (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


#: The watchdog of VCpu.run(): virtual time after which a vCPU that has not
#: exited gets a signal (and so KVM_EXIT_INTR).
DEFAULT_RUN_TIMEOUT_NS = 1_000_000_000


class VM:
    """A VM on a host.

    ``kw.VM(arch="arm64", nr_vcpus=2, host_cpus=2, seed=1)`` creates a VM on
    a private host; ``host.create_vm(n)`` puts one on a shared host.

    Parameters
    ----------
    arch : {"arm64", "x86"}
    nr_vcpus : int
        1 .. KVM_MAX_VCPUS for the arch (512 arm64, 1024 x86).
    host_cpus : int, optional
        Private host only: its CPU count (default: one per vCPU).
    seed, costs, engine, trace_capacity
        Private host only: see ``Host``.
    host : Host, optional
        Put the VM on this host instead of a private one.
    nr_spis : int
        arm64: SPIs of the vGIC, INTIDs 32 .. 32 + nr_spis - 1 (at most 988,
        up to INTID 1019; default 224, KVM's default of 256 IRQs).
    affinity : "pinned", "all", int or list of ints
        Where its vCPU threads may run (sched_setaffinity): ``"pinned"`` (the
        default: thread g on host CPU g % host_cpus for good), ``"all"`` (every
        host CPU), or a list of host CPUs (every vCPU thread may run on any of
        them; thread g starts on the (g mod n)-th of the n).  A thread allowed
        on several CPUs is placed at each wake-up (docs/design.md, "Placement");
        ``vcpu.set_affinity`` changes one thread's set later.

    The vGIC starts as a booted Linux guest leaves it: distributor enabled,
    SGIs 0-15, the timer PPI 27 and the tick PPI 30 enabled, SPIs disabled
    (level-triggered, routed to vCPU 0), every priority 0xA0, PMR 0xF0,
    interrupts unmasked.  On x86 each vCPU has a LAPIC with TPR 0 and IF=1.
    """

    def __init__(self, arch: str = "arm64", nr_vcpus: int = 1, host_cpus: int | None = None,
                 seed: int = 0, host: Host | None = None, costs: dict | None = None,
                 engine: str = "core", trace_capacity: int = 1 << 20,
                 nr_spis: int = DEFAULT_NR_SPIS, memory_size: int = DEFAULT_MEM_SIZE,
                 affinity="pinned"):
        # Every argument is checked before the host is touched: a constructor that
        # fails leaves the host (and its snapshot) exactly as it was.
        check_arch(arch)
        if host is not None:
            if not isinstance(host, Host):
                raise TypeError(f"host must be a kvmwake.Host, not {type(host).__name__}")
            if host_cpus is not None or costs is not None:
                raise ValueError("host_cpus and costs belong to the host: pass them to Host()")
        memory_size = check_int("memory_size", memory_size, 1 << 12, 1 << 48)
        if host is None:
            # One host CPU per vCPU (checked first, so that a bad count is named).
            Host._check_vm_args(nr_vcpus, arch, nr_spis)
            host = Host(host_cpus=int(nr_vcpus) if host_cpus is None else host_cpus, arch=arch,
                        seed=seed, costs=costs, engine=engine, trace_capacity=trace_capacity)
        nr_spis = host._check_vm(nr_vcpus, arch, nr_spis)
        affinity = check_affinity(affinity, host.host_cpus)
        vcpus = int(nr_vcpus)
        self.host = host
        self.arch = arch
        self.nr_vcpus = vcpus
        self.nr_spis = nr_spis
        self._halt_poll_cap: int | None = None
        self._tick_ns = 0
        self._suspend_cap = False
        self.memory_base = MEM_BASE[arch]
        self.memory_size = memory_size
        self.vmm = _vmm.Vmm()
        self.exits = 0
        # The only step that changes the host, last.
        self.index, self._first = host._add_vm(self, vcpus, arch, nr_spis)
        if affinity != "pinned":
            for g in range(self._first, self._first + vcpus):
                host._engine.set_affinity(g, affinity, True)
        self.vcpus = [VCpu(self, i) for i in range(vcpus)]
        self.vmm.attach(self)

    @property
    def _engine(self):
        return self.host._engine

    # -- capabilities ---------------------------------------------------------------

    def check_extension(self, cap) -> int:
        """``KVM_CHECK_EXTENSION``: 0 for an unknown or unsupported capability."""
        if not _is_int(cap):
            return 0
        try:
            cap = Cap(int(cap))
        except ValueError:
            return 0
        return _EXTENSIONS[self.arch].get(cap, 0)

    def enable_cap(self, cap, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM.

        ``Cap.HALT_POLL``: ``args[0]`` is the VM's maximum poll time in ns; it
        must fit an unsigned int and flags must be 0 (else EINVAL).  Once
        enabled, the VM ignores the module's ``halt_poll_ns`` for good.
        """
        try:
            if not _is_int(cap):
                raise ValueError(cap)
            cap = Cap(int(cap))
        except ValueError:
            raise KvmError(errno.EINVAL, f"unknown capability {cap!r}") from None
        flags_ok = _is_int(flags) and flags == 0
        if cap == Cap.ARM_SYSTEM_SUSPEND and self.arch == "arm64":
            # kvm_vm_ioctl_enable_cap: flags must be 0; args ignored; idempotent.
            if not flags_ok:
                raise KvmError(errno.EINVAL, f"KVM_CAP_ARM_SYSTEM_SUSPEND: flags {flags!r} != 0")
            self._engine.enable_system_suspend(self.index)
            self._suspend_cap = True
            return
        if cap == Cap.HALT_POLL:
            arg0 = args[0] if args else 0
            if not flags_ok or not _is_int(arg0) or not 0 <= arg0 <= 0xFFFF_FFFF:
                raise KvmError(errno.EINVAL, "KVM_CAP_HALT_POLL needs flags == 0 and "
                                             f"args[0] to fit an unsigned int (got flags={flags}, "
                                             f"args[0]={arg0!r})")
            arg0 = int(arg0)
            self._engine.set_vm_halt_poll(self.index, arg0)
            self._halt_poll_cap = arg0
            return
        raise KvmError(errno.EINVAL, f"capability {cap.name} cannot be enabled on this VM")

    @property
    def max_halt_poll_ns(self) -> int:
        """``kvm_vcpu_max_halt_poll_ns``: the ceiling in force for this VM."""
        return self._halt_poll_cap if self._halt_poll_cap is not None else self.host.halt_poll_ns

    # -- wake sources ------------------------------------------------------------------

    def set_tick(self, period_ns: int) -> None:
        """A periodic wake source: at every multiple of ``period_ns`` every halted
        vCPU of the VM is woken (0 switches it off)."""
        period_ns = check_int("period_ns", period_ns, 0, 1 << 62)
        self._engine.set_tick(self.index, period_ns)
        self._tick_ns = period_ns

    # -- interrupts ------------------------------------------------------------------------

    def _need_arm64(self, what):
        if self.arch != "arm64":
            raise KvmError(errno.ENXIO, f"{what}: this {self.arch} VM has no vGIC")

    def _check_intid(self, intid, vcpu, what):
        """Validate an INTID; returns the engine thread index it concerns (-1: an SPI)."""
        intid = check_int("intid", intid, 0, 1023)
        if intid < 32:
            if vcpu is None:
                raise KvmError(errno.EINVAL, f"{what}: INTID {intid} is private to a vCPU; "
                                             "name the vcpu")
            return intid, self._vcpu_index(vcpu)
        if intid >= 32 + self.nr_spis:
            raise KvmError(errno.EINVAL, f"{what}: SPI {intid} is beyond the VM's "
                                         f"{self.nr_spis} SPIs (32..{31 + self.nr_spis})")
        return intid, -1

    def _vcpu_index(self, vcpu) -> int:
        if isinstance(vcpu, VCpu):
            if vcpu.vm is not self:
                raise ValueError("that vCPU belongs to another VM")
            return vcpu._g
        return self._first + check_int("vcpu", vcpu, 0, self.nr_vcpus - 1)

    @_paced
    def irq_line(self, intid: int, level: int, vcpu=None) -> None:
        """``KVM_IRQ_LINE``: drive an SPI (or, with ``vcpu``, a PPI) to ``level``.

        Edge-configured interrupts become pending on a rising level; level
        ones follow the line.  SGIs, PPIs without a vCPU and SPIs beyond the
        VM's count are rejected with EINVAL, as the kernel does.
        """
        self._need_arm64("KVM_IRQ_LINE")
        if isinstance(level, bool) or level not in (0, 1):
            raise ValueError(f"level must be 0 or 1, not {level!r}")
        intid = check_int("intid", intid, 0, 1023)
        if intid < 16:
            raise KvmError(errno.EINVAL, f"KVM_IRQ_LINE: INTID {intid} is an SGI; SGIs are "
                                         "sent by vCPUs, not raised by lines")
        if intid < 32 and vcpu is None:
            raise KvmError(errno.EINVAL, f"KVM_IRQ_LINE: PPI {intid} needs a vcpu")
        intid, g = self._check_intid(intid, vcpu, "KVM_IRQ_LINE")
        self._engine.irq_line(self.index, intid, bool(level), g)

    @_paced
    def signal_msi(self, address: int, data: int, flags: int = 0) -> int:
        """``KVM_SIGNAL_MSI`` (x86): fixed delivery of vector ``data & 0xff`` to the
        APIC ID in ``address`` bits 19:12.  Returns 1 (delivered).

        The kernel returns 0 without an errno for an APIC ID no vCPU has; here
        that is a ``ValueError`` naming the ID.  Nonzero flags give EINVAL, as
        in the kernel.
        """
        if self.arch != "x86":
            raise KvmError(errno.ENODEV, "KVM_SIGNAL_MSI: this arm64 VM has no ITS")
        address = check_int("address", address, 0, (1 << 64) - 1)
        data = check_int("data", data, 0, 0xFFFF_FFFF)
        flags = check_int("flags", flags, 0, 0xFFFF_FFFF)
        if flags:
            raise KvmError(errno.EINVAL, f"KVM_SIGNAL_MSI: flags {flags:#x} not supported")
        if (address >> 20) & 0xFFF != 0xFEE or address >> 32:
            raise ValueError(f"MSI address {address:#x} is not in the LAPIC window 0xfee00000")
        if address & (1 << 2):
            raise ValueError("MSI with logical destination mode is not modelled")
        if (data >> 8) & 7:
            raise ValueError(f"MSI delivery mode {(data >> 8) & 7} is not modelled "
                             "(only fixed, 0)")
        vector = data & 0xFF
        if vector < 16:
            raise ValueError(f"MSI vector {vector} is reserved (vectors 0-15)")
        apic_id = (address >> 12) & 0xFF
        if apic_id >= self.nr_vcpus:
            raise ValueError(f"MSI to APIC ID {apic_id}: no vCPU of this VM has it "
                             f"(APIC IDs 0..{self.nr_vcpus - 1}); not delivered")
        self._engine.signal_msi(self._first + apic_id, vector)
        return 1

    def configure_irq(self, intid: int, *, vcpu=None, enabled: bool | None = None,
                      priority: int | None = None, level: bool | None = None) -> None:
        """**Guest write**: set up an interrupt as the guest's drivers would (enable,
        priority, trigger), at the host's current time.  Enabling queues a pending
        interrupt and kicks its vCPU (``vgic_mmio_write_senable``).  A VMM restoring
        state uses ``vgic_set_irq`` instead.

        Private INTIDs (< 32) need ``vcpu``.  Only SPIs can change trigger.
        Priorities keep their top 5 bits, as KVM's vGIC does.
        """
        self._need_arm64("configure_irq")
        intid, g = self._check_intid(intid, vcpu, "configure_irq")
        if priority is not None:
            priority = check_int("priority", priority, 0, 255)
        if level is not None and intid < 32:
            raise ValueError(f"INTID {intid}: SGIs are edge and PPIs fixed; only SPIs "
                             "change trigger")
        self._engine.configure_irq(self.index, g, intid,
                                   -1 if enabled is None else int(bool(enabled)),
                                   -1 if priority is None else priority,
                                   -1 if level is None else int(bool(level)))

    def route_spi(self, intid: int, *, vcpu: int | None = None, mpidr: int | None = None) -> None:
        """**Guest write** of ``GICD_IROUTER``: route SPI ``intid`` to ``vcpu`` (or to an
        MPIDR; one that no vCPU has leaves the SPI undelivered)."""
        self._need_arm64("route_spi")
        intid, _ = self._check_intid(intid, None, "route_spi")
        if (vcpu is None) == (mpidr is None):
            raise ValueError("route_spi needs exactly one of vcpu= or mpidr=")
        if vcpu is not None:
            mpidr = mpidr_of(self._vcpu_index(vcpu) - self._first)
        mpidr = check_int("mpidr", mpidr, 0, (1 << 64) - 1)
        self._engine.route_spi(self.index, intid, mpidr)

    def set_distributor(self, enabled: bool) -> None:
        """**Guest write** of ``GICD_CTLR`` (``vgic_mmio_write_v3_misc``): enable or
        disable the distributor.  Enabling kicks every vCPU with an interrupt queued
        on its ap_list (``vgic_kick_vcpus``); an interrupt that became pending while
        the distributor was disabled was never queued and wakes nobody.  A VMM
        restoring state uses ``vgic_set_ctlr`` (no kick)."""
        self._need_arm64("set_distributor")
        self._engine.set_dist_enabled(self.index, bool(enabled))

    @property
    def distributor_enabled(self) -> bool:
        self._need_arm64("distributor_enabled")
        return self._engine.vm_gic_enabled(self.index)

    def add_irq_source(self, intid: int, *, period_ns: int | None = None,
                       phase_ns: int = 0, mean_ns: int | None = None,
                       times_ns=None) -> int:
        """A device interrupt source raising SPI ``intid`` (arm64; route it with ``route_spi``).

        Exactly one of: ``period_ns`` (arrivals at ``phase_ns + k * period_ns``),
        ``mean_ns`` (Poisson arrivals: exponential gaps of that mean, from the
        source's own seeded stream), or ``times_ns`` (a trace: the absolute
        arrival times, non-decreasing).
        """
        self._need_arm64("add_irq_source")
        intid, _ = self._check_intid(intid, None, "add_irq_source")
        return self._add_source(intid, 0, period_ns, phase_ns, mean_ns, times_ns)

    def add_msi_source(self, apic_id: int, vector: int, *, period_ns: int | None = None,
                       phase_ns: int = 0, mean_ns: int | None = None, times_ns=None) -> int:
        """A device sending fixed-mode MSIs of ``vector`` to APIC ID ``apic_id`` (x86).

        Arrivals as for ``add_irq_source``.
        """
        if self.arch != "x86":
            raise KvmError(errno.ENODEV, "add_msi_source: this arm64 VM has no ITS; use "
                                         "add_irq_source")
        apic_id = check_int("apic_id", apic_id, 0, self.nr_vcpus - 1)
        vector = check_int("vector", vector, 16, 255)
        return self._add_source(vector, self._first + apic_id, period_ns, phase_ns, mean_ns,
                                times_ns)

    def _add_source(self, intid, target, period_ns, phase_ns, mean_ns, times_ns) -> int:
        given = [x is not None for x in (period_ns, mean_ns, times_ns)]
        if sum(given) != 1:
            raise ValueError("an interrupt source needs exactly one of period_ns, mean_ns, "
                             "times_ns")
        eng = self._engine
        if period_ns is not None:
            period_ns = check_int("period_ns", period_ns, 1, 1 << 62)
            phase_ns = check_int("phase_ns", phase_ns, 0, 1 << 62)
            return eng.add_source(self.index, intid, SourceKind.PERIODIC, period_ns, phase_ns,
                                  None, target)
        if mean_ns is not None:
            mean_ns = check_int("mean_ns", mean_ns, 1, 1 << 50)
            return eng.add_source(self.index, intid, SourceKind.POISSON, mean_ns, 0, None, target)
        times = np.asarray(times_ns)
        if times.ndim != 1 or not (np.issubdtype(times.dtype, np.integer) or times.size == 0):
            raise ValueError("times_ns must be a one-dimensional sequence of integers")
        if times.size and (times.min() < 0 or times.max() > (1 << 62)):
            raise ValueError("times_ns must lie in 0..2**62")
        times = times.astype(np.uint64)
        if np.any(np.diff(times.astype(np.int64)) < 0):
            raise ValueError("times_ns must be non-decreasing")
        return eng.add_source(self.index, intid, SourceKind.TRACE, 0, 0, times, target)

    # -- running -------------------------------------------------------------------------

    def _start_loaded(self):
        for v in self.vcpus:
            if v._loaded and not v._started:
                self._engine.start_vcpu(v._g)
                v._started = True

    def run(self, until_ns: int, vmm=None) -> None:
        """Run until virtual time ``until_ns`` (every VM of the host runs too).

        Every vCPU with a program is inside ``KVM_RUN``; exits go to ``vmm``
        (a ``vmm.Vmm``; it stays the VM's policy for later runs).  The
        default policy re-enters after INTR and ucall SYNC, and leaves a vCPU
        out after DONE, a shutdown or an error.  If the policy raises, the exit
        stays pending and the next run offers it again.  From inside a policy:
        ``KvmError(EBUSY)``.
        """
        self.host._no_policy_reentry("vm.run()")
        self.host._no_vcpu_threads("vm.run()")
        if vmm is not None:
            if not isinstance(vmm, _vmm.Vmm):
                raise TypeError(f"vmm must be a kvmwake.vmm.Vmm, not {type(vmm).__name__}")
            self.vmm = vmm
            vmm.attach(self)
        self.host.run(until_ns)

    def _reenter(self, vcpu):
        vcpu._held = None
        vcpu._started = True
        self._engine.start_vcpu(vcpu._g)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """This VM as bytes: with its host (shared CPUs and clock), every VM on it included."""
        return host_to_bytes(self.host, vm_index=self.index)

    def save(self, path) -> None:
        data = self.snapshot()
        with open(path, "wb") as fh:
            fh.write(data)

    @classmethod
    def restore(cls, src, vmm_classes: dict | None = None, host_cpus: int | None = None,
                **module_params) -> "VM":
        """The VM of a ``vm.snapshot()`` (bytes or a path), on its restored host."""
        host, header = restore_host(src, vmm_classes, host_cpus, **module_params)
        i = header.get("vm_index")
        if not isinstance(i, int) or not 0 <= i < len(host.vms):
            raise SnapshotError("this is a host snapshot, not a VM's; restore it with "
                                "Host.restore")
        return host.vms[i]

    def __reduce__(self):
        return (VM.restore, (self.snapshot(),))

    def _snapshot_record(self) -> dict:
        """This VM's record in a snapshot's header (``snapshot.vm_record``)."""
        return _snapshot.vm_record(
            nr_vcpus=self.nr_vcpus, nr_spis=self.nr_spis, memory_size=self.memory_size,
            halt_poll_cap=self._halt_poll_cap, tick_ns=self._tick_ns,
            suspend_cap=self._suspend_cap, exits=self.exits, policy=self.vmm,
            vcpus=[{"loaded": v._loaded, "started": v._started, "held": v._held}
                   for v in self.vcpus])

    @classmethod
    def _from_record(cls, host: Host, rec: dict) -> "VM":
        """The Python object of a VM of a decoded snapshot (``snapshot.Snapshot.vms``), added
        to ``host`` without touching the engine's state (the snapshot's arrays replace it)."""
        vm = cls.__new__(cls)
        vm.host = host
        vm.arch = host.arch
        vm.index = len(host.vms)
        vm._first = rec["first"]
        vm.nr_vcpus = rec["nr_vcpus"]
        vm.nr_spis = rec["nr_spis"]
        vm._halt_poll_cap = rec["halt_poll_cap"]
        vm._tick_ns = rec["tick_ns"]
        vm._suspend_cap = rec["suspend_cap"]
        vm.memory_size = rec["memory_size"]
        vm.memory_base = MEM_BASE[host.arch]
        vm.exits = rec["exits"]
        vm.vcpus = [VCpu(vm, i) for i in range(vm.nr_vcpus)]
        for v, vr in zip(vm.vcpus, rec["vcpus"]):
            v._loaded, v._started, v._held = vr["loaded"], vr["started"], vr["held"]
        host.vms.append(vm)
        return vm

    def _restore_policy(self, rec: dict, vmm_classes: dict) -> None:
        """The VM's VMM policy from its snapshot record ``{"class", "state"}``."""
        cls = _snapshot.policy_class(self.index, rec["class"], vmm_classes)
        _snapshot.check_policy_state(cls, rec["state"])
        pol = cls.__new__(cls)
        try:
            pol.load_state(rec["state"])
            if isinstance(pol, _vmm.ReferenceVmm):
                self._check_pending_resumes(pol)
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise SnapshotError(f"VM {self.index}'s VMM policy state is invalid: {exc}") \
                from None
        pol.attach(self)
        self.vmm = pol

    def _check_pending_resumes(self, pol) -> None:
        """ReferenceVmm's pending resumes must be ones it can carry out."""
        u64 = (1 << 64) - 1
        for vid, (entry, context, t0) in pol._pending.items():
            if not 0 <= vid < self.nr_vcpus or not 0 <= entry <= u64 \
                    or not 0 <= context <= u64 or not 0 <= t0 <= self.host.now:
                raise SnapshotError(f"VM {self.index}'s ReferenceVmm: a pending resume of "
                                    f"vCPU {vid} out of range")

    # -- guest memory and PSCI ---------------------------------------------------------

    def code_address(self, op_index: int) -> int:
        """The guest address of op ``op_index`` of a program (what the PC holds there)."""
        return self.memory_base + 4 * check_int("op_index", op_index, 0, 1 << 40)

    def memory_contains(self, addr: int) -> bool:
        """Is ``addr`` inside guest memory (the VM's one memory slot)?"""
        return self.memory_base <= addr < self.memory_base + self.memory_size

    def set_psci_version(self, version: int) -> None:
        """Write the firmware register KVM_REG_ARM_PSCI_VERSION (VM-wide), as
        ``kvm_arm_set_fw_reg`` does: 0.1 only if the VM's vCPUs lack the
        ``PSCI_0_2`` feature, 0.2 .. 1.3 only if they have it; anything else
        EINVAL, the version unchanged.  No EBUSY after the VM has run."""
        self._need_arm64("KVM_REG_ARM_PSCI_VERSION")
        if not _is_int(version) or int(version) not in PSCI_VERSIONS:
            raise KvmError(errno.EINVAL, f"PSCI version {version!r} is not one KVM offers "
                                         f"({', '.join(hex(v) for v in sorted(PSCI_VERSIONS))})")
        wants_02 = self.vcpu_features & (1 << VcpuFeature.PSCI_0_2)
        if (int(version) == PsciVersion.V0_1) == bool(wants_02):
            raise KvmError(errno.EINVAL, f"PSCI version {int(version):#x} needs the vCPUs "
                                         f"{'without' if wants_02 else 'with'} the PSCI_0_2 "
                                         "feature (kvm_arm_set_fw_reg)")
        self._engine.set_psci_version(self.index, int(version))

    @property
    def psci_version(self) -> int:
        """KVM_REG_ARM_PSCI_VERSION as read (kvm_psci_version): 0.1 without the
        PSCI_0_2 feature, else the version written (KVM_ARM_PSCI_LATEST if none)."""
        self._need_arm64("KVM_REG_ARM_PSCI_VERSION")
        return int(self._engine.vm_psci_version(self.index))

    @property
    def vcpu_features(self) -> int:
        """``kvm->arch.vcpu_features``: the VM's ``features[0]`` (POWER_OFF never in it).
        Before any KVM_ARM_VCPU_INIT it is ``DEFAULT_VCPU_FEATURES`` (PSCI_0_2), which
        kvmwake's vCPUs behave as having from creation."""
        return int(self._engine.vcpu_features(self.index)[0])

    # -- the vGIC as userspace sees it (KVM_DEV_ARM_VGIC_GRP_DIST_REGS / REDIST_REGS) ------

    def _need_outside_all(self, what):
        """vgic_v3_attr_regs_access: EBUSY if any vCPU mutex is held (a vCPU in KVM_RUN)."""
        busy = [v.id for v in self.vcpus if not v.outside_run]
        if busy:
            raise KvmError(errno.EBUSY, f"{what}: vCPU {busy[0]} is inside KVM_RUN "
                                        "(kvm_trylock_all_vcpus fails); signal it out first")

    def vgic_get_irq(self, intid: int, vcpu=None) -> dict:
        """**Userspace read** (``KVM_GET_DEVICE_ATTR``, ``KVM_DEV_ARM_VGIC_GRP_DIST_REGS``
        for SPIs, ``REDIST_REGS`` for a vCPU's SGIs/PPIs) of one interrupt's state.

        Returns ``pending`` (the latch, as ``__read_pending`` with ``is_user`` reads
        GICD_ISPENDR on GICv3: not the line level), ``active``, ``enabled``,
        ``priority``, ``level`` (ICFGR: True for level-triggered), ``line`` (the
        line level, ``KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO``) and, for SPIs, ``mpidr``
        (GICD_IROUTER bits 23:0).  Private INTIDs need ``vcpu``.
        """
        self._need_arm64("KVM_DEV_ARM_VGIC_GRP_DIST_REGS")
        intid, g = self._check_intid(intid, vcpu, "vGIC userspace access")
        self._need_outside_all("KVM_GET_DEVICE_ATTR")
        st = self._engine.irq_state(g if g >= 0 else self._first, intid)
        out = {"pending": st["latch"], "active": st["active"], "enabled": st["enabled"],
               "priority": st["priority"], "level": st["level"], "line": st["line"]}
        if intid >= 32:
            out["mpidr"] = st["mpidr"]
        return out

    def vgic_set_irq(self, intid: int, vcpu=None, *, pending: bool | None = None,
                     active: bool | None = None, enabled: bool | None = None,
                     priority: int | None = None, level: bool | None = None,
                     mpidr: int | None = None) -> None:
        """**Userspace write** (``KVM_SET_DEVICE_ATTR``, ``KVM_DEV_ARM_VGIC_GRP_DIST_REGS``
        / ``REDIST_REGS``) of one interrupt's state, as a VMM restoring a vGIC does;
        not the guest's own register write (``configure_irq``, ``route_spi``).

        Applied in the order a VMM restores them (QEMU's ``kvm_arm_gicv3_put``):
        ``level`` (GICD_ICFGR, SPIs only), ``priority`` (IPRIORITYR, top 5 bits
        kept), ``mpidr`` (GICD_IROUTER, SPIs only; no re-queue), ``pending``
        (ISPENDR: ``vgic_v3_uaccess_write_pending`` writes the latch whole, True
        queues the interrupt, False clears it), ``active`` (ISACTIVER/ICACTIVER
        through ``vgic_mmio_uaccess_write_sactive``: no guest halt; made active, it
        is queued), ``enabled`` (ISENABLER queues, ``vgic_uaccess_write_senable``;
        ICENABLER does not).  Queueing follows ``vgic_target_oracle``: with the
        distributor disabled nothing is queued.  Every vCPU is outside KVM_RUN
        (else EBUSY), so a queued interrupt's kick only leaves a request.
        """
        self._need_arm64("KVM_DEV_ARM_VGIC_GRP_DIST_REGS")
        intid, g = self._check_intid(intid, vcpu, "vGIC userspace access")
        if priority is not None:
            priority = check_int("priority", priority, 0, 255)
        if mpidr is not None:
            if intid < 32:
                raise ValueError(f"INTID {intid}: GICD_IROUTER exists for SPIs only")
            mpidr = check_int("mpidr", mpidr, 0, (1 << 64) - 1)
        if level is not None and intid < 32:
            raise ValueError(f"INTID {intid}: SGIs are edge and PPIs fixed; only SPIs "
                             "change trigger")
        self._need_outside_all("KVM_SET_DEVICE_ATTR")
        eng = self._engine
        if level is not None or priority is not None:
            eng.configure_irq(self.index, g, intid, -1, -1 if priority is None else priority,
                              -1 if level is None else int(bool(level)))
        if mpidr is not None:
            eng.route_spi(self.index, intid, mpidr)
        if pending is not None:
            eng.uaccess_write_pending(self.index, g, intid, bool(pending))
        if active is not None:
            eng.uaccess_write_active(self.index, g, intid, bool(active))
        if enabled is not None:
            eng.configure_irq(self.index, g, intid, int(bool(enabled)), -1, -1)

    def vgic_get_ctlr(self) -> int:
        """**Userspace read** of GICD_CTLR: EnableGrp1 (``GICD_CTLR_ENABLE_SS_G1``) if
        the distributor is enabled, with ARE_NS and DS always set."""
        self._need_arm64("KVM_DEV_ARM_VGIC_GRP_DIST_REGS")
        from .uapi import GICD_CTLR_ARE_NS, GICD_CTLR_DS
        on = self._engine.vm_gic_enabled(self.index)
        return (GICD_CTLR_ENABLE_SS_G1 if on else 0) | GICD_CTLR_ARE_NS | GICD_CTLR_DS

    def vgic_set_ctlr(self, value: int) -> None:
        """**Userspace write** of GICD_CTLR (``vgic_mmio_uaccess_write_v3_misc``): sets the
        distributor's enable from ``GICD_CTLR_ENABLE_SS_G1`` and, unlike the guest's
        write (``set_distributor``), kicks no vCPU (no ``vgic_kick_vcpus``)."""
        self._need_arm64("KVM_DEV_ARM_VGIC_GRP_DIST_REGS")
        value = check_int("value", value, 0, 0xFFFF_FFFF)
        self._need_outside_all("KVM_SET_DEVICE_ATTR")
        self._engine.uaccess_write_dist_ctlr(self.index, bool(value & GICD_CTLR_ENABLE_SS_G1))

    # -- read-out ------------------------------------------------------------------------

    @property
    def now(self) -> int:
        """Virtual time, ns (the host's clock, which every VM on it shares)."""
        return self.host.now

    def latency_histogram(self) -> np.ndarray:
        """Wake-latency histogram (``model.lat_bucket`` buckets, error <= 1/64; read it with
        ``kvmwake.outputs.stats.latency_percentiles``).

        The engines keep one histogram per host: this is it when the VM is alone on its
        host (``kw.VM(...)``); on a shared host it raises ValueError (use
        ``vm.host.latency_histogram()``, which covers every VM)."""
        if len(self.host.vms) != 1:
            raise ValueError(f"the wake-latency histogram is kept per host and VM {self.index} "
                             f"shares its host with {len(self.host.vms) - 1} other VM(s): use "
                             "vm.host.latency_histogram()")
        return self.host.latency_histogram()

    def stats(self) -> _stats.HaltStats:
        """The VM's halt stats: each vCPU's, summed, under the kernel's names.

        A ``HaltStats``: a dict whose histograms are numpy arrays, that compares with
        ``==`` (``vm.stats() == vm2.stats()``) and prints its non-empty buckets."""
        rows = self._engine.stats_view(self._first, self.nr_vcpus)
        return _stats.sum_rows(rows, self.arch)

    def stats_array(self, copy: bool = True) -> np.ndarray:
        """Per-vCPU stats rows (nr_vcpus x model.NR_STATS, uint64): a copy of this VM's
        rows only.  ``copy=False``: the same rows read-only, on the engine's memory
        where it can share it (the core engine): for reading at once; it cannot be
        made writeable, and the next ``run`` may change it."""
        if copy:
            return self._engine.stats_rows(self._first, self.nr_vcpus)
        return self._engine.stats_view(self._first, self.nr_vcpus)

    def trace_records(self) -> np.ndarray:
        """This VM's tracepoint records (``tracefmt.TRACE_RECORD_DTYPE``), oldest first."""
        from .reference import PID_BASE
        lo = PID_BASE + self._first
        return self._engine.trace_array(lo, lo + self.nr_vcpus)

    def trace_events(self) -> list:
        recs = self.trace_records()
        return tracefmt.records_to_events(recs, self._comms())

    def _comms(self) -> dict:
        from .reference import PID_BASE
        return {PID_BASE + self._first + i: f"CPU {i}/KVM" for i in range(self.nr_vcpus)}

    def trace_text(self, header: bool = True) -> str:
        """The VM's ``kvm_vcpu_wakeup`` / ``kvm_halt_poll_ns`` lines, in the kernel's text.

        Each vCPU thread is a task ``CPU <id>/KVM`` with its own PID; the CPU
        column is its host CPU; timestamps are virtual time.
        """
        return tracefmt.records_to_text(self.trace_records(), self._comms(), header=header)

    def __repr__(self):
        return f"VM(arch={self.arch!r}, nr_vcpus={self.nr_vcpus}, index={self.index})"


class VCpu:
    """One vCPU of a VM, and the host thread that runs it."""

    def __init__(self, vm: VM, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self._g = vm._first + vcpu_id
        self._loaded = False
        self._started = False
        self._held = None          # an exit made while another vCPU's run() waited
        #: ``kvm_run->immediate_exit``: while set (by any thread), every ``run()``
        #: returns -EINTR at once (``KvmError(EINTR)``); a VMM sets it and then
        #: ``signal()``s a vCPU that may be inside KVM_RUN, as QEMU's kick does.
        self.immediate_exit = False

    # -- KVM_ARM_VCPU_INIT, MP state, registers --------------------------------------------

    @property
    def outside_run(self) -> bool:
        """True when the vCPU's thread is not inside KVM_RUN (it may take vCPU ioctls)."""
        return self.vm._engine.thread_info(self._g)["state"] == ThreadState.USER

    def _need_outside(self, what):
        if not self.outside_run:
            raise KvmError(errno.EBUSY, f"{what}: vCPU {self.id} is inside KVM_RUN; "
                                        "signal it out first")

    @contextlib.contextmanager
    def _mutex(self, what, check=True):
        """``vcpu->mutex`` around a vCPU ioctl.  With the vCPU attached to a thread
        that is in KVM_RUN, the call blocks until that thread is out, as
        ``kvm_vcpu_ioctl``'s ``mutex_lock_killable`` does (vcpu_threads.py, rule
        4).  Otherwise (one thread drives the host) a vCPU inside KVM_RUN is
        EBUSY, when ``check``."""
        th = self.vm.host._threads
        hold = th.vcpu_mutex(self) if th is not None and th.slots else None
        try:
            if check:
                self._need_outside(what)
            yield
        finally:
            if hold is not None:
                hold.release()

    def init(self, features=DEFAULT_VCPU_FEATURES, *, power_off: bool = False,
             target: int = KVM_ARM_TARGET_GENERIC_V8) -> None:
        """``KVM_ARM_VCPU_INIT`` (``kvm_arch_vcpu_ioctl_vcpu_init``).

        ``features`` is ``struct kvm_vcpu_init.features``: an int (``features[0]``,
        e.g. ``kw.uapi.vcpu_features(kw.VcpuFeature.PSCI_0_2)``) or a sequence of
        up to 7 u32 words.  The default is PSCI_0_2 alone (as QEMU and the PSCI
        selftest pass).  ``power_off=True`` adds ``POWER_OFF``.

        Checked as ``kvm_vcpu_set_target`` and ``kvm_vcpu_init_check_features``
        do: a target other than ``KVM_ARM_TARGET_GENERIC_V8`` is EINVAL; a bit
        outside ``KVM_VCPU_VALID_FEATURES`` or a non-zero ``features[1..6]`` is
        ENOENT; a valid feature the modelled host lacks (EL1_32BIT, PMU_V3, SVE,
        PTRAUTH_*, HAS_EL2*) is EINVAL; and once any vCPU of the VM was
        initialised, every init must pass the same features but POWER_OFF (the
        set is VM-wide, ``kvm_vcpu_init_changed``), else EINVAL.  Nothing changes
        on an error.

        Then every init resets the vCPU (``kvm_reset_vcpu``): x0-x30, SP and PC
        zeroed, PSTATE ``VCPU_RESET_PSTATE_EL1`` (0x3c5: EL1h, D, A, I, F set),
        the timer off, and a reset owed by PSCI CPU_ON applied (PC = entry, x0 =
        context); and the MP state becomes STOPPED with POWER_OFF (ephemeral: it
        is not stored), RUNNABLE without.  Set the PC (``set_reg("pc", ...)``,
        or ``load`` a program) before running it.
        """
        self.vm._need_arm64("KVM_ARM_VCPU_INIT")
        if not _is_int(target) or int(target) != KVM_ARM_TARGET_GENERIC_V8:
            raise KvmError(errno.EINVAL, f"KVM_ARM_VCPU_INIT: target {target!r} is not "
                                         f"KVM_ARM_TARGET_GENERIC_V8 ({KVM_ARM_TARGET_GENERIC_V8})")
        if _is_int(features):
            words = [int(features)]
        elif isinstance(features, (list, tuple)) and 1 <= len(features) <= 7 \
                and all(_is_int(w) for w in features):
            words = [int(w) for w in features]
        else:
            raise TypeError("features must be an int (features[0]) or a sequence of 1 to 7 "
                            f"u32 words, not {features!r}")
        if any(not 0 <= w <= 0xFFFF_FFFF for w in words):
            raise ValueError(f"features words must be u32, not {words}")
        f0 = words[0] | ((1 << VcpuFeature.POWER_OFF) if power_off else 0)
        off = bool(f0 & (1 << VcpuFeature.POWER_OFF))
        f0 &= ~(1 << VcpuFeature.POWER_OFF)     # ephemeral, stripped first
        if f0 & ~KVM_VCPU_VALID_FEATURES or any(words[1:]):
            raise KvmError(errno.ENOENT, f"KVM_ARM_VCPU_INIT: features {words} name a bit "
                                         "KVM does not know (kvm_vcpu_init_check_features)")
        if f0 & ~SUPPORTED_VCPU_FEATURES:
            names = [b.name for b in VcpuFeature if f0 >> b & 1
                     and not SUPPORTED_VCPU_FEATURES >> b & 1]
            raise KvmError(errno.EINVAL, f"KVM_ARM_VCPU_INIT: feature {', '.join(names)} is "
                                         "not supported by the modelled host "
                                         "(system_supported_vcpu_features)")
        current, configured = self.vm._engine.vcpu_features(self.vm.index)
        if configured and f0 != current:
            raise KvmError(errno.EINVAL, f"KVM_ARM_VCPU_INIT: features {f0:#x} differ from "
                                         f"the VM's {current:#x}; every vCPU of a VM must "
                                         "pass the same ones (kvm_vcpu_init_changed)")
        with self._mutex("KVM_ARM_VCPU_INIT"):
            self.vm._engine.vcpu_init(self._g, f0, off)

    def get_mp_state(self) -> MpState:
        """``KVM_GET_MP_STATE``.  (Driven from one thread, it reads a vCPU inside
        KVM_RUN too, as a policy needs; from another thread than an attached
        vCPU's, it waits for that vCPU to leave KVM_RUN.)"""
        with self._mutex("KVM_GET_MP_STATE", check=False):
            return MpState(self.vm._engine.get_mp_state(self._g))

    def set_mp_state(self, state) -> None:
        """``KVM_SET_MP_STATE``: arm64 accepts RUNNABLE, STOPPED and SUSPENDED; x86
        RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED and
        AP_RESET_HOLD.  Anything else: EINVAL, state unchanged."""
        if not _is_int(state) or int(state) not in MP_STATES[self.vm.arch]:
            raise KvmError(errno.EINVAL, f"KVM_SET_MP_STATE: {state!r} is not a state "
                                         f"{self.vm.arch} accepts")
        with self._mutex("KVM_SET_MP_STATE"):
            self.vm._engine.set_mp_state(self._g, int(state))

    def _reg(self, reg) -> KvmReg:
        """The register named by ``reg``: a name of ``REGS`` or a kernel register ID."""
        if self.vm.arch != "arm64":
            raise KvmError(errno.ENOENT, "KVM_GET/SET_ONE_REG: only arm64 registers are "
                                         "modelled")
        if isinstance(reg, str):
            r = REGS.get(reg)
            if r is None:
                raise KvmError(errno.ENOENT, f"KVM_GET/SET_ONE_REG: no register {reg!r} "
                                             f"(known: x0-x30, sp, pc, pstate, mpidr_el1, "
                                             "psci_version)")
            return r
        if not _is_int(reg) or not 0 <= int(reg) < 1 << 64:
            raise KvmError(errno.ENOENT, f"KVM_GET/SET_ONE_REG: {reg!r} is not a register "
                                         "name or ID")
        reg = int(reg)
        try:
            return KvmReg(reg)
        except ValueError:
            pass
        if (reg & ~KVM_REG_SIZE_MASK) in {r & ~KVM_REG_SIZE_MASK for r in KvmReg}:
            # core_reg_size_from_offset / kvm_arm_set_fw_reg: a wrong size field.
            raise KvmError(errno.EINVAL if reg & ~KVM_REG_SIZE_MASK != KvmReg.PSCI_VERSION
                           & ~KVM_REG_SIZE_MASK else errno.ENOENT,
                           f"KVM_GET/SET_ONE_REG: register {reg:#x} has size field "
                           f"{reg & KVM_REG_SIZE_MASK:#x}, not KVM_REG_SIZE_U64 "
                           f"({KVM_REG_SIZE_U64:#x})")
        raise KvmError(errno.ENOENT, f"KVM_GET/SET_ONE_REG: register {reg:#x} is not "
                                     "modelled (x0-x30, SP, PC, PSTATE, MPIDR_EL1, "
                                     "KVM_REG_ARM_PSCI_VERSION are)")

    def get_reg(self, reg) -> int:
        """``KVM_GET_ONE_REG``: ``reg`` is a name (``"x0"`` .. ``"x30"``, ``"sp"``,
        ``"pc"``, ``"pstate"``, ``"mpidr_el1"``, ``"psci_version"``) or the kernel's
        register ID (``kw.KvmReg.PC``, ``0x6030000000100040``).

        A reset owed by PSCI CPU_ON is applied first, as ``kvm_arch_vcpu_ioctl``
        does (so the psci selftest's read of a never-run target sees the entry
        point and context).  MPIDR_EL1 is ``reset_mpidr``'s value (Aff0 = id &
        0xf, Aff1 = (id >> 4) & 0xff, Aff2 = (id >> 12) & 0xff, bit 31 set);
        PSCI_VERSION is the VM's (``kvm_psci_version``).
        """
        r = self._reg(reg)
        with self._mutex("KVM_GET_ONE_REG"):
            if r == KvmReg.MPIDR_EL1:
                return mpidr_of(self.id) | (1 << 31)
            if r == KvmReg.PSCI_VERSION:
                return self.vm.psci_version
            return int(self.vm._engine.get_reg(self._g, _CORE_INDEX[r]))

    def set_reg(self, reg, value: int) -> None:
        """``KVM_SET_ONE_REG`` (a u64; ``reg`` as for ``get_reg``).

        PSTATE must hold a mode ``set_core_reg`` accepts for an AArch64 vCPU
        (EL0t, EL1t, EL1h), else EINVAL; its I bit is the mask interrupts are
        taken under.  PSCI_VERSION is ``VM.set_psci_version``.  MPIDR_EL1 takes
        only its present value (restoring what was read): kvmwake routes by
        ``reset_mpidr``'s layout, so another value is EINVAL (a deliberate
        difference: the kernel would store it).
        """
        r = self._reg(reg)
        value = check_int("value", value, 0, (1 << 64) - 1)
        if r == KvmReg.PSTATE and value & PSR_AA32_MODE_MASK not in _PSTATE_MODES:
            raise KvmError(errno.EINVAL, f"KVM_SET_ONE_REG: PSTATE {value:#x} has mode "
                                         f"{value & PSR_AA32_MODE_MASK:#x}; an AArch64 vCPU "
                                         "without NV takes EL0t, EL1t or EL1h (set_core_reg)")
        if r == KvmReg.MPIDR_EL1 and value != mpidr_of(self.id) | (1 << 31):
            raise KvmError(errno.EINVAL, f"KVM_SET_ONE_REG: MPIDR_EL1 {value:#x} is not vCPU "
                                         f"{self.id}'s reset_mpidr value; kvmwake does not "
                                         "model renumbered vCPUs")
        with self._mutex("KVM_SET_ONE_REG"):
            if r == KvmReg.PSCI_VERSION:
                self.vm.set_psci_version(value)
            elif r != KvmReg.MPIDR_EL1:
                self.vm._engine.set_reg(self._g, _CORE_INDEX[r], value)

    # -- KVM_RUN ----------------------------------------------------------------------------

    @_paced
    def signal(self) -> None:
        """Send the vCPU thread a signal: inside KVM_RUN it returns KVM_EXIT_INTR."""
        self.vm._engine.signal(self._g)

    def run(self, timeout_ns: int | None = None, immediate_exit: bool = False):
        """One ``KVM_RUN``: advance virtual time until this vCPU exits to userspace.

        Other vCPUs whose threads are inside ``KVM_RUN`` make progress
        meanwhile; one that exits stays outside with its exit held for its
        own ``run()`` (or for ``vm.run``'s policy).  If the vCPU has not
        exited ``timeout_ns`` of virtual time later, it gets a signal (a
        VMM's watchdog), so the call always ends: with that exit, or, if the
        signalled vCPU can never get its host CPU back (another thread holds
        it and ``sched_slice_ns`` is 0), with ``KvmError(ETIMEDOUT)``.

        Returns the ``Exit``.  A signal's exit is ``Exit(INTR)``: the ioctl's
        -EINTR with ``exit_reason = KVM_EXIT_INTR`` (``kvm_handle_signal_exit``).
        ``immediate_exit=True`` is ``kvm_run->immediate_exit``: KVM_RUN returns
        -EINTR at once and leaves ``exit_reason`` as it was
        (``kvm_arch_vcpu_ioctl_run``), so this raises ``KvmError(errno.EINTR)``
        and ``vcpu.exit_reason`` keeps the previous exit's reason.  An exit
        already made (held for this vCPU, or one its VM's policy failed on) is
        returned first, as the kernel returned it before this call.  From
        inside a VMM policy: ``KvmError(EBUSY)``.

        The host has one clock: while this call waits, every VM on the host runs.
        A vCPU that does not exit (after ``vm.run()``, a vCPU whose program loops
        in the guest has no exit to return) makes the call run the whole host
        for ``timeout_ns``.  Left out, the watchdog is ``DEFAULT_RUN_TIMEOUT_NS``
        (1 s of virtual time) and a ``RuntimeWarning`` says when it fired;
        given, it fires silently (the caller chose it) and the call returns
        ``KVM_EXIT_INTR``.
        """
        host = self.vm.host
        host._no_policy_reentry("vcpu.run()")
        warn = timeout_ns is None
        if warn:
            timeout_ns = DEFAULT_RUN_TIMEOUT_NS
        timeout_ns = check_int("timeout_ns", timeout_ns, 1, 1 << 62)
        immediate_exit = bool(immediate_exit) or bool(self.immediate_exit)
        th = host._threads
        if th is not None and th.active:
            return th.run(self, timeout_ns, warn, immediate_exit)
        eng = self.vm._engine
        if self._held is not None:
            held, self._held = self._held, None
            return from_engine(held)
        if immediate_exit:
            raise KvmError(errno.EINTR, f"KVM_RUN with immediate_exit: vCPU {self.id} "
                                        "returns at once, exit_reason unchanged "
                                        f"({self.exit_reason.name})")
        if not self._loaded:
            raise KvmError(errno.ENOEXEC, f"vCPU {self.id} has no guest program to run")
        self._started = True
        eng.start_vcpu(self._g)
        deadline = host.now + timeout_ns
        signalled_at = None
        while True:
            if eng.run_until_exit(deadline) < 0:
                if signalled_at is None:
                    eng.signal(self._g)
                    signalled_at = host.now
                    if warn:
                        warnings.warn(self._watchdog_warning(timeout_ns, host.now),
                                      RuntimeWarning, stacklevel=2)
                elif host.now - signalled_at >= self._signal_grace(timeout_ns):
                    raise KvmError(errno.ETIMEDOUT, self._stuck_message(signalled_at))
                deadline = min(host.now + timeout_ns, (1 << 64) - 1)
                continue
            host._collect_exits()
            if self._held is not None:
                held, self._held = self._held, None
                return from_engine(held)

    # -- the VMM's own threads (vcpu_threads.py) ---------------------------------------------

    def attach(self) -> "VCpu":
        """Give this vCPU a thread of its own: from now on its ``run()`` is called
        from one thread (the first to call it), blocks that thread until the
        vCPU has an exit, and the clock moves only while no attached vCPU's
        thread is in userspace (the rules: ``vcpu_threads.VcpuThreads``).

        Attach every vCPU before starting the threads (they enter KVM_RUN
        together, in vCPU order, once each has called ``run()``).  The thread
        ``detach()``es the vCPU when it stops running it, or ``park()``s it
        while it waits for another thread.  Returns the vCPU; as a context
        manager (``with vcpu.attach():``) it detaches on leaving the block.
        While vCPUs are attached, ``vm.run`` and ``host.run`` are refused."""
        self.vm.host._no_policy_reentry("vcpu.attach()")
        self.vm.host.vcpu_threads.attach(self)
        return self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.attached:
            return
        if exc_type is None:
            self.detach()
            return
        try:
            self.detach()
        except (RuntimeError, KvmError):
            pass                # (the block's own error is the one to see)

    def detach(self) -> None:
        """Stop treating this vCPU as run by a thread of its own (from its thread,
        after ``run()`` returned; from any thread before its first ``run()``)."""
        self.vm.host.vcpu_threads.detach(self)

    @property
    def attached(self) -> bool:
        """True while the vCPU is attached to a thread of the VMM (``attach``)."""
        th = self.vm.host._threads
        return th is not None and th.slot_of(self) is not None

    @property
    def thread_role(self) -> str | None:
        """Where the attached vCPU's thread is: ``"starting"``, ``"in KVM_RUN"``,
        ``"exited"`` (its exit made, not yet returned), ``"in userspace"``,
        ``"parked"``; None when not attached."""
        th = self.vm.host._threads
        return None if th is None else th.state_of(self)

    def park(self) -> None:
        """From the vCPU's own thread, in userspace: wait, without holding the clock,
        until another thread calls ``unpark()`` (a VMM's paused vCPU thread)."""
        self.vm.host.vcpu_threads.park(self)

    def unpark(self) -> None:
        """Let a parked vCPU's thread go on (it queues for the userspace token)."""
        self.vm.host.vcpu_threads.unpark(self)

    #: Rounds of the watchdog's timeout a signalled vCPU gets to leave KVM_RUN.
    SIGNAL_GRACE_ROUNDS = 64

    def _signal_grace(self, timeout_ns: int) -> int:
        """Virtual time a signalled vCPU may take to leave KVM_RUN before run() gives
        up: enough for every thread on its host CPU to use a time slice first."""
        costs = self.vm.host.costs
        per_turn = sum(cost_bound(costs[name]) for name in (
            "sched_slice_ns", "context_switch_ns", "wake_to_run_ns", "vm_exit_ns",
            "vm_entry_ns"))
        host = self.vm.host
        sharing = -(-host._nthreads // host.host_cpus)
        # (At most 2^60 ns, so that the clock cannot run past 2^64 meanwhile.)
        return min(self.SIGNAL_GRACE_ROUNDS * max(timeout_ns, sharing * per_turn), 1 << 60)

    def _watchdog_warning(self, timeout_ns: int, now: int) -> str:
        """What run() warns when the default watchdog signalled this vCPU at ``now``."""
        return (f"vcpu.run(): vCPU {self.id} of VM {self.vm.index} did not exit in "
                f"{timeout_ns / 1e9:g} s of virtual time, so the whole host ran to "
                f"{now / 1e6:,.3f} ms; the watchdog signalled it (KVM_EXIT_INTR); pass "
                "timeout_ns to choose the window")

    def _stuck_message(self, signalled_at: int) -> str:
        info = self.vm._engine.thread_info(self._g)
        state = ThreadState(info["state"]).name
        hint = ""
        if state == "RUNNABLE" and self.vm.host.costs["sched_slice_ns"] == 0:
            hint = (f"; it waits for host CPU {info['pcpu']}, whose thread is never "
                    "preempted (sched_slice_ns = 0)")
        return (f"vCPU {self.id} did not leave KVM_RUN: signalled at {signalled_at} ns, "
                f"still {state} at {self.vm.host.now} ns{hint}")

    @property
    def exit_reason(self) -> ExitReason:
        """``kvm_run->exit_reason``: the reason of the vCPU's last exit to userspace
        (``KVM_EXIT_UNKNOWN`` before the first; kept in snapshots)."""
        return ExitReason(self.vm._engine.thread_info(self._g)["exit_reason"])

    def load(self, program) -> None:
        """Give the vCPU its guest program (a ``guest.Program``, or a list of ops)."""
        if not isinstance(program, _guest.Program):
            program = _guest.Program(program)
        _guest.validate(program.ops, self.vm.nr_vcpus, self.vm.arch, self.vm.nr_spis)
        if self._started and self.thread_state != "USER":
            raise KvmError(errno.EBUSY, f"vCPU {self.id} is in KVM_RUN; load a program "
                                        "before it runs or after it ended")
        self.vm._engine.load_program(self._g, program.ops)
        self._loaded = True
        self._started = False
        self._held = None          # the last exit belonged to the old program

    # -- kicks and requests (acting at the host's current virtual time) ---------------------

    @_paced
    def kick(self) -> bool:
        """``kvm_vcpu_kick``: wake it if blocked, IPI it if in guest mode.  True if an IPI went."""
        return self.vm._engine.kick(self._g)

    @_paced
    def make_request(self, req: int) -> bool:
        """``kvm_make_request`` + kick, honouring ``KVM_REQUEST_NO_WAKEUP``.

        ``req`` is a request number 0..63 (a bit of the u64 ``vcpu->requests``)
        with the flag bits 8..10; a number from 64 on is EINVAL.
        """
        req = check_int("req", req, 0, 0x7FF)
        if req & KVM_REQUEST_MASK >= 64:
            # vcpu->requests is a u64: the kernel's KVM_ARCH_REQ_FLAGS refuses
            # request numbers from 64 on at build time.
            raise KvmError(errno.EINVAL, f"req = {req:#x}: request number "
                                         f"{req & KVM_REQUEST_MASK} does not fit "
                                         "vcpu->requests (0..63)")
        return self.vm._engine.make_request(self._g, req)

    @_paced
    def raise_wake(self) -> bool:
        """Send this vCPU the guest's reschedule IPI, whatever the arch (arm64: SGI 0,
        as ``raise_sgi(0)``; x86: vector 0xFD, as ``send_ipi(0xFD)``)."""
        return self.vm._engine.raise_pending(self._g)

    def _arch_only(self, arch, what, instead):
        if self.vm.arch != arch:
            raise KvmError(errno.EINVAL, f"{what} is {arch}'s; on this {self.vm.arch} vCPU "
                                         f"use {instead}")

    @_paced
    def raise_sgi(self, intid: int = 0) -> bool:
        """arm64: SGI ``intid`` (0-15) arrives at this vCPU, as another vCPU's
        ICC_SGI1R_EL1 write delivers it (``vgic_v3_dispatch_sgi``): the latch is set
        and, per ``vgic_target_oracle``, queued with a kick.  True if an IPI went.
        x86: KvmError naming ``send_ipi``."""
        self._arch_only("arm64", "raise_sgi (an SGI)", "send_ipi(vector)")
        intid = check_int("intid", intid, 0, 15)
        return self.vm._engine.raise_irq_at(self._g, intid)

    @_paced
    def send_ipi(self, vector: int = 0xFD) -> bool:
        """x86: a fixed-mode IPI of ``vector`` (16-255) arrives at this vCPU's LAPIC,
        as an ICR write delivers it (``kvm_apic_send_ipi`` -> ``__apic_accept_irq``):
        IRR, KVM_REQ_EVENT, kick.  True if an IPI went.  arm64: KvmError naming
        ``raise_sgi``."""
        self._arch_only("x86", "send_ipi (a LAPIC IPI)", "raise_sgi(intid)")
        vector = check_int("vector", vector, 16, 255)
        return self.vm._engine.raise_irq_at(self._g, vector)

    def set_pmr(self, pmr: int) -> None:
        """arm64: ICC_PMR_EL1 (top 5 bits kept, ``VGIC_PRI_BITS``).  On x86 a KvmError
        naming ``set_tpr``."""
        self._arch_only("arm64", "set_pmr (ICC_PMR_EL1)", "set_tpr(tpr)")
        self.vm._engine.set_pmr(self._g, check_int("pmr", pmr, 0, 255))

    def set_tpr(self, tpr: int) -> None:
        """x86: the LAPIC's TPR (``APIC_TASKPRI``; CR8 is ``tpr >> 4``).  An IRR vector
        is deliverable when its class is above the PPR (``__apic_update_ppr``).  On
        arm64 a KvmError naming ``set_pmr``."""
        self._arch_only("x86", "set_tpr (the LAPIC TPR)", "set_pmr(pmr)")
        self.vm._engine.set_pmr(self._g, check_int("tpr", tpr, 0, 255))

    def set_masked(self, masked: bool) -> None:
        """arm64: PSTATE.I (the I bit of the ``pstate`` register).  On x86 a KvmError
        naming ``set_interrupt_flag``."""
        self._arch_only("arm64", "set_masked (PSTATE.I)", "set_interrupt_flag(enabled)")
        self.vm._engine.set_masked(self._g, bool(masked))

    def set_interrupt_flag(self, enabled: bool) -> None:
        """x86: RFLAGS.IF (``kvm_run->if_flag``); with IF=0 a maskable interrupt
        neither is taken nor ends a HLT (``kvm_vcpu_has_events``).  On arm64 a
        KvmError naming ``set_masked``."""
        self._arch_only("x86", "set_interrupt_flag (RFLAGS.IF)", "set_masked(masked)")
        self.vm._engine.set_masked(self._g, not enabled)

    def irq_state(self, intid: int) -> dict:
        """The vGIC's view of ``intid`` for this vCPU (pending, enabled, active,
        priority, level, line, queued, target, pmr, masked); on x86 the LAPIC's
        IRR/ISR bits for vector ``intid``, the TPR and the mask."""
        intid = check_int("intid", intid, 0, 1023 if self.vm.arch == "arm64" else 255)
        if self.vm.arch == "arm64" and intid >= 32 + self.vm.nr_spis:
            raise KvmError(errno.EINVAL, f"SPI {intid} is beyond the VM's {self.vm.nr_spis} SPIs")
        return self.vm._engine.irq_state(self._g, intid)

    def timer_state(self) -> dict:
        """The virtual timer: cval (virtual ns), ctl bits, re-arm period, istatus."""
        self.vm._need_arm64("timer_state")
        return self.vm._engine.timer_state(self._g)

    @property
    def blocking(self) -> bool:
        """The kernel's ``blocking`` stat (instant, boolean): True exactly while the
        vCPU thread is inside ``kvm_vcpu_block``: halted after its poll, or an x86
        vCPU waiting for INIT; not while halt-polling, and not for an arm64
        STOPPED vCPU, which sleeps in ``kvm_vcpu_sleep``)."""
        return bool(self.vm._engine.stat(self._g, S_BLOCKING))

    @property
    def runnable(self) -> bool:
        """``kvm_arch_vcpu_runnable``: would a halt end now?"""
        return bool(self.vm._engine.thread_info(self._g)["runnable"])

    # -- read-out -------------------------------------------------------------------------------

    @property
    def thread_state(self) -> str:
        """What the host scheduler sees: USER, RUNNING, POLLING, BLOCKED or RUNNABLE."""
        return ThreadState(self.vm._engine.thread_info(self._g)["state"]).name

    @property
    def halt_poll_ns(self) -> int:
        """``vcpu->halt_poll_ns``: the current poll window."""
        return self.vm._engine.thread_info(self._g)["halt_poll_ns"]

    @property
    def host_cpu(self) -> int:
        return self.vm._engine.thread_info(self._g)["pcpu"]

    @property
    def affinity(self) -> tuple:
        """The host CPUs its thread may run on (p->cpus_ptr), in order."""
        return self.vm._engine.affinity(self._g)

    def set_affinity(self, cpus) -> None:
        """sched_setaffinity() of its thread: ``cpus`` is a host CPU, a list of them,
        ``"all"`` or ``"pinned"`` (CPU g % host_cpus).  A thread waiting for a CPU
        it may no longer use moves at once; a running one at its next preemption
        point (or when it next sleeps); a sleeping one at its next wake-up."""
        cpus = check_affinity(cpus, self.vm.host.host_cpus)
        self.vm._engine.set_affinity(self._g, cpus)

    @property
    def nr_migrations(self) -> int:
        """se.nr_migrations: how often its thread changed host CPU (wake-up placement,
        a newly idle CPU's pull, an affinity change)."""
        return self.vm._engine.thread_info(self._g)["nr_migrations"]

    def stats(self) -> _stats.HaltStats:
        """This vCPU's halt stats under the kernel's names (a ``HaltStats``, see VM.stats)."""
        row = self.vm._engine.stats_rows(self._g, 1)[0]
        return _stats.row_to_dict(row, self.vm.arch)

    def __repr__(self):
        return f"VCpu(vm={self.vm.index}, id={self.id}, {self.thread_state})"


# What Host.create_vm and Host.restore make: host.py is below this module and does not
# import it.
Host.vm_class = VM
