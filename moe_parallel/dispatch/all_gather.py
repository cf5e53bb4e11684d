"""AllGatherDispatcher: every rank of the ETP×EP group gathers all the group's tokens and keeps
the assignments of its local experts (Megatron's ``MoEAllGatherTokenDispatcher``).

    combine: y_r = Σ_{ranks q} Y_q[rows of r]        (reduce-scatter by tokens per rank)

(steps in the class docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .. import ops
from ..distributed import collectives as comm
from ..routing.router import Routing
from .base import DispatchHandle, TokenDispatcher
from .row_budget import RowBudget

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState


@dataclass
class AllGatherHandle(DispatchHandle):
    """What ``AllGatherDispatcher.combine`` needs from its ``dispatch``.

    The gathered token space is ``cat([tokens of tp_ep rank 0], ..., [tokens of rank w-1])``
    (``T_all`` tokens); this rank's own tokens are its rows ``[offset, offset + T)``.
    """

    gathered_row_map: Tensor   # [T_all, k] row of (t, j) in expert_in; -1: dropped or not local
    gathered_probs: Tensor     # [T_all, k] combine weights of every gathered token
    gathered_idx: Tensor       # [T_all, k] global expert ids of every gathered assignment
    gathered_keep: Tensor      # [T_all, k] bool: kept assignments (any expert)
    token_counts: list[int]    # tokens of each tp_ep rank (the reduce-scatter splits)
    pads: list[int]            # pad_to of each tp_ep rank (0: that rank does not pad)
    group_rank: int            # this rank's index in the tp_ep group
    num_local_experts: int
    tokens_per_expert: Tensor  # [E] this rank's own real (unpadded) kept assignments per expert
    overflow: bool = False

    @property
    def offset(self) -> int:
        """Row of this rank's first token in the gathered token space."""
        return sum(self.token_counts[: self.group_rank])

    @cached_property
    def row_map(self) -> Tensor:
        """``[T, k]`` for this rank's own tokens: the row of ``(t, j)`` in the ``expert_in`` of
        the EP rank owning expert ``e = idx[t, j]`` (the same row on each of its ETP ranks), -1
        when dropped. Every rank holds the whole group's routing, so no communication is needed:
        sorting the gathered kept assignments by ``(e, t, j)`` (as ``permute`` does) gives each
        its position ``within`` its expert, and with ``l = e mod E_local``
            row = l · Σ_r pads[r] + within                   (padded),
            row = Σ_{e - l <= e' < e} count(e') + within      (otherwise).
        On the owning rank this equals ``gathered_row_map`` of those rows."""
        E_local = self.num_local_experts
        flat, kept = self.gathered_idx.reshape(-1), self.gathered_keep.reshape(-1)
        num_experts = self.tokens_per_expert.numel()
        key = torch.where(kept, flat, torch.full_like(flat, num_experts))  # dropped sort last
        order = torch.sort(key, stable=True).indices
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat[kept], minlength=num_experts)
        start = torch.cumsum(counts, 0) - counts  # sorted position of each expert's first row
        e = torch.where(kept, flat, torch.zeros_like(flat))
        within = pos - start[e]
        local = e % E_local
        pad = sum(self.pads)
        seg_start = local * pad if pad > 0 else start[e] - start[e - local]
        rows = torch.where(kept, seg_start + within, torch.full_like(flat, -1))
        T = self.token_counts[self.group_rank]
        return rows.view_as(self.gathered_idx)[self.offset: self.offset + T]


