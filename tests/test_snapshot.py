"""Snapshots: bit-identical continuation, migration of a suspended VM, bad files, fuzzing,
the CLI, module parameters at restore, and size at 4,096 vCPUs.

The format (kvmwake/snapshot.py): magic, version, header JSON, zlib body, BLAKE2b-128.
``frame()`` below re-frames a modified header or body with a correct checksum, so the
logical checks (the ones behind the checksum) are exercised too.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmwake as kw
from kvmwake import cli, scenarios
from kvmwake import guest as g
from kvmwake import snapshot as S
from kvmwake.host import host_to_bytes, restore_host
from kvmwake.uapi import Cap, ExitReason, MpState, PsciFn, SystemEventType
from kvmwake.vmm import ReferenceVmm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MS = 1_000_000
US = 1_000
SCENARIOS = ("ipi-storm", "default", "irq-storm", "suspend-cycle")


# -- framing helpers ------------------------------------------------------------------------


def _child_env() -> dict:
    """The environment for a child Python: the same kvmwake this process imported
    (the source tree with its built extension, or the installed package)."""
    import kvmwake
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(kvmwake.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    return env

def unframe(data: bytes):
    """(header dict, inflated body) of a valid snapshot."""
    prefix = _PREFIX_V1 if struct.unpack_from("<I", data, 8)[0] == 1 else S._PREFIX
    _, _, hlen, blen = _PREFIX_V1.unpack_from(data, 0)
    header = json.loads(data[prefix.size:prefix.size + hlen])
    body = bytearray(zlib.decompress(data[prefix.size + hlen:prefix.size + hlen + blen]))
    return header, body


_PREFIX_V1 = struct.Struct("<8sIIQ")       # format version 1: no inflated size


def frame(header, body, *, version=S.FORMAT_VERSION, magic=S.MAGIC, fix_size=True,
          packed=None, raw=None) -> bytes:
    """A snapshot with a correct checksum around ``header`` (a dict, or raw JSON bytes)
    and ``body`` (inflated bytes; or ``packed``, the compressed body as is); ``raw``
    the inflated size the frame declares (default: the body's); version 1 frames
    have none."""
    if isinstance(header, dict):
        if fix_size and isinstance(header.get("body"), dict):
            header = dict(header, body=dict(header["body"], size=len(body)))
        hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    else:
        hjson = bytes(header)
    if packed is None:
        packed = zlib.compress(bytes(body), 1)
    if version == 1:
        out = bytearray(_PREFIX_V1.pack(magic, version, len(hjson), len(packed)))
    else:
        out = bytearray(S._PREFIX.pack(magic, version, len(hjson), len(packed),
                                       len(body) if raw is None else raw))
    out += hjson + packed
    out += hashlib.blake2b(bytes(out), digest_size=S.DIGEST_SIZE).digest()
    return bytes(out)


def reframe(data: bytes, edit_header=None, edit_body=None) -> bytes:
    """Decode a snapshot, let the callbacks edit header and body in place, re-frame it."""
    header, body = unframe(data)
    if edit_header is not None:
        edit_header(header)
    if edit_body is not None:
        edit_body(header, body)
    return frame(header, body)


# Mirrors of the engine's structs (kvmwake/_core.pxd), to edit single fields of the body:
# one copy, the fuzzer's.
from fuzz_snapshot import (CPU_DTYPE, STRUCTS, THREAD_DTYPE, VIRQ_DTYPE,  # noqa: E402
                           check_layouts)
OP_DTYPE = kw.model.OP_DTYPE
# Thread states, continuations and event classes of the core (tests/test_core_mirrors.py).
TS_USER, TS_RUNNING, TS_POLLING, TS_BLOCKED, TS_RUNNABLE = range(5)
CONT_TRAP, CONT_EOI = 2, 5
EV_SEGMENT, EV_RUN = 3, 5
SEQ_BITS = 56


def test_struct_mirrors_match_the_engine():
    check_layouts()


def records(header, body, name):
    """A writable copy of array ``name`` as struct records."""
    d = header["engine"]["arrays"][name]
    return np.frombuffer(bytes(body[d["offset"]:d["offset"] + d["nbytes"]]),
                         dtype=STRUCTS[name]).copy()


def store(header, body, name, recs):
    d = header["engine"]["arrays"][name]
    body[d["offset"]:d["offset"] + d["nbytes"]] = recs.tobytes()


def edit_records(data: bytes, name, fn) -> bytes:
    """Re-framed snapshot with ``fn(recs)`` applied to the records of array ``name``."""
    def edit(header, body):
        recs = records(header, body, name)
        fn(recs)
        store(header, body, name, recs)
    return reframe(data, edit_body=edit)


def array_bytes(header, body, name) -> bytes:
    d = header["engine"]["arrays"][name]
    return bytes(body[d["offset"]:d["offset"] + d["nbytes"]])


# -- observing a host -----------------------------------------------------------------------

def observe(host) -> dict:
    """Everything a user can read of a host's history."""
    totals = host.timeline_totals()
    return {
        "now": host.now, "events": host.events, "halts": host.halts,
        "lat": host.latency_histogram().tolist(),
        "timeline": (host.timeline_capacity, host.timeline_dropped,
                     host.timeline_array().tobytes(),
                     {k: np.asarray(v).tolist() for k, v in totals.items()}),
        "vms": [{"stats": vm.stats_array().tolist(), "trace": vm.trace_text(),
                 "exits": vm.exits, "vmm": (type(vm.vmm).__name__, vm.vmm.to_state()),
                 "threads": [v.thread_state for v in vm.vcpus],
                 "mp": [int(v.get_mp_state()) for v in vm.vcpus]}
                for vm in host.vms],
    }


def small_host(name, vcpus, host_cpus, seed, trace_capacity=2000, timeline=0):
    host, _, _ = scenarios.build(name, vcpus=vcpus, host_cpus=host_cpus, seed=seed,
                                 trace_capacity=trace_capacity)
    if timeline:
        host.enable_timeline(timeline)
    return host


# == 1. bit-identical continuation ============================================================

@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(SCENARIOS), vcpus=st.integers(8, 64),
       host_cpus=st.integers(2, 8), seed=st.integers(0, 2**32 - 1),
       end=st.integers(1 * MS, 20 * MS), timeline=st.sampled_from([0, 0, 500, 20_000]),
       data=st.data())
def test_continuation_is_bit_identical(name, vcpus, host_cpus, seed, end, timeline, data):
    """Run to T, versus run to t, snapshot, restore (six ways), run to T: the same stats,
    trace text (a 2,000-record ring, so it wraps), timeline, policies, and final bytes."""
    cut = data.draw(st.integers(0, end), label="cut")
    direct = small_host(name, vcpus, host_cpus, seed, timeline=timeline)
    direct.run(end)
    want = observe(direct)
    want_bytes = direct.snapshot()

    src = small_host(name, vcpus, host_cpus, seed, timeline=timeline)
    src.run(cut)
    snap = src.snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        host_path = os.path.join(tmp, "host.kws")
        vm_path = os.path.join(tmp, "vm.kws")
        src.save(host_path)
        src.vms[-1].save(vm_path)
        copies = {
            "bytes": kw.Host.restore(snap),
            "bytearray": kw.Host.restore(bytearray(snap)),
            "pickle": pickle.loads(pickle.dumps(src)),
            "vm-pickle": pickle.loads(pickle.dumps(src.vms[-1])).host,
            "file": kw.Host.restore(host_path),
            "vm-file": kw.VM.restore(vm_path).host,
        }
    # A snapshot of a restored host is the snapshot it was restored from.
    for how, host in copies.items():
        assert host.now == src.now == cut, how
        assert host.snapshot() == snap, how
    src.run(end)
    assert observe(src) == want, "taking a snapshot changed the run"
    for how, host in copies.items():
        host.run(end)
        assert observe(host) == want, how
        assert host.snapshot() == want_bytes, how


