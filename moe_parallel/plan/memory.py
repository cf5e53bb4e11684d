"""Predicted bytes per rank of one layout: parameters, gradients, optimizer state, FSDP's
gathered buffers, the activations of one micro-batch and the dispatch buffers.

Per rank of pipeline stage ``s`` (``stage_pieces``), with ``P_d`` its dense parameters (TP
pieces divided by ``tp`` when the dense part is tensor-parallel; ``P_r`` of them the router's,
float32), ``P_e`` its routed-expert parameters (``E/ep`` experts of width ``F/etp``), ``D =
dp·cp`` and ``X = edp``, and a precision's bytes per parameter (``PRECISIONS``: weight ``w``,
gradient ``g``, master copy ``m``, AdamW moments ``a``; bf16: 2, 4, 4, 8; fp32: 4, 4, 0, 8):

* ``"none"``: params ``w·(P_d - P_r + P_e) + 4·P_r``, grads ``g·(P_d + P_e)``, optimizer
  ``m·(P_d - P_r + P_e) + a·(P_d + P_e)``;
* ``"optimizer"`` (ZeRO-1 over each parameter's data-parallel group): params and grads as
  ``"none"``, optimizer ``(m·(P_d - P_r) + a·P_d)/D + (m + a)·P_e/X``;
* ``"experts"`` (FSDP2: float32 sharded parameters that are their own master, float32 sharded
  gradients, sharded moments): params ``4·(P_d/D + P_e/X)``, grads ``g·(P_d/D + P_e/X)``,
  optimizer ``a·(P_d/D + P_e/X)``, and ``fsdp_buffers = (2w + g)·U``: the largest unit (one
  layer's dense and expert parameters on this rank, the embedding or the head) gathered in the
  compute dtype for it and the next unit (prefetch), and its full gradient before the
  reduce-scatter.

Activations: the saved bytes of one micro-batch through the stage's layers (``activations.py``:
``T = seq_len·micro_batch/(tp·cp)`` tokens per rank for the MoE layers and, with a
tensor-parallel dense part, for attention and head too (sequence parallel; the built-in model's
replicated dense part runs all ``seq_len·micro_batch/cp``), ``T·k`` assignments and ``R =
ρ·etp·T·k`` received rows, ``ρ`` the imbalance: the most loaded rank's rows over the balanced
load), times ``in_flight = min(pp - s, m)`` micro-batches (1F1B; ``m`` micro-batches per step).
Dispatch buffers: one MoE layer's at a time (``activations.dispatch_bytes``).
``total = params + grads + optimizer + fsdp_buffers + in_flight·activations + dispatch``; the
rank's figure is its stage's, and a layout's the largest over its stages. Counted are tensors
only: not the CUDA context, NCCL buffers, allocator fragmentation or the unsharded parameters
of a pipeline's warm-up (``--reserve`` is for them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache

from . import activations as act
from .layouts import Layout
from .models import ModelSpec, Piece, layer_pieces, stage_layers, stage_pieces

__all__ = ["MemoryOptions", "PRECISIONS", "Precision", "layout_memory", "rank_params",
           "stage_memory", "stage_params"]


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter: weight (compute dtype), gradient, master copy, AdamW moments."""

    name: str
    weight: int
    grad: int
    master: int
    moments: int


PRECISIONS = {"bf16": Precision("bf16", 2, 4, 4, 8), "fp32": Precision("fp32", 4, 4, 0, 8)}


