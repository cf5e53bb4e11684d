"""Merging dense models of the main job into one MoE model (Branch-Train-MiX, Sukhbaatar et al.
2024), and plain weight averaging.

A built-in model (``MoETransformerLM``) with ``num_experts=1`` is a dense transformer: its one
expert gets the combine weight ``softmax([l])_0 = 1``. ``merge_dense_models`` takes ``n`` such
models of one configuration (for example copies of one model trained on different data) and
builds a model with ``E = n`` experts per layer:

* routed experts: expert ``i`` of every layer is source ``i``'s expert (``w1``, ``w2``, and
  ``b1``/``b2`` with ``expert_proj_bias``), unchanged;
* every other parameter (embeddings, attention, norms, head, shared experts):
  ``dense="mean"`` the element-wise mean ``(1/n) Σ_i θ_i`` (computed in float64, rounded to
  the parameter's dtype), or ``dense=j`` source ``j``'s;
* routers: ``weight`` (and ``noise_weight`` with ``noisy_gating``) ``[n, H]`` drawn from
  ``N(0, router_init_std²)`` (default: the config's ``init_std``, what a new layer draws) by a
  ``torch.Generator`` seeded with ``seed``, layer after layer; ``router_init_std=0`` gives
  zero weights (equal scores: with ``top_k = n`` and renormalisation the merged layer then
  outputs the mean of the experts); ``bias`` (``router_bias``) zero;
* MoE-layer buffers (``expert_bias``, the routed counts, the dynamic capacity factor) start as
  in a newly built layer of ``n`` experts; the model's other buffers are taken as the dense
  parameters are (the mean of floating buffers, source 0's of the others; source ``j``'s with
  ``dense=j``).

The sources' ``MoEConfig`` must agree in every field but the seeds (``*_seed``, e.g.
``expert_dropout_seed``, which the main job sets from ``--seed``). The merged configuration is
the sources' with ``num_experts=n`` and ``top_k=top_k``, its seeds source 0's (source ``j``'s
with ``dense=j``). Its
combine weights follow ``MoEConfig``: with ``top_k=1`` the Switch weight
``p = softmax(logits)[top-1]`` (so the merged layer equals source ``i``'s only where the router
gives expert ``i`` probability 1), with ``top_k > 1`` the top-k probabilities renormalised to
sum 1.

``average_models`` is the baseline of weight averaging: one model of the sources'
configuration whose every parameter and floating buffer is the mean of the sources'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import GroupedExperts
from .model import MoETransformerLM

__all__ = ["average_models", "merge_dense_models", "router_parameters"]

_ROUTER_DRAWN = ("weight", "noise_weight")  # router parameters drawn from N(0, std^2)


def _structure(model: MoETransformerLM) -> dict[str, object]:
    """The shape of the model that is not in its ``MoEConfig``."""
    return {"vocab": model.embed.num_embeddings, "max_len": model.pos.num_embeddings,
            "layers": len(model.blocks), "heads": model.blocks[0].heads if model.blocks else None}


def _layer_config(model: MoETransformerLM, index: int) -> MoEConfig:
    """The one ``MoEConfig`` of ``model``'s layers (``ValueError`` if its layers differ)."""
    configs = [b.moe.config for b in model.blocks]
    for j, c in enumerate(configs[1:], 1):
        if c != configs[0]:
            raise ValueError(f"models[{index}]: its MoE layers 0 and {j} have different "
                             "configs; merge_dense_models needs one config per model")
    return configs[0]


def _check_sources(models: Sequence[MoETransformerLM], name: str, least: int
                   ) -> tuple[MoEConfig, dict[str, object]]:
    """The sources are ``least`` or more unsharded ``MoETransformerLM`` of one structure, one
    ``MoEConfig`` (its ``*_seed`` fields, e.g. ``expert_dropout_seed``, may differ), one
    device; returns source 0's config and the structure. ``ValueError`` naming the parameter
    and the field that differs."""
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or len(models) < least:
        raise ValueError(f"{name}: models must be a sequence (list or tuple) of at least {least} "
                         f"MoETransformerLM, got {type(models).__name__}"
                         + (f" of length {len(models)}" if isinstance(models, Sequence) else ""))
    for i, m in enumerate(models):
        if not isinstance(m, MoETransformerLM):
            raise ValueError(f"{name}: models[{i}] must be a moe_parallel.train."
                             f"MoETransformerLM (the built-in model), got {type(m).__name__}")
        for j, block in enumerate(m.blocks):
            moe = block.moe
            if moe.parallel_state is not None or not isinstance(moe.experts, GroupedExperts) \
                    or moe.experts.num_local_experts != moe.config.num_experts:
                raise ValueError(f"{name}: models[{i}] layer {j} is sharded (expert or tensor "
                                 "parallel); merge unsharded models (the full weights, one "
                                 "process)")
    config, structure = _layer_config(models[0], 0), _structure(models[0])
    device = next(models[0].parameters()).device
    for i, m in enumerate(models[1:], 1):
        other = _structure(m)
        for key, value in structure.items():
            if other[key] != value:
                raise ValueError(f"{name}: models[{i}] has {key}={other[key]!r}, models[0] "
                                 f"has {key}={value!r}; the models must differ only in weights")
        cfg = _layer_config(m, i)
        for f in dataclasses.fields(MoEConfig):
            a, b = getattr(config, f.name), getattr(cfg, f.name)
            if a != b and not f.name.endswith("_seed"):
                raise ValueError(f"{name}: models[{i}] has {f.name}={b!r}, models[0] has "
                                 f"{f.name}={a!r}; the models must differ only in weights")
        if next(m.parameters()).device != device:
            raise ValueError(f"{name}: models[{i}] is on device {next(m.parameters()).device}, "
                             f"models[0] on {device}; move them to one device")
    return config, structure


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    """``(1/n) Σ_i t_i`` accumulated in float64 (complex128 for complex), in the dtype of
    ``tensors[0]``."""
    wide = torch.complex128 if tensors[0].is_complex() else torch.float64
    total = torch.zeros(tensors[0].shape, dtype=wide, device=tensors[0].device)
    for t in tensors:
        total += t.to(wide)
    return (total / len(tensors)).to(tensors[0].dtype)


