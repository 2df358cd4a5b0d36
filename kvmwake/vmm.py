"""VMM policies: what userspace does with each exit in ``vm.run(until_ns, vmm=...)``.

KVM leaves part of PSCI to userspace.  For ``SYSTEM_SUSPEND`` the kernel only
exits (``KVM_SYSTEM_EVENT_SUSPEND``, registers untouched); the checks of ARM
DEN0022D.b 5.19 and the resume at the entry point are the VMM's.
``ReferenceVmm`` does them right.

Writing a policy
----------------
Subclass ``Vmm`` and override ``handle_exit(vcpu, ex)``.  It runs between two
steps of the simulation, with the exiting vCPU outside ``KVM_RUN``; it may
use every vCPU and VM call (``get_reg``, ``set_reg``, ``set_mp_state``,
``irq_line``, ...) and returns True to call ``KVM_RUN`` again for that vCPU
at once, False to leave it outside.  Keep the policy's own state in plain
attributes (ints, strs, lists, dicts of those) so it can be saved with the VM.

The exit a policy handles stays pending until ``handle_exit`` returns, as KVM
leaves ``kvm_run`` filled until the next ``KVM_RUN``: if the policy raises
(or is interrupted), the next ``vm.run`` offers the same exit again and
``vcpu.run()`` returns it.  A snapshot taken inside ``handle_exit`` saves the
exit as pending, so the restored VM offers it to its policy again: take it
before the policy changes anything for that exit, and the restored VM goes on
exactly as the original.  A policy may not run the VM: ``host.run``,
``vm.run`` and ``vcpu.run`` called from inside it raise ``KvmError(EBUSY)``.
"""

from __future__ import annotations

from .uapi import ExitReason, MpState, PsciFn, PsciRet, SystemEventType

U64 = (1 << 64) - 1


def u64(v: int) -> int:
    """A signed PSCI return code as the u64 the guest reads in x0."""
    return v & U64


class Vmm:
    """The policy interface: re-enter after every exit but DONE, SHUTDOWN and errors."""

    def attach(self, vm) -> None:
        """Called once by ``vm.run`` before the first step."""
        self.vm = vm

    def handle_exit(self, vcpu, ex) -> bool:
        if ex.reason == ExitReason.SYSTEM_EVENT:
            t = ex.system_event.type
            if t == SystemEventType.WAKEUP:
                vcpu.set_mp_state(MpState.RUNNABLE)
                return True
            if t == SystemEventType.SUSPEND:
                vcpu.set_reg("x0", u64(PsciRet.DENIED))
                return True
            return False
        if ex.reason == ExitReason.MMIO:
            return ex.ucall == "SYNC"
        return ex.reason == ExitReason.INTR

    def to_state(self) -> dict:
        """The policy's own state, as plain JSON data, for snapshots."""
        return {k: v for k, v in vars(self).items() if k != "vm"}

    def load_state(self, state: dict) -> None:
        """Set the policy's state from ``to_state()``'s output (on an unattached object)."""
        if not isinstance(state, dict):
            raise TypeError("a policy state is a dict")
        for k, v in state.items():
            if not isinstance(k, str) or k == "vm" or k.startswith("__"):
                raise ValueError(f"bad policy attribute {k!r}")
            setattr(self, k, v)


class DenyAllVmm(Vmm):
    """Denies every SYSTEM_SUSPEND (x0 = DENIED); honours wake-ups."""


