"""Thin ioctl wrappers for the real ``/dev/kvm`` (x86), with ``ctypes``.

Everything here talks to the kernel; nothing is simulated.  The structs are
laid out as in ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h``; ioctl numbers not already in
``kvmwake.uapi`` are defined below with the header they come from.

``Kvm`` owns the ``/dev/kvm`` fd, ``KvmVm`` a VM fd (and its vCPUs, guest
memory and stats fds).  Both are context managers and close every fd they
opened on ``close()`` / ``__exit__``, whatever happened before.
"""

from __future__ import annotations

import ctypes
import struct
import ctypes.util
import errno as _errno
import mmap
import os

from ..uapi import KVMIO, SIZEOF_KVM_ENABLE_CAP, SIZEOF_KVM_MSI, Cap, Ioctl, MpState, _ioc

DEV_KVM = "/dev/kvm"
KVM_API_VERSION = 12

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _io(nr):
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr, size):
    return _ioc(_IOC_READ, nr, size)


def _iow(nr, size):
    return _ioc(_IOC_WRITE, nr, size)


# --- include/uapi/linux/kvm.h: capabilities not in kvmwake.uapi --------------------------
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129


# --- structs --------------------------------------------------------------------------------

class KvmSegment(ctypes.Structure):
    """``struct kvm_segment`` (arch/x86/include/uapi/asm/kvm.h), 24 bytes."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``, 16 bytes."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs``, 312 bytes."""

    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment),
                ("fs", KvmSegment), ("gs", KvmSegment), ("ss", KvmSegment),
                ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable),
                ("idt", KvmDtable), ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64),
                ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64),
                ("efer", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs``, 144 bytes."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``, 32 bytes."""

    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap``, 104 bytes."""

    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class KvmMsi(ctypes.Structure):
    """``struct kvm_msi``, 32 bytes."""

    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32),
                ("data", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("devid", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 12)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


assert ctypes.sizeof(KvmSegment) == 24
assert ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert ctypes.sizeof(KvmEnableCap) == SIZEOF_KVM_ENABLE_CAP
assert ctypes.sizeof(KvmMsi) == SIZEOF_KVM_MSI

# --- ioctl numbers (include/uapi/linux/kvm.h) not in kvmwake.uapi -------------------------------
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
#: ``struct kvm_cpuid2`` is a header of 8 bytes (nent, padding) and then
#: ``struct kvm_cpuid_entry2`` entries of 40 bytes (function, index, flags, eax, ebx, ecx,
#: edx, padding[3]).
CPUID2_HEADER = 8
CPUID_ENTRY2_SIZE = 40
KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, 0x05, CPUID2_HEADER)
KVM_SET_CPUID2 = _iow(0x90, CPUID2_HEADER)
KVM_GET_TSC_KHZ = _io(0xA3)
#: Entries asked for by ``get_supported_cpuid`` (E2BIG means more are needed).
CPUID_MAX_ENTRIES = 256
assert KVMIO == 0xAE

#: ``struct kvm_run`` offsets used by the run loop (include/uapi/linux/kvm.h).
KVM_RUN_EXIT_REASON = 8
KVM_RUN_IMMEDIATE_EXIT = 1
KVM_RUN_UNION = 32

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class KvmIoctlError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed; ``errno`` is the kernel's."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)} ({_errno.errorcode.get(err, err)})")
        self.what = what

    def __str__(self):
        return self.strerror


def ioctl(fd: int, request: int, arg=None, what: str = "ioctl") -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is None, an int, or a ctypes object (by pointer).

    Returns the (non-negative) result; raises ``KvmIoctlError`` with the errno.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)
    while True:
        rc = _libc.ioctl(fd, request, ptr)
        if rc >= 0:
            return rc
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            raise KvmIoctlError(err, what)


class Kvm:
    """``/dev/kvm``: the system fd.  ``with Kvm() as kvm: vm = kvm.create_vm()``."""

    def __init__(self, path: str = DEV_KVM):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = ioctl(self.fd, Ioctl.GET_API_VERSION, None, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise OSError(_errno.EINVAL, f"{path}: KVM API version {version}, "
                                             f"expected {KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl(self.fd, Ioctl.GET_VCPU_MMAP_SIZE, None,
                                        "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise
        self.api_version = version
        self._vms: list[KvmVm] = []

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on /dev/kvm (0: not supported)."""
        return ioctl(self.fd, Ioctl.CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def get_supported_cpuid(self) -> list[list[int]]:
        """``KVM_GET_SUPPORTED_CPUID``: [function, index, flags, eax, ebx, ecx, edx] per
        leaf the kernel can offer a guest."""
        buf = (ctypes.c_char * (CPUID2_HEADER + CPUID_MAX_ENTRIES * CPUID_ENTRY2_SIZE))()
        struct.pack_into("<I", buf, 0, CPUID_MAX_ENTRIES)
        ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        n = struct.unpack_from("<I", buf, 0)[0]
        return [list(struct.unpack_from("<7I", buf, CPUID2_HEADER + i * CPUID_ENTRY2_SIZE))
                for i in range(n)]

    def create_vm(self) -> KvmVm:
        vm = KvmVm(self)
        self._vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in self._vms:
            vm.close()
        self._vms.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class KvmVm:
    """A VM fd with its vCPUs, memory slots and stats fds; ``close()`` closes all."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm
        self.fd = ioctl(kvm.fd, Ioctl.CREATE_VM, 0, "KVM_CREATE_VM")
        self.vcpus: list[KvmVcpu] = []
        self._mem: list[mmap.mmap] = []
        self._closed = False

    # -- VM ioctls ------------------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (per-VM answers, e.g. MAX_VCPUS)."""
        return ioctl(self.fd, Ioctl.CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        """``KVM_SET_TSS_ADDR`` (an unsigned long above INT_MAX, hence ctypes)."""
        ioctl(self.fd, Ioctl.SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def create_irqchip(self) -> None:
        ioctl(self.fd, Ioctl.CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")

    def add_memory(self, slot: int, guest_phys_addr: int, size: int) -> mmap.mmap:
        """Anonymous memory as slot ``slot`` at ``guest_phys_addr``; returns the mapping."""
        mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = KvmUserspaceMemoryRegion(slot=slot, flags=0, guest_phys_addr=guest_phys_addr,
                                          memory_size=size, userspace_addr=addr)
        try:
            ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        except BaseException:
            mem.close()
            raise
        self._mem.append(mem)
        return mem

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM (e.g. ``Cap.HALT_POLL``, args[0] = ns)."""
        ec = KvmEnableCap(cap=int(cap), flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, Ioctl.ENABLE_CAP, ec, f"KVM_ENABLE_CAP({Cap(cap).name if cap in Cap._value2member_map_ else cap})")

    def set_halt_poll(self, ns: int) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_HALT_POLL, ns)``: this VM's polling ceiling."""
        self.enable_cap(Cap.HALT_POLL, ns)

    def signal_msi(self, address: int, data: int, flags: int = 0) -> int:
        """``KVM_SIGNAL_MSI``: >0 delivered, 0 blocked (e.g. no such APIC ID)."""
        msi = KvmMsi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data,
                     flags=flags)
        return ioctl(self.fd, Ioctl.SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def stats_fd(self) -> int:
        """``KVM_GET_STATS_FD`` on the VM (the caller closes the fd)."""
        return ioctl(self.fd, Ioctl.GET_STATS_FD, None, "KVM_GET_STATS_FD")

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        v = KvmVcpu(self, vcpu_id)
        self.vcpus.append(v)
        return v

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every vCPU (and its stats fd and kvm_run mapping), then the VM, then memory."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for v in self.vcpus:
            try:
                v.close()
            except OSError as exc:            # pragma: no cover - close failing is rare
                errors.append(exc)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for mem in self._mem:
            try:
                mem.close()
            except BufferError:               # a view is still alive; freed with it
                pass
        self._mem.clear()
        if errors:
            raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class KvmVcpu:
    """A vCPU fd with its ``kvm_run`` mapping and (lazily) its binary stats fd."""

    def __init__(self, vm: KvmVm, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = ioctl(vm.fd, Ioctl.CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        try:
            self.run = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._stats_fd = -1

    @property
    def run_addr(self) -> int:
        """The address of this vCPU's ``struct kvm_run``."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.run))

    def get_regs(self) -> KvmRegs:
        r = KvmRegs()
        ioctl(self.fd, KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, regs: KvmRegs) -> None:
        ioctl(self.fd, KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> KvmSregs:
        s = KvmSregs()
        ioctl(self.fd, KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, sregs: KvmSregs) -> None:
        ioctl(self.fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid(self, entries: list[list[int]]) -> None:
        """``KVM_SET_CPUID2`` with ``entries`` as ``Kvm.get_supported_cpuid`` gives them."""
        buf = (ctypes.c_char * (CPUID2_HEADER + len(entries) * CPUID_ENTRY2_SIZE))()
        struct.pack_into("<I", buf, 0, len(entries))
        for i, e in enumerate(entries):
            struct.pack_into("<7I", buf, CPUID2_HEADER + i * CPUID_ENTRY2_SIZE, *e)
        ioctl(self.fd, KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest's TSC frequency, kHz."""
        return ioctl(self.fd, KVM_GET_TSC_KHZ, None, "KVM_GET_TSC_KHZ")

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: the raw value (see ``kvmwake.uapi.MpState``)."""
        s = KvmMpState()
        ioctl(self.fd, Ioctl.GET_MP_STATE, s, "KVM_GET_MP_STATE")
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        """``KVM_SET_MP_STATE``; raises ``KvmIoctlError`` (EINVAL...) when refused."""
        s = KvmMpState(mp_state=int(state))
        name = MpState(state).name if state in MpState._value2member_map_ else str(state)
        ioctl(self.fd, Ioctl.SET_MP_STATE, s, f"KVM_SET_MP_STATE({name})")

    def run_once(self) -> int:
        """One ``KVM_RUN`` from Python; returns the exit reason (for tests and tools)."""
        ioctl(self.fd, Ioctl.RUN, None, "KVM_RUN")
        return int.from_bytes(self.run[KVM_RUN_EXIT_REASON:KVM_RUN_EXIT_REASON + 4], "little")

    def stats_fd(self) -> int:
        """This vCPU's ``KVM_GET_STATS_FD`` (opened once, closed with the vCPU)."""
        if self._stats_fd < 0:
            self._stats_fd = ioctl(self.fd, Ioctl.GET_STATS_FD, None, "KVM_GET_STATS_FD")
        return self._stats_fd

    def close(self) -> None:
        if self._stats_fd >= 0:
            os.close(self._stats_fd)
            self._stats_fd = -1
        if self.run is not None:
            try:
                self.run.close()
            except BufferError:               # pragma: no cover
                pass
            self.run = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
