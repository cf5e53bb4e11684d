"""Per-expert capacity for token-choice routing and the vectorised token drop that enforces it.

    C = max(ceil(T · k / E · capacity_factor), min_capacity)

Each expert processes at most C of the (token, slot) assignments routed to it; the drop policy
decides which ones: ``"probs"`` keeps the C highest combine weights (ties go to the earlier
token), ``"position"`` keeps the C earliest tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["DROP_POLICIES", "apply_capacity", "expert_capacity"]

DROP_POLICIES = ("probs", "position")


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

    and the first ``capacity`` are kept. One stable sort per key replaces any loop: sorting the
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
    if drop_policy == "probs":
        by_prob = torch.sort(probs.detach().reshape(-1), descending=True, stable=True).indices
        order = by_prob[torch.sort(experts[by_prob], stable=True).indices]
    else:
        order = torch.sort(experts, stable=True).indices
    sorted_experts = experts[order]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, sorted_experts, torch.ones_like(sorted_experts))
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - run_start[sorted_experts]
    keep_sorted = (rank < capacity) & (sorted_experts < num_experts)
    out = torch.empty(n, dtype=torch.bool, device=device)
    out[order] = keep_sorted
    return out.view(shape)
