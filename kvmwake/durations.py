"""Durations as text: ``"20us"`` -> 20000 ns.

The one parser of durations: scenario files (``kvmwake.scenarios``) and the
guest program builders (``guest.compute("20us")``) both call ``duration``.
"""

from __future__ import annotations

import re

UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_DUR = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s)")
#: The largest duration anything accepts (virtual times are below 2**62 ns).
MAX_DURATION_NS = 1 << 62
_ACCEPTED = "a number directly followed by its unit, ns, us, ms or s, like \"20us\""


def duration(text, what="duration", bare_ns: bool = False) -> int:
    """``"20us"`` -> 20000; a fraction must come out a whole ns.

    A duration needs its unit: a bare number (``20`` or ``"20"``) is an error
    unless ``bare_ns`` (a key whose name says ns, like ``halt_poll_ns``) or it
    is 0, so that ``sim = 20`` is not silently 20 ns.  No space between number and unit.
    Values above ``MAX_DURATION_NS`` are rejected before any arithmetic on them.
    """
    pre = f"{what}: " if what else ""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"{pre}expected a duration, {_ACCEPTED}, not {text!r}")
    if isinstance(text, int) or re.fullmatch(r"[0-9]+", text):
        if not bare_ns and int(text) != 0:
            raise ValueError(f"{pre}{text!r} has no unit; write {_ACCEPTED}")
        value = int(text)
        if value < 0:
            raise ValueError(f"{pre}{text} is negative")
    else:
        m = _DUR.fullmatch(text)
        if not m:
            if text.startswith("-"):
                raise ValueError(f"{pre}{text!r} is negative")
            raise ValueError(f"{pre}{text!r} is not a duration; write {_ACCEPTED}")
        num, unit = m.groups()
        if len(num) > 40:
            raise ValueError(f"{pre}{text!r} is too long a number")
        scale = UNITS[unit]
        if "." in num:
            whole, frac = num.split(".")
            f18 = int(frac.ljust(18, "0")[:18]) if len(frac) <= 18 else None
            if f18 is None or f18 * scale % 10 ** 18:
                raise ValueError(f"{pre}{text!r} is not a whole number of ns")
            value = int(whole) * scale + f18 * scale // 10 ** 18
        else:
            value = int(num) * scale
    if value > MAX_DURATION_NS:
        raise ValueError(f"{pre}{text!r} is above the longest duration, 2**62 ns "
                         f"(about 146 years)")
    return value
