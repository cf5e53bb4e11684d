"""Dispatch → experts → combine for one forward, optionally in pipelined chunks.

Where the routing weights are applied: experts with ``takes_row_weights``
(``experts.base.RoutedExperts``) get each received row's weight ``w`` and return
``w · expert(row)`` (the weight scales the activation before the second GEMM); the combine is
then an unweighted sum, whose backward keeps no expert output rows. The weights of the rows
come from the dispatch handle where it holds them (``LocalHandle``, ``AllGatherHandle``: a
scatter of ``probs`` by the handle's row map, no communication) or travel with a second
dispatch of the ``[T·k, 1]`` weights along the same routing (``AllToAllHandle``: the permute
and all-to-all of one column, after the rows' exchange, which fixed the kept assignments);
any other dispatcher's combine applies the weights, as do experts without
``takes_row_weights``. Either way ``y[t] = Σ_{j kept} probs[t, j] · expert_{idx[t, j]}(x[t])``.

Row hashes (expert dropout, ``row_hash [T]`` int64 below 2^32, one per row of ``rows``) travel
to the experts the same way, to experts with ``takes_row_hashes``: each assignment ``(t, j)``
carries its row's hash, scattered by the handle's row map (``LocalHandle``), all-gathered over
the group then scattered (``AllGatherHandle``), or dispatched as a second ``[T·k, 1]`` float64
column (exact: every hash is below 2^53) along the same routing (``AllToAllHandle``, whose
all-gather over ETP and hierarchical or static exchange it shares). Padding rows get 0.

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

from ..distributed import collectives as comm
from ..ops.permute import scatter_to_rows
from ..routing.router import Routing
from .all_gather import AllGatherHandle
from .all_to_all import AllToAllHandle
from .in_flight import InFlight
from .local import LocalHandle

if TYPE_CHECKING:
    from .base import DispatchHandle, TokenDispatcher

# experts(expert_in [N, H], group_sizes [E_local] CPU int64[, row_weights=[N]])
#   -> (out [N, H], padded rows or None); row_weights only for experts with takes_row_weights
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


def chunk_bounds(n: int, chunks: int) -> list[int]:
    """``[⌊n·i/chunks⌋ for i = 0 .. chunks]``: where the pipeline's chunks of ``n`` rows start
    and end."""
    return [n * i // chunks for i in range(chunks + 1)]


def split_rows(rows: Tensor, routing: Routing, chunks: int) -> list[tuple[Tensor, Routing]]:
    """``chunks`` consecutive pieces ``(rows[a:b], routing[a:b])``,
    ``a, b = ⌊N·i/n⌋, ⌊N·(i+1)/n⌋``."""
    if chunks == 1:
        return [(rows, routing)]
    bounds = chunk_bounds(rows.shape[0], chunks)
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


def _widened(probs: Tensor, dtype: torch.dtype) -> Tensor:
    """``probs`` in the wider of its dtype and ``dtype`` (the rows'): the weights' gradient,
    whose ETP partial sums meet in the dispatch's backward, is summed at that precision and
    rounded to the router's dtype once."""
    return probs.to(dtype) if dtype.itemsize > probs.dtype.itemsize else probs


def dispatch_column(dispatcher: TokenDispatcher, handle: AllToAllHandle, routing: Routing,
                    column: Tensor, pad_to: int, probs: Optional[Tensor] = None) -> Tensor:
    """``[N]``: the one-column ``column [T·k, 1]`` (one value per assignment) dispatched along
    ``routing`` with the kept assignments of ``handle`` (a second all-to-all dispatch, the same
    rows, padding and exchanges as the rows' own); ``probs`` (default ``column``) the
    assignments' weights it carries."""
    n = routing.expert_idx.numel()
    single = replace(routing, expert_idx=routing.expert_idx.reshape(n, 1),
                     probs=column if probs is None else probs,
                     keep=(handle.row_map >= 0).reshape(n, 1))
    values, _, _ = dispatcher.dispatch(column, single, pad_to)
    return values.view(-1)


def expert_row_weights(dispatcher: TokenDispatcher, handle: DispatchHandle,
                       piece: tuple[Tensor, Routing], pad_to: int, expert_in: Tensor
                       ) -> tuple[Optional[Tensor], DispatchHandle]:
    """``(w [N], handle')``: the routing weight of each row of the dispatch's ``expert_in
    [N, H]``, in the wider of the router's and the rows' dtype, and a handle whose combine sums
    without weights (module docstring); or ``(None, handle)`` for a handle of another
    dispatcher (its combine keeps the weights). ``piece`` is the ``(rows, routing)`` that was
    dispatched. For ``AllToAllHandle`` a collective over the dispatcher's groups."""
    num_rows, dtype = expert_in.shape[0], expert_in.dtype
    if isinstance(handle, LocalHandle):
        return (scatter_to_rows(_widened(handle.probs, dtype), handle.row_map, num_rows),
                replace(handle, probs=None))
    if isinstance(handle, AllGatherHandle):
        return (scatter_to_rows(_widened(handle.gathered_probs, dtype),
                                handle.gathered_row_map, num_rows),
                replace(handle, gathered_probs=None))
    if isinstance(handle, AllToAllHandle):
        routing = piece[1]
        n = routing.expert_idx.numel()
        probs = _widened(routing.probs, dtype).reshape(n, 1)
        weights = dispatch_column(dispatcher, handle, routing, probs, pad_to)
        return weights, replace(handle, probs=None)
    return None, handle


def expert_row_hashes(dispatcher: TokenDispatcher, handle: DispatchHandle,
                      piece: tuple[Tensor, Routing], pad_to: int, expert_in: Tensor,
                      row_hash: Tensor) -> Tensor:
    """``[N]`` int64: the hash of the token of each row of the dispatch's ``expert_in [N, H]``
    (0 for padding rows), from this rank's ``row_hash [T]`` (one per row of the dispatched
    ``piece``; module docstring). For ``AllGatherHandle`` and ``AllToAllHandle`` a collective
    over the dispatcher's groups; ``ValueError`` for a handle of another dispatcher."""
    num_rows = expert_in.shape[0]
    k = piece[1].expert_idx.shape[1]
    per_assignment = row_hash.to(torch.int64).unsqueeze(1).expand(-1, k)
    if isinstance(handle, LocalHandle):
        return scatter_to_rows(per_assignment, handle.row_map, num_rows)
    if isinstance(handle, AllGatherHandle):
        gathered = comm.all_gather(row_hash.to(torch.int64).contiguous(), dispatcher.group,
                                   handle.token_counts)
        return scatter_to_rows(gathered.unsqueeze(1).expand(-1, k), handle.gathered_row_map,
                               num_rows)
    if isinstance(handle, AllToAllHandle):
        column = per_assignment.reshape(-1, 1).to(torch.float64)
        return dispatch_column(dispatcher, handle, piece[1], column, pad_to,
                               torch.ones_like(column)).to(torch.int64)
    raise ValueError(f"expert dropout needs the row hashes at the experts: a LocalDispatcher, "
                     f"AllToAllDispatcher (or a subclass) or AllGatherDispatcher, got "
                     f"{type(dispatcher).__name__}")


def run_pipeline(dispatcher: TokenDispatcher, experts: ExpertsFn, rows: Tensor,
                 routing: Routing, pad_to: int = 0, chunks: int = 1,
                 side: Optional[Callable[[], InFlight[Tensor]]] = None,
                 weights_to_experts: bool = True,
                 row_hash: Optional[Tensor] = None) -> PipelineResult:
    """Dispatch ``rows`` by ``routing``, apply ``experts``, combine (module docstring).
    ``weights_to_experts=False`` keeps the routing weights in the combine whatever the
    experts take. ``row_hash [T]`` (one per row of ``rows``): sent to the experts, which must
    take them (``takes_row_hashes``), as ``row_hash=`` (module docstring)."""
    to_experts = weights_to_experts and getattr(experts, "takes_row_weights", False)
    if row_hash is not None and not getattr(experts, "takes_row_hashes", False):
        raise ValueError(f"row hashes (expert dropout) need experts with takes_row_hashes, got "
                         f"{type(experts).__name__}")
    pieces = split_rows(rows, routing, chunks)
    bounds = chunk_bounds(rows.shape[0], chunks)
    hash_pieces = [None if row_hash is None else row_hash[a:b]
                   for a, b in zip(bounds, bounds[1:])]
    started = [dispatcher.dispatch_start(*pieces[0], pad_to)]
    side_started = side() if side is not None else None
    combines, handles, num_rows, padded = [], [], 0, None
    for i in range(chunks):
        if i + 1 < chunks:
            started.append(dispatcher.dispatch_start(*pieces[i + 1], pad_to))
        expert_in, group_sizes, handle = started[i].finish()
        weights, extra = None, {}
        if hash_pieces[i] is not None:
            extra["row_hash"] = expert_row_hashes(dispatcher, handle, pieces[i], pad_to,
                                                  expert_in, hash_pieces[i])
        if to_experts:
            weights, handle = expert_row_weights(dispatcher, handle, pieces[i], pad_to,
                                                 expert_in)
        if weights is not None:
            extra["row_weights"] = weights
        out, chunk_padded = experts(expert_in, group_sizes, **extra)
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
