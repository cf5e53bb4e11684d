"""Per-expert capacity for token-choice routing and the vectorised token drop that enforces it.

    C = max(ceil(T · k / E · capacity_factor), min_capacity)

Each expert processes at most C of the (token, slot) assignments routed to it; the drop policy
decides which ones, by ranking each expert's candidates ``(t, j)`` (token t, choice rank j:
its j-th best expert) and keeping the first C:
  * ``"probs"``: combine weight ``probs[t, j]`` descending, ties to the earlier token;
  * ``"position"``: token ``t`` ascending;
  * ``"k_major"`` (GShard, Lepikhin et al. 2020): ``(j, t)`` ascending, every token's first
    choice before any token's second choice;
  * ``"batch_priority"`` (V-MoE's Batch Prioritized Routing, Riquelme et al. 2021):
    ``(j, -s_t, t)`` ascending with the priority ``s_t = max_j probs[t, j]`` (the top
    combine weight): first choices first, each choice rank in priority order.

Dynamic capacity (``next_capacity_factor``): a factor that follows the measured drop rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from ..config import (
    DROP_POLICIES,
    check_choice,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
)

__all__ = ["DROP_POLICIES", "apply_capacity", "expert_capacity", "next_capacity_factor"]


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    min_capacity: int = 0,
) -> int:
    """Assignments one expert may process: ``max(ceil(T·k/E·capacity_factor), min_capacity)``.

    ``T = num_tokens``, ``k = top_k``, ``E = num_experts``; the product is evaluated in that
    order (``T * k / E * capacity_factor``) in double precision before the ceiling.
    """
    check_nonneg_int("num_tokens", num_tokens)
    check_positive_int("num_experts", num_experts)
    check_positive_int("top_k", top_k)
    check_nonneg_int("min_capacity", min_capacity)
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    check_positive_float("capacity_factor", capacity_factor)
    return max(math.ceil(num_tokens * top_k / num_experts * capacity_factor), min_capacity)


def apply_capacity(
    expert_idx: Tensor,
    probs: Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str,
    keep: Optional[Tensor] = None,
    validate: bool = True,
) -> Tensor:
    """Keep mask ``[T, k]`` (bool) with at most ``capacity`` kept assignments per expert.

    Assignment ``(t, j)`` goes to expert ``expert_idx[t, j]``; only assignments with
    ``keep[t, j]`` (all, when ``keep`` is None) compete for an expert's slots, the others stay
    dropped. Within one expert the candidates are ranked by

      * ``"probs"``: ``probs[t, j]`` descending, ties broken by the earlier token ``t``;
      * ``"position"``: token index ``t`` ascending;
      * ``"k_major"``: ``(j, t)`` ascending;
      * ``"batch_priority"``: ``(j, -max_j' probs[t, j'], t)`` ascending;

    and the first ``capacity`` are kept (``j`` is the column of ``expert_idx``: the router
    orders a token's choices best first). One stable sort per key replaces any loop: sorting the
    flattened assignments by (expert, key) puts each expert's candidates in a contiguous run,
    and an assignment's rank is its position minus the start of its expert's run.

    Expert ids outside ``[0, num_experts)`` raise ``ValueError``; this value check runs on CPU
    tensors only, outside ``torch.compile`` and with ``validate`` (on an accelerator it would
    force a device synchronisation; in a graph, a host read; ``validate=False`` for ids in range
    by construction, such as a router's).
    """
    _check_capacity_args(expert_idx, probs, num_experts, capacity, drop_policy, keep, validate)
    # Flattened row-major, so flat order == (token, slot) order. Excluded assignments get the
    # sentinel expert id E: they sort after every real expert and are never kept.
    experts_N = expert_idx.reshape(-1).to(torch.int64)
    if keep is not None:
        experts_N = experts_N.masked_fill(~keep.reshape(-1), num_experts)
    first_N = _POLICY_ORDER[drop_policy](probs.detach())
    kept_N = _keep_first_per_expert(experts_N, first_N, num_experts, capacity)
    return kept_N.view(expert_idx.shape)


def _check_capacity_args(expert_idx: Tensor, probs: Tensor, num_experts: int, capacity: int,
                         drop_policy: str, keep: Optional[Tensor], validate: bool = True) -> None:
    """``apply_capacity``'s argument contract (shapes, dtypes, ranges)."""
    if not isinstance(expert_idx, Tensor) or expert_idx.dim() != 2:
        raise ValueError(
            f"expert_idx must be a 2-D [T, k] tensor, got "
            f"{tuple(expert_idx.shape) if isinstance(expert_idx, Tensor) else type(expert_idx)}"
        )
    if (
        expert_idx.dtype.is_floating_point
        or expert_idx.dtype.is_complex
        or (expert_idx.dtype == torch.bool)
    ):
        raise ValueError(f"expert_idx must have an integer dtype, got {expert_idx.dtype}")
    if not isinstance(probs, Tensor) or probs.shape != expert_idx.shape:
        raise ValueError(
            f"probs must be a tensor of expert_idx's shape {tuple(expert_idx.shape)}, got "
            f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs)}"
        )
    check_positive_int("num_experts", num_experts)
    check_nonneg_int("capacity", capacity)
    check_choice("drop_policy", drop_policy, DROP_POLICIES)
    if keep is not None and (
        not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != expert_idx.shape
    ):
        raise ValueError(
            f"keep must be None or a bool tensor of expert_idx's shape {tuple(expert_idx.shape)}"
        )
    if (validate and expert_idx.device.type == "cpu" and expert_idx.numel() > 0
            and not torch.compiler.is_compiling()):
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_idx values must lie in [0, num_experts={num_experts}), got [{lo}, {hi}]"
            )


