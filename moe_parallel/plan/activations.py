"""Bytes saved for the backward by one micro-batch, per layer, and the dispatch buffers: the
coefficient tables. Every coefficient of the planner's activation model is in this module.

Each ``Term`` is a tensor (or a few of the same size) that a layer saves for its backward:
``per`` says what it is counted per (``"token"``: a token of the layer on this rank,
``"assignment"``: a (token, expert) pair of this rank's tokens, ``T·k``; ``"row"``: a row the
rank's local experts receive, ``R``), ``elements`` its elements per unit from the layer's
dimensions (``Dims``), ``dtype`` its element size class: ``"act"`` the model's compute dtype,
``"router"`` the router's (float32, float64 for float64 models: ``TopKRouter``), ``"f32"``
always 4 bytes, ``"i64"`` 8 bytes.

The MoE terms are those ``MoELayer`` saves today, measured with ``benchmarks.memory.
saved_tensor_bytes`` (one process and 4 gloo ranks under EP/ETP, float32 and bfloat16): the
router's float32 input, logits and scores, top-k ids twice, the selected scores and their sum;
the row index of each (token, expert) pair; per row each local expert receives, the row (its
GEMM input), its routing weight (applied to the activation before the second GEMM, so the
combine is an unweighted sum that keeps nothing), the first projection's output and the
activation's output (``F / etp`` wide).
The attention terms are those of the built-in model's block (``moe_parallel.train``): the
pre-norm input and output, q, k and v, the attention output and its log-sum-exp, the second
norm's input, and the norms' statistics; MLA adds its low-rank latents, q/k norms the q and k
before the norm (not measured: structural). The head keeps the final norm's input and
statistics, its own input, the float32 log-probabilities (``V`` per token) and the labels.

Recompute modes drop terms (``RECOMPUTE_DROPS``): ``"activation"`` recomputes the expert
activation from the first projection's output in the backward (Megatron-Core ``moe_act``),
``"experts"`` the whole expert FFN from its input rows.

Dispatch buffers (``dispatch_bytes``): while one MoE layer exchanges its rows under EP/ETP, the
tensors live beside the saved ones are the send buffer (``T·k`` rows), the receive buffer in
arrival order before its expert-major copy and the experts' output before the exchange back
(``R`` rows each): ``b·H·(T·k + 2R)``; none without an exchange (``ep·etp = 1``). One layer's at
a time, forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..config.choices import RECOMPUTE_MODES

__all__ = ["ATTENTION_TERMS", "DENSE_FFN_TERMS", "Dims", "EMBEDDING_TERMS", "HEAD_TERMS",
           "MOE_TERMS", "MTP_TERMS", "RECOMPUTE_DROPS", "RECOMPUTE_MODES", "Term", "dispatch_bytes",
           "saved_bytes"]


@dataclass(frozen=True)
class Dims:
    """The widths a term's element count may use (this rank's share where a weight is split):
    ``H`` hidden, ``E`` experts, ``k`` top-k, ``fc1`` / ``ffn`` a routed expert's first
    projection and hidden width on this rank (``2F/etp`` gated, ``F/etp``), ``shared_fc1`` /
    ``shared_ffn`` the shared experts', ``shared_gate`` 1 with their sigmoid gate, ``dense_fc1``
    / ``dense_ffn`` a dense FFN's, ``q`` / ``kv`` / ``out`` the attention's q, k + v and output
    widths, ``heads``, ``latents`` MLA's saved latent widths, ``qk_norm`` the widths a q/k norm
    keeps, ``norm_stats`` 1 (RMSNorm) or 2 (LayerNorm), ``vocab``, ``split_input`` 1 when the
    MoE input in the compute dtype is kept beside the router's float32 copy (shared experts
    read it, and the dtypes differ)."""

    H: int
    E: int
    k: int
    fc1: int
    ffn: int
    shared_fc1: int
    shared_ffn: int
    shared_gate: int
    dense_fc1: int
    dense_ffn: int
    q: int
    kv: int
    out: int
    heads: int
    latents: int
    qk_norm: int
    norm_stats: int
    vocab: int
    split_input: int


@dataclass(frozen=True)
class Term:
    """One saved tensor kind (module docstring)."""

    name: str
    per: Literal["token", "assignment", "row"]
    elements: Callable[[Dims], int]
    dtype: Literal["act", "router", "f32", "i64"]


# one decoder layer's attention half, per token of the attention on this rank
ATTENTION_TERMS: tuple[Term, ...] = (
    Term("norm_inputs", "token", lambda d: 2 * d.H, "act"),   # pre-attention and pre-FFN norms
    Term("norm_stats", "token", lambda d: 2 * d.norm_stats, "f32"),
    Term("attention_input", "token", lambda d: d.H, "act"),    # the first norm's output
    Term("qkv", "token", lambda d: d.q + d.kv, "act"),
    Term("attention_lse", "token", lambda d: d.heads, "f32"),
    Term("attention_output", "token", lambda d: d.out, "act"),
    Term("mla_latents", "token", lambda d: d.latents, "act"),
    Term("qk_norm_inputs", "token", lambda d: d.qk_norm, "act"),
)

# a dense FFN layer (DeepSeek's first layers), per token
DENSE_FFN_TERMS: tuple[Term, ...] = (
    Term("ffn_input", "token", lambda d: d.H, "act"),
    Term("ffn_fc1", "token", lambda d: d.dense_fc1, "act"),
    Term("ffn_act", "token", lambda d: d.dense_ffn, "act"),
)

# an MoELayer, per token / assignment of this rank's tokens and per row its experts receive
MOE_TERMS: tuple[Term, ...] = (
    Term("router_input", "token", lambda d: d.H, "router"),
    Term("router_scores", "token", lambda d: 2 * d.E, "router"),   # logits and softmax
    Term("topk_ids", "token", lambda d: 2 * d.k, "i64"),
    Term("combine_weights", "token", lambda d: d.k + 1, "router"),  # gathered, and their sum
    Term("moe_input", "token", lambda d: d.H * d.split_input, "act"),
    Term("shared_fc1", "token", lambda d: d.shared_fc1, "act"),
    Term("shared_act", "token", lambda d: d.shared_ffn, "act"),
    Term("shared_gate", "token", lambda d: d.shared_gate * (d.H + 1), "act"),
    Term("combine_index", "assignment", lambda d: 1, "i64"),       # the row of each (t, j)
    Term("expert_input", "row", lambda d: d.H, "act"),
    Term("expert_row_weights", "row", lambda d: 1, "router"),      # applied before fc2
    Term("expert_fc1", "row", lambda d: d.fc1, "act"),
    Term("expert_act", "row", lambda d: d.ffn, "act"),
)

# the first stage: token ids; the last stage: final norm, head and loss, per token
EMBEDDING_TERMS: tuple[Term, ...] = (
    Term("token_ids", "token", lambda d: 1, "i64"),
)
HEAD_TERMS: tuple[Term, ...] = (
    Term("final_norm_input", "token", lambda d: d.H, "act"),
    Term("final_norm_stats", "token", lambda d: d.norm_stats, "f32"),
    Term("head_input", "token", lambda d: d.H, "act"),
    Term("log_probs", "token", lambda d: d.vocab, "f32"),
    Term("labels", "token", lambda d: 1, "i64"),
)

# an MTP module (DeepSeek-V3) besides its decoder layer and head: the two norms' inputs and the
# projection's concatenated input
MTP_TERMS: tuple[Term, ...] = (
    Term("mtp_inputs", "token", lambda d: 4 * d.H, "act"),
)

RECOMPUTE_DROPS: dict[str, tuple[str, ...]] = {
    "none": (),
    "activation": ("expert_act",),
    "experts": ("expert_fc1", "expert_act"),
}


def _dtype_bytes(dtype: str, act_bytes: int) -> int:
    return {"act": act_bytes, "router": max(act_bytes, 4), "f32": 4, "i64": 8}[dtype]


def saved_bytes(terms: tuple[Term, ...], dims: Dims, act_bytes: int, tokens: float,
                assignments: float = 0.0, rows: float = 0.0,
                recompute: str = "none") -> dict[str, float]:
    """``{term name: bytes}`` of ``terms`` for ``tokens`` tokens, ``assignments`` (token,
    expert) pairs and ``rows`` received expert rows, in a model computing in ``act_bytes``-byte
    elements; the terms ``recompute`` drops are left out."""
    if recompute not in RECOMPUTE_DROPS:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    units = {"token": tokens, "assignment": assignments, "row": rows}
    out: dict[str, float] = {}
    for t in terms:
        if t.name in RECOMPUTE_DROPS[recompute]:
            continue
        n = t.elements(dims)
        if n:
            out[t.name] = out.get(t.name, 0.0) + units[t.per] * n * _dtype_bytes(t.dtype,
                                                                                   act_bytes)
    return out


def dispatch_bytes(hidden: int, act_bytes: int, assignments: float, rows: float,
                   exchanges: bool) -> float:
    """One MoE layer's exchange buffers (module docstring): ``b·H·(T·k + 2R)`` when the layer
    exchanges rows (``exchanges``: ``ep·etp > 1``), else 0."""
    return float(act_bytes * hidden * (assignments + 2 * rows)) if exchanges else 0.0
