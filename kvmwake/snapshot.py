"""Snapshots: a host (or a VM and its host) saved as bytes, restored anywhere.

The format is versioned, self-describing and checksummed, and loading it
never executes anything from the file (no pickle)::

    offset  size  field
    0       8     magic  b"KVMWSNAP"
    8       4     format version (u32, little-endian), currently 1
    12      4     header length H (u32)
    16      8     body length B (u64)
    24      H     header: UTF-8 JSON (configuration, Python-side state, and
                  the name, dtype, shape, offset and size of every array)
    24+H    B     body: zlib-compressed; inflated, the arrays, each at an
                  8-byte aligned offset (the header gives the inflated size)
    24+H+B  16    BLAKE2b-128 of everything before it

The arrays are the engine's own state (vCPU threads, interrupt controllers,
host CPUs and run queues, the event heap, stats, trace ring, programs, device
sources), so a restored host continues bit for bit as the original would
have: same events, stats, traces and later snapshots.  The header holds the
Python side: the VMs' configuration, each vCPU's held exit, and each VM's
VMM policy with its own state.

What carries over, and what may change on restore: everything carries over.
``restore(..., host_cpus=N)`` puts the host on another machine with N host
CPUs, as live migration would: thread g is placed on CPU g % N, the run
queues are rebuilt (threads that had a CPU first, in the old CPU order,
then the queued ones in their order), a running thread that finds its new
CPU taken is preempted with the rest of its work kept, a polling one stops
polling and blocks (``single_task_running()`` is false there), and an idle
CPU with threads queued runs the first after a context switch.
``restore(..., halt_poll_ns=..., halt_poll_ns_grow=..., ...)`` sets the
destination's kvm module parameters (a VM that enabled ``KVM_CAP_HALT_POLL``
keeps its own ceiling, as it would after migration), from the restore point
on.  Recomputed: nothing else; stats, traces, policies, clocks and random
streams continue.  Snapshots need the core engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np

from . import __version__
from . import vmm as _vmm
from .errors import SnapshotError

MAGIC = b"KVMWSNAP"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ")
DIGEST_SIZE = 16
MAX_HEADER = 16 << 20          # 16 MiB of JSON
MAX_BODY = 1 << 40             # 1 TiB: anything larger is not a snapshot of ours
ZLIB_LEVEL = 1                 # the stats histograms are mostly zeros
_DTYPES = {"u1": np.uint8, "u4": np.uint32, "u8": np.uint64}
_ARRAYS = ("threads", "irqs", "vms", "gics", "srcs", "times", "cpus", "stats", "lat", "ops",
           "exitq", "heap", "trace", "timeline", "tlbase")
_SCALARS = ("now", "seq", "events", "halts", "tcap", "thead", "tcount", "tdropped",
            "halt_poll_ns", "grow", "grow_start", "shrink", "exq_head", "exq_len", "talloc",
            "tlcap", "tlhead", "tlcount", "tldropped", "tlt0", "tlalloc")

#: The arrays that are not bytes of engine structs ("u1"), and the struct of those that are.
_ARRAY_DTYPES = {"times": "u8", "stats": "u8", "lat": "u8", "exitq": "u4"}
_ARRAY_STRUCTS = {"threads": "thread_t", "irqs": "virq_t", "vms": "vm_t", "gics": "gic_t",
                  "srcs": "source_t", "cpus": "cpu_t", "ops": "op_t", "heap": "event_t",
                  "trace": "trace_rec_t", "timeline": "tl_rec_t"}


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


# -- writing ------------------------------------------------------------------------------

def host_to_bytes(host, vm_index: int | None = None, run: dict | None = None) -> bytes:
    """Serialise ``host`` (and say which of its VMs the snapshot is of, if any)."""
    if host.engine_name != "core":
        raise SnapshotError("snapshots need the core engine (this host runs the reference)")
    from ._core import struct_sizes
    scalars, arrays = host._engine.export_state()
    body = bytearray()
    descr = {}
    for name in _ARRAYS:
        a = np.ascontiguousarray(arrays[name])
        code = {np.dtype(np.uint8): "u1", np.dtype(np.uint32): "u4",
                np.dtype(np.uint64): "u8"}[a.dtype]
        pad = (-len(body)) % 8
        body += b"\0" * pad
        descr[name] = {"dtype": code, "shape": list(a.shape), "offset": len(body),
                       "nbytes": a.nbytes}
        body += a.tobytes()
    header = {
        "kvmwake": __version__,
        "format": FORMAT_VERSION,
        "host": {"arch": host.arch, "host_cpus": host.host_cpus, "seed": host.seed,
                 "costs": host.costs, "engine": host.engine_name},
        "engine": {"scalars": {k: int(v) for k, v in scalars.items()}, "arrays": descr,
                   "struct_sizes": struct_sizes()},
        "vms": [_vm_state(vm) for vm in host.vms],
        "vm_index": vm_index,
        "run": run or {},
        "body": {"compression": "zlib", "size": len(body)},
    }
    packed = zlib.compress(bytes(body), ZLIB_LEVEL)
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    out = bytearray(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hjson), len(packed)))
    out += hjson
    out += packed
    out += _digest(out)
    return bytes(out)


def _vm_state(vm) -> dict:
    pol = vm.vmm
    cls = type(pol)
    return {
        "nr_vcpus": vm.nr_vcpus, "nr_spis": vm.nr_spis, "memory_size": vm.memory_size,
        "halt_poll_cap": vm._halt_poll_cap, "tick_ns": vm._tick_ns,
        "suspend_cap": vm._suspend_cap, "exits": vm.exits,
        "vmm": {"class": f"{cls.__module__}:{cls.__qualname__}", "state": pol.to_state()},
        "vcpus": [{"loaded": v._loaded, "started": v._started, "held": v._held}
                  for v in vm.vcpus],
    }


# -- reading ------------------------------------------------------------------------------

def _load_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_BODY + MAX_HEADER + _PREFIX.size + DIGEST_SIZE:
                    raise SnapshotError(f"{os.fspath(src)!r} is {size} bytes: too large to be "
                                        "a kvmwake snapshot")
                return fh.read()
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot {os.fspath(src)!r}: "
                                f"{exc.strerror or exc}") from None
    raise TypeError(f"a snapshot is bytes or a path, not {type(src).__name__}")


def parse(data: bytes) -> tuple[dict, dict]:
    """Check a snapshot's framing, checksum and header; return (header, arrays)."""
    n = len(data)
    if n < _PREFIX.size + DIGEST_SIZE:
        raise SnapshotError(f"truncated snapshot: {n} bytes, less than the "
                            f"{_PREFIX.size + DIGEST_SIZE}-byte frame")
    magic, version, hlen, blen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise SnapshotError(f"not a kvmwake snapshot: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"unknown snapshot format version {version} "
                            f"(this kvmwake reads version {FORMAT_VERSION})")
    if hlen > MAX_HEADER:
        raise SnapshotError(f"absurd header length {hlen} (at most {MAX_HEADER})")
    if blen > MAX_BODY:
        raise SnapshotError(f"absurd body length {blen} (at most {MAX_BODY})")
    want = _PREFIX.size + hlen + blen + DIGEST_SIZE
    if n != want:
        raise SnapshotError(f"{'truncated' if n < want else 'oversized'} snapshot: {n} bytes, "
                            f"the frame declares {want}")
    if _digest(memoryview(data)[:-DIGEST_SIZE]) != data[-DIGEST_SIZE:]:
        raise SnapshotError("checksum mismatch: the snapshot is corrupted")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(f"unreadable snapshot header: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"the snapshot header is a JSON {type(header).__name__}, "
                            "not an object")
    try:
        size = header["body"]["size"]
        if header["body"]["compression"] != "zlib" or not isinstance(size, int) \
                or not 0 <= size <= MAX_BODY:
            raise SnapshotError(f"bad body description {header['body']!r}")
        body = _inflate(data[_PREFIX.size + hlen:_PREFIX.size + hlen + blen], size)
        arrays = _arrays(header, memoryview(body), size)
        _check_header(header)
    except SnapshotError:
        raise
    except KeyError as exc:
        raise SnapshotError(f"inconsistent snapshot header: missing key {exc}") from None
    except (TypeError, ValueError, AttributeError, OverflowError, IndexError) as exc:
        raise SnapshotError(f"inconsistent snapshot header: {exc!r}") from None
    return header, arrays


