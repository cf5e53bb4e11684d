"""Dense transformers decoder models made into MoE models of the corresponding HF family.

``upcycle(model, num_experts, top_k, granularity=1)`` turns a dense causal LM into a real
transformers MoE model whose experts start as copies of the dense MLP (granularity ``g > 1``:
each expert a ``1/g`` shard of it, Megatron-Core's granular upcycling); ``merge.py`` builds
an MoE model from several dense ones with the same parts (``moe_config``, ``moe_skeleton``,
``fill_moe``).

Families (dense ``model_type`` -> the MoE family built):

=========  ===========  ================================================================
llama      mixtral      ``attention_bias`` / ``mlp_bias`` refused (Mixtral has neither)
mistral    mixtral      ``sliding_window`` carried
qwen2      qwen2_moe    ``layer_types`` carried; a shared expert whose output starts at 0
qwen3      qwen3_moe    sliding attention on every layer or on none (``layer_types``)
=========  ===========  ================================================================

The MoE config is the dense config's fields (attention, norms, RoPE, vocabulary, tied
embeddings, token ids, attention implementation), the MoE fields set (experts, ``top_k``,
expert width, renormalised top-k weights, no jitter, every layer an MoE layer), and a field
that the MoE family cannot reproduce refused with ``UnsupportedModelError`` naming it.

Qwen2-MoE's block always adds a sigmoid-gated shared expert. HF builds one of width 0, but
``MoEConfig`` (and so ``convert``) refuses a width-0 shared expert, so the shared expert is
given a width (``shared_expert_intermediate_size``, default: one routed expert's width) and a
zero ``down_proj``: its output is exactly 0 at initialisation, and training grows it
(``down_proj`` gets the gradient ``sigmoid(gate·x)·act(x) ⊗ grad``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .families import UnsupportedModelError

__all__ = ["MOE_FAMILY", "BlockWeights", "dense_mlps", "fill_moe", "moe_config", "moe_skeleton",
           "upcycle"]

MOE_FAMILY: dict[str, str] = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe",
                              "qwen3": "qwen3_moe"}

# fields that describe the dense config object rather than the model
_META = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype",
         "torch_dtype", "auto_map")


@dataclass
class BlockWeights:
    """One MoE block's weights in HF's layout: ``router [E, H]``, ``gate_up [E, 2F, H]``
    (gate rows then up rows), ``down [E, H, F]``; Qwen2-MoE's shared expert ``shared_gate``,
    ``shared_up [Fs, H]``, ``shared_down [H, Fs]`` and ``shared_expert_gate [1, H]``."""

    router: Tensor
    gate_up: Tensor
    down: Tensor
    shared_gate: Optional[Tensor] = None
    shared_up: Optional[Tensor] = None
    shared_down: Optional[Tensor] = None
    shared_expert_gate: Optional[Tensor] = None


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _refuse(model_type: str, field: str, value: Any, why: str) -> None:
    raise UnsupportedModelError(f"{model_type}: {field}={value!r} is not supported ({why})")


def _dense_type(model: nn.Module) -> str:
    """The dense model's ``model_type``, checked: a supported ``*ForCausalLM``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MOE_FAMILY:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not a supported dense model; supported: "
            f"{sorted(MOE_FAMILY)}")
    if not type(model).__name__.endswith("ForCausalLM"):
        raise UnsupportedModelError(f"{model_type}: {type(model).__name__} is not a *ForCausalLM "
                                    "model (load it with AutoModelForCausalLM)")
    return model_type