@pytest.mark.parametrize("name", ["suspend-cycle", "ipi-storm"])
def test_restore_in_a_fresh_process_continues_bit_for_bit(tmp_path, name):
    cut, end = 3 * MS + 123, 9 * MS
    direct = small_host(name, 16, 4, seed=11, trace_capacity=500)
    direct.run(end)
    src = small_host(name, 16, 4, seed=11, trace_capacity=500)
    src.run(cut)
    snap_path, out_path = tmp_path / "cut.kws", tmp_path / "final.kws"
    src.save(snap_path)
    child = (
        "import sys, kvmwake as kw\n"
        "h = kw.Host.restore(sys.argv[1])\n"
        "h.run(int(sys.argv[3]))\n"
        "open(sys.argv[2], 'wb').write(h.snapshot())\n"
        "print(h.events, h.halts)\n")
    env = _child_env()
    proc = subprocess.run([sys.executable, "-c", child, str(snap_path), str(out_path),
                           str(end)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=snap_path.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(direct.events), str(direct.halts)]
    final = out_path.read_bytes()
    assert final == direct.snapshot()
    assert observe(kw.Host.restore(final)) == observe(direct)


# == 2. migration of a suspended VM ===========================================================

CTX = 0x0C0F_FEE0_1234_5678
SPI = 40
TIMER_NS = 2 * MS


class RecordingVmm(ReferenceVmm):
    """ReferenceVmm that logs every exit as [vcpu, reason, event type, value, time]."""

    def __init__(self):
        super().__init__()
        self.log = []

    def handle_exit(self, vcpu, ex):
        self.log.append([vcpu.id, int(ex.reason),
                         int(ex.system_event.type) if ex.system_event else None,
                         ex.value, ex.time_ns])
        return super().handle_exit(vcpu, ex)

    def to_state(self):
        st_ = super().to_state()
        st_["log"] = [list(x) for x in self.log]
        return st_

    def load_state(self, state):
        super().load_state(state)
        self.log = [list(x) for x in state["log"]]

    def system_events(self):
        return [(x[0], x[2], x[4]) for x in self.log if x[1] == ExitReason.SYSTEM_EVENT]

    def syncs(self):
        return [(x[0], x[3], x[4]) for x in self.log if x[1] == ExitReason.MMIO]


RECORDING = {f"{RecordingVmm.__module__}:{RecordingVmm.__qualname__}": RecordingVmm}


def suspend_vm(nr_vcpus=2, seed=3, extra_vm=False):
    """arm64 VM: vCPU 0 arms its timer 2 ms ahead and calls SYSTEM_SUSPEND (the others
    are STOPPED, so ReferenceVmm honours it); SPI 40 is routed to vCPU 1 and left pending
    there.  The resume entry syncs x0 (the context ID), then the guest idles on WFIs."""
    host = kw.Host(host_cpus=2, arch="arm64", seed=seed, trace_capacity=4096)
    vm = host.create_vm(nr_vcpus)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    for v in vm.vcpus[1:]:
        v.init(power_off=True)
    ops = [g.unmask(), g.set_handler(1 * US), g.timer_arm(TIMER_NS)]
    ops += g.psci(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0)          # entry patched below
    ops += [g.sync(0xBAD), g.end()]                           # only if SUSPEND returned
    resume = len(ops)
    ops += [g.sync_reg(0), g.loop([g.compute(20 * US), g.wfi()])]
    ops[3:8] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(resume), CTX)
    vm.vcpus[0].load(ops)
    vm.configure_irq(SPI, enabled=True, level=False)
    vm.route_spi(SPI, vcpu=1)
    other = None
    if extra_vm:
        # A second VM on the host whose vCPU.run() collects VM 0's exits as held.
        other = host.create_vm(1)
        other.vcpus[0].load([g.loop([g.compute(7 * US), g.sync(1)])])
    vm.vmm = RecordingVmm()
    vm.vmm.attach(vm)
    return host, vm, other


def start_suspend(vm):
    """Run until vCPU 0 is SUSPENDED, then raise the SPI (pending on STOPPED vCPU 1)."""
    vm.run(200 * US)
    assert vm.vcpus[0].get_mp_state() == MpState.SUSPENDED
    assert vm.vmm.suspends == 1 and vm.vmm.denials == 0
    vm.irq_line(SPI, 1)
    vm.irq_line(SPI, 0)
    st_ = vm.vcpus[1].irq_state(SPI)
    assert st_["pending"] and st_["target"] == 1     # pending, on the STOPPED vCPU 1


def wakeup_and_resume(vm):
    """(WAKEUP time, resume SYNC time) from the policy's log; checks what they carry."""
    events = vm.vmm.system_events()
    assert [e[:2] for e in events] == [(0, SystemEventType.SUSPEND),
                                       (0, SystemEventType.WAKEUP)]
    wake_t = events[1][2]
    syncs = vm.vmm.syncs()
    assert syncs and syncs[0][:2] == (0, CTX), "the resume did not sync the context ID"
    assert vm.vmm.resumes == 1 and vm.vmm.resume_latency_ns == [wake_t - events[0][2]]
    return wake_t, syncs[0][2]


def test_suspended_vm_migrates_and_wakes_on_its_timer():
    end = 4 * MS
    host0, vm0, _ = suspend_vm()
    start_suspend(vm0)
    vm0.run(end)
    wake_t, sync_t = wakeup_and_resume(vm0)
    assert TIMER_NS <= wake_t < TIMER_NS + 50 * US     # the timer, not the SPI, woke it
    want = observe(host0)

    host1, vm1, _ = suspend_vm()
    start_suspend(vm1)
    vm1.run(1 * MS)                                    # suspended, timer armed
    cval = vm1.vcpus[0].timer_state()["cval"]
    assert vm1.vcpus[0].get_mp_state() == MpState.SUSPENDED
    assert vm1.vcpus[0].thread_state == "BLOCKED"
    snap = vm1.snapshot()

    vm2 = kw.VM.restore(snap, vmm_classes=RECORDING)
    v0, v1 = vm2.vcpus
    assert v0.get_mp_state() == MpState.SUSPENDED and v1.get_mp_state() == MpState.STOPPED
    assert v0.thread_state == "BLOCKED"
    assert v0.timer_state() == vm1.vcpus[0].timer_state() and cval <= wake_t
    assert v1.irq_state(SPI)["pending"] and v1.irq_state(SPI)["target"] == 1
    assert isinstance(vm2.vmm, RecordingVmm) and vm2.vmm.vm is vm2
    assert vm2.vmm._pending == {0: [vm2.code_address(10), CTX, vm1.vmm.log[0][4]]}
    vm2.run(end)
    assert wakeup_and_resume(vm2) == (wake_t, sync_t)
    assert v1.get_mp_state() == MpState.STOPPED and v1.irq_state(SPI)["pending"]
    assert observe(vm2.host) == want
    vm1.run(end)
    assert vm1.snapshot() == vm2.snapshot()


def test_custom_policy_class_must_be_named_at_restore():
    host, vm, _ = suspend_vm()
    start_suspend(vm)
    snap = vm.snapshot()
    qual = RecordingVmm.__qualname__
    with pytest.raises(kw.SnapshotError, match=qual) as exc:
        kw.VM.restore(snap)
    assert "vmm_classes" in str(exc.value)
    with pytest.raises(kw.SnapshotError, match=qual):
        pickle.loads(pickle.dumps(vm))             # unpickling cannot name it either
    with pytest.raises(kw.SnapshotError, match=qual):
        kw.Host.restore(snap, vmm_classes={"elsewhere:RecordingVmm": RecordingVmm})
    assert isinstance(kw.Host.restore(snap, vmm_classes=RECORDING).vms[0].vmm, RecordingVmm)


def test_every_cut_across_the_wake_and_resume_keeps_the_resume():
    """Snapshot/restore at every event boundary (and between them) from just before the
    timer fires until after the resumed guest's sync: a chain of restores that must end
    exactly where the uncut run does."""
    end = 3 * MS
    host0, vm0, _ = suspend_vm()
    start_suspend(vm0)
    cval = vm0.vcpus[0].timer_state()["cval"]
    vm0.run(end)
    wake_t, sync_t = wakeup_and_resume(vm0)
    assert cval <= wake_t < sync_t
    want, want_bytes = observe(host0), host0.snapshot()

    # The instants at which something happens in the window (the timer firing, the
    # wake-up, the WAKEUP exit, the resume, the sync): every traced halt/wake and every
    # exit, each cut on both sides, plus a 250 ns grid over the window.
    window = (cval - 2 * US, sync_t + 30 * US)
    marks = {int(r["ts"]) for r in vm0.trace_records()} | {x[4] for x in vm0.vmm.log}
    cuts = set(range(window[0], window[1], 250))
    for m in marks:
        if window[0] <= m <= window[1]:
            cuts |= {m - 1, m, m + 1}
    cuts = sorted(cuts)
    assert wake_t in cuts and sync_t in cuts

    host, vm, _ = suspend_vm()
    start_suspend(vm)
    vm.run(window[0])
    resumed_at = None
    for t in cuts:
        vm.run(t)
        snap = host.snapshot()
        host = kw.Host.restore(snap, vmm_classes=RECORDING)
        vm = host.vms[0]
        assert host.snapshot() == snap
        st0 = vm.vcpus[0].get_mp_state()
        if t <= wake_t:
            assert st0 == MpState.SUSPENDED and vm.vmm.resumes == 0, t
        else:
            assert st0 == MpState.RUNNABLE and vm.vmm.resumes == 1, t
            resumed_at = resumed_at or t
    assert resumed_at == wake_t + 1
    vm.run(end)
    assert wakeup_and_resume(vm) == (wake_t, sync_t)
    assert observe(host) == want
    assert host.snapshot() == want_bytes


def test_a_held_wakeup_exit_survives_the_snapshot():
    """The WAKEUP exit made while another VM's vCPU.run() waited is held for the policy;
    a snapshot taken then still resumes the guest, at the same times."""
    end = 3 * MS
    host0, vm0, other0 = suspend_vm(extra_vm=True)
    start_suspend(vm0)
    vm0.run(end)
    wake_t, sync_t = wakeup_and_resume(vm0)

    host, vm, other = suspend_vm(extra_vm=True)
    start_suspend(vm)
    vm.run(wake_t - 5 * US)
    while vm.vcpus[0]._held is None:
        ex = other.vcpus[0].run()                  # VM 1's vCPU; VM 0's exits are held
        assert ex.reason == ExitReason.MMIO
        assert host.now < wake_t + 20 * US
    held = vm.vcpus[0]._held
    assert held["type"] == SystemEventType.WAKEUP and held["time"] == wake_t
    assert vm.vcpus[0].get_mp_state() == MpState.SUSPENDED and vm.vmm.resumes == 0
    snap = host.snapshot()
    copies = [kw.Host.restore(snap, vmm_classes=RECORDING),
              kw.Host.restore(bytearray(snap), vmm_classes=RECORDING)]
    vm.run(end)                                    # the policy gets the held WAKEUP first
    held_wake, held_sync = wakeup_and_resume(vm)
    assert held_wake == wake_t and held_sync != sync_t   # the resume waited for userspace
    for restored in copies:
        rvm = restored.vms[0]
        assert rvm.vcpus[0]._held == held
        rvm.run(end)
        assert wakeup_and_resume(rvm) == (held_wake, held_sync)
        assert rvm.vcpus[0].get_mp_state() == MpState.RUNNABLE
        assert observe(restored) == observe(host)
        assert restored.snapshot() == host.snapshot()


