"""``export``: a converted model's HF on-disk state dict, the expert shards gathered.

``gather_experts(layer)``: the layer's full weights on every rank; ``experts.w1 [El, H, 2Fl]``
is gathered over ETP along its columns (gate and up halves separately when gated), then over
EP along experts; ``experts.w2 [El, Fl, H]`` over ETP along rows, then over EP; the expert
biases over EP (``collectives.all_gather``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...distributed import collectives
from ...layer import MoELayer
from .block import HFMoEBlock
from .weights import Weights, dtype_pattern

__all__ = ["export", "gather_experts"]


def _gather(t: Tensor, group: Optional[dist.ProcessGroup], dim: int) -> Tensor:
    """``cat([t_0, ..., t_{w-1}], dim)`` over the ``w`` ranks of ``group`` (equal shapes)."""
    world = collectives.group_size(group)
    rows = collectives.all_gather(t.movedim(dim, 0).contiguous(), group,
                                  sizes=[t.shape[dim]] * world)
    return rows.movedim(0, dim)


def gather_experts(layer: MoELayer) -> Weights:
    """The layer's full weights on every rank (routed experts gathered over ETP then EP)."""
    ps = layer.parallel_state
    w = {k: v.detach() for k, v in layer.named_parameters()}
    w.update({k: v.detach() for k, v in layer.named_buffers()
              if k != "router.local_tokens_per_expert"})
    if ps is None or ps.ep * ps.etp == 1:
        return w
    gated = layer.config.gated
    for name, dim in (("experts.w1", 2), ("experts.w2", 1)):
        t = w[name]
        if ps.etp > 1:
            if name == "experts.w1" and gated:  # gate | up halves gathered separately
                t = torch.cat([_gather(h, ps.group("etp"), 2) for h in t.chunk(2, dim=2)],
                              dim=2)
            else:
                t = _gather(t, ps.group("etp"), dim)
        w[name] = _gather(t, ps.group("ep"), 0) if ps.ep > 1 else t
    for name in ("experts.b1", "experts.b2"):
        if name in w and ps.ep > 1:
            w[name] = _gather(w[name], ps.group("ep"), 0)
    return w


def export(model: nn.Module) -> dict[str, Tensor]:
    """The HF on-disk state dict of a converted model: every non-MoE tensor as it is, each MoE
    block's weights in HF's keys and dtypes (per-expert keys where HF saves them), gathered
    from the EP/ETP shards (collective over each layer's EP and ETP groups). Tied weights are
    left out as ``save_pretrained`` leaves them out."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEBlock)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not any(key.startswith(name + ".") for name in blocks):
            out[key] = value
    for name, block in blocks.items():
        disk_name = block.family.disk_name(name)
        for k, v in block.family.disk(gather_experts(block.moe)).items():
            out[f"{disk_name}.{k}"] = v.to(block.hf_dtypes[dtype_pattern(k)]).contiguous()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for key in (tied if isinstance(tied, (list, dict)) else []):
        if getattr(model.config, "tie_word_embeddings", False):
            out.pop(key, None)
    return out
