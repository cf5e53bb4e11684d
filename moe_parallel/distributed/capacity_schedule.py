"""Dynamic capacity across ranks: one call per optimizer step.

For every layer of a model with ``MoEConfig(dynamic_capacity=True)``:

    [dropped, routed, slots] = Σ_ranks capacity_counts     over the ranks that route distinct
                                                            tokens: DP×CP, and TP
    factor <- next_capacity_factor(factor, dropped, routed, slots - kept, slots, ...)

(``routing.capacity.next_capacity_factor``; ``kept = routed - dropped``). ``capacity_counts``
accumulates the training forwards since the last update (added in their backward, once per step
even under activation recomputation). Every rank of a stage sums the same integers, so every
rank holds the same factor after every step; the factor is the layer's persistent buffer
``capacity_factor_now``, saved and loaded with the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .parallel_state import ParallelState

__all__ = ["update_capacity_factors"]


@torch.no_grad()
def update_capacity_factors(model: nn.Module, ps: ParallelState) -> list[float]:
    """Step the capacity factor of every dynamic-capacity layer in ``model`` from the counts of
    all ranks (one all-reduce over DP×CP and one over TP for all layers), reset the counts;
    returns the new factors, in module order. Call it on every rank of the stage once per
    optimizer step, after the backward of the last micro-batch."""
    layers = [m for m in model.modules()
              if getattr(m, "capacity_counts", None) is not None
              and hasattr(m, "update_capacity_factor")]
    if not layers:
        return []
    counts = torch.stack([m.capacity_counts for m in layers])
    for name in ("dp_cp", "tp"):
        group = ps.group(name)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
    return [m.update_capacity_factor(c) for m, c in zip(layers, counts)]
