"""VM and VCpu: the ioctl-shaped objects a VMM developer drives."""

from __future__ import annotations

import errno

import numpy as np

from . import guest as _guest
from . import stats as _stats
from . import tracefmt
from .errors import KvmError
from .host import Host, check_arch, check_int
from .model import MAX_VCPUS, ThreadState
from .uapi import Cap

#: Capabilities answered by check_extension, per arch (value returned).
_EXTENSIONS = {
    "arm64": {Cap.MP_STATE: 1, Cap.HALT_POLL: 1, Cap.BINARY_STATS_FD: 1},
    "x86": {Cap.MP_STATE: 1, Cap.HALT_POLL: 1, Cap.BINARY_STATS_FD: 1, Cap.HLT: 1},
}


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
    """

    def __init__(self, arch: str = "arm64", nr_vcpus: int = 1, host_cpus: int | None = None,
                 seed: int = 0, host: Host | None = None, costs: dict | None = None,
                 engine: str = "core", trace_capacity: int = 1 << 20):
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
        self.index, self._first = host._add_vm(self, nr_vcpus, arch)
        self.nr_vcpus = int(nr_vcpus)
        self.vcpus = [VCpu(self, i) for i in range(self.nr_vcpus)]
        self._halt_poll_cap: int | None = None
        self._tick_ns = 0

    @property
    def _engine(self):
        return self.host._engine

    # -- capabilities ---------------------------------------------------------------

    def check_extension(self, cap) -> int:
        """``KVM_CHECK_EXTENSION``: 0 for an unknown or unsupported capability."""
        try:
            cap = Cap(cap)
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
            cap = Cap(cap)
        except ValueError:
            raise KvmError(errno.EINVAL, f"unknown capability {cap!r}") from None
        if cap == Cap.HALT_POLL:
            arg0 = args[0] if args else 0
            if flags or isinstance(arg0, bool) or not isinstance(arg0, int) \
                    or arg0 < 0 or arg0 != (arg0 & 0xFFFF_FFFF):
                raise KvmError(errno.EINVAL, "KVM_CAP_HALT_POLL needs flags == 0 and "
                                             f"args[0] to fit an unsigned int (got flags={flags}, "
                                             f"args[0]={arg0!r})")
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

    # -- running -------------------------------------------------------------------------

    def _start_loaded(self):
        for v in self.vcpus:
            if v._loaded and not v._started:
                self._engine.start_vcpu(v._g)
                v._started = True

    def run(self, until_ns: int) -> None:
        """Run until virtual time ``until_ns`` (every VM of the host runs too)."""
        self.host.run(until_ns)

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

    def load(self, program) -> None:
        """Give the vCPU its guest program (a ``guest.Program``, or a list of ops)."""
        if not isinstance(program, _guest.Program):
            program = _guest.Program(program)
        _guest.validate(program.ops, self.vm.nr_vcpus)
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
        """Make the plain wake source pending on this vCPU and kick it."""
        return self.vm._engine.raise_pending(self._g)

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

