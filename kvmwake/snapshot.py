"""Snapshots: a host (or a VM and its host) saved as bytes, restored anywhere.

This module is the format.  ``encode(engine, host, vms, ...)`` turns an engine's
exported state and the Python side's plain description of its host and VMs
into bytes; ``decode(src)`` reads bytes (or a file), checks everything in them
and returns a ``Snapshot``: the header, the engine arrays and checked VM
records, plain data that ``Host.restore`` and ``VM.restore`` rebuild the
objects from (``kvmwake.host``, ``kvmwake.vm``).  ``check_host_cpus``,
``check_engine`` and ``policy_class`` / ``check_policy_state`` are the checks
of a restore that need the rebuilt host: its CPU count, its engine once the
arrays are imported, and the VMM policy classes a caller allows.

The format is versioned, self-describing and checksummed, and loading it
never executes anything from the file (no pickle)::

    offset  size  field
    0       8     magic  b"KVMWSNAP"
    8       4     format version (u32, little-endian), currently 2
    12      4     header length H (u32)
    16      8     body length B (u64), compressed
    24      8     inflated body length R (u64)
    32      H     header: UTF-8 JSON (configuration, Python-side state, and
                  the name, dtype, shape, offset and size of every array)
    32+H    B     body: zlib-compressed; inflated, the arrays in the order of
                  ``_ARRAYS``, each at the next 8-byte aligned offset
    32+H+B  16    BLAKE2b-128 of everything before it

Reading checks, in this order and before anything is inflated: the frame
(R at most ``ZLIB_MAX_RATIO`` times B), the checksum, then the whole header:
its scalars, and every array's size against the counts the header gives
(vCPUs, VMs, host CPUs, trace and timeline records), laid out end to end;
the body must be exactly R bytes, the header's ``body.size`` and the end of
that layout.  Only then is the body inflated, and inflation stops at R
bytes.  Version 1 (no R in the prefix; R is the header's ``body.size``) is
still read, with the same checks.

The arrays are the engine's own state (vCPU threads, interrupt controllers,
host CPUs and run queues, the queued events, stats, trace ring, programs,
device sources), so a restored host continues bit for bit as the original
would have: same events, stats, traces and later snapshots.  The ``heap``
array holds the live queued events, sorted by (time, class, sequence); the
loader takes them in any order (and drops none: an event already void is
dropped by the queue as a run would drop it).  The header holds the
Python side: the VMs' configuration, each vCPU's held exit, and each VM's
VMM policy with its own state.

What carries over, and what may change on restore: everything carries over.
``restore(..., host_cpus=N)`` puts the host on another machine with N host
CPUs, as live migration would: thread g is placed on CPU g % N (a thread
with an affinity list: the (g mod n)-th of the n CPUs of its list that the
new host has; a list left empty, or explicit LLC groups, are refused), the run
queues are rebuilt (threads that had a CPU first, in the old CPU order,
then the queued ones in their order), a running thread that finds its new
CPU taken is preempted with the rest of its work kept, a polling one stops
polling and blocks (``single_task_running()`` is false there), and an idle
CPU with threads queued runs the first after a context switch.
``restore(..., halt_poll_ns=..., halt_poll_ns_grow=..., ...)`` sets the
destination's kvm module parameters (a VM that enabled ``KVM_CAP_HALT_POLL``
keeps its own ceiling, as it would after migration), from the restore point
on.  Recomputed: each vCPU's ``loaded`` and ``started`` flags, from the
engine's thread state (``check_engine``); stats, traces, policies, clocks and
random streams continue.  Snapshots need the core engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import __version__
from . import vmm as _vmm
from .errors import SnapshotError
from .exits import from_engine
from .costs import COST_TABLE_N, DRAWN_COSTS
from .model import LAT_BUCKETS, MAX_VCPUS, NR_STATS, THREAD_HOST

MAGIC = b"KVMWSNAP"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sIIQQ")      # magic, version, header, body, inflated body
_PREFIX_V1 = struct.Struct("<8sIIQ")    # version 1: no inflated size in the frame
#: deflate inflates at most 1032 bytes from one: a larger declared size is a lie.
ZLIB_MAX_RATIO = 1032
DIGEST_SIZE = 16
MAX_HEADER = 16 << 20          # 16 MiB of JSON
MAX_BODY = 1 << 40             # 1 TiB: anything larger is not a snapshot of ours
ZLIB_LEVEL = 1                 # the stats histograms are mostly zeros
_DTYPES = {"u1": np.uint8, "u4": np.uint32, "u8": np.uint64}
_ARRAYS = ("threads", "irqs", "vms", "gics", "srcs", "times", "cpus", "stats", "lat", "ops",
           "exitq", "heap", "trace", "timeline", "tlbase", "aff", "costtab")
_SCALARS = ("now", "seq", "events", "halts", "tcap", "thead", "tcount", "tdropped",
            "halt_poll_ns", "grow", "grow_start", "shrink", "exq_head", "exq_len", "talloc",
            "tlcap", "tlhead", "tlcount", "tldropped", "tlt0", "tlalloc", "cost_dist")
#: The fields of a held exit (an exit record of the engine).
_HELD_KEYS = ("reason", "type", "ndata", "data0", "ucall", "value", "time")

#: The arrays that are not bytes of engine structs ("u1"), and the struct of those that are.
_ARRAY_DTYPES = {"times": "u8", "stats": "u8", "lat": "u8", "exitq": "u4", "aff": "u8",
                 "costtab": "u8"}
_ARRAY_STRUCTS = {"threads": "thread_t", "irqs": "virq_t", "vms": "vm_t", "gics": "gic_t",
                  "srcs": "source_t", "cpus": "cpu_t", "ops": "op_t", "heap": "event_t",
                  "trace": "trace_rec_t", "timeline": "tl_rec_t"}


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def _struct_sizes() -> dict:
    from ._core import struct_sizes
    return struct_sizes()


# -- writing ------------------------------------------------------------------------------

def encode(engine, host: dict, vms: list, vm_index: int | None = None,
           run: dict | None = None) -> bytes:
    """A snapshot of ``engine``'s state with the Python side's description.

    ``host`` is ``{"arch", "host_cpus", "seed", "costs", "engine"}``; ``vms`` has one
    record per VM (``vm_record``'s fields); ``vm_index`` says which VM the snapshot
    is of (None: the whole host); ``run`` is free JSON data about the run (the
    command line keeps its scenario and end time there).
    """
    if host["engine"] != "core":
        raise SnapshotError("snapshots need the core engine (this host runs the reference)")
    scalars, arrays = engine.export_state()
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
        "host": host,
        "engine": {"scalars": {k: int(v) for k, v in scalars.items()}, "arrays": descr,
                   "struct_sizes": _struct_sizes()},
        "vms": vms,
        "vm_index": vm_index,
        "run": run or {},
        "body": {"compression": "zlib", "size": len(body)},
    }
    packed = zlib.compress(bytes(body), ZLIB_LEVEL)
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    out = bytearray(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hjson), len(packed), len(body)))
    out += hjson
    out += packed
    out += _digest(out)
    return bytes(out)


def vm_record(*, nr_vcpus: int, nr_spis: int, memory_size: int, halt_poll_cap: int | None,
              tick_ns: int, suspend_cap: bool, exits: int, policy, vcpus: list) -> dict:
    """One VM's record in the header: its configuration, its VMM policy (class and
    ``to_state()``) and per vCPU ``{"loaded", "started", "held"}``."""
    cls = type(policy)
    return {
        "nr_vcpus": nr_vcpus, "nr_spis": nr_spis, "memory_size": memory_size,
        "halt_poll_cap": halt_poll_cap, "tick_ns": tick_ns,
        "suspend_cap": suspend_cap, "exits": exits,
        "vmm": {"class": f"{cls.__module__}:{cls.__qualname__}", "state": policy.to_state()},
        "vcpus": vcpus,
    }


# -- reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """A decoded snapshot whose every part has been checked.

    ``header`` is the JSON header as written (``header["vm_index"]``,
    ``header["run"]``); ``arrays`` the engine's arrays by name; ``vms`` one record
    per VM, its values checked and normalised: ``first`` (its first thread),
    ``nr_vcpus``, ``nr_spis``, ``halt_poll_cap`` (None or an int), ``tick_ns``,
    ``suspend_cap``, ``memory_size``, ``exits``, ``vmm`` (``{"class", "state"}``)
    and ``vcpus`` (``{"loaded", "started", "held"}`` each, held an exit record
    or None; ``check_engine`` recomputes the flags from the engine).
    """

    header: dict
    arrays: dict
    vms: list

    @property
    def host(self) -> dict:
        """``{"arch", "host_cpus", "seed", "costs", "engine"}`` as written."""
        return self.header["host"]

    @property
    def scalars(self) -> dict:
        return self.header["engine"]["scalars"]


def _load_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as fh:
                # The frame says how long the file is: read no more than that (a pipe
                # or /dev/zero has no size to trust, and would never end).
                head = fh.read(_PREFIX.size)
                want = _frame_size(head)
                rest = fh.read(want - len(head) + 1) if want is not None else b""
                if want is not None and len(head) + len(rest) > want:
                    raise SnapshotError(f"oversized snapshot {os.fspath(src)!r}: more than "
                                        f"the {want} bytes its frame declares")
                return head + rest
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot {os.fspath(src)!r}: "
                                f"{exc.strerror or exc}") from None
    raise TypeError(f"a snapshot is bytes or a path, not {type(src).__name__}")


def _frame_size(head: bytes):
    """The whole length a snapshot's prefix declares, or None if ``head`` is not one
    of our prefixes (``parse`` then says what is wrong)."""
    if len(head) < _PREFIX_V1.size or head[:8] != MAGIC:
        return None
    version = struct.unpack_from("<I", head, 8)[0]
    prefix = _PREFIX if version == FORMAT_VERSION else _PREFIX_V1 if version == 1 else None
    if prefix is None or len(head) < prefix.size:
        return None
    _, _, hlen, blen = _PREFIX_V1.unpack_from(head, 0)
    if hlen > MAX_HEADER or blen > MAX_BODY:
        return None
    return prefix.size + hlen + blen + DIGEST_SIZE


@contextlib.contextmanager
def inconsistent(what: str, detail=str):
    """Inside: the errors a malformed description raises (a missing key, a value of
    the wrong type or range) become ``SnapshotError("inconsistent snapshot WHAT:
    ...")``; a ``SnapshotError`` passes as it is."""
    try:
        yield
    except SnapshotError:
        raise
    except KeyError as exc:
        raise SnapshotError(f"inconsistent snapshot {what}: missing key {exc}") from None
    except (ValueError, TypeError, OverflowError, IndexError, AttributeError) as exc:
        raise SnapshotError(f"inconsistent snapshot {what}: {detail(exc)}") from None


def decode(src) -> Snapshot:
    """Read a snapshot (bytes or a path) and check it: framing, checksum, header,
    arrays and VM records.  Raises ``SnapshotError`` (``TypeError`` if ``src`` is
    neither bytes nor a path)."""
    header, arrays = parse(_load_bytes(src))
    with inconsistent("state"):
        vms = _vm_records(header, len(arrays["threads"]) // _struct_sizes()["thread_t"])
    return Snapshot(header, arrays, vms)


def parse(data: bytes) -> tuple[dict, dict]:
    """Check a snapshot's framing, checksum and header; return (header, arrays).

    Everything the header says is checked before the body is inflated, and the
    inflation stops at the size the checked header and frame agree on."""
    n = len(data)
    if n >= len(MAGIC) and data[:len(MAGIC)] != MAGIC:
        raise SnapshotError(f"not a kvmwake snapshot: magic {bytes(data[:8])!r}, "
                            f"expected {MAGIC!r}")
    if n < _PREFIX.size + DIGEST_SIZE:
        raise SnapshotError(f"truncated snapshot: {n} bytes, less than the "
                            f"{_PREFIX.size + DIGEST_SIZE}-byte frame")
    version = struct.unpack_from("<I", data, 8)[0]
    if version == FORMAT_VERSION:
        prefix = _PREFIX
        _, _, hlen, blen, raw = _PREFIX.unpack_from(data, 0)
    elif version == 1:
        prefix = _PREFIX_V1
        _, _, hlen, blen = _PREFIX_V1.unpack_from(data, 0)
        raw = None                        # the header's body.size
    else:
        raise SnapshotError(f"unknown snapshot format version {version} "
                            f"(this kvmwake reads versions 1 and {FORMAT_VERSION})")
    if hlen > MAX_HEADER:
        raise SnapshotError(f"absurd header length {hlen} (at most {MAX_HEADER})")
    if blen > MAX_BODY:
        raise SnapshotError(f"absurd body length {blen} (at most {MAX_BODY})")
    if raw is not None and raw > ZLIB_MAX_RATIO * blen + 64:
        raise SnapshotError(f"absurd inflated body length {raw}: {blen} compressed bytes "
                            f"inflate to at most {ZLIB_MAX_RATIO * blen + 64}")
    want = prefix.size + hlen + blen + DIGEST_SIZE
    if n != want:
        raise SnapshotError(f"{'truncated' if n < want else 'oversized'} snapshot: {n} bytes, "
                            f"the frame declares {want}")
    if _digest(memoryview(data)[:-DIGEST_SIZE]) != data[-DIGEST_SIZE:]:
        raise SnapshotError("checksum mismatch: the snapshot is corrupted")
    try:
        header = json.loads(data[prefix.size:prefix.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(f"unreadable snapshot header: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"the snapshot header is a JSON {type(header).__name__}, "
                            "not an object")
    with inconsistent("header", repr):
        _check_header(header)
        size = header["body"]["size"]
        if header["body"]["compression"] != "zlib" or not isinstance(size, int) \
                or isinstance(size, bool) or not 0 <= size <= MAX_BODY \
                or (raw is not None and size != raw) \
                or size > ZLIB_MAX_RATIO * blen + 64:
            raise SnapshotError(f"bad body description {header['body']!r} (the frame "
                                f"declares {blen} compressed bytes"
                                + (f", {raw} inflated)" if raw is not None else ")"))
        layout = _layout(header, size)
        body = _inflate(data[prefix.size + hlen:prefix.size + hlen + blen], size)
        arrays = _arrays(layout, memoryview(body))
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


def _layout(header, size: int) -> dict:
    """Every array's (dtype, shape, offset, size) as the header describes it, checked
    against the counts the header gives and laid out end to end in ``size`` bytes
    (the inflated body's size), before anything is inflated."""
    eng = header["engine"]
    sizes = _struct_sizes()
    if eng["struct_sizes"] != sizes:
        raise SnapshotError("the snapshot was written by a kvmwake with other engine "
                            f"structure sizes ({eng['struct_sizes']})")
    scalars = eng["scalars"]
    arch = header["host"]["arch"]
    nth = 0
    for i, vd in enumerate(header["vms"]):
        n = _int(vd["nr_vcpus"], f"VM {i}'s nr_vcpus")
        if not 1 <= n <= MAX_VCPUS[arch]:
            raise SnapshotError(f"VM {i}: nr_vcpus = {n} out of range 1..{MAX_VCPUS[arch]}")
        nth += n
    nvm = len(header["vms"])
    ncpu = header["host"]["host_cpus"]
    if isinstance(ncpu, bool) or not isinstance(ncpu, int) or not 1 <= ncpu <= 1 << 20:
        raise SnapshotError(f"snapshot host configuration is invalid: host_cpus = {ncpu!r}")
    nth += len(host_thread_records(header))
    if scalars["tcount"] > scalars["tcap"] or scalars["tlcount"] > scalars["tlcap"]:
        raise SnapshotError("trace or timeline record count above its capacity")
    # Records each array must hold, from the header's counts (None: any number).
    expect = {"threads": nth, "irqs": nth, "stats": nth, "exitq": nth, "tlbase": nth,
              "vms": nvm, "gics": nvm, "cpus": ncpu, "lat": LAT_BUCKETS,
              "costtab": len(DRAWN_COSTS) * COST_TABLE_N,
              "trace": scalars["tcount"], "timeline": scalars["tlcount"]}
    out = {}
    end = 0
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
        count = math.prod(shape)
        start = end + (-end) % 8
        if count * np.dtype(dtype).itemsize != nbytes or off != start or off + nbytes > size:
            raise SnapshotError(f"array {name}: shape {shape}, {nbytes} bytes at offset "
                                f"{off} do not fit the {size}-byte body (next offset {start})")
        struct = _ARRAY_STRUCTS.get(name)
        rec = sizes[struct] if struct is not None else (
            NR_STATS * 8 if name == "stats" else np.dtype(dtype).itemsize)
        if nbytes % rec:
            raise SnapshotError(f"array {name}: size {nbytes} is not a whole number of "
                                f"{rec}-byte {struct or name} records")
        if name in expect and nbytes // rec != expect[name]:
            what = {"cpus": "host CPUs", "lat": "latency buckets",
                    "threads": "vCPU and host threads",
                    "vms": "VMs"}.get(name, "records")
            raise SnapshotError(f"inconsistent array sizes: array {name} holds "
                                f"{nbytes // rec} {what}, which disagrees with the "
                                f"header's count {expect[name]}")
        out[name] = (dtype, shape, off, count)
        end = off + nbytes
    if end != size:
        raise SnapshotError(f"the arrays end at byte {end} of the {size}-byte body")
    if out["stats"][1][1] != NR_STATS:
        raise SnapshotError(f"array stats: {out['stats'][1][1]} stats per vCPU, "
                            f"expected {NR_STATS}")
    return out


def _arrays(layout: dict, body) -> dict:
    """The arrays of an inflated body, by ``_layout``'s description."""
    return {name: np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape).copy()
            for name, (dtype, shape, off, count) in layout.items()}


def _check_header(h) -> None:
    host = h["host"]
    if host["arch"] not in ("arm64", "x86") or host["engine"] != "core":
        raise ValueError(f"host arch/engine {host['arch']!r}/{host['engine']!r}")
    for k in _SCALARS:
        v = h["engine"]["scalars"][k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << 64):
            raise ValueError(f"scalar {k} = {v!r}")
    if not isinstance(h["vms"], list) or not all(isinstance(vd, dict) for vd in h["vms"]):
        raise ValueError("vms is not a list of objects")
    if not isinstance(h.get("run", {}), dict):
        raise ValueError(f"run is {h['run']!r}, not an object")
    i = h.get("vm_index")
    if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
        raise ValueError(f"vm_index is {i!r}, not an integer")


def host_thread_records(header) -> list:
    """The header's host threads (``host["threads"]``, absent: none), checked and
    normalised: ``{"g", "name", "affinity"}`` each, in thread order."""
    recs = header["host"].get("threads", [])
    ncpu = header["host"]["host_cpus"]
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise SnapshotError("the host threads' records are not a list of objects")
    out, names = [], set()
    for i, r in enumerate(recs):
        if set(r) != {"g", "name", "affinity"}:
            raise SnapshotError(f"host thread {i}: its record has fields {sorted(r)}, "
                                "expected affinity, g, name")
        g = _int(r["g"], f"host thread {i}'s g")
        aff = r["affinity"]
        if not isinstance(r["name"], str) or not r["name"].strip() or r["name"] in names \
                or (out and g <= out[-1]["g"]) or g < 0 or not isinstance(aff, list) \
                or not aff or any(isinstance(c, bool) or not isinstance(c, int)
                                  or not 0 <= c < ncpu for c in aff) \
                or aff != sorted(set(aff)):
            raise SnapshotError(f"host thread {i}: its thread index, name or affinity is "
                                "invalid or out of order")
        names.add(r["name"])
        out.append({"g": g, "name": r["name"], "affinity": tuple(aff)})
    return out


def _vm_records(header, nthreads: int) -> list:
    """The header's VM records, checked and normalised (see ``Snapshot``)."""
    arch = header["host"]["arch"]
    hosts = {r["g"] for r in host_thread_records(header)}
    counts = []
    for i, vd in enumerate(header["vms"]):
        n = _int(vd["nr_vcpus"], f"VM {i}'s nr_vcpus")
        if not 1 <= n <= MAX_VCPUS[arch]:
            raise SnapshotError(f"VM {i}: nr_vcpus = {n} out of range 1..{MAX_VCPUS[arch]}")
        if not isinstance(vd["vcpus"], list) or len(vd["vcpus"]) != n:
            raise SnapshotError(f"VM {i}: the vCPU records do not match its {n} vCPUs")
        counts.append(n)
    if sum(counts) + len(hosts) != nthreads or any(g >= nthreads for g in hosts):
        raise SnapshotError(f"inconsistent array sizes: the VMs have {sum(counts)} vCPUs "
                            f"and the host {len(hosts)} host threads, array threads holds "
                            f"{nthreads}")
    out = []
    first = 0
    for index, vd in enumerate(header["vms"]):
        while first in hosts:               # host threads between the VMs' threads
            first += 1
        if any(first + i in hosts for i in range(counts[index])):
            raise SnapshotError(f"VM {index}: a host thread among its vCPU threads")
        rec = {"first": first, "nr_vcpus": int(vd["nr_vcpus"]), "nr_spis": int(vd["nr_spis"]),
               "halt_poll_cap": vd["halt_poll_cap"], "tick_ns": int(vd["tick_ns"]),
               "suspend_cap": bool(vd["suspend_cap"]),
               "memory_size": _int(vd["memory_size"], "memory_size")}
        if not 1 << 12 <= rec["memory_size"] <= 1 << 48 or rec["nr_spis"] < 0 \
                or rec["tick_ns"] < 0 or _int(vd["exits"], "exits") < 0:
            raise SnapshotError(f"VM {index}: memory size, SPI count, tick or exit count "
                                "out of range")
        cap = rec["halt_poll_cap"]
        if cap is not None and not 0 <= _int(cap, "halt_poll_cap") <= 0xFFFF_FFFF:
            raise SnapshotError(f"VM {index}: halt_poll_cap out of range")
        rec["exits"] = int(vd["exits"])
        vcpus = []
        for v in vd["vcpus"]:
            held = v["held"]
            if held is not None:
                held = {k: _int(held[k], "a held exit's " + k) for k in _HELD_KEYS}
            if not isinstance(v["loaded"], bool) or not isinstance(v["started"], bool):
                raise SnapshotError(f"VM {index}: a vCPU's loaded or started flag is not "
                                    "a boolean")
            vcpus.append({"loaded": v["loaded"], "started": v["started"], "held": held})
        rec["vcpus"] = vcpus
        pol = vd["vmm"]
        if not isinstance(pol, dict) or not isinstance(pol.get("class"), str):
            raise SnapshotError(f"VM {index}'s VMM policy record is invalid")
        rec["vmm"] = pol
        out.append(rec)
        first += rec["nr_vcpus"]
    return out


# -- checks that need the restored host ---------------------------------------------------

def check_host_cpus(snap: Snapshot, host_cpus: int) -> None:
    """The host CPU array must be that of a host of ``host_cpus`` CPUs (the host
    configuration's count, once the host built from it has accepted it)."""
    size = _struct_sizes()["cpu_t"]
    if len(snap.arrays["cpus"]) != host_cpus * size:
        raise SnapshotError(f"inconsistent array sizes: array cpus holds "
                            f"{len(snap.arrays['cpus']) // size} host CPUs, "
                            f"the host has {host_cpus}")


def check_engine(snap: Snapshot, engine) -> list:
    """The VM records against ``engine``, which has imported the snapshot's arrays:
    VM layout, capabilities, programs, held exits and which threads are host threads.

    Returns per vCPU thread g (a dict) the vCPU's ``(loaded, started)`` as the engine's state
    says, not as the header does: loaded is having a program; started is the
    header's flag for a vCPU outside ``KVM_RUN`` with a program (one that ran
    and exited, or one still to be started), and true for one inside it."""
    from ._core import _engine_exit_record, _engine_view
    vms, threads, queued = _engine_view(engine)
    if len(vms) != len(snap.vms):
        raise SnapshotError(f"inconsistent array sizes: array vms holds {len(vms)} VMs, "
                            f"the header describes {len(snap.vms)}")
    for index, (rec, (first, n, spis, cap, tick, susp)) in enumerate(zip(snap.vms, vms)):
        if (first, n, spis) != (rec["first"], rec["nr_vcpus"], rec["nr_spis"]):
            raise SnapshotError(f"VM {index}: the header's vCPUs and SPIs disagree with "
                                "the engine's")
        if cap != rec["halt_poll_cap"] or tick != rec["tick_ns"] or susp != rec["suspend_cap"]:
            raise SnapshotError(f"VM {index}: the header's halt-poll cap, tick or "
                                "suspend cap disagrees with the engine's")
        for vid, v in enumerate(rec["vcpus"]):
            g = rec["first"] + vid
            has_prog, state = threads[g]
            if v["loaded"] and not has_prog:
                raise SnapshotError(f"VM {index} vCPU {vid}: loaded, but the engine "
                                    "holds no program for it")
            if v["held"] is not None and (state != 0 or v["held"]
                                          != _engine_exit_record(engine, g)):
                raise SnapshotError(f"VM {index} vCPU {vid}: its held exit is not the "
                                    "engine's last exit of a vCPU outside KVM_RUN")
    hosts = {r["g"] for r in host_thread_records(snap.header)}
    kinds = engine.thread_kinds()
    if hosts != {g for g, k in enumerate(kinds) if k == THREAD_HOST}:
        raise SnapshotError("the header's host threads disagree with the engine's")
    for g in set(queued):
        if threads[g][1] != 0:
            raise SnapshotError(f"thread {g}: in the exit queue but inside KVM_RUN")
    held = {rec["first"] + vid for rec in snap.vms for vid, v in enumerate(rec["vcpus"])
            if v["held"]}
    if len(set(queued)) != len(queued) or held & set(queued):
        raise SnapshotError("a vCPU's exit both held and queued, or queued twice")
    for g in set(queued) | held:
        try:
            from_engine(_engine_exit_record(engine, g))
        except (ValueError, KeyError) as exc:
            raise SnapshotError(f"thread {g}: an exit to userspace that is none "
                                f"({exc})") from None
    # A vCPU inside KVM_RUN, or whose exit waits (held or queued), has started; one
    # outside with nothing waiting may be either (not run yet, or ran and exited).
    waiting = held | set(queued)
    return {rec["first"] + vid: (has_prog, state != 0 or rec["first"] + vid in waiting
                                 or (has_prog and v["started"]))
            for rec in snap.vms for vid, (v, (has_prog, state))
            in enumerate(zip(rec["vcpus"], threads[rec["first"]:rec["first"] + rec["nr_vcpus"]]))}


def policy_class(index: int, name: str, vmm_classes: dict):
    """The class of VM ``index``'s policy ``name`` ("module:QualName"): one the caller
    passed in ``vmm_classes``, or one of ``kvmwake.vmm``'s; nothing else is looked up."""
    cls = vmm_classes.get(name)
    if cls is None:
        mod, _, qual = name.partition(":")
        if mod == _vmm.__name__ and hasattr(_vmm, qual) and isinstance(getattr(_vmm, qual), type) \
                and issubclass(getattr(_vmm, qual), _vmm.Vmm):
            cls = getattr(_vmm, qual)
        else:
            raise SnapshotError(f"VM {index}'s VMM policy is {name}; pass it to restore() "
                                f"as vmm_classes={{{name!r}: TheClass}}")
    return cls


def check_policy_state(cls, state) -> None:
    """A policy's saved state may set data attributes, never replace its methods."""
    if not isinstance(state, dict):
        raise SnapshotError(f"a VMM policy state is {type(state).__name__}, not an object")
    for k in state:
        if not isinstance(k, str):
            continue
        attr = inspect.getattr_static(cls, k, None)
        if callable(attr) or hasattr(attr, "__get__"):
            raise SnapshotError(f"a VMM policy state names {k!r}, which is a method or "
                                f"property of {cls.__qualname__}")
