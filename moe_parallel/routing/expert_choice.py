"""Expert-choice routing (Zhou et al. 2022): each expert takes the tokens that score highest
for it.

    s = softmax(logits) [T, E];  C = min(T, ceil(T·top_k/E·cf));  expert e keeps top_C(s[:, e])

with ``cf = capacity_factor`` (1.0 when None; ``eval_capacity_factor`` in eval when set).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from .base import (
    Routing,
    check_finite_logits,
    check_router_input,
    router_logits,
    router_param_dtype,
)
from .capacity import expert_capacity
from .losses import z_loss

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(nn.Module):
    """Expert-choice router: each expert takes its ``C`` highest-scoring tokens.

    ``s = softmax(x W^T)`` ``[T, E]``; ``C = min(T, ceil(T·top_k/E·cf))`` with
    ``cf = capacity_factor`` (1.0 when None). The Routing has ``k' = E``:
    ``expert_idx[t, e] = e``, ``keep[t, e]`` = token ``t`` is among expert ``e``'s top ``C``,
    ``probs[t, e] = s[t, e] · routed_scaling_factor`` where kept, else 0.
    ``routed_per_expert[e]`` is the number of tokens expert ``e`` took. Only the z-loss applies.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if config.router_type != "expert_choice":
            raise ValueError(
                "ExpertChoiceRouter needs router_type='expert_choice', "
                f"got router_type={config.router_type!r}"
            )
        self.config = config
        dtype = router_param_dtype(config)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``weight`` from ``N(0, init_std)``."""
        nn.init.normal_(self.weight, mean=0.0, std=self.config.init_std)

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert: ``min(T, ceil(T·top_k/E·cf))``."""
        cfg = self.config
        cf = cfg.capacity_factor_in(self.training)
        cf = cf if cf is not None else 1.0
        return min(num_tokens, expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, cf))

    def forward(self, x: Tensor, num_seqs: int = 1, count: bool = True, check: bool = True,
                valid: Optional[Tensor] = None) -> tuple[Routing, dict[str, Tensor]]:
        """Route ``x`` ``[T, H]``: every expert picks its top-``C`` tokens (``count`` is
        accepted for the router interface: expert choice keeps no counts; ``check`` as in
        ``TopKRouter``). ``valid`` must be None: an expert would spend its capacity on padding
        tokens, so a padding mask is refused."""
        cfg = self.config
        check_router_input(x, cfg.hidden_size, num_seqs)
        if valid is not None:
            raise ValueError(
                "a padding mask is not supported with router_type='expert_choice' (each expert "
                "picks its top-C tokens, padding included); use router_type='topk'"
            )
        T, E = x.shape[0], cfg.num_experts
        logits = router_logits(x, self.weight, None, cfg)
        if cfg.check_finite and check:
            check_finite_logits(logits)
        scores = torch.softmax(logits.to(cfg.router_score_dtype or logits.dtype), dim=-1)
        chosen = scores.detach().topk(self.capacity(T), dim=0).indices  # [C, E] tokens/expert
        keep = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
        keep.scatter_(0, chosen, True)
        probs = scores * keep
        if cfg.routed_scaling_factor != 1.0:
            probs = probs * cfg.routed_scaling_factor
        expert_idx = torch.arange(E, device=logits.device).expand(T, E).contiguous()
        losses: dict[str, Tensor] = {}
        if cfg.z_loss_coeff > 0:
            losses["z"] = z_loss(logits, cfg.z_loss_coeff)
        routing = Routing(
            probs=probs,
            expert_idx=expert_idx,
            keep=keep,
            logits=logits,
            routed_per_expert=keep.sum(dim=0),
            experts_per_token=keep.sum(dim=1),
            selected=keep,
        )
        return routing, losses

    def extra_repr(self) -> str:
        cfg = self.config
        return f"hidden_size={cfg.hidden_size}, num_experts={cfg.num_experts}, top_k={cfg.top_k}"
