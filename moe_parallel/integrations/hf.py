"""Hugging Face transformers MoE models in and out: each MoE block becomes an ``MoELayer``.

``convert(model, parallel_state=None)`` replaces, in place, every MoE block of a transformers
(v5) model of a supported family with an ``HFMoEBlock``: the block's forward contract (input
``[B, S, H]``, the output HF returns, router logits recorded where HF's ``output_router_logits``
looks for them, so HF's own aux loss is computed from the same logits), around an ``MoELayer``
holding the block's weights; given a ``ParallelState``, only this rank's EP shard.
``export(model)`` gives back the HF on-disk state dict (per-expert keys where HF saves them),
gathered from the shards, loadable by ``from_pretrained``.

Families and their semantics (HF module -> ``MoEConfig``):

=============  ==========================================================================
mixtral        softmax top-k, renormalised; float32 scores; ``router_jitter_noise``
qwen2_moe      softmax top-k (``norm_topk_prob``); float32 scores; sigmoid-gated shared expert
qwen3_moe      softmax top-k (``norm_topk_prob``); float32 scores
olmoe          softmax top-k (``norm_topk_prob``); float32 scores
deepseek_v3    sigmoid, selection bias (``e_score_correction_bias``), groups scored by their top
               2 (``group_score="sum_top2"``), ``routed_scaling_factor``; float32 router;
               shared experts
deepseek_v2    softmax; ``greedy`` or ``group_limited_greedy`` (``group_score="max"``),
               ``routed_scaling_factor``; float32 router; shared experts
gpt_oss        top-k of the logits then softmax; learned router bias; expert biases; clamped
               SwiGLU (gate/up columns interleaved on HF's side); returns (out, router scores)
llama4         sigmoid top-k scaling the expert input; float32 scores; shared expert;
               returns (out [T, H], router logits)
=============  ==========================================================================

Weights (ours on the right): experts ``gate_up_proj [E, 2F, H]`` -> ``w1 = gate_up_proj^T``
``[E, H, 2F]`` (GPT-OSS and Llama-4 store ``[E, H, 2F]``; GPT-OSS interleaves gate and up
columns), ``down_proj [E, H, F]`` -> ``w2 [E, F, H]`` (GPT-OSS/Llama-4: ``[E, F, H]`` as is);
shared MLP ``gate_proj, up_proj [Fs, H]``, ``down_proj [H, Fs]`` -> ``w1 = [gate^T | up^T]``,
``w2 = down^T``. The routed experts' aux losses are HF's (``router_aux_loss_coef`` with
``output_router_logits``), so the layer's own loss coefficients are 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import MoEConfig
from ..distributed import ParallelState, collectives
from ..layer import MoELayer

__all__ = ["FAMILIES", "HFMoEBlock", "UnsupportedModelError", "convert", "export",
           "load_pretrained"]

Weights = dict[str, Tensor]  # our names: router.weight, experts.w1, ... (full, all experts)


class UnsupportedModelError(ValueError):
    """A model type, or a feature of its config, that the conversion cannot reproduce."""


def _require(cond: bool, model_type: str, field: str, value: Any, why: str) -> None:
    if not cond:
        raise UnsupportedModelError(f"{model_type}: {field}={value!r} is not supported ({why})")


# ---- weight layouts --------------------------------------------------------------------------


def _fused_transposed(experts: nn.Module) -> Weights:
    """Mixtral-style fused experts: gate_up_proj [E, 2F, H], down_proj [E, H, F]."""
    return {"experts.w1": experts.gate_up_proj.detach().transpose(1, 2),
            "experts.w2": experts.down_proj.detach().transpose(1, 2)}


def _deinterleave(t: Tensor) -> Tensor:
    """GPT-OSS's [..., 2F] with gate at even and up at odd columns -> [gate | up]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def _interleave(t: Tensor) -> Tensor:
    """[gate | up] -> gate at even, up at odd columns (inverse of ``_deinterleave``)."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _mlp_weights(mlp: nn.Module, prefix: str) -> Weights:
    """A dense gated MLP (gate_proj, up_proj, down_proj Linears) as our shared expert."""
    return {f"{prefix}.w1": torch.cat([mlp.gate_proj.weight.detach().t(),
                                        mlp.up_proj.weight.detach().t()], dim=1),
            f"{prefix}.w2": mlp.down_proj.weight.detach().t()}


def _mlp_keys(w: Weights, prefix: str, name: str) -> dict[str, Tensor]:
    """Our shared expert as HF's gated MLP keys ``{name}.{gate,up,down}_proj.weight``."""
    gate, up = w[f"{prefix}.w1"].t().chunk(2, dim=0)
    return {f"{name}.gate_proj.weight": gate, f"{name}.up_proj.weight": up,
            f"{name}.down_proj.weight": w[f"{prefix}.w2"].t()}


