"""Megatron dist-checkpointing view of an MoE layer: every tensor with its global offsets.

Dense state (router weight, expert bias, shared expert) is replicated over the ranks: one
``ShardedTensor`` each, main replica on TP rank 0 of DP×CP rank 0 (Megatron's
``make_sharded_tensors_for_checkpoint``). The routed experts are stored as the global tensors
of the whole model, each (EP, ETP) rank writing its block, replica id ``(0, 0, EDP rank)``::

    experts.w1  [E, H, 2F] (gate | up; [E, H, F] without GLU)  axis 0: EP, axis 2: ETP
    experts.w2  [E, F, H]                                       axis 0: EP, axis 1: ETP

Under ETP a rank's ``w1`` holds ``F/etp`` columns of the gate and of the up half: two chunks,
at fragments ``etp_rank`` and ``etp + etp_rank`` of ``2·etp`` along the last axis (a
``ShardedTensorFactory``; Megatron shards its own GLU experts the same way). A checkpoint saved
at one (EP, ETP) layout therefore loads at any other, as Megatron's own experts do.
``sharded_offsets`` from the enclosing modules (e.g. a prepended layer axis) come first.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["moe_sharded_state_dict"]


def _expert_tensor(key: str, t: Tensor, offsets: tuple, axes: tuple, replica_id: tuple) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    p = len(offsets)
    return ShardedTensor.from_rank_offsets(
        key, t, *offsets, *((p + a, r, n) for a, r, n in axes),
        replica_id=replica_id, prepend_axis_num=p)


def _glu_factory(key: str, w1: Tensor, offsets: tuple, ep: tuple, etp_rank: int, etp: int,
                 replica_id: tuple) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    def build(key: str, t: Tensor, replica_id: Any, flattened_range: Optional[slice]):
        if flattened_range is not None:
            raise NotImplementedError("flattened (distributed-optimizer) shards of MoEMLP "
                                      "expert weights are not supported")
        gate, up = torch.chunk(t, 2, dim=-1)
        return [_expert_tensor(key, gate.contiguous(), offsets, (ep, (2, etp_rank, 2 * etp)),
                               replica_id),
                _expert_tensor(key, up.contiguous(), offsets,
                               (ep, (2, etp + etp_rank, 2 * etp)), replica_id)]

    def merge(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, dim=-1)

    return ShardedTensorFactory(key, w1, build, merge, replica_id)


def moe_sharded_state_dict(layer, prefix: str, sharded_offsets: tuple = (),
                           gated: bool = True) -> dict[str, Any]:
    """The sharded state dict of ``layer`` (an expert-parallel ``MoELayer``), keyed
    ``prefix + <its state_dict key>`` as ``load_state_dict`` expects them back."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    ps = layer.parallel_state
    own = layer.state_dict(prefix="", keep_vars=True)
    expert_keys = {k for k in own if k.startswith("experts.")}
    unknown = expert_keys - {"experts.w1", "experts.w2"}
    if unknown:
        raise ValueError(f"MoEMLP cannot describe the expert tensors {sorted(unknown)} "
                         "for Megatron dist-checkpointing")
    dense = {k: v for k, v in own.items() if k not in expert_keys}
    out = make_sharded_tensors_for_checkpoint(
        dense, prefix, sharded_offsets=sharded_offsets,
        tp_group=ps.group("tp"), dp_cp_group=ps.group("dp_cp"))
    offsets = tuple(sharded_offsets)
    replica = (0, 0, ps.edp_rank)
    ep = (0, ps.ep_rank, ps.ep)
    w1, w2 = own["experts.w1"], own["experts.w2"]
    if gated:
        out[prefix + "experts.w1"] = _glu_factory(prefix + "experts.w1", w1, offsets, ep,
                                                  ps.etp_rank, ps.etp, replica)
    else:
        out[prefix + "experts.w1"] = _expert_tensor(prefix + "experts.w1", w1, offsets,
                                                    (ep, (2, ps.etp_rank, ps.etp)), replica)
    out[prefix + "experts.w2"] = _expert_tensor(prefix + "experts.w2", w2, offsets,
                                                (ep, (1, ps.etp_rank, ps.etp)), replica)
    return out