# == 3. bad files =============================================================================

@pytest.fixture(scope="module")
def tiny():
    """A small valid snapshot (one arm64 vCPU, trace off)."""
    vm = kw.VM(arch="arm64", nr_vcpus=1, seed=2, trace_capacity=0)
    vm.vcpus[0].load([g.loop([g.compute_exp(20 * US), g.wfi()])])
    vm.set_tick(1 * MS)
    vm.run(3 * MS)
    return vm.snapshot()


@pytest.fixture(scope="module")
def queued():
    """A host snapshot with a run queue: 3 x86 vCPUs on one host CPU, one queued."""
    host = small_host("ipi-storm", 4, 1, seed=2, trace_capacity=64)
    for _ in range(200):
        host.run(host.now + 37 * US)
        snap = host.snapshot()
        h, b = unframe(snap)
        if records(h, b, "cpus")["rq_len"][0] >= 2:
            return snap
    raise AssertionError("no run queue of 2 found")


@pytest.fixture(scope="module")
def storm():
    """A snapshot of an arm64 scenario with device sources and a VMM policy."""
    return {name: (lambda h: (h.run(2 * MS), h.snapshot())[1])(small_host(name, 8, 2, 1, 64))
            for name in ("irq-storm", "suspend-cycle", "default")}


def refuses(data, *words, **kwargs):
    """Host.restore(data) raises SnapshotError whose message has every word in ``words``."""
    with pytest.raises(kw.SnapshotError) as exc:
        kw.Host.restore(data, **kwargs)
    msg = str(exc.value).lower()
    for w in words:
        assert w.lower() in msg, f"{w!r} not in {str(exc.value)!r}"
    return str(exc.value)


def test_valid_snapshots_restore(tiny, queued, storm):
    for snap in (tiny, queued, *storm.values()):
        host, header = restore_host(snap)
        assert host_to_bytes(host, header["vm_index"], header["run"]) == snap
        assert reframe(snap) == snap                    # the helpers frame as the writer does


def test_truncated_at_every_length(tiny):
    assert len(tiny) < 4096
    for n in range(len(tiny)):
        msg = refuses(tiny[:n], "truncated")
        assert str(n) in msg


def test_every_single_bit_flip_is_refused(tiny):
    hlen = S._PREFIX.unpack_from(tiny, 0)[2]
    counts = {}
    buf = bytearray(tiny)
    for i in range(len(tiny)):
        for bit in range(8):
            buf[i] ^= 1 << bit
            with pytest.raises(kw.SnapshotError) as exc:
                S.parse(bytes(buf))
            buf[i] ^= 1 << bit
            msg = str(exc.value)
            if i < 8:
                want = ("magic",)
            elif i < 12:
                want = ("version",)
            elif i < 24:
                want = ("truncated", "oversized", "absurd")
            elif i < 32:                                # the inflated size
                want = ("absurd", "checksum")
            else:
                want = ("checksum",)
            assert any(w in msg for w in want), (i, bit, msg)
            region = "prefix" if i < 32 else "header" if i < 32 + hlen else \
                "checksum" if i >= len(tiny) - 16 else "body"
            counts[region] = counts.get(region, 0) + 1
    assert set(counts) == {"prefix", "header", "body", "checksum"}
    assert bytes(buf) == tiny


def test_random_bit_flips_of_a_larger_snapshot(storm):
    snap = storm["irq-storm"]
    rng = random.Random(7)
    for _ in range(2000):
        buf = bytearray(snap)
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
        with pytest.raises(kw.SnapshotError):
            kw.Host.restore(bytes(buf))


def test_wrong_magic_and_unknown_version(tiny):
    refuses(b"NOTASNAP" + tiny[8:], "magic")
    refuses(b"\0" * 100, "magic")
    header, body = unframe(tiny)
    for v in (0, 3, 7, 2**32 - 1):
        msg = refuses(frame(header, body, version=v), "version")
        assert str(v) in msg
    # A valid frame that is not ours at all.
    refuses(frame(header, body, magic=b"KVMWSNAQ"), "magic")


def test_absurd_declared_sizes(tiny):
    header, body = unframe(tiny)
    _, _, hlen, blen, raw = S._PREFIX.unpack_from(tiny, 0)
    rest = tiny[S._PREFIX.size:]
    for h, b, word in ((hlen, 2**60, "absurd body length"), (2**31, blen, "absurd header"),
                       (hlen, 2**40 - 1, "truncated"), (hlen + 1, blen, "truncated"),
                       (hlen, blen - 1, "oversized")):
        refuses(S._PREFIX.pack(S.MAGIC, S.FORMAT_VERSION, h, b, raw) + rest, word)
    # Behind a valid checksum: the header declares an absurd inflated size.
    for size in (2**60, -1, len(body) + 1, len(body) - 1, 0, "big", None, 1.5):
        h2 = json.loads(json.dumps(header))
        h2["body"]["size"] = size
        refuses(frame(h2, body, fix_size=False), "body")
    # An array that claims more than the body holds.
    for field, value in (("nbytes", 2**60), ("offset", 2**60), ("offset", -8), ("offset", 4),
                         ("shape", [2**62]), ("shape", [-1]), ("shape", [1, 2, 3])):
        h2 = json.loads(json.dumps(header))
        h2["engine"]["arrays"]["threads"][field] = value
        refuses(frame(h2, body), "array threads")


def test_body_that_does_not_inflate(tiny):
    header, body = unframe(tiny)
    refuses(frame(header, body, packed=b"\x78\x01garbage-not-zlib"), "inflate")
    packed = zlib.compress(bytes(body), 1)
    refuses(frame(header, body, packed=packed[:-5]), "inflate")          # cut stream
    refuses(frame(header, body, packed=packed + b"tail"), "inflate")     # data after it
    refuses(frame(header, body[:-8], packed=packed), "body")             # size differs
    bomb = zlib.compress(b"\0" * (8 << 20), 9)                           # 8 MiB of zeros
    refuses(frame(header, body, packed=bomb), "inflate")


def logical(data, header_edit=None, body_edit=None):
    return reframe(data, header_edit, body_edit)


def set_path(path, value):
    def edit(h):
        node = h
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def del_path(path):
    def edit(h):
        node = h
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return edit


def more_vcpus(h):
    """The header's VM has a vCPU more than the engine's arrays (its thread would be
    outside them: the first run used to write past the thread array)."""
    h["vms"][0]["nr_vcpus"] += 1
    h["vms"][0]["vcpus"].append({"loaded": True, "started": False, "held": None})


