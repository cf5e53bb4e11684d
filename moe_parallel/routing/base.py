"""The router interface: ``Routing`` (what every router returns) and the steps every router
shares: input checks, the router dtype, the logits ``x W^T (+ b_r)`` and their finiteness
check, and the per-expert assignment count.

The router dtype is ``router_dtype`` when set, else float32 whatever the input dtype (float64
when the router parameters are float64, i.e. ``params_dtype=torch.float64``); x and the router
parameters are cast to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import MoEConfig, check_positive_int

__all__ = [
    "Routing",
    "check_finite_logits",
    "check_router_input",
    "check_valid_mask",
    "compute_dtype",
    "count_assignments",
    "router_logits",
    "router_param_dtype",
]


@dataclass
class Routing:
    """The routing of ``T`` tokens.

    probs: ``[T, k']`` combine weights (``routed_scaling_factor`` applied), router dtype.
    expert_idx: ``[T, k']`` int64 global expert ids, duplicate-free per token.
    keep: ``[T, k']`` bool, or None when every assignment is kept.
    logits: ``[T, E]`` router logits (after noise, if any), router dtype.
    routed_per_expert: ``[E]`` int64 assignments per expert before any capacity drop.
    experts_per_token: ``[T]`` int64, the experts each token selected (top-p, expert choice);
      None when every token selected ``k'``.
    selected: ``[T, k']`` bool, the router's own selection before any capacity drop (``keep``
      as the router returned it), or None when it selected every slot.

    Token choice has ``k' = top_k``; expert choice has ``k' = E`` with
    ``expert_idx[t, e] = e``, ``keep[t, e]`` = expert ``e`` chose token ``t`` and
    ``probs[t, e]`` its softmax score (0 where not chosen).
    """

    probs: Tensor
    expert_idx: Tensor
    keep: Optional[Tensor]
    logits: Tensor
    routed_per_expert: Tensor
    experts_per_token: Optional[Tensor] = None  # [T] int64 selected per token; None: all k'
    selected: Optional[Tensor] = None  # [T, k'] bool before capacity; None: all


def router_param_dtype(config: MoEConfig) -> torch.dtype:
    """The dtype of the router parameters: float64 for float64 models, else float32."""
    return torch.float64 if config.params_dtype == torch.float64 else torch.float32


def check_router_input(x: Tensor, hidden_size: int, num_seqs: int) -> None:
    """``x`` is a floating ``[T, hidden_size]`` tensor of ``num_seqs`` equal sequences."""
    if not isinstance(x, Tensor):
        raise ValueError(f"router input x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(
            f"router input x must be [T, hidden_size] with hidden_size={hidden_size}, "
            f"got shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"router input x must be floating point, got {x.dtype}")
    check_positive_int("num_seqs", num_seqs)
    if x.shape[0] % num_seqs:
        raise ValueError(
            f"router input x has {x.shape[0]} tokens, not divisible by num_seqs={num_seqs}"
        )


def check_valid_mask(valid: Optional[Tensor], num_tokens: int) -> Optional[Tensor]:
    """``valid`` is None or a ``[T]`` bool tensor; returns it."""
    if valid is None:
        return None
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != (num_tokens,):
        raise ValueError(
            f"valid must be a [T={num_tokens}] bool tensor (True: a token that counts), got "
            f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}"
        )
    return valid


def compute_dtype(weight: Tensor, config: MoEConfig) -> torch.dtype:
    """The router dtype: ``router_dtype`` when set, else the promotion of ``weight``'s dtype
    and float32."""
    if config.router_dtype is not None:
        return config.router_dtype
    return torch.promote_types(weight.dtype, torch.float32)


def router_logits(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  config: MoEConfig) -> Tensor:
    """``[T, E]`` logits ``x W^T (+ b_r)`` in the router dtype, ``x``, ``W`` and ``b_r`` cast
    to it."""
    dtype = compute_dtype(weight, config)
    return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def check_finite_logits(logits: Tensor) -> None:
    """``FloatingPointError`` when any logit is NaN or infinite. Under ``torch.compile`` (no
    host read in the graph) a device-side assertion instead: ``RuntimeError`` on CPU, a device
    assert on CUDA."""
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(logits).all(),
                            "router input x produced non-finite router logits")
        return
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            "router input x produced non-finite router logits (NaN/Inf in x or in the router "
            "weight); set check_finite=False to let them propagate"
        )


def count_assignments(expert_idx: Tensor, num_experts: int,
                      valid: Optional[Tensor] = None, keep: Optional[Tensor] = None) -> Tensor:
    """``[E]`` int64: how many of the ``[T, k]`` assignments name each expert (only the tokens
    where ``valid`` and the assignments where ``keep``, when given)."""
    mask = keep
    if valid is not None:
        mask = valid.view(-1, 1).expand_as(expert_idx) if mask is None else mask & valid.view(-1, 1)
    flat = (expert_idx if mask is None else expert_idx[mask]).reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_idx.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))