def _per_expert_keys(w: Weights, names: tuple[str, str, str]) -> dict[str, Tensor]:
    """Routed experts as HF's on-disk per-expert keys ``experts.{e}.{gate,up,down}.weight``
    (``names``: HF's names of the gate, up and down projections)."""
    gate_name, up_name, down_name = names
    out = {}
    for e, (w1, w2) in enumerate(zip(w["experts.w1"], w["experts.w2"])):
        gate, up = w1.t().chunk(2, dim=0)  # [F, H] each
        out[f"experts.{e}.{gate_name}.weight"] = gate
        out[f"experts.{e}.{up_name}.weight"] = up
        out[f"experts.{e}.{down_name}.weight"] = w2.t()  # [H, F]
    return out


# ---- families --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How one transformers model family's MoE block maps onto ``MoEConfig`` and weights.

    ``config(hf_config)``: the ``MoEConfig`` fields; ``weights(block)``: the block's full
    weights in our names; ``disk(weights)``: HF's on-disk keys (relative to ``disk_prefix``
    under the block's layer) for our weights; ``returns``: what the block's forward returns
    besides the hidden states (``None``, ``"router_scores"`` or ``"router_logits"``).
    """

    model_type: str
    block_class: str
    router_class: str
    router_index: int  # where HF's router returns its logits (OutputRecorder index)
    config: Callable[[Any], dict]
    weights: Callable[[nn.Module], Weights]
    disk: Callable[[Weights], dict[str, Tensor]]
    disk_prefix: Optional[str] = None  # on-disk name of the block when it differs (Mixtral)
    returns: Optional[str] = None
    flat_output: bool = False  # Llama-4 returns [T, H]
    # on disk: per-expert (gate, up, down) projection names, or None when HF saves the fused
    # experts.gate_up_proj [E, H, 2F] ("halves": gate | up; "interleaved": GPT-OSS)
    expert_names: Optional[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    fused_gate_up: Optional[str] = None


def _softmax_family(model_type: str, experts: str, shared: bool = False) -> Callable[[Any], dict]:
    def config(c) -> dict:
        _require(c.hidden_act == "silu", model_type, "hidden_act", c.hidden_act, "SwiGLU only")
        fields = dict(num_experts=getattr(c, experts), top_k=c.num_experts_per_tok,
                      ffn_hidden_size=getattr(c, "moe_intermediate_size", None)
                      or c.intermediate_size,
                      norm_topk_prob=bool(getattr(c, "norm_topk_prob", True)),
                      router_score_dtype=torch.float32)
        if shared:
            fields.update(num_shared_experts=1, shared_expert_gate=True,
                          shared_expert_ffn_hidden_size=c.shared_expert_intermediate_size)
        return fields
    return config


def _mixtral_config(c) -> dict:
    fields = _softmax_family("mixtral", "num_local_experts")(c)
    fields.update(norm_topk_prob=True, jitter_noise=float(c.router_jitter_noise or 0.0))
    return fields


def _qwen2_weights(block) -> Weights:
    w = {"router.weight": block.gate.weight.detach(), **_fused_transposed(block.experts),
         **_mlp_weights(block.shared_expert, "shared_expert")}
    w["shared_expert.gate_weight"] = block.shared_expert_gate.weight.detach()
    return w


def _qwen2_disk(w: Weights) -> dict[str, Tensor]:
    return {"gate.weight": w["router.weight"], **_per_expert_keys(w, ("gate_proj", "up_proj",
                                                                      "down_proj")),
            **_mlp_keys(w, "shared_expert", "shared_expert"),
            "shared_expert_gate.weight": w["shared_expert.gate_weight"]}


def _plain_weights(block) -> Weights:
    return {"router.weight": block.gate.weight.detach(), **_fused_transposed(block.experts)}


def _qwen_disk(w: Weights) -> dict[str, Tensor]:
    return {"gate.weight": w["router.weight"],
            **_per_expert_keys(w, ("gate_proj", "up_proj", "down_proj"))}


def _mixtral_disk(w: Weights) -> dict[str, Tensor]:
    return {"gate.weight": w["router.weight"], **_per_expert_keys(w, ("w1", "w3", "w2"))}


def _deepseek_shared(c) -> dict:
    n = c.n_shared_experts or 0
    return dict(num_shared_experts=n, shared_expert_ffn_hidden_size=(
        n * c.moe_intermediate_size if n else None))


def _deepseek_v3_config(c) -> dict:
    _require(c.hidden_act == "silu", "deepseek_v3", "hidden_act", c.hidden_act, "SwiGLU only")
    method = getattr(c, "topk_method", "noaux_tc")
    _require(method == "noaux_tc", "deepseek_v3", "topk_method", method, "HF runs noaux_tc")
    return dict(num_experts=c.n_routed_experts, top_k=c.num_experts_per_tok,
                ffn_hidden_size=c.moe_intermediate_size, score_function="sigmoid",
                expert_bias=True, norm_topk_prob=bool(c.norm_topk_prob),
                routed_scaling_factor=float(c.routed_scaling_factor),
                num_groups=c.n_group, group_topk=c.topk_group, group_score="sum_top2",
                router_dtype=torch.float32, **_deepseek_shared(c))


def _deepseek_v2_config(c) -> dict:
    _require(c.hidden_act == "silu", "deepseek_v2", "hidden_act", c.hidden_act, "SwiGLU only")
    method = c.topk_method
    _require(method in ("greedy", "group_limited_greedy"), "deepseek_v2", "topk_method", method,
             "greedy or group_limited_greedy")
    groups = (dict(num_groups=c.n_group, group_topk=c.topk_group, group_score="max")
              if method == "group_limited_greedy" else {})
    return dict(num_experts=c.n_routed_experts, top_k=c.num_experts_per_tok,
                ffn_hidden_size=c.moe_intermediate_size, norm_topk_prob=False,
                routed_scaling_factor=float(c.routed_scaling_factor),
                router_dtype=torch.float32, **groups, **_deepseek_shared(c))


def _deepseek_weights(block) -> Weights:
    w = {"router.weight": block.gate.weight.detach(), **_fused_transposed(block.experts)}
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        w["router.expert_bias"] = bias.detach()
    if getattr(block, "shared_experts", None) is not None:
        w.update(_mlp_weights(block.shared_experts, "shared_expert"))
    return w


def _deepseek_disk(w: Weights) -> dict[str, Tensor]:
    out = {"gate.weight": w["router.weight"],
           **_per_expert_keys(w, ("gate_proj", "up_proj", "down_proj"))}
    if "router.expert_bias" in w:
        out["gate.e_score_correction_bias"] = w["router.expert_bias"]
    if "shared_expert.w1" in w:
        out.update(_mlp_keys(w, "shared_expert", "shared_experts"))
    return out


def _gpt_oss_config(c) -> dict:
    return dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                ffn_hidden_size=c.intermediate_size, softmax_before_topk=False,
                router_bias=True, expert_proj_bias=True, activation="clamped_swiglu",
                swiglu_alpha=float(getattr(c, "swiglu_alpha", 1.702)),
                swiglu_limit=float(c.swiglu_limit))


def _gpt_oss_weights(block) -> Weights:
    e = block.experts
    return {"router.weight": block.router.weight.detach(),
            "router.bias": block.router.bias.detach(),
            "experts.w1": _deinterleave(e.gate_up_proj.detach()),
            "experts.b1": _deinterleave(e.gate_up_proj_bias.detach()),
            "experts.w2": e.down_proj.detach(), "experts.b2": e.down_proj_bias.detach()}


def _gpt_oss_disk(w: Weights) -> dict[str, Tensor]:
    return {"router.weight": w["router.weight"], "router.bias": w["router.bias"],
            "experts.gate_up_proj": _interleave(w["experts.w1"]),
            "experts.gate_up_proj_bias": _interleave(w["experts.b1"]),
            "experts.down_proj": w["experts.w2"], "experts.down_proj_bias": w["experts.b2"]}


def _llama4_config(c) -> dict:
    _require(c.hidden_act == "silu", "llama4_text", "hidden_act", c.hidden_act, "SwiGLU only")
    return dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                ffn_hidden_size=c.intermediate_size, score_function="sigmoid",
                norm_topk_prob=False, scale_expert_input=True,
                router_score_dtype=torch.float32, num_shared_experts=1)


def _llama4_weights(block) -> Weights:
    return {"router.weight": block.router.weight.detach(),
            "experts.w1": block.experts.gate_up_proj.detach(),
            "experts.w2": block.experts.down_proj.detach(),
            **_mlp_weights(block.shared_expert, "shared_expert")}


def _llama4_disk(w: Weights) -> dict[str, Tensor]:
    return {"router.weight": w["router.weight"], "experts.gate_up_proj": w["experts.w1"],
            "experts.down_proj": w["experts.w2"],
            **_mlp_keys(w, "shared_expert", "shared_expert")}


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("mixtral", "MixtralSparseMoeBlock", "MixtralTopKRouter", 0, _mixtral_config,
           _plain_weights, _mixtral_disk, disk_prefix="block_sparse_moe",
           expert_names=("w1", "w3", "w2")),
    Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter", 0,
           _softmax_family("qwen2_moe", "num_experts", shared=True), _qwen2_weights,
           _qwen2_disk),
    Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter", 0,
           _softmax_family("qwen3_moe", "num_experts"), _plain_weights, _qwen_disk),
    Family("olmoe", "OlmoeSparseMoeBlock", "OlmoeTopKRouter", 0,
           _softmax_family("olmoe", "num_experts"), _plain_weights, _qwen_disk),
    Family("deepseek_v3", "DeepseekV3MoE", "DeepseekV3TopkRouter", 0, _deepseek_v3_config,
           _deepseek_weights, _deepseek_disk),
    Family("deepseek_v2", "DeepseekV2Moe", "DeepseekV2TopkRouter", 0, _deepseek_v2_config,
           _deepseek_weights, _deepseek_disk),
    Family("gpt_oss", "GptOssMLP", "GptOssTopKRouter", 0, _gpt_oss_config, _gpt_oss_weights,
           _gpt_oss_disk, returns="router_scores", expert_names=None,
           fused_gate_up="interleaved"),
    Family("llama4_text", "Llama4TextMoe", "Llama4Router", 1, _llama4_config, _llama4_weights,
           _llama4_disk, returns="router_logits", flat_output=True, expert_names=None,
           fused_gate_up="halves"),
]}


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model, ``UnsupportedModelError`` naming its model type."""
    return _family_of_config(getattr(model, "config", None))