class ReferenceVmm(Vmm):
    """PSCI SYSTEM_SUSPEND per DEN0022D.b 5.19, shutdown and reset.

    * ``SUSPEND``: ``DENIED`` if any other vCPU is not off (STOPPED);
      ``INVALID_ADDRESS`` if the entry point (x1) is outside guest memory;
      otherwise the vCPU is set SUSPENDED and KVM emulates the WFI.
    * ``WAKEUP`` of a vCPU it suspended: resume at the entry point with the
      context ID (x2) in x0, then RUNNABLE, all in one step.  A vCPU that
      userspace set SUSPENDED by other means is simply made RUNNABLE.
    * ``SHUTDOWN``: the VM is off; no vCPU is run again.
    * ``RESET``: vCPU 0 restarts at the start of its program, the others stay
      off until the guest's CPU_ON; the VM counts the reset.
    * ``INTR`` and ucall ``SYNC``: re-enter.  ``DONE`` and errors: leave out.

    Counters: ``suspends``, ``denials``, ``invalid_addresses``, ``resumes``,
    ``shutdowns``, ``resets``; ``resume_latency_ns`` lists, per resume, the
    time from the SUSPEND exit to the WAKEUP exit.
    """

    def __init__(self):
        self.suspends = 0
        self.denials = 0
        self.invalid_addresses = 0
        self.resumes = 0
        self.shutdowns = 0
        self.resets = 0
        self.off = False
        self.resume_latency_ns: list = []
        self._pending: dict = {}          # vcpu id -> [entry, context_id, suspend time]

    def handle_exit(self, vcpu, ex) -> bool:
        if self.off:
            return False
        if ex.reason == ExitReason.SYSTEM_EVENT:
            t = ex.system_event.type
            if t == SystemEventType.SUSPEND:
                return self._suspend(vcpu, ex)
            if t == SystemEventType.WAKEUP:
                return self._wakeup(vcpu, ex)
            if t == SystemEventType.SHUTDOWN:
                self.shutdowns += 1
                self.off = True
                return False
            if t == SystemEventType.RESET:
                self.resets += 1
                self._pending.clear()
                vm = vcpu.vm
                boot = vm.vcpus[0]
                for v in vm.vcpus:
                    if v is not boot and v.outside_run:
                        v.set_mp_state(MpState.STOPPED)
                if boot.outside_run:
                    boot.set_reg("pc", vm.code_address(0))
                    boot.set_reg("x0", 0)
                    boot.set_mp_state(MpState.RUNNABLE)
                    if boot is not vcpu:
                        vm._reenter(boot)
                return vcpu is boot or vcpu.get_mp_state() != MpState.STOPPED
            return False
        if ex.reason == ExitReason.MMIO:
            return ex.ucall == "SYNC"
        return ex.reason == ExitReason.INTR

    COUNTERS = ("suspends", "denials", "invalid_addresses", "resumes", "shutdowns", "resets")

    def to_state(self) -> dict:
        st = {k: getattr(self, k) for k in self.COUNTERS}
        st["off"] = self.off
        st["resume_latency_ns"] = list(self.resume_latency_ns)
        st["pending"] = [[vid, *p] for vid, p in sorted(self._pending.items())]
        return st

    def load_state(self, state: dict) -> None:
        for k in self.COUNTERS:
            v = state[k]
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} = {v!r}")
            setattr(self, k, v)
        self.off = bool(state["off"])
        self.resume_latency_ns = [int(x) for x in state["resume_latency_ns"]]
        self._pending = {}
        for rec in state["pending"]:
            vid, entry, context, t0 = (int(x) for x in rec)
            self._pending[vid] = [entry, context, t0]

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in self.COUNTERS}

    def _suspend(self, vcpu, ex) -> bool:
        vm = vcpu.vm
        self.suspends += 1
        # DEN0022D.b 5.19.2: every other core must be off.
        for v in vm.vcpus:
            if v is not vcpu and v.get_mp_state() != MpState.STOPPED:
                self.denials += 1
                vcpu.set_reg("x0", u64(PsciRet.DENIED))
                return True
        fn = vcpu.get_reg("x0")
        entry, context = vcpu.get_reg("x1"), vcpu.get_reg("x2")
        if fn == PsciFn.SYSTEM_SUSPEND:        # the 32-bit call: arguments were narrowed
            entry &= 0xFFFF_FFFF
            context &= 0xFFFF_FFFF
        if not vm.memory_contains(entry):
            self.invalid_addresses += 1
            vcpu.set_reg("x0", u64(PsciRet.INVALID_ADDRESS))
            return True
        self._pending[vcpu.id] = [entry, context, ex.time_ns]
        vcpu.set_mp_state(MpState.SUSPENDED)
        return True

    def _wakeup(self, vcpu, ex) -> bool:
        p = self._pending.pop(vcpu.id, None)
        if p is not None:
            entry, context, t0 = p
            # Resume "as if from reset" at the entry point (5.19.1), in one step.
            vcpu.set_reg("pc", entry)
            vcpu.set_reg("x0", context)
            self.resumes += 1
            self.resume_latency_ns.append(ex.time_ns - t0)
        vcpu.set_mp_state(MpState.RUNNABLE)
        return True


#: The policies named by a word in scenario files and on the command line.
POLICIES = {"default": Vmm, "reference": ReferenceVmm, "deny-all": DenyAllVmm}


def load_policy(spec: str) -> type:
    """The VMM policy class a spec names: a word of ``POLICIES`` (``"reference"``) or
    ``"package.module:Class"`` (``Class`` may be dotted, ``"pkg.mod:Outer.Inner"``),
    which is imported.  The class must subclass ``Vmm`` and be constructible
    without arguments (``vm.run`` calls ``attach`` on the instance).

    Raises ``ValueError`` naming what is wrong: the spec's form, a module that
    cannot be imported, a missing attribute, or a class that is not a policy.
    This is the spec ``kvmwake run --vmm`` and a scenario's ``vmm = "..."`` take;
    it is also how a snapshot names a VM's policy.
    """
    import importlib
    import inspect

    if not isinstance(spec, str):
        raise ValueError(f"a VMM policy is a name or 'package.module:Class', not {spec!r}")
    if spec in POLICIES:
        return POLICIES[spec]
    mod_name, sep, qual = spec.partition(":")
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    import re
    if not sep or not re.fullmatch(rf"{ident}(\.{ident})*", mod_name) \
            or not re.fullmatch(rf"{ident}(\.{ident})*", qual):
        raise ValueError(f"VMM policy {spec!r}: expected one of {', '.join(POLICIES)} or "
                         "'package.module:Class'")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:       # an ImportError, or an error raised by the module itself
        raise ValueError(f"VMM policy {spec!r}: cannot import {mod_name!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    obj = mod
    for part in qual.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"VMM policy {spec!r}: {mod_name} has no {qual!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Vmm)):
        raise ValueError(f"VMM policy {spec!r}: {qual} is not a subclass of kvmwake.vmm.Vmm")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise ValueError(f"VMM policy {spec!r}: {qual}() needs arguments; a policy named "
                         "by a spec is built without any") from None
    except ValueError:           # no signature to inspect (a C type): try it when built
        pass
    return obj


def policy_spec(cls: type) -> str:
    """The spec naming ``cls``: its word in ``POLICIES``, else ``"module:QualName"``."""
    for name, c in POLICIES.items():
        if c is cls:
            return name
    return f"{cls.__module__}:{cls.__qualname__}"
