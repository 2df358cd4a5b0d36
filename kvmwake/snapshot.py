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

What carries over, and what may change on restore: everything carries over;
``restore(..., halt_poll_ns=..., halt_poll_ns_grow=..., ...)`` can set new
kvm module parameters for the destination host (a VM that enabled
``KVM_CAP_HALT_POLL`` keeps its own ceiling, as it would after migration),
applied from the restore point on.  Snapshots need the core engine.
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
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"unreadable snapshot header: {exc}") from None
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
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
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


def _arrays(header, body, blen) -> dict:
    from ._core import struct_sizes
    eng = header["engine"]
    if eng["struct_sizes"] != struct_sizes():
        raise SnapshotError("the snapshot was written by a kvmwake with other engine "
                            f"structure sizes ({eng['struct_sizes']})")
    out = {}
    for name in _ARRAYS:
        d = eng["arrays"][name]
        dtype = _DTYPES[d["dtype"]]
        shape = tuple(int(x) for x in d["shape"])
        off, nbytes = int(d["offset"]), int(d["nbytes"])
        if any(x < 0 for x in shape) or len(shape) > 2:
            raise SnapshotError(f"array {name}: bad shape {shape}")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if count * np.dtype(dtype).itemsize != nbytes or off < 0 or off % 8 \
                or off + nbytes > blen:
            raise SnapshotError(f"array {name}: shape {shape}, {nbytes} bytes at offset "
                                f"{off} do not fit the {blen}-byte body")
        out[name] = np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape).copy()
    if out["stats"].ndim != 2:
        raise SnapshotError("array stats must be two-dimensional")
    return out


def _check_header(h) -> None:
    host = h["host"]
    if host["arch"] not in ("arm64", "x86") or host["engine"] != "core":
        raise ValueError(f"host arch/engine {host['arch']!r}/{host['engine']!r}")
    for k in _SCALARS:
        v = h["engine"]["scalars"][k]
        if not isinstance(v, int) or not 0 <= v < (1 << 64):
            raise ValueError(f"scalar {k} = {v!r}")
    if not isinstance(h["vms"], list):
        raise ValueError("vms is not a list")


# -- restoring ------------------------------------------------------------------------------

def restore_host(src, vmm_classes: dict | None = None, **module_params):
    """Rebuild a ``Host`` from a snapshot (bytes or a path)."""
    from .host import Host
    header, arrays = parse(_load_bytes(src))
    hc = header["host"]
    try:
        host = Host(host_cpus=hc["host_cpus"], arch=hc["arch"], seed=hc["seed"],
                    costs=hc["costs"], engine="core",
                    trace_capacity=header["engine"]["scalars"]["tcap"])
    except (TypeError, ValueError, KeyError) as exc:
        raise SnapshotError(f"snapshot host configuration is invalid: {exc}") from None
    try:
        _rebuild_vms(host, header)
        host._engine.import_state(header["engine"]["scalars"], arrays)
    except SnapshotError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, IndexError) as exc:
        raise SnapshotError(f"inconsistent snapshot state: {exc}") from None
    for i, vd in enumerate(header["vms"]):
        _restore_policy(host.vms[i], vd["vmm"], vmm_classes or {})
    for name, value in module_params.items():
        if name not in ("halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start",
                        "halt_poll_ns_shrink"):
            raise TypeError(f"restore() got an unknown module parameter {name!r}")
        setattr(host, name, value)
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


def _rebuild_vms(host, header) -> None:
    """The Python objects of the VMs, without touching the engine's state (replaced next)."""
    from .vm import VCpu, VM
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
        vm.memory_size = int(vd["memory_size"])
        from .model import MEM_BASE
        vm.memory_base = MEM_BASE[host.arch]
        vm.exits = int(vd["exits"])
        vm.vcpus = [VCpu(vm, i) for i in range(vm.nr_vcpus)]
        if len(vd["vcpus"]) != vm.nr_vcpus:
            raise ValueError(f"VM {vm.index}: {len(vd['vcpus'])} vCPU records for "
                             f"{vm.nr_vcpus} vCPUs")
        for v, rec in zip(vm.vcpus, vd["vcpus"]):
            v._loaded, v._started = bool(rec["loaded"]), bool(rec["started"])
            held = rec["held"]
            if held is not None:
                held = {k: int(held[k]) for k in ("reason", "type", "ndata", "data0", "ucall",
                                                 "value", "time")}
            v._held = held
        host.vms.append(vm)
        first += vm.nr_vcpus
    host._nthreads = first


def _restore_policy(vm, rec, vmm_classes) -> None:
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
    pol = cls.__new__(cls)
    try:
        pol.load_state(rec["state"])
    except (TypeError, ValueError, KeyError) as exc:
        raise SnapshotError(f"VM {vm.index}'s VMM policy state is invalid: {exc}") from None
    pol.attach(vm)
    vm.vmm = pol