def _inflate(packed: bytes, size: int) -> bytes:
    """Inflate at most ``size`` bytes (a forged size cannot blow memory up)."""
    d = zlib.decompressobj()
    try:
        body = d.decompress(packed, size + 1)
    except zlib.error as exc:
        raise SnapshotError(f"the snapshot body does not inflate: {exc}") from None
    if len(body) != size or not d.eof or d.unused_data:
        raise SnapshotError(f"the snapshot body inflates to other than the declared {size} bytes")
    return body


def _int(v, what) -> int:
    """A JSON integer (not a bool, a float or a string)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise SnapshotError(f"{what} is {v!r}, not an integer")
    return v


def _arrays(header, body, blen) -> dict:
    from ._core import struct_sizes
    from .model import LAT_BUCKETS, NR_STATS
    eng = header["engine"]
    sizes = struct_sizes()
    if eng["struct_sizes"] != sizes:
        raise SnapshotError("the snapshot was written by a kvmwake with other engine "
                            f"structure sizes ({eng['struct_sizes']})")
    out = {}
    for name in _ARRAYS:
        d = eng["arrays"][name]
        want = _ARRAY_DTYPES.get(name, "u1")
        if d["dtype"] != want:
            raise SnapshotError(f"array {name}: dtype {d['dtype']!r}, expected {want!r}")
        dtype = _DTYPES[want]
        if not isinstance(d["shape"], list):
            raise SnapshotError(f"array {name}: shape {d['shape']!r} is not a list")
        shape = tuple(_int(x, f"array {name}'s shape") for x in d["shape"])
        off, nbytes = _int(d["offset"], f"array {name}'s offset"), \
            _int(d["nbytes"], f"array {name}'s size")
        if any(x < 0 for x in shape) or len(shape) != (2 if name == "stats" else 1):
            raise SnapshotError(f"array {name}: bad shape {shape}")
        count = int(np.prod(shape, dtype=object))
        if count * np.dtype(dtype).itemsize != nbytes or off < 0 or off % 8 \
                or off + nbytes > blen:
            raise SnapshotError(f"array {name}: shape {shape}, {nbytes} bytes at offset "
                                f"{off} do not fit the {blen}-byte body")
        struct = _ARRAY_STRUCTS.get(name)
        if struct is not None and nbytes % sizes[struct]:
            raise SnapshotError(f"array {name}: size {nbytes} is not a whole number of "
                                f"{sizes[struct]}-byte {struct} records")
        out[name] = np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape).copy()
    if out["stats"].shape[1] != NR_STATS:
        raise SnapshotError(f"array stats: {out['stats'].shape[1]} stats per vCPU, "
                            f"expected {NR_STATS}")
    if out["lat"].shape != (LAT_BUCKETS,):
        raise SnapshotError(f"array lat: {out['lat'].shape[0]} latency buckets, "
                            f"expected {LAT_BUCKETS}")
    return out


def _check_header(h) -> None:
    host = h["host"]
    if host["arch"] not in ("arm64", "x86") or host["engine"] != "core":
        raise ValueError(f"host arch/engine {host['arch']!r}/{host['engine']!r}")
    for k in _SCALARS:
        v = h["engine"]["scalars"][k]
        if not isinstance(v, int) or not 0 <= v < (1 << 64):
            raise ValueError(f"scalar {k} = {v!r}")
    if not isinstance(h["vms"], list) or not all(isinstance(vd, dict) for vd in h["vms"]):
        raise ValueError("vms is not a list of objects")
    if not isinstance(h.get("run", {}), dict):
        raise ValueError(f"run is {h['run']!r}, not an object")
    i = h.get("vm_index")
    if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
        raise ValueError(f"vm_index is {i!r}, not an integer")


# -- restoring ------------------------------------------------------------------------------

def restore_host(src, vmm_classes: dict | None = None, host_cpus: int | None = None,
                 **module_params):
    """Rebuild a ``Host`` from a snapshot (bytes or a path).

    ``host_cpus``: restore onto a host with another CPU count (see
    ``Engine.rehost``: thread g goes to CPU g % host_cpus; threads that lose
    their CPU are preempted or stop polling, as on a migration).
    """
    from .host import Host, MAX_HOST_CPUS, check_int
    if host_cpus is not None:
        host_cpus = check_int("host_cpus", host_cpus, 1, MAX_HOST_CPUS)
    header, arrays = parse(_load_bytes(src))
    hc = header["host"]
    try:
        host = Host(host_cpus=hc["host_cpus"], arch=hc["arch"], seed=hc["seed"],
                    costs=hc["costs"], engine="core",
                    trace_capacity=header["engine"]["scalars"]["tcap"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SnapshotError(f"snapshot host configuration is invalid: {exc}") from None
    from ._core import struct_sizes
    if len(arrays["cpus"]) != host.host_cpus * struct_sizes()["cpu_t"]:
        raise SnapshotError(f"inconsistent array sizes: array cpus holds "
                            f"{len(arrays['cpus']) // struct_sizes()['cpu_t']} host CPUs, "
                            f"the host has {host.host_cpus}")
    try:
        _rebuild_vms(host, header, len(arrays["threads"]) // struct_sizes()["thread_t"])
        host._engine.import_state(header["engine"]["scalars"], arrays)
        _check_python_side(host, header)
        for i, vd in enumerate(header["vms"]):
            _restore_policy(host.vms[i], vd["vmm"], vmm_classes or {})
    except SnapshotError:
        raise
    except KeyError as exc:
        raise SnapshotError(f"inconsistent snapshot state: missing key {exc}") from None
    except (ValueError, TypeError, OverflowError, IndexError, AttributeError) as exc:
        raise SnapshotError(f"inconsistent snapshot state: {exc}") from None
    for name in module_params:
        if name not in ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start",
                        "halt_poll_ns_shrink"):
            raise TypeError(f"restore() got an unknown module parameter {name!r}")
    for name, value in module_params.items():
        setattr(host, name, value)
    if host_cpus is not None and host_cpus != host.host_cpus:
        host._engine.rehost(host_cpus)
        host.host_cpus = host_cpus
    return host, header


def restore_host_only(src):
    """Unpickling: the host alone."""
    return restore_host(src)[0]


def restore_vm_only(src):
    """Unpickling: the VM the snapshot was taken of."""
    host, header = restore_host(src)
    return _vm_of(host, header)


def _vm_of(host, header):
    i = header.get("vm_index")
    if not isinstance(i, int) or not 0 <= i < len(host.vms):
        raise SnapshotError("this is a host snapshot, not a VM's; restore it with Host.restore")
    return host.vms[i]


def _rebuild_vms(host, header, nthreads: int) -> None:
    """The Python objects of the VMs, without touching the engine's state (replaced next)."""
    from .model import MAX_VCPUS
    from .vm import VCpu, VM
    counts = []
    for i, vd in enumerate(header["vms"]):
        n = _int(vd["nr_vcpus"], f"VM {i}'s nr_vcpus")
        if not 1 <= n <= MAX_VCPUS[host.arch]:
            raise SnapshotError(f"VM {i}: nr_vcpus = {n} out of range 1..{MAX_VCPUS[host.arch]}")
        if not isinstance(vd["vcpus"], list) or len(vd["vcpus"]) != n:
            raise SnapshotError(f"VM {i}: the vCPU records do not match its {n} vCPUs")
        counts.append(n)
    if sum(counts) != nthreads:
        raise SnapshotError(f"inconsistent array sizes: the VMs have {sum(counts)} vCPUs, "
                            f"array threads holds {nthreads}")
    first = 0
    for vd in header["vms"]:
        vm = VM.__new__(VM)
        vm.host = host
        vm.arch = host.arch
        vm.index = len(host.vms)
        vm._first = first
        vm.nr_vcpus = int(vd["nr_vcpus"])
        vm.nr_spis = int(vd["nr_spis"])
        vm._halt_poll_cap = vd["halt_poll_cap"]
        vm._tick_ns = int(vd["tick_ns"])
        vm._suspend_cap = bool(vd["suspend_cap"])
        vm.memory_size = _int(vd["memory_size"], "memory_size")
        if not 1 << 12 <= vm.memory_size <= 1 << 48 or vm.nr_spis < 0 or vm._tick_ns < 0 \
                or _int(vd["exits"], "exits") < 0:
            raise SnapshotError(f"VM {vm.index}: memory size, SPI count, tick or exit count "
                                "out of range")
        if vm._halt_poll_cap is not None and not 0 <= _int(vm._halt_poll_cap,
                                                            "halt_poll_cap") <= 0xFFFF_FFFF:
            raise SnapshotError(f"VM {vm.index}: halt_poll_cap out of range")
        from .model import MEM_BASE
        vm.memory_base = MEM_BASE[host.arch]
        vm.exits = int(vd["exits"])
        vm.vcpus = [VCpu(vm, i) for i in range(vm.nr_vcpus)]
        for v, rec in zip(vm.vcpus, vd["vcpus"]):
            v._loaded, v._started = bool(rec["loaded"]), bool(rec["started"])
            held = rec["held"]
            if held is not None:
                held = {k: _int(held[k], "a held exit's " + k)
                        for k in ("reason", "type", "ndata", "data0", "ucall", "value", "time")}
            v._held = held
        host.vms.append(vm)
        first += vm.nr_vcpus
    host._nthreads = first


