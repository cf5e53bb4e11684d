"""MoEConfig's validation: each rule a named check; ``validate`` runs them all.

Every invalid value raises ``ValueError`` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

from ..ops import FLOAT_DTYPES, GROUPED_GEMM_BACKENDS
from . import choices
from .values import (
    _is_real,
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
)

if TYPE_CHECKING:
    from .fields import MoEConfigFields as MoEConfig


def validate(cfg: MoEConfig) -> None:
    """Raise ``ValueError`` on the first rule ``cfg`` breaks (the checks below, in order)."""
    for check in _CHECKS:
        check(cfg)


def _bool_fields(cfg: MoEConfig) -> tuple[str, ...]:
    """The bool fields, read from their annotations."""
    return tuple(f.name for f in dataclasses.fields(cfg) if f.type == "bool")


def _check_sizes(cfg: MoEConfig) -> None:
    """hidden_size, ffn_hidden_size, num_experts, top_k: positive ints, top_k <= E."""
    check_positive_int("hidden_size", cfg.hidden_size)
    check_positive_int("ffn_hidden_size", cfg.ffn_hidden_size)
    check_positive_int("num_experts", cfg.num_experts)
    check_positive_int("top_k", cfg.top_k)
    if cfg.top_k > cfg.num_experts:
        raise ValueError(
            f"top_k must be <= num_experts ({cfg.num_experts}), got top_k={cfg.top_k}"
        )


def _check_choices(cfg: MoEConfig) -> None:
    """Every field with a fixed set of values holds one of them (the Literal types, the
    bool flags, ``norm_topk_prob``, the dtypes)."""
    check_choice("activation", cfg.activation, choices.ACTIVATIONS)
    check_choice("router_type", cfg.router_type, choices.ROUTER_TYPES)
    check_choice("score_function", cfg.score_function, choices.SCORE_FUNCTIONS)
    check_choice("drop_policy", cfg.drop_policy, choices.DROP_POLICIES)
    check_choice("token_dispatcher_type", cfg.token_dispatcher_type, choices.DISPATCHERS)
    check_choice("group_score", cfg.group_score, choices.GROUP_SCORES)
    check_choice("expert_impl", cfg.expert_impl, choices.EXPERT_IMPLS)
    check_choice("grouped_gemm_backend", cfg.grouped_gemm_backend, GROUPED_GEMM_BACKENDS)
    check_choice("row_overflow", cfg.row_overflow, choices.ROW_OVERFLOWS)
    check_choice("verdict_scope", cfg.verdict_scope, choices.VERDICT_SCOPES)
    check_choice("recompute", cfg.recompute, choices.RECOMPUTE_MODES)
    for name in _bool_fields(cfg):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    if cfg.norm_topk_prob is not None and not isinstance(cfg.norm_topk_prob, bool):
        raise ValueError(
            f"norm_topk_prob must be a bool or None (renormalise when top_k > 1), got "
            f"{cfg.norm_topk_prob!r}"
        )
    for name in ("router_dtype", "router_score_dtype"):
        check_choice(name, getattr(cfg, name), choices.ROUTER_DTYPES)
    check_choice("params_dtype", cfg.params_dtype, FLOAT_DTYPES)


def _check_router_weights(cfg: MoEConfig) -> None:
    """The combine weights: no top-1 combination whose weight is always 1 (the router would
    get no gradient from the main loss), softmax-only options, a positive scaling."""
    if cfg.router_type == "topk" and cfg.top_k == 1:
        if cfg.norm_topk_prob:
            raise ValueError(
                "norm_topk_prob=True with top_k=1 makes every combine weight 1, so the router "
                "gets no gradient from the main loss; set norm_topk_prob=False (Switch: "
                "p = softmax(logits)[top-1]) or leave it None"
            )
        if cfg.score_function == "softmax" and not cfg.softmax_before_topk:
            raise ValueError(
                "softmax_before_topk=False with top_k=1 is a softmax over the one selected "
                "logit: every combine weight is 1 and the router gets no gradient from the "
                "main loss; set softmax_before_topk=True"
            )
    if cfg.score_function == "sigmoid" and not cfg.softmax_before_topk:
        raise ValueError("softmax_before_topk=False applies only to score_function='softmax'")
    check_positive_float("routed_scaling_factor", cfg.routed_scaling_factor)


def _check_capacity(cfg: MoEConfig) -> None:
    """capacity_factor, eval_capacity_factor, min_capacity, pad_to_capacity, drop_policy."""
    if cfg.capacity_factor is not None:
        check_positive_float("capacity_factor", cfg.capacity_factor, "None for dropless")
    if cfg.eval_capacity_factor is not None:
        check_positive_float("eval_capacity_factor", cfg.eval_capacity_factor,
                             "None for capacity_factor")
        if cfg.router_type == "topk" and cfg.capacity_factor is None:
            raise ValueError(
                "eval_capacity_factor needs capacity_factor to be set: a dropless layer "
                "(capacity_factor=None) has no capacity to change in eval"
            )
    check_nonneg_int("min_capacity", cfg.min_capacity)
    if cfg.pad_to_capacity and cfg.capacity_factor is None:
        raise ValueError("pad_to_capacity=True needs capacity_factor to be set (it is None)")
    if cfg.static_exchange:
        needs = {"pad_to_capacity": (cfg.pad_to_capacity, True),
                 "token_dispatcher_type": (cfg.token_dispatcher_type, "alltoall"),
                 "dynamic_capacity": (cfg.dynamic_capacity, False)}
        for name, (value, want) in needs.items():
            if value != want:
                raise ValueError(f"static_exchange=True needs {name}={want!r}, got {value!r}")
    if cfg.drop_policy in ("k_major", "batch_priority") and cfg.router_type != "topk":
        raise ValueError(f"drop_policy={cfg.drop_policy!r} applies only to "
                         "router_type='topk'")


def _check_router_noise(cfg: MoEConfig) -> None:
    """noisy_gating (softmax only), jitter_noise in [0, 1), the expert-bias step >= 0."""
    if cfg.noisy_gating and cfg.score_function != "softmax":
        raise ValueError("noisy_gating requires score_function='softmax'")
    if not (_is_real(cfg.jitter_noise) and 0 <= cfg.jitter_noise < 1):
        raise ValueError(f"jitter_noise must be a number in [0, 1), got {cfg.jitter_noise!r}")
    check_nonneg_float("bias_update_rate", cfg.bias_update_rate)


def _check_expert_dropout(cfg: MoEConfig) -> None:
    """expert_dropout a number in [0, 1); expert_dropout_seed an int in [0, 2^64)."""
    p = cfg.expert_dropout
    if not (_is_real(p) and math.isfinite(p) and 0 <= p < 1):
        raise ValueError(f"expert_dropout must be a number in [0, 1) (0: off), got {p!r}")
    seed = cfg.expert_dropout_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"expert_dropout_seed must be an int in [0, 2^64), got {seed!r}")


def _check_group_limited(cfg: MoEConfig) -> None:
    """num_groups / group_topk / group_score: set together, sizes that divide, token choice."""
    if (cfg.num_groups is None) != (cfg.group_topk is None):
        raise ValueError(
            "num_groups and group_topk must be set together "
            f"(got num_groups={cfg.num_groups}, group_topk={cfg.group_topk})"
        )
    if cfg.num_groups is None:
        if cfg.group_score != "sum_topk":
            raise ValueError(f"group_score={cfg.group_score!r} needs num_groups/group_topk")
        return
    G, M = cfg.num_groups, cfg.group_topk
    check_positive_int("num_groups", G)
    check_positive_int("group_topk", M)
    per_group = cfg.num_experts // G
    if cfg.num_experts % G:
        raise ValueError(f"num_experts ({cfg.num_experts}) must be divisible by "
                         f"num_groups ({G})")
    if M > G:
        raise ValueError(f"group_topk ({M}) must be <= num_groups ({G})")
    if cfg.group_score == "sum_topk" and cfg.top_k % M:
        raise ValueError(
            f"top_k ({cfg.top_k}) must be divisible by group_topk ({M}) with "
            "group_score='sum_topk' (each group scored by its top_k // group_topk best); "
            "group_score='sum_top2' or 'max' take any top_k"
        )
    if cfg.group_score == "sum_top2" and per_group < 2:
        raise ValueError(
            f"group_score='sum_top2' needs at least 2 experts per group, got {per_group}")
    if cfg.top_k > M * per_group:
        raise ValueError(f"top_k ({cfg.top_k}) exceeds the experts in group_topk ({M}) "
                         f"groups of {per_group}")
    if cfg.router_type != "topk":
        raise ValueError("num_groups/group_topk apply only to router_type='topk'")


def _check_losses(cfg: MoEConfig) -> None:
    """The loss coefficients are finite and >= 0; the entropy loss needs softmax scores."""
    for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff",
                 "dynamic_loss_coeff"):
        check_nonneg_float(name, getattr(cfg, name))
    if cfg.dynamic_loss_coeff > 0 and cfg.score_function != "softmax":
        raise ValueError("dynamic_loss_coeff > 0 needs score_function='softmax' (the entropy "
                         "of the router's distribution)")


def _check_expert_choice(cfg: MoEConfig) -> None:
    """Expert choice: softmax scores, and none of the token-choice-only options."""
    if cfg.router_type != "expert_choice":
        return
    for name in ("noisy_gating", "expert_bias", "pad_to_capacity", "router_bias",
                 "scale_expert_input"):
        if getattr(cfg, name):
            raise ValueError(f"{name} is not supported with router_type='expert_choice'")
    for name in ("aux_loss_coeff", "seq_aux_loss_coeff"):
        if getattr(cfg, name) > 0:
            raise ValueError(
                f"{name} must be 0 with router_type='expert_choice' (every expert "
                f"takes the same number of tokens), got {getattr(cfg, name)}"
            )
    if cfg.min_capacity:
        raise ValueError(
            "min_capacity applies only to router_type='topk' (expert choice uses "
            f"C = min(T, ceil(T*top_k/E*capacity_factor))), got {cfg.min_capacity}"
        )
    if cfg.routed_scaling_factor != 1.0:
        raise ValueError(
            "routed_scaling_factor must be 1.0 with router_type='expert_choice', "
            f"got {cfg.routed_scaling_factor}"
        )
    if cfg.score_function != "softmax":
        raise ValueError("router_type='expert_choice' requires score_function='softmax'")


def _check_numerics(cfg: MoEConfig) -> None:
    """The constants that must be finite and > 0: the clamped-SwiGLU α and L, init_std."""
    for name in ("swiglu_alpha", "swiglu_limit", "init_std"):
        check_positive_float(name, getattr(cfg, name))


def _check_shared_experts(cfg: MoEConfig) -> None:
    """num_shared_experts >= 0; the shared width and gate need a shared expert."""
    check_nonneg_int("num_shared_experts", cfg.num_shared_experts)
    if cfg.shared_expert_ffn_hidden_size is not None:
        check_positive_int("shared_expert_ffn_hidden_size", cfg.shared_expert_ffn_hidden_size)
        if cfg.num_shared_experts == 0:
            raise ValueError("shared_expert_ffn_hidden_size needs num_shared_experts >= 1")
    if cfg.shared_expert_gate and cfg.num_shared_experts == 0:
        raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")


def _check_dropless(cfg: MoEConfig) -> None:
    """block_size > 0; the row ceiling (max_rows_per_rank > 0, max_rows_factor >= 1) only
    on dropless token choice."""
    if cfg.block_size is not None:
        check_positive_int("block_size", cfg.block_size)
    if cfg.max_rows_per_rank is not None:
        check_positive_int("max_rows_per_rank", cfg.max_rows_per_rank)
    if cfg.max_rows_factor is not None and not (
        _is_real(cfg.max_rows_factor)
        and math.isfinite(cfg.max_rows_factor)
        and cfg.max_rows_factor >= 1
    ):
        raise ValueError(
            "max_rows_factor must be a finite number >= 1 (a multiple of the balanced "
            f"load), or None; got {cfg.max_rows_factor!r}"
        )
    if cfg.row_cap_enabled and not cfg.dropless:
        raise ValueError(
            "max_rows_per_rank/max_rows_factor apply only to dropless token choice "
            "(router_type='topk', capacity_factor=None), got "
            f"router_type={cfg.router_type!r}, capacity_factor={cfg.capacity_factor!r}"
        )


def _check_overlap(cfg: MoEConfig) -> None:
    """shared_expert_overlap needs shared experts; overlap_chunks > 1 excludes static
    sizes and row ceilings (they would apply per chunk)."""
    if cfg.shared_expert_overlap and cfg.num_shared_experts == 0:
        raise ValueError("shared_expert_overlap=True needs num_shared_experts >= 1")
    check_positive_int("overlap_chunks", cfg.overlap_chunks)
    if cfg.overlap_chunks > 1:
        for name in ("pad_to_capacity", "max_rows_per_rank", "max_rows_factor"):
            if getattr(cfg, name) not in (None, False):
                raise ValueError(
                    f"overlap_chunks={cfg.overlap_chunks} cannot be combined with {name} "
                    f"(the chunks' rows are dispatched separately: a per-forward static size "
                    f"or row ceiling would apply per chunk); use overlap_chunks=1"
                )


def _check_top_p(cfg: MoEConfig) -> None:
    """top_p in (0, 1], on softmax-before-top-k token choice, without the options that
    change selection or weights (expert bias, groups, input scaling, weight scaling)."""
    if cfg.top_p is None:
        return
    if not (_is_real(cfg.top_p) and 0 < cfg.top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], or None for top-k; got "
                         f"{cfg.top_p!r}")
    if (cfg.router_type != "topk" or cfg.score_function != "softmax"
            or not cfg.softmax_before_topk):
        raise ValueError(
            "top_p needs router_type='topk', score_function='softmax' and "
            "softmax_before_topk=True (it accumulates the softmax probabilities), got "
            f"{cfg.router_type!r}, {cfg.score_function!r}, {cfg.softmax_before_topk}")
    for name in ("expert_bias", "num_groups", "scale_expert_input"):
        if getattr(cfg, name) not in (None, False):
            raise ValueError(f"top_p cannot be combined with {name}")
    if cfg.routed_scaling_factor != 1.0:
        raise ValueError("top_p needs routed_scaling_factor=1.0")
    if cfg.norm_topk_prob:
        warnings.warn(
            "top_p with norm_topk_prob=True: a token that keeps one expert gets the combine "
            "weight 1 and sends the router no gradient from the main loss (top_k=1 with "
            "norm_topk_prob=True is refused for this reason); leave norm_topk_prob None to "
            "weight by the probabilities themselves", UserWarning, stacklevel=3)


def _check_dynamic_capacity(cfg: MoEConfig) -> None:
    """dynamic_capacity: token choice with a starting capacity_factor inside
    [capacity_factor_min, capacity_factor_max]; the schedule's rates in (0, 1)."""
    if not cfg.dynamic_capacity:
        return
    if cfg.router_type != "topk" or cfg.capacity_factor is None:
        raise ValueError("dynamic_capacity=True needs router_type='topk' and a "
                         "capacity_factor (its starting value)")
    for name in ("target_drop_rate", "capacity_update_rate"):
        value = getattr(cfg, name)
        if not (_is_real(value) and 0 < value < 1):
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    lo, hi = cfg.capacity_factor_min, cfg.capacity_factor_max
    if not (_is_real(lo) and _is_real(hi) and 0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"capacity_factor_min/capacity_factor_max must satisfy 0 < min <= "
                         f"max < inf, got {lo!r}, {hi!r}")
    if not lo <= cfg.capacity_factor <= hi:
        raise ValueError(f"capacity_factor {cfg.capacity_factor} must lie in "
                         f"[capacity_factor_min, capacity_factor_max] = [{lo}, {hi}]")


