"""A small PNG writer for the comparison picture when matplotlib is not installed.

Draws two series of histogram bars side by side (kernel blue, model orange)
on axes, without text: ``pip install 'kvmwake[plot]'`` gives the labelled
matplotlib figure instead.  Only ``zlib`` and numpy are used.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

COLORS = ((31, 119, 180), (255, 127, 14))


def write_rgb(path: str | Path, img: np.ndarray) -> None:
    """Write an (h, w, 3) uint8 array as an 8-bit RGB PNG."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


def bar_chart(path, a, b, labels=("a", "b"), title="", width=720, height=400) -> None:
    """Bars of ``a`` and ``b`` (same length), over the buckets where either is non-zero."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    nz = np.nonzero(a + b)[0]
    lo, hi = (int(nz.min()), int(nz.max()) + 1) if nz.size else (0, len(a))
    a, b = a[lo:hi], b[lo:hi]
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 50, width - 20, 30, height - 40
    img[bottom, left:right] = 0
    img[top:bottom + 1, left] = 0
    top_val = max(a.max() if a.size else 0, b.max() if b.size else 0, 1)
    n = len(a)
    slot = (right - left) / max(n, 1)
    for i in range(n):
        for j, (vals, col) in enumerate(((a, COLORS[0]), (b, COLORS[1]))):
            x0 = int(left + i * slot + slot * (0.1 + 0.4 * j))
            x1 = max(x0 + 1, int(left + i * slot + slot * (0.1 + 0.4 * (j + 1))))
            y0 = int(bottom - (bottom - top) * vals[i] / top_val)
            img[y0:bottom, x0:x1] = col
        img[bottom:bottom + 5, int(left + (i + 0.5) * slot)] = 0
    for j, col in enumerate(COLORS):                      # legend boxes
        img[8:20, width - 120 + 60 * j:width - 100 + 60 * j] = col
    write_rgb(path, img)