def _family_of_config(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type == "llama4":  # the multimodal wrapper: its text model holds the blocks
        model_type = "llama4_text"
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# ---- the block -------------------------------------------------------------------------------


def _router_tap(family: Family, router_cls: type) -> nn.Module:
    """A module of HF's router class whose forward hands back the logits at the position HF's
    router returns them, so HF's ``OutputRecorder`` (``output_router_logits``) records ours."""
    def forward(self, logits: Tensor) -> tuple:
        out = [None] * (family.router_index + 1)
        out[family.router_index] = logits
        return tuple(out)

    tap_cls = type(f"{router_cls.__name__}Logits", (router_cls,),
                   {"__init__": lambda self: nn.Module.__init__(self), "forward": forward})
    return tap_cls()


class HFMoEBlock(nn.Module):
    """An HF MoE block's forward contract around an ``MoELayer`` (``self.moe``).

    ``forward(hidden_states [B, S, H]) -> [B, S, H]`` (Llama-4: ``([T, H], router_logits)``,
    GPT-OSS: ``([B, S, H], router_scores [T, k])``). ``hf_dtypes`` keeps the dtype of every
    tensor HF stored (HF keeps some routers in float32 in any model), for ``export``.
    """

    def __init__(self, moe: MoELayer, family: Family, tap: Optional[nn.Module],
                 hf_dtypes: dict[str, torch.dtype]) -> None:
        super().__init__()
        self.moe = moe
        self.family = family
        self.router_logits = tap
        self.hf_dtypes = hf_dtypes
        ps = moe.parallel_state
        self.tp_group = ps.group("tp") if ps is not None and ps.tp > 1 else None

    def _routed(self, hidden_states: Tensor) -> tuple[Tensor, Any]:
        """The layer on the block's tokens; with TP > 1 (sequence parallel, as the built-in
        model) on this TP rank's 1/tp of the sequence, the outputs gathered back."""
        B, S, H = hidden_states.shape
        if self.tp_group is None:
            return self.moe(hidden_states.reshape(-1, H), return_aux=True)
        tp, rank = collectives.group_size(self.tp_group), collectives.group_rank(self.tp_group)
        if S % tp:
            raise ValueError(f"sequence length {S} is not divisible by tp={tp}")
        chunk = S // tp
        mine = hidden_states[:, rank * chunk:(rank + 1) * chunk].transpose(0, 1)
        y, aux = self.moe(mine.reshape(-1, H), return_aux=True)  # [chunk·B, H], sequence-major
        y = collectives.all_gather(y, self.tp_group, sizes=[chunk * B] * tp)
        return y.view(S, B, H).transpose(0, 1).reshape(B * S, H), aux

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        shape = hidden_states.shape
        y, aux = self._routed(hidden_states.reshape(-1, shape[-2], shape[-1]))
        logits = aux.routing.logits
        if self.router_logits is not None:
            self.router_logits(logits)
        if self.family.flat_output:
            return y, logits
        y = y.reshape(shape)
        if self.family.returns == "router_scores":
            return y, aux.routing.probs
        return y


def _moe_config(family: Family, hf_config: Any, dtype: torch.dtype, **overrides) -> MoEConfig:
    fields = dict(hidden_size=hf_config.hidden_size, params_dtype=dtype, aux_loss_coeff=0.0)
    fields.update(family.config(hf_config))
    fields.update(overrides)
    return MoEConfig(**fields)


def _install_recorder_hook(model: nn.Module, tap: nn.Module, family: Family) -> None:
    """When HF already installed its output-recording hooks, hook the new tap too."""
    try:
        from transformers.utils import output_capturing as oc
    except ImportError:  # pragma: no cover - older transformers record no router logits
        return
    for m in model.modules():
        if getattr(m, "_output_capturing_hooks_installed", False):
            oc.install_output_capuring_hook(tap, "router_logits", family.router_index, False)
            return


def convert(model: nn.Module, parallel_state: Optional[ParallelState] = None,
            **config_overrides) -> nn.Module:
    """Replace, in place, every MoE block of ``model`` (a transformers model of a supported
    family) with an ``HFMoEBlock`` around an ``MoELayer`` holding the block's weights (with
    ``parallel_state``: only this rank's EP/ETP shard). ``config_overrides`` are ``MoEConfig``
    fields for the runtime choices (``expert_impl``, ``token_dispatcher_type``, capacity...).
    Returns ``model``. ``UnsupportedModelError`` names the model type or the config field that
    cannot be reproduced, before anything is replaced.
    """
    family = family_of(model)
    blocks, router_cls = _blocks(model, family)
    hf_config = getattr(model.config, "text_config", model.config)
    dtype = family.weights(blocks[0][1])["experts.w1"].dtype
    cfg = _moe_config(family, hf_config, dtype, **config_overrides)  # validated before any swap
    for name, block in blocks:
        weights = family.weights(block)
        hf_dtypes = {_pattern(k): v.dtype for k, v in family.disk(weights).items()}
        full = _layer_from_weights(cfg, weights, block)
        layer = full if parallel_state is None or parallel_state.world_size == 1 else (
            MoELayer.shard_from(full, parallel_state))
        tap = _router_tap(family, router_cls)
        _install_recorder_hook(model, tap, family)
        _replace(model, name, HFMoEBlock(layer, family, tap, hf_dtypes))
    return model


def _blocks(model: nn.Module, family: Family) -> tuple[list[tuple[str, nn.Module]], type]:
    """The family's MoE blocks of ``model`` (name, module) and the class of their router."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == family.block_class]
    if not blocks:
        raise UnsupportedModelError(f"{family.model_type}: no {family.block_class} in the model")
    first = blocks[0][1]
    return blocks, type(getattr(first, "gate", None) or first.router)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _disk_name(family: Family, name: str) -> str:
    """The on-disk name of the block at ``name`` (Mixtral saves its ``mlp`` as
    ``block_sparse_moe``)."""
    if family.disk_prefix is None:
        return name
    return name.rsplit(".", 1)[0] + "." + family.disk_prefix


def _layer_from_weights(cfg: MoEConfig, weights: Weights, block: nn.Module) -> MoELayer:
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


def _pattern(key: str) -> str:
    """A per-expert key with its expert index replaced by ``*`` (one dtype per projection)."""
    return re.sub(r"experts\.\d+\.", "experts.*.", key)


# ---- loading a checkpoint directory, shard by shard -------------------------------------------


class _Reader:
    """The tensors of a safetensors checkpoint directory (one file or an index of shards), read
    one key (or slice of it) at a time; ``expert_bytes`` counts what was read of the experts."""

    def __init__(self, path: str) -> None:
        import json

        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"no *.safetensors checkpoint in {path}")
        self.handles = [safe_open(os.path.join(path, f), "pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}
        self.expert_bytes = 0
        self.largest_read = 0

    def get(self, key: str, index: tuple = ()) -> Tensor:
        if key not in self.where:
            raise KeyError(f"{key} is not in the checkpoint")
        t = self.where[key].get_slice(key)[index] if index else self.where[key].get_tensor(key)
        if ".experts." in key:
            self.expert_bytes += t.numel() * t.element_size()
        self.largest_read = max(self.largest_read, t.numel() * t.element_size())
        return t


def _namespace(tensors: dict[str, Tensor]) -> Any:
    """Nested attribute access over dotted keys (``gate.weight`` -> ``ns.gate.weight``), the
    shape of an HF block that ``Family.weights`` reads."""
    from types import SimpleNamespace

    root = SimpleNamespace()
    for key, value in tensors.items():
        node = root
        *path, leaf = key.split(".")
        for part in path:
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
        setattr(node, leaf, value)
    return root


def _local_block(family: Family, reader: _Reader, prefix: str, cfg: MoEConfig,
                 e0: int, El: int, f0: int, Fl: int) -> Weights:
    """This rank's weights of the block stored under ``prefix``: its ``El`` experts from
    ``e0`` and hidden units ``f0 .. f0+Fl`` (read slice by slice), router and shared experts
    whole."""
    F = cfg.ffn_hidden_size
    tensors = {k[len(prefix) + 1:]: reader.get(k) for k in reader.where
               if k.startswith(prefix + ".") and ".experts." not in k}
    if family.expert_names is not None:  # per expert: gate, up [F, H], down [H, F]
        gate_n, up_n, down_n = family.expert_names
        gate_up, down = [], []
        for e in range(e0, e0 + El):
            key = f"{prefix}.experts.{e}"
            gate = reader.get(f"{key}.{gate_n}.weight", (slice(f0, f0 + Fl),))
            up = reader.get(f"{key}.{up_n}.weight", (slice(f0, f0 + Fl),))
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(reader.get(f"{key}.{down_n}.weight", (slice(None), slice(f0, f0 + Fl))))
        tensors["experts.gate_up_proj"] = torch.stack(gate_up)  # [El, 2Fl, H]
        tensors["experts.down_proj"] = torch.stack(down)  # [El, H, Fl]
    else:  # fused on disk: gate_up_proj [E, H, 2F], down_proj [E, F, H]
        e = slice(e0, e0 + El)
        key = f"{prefix}.experts"
        if family.fused_gate_up == "halves":
            halves = [reader.get(f"{key}.gate_up_proj",
                                 (e, slice(None), slice(b + f0, b + f0 + Fl))) for b in (0, F)]
            tensors["experts.gate_up_proj"] = torch.cat(halves, dim=2)
        else:  # interleaved gate/up columns (expert projection biases: etp = 1, whole F)
            tensors["experts.gate_up_proj"] = reader.get(f"{key}.gate_up_proj", (e,))
            tensors["experts.gate_up_proj_bias"] = reader.get(f"{key}.gate_up_proj_bias", (e,))
            tensors["experts.down_proj_bias"] = reader.get(f"{key}.down_proj_bias", (e,))
        tensors["experts.down_proj"] = reader.get(f"{key}.down_proj",
                                                  (e, slice(f0, f0 + Fl)))
    return family.weights(_namespace(tensors))


def load_pretrained(path: str | os.PathLike, parallel_state: Optional[ParallelState] = None,
                    dtype: torch.dtype = torch.float32, **config_overrides) -> nn.Module:
    """A transformers model from the checkpoint directory ``path`` (config + safetensors, as
    ``save_pretrained`` writes it), its MoE blocks converted, each rank reading only its own
    experts (and, with ETP, its hidden units) from disk: the full expert tensors are never
    materialised. Dense weights are read whole on every rank. ``dtype``: the model's
    parameter dtype."""
    import transformers

    path = os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(path)
    family = _family_of_config(config)
    config._experts_implementation = "eager"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf_config = getattr(model.config, "text_config", model.config)
    cfg = _moe_config(family, hf_config, dtype, **config_overrides)
    ps = parallel_state if parallel_state is not None else ParallelState.single()
    blocks, router_cls = _blocks(model, family)
    new_blocks = {}
    for name, _ in blocks:
        layer = MoELayer(cfg, device="cpu", parallel_state=None if ps.world_size == 1 else ps)
        new_blocks[name] = HFMoEBlock(layer, family, _router_tap(family, router_cls), {})
        _replace(model, name, new_blocks[name])
    model.to_empty(device="cpu")  # dense weights: placeholders until read below
    for module in model.modules():  # non-persistent buffers (rotary tables): recomputed
        if any(n in module._non_persistent_buffers_set for n, _ in
               module.named_buffers(recurse=False)) and not isinstance(module, MoELayer):
            model._init_weights(module)
    reader = _Reader(path)
    own = model.state_dict()
    moe_prefixes = {_disk_name(family, name): name for name in new_blocks}
    loaded = set()
    with torch.no_grad():
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
                         and not any(k.startswith(n + ".") for n in new_blocks))
        if missing:
            raise UnsupportedModelError(f"{path}: the checkpoint lacks {missing[:8]}")
        for disk, name in moe_prefixes.items():
            block = new_blocks[name]
            layer = block.moe
            experts = layer.experts
            local = _local_block(family, reader, disk, cfg, experts.first_expert,
                                 experts.num_local_experts, experts.etp_rank * experts.ffn_size,
                                 experts.ffn_size)
            block.hf_dtypes = {_pattern(k): v.dtype for k, v in family.disk(local).items()}
            params = dict(layer.named_parameters()) | dict(layer.named_buffers())
            for k, t in params.items():
                if k in local:
                    t.copy_(local[k])
                elif k in ("router.expert_bias", "router.local_tokens_per_expert"):
                    t.zero_()  # a balancing bias the family lacks (--expert-bias) starts at 0
                else:
                    raise UnsupportedModelError(f"{family.model_type}: {name}.moe.{k} has no "
                                                "weight in the checkpoint")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.moe_checkpoint_reader = reader  # what was read (expert bytes), for inspection
    return model


# ---- export ----------------------------------------------------------------------------------


def _gather_experts(layer: MoELayer) -> Weights:
    """The layer's full weights on every rank (routed experts gathered over ETP then EP)."""
    ps = layer.parallel_state
    w = {k: v.detach() for k, v in layer.named_parameters()}
    w.update({k: v.detach() for k, v in layer.named_buffers()
              if k != "router.local_tokens_per_expert"})
    if ps is None or ps.ep * ps.etp == 1:
        return w
    gated = layer.config.gated

    def gather(t: Tensor, group_name: str, dim: int) -> Tensor:
        group = ps.group(group_name)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    for name, dim in (("experts.w1", 2), ("experts.w2", 1)):
        t = w[name]
        if ps.etp > 1:
            if name == "experts.w1" and gated:  # gate | up halves gathered separately
                t = torch.cat([gather(h, "etp", 2) for h in t.chunk(2, dim=2)], dim=2)
            else:
                t = gather(t, "etp", dim)
        w[name] = gather(t, "ep", 0) if ps.ep > 1 else t
    for name in ("experts.b1", "experts.b2"):
        if name in w and ps.ep > 1:
            w[name] = gather(w[name], "ep", 0)
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
        disk_name = _disk_name(block.family, name)
        for k, v in block.family.disk(_gather_experts(block.moe)).items():
            out[f"{disk_name}.{k}"] = v.to(block.hf_dtypes[_pattern(k)]).contiguous()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    for key in (tied if isinstance(tied, (list, dict)) else []):
        if getattr(model.config, "tie_word_embeddings", False):
            out.pop(key, None)
    return out
