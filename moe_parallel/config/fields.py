"""The fields of ``MoEConfig``, each documented under it (meaning, unit, default, and the
Megatron-Core / DeepSpeed / Hugging Face option it corresponds to), and the values derived
from them. ``MoEConfig`` (``config/__init__.py``) adds the validation (``config/validation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import choices


@dataclass(frozen=True)
class MoEConfigFields:
    """The fields of ``MoEConfig`` (one MoE layer); each field's docstring says what it sets.

    Token-choice routing (``router_type="topk"``), in four stages:
      logits = x W_r (+ b_r with ``router_bias``) in the router dtype (``router_dtype``), plus
      N(0,1)·softplus(x W_noise) in training with ``noisy_gating``; scores in
      ``router_score_dtype``: softmax(logits) (``softmax_before_topk``), the logits themselves
      (softmax, not ``softmax_before_topk``) or sigmoid(logits); selection: the ``top_k``
      experts of highest score + b (b: ``expert_bias``, selection only), among the
      ``group_topk`` best of ``num_groups`` groups when set (``group_score``); weights:
      probs = scores[selected], renormalised to sum 1 when ``renormalize_topk``
      (``norm_topk_prob``), or softmax(logits[selected]) without ``softmax_before_topk``;
      probs *= ``routed_scaling_factor``. The layer output is y = Σ_j probs_j · expert_j(x), or
      y = Σ_j expert_j(probs_j · x) with ``scale_expert_input``.
    Dynamic-k routing (``top_p``, Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
      Routing in MoE Models"): with P = softmax(logits) sorted descending, token t takes the
      experts in that order until their cumulative probability reaches p, at most ``top_k``:
      k_t = min(top_k, min{j : Σ_{i<=j} P_(i) >= p}); slot j is kept iff Σ_{i<j} P_(i) < p.
      The weights are the probabilities themselves (the paper), renormalised over the k_t
      selected ones with ``norm_topk_prob=True``.
    Forced balance (``force_balance``): the selection ignores the scores; token t (its index
      among this rank's tokens) takes experts (t·top_k + j) mod E, j < top_k; the weights are
      computed from the scores at those experts as above.
    Expert-choice routing (``router_type="expert_choice"``): scores = softmax(logits) over
      experts; expert e takes its top-C tokens, C = min(T, ceil(T·top_k/E·capacity_factor))
      (capacity_factor None means 1.0).
    Capacity (token choice): C = max(ceil(T·top_k/E·capacity_factor), min_capacity)
      assignments per expert; ``capacity_factor=None`` is dropless. In eval mode the factor is
      ``eval_capacity_factor`` when set, for expert choice too. ``drop_policy`` picks which
      assignments an expert over capacity keeps.
    Dynamic capacity (``dynamic_capacity``): the training factor starts at ``capacity_factor``
      and follows the drops measured over the ranks (``update_capacity_factors`` after each
      step; ``routing.capacity``): raised by ``capacity_update_rate`` when the drop rate exceeds
      ``target_drop_rate``, lowered when it is below half of it and more than that share of the
      slots idled, within [``capacity_factor_min``, ``capacity_factor_max``].
    Losses (f_i: the share of the assignments routed to expert i, P_i: the mean router
      probability of expert i): Switch aux loss ``aux_loss_coeff·E·Σ_i f_i P_i``; per-sequence
      aux loss ``seq_aux_loss_coeff`` (same formula per sequence, averaged); z-loss
      ``z_loss_coeff·mean_t(logsumexp(logits_t)^2)``; dynamic (entropy) loss
      ``dynamic_loss_coeff·mean_t(-Σ_e P_te log P_te)``. With top-p the Switch loss normalises
      by the assignments taken: f_i = count_i / Σ_e count_e.
    Bounded memory in dropless mode: the rows a rank's experts receive per forward may be
      capped by ``max_rows_per_rank`` and/or ``max_rows_factor`` (times the balanced load,
      ``top_k·Σ tokens / ep`` over the rank's ETP×EP group); ``row_overflow`` says what
      happens over the cap.
    """

    hidden_size: int
    """Model width H: the size of each token's input and output vector. Megatron
    ``hidden_size``; DeepSpeed ``hidden_size``; HF ``hidden_size``."""
    ffn_hidden_size: int
    """Hidden width F of each routed expert's FFN. Megatron ``moe_ffn_hidden_size``
    (``ffn_hidden_size`` when None); HF ``moe_intermediate_size`` (Qwen, OLMoE, DeepSeek),
    else ``intermediate_size``."""
    num_experts: int
    """Routed experts E. Megatron ``num_moe_experts``; DeepSpeed ``num_experts``; HF
    ``num_local_experts`` (Mixtral, GPT-OSS, Llama-4), ``num_experts`` (Qwen, OLMoE),
    ``n_routed_experts`` (DeepSeek)."""
    top_k: int = 2
    """Experts per token k (token choice; with ``top_p``, the most a token may take; expert
    choice: the mean, each expert taking T·top_k/E·cf tokens); 1 <= top_k <= num_experts.
    Default 2.
    Megatron ``moe_router_topk``; DeepSpeed ``k``; HF ``num_experts_per_tok``."""
    activation: choices.Activation = "swiglu"
    """Expert activation: ``"swiglu"`` silu(gate)·up; ``"clamped_swiglu"`` (GPT-OSS)
    (min(up, L) clamped to [-L, L] + 1)·g·sigmoid(α·g) with g = min(gate, L),
    α = ``swiglu_alpha``, L = ``swiglu_limit``; ``"gelu"``; ``"relu"``. Default ``"swiglu"``.
    Megatron ``gated_linear_unit`` + ``activation_func`` (GLU + silu: swiglu; F.gelu; F.relu);
    HF ``hidden_act="silu"`` (SwiGLU), GPT-OSS's experts (clamped_swiglu)."""

    router_type: choices.RouterType = "topk"
    """``"topk"``: each token chooses its experts (token choice); ``"expert_choice"``: each
    expert chooses its tokens (no aux losses, ``min_capacity``, ``routed_scaling_factor``,
    noisy gating, expert bias, router bias, ``scale_expert_input`` or ``pad_to_capacity``).
    Default ``"topk"``. No Megatron, DeepSpeed or HF counterpart for expert choice."""
    score_function: choices.ScoreFunction = "softmax"
    """Router scores from the logits: ``"softmax"`` over the experts or ``"sigmoid"`` per
    expert. Default ``"softmax"``. Megatron ``moe_router_score_function``; HF: sigmoid for
    DeepSeek-V3 and Llama-4, softmax otherwise."""
    softmax_before_topk: bool = True
    """Softmax scores: True selects the top-k of softmax(logits) (weights: those
    probabilities); False selects the top-k logits and takes the softmax over them (weights
    sum to 1; refused with ``top_k=1``, where every weight would be 1 and the router would get
    no gradient from the main loss). Softmax only. Default True. Megatron
    ``moe_router_pre_softmax`` (softmax scores; True also sets ``norm_topk_prob=False``);
    HF GPT-OSS: False."""
    norm_topk_prob: Optional[bool] = None
    """Divide the selected weights by their sum (sigmoid: by sum + 1e-20). None (default):
    when ``top_k > 1`` and ``top_p`` is None (``renormalize_topk``). True is refused with
    ``top_k=1`` (every weight would be 1: the router would get no gradient from the main loss;
    None or False keep the Switch weight p = softmax(logits)[top-1]). With ``top_p`` only True
    renormalises, and then a token that keeps one expert gets the weight 1 and sends the
    router no gradient from the main loss (construction warns). Megatron: False with
    ``moe_router_pre_softmax=True``, else None; HF ``norm_topk_prob`` (Qwen, OLMoE,
    DeepSeek-V3; Mixtral: True; DeepSeek-V2 and Llama-4: False)."""
    noisy_gating: bool = False
    """In training, logits += N(0,1)·softplus(x W_noise) with a learned W_noise [E, H]
    (Shazeer et al. 2017). Softmax only; token choice only. Default False. No Megatron,
    DeepSpeed or HF counterpart."""
    expert_bias: bool = False
    """A per-expert bias b [E] added to the scores for selection only (never to the weights),
    updated by ``update_expert_bias`` (aux-loss-free balancing, DeepSeek-V3). Token choice
    only. Default False. Megatron ``moe_router_enable_expert_bias`` (sigmoid only); HF
    DeepSeek-V3's ``e_score_correction_bias``."""
    bias_update_rate: float = 1e-3
    """Step u of the expert-bias update b_i += u·sign(mean(c) - c_i), c_i the tokens routed to
    expert i; >= 0. Default 1e-3. Megatron ``moe_router_bias_update_rate``."""
    routed_scaling_factor: float = 1.0
    """Multiplies every combine weight; finite, > 0 (1.0 with expert choice and with
    ``top_p``). Default 1.0. Megatron ``moe_router_topk_scaling_factor`` (None: 1.0); HF
    ``routed_scaling_factor`` (DeepSeek-V2/V3)."""
    num_groups: Optional[int] = None
    """Expert groups G for group-limited selection (set with ``group_topk``; divides
    ``num_experts``); None: no groups. Token choice only; not with ``top_p``. Megatron
    ``moe_router_num_groups``; HF ``n_group`` (DeepSeek-V3, DeepSeek-V2's
    ``group_limited_greedy``)."""
    group_topk: Optional[int] = None
    """Groups M <= ``num_groups`` a token may select from: the M best groups by
    ``group_score``. Megatron ``moe_router_group_topk``; HF ``topk_group``."""
    group_score: choices.GroupScore = "sum_topk"
    """A group's score from its experts' selection scores (scores + b): ``"sum_topk"`` the
    sum of its ``top_k // group_topk`` best (Megatron-Core; ``top_k`` divisible by
    ``group_topk``), ``"sum_top2"`` the sum of its 2 best (DeepSeek-V3; at least 2 experts per
    group), ``"max"`` its best (DeepSeek-V2 ``group_limited_greedy``). Needs ``num_groups``
    unless ``"sum_topk"`` (the default)."""
    force_balance: bool = False
    """Replace the top-k selection by a fixed round-robin over the experts, for throughput and
    memory measurements at perfect balance: token t (its index in this rank's flattened tokens,
    whatever the router's scores) gets experts ``(t·top_k + j) mod E`` for j < top_k, distinct
    since top_k <= E. Expert e then receives ``floor(T·top_k/E) + (e < T·top_k mod E)`` of
    this rank's T tokens' assignments: exactly T·top_k/E when E divides T·top_k, else within 1
    of it (summed over R ranks, the experts' totals differ by at most R). The weights still
    come from the router: the scores of the assigned experts under ``score_function``,
    ``softmax_before_topk``, ``norm_topk_prob`` and ``routed_scaling_factor`` (the class
    docstring's weights), so the router weight gets a gradient from the main loss. The losses
    are computed as usual on the forced assignment: the balancing losses see
    f_i = count_i/(T·top_k), about 1/E (the Switch loss is then about ``aux_loss_coeff``, as
    Σ_i P_i = 1), the z-loss and entropy loss see the logits; the routed counts behind
    ``expert_bias`` are the balanced ones (the bias plays no part in the selection). Applies
    in training and eval. No expert drops with ``capacity_factor >= 1``. Token choice only;
    refused with ``top_p`` (a data-dependent number of experts per token) and with
    ``num_groups`` when some token's top_k consecutive experts span more than ``group_topk``
    groups. Default False. Megatron ``moe_router_force_load_balancing`` (which instead draws
    random logits: balanced in expectation only); MegaBlocks ``uniform_expert_assignment``
    (the same round-robin, weights of the unforced top-k)."""
    router_bias: bool = False
    """A learned router bias b_r [E]: logits = x W_r + b_r, entering selection and weights.
    Token choice only. Default False. HF GPT-OSS's router bias (Megatron: refused with
    ``add_bias_linear``)."""
    router_dtype: Optional[torch.dtype] = None
    """Dtype of the logits: x and W_r are cast to it; None, torch.float32 or torch.float64.
    None (default): float32, float64 when ``params_dtype`` is float64. Megatron
    ``moe_router_dtype`` (``"fp32"``, ``"fp64"``); HF DeepSeek-V2/V3: float32."""
    router_score_dtype: Optional[torch.dtype] = None
    """Dtype of the scores and of everything after them, cast from the logits; None,
    torch.float32 or torch.float64. None (default): the router dtype. HF Mixtral, Qwen,
    OLMoE and Llama-4: float32 scores from model-dtype logits."""
    jitter_noise: float = 0.0
    """ε in [0, 1): in training, the layer's input (to router and experts) is multiplied by
    U(1 - ε, 1 + ε). Default 0.0 (off). HF Mixtral ``router_jitter_noise``."""
    scale_expert_input: bool = False
    """The weight multiplies each expert's input instead of its output:
    y = Σ_j expert_j(probs_j · x). Token choice only; not with ``top_p``. Default False.
    Megatron ``moe_apply_probs_on_input``; HF Llama-4."""

    aux_loss_coeff: float = 0.0
    """Coefficient of the Switch load-balancing loss ``coeff·E·Σ_i f_i P_i``; >= 0, 0 with
    expert choice. Default 0.0 (off). Megatron ``moe_aux_loss_coeff`` with
    ``moe_router_load_balancing_type="aux_loss"`` (computed by ``MegatronLosses``); HF
    ``router_aux_loss_coef`` (computed by HF from the recorded logits)."""
    seq_aux_loss_coeff: float = 0.0
    """Coefficient of the per-sequence load-balancing loss (the Switch formula per sequence,
    averaged); >= 0, 0 with expert choice. Default 0.0. Megatron ``moe_aux_loss_coeff`` with
    ``moe_router_load_balancing_type="seq_aux_loss"`` (computed by ``MegatronLosses``)."""
    z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss ``coeff·mean_t(logsumexp(logits_t)^2)``; >= 0.
    Default 0.0. Megatron ``moe_z_loss_coeff`` (computed by ``MegatronLosses``)."""

    top_p: Optional[float] = None
    """Dynamic-k routing threshold p in (0, 1]: each token takes its best experts until their
    softmax probability reaches p, at most ``top_k`` (class docstring). None (default): plain
    top-k. Needs ``router_type="topk"``, ``score_function="softmax"`` and
    ``softmax_before_topk=True``; refused with ``expert_bias``, ``num_groups``,
    ``scale_expert_input`` and ``routed_scaling_factor != 1.0``. No Megatron, DeepSpeed or HF
    counterpart (Megatron's own balancing losses are refused with it)."""
    dynamic_loss_coeff: float = 0.0
    """Coefficient of the dynamic (entropy) loss ``coeff·mean_t(-Σ_e P_te log P_te)`` (Huang
    et al. 2024), which pushes the router towards confident, fewer-expert choices; >= 0, > 0
    needs softmax scores. Default 0.0."""

    capacity_factor: Optional[float] = None
    """Capacity factor cf of the capacity formula (class docstring); finite, > 0. None
    (default): dropless. Megatron ``moe_expert_capacity_factor`` (None: dropless); DeepSpeed
    ``capacity_factor`` (``drop_tokens=False``: None)."""
    eval_capacity_factor: Optional[float] = None
    """The capacity factor of eval-mode forwards (``module.eval()``), e.g. 2.0 to drop less at
    eval; finite, > 0; needs ``capacity_factor`` with token choice. None (default): the
    training factor. DeepSpeed ``eval_capacity_factor``."""
    dynamic_capacity: bool = False
    """The training capacity factor follows the measured drop rate (class docstring); needs
    token choice and ``capacity_factor`` (its starting value) within
    [``capacity_factor_min``, ``capacity_factor_max``]. Default False."""
    target_drop_rate: float = 0.01
    """Dynamic capacity: the drop rate (dropped / routed assignments) to stay under; in
    (0, 1). Default 0.01."""
    capacity_factor_min: float = 1.0
    """Dynamic capacity: the lowest factor; 0 < min <= ``capacity_factor_max``. Default 1.0."""
    capacity_factor_max: float = 4.0
    """Dynamic capacity: the highest factor; finite. Default 4.0."""
    capacity_update_rate: float = 0.1
    """Dynamic capacity: the relative step r (factor·(1 ± r)); in (0, 1). Default 0.1."""
    min_capacity: int = 0
    """Lower bound on the capacity C, in assignments per expert; >= 0, 0 with expert choice.
    Default 0. DeepSpeed ``min_capacity`` (its default is 4)."""
    drop_policy: choices.DropPolicy = "probs"
    """Which assignments an expert over capacity keeps: ``"probs"`` its highest combine
    weights, ``"position"`` its earliest tokens, ``"k_major"`` (GShard) every token's first
    choice before any second choice, tokens in order within a choice rank,
    ``"batch_priority"`` (V-MoE's Batch Prioritized Routing) the same choice-rank order with
    the tokens sorted by their top combine weight, descending (the last two: token choice
    only). Default ``"probs"``. Megatron ``moe_token_drop_policy`` (``"probs"``,
    ``"position"``)."""
    pad_to_capacity: bool = False
    """Pad every expert's input to exactly C rows (static shapes); needs ``capacity_factor``;
    token choice only. Default False. Megatron ``moe_pad_expert_input_to_capacity``."""
    static_exchange: bool = False
    """The all-to-all exchange of a padded capacity layer takes its splits from C alone: every
    rank sends every expert exactly C rows, so no counts are exchanged and nothing is read back
    to the host (static shapes end to end, for ``torch.compile`` and CUDA graphs; with
    ``verdict_scope="none"`` and ``check_finite=False`` a step makes no host read). Every rank
    of the stage must route the same number of tokens per forward (the verdict checks it; with
    ``verdict_scope="none"`` nothing does). Needs ``pad_to_capacity``,
    ``token_dispatcher_type="alltoall"``, no ``dynamic_capacity``. Default False."""

    swiglu_alpha: float = 1.702
    """α of ``"clamped_swiglu"``; finite, > 0. Default 1.702. HF GPT-OSS ``swiglu_alpha``."""
    swiglu_limit: float = 7.0
    """L of ``"clamped_swiglu"``; finite, > 0. Default 7.0. HF GPT-OSS ``swiglu_limit``."""
    expert_proj_bias: bool = False
    """A learned bias on both expert projections (GPT-OSS; not with expert-tensor
    parallelism). Default False. HF GPT-OSS's expert biases."""

    num_shared_experts: int = 0
    """Shared experts every token passes through, merged into one FFN of width
    ``shared_ffn_size``; >= 0. Default 0. Megatron: 1 when
    ``moe_shared_expert_intermediate_size`` is set; HF ``n_shared_experts`` (DeepSeek),
    1 (Qwen2-MoE, Llama-4)."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """Width of the merged shared FFN; needs ``num_shared_experts >= 1``. None (default):
    ``num_shared_experts · ffn_hidden_size``. Megatron ``moe_shared_expert_intermediate_size``;
    HF ``shared_expert_intermediate_size`` (Qwen2-MoE)."""
    shared_expert_gate: bool = False
    """The shared output is multiplied by sigmoid(x · gate_weight) (a learned [1, H] gate);
    needs shared experts. Default False. Megatron ``moe_shared_expert_gate``; HF Qwen2-MoE's
    ``shared_expert_gate``."""

    params_dtype: torch.dtype = torch.float32
    """Dtype of the expert parameters: float32, float64, bfloat16 or float16 (the router's are
    float32, float64 for float64 models). Default float32. Megatron ``params_dtype``; HF: the
    model's dtype."""
    init_std: float = 0.02
    """Standard deviation of the N(0, init_std) initialisation of router and expert weights;
    finite, > 0. Default 0.02. Megatron ``init_method_std``."""
    check_finite: bool = True
    """A NaN/Inf in the router logits raises ``FloatingPointError``, on every rank of the
    ``verdict_scope`` group together (through the verdict that group shares at every forward,
    one small all-gather, which also carries the input checks); False lets NaN propagate.
    Default True."""
    verdict_scope: choices.VerdictScope = "stage"
    """The ranks that share each forward's verdict (input refused, non-finite logits), so that
    all of them raise or none does. ``"stage"``: every rank of the pipeline stage (``tp·cp·dp``
    ranks, the whole job without pipeline parallelism): the ranks whose later collectives
    (the gradient all-reduces over DP and EDP) pair with this forward's, so a loop that catches
    the error and skips the batch keeps them all at the same step. ``"layer"``: the layer's
    ETP×EP group only, for runs where EP groups run forwards independently (inference with a
    different number of batches per data-parallel replica). ``"none"``: no verdict is shared
    (no collective and no host read per forward: for static, synchronisation-free steps); each
    rank raises its own errors, and the peers of a rank that raised wait at the layer's next
    exchange until the process group's timeout. Default ``"stage"``."""
    token_dispatcher_type: choices.DispatcherType = "alltoall"
    """How tokens cross processes: ``"alltoall"`` sends each token copy to the EP rank of its
    expert; ``"alltoall_hierarchical"`` does the same in two stages, inside each node then one
    message per node pair across nodes (nodes: ``ParallelState``'s ``ranks_per_node``; same
    results bitwise); ``"allgather"`` gathers the ETP×EP group's tokens on every rank (for
    TP-heavy layouts or large top_k). Default ``"alltoall"``. Megatron
    ``moe_token_dispatcher_type`` (``"alltoall"``, ``"allgather"``)."""
    shared_expert_overlap: bool = False
    """Compute the shared experts while the dispatch exchange is in flight (an asynchronous
    collective: gloo's worker threads on CPU, NCCL's stream on GPU, where the shared experts
    run on a side CUDA stream); same results; needs shared experts. Default False. Megatron
    ``moe_shared_expert_overlap``."""
    overlap_chunks: int = 1
    """n >= 1: split this rank's routed tokens into n consecutive chunks dispatched separately,
    so chunk i's expert GEMMs run while chunk i + 1's dispatch and chunk i - 1's combine are in
    flight (the backward runs the chunks' exchanges one after another); same results; n > 1 is
    refused with ``pad_to_capacity`` or a row ceiling. Default 1. Tutel's overlap degree."""

    expert_impl: choices.ExpertImpl = "grouped"
    """Expert computation, the same result either way: ``"grouped"`` (grouped GEMM on the
    unpadded, ragged groups) or ``"block_sparse"`` (MegaBlocks-style: each local expert's rows
    padded to a multiple of ``block_size``, first GEMM as a sampled dense-dense block product,
    second as a dense-sparse one; at most E_local·(block_size-1) padding rows). The
    block-sparse kernels run one GEMM per expert panel plus copies between panel and block
    layout, so they do the grouped GEMM's work and more; measured on CPU
    (``python -m benchmarks layer``) the grouped layer step is 1.04-1.29x faster, hence the
    default ``"grouped"``."""
    grouped_gemm_backend: str = "auto"
    """Grouped GEMM implementation (``expert_impl="grouped"``), same formula, one of
    ``ops.GROUPED_GEMM_BACKENDS``: ``"auto"`` (default: for bfloat16 on sm_90+ with at least
    16 groups ``"torch"``, its wgrad ``"cutlass"`` where the Hopper kernels run; else
    ``"loop"``) or ``"loop"`` on any device; ``"streams"``, ``"cublas"``, ``"torch"``
    (bfloat16) or ``"cutlass"`` (bfloat16) on CUDA only (``ops.grouped_gemm``)."""
    recompute: choices.Recompute = "none"
    """What the routed experts' backward recomputes instead of keeping from the forward
    (``experts/grouped_ffn.py``): ``"none"`` (default) keeps the expert input rows, the first
    GEMM's output h and the activation a; ``"activation"`` keeps the rows and h and recomputes
    a = act(h) (Megatron-Core ``recompute_modules=["moe_act"]``); ``"experts"`` keeps only the
    rows and recomputes h and a (the expert FFN part of Megatron-Core's ``"moe"`` module; the
    dispatch exchanges are not repeated). Per expert row, at element size s, the experts keep
    s·(H + F1 + F), s·(H + F1) or s·H bytes (F1 = 2F for the SwiGLUs, else F). Same results
    in every mode. With ``expert_impl="block_sparse"`` the same is done with
    ``torch.utils.checkpoint``, "activation" then also repeating the second product."""
    expert_dropout: float = 0.0
    """p in [0, 1): inverted dropout on the routed experts' hidden activation ``a = act(h)``
    (``[rows, F]``, before the row weighting and the second GEMM), in training forwards only
    (``module.training``; eval is unchanged): each unit is zeroed with probability p and the
    others scaled by 1/(1 - p). Separate from any dense dropout; the shared experts get none.
    The mask is a pure function of (``expert_dropout_seed``, the step and layer index set by
    ``set_expert_dropout_step``, the token's key ``(seq_id, position)`` set by
    ``set_token_keys``, the global expert, the global hidden unit) computed in the op
    (``ops.expert_dropout``), so a run gives the same result on every EP/ETP/TP/DP layout; a
    forward without token keys uses ``(0, index of the token in this rank's input)``, which is
    not layout-invariant. Default 0.0 (off). ST-MoE's expert dropout (its fine-tuning recipe);
    no Megatron-Core, DeepSpeed or HF counterpart."""
    expert_dropout_seed: int = 0
    """Seed of ``expert_dropout``'s mask, an int in [0, 2^64). Default 0."""
    block_size: Optional[int] = None
    """Block-sparse block size, in rows; an explicit value must divide the local ffn size
    (``ffn_hidden_size / etp``). None (default): 128 on CUDA, 32 on CPU, halved until it
    divides the local ffn size."""
    max_rows_per_rank: Optional[int] = None
    """Dropless row ceiling: the most rows a rank's experts receive per forward; > 0. None
    (default): no ceiling. Dropless token choice only."""
    max_rows_factor: Optional[float] = None
    """Dropless row ceiling as a multiple (finite, >= 1) of the balanced load
    ``top_k·Σ tokens / ep``. None (default): no ceiling. Dropless token choice only."""
    row_overflow: choices.RowOverflow = "error"
    """Over the row ceiling: ``"error"`` (default) raises ``RuntimeError`` on every rank of the
    group (naming the load and the knob); ``"capacity"`` drops the excess for that forward, as
    capacity mode would, and reports it in ``RoutingStats.overflow``."""


    def capacity_factor_in(self, training: bool) -> Optional[float]:
        """The capacity factor of a training (``capacity_factor``) or an eval forward
        (``eval_capacity_factor``, when set)."""
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    @property
    def renormalize_topk(self) -> bool:
        """Whether the top-k weights are divided by their sum: ``norm_topk_prob``, or, when it
        is None, ``top_k > 1`` without ``top_p`` (Mixtral/Qwen renormalise top-2; Switch keeps
        the top-1 score; top-p keeps the probabilities)."""
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