# ---- the drop policies: each gives the flat assignment indices t·k + j in its key's order ----


def _probs_order(probs_TK: Tensor) -> Tensor:
    """``"probs"``: combine weight descending, ties to the earlier (t, j)."""
    return torch.sort(probs_TK.reshape(-1), descending=True, stable=True).indices


def _position_order(probs_TK: Tensor) -> None:
    """``"position"``: the row-major flat order is already (t, j); None means that order."""
    return None


def _choice_rank_order(tokens_T: Tensor, k: int) -> Tensor:
    """Choice rank major: flat index t·k + j visited for j = 0.., ``tokens_T`` in each rank."""
    T = tokens_T.shape[0]
    ranks = torch.arange(k, device=tokens_T.device).view(k, 1)
    return (tokens_T.view(1, T) * k + ranks).reshape(-1)


def _k_major_order(probs_TK: Tensor) -> Tensor:
    """``"k_major"`` (GShard): (j, t) ascending."""
    T, k = probs_TK.shape
    return _choice_rank_order(torch.arange(T, device=probs_TK.device), k)


def _batch_priority_order(probs_TK: Tensor) -> Tensor:
    """``"batch_priority"`` (V-MoE): (j, -max_j' probs[t, j'], t) ascending."""
    T, k = probs_TK.shape
    top_T = probs_TK.amax(dim=1) if k else probs_TK.new_zeros(T)
    return _choice_rank_order(torch.sort(top_T, descending=True, stable=True).indices, k)


_POLICY_ORDER: dict[str, Callable[[Tensor], Optional[Tensor]]] = {
    "probs": _probs_order,
    "position": _position_order,
    "k_major": _k_major_order,
    "batch_priority": _batch_priority_order,
}


def _keep_first_per_expert(experts_N: Tensor, first_N: Optional[Tensor], num_experts: int,
                           capacity: int) -> Tensor:
    """``[N]`` bool: assignment i is among the first ``capacity`` of its expert in the order
    ``first_N`` (None: flat order); the sentinel expert ``num_experts`` is never kept.

    A stable sort by expert puts each expert's candidates in a contiguous run, in ``first_N``
    order; rank = position - start of the run."""
    n, device = experts_N.numel(), experts_N.device
    if first_N is None:
        order = torch.sort(experts_N, stable=True).indices
    else:
        order = first_N[torch.sort(experts_N[first_N], stable=True).indices]
    sorted_experts = experts_N[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, sorted_experts, torch.ones_like(sorted_experts))
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - run_start[sorted_experts]
    keep_sorted = (rank < capacity) & (sorted_experts < num_experts)
    out = torch.empty(n, dtype=torch.bool, device=device)
    out[order] = keep_sorted
    return out


def next_capacity_factor(factor: float, dropped: int, routed: int, idle_slots: int, slots: int,
                         target_drop_rate: float, rate: float, lo: float, hi: float) -> float:
    """One step of the dynamic capacity schedule, from counts summed over the ranks (and the
    forwards since the last step): drop rate ``d = dropped / routed``, idle share
    ``u = idle_slots / slots`` (capacity slots no assignment filled):

        d > target_drop_rate                       ->  min(hi, factor · (1 + rate))
        d < target_drop_rate / 2  and  u > rate    ->  max(lo, factor · (1 - rate))
        otherwise                                  ->  factor

    (lowering by ``rate`` removes about a ``rate`` share of the slots, so it waits until more
    than that idled). Pure arithmetic on integers every rank holds alike: every rank computes
    the same factor. No routed assignment: unchanged.
    """
    if routed <= 0:
        return factor
    d = dropped / routed
    if d > target_drop_rate:
        return min(hi, factor * (1.0 + rate))
    if d < target_drop_rate / 2 and slots > 0 and idle_slots / slots > rate:
        return max(lo, factor * (1.0 - rate))
    return factor
