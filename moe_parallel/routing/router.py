"""Routers: which experts each token goes to, and with which combine weight.

Token choice (``TopKRouter``), with ``logits = x W^T (+ b_r)`` (``W`` = ``weight`` ``[E, H]``,
``b_r`` = ``bias`` ``[E]`` with ``router_bias``) in the router dtype, and the scores below
computed in ``router_score_dtype`` (default: the router dtype) from those logits:

* softmax, ``softmax_before_topk``: ``s = softmax(logits)``; select ``topk(s + b)``;
  ``p = s[selected]``, divided by its sum when ``renormalize_topk``.
* softmax, not ``softmax_before_topk``: select ``topk(logits + b)``;
  ``p = softmax(logits[selected])``.
* sigmoid: ``s = sigmoid(logits)``; select ``topk(s + b)``; ``p = s[selected]``, divided by
  ``sum + 1e-20`` when ``renormalize_topk`` (``norm_topk_prob``, by default ``top_k > 1``).
* ``p *= routed_scaling_factor``.
* dynamic-k (``top_p``, Huang et al. 2024): of the ``top_k`` best (softmax, descending), slot
  ``j`` is selected iff ``Σ_{i<j} p_i < top_p`` (``keep``), so each token takes the fewest
  experts whose probability reaches ``top_p``; ``p`` stays ``s[selected]`` (0 elsewhere),
  divided by its sum only with ``norm_topk_prob=True``.

``b`` is the selection-only expert bias (zero unless ``expert_bias``). With
``num_groups = G`` and ``group_topk = M`` the selection scores ``s + b`` are viewed as
``[T, G, E/G]``, a group's score is (``group_score``) the sum of its ``top_k // M`` best scores
(``"sum_topk"``), of its 2 best (``"sum_top2"``, DeepSeek-V3) or its best (``"max"``,
DeepSeek-V2), and only the ``M`` best groups stay selectable. With ``noisy_gating``, in training,
``logits = x W^T + randn_like · softplus(x W_noise^T)``.

Expert choice (``ExpertChoiceRouter``): ``s = softmax(logits)`` ``[T, E]``; expert ``e`` takes
the ``C = min(T, ceil(T·top_k/E·cf))`` tokens with the highest ``s[:, e]``.

Losses (``losses.py``) are returned coefficient-scaled, keyed ``"aux"``, ``"seq_aux"``, ``"z"``
and ``"dynamic"`` (the entropy loss of dynamic routing).

The router dtype is ``router_dtype`` when set, else float32 whatever the input dtype (float64
when the router parameters are float64, i.e. ``params_dtype=torch.float64``); x and the router
parameters are cast to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .capacity import expert_capacity
from .losses import (
    dynamic_loss,
    full_scores,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    z_loss,
)

__all__ = [
    "ExpertChoiceRouter",
    "count_assignments",
    "Routing",
    "TopKRouter",
    "build_router",
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


# ---- shared helpers ----------------------------------------------------------------------------


def _router_param_dtype(config: MoEConfig) -> torch.dtype:
    return torch.float64 if config.params_dtype == torch.float64 else torch.float32


def _check_input(x: Tensor, hidden_size: int, num_seqs: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"router input x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(
            f"router input x must be [T, hidden_size] with hidden_size={hidden_size}, "
            f"got shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"router input x must be floating point, got {x.dtype}")
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs must be a positive int, got {num_seqs!r}")
    if x.shape[0] % num_seqs:
        raise ValueError(
            f"router input x has {x.shape[0]} tokens, not divisible by num_seqs={num_seqs}"
        )


def _check_valid(valid: Optional[Tensor], num_tokens: int) -> Optional[Tensor]:
    if valid is None:
        return None
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != (num_tokens,):
        raise ValueError(
            f"valid must be a [T={num_tokens}] bool tensor (True: a token that counts), got "
            f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}"
        )
    return valid


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


def _check_logits(logits: Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            "router input x produced non-finite router logits (NaN/Inf in x or in the router "
            "weight); set check_finite=False to let them propagate"
        )


def _compute_dtype(weight: Tensor, config: MoEConfig) -> torch.dtype:
    if config.router_dtype is not None:
        return config.router_dtype
    return torch.promote_types(weight.dtype, torch.float32)


# ---- token choice ------------------------------------------------------------------------------


class TopKRouter(nn.Module):
    """Token-choice top-k router (formulas in the module docstring).

    Parameters: ``weight`` ``[E, H]`` (and ``noise_weight`` ``[E, H]`` with ``noisy_gating``),
    both ``N(0, init_std)``, float32 (float64 for float64 models). Buffers: ``expert_bias``
    ``[E]`` (only with ``expert_bias``: a router without it has no such attribute, which is what
    Megatron-Core's ``finalize_model_grads`` tests for; selection only) and
    ``local_tokens_per_expert`` ``[E]``, the routed counts of the non-padding tokens accumulated
    over training-mode forwards with autograd on (not eval or ``no_grad`` ones) since the last
    ``update_expert_bias``. Both stay float32 whatever ``.to(dtype)``, ``.half()`` or
    ``.bfloat16()`` does to the module (a mixed-precision wrapper must not round the bias or
    the counts).

    ``forward(x [T, H], num_seqs=1, valid=None) -> (Routing, losses)``; ``keep`` is None, or
    with ``top_p`` the dynamic-k selection (capacity is applied downstream, among the selected
    assignments, with ``capacity.apply_capacity``).
    """

    local_tokens_per_expert: Tensor

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        if config.router_type != "topk":
            raise ValueError(
                f"TopKRouter needs router_type='topk', got router_type={config.router_type!r}"
            )
        self.config = config
        E, H = config.num_experts, config.hidden_size
        dtype = _router_param_dtype(config)
        self.weight = nn.Parameter(torch.empty(E, H, dtype=dtype))
        if config.noisy_gating:
            self.noise_weight = nn.Parameter(torch.empty(E, H, dtype=dtype))
        else:
            self.register_parameter("noise_weight", None)
        if config.router_bias:
            self.bias = nn.Parameter(torch.zeros(E, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer(
            "local_tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``weight`` (and ``noise_weight``) from ``N(0, init_std)``."""
        nn.init.normal_(self.weight, mean=0.0, std=self.config.init_std)
        if self.noise_weight is not None:
            nn.init.normal_(self.noise_weight, mean=0.0, std=self.config.init_std)

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in ("expert_bias", "local_tokens_per_expert")
                if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():  # moved with the module, never rounded
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return self

    def forward(self, x: Tensor, num_seqs: int = 1, count: bool = True, check: bool = True,
                valid: Optional[Tensor] = None) -> tuple[Routing, dict[str, Tensor]]:
        """Route ``x`` ``[T, H]`` (sequence-major, ``num_seqs`` sequences) to ``top_k`` experts.
        ``count=False`` leaves ``local_tokens_per_expert`` to the caller (``MoELayer`` adds the
        counts in its backward, once per step even under activation recomputation);
        ``check=False`` leaves the ``check_finite`` test of the logits to the caller.
        ``valid`` (``[T]`` bool, None: all): the tokens that count; padding tokens (False) are
        routed like the others but left out of the losses and of ``local_tokens_per_expert``
        (``Routing.routed_per_expert`` counts every token: it is the load the experts see)."""
        cfg = self.config
        _check_input(x, cfg.hidden_size, num_seqs)
        valid = _check_valid(valid, x.shape[0])
        E, k = cfg.num_experts, cfg.top_k
        dtype = _compute_dtype(self.weight, cfg)
        xr = x.to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        logits = F.linear(xr, self.weight.to(dtype), bias)
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(xr, self.noise_weight.to(dtype)))
            logits = logits + torch.randn_like(logits) * noise_std
        if cfg.check_finite and check:
            _check_logits(logits)

        score_logits = logits.to(cfg.router_score_dtype or dtype)
        if cfg.score_function == "softmax":
            scores = (torch.softmax(score_logits, dim=-1) if cfg.softmax_before_topk
                      else score_logits)
        else:
            scores = torch.sigmoid(score_logits)

        expert_idx = self._select(scores.detach())
        picked = scores.gather(1, expert_idx)
        selected = None
        if cfg.top_p is not None:  # slot j kept iff the probability before it is below p
            cum = torch.cumsum(picked.detach(), dim=1)
            before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
            selected = before < cfg.top_p
        if selected is not None:
            probs = picked * selected
            if cfg.norm_topk_prob:
                probs = probs / probs.sum(dim=-1, keepdim=True)
        elif cfg.score_function == "softmax" and not cfg.softmax_before_topk:
            probs = torch.softmax(picked, dim=-1)
        elif cfg.renormalize_topk:
            eps = 1e-20 if cfg.score_function == "sigmoid" else 0.0
            probs = picked / (picked.sum(dim=-1, keepdim=True) + eps)
        else:
            probs = picked
        if cfg.routed_scaling_factor != 1.0:
            probs = probs * cfg.routed_scaling_factor

        routed_per_expert = count_assignments(expert_idx, E, keep=selected)
        counted = (routed_per_expert if valid is None
                   else count_assignments(expert_idx, E, valid, selected))
        if count and self.training and torch.is_grad_enabled():  # eval / no_grad: no count
            with torch.no_grad():
                self.local_tokens_per_expert += counted.to(torch.float32)

        losses: dict[str, Tensor] = {}
        dist = None  # the full distributions, shared by the losses that need them
        if cfg.aux_loss_coeff > 0 or cfg.seq_aux_loss_coeff > 0:
            dist = full_scores(logits, cfg.score_function)
            # top-p: f_i = count_i / Σ count (k_eff = the mean experts per counted token)
            k_eff = k if selected is None else counted.sum().clamp(min=1).to(dist.dtype) / (
                valid.sum().clamp(min=1) if valid is not None else max(x.shape[0], 1))
            if cfg.aux_loss_coeff > 0:
                losses["aux"] = switch_load_balancing_loss(
                    dist, counted, k_eff, cfg.aux_loss_coeff, valid
                )
            if cfg.seq_aux_loss_coeff > 0:
                chosen = torch.zeros_like(dist).scatter_(
                    1, expert_idx, 1.0 if selected is None else selected.to(dist.dtype))
                losses["seq_aux"] = sequence_load_balancing_loss(
                    dist, chosen, k_eff, num_seqs, cfg.seq_aux_loss_coeff, valid
                )
        if cfg.z_loss_coeff > 0:
            losses["z"] = z_loss(logits, cfg.z_loss_coeff, valid)
        if cfg.dynamic_loss_coeff > 0:
            losses["dynamic"] = dynamic_loss(
                dist if dist is not None else full_scores(logits, "softmax"),  # softmax only
                cfg.dynamic_loss_coeff, valid)

        routing = Routing(
            probs=probs,
            expert_idx=expert_idx,
            keep=selected,
            logits=logits,
            routed_per_expert=routed_per_expert,
            experts_per_token=None if selected is None else selected.sum(dim=1),
        )
        return routing, losses

    def _select(self, choose: Tensor) -> Tensor:
        """Expert ids ``[T, k]`` from detached selection scores (bias and group limit applied)."""
        cfg = self.config
        bias = getattr(self, "expert_bias", None)
        if bias is not None:
            choose = choose + bias.to(choose.dtype)
        if cfg.num_groups is not None:
            (T, E), G = choose.shape, cfg.num_groups
            per_group = choose.view(T, G, E // G)  # explicit sizes: T may be 0
            if cfg.group_score == "max":
                group_score = per_group.max(dim=-1).values
            else:
                best = 2 if cfg.group_score == "sum_top2" else cfg.top_k // cfg.group_topk
                group_score = per_group.topk(best, dim=-1).values.sum(dim=-1)
            best_groups = group_score.topk(cfg.group_topk, dim=-1).indices
            allowed = torch.zeros(T, G, dtype=torch.bool, device=choose.device)
            allowed.scatter_(1, best_groups, True)
            allowed = allowed.unsqueeze(-1).expand_as(per_group).reshape(T, E)
            choose = choose.masked_fill(~allowed, float("-inf"))
        return choose.topk(cfg.top_k, dim=-1).indices

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Optional[Tensor] = None) -> None:
        """DeepSeek-V3 bias update ``b_i += bias_update_rate · sign(mean(c) - c_i)``.

        ``c`` is ``tokens_per_expert`` (e.g. already summed over data-parallel ranks) or, when
        None, the accumulated ``local_tokens_per_expert``. Resets the accumulator afterwards.
        """
        if getattr(self, "expert_bias", None) is None:
            raise RuntimeError("update_expert_bias needs a config with expert_bias=True")
        E = self.config.num_experts
        if tokens_per_expert is None:
            c = self.local_tokens_per_expert
        else:
            if not isinstance(tokens_per_expert, Tensor) or tokens_per_expert.shape != (E,):
                raise ValueError(
                    f"tokens_per_expert must be a [num_experts={E}] tensor, got "
                    f"{getattr(tokens_per_expert, 'shape', type(tokens_per_expert))}"
                )
            c = tokens_per_expert.to(device=self.expert_bias.device)
        c = c.to(torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(c.mean() - c)
        self.local_tokens_per_expert.zero_()

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"hidden_size={cfg.hidden_size}, num_experts={cfg.num_experts}, top_k={cfg.top_k}, "
            f"score_function={cfg.score_function!r}"
        )


