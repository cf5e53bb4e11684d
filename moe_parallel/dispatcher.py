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

import torch
from torch import Tensor

from . import ops
from .router import Routing


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