def _build(config: MoEConfig, structure: dict[str, object], device: torch.device,
           seed: int) -> MoETransformerLM:
    """A new ``MoETransformerLM`` of ``config`` and ``structure`` on ``device``, initialised
    under ``seed`` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoETransformerLM(config, structure["vocab"], structure["layers"],
                                 structure["heads"], structure["max_len"])
    return model.to(device)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return seed


def merge_dense_models(models: Sequence[MoETransformerLM], top_k: int = 1,
                       dense: Union[str, int] = "mean", router_init_std: float | None = None,
                       seed: int = 0) -> MoETransformerLM:
    """The ``n = len(models)`` one-expert models merged into one ``MoETransformerLM`` with
    ``n`` experts per layer and ``top_k`` experts per token (formulas in the module docstring).

    ``models``: at least 2 unsharded built-in models with ``num_experts=1`` and the same
    configuration (``MoEConfig``, vocabulary, layers, heads, maximum length), on one device.
    ``top_k``: ``1 <= top_k <= n``. ``dense``: ``"mean"`` or a source index ``0 <= j < n``.
    ``router_init_std``: ``>= 0`` and finite, None for the config's ``init_std``. ``seed``: an
    int ``>= 0`` (the router draw and the construction; the caller's random state is left as
    it was). Each bad input raises ``ValueError`` naming the parameter (and for differing
    sources the field). The merged model is in training mode, every parameter trainable."""
    config, structure = _check_sources(models, "merge_dense_models", 2)
    n = len(models)
    if config.num_experts != 1:
        raise ValueError(f"merge_dense_models: the models must be dense (num_experts=1, "
                         f"--experts 1), got num_experts={config.num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
        raise ValueError(f"top_k must be an int in [1, {n}] (the number of models), got "
                         f"{top_k!r}")
    if not (dense == "mean" or (isinstance(dense, int) and not isinstance(dense, bool)
                                and 0 <= dense < n)):
        raise ValueError(f"dense must be 'mean' or a model index in [0, {n}), got {dense!r}")
    std = config.init_std if router_init_std is None else router_init_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (
            math.isfinite(std) and std >= 0):
        raise ValueError(f"router_init_std must be a finite float >= 0 (or None: init_std="
                         f"{config.init_std}), got {router_init_std!r}")
    seed = _check_seed(seed)
    device = next(models[0].parameters()).device
    body = models[0 if dense == "mean" else dense].blocks[0].moe.config  # its *_seed fields
    merged_config = dataclasses.replace(body, num_experts=n, top_k=top_k)
    merged = _build(merged_config, structure, device, seed)
    sources = [dict(m.named_parameters()) for m in models]
    buffers = [dict(m.named_buffers()) for m in models]
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if ".moe.experts." in name:  # [1, ...] each -> [n, ...]
                p.copy_(torch.cat([s[name] for s in sources], dim=0))
            elif ".moe.router." in name:
                if name.rsplit(".", 1)[1] in _ROUTER_DRAWN:
                    w = torch.randn(p.shape, generator=draw, dtype=torch.float64) * std
                    p.copy_(w)
                else:  # the router bias
                    p.zero_()
            else:
                p.copy_(_mean([s[name] for s in sources]) if dense == "mean"
                        else sources[dense][name])
        for name, b in merged.named_buffers():
            if ".moe." in name:  # a new layer's state (router counts, expert bias, capacity)
                continue
            theirs = [s[name] for s in buffers]
            b.copy_(_mean(theirs) if dense == "mean" and b.is_floating_point()
                    else theirs[0 if dense == "mean" else dense])
    return merged


def average_models(models: Sequence[MoETransformerLM]) -> MoETransformerLM:
    """One model of the sources' configuration (any ``num_experts``) whose every parameter and
    floating buffer is the element-wise mean of the ``len(models) >= 2`` sources' (float64
    accumulation); integer buffers are source 0's. ``ValueError`` as ``merge_dense_models``."""
    config, structure = _check_sources(models, "average_models", 2)  # source 0's seeds
    device = next(models[0].parameters()).device
    averaged = _build(config, structure, device, 0)
    state = [m.state_dict() for m in models]
    with torch.no_grad():
        for name, t in averaged.state_dict().items():
            theirs = [s[name] for s in state]
            t.copy_(_mean(theirs) if t.is_floating_point() else theirs[0])
        for name, b in averaged.named_buffers():  # non-persistent ones too
            if name not in state[0]:
                theirs = [dict(m.named_buffers())[name] for m in models]
                b.copy_(_mean(theirs) if b.is_floating_point() else theirs[0])
    return averaged


def router_parameters(model: MoETransformerLM) -> list[nn.Parameter]:
    """Every MoE layer's router parameters (``weight``, and ``noise_weight`` / ``bias`` where
    configured), in model order: what router-only training optimises."""
    return [p for b in model.blocks for p in b.moe.router.parameters()]
