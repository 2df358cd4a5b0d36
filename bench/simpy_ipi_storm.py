"""The ``ipi-storm`` workload as an idiomatic SimPy model (a peer for the benchmarks).

Written the way a SimPy user would write it: one process per vCPU that
``yield``s timeouts for its phases, a ``simpy.Event`` per halt as the wait
queue the poll loop and the blocked thread wait on, ``Process.interrupt``
for an IPI that finds the vCPU in guest mode, and one ticker process per VM.
It is not a copy of kvmwake's engine (no event classes, generations or
segments) and uses Python's ``random``, so it is not event-for-event
identical to kvmwake; ``bench/compare_peers.py`` checks that the aggregate
figures (halts, successful polls) agree within sampling noise.

The workload (``kvmwake.scenarios``' ``ipi-storm``; the semantics of
``kvmwake/reference/`` for an x86 vCPU alone on its host CPU):

* each vCPU loops: enter the guest (``vm_entry_ns``), compute Exp(20 us) in
  guest mode, trap (``vm_exit_ns``) and send the reschedule IPI to a
  uniformly chosen other vCPU of its VM, re-enter (``vm_entry_ns``, plus
  ``ipi_send_ns`` when the target was IPI'd in guest mode), HLT
  (``vm_exit_ns``), then ``kvm_vcpu_halt``;
* an interrupt for a vCPU sets its pending bit (the LAPIC's IRR) and kicks
  it: a blocked vCPU is woken (``halt_wakeup``) and runs ``wake_to_run_ns``
  later; a polling vCPU's poll ends at once, a successful poll; a vCPU in
  guest mode is IPI'd (it exits and re-enters, ``vm_exit_ns +
  vm_entry_ns``, then goes on with the rest of its compute); a vCPU in the
  host (entering, exiting, handling an IPI, on its way back from a wake-up)
  is left alone and the interrupt waits for it;
* pending interrupts are taken (cleared) on every guest entry, so a wake
  that arrives before the vCPU's entry that precedes its HLT is used up,
  and with one that arrives during the HLT's exit the vCPU stays RUNNABLE
  and re-enters the guest without entering ``kvm_vcpu_halt`` at all
  (``__kvm_emulate_halt`` with an in-kernel LAPIC: no halt, no halt stats,
  ``halt_poll_ns`` unchanged; ``halt_exits`` is still counted);
* ``kvm_vcpu_halt``: clamp ``halt_poll_ns`` to the ceiling, poll for
  ``halt_poll_ns`` if it is not 0 (no other thread ever shares the host
  CPU), else or then block; stats as ``update_halt_poll_stats``; grow and
  shrink by the kernel's rule (``kvmwake.haltpoll.adapt``);
* a tick at every multiple of 4 ms interrupts every vCPU that is polling or
  blocked in a halt.

Times are integer nanoseconds; compute times are ``round(Exp(mean))``.
"""

from __future__ import annotations

import random

import simpy

from kvmwake import haltpoll, scenarios
from kvmwake.model import COST_DEFAULTS, MAX_VCPUS

_SC = scenarios.get("ipi-storm")
COSTS = {**COST_DEFAULTS, **_SC.costs}
PARAMS = haltpoll.HaltPollParams(**_SC.module_params)
TICK_NS = _SC.tick_ns
COMPUTE_MEAN_NS = 20_000
PER_VM = MAX_VCPUS["x86"]

# vCPU states, as far as a kick cares
GUEST, HOST, POLLING, BLOCKED, RUNNABLE = range(5)


