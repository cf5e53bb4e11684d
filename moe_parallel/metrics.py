"""Routing statistics of one MoE forward: load per expert, drops, imbalance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

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
    expert_rows: rows this rank's local experts computed (from every rank of its group; capacity
      padding included). padded_rows: the same after block-sparse padding (None for grouped),
      padding_fraction = (padded_rows − expert_rows) / padded_rows.
    overflow: True when the dropless row ceiling (``max_rows_*``) made this forward drop.
    experts_per_token_histogram[j]: tokens that selected j experts (j = 0..k', before capacity;
      dynamic-k routing varies it), mean_experts_per_token its mean.

    Built from device counts, the statistics travel to the host by one non-blocking copy into
    pinned memory: the forward never waits for them, and reading a count waits only for that
    copy (``counts = [routed_per_expert | tokens_per_expert | unrouted_tokens |
    experts_per_token_histogram]``, int64; ``num_experts`` says where each part starts).
    """

    counts: Tensor
    num_tokens: int
    expert_rows: int = 0
    padded_rows: Optional[int] = None
    overflow: bool = False
    ready: Optional[torch.cuda.Event] = field(default=None, repr=False, compare=False)
    num_experts: int = 0

    @classmethod
    def from_counts(
        cls,
        routed_per_expert: Tensor,
        tokens_per_expert: Tensor,
        row_map: Tensor,
        expert_rows: int = 0,
        padded_rows: Optional[int] = None,
        overflow: bool = False,
        experts_per_token: Optional[Tensor] = None,
    ) -> RoutingStats:
        """Build from the two count vectors, the dispatch row map ([T, k], -1 = dropped) and
        the experts each token selected (``[T]``; None: every token selected ``k``)."""
        dev = row_map.device
        T, k = row_map.shape
        unrouted = (row_map < 0).all(dim=1).sum() if row_map.numel() else row_map.shape[0]
        if experts_per_token is None:
            hist = torch.zeros(k + 1, dtype=torch.int64, device=dev)
            hist[k] = T
        else:
            hist = torch.bincount(experts_per_token.detach().to(dev, torch.int64).reshape(-1),
                                  minlength=k + 1)
        packed = torch.cat([routed_per_expert.detach().to(dev, torch.int64).reshape(-1),
                            tokens_per_expert.detach().to(dev, torch.int64).reshape(-1),
                            torch.as_tensor(unrouted, dtype=torch.int64, device=dev).view(1),
                            hist])
        ready = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            packed = host
        return cls(counts=packed, num_tokens=row_map.shape[0], expert_rows=expert_rows,
                   padded_rows=padded_rows, overflow=overflow, ready=ready,
                   num_experts=routed_per_expert.numel())

    def _host_counts(self) -> Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.counts

    @property
    def routed_per_expert(self) -> Tensor:
        """``[E]`` int64 (CPU): assignments the router sent to each expert, before capacity."""
        return self._host_counts()[:self.num_experts]

    @property
    def tokens_per_expert(self) -> Tensor:
        """``[E]`` int64 (CPU): assignments each expert processed, after capacity."""
        e = self.num_experts
        return self._host_counts()[e:2 * e]

    @property
    def experts_per_token_histogram(self) -> Tensor:
        """``[k' + 1]`` int64 (CPU): entry j counts the tokens that selected j experts."""
        return self._host_counts()[2 * self.num_experts + 1:]

    @property
    def mean_experts_per_token(self) -> float:
        """Experts selected per token, on average (before capacity; 0.0 without tokens)."""
        h = self.experts_per_token_histogram
        n = int(h.sum())
        return float((h * torch.arange(h.numel())).sum()) / n if n else 0.0

    @property
    def unrouted_tokens(self) -> int:
        """Tokens that reached no expert (every assignment dropped, or chosen by no expert)."""
        return int(self._host_counts()[2 * self.num_experts])

    @property
    def padding_fraction(self) -> float:
        """Share of the block-padded rows that are padding (0.0 without block padding)."""
        if not self.padded_rows:
            return 0.0
        return (self.padded_rows - self.expert_rows) / self.padded_rows

    @property
    def num_routed(self) -> int:
        """``Σ routed_per_expert``."""
        return int(self.routed_per_expert.sum())

    @property
    def num_processed(self) -> int:
        """``Σ tokens_per_expert``."""
        return int(self.tokens_per_expert.sum())

    @property
    def dropped(self) -> int:
        """Assignments dropped: ``num_routed − num_processed``."""
        return max(self.num_routed - self.num_processed, 0)

    @property
    def drop_rate(self) -> float:
        """``dropped / num_routed`` (0.0 when nothing was routed)."""
        return self.dropped / self.num_routed if self.num_routed else 0.0

    @property
    def max_load(self) -> int:
        """The busiest expert's processed assignments."""
        return int(self.tokens_per_expert.max()) if self.tokens_per_expert.numel() else 0

    @property
    def mean_load(self) -> float:
        """Processed assignments per expert on average."""
        n = self.tokens_per_expert.numel()
        return self.num_processed / n if n else 0.0

    @property
    def imbalance(self) -> float:
        """max_load / mean_load (1.0 is perfectly balanced)."""
        return self.max_load / self.mean_load if self.mean_load else 0.0

    def as_dict(self) -> dict:
        """The statistics as plain Python values (for logging / JSON)."""
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "routed_per_expert": self.routed_per_expert.tolist(),
            "dropped": self.dropped,
            "drop_rate": self.drop_rate,
            "max_load": self.max_load,
            "mean_load": self.mean_load,
            "unrouted_tokens": self.unrouted_tokens,
            "expert_rows": self.expert_rows,
            "padded_rows": self.padded_rows,
            "padding_fraction": self.padding_fraction,
            "overflow": self.overflow,
            "mean_experts_per_token": self.mean_experts_per_token,
            "experts_per_token_histogram": self.experts_per_token_histogram.tolist(),
        }
