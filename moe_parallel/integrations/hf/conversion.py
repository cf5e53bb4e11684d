"""Convert a loaded transformers model in place: each MoE block becomes an ``HFMoEBlock``.

``convert(model, parallel_state=None, **config_overrides)`` validates the family's
``MoEConfig`` (``moe_config``) before any swap, then replaces every block of the family's
``block_class`` (``find_blocks``, ``replace_module``) with an ``HFMoEBlock`` around an
``MoELayer`` holding the block's weights (``layer_from_weights``); given a ``ParallelState``
with more than one rank, only this rank's EP/ETP shard of it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...config import MoEConfig
from ...distributed import ParallelState
from ...layer import MoELayer
from .block import HFMoEBlock, install_recorder_hook, router_tap
from .families import Family, UnsupportedModelError, family_of
from .weights import Weights, dtype_pattern

__all__ = ["convert", "find_blocks", "layer_from_weights", "moe_config", "replace_module"]


def moe_config(family: Family, hf_config: Any, dtype: torch.dtype, **overrides: Any) -> MoEConfig:
    """``MoEConfig(hidden_size, params_dtype=dtype, aux_loss_coeff=0, **family.config(hf_config),
    **overrides)``: the routed experts' aux losses are HF's (``router_aux_loss_coef`` with
    ``output_router_logits``), so the layer's own coefficient is 0."""
    fields = dict(hidden_size=hf_config.hidden_size, params_dtype=dtype, aux_loss_coeff=0.0)
    fields.update(family.config(hf_config))
    fields.update(overrides)
    return MoEConfig(**fields)


def convert(model: nn.Module, parallel_state: Optional[ParallelState] = None,
            **config_overrides: Any) -> nn.Module:
    """Replace, in place, every MoE block of ``model`` (a transformers model of a supported
    family) with an ``HFMoEBlock`` around an ``MoELayer`` holding the block's weights (with
    ``parallel_state``: only this rank's EP/ETP shard). ``config_overrides`` are ``MoEConfig``
    fields for the runtime choices (``expert_impl``, ``token_dispatcher_type``, capacity...).
    Returns ``model``. ``UnsupportedModelError`` names the model type or the config field that
    cannot be reproduced, before anything is replaced.
    """
    family = family_of(model)
    blocks, router_cls = find_blocks(model, family)
    hf_config = getattr(model.config, "text_config", model.config)
    dtype = family.weights(blocks[0][1])["experts.w1"].dtype
    cfg = moe_config(family, hf_config, dtype, **config_overrides)  # validated before any swap
    for name, block in blocks:
        weights = family.weights(block)
        hf_dtypes = {dtype_pattern(k): v.dtype for k, v in family.disk(weights).items()}
        full = layer_from_weights(cfg, weights, block)
        layer = full if parallel_state is None or parallel_state.world_size == 1 else (
            MoELayer.shard_from(full, parallel_state))
        tap = router_tap(family, router_cls)
        install_recorder_hook(model, tap, family)
        replace_module(model, name, HFMoEBlock(layer, family, tap, hf_dtypes))
    return model


def find_blocks(model: nn.Module, family: Family) -> tuple[list[tuple[str, nn.Module]], type]:
    """The family's MoE blocks of ``model`` (name, module) and the class of their router."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == family.block_class]
    if not blocks:
        raise UnsupportedModelError(f"{family.model_type}: no {family.block_class} in the model")
    first = blocks[0][1]
    return blocks, type(getattr(first, "gate", None) or first.router)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """``model``'s submodule at the dotted path ``name`` becomes ``module``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def layer_from_weights(cfg: MoEConfig, weights: Weights, block: nn.Module) -> MoELayer:
    """A single-process ``MoELayer`` holding ``weights`` (every parameter and buffer named)."""
    device = weights["experts.w1"].device
    layer = MoELayer(cfg, device=device)
    own = dict(layer.named_parameters()) | dict(layer.named_buffers())
    expected = {k for k in own if k != "router.local_tokens_per_expert"}
    if expected != weights.keys():
        raise UnsupportedModelError(
            f"{type(block).__name__}: weights {sorted(weights)} do not match the layer's "
            f"{sorted(expected)}")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
    return layer
