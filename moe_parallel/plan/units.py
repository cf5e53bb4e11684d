"""Memory sizes as people write them: parse ``"80GB"``, ``"80 GiB"``, ``"81920MiB"``; format bytes.

A size is a number (integer or decimal) and a unit, optionally separated by spaces; the unit is
case-insensitive. SI units are powers of 1000 (``B``, ``KB``, ``MB``, ``GB``, ``TB``), binary
units powers of 1024 (``KiB``, ``MiB``, ``GiB``, ``TiB``): ``80GB`` is 80·10⁹ bytes, ``80 GiB``
and ``81920MiB`` are 80·2³⁰. A bare number or any other text is refused.
"""

from __future__ import annotations

import math
import re

__all__ = ["UNITS", "format_bytes", "parse_bytes"]

UNITS: dict[str, int] = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_UNIT_NAMES = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]+)\s*$")


def parse_bytes(text: str, name: str = "size") -> int:
    """Bytes of ``text`` (module docstring), rounded down to a whole byte. ``ValueError`` naming
    ``name`` (e.g. ``"--gpu-memory"``) and the accepted forms when it cannot be parsed."""
    m = _SIZE.match(text) if isinstance(text, str) else None
    unit = m.group("unit").lower() if m else None
    if m is None or unit not in UNITS:
        raise ValueError(
            f"{name}: cannot parse {text!r} as a memory size; write a number and a unit, e.g. "
            f"80GB, 80 GiB or 81920MiB (units: {_UNIT_NAMES})")
    value = float(m.group("num")) * UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{name}: {text!r} is not a finite size")
    return int(value)


def format_bytes(n: float, unit: str = "GiB", digits: int = 1) -> str:
    """``n`` bytes in ``unit`` (a key of ``UNITS``, any case) with ``digits`` decimals."""
    scale = UNITS[unit.lower()]
    return f"{n / scale:.{digits}f}"
