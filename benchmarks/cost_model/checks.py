"""Argument checks of the cost model: each returns the value (as float where it says so) or
raises ValueError naming the argument."""

from __future__ import annotations

import math


def positive_int(name: str, v: object) -> int:
    """``v`` when it is an int >= 1 (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def positive_float(name: str, v: object) -> float:
    """``float(v)`` when ``0 < v < inf`` (an int or float, not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def nonneg_float(name: str, v: object) -> float:
    """``float(v)`` when ``0 <= v < inf`` (an int or float, not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def nonneg_volume(name: str, v: object) -> float:
    """``float(v)`` bytes when ``0 <= v < inf`` (an int or float, not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number of bytes >= 0, got {v!r}")
    return float(v)