def test_header_logical_corruption(tiny, storm):
    sc = storm["suspend-cycle"]
    cases = [
        (set_path(["engine", "scalars", "now"], -1), ("scalar now",)),
        (set_path(["engine", "scalars", "now"], 2**64), ("scalar now",)),
        (set_path(["engine", "scalars", "seq"], "12"), ("scalar seq",)),
        (set_path(["engine", "scalars", "events"], 1.5), ("scalar events",)),
        (set_path(["engine", "scalars", "halts"], None), ("scalar halts",)),
        (set_path(["engine", "scalars", "tcount"], 3), ("trace",)),
        (del_path(["engine", "scalars", "now"]), ("missing key", "now")),
        (del_path(["engine", "arrays", "heap"]), ("missing key", "heap")),
        (del_path(["vms"]), ("missing key", "vms")),
        (del_path(["host"]), ("missing key", "host")),
        (del_path(["body"]), ("missing key", "body")),
        (set_path(["engine", "struct_sizes", "thread_t"], 289), ("structure sizes",)),
        (set_path(["engine", "struct_sizes"], {}), ("structure sizes",)),
        (set_path(["engine", "arrays", "threads", "dtype"], "u8"), ("array threads", "dtype")),
        (set_path(["engine", "arrays", "stats", "dtype"], "u1"), ("array stats", "dtype")),
        (set_path(["engine", "arrays", "stats", "dtype"], "f8"), ("array stats", "dtype")),
        (set_path(["engine", "arrays", "exitq", "dtype"], "u1"), ("array exitq", "dtype")),
        (set_path(["engine", "arrays", "threads", "shape"], "abc"), ("array threads",)),
        (set_path(["engine", "arrays", "threads", "offset"], "0"), ("offset", "integer")),
        (set_path(["engine", "arrays", "threads", "offset"], float("inf")), ("offset",)),
        (set_path(["host", "arch"], "riscv"), ("arch",)),
        (set_path(["host", "engine"], "reference"), ("engine",)),
        (set_path(["host", "host_cpus"], 7), ("host cpus",)),
        (set_path(["host", "host_cpus"], "2"), ("host configuration",)),
        (set_path(["host", "host_cpus"], 0), ("host configuration",)),
        (set_path(["host", "seed"], -5), ("host configuration",)),
        (set_path(["host", "costs"], ["vm_exit_ns"]), ("host configuration",)),
        (set_path(["host", "costs"], {"warp_ns": 1}), ("host configuration",)),
        (set_path(["host", "costs", "vm_exit_ns"], -1), ("host configuration",)),
        (set_path(["host"], 5), ()),
        (set_path(["vms"], {}), ("vms",)),
        (set_path(["vms"], [1]), ("vms",)),
        (set_path(["vms"], []), ("array sizes",)),
        (set_path(["run"], [1, 2]), ("run",)),
        (set_path(["vm_index"], "0"), ("vm_index",)),
        (set_path(["vms", 0, "nr_vcpus"], 2), ("vcpu",)),
        (set_path(["vms", 0, "nr_vcpus"], 0), ("nr_vcpus",)),
        (set_path(["vms", 0, "nr_vcpus"], -3), ("nr_vcpus",)),
        (set_path(["vms", 0, "nr_vcpus"], 10**9), ("nr_vcpus",)),
        (set_path(["vms", 0, "nr_vcpus"], "1"), ("nr_vcpus", "integer")),
        (set_path(["vms", 0, "vcpus"], []), ("vcpu records",)),
        (lambda h: h["vms"][0]["vcpus"].append(dict(h["vms"][0]["vcpus"][0])),
         ("vcpu records",)),
        (more_vcpus, ("array sizes",)),
        (del_path(["vms", 0, "vmm"]), ("missing key", "vmm")),
        (set_path(["vms", 0, "nr_spis"], 3), ("spis",)),
        (set_path(["vms", 0, "memory_size"], -1), ("memory",)),
        (set_path(["vms", 0, "memory_size"], 2**80), ("memory",)),
        (set_path(["vms", 0, "exits"], -1), ("exit count",)),
        (set_path(["vms", 0, "tick_ns"], 5), ("tick",)),
        (set_path(["vms", 0, "halt_poll_cap"], 5), ("halt-poll",)),
        (set_path(["vms", 0, "halt_poll_cap"], 2**40), ("halt_poll_cap",)),
        (set_path(["vms", 0, "suspend_cap"], True), ("suspend",)),
        (set_path(["vms", 0, "vcpus", 0, "held"], {"reason": 6}), ("missing key",)),
        (set_path(["vms", 0, "vcpus", 0, "held"],
                  {"reason": 6, "type": 0, "ndata": 0, "data0": 0, "ucall": 1,
                   "value": 0, "time": 1}), ("held exit",)),
        (set_path(["vms", 0, "vcpus", 0, "held"], 7), ()),
        (set_path(["vms", 0, "vmm"], "kvmwake.vmm:Vmm"), ("policy record",)),
        (set_path(["vms", 0, "vmm", "class"], 3), ("policy record",)),
        (set_path(["vms", 0, "vmm", "class"], "os:system"), ("os:system",)),
        (set_path(["vms", 0, "vmm", "class"], "kvmwake.vmm:U64"), ("kvmwake.vmm:U64",)),
        (set_path(["vms", 0, "vmm", "state"], [1]), ("policy state",)),
        (set_path(["vms", 0, "vmm", "state"], {"handle_exit": 1}), ("handle_exit", "method")),
        (set_path(["vms", 0, "vmm", "state"], {"attach": None}), ("attach", "method")),
        (set_path(["vms", 0, "vmm", "state"], {"__class__": 1}), ("policy state",)),
        (set_path(["vms", 0, "vmm", "state"], {"vm": 1}), ("policy state",)),
    ]
    for edit, words in cases:
        refuses(logical(tiny, edit), *words)
    # ReferenceVmm's own state (the suspend-cycle scenario's policy).
    for edit, words in [
        (set_path(["vms", 0, "vmm", "state", "suspends"], -1), ("policy state",)),
        (set_path(["vms", 0, "vmm", "state", "pending"], [[0, 1, 2]]), ("policy state",)),
        (set_path(["vms", 0, "vmm", "state", "pending"], [[0, -1, 2, 0]]), ("pending resume",)),
        (set_path(["vms", 0, "vmm", "state", "pending"], [[9, 0, 0, 0]]), ("pending resume",)),
        (set_path(["vms", 0, "vmm", "state", "pending"], [[0, 2**64, 0, 0]]),
         ("pending resume",)),
        (set_path(["vms", 0, "vmm", "state", "pending"], [[0, 0, 0, 10**15]]),
         ("pending resume",)),
        (set_path(["vms", 0, "vmm", "state", "resume_latency_ns"], ["x"]), ("policy state",)),
        (del_path(["vms", 0, "vmm", "state", "off"]), ("policy state",)),
    ]:
        refuses(logical(sc, edit), *words)


def test_header_that_is_not_a_json_object(tiny):
    header, body = unframe(tiny)
    for raw, word in ((b"[1, 2]", "not an object"), (b'"text"', "not an object"),
                      (b"null", "not an object"), (b"12", "not an object"),
                      (b"{", "unreadable"), (b"", "unreadable"), (b"\xff\xfe{}", "unreadable"),
                      (b"[" * 100_000 + b"]" * 100_000, "unreadable"),
                      (json.dumps(header).encode() + b" trailing", "unreadable"),
                      (b"{}", "missing key")):
        refuses(frame(raw, body), word)


