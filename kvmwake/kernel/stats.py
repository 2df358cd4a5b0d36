"""A generic reader of KVM's binary stats (``KVM_GET_STATS_FD``, api.rst 4.133).

The fd holds four blocks: a header at offset 0, an id string, the
descriptors and the data.  Nothing is assumed about where they are or how
many stats there are: the reader walks the header, then ``num_desc``
descriptors of ``16 + name_size`` bytes each::

    struct kvm_stats_header { __u32 flags, name_size, num_desc,
                              id_offset, desc_offset, data_offset; };
    struct kvm_stats_desc   { __u32 flags; __s16 exponent; __u16 size;
                              __u32 offset; __u32 bucket_size; char name[name_size]; };

and reads each stat's ``size`` u64 values at ``data_offset + offset``, all
with ``pread`` (in system endianness, as the kernel writes them).  ``flags``
decode to a type (cumulative, instant, peak, linear or log histogram), a
unit (none, bytes, seconds, cycles, boolean) and a base (10 or 2).

``read_stats(fd)`` returns ``{name: int or numpy uint64 array}`` under the
kernel's own names; ``parse_blob(bytes)`` does the same on a byte string, so
the parser is tested without ``/dev/kvm``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..uapi import KVM_STATS_BASE_MASK, KVM_STATS_TYPE_MASK, KVM_STATS_UNIT_MASK

HEADER = struct.Struct("=6I")
DESC = struct.Struct("=IhHII")
#: Sanity limits: the kernel uses name_size 48 and has ~100 stats per vCPU.
MAX_NAME_SIZE = 4096
MAX_DESCRIPTORS = 1 << 16
MAX_STAT_SIZE = 1 << 16

TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
UNITS = {0x00: "none", 0x10: "bytes", 0x20: "seconds", 0x30: "cycles", 0x40: "boolean"}
BASES = {0x000: 10, 0x100: 2}


class StatsFormatError(ValueError):
    """The stats fd (or blob) does not hold a well-formed binary stats layout."""


@dataclass(frozen=True)
class StatDesc:
    """One descriptor, decoded."""

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> str:
        return TYPES.get(self.flags & KVM_STATS_TYPE_MASK, f"type{self.flags & 0xF}")

    @property
    def unit(self) -> str:
        return UNITS.get(self.flags & KVM_STATS_UNIT_MASK, f"unit{(self.flags >> 4) & 0xF:#x}")

    @property
    def base(self) -> int:
        return BASES.get(self.flags & KVM_STATS_BASE_MASK, 0)

    @property
    def is_hist(self) -> bool:
        return self.type in ("linear_hist", "log_hist")


@dataclass(frozen=True)
class StatsLayout:
    """The immutable part of a stats fd: header fields, id string, descriptors."""

    flags: int
    name_size: int
    id: str
    data_offset: int
    descriptors: tuple[StatDesc, ...]

    def names(self) -> list[str]:
        return [d.name for d in self.descriptors]


Reader = Callable[[int, int], bytes]      # (size, offset) -> bytes


def _exact(read: Reader, size: int, offset: int, what: str) -> bytes:
    data = read(size, offset)
    if len(data) != size:
        raise StatsFormatError(f"{what}: wanted {size} bytes at offset {offset}, "
                               f"got {len(data)} (truncated stats)")
    return data


def read_layout(read: Reader) -> StatsLayout:
    """Walk the header, the id string and every descriptor."""
    flags, name_size, num_desc, id_off, desc_off, data_off = HEADER.unpack(
        _exact(read, HEADER.size, 0, "header"))
    if not 0 < name_size <= MAX_NAME_SIZE:
        raise StatsFormatError(f"header: name_size {name_size} is not in 1..{MAX_NAME_SIZE}")
    if num_desc > MAX_DESCRIPTORS:
        raise StatsFormatError(f"header: num_desc {num_desc} is more than {MAX_DESCRIPTORS}")
    for label, off in (("id_offset", id_off), ("desc_offset", desc_off),
                       ("data_offset", data_off)):
        if off < HEADER.size:
            raise StatsFormatError(f"header: {label} {off} overlaps the {HEADER.size}-byte header")
    ident = _exact(read, name_size, id_off, "id string").split(b"\0", 1)[0]
    step = DESC.size + name_size
    raw = _exact(read, step * num_desc, desc_off, "descriptors") if num_desc else b""
    descs = []
    seen = set()
    for i in range(num_desc):
        base = i * step
        dflags, exponent, size, offset, bucket = DESC.unpack_from(raw, base)
        name_b = raw[base + DESC.size:base + step].split(b"\0", 1)[0]
        try:
            name = name_b.decode("ascii")
        except UnicodeDecodeError:
            raise StatsFormatError(f"descriptor {i}: name {name_b!r} is not ASCII") from None
        if not name or not name.isprintable():
            raise StatsFormatError(f"descriptor {i}: empty or unprintable name {name_b!r}")
        if not 0 < size <= MAX_STAT_SIZE:
            raise StatsFormatError(f"descriptor {i} ({name}): size {size} is not in "
                                   f"1..{MAX_STAT_SIZE}")
        if offset % 8:
            raise StatsFormatError(f"descriptor {i} ({name}): data offset {offset} is not "
                                   f"8-byte aligned")
        if name in seen:
            raise StatsFormatError(f"descriptor {i}: duplicate name {name!r}")
        seen.add(name)
        descs.append(StatDesc(name, dflags, exponent, size, offset, bucket))
    return StatsLayout(flags, name_size, ident.decode("ascii", "replace"), data_off, tuple(descs))


def read_values(read: Reader, layout: StatsLayout) -> dict:
    """The data block, as ``{name: int}`` for scalars and ``{name: uint64 array}`` for
    histograms (and any stat of size > 1)."""
    if not layout.descriptors:
        return {}
    end = max(d.offset + 8 * d.size for d in layout.descriptors)
    data = _exact(read, end, layout.data_offset, "data block")
    dt = np.dtype(np.uint64).newbyteorder("=")
    out: dict = {}
    for d in layout.descriptors:
        vals = np.frombuffer(data, dtype=dt, count=d.size, offset=d.offset)
        if d.size == 1 and not d.is_hist:
            out[d.name] = int(vals[0])
        else:
            out[d.name] = vals.astype(np.uint64, copy=True)
    return out


def fd_reader(fd: int) -> Reader:
    return lambda size, offset: os.pread(fd, size, offset)


def blob_reader(blob: bytes) -> Reader:
    return lambda size, offset: blob[offset:offset + size]


class StatsFd:
    """A stats fd, its layout read once (the descriptors are immutable)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._read = fd_reader(fd)
        self.layout = read_layout(self._read)

    def read(self) -> dict:
        return read_values(self._read, self.layout)


