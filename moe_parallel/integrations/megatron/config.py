"""Megatron-Core ``TransformerConfig`` → ``MoEConfig`` (and the losses Megatron computes itself).

Field map (Megatron-Core 0.16 names; every other ``moe_*`` field must keep its default unless it
is listed in ``PERFORMANCE_ONLY``, which change how Megatron's own kernels run, not the result)::

    hidden_size                         hidden_size
    moe_ffn_hidden_size (ffn_hidden_size when None)  ffn_hidden_size
    num_moe_experts                     num_experts
    moe_router_topk                     top_k
    gated_linear_unit, activation_func  "swiglu" (GLU + silu), "gelu" (F.gelu), "relu" (F.relu)
    moe_router_score_function           score_function
    moe_router_pre_softmax              softmax: True  -> softmax over all, top-k, no renormalising
                                                 False -> top-k of the logits, softmax over them
                                        sigmoid: ignored (renormalised when top_k > 1)
    moe_router_enable_expert_bias       expert_bias (sigmoid only, as in Megatron's routing)
    moe_router_bias_update_rate         bias_update_rate
    moe_router_num_groups / _group_topk num_groups / group_topk (group_score "sum_topk")
    moe_router_topk_scaling_factor      routed_scaling_factor (None: 1.0)
    moe_router_dtype                    router_dtype ("fp32", "fp64"; None: float32, or float64
                                        for a float64 model; Megatron uses the input dtype)
    moe_expert_capacity_factor          capacity_factor (None: dropless)
    moe_token_drop_policy               drop_policy
    moe_pad_expert_input_to_capacity    pad_to_capacity
    moe_shared_expert_intermediate_size one shared expert of that width
    moe_shared_expert_gate              shared_expert_gate
    moe_shared_expert_overlap           shared_expert_overlap
    moe_apply_probs_on_input            scale_expert_input
    moe_token_dispatcher_type           token_dispatcher_type ("alltoall", "allgather")
    moe_router_force_load_balancing     force_balance (Megatron draws random logits, balanced in
                                        expectation; here round-robin, balanced exactly)
    params_dtype, init_method_std       params_dtype, init_std

The load-balancing losses (``moe_router_load_balancing_type`` "aux_loss", "seq_aux_loss" or a
list of them with a list of ``moe_aux_loss_coeff``; ``moe_z_loss_coeff``) are not passed to
the layer: ``MegatronLosses`` computes them with Megatron's own functions and scaling
(``losses.py``). Anything that cannot be honoured raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...config import MoEConfig

__all__ = ["PERFORMANCE_ONLY", "MegatronLosses", "moe_config_from_megatron"]

# moe_* fields that only choose how Megatron's own implementation runs (kernels, fusion,
# recomputation, logging); the result is the same whatever their value.
PERFORMANCE_ONLY = frozenset({
    "moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_permute_fusion", "moe_router_fusion",
    "moe_layer_recompute", "moe_per_layer_logging", "moe_deepep_num_sms", "moe_hybridep_num_sms",
    "moe_flex_dispatcher_backend", "moe_layer_freq", "moe_token_dropping",
    "moe_enable_deepep",
})

# moe_* fields translated below (or into MegatronLosses).
TRANSLATED = frozenset({
    "moe_ffn_hidden_size", "moe_router_topk", "moe_router_score_function",
    "moe_router_pre_softmax", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
    "moe_router_dtype", "moe_expert_capacity_factor", "moe_token_drop_policy",
    "moe_pad_expert_input_to_capacity", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "moe_apply_probs_on_input", "moe_token_dispatcher_type",
    "moe_shared_expert_overlap", "moe_router_force_load_balancing",
    "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
})

_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "none")
_ROUTER_DTYPES = {None: None, "fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class MegatronLosses:
    """The router losses as Megatron-Core defines them: ``aux`` and ``seq_aux`` coefficients
    (0: off) and the z-loss coefficient, plus what their scaling needs."""

    aux_coeff: float = 0.0
    seq_aux_coeff: float = 0.0
    z_coeff: float = 0.0
    per_token: bool = False  # calculate_per_token_loss
    num_layers: int = 1      # num_layers + mtp_num_layers (the tracker's length)

    @property
    def enabled(self) -> bool:
        return self.aux_coeff > 0 or self.seq_aux_coeff > 0 or self.z_coeff > 0


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _refuse(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"TransformerConfig.{name}={value!r} is not supported by "
                      f"moe_parallel's MoEMLP: {why}")


def _activation(config: Any) -> str:
    fn, glu = config.activation_func, bool(config.gated_linear_unit)
    if glu and fn is F.silu:
        return "swiglu"
    if not glu and fn is F.gelu:
        return "gelu"
    if not glu and fn is F.relu:
        return "relu"
    raise _refuse("activation_func", getattr(fn, "__name__", fn),
                  f"with gated_linear_unit={glu}; supported: gated_linear_unit=True with "
                  "F.silu (SwiGLU), gated_linear_unit=False with F.gelu or F.relu")


def _losses(config: Any) -> MegatronLosses:
    types = config.moe_router_load_balancing_type
    coeffs = config.moe_aux_loss_coeff
    if isinstance(types, str):
        types, coeffs = [types], [coeffs]
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) != len(types):
        raise _refuse("moe_aux_loss_coeff", coeffs, "give one coefficient per entry of "
                      f"moe_router_load_balancing_type={types!r}")
    got = {"aux_loss": 0.0, "seq_aux_loss": 0.0}
    for t, c in zip(types, coeffs):
        if t not in _LOSS_TYPES:
            raise _refuse("moe_router_load_balancing_type", t, f"allowed: {_LOSS_TYPES}")
        if t in got:
            got[t] = float(c)
    extra = (config.mtp_num_layers or 0)
    return MegatronLosses(
        aux_coeff=got["aux_loss"], seq_aux_coeff=got["seq_aux_loss"],
        z_coeff=float(config.moe_z_loss_coeff or 0.0),
        per_token=bool(config.calculate_per_token_loss),
        num_layers=int(config.num_layers) + int(extra),
    )


def _check_fields(config: Any) -> None:
    """``ValueError`` (``_refuse``) for the first field of ``config`` this layer cannot honour:
    an untranslated ``moe_*`` field off its default, biases, fp8/fp4, a clamped or offset GLU,
    an unknown router dtype or dispatcher, the expert bias with softmax routing, or top-1
    routing with the softmax after the top-k."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for f in dataclasses.fields(TransformerConfig):
        name = f.name
        if (name.startswith("moe_") and name not in TRANSLATED and name not in PERFORMANCE_ONLY
                and getattr(config, name) != _default(TransformerConfig, name)):
            raise _refuse(name, getattr(config, name), "leave it at its default "
                          f"({_default(TransformerConfig, name)!r})")
    if config.add_bias_linear:
        raise _refuse("add_bias_linear", True, "MoE experts and router have no biases here, as "
                      "in Megatron's grouped experts; set add_bias_linear=False "
                      "(--disable-bias-linear)")
    for name in ("fp8", "fp4"):
        if getattr(config, name, None):
            raise _refuse(name, getattr(config, name), "only bf16/fp16/fp32/fp64 experts")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        raise _refuse("activation_func_clamp_value", config.activation_func_clamp_value,
                      "use MoEConfig(activation='clamped_swiglu') through the Hugging Face path")
    if getattr(config, "glu_linear_offset", 0.0):
        raise _refuse("glu_linear_offset", config.glu_linear_offset, "leave it at 0.0")
    if config.moe_router_dtype not in _ROUTER_DTYPES:
        raise _refuse("moe_router_dtype", config.moe_router_dtype,
                      f"allowed: {tuple(_ROUTER_DTYPES)}")
    if config.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        raise _refuse("moe_token_dispatcher_type", config.moe_token_dispatcher_type,
                      "allowed: 'alltoall', 'allgather'")
    _check_routing(config)