class Stats:
    """The kernel's halt counters, summed over the vCPUs."""

    __slots__ = ("halts", "halt_exits", "halt_attempted_poll", "halt_successful_poll",
                 "halt_wakeup", "ipis")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class VCpu:
    def __init__(self, storm: "IpiStorm", vm: list, index: int):
        self.storm = storm
        self.env = storm.env
        self.vm = vm                  # the vCPUs of its VM
        self.index = index            # its id in the VM
        self.state = HOST
        self.pending = False          # an interrupt waits in the IRR
        self.wake = None              # the halt's wait-queue event
        self.halt_poll_ns = 0
        self.proc = self.env.process(self.run())

    # -- what other processes do to this vCPU ----------------------------------

    def interrupt(self) -> bool:
        """An interrupt arrives (IRR bit + kvm_vcpu_kick).  True if it was an IPI."""
        self.pending = True
        state = self.state
        if state == BLOCKED:
            self.storm.stats.halt_wakeup += 1
            self.state = RUNNABLE
            self.wake.succeed()
        elif state == POLLING:
            self.state = HOST
            self.wake.succeed()
        elif state == GUEST:
            self.state = HOST             # exiting: a second kick finds it in the host
            self.proc.interrupt("ipi")
            return True
        return False

    # -- the vCPU thread ------------------------------------------------------------

    def enter(self, ns):
        """Back into the guest: pending interrupts are taken on the way in."""
        self.state = HOST
        yield self.env.timeout(ns)
        self.pending = False

    def run(self):
        env = self.env
        storm = self.storm
        rng = storm.rng
        exit_ns, entry_ns = COSTS["vm_exit_ns"], COSTS["vm_entry_ns"]
        n = len(self.vm)
        yield from self.enter(entry_ns)                 # KVM_RUN
        while True:
            # Guest code: compute, IPIs permitting.
            left = int(rng.expovariate(1.0 / COMPUTE_MEAN_NS) + 0.5)
            while left > 0:
                self.state = GUEST
                began = env.now
                try:
                    yield env.timeout(left)
                    left = 0
                except simpy.Interrupt:
                    left -= env.now - began
                    yield from self.enter(exit_ns + entry_ns)
            # Trap to send the reschedule IPI to a random other vCPU.
            self.state = HOST
            yield env.timeout(exit_ns)
            other = rng.randrange(n - 1)
            if other >= self.index:
                other += 1
            ipi = self.vm[other].interrupt()
            storm.stats.ipis += ipi
            yield from self.enter(entry_ns + (COSTS["ipi_send_ns"] if ipi else 0))
            # HLT traps.
            yield env.timeout(exit_ns)
            storm.stats.halt_exits += 1
            yield from self.halt()
            yield from self.enter(entry_ns)

    def halt(self):
        """kvm_vcpu_halt: poll, then block; stats; grow or shrink."""
        env = self.env
        st = self.storm.stats
        if self.pending:
            # __kvm_emulate_halt: kvm_vcpu_has_events, so the vCPU stays RUNNABLE
            # and goes back into the guest without entering kvm_vcpu_halt.
            return
        ceiling = PARAMS.halt_poll_ns
        self.halt_poll_ns = haltpoll.clamp_on_entry(self.halt_poll_ns, ceiling)
        do_poll = self.halt_poll_ns != 0
        start = env.now
        waited = False
        if not self.pending:                            # kvm_vcpu_check_block
            self.wake = env.event()
            if do_poll:
                self.state = POLLING
                yield self.wake | env.timeout(self.halt_poll_ns)
            if not self.wake.triggered:                 # block
                self.state = BLOCKED
                yield self.wake
                yield env.timeout(COSTS["wake_to_run_ns"])
                waited = True
            self.wake = None
        self.state = HOST
        st.halts += 1
        if do_poll:
            st.halt_attempted_poll += 1
            st.halt_successful_poll += not waited
        self.halt_poll_ns, _ = haltpoll.adapt(self.halt_poll_ns, env.now - start, ceiling, PARAMS)


class IpiStorm:
    """``nr_vcpus`` vCPUs in VMs of at most 1,024, one host CPU each."""

    def __init__(self, nr_vcpus: int = 1024, seed: int = 0):
        if nr_vcpus < 2:
            raise ValueError("ipi-storm needs at least 2 vCPUs")
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.vms = []
        left = nr_vcpus
        while left:
            n = min(PER_VM, left)
            vm: list[VCpu] = []
            vm.extend(VCpu(self, vm, i) for i in range(n))
            self.vms.append(vm)
            self.env.process(self.ticker(vm))
            left -= n

    def ticker(self, vm):
        """The VM's 4 ms tick: every vCPU polling or blocked in a halt gets it."""
        while True:
            yield self.env.timeout(TICK_NS)
            for v in vm:
                if v.state == POLLING or v.state == BLOCKED:
                    v.interrupt()

    def run(self, until_ns: int) -> None:
        self.env.run(until=until_ns)


def run(nr_vcpus: int, sim_ns: int, seed: int = 0) -> dict:
    storm = IpiStorm(nr_vcpus, seed)
    storm.run(sim_ns)
    return storm.stats.as_dict()
