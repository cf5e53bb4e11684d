"""Token-choice routing (``TopKRouter``): which experts each token goes to, and with which
combine weight, in five stages (one method each):

* ``logits``: ``x W^T (+ b_r)`` (``W`` = ``weight`` ``[E, H]``, ``b_r`` = ``bias`` ``[E]`` with
  ``router_bias``) in the router dtype (``base.py``); with ``noisy_gating``, in training,
  ``+ randn_like · softplus(x W_noise^T)``.
* ``scores``, in ``router_score_dtype`` (default: the router dtype): ``s = softmax(logits)``
  (softmax, ``softmax_before_topk``), ``s = logits`` (softmax, not ``softmax_before_topk``) or
  ``s = sigmoid(logits)``.
* ``selection``: ``topk(s + b)``, ``b`` the selection-only expert bias (zero unless
  ``expert_bias``). With ``num_groups = G`` and ``group_topk = M`` the selection scores
  ``s + b`` are viewed as ``[T, G, E/G]``, a group's score is (``group_score``) the sum of its
  ``top_k // M`` best scores (``"sum_topk"``), of its 2 best (``"sum_top2"``, DeepSeek-V3) or
  its best (``"max"``, DeepSeek-V2), and only the ``M`` best groups stay selectable.
  Dynamic-k (``top_p``, Huang et al. 2024): of the ``top_k`` best (softmax, descending), slot
  ``j`` is selected iff ``Σ_{i<j} p_i < top_p`` (``keep``), so each token takes the fewest
  experts whose probability reaches ``top_p``. Forced balance (``force_balance``): token ``t``
  (its index among the ``T`` tokens routed together) takes experts ``(t·k + j) mod E``,
  ``j < k``, whatever the scores (``forced_assignment``).
* ``combine_weights``: ``p = s[selected]``, divided by its sum when ``renormalize_topk``
  (sigmoid: by ``sum + 1e-20``; the sum taken in ``_summation_order``: best first, or for
  DeepSeek-V3's ``group_score="sum_top2"`` in HF's order, so that the float32 weights are
  HF's bit for bit); not ``softmax_before_topk``: ``p = softmax(logits[selected])``;
  top-p: ``p = s[selected]`` (0 where not kept), divided by its sum only with
  ``norm_topk_prob=True``; then ``p *= routed_scaling_factor``.
* ``losses`` (``losses.py``), returned coefficient-scaled, keyed ``"aux"``, ``"seq_aux"``, ``"z"``
  and ``"dynamic"`` (the entropy loss of dynamic routing).

Expert choice is ``expert_choice.py``; ``Routing``, the result of both, is ``base.py`` (both
re-exported here).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ROUTER_TYPES, MoEConfig, check_choice
from .base import (
    Routing,
    check_finite_logits,
    check_router_input,
    check_valid_mask,
    compute_dtype,
    count_assignments,
    router_logits,
    router_param_dtype,
)
from .expert_choice import ExpertChoiceRouter
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
    "forced_assignment",
]


def forced_assignment(num_tokens: int, top_k: int, num_experts: int,
                      device: torch.device | str | None = None) -> Tensor:
    """``[T, k]`` int64 round-robin expert ids ``(t·k + j) mod E`` (``T = num_tokens``,
    ``k = top_k``, ``E = num_experts``): each row's ids are distinct when ``k <= E``, and expert
    ``e`` appears ``floor(T·k/E) + (e < T·k mod E)`` times."""
    flat = torch.arange(num_tokens * top_k, dtype=torch.int64, device=device)
    return flat.remainder_(num_experts).view(num_tokens, top_k)


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
        dtype = router_param_dtype(config)
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
                valid: Optional[Tensor] = None,
                assignment: Optional[tuple[Tensor, Optional[Tensor]]] = None,
                ) -> tuple[Routing, dict[str, Tensor]]:
        """Route ``x`` ``[T, H]`` (sequence-major, ``num_seqs`` sequences) to ``top_k`` experts.
        ``count=False`` leaves ``local_tokens_per_expert`` to the caller (``MoELayer`` adds the
        counts in its backward, once per step even under activation recomputation);
        ``check=False`` leaves the ``check_finite`` test of the logits to the caller.
        ``valid`` (``[T]`` bool, None: all): the tokens that count; padding tokens (False) are
        routed like the others but left out of the losses and of ``local_tokens_per_expert``
        (``Routing.routed_per_expert`` counts every token: it is the load the experts see).
        ``assignment`` (router replay): ``(expert_idx [T, k], keep [T, k] or None)`` replaces
        ``selection``; the combine weights, counts and losses follow from it as from a
        selection."""
        cfg = self.config
        check_router_input(x, cfg.hidden_size, num_seqs)
        valid_T = check_valid_mask(valid, x.shape[0])
        logits_TE = self.logits(x)
        if cfg.check_finite and check:
            check_finite_logits(logits_TE)
        scores_TE = self.scores(logits_TE)
        expert_idx_TK, keep_TK = (self.selection(scores_TE.detach()) if assignment is None
                                  else assignment)
        probs_TK = self.combine_weights(scores_TE, expert_idx_TK, keep_TK)
        E = cfg.num_experts
        routed_E = count_assignments(expert_idx_TK, E, keep=keep_TK)
        counted_E = (routed_E if valid_T is None
                     else count_assignments(expert_idx_TK, E, valid_T, keep_TK))
        if count and self.training and torch.is_grad_enabled():  # eval / no_grad: no count
            with torch.no_grad():
                self.local_tokens_per_expert += counted_E.to(torch.float32)
        losses = self.losses(logits_TE, expert_idx_TK, keep_TK, counted_E, num_seqs, valid_T)
        routing = Routing(
            probs=probs_TK,
            expert_idx=expert_idx_TK,
            keep=keep_TK,
            logits=logits_TE,
            routed_per_expert=routed_E,
            experts_per_token=None if keep_TK is None else keep_TK.sum(dim=1),
            selected=keep_TK,
        )
        return routing, losses

    def logits(self, x_TH: Tensor) -> Tensor:
        """``[T, E]``: ``x W^T (+ b_r)`` in the router dtype, plus, in training with
        ``noisy_gating``, ``N(0, 1) · softplus(x W_noise^T)``."""
        xr_TH = x_TH.to(compute_dtype(self.weight, self.config))  # one cast, one x gradient
        logits_TE = router_logits(xr_TH, self.weight, self.bias, self.config)
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(xr_TH, self.noise_weight.to(xr_TH.dtype)))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std
        return logits_TE

    def scores(self, logits_TE: Tensor) -> Tensor:
        """``[T, E]`` in ``router_score_dtype`` (None: the logits' dtype): ``softmax(logits)``
        with ``softmax_before_topk``, else the logits (softmax) or ``sigmoid(logits)``."""
        cfg = self.config
        s = logits_TE.to(cfg.router_score_dtype or logits_TE.dtype)
        if cfg.score_function == "sigmoid":
            return torch.sigmoid(s)
        return torch.softmax(s, dim=-1) if cfg.softmax_before_topk else s

    def selection(self, scores_TE: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """From detached scores: ``expert_idx`` ``[T, k]``, the ``top_k`` experts of highest
        ``s + b`` among the allowed groups, best first; ``keep`` ``[T, k]`` with ``top_p``
        (slot ``j`` kept iff ``Σ_{i<j} s[t, expert_idx[t, i]] < top_p``), else None. With
        ``force_balance``: ``forced_assignment`` (the scores unused), keep None."""
        cfg = self.config
        if cfg.force_balance:
            return forced_assignment(scores_TE.shape[0], cfg.top_k, cfg.num_experts,
                                     scores_TE.device), None
        choose_TE = self._group_limited(self._with_expert_bias(scores_TE))
        expert_idx_TK = choose_TE.topk(cfg.top_k, dim=-1).indices
        if cfg.top_p is None:
            return expert_idx_TK, None
        cum_TK = torch.cumsum(scores_TE.gather(1, expert_idx_TK), dim=1)
        before_TK = torch.cat([torch.zeros_like(cum_TK[:, :1]), cum_TK[:, :-1]], dim=1)
        return expert_idx_TK, before_TK < cfg.top_p

    def _with_expert_bias(self, scores_TE: Tensor) -> Tensor:
        """``s + b`` with the selection-only ``expert_bias`` (``s`` without one)."""
        bias = getattr(self, "expert_bias", None)
        return scores_TE if bias is None else scores_TE + bias.to(scores_TE.dtype)

    def _group_limited(self, choose_TE: Tensor) -> Tensor:
        """``choose`` with ``-inf`` outside each token's ``group_topk`` best groups (scored by
        ``group_score``); unchanged without ``num_groups``."""
        cfg = self.config
        if cfg.num_groups is None:
            return choose_TE
        (T, E), G = choose_TE.shape, cfg.num_groups
        per_group = choose_TE.view(T, G, E // G)  # explicit sizes: T may be 0
        if cfg.group_score == "max":
            group_score_TG = per_group.max(dim=-1).values
        else:
            best = 2 if cfg.group_score == "sum_top2" else cfg.top_k // cfg.group_topk
            group_score_TG = per_group.topk(best, dim=-1).values.sum(dim=-1)
        best_groups = group_score_TG.topk(cfg.group_topk, dim=-1).indices
        allowed = torch.zeros(T, G, dtype=torch.bool, device=choose_TE.device)
        allowed.scatter_(1, best_groups, True)
        allowed = allowed.unsqueeze(-1).expand_as(per_group).reshape(T, E)
        return choose_TE.masked_fill(~allowed, float("-inf"))

    def _summation_order(self, scores_TE: Tensor, expert_idx_TK: Tensor) -> Optional[Tensor]:
        """The order in which the renormalisation adds each row's selected scores (a float sum
        of three or more terms depends on it), or None for ``expert_idx``'s (best first, as
        Megatron-Core and the other HF families sum). DeepSeek-V3 (``group_score="sum_top2"``,
        ``top_k >= 3``): HF's ``DeepseekV3TopkRouter`` order, that of ``torch.topk(c, k,
        sorted=False)`` on the selection scores ``c = s + b`` with ``-inf`` outside the allowed
        groups, in every row where that call returns the selected experts (a replayed or
        forced assignment keeps its own order)."""
        cfg = self.config
        if cfg.group_score != "sum_top2" or cfg.top_k < 3:
            return None
        choose_TE = self._group_limited(self._with_expert_bias(scores_TE.detach()))
        order_TK = choose_TE.topk(cfg.top_k, dim=-1, sorted=False).indices
        same_T1 = (order_TK.sort(dim=-1).values == expert_idx_TK.sort(dim=-1).values).all(
            dim=-1, keepdim=True)
        return torch.where(same_T1, order_TK, expert_idx_TK)

    def combine_weights(self, scores_TE: Tensor, expert_idx_TK: Tensor,
                        keep_TK: Optional[Tensor]) -> Tensor:
        """``[T, k]`` weights ``p`` from the scores of the selected experts (formulas in the
        module docstring), times ``routed_scaling_factor``."""
        cfg = self.config
        picked = scores_TE.gather(1, expert_idx_TK)
        if keep_TK is not None:
            probs = picked * keep_TK
            if cfg.norm_topk_prob:
                probs = probs / probs.sum(dim=-1, keepdim=True)
        elif cfg.score_function == "softmax" and not cfg.softmax_before_topk:
            probs = torch.softmax(picked, dim=-1)
        elif cfg.renormalize_topk:
            eps = 1e-20 if cfg.score_function == "sigmoid" else 0.0
            order_TK = self._summation_order(scores_TE, expert_idx_TK)
            if order_TK is None:
                probs = picked / (picked.sum(dim=-1, keepdim=True) + eps)
            else:  # HF's computation in its order (its backward too), then expert_idx's order
                w_TK = scores_TE.gather(1, order_TK)
                w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + eps)
                slot_TK = (order_TK.unsqueeze(1) == expert_idx_TK.unsqueeze(2)).long().argmax(2)
                probs = w_TK.gather(1, slot_TK)
        else:
            probs = picked
        if cfg.routed_scaling_factor != 1.0:
            probs = probs * cfg.routed_scaling_factor
        return probs

    def losses(self, logits_TE: Tensor, expert_idx_TK: Tensor, keep_TK: Optional[Tensor],
               counted_E: Tensor, num_seqs: int, valid_T: Optional[Tensor]) -> dict[str, Tensor]:
        """The configured losses, coefficient-scaled (``losses.py``). ``counted_E``: the
        assignments of the valid tokens per expert. The balancing losses use ``k_eff = top_k``,
        or with top-p the mean experts per counted token, so that f_i = count_i / Σ_e count_e."""
        cfg = self.config
        losses: dict[str, Tensor] = {}
        dist = None  # the full distributions, shared by the losses that need them
        if cfg.aux_loss_coeff > 0 or cfg.seq_aux_loss_coeff > 0:
            dist = full_scores(logits_TE, cfg.score_function)
            tokens = valid_T.sum().clamp(min=1) if valid_T is not None else max(len(logits_TE), 1)
            k_eff = (cfg.top_k if keep_TK is None
                     else counted_E.sum().clamp(min=1).to(dist.dtype) / tokens)
            if cfg.aux_loss_coeff > 0:
                losses["aux"] = switch_load_balancing_loss(
                    dist, counted_E, k_eff, cfg.aux_loss_coeff, valid_T)
            if cfg.seq_aux_loss_coeff > 0:
                chosen = torch.zeros_like(dist).scatter_(
                    1, expert_idx_TK, 1.0 if keep_TK is None else keep_TK.to(dist.dtype))
                losses["seq_aux"] = sequence_load_balancing_loss(
                    dist, chosen, k_eff, num_seqs, cfg.seq_aux_loss_coeff, valid_T)
        if cfg.z_loss_coeff > 0:
            losses["z"] = z_loss(logits_TE, cfg.z_loss_coeff, valid_T)
        if cfg.dynamic_loss_coeff > 0:
            losses["dynamic"] = dynamic_loss(
                dist if dist is not None else full_scores(logits_TE, "softmax"),  # softmax only
                cfg.dynamic_loss_coeff, valid_T)
        return losses

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


def build_router(config: MoEConfig) -> nn.Module:
    """``TopKRouter`` for ``router_type='topk'``, ``ExpertChoiceRouter`` for ``'expert_choice'``."""
    check_choice("router_type", config.router_type, ROUTER_TYPES)
    return TopKRouter(config) if config.router_type == "topk" else ExpertChoiceRouter(config)
