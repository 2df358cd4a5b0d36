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
#: The IPI guest: a step is about to send its IPI (the host timestamps the send) /
#: the last wake of the plan arrived (the run is over).
SEND_PORT = 0x13
DONE_PORT = 0x14

#: The IPI guest's LAPIC is in x2APIC mode: its registers are MSRs 0x800 + offset / 16.
X2APIC_SVR_MSR = 0x80F
X2APIC_EOI_MSR = 0x80B
#: The interrupt command register: ``wrmsr`` with EDX = destination x2APIC ID, EAX =
#: vector, delivery mode fixed (000), physical, level assert.
X2APIC_ICR_MSR = 0x830
ICR_LEVEL_ASSERT = 1 << 14
#: ``IA32_APIC_BASE``: xAPIC global enable and x2APIC enable.
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_EXTD = 1 << 10
#: CPUID.1:ECX bit of x2APIC (the kernel refuses EXTD without it).
CPUID_1_ECX_X2APIC = 1 << 21
#: The IPI guest's step tables start here (guest memory grows to hold them).
TABLE_BASE = 0x100000
#: One step: u32 compute in TSC ticks, u32 destination x2APIC ID (or ``STEP_END``), u32 ICR low.
STEP_SIZE = 12
STEP_END = 0xFFFF_FFFF

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


def guest_code(ipi: bool = False) -> tuple[bytes, int, int, int]:
    """The main code: (bytes at CODE_ADDR, addresses of the halt loop, ``common``, the fault stub).

    ``ipi``: the IPI guest.  Its LAPIC is in x2APIC mode (the host sets
    ``IA32_APIC_BASE`` and the CPUID bit), so the spurious-vector, EOI and ICR
    registers are MSRs (``wrmsr`` traps to the in-kernel LAPIC:
    ``kvm_x2apic_msr_write`` -> ``kvm_x2apic_icr_write`` -> ``kvm_apic_send_ipi``).
    xAPIC ICR writes through MMIO lost IPIs on the project's nested host (the
    sender stuck in the MMIO write, or the target's IRR set without a wake-up);
    the MSR path did not.  The compute spins on the TSC rather than counting
    loop iterations: the project's nested host (``kvm_pvm``) runs this guest's
    instructions in its emulator, about a microsecond each, so only a clock
    gives a known duration.  It is wall time: a vCPU preempted while it
    computes finishes its compute sooner after it runs again.  After its EOI the handler runs the vCPU's next step
    (``ESI`` points at it, each vCPU has its own table)::

            mov ebx, [esi]          ; the step's compute, TSC ticks
            test ebx, ebx
            jz after
            rdtsc
            mov edi, eax
    spin:   rdtsc                   ; compute: spin until the TSC has moved on ebx
            sub eax, edi
            cmp eax, ebx
            jb spin
    after:  mov edx, [esi+4]        ; destination x2APIC ID, or STEP_END
            mov eax, [esi+8]        ; ICR low: vector | level assert (fixed, physical)
            add esi, 12
            cmp edx, -1
            je done
            out SEND_PORT, al       ; the host timestamps the send
            mov ecx, 0x830          ; x2APIC ICR
            wrmsr                   ; in-kernel LAPIC: the IPI is sent
            jmp halt
    done:   out DONE_PORT, al
            jmp halt
    """
    code = bytearray()
    if ipi:
        code += b"\xB9" + struct.pack("<I", X2APIC_SVR_MSR)     # mov ecx, SVR MSR
        code += b"\xB8" + struct.pack("<I", 0x1FF)              # mov eax, 0x1FF
        code += b"\x31\xD2\x0F\x30"                             # xor edx, edx; wrmsr
    else:
        code += b"\xC7\x05" + struct.pack("<II", LAPIC_SVR, 0x1FF)  # mov dword [SVR], 0x1FF
    code += bytes([0xE6, READY_PORT])                          # out READY_PORT, al
    halt = CODE_ADDR + len(code)
    code += b"\xFB\xF4\xEB\xFC"                                 # sti; hlt; jmp halt
    while len(code) % 16:
        code += b"\x90"
    common = CODE_ADDR + len(code)
    code += bytes([0xE6, WAKE_PORT])                           # out WAKE_PORT, al
    if ipi:
        code += b"\xB9" + struct.pack("<I", X2APIC_EOI_MSR)     # mov ecx, EOI MSR
        code += b"\x31\xC0\x31\xD2\x0F\x30"                     # xor eax, eax; xor edx, edx; wrmsr
    else:
        code += b"\xC7\x05" + struct.pack("<II", LAPIC_EOI, 0)  # mov dword [EOI], 0
    code += b"\x83\xC4\x0C"                                     # add esp, 12

    def jmp_halt():
        rel = halt - (CODE_ADDR + len(code) + 5)
        return b"\xE9" + struct.pack("<i", rel)

    if ipi:
        code += b"\x8B\x1E"                                     # mov ebx, [esi]
        code += b"\x85\xDB"                                     # test ebx, ebx
        code += b"\x74\x0C"                                     # jz after (12 bytes on)
        code += b"\x0F\x31\x89\xC7"                             # rdtsc; mov edi, eax
        code += b"\x0F\x31\x29\xF8\x39\xD8\x72\xF8"             # spin: rdtsc; sub eax, edi;
        #                                                          cmp eax, ebx; jb spin
        code += b"\x8B\x56\x04"                                 # after: mov edx, [esi+4]
        code += b"\x8B\x46\x08"                                 # mov eax, [esi+8]
        code += b"\x83\xC6\x0C"                                 # add esi, 12
        code += b"\x83\xFA\xFF"                                 # cmp edx, -1
        send_part = (bytes([0xE6, SEND_PORT])                    # out SEND_PORT, al
                     + b"\xB9" + struct.pack("<I", X2APIC_ICR_MSR)  # mov ecx, ICR MSR
                     + b"\x0F\x30")                              # wrmsr
        # je done: skip the send part and its jmp halt (5).
        code += b"\x0F\x84" + struct.pack("<i", len(send_part) + 5)
        code += send_part
        code += jmp_halt()
        code += bytes([0xE6, DONE_PORT])                       # done: out DONE_PORT, al
    code += jmp_halt()                                         # jmp halt
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