def _check_python_side(host, header) -> None:
    """The VMs' Python state against the engine's: VM layout, programs, held exits."""
    from ._core import _engine_exit_record, _engine_view
    from .exits import from_engine
    vms, threads, queued = _engine_view(host._engine)
    if len(vms) != len(host.vms):
        raise SnapshotError(f"inconsistent array sizes: array vms holds {len(vms)} VMs, "
                            f"the header describes {len(host.vms)}")
    for vm, (first, n, spis, cap, tick, susp) in zip(host.vms, vms):
        if (first, n, spis) != (vm._first, vm.nr_vcpus, vm.nr_spis):
            raise SnapshotError(f"VM {vm.index}: the header's vCPUs and SPIs disagree with "
                                "the engine's")
        if cap != vm._halt_poll_cap or tick != vm._tick_ns or susp != vm._suspend_cap:
            raise SnapshotError(f"VM {vm.index}: the header's halt-poll cap, tick or "
                                "suspend cap disagrees with the engine's")
        for v in vm.vcpus:
            has_prog, state = threads[v._g]
            if v._loaded and not has_prog:
                raise SnapshotError(f"VM {vm.index} vCPU {v.id}: loaded, but the engine "
                                    "holds no program for it")
            if v._held is not None and (state != 0 or v._held
                                        != _engine_exit_record(host._engine, v._g)):
                raise SnapshotError(f"VM {vm.index} vCPU {v.id}: its held exit is not the "
                                    "engine's last exit of a vCPU outside KVM_RUN")
    for g in set(queued):
        if threads[g][1] != 0:
            raise SnapshotError(f"thread {g}: in the exit queue but inside KVM_RUN")
    for g in set(queued) | {v._g for vm in host.vms for v in vm.vcpus if v._held}:
        try:
            from_engine(_engine_exit_record(host._engine, g))
        except (ValueError, KeyError) as exc:
            raise SnapshotError(f"thread {g}: an exit to userspace that is none "
                                f"({exc})") from None


