"""LocalDispatcher: every expert on this process; dispatch is ``permute``, combine ``unpermute``.

    expert_in = rows of the kept assignments sorted by (expert, t, j)     (``ops.permute``)
    y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]             (``ops.unpermute``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..routing.router import Routing
from .base import DispatchHandle, TokenDispatcher
from .row_budget import RowBudget


@dataclass
class LocalHandle(DispatchHandle):
    """What ``LocalDispatcher.combine`` needs from its ``dispatch``."""

    row_map: Tensor            # [T, k] row of (t, j) in expert_in, -1 when dropped
    probs: Tensor              # [T, k] combine weights
    tokens_per_expert: Tensor  # [E] real (unpadded) rows per expert
    overflow: bool = False


class LocalDispatcher(TokenDispatcher):
    """All experts live on this process: dispatch is a permutation, combine its weighted inverse.

    ``pad_to > 0`` lays every expert's rows out as exactly ``pad_to`` rows (zero padding after
    the real ones), giving static shapes for capacity mode. Its grid is one rank (no
    ``parallel_state``).
    """

    def __init__(self, num_experts: int, row_budget: Optional[RowBudget] = None) -> None:
        super().__init__(num_experts, None, row_budget)

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, LocalHandle]:
        """``(expert_in [N, H], group_sizes [E] CPU int64, handle)``: the kept assignments of ``x``
        sorted by expert (``pad_to > 0``: every expert padded to ``pad_to`` rows)."""
        routing, overflow, _ = self.enforce_row_budget(routing)
        # Dropless: one host round trip checks the ids and brings the group sizes along. Padded
        # (pad_to > 0), as in the all-to-all dispatch, the counts are bounded by capacity
        # (apply_capacity) and the ids by the router, so nothing is read back; nor under
        # torch.compile, where the router's ids are in range by construction.
        host_counts = None if pad_to > 0 or torch.compiler.is_compiling() else (
            ops.expert_counts(routing.expert_idx, self.num_experts, routing.keep, pad_to))
        expert_in, row_map, counts = ops.permute(
            x, routing.expert_idx, self.num_experts, routing.keep, pad_to, validate=False
        )
        if pad_to > 0:
            group_sizes = torch.full((self.num_experts,), pad_to, dtype=torch.int64)
        else:
            group_sizes = counts.cpu() if host_counts is None else host_counts
        return expert_in, group_sizes, LocalHandle(row_map, routing.probs, counts, overflow)

    def combine(self, expert_out: Tensor, handle: LocalHandle) -> Tensor:
        """``y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]``, ``[T, H]``."""
        return ops.unpermute(expert_out, handle.row_map, handle.probs, validate=False)
