"""A structure-aware snapshot fuzzer: decode a valid snapshot, change ONE field, re-encode
it with a valid checksum, and restore, run and snapshot it again in a child process.

Used by ``tests/test_snapshot_fuzz.py`` (a short run) and ``tools/fuzz_snapshots.py``
(long campaigns).  Everything is deterministic: case ``i`` of seed ``S`` is the same
mutation of the same seed state on every machine.

A mutation is one of:
* a header scalar of the engine (``now``, ``seq``, ring positions, module parameters),
* a field of the header's VM records (configuration, a vCPU's flags, a held exit's
  field), of the host configuration, or of an array's description,
* one field of one record of an engine array, by the structs' layouts
  (``STRUCTS``, checked against ``kvmwake._core.struct_sizes()``), or one element of
  a plain array (times, stats, latency histogram, exit queue, timeline bases).

The value is chosen for the field's type: boundaries (0, 1, -1, the maximum, powers
of two and their neighbours, the engine's limits), the old value plus or minus one,
a flipped bit, a count of the state (threads, VMs, CPUs, events), or random bits.

The outcome of a case (``run_case``): ``rejected`` (a clean SnapshotError),
``ran`` (restored, ran ``RUN_NS`` of virtual time, snapshotted, and that snapshot
restored), ``stopped`` (restored, and the run stopped with a clean EngineError that
also refuses the next snapshot: a stall or a storm), or ``broken`` (anything else
raised, the debug build's periodic check failing included: accepted then broken).  The parent adds ``crash`` (the child died of a signal) and ``hang`` (no
answer within the timeout).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
import zlib

import numpy as np

import kvmwake as kw
from kvmwake import guest as g
from kvmwake import scenarios
from kvmwake import snapshot as S
from kvmwake.uapi import Cap, MpState, PsciFn
from kvmwake.vmm import ReferenceVmm

US = 1_000
MS = 1_000_000
#: Virtual time each accepted case runs for.
RUN_NS = 2 * MS
#: Seconds a child may take for one case before it counts as a hang.
CASE_TIMEOUT = 60.0
#: Address space of a child (a missing bound shows as MemoryError, not a swapped host).
CHILD_MEMORY = 3 << 30

OUTCOMES = ("rejected", "ran", "stopped", "crash", "hang", "broken")

# -- the engine's structs (kvmwake/_core.pxd) ------------------------------------------------

THREAD_DTYPE = np.dtype(
    [(n, "<u8") for n in ("seg_end", "seg_gfrom", "seg_gto", "rem_end", "rem_gfrom", "rem_gto",
                          "run_start", "halt_start", "poll_end", "wake_ts", "rng_state",
                          "rng_inc", "cost_rng_state", "cost_rng_inc", "stall_t")]
    + [(n, "<i8") for n in ("vruntime", "deadline", "vlag", "vprot")]
    + [("exec_start", "<u8"), ("nr_migrations", "<u8")]
    + [("regs", "<u8", (31,))]
    + [(n, "<u8") for n in ("sp", "pstate", "pc_raw", "reset_pc", "reset_r0", "exit_data0",
                            "exit_value", "exit_time", "requests")]
    + [(n, "<u4") for n in ("exit_reason", "exit_type", "exit_ndata", "exit_ucall", "gen",
                            "run_gen", "halt_poll_ns", "prog", "pc", "vm",
                            "vcpu_id", "pcpu", "prog_n")]
    + [("rq_next", "<i4"), ("stall_n", "<u4"), ("aff_off", "<u4"), ("loops", "<u4", (4,))]
    + [(n, "u1") for n in ("state", "resume", "cont", "slice_armed", "do_poll", "has_prog",
                           "mp_state", "pc_valid", "sig_pending", "reset_pending",
                           "halt_kind", "on_rq", "sched_delayed", "aff_kind", "kind")]
    + [("_pad", "u1", (4,))]
    + [("poll_stop", "<u8"), ("poll_seq", "<u8")], align=True)
VIRQ_DTYPE = np.dtype([
    ("ap", "<u8", (16,)), ("irr", "<u8", (4,)), ("isr", "<u8", (4,)),
    ("timer_cval", "<u8"), ("handler_ns", "<u8"), ("sv_guest", "<u8"),
    ("priv_en", "<u4"), ("priv_act", "<u4"), ("priv_latch", "<u4"), ("priv_line", "<u4"),
    ("priv_level", "<u4"), ("timer_gen", "<u4"), ("timer_period", "<u4"), ("cur_irq", "<i4"),
    ("priv_prio", "u1", (32,)), ("pmr", "u1"), ("masked", "u1"), ("timer_ctl", "u1"),
    ("sv_cont", "u1"), ("sv_valid", "u1"), ("tpr", "u1"), ("handler_noiret", "u1"),
    ("_pad", "u1", (1,))], align=True)
VM_DTYPE = np.dtype([("tick_ns", "<u8"), ("first", "<u4"), ("nr_vcpus", "<u4"),
                     ("max_halt_poll_ns", "<u4"), ("tick_gen", "<u4"), ("override", "<u4"),
                     ("nr_spis", "<u4"), ("code_base", "<u8"), ("psci_version", "<u4"),
                     ("suspend_cap", "<u4"), ("vcpu_features", "<u4"),
                     ("features_set", "<u4")], align=True)
GIC_DTYPE = np.dtype([(n, "<u8", (16,)) for n in ("spi_en", "spi_act", "spi_latch", "spi_line",
                                                   "spi_level")]
                     + [("spi_target", "<i4", (1024,)), ("spi_mpidr", "<u4", (1024,)),
                        ("spi_prio", "u1", (1024,)), ("enabled", "<u4"), ("_pad", "<u4")],
                     align=True)
SOURCE_DTYPE = np.dtype([(n, "<u8") for n in ("p0", "p1", "rng_state", "rng_inc", "times_off",
                                               "times_len", "idx")]
                        + [(n, "<u4") for n in ("vm", "intid", "kind", "gen", "target",
                                                "_pad")], align=True)
CPU_DTYPE = np.dtype([("zero_v", "<i8"), ("sum_v", "<i8"), ("cur", "<i4"), ("rq_head", "<i4"),
                      ("rq_tail", "<i4"), ("rq_len", "<u4"), ("need_resched", "u1"),
                      ("_pad", "u1", (7,))], align=True)
EVENT_DTYPE = np.dtype([("t", "<u8"), ("key", "<u8"), ("who", "<u4"), ("gen", "<u4")])
TRACE_DTYPE = np.dtype([("ts", "<u8"), ("a", "<u8"), ("pid", "<u4"), ("cpu", "<u4"),
                        ("vcpu_id", "<u4"), ("b", "<u4"), ("kind", "u1"), ("flag", "u1"),
                        ("valid", "u1"), ("_pad", "u1", (5,))], align=True)
TL_DTYPE = np.dtype([("t", "<u8"), ("g", "<u4"), ("cpu", "<u4"), ("state", "u1"),
                     ("_pad", "u1", (7,))], align=True)
STRUCTS = {"threads": THREAD_DTYPE, "irqs": VIRQ_DTYPE, "vms": VM_DTYPE, "gics": GIC_DTYPE,
           "srcs": SOURCE_DTYPE, "cpus": CPU_DTYPE, "heap": EVENT_DTYPE,
           "ops": kw.model.OP_DTYPE, "trace": TRACE_DTYPE, "timeline": TL_DTYPE}
_STRUCT_NAMES = {"threads": "thread_t", "irqs": "virq_t", "vms": "vm_t", "gics": "gic_t",
                 "srcs": "source_t", "cpus": "cpu_t", "heap": "event_t", "ops": "op_t",
                 "trace": "trace_rec_t", "timeline": "tl_rec_t"}
#: Plain arrays: their elements are mutated one at a time.
PLAIN = ("times", "stats", "lat", "exitq", "tlbase", "aff", "costtab")


def check_layouts() -> None:
    """The struct mirrors above must match the engine (else mutations miss their fields)."""
    from kvmwake._core import struct_sizes
    sizes = struct_sizes()
    for name, dt in STRUCTS.items():
        if dt.itemsize != sizes[_STRUCT_NAMES[name]]:
            raise AssertionError(f"{name}: mirror of {dt.itemsize} bytes, the engine's "
                                 f"{_STRUCT_NAMES[name]} has {sizes[_STRUCT_NAMES[name]]}")


# -- framing -----------------------------------------------------------------------------------

def unframe(data: bytes):
    """(header dict, inflated body) of a valid snapshot."""
    _, _, hlen, blen, _raw = S._PREFIX.unpack_from(data, 0)
    header = json.loads(data[S._PREFIX.size:S._PREFIX.size + hlen])
    body = bytearray(zlib.decompress(data[S._PREFIX.size + hlen:S._PREFIX.size + hlen + blen]))
    return header, body


def frame(header: dict, body) -> bytes:
    """``header`` and ``body`` framed as the writer does, with a valid checksum (the
    header's ``body.size`` and the frame's sizes as they are, so those can be mutated)."""
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    packed = zlib.compress(bytes(body), 1)
    out = bytearray(S._PREFIX.pack(S.MAGIC, S.FORMAT_VERSION, len(hjson), len(packed),
                                   len(body)))
    out += hjson + packed
    out += hashlib.blake2b(bytes(out), digest_size=S.DIGEST_SIZE).digest()
    return bytes(out)


# -- seed states -------------------------------------------------------------------------------

def _scenario(name, vcpus, host_cpus, seed, run_ns, trace=256, timeline=0):
    host, _, _ = scenarios.build(name, vcpus=vcpus, host_cpus=host_cpus, seed=seed,
                                 trace_capacity=trace)
    if timeline:
        host.enable_timeline(timeline)
    host.run(run_ns)
    return host.snapshot()


#: Costs with tails (kvmwake.costs): a seed state whose cost tables are drawn from.
TAIL_COSTS = {"wake_to_run_ns": {"dist": "lognormal", "median": 4000, "sigma": 0.8,
                                 "max": 300000},
              "vm_exit_ns": {"dist": "quantiles", "q": [500, 900, 1000, 1400, 9000]},
              "context_switch_ns": {"dist": "lognormal", "median": 2000, "sigma": 0.4}}


def _x86_mid_halt(costs=None) -> bytes:
    """An x86 VM whose vCPUs halt (HLT) with halt polling, kick each other, one host
    CPU short: snapshotted while a vCPU is polling or blocked in kvm_vcpu_halt."""
    vm = kw.VM(arch="x86", nr_vcpus=3, host_cpus=2, seed=11, trace_capacity=128, costs=costs)
    vm.vcpus[0].load([g.loop([g.compute_exp(30 * US), g.wake(1), g.wfi()])])
    vm.vcpus[1].load([g.loop([g.compute(7 * US), g.wfi(), g.wake(2)])])
    vm.vcpus[2].load([g.loop([g.compute_uniform(1 * US, 90 * US), g.wfi(), g.wake(0)])])
    vm.set_tick(250 * US)
    t = 0
    for _ in range(2000):
        t += 3 * US + 17
        vm.run(t)
        st = [v.thread_state for v in vm.vcpus]
        if any(s in ("POLLING", "BLOCKED") for s in st) and "RUNNING" in st:
            return vm.snapshot()
    raise AssertionError("no mid-halt state found")


def _arm64_suspended() -> bytes:
    """arm64, two VMs: VM 0's vCPU 0 armed its timer and is SYSTEM_SUSPENDed with its
    WAKEUP exit held (taken while VM 1's vCPU.run() waited), vCPU 1 powered off with a
    routed SPI pending on it, a periodic tick and a device source."""
    host = kw.Host(host_cpus=2, arch="arm64", seed=5, trace_capacity=512)
    vm = host.create_vm(2, nr_spis=64)
    vm.enable_cap(Cap.ARM_SYSTEM_SUSPEND)
    vm.vcpus[1].init(power_off=True)
    ops = [g.unmask(), g.set_handler(1 * US), g.timer_arm(1 * MS)]
    ops += g.psci(PsciFn.FN64_SYSTEM_SUSPEND, 0, 0)
    ops += [g.sync(0xBAD), g.end()]
    resume = len(ops)
    ops += [g.sync_reg(0), g.loop([g.compute(20 * US), g.timer_arm(50 * US), g.wfi()])]
    ops[3:8] = g.psci(PsciFn.FN64_SYSTEM_SUSPEND, vm.code_address(resume), 0x77)
    vm.vcpus[0].load(ops)
    spi = 40
    vm.configure_irq(spi, enabled=True, level=False)
    vm.route_spi(spi, vcpu=1)
    vm.configure_irq(41, enabled=True, level=False)
    vm.route_spi(41, vcpu=0)
    vm.set_tick(300 * US)
    vm.vmm = ReferenceVmm()                       # honours SYSTEM_SUSPEND, resumes on WAKEUP
    vm.vmm.attach(vm)
    other = host.create_vm(1)
    other.vcpus[0].load([g.loop([g.compute(7 * US), g.sync(1)])])
    vm.run(200 * US)
    assert vm.vcpus[0].get_mp_state() == MpState.SUSPENDED
    vm.irq_line(spi, 1)
    vm.irq_line(spi, 0)
    for _ in range(2000):
        other.vcpus[0].run()
        if vm.vcpus[0]._held is not None:
            return host.snapshot()
    raise AssertionError("no held exit")


def _unpinned() -> bytes:
    """EEVDF on 3 host CPUs in two LLCs: vCPU threads allowed on every CPU or on a
    list (the affinity mask table), migrating at wake-ups and newly-idle pulls."""
    host = kw.Host(host_cpus=3, seed=4, scheduler="eevdf", llc=[[0, 1], [2]],
                   trace_capacity=256, timeline_capacity=300)
    host.halt_poll_ns = 0
    vm = host.create_vm(4, affinity="all")
    for v in vm.vcpus:
        v.load([g.loop([g.compute_exp(40 * US), g.wake_next(), g.timer_arm(70 * US),
                        g.wfi()])])
    other = host.create_vm(2, affinity=[0, 2])
    for v in other.vcpus:
        v.load([g.loop([g.compute_exp(300 * US), g.timer_arm(200 * US), g.wfi()])])
    host.run(3 * MS)
    assert sum(v.nr_migrations for v in vm.vcpus) > 0
    return host.snapshot()


#: Seed states: name -> builder (each deterministic).
SEEDS = {
    "default": lambda: _scenario("default", 8, 2, 1, 2 * MS),
    "irq-storm": lambda: _scenario("irq-storm", 8, 2, 1, 2 * MS, timeline=300),
    "suspend-cycle": lambda: _scenario("suspend-cycle", 8, 2, 1, 2 * MS),
    "ipi-storm": lambda: _scenario("ipi-storm", 6, 1, 2, 1 * MS),
    "x86-mid-halt": _x86_mid_halt,
    "x86-tails": lambda: _x86_mid_halt(TAIL_COSTS),
    "arm64-suspended": _arm64_suspended,
    "unpinned": _unpinned,
}


def seed_states(names) -> dict:
    """name -> snapshot bytes of each named seed state (checked to restore)."""
    out = {}
    for n in names:
        data = SEEDS[n]()
        kw.Host.restore(data)
        out[n] = data
    return out


# -- mutations ---------------------------------------------------------------------------------

_LIMITS = (1 << 55, 1 << 56, 1 << 62, 1 << 63, 988, 1019, 1020, 1023, 1024, 4096)


def _values(rng: random.Random, old: int, lo: int, hi: int, counts) -> int:
    """A new value for an integer field of range lo..hi holding ``old``."""
    bits = (hi - lo).bit_length()
    pick = rng.randrange(10)
    if pick == 0:
        v = rng.choice((lo, lo + 1, hi, hi - 1, 0, 1, 2, -1))
    elif pick == 1:
        k = rng.randrange(max(bits, 1))
        v = (1 << k) + rng.choice((-1, 0, 1))
    elif pick == 2:
        v = old + rng.choice((-1, 1, -2, 2))
    elif pick == 3:
        v = old ^ (1 << rng.randrange(max(bits, 1)))
    elif pick == 4:
        v = rng.choice(_LIMITS) + rng.choice((-1, 0, 1))
    elif pick == 5 and counts:
        v = rng.choice(counts) + rng.choice((-1, 0, 1))
    elif pick == 6:
        v = old * 2 if old else 1 << rng.randrange(max(bits, 1))
    elif pick == 7:
        v = rng.randrange(lo, hi + 1)
    else:
        v = old + rng.randrange(-1000, 1001)
    if lo <= v <= hi and v != old:
        return v
    v = lo + (v - lo) % (hi - lo + 1)
    return v if v != old else (old + 1 - lo) % (hi - lo + 1) + lo


def _int_range(dt: np.dtype):
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def _json_value(rng, old, counts):
    """A new value for a JSON field (mostly the same type, sometimes another)."""
    if isinstance(old, bool):
        return rng.choice((not old, 0, 1, None, "x"))
    if isinstance(old, int):
        if rng.randrange(12) == 0:
            return rng.choice((None, "1", 1.5, [old], True, -old - 1, 2**64, 2**70))
        return _values(rng, old, -(1 << 63), (1 << 64) - 1, counts)
    if old is None:
        return rng.choice((0, 1, -1, 2**32, "x", [], {}))
    if isinstance(old, str):
        return rng.choice(("", old + "x", old[:-1], "kvmwake.vmm:Vmm", "os:system", 0, None))
    if isinstance(old, float):
        return rng.choice((0.0, -old, old * 1e9, float("inf"), 1))
    if isinstance(old, list):
        return rng.choice(([], old[:-1], old + old[-1:], None, {}))
    return rng.choice((None, [], {}, 0))


def _leaves(node, path=()):
    """(path, value) of every scalar or list-of-scalars leaf of a JSON tree."""
    if isinstance(node, dict):
        for k in sorted(node):
            yield from _leaves(node[k], path + (k,))
    elif isinstance(node, list) and node and any(isinstance(x, (dict, list)) for x in node):
        for i, x in enumerate(node):
            yield from _leaves(x, path + (i,))
    else:
        yield path, node


def mutate(data: bytes, rng: random.Random):
    """(description, mutated snapshot bytes): ``data`` with one field changed."""
    header, body = unframe(data)
    scal = header["engine"]["scalars"]
    arrays = header["engine"]["arrays"]
    nrec = {n: arrays[n]["nbytes"] // STRUCTS[n].itemsize for n in STRUCTS}
    counts = [len(header["vms"]), nrec["threads"], nrec["cpus"], nrec["heap"], nrec["ops"],
              nrec["srcs"], scal["now"], scal["seq"]]
    kind = rng.randrange(20)
    if kind < 3:
        k = rng.choice(sorted(scal))
        old = scal[k]
        scal[k] = _values(rng, old, 0, (1 << 64) - 1, counts) if rng.randrange(16) \
            else _json_value(rng, old, counts)
        return f"scalar {k}: {old} -> {scal[k]}", frame(header, body)
    if kind < 5:
        # Any other leaf of the header: VM records, vCPU flags, held exits, host
        # configuration, array descriptions, the body description, the run record.
        leaves = [(p, v) for p, v in _leaves(header) if p[:2] != ("engine", "scalars")]
        path, old = rng.choice(leaves)
        new = _json_value(rng, old, counts)
        node = header
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = new
        return f"header {'/'.join(map(str, path))}: {old!r} -> {new!r}", frame(header, body)
    if kind < 7:
        name = rng.choice(PLAIN)
        d = arrays[name]
        dt = np.dtype(S._DTYPES[d["dtype"]])
        n = d["nbytes"] // dt.itemsize
        if n == 0:
            return mutate(data, rng)
        # A view of the body itself: copies of structured arrays lose padding bytes.
        a = np.frombuffer(memoryview(body)[d["offset"]:d["offset"] + d["nbytes"]], dtype=dt)
        i = rng.randrange(n)
        old = int(a[i])
        lo, hi = _int_range(dt)
        a[i] = _values(rng, old, lo, hi, counts)
        return f"{name}[{i}]: {old} -> {int(a[i])}", frame(header, body)
    # One field of one struct record (most cases: the engine's own state).
    names = [n for n in STRUCTS if nrec[n]]
    weights = [{"threads": 6, "irqs": 3, "heap": 4, "cpus": 2, "vms": 2, "gics": 2,
                "srcs": 2, "ops": 2, "trace": 1, "timeline": 1}[n] for n in names]
    name = rng.choices(names, weights)[0]
    dt = STRUCTS[name]
    d = arrays[name]
    recs = np.frombuffer(memoryview(body)[d["offset"]:d["offset"] + d["nbytes"]], dtype=dt)
    i = rng.randrange(len(recs))
    fields = [f for f in dt.names if f != "_pad"]
    f = rng.choice(fields)
    fdt, shape = dt.fields[f][0].base, dt.fields[f][0].shape
    lo, hi = _int_range(fdt)
    flat_views = None
    if shape:
        j = rng.randrange(int(np.prod(shape)))
        flat = recs[f][i].reshape(-1)          # a view: writes go to the body
        old = int(flat[j])
        flat[j] = _values(rng, old, lo, hi, counts)
        where, new = f"{f}[{j}]", int(flat[j])
        flat_views = flat
    else:
        old = int(recs[f][i])
        recs[f][i] = _values(rng, old, lo, hi, counts)
        where, new = f, int(recs[f][i])
    del recs, flat_views
    return f"{name}[{i}].{where}: {old} -> {new}", frame(header, body)


def make_case(seeds: dict, seed: int, index: int):
    """(seed state name, description, bytes) of case ``index`` of a campaign."""
    rng = random.Random(f"kvmwake-snapshot-fuzz:{seed}:{index}")
    names = sorted(seeds)
    name = names[index % len(names)]
    desc, data = mutate(seeds[name], rng)
    return name, desc, data


# -- one case ----------------------------------------------------------------------------------

def run_case(data: bytes) -> tuple[str, str]:
    """(outcome, detail) of restoring ``data``, running it and snapshotting it again."""
    try:
        host = kw.Host.restore(data)
    except kw.SnapshotError as exc:
        return "rejected", str(exc)[:200]
    except Exception as exc:                       # noqa: BLE001 - that is the finding
        return "broken", "restore: " + "".join(traceback.format_exception_only(exc))[-300:]
    try:
        host.run(host.now + RUN_NS)
    except kw.EngineError as exc:
        if str(exc).startswith("inconsistent engine state"):
            return "broken", "run: the debug build's check: " + str(exc)[:300]
        try:
            host.snapshot()
        except kw.EngineError:
            return "stopped", str(exc)[:200]
        except Exception as exc2:                  # noqa: BLE001
            return "broken", "snapshot after error: " + repr(exc2)[:300]
        return "broken", "snapshot of a stopped engine succeeded"
    except Exception as exc:                       # noqa: BLE001
        return "broken", "run: " + "".join(traceback.format_exception_only(exc))[-300:]
    try:
        again = host.snapshot()
        kw.Host.restore(again)
    except Exception as exc:                       # noqa: BLE001
        return "broken", "next snapshot: " + "".join(traceback.format_exception_only(exc))[-300:]
    return "ran", ""


# -- children and the campaign -----------------------------------------------------------------

def _child_main() -> None:
    """A worker: seed states from the file named in argv, then one case index per stdin
    line, one JSON answer per stdout line."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with open(sys.argv[2]) as fh:
        spec = json.load(fh)
    seeds = {k: bytes.fromhex(v) for k, v in spec["seeds"].items()}
    seed = spec["seed"]
    out = sys.stdout
    selftest = os.environ.get("KVMWAKE_FUZZ_SELFTEST") == "1"
    for line in sys.stdin:
        i = int(line)
        if selftest and i < 0:
            # The harness's own test: case -1 dies of a signal, case -2 never answers.
            if i == -1:
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(3600)
        name, desc, data = make_case(seeds, seed, i)
        outcome, detail = run_case(data)
        out.write(json.dumps({"i": i, "seed_state": name, "mutation": desc,
                              "outcome": outcome, "detail": detail}) + "\n")
        out.flush()


def _child_env() -> dict:
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(kw.__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, here, env.get("PYTHONPATH")) if p)
    return env