def forced_groups_per_token(num_experts: int, top_k: int, num_groups: int) -> int:
    """The most expert groups any token spans under ``force_balance``: token t takes experts
    ``(t·k + j) mod E``, j < k, whose first one runs over the multiples of gcd(k, E); groups
    are E / num_groups consecutive experts."""
    E, k, per_group = num_experts, top_k, num_experts // num_groups
    return max(len({((s + j) % E) // per_group for j in range(k)})
               for s in range(0, E, math.gcd(k, E)))


def _check_force_balance(cfg: MoEConfig) -> None:
    """force_balance: token choice with a fixed top_k (no top_p); with group-limited routing
    the forced experts of every token lie in at most group_topk groups."""
    if not cfg.force_balance:
        return
    if cfg.router_type != "topk":
        raise ValueError(
            "force_balance=True applies only to router_type='topk' (with "
            f"router_type={cfg.router_type!r} every expert already takes the same number of "
            "tokens)")
    if cfg.top_p is not None:
        raise ValueError(
            f"force_balance=True cannot be combined with top_p={cfg.top_p!r}: forced balance "
            "gives every token exactly top_k experts, top_p a data-dependent number; set "
            "top_p=None")
    if cfg.num_groups is not None:
        spanned = forced_groups_per_token(cfg.num_experts, cfg.top_k, cfg.num_groups)
        if spanned > cfg.group_topk:
            raise ValueError(
                f"force_balance=True with num_groups={cfg.num_groups}, "
                f"group_topk={cfg.group_topk}: the forced experts (t*top_k + j) mod "
                f"num_experts of some token span {spanned} groups, more than group_topk "
                f"allows; raise group_topk to >= {spanned} or leave num_groups/group_topk None")


# The rules, in the order validate applies them.
_CHECKS = (
    _check_sizes,
    _check_choices,
    _check_router_weights,
    _check_capacity,
    _check_router_noise,
    _check_expert_dropout,
    _check_group_limited,
    _check_losses,
    _check_expert_choice,
    _check_numerics,
    _check_shared_experts,
    _check_dropless,
    _check_overlap,
    _check_top_p,
    _check_dynamic_capacity,
    _check_force_balance,
)
