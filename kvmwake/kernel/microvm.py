"""An x86 micro-VM whose vCPUs halt in a loop and are woken by MSIs.

The guest, the same on every vCPU, in flat 32-bit protected mode (no paging)::

    start:  mov dword [0xFEE000F0], 0x1FF   ; LAPIC on, spurious vector 0xFF
            out READY_PORT, al              ; tell the host this vCPU is up
    halt:   sti
            hlt                             ; kvm_vcpu_halt in the host
            jmp halt
    vec_N:  mov al, N                       ; one 8-byte stub per vector (IDT gate N)
            jmp common
    common: out WAKE_PORT, al               ; KVM_EXIT_IO: the host sees the wake (vector)
            mov dword [0xFEE000B0], 0       ; EOI
            add esp, 12                     ; drop the interrupt frame (no iret, see below)
            jmp halt

Exceptions (vectors 0-31) go to a stub that reports on ``FAULT_PORT`` and
stops.  Returning with ``iret`` failed on the project's nested host
(``KVM_EXIT_INTERNAL_ERROR``, emulation) so the handler drops its frame and
jumps back into the halt loop, as ``shared/kernel/NOTES.md`` describes.

Each wake carries its own vector (``VEC_BASE + j % NR_VECTORS`` for the
vCPU's j-th wake), so two MSIs that are pending at once never merge into one
IRR bit and the host can tell exactly which MSI each port exit answers.

Memory (one slot at guest address 0, ``MEM_SIZE`` bytes): GDT at 0x1000 (null,
flat code 0x08, flat data 0x10), IDT at 0x2000 (256 interrupt gates), code at
0x3000, vector stubs at 0x4000, a 512-byte stack per vCPU below 0x20000 + ...
"""

from __future__ import annotations

import struct

from ..uapi import MpState
from .kvm import Kvm, KvmIoctlError, KvmVm, KVM_CAP_MAX_VCPUS

GDT_ADDR = 0x1000
IDT_ADDR = 0x2000
CODE_ADDR = 0x3000
STUBS_ADDR = 0x4000
STACK_BASE = 0x10000
STACK_SIZE = 0x200
MEM_SIZE = 0x100000           # 1 MiB: room for 1,920 stacks

LAPIC_BASE = 0xFEE00000
LAPIC_SVR = LAPIC_BASE + 0xF0
LAPIC_EOI = LAPIC_BASE + 0xB0

READY_PORT = 0x11
WAKE_PORT = 0x10
FAULT_PORT = 0x12

#: Vectors used for wakes: 0x30 .. 0xDF.  (0xEC and 0xFD, the model's tick and
#: reschedule vectors, and 0xFF, the spurious vector, stay out.)
VEC_BASE = 0x30
NR_VECTORS = 176
#: The vector that tells a vCPU thread to leave its run loop.
STOP_VECTOR = 0xEE

#: xAPIC physical destination is 8 bits: APIC IDs 0..254 (255 is broadcast).
MAX_XAPIC_ID = 254

KVM_EXIT_IO = 2
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17


def msi_address(apic_id: int) -> int:
    """The MSI address of fixed, physical delivery to ``apic_id``."""
    return LAPIC_BASE | (apic_id << 12)


def wake_vector(j: int) -> int:
    """The vector of a vCPU's ``j``-th wake."""
    return VEC_BASE + j % NR_VECTORS


def _gdt() -> bytes:
    null = 0
    code = 0x00CF9A000000FFFF      # base 0, limit 4G, 32-bit, execute/read
    data = 0x00CF92000000FFFF      # base 0, limit 4G, 32-bit, read/write
    return struct.pack("<3Q", null, code, data)


def _gate(handler: int) -> bytes:
    """A 32-bit interrupt gate (type 0xE, present, DPL 0) to ``handler`` in CS 0x08."""
    return struct.pack("<HHBBH", handler & 0xFFFF, 0x08, 0, 0x8E, handler >> 16)


def guest_code() -> tuple[bytes, int, int, int]:
    """The main code: (bytes at CODE_ADDR, addresses of the halt loop, ``common``, the fault stub)."""
    code = bytearray()
    code += b"\xC7\x05" + struct.pack("<II", LAPIC_SVR, 0x1FF)  # mov dword [SVR], 0x1FF
    code += bytes([0xE6, READY_PORT])                          # out READY_PORT, al
    halt = CODE_ADDR + len(code)
    code += b"\xFB\xF4\xEB\xFC"                                 # sti; hlt; jmp halt
    while len(code) % 16:
        code += b"\x90"
    common = CODE_ADDR + len(code)
    code += bytes([0xE6, WAKE_PORT])                           # out WAKE_PORT, al
    code += b"\xC7\x05" + struct.pack("<II", LAPIC_EOI, 0)     # mov dword [EOI], 0
    code += b"\x83\xC4\x0C"                                     # add esp, 12
    rel = halt - (CODE_ADDR + len(code) + 5)
    code += b"\xE9" + struct.pack("<i", rel)                   # jmp halt
    fault = CODE_ADDR + len(code)
    code += bytes([0xE6, FAULT_PORT])                          # out FAULT_PORT, al
    code += b"\xFA\xF4\xEB\xFC"                                 # cli; hlt; jmp $-2 (stay)
    return bytes(code), halt, common, fault