def test_body_logical_corruption(tiny, queued, storm):
    header, body = unframe(tiny)
    d = header["engine"]["arrays"]

    def shrink(name, by):
        """Array ``name`` shorter by ``by`` bytes (its last ones), the header saying so
        and the arrays after it laid out anew, end to end as the writer does."""
        def edit(h, b):
            arrays = h["engine"]["arrays"]
            parts = {n: bytes(b[a["offset"]:a["offset"] + a["nbytes"]])
                     for n, a in arrays.items()}
            a = arrays[name]
            a["nbytes"] -= by
            a["shape"][0] -= by // np.dtype(S._DTYPES[a["dtype"]]).itemsize
            parts[name] = parts[name][:a["nbytes"]]
            out = bytearray()
            for n in S._ARRAYS:
                out += b"\0" * ((-len(out)) % 8)
                arrays[n]["offset"] = len(out)
                out += parts[n]
            b[:] = out
        return edit

    for name, by, words in (("threads", THREAD_DTYPE.itemsize, ("array sizes",)),
                            ("threads", 8, ("array threads", "whole number")),
                            ("irqs", VIRQ_DTYPE.itemsize, ("disagree",)),
                            ("gics", d["gics"]["nbytes"], ("disagree",)),
                            ("exitq", 4, ("disagree",)),
                            ("lat", 8, ("latency buckets",)),
                            ("cpus", CPU_DTYPE.itemsize, ("host cpus",)),
                            ("heap", 8, ("array heap", "whole number")),
                            ("ops", OP_DTYPE.itemsize, ("program",))):
        refuses(logical(tiny, body_edit=shrink(name, by)), *words)

    def stats_shape(h, b):
        a = h["engine"]["arrays"]["stats"]
        a["shape"] = [a["shape"][0] * 5, a["shape"][1] // 5]
    refuses(logical(tiny, body_edit=stats_shape), "stats per vcpu")

    def field(name, i, f, value, data=tiny):
        def fn(recs):
            recs[f][i] = value
        return edit_records(data, name, fn)

    refuses(field("threads", 0, "pcpu", 5), "thread 0", "out of range")
    refuses(field("threads", 0, "vm", 3), "thread 0", "out of range")
    refuses(field("threads", 0, "vcpu_id", 1), "thread 0", "out of range")
    refuses(field("threads", 0, "state", 9), "thread 0", "unknown value")
    refuses(field("threads", 0, "mp_state", 77), "thread 0", "unknown value")
    refuses(field("threads", 0, "prog_n", 10**6), "thread 0", "program")
    refuses(field("threads", 0, "pc", 10**6), "thread 0", "program")
    refuses(field("threads", 0, "rq_next", 7), "thread 0", "run-queue link")
    refuses(field("irqs", 0, "cur_irq", 5000), "thread 0", "interrupt")
    refuses(field("vms", 0, "nr_vcpus", 2), "vcpus", "thread count")
    refuses(field("vms", 0, "first", 1), "vm 0")
    refuses(field("vms", 0, "nr_spis", 2000), "vm 0")
    refuses(field("vms", 0, "psci_version", 3), "psci version")
    refuses(field("vms", 0, "vcpu_features", 1 << 4), "vm 0", "features")
    refuses(field("vms", 0, "features_set", 2), "vm 0", "features")
    refuses(field("threads", 0, "pstate", 0x9), "thread 0", "pstate")
    refuses(field("threads", 0, "pstate", 0x85), "thread 0", "pstate")
    refuses(field("cpus", 0, "cur", 9), "host cpu 0", "out of range")
    refuses(field("cpus", 0, "rq_len", 1), "host cpu 0", "run queue")
    refuses(field("heap", 0, "who", 12345), "event 0", "does not exist")
    refuses(field("heap", 0, "t", 0), "event 0", "time")
    refuses(field("heap", 0, "key", 9 << SEQ_BITS), "event 0", "class")
    refuses(field("ops", 0, "code", 99), "program", "unknown op code 99")
    refuses(field("ops", 1, "dist", 9), "program", "distribution")
    refuses(field("ops", 0, "arg", 3), "program", "loop")

    # The run queue of the 'queued' fixture: a cycle, a broken tail, a thread queued twice,
    # a queued thread whose state says it is blocked (this one used to crash the engine
    # at the first kick), and a live event the thread's state does not expect.
    h, b = unframe(queued)
    cpus, threads = records(h, b, "cpus"), records(h, b, "threads")
    head = int(cpus["rq_head"][0])
    tail = int(cpus["rq_tail"][0])

    def cycle(recs):
        recs["rq_next"][tail] = head
    refuses(edit_records(queued, "threads", cycle), "host cpu 0", "run queue")
    refuses(field("cpus", 0, "rq_tail", -1, data=queued), "host cpu 0", "run queue")
    refuses(field("cpus", 0, "rq_tail", head, data=queued), "host cpu 0", "run queue")
    refuses(field("cpus", 0, "cur", head, data=queued), "host cpu 0", "run queue")
    for state in (TS_BLOCKED, TS_USER, TS_RUNNING, TS_POLLING):
        refuses(field("threads", head, "state", state, data=queued), "run queue")
    cur = int(cpus["cur"][0])
    refuses(field("threads", cur, "state", TS_BLOCKED, data=queued), "host cpu 0")
    refuses(field("threads", head, "rq_next", -1, data=queued), "run queue")

    def stale_run_event(h, b):
        """A live EV_RUN for a queued thread (whose generation is made to match)."""
        heap, threads = records(h, b, "heap"), records(h, b, "threads")
        heap["key"][0] = (EV_RUN << SEQ_BITS) | (int(heap["key"][0]) & ((1 << SEQ_BITS) - 1))
        heap["who"][0] = head
        heap["gen"][0] = threads["gen"][head]
        store(h, b, "heap", heap)
    refuses(reframe(queued, edit_body=stale_run_event), "event 0", "does not expect")

    # A segment ending in a trap whose op is no trapping op (the op at the PC changed):
    # trap_op would carry it out as a GICD_IROUTER write and crash.
    host = small_host("ipi-storm", 4, 1, seed=2, trace_capacity=0)
    for _ in range(500):
        host.run(host.now + 13 * US)
        snap = host.snapshot()
        h, b = unframe(snap)
        threads, heap = records(h, b, "threads"), records(h, b, "heap")
        trapping = [int(heap["who"][i]) for i in range(len(heap))
                    if heap["key"][i] >> SEQ_BITS == EV_SEGMENT
                    and heap["gen"][i] == threads["gen"][heap["who"][i]]
                    and threads["cont"][heap["who"][i]] == CONT_TRAP]
        if trapping:
            break
    assert trapping
    pc = int(threads["pc"][trapping[0]])
    assert records(h, b, "ops")["code"][pc] == kw.model.Op.SGI
    for code in (kw.model.Op.END, kw.model.Op.WFI, kw.model.Op.COMPUTE):
        refuses(edit_records(snap, "ops", lambda r: r["code"].__setitem__(pc, code)),
                f"thread {trapping[0]}", "does not trap")

    # An interrupt handler's end with no interrupt in service (EOI of INTID -1).
    sc = storm["irq-storm"]
    h, b = unframe(sc)
    threads, irqs, heap = records(h, b, "threads"), records(h, b, "irqs"), records(h, b, "heap")
    live = [i for i in range(len(heap)) if heap["key"][i] >> SEQ_BITS == EV_SEGMENT
            and heap["gen"][i] == threads["gen"][heap["who"][i]]]
    assert live
    victim = int(heap["who"][live[0]])

    def eoi_without_irq(h, b):
        t, q = records(h, b, "threads"), records(h, b, "irqs")
        t["cont"][victim] = CONT_EOI
        q["cur_irq"][victim] = -1
        store(h, b, "threads", t)
        store(h, b, "irqs", q)
    refuses(reframe(sc, edit_body=eoi_without_irq), f"thread {victim}", "interrupt in service")
    refuses(field("irqs", victim, "sv_valid", 1, data=edit_records(
        sc, "irqs", lambda r: r["sv_cont"].__setitem__(victim, CONT_EOI))),
        f"thread {victim}", "interrupt")
    # A source with a bad INTID, a bad table range, a zero period.
    # The state timeline: a record of a thread that does not exist, records out of order.
    tl = small_host("ipi-storm", 4, 2, seed=3, trace_capacity=0, timeline=100)
    tl.run(2 * MS)
    tls = tl.snapshot()
    h, b = unframe(tls)
    assert h["engine"]["scalars"]["tlcount"] > 2
    from kvmwake.outputs.timeline import TIMELINE_DTYPE as tl_dtype
    assert tl_dtype.itemsize == h["engine"]["struct_sizes"]["tl_rec_t"]

    def timeline_edit(fn):
        def edit(h, b):
            d = h["engine"]["arrays"]["timeline"]
            recs = np.frombuffer(bytes(b[d["offset"]:d["offset"] + d["nbytes"]]),
                                 dtype=tl_dtype).copy()
            fn(recs)
            b[d["offset"]:d["offset"] + d["nbytes"]] = recs.tobytes()
        return reframe(tls, edit_body=edit)
    refuses(timeline_edit(lambda r: r["g"].__setitem__(0, 4)), "timeline record 0")
    refuses(timeline_edit(lambda r: r["t"].__setitem__(1, 0)), "timeline record 1")
    refuses(timeline_edit(lambda r: r["state"].__setitem__(0, 9)), "timeline record 0")
    refuses(logical(tls, set_path(["engine", "scalars", "tlcount"], 1)), "timeline")
    refuses(logical(tls, set_path(["engine", "scalars", "tlcap"], 1)), "timeline")

    refuses(field("srcs", 0, "intid", 5, data=sc), "interrupt source 0")
    refuses(field("srcs", 0, "intid", 2000, data=sc), "interrupt source 0")
    refuses(field("srcs", 0, "vm", 9, data=sc), "interrupt source 0")
    refuses(field("srcs", 0, "times_len", 2**63, data=sc), "interrupt source 0")
    refuses(field("srcs", 0, "times_off", 2**64 - 1, data=sc), "interrupt source 0")

    def trace_source_past_the_table(r):
        """A trace source whose time-table range wraps around 2**64 (it used to pass the
        check, and its second arrival read before the table)."""
        r["kind"][0], r["times_off"][0], r["times_len"][0] = 2, 2**64 - 2, 2
    refuses(edit_records(sc, "srcs", trace_source_past_the_table), "interrupt source 0")
    refuses(field("srcs", 0, "kind", 7, data=sc), "interrupt source 0")
    refuses(field("srcs", 0, "kind", 0, data=edit_records(
        sc, "srcs", lambda r: r["p0"].__setitem__(0, 0))), "interrupt source 0")
    # x86: an interrupt in service beyond the LAPIC's 256 vectors.
    refuses(field("irqs", 0, "cur_irq", 300, data=queued), "thread 0", "interrupt")
    # A program that fails validation against its VM (a wake target beyond the VM).
    def far_wake(r):
        assert r["code"][2] == kw.model.Op.SGI
        r["dist"][2], r["p0"][2] = kw.model.WakeTarget.VCPU, 100
    refuses(edit_records(queued, "ops", far_wake), "program", "vcpu 100")


def test_python_side_must_agree_with_the_engine():
    vm = kw.VM(arch="arm64", nr_vcpus=3, host_cpus=1, seed=6, trace_capacity=64)
    for i, v in enumerate(vm.vcpus):
        v.load([g.compute(1000 * (i + 1)), g.sync(i),
                g.loop([g.compute_exp(20 * US), g.wake_random_other(), g.wfi()])])
    vm.run(500)
    assert vm.vcpus[2].run().value == 2          # vCPUs 0 and 1 exited meanwhile: held
    snap = vm.snapshot()
    restored = kw.VM.restore(snap)
    assert [v._held is not None for v in restored.vcpus] == [True, True, False]
    assert restored.vcpus[1].run().value == 1

    def held_value(v):
        return set_path(["vms", 0, "vcpus", 0, "held", "value"], v)
    refuses(logical(snap, held_value(5)), "held exit")
    refuses(logical(snap, set_path(["vms", 0, "vcpus", 0, "held", "reason"], 99)), "held exit")
    refuses(logical(snap, set_path(["vms", 0, "vcpus", 2, "held"],
                                   {"reason": 6, "type": 0, "ndata": 0, "data0": 0,
                                    "ucall": 1, "value": 99, "time": 3000})), "held exit")
    # An exit record the dispatcher could not read, for a held exit...
    bad = edit_records(snap, "threads", lambda r: r["exit_ucall"].__setitem__(0, 9))
    refuses(logical(bad, set_path(["vms", 0, "vcpus", 0, "held", "ucall"], 9)), "exit")
    # ...a vCPU said to be loaded that has no program in the engine.
    vm2 = kw.VM(arch="x86", nr_vcpus=2, seed=1)
    vm2.vcpus[0].load([g.loop([g.compute(10 * US), g.wfi()])])
    vm2.run(100 * US)
    s2 = vm2.snapshot()
    kw.VM.restore(s2).run(200 * US)
    refuses(logical(s2, set_path(["vms", 0, "vcpus", 1, "loaded"], True)), "no program")
    # A VM snapshot restores its VM; a host snapshot is no VM's.
    h = kw.Host(host_cpus=1)
    h.create_vm(1)
    with pytest.raises(kw.SnapshotError, match="not a VM's"):
        kw.VM.restore(h.snapshot())
    with pytest.raises(kw.SnapshotError, match="not a VM's"):
        kw.VM.restore(logical(snap, set_path(["vm_index"], 5)))


def test_not_bytes_is_a_type_error_and_a_missing_file_a_snapshot_error(tiny, tmp_path):
    for bad in (None, 12, 1.5, ["KVMWSNAP"], {"a": 1}, object()):
        with pytest.raises(TypeError):
            kw.Host.restore(bad)
        with pytest.raises(TypeError):
            kw.VM.restore(bad)
    assert kw.VM.restore(memoryview(tiny)).snapshot() == tiny
    missing = tmp_path / "nope.kws"
    with pytest.raises(kw.SnapshotError, match="cannot read"):
        kw.Host.restore(missing)
    with pytest.raises(kw.SnapshotError, match="cannot read"):
        kw.Host.restore(str(missing))
    with pytest.raises(kw.SnapshotError, match="cannot read"):
        kw.VM.restore(tmp_path)                          # a directory
    empty = tmp_path / "empty.kws"
    empty.write_bytes(b"")
    with pytest.raises(kw.SnapshotError, match="truncated"):
        kw.Host.restore(empty)


# == 4. fuzzing ===============================================================================

INTERESTING = (0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 31, 32, 255, 256, 1023, 1024, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -2**63)
JUNK = (None, True, False, "", "x", "0", 1.5, -0.0, float("inf"), float("nan"), [], {}, [1, 2],
        {"a": 1}, [[0, 0, 0, 0]], 2**200)


def fuzz_corpus():
    """Small snapshots of every kind the fuzzer mutates."""
    out = []
    for name, t in (("ipi-storm", 2 * MS), ("default", 3 * MS), ("irq-storm", 1 * MS),
                    ("suspend-cycle", 3 * MS)):
        h = small_host(name, 8, 2, seed=1, trace_capacity=64)
        h.run(t)
        out.append(h.snapshot())
    host, vm, other = suspend_vm(extra_vm=True)
    start_suspend(vm)
    vm.run(TIMER_NS - 1 * US)
    while vm.vcpus[0]._held is None:               # a held WAKEUP in the snapshot
        other.vcpus[0].run()
    out.append(host.snapshot())
    q = small_host("ipi-storm", 4, 1, seed=2, trace_capacity=0, timeline=40)
    q.run(1 * MS + 7)
    out.append(q.snapshot())
    return out


def _json_paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _json_paths(v, path + (i,))


def _mutate_header(rng, header):
    h = json.loads(json.dumps(header))
    paths = list(_json_paths(h))
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        path = rng.choice(paths)
        if not path:
            continue
        parent = h
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            old = parent[key]
        except (KeyError, IndexError, TypeError):
            continue
        op = rng.randrange(6)
        if op == 0 and isinstance(old, int) and not isinstance(old, bool):
            parent[key] = old + rng.choice((-1, 1, -old - 1, old, 8, -8))
        elif op == 1:
            parent[key] = rng.choice(INTERESTING)
        elif op == 2:
            parent[key] = rng.choice(JUNK)
        elif op == 3:
            del parent[key]
        elif op == 4 and isinstance(parent, dict):
            parent[rng.choice(("extra", "x", "__class__", "log", "handle_exit", key + "_"))] = \
                rng.choice(INTERESTING + JUNK)
        elif op == 5 and isinstance(old, list) and old:
            old.append(rng.choice(old)) if rng.random() < 0.5 else old.pop(rng.randrange(len(old)))
        else:
            parent[key] = rng.choice(INTERESTING)
    return h


def _mutate_bytes(rng, buf: bytearray, lo=0):
    """One random byte-level mutation of buf[lo:] in place."""
    n = len(buf)
    if n <= lo:
        buf += bytes([rng.randrange(256)])
        return
    op = rng.randrange(8)
    i = rng.randrange(lo, n)
    if op == 0:
        buf[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        for _ in range(rng.randrange(1, 9)):
            buf[rng.randrange(lo, n)] = rng.randrange(256)
    elif op == 2:
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    elif op == 3:
        del buf[i:i + rng.randrange(1, 65)]
    elif op == 4:
        del buf[i:]
    elif op == 5:
        j = rng.randrange(lo, n)
        block = buf[j:j + rng.randrange(1, 257)]
        buf[i:i] = block
    elif op == 6:
        v = rng.choice(INTERESTING) % (1 << 64)
        buf[i:i + 8] = struct.pack("<Q", v)[:max(0, min(8, n - i))]
    else:
        buf[i:i + rng.randrange(1, 33)] = bytes(min(32, n - i))


def _mutate_struct(rng, header, body):
    """Set one field of one engine struct record to an interesting value."""
    name = rng.choice(tuple(STRUCTS))
    d = header["engine"]["arrays"].get(name)
    dt = STRUCTS[name]
    if not d or d["nbytes"] < dt.itemsize:
        return
    recs = records(header, body, name)
    r = rng.randrange(len(recs))
    f = rng.choice([x for x in dt.names if x != "_pad"])
    sub = dt.fields[f][0]
    base = sub.base if sub.shape else sub
    info = np.iinfo(base)
    v = rng.choice(INTERESTING + (rng.randrange(-3, 40), int(np.ravel(recs[f][r])[0]) + 1,
                                  int(np.ravel(recs[f][r])[0]) - 1))
    v = (v - info.min) % (info.max - info.min + 1) + info.min
    if sub.shape:
        recs[f][r][rng.randrange(sub.shape[0])] = v
    else:
        recs[f][r] = v
    store(header, body, name, recs)


def mutate(rng, data: bytes, parsed) -> bytes:
    header, body = parsed
    kind = rng.random()
    if kind < 0.35:                                     # raw bytes: framing and checksum
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            _mutate_bytes(rng, buf)
        return bytes(buf)
    if kind < 0.55:                                     # the header, re-framed
        if rng.random() < 0.8:
            return frame(_mutate_header(rng, header), body, fix_size=rng.random() < 0.9)
        hj = bytearray(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        _mutate_bytes(rng, hj)
        return frame(bytes(hj), body)
    b = bytearray(body)                                 # the inflated body, re-framed
    r = rng.random()
    if r < 0.5:
        for _ in range(rng.choice((1, 1, 2, 4))):
            _mutate_struct(rng, header, b)
    elif r < 0.8:
        name = rng.choice(tuple(header["engine"]["arrays"]))
        a = header["engine"]["arrays"][name]
        if a["nbytes"]:
            i = a["offset"] + rng.randrange(a["nbytes"])
            b[i] = rng.randrange(256) if rng.random() < 0.7 else b[i] ^ (1 << rng.randrange(8))
    else:
        _mutate_bytes(rng, b)
    return frame(header, b, fix_size=rng.random() < 0.95)


def test_fuzz_ten_thousand_mutated_snapshots():
    """10,000 mutations (raw, header re-framed, body re-framed): each is refused with
    SnapshotError or restores and runs on (an EngineError, the engine's own clean refusal
    of a degenerate guest such as an interrupt storm, is allowed then); never a crash,
    another exception, or a memory blow-up."""
    rng = random.Random(20240611)
    corpus = fuzz_corpus()
    parsed = [unframe(s) for s in corpus]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = {"refused": 0, "restored": 0, "engine_error": 0}
    failures = []
    t0 = time.perf_counter()
    for i in range(10_000):
        k = rng.randrange(len(corpus))
        data = mutate(rng, corpus[k], parsed[k])
        try:
            host = kw.Host.restore(data, vmm_classes=RECORDING)
        except kw.SnapshotError as exc:
            assert str(exc)
            outcome["refused"] += 1
            continue
        except Exception as exc:                          # noqa: BLE001
            failures.append((i, k, "restore", repr(exc)))
            continue
        outcome["restored"] += 1
        try:
            host.run(host.now + 1 * MS)
            host.snapshot()
        except kw.EngineError:
            outcome["engine_error"] += 1
        except Exception as exc:                          # noqa: BLE001
            failures.append((i, k, "run", repr(exc)))
    elapsed = time.perf_counter() - t0
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"\nfuzz: {outcome} in {elapsed:.1f} s, peak RSS growth {growth_mb:.0f} MB")
    assert not failures, failures[:10]
    assert outcome["refused"] + outcome["restored"] == 10_000
    assert outcome["restored"] >= 500, outcome         # the run-on half is exercised
    assert growth_mb < 500


# == 5. the CLI ===============================================================================

def test_cli_snapshot_and_restore(tmp_path, capsys):
    snap, a, b = tmp_path / "s.kws", tmp_path / "a.json", tmp_path / "b.json"
    assert cli.main(["run", "ipi-storm", "--vcpus", "16", "--sim-ms", "5", "--snapshot-at", "2",
                     "--snapshot", str(snap), "--json", str(a), "-q"]) == 0
    assert snap.stat().st_size > 0
    assert cli.main(["run", "--restore", str(snap), "--json", str(b), "-q"]) == 0
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    for key in ("halts", "events", "stats", "exits", "scenario", "vcpus", "sim_ns", "seed",
                "wake_latency_ns", "arch"):
        assert ja[key] == jb[key], key
    # The snapshot is the run's state at 2 ms.
    host = kw.Host.restore(snap)
    assert host.now == 2 * MS
    direct = small_host("ipi-storm", 16, 16, 0, trace_capacity=0)
    direct.run(5 * MS)
    assert direct.halts == ja["halts"] and direct.events == ja["events"]
    # --restore with a later --sim-ms runs on past the saved end.
    assert cli.main(["run", "--restore", str(snap), "--sim-ms", "6", "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sim_ns"] == 6 * MS and out["halts"] > ja["halts"]


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.kws"
    bad.write_bytes(b"KVMWSNAP" + b"\0" * 64)
    for argv in (["run", "--restore", str(bad)],
                 ["run", "--restore", str(tmp_path / "missing.kws")],
                 ["run", "ipi-storm", "--vcpus", "4", "--sim-ms", "1", "--snapshot-at", "0.5"],
                 ["run", "ipi-storm", "--vcpus", "4", "--sim-ms", "1",
                  "--snapshot", str(tmp_path / "x.kws")],
                 ["run", "ipi-storm", "--vcpus", "4", "--sim-ms", "1", "--snapshot-at", "3",
                  "--snapshot", str(tmp_path / "y.kws")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "kvmwake: error:" in err and "Traceback" not in err, (argv, err)
    # A snapshot whose run record is missing needs --sim-ms.
    h = small_host("ipi-storm", 4, 2, 0, 0)
    h.run(1 * MS)
    h.save(tmp_path / "norun.kws")
    assert cli.main(["run", "--restore", str(tmp_path / "norun.kws")]) == 2
    assert "--sim-ms" in capsys.readouterr().err
    assert cli.main(["run", "--restore", str(tmp_path / "norun.kws"), "--sim-ms", "2",
                     "-q", "--no-out"]) == 0
    # ...and through the real entry point.
    env = _child_env()
    proc = subprocess.run([sys.executable, "-m", "kvmwake", "run", "--restore", str(bad)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "kvmwake: error:" in proc.stderr


# == 6. the reference engine, module parameters at restore ====================================

def test_reference_engine_cannot_be_snapshotted():
    host = kw.Host(host_cpus=2, engine="reference")
    vm = host.create_vm(2)
    for call in (host.snapshot, vm.snapshot, lambda: pickle.dumps(host),
                 lambda: pickle.dumps(vm), lambda: host.save(os.devnull)):
        with pytest.raises(kw.SnapshotError, match="core engine"):
            call()


def poll_host(seed=4):
    """Two arm64 VMs waking each other: VM 0 under the module's halt_poll_ns, VM 1 with
    KVM_CAP_HALT_POLL = 150 us."""
    host = kw.Host(host_cpus=8, arch="arm64", seed=seed, trace_capacity=0)
    host.halt_poll_ns = 200_000
    for i in range(2):
        vm = host.create_vm(4)
        for v in vm.vcpus:
            v.load([g.loop([g.compute_exp(20 * US), g.wake_random_other(), g.wfi()])])
        if i:
            vm.enable_cap(Cap.HALT_POLL, 150_000)
    return host


def attempts(vm):
    return int(vm.stats()["halt_attempted_poll"])


def test_restore_with_module_parameters():
    host = poll_host()
    t = 2 * MS
    host.run(t)
    while any(v.thread_state == "POLLING" for v in host.vms[0].vcpus):
        t += 1 * US                                    # a cut with no poll in progress
        host.run(t)
    snap = host.snapshot()
    before = [attempts(vm) for vm in host.vms]
    assert all(before)

    same = kw.Host.restore(snap)
    assert same.halt_poll_ns == 200_000
    off = kw.Host.restore(snap, halt_poll_ns=0)
    assert off.halt_poll_ns == 0
    assert off.vms[0].max_halt_poll_ns == 0 and off.vms[1].max_halt_poll_ns == 150_000
    host.run(8 * MS)
    same.run(8 * MS)
    off.run(t + 1 * MS)
    mid = [attempts(vm) for vm in off.vms]
    off.run(8 * MS)
    assert observe(same) == observe(host)
    assert off.halts > host.halts // 4
    # VM 0 follows the new module parameter: not one poll after the restore point...
    # (a halt in progress at the cut, blocked after a poll, counts its poll when it ends)
    assert attempts(off.vms[0]) - before[0] <= off.vms[0].nr_vcpus
    assert attempts(off.vms[0]) == mid[0]
    assert off.vms[0].stats()["halt_wakeup"] > host.vms[0].stats()["halt_wakeup"] // 4 > 0
    assert all(v.halt_poll_ns == 0 for v in off.vms[0].vcpus)
    # ...VM 1 keeps the ceiling it enabled, as after a migration.
    assert attempts(off.vms[1]) > before[1]
    assert max(v.halt_poll_ns for v in off.vms[1].vcpus) <= 150_000

    other = kw.Host.restore(snap, halt_poll_ns_grow=3, halt_poll_ns_grow_start=20_000,
                            halt_poll_ns_shrink=0)
    assert (other.halt_poll_ns, other.halt_poll_ns_grow, other.halt_poll_ns_grow_start,
            other.halt_poll_ns_shrink) == (200_000, 3, 20_000, 0)
    vm = kw.VM.restore(host.vms[1].snapshot(), halt_poll_ns=1234)
    assert vm.host.halt_poll_ns == 1234 and vm.max_halt_poll_ns == 150_000


def test_restore_with_unknown_or_bad_module_parameter():
    host = poll_host()
    host.run(1 * MS)
    snap = host.snapshot()
    with pytest.raises(TypeError, match="halt_poll_nsec"):
        kw.Host.restore(snap, halt_poll_nsec=0)
    with pytest.raises(TypeError, match="seed"):
        kw.VM.restore(host.vms[0].snapshot(), seed=3)
    with pytest.raises(ValueError):
        kw.Host.restore(snap, halt_poll_ns=-1)
    with pytest.raises(TypeError):
        kw.Host.restore(snap, halt_poll_ns="0")


# == 7. size and speed at 4,096 vCPUs =========================================================

def test_snapshot_size_and_speed_at_4096_vcpus(tmp_path):
    host, _, _ = scenarios.build("default", seed=1)
    assert sum(vm.nr_vcpus for vm in host.vms) == 4096
    host.run(5 * MS)
    t0 = time.perf_counter()
    snap = host.snapshot()
    t1 = time.perf_counter()
    restored = kw.Host.restore(snap)
    t2 = time.perf_counter()
    path = tmp_path / "big.kws"
    host.save(path)
    t3 = time.perf_counter()
    kw.Host.restore(path)
    t4 = time.perf_counter()
    per_vcpu = len(snap) / 4096
    print(f"\n4,096 vCPUs: snapshot {len(snap):,} bytes ({per_vcpu:.0f} B/vCPU); "
          f"snapshot() {1e3 * (t1 - t0):.1f} ms, restore {1e3 * (t2 - t1):.1f} ms, "
          f"save {1e3 * (t3 - t2):.1f} ms, restore from file {1e3 * (t4 - t3):.1f} ms")
    assert per_vcpu < 1024
    assert restored.snapshot() == snap
    restored.run(6 * MS)
    host.run(6 * MS)
    assert restored.snapshot() == host.snapshot()


# == restoring onto another host CPU count ========================================================

@pytest.mark.parametrize("name", ["ipi-storm", "default", "irq-storm", "suspend-cycle"])
@pytest.mark.parametrize("host_cpus", [1, 3, 16])
def test_restore_onto_another_cpu_count(name, host_cpus):
    h, _, _ = scenarios.build(name, vcpus=32, host_cpus=8)
    h.run(4_000_000)
    blob = h.snapshot()
    a = kw.Host.restore(blob, host_cpus=host_cpus)
    b = kw.Host.restore(blob, host_cpus=host_cpus)
    assert a.host_cpus == host_cpus
    assert [v.host_cpu for vm in a.vms for v in vm.vcpus] == \
        [g % host_cpus for g in range(32)]
    a.run(12_000_000)
    b.run(12_000_000)
    assert a.snapshot() == b.snapshot()                    # deterministic
    assert a.halts > h.halts                                # it goes on
    again = kw.Host.restore(a.snapshot())                   # and passes every check
    again.run(14_000_000)
    same = kw.Host.restore(blob, host_cpus=8)               # the same count: nothing moves
    same.run(12_000_000)
    direct = kw.Host.restore(blob)
    direct.run(12_000_000)
    assert same.snapshot() == direct.snapshot()


def test_threads_that_lose_their_cpu_are_preempted_and_share_it():
    vm = kw.VM(nr_vcpus=2, host_cpus=2, costs={"sched_slice_ns": 100_000})
    for v in vm.vcpus:
        v.load([g.loop([g.compute(1_000_000)])])
    vm.run(500_000)
    assert [v.thread_state for v in vm.vcpus] == ["RUNNING", "RUNNING"]
    moved = kw.VM.restore(vm.snapshot(), host_cpus=1)
    assert sorted(v.thread_state for v in moved.vcpus) == ["RUNNABLE", "RUNNING"]
    pcs = []
    for t in range(600_000, 3_000_000, 100_000):
        moved.run(t)
        pcs.append(tuple(moved.host._engine.thread_info(v._g)["state"] for v in moved.vcpus))
    assert len(set(pcs)) > 1                                # the slice alternates them


def test_a_polling_thread_that_loses_its_cpu_blocks():
    vm = kw.VM(nr_vcpus=2, host_cpus=2, costs={"wake_to_run_ns": 0})
    vm.enable_cap(kw.Cap.HALT_POLL, 1_000_000)
    # They wake each other; vCPU 0's poll window grows past vCPU 1's 300 us of work.
    vm.vcpus[0].load([g.loop([g.compute(50_000), g.wake(1), g.wfi()])])
    vm.vcpus[1].load([g.loop([g.compute(300_000), g.wake(0), g.wfi()])])
    for t in range(10_000, 5_000_000, 10_000):
        vm.run(t)
        if vm.vcpus[0].thread_state == "POLLING" and vm.vcpus[1].thread_state == "RUNNING":
            break
    else:
        pytest.fail("never caught vCPU 0 polling while vCPU 1 runs")
    moved = kw.VM.restore(vm.snapshot(), host_cpus=1)
    states = sorted(v.thread_state for v in moved.vcpus)
    assert "POLLING" not in states                           # single_task_running() is false
    moved.run(vm.host.now + 2_000_000)
    assert moved.vcpus[0].stats()["halt_poll_fail_ns"] > 0


def test_restore_onto_a_bad_cpu_count_is_refused():
    vm = kw.VM(nr_vcpus=2, host_cpus=2)
    blob = vm.snapshot()
    for bad in (0, -1, 1 << 21, "4", 2.0):
        with pytest.raises((ValueError, TypeError)):
            kw.Host.restore(blob, host_cpus=bad)


# -- issue 12: checksum-valid snapshots that the old loader accepted and then crashed on ----

def _heap_and_threads(data):
    header, body = unframe(data)
    return header, body, records(header, body, "heap"), records(header, body, "threads")


def _running_with_live_segment(data):
    """(thread, heap index) of a RUNNING thread and its live SEGMENT event."""
    _, _, heap, th = _heap_and_threads(data)
    for i, ev in enumerate(heap):
        g = int(ev["who"])
        if int(ev["key"]) >> SEQ_BITS == EV_SEGMENT and ev["gen"] == th["gen"][g] \
                and th["state"][g] == TS_RUNNING:
            return g, i
    return None


@pytest.fixture(scope="module")
def running():
    """A snapshot with a vCPU thread RUNNING a segment (its SEGMENT event live)."""
    host = small_host("ipi-storm", 4, 1, seed=3, trace_capacity=64)
    for _ in range(400):
        host.run(host.now + 13 * US)
        snap = host.snapshot()
        if _running_with_live_segment(snap):
            return snap
    raise AssertionError("no running thread found")


def test_issue12_1_running_thread_with_a_stale_event_is_refused(running):
    # The thread's generation moves on: its SEGMENT event is stale, nothing will end
    # its segment, and the next kick would run eoi() with no interrupt (-1).
    g, _ = _running_with_live_segment(running)
    bad = edit_records(running, "threads", lambda r: r["gen"].__setitem__(g, r["gen"][g] + 1))
    refuses(bad, f"thread {g}", "no live event")


def test_issue12_5_running_thread_without_event_or_with_a_past_segment_is_refused(running):
    g, i = _running_with_live_segment(running)
    # Its event made stale from the event's side.
    bad = edit_records(running, "heap", lambda r: r["gen"].__setitem__(i, r["gen"][i] + 7))
    refuses(bad, f"thread {g}", "no live event")
    # Its segment ended before the clock: slice_end's seg_end - t would underflow.
    now = unframe(running)[0]["engine"]["scalars"]["now"]
    for f, v in (("seg_end", now - 1), ("seg_gfrom", 2**63 + 5), ("seg_gto", (3 << 62) + 1)):
        bad = edit_records(running, "threads", lambda r: r[f].__setitem__(g, v))
        with pytest.raises(kw.SnapshotError, match=f"thread {g}"):
            kw.Host.restore(bad)
    # A slice armed with no slice event, and a time of its past in the future.
    bad = edit_records(running, "threads", lambda r: r["slice_armed"].__setitem__(g, 1))
    if not (records(*unframe(running), "threads")["slice_armed"][g]):
        refuses(bad, f"thread {g}", "slice")
    bad = edit_records(running, "threads", lambda r: r["run_start"].__setitem__(g, now + 1))
    refuses(bad, f"thread {g}", "future")


def test_issue12_2_spi_routes_of_intids_1020_to_1023_are_checked(tiny):
    header, body = unframe(tiny)
    d = header["engine"]["arrays"]["gics"]
    # spi_target[1024] (int32) follows the five 16-word bitmaps of gic_t.
    base = d["offset"] + 5 * 16 * 8
    for k in (1020, 1023):
        b = bytearray(body)
        b[base + 4 * k:base + 4 * k + 4] = struct.pack("<i", 7)
        refuses(frame(header, b), f"SPI {k}", "does not exist")
        b[base + 4 * k:base + 4 * k + 4] = struct.pack("<i", -5)
        refuses(frame(header, b), f"SPI {k}")


def test_issue12_3_sequence_numbers_that_reach_the_event_class_bits_are_refused(tiny):
    for seq in (2**56 - 1, 2**60, 2**64 - 1, (1 << 55) + 1):
        bad = logical(tiny, set_path(["engine", "scalars", "seq"], seq))
        refuses(bad, "sequence")
    # Just below the limit it is accepted; a run that reaches the limit stops with
    # a clear error instead of writing into the event class bits.
    host, _ = restore_host(logical(tiny, set_path(["engine", "scalars", "seq"],
                                                  kw.model.MAX_SEQ - 3)))
    with pytest.raises(kw.EngineError, match="sequence numbers ran out"):
        host.run(host.now + 5 * MS)
    ref = kw.reference.Engine("arm64", 1, 1)
    ref.seq = kw.model.MAX_SEQ
    with pytest.raises(kw.EngineError, match="sequence numbers ran out"):
        kw.reference.queue.heap_push(ref, 0, 0, 0, 0)


def test_issue12_4_started_is_recomputed_from_the_thread_state(running):
    g, _ = _running_with_live_segment(running)
    header, _ = unframe(running)
    vm_i, vid = 0, g
    while vid >= header["vms"][vm_i]["nr_vcpus"]:
        vid -= header["vms"][vm_i]["nr_vcpus"]
        vm_i += 1

    def unstart(h):
        h["vms"][vm_i]["vcpus"][vid]["started"] = False
    host, _ = restore_host(logical(running, unstart))
    vcpu = host.vms[vm_i].vcpus[vid]
    assert vcpu._started and vcpu._loaded          # the engine's state, not the header's
    # Loading a program into a vCPU inside KVM_RUN (here mid-segment) is refused, as
    # it is before a snapshot, instead of replacing the program under its PC.
    with pytest.raises(kw.KvmError, match="KVM_RUN"):
        vcpu.load([g_.compute(1000) for g_ in (g,)] if False else [kw.guest.compute(1000)])


def test_issue12_6_the_header_is_checked_before_inflating(tiny, monkeypatch):
    header, body = unframe(tiny)
    # A decompression bomb: 64 MiB of zeros, a few KiB compressed, which the
    # header claims as the program table; the counts cannot be checked for ops, so
    # this one goes to inflation, which stops at the declared size.
    bomb = 64 << 20
    h2 = json.loads(json.dumps(header))
    h2["body"]["size"] = bomb
    calls = []
    real = S._inflate
    monkeypatch.setattr(S, "_inflate", lambda p, n: calls.append(n) or real(p, n))
    # The inflated size declared in the frame must agree with the header's.
    refuses(frame(h2, body, fix_size=False), "body")
    assert calls == []
    # The header's arrays must end exactly where the body does.
    refuses(frame(h2, b"\0" * bomb, fix_size=False), "arrays end")
    assert calls == []
    # A frame whose inflated size is beyond what its compressed size can give.
    refuses(frame(header, body, raw=S.ZLIB_MAX_RATIO * 5000), "absurd inflated")
    # Per-vCPU arrays sized by the header's vCPU count, before inflating.
    h3 = json.loads(json.dumps(header))
    h3["engine"]["arrays"]["tlbase"]["shape"] = [bomb]
    h3["engine"]["arrays"]["tlbase"]["nbytes"] = bomb
    refuses(frame(h3, body, fix_size=False), "body")
    assert calls == []


def test_issue12_6_restore_from_dev_zero_ends_at_once():
    code = ("import kvmwake as kw\n"
            "try:\n    kw.Host.restore('/dev/zero')\n"
            "except kw.SnapshotError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=_child_env())
    assert out.returncode == 0 and "refused:" in out.stdout and "magic" in out.stdout, out


def test_issue12_6_version_1_is_still_read(tiny):
    header, body = unframe(tiny)
    h1 = dict(header)
    v1 = frame(h1, body, version=1)
    host, _ = restore_host(v1)
    assert host_to_bytes(host, header["vm_index"], header["run"]) == tiny


def test_issue12_7_a_clock_beyond_2_62_is_refused(tiny):
    header, body = unframe(tiny)
    now = header["engine"]["scalars"]["now"]
    delta = (1 << 62) + 1000 - now

    def later(h, b):
        h["engine"]["scalars"]["now"] += delta
        heap = records(h, b, "heap")
        heap["t"] += np.uint64(delta)
        store(h, b, "heap", heap)
        th = records(h, b, "threads")
        for f in ("seg_end", "seg_gfrom", "seg_gto"):
            th[f] += np.uint64(delta)
        store(h, b, "threads", th)
    refuses(logical(tiny, body_edit=later), "clock", "2**62")


def test_issue12_4_a_vcpu_with_a_held_exit_has_started_whatever_the_header_says():
    # Found by the fuzzer: "started" false on a vCPU whose WAKEUP exit is held made
    # the next run start it again, and the policy then met a vCPU inside KVM_RUN.
    import fuzz_snapshot
    snap = fuzz_snapshot._arm64_suspended()
    for value in (False, None, 0):
        def unstart(h, value=value):
            h["vms"][0]["vcpus"][0]["started"] = value
        if value is False:
            host, _ = restore_host(logical(snap, unstart))
            assert host.vms[0].vcpus[0]._started and host.vms[0].vcpus[0]._held
            host.run(host.now + 3 * MS)
            restore_host(host.snapshot())
        else:
            refuses(logical(snap, unstart), "boolean")
