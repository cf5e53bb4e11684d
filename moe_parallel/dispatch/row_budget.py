"""Bounded memory in dropless mode: a ceiling on the rows each rank's experts receive.

Let ``count[r, e]`` be the kept assignments of rank ``r`` of an ETP×EP group (``w = etp·ep``
ranks, ``r = etp_rank + etp·ep_rank``) to global expert ``e``. Global expert ``e`` lives on
EP rank ``e // E_local``, and every ETP rank of that EP rank holds all of its rows, so EP rank
``p`` receives
    load[p] = Σ_r Σ_{p·E_local <= e < (p+1)·E_local} count[r, e]          rows per forward.
The balanced load is ``Σ count / ep``; the ceiling is the smallest of the knobs set:
    M = min(max_rows_per_rank, ceil(max_rows_factor · Σ count / ep)).
When ``max_p load[p] > M``:
  * ``row_overflow="error"``: ``RuntimeError`` naming the load and the knobs;
  * ``row_overflow="capacity"``: every (source rank, expert) pair keeps at most
    ``c = floor(M / (E_local · w))`` of its assignments (the layer's ``drop_policy`` decides
    which), so ``load[p] <= E_local · w · c <= M``; the forward reports the overflow.
Every rank of the group evaluates this on the same all-gathered ``count``, so all take the
same decision and run the same collectives afterwards: none is left waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..config import MoEConfig
from ..routing.capacity import apply_capacity
from ..routing.router import Routing


def kept_counts(routing: Routing, num_experts: int) -> Tensor:
    """``[E]`` int64 kept assignments per expert (on the routing's device)."""
    idx = routing.expert_idx
    if routing.keep is not None:
        idx = idx[routing.keep]
    return torch.bincount(idx.reshape(-1), minlength=num_experts)


@dataclass(frozen=True)
class RowBudget:
    """The ceiling on rows per rank of one layer (see the module docstring)."""

    max_rows_per_rank: Optional[int]
    max_rows_factor: Optional[float]
    overflow: str
    drop_policy: str

    @classmethod
    def from_config(cls, config: MoEConfig) -> Optional[RowBudget]:
        """The layer's budget, or None when no ceiling is configured."""
        if not config.row_cap_enabled:
            return None
        return cls(config.max_rows_per_rank, config.max_rows_factor, config.row_overflow,
                   config.drop_policy)

    def ceiling(self, total_rows: int, ep: int) -> int:
        """``M`` for ``total_rows`` kept assignments in the group spread over ``ep`` ranks."""
        limits = []
        if self.max_rows_per_rank is not None:
            limits.append(self.max_rows_per_rank)
        if self.max_rows_factor is not None:
            limits.append(math.ceil(self.max_rows_factor * total_rows / ep))
        return min(limits)

    def _knobs(self) -> str:
        return (f"max_rows_per_rank={self.max_rows_per_rank}, "
                f"max_rows_factor={self.max_rows_factor}")

    def check(self, counts: Tensor, ep: int) -> Optional[int]:
        """None when every EP rank's load fits; else the per-(source rank, expert) capacity
        of the fallback. ``counts [w, E]`` CPU int64 (all ranks of the group, in group order).
        Raises ``RuntimeError`` with ``overflow="error"``, or when the fallback capacity is 0.
        """
        w, num_experts = counts.shape
        num_local = num_experts // ep
        load = counts.sum(0).view(ep, num_local).sum(1)
        total = int(counts.sum())
        limit = self.ceiling(total, ep)
        worst = int(load.argmax())
        if int(load[worst]) <= limit:
            return None
        what = (f"dropless MoE: EP rank {worst} would receive {int(load[worst])} expert rows "
                f"(balanced load {total / ep:.1f}), above the ceiling of {limit} rows per rank "
                f"set by {self._knobs()}")
        if self.overflow == "error":
            raise RuntimeError(
                f"{what}. Raise the ceiling, rebalance the router (aux loss, expert bias), or "
                "set row_overflow='capacity' to drop the excess assignments of such forwards."
            )
        cap = limit // (num_local * w)
        if cap == 0:
            raise RuntimeError(
                f"{what}; the capacity fallback would keep 0 assignments per (rank, expert) "
                f"pair because the ceiling is below E_local * ranks = {num_local * w}. "
                "Raise the ceiling."
            )
        return cap

    def enforce(
        self, routing: Routing, num_experts: int, ep: int,
        gather_counts: Callable[[Tensor], Tensor],
    ) -> tuple[Routing, bool, Tensor]:
        """``(routing, overflowed, counts)``: ``routing`` unchanged when the group fits, else
        with the fallback capacity applied to its ``keep`` (``overflow="capacity"``);
        ``counts [w, E]`` are every rank's kept counts of the returned routing.
        ``gather_counts(counts [E]) -> [w, E]`` all-gathers every rank's counts (a collective:
        every rank of the group must call ``enforce`` for the same layer; a second time after
        a fallback, on every rank alike)."""
        counts = gather_counts(kept_counts(routing, num_experts))
        cap = self.check(counts, ep)
        if cap is None:
            return routing, False, counts
        keep = apply_capacity(routing.expert_idx, routing.probs, num_experts, cap,
                              self.drop_policy, routing.keep)
        routing = replace(routing, keep=keep)
        return routing, True, gather_counts(kept_counts(routing, num_experts))