def _check_routing(config: Any) -> None:
    """The router settings Megatron accepts that this layer cannot reproduce."""
    sigmoid = config.moe_router_score_function == "sigmoid"
    if config.moe_router_enable_expert_bias and not sigmoid:
        raise _refuse("moe_router_enable_expert_bias", True, "Megatron's softmax routing "
                      "ignores the expert bias; use moe_router_score_function='sigmoid'")
    if not sigmoid and not config.moe_router_pre_softmax and config.moe_router_topk == 1:
        raise _refuse("moe_router_pre_softmax", False, "with moe_router_topk=1 the softmax over "
                      "the one selected logit is 1 for every token and the router learns "
                      "nothing from the main loss; set moe_router_pre_softmax=True")


def _moe_fields(config: Any) -> dict[str, Any]:
    """The ``MoEConfig`` fields of ``config`` (map in the module docstring)."""
    sigmoid = config.moe_router_score_function == "sigmoid"
    pre = bool(config.moe_router_pre_softmax)
    top_k = config.moe_router_topk
    shared = config.moe_shared_expert_intermediate_size
    kw = dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
        num_experts=config.num_moe_experts,
        top_k=top_k,
        activation=_activation(config),
        score_function=config.moe_router_score_function,
        softmax_before_topk=True if sigmoid else pre,
        norm_topk_prob=None if sigmoid else (False if pre else None),
        expert_bias=bool(config.moe_router_enable_expert_bias),
        bias_update_rate=float(config.moe_router_bias_update_rate),
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        group_score="sum_topk",
        routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        router_dtype=_ROUTER_DTYPES[config.moe_router_dtype],
        capacity_factor=config.moe_expert_capacity_factor,
        drop_policy=config.moe_token_drop_policy,
        pad_to_capacity=bool(config.moe_pad_expert_input_to_capacity),
        num_shared_experts=1 if shared else 0,
        shared_expert_ffn_hidden_size=shared or None,
        shared_expert_gate=bool(config.moe_shared_expert_gate),
        shared_expert_overlap=bool(config.moe_shared_expert_overlap) and bool(shared),
        scale_expert_input=bool(config.moe_apply_probs_on_input),
        token_dispatcher_type=config.moe_token_dispatcher_type,
        force_balance=bool(config.moe_router_force_load_balancing),
        params_dtype=config.params_dtype,
        init_std=float(config.init_method_std),
    )
    if sigmoid and top_k == 1:
        kw["norm_topk_prob"] = False
    return kw


