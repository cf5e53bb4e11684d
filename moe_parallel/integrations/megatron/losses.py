"""The router losses of a Megatron-Core MoE layer, computed with Megatron's own functions.

From the router logits ``[T, E]`` of this rank's tokens (``T = S·B``, sequence-major) and the
padding mask (True: padding), as Megatron-Core 0.16's ``TopKRouter`` does:

* scores and a plain top-k map: ``compute_routing_scores_for_aux_loss`` (padding zeroed);
* ``aux_loss``: ``switch_load_balancing_loss_func`` with the per-expert counts and the token
  count summed over the TP×CP group (``get_tokens_per_expert_and_token_count``), i.e. the
  rank's share of ``coeff·E·Σ_i f_i P_i`` over the TP×CP group's tokens;
* ``seq_aux_loss``: the same per sequence, divided by ``B``;
* ``z_loss``: ``z_loss_func``, the rank's share of ``coeff · mean_t logsumexp(logits_t)²`` over
  the TP×CP group's valid tokens: its sum over this rank's valid tokens divided by their number
  summed over the group. Without padding that is Megatron's ``coeff / |TP×CP|`` times the
  local mean; with padding spread unevenly over the TP ranks Megatron's local means would make
  the loss depend on the layout, this does not. It is logged with the TP×CP group as its
  reduce group, so the reduced log is the group's mean.

Each loss rides on the layer output through ``MoEAuxLossAutoScaler`` (so its gradient is
Megatron's ``main_loss_backward_scale``, set by Megatron's schedules), multiplied by the
number of valid tokens under ``calculate_per_token_loss``, and is logged, divided by its
coefficient, with ``save_to_aux_losses_tracker`` under Megatron's names
(``load_balancing_loss``, ``seq_load_balancing_loss``, ``z_loss``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import MegatronLosses

__all__ = ["attach_megatron_losses"]


def _attach(out: Tensor, loss: Tensor, coeff: float, name: str, num_tokens,
            losses: MegatronLosses, layer_number: Optional[int], reduce_group) -> Tensor:
    """Log ``loss / coeff`` under ``name`` (``save_to_aux_losses_tracker``) and return ``out``
    carrying ``loss`` (times ``num_tokens`` under ``per_token``) through
    ``MoEAuxLossAutoScaler``."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        save_to_aux_losses_tracker,
    )

    save_to_aux_losses_tracker(name, loss / coeff, layer_number, losses.num_layers,
                               reduce_group=reduce_group)
    if losses.per_token:
        loss = loss * num_tokens
    return MoEAuxLossAutoScaler.apply(out, loss)


def _attach_z_loss(output: Tensor, logits: Tensor, padding_mask: Optional[Tensor],
                   losses: MegatronLosses, tp_cp_group, layer_number: Optional[int]) -> Tensor:
    """``output`` carrying the z-loss: ``z_loss_func`` scaled by this rank's valid tokens over
    the TP×CP group's (one all-reduce when the group has several ranks)."""
    from megatron.core.transformer.moe.moe_utils import z_loss_func

    local = ((~padding_mask).sum() if padding_mask is not None
             else torch.tensor(logits.shape[0], device=logits.device)).to(logits.dtype)
    total = local.clone()
    if tp_cp_group.size() > 1:
        torch.distributed.all_reduce(total, group=tp_cp_group)
    z = z_loss_func(logits, losses.z_coeff, padding_mask=padding_mask)
    z = z * local.clamp(min=1) / total.clamp(min=1)
    return _attach(output, z, losses.z_coeff, "z_loss", local, losses, layer_number,
                   tp_cp_group)


def _attach_balancing_losses(output: Tensor, logits: Tensor, padding_mask: Optional[Tensor],
                             seq_len: int, bsz: int, losses: MegatronLosses, top_k: int,
                             score_function: str, tp_cp_group, layer_number: Optional[int]
                             ) -> Tensor:
    """``output`` carrying the enabled ``aux_loss`` and ``seq_aux_loss`` (module docstring),
    from one plain top-k routing map of ``logits``."""
    from megatron.core.transformer.moe.moe_utils import (
        compute_routing_scores_for_aux_loss,
        get_tokens_per_expert_and_token_count,
        switch_load_balancing_loss_func,
    )

    num_experts = logits.shape[-1]
    with_mask = padding_mask is not None
    routing_map, scores = compute_routing_scores_for_aux_loss(
        logits, top_k, score_function, fused=False, padding_mask=padding_mask)
    if losses.aux_coeff > 0:
        counts, local_n, total_n = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=tp_cp_group, topk=top_k,
            with_padding_mask=with_mask)
        aux = switch_load_balancing_loss_func(
            probs=scores, tokens_per_expert=counts, total_num_tokens=total_n, topk=top_k,
            num_experts=num_experts, moe_aux_loss_coeff=losses.aux_coeff)
        output = _attach(output, aux, losses.aux_coeff, "load_balancing_loss", local_n,
                         losses, layer_number, tp_cp_group)
    if losses.seq_aux_coeff > 0:
        seq_scores = scores.reshape(seq_len, -1)
        seq_map = routing_map.reshape(seq_len, -1)
        counts, local_n, total_n = get_tokens_per_expert_and_token_count(
            routing_map=seq_map, reduce_group=tp_cp_group, topk=top_k * bsz,
            with_padding_mask=with_mask)
        seq = switch_load_balancing_loss_func(
            probs=seq_scores, tokens_per_expert=counts, total_num_tokens=total_n,
            topk=top_k, num_experts=num_experts,
            moe_aux_loss_coeff=losses.seq_aux_coeff) / bsz
        output = _attach(output, seq, losses.seq_aux_coeff, "seq_load_balancing_loss",
                         local_n, losses, layer_number, tp_cp_group)
    return output


def attach_megatron_losses(output: Tensor, logits: Tensor, padding_mask: Optional[Tensor],
                           seq_len: int, bsz: int, losses: MegatronLosses, top_k: int,
                           score_function: str, tp_cp_group, layer_number: Optional[int]
                           ) -> Tensor:
    """``output`` with the enabled losses attached (``padding_mask``: ``[T]`` bool or None);
    call only in a training forward with autograd on."""
    if losses.z_coeff > 0:
        output = _attach_z_loss(output, logits, padding_mask, losses, tp_cp_group, layer_number)
    if losses.aux_coeff > 0 or losses.seq_aux_coeff > 0:
        output = _attach_balancing_losses(output, logits, padding_mask, seq_len, bsz, losses,
                                          top_k, score_function, tp_cp_group, layer_number)
    return output
