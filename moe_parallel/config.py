"""MoEConfig: every knob of an MoE layer, validated in one place at construction.

Field names follow Megatron-Core's ``moe_*`` arguments where one exists, without the prefix.
Every invalid value raises ``ValueError`` naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from .ops import GROUPED_GEMM_BACKENDS

Activation = Literal["swiglu", "clamped_swiglu", "gelu", "relu"]
RouterType = Literal["topk", "expert_choice"]
ScoreFunction = Literal["softmax", "sigmoid"]
GroupScore = Literal["sum_topk", "sum_top2", "max"]
DropPolicy = Literal["probs", "position", "k_major", "batch_priority"]
DispatcherType = Literal["alltoall", "alltoall_hierarchical", "allgather"]
ExpertImpl = Literal["block_sparse", "grouped"]
RowOverflow = Literal["error", "capacity"]

# The allowed values of each choice field: one definition, the Literal above.
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
ROUTER_TYPES: tuple[str, ...] = get_args(RouterType)
SCORE_FUNCTIONS: tuple[str, ...] = get_args(ScoreFunction)
GROUP_SCORES: tuple[str, ...] = get_args(GroupScore)
DROP_POLICIES: tuple[str, ...] = get_args(DropPolicy)
DISPATCHERS: tuple[str, ...] = get_args(DispatcherType)
EXPERT_IMPLS: tuple[str, ...] = get_args(ExpertImpl)
ROW_OVERFLOWS: tuple[str, ...] = get_args(RowOverflow)
_ROUTER_DTYPES = (None, torch.float32, torch.float64)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_BOOL_FIELDS = (
    "softmax_before_topk",
    "noisy_gating",
    "expert_bias",
    "pad_to_capacity",
    "shared_expert_gate",
    "check_finite",
    "router_bias",
    "expert_proj_bias",
    "scale_expert_input",
    "shared_expert_overlap",
    "dynamic_capacity",
)


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer.

    Routing (token choice, ``router_type="topk"``):
      logits = x W_r (+ b_r with ``router_bias``: a learned bias that enters selection and
      weights, GPT-OSS), in ``router_dtype`` (x and W_r cast to it; Megatron's
      ``moe_router_dtype``; None: float32, float64 when ``params_dtype`` is float64); in
      training with ``noisy_gating`` logits += N(0,1)·softplus(x W_noise). The scores and
      everything after them are computed in ``router_score_dtype`` from the logits (None: the
      router dtype; Hugging Face's Mixtral/Qwen/OLMoE/Llama-4 blocks use float32 scores from
      model-dtype logits). ``jitter_noise = ε > 0`` multiplies, in training, the layer's input
      by U(1 - ε, 1 + ε) before routing and experts (Mixtral's ``router_jitter_noise``).
      ``score_function="softmax"``: with ``softmax_before_topk`` probs = topk(softmax(logits)),
      renormalised to sum 1 when ``norm_topk_prob``; else probs = softmax(topk(logits)).
      ``score_function="sigmoid"``: scores = sigmoid(logits), probs = topk(scores), renormalised
      when ``norm_topk_prob``. ``norm_topk_prob=None`` (the default) renormalises when
      ``top_k > 1``; with ``top_k=1`` a renormalised (or post-softmax) weight is always 1 and the
      router would learn nothing from the main loss, so that combination is refused and the
      top-1 weight is the score itself (Switch: p = softmax(logits)[top-1]). Selection may add
      a per-expert bias (``expert_bias``) that never enters the weights;
      ``num_groups``/``group_topk`` restrict selection to the ``group_topk`` best groups,
      a group scored (``group_score``) by the sum of its ``top_k // group_topk`` best
      selection scores (``"sum_topk"``, Megatron-Core), of its 2 best (``"sum_top2"``,
      DeepSeek-V3) or by its best (``"max"``, DeepSeek-V2 ``group_limited_greedy``). probs are
      finally multiplied by ``routed_scaling_factor``. With ``scale_expert_input`` (Llama-4)
      the weight multiplies each expert's input instead of its output:
      y = Σ_j expert_j(probs_j · x).
    Dynamic-k routing (``top_p``, Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
      Routing in MoE Models"): with P = softmax(logits) sorted descending, token t takes the
      experts in that order until their cumulative probability reaches p, at most ``top_k``:
      k_t = min(top_k, min{j : Σ_{i<=j} P_(i) >= p}); slot j is kept iff Σ_{i<j} P_(i) < p.
      The weights are the probabilities themselves (the paper), renormalised over the k_t
      selected ones with ``norm_topk_prob=True``. Needs softmax scores taken before the
      selection; not with expert bias or group-limited routing. ``dynamic_loss_coeff``
      adds the paper's dynamic (entropy) loss ``coeff·mean_t(-Σ_e P_te log P_te)``, which
      pushes the router towards confident, fewer-expert choices; with top-p the Switch loss
      normalises by the assignments taken: f_i = count_i / Σ_e count_e.
    Routing (expert choice): scores = softmax(logits) over experts; expert e takes its
      top-C tokens, C = min(T, ceil(T·top_k/E·capacity_factor)) (capacity_factor None means 1.0).
      The aux losses, ``min_capacity``, ``routed_scaling_factor``, noisy gating, expert bias and
      ``pad_to_capacity`` do not apply to it and must keep their defaults.
    Capacity (token choice): C = max(ceil(T·top_k/E·capacity_factor), min_capacity) per expert;
      ``capacity_factor=None`` is dropless. In eval mode (``module.eval()``) the factor is
      ``eval_capacity_factor`` when set (DeepSpeed's knob; e.g. 2.0 to drop less at eval), for
      expert choice too. Which assignments an expert over capacity keeps (``drop_policy``):
      ``"probs"`` its highest combine weights, ``"position"`` its earliest tokens,
      ``"k_major"`` (GShard) every token's first choice before any second choice, tokens in
      order within a choice rank, ``"batch_priority"`` (V-MoE's Batch Prioritized Routing) the
      same choice-rank order with the tokens sorted by their top combine weight, descending.
      With ``dynamic_capacity`` the training factor follows the drops measured over the
      ranks (``update_capacity_factors`` after each step; ``routing.capacity``): raised by
      ``capacity_update_rate`` when the drop rate exceeds ``target_drop_rate``, lowered when
      it is below half of it and more than that share of the slots idled, within
      [``capacity_factor_min``, ``capacity_factor_max``]; it starts at ``capacity_factor``.
    Losses: Switch aux loss ``aux_loss_coeff·E·Σ_i f_i P_i``; per-sequence aux loss
      ``seq_aux_loss_coeff`` (same formula per sequence, averaged); z-loss
      ``z_loss_coeff·mean_t(logsumexp(logits_t)^2)``.
    Experts: ``activation`` ``"swiglu"`` silu(gate)·up; ``"clamped_swiglu"`` (GPT-OSS)
      (min(up, L) clamped to [-L, L] + 1)·g·sigmoid(α·g) with g = min(gate, L),
      ``α = swiglu_alpha``, ``L = swiglu_limit``; ``"gelu"``; ``"relu"``. ``expert_proj_bias``
      adds a learned bias to both expert projections (GPT-OSS; not with
      expert-tensor parallelism).
    Expert computation (``expert_impl``), the same result either way: ``"grouped"`` (default:
      grouped GEMM on the unpadded, ragged groups) or ``"block_sparse"`` (MegaBlocks-style:
      each local expert's rows padded to a multiple of ``block_size``, first GEMM as a sampled
      dense-dense block product, second as a dense-sparse one; at most
      ``E_local·(block_size-1)`` padding rows). The block-sparse kernels run one GEMM per
      expert panel plus copies between panel and block layout, so they do the grouped GEMM's
      work and more; measured on CPU (``python -m benchmarks layer``) the grouped layer step is
      1.04-1.29x faster, hence the default.
      ``block_size=None`` picks 128 on CUDA and 32 on CPU, halved until it divides the local
      ffn size (``ffn_hidden_size / etp``); an explicit value must divide it.
      ``grouped_gemm_backend`` (``expert_impl="grouped"``) picks the grouped GEMM
      implementation, same formula: ``"auto"`` (default: for bfloat16 on sm_90+ with at least
      16 groups ``"torch"``, its wgrad ``"cutlass"`` where the Hopper kernels run; else
      ``"loop"``) or ``"loop"`` on any device; ``"streams"``,
      ``"cublas"``, ``"torch"`` (bfloat16) or ``"cutlass"`` (bfloat16) on CUDA only
      (``ops.grouped_gemm``).
    Bounded memory in dropless mode: the rows a rank's experts receive per forward may be
      capped by ``max_rows_per_rank`` and/or ``max_rows_factor`` (times the balanced load,
      ``top_k·Σ tokens / ep`` over the rank's ETP×EP group). Over the cap, ``row_overflow=
      "error"`` raises ``RuntimeError`` on every rank of the group (naming the load and the
      knob); ``"capacity"`` drops the excess for that forward, as capacity mode would, and
      reports it in ``RoutingStats.overflow``.
    Dispatch across processes (``token_dispatcher_type``): ``"alltoall"`` sends each token copy
      to the EP rank of its expert; ``"alltoall_hierarchical"`` does the same in two stages,
      inside each node then one message per node pair across nodes (nodes: ``ParallelState``'s
      ``ranks_per_node``; same results bitwise); ``"allgather"`` gathers the ETP×EP group's
      tokens on every rank (for TP-heavy layouts or large top_k).
    Overlap of communication with compute (results unchanged): ``shared_expert_overlap``
      computes the shared experts while the dispatch exchange is in flight (an asynchronous
      collective: gloo's worker threads on CPU, NCCL's stream on GPU; on GPU the shared
      experts run on a side CUDA stream); ``overlap_chunks = n``
      (Tutel's overlap degree) splits this rank's routed tokens into ``n`` consecutive chunks,
      dispatched separately, so chunk ``i``'s expert GEMMs run while chunk ``i + 1``'s
      dispatch and chunk ``i - 1``'s combine are in flight (not with ``pad_to_capacity`` or a
      row ceiling; the backward runs the chunks' exchanges one after another).
    Non-finite input: with ``check_finite`` (default) a NaN/Inf in the router logits raises
      ``FloatingPointError`` (on every rank of an expert-parallel layer's ETP×EP group together:
      one small all-gather per forward shares the verdict); without it NaN propagates.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    activation: Activation = "swiglu"

    router_type: RouterType = "topk"
    score_function: ScoreFunction = "softmax"
    softmax_before_topk: bool = True
    norm_topk_prob: Optional[bool] = None
    noisy_gating: bool = False
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    routed_scaling_factor: float = 1.0
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    group_score: GroupScore = "sum_topk"
    router_bias: bool = False
    router_dtype: Optional[torch.dtype] = None
    router_score_dtype: Optional[torch.dtype] = None
    jitter_noise: float = 0.0
    scale_expert_input: bool = False

    aux_loss_coeff: float = 0.0
    seq_aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0

    top_p: Optional[float] = None
    dynamic_loss_coeff: float = 0.0

    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    dynamic_capacity: bool = False
    target_drop_rate: float = 0.01
    capacity_factor_min: float = 1.0
    capacity_factor_max: float = 4.0
    capacity_update_rate: float = 0.1
    min_capacity: int = 0
    drop_policy: DropPolicy = "probs"
    pad_to_capacity: bool = False

    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_proj_bias: bool = False

    num_shared_experts: int = 0
    shared_expert_ffn_hidden_size: Optional[int] = None
    shared_expert_gate: bool = False

    params_dtype: torch.dtype = torch.float32
    init_std: float = 0.02
    check_finite: bool = True
    token_dispatcher_type: DispatcherType = "alltoall"
    shared_expert_overlap: bool = False
    overlap_chunks: int = 1

    expert_impl: ExpertImpl = "grouped"
    grouped_gemm_backend: str = "auto"
    block_size: Optional[int] = None
    max_rows_per_rank: Optional[int] = None
    max_rows_factor: Optional[float] = None
    row_overflow: RowOverflow = "error"

    def __post_init__(self) -> None:
        _positive_int("hidden_size", self.hidden_size)
        _positive_int("ffn_hidden_size", self.ffn_hidden_size)
        _positive_int("num_experts", self.num_experts)
        _positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k must be <= num_experts ({self.num_experts}), got top_k={self.top_k}"
            )
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("router_type", self.router_type, ROUTER_TYPES)
        _choice("score_function", self.score_function, SCORE_FUNCTIONS)
        _choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _choice("token_dispatcher_type", self.token_dispatcher_type, DISPATCHERS)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise ValueError(
                f"norm_topk_prob must be a bool or None (renormalise when top_k > 1), got "
                f"{self.norm_topk_prob!r}"
            )
        if self.router_type == "topk" and self.top_k == 1:
            if self.norm_topk_prob:
                raise ValueError(
                    "norm_topk_prob=True with top_k=1 makes every combine weight 1, so the router "
                    "gets no gradient from the main loss; set norm_topk_prob=False (Switch: "
                    "p = softmax(logits)[top-1]) or leave it None"
                )
            if self.score_function == "softmax" and not self.softmax_before_topk:
                raise ValueError(
                    "softmax_before_topk=False with top_k=1 is a softmax over the one selected "
                    "logit: every combine weight is 1 and the router gets no gradient from the "
                    "main loss; set softmax_before_topk=True"
                )
        if self.capacity_factor is not None and not (
            _is_real(self.capacity_factor)
            and math.isfinite(self.capacity_factor)
            and self.capacity_factor > 0
        ):
            raise ValueError(
                "capacity_factor must be a number > 0, or None for dropless; "
                f"got {self.capacity_factor!r}"
            )
        if self.eval_capacity_factor is not None:
            if not (_is_real(self.eval_capacity_factor)
                    and math.isfinite(self.eval_capacity_factor)
                    and self.eval_capacity_factor > 0):
                raise ValueError(
                    "eval_capacity_factor must be a number > 0, or None for capacity_factor; "
                    f"got {self.eval_capacity_factor!r}"
                )
            if self.router_type == "topk" and self.capacity_factor is None:
                raise ValueError(
                    "eval_capacity_factor needs capacity_factor to be set: a dropless layer "
                    "(capacity_factor=None) has no capacity to change in eval"
                )
        _nonneg_int("min_capacity", self.min_capacity)
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity=True needs capacity_factor to be set (it is None)")
        if self.score_function == "sigmoid" and not self.softmax_before_topk:
            raise ValueError("softmax_before_topk=False applies only to score_function='softmax'")
        if self.noisy_gating and self.score_function != "softmax":
            raise ValueError("noisy_gating requires score_function='softmax'")
        _nonneg_float("bias_update_rate", self.bias_update_rate)
        if not (
            _is_real(self.routed_scaling_factor)
            and math.isfinite(self.routed_scaling_factor)
            and self.routed_scaling_factor > 0
        ):
            raise ValueError(
                f"routed_scaling_factor must be a finite number > 0, "
                f"got {self.routed_scaling_factor!r}"
            )
        if (self.num_groups is None) != (self.group_topk is None):
            raise ValueError(
                "num_groups and group_topk must be set together "
                f"(got num_groups={self.num_groups}, group_topk={self.group_topk})"
            )
        if self.num_groups is not None:
            _positive_int("num_groups", self.num_groups)
            _positive_int("group_topk", self.group_topk)
            if self.num_experts % self.num_groups:
                raise ValueError(
                    f"num_experts ({self.num_experts}) must be divisible by "
                    f"num_groups ({self.num_groups})"
                )
            if self.group_topk > self.num_groups:
                raise ValueError(
                    f"group_topk ({self.group_topk}) must be <= num_groups ({self.num_groups})"
                )
            _choice("group_score", self.group_score, GROUP_SCORES)
            if self.group_score == "sum_topk" and self.top_k % self.group_topk:
                raise ValueError(
                    f"top_k ({self.top_k}) must be divisible by group_topk ({self.group_topk}) "
                    "with group_score='sum_topk' (each group scored by its top_k // group_topk "
                    "best); group_score='sum_top2' or 'max' take any top_k"
                )
            if self.group_score == "sum_top2" and self.num_experts // self.num_groups < 2:
                raise ValueError(
                    f"group_score='sum_top2' needs at least 2 experts per group, got "
                    f"{self.num_experts // self.num_groups}"
                )
            if self.top_k > self.group_topk * (self.num_experts // self.num_groups):
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the experts in group_topk "
                    f"({self.group_topk}) groups of {self.num_experts // self.num_groups}"
                )
            if self.router_type != "topk":
                raise ValueError("num_groups/group_topk apply only to router_type='topk'")
        for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff"):
            _nonneg_float(name, getattr(self, name))
        if self.router_type == "expert_choice":
            for name in ("noisy_gating", "expert_bias", "pad_to_capacity"):
                if getattr(self, name):
                    raise ValueError(f"{name} is not supported with router_type='expert_choice'")
            for name in ("aux_loss_coeff", "seq_aux_loss_coeff"):
                if getattr(self, name) > 0:
                    raise ValueError(
                        f"{name} must be 0 with router_type='expert_choice' (every expert "
                        f"takes the same number of tokens), got {getattr(self, name)}"
                    )
            if self.min_capacity:
                raise ValueError(
                    "min_capacity applies only to router_type='topk' (expert choice uses "
                    f"C = min(T, ceil(T*top_k/E*capacity_factor))), got {self.min_capacity}"
                )
            if self.routed_scaling_factor != 1.0:
                raise ValueError(
                    "routed_scaling_factor must be 1.0 with router_type='expert_choice', "
                    f"got {self.routed_scaling_factor}"
                )
            if self.score_function != "softmax":
                raise ValueError("router_type='expert_choice' requires score_function='softmax'")
        self._check_hf_semantics()
        _nonneg_int("num_shared_experts", self.num_shared_experts)
        if self.shared_expert_ffn_hidden_size is not None:
            _positive_int("shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size)
            if self.num_shared_experts == 0:
                raise ValueError("shared_expert_ffn_hidden_size needs num_shared_experts >= 1")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
        self._check_dropless()
        self._check_overlap()
        self._check_dynamic_routing()
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"params_dtype must be one of {_DTYPES}, got {self.params_dtype}")
        if not (_is_real(self.init_std) and math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std!r}")

    def _check_dynamic_routing(self) -> None:
        _nonneg_float("dynamic_loss_coeff", self.dynamic_loss_coeff)
        if self.dynamic_loss_coeff > 0 and self.score_function != "softmax":
            raise ValueError("dynamic_loss_coeff > 0 needs score_function='softmax' (the entropy "
                             "of the router's distribution)")
        if self.top_p is not None:
            if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
                raise ValueError(f"top_p must be a number in (0, 1], or None for top-k; got "
                                 f"{self.top_p!r}")
            if (self.router_type != "topk" or self.score_function != "softmax"
                    or not self.softmax_before_topk):
                raise ValueError(
                    "top_p needs router_type='topk', score_function='softmax' and "
                    "softmax_before_topk=True (it accumulates the softmax probabilities), got "
                    f"{self.router_type!r}, {self.score_function!r}, {self.softmax_before_topk}")
            for name in ("expert_bias", "num_groups", "scale_expert_input"):
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"top_p cannot be combined with {name}")
            if self.routed_scaling_factor != 1.0:
                raise ValueError("top_p needs routed_scaling_factor=1.0")
        if self.drop_policy in ("k_major", "batch_priority") and self.router_type != "topk":
            raise ValueError(f"drop_policy={self.drop_policy!r} applies only to "
                             "router_type='topk'")
        if not self.dynamic_capacity:
            return
        if self.router_type != "topk" or self.capacity_factor is None:
            raise ValueError("dynamic_capacity=True needs router_type='topk' and a "
                             "capacity_factor (its starting value)")
        if not (_is_real(self.target_drop_rate) and 0 < self.target_drop_rate < 1):
            raise ValueError(f"target_drop_rate must be in (0, 1), got {self.target_drop_rate!r}")
        if not (_is_real(self.capacity_update_rate) and 0 < self.capacity_update_rate < 1):
            raise ValueError("capacity_update_rate must be in (0, 1), got "
                             f"{self.capacity_update_rate!r}")
        lo, hi = self.capacity_factor_min, self.capacity_factor_max
        if not (_is_real(lo) and _is_real(hi) and 0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"capacity_factor_min/capacity_factor_max must satisfy 0 < min <= "
                             f"max < inf, got {lo!r}, {hi!r}")
        if not lo <= self.capacity_factor <= hi:
            raise ValueError(f"capacity_factor {self.capacity_factor} must lie in "
                             f"[capacity_factor_min, capacity_factor_max] = [{lo}, {hi}]")

    def _check_overlap(self) -> None:
        if self.shared_expert_overlap and self.num_shared_experts == 0:
            raise ValueError("shared_expert_overlap=True needs num_shared_experts >= 1")
        _positive_int("overlap_chunks", self.overlap_chunks)
        if self.overlap_chunks > 1:
            for name in ("pad_to_capacity", "max_rows_per_rank", "max_rows_factor"):
                if getattr(self, name) not in (None, False):
                    raise ValueError(
                        f"overlap_chunks={self.overlap_chunks} cannot be combined with {name} "
                        f"(the chunks' rows are dispatched separately: a per-forward static size "
                        f"or row ceiling would apply per chunk); use overlap_chunks=1"
                    )

    def _check_hf_semantics(self) -> None:
        """The routing and expert variants of the Hugging Face model families."""
        if self.group_score != "sum_topk":
            _choice("group_score", self.group_score, GROUP_SCORES)
            if self.num_groups is None:
                raise ValueError(f"group_score={self.group_score!r} needs num_groups/group_topk")
        for name in ("router_dtype", "router_score_dtype"):
            if getattr(self, name) not in _ROUTER_DTYPES:
                raise ValueError(f"{name} must be one of (None, torch.float32, torch.float64), "
                                 f"got {getattr(self, name)!r}")
        if not (_is_real(self.jitter_noise) and 0 <= self.jitter_noise < 1):
            raise ValueError(f"jitter_noise must be a number in [0, 1), got {self.jitter_noise!r}")
        for name in ("swiglu_alpha", "swiglu_limit"):
            v = getattr(self, name)
            if not (_is_real(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.router_type == "expert_choice":
            for name in ("router_bias", "scale_expert_input"):
                if getattr(self, name):
                    raise ValueError(f"{name} is not supported with router_type='expert_choice'")

    def _check_dropless(self) -> None:
        _choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        _choice("grouped_gemm_backend", self.grouped_gemm_backend, GROUPED_GEMM_BACKENDS)
        _choice("row_overflow", self.row_overflow, ROW_OVERFLOWS)
        if self.block_size is not None:
            _positive_int("block_size", self.block_size)
        if self.max_rows_per_rank is not None:
            _positive_int("max_rows_per_rank", self.max_rows_per_rank)
        if self.max_rows_factor is not None and not (
            _is_real(self.max_rows_factor)
            and math.isfinite(self.max_rows_factor)
            and self.max_rows_factor >= 1
        ):
            raise ValueError(
                "max_rows_factor must be a finite number >= 1 (a multiple of the balanced "
                f"load), or None; got {self.max_rows_factor!r}"
            )
        if self.row_cap_enabled and not self.dropless:
            raise ValueError(
                "max_rows_per_rank/max_rows_factor apply only to dropless token choice "
                "(router_type='topk', capacity_factor=None), got "
                f"router_type={self.router_type!r}, capacity_factor={self.capacity_factor!r}"
            )

    def capacity_factor_in(self, training: bool) -> Optional[float]:
        """The capacity factor of a training (``capacity_factor``) or an eval forward
        (``eval_capacity_factor``, when set)."""
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    @property
    def renormalize_topk(self) -> bool:
        """Whether the top-k weights are divided by their sum: ``norm_topk_prob``, or, when it
        is None, ``top_k > 1`` (Mixtral/Qwen renormalise top-2; Switch keeps the top-1 score)."""
        if self.norm_topk_prob is None:
            return self.top_k > 1 and self.top_p is None
        return self.norm_topk_prob

    @property
    def dropless(self) -> bool:
        """True for token choice without capacity: every assignment reaches its expert."""
        return self.router_type == "topk" and self.capacity_factor is None

    @property
    def row_cap_enabled(self) -> bool:
        """True when a ceiling on rows per rank is configured."""
        return self.max_rows_per_rank is not None or self.max_rows_factor is not None

    @property
    def shared_ffn_size(self) -> int:
        """Hidden size of the (merged) shared expert FFN; 0 when there is none."""
        if self.num_shared_experts == 0:
            return 0
        if self.shared_expert_ffn_hidden_size is not None:
            return self.shared_expert_ffn_hidden_size
        return self.num_shared_experts * self.ffn_hidden_size

    @property
    def gated(self) -> bool:
        """True when the first expert GEMM produces two halves (gate | up: the SwiGLUs)."""
        return self.activation in ("swiglu", "clamped_swiglu")

    def replace(self, **changes) -> MoEConfig:
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nonneg_float(name: str, value) -> None:
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _nonneg_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
