"""A dispatch or combine that has started and not finished: what overlap is built on.

    started = dispatcher.dispatch_start(x, routing, pad_to)   # its exchange is now in flight
    ...                                                       # compute that does not read it
    expert_in, group_sizes, handle = started.finish()         # waits, then the local steps

and likewise ``combine_start(expert_out, handle).finish() -> y``. ``dispatch`` is
``dispatch_start(...).finish()``. ``start_dispatch`` / ``start_combine`` take any dispatcher:
one without the ``*_start`` methods runs synchronously at the start (nothing overlaps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

from ..routing.router import Routing

T = TypeVar("T")


class InFlight(Generic[T]):
    """Started work; ``finish()`` (once) waits for its exchange and returns its result."""

    def __init__(self, finish: Callable[[], T]) -> None:
        self._finish: Callable[[], T] | None = finish

    def finish(self) -> T:
        if self._finish is None:
            raise RuntimeError("finish() was already called on this dispatch/combine")
        fn, self._finish = self._finish, None
        return fn()


def done(value: T) -> InFlight[T]:
    """Work that finished at its start."""
    return InFlight(lambda: value)


def start_dispatch(dispatcher, x: Tensor, routing: Routing, pad_to: int = 0) -> InFlight:
    """``dispatcher.dispatch_start(...)``, or its ``dispatch(...)`` run now."""
    start = getattr(dispatcher, "dispatch_start", None)
    if start is not None:
        return start(x, routing, pad_to)
    return done(dispatcher.dispatch(x, routing, pad_to))


def start_combine(dispatcher, expert_out: Tensor, handle) -> InFlight[Tensor]:
    """``dispatcher.combine_start(...)``, or its ``combine(...)`` run now."""
    start = getattr(dispatcher, "combine_start", None)
    if start is not None:
        return start(expert_out, handle)
    return done(dispatcher.combine(expert_out, handle))