class AllGatherDispatcher(TokenDispatcher):
    """Expert-parallel dispatch by all-gather over the ETP×EP (``tp_ep``) group, as Megatron's
    ``MoEAllGatherTokenDispatcher``: suited to TP-heavy layouts and large ``k``, where most
    gathered tokens have work on every rank.

    Global expert ``e`` lives on EP rank ``e // E_local`` as its local expert ``e % E_local``;
    every ETP rank holds ``F / etp`` hidden units of each. Let ``r = 0..w-1`` index the
    ``w = etp · ep`` ranks of the group (``r = etp_rank + etp · ep_rank``), each with its own
    ``T_r >= 0`` tokens.

    dispatch:
      1. all-gather ``(T_r, pad_to_r)``, then the tokens ``x``, the routing ``(expert_idx, keep)``
         and ``probs``: ``X = cat_r x_r`` ``[T_all, H]`` and likewise ``IDX, KEEP, P``.
      2. Keep the assignments of local experts, ``ep_rank·E_local <= IDX < (ep_rank+1)·E_local``,
         and ``permute`` them by local id ``IDX - ep_rank·E_local`` (order ``(l, t, j)``).
         ``pad_to_r > 0`` anywhere: every local expert's segment has ``Σ_r pad_to_r`` rows (its
         kept rows, then zeros), the same static size as ``AllToAllDispatcher`` gives it.
      ``group_sizes[l]`` = rows of local expert ``l`` (padding included).
    combine: ``Y[t] = Σ_{j kept, IDX[t, j] local} P[t, j] · out[row of (t, j)]`` (``unpermute``
      into the gathered token space), then reduce-scatter over the group by ``T_r``:
          ``y_r = Σ_{ranks q} Y_q[rows of r]``,
      which adds the contributions of the experts on the other EP ranks and, with ETP > 1, the
      partial sums over ``F / etp`` hidden units of the ETP ranks. The result is
      ``y[t] = Σ_{j kept} probs[t, j] · expert_{idx[t, j]}(x[t])``, as ``AllToAllDispatcher``.
    Gradients reach ``x`` (the all-gather's backward is a reduce-scatter) and ``probs`` (the
    router: ``grad P[t, j] = <grad Y[t], out[row]>``, summed over the group). Every rank of the
    group must call ``dispatch``/``combine`` (and backward) in the same order.
    """

    def __init__(
        self, num_experts: int, parallel_state: ParallelState,
        row_budget: Optional[RowBudget] = None,
    ) -> None:
        super().__init__(num_experts, parallel_state, row_budget)
        self.first_expert = parallel_state.ep_rank * self.num_local_experts
        self.group = self.tp_ep_group

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, AllGatherHandle]:
        """``(expert_in, group_sizes [E_local] CPU int64, handle)`` from the gathered tokens of the
        ``tp_ep`` group (steps 1-2 of the class docstring). A collective over that group."""
        E, E_local, group = self.num_experts, self.num_local_experts, self.group
        w = comm.group_size(group)
        routing, overflow, _ = self.enforce_row_budget(routing)
        idx = routing.expert_idx
        keep = torch.ones_like(idx, dtype=torch.bool) if routing.keep is None else routing.keep
        tokens_per_expert = torch.bincount(idx[keep], minlength=E)

        meta = torch.tensor([[x.shape[0], pad_to]], dtype=torch.int64, device=x.device)
        token_counts, pads = comm.all_gather(meta, group, [1] * w).t().tolist()
        xs = comm.all_gather(x, group, token_counts)
        k = idx.shape[1]
        route = comm.all_gather(torch.cat([idx, keep.to(idx.dtype)], 1), group, token_counts)
        idx_all, keep_all = route[:, :k], route[:, k:].bool()
        # gathered at the activations' precision when it is higher: the gradient of each
        # weight then sums its ETP partials there, and is rounded to the router dtype once
        probs = routing.probs.to(torch.promote_types(routing.probs.dtype, x.dtype))
        probs_all = comm.all_gather(probs, group, token_counts)

        local_idx = idx_all - self.first_expert
        local = keep_all & (local_idx >= 0) & (local_idx < E_local)
        local_idx = torch.where(local, local_idx, torch.zeros_like(local_idx))
        pad = sum(pads)
        expert_in, row_map, counts = ops.permute(xs, local_idx, E_local, local, pad)
        if pad > 0:
            group_sizes = torch.full((E_local,), pad, dtype=torch.int64)
        else:
            group_sizes = counts.to("cpu", torch.int64)
        handle = AllGatherHandle(
            row_map, probs_all, idx_all, keep_all, token_counts, pads, comm.group_rank(group),
            E_local, tokens_per_expert, overflow,
        )
        return expert_in, group_sizes, handle

    def combine(self, expert_out: Tensor, handle: AllGatherHandle) -> Tensor:
        """``y[t] = Σ_{j kept} probs[t, j] · expert_{idx[t, j]}(x[t])`` for this rank's own tokens:
        the local weighted sum, reduce-scattered over the group. A collective, as ``dispatch``."""
        y = ops.unpermute(expert_out, handle.gathered_row_map, handle.gathered_probs,
                          validate=False)
        return comm.reduce_scatter(y, handle.token_counts, self.group)
