"""A ``ModelSpec`` from a Hugging Face ``config.json`` of a family ``integrations.hf`` converts.

The MoE layer's fields (experts, top-k, expert FFN width, shared experts, biases, activation)
come from the family's own reading of the config (``integrations.hf.families``: the same
``MoEConfig`` fields ``convert`` and ``load_pretrained`` build), so the planner plans the layer
that would run; the rest of the model (attention shape, which layers are MoE, dense FFN width,
vocabulary, tied head, MTP modules) is read here, family by family, as transformers builds it:

* mixtral: every layer MoE; GQA without biases;
* qwen2_moe / qwen3_moe: layer ``i`` is MoE unless ``i in mlp_only_layers`` or ``(i + 1) %
  decoder_sparse_step``; Qwen2 has q/k/v biases (``qkv_bias``), Qwen3 biases on q/k/v/o with
  ``attention_bias`` and per-head q/k norms;
* olmoe: every layer MoE; q/k norms over the whole projections;
* deepseek_v2 / deepseek_v3: MLA; layers ``< first_k_dense_replace`` dense; V3's
  ``num_nextn_predict_layers`` MTP modules;
* gpt_oss: every layer MoE; q/k/v/o biases and per-head sinks;
* llama4 / llama4_text: MoE layers ``moe_layers`` (else every ``interleave_moe_layer_step``-th),
  the others dense of ``intermediate_size_mlp``; qk norms without weights.

Fields a config leaves out take the transformers defaults (its config class when transformers is
installed, else this module's table of the defaults the readers need).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .models import AttentionSpec, ModelSpec

__all__ = ["model_from_hf_config", "read_config"]

# transformers' defaults of the fields read here and by families.py, where config.json may omit
# them; aliases as transformers' ``attribute_map`` (the name families.py reads -> alternatives)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {"hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
          "norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1},
    "mixtral": {"router_jitter_noise": 0.0},
    "qwen2_moe": {"qkv_bias": True, "norm_topk_prob": False},
    "qwen3_moe": {"norm_topk_prob": False},
    "olmoe": {"norm_topk_prob": False},
    "deepseek_v3": {"topk_method": "noaux_tc", "routed_scaling_factor": 1.0,
                    "first_k_dense_replace": 0, "num_nextn_predict_layers": 0, "n_group": None,
                    "topk_group": None, "n_shared_experts": None, "q_lora_rank": None},
    "deepseek_v2": {"topk_method": "greedy", "routed_scaling_factor": 1.0,
                    "first_k_dense_replace": 0, "n_group": None, "topk_group": None,
                    "n_shared_experts": None, "q_lora_rank": None, "norm_topk_prob": False},
    "gpt_oss": {"swiglu_limit": 7.0, "swiglu_alpha": 1.702, "attention_bias": True},
    "llama4_text": {"interleave_moe_layer_step": 1, "moe_layers": None},
}
_ALIASES = {"num_experts": ("num_local_experts", "n_routed_experts"),
            "num_local_experts": ("num_experts", "n_routed_experts")}


class _JsonConfig:
    """Attribute access to a config.json dict, with the family's defaults and the aliases."""

    def __init__(self, data: dict, model_type: str) -> None:
        self._data = {**_DEFAULTS["*"], **_DEFAULTS.get(model_type, {}), **data}

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__["_data"]
        for key in (name, *_ALIASES.get(name, ())):
            if key in data:
                return data[key]
        raise AttributeError(name)


