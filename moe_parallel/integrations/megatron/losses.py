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


def attach_megatron_losses(output: Tensor, logits: Tensor, padding_mask: Optional[Tensor],
                           seq_len: int, bsz: int, losses: MegatronLosses, top_k: int,
                           score_function: str, tp_cp_group, layer_number: Optional[int]
                           ) -> Tensor:
    """``output`` with the enabled losses attached (``padding_mask``: ``[T]`` bool or None);
    call only in a training forward with autograd on."""
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        compute_routing_scores_for_aux_loss,
        get_tokens_per_expert_and_token_count,
        save_to_aux_losses_tracker,
        switch_load_balancing_loss_func,
        z_loss_func,
    )

    num_experts = logits.shape[-1]
    with_mask = padding_mask is not None
    tp_cp = tp_cp_group.size()

    def attach(out: Tensor, loss: Tensor, coeff: float, name: str, num_tokens, reduce_group):
        save_to_aux_losses_tracker(name, loss / coeff, layer_number, losses.num_layers,
                                   reduce_group=reduce_group)
        if losses.per_token:
            loss = loss * num_tokens
        return MoEAuxLossAutoScaler.apply(out, loss)

    if losses.z_coeff > 0:
        local = ((~padding_mask).sum() if with_mask
                 else torch.tensor(logits.shape[0], device=logits.device)).to(logits.dtype)
        total = local.clone()
        if tp_cp > 1:
            torch.distributed.all_reduce(total, group=tp_cp_group)
        z = z_loss_func(logits, losses.z_coeff, padding_mask=padding_mask)
        z = z * local.clamp(min=1) / total.clamp(min=1)
        output = attach(output, z, losses.z_coeff, "z_loss", local, tp_cp_group)

    if losses.aux_coeff > 0 or losses.seq_aux_coeff > 0:
        routing_map, scores = compute_routing_scores_for_aux_loss(
            logits, top_k, score_function, fused=False, padding_mask=padding_mask)
        if losses.aux_coeff > 0:
            counts, local_n, total_n = get_tokens_per_expert_and_token_count(
                routing_map=routing_map, reduce_group=tp_cp_group, topk=top_k,
                with_padding_mask=with_mask)
            aux = switch_load_balancing_loss_func(
                probs=scores, tokens_per_expert=counts, total_num_tokens=total_n, topk=top_k,
                num_experts=num_experts, moe_aux_loss_coeff=losses.aux_coeff)
            output = attach(output, aux, losses.aux_coeff, "load_balancing_loss", local_n,
                            tp_cp_group)
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
            output = attach(output, seq, losses.seq_aux_coeff, "seq_load_balancing_loss",
                            local_n, tp_cp_group)
    return output