def stubs(common: int, fault: int) -> bytes:
    """256 stubs of 8 bytes: ``mov al, N; jmp common`` (``jmp fault`` for exceptions)."""
    out = bytearray()
    for n in range(256):
        here = STUBS_ADDR + 8 * n
        target = fault if n < 32 else common
        rel = target - (here + 2 + 5)
        out += bytes([0xB0, n]) + b"\xE9" + struct.pack("<i", rel) + b"\x90"
    return bytes(out)


def image() -> bytes:
    """The whole guest memory image up to the end of the stubs."""
    mem = bytearray(STUBS_ADDR + 256 * 8)
    mem[GDT_ADDR:GDT_ADDR + 24] = _gdt()
    code, _, common, fault = guest_code()
    mem[CODE_ADDR:CODE_ADDR + len(code)] = code
    mem[IDT_ADDR:IDT_ADDR + 256 * 8] = b"".join(_gate(STUBS_ADDR + 8 * n) for n in range(256))
    mem[STUBS_ADDR:STUBS_ADDR + 256 * 8] = stubs(common, fault)
    return bytes(mem)


def max_vcpus(vm: KvmVm) -> int:
    """The most vCPUs this micro-VM can have: the kernel's limit, the xAPIC ID space
    and the stacks that fit in guest memory."""
    kernel = vm.check_extension(KVM_CAP_MAX_VCPUS) or 1
    return min(kernel, MAX_XAPIC_ID + 1, (MEM_SIZE - STACK_BASE) // STACK_SIZE)


class VcpuCountError(ValueError):
    """More vCPUs than the kernel (or the micro-VM) allows."""


def _flat(seg, selector, code):
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 11 if code else 3
    seg.present = 1
    seg.dpl = 0
    seg.db = 1
    seg.s = 1
    seg.l = 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def setup_vcpu(vcpu, entry: int) -> None:
    """Flat 32-bit protected mode at ``entry`` with its own stack; IF off until ``sti``."""
    s = vcpu.get_sregs()
    _flat(s.cs, 0x08, True)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        _flat(seg, 0x10, False)
    s.gdt.base = GDT_ADDR
    s.gdt.limit = 3 * 8 - 1
    s.idt.base = IDT_ADDR
    s.idt.limit = 256 * 8 - 1
    s.cr0 = (s.cr0 | 0x1) & ~0x80000000      # PE on, PG off
    s.cr4 = 0
    s.efer = 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"):
        setattr(r, name, 0)
    r.rip = entry
    r.rsp = STACK_BASE + (vcpu.id + 1) * STACK_SIZE
    r.rflags = 0x2
    vcpu.set_regs(r)


class MicroVm:
    """A VM with an in-kernel irqchip and ``nr_vcpus`` vCPUs running the halt loop.

    ``halt_poll_ns`` (optional) is set with ``KVM_ENABLE_CAP(KVM_CAP_HALT_POLL)``
    before the vCPUs are created.  Use as a context manager: every fd (VM,
    vCPUs, stats) is closed on exit.
    """

    def __init__(self, nr_vcpus: int, halt_poll_ns: int | None = None,
                 kvm: Kvm | None = None):
        if isinstance(nr_vcpus, bool) or not isinstance(nr_vcpus, int) or nr_vcpus < 1:
            raise VcpuCountError(f"--vcpus must be a positive integer, not {nr_vcpus!r}")
        self._own_kvm = kvm is None
        self.kvm = kvm if kvm is not None else Kvm()
        self.vm = None
        try:
            self.vm = self.kvm.create_vm()
            limit = max_vcpus(self.vm)
            if nr_vcpus > limit:
                raise VcpuCountError(
                    f"{nr_vcpus} vCPUs asked for, but at most {limit} are possible here "
                    f"(KVM_CAP_MAX_VCPUS = {self.vm.check_extension(KVM_CAP_MAX_VCPUS)}, "
                    f"xAPIC IDs 0..{MAX_XAPIC_ID})")
            self.nr_vcpus = nr_vcpus
            self.vm.set_tss_addr()
            self.vm.create_irqchip()
            if halt_poll_ns is not None:
                self.vm.set_halt_poll(halt_poll_ns)
            self.halt_poll_ns = halt_poll_ns
            self.mem = self.vm.add_memory(0, 0, MEM_SIZE)
            img = image()
            self.mem[:len(img)] = img
            self.vcpus = [self.vm.create_vcpu(i) for i in range(nr_vcpus)]
            for v in self.vcpus:
                setup_vcpu(v, CODE_ADDR)
                if v.get_mp_state() != MpState.RUNNABLE:
                    # Application processors wait for INIT/SIPI: run them at once.
                    v.set_mp_state(MpState.RUNNABLE)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["MicroVm", "VcpuCountError", "KvmIoctlError", "msi_address", "wake_vector",
           "max_vcpus", "image", "VEC_BASE", "NR_VECTORS", "STOP_VECTOR", "WAKE_PORT",
           "READY_PORT", "FAULT_PORT"]
