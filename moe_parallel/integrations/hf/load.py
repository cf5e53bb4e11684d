"""``load_pretrained``: a converted transformers model from a ``save_pretrained`` directory,
each rank reading only its own experts.

Stages: ``_skeleton`` builds the model on the meta device from the directory's config, with
every MoE block already an ``HFMoEBlock`` holding this rank's empty shard, and allocates it on
the CPU; ``_load_dense`` reads every other tensor whole (every checkpoint key must have a
place, every model tensor but the tied ones a key); ``_load_block`` reads each block's local
experts slice by slice (``shards.local_block``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from ...config import MoEConfig
from ...distributed import ParallelState
from ...layer import MoELayer
from .block import HFMoEBlock, router_tap
from .conversion import find_blocks, moe_config, replace_module
from .families import Family, UnsupportedModelError, family_of_config
from .shards import Reader, local_block
from .weights import dtype_pattern

__all__ = ["load_pretrained"]


def load_pretrained(path: str | os.PathLike, parallel_state: Optional[ParallelState] = None,
                    dtype: torch.dtype = torch.float32, **config_overrides: Any) -> nn.Module:
    """A transformers model from the checkpoint directory ``path`` (config + safetensors, as
    ``save_pretrained`` writes it), its MoE blocks converted, each rank reading only its own
    experts (and, with ETP, its hidden units) from disk: the full expert tensors are never
    materialised. Dense weights are read whole on every rank. ``dtype``: the model's
    parameter dtype. A directory without safetensors raises ``FileNotFoundError``; the model's
    ``moe_checkpoint_reader`` is the ``Reader`` (what was read, for inspection)."""
    path = os.fspath(path)
    model, family, cfg, blocks = _skeleton(path, parallel_state, dtype, config_overrides)
    reader = Reader(path)
    with torch.no_grad():
        _load_dense(model, family, reader, blocks, path)
        for name, block in blocks.items():
            _load_block(block, name, family, reader, cfg)
    hf_config = getattr(model.config, "text_config", model.config)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.moe_checkpoint_reader = reader
    return model


def _skeleton(path: str, parallel_state: Optional[ParallelState], dtype: torch.dtype,
              overrides: dict[str, Any]
              ) -> tuple[nn.Module, Family, MoEConfig, dict[str, HFMoEBlock]]:
    """The model of ``path``'s config on the CPU, uninitialised, its MoE blocks ``HFMoEBlock``s
    around this rank's (empty) ``MoELayer`` shards; its family, ``MoEConfig`` and blocks."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    family = family_of_config(config)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf_config = getattr(model.config, "text_config", model.config)
    cfg = moe_config(family, hf_config, dtype, **overrides)
    ps = parallel_state if parallel_state is not None else ParallelState.single()
    found, router_cls = find_blocks(model, family)
    blocks = {}
    for name, _ in found:
        layer = MoELayer(cfg, device="cpu", parallel_state=None if ps.world_size == 1 else ps)
        blocks[name] = HFMoEBlock(layer, family, router_tap(family, router_cls), {})
        replace_module(model, name, blocks[name])
    model.to_empty(device="cpu")  # dense weights: placeholders until _load_dense
    for module in model.modules():  # non-persistent buffers (rotary tables): recomputed
        if any(n in module._non_persistent_buffers_set for n, _ in
               module.named_buffers(recurse=False)) and not isinstance(module, MoELayer):
            model._init_weights(module)
    return model, family, cfg, blocks


def _load_dense(model: nn.Module, family: Family, reader: Reader,
                blocks: dict[str, HFMoEBlock], path: str) -> None:
    """Every checkpoint tensor outside the MoE blocks, copied whole into ``model``."""
    own = model.state_dict()
    moe_prefixes = [family.disk_name(name) for name in blocks]
    loaded = set()
    for key in reader.where:
        if any(key.startswith(p + ".") for p in moe_prefixes):
            continue
        if key not in own:
            raise UnsupportedModelError(f"{family.model_type}: checkpoint key {key} has no "
                                        "place in the model")
        own[key].copy_(reader.get(key))
        loaded.add(key)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = sorted(k for k in own if k not in loaded and k not in tied
                     and not any(k.startswith(n + ".") for n in blocks))
    if missing:
        raise UnsupportedModelError(f"{path}: the checkpoint lacks {missing[:8]}")


def _load_block(block: HFMoEBlock, name: str, family: Family, reader: Reader,
                cfg: MoEConfig) -> None:
    """This rank's shard of the block at ``name`` read into ``block.moe``; ``block.hf_dtypes``
    from the dtypes on disk. A balancing bias the family lacks (``expert_bias``) starts at 0."""
    layer = block.moe
    experts = layer.experts
    local = local_block(family, reader, family.disk_name(name), cfg, experts.first_expert,
                        experts.num_local_experts, experts.etp_rank * experts.ffn_size,
                        experts.ffn_size)
    block.hf_dtypes = {dtype_pattern(k): v.dtype for k, v in family.disk(local).items()}
    params = dict(layer.named_parameters()) | dict(layer.named_buffers())
    for k, t in params.items():
        if k in local:
            t.copy_(local[k])
        elif k in ("router.expert_bias", "router.local_tokens_per_expert"):
            t.zero_()
        else:
            raise UnsupportedModelError(f"{family.model_type}: {name}.moe.{k} has no "
                                        "weight in the checkpoint")
