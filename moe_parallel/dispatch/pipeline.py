"""Dispatch → experts → combine for one forward, optionally in pipelined chunks.

With ``chunks = n`` the rows are split into ``n`` consecutive chunks (``bounds[i] = ⌊N·i/n⌋``;
empty ones included, so every rank runs the same collectives) and run as

    start(0); side; for i: start(i+1), finish(i), experts(i), combine_start(i); finish combines

so chunk ``i+1``'s dispatch exchange is in flight while chunk ``i``'s experts compute. ``side``
(e.g. the shared experts, ``in_flight.start_beside``) starts while the first dispatch exchange
is in flight and finishes after the last combine. Each row's result is that of one chunk:
    y = cat_i combine_i(experts(dispatch_i(rows_i)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..routing.router import Routing
from .in_flight import InFlight

if TYPE_CHECKING:
    from .base import DispatchHandle, TokenDispatcher

# experts(expert_in [N, H], group_sizes [E_local] CPU int64) -> (out [N, H], padded rows or None)
ExpertsFn = Callable[[Tensor, Tensor], tuple[Tensor, Optional[int]]]


@dataclass
class PipelineResult:
    """The combined output and what the routing statistics need."""

    y: Tensor                  # [N, H] combined output of the rows
    side: Optional[Tensor]     # the side computation's result (None without one)
    tokens_per_expert: Tensor  # [E] kept assignments of this rank's rows per expert
    row_map: Tensor            # [N, k] -1 where dropped
    num_rows: int              # rows the local experts received (padding included)
    padded_rows: Optional[int]  # the experts' own padded row count (None: they pad nothing)
    overflow: bool             # a row budget dropped assignments


def split_rows(rows: Tensor, routing: Routing, chunks: int) -> list[tuple[Tensor, Routing]]:
    """``chunks`` consecutive pieces ``(rows[a:b], routing[a:b])``,
    ``a, b = ⌊N·i/n⌋, ⌊N·(i+1)/n⌋``."""
    if chunks == 1:
        return [(rows, routing)]
    bounds = [rows.shape[0] * i // chunks for i in range(chunks + 1)]
    return [(rows[a:b], replace(routing, expert_idx=routing.expert_idx[a:b],
                                probs=routing.probs[a:b],
                                keep=None if routing.keep is None else routing.keep[a:b]))
            for a, b in zip(bounds, bounds[1:])]


def _gather(handles: list[DispatchHandle]) -> tuple[Tensor, Tensor, bool]:
    """``(row_map, tokens_per_expert, overflow)`` of the chunks' handles, in row order."""
    row_map = handles[0].row_map if len(handles) == 1 else torch.cat([h.row_map for h in handles])
    tokens_per_expert = handles[0].tokens_per_expert
    for h in handles[1:]:
        tokens_per_expert = tokens_per_expert + h.tokens_per_expert
    return row_map, tokens_per_expert, any(h.overflow for h in handles)


def run_pipeline(dispatcher: TokenDispatcher, experts: ExpertsFn, rows: Tensor,
                 routing: Routing, pad_to: int = 0, chunks: int = 1,
                 side: Optional[Callable[[], InFlight[Tensor]]] = None) -> PipelineResult:
    """Dispatch ``rows`` by ``routing``, apply ``experts``, combine (module docstring)."""
    pieces = split_rows(rows, routing, chunks)
    started = [dispatcher.dispatch_start(*pieces[0], pad_to)]
    side_started = side() if side is not None else None
    combines, handles, num_rows, padded = [], [], 0, None
    for i in range(chunks):
        if i + 1 < chunks:
            started.append(dispatcher.dispatch_start(*pieces[i + 1], pad_to))
        expert_in, group_sizes, handle = started[i].finish()
        out, chunk_padded = experts(expert_in, group_sizes)
        combines.append(dispatcher.combine_start(out, handle))
        handles.append(handle)
        num_rows += expert_in.shape[0]
        if chunk_padded is not None:
            padded = (padded or 0) + chunk_padded
    ys = [c.finish() for c in combines]
    side_out = side_started.finish() if side_started is not None else None
    y = ys[0] if chunks == 1 else torch.cat(ys)
    row_map, tokens_per_expert, overflow = _gather(handles)
    return PipelineResult(y, side_out, tokens_per_expert, row_map, num_rows, padded, overflow)
