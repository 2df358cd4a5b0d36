"""Argument types for the ``kvmwake`` command lines: integers and floats with their ranges."""

from __future__ import annotations

import argparse
import math

U32_MAX = 0xFFFF_FFFF


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must not be negative")
    return v


def threads(text: str) -> int:
    """A thread count: 1 to 4096 (kvmwake.host.MAX_THREADS)."""
    v = _int(text)
    if not 1 <= v <= 4096:
        raise argparse.ArgumentTypeError(f"{v} threads: give 1 to 4096")
    return v


def u32(text: str) -> int:
    v = _int(text)
    if not 0 <= v <= U32_MAX:
        raise argparse.ArgumentTypeError(f"{v} does not fit an unsigned int (0..{U32_MAX})")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return v


def nonempty_path(text: str) -> str:
    """A file or folder path: not empty (``-o ""`` would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (give a file or folder name)")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} holds a NUL byte")
    return text
