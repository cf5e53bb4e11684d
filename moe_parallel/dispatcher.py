"""Token dispatchers: move routed tokens to their experts and bring the results back.

Contract of every dispatcher (the expert-parallel ones follow it too):
    expert_in, group_sizes, handle = dispatcher.dispatch(x, routing, pad_to)
    y = dispatcher.combine(expert_out, handle)
``x`` [T, H] are this rank's tokens; ``expert_in`` [N, H] holds the rows of this rank's local
experts grouped by local expert, ``group_sizes`` [E_local] (CPU int64) their row counts (padding
included); ``expert_out`` is the experts' output for those rows. ``combine`` returns
    y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]            [T, H].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from . import comm, ops
from .router import Routing

if TYPE_CHECKING:
    from .parallel_state import ParallelState


@dataclass
class LocalHandle:
    """What ``LocalDispatcher.combine`` needs from its ``dispatch``."""

    row_map: Tensor            # [T, k] row of (t, j) in expert_in, -1 when dropped
    probs: Tensor              # [T, k] combine weights
    tokens_per_expert: Tensor  # [E] real (unpadded) rows per expert


class LocalDispatcher:
    """All experts live on this process: dispatch is a permutation, combine its weighted inverse.

    ``pad_to > 0`` lays every expert's rows out as exactly ``pad_to`` rows (zero padding after
    the real ones), giving static shapes for capacity mode.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, LocalHandle]:
        expert_in, row_map, counts = ops.permute(
            x, routing.expert_idx, self.num_experts, routing.keep, pad_to
        )
        if pad_to > 0:
            group_sizes = torch.full((self.num_experts,), pad_to, dtype=torch.int64)
        else:
            group_sizes = counts.to("cpu", torch.int64)
        return expert_in, group_sizes, LocalHandle(row_map, routing.probs, counts)

    def combine(self, expert_out: Tensor, handle: LocalHandle) -> Tensor:
        return ops.unpermute(expert_out, handle.row_map, handle.probs)


# ---- expert parallel ----------------------------------------------------------------------------


@dataclass
class AllToAllHandle:
    """What ``AllToAllDispatcher.combine`` needs from its ``dispatch``."""

    row_map: Tensor            # [T, k] row of (t, j) in this rank's send buffer, -1 = dropped
    probs: Tensor              # [T, k] combine weights
    tokens_per_expert: Tensor  # [E] this rank's real (unpadded) rows per global expert
    send_splits: list[int]     # rows sent to each EP rank
    recv_splits: list[int]     # rows received from each EP rank
    etp_splits: list[int]      # rows each ETP rank received from its all-to-all (etp > 1)
    chunk_sizes: Tensor        # [etp * ep * E_local] CPU int64, rows in arrival order


def _expert_major_order(etp: int, ep: int, num_local: int) -> Optional[Tensor]:
    """Order that takes chunks ``(t, s, l)`` (ETP source, EP source, local expert; ``l`` fastest)
    to ``(l, t, s)``; None when that is the identity."""
    if etp * ep == 1 or num_local == 1:
        return None
    return torch.arange(etp * ep * num_local).view(etp * ep, num_local).t().reshape(-1)


