"""Routing statistics of one MoE forward: load per expert, drops, imbalance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutingStats:
    """What the router asked for and what the experts received, for one forward.

    routed_per_expert[e]: assignments the router sent to expert e (before capacity).
    tokens_per_expert[e]: assignments expert e actually processed (after capacity).
    dropped = Σ routed − Σ processed; drop_rate = dropped / Σ routed.
    max_load / mean_load: max and mean of tokens_per_expert (imbalance = max / mean).
    unrouted_tokens: tokens that reached no expert at all (dropped everywhere / chosen by none).
    """

    routed_per_expert: Tensor
    tokens_per_expert: Tensor
    num_tokens: int
    unrouted_tokens: int

    @classmethod
    def from_counts(
        cls, routed_per_expert: Tensor, tokens_per_expert: Tensor, row_map: Tensor
    ) -> RoutingStats:
        """Build from the two count vectors and the dispatch row map ([T, k], -1 = dropped)."""
        unrouted = int((row_map < 0).all(dim=1).sum()) if row_map.numel() else row_map.shape[0]
        return cls(
            routed_per_expert=routed_per_expert.detach().to("cpu", torch.int64),
            tokens_per_expert=tokens_per_expert.detach().to("cpu", torch.int64),
            num_tokens=row_map.shape[0],
            unrouted_tokens=unrouted,
        )

    @property
    def num_routed(self) -> int:
        return int(self.routed_per_expert.sum())

    @property
    def num_processed(self) -> int:
        return int(self.tokens_per_expert.sum())

    @property
    def dropped(self) -> int:
        return max(self.num_routed - self.num_processed, 0)

    @property
    def drop_rate(self) -> float:
        return self.dropped / self.num_routed if self.num_routed else 0.0

    @property
    def max_load(self) -> int:
        return int(self.tokens_per_expert.max()) if self.tokens_per_expert.numel() else 0

    @property
    def mean_load(self) -> float:
        n = self.tokens_per_expert.numel()
        return self.num_processed / n if n else 0.0

    @property
    def imbalance(self) -> float:
        """max_load / mean_load (1.0 is perfectly balanced)."""
        return self.max_load / self.mean_load if self.mean_load else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "routed_per_expert": self.routed_per_expert.tolist(),
            "dropped": self.dropped,
            "drop_rate": self.drop_rate,
            "max_load": self.max_load,
            "mean_load": self.mean_load,
            "unrouted_tokens": self.unrouted_tokens,
        }
