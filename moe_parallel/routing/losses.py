"""Routing losses: load balancing (Switch, per sequence), the router z-loss and the dynamic
(entropy) loss, and ``attach_to_graph``, which hands a loss its gradient in the backward.

Each is returned coefficient-scaled (the router keys them ``"aux"``, ``"seq_aux"``, ``"z"``,
``"dynamic"``):

* Switch: ``coeff · E · Σ_i f_i P_i``, ``f_i = count_i / (T·k)``, ``P_i = mean_t ŝ_{t,i}``;
* per sequence (DeepSeek-V3): ``coeff · mean_b Σ_i (E·count_{b,i} / (k·T_b)) · mean_{t∈b} ŝ_{t,i}``;
* z-loss: ``coeff · mean_t logsumexp(logits_t)^2``;
* dynamic (Huang et al. 2024): ``coeff · mean_t(-Σ_e P_te log P_te)``, ``P = softmax(logits)``;

where ``ŝ`` is the full distribution over experts (``softmax(logits)``, or
``sigmoid(logits) / Σ_e sigmoid(logits)``) and ``count`` the selections before capacity drops.
With a ``valid`` mask (``[T]`` bool, False: a padding token) every mean, count and ``T`` is
over the valid tokens only, so padding changes no loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SCORE_FUNCTIONS, check_choice

__all__ = [
    "attach_to_graph",
    "dynamic_loss",
    "full_scores",
    "sequence_load_balancing_loss",
    "switch_load_balancing_loss",
    "z_loss",
]


def full_scores(logits: Tensor, score_function: str) -> Tensor:
    """Per-token distribution over all experts used by the balancing losses, ``[T, E]``.

    ``softmax(logits)`` for ``"softmax"``; ``sigmoid(logits) / Σ_e sigmoid(logits)`` for
    ``"sigmoid"``.
    """
    check_choice("score_function", score_function, SCORE_FUNCTIONS)
    if score_function == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(dim=-1, keepdim=True)
    return torch.softmax(logits, dim=-1)


def _masked(values: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | int]:
    """``values`` with the rows of invalid tokens zeroed, and the number of valid rows (>= 1)."""
    if valid is None:
        return values, max(values.shape[0], 1)
    keep = valid.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return values * keep, valid.sum().clamp(min=1).to(values.dtype)


def switch_load_balancing_loss(
    scores: Tensor, routed_per_expert: Tensor, top_k: int, coeff: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Switch aux loss ``coeff · E · Σ_i f_i P_i``.

    ``scores``: ``[T, E]`` full distributions (see ``full_scores``); ``routed_per_expert``:
    ``[E]`` selection counts (of the valid tokens); ``f_i = count_i / (T·k)``,
    ``P_i = mean_t scores[t, i]``, ``T`` and the mean over the ``valid`` tokens (all when None).
    Gradients flow through ``scores`` only. An empty batch gives 0.
    """
    E = scores.shape[1]
    scores, denom = _masked(scores, valid)
    f = routed_per_expert.to(scores.dtype) / (denom * top_k)
    p = scores.sum(dim=0) / denom
    return coeff * E * torch.dot(f, p)


def sequence_load_balancing_loss(
    scores: Tensor, selected: Tensor, top_k: int, num_seqs: int, coeff: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Per-sequence aux loss (DeepSeek-V3) ``coeff · mean_b Σ_i f_{b,i} P_{b,i}``.

    ``scores``: ``[T, E]`` full distributions; ``selected``: ``[T, E]`` 0/1 selection mask.
    Tokens are sequence-major: sequence ``b`` owns the tokens ``t`` with ``t % num_seqs == b``
    (``T_b = T / num_seqs`` of them, or its ``valid`` ones). ``f_{b,i} = E · count_{b,i} /
    (k · T_b)``, ``P_{b,i} = mean_{t∈b} scores[t, i]``; the mean over ``b`` is over the
    sequences with a valid token. An empty batch gives 0.
    """
    T, E = scores.shape
    seq_len = T // num_seqs
    if valid is None:
        denom = torch.full((num_seqs, 1), float(max(seq_len, 1)), dtype=scores.dtype,
                           device=scores.device)
        seqs = num_seqs
    else:
        keep = valid.to(scores.dtype).view(seq_len, num_seqs, 1)
        scores, selected = scores * keep.view(T, 1), selected * keep.view(T, 1)
        per_seq = keep.sum(dim=0)  # [B, 1]
        denom, seqs = per_seq.clamp(min=1), (per_seq > 0).sum().clamp(min=1)
    counts = selected.to(scores.dtype).view(seq_len, num_seqs, E).sum(dim=0)  # [B, E]
    f = counts * E / (top_k * denom)
    p = scores.view(seq_len, num_seqs, E).sum(dim=0) / denom  # [B, E]
    return coeff * (f * p).sum() / seqs


def z_loss(logits: Tensor, coeff: float, valid: Tensor | None = None) -> Tensor:
    """Router z-loss ``coeff · mean_t logsumexp(logits_t)^2`` over the ``valid`` tokens (all
    when None; 0 for an empty batch)."""
    lse, denom = _masked(torch.logsumexp(logits, dim=-1), valid)
    return coeff * lse.square().sum() / denom


def dynamic_loss(probs: Tensor, coeff: float, valid: Tensor | None = None) -> Tensor:
    """Dynamic-routing loss of Huang et al. 2024, the entropy of the router's distribution:
    ``coeff · mean_t(-Σ_e P_te log P_te)`` over the ``valid`` tokens (``probs``: ``[T, E]``
    softmax; ``0 · log 0 = 0``). Minimising it makes the router confident, so top-p routing
    takes fewer experts per token."""
    ent = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=-1)
    ent, denom = _masked(ent, valid)
    return coeff * ent.sum() / denom


class _AttachToGraph(torch.autograd.Function):
    """Identity on ``output``; its backward sends ``scale`` as the gradient of ``loss``."""

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor | None, scale: float, on_backward):
        ctx.scale, ctx.on_backward = scale, on_backward
        ctx.loss_shape = None if loss is None else (loss.shape, loss.dtype, loss.device)
        if torch.compiler.is_compiling():
            # AOT autograd regenerates an output that is a view of a graph input outside the
            # compiled graph, which would skip this backward (loss gradient and on_backward).
            return output.clone()
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.on_backward is not None:
            ctx.on_backward()
        grad_loss = None
        if ctx.loss_shape is not None:
            shape, dtype, device = ctx.loss_shape
            grad_loss = torch.full(shape, ctx.scale, dtype=dtype, device=device)
        return grad_output, grad_loss, None, None


def attach_to_graph(output: Tensor, loss: Tensor | None, scale: float = 1.0,
                    on_backward=None) -> Tensor:
    """``output`` unchanged, with ``loss`` attached to its autograd graph (Megatron-Core's
    ``MoEAuxLossAutoScaler``): when the backward reaches ``output``, ``loss`` receives the
    gradient ``scale`` (not ``grad_output``), so the router learns from the loss without the
    caller adding it to the training loss, whatever wraps the layer (activation
    recomputation included). ``on_backward()`` runs once in that backward."""
    return _AttachToGraph.apply(output, loss, scale, on_backward)