def image(ipi: bool = False) -> bytes:
    """The whole guest memory image up to the end of the stubs."""
    mem = bytearray(STUBS_ADDR + 256 * 8)
    mem[GDT_ADDR:GDT_ADDR + 24] = _gdt()
    code, _, common, fault = guest_code(ipi)
    assert len(code) <= STUBS_ADDR - CODE_ADDR
    mem[CODE_ADDR:CODE_ADDR + len(code)] = code
    mem[IDT_ADDR:IDT_ADDR + 256 * 8] = b"".join(_gate(STUBS_ADDR + 8 * n) for n in range(256))
    mem[STUBS_ADDR:STUBS_ADDR + 256 * 8] = stubs(common, fault)
    return bytes(mem)


def step_table(steps) -> bytes:
    """One vCPU's step table: ``steps`` = [(TSC ticks, destination vCPU or -1 for the end,
    vector)], then an end entry (a wake beyond the plan ends the run rather than running
    off the table)."""
    out = bytearray()
    for loops, dest, vector in steps:
        if not 0 <= loops <= 0xFFFF_FFFF:
            raise ValueError(f"compute of {loops} TSC ticks does not fit the guest's 32 bits")
        if dest < 0:
            out += struct.pack("<III", 0, STEP_END, 0)
        else:
            if not 0 <= dest <= MAX_XAPIC_ID or not 32 <= vector <= 255:
                raise ValueError(f"bad IPI step: destination {dest}, vector {vector}")
            out += struct.pack("<III", loops, dest, vector | ICR_LEVEL_ASSERT)
    out += struct.pack("<III", 0, STEP_END, 0)
    return bytes(out)


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


def setup_vcpu(vcpu, entry: int, esi: int = 0, x2apic: bool = False) -> None:
    """Flat 32-bit protected mode at ``entry`` with its own stack; IF off until ``sti``.
    ``x2apic``: the LAPIC in x2APIC mode (``IA32_APIC_BASE`` EXTD through the sregs)."""
    s = vcpu.get_sregs()
    if x2apic:
        s.apic_base |= APIC_BASE_ENABLE | APIC_BASE_EXTD
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
    r.rsi = esi
    r.rip = entry
    r.rsp = STACK_BASE + (vcpu.id + 1) * STACK_SIZE
    r.rflags = 0x2
    vcpu.set_regs(r)


class MicroVm:
    """A VM with an in-kernel irqchip and ``nr_vcpus`` vCPUs running the halt loop.

    ``halt_poll_ns`` (optional) is set with ``KVM_ENABLE_CAP(KVM_CAP_HALT_POLL)``
    before the vCPUs are created.  ``ipi_steps`` (optional, one list per vCPU
    of ``(compute ns, destination vCPU or -1, vector)``; the compute becomes TSC ticks
    at ``KVM_GET_TSC_KHZ``, kept in ``tsc_khz``) makes it the IPI
    guest: each wake's handler runs the vCPU's next step (``guest_code(ipi=True)``),
    the tables placed from ``TABLE_BASE`` on.  Use as a context manager: every
    fd (VM, vCPUs, stats) is closed on exit.
    """

    def __init__(self, nr_vcpus: int, halt_poll_ns: int | None = None,
                 kvm: Kvm | None = None, ipi_steps: list | None = None):
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
            ipi = ipi_steps is not None
            if ipi and len(ipi_steps) != nr_vcpus:
                raise ValueError(f"ipi_steps must have one list per vCPU ({nr_vcpus})")
            addrs, at = [], TABLE_BASE
            for st in (ipi_steps or []):
                addrs.append(at)
                at += (len(st) + 1) * STEP_SIZE
            size = MEM_SIZE if not ipi else (at + 0xFFF) & ~0xFFF
            self.ipi = ipi
            self.mem = self.vm.add_memory(0, 0, size)
            img = image(ipi)
            self.mem[:len(img)] = img
            self.vcpus = [self.vm.create_vcpu(i) for i in range(nr_vcpus)]
            self.tsc_khz = self.vcpus[0].get_tsc_khz() if ipi else None
            for a, st in zip(addrs, ipi_steps or []):
                t = step_table([(int(round(ns * self.tsc_khz / 1e6)), d, vec)
                                for ns, d, vec in st])
                self.mem[a:a + len(t)] = t
            cpuid = None
            if ipi:
                cpuid = self.kvm.get_supported_cpuid()
                if not any(e[0] == 1 and e[5] & CPUID_1_ECX_X2APIC for e in cpuid):
                    raise KvmIoctlError(95, "x2APIC is not offered by KVM_GET_SUPPORTED_CPUID "
                                            "(the IPI guest needs it)")
            for i, v in enumerate(self.vcpus):
                if cpuid is not None:
                    v.set_cpuid(cpuid)
                setup_vcpu(v, CODE_ADDR, addrs[i] if ipi else 0, x2apic=ipi)
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
           "max_vcpus", "image", "step_table", "VEC_BASE", "NR_VECTORS", "STOP_VECTOR",
           "WAKE_PORT", "READY_PORT", "FAULT_PORT", "SEND_PORT", "DONE_PORT"]