def read_config(path: str | Path) -> dict:
    """The dict of an HF ``config.json`` (``path`` the file or its directory); ``ValueError``
    naming ``--config`` when it is missing or not a JSON object."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config: no such file {str(p)!r}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--config: cannot read {str(p)!r} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(p)!r} holds {type(data).__name__}, not a config object")
    return data


def _namespace(data: dict, model_type: str) -> Any:
    """The config as transformers would hold it: its config class when transformers is
    installed and accepts the file, else ``_JsonConfig``."""
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[model_type]
        return cls(**{k: v for k, v in data.items() if k != "model_type"})
    except (ImportError, KeyError, TypeError, ValueError):
        return _JsonConfig(data, model_type)


def _field(c: Any, name: str, where: str) -> Any:
    try:
        return getattr(c, name)
    except AttributeError:
        raise ValueError(f"--config {where}: config.json has no {name!r} (needed for its "
                         f"model_type {getattr(c, 'model_type', '?')!r})") from None


def _layer_kinds(c: Any, model_type: str, layers: int, where: str) -> tuple[str, ...]:
    if model_type in ("qwen2_moe", "qwen3_moe"):
        skip, step = set(c.mlp_only_layers or ()), c.decoder_sparse_step or 1
        return tuple("moe" if i not in skip and (i + 1) % step == 0 else "dense"
                     for i in range(layers))
    if model_type in ("deepseek_v2", "deepseek_v3"):
        k = c.first_k_dense_replace or 0
        return tuple("dense" if i < k else "moe" for i in range(layers))
    if model_type == "llama4_text":
        moe = getattr(c, "moe_layers", None)
        if moe is None:
            step = _field(c, "interleave_moe_layer_step", where)
            moe = range(step - 1, layers, step)
        moe = set(moe)
        return tuple("moe" if i in moe else "dense" for i in range(layers))
    return ("moe",) * layers


def _dense_ffn(c: Any, model_type: str) -> int:
    if model_type == "llama4_text":
        return getattr(c, "intermediate_size_mlp", 0) or 0
    return getattr(c, "intermediate_size", 0) or 0


def _attention(c: Any, model_type: str, H: int, where: str) -> AttentionSpec:
    heads = _field(c, "num_attention_heads", where)
    kv = getattr(c, "num_key_value_heads", None) or heads
    if model_type in ("deepseek_v2", "deepseek_v3"):
        nope, rope = _field(c, "qk_nope_head_dim", where), _field(c, "qk_rope_head_dim", where)
        bias = bool(getattr(c, "attention_bias", False))
        return AttentionSpec(heads=heads, kv_heads=heads, head_dim=nope + rope,
                             v_head_dim=_field(c, "v_head_dim", where),
                             q_lora_rank=getattr(c, "q_lora_rank", None) or 0,
                             kv_lora_rank=_field(c, "kv_lora_rank", where), rope_head_dim=rope,
                             qkv_bias=bias, out_bias=bias)
    d = getattr(c, "head_dim", None) or H // heads
    if model_type == "qwen2_moe":
        return AttentionSpec(heads=heads, kv_heads=kv, head_dim=d, v_head_dim=d,
                             qkv_bias=bool(getattr(c, "qkv_bias", True)))
    bias = bool(getattr(c, "attention_bias", False))
    return AttentionSpec(
        heads=heads, kv_heads=kv, head_dim=d, v_head_dim=d, qkv_bias=bias, out_bias=bias,
        qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none"),
        sinks=model_type == "gpt_oss")


def model_from_hf_config(config: dict | str | Path, name: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of an HF config (a dict, or a ``config.json`` path or its directory).
    ``ValueError`` naming ``--config`` for a model type ``integrations.hf`` does not convert (the
    supported ones listed), a feature of it the conversion refuses, or a missing field."""
    from ..integrations.hf.families import FAMILIES, UnsupportedModelError

    where = str(config) if not isinstance(config, dict) else "<dict>"
    data = read_config(config) if not isinstance(config, dict) else dict(config)
    model_type = data.get("model_type")
    if model_type == "llama4":  # the multimodal wrapper: its text model holds the blocks
        data, model_type = dict(data.get("text_config") or {}), "llama4_text"
    if model_type not in FAMILIES:
        raise ValueError(f"--config {where}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    c = _namespace(data, model_type)
    try:
        moe = FAMILIES[model_type].config(c)
    except UnsupportedModelError as e:
        raise ValueError(f"--config {where}: {e}") from None
    except AttributeError as e:
        raise ValueError(f"--config {where}: config.json has no {e.args[0]!r} (needed for its "
                         f"model_type {model_type!r})") from None
    H, layers = _field(c, "hidden_size", where), _field(c, "num_hidden_layers", where)
    ffn = moe["ffn_hidden_size"]
    shared = moe.get("num_shared_experts", 0) or 0
    shared_ffn = (moe.get("shared_expert_ffn_hidden_size") or shared * ffn) if shared else 0
    return ModelSpec(
        name=name or data.get("_name_or_path") or model_type, hidden=H,
        vocab=_field(c, "vocab_size", where), attention=_attention(c, model_type, H, where),
        layer_kinds=_layer_kinds(c, model_type, layers, where), experts=moe["num_experts"],
        top_k=moe["top_k"], expert_ffn=ffn, dense_ffn=_dense_ffn(c, model_type),
        shared_ffn=shared_ffn, shared_gate=bool(moe.get("shared_expert_gate", False)),
        router_bias=bool(moe.get("router_bias", False)),
        expert_proj_bias=bool(moe.get("expert_proj_bias", False)),
        gated=moe.get("activation", "swiglu") in ("swiglu", "clamped_swiglu"),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        mtp_layers=(getattr(c, "num_nextn_predict_layers", 0) or 0)
        if model_type == "deepseek_v3" else 0,
        source=f"{where} ({model_type})")
