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
from typing import Optional

import torch
from torch import Tensor

from ..config import DROP_POLICIES

__all__ = ["DROP_POLICIES", "apply_capacity", "expert_capacity", "next_capacity_factor"]


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
    _check_int("num_tokens", num_tokens, 0)
    _check_int("num_experts", num_experts, 1)
    _check_int("top_k", top_k, 1)
    _check_int("min_capacity", min_capacity, 0)
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    return max(math.ceil(num_tokens * top_k / num_experts * capacity_factor), min_capacity)


def apply_capacity(
    expert_idx: Tensor,
    probs: Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str,
    keep: Optional[Tensor] = None,
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
    tensors only (on an accelerator it would force a device synchronisation).
    """
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
    _check_int("num_experts", num_experts, 1)
    _check_int("capacity", capacity, 0)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if keep is not None and (
        not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != expert_idx.shape
    ):
        raise ValueError(
            f"keep must be None or a bool tensor of expert_idx's shape {tuple(expert_idx.shape)}"
        )
    if expert_idx.device.type == "cpu" and expert_idx.numel() > 0:
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"expert_idx values must lie in [0, num_experts={num_experts}), got [{lo}, {hi}]"
            )

    shape = expert_idx.shape
    n = expert_idx.numel()
    device = expert_idx.device
    # Flattened row-major, so flat order == (token, slot) order. Excluded assignments get the
    # sentinel expert id E: they sort after every real expert and are never kept.
    experts = expert_idx.reshape(-1).to(torch.int64)
    if keep is not None:
        experts = experts.masked_fill(~keep.reshape(-1), num_experts)
    T, k = shape
    if drop_policy == "probs":
        first = torch.sort(probs.detach().reshape(-1), descending=True, stable=True).indices
    elif drop_policy == "position":
        first = None  # row-major flat order is already (t, j)
    else:  # choice rank major: flat index t·k + j visited for j = 0.., tokens in priority order
        tokens = torch.arange(T, device=device)
        if drop_policy == "batch_priority":
            top = probs.detach().amax(dim=1) if k else probs.new_zeros(T)
            tokens = torch.sort(top, descending=True, stable=True).indices
        first = (tokens.view(1, T) * k + torch.arange(k, device=device).view(k, 1)).reshape(-1)
    if first is None:
        order = torch.sort(experts, stable=True).indices
    else:
        order = first[torch.sort(experts[first], stable=True).indices]
    sorted_experts = experts[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, sorted_experts, torch.ones_like(sorted_experts))
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - run_start[sorted_experts]
    keep_sorted = (rank < capacity) & (sorted_experts < num_experts)
    out = torch.empty(n, dtype=torch.bool, device=device)
    out[order] = keep_sorted
    return out.view(shape)


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