def _check_policy_state(cls, state) -> None:
    """A policy's saved state may set data attributes, never replace its methods."""
    import inspect
    if not isinstance(state, dict):
        raise SnapshotError(f"a VMM policy state is {type(state).__name__}, not an object")
    for k in state:
        if not isinstance(k, str):
            continue
        attr = inspect.getattr_static(cls, k, None)
        if callable(attr) or hasattr(attr, "__get__"):
            raise SnapshotError(f"a VMM policy state names {k!r}, which is a method or "
                                f"property of {cls.__qualname__}")


def _check_reference_vmm(vm, pol) -> None:
    """ReferenceVmm's pending resumes must be ones it can carry out."""
    u64 = (1 << 64) - 1
    for vid, (entry, context, t0) in pol._pending.items():
        if not 0 <= vid < vm.nr_vcpus or not 0 <= entry <= u64 or not 0 <= context <= u64 \
                or not 0 <= t0 <= vm.host.now:
            raise SnapshotError(f"VM {vm.index}'s ReferenceVmm: a pending resume of vCPU "
                                f"{vid} out of range")


def _restore_policy(vm, rec, vmm_classes) -> None:
    if not isinstance(rec, dict) or not isinstance(rec.get("class"), str):
        raise SnapshotError(f"VM {vm.index}'s VMM policy record is invalid")
    name = rec["class"]
    cls = vmm_classes.get(name)
    if cls is None:
        mod, _, qual = name.partition(":")
        if mod == _vmm.__name__ and hasattr(_vmm, qual) and isinstance(getattr(_vmm, qual), type) \
                and issubclass(getattr(_vmm, qual), _vmm.Vmm):
            cls = getattr(_vmm, qual)
        else:
            raise SnapshotError(f"VM {vm.index}'s VMM policy is {name}; pass it to restore() "
                                f"as vmm_classes={{{name!r}: TheClass}}")
    _check_policy_state(cls, rec["state"])
    pol = cls.__new__(cls)
    try:
        pol.load_state(rec["state"])
        if isinstance(pol, _vmm.ReferenceVmm):
            _check_reference_vmm(vm, pol)
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise SnapshotError(f"VM {vm.index}'s VMM policy state is invalid: {exc}") from None
    pol.attach(vm)
    vm.vmm = pol