def moe_config_from_megatron(config: Any, **overrides: Any) -> tuple[MoEConfig, MegatronLosses]:
    """The ``MoEConfig`` of a Megatron-Core ``TransformerConfig`` (map in the module docstring)
    with the layer's own losses off, and the Megatron losses to compute around it.

    ``overrides`` are ``MoEConfig`` fields with no Megatron counterpart (e.g.
    ``expert_impl="block_sparse"``, ``check_finite``). Raises ``ValueError`` naming the first
    ``TransformerConfig`` field that cannot be honoured.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a megatron.core TransformerConfig, got "
                        f"{type(config).__name__}")
    if not config.num_moe_experts:
        raise _refuse("num_moe_experts", config.num_moe_experts, "an MoE layer needs experts")
    _check_fields(config)
    kw = _moe_fields(config)
    clash = set(overrides) & (set(kw) | {"aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff"})
    if clash:
        raise ValueError(f"overrides {sorted(clash)} come from the TransformerConfig; set them "
                         "there")
    try:
        moe = MoEConfig(**kw, **overrides)
    except ValueError as e:
        raise ValueError(f"TransformerConfig does not translate to an MoEConfig: {e}") from e
    losses = _losses(config)
    if moe.top_p is not None and (losses.aux_coeff > 0 or losses.seq_aux_coeff > 0):
        raise ValueError(
            "top_p (dynamic-k routing) cannot be combined with Megatron's load-balancing "
            "losses: Megatron computes them on a plain top-k routing map. Set "
            "moe_aux_loss_coeff=0 (load-balancing type without aux/seq_aux loss) to use top_p "
            "in MoEMLP")
    return moe, losses