# ---- expert choice -----------------------------------------------------------------------------


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
        dtype = _router_param_dtype(config)
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
        _check_input(x, cfg.hidden_size, num_seqs)
        if valid is not None:
            raise ValueError(
                "a padding mask is not supported with router_type='expert_choice' (each expert "
                "picks its top-C tokens, padding included); use router_type='topk'"
            )
        T, E = x.shape[0], cfg.num_experts
        dtype = _compute_dtype(self.weight, cfg)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        if cfg.check_finite and check:
            _check_logits(logits)
        scores = torch.softmax(logits.to(cfg.router_score_dtype or dtype), dim=-1)
        cap = self.capacity(T)
        chosen = scores.detach().topk(cap, dim=0).indices  # [C, E] token ids per expert
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
        )
        return routing, losses

    def extra_repr(self) -> str:
        cfg = self.config
        return f"hidden_size={cfg.hidden_size}, num_experts={cfg.num_experts}, top_k={cfg.top_k}"


def build_router(config: MoEConfig) -> nn.Module:
    """``TopKRouter`` for ``router_type='topk'``, ``ExpertChoiceRouter`` for ``'expert_choice'``."""
    if config.router_type == "topk":
        return TopKRouter(config)
    if config.router_type == "expert_choice":
        return ExpertChoiceRouter(config)
    raise ValueError(f"router_type must be 'topk' or 'expert_choice', got {config.router_type!r}")
