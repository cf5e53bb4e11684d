"""The family registry: one declarative ``Family`` record per supported transformers model type.

A record names the family's HF classes, reads its HF config into ``MoEConfig`` fields
(``config``), and maps its weights both ways (``weights``, ``disk``: see ``weights.py``).
``family_of(model)`` finds the record of a model; ``UnsupportedModelError`` names a model type,
or a config field, that the conversion cannot reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import weights as w

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "family_of", "family_of_config"]


class UnsupportedModelError(ValueError):
    """A model type, or a feature of its config, that the conversion cannot reproduce."""


def _require(cond: bool, model_type: str, field: str, value: Any, why: str) -> None:
    if not cond:
        raise UnsupportedModelError(f"{model_type}: {field}={value!r} is not supported ({why})")


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one transformers model family's MoE block maps onto ``MoEConfig`` and weights.

    ``block_class`` / ``router_class``: HF's class names of the MoE block and its router;
    ``router_index``: where HF's router returns its logits (``OutputRecorder`` index);
    ``config(hf_config)``: the ``MoEConfig`` fields; ``weights(block)``: the block's full
    weights in our names; ``disk(weights)``: HF's on-disk keys (relative to the block) for our
    weights; ``disk_prefix``: the block's on-disk attribute name when it differs from the
    module's (Mixtral); ``returns``: what the block's forward returns besides the hidden states
    (``None``, ``"router_scores"`` or ``"router_logits"``); ``flat_output``: the block returns
    ``[T, H]`` (Llama-4); ``expert_names``: on disk, the per-expert (gate, up, down) projection
    names, or ``None`` when HF saves the fused ``experts.gate_up_proj [E, H, 2F]`` whose
    columns ``fused_gate_up`` describes (``"halves"``: gate | up; ``"interleaved"``: GPT-OSS).
    """

    model_type: str
    block_class: str
    router_class: str
    router_index: int = 0
    config: Callable[[Any], dict]
    weights: Callable[[Any], w.Weights]
    disk: Callable[[w.Weights], dict[str, Tensor]]
    disk_prefix: Optional[str] = None
    returns: Optional[str] = None
    flat_output: bool = False
    expert_names: Optional[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    fused_gate_up: Optional[str] = None

    def disk_name(self, name: str) -> str:
        """The on-disk name of the block at module path ``name`` (Mixtral saves its ``mlp`` as
        ``block_sparse_moe``)."""
        if self.disk_prefix is None:
            return name
        return name.rsplit(".", 1)[0] + "." + self.disk_prefix


# ---- HF config -> MoEConfig fields ------------------------------------------------------------


def _softmax_family(model_type: str, experts: str, shared: bool = False) -> Callable[[Any], dict]:
    """Softmax top-k over float32 scores, ``norm_topk_prob`` as configured (default True);
    ``experts``: the config field holding E; ``shared``: one sigmoid-gated shared expert."""
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


def _gpt_oss_config(c) -> dict:
    return dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                ffn_hidden_size=c.intermediate_size, softmax_before_topk=False,
                router_bias=True, expert_proj_bias=True, activation="clamped_swiglu",
                swiglu_alpha=float(getattr(c, "swiglu_alpha", 1.702)),
                swiglu_limit=float(c.swiglu_limit))


def _llama4_config(c) -> dict:
    _require(c.hidden_act == "silu", "llama4_text", "hidden_act", c.hidden_act, "SwiGLU only")
    return dict(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                ffn_hidden_size=c.intermediate_size, score_function="sigmoid",
                norm_topk_prob=False, scale_expert_input=True,
                router_score_dtype=torch.float32, num_shared_experts=1)


# ---- the registry -----------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(model_type="mixtral", block_class="MixtralSparseMoeBlock",
           router_class="MixtralTopKRouter", config=_mixtral_config,
           weights=w.plain_weights, disk=w.mixtral_disk, disk_prefix="block_sparse_moe",
           expert_names=("w1", "w3", "w2")),
    Family(model_type="qwen2_moe", block_class="Qwen2MoeSparseMoeBlock",
           router_class="Qwen2MoeTopKRouter",
           config=_softmax_family("qwen2_moe", "num_experts", shared=True),
           weights=w.qwen2_weights, disk=w.qwen2_disk),
    Family(model_type="qwen3_moe", block_class="Qwen3MoeSparseMoeBlock",
           router_class="Qwen3MoeTopKRouter", config=_softmax_family("qwen3_moe", "num_experts"),
           weights=w.plain_weights, disk=w.qwen_disk),
    Family(model_type="olmoe", block_class="OlmoeSparseMoeBlock", router_class="OlmoeTopKRouter",
           config=_softmax_family("olmoe", "num_experts"), weights=w.plain_weights,
           disk=w.qwen_disk),
    Family(model_type="deepseek_v3", block_class="DeepseekV3MoE",
           router_class="DeepseekV3TopkRouter", config=_deepseek_v3_config,
           weights=w.deepseek_weights, disk=w.deepseek_disk),
    Family(model_type="deepseek_v2", block_class="DeepseekV2Moe",
           router_class="DeepseekV2TopkRouter", config=_deepseek_v2_config,
           weights=w.deepseek_weights, disk=w.deepseek_disk),
    Family(model_type="gpt_oss", block_class="GptOssMLP", router_class="GptOssTopKRouter",
           config=_gpt_oss_config, weights=w.gpt_oss_weights, disk=w.gpt_oss_disk,
           returns="router_scores", expert_names=None, fused_gate_up="interleaved"),
    Family(model_type="llama4_text", block_class="Llama4TextMoe", router_class="Llama4Router",
           router_index=1, config=_llama4_config, weights=w.llama4_weights,
           disk=w.llama4_disk, returns="router_logits", flat_output=True, expert_names=None,
           fused_gate_up="halves"),
)}


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model, ``UnsupportedModelError`` naming its model type."""
    return family_of_config(getattr(model, "config", None))


def family_of_config(config: Any) -> Family:
    """The family of a transformers config (``llama4``: its text model's, ``llama4_text``)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llama4":  # the multimodal wrapper: its text model holds the blocks
        model_type = "llama4_text"
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
