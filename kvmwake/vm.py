"""VM and VCpu: the ioctl-shaped objects a VMM developer drives."""

from __future__ import annotations

import errno
import numbers

import numpy as np

from . import guest as _guest
from . import snapshot as _snapshot
from . import vmm as _vmm
from .errors import KvmError, SnapshotError
from .exits import Exit, from_engine
from .host import Host, check_arch, check_int, host_to_bytes, restore_host
from .model import (DEFAULT_MEM_SIZE, DEFAULT_NR_SPIS, MAX_VCPUS, MEM_BASE, SourceKind,
                    ThreadState, mpidr_of)
from .outputs import stats as _stats
from .outputs import tracefmt
from .uapi import Cap, ExitReason, MpState, PsciVersion

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
#: KVM_GET/SET_ONE_REG names: the SMCCC argument registers and the PC.
REGS = {"x0": 0, "x1": 1, "x2": 2, "x3": 3, "pc": 4}
#: Values KVM_REG_ARM_PSCI_VERSION accepts (with the PSCI 0.2 feature, and without).
PSCI_VERSIONS = frozenset(PsciVersion)


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

    The vGIC starts as a booted Linux guest leaves it: distributor enabled,
    SGIs 0-15, the timer PPI 27 and the tick PPI 30 enabled, SPIs disabled
    (level-triggered, routed to vCPU 0), every priority 0xA0, PMR 0xF0,
    interrupts unmasked.  On x86 each vCPU has a LAPIC with TPR 0 and IF=1.
    """

    def __init__(self, arch: str = "arm64", nr_vcpus: int = 1, host_cpus: int | None = None,
                 seed: int = 0, host: Host | None = None, costs: dict | None = None,
                 engine: str = "core", trace_capacity: int = 1 << 20,
                 nr_spis: int = DEFAULT_NR_SPIS, memory_size: int = DEFAULT_MEM_SIZE):
        check_arch(arch)
        if host is None:
            if host_cpus is None:
                # One host CPU per vCPU; a bad nr_vcpus is reported by _add_vm.
                valid = isinstance(nr_vcpus, int) and 1 <= nr_vcpus <= MAX_VCPUS[arch]
                host_cpus = nr_vcpus if valid else 1
            host = Host(host_cpus=host_cpus, arch=arch, seed=seed, costs=costs,
                        engine=engine, trace_capacity=trace_capacity)
        elif host_cpus is not None or costs is not None:
            raise ValueError("host_cpus and costs belong to the host: pass them to Host()")
        self.host = host
        self.arch = arch
        self.index, self._first = host._add_vm(self, nr_vcpus, arch, nr_spis)
        self.nr_vcpus = int(nr_vcpus)
        self.nr_spis = int(nr_spis)
        self.vcpus = [VCpu(self, i) for i in range(self.nr_vcpus)]
        self._halt_poll_cap: int | None = None
        self._tick_ns = 0
        self._suspend_cap = False
        self.memory_base = MEM_BASE[arch]
        self.memory_size = check_int("memory_size", memory_size, 1 << 12, 1 << 48)
        self.vmm = _vmm.Vmm()
        self.vmm.attach(self)
        self.exits = 0

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
        """Set up an interrupt as the guest's drivers would (enable, priority, trigger).

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
        """``GICD_IROUTER``: route SPI ``intid`` to ``vcpu`` (or to an MPIDR; one that
        no vCPU has leaves the SPI undelivered)."""
        self._need_arm64("route_spi")
        intid, _ = self._check_intid(intid, None, "route_spi")
        if (vcpu is None) == (mpidr is None):
            raise ValueError("route_spi needs exactly one of vcpu= or mpidr=")
        if vcpu is not None:
            mpidr = mpidr_of(self._vcpu_index(vcpu) - self._first)
        mpidr = check_int("mpidr", mpidr, 0, (1 << 64) - 1)
        self._engine.route_spi(self.index, intid, mpidr)

    def set_distributor(self, enabled: bool) -> None:
        """``GICD_CTLR``: enable or disable the distributor (enabling kicks every
        vCPU with an interrupt pending)."""
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
        out after DONE, a shutdown or an error.
        """
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
        """Write the firmware register KVM_REG_ARM_PSCI_VERSION (0.1 .. 1.3)."""
        self._need_arm64("KVM_REG_ARM_PSCI_VERSION")
        if not _is_int(version) or int(version) not in PSCI_VERSIONS:
            raise KvmError(errno.EINVAL, f"PSCI version {version!r} is not one KVM offers "
                                         f"({', '.join(hex(v) for v in sorted(PSCI_VERSIONS))})")
        self._engine.set_psci_version(self.index, int(version))

    # -- read-out ------------------------------------------------------------------------

    def stats(self) -> dict:
        """The VM's halt stats: each vCPU's, summed, under the kernel's names."""
        rows = self._engine.stats_array()[self._first:self._first + self.nr_vcpus]
        return _stats.sum_rows(rows, self.arch)

    def stats_array(self) -> np.ndarray:
        """Per-vCPU stats rows (nr_vcpus x model.NR_STATS, uint64)."""
        return self._engine.stats_array()[self._first:self._first + self.nr_vcpus]

    def trace_records(self) -> np.ndarray:
        """This VM's tracepoint records (``tracefmt.TRACE_RECORD_DTYPE``), oldest first."""
        from .reference import PID_BASE
        recs = np.array(self._engine.trace_list(), dtype=tracefmt.TRACE_RECORD_DTYPE)
        lo = PID_BASE + self._first
        return recs[(recs["pid"] >= lo) & (recs["pid"] < lo + self.nr_vcpus)]

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
        return tracefmt.events_to_text(self.trace_events(), header=header)

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

    # -- KVM_ARM_VCPU_INIT, MP state, registers --------------------------------------------

    @property
    def outside_run(self) -> bool:
        """True when the vCPU's thread is not inside KVM_RUN (it may take vCPU ioctls)."""
        return self.vm._engine.thread_info(self._g)["state"] == ThreadState.USER

    def _need_outside(self, what):
        if not self.outside_run:
            raise KvmError(errno.EBUSY, f"{what}: vCPU {self.id} is inside KVM_RUN; "
                                        "signal it out first")

    def init(self, power_off: bool = False) -> None:
        """``KVM_ARM_VCPU_INIT``: with the ``power_off`` feature the vCPU starts STOPPED."""
        self.vm._need_arm64("KVM_ARM_VCPU_INIT")
        self._need_outside("KVM_ARM_VCPU_INIT")
        self.vm._engine.set_mp_state(self._g, MpState.STOPPED if power_off
                                     else MpState.RUNNABLE)

    def get_mp_state(self) -> MpState:
        """``KVM_GET_MP_STATE``."""
        return MpState(self.vm._engine.get_mp_state(self._g))

    def set_mp_state(self, state) -> None:
        """``KVM_SET_MP_STATE``: arm64 accepts RUNNABLE, STOPPED and SUSPENDED; x86
        RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED and
        AP_RESET_HOLD.  Anything else: EINVAL, state unchanged."""
        if not _is_int(state) or int(state) not in MP_STATES[self.vm.arch]:
            raise KvmError(errno.EINVAL, f"KVM_SET_MP_STATE: {state!r} is not a state "
                                         f"{self.vm.arch} accepts")
        self._need_outside("KVM_SET_MP_STATE")
        self.vm._engine.set_mp_state(self._g, int(state))

    def _reg(self, name) -> int:
        if self.vm.arch != "arm64":
            raise KvmError(errno.ENOENT, "KVM_GET/SET_ONE_REG: only arm64's x0-x3 and pc "
                                         "are modelled")
        try:
            return REGS[name]
        except (KeyError, TypeError):
            raise KvmError(errno.ENOENT, f"KVM_GET/SET_ONE_REG: no register {name!r} "
                                         f"(known: {', '.join(REGS)})") from None

    def get_reg(self, name: str) -> int:
        """``KVM_GET_ONE_REG`` of x0..x3 or pc; a reset owed by PSCI CPU_ON is applied
        first, as the kernel does."""
        idx = self._reg(name)
        self._need_outside("KVM_GET_ONE_REG")
        return int(self.vm._engine.get_reg(self._g, idx))

    def set_reg(self, name: str, value: int) -> None:
        """``KVM_SET_ONE_REG`` of x0..x3 or pc (a u64)."""
        idx = self._reg(name)
        value = check_int(name, value, 0, (1 << 64) - 1)
        self._need_outside("KVM_SET_ONE_REG")
        self.vm._engine.set_reg(self._g, idx, value)

    # -- KVM_RUN ----------------------------------------------------------------------------

    def signal(self) -> None:
        """Send the vCPU thread a signal: inside KVM_RUN it returns KVM_EXIT_INTR."""
        self.vm._engine.signal(self._g)

    def run(self, timeout_ns: int = DEFAULT_RUN_TIMEOUT_NS, immediate_exit: bool = False):
        """One ``KVM_RUN``: advance virtual time until this vCPU exits to userspace.

        Other vCPUs whose threads are inside ``KVM_RUN`` make progress
        meanwhile; one that exits stays outside with its exit held for its
        own ``run()`` (or for ``vm.run``'s policy).  ``immediate_exit``
        returns ``KVM_EXIT_INTR`` at once, as ``kvm_run->immediate_exit``
        does.  If the vCPU has not exited ``timeout_ns`` of virtual time
        later, it gets a signal (a VMM's watchdog), so the call always ends.
        """
        timeout_ns = check_int("timeout_ns", timeout_ns, 1, 1 << 62)
        eng = self.vm._engine
        host = self.vm.host
        if self._held is not None:
            held, self._held = self._held, None
            return from_engine(held)
        if immediate_exit:
            return Exit(ExitReason.INTR, time_ns=host.now)
        if not self._loaded:
            raise KvmError(errno.ENOEXEC, f"vCPU {self.id} has no guest program to run")
        self._started = True
        eng.start_vcpu(self._g)
        deadline = host.now + timeout_ns
        signalled = False
        while True:
            if eng.run_until_exit(deadline) < 0:
                if signalled:
                    deadline = host.now + timeout_ns
                    continue
                eng.signal(self._g)
                signalled = True
                continue
            mine = None
            for g in eng.pending_exits():
                rec = eng.take_exit(g)
                if g == self._g:
                    mine = rec
                else:
                    host._vcpu_of(g)._held = rec
            if mine is not None:
                return from_engine(mine)

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

    # -- kicks and requests (acting at the host's current virtual time) ---------------------

    def kick(self) -> bool:
        """``kvm_vcpu_kick``: wake it if blocked, IPI it if in guest mode.  True if an IPI went."""
        return self.vm._engine.kick(self._g)

    def make_request(self, req: int) -> bool:
        """``kvm_make_request`` + kick, honouring ``KVM_REQUEST_NO_WAKEUP``."""
        req = check_int("req", req, 0, 0x7FF)
        return self.vm._engine.make_request(self._g, req)

    def raise_wake(self) -> bool:
        """Send this vCPU the reschedule IPI (arm64 SGI 0, x86 vector 0xFD)."""
        return self.vm._engine.raise_pending(self._g)

    def set_pmr(self, pmr: int) -> None:
        """ICC_PMR_EL1 (arm64, top 5 bits kept) or the TPR (x86)."""
        self.vm._engine.set_pmr(self._g, check_int("pmr", pmr, 0, 255))

    def set_masked(self, masked: bool) -> None:
        """PSTATE.I (arm64) / not IF (x86)."""
        self.vm._engine.set_masked(self._g, bool(masked))

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

    def stats(self) -> dict:
        """This vCPU's halt stats under the kernel's names."""
        row = self.vm._engine.stats_array()[self._g]
        return _stats.row_to_dict(row, self.vm.arch)

    def __repr__(self):
        return f"VCpu(vm={self.vm.index}, id={self.id}, {self.thread_state})"


# What Host.create_vm and Host.restore make: host.py is below this module and does not
# import it.
Host.vm_class = VM