class AllToAllDispatcher:
    """Expert-parallel dispatch over the EP (and ETP) groups of a ``ParallelState``.

    Global expert ``e`` lives on EP rank ``e // E_local`` (``E_local = E / ep``) as its local
    expert ``e % E_local``; every rank of an ETP group holds ``F / etp`` hidden units of each of
    them. Every rank brings its own tokens (with TP > 1: sequence parallel), possibly none.

    dispatch:
      1. ``permute`` this rank's kept assignments by global expert id: rank-major, expert-minor.
         With ``pad_to > 0`` every expert's segment has exactly ``pad_to`` rows (static shapes).
      2. Exchange the per-expert row counts ``[ep, E_local]`` (one all-to-all over EP), then the
         rows (all-to-all with uneven splits). Received: ``[EP source][local expert]``.
      3. ETP > 1: all-gather the counts and the rows over ETP: ``[ETP src][EP src][local expert]``.
      4. ``sort_chunks`` to ``[local expert][ETP src][EP src]``: each local expert's rows are
         contiguous; ``group_sizes[l] = Σ_{t,s} count[t, s, l]`` (padding included).
    combine (the mirror): ``sort_chunks`` back; ETP > 1: reduce-scatter the partial outputs (each
    ETP rank computed ``F / etp`` hidden units, their sum is the expert output) back to the ETP
    rank that received the rows; all-to-all back over EP;
        ``y[t] = Σ_{j kept} probs[t, j] · out[row of (t, j)]``   (``unpermute``).
    Every step is differentiable. Each rank must call ``dispatch``/``combine`` (and backward)
    in the same order as the other ranks of its EP and ETP groups.
    """

    def __init__(self, num_experts: int, parallel_state: ParallelState) -> None:
        ps = parallel_state
        if num_experts % ps.ep:
            raise ValueError(f"num_experts {num_experts} is not divisible by ep {ps.ep}")
        self.num_experts = num_experts
        self.ep, self.etp = ps.ep, ps.etp
        self.num_local_experts = num_experts // ps.ep
        self.ep_group = ps.group("ep") if ps.ep > 1 else None
        self.etp_group = ps.group("etp") if ps.etp > 1 else None
        self.order = _expert_major_order(self.etp, self.ep, self.num_local_experts)
        self.inverse_order = None if self.order is None else torch.argsort(self.order)

    def _exchange_counts(self, send_counts: Tensor) -> Tensor:
        """``[etp, ep, E_local]`` CPU int64: rows this ETP group's rank ``t`` receives from EP
        rank ``s`` for local expert ``l``."""
        ep, etp, E_local = self.ep, self.etp, self.num_local_experts
        recv = comm.all_to_all(send_counts, [E_local] * ep, [E_local] * ep, self.ep_group)
        recv = comm.all_gather(recv, self.etp_group, [ep * E_local] * etp)
        return recv.to("cpu").view(self.etp, self.ep, self.num_local_experts)

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, AllToAllHandle]:
        E, ep, E_local = self.num_experts, self.ep, self.num_local_experts
        permuted, row_map, counts = ops.permute(x, routing.expert_idx, E, routing.keep, pad_to)
        send_counts = torch.full_like(counts, pad_to) if pad_to > 0 else counts
        chunk_sizes = self._exchange_counts(send_counts)
        send_splits = send_counts.view(ep, E_local).sum(1).tolist()
        etp_splits = chunk_sizes.sum((1, 2)).tolist()
        recv_splits = chunk_sizes[comm.group_rank(self.etp_group)].sum(1).tolist()

        rows = comm.all_to_all(permuted, recv_splits, send_splits, self.ep_group)
        rows = comm.all_gather(rows, self.etp_group, etp_splits)
        chunk_sizes = chunk_sizes.reshape(-1)
        if self.order is not None:
            rows = ops.sort_chunks(rows, chunk_sizes, self.order)
        group_sizes = chunk_sizes.view(self.etp * ep, E_local).sum(0)
        handle = AllToAllHandle(
            row_map, routing.probs, counts, send_splits, recv_splits, etp_splits, chunk_sizes
        )
        return rows, group_sizes, handle

    def combine(self, expert_out: Tensor, handle: AllToAllHandle) -> Tensor:
        y = expert_out
        if self.order is not None:
            y = ops.sort_chunks(y, handle.chunk_sizes[self.order], self.inverse_order)
        y = comm.reduce_scatter(y, handle.etp_splits, self.etp_group)
        y = comm.all_to_all(y, handle.send_splits, handle.recv_splits, self.ep_group)
        return ops.unpermute(y, handle.row_map, handle.probs)