def dense_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder layer of a dense ``*ForCausalLM`` (``gate_proj``, ``up_proj``,
    ``down_proj`` Linears without bias), ``UnsupportedModelError`` otherwise."""
    model_type = _dense_type(model)
    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:
        names = ("gate_proj", "up_proj", "down_proj")
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            raise UnsupportedModelError(f"{model_type}: {type(mlp).__name__} is not a gated MLP "
                                        "(gate_proj, up_proj, down_proj)")
        if any(getattr(mlp, n).bias is not None for n in names):
            _refuse(model_type, "mlp_bias", True, "the MoE family's experts have no bias")
    return mlps


def moe_config(dense_config: Any, num_experts: int, top_k: int, ffn_hidden_size: int, *,
               norm_topk_prob: bool = True,
               shared_expert_intermediate_size: Optional[int] = None) -> Any:
    """The config of the MoE family of ``dense_config`` (``MOE_FAMILY``): every field of the
    dense config carried over, then ``num_experts`` experts of width ``ffn_hidden_size``,
    ``top_k`` per token, ``norm_topk_prob`` (Mixtral: always renormalised, so it must be
    True), no router jitter, every layer an MoE layer (Qwen: ``decoder_sparse_step=1``,
    ``mlp_only_layers=[]``; ``intermediate_size`` stays the dense width); Qwen2-MoE's shared
    expert of width ``shared_expert_intermediate_size`` (default ``ffn_hidden_size``).
    ``UnsupportedModelError`` names a dense field the family cannot reproduce."""
    import transformers

    model_type = dense_config.model_type
    if model_type not in MOE_FAMILY:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not a supported dense model; supported: "
            f"{sorted(MOE_FAMILY)}")
    family = MOE_FAMILY[model_type]
    fields = {k: v for k, v in dense_config.to_dict().items() if k not in _META}
    implementations = {k: getattr(dense_config, k, None)
                       for k in ("_attn_implementation", "_experts_implementation")}
    if family == "mixtral":
        for name in ("attention_bias", "mlp_bias"):
            if fields.pop(name, False):
                _refuse(model_type, name, True, "Mixtral's attention and experts have no bias")
        for name in ("pretraining_tp", "layer_types"):  # not read by the dense modeling
            fields.pop(name, None)
        if not norm_topk_prob:
            raise ValueError("norm_topk_prob must be True for Mixtral (HF always renormalises "
                             "its top-k weights)")
        fields.update(num_local_experts=num_experts, num_experts_per_tok=top_k,
                      intermediate_size=ffn_hidden_size, router_jitter_noise=0.0)
        if model_type == "llama":
            fields["sliding_window"] = None
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        layer_types = fields.get("layer_types") or []
        if "sliding_attention" in layer_types and fields.get("sliding_window") is None:
            _refuse(model_type, "layer_types", layer_types,
                    "sliding layers without a sliding_window")
        fields.update(num_experts=num_experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=ffn_hidden_size, norm_topk_prob=norm_topk_prob,
                      shared_expert_intermediate_size=(shared_expert_intermediate_size
                                                       or ffn_hidden_size),
                      decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True)
        cls = transformers.Qwen2MoeConfig
    else:  # qwen3_moe: one sliding window for every layer, or none
        layer_types = fields.pop("layer_types", None) or []
        fields.pop("max_window_layers", None)
        sliding = [t == "sliding_attention" for t in layer_types]
        if any(sliding) and not all(sliding):
            _refuse(model_type, "layer_types", layer_types,
                    "Qwen3-MoE applies its sliding window to every layer or to none")
        fields["use_sliding_window"] = bool(sliding) and all(sliding)
        if not fields["use_sliding_window"]:
            fields["sliding_window"] = None
        fields.update(num_experts=num_experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=ffn_hidden_size, norm_topk_prob=norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen3MoeConfig
    if shared_expert_intermediate_size is not None and family != "qwen2_moe":
        raise ValueError(f"shared_expert_intermediate_size is for Qwen2 (qwen2_moe) only; "
                         f"{model_type} becomes {family}, which has no shared expert")
    config = cls(**fields)
    for k, v in implementations.items():  # the attention (and experts) kernels chosen
        if v is not None:
            setattr(config, k, v)
    return config


def moe_skeleton(config: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The MoE ``*ForCausalLM`` of ``config`` on ``device`` in ``dtype``, built on the meta
    device (no random initialisation, the global RNG untouched); its weights uninitialised
    (``fill_moe`` sets them), its non-persistent buffers (RoPE tables) computed."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    for module in model.modules():  # RoPE tables: computed from the config, no randomness
        if any(n in module._non_persistent_buffers_set
               for n, _ in module.named_buffers(recurse=False)):
            if next(module.parameters(recurse=False), None) is not None:
                raise UnsupportedModelError(f"{type(module).__name__} holds both parameters and "
                                            "non-persistent buffers")
            model._init_weights(module)
    return model


def fill_moe(model: nn.Module, dense: dict[str, Tensor], blocks: Sequence[BlockWeights]) -> None:
    """Set every weight of the MoE ``model`` (``moe_skeleton``): the non-MLP tensors from
    ``dense`` (a dense model's state dict, its MLP keys ignored; every key must have a place
    of the same shape, every non-MoE tensor of ``model`` a key), layer ``i``'s MoE block from
    ``blocks[i]``; then the tied embeddings re-tied."""
    own = model.state_dict()
    layers = model.model.layers
    if len(blocks) != len(layers):
        raise ValueError(f"{len(blocks)} blocks for {len(layers)} layers")
    moe_prefixes = [f"model.layers.{i}.mlp." for i in range(len(layers))]
    wanted = {k for k in own if not any(k.startswith(p) for p in moe_prefixes)}
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    given = {k for k in dense if ".mlp." not in k}
    mt = model.config.model_type
    if given - set(own):
        raise UnsupportedModelError(f"{mt}: the dense tensors {sorted(given - set(own))[:8]} "
                                    "have no place in the MoE model")
    missing = wanted - given - tied
    if missing:
        raise UnsupportedModelError(f"{mt}: the MoE model's {sorted(missing)[:8]} have no dense "
                                    "tensor")
    with torch.no_grad():
        for k in given:
            if own[k].shape != dense[k].shape:
                raise UnsupportedModelError(f"{mt}: {k} is {tuple(own[k].shape)} in the MoE "
                                            f"model, {tuple(dense[k].shape)} in the dense one")
            own[k].copy_(dense[k])
        for layer, w in zip(layers, blocks):
            block = layer.mlp
            block.gate.weight.copy_(w.router)
            block.experts.gate_up_proj.copy_(w.gate_up)
            block.experts.down_proj.copy_(w.down)
            if hasattr(block, "shared_expert"):
                block.shared_expert.gate_proj.weight.copy_(w.shared_gate)
                block.shared_expert.up_proj.weight.copy_(w.shared_up)
                block.shared_expert.down_proj.weight.copy_(w.shared_down)
                block.shared_expert_gate.weight.copy_(w.shared_expert_gate)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def shared_expert_init(config: Any, hidden: int, generator: torch.Generator,
                       std: float) -> dict[str, Tensor]:
    """Qwen2-MoE's shared expert at initialisation (float64, drawn from ``generator`` in this
    order): ``gate``, ``up [Fs, H]`` ~ N(0, initializer_range²), ``shared_expert_gate [1, H]``
    ~ N(0, std²), and ``down [H, Fs] = 0`` (the expert's output is exactly 0)."""
    width = config.shared_expert_intermediate_size
    init = config.initializer_range
    gate = torch.randn(width, hidden, generator=generator, dtype=torch.float64) * init
    up = torch.randn(width, hidden, generator=generator, dtype=torch.float64) * init
    expert_gate = torch.randn(1, hidden, generator=generator, dtype=torch.float64) * std
    return dict(shared_gate=gate, shared_up=up, shared_expert_gate=expert_gate,
                shared_down=torch.zeros(hidden, width, dtype=torch.float64))


def upcycle(model: nn.Module, num_experts: int, top_k: int, granularity: int = 1, *,
            router_init_std: Optional[float] = None, seed: int = 0,
            shared_expert_intermediate_size: Optional[int] = None) -> nn.Module:
    """A new transformers MoE model from the dense causal LM ``model`` (``MOE_FAMILY``: Llama
    and Mistral become Mixtral, Qwen2 Qwen2-MoE, Qwen3 Qwen3-MoE), ``model`` unchanged.

    Every non-MLP weight is copied; every MLP (``down(act(gate·x) ⊙ up·x)``, F hidden units)
    becomes an MoE block of ``E = num_experts`` experts, ``k = top_k`` per token, with
    renormalised top-k weights (``norm_topk_prob=True``). Granular upcycling with
    ``g = granularity`` (``F % g == 0``, ``E % g == 0``, ``k % g == 0``): expert
    ``e = c·g + s`` is shard ``s`` of copy ``c`` (``C = E/g`` copies): hidden units
    ``[s·F/g, (s+1)·F/g)`` of ``gate`` and ``up``, and ``g ·`` the same columns of ``down``;
    router row ``e`` is ``r_c``, ``r_c ~ N(0, router_init_std²)`` (default: the config's
    ``initializer_range``) drawn per copy from ``torch.Generator().manual_seed(seed)`` in
    float64, layer by layer (Qwen2-MoE: then its shared expert, ``shared_expert_init``). The
    same arguments give the same model on every process.

    Equality at initialisation. Let the ``m = k/g`` best copies be selected; each shard of
    copy ``c`` gets the renormalised weight ``w_c`` and the block returns
    ``Σ_c w_c · g · Σ_s down_s(...) = (g·Σ_c w_c) · MLP(x)``. The upcycled model's logits
    therefore equal the dense model's (to float64 rounding) exactly when:
      (1) the top-k weights are renormalised (set), and the router has no jitter (set; HF
          Mixtral's jitter scales the input in training);
      (2) ``k`` is a multiple of ``g`` (checked);
      (3) at every token, the ``m``-th and ``(m+1)``-th best copies' scores differ in the
          score dtype (the ``g`` shards of one copy always tie bit for bit), so top-k picks
          whole copies (probability 1 with a random router and distinct hidden states);
      (4) ``g·Σ_c w_c = 1`` in the score dtype. HF computes the weights in float32: with
          ``m = 1`` and ``g`` in {1, 2, 4}, ``w = p/(g·p) = 1/g`` exactly (g equal float32
          values sum to ``g·p`` exactly); with ``m >= 2`` the sum is 1 only to float32
          rounding (|g·Σ w_c − 1| <= k·2⁻²⁴), and so are the logits. ``convert``'s model
          does the same with its float32 scores; ``convert(model,
          router_score_dtype=torch.float64)`` makes (4) hold to float64 rounding for any m.
    Converting with ``convert`` needs ``k >= 2`` (``MoEConfig`` refuses renormalised top-1
    weights: every weight would be 1 and the router would get no gradient).

    ``shared_expert_intermediate_size``: Qwen2-MoE's shared expert width (module docstring).
    ``ValueError`` names a bad argument; ``UnsupportedModelError`` a model or config field the
    MoE family cannot reproduce.
    """
    mlps = dense_mlps(model)
    _check_int("num_experts", num_experts, 1)
    _check_int("top_k", top_k, 1)
    _check_int("granularity", granularity, 1)
    _check_int("seed", seed, 0)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
    ffn = model.config.intermediate_size
    for name, value in (("intermediate_size (the dense MLP width)", ffn),
                        ("num_experts", num_experts), ("top_k", top_k)):
        if value % granularity:
            raise ValueError(f"granularity={granularity} must divide {name}={value}")
    std = _router_std(router_init_std, model.config)
    if shared_expert_intermediate_size is not None:
        _check_int("shared_expert_intermediate_size", shared_expert_intermediate_size, 1)
    config = moe_config(model.config, num_experts, top_k, ffn // granularity,
                        shared_expert_intermediate_size=shared_expert_intermediate_size)
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for mlp in mlps:
        blocks.append(_upcycled_block(mlp, num_experts, granularity, std, generator))
        if config.model_type == "qwen2_moe":
            for k, v in shared_expert_init(config, config.hidden_size, generator, std).items():
                setattr(blocks[-1], k, v)
    param = model.model.embed_tokens.weight
    moe = moe_skeleton(config, param.dtype, param.device)
    fill_moe(moe, model.state_dict(), blocks)
    return moe


def _router_std(router_init_std: Optional[float], config: Any) -> float:
    std = config.initializer_range if router_init_std is None else router_init_std
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
        raise ValueError(f"router_init_std must be a float > 0 (None: the config's "
                         f"initializer_range), got {router_init_std!r}")
    return float(std)


def _upcycled_block(mlp: nn.Module, num_experts: int, g: int, std: float,
                    generator: torch.Generator) -> BlockWeights:
    """The MoE block of one dense MLP (``upcycle``): expert ``e = c·g + s`` = shard ``s`` of
    copy ``c``, its ``down`` scaled by ``g``; router rows ``r_c`` repeated over the shards."""
    gate, up, down = (getattr(mlp, n).weight.detach() for n in ("gate_proj", "up_proj",
                                                                "down_proj"))
    F, H = gate.shape
    width = F // g
    shards = [(torch.cat([gate[s * width:(s + 1) * width], up[s * width:(s + 1) * width]]),
               down[:, s * width:(s + 1) * width] * g) for s in range(g)]
    copies = num_experts // g
    gate_up = torch.stack([gu for gu, _ in shards] * copies)  # [E, 2F/g, H], e = c·g + s
    downs = torch.stack([d for _, d in shards] * copies)  # [E, H, F/g]
    rows = torch.randn(copies, H, generator=generator, dtype=torch.float64) * std
    return BlockWeights(router=rows.repeat_interleave(g, dim=0), gate_up=gate_up, down=downs)