def read_stats(fd: int) -> dict:
    """``{kernel name: value}`` from a stats fd (a vCPU's or a VM's)."""
    read = fd_reader(fd)
    return read_values(read, read_layout(read))


def parse_blob(blob: bytes) -> tuple[StatsLayout, dict]:
    """Layout and values from the bytes of a stats fd (for tests and saved dumps)."""
    read = blob_reader(blob)
    layout = read_layout(read)
    return layout, read_values(read, layout)


def build_blob(stats: list[tuple[str, int, int, list[int]]], ident: str = "kvm-1/vcpu-0",
               name_size: int = 48, gap: int = 0) -> bytes:
    """A stats blob laid out as the kernel does: ``stats`` is
    ``[(name, flags, exponent, values)]``.  ``gap`` puts padding between blocks
    (the reader must follow the offsets, not assume adjacency)."""
    id_off = HEADER.size + gap
    desc_off = id_off + name_size + gap
    step = DESC.size + name_size
    data_off = desc_off + step * len(stats) + gap
    data_off += (-data_off) % 8
    descs = bytearray()
    data = bytearray()
    for name, flags, exponent, values in stats:
        descs += DESC.pack(flags, exponent, len(values), len(data), 0)
        descs += name.encode().ljust(name_size, b"\0")
        data += struct.pack(f"={len(values)}Q", *values)
    blob = bytearray(data_off + len(data))
    blob[:HEADER.size] = HEADER.pack(0, name_size, len(stats), id_off, desc_off, data_off)
    blob[id_off:id_off + name_size] = ident.encode().ljust(name_size, b"\0")
    blob[desc_off:desc_off + len(descs)] = descs
    blob[data_off:] = data
    return bytes(blob)


def to_jsonable(stats: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


def diff(after: dict, before: dict) -> dict:
    """``after - before`` for cumulative values; instant ones (``blocking``) as after."""
    out = {}
    for k, v in after.items():
        b = before.get(k)
        if k == "blocking" or b is None:
            out[k] = v
        elif isinstance(v, np.ndarray):
            out[k] = v - np.asarray(b, dtype=np.uint64)
        else:
            out[k] = v - b
    return out

