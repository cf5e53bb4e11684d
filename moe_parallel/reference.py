"""The executable specification: a plain loop-over-experts MoE with the semantics of MoEConfig.

It shares no code with the runtime's router, capacity, dispatcher or experts: every formula of
``config.py`` is written out once more, as directly as possible, so the runtime can be tested
against it (and benchmarked against it as the naive baseline). Parameter names match
``MoELayer``'s, so ``ReferenceMoE.from_layer(layer)`` copies weights and gradients compare by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


def _act(h: Tensor, config: MoEConfig) -> Tensor:
    half = h.shape[-1] // 2
    if config.activation == "swiglu":
        return F.silu(h[..., :half]) * h[..., half:]
    if config.activation == "clamped_swiglu":
        limit = config.swiglu_limit
        gate = torch.clamp(h[..., :half], max=limit)
        up = torch.clamp(h[..., half:], min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(config.swiglu_alpha * gate)
    return F.gelu(h) if config.activation == "gelu" else F.relu(h)


def router_dtype(config: MoEConfig) -> torch.dtype:
    """The router parameters' dtype: float64 for float64 models, else float32."""
    return torch.float64 if config.params_dtype == torch.float64 else torch.float32


class ReferenceMoE(nn.Module):
    """forward(x [T, H] or [S, B, H]) -> (y, losses) with ``losses`` coefficient-scaled."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.capacity_factor_now = config.capacity_factor  # stepped by next_capacity_factor
        self.last_counts = (0, 0, 0)  # (dropped, routed, slots) of the last token-choice forward
        E, H, Fh = config.num_experts, config.hidden_size, config.ffn_hidden_size
        rd, pd = router_dtype(config), config.params_dtype
        fc1 = 2 * Fh if config.gated else Fh
        self.router = nn.Module()
        self.router.weight = nn.Parameter(torch.randn(E, H, dtype=rd) * config.init_std)
        if config.noisy_gating:
            self.router.noise_weight = nn.Parameter(torch.randn(E, H, dtype=rd) * config.init_std)
        if config.router_bias:
            self.router.bias = nn.Parameter(torch.randn(E, dtype=rd) * config.init_std)
        if config.expert_bias:
            self.router.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.randn(E, H, fc1, dtype=pd) * config.init_std)
        self.experts.w2 = nn.Parameter(torch.randn(E, Fh, H, dtype=pd) * config.init_std)
        if config.expert_proj_bias:
            self.experts.b1 = nn.Parameter(torch.randn(E, fc1, dtype=pd) * config.init_std)
            self.experts.b2 = nn.Parameter(torch.randn(E, H, dtype=pd) * config.init_std)
        if config.num_shared_experts:
            Fs = config.shared_ffn_size
            self.shared_expert = nn.Module()
            self.shared_expert.w1 = nn.Parameter(
                torch.randn(H, 2 * Fs if config.gated else Fs, dtype=pd) * config.init_std
            )
            self.shared_expert.w2 = nn.Parameter(torch.randn(Fs, H, dtype=pd) * config.init_std)
            if config.shared_expert_gate:
                self.shared_expert.gate_weight = nn.Parameter(
                    torch.randn(1, H, dtype=pd) * config.init_std
                )

    @classmethod
    def from_layer(cls, layer: nn.Module) -> ReferenceMoE:
        """A reference holding copies of ``layer``'s parameters and buffers (matched by name)."""
        with torch.device(next(layer.parameters()).device):
            ref = cls(layer.config)
        own = dict(ref.named_parameters()) | dict(ref.named_buffers())
        theirs = dict(layer.named_parameters()) | dict(layer.named_buffers())
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(theirs[name])
        return ref

    # ---- routing -------------------------------------------------------------------------
    def _logits(self, x: Tensor) -> Tensor:
        """Logits in the router dtype (``router_dtype``, else the router parameters' dtype)."""
        cfg = self.config
        dtype = cfg.router_dtype or self.router.weight.dtype
        xr = x.to(dtype)
        logits = xr @ self.router.weight.to(dtype).t()
        if cfg.router_bias:
            logits = logits + self.router.bias.to(dtype)
        if cfg.noisy_gating and self.training:
            noise_std = F.softplus(xr @ self.router.noise_weight.to(dtype).t())
            logits = logits + torch.randn_like(logits) * noise_std
        if cfg.check_finite and not torch.isfinite(logits).all():
            raise FloatingPointError("router logits are not finite")
        return logits

    def _full_scores(self, logits: Tensor) -> Tensor:
        """Scores over all experts used by the aux losses."""
        if self.config.score_function == "softmax":
            return logits.softmax(-1)
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)

    def _select(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Token-choice top-k: (expert_idx [T, k], probs [T, k], selected [T, k] bool)."""
        cfg = self.config
        k = cfg.top_k
        if cfg.router_score_dtype is not None:
            logits = logits.to(cfg.router_score_dtype)
        if cfg.score_function == "softmax":
            scores = logits.softmax(-1) if cfg.softmax_before_topk else logits
        else:
            scores = logits.sigmoid()
        choose = scores.detach().clone()
        if cfg.expert_bias:
            choose = choose + self.router.expert_bias.to(choose.dtype)
        if cfg.num_groups is not None:
            (T, E), G = choose.shape, cfg.num_groups
            per_group = choose.view(T, G, E // G)
            if cfg.group_score == "max":  # DeepSeek-V2 group_limited_greedy
                group_score = per_group.max(-1).values
            elif cfg.group_score == "sum_top2":  # DeepSeek-V3
                group_score = per_group.topk(2, dim=-1).values.sum(-1)
            else:
                group_score = per_group.topk(k // cfg.group_topk, dim=-1).values.sum(-1)
            best_groups = group_score.topk(cfg.group_topk, dim=-1).indices
            allowed = torch.zeros(T, G, dtype=torch.bool, device=choose.device)
            allowed[torch.arange(T, device=choose.device)[:, None], best_groups] = True
            allowed = allowed[:, :, None].expand_as(per_group).reshape(T, E)
            choose = choose.masked_fill(~allowed, float("-inf"))
        idx = choose.topk(k, dim=-1).indices
        if cfg.force_balance:  # token t takes experts (t·k + j) mod E
            idx = (torch.arange(idx.shape[0] * k, device=idx.device)
                   % cfg.num_experts).view(-1, k)
        picked = scores.gather(1, idx)
        selected = torch.ones_like(idx, dtype=torch.bool)
        if cfg.top_p is not None:  # take experts, best first, until their probability >= p
            for t in range(idx.shape[0]):
                total = torch.zeros((), dtype=picked.dtype)
                for j in range(k):
                    selected[t, j] = bool(total < cfg.top_p)
                    total = total + picked[t, j].detach()
            probs = torch.where(selected, picked, torch.zeros_like(picked))
            if cfg.norm_topk_prob:
                probs = probs / probs.sum(-1, keepdim=True)
            return idx, probs, selected
        if cfg.score_function == "softmax" and not cfg.softmax_before_topk:
            probs = picked.softmax(-1)
        elif cfg.renormalize_topk:
            eps = 1e-20 if cfg.score_function == "sigmoid" else 0.0
            probs = picked / (picked.sum(-1, keepdim=True) + eps)
        else:
            probs = picked
        return idx, probs * cfg.routed_scaling_factor, selected

    def _capacity(self, T: int) -> int | None:
        """C = max(ceil(T·k/E·factor), min_capacity) with this forward's factor (the dynamic
        one in training with ``dynamic_capacity``); None: dropless."""
        cfg = self.config
        if self.training and cfg.dynamic_capacity:
            factor = self.capacity_factor_now
        else:
            factor = cfg.capacity_factor_in(self.training)
        if factor is None:
            return None
        return max(math.ceil(T * cfg.top_k / cfg.num_experts * factor), cfg.min_capacity)

    def _capacity_keep(self, idx: Tensor, probs: Tensor, selected: Tensor) -> Tensor:
        """Keep at most C of the selected assignments per expert, by drop policy."""
        cfg = self.config
        T, k = idx.shape
        keep = selected.clone()
        cap = self._capacity(T)
        if cap is None:
            return keep
        priority = probs.detach().max(dim=1).values.tolist() if k else [0.0] * T
        weight = probs.detach().tolist()
        for e in range(cfg.num_experts):
            tok, slot = ((idx == e) & selected).nonzero(as_tuple=True)
            cand = list(zip(tok.tolist(), slot.tolist()))  # (t, j) ascending
            if len(cand) <= cap:
                continue
            if cfg.drop_policy == "probs":
                cand.sort(key=lambda c: -weight[c[0]][c[1]])
            elif cfg.drop_policy == "k_major":
                cand.sort(key=lambda c: (c[1], c[0]))
            elif cfg.drop_policy == "batch_priority":
                cand.sort(key=lambda c: (c[1], -priority[c[0]], c[0]))
            for t, j in cand[cap:]:
                keep[t, j] = False
        return keep

    def _losses(self, logits: Tensor, idx: Tensor, selected: Tensor,
                num_seqs: int) -> dict[str, Tensor]:
        cfg = self.config
        T, k, E = idx.shape[0], idx.shape[1], cfg.num_experts
        losses: dict[str, Tensor] = {}
        scores = self._full_scores(logits)
        onehot = (F.one_hot(idx, E) * selected[..., None]).sum(1).to(scores.dtype)  # [T, E]
        if cfg.top_p is not None:  # the mean number of experts a token took
            k = onehot.sum() / T
        if cfg.aux_loss_coeff > 0:
            f = onehot.sum(0) / (T * k)
            losses["aux"] = cfg.aux_loss_coeff * E * (f * scores.mean(0)).sum()
        if cfg.seq_aux_loss_coeff > 0:
            per_seq = []
            for b in range(num_seqs):
                rows = torch.arange(b, T, num_seqs, device=logits.device)
                f = onehot[rows].sum(0) * E / (k * rows.numel())
                per_seq.append((f * scores[rows].mean(0)).sum())
            losses["seq_aux"] = cfg.seq_aux_loss_coeff * torch.stack(per_seq).mean()
        if cfg.z_loss_coeff > 0:
            losses["z"] = cfg.z_loss_coeff * logits.logsumexp(-1).square().mean()
        if cfg.dynamic_loss_coeff > 0:
            p = logits.softmax(-1)
            entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
            losses["dynamic"] = cfg.dynamic_loss_coeff * entropy.mean()
        return losses

    # ---- experts -------------------------------------------------------------------------
    def _expert(self, e: int, x: Tensor) -> Tensor:
        w1, w2 = self.experts.w1[e], self.experts.w2[e]
        if not self.config.expert_proj_bias:
            return _act(x @ w1, self.config) @ w2
        return _act(x @ w1 + self.experts.b1[e], self.config) @ w2 + self.experts.b2[e]

    def _shared(self, x: Tensor) -> Tensor:
        se = self.shared_expert
        y = _act(x @ se.w1, self.config) @ se.w2
        if self.config.shared_expert_gate:
            y = torch.sigmoid(x @ se.gate_weight.t()) * y
        return y

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(y, losses)`` for ``x`` ``[T, H]`` or ``[S, B, H]``: the layer's formula computed one
        expert at a time over the tokens routed to it (all experts on this process)."""
        cfg = self.config
        shape = x.shape
        num_seqs = shape[1] if x.dim() == 3 else 1
        x = x.reshape(-1, cfg.hidden_size)
        if self.training and cfg.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1 - cfg.jitter_noise, 1 + cfg.jitter_noise)
        T = x.shape[0]
        logits = self._logits(x)
        y = torch.zeros_like(x)
        if cfg.router_type == "expert_choice":
            losses = {}
            if cfg.z_loss_coeff > 0:
                losses["z"] = cfg.z_loss_coeff * logits.logsumexp(-1).square().mean()
            scores = logits.to(cfg.router_score_dtype or logits.dtype).softmax(-1)
            cf = cfg.capacity_factor_in(self.training)
            cf = cf if cf is not None else 1.0
            cap = min(T, math.ceil(T * cfg.top_k / cfg.num_experts * cf))
            for e in range(cfg.num_experts):
                tok = scores[:, e].detach().topk(cap).indices
                out = self._expert(e, x[tok])
                y = y.index_add(0, tok, scores[tok, e, None].to(x.dtype) * out)
        else:
            idx, probs, selected = self._select(logits)
            losses = self._losses(logits, idx, selected, num_seqs)
            keep = self._capacity_keep(idx, probs, selected)
            self.last_counts = (int(selected.sum() - keep.sum()), int(selected.sum()),
                                cfg.num_experts * (self._capacity(T) or 0))
            for e in range(cfg.num_experts):
                tok, slot = ((idx == e) & keep).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                p = probs[tok, slot, None].to(x.dtype)
                if cfg.scale_expert_input:  # Llama-4: the weight scales the expert's input
                    y = y.index_add(0, tok, self._expert(e, p * x[tok]))
                else:
                    y = y.index_add(0, tok, p * self._expert(e, x[tok]))
        if cfg.num_shared_experts:
            y = y + self._shared(x)
        return y.reshape(shape), losses


def next_capacity_factor(config: MoEConfig, factor: float, dropped: int, routed: int,
                         slots: int) -> float:
    """The dynamic capacity schedule of ``MoEConfig``, written out: with d = dropped / routed
    and the idle share u = (slots - kept) / slots, raise the factor by ``capacity_update_rate``
    when d > ``target_drop_rate``, lower it when d < target / 2 and u > the rate, within the
    bounds."""
    if routed == 0:
        return factor
    kept = routed - dropped
    if dropped / routed > config.target_drop_rate:
        return min(config.capacity_factor_max, factor * (1 + config.capacity_update_rate))
    if (dropped / routed < config.target_drop_rate / 2 and slots > 0
            and (slots - kept) / slots > config.capacity_update_rate):
        return max(config.capacity_factor_min, factor * (1 - config.capacity_update_rate))
    return factor
