"""Value checks shared by ``MoEConfig`` and the routing functions: each raises ``ValueError``
naming the parameter and what it must be."""

from __future__ import annotations

import math
from typing import Optional


def _is_real(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_float(name: str, value: object, none_means: Optional[str] = None) -> None:
    """``value`` is a finite real > 0 (``none_means``: what None would mean, for the error)."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        alternative = f", or {none_means};" if none_means else ","
        raise ValueError(f"{name} must be a finite number > 0{alternative} got {value!r}")


def check_nonneg_float(name: str, value: object) -> None:
    """``value`` is a finite real >= 0."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive_int(name: str, value: object) -> None:
    """``value`` is an int (not a bool) > 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_nonneg_int(name: str, value: object) -> None:
    """``value`` is an int (not a bool) >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
