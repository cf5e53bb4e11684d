"""Aux-loss-free load balancing across ranks (DeepSeek-V3): one call per optimizer step.

For every router of a model that holds an expert bias ``b`` (``MoEConfig(expert_bias=True)``):

    c = Σ_ranks local_tokens_per_expert         over the ranks that route distinct tokens:
                                                 DP×CP, and TP (sequence parallel input)
    b += bias_update_rate · sign(mean(c) − c)   (``TopKRouter.update_expert_bias``)

``local_tokens_per_expert`` accumulates the routed (pre-capacity) assignments of the training
forwards since the last update. Every rank of a stage sums the same counts, so every rank ends
with the same bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .parallel_state import ParallelState

__all__ = ["update_expert_biases"]


@torch.no_grad()
def update_expert_biases(model: nn.Module, ps: ParallelState) -> int:
    """Update the expert bias of every router in ``model`` from the counts of all ranks, then
    reset the counts; returns the number of routers updated.

    The counts of all layers travel in one tensor: one all-reduce over DP×CP and one over TP.
    Call it on every rank of the stage, once per optimizer step (after the backward of the last
    micro-batch: the counts of all micro-batches are summed), as Megatron-Core's
    ``finalize_model_grads`` does.
    """
    routers = [m for m in model.modules()
               if getattr(m, "expert_bias", None) is not None and hasattr(m, "update_expert_bias")]
    if not routers:
        return 0
    counts = torch.cat([r.local_tokens_per_expert for r in routers])
    for name in ("dp_cp", "tp"):
        group = ps.group(name)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
    sizes = [r.local_tokens_per_expert.numel() for r in routers]
    for router, c in zip(routers, counts.split(sizes)):
        router.update_expert_bias(c)
    return len(routers)
