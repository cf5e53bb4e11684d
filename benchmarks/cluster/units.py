"""How the cluster report writes times and sizes."""

from __future__ import annotations

from typing import Optional


def ms(s: Optional[float]) -> str:
    """Seconds as milliseconds, 3 decimals ("-" for None)."""
    return "-" if s is None else f"{s * 1e3:.3f}"


def us(s: Optional[float]) -> str:
    """Seconds as microseconds, 1 decimal ("-" for None)."""
    return "-" if s is None else f"{s * 1e6:.1f}"


def size(b: float) -> str:
    """Bytes as MiB, KiB or B, shortest exact form (``%g``)."""
    for unit, f in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= f:
            return f"{b / f:g}{unit}"
    return f"{b:g}B"


def span(t: dict, unit=ms) -> str:
    """``[min-max]`` of a timing summary (``t["min"]``, ``t["max"]`` in seconds) in ``unit``."""
    return "[" + unit(t["min"]) + "-" + unit(t["max"]) + "]"
