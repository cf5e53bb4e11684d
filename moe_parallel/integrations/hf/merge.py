"""Several dense transformers models merged into one MoE model (Branch-Train-MiX).

``merge_dense_models([m_1, ..., m_n], top_k=1, dense="mean")``: the MoE family of the models'
(``upcycle.MOE_FAMILY``) with ``n`` experts per layer, expert ``i`` of every layer model ``i``'s
MLP; the other weights averaged (``dense="mean"``) or model ``dense``'s; the router drawn at
random (it is meant to be trained: BTX's "MiX" stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .upcycle import (
    BlockWeights,
    _check_int,
    _dense_type,
    _router_std,
    dense_mlps,
    fill_moe,
    moe_config,
    moe_skeleton,
    shared_expert_init,
)

__all__ = ["merge_dense_models"]

# config fields that say where a model came from, not what it computes
_PROVENANCE = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype",
               "_commit_hash")


def _check_same(models: Sequence[nn.Module]) -> None:
    """Every model of the same config (``ValueError`` naming the first differing field and
    the models), dtype and device."""
    first = {k: v for k, v in models[0].config.to_dict().items() if k not in _PROVENANCE}
    p0 = models[0].model.embed_tokens.weight
    for i, m in enumerate(models[1:], start=1):
        other = {k: v for k, v in m.config.to_dict().items() if k not in _PROVENANCE}
        for key in sorted(first.keys() | other.keys()):
            if first.get(key) != other.get(key):
                raise ValueError(f"models[0] and models[{i}] differ in config field {key!r}: "
                                 f"{first.get(key)!r} != {other.get(key)!r}")
        p = m.model.embed_tokens.weight
        if (p.dtype, p.device) != (p0.dtype, p0.device):
            raise ValueError(f"models[0] and models[{i}] differ in dtype/device: "
                             f"{p0.dtype}/{p0.device} != {p.dtype}/{p.device}")


def _dense_state(models: Sequence[nn.Module], dense: Union[str, int]) -> dict[str, Tensor]:
    """The non-MLP tensors: model ``dense``'s, or the mean over the models (in float64, then
    the models' dtype)."""
    states = [m.state_dict() for m in models]
    keys = [k for k in states[0] if ".mlp." not in k]
    if dense != "mean":
        return {k: states[dense][k] for k in keys}
    out = {}
    for k in keys:
        t = states[0][k]
        stacked = torch.stack([s[k].to(torch.float64) for s in states])
        out[k] = stacked.mean(0).to(t.dtype) if t.is_floating_point() else t
    return out


def merge_dense_models(models: Sequence[nn.Module], top_k: int = 1,
                       dense: Union[str, int] = "mean", *,
                       router_init_std: Optional[float] = None, seed: int = 0,
                       shared_expert_intermediate_size: Optional[int] = None) -> nn.Module:
    """One MoE model from ``n = len(models)`` dense causal LMs of the same family and config
    (Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE; ``ValueError`` naming the
    first config field in which two models differ), the models unchanged.

    Layer ``l``'s block has ``n`` experts, expert ``i`` = model ``i``'s layer-``l`` MLP (as is:
    same width, no scaling), ``top_k`` of them per token. Weights: renormalised when
    ``top_k > 1`` (``norm_topk_prob=True``); with ``top_k=1`` Qwen's weight is the router's
    softmax probability of the chosen expert (``norm_topk_prob=False``, so the router is
    trained by the main loss) and Mixtral's is always renormalised, i.e. 1 (HF Mixtral has no
    other mode; ``convert`` refuses it for that reason: use ``top_k >= 2`` to train a merged
    Llama/Mistral with moe_parallel). Every other weight: the element-wise mean over the models
    (``dense="mean"``, computed in float64) or model ``dense``'s (an index). Router rows:
    N(0, router_init_std²) (default: the config's ``initializer_range``), drawn in float64 from
    ``torch.Generator().manual_seed(seed)`` layer by layer (Qwen2-MoE: then its shared expert,
    whose output starts at exactly 0: ``upcycle.shared_expert_init``).

    When the models differ only in their MLPs and the router sends every token to expert ``i``
    alone with weight 1 (``top_k=1``, or the other selected experts' weights 0), the merged
    model computes exactly model ``i``'s function.
    """
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one dense model")
    for m in models:
        _dense_type(m)
    n = len(models)
    _check_int("top_k", top_k, 1)
    if top_k > n:
        raise ValueError(f"top_k must be <= the number of models ({n}), got {top_k}")
    if not (dense == "mean" or (isinstance(dense, int) and not isinstance(dense, bool)
                                and 0 <= dense < n)):
        raise ValueError(f"dense must be 'mean' or a model index in [0, {n}), got {dense!r}")
    _check_int("seed", seed, 0)
    if shared_expert_intermediate_size is not None:
        _check_int("shared_expert_intermediate_size", shared_expert_intermediate_size, 1)
    _check_same(models)
    cfg = models[0].config
    std = _router_std(router_init_std, cfg)
    mixtral = cfg.model_type in ("llama", "mistral")
    config = moe_config(cfg, n, top_k, cfg.intermediate_size,
                        norm_topk_prob=mixtral or top_k > 1,
                        shared_expert_intermediate_size=shared_expert_intermediate_size)
    generator = torch.Generator().manual_seed(seed)
    per_model = [dense_mlps(m) for m in models]
    blocks = []
    for layer_mlps in zip(*per_model):
        blocks.append(_merged_block(layer_mlps, std, generator))
        if config.model_type == "qwen2_moe":
            for k, v in shared_expert_init(config, config.hidden_size, generator, std).items():
                setattr(blocks[-1], k, v)
    param = models[0].model.embed_tokens.weight
    moe = moe_skeleton(config, param.dtype, param.device)
    fill_moe(moe, _dense_state(models, dense), blocks)
    return moe


def _merged_block(mlps: Sequence[nn.Module], std: float, generator: torch.Generator
                  ) -> BlockWeights:
    """Expert ``i`` = ``mlps[i]`` (gate rows then up rows; down as is); router N(0, std²)."""
    gate_up = torch.stack([torch.cat([m.gate_proj.weight.detach(), m.up_proj.weight.detach()])
                           for m in mlps])
    down = torch.stack([m.down_proj.weight.detach() for m in mlps])
    hidden = gate_up.shape[-1]
    router = torch.randn(len(mlps), hidden, generator=generator, dtype=torch.float64) * std
    return BlockWeights(router=router, gate_up=gate_up, down=down)