@dataclass(frozen=True)
class MemoryOptions:
    """The workload: ``seq_len`` tokens per sequence, ``micro_batch`` sequences per rank per
    micro-batch, ``global_batch`` sequences per step (None: one micro-batch per data-parallel
    rank), ``precision`` (a key of ``PRECISIONS``), ``imbalance`` ρ > 0 (module docstring; the
    most loaded rank has ρ >= 1)."""

    seq_len: int
    micro_batch: int = 1
    global_batch: int | None = None
    precision: str = "bf16"
    imbalance: float = 1.0

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be a positive int, "
                                 f"got {v!r}")
        gb = self.global_batch
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, int) or gb < 1):
            raise ValueError(f"--global-batch: must be a positive int, got {gb!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: must be one of {tuple(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if (isinstance(self.imbalance, bool) or not isinstance(self.imbalance, (int, float))
                or not 0 < self.imbalance < math.inf):
            raise ValueError(f"--imbalance: must be a positive number (a rank's received rows "
                             f"over the balanced load; >= 1 for the most loaded rank), "
                             f"got {self.imbalance!r}")

    def microbatches(self, layout: Layout) -> int:
        """Micro-batches per step on each data-parallel rank: ``ceil(global_batch / (dp ·
        micro_batch))`` (1 without a global batch)."""
        if self.global_batch is None:
            return 1
        return math.ceil(self.global_batch / (layout.dp * self.micro_batch))


def _rank_count(p: Piece, model: ModelSpec, layout: Layout) -> float:
    if p.split == "experts":
        return p.count / (layout.ep * layout.etp)
    if p.split == "tp" and model.dense_tp:
        return p.count / layout.tp
    return float(p.count)


def _dims(model: ModelSpec, layout: Layout, act_bytes: int) -> act.Dims:
    a = model.attention
    mats = 2 if model.gated else 1
    latents = (2 * a.q_lora_rank + 2 * a.kv_lora_rank + a.rope_head_dim) if a.mla else 0
    q, kv = a.heads * a.head_dim, a.kv_heads * (a.head_dim + a.v_head_dim)
    qk_norm = 0 if a.qk_norm == "none" else q + a.kv_heads * a.head_dim  # q, k before it
    return act.Dims(
        H=model.hidden, E=model.experts, k=model.top_k, fc1=model.fc1 // layout.etp,
        ffn=model.expert_ffn // layout.etp, shared_fc1=mats * model.shared_ffn,
        shared_ffn=model.shared_ffn, shared_gate=int(model.shared_gate),
        dense_fc1=mats * model.dense_ffn, dense_ffn=model.dense_ffn, q=q, kv=kv,
        out=a.heads * a.v_head_dim, heads=a.heads, latents=latents, qk_norm=qk_norm,
        norm_stats=1 if model.norm == "rmsnorm" else 2,
        vocab=model.vocab // layout.tp if model.dense_tp else model.vocab,
        split_input=int(bool(model.shared_ffn) and act_bytes < 4))


def _kinds(stage: dict) -> Counter:
    """How many layers of each kind a stage runs (its MTP modules' layers are MoE layers)."""
    kinds = Counter(stage["kinds"])
    kinds["moe"] += stage["mtp"]
    return kinds


@lru_cache(maxsize=4096)
def _activations(model: ModelSpec, layout: Layout, stage_index: int, opts: MemoryOptions,
                 act_bytes: int) -> tuple[dict[str, float], float]:
    """``({term: bytes}, dispatch bytes)`` of one micro-batch through a stage."""
    stage = stage_layers(model, layout.pp)[stage_index]
    sb = opts.seq_len * opts.micro_batch
    t_moe = sb / (layout.tp * layout.cp)
    t_dense = t_moe if model.dense_tp else sb / layout.cp
    assignments = t_moe * model.top_k
    rows = opts.imbalance * layout.etp * assignments
    dims = _dims(model, layout, act_bytes)
    total: dict[str, float] = {}

    def add(terms: dict[str, float], times: int = 1) -> None:
        for name, b in terms.items():
            total[name] = total.get(name, 0.0) + times * b

    kinds = _kinds(stage)
    add(act.saved_bytes(act.ATTENTION_TERMS, dims, act_bytes, t_dense), sum(kinds.values()))
    add(act.saved_bytes(act.DENSE_FFN_TERMS, dims, act_bytes, t_dense), kinds["dense"])
    add(act.saved_bytes(act.MOE_TERMS, dims, act_bytes, t_moe, assignments, rows,
                        layout.recompute), kinds["moe"])
    add(act.saved_bytes(act.EMBEDDING_TERMS, dims, act_bytes, t_dense), int(stage["embedding"]))
    add(act.saved_bytes(act.HEAD_TERMS, dims, act_bytes, t_dense),
        int(stage["head"]) + stage["mtp"])
    add(act.saved_bytes(act.MTP_TERMS, dims, act_bytes, t_dense), stage["mtp"])
    exchanges = layout.ep * layout.etp > 1
    dispatch = (act.dispatch_bytes(model.hidden, act_bytes, assignments, rows, exchanges)
                if kinds["moe"] else 0.0)
    return {k: v for k, v in total.items() if v}, dispatch