class _Child:
    def __init__(self, spec_path: str):
        self.p = subprocess.Popen(
            [sys.executable, "-c", "import fuzz_snapshot as f; f._child_main()",
             "child", spec_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=_child_env(), bufsize=0)
        self.buf = b""

    def ask(self, cases) -> None:
        self.p.stdin.write("".join(f"{i}\n" for i in cases).encode())

    def answer(self, timeout: float):
        """The next answer, or None (the child died or said nothing for ``timeout`` s).
        Lines are split here, from raw reads: a buffered reader could hold answers
        that select() on the pipe no longer sees."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> int | None:
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        return self.p.wait()


def run_batch(spec_path: str, cases: list, timeout: float = CASE_TIMEOUT) -> list:
    """Answers for ``cases``, run in one child.  When the child dies or stops answering,
    the case it was at is run again alone in a child of its own (a crash or a hang
    there is that case's outcome), and the rest of the batch goes on in a new child."""
    answers = []
    pending = list(cases)
    while pending:
        child = _Child(spec_path)
        child.ask(pending)
        while pending:
            a = child.answer(timeout)
            if a is None:
                break
            answers.append(a)
            pending.remove(a["i"])
        child.kill()
        if not pending:
            break
        culprit = pending.pop(0)
        alone = _Child(spec_path)
        alone.ask([culprit])
        a = alone.answer(timeout)
        rc = alone.kill()
        if a is None:
            a = {"i": culprit, "outcome": "hang" if rc == -signal.SIGKILL else "crash",
                 "detail": f"exit status {rc}"}
        answers.append(a)
    return answers


def write_spec(path: str, seeds: dict, seed: int) -> None:
    with open(path, "w") as fh:
        json.dump({"seed": seed, "seeds": {k: v.hex() for k, v in seeds.items()}}, fh)


def campaign(seeds: dict, seed: int, cases: int, jobs: int = 1, batch: int = 200,
             timeout: float = CASE_TIMEOUT, spec_path: str | None = None,
             progress=None, on_finding=None) -> dict:
    """Run cases 0..cases-1; returns {"counts": {outcome: n}, "findings": [...]}."""
    import concurrent.futures as cf
    import tempfile
    tmp = None
    if spec_path is None:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        tmp.close()
        spec_path = tmp.name
    write_spec(spec_path, seeds, seed)
    counts = dict.fromkeys(OUTCOMES, 0)
    findings = []
    batches = [list(range(s, min(s + batch, cases))) for s in range(0, cases, batch)]
    done = 0
    t0 = time.monotonic()
    try:
        with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
            for answers in pool.map(lambda b: run_batch(spec_path, b, timeout), batches):
                for a in answers:
                    counts[a["outcome"]] += 1
                    if a["outcome"] in ("crash", "hang", "broken"):
                        name, desc, _ = make_case(seeds, seed, a["i"])
                        findings.append(dict(a, seed_state=name, mutation=desc))
                        if on_finding:
                            on_finding(findings[-1])
                done += len(answers)
                if progress:
                    progress(done, counts, time.monotonic() - t0)
    finally:
        if tmp is not None:
            os.unlink(spec_path)
    return {"counts": counts, "findings": findings}
