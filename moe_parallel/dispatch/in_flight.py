"""A dispatch or combine that has started and not finished: what overlap is built on.

    started = dispatcher.dispatch_start(x, routing, pad_to)   # its exchange is now in flight
    ...                                                       # compute that does not read it
    expert_in, group_sizes, handle = started.finish()         # waits, then the local steps

and likewise ``combine_start(expert_out, handle).finish() -> y``. ``dispatch`` is
``dispatch_start(...).finish()``. ``TokenDispatcher`` (``base.py``) declares both ``*_start``
methods; its default runs the work synchronously at the start (nothing overlaps).
``start_beside(fn, x)`` starts compute that runs beside the exchanges: on CUDA on a side stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

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


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side CUDA stream of ``device`` (one per device, created on first use)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def start_beside(fn: Callable[[Tensor], Tensor], x: Tensor) -> InFlight[Tensor]:
    """``fn(x)``, started so that it runs beside the work queued after it.

    On CUDA: ``fn`` is queued on the device's side stream, after the side stream waits for
    everything queued so far on the current stream (so ``x`` is ready); ``finish()`` makes the
    current stream wait for the side stream and returns ``fn(x)``. Kernels queued on the current
    stream between the two (the dispatch's permutation, the routed experts' GEMMs) and NCCL's
    exchange on its own stream run concurrently with ``fn``. Autograd runs each backward op on
    its forward op's stream, so ``fn``'s backward is on the side stream too. ``x`` and the result
    are recorded on the stream that uses them, so the caching allocator cannot reuse their memory
    early. On CPU ``fn(x)`` runs at the start (a gloo exchange proceeds in gloo's own thread).
    """
    if not x.is_cuda:
        return done(fn(x))
    main = torch.cuda.current_stream(x.device)
    side = side_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        x.record_stream(side)
        y = fn(x)

    def finish() -> Tensor:
        main.wait_stream(side)
        y.record_stream(main)
        return y

    return InFlight(finish)