def rank_params(model: ModelSpec, layout: Layout, pieces: Iterable[Piece]
                ) -> tuple[float, float, float]:
    """(dense, router, expert) parameters of ``pieces`` on one rank."""
    dense = router = experts = 0.0
    for p in pieces:
        n = _rank_count(p, model, layout)
        if p.split == "experts":
            experts += n
        else:
            dense += n
            router += n if p.fp32 else 0.0
    return dense, router, experts


@lru_cache(maxsize=8192)
def stage_params(model: ModelSpec, layout: Layout, stage_index: int) -> tuple[float, float, float]:
    """``rank_params`` of pipeline stage ``stage_index`` (the sharding and recompute modes
    play no part)."""
    if layout.shard != "none" or layout.recompute != "none":
        return stage_params(model, replace(layout, shard="none", recompute="none"), stage_index)
    return rank_params(model, layout, stage_pieces(model, layout.pp, stage_index))


def _largest_unit(model: ModelSpec, layout: Layout, stage_index: int) -> float:
    """The largest FSDP unit on this rank: one layer's parameters, the embedding or the
    head."""
    stage = stage_layers(model, layout.pp)[stage_index]
    units = [sum(rank_params(model, layout, layer_pieces(model, kind))[::2])
             for kind, n in _kinds(stage).items() if n]
    units += [_rank_count(p, model, layout)
              for p in stage_pieces(model, layout.pp, stage_index)
              if p.name in ("embedding", "head")]
    return max(units, default=0.0)


def stage_memory(model: ModelSpec, layout: Layout, opts: MemoryOptions, stage_index: int
                 ) -> dict:
    """Predicted bytes of a rank of pipeline stage ``stage_index`` (module docstring):
    ``{"stage", "param_counts": {"dense", "router", "experts"}, "params", "grads",
    "optimizer", "fsdp_buffers", "activations", "activation_terms", "in_flight", "dispatch",
    "total"}``."""
    prec = PRECISIONS[opts.precision]
    dense, router, experts = stage_params(model, layout, stage_index)
    D, X = layout.dp * layout.cp, layout.edp
    w, g, m, a = prec.weight, prec.grad, prec.master, prec.moments
    buffers = 0.0
    if layout.shard == "experts":
        shard = dense / D + experts / X
        params, grads, optimizer = 4 * shard, g * shard, a * shard
        buffers = (2 * w + g) * _largest_unit(model, layout, stage_index)
    else:
        params = w * (dense - router + experts) + 4 * router
        grads = g * (dense + experts)
        if layout.shard == "optimizer":
            optimizer = (m * (dense - router) + a * dense) / D + (m + a) * experts / X
        else:
            optimizer = m * (dense - router + experts) + a * (dense + experts)
    terms, dispatch = _activations(model, replace(layout, shard="none"), stage_index, opts, w)
    activations = sum(terms.values())
    in_flight = min(layout.pp - stage_index, opts.microbatches(layout))
    total = params + grads + optimizer + buffers + in_flight * activations + dispatch
    return {"stage": stage_index,
            "param_counts": {"dense": dense, "router": router, "experts": experts},
            "params": params, "grads": grads, "optimizer": optimizer, "fsdp_buffers": buffers,
            "activations": activations, "activation_terms": dict(terms),
            "in_flight": in_flight, "dispatch": dispatch, "total": total}


def layout_memory(model: ModelSpec, layout: Layout, opts: MemoryOptions) -> dict:
    """``stage_memory`` of the stage whose rank needs the most (``total``)."""
    return max((stage_memory(model, layout, opts, s) for s in range(layout.pp)),
               key=lambda r: r["total"])
