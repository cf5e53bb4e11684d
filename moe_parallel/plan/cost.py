"""Predicted time of one training step of a layout, to rank the layouts that fit.

Collectives use the all-to-all model that ``python -m benchmarks cluster`` fits
(``benchmarks/cost_model/alltoall.py``; the formula is restated here, the package does not
import the benchmarks): over ``n`` ranks of which ``G`` share a node, a rank sending ``V``
bytes in one flat all-to-all takes

    t_a2a = call + message·(n - 1) + V·(G - 1)/n / B_intra + V·(n - G)/n / B_inter,

and a ring all-gather or reduce-scatter of a ``V``-byte (gathered) buffer
``call + message·(n - 1) + V·(n - 1)/n / B``, ``B`` the inter-node bandwidth when the group
spans nodes, else the intra-node one (an all-reduce is the two). ``Cluster`` holds the
parameters: NVLink 450 GB/s and InfiniBand 50 GB/s per GPU and direction, 600 TFLOP/s, no
latency (the defaults of ``benchmarks/cost_model/layer.py``, typical of H100 clusters, not
measurements), or the fitted ones of a cluster benchmark result (``cluster_from_fit``).

Groups lie on the ranks as ``ParallelState`` lays them out (``tp-cp-ep-dp-pp``, TP and ETP
fastest): a TP group is ``tp`` consecutive ranks, an EP group ``ep`` ranks ``etp`` apart, so
``G = min(ep, max(1, gpus_per_node // etp))`` of them share a node, the dense data-parallel
group (DP×CP) ``dp·cp`` ranks ``tp`` apart, the EDP group ranks ``ep·etp`` apart.

Per micro-batch, on the rank of each pipeline stage (``T`` tokens per rank, ``R`` received
rows, ``b`` bytes per element, as in ``memory.py``):

* compute: 3 × the forward FLOPs (backward = 2 × forward) at ``tflops``: matrix products ``2 ·
  tokens · parameters`` (TP-split pieces over all ``seq·mb/cp`` tokens with ``1/tp`` of the
  weights, the router and shared experts over the rank's ``T`` tokens), causal attention ``mb ·
  seq² · heads · (d_qk + d_v) / (cp · tp)``, routed experts ``2 · R · (H·fc1 + F·H) / etp``
  (recompute ``"experts"`` adds their forward once more), the head ``2 · seq·mb/cp · V/tp · H``;
* per MoE layer 4 all-to-alls of ``ρ·T·k·H·b`` bytes over EP (dispatch and combine, forward
  and backward) and, with ETP, 4 ring collectives of ``R·H·b`` over ETP;
* with a tensor-parallel dense part 8 ring collectives of ``seq·mb/cp·H·b`` per layer over TP
  (sequence parallelism: 2 all-gathers and 2 reduce-scatters forward, the same backward), with
  the built-in model 2 (the MoE output gathered, its gradient scattered); with CP 2 ring
  collectives of the layer's K and V over CP; with PP the activations sent on and the
  gradient back;
* sharding ``"experts"``: the stage's parameters gathered twice (forward, backward) and their
  gradients reduce-scattered, over DP×CP and EDP;
* ``overlap`` ∈ [0, 1] of the smaller of communication and compute is hidden.

A step is ``m`` micro-batches through ``pp`` stages (1F1B): ``(m + pp - 1) · t_stage`` with
``t_stage`` the slowest stage's micro-batch, plus the gradient synchronisation at the end (not
overlapped): an all-reduce of the gradients over DP×CP (dense) and EDP (experts) for sharding
``"none"``, a reduce-scatter of the gradients and an all-gather of the weights for
``"optimizer"``, nothing more for ``"experts"``. Not modelled: kernel efficiency below
``tflops`` (small expert GEMMs), the router and permutation kernels, sliding-window attention
(counted as full), congestion, stragglers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .layouts import Layout
from .memory import PRECISIONS, MemoryOptions, stage_params
from .models import ModelSpec, layer_pieces, stage_layers

__all__ = ["Cluster", "all_to_all_seconds", "cluster_from_fit", "ring_seconds", "step_time"]


@dataclass(frozen=True)
class Cluster:
    """Hardware of the cost model (module docstring): GPUs per node, intra- and inter-node
    bandwidth per GPU and direction (GB/s = 1e9 B/s), fixed cost per collective call and per
    peer message (µs), achieved TFLOP/s per GPU, the overlapped fraction; ``source`` says where
    the figures come from."""

    gpus_per_node: int = 8
    intra_gbps: float = 450.0
    inter_gbps: float = 50.0
    call_us: float = 0.0
    message_us: float = 0.0
    tflops: float = 600.0
    overlap: float = 0.0
    source: str = "assumed: NVLink 450 GB/s, IB 50 GB/s, 600 TFLOP/s (H100-class)"

    def __post_init__(self) -> None:
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) \
                or self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node: must be a positive int, "
                             f"got {self.gpus_per_node!r}")
        for name in ("intra_gbps", "inter_gbps", "tflops"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"--{name.replace('_', '-')}: must be a positive number, "
                                 f"got {v!r}")
        for name in ("call_us", "message_us"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"--{name.replace('_', '-')}: must be a number >= 0, got {v!r}")
        if isinstance(self.overlap, bool) or not 0 <= self.overlap <= 1:
            raise ValueError(f"--overlap: must be in [0, 1], got {self.overlap!r}")

    def to_dict(self) -> dict:
        """The parameters, JSON-ready."""
        return asdict(self)


def cluster_from_fit(path: str | Path, **given: object) -> Cluster:
    """A ``Cluster`` with the fitted all-to-all parameters of a ``python -m benchmarks cluster``
    result (its ``fit``: ``intra_gbps``, ``inter_gbps``, ``call_us``, ``latency_us`` per
    message, ``ranks_per_node``), the other fields from ``given`` (None values ignored). A fitted
    value that is None or <= 0 keeps the default. ``ValueError`` naming ``--alltoall-fit`` when
    the file holds no usable fit."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--alltoall-fit: cannot read {str(path)!r}: {e}") from None
    fit = data.get("fit") if isinstance(data, dict) else None
    if not isinstance(fit, dict) or fit.get("error"):
        raise ValueError(f"--alltoall-fit: {str(path)!r} holds no all-to-all fit (a "
                         f"'python -m benchmarks cluster' result has one)")
    fields = {"gpus_per_node": fit.get("ranks_per_node"), "intra_gbps": fit.get("intra_gbps"),
              "inter_gbps": fit.get("inter_gbps"), "call_us": fit.get("call_us"),
              "message_us": fit.get("latency_us")}
    fields = {k: v for k, v in fields.items() if isinstance(v, (int, float)) and v > 0}
    fields.update({k: v for k, v in given.items() if v is not None})
    return Cluster(**fields, source=f"fitted: {path}")


def all_to_all_seconds(volume: float, n: int, per_node: int, c: Cluster) -> float:
    """One flat all-to-all over ``n`` ranks, ``per_node`` of them on each node, a rank sending
    ``volume`` bytes (module docstring); 0 for ``n = 1``."""
    if n <= 1:
        return 0.0
    g = min(n, per_node)
    return ((c.call_us + c.message_us * (n - 1)) * 1e-6
            + volume * (g - 1) / n / (c.intra_gbps * 1e9)
            + volume * (n - g) / n / (c.inter_gbps * 1e9))


def ring_seconds(volume: float, n: int, per_node: int, c: Cluster) -> float:
    """One ring all-gather or reduce-scatter of a ``volume``-byte gathered buffer over ``n``
    ranks, ``per_node`` of them on a node (module docstring); 0 for ``n = 1``."""
    if n <= 1:
        return 0.0
    bw = c.intra_gbps if per_node >= n else c.inter_gbps
    return (c.call_us + c.message_us * (n - 1)) * 1e-6 + volume * (n - 1) / n / (bw * 1e9)


def _per_node(size: int, stride: int, gpus_per_node: int) -> int:
    """Members of a group of ``size`` ranks ``stride`` apart that share a node."""
    return max(1, min(size, gpus_per_node // stride)) if stride <= gpus_per_node else 1


def _stage_flops(model: ModelSpec, layout: Layout, stage: dict, opts: MemoryOptions) -> float:
    sb = opts.seq_len * opts.micro_batch
    dense_tokens = sb / layout.cp                  # tokens a TP group computes together
    t_moe = sb / (layout.tp * layout.cp)
    tp = layout.tp if model.dense_tp else 1
    a = model.attention
    rows = opts.imbalance * layout.etp * t_moe * model.top_k
    kinds = Counter(stage["kinds"])
    kinds["moe"] += stage["mtp"]
    fwd = 0.0
    for kind, n in kinds.items():
        for p in layer_pieces(model, kind):
            if p.split == "tp":
                fwd += n * 2 * dense_tokens * p.count / tp
            elif p.split == "none":
                tokens = t_moe if p.name in ("router", "shared_experts") else dense_tokens / tp
                fwd += n * 2 * tokens * p.count
    fwd += sum(kinds.values()) * (opts.micro_batch * opts.seq_len ** 2 * a.heads
                                  * (a.head_dim + a.v_head_dim) / (layout.cp * tp))
    expert_fwd = (2 * rows * (model.hidden * model.fc1 + model.expert_ffn * model.hidden)
                  / layout.etp * kinds["moe"])
    fwd += (int(stage["head"]) + stage["mtp"]) * 2 * dense_tokens * model.vocab * model.hidden / tp
    flops = 3 * (fwd + expert_fwd)
    if layout.recompute == "experts":
        flops += expert_fwd
    return flops


def _stage_comm(model: ModelSpec, layout: Layout, stage_index: int, opts: MemoryOptions,
                c: Cluster) -> dict[str, float]:
    stage = stage_layers(model, layout.pp)[stage_index]
    b = PRECISIONS[opts.precision].weight
    g = c.gpus_per_node
    sb = opts.seq_len * opts.micro_batch
    t_moe = sb / (layout.tp * layout.cp)
    n_moe = stage["kinds"].count("moe") + stage["mtp"]
    n_layers = len(stage["kinds"]) + stage["mtp"]
    send = opts.imbalance * t_moe * model.top_k * model.hidden * b
    rows_bytes = layout.etp * send
    out = {
        "ep_alltoall": n_moe * 4 * all_to_all_seconds(
            send, layout.ep, _per_node(layout.ep, layout.etp, g), c),
        "etp": n_moe * 4 * ring_seconds(rows_bytes, layout.etp, min(layout.etp, g), c),
    }
    full = sb / layout.cp * model.hidden * b
    per_layer_tp = 8 if model.dense_tp else 2
    out["tp"] = n_layers * per_layer_tp * ring_seconds(full, layout.tp, min(layout.tp, g), c)
    a = model.attention
    kv = sb * a.kv_heads * (a.head_dim + a.v_head_dim) * b / (layout.tp if model.dense_tp
                                                             else 1)
    out["cp"] = n_layers * 2 * ring_seconds(kv, layout.cp, _per_node(layout.cp, layout.tp, g),
                                            c)
    hop = layout.tp * layout.cp * layout.dp  # ranks between two stages
    p2p_bw = c.intra_gbps if hop < g else c.inter_gbps
    out["pp"] = (2 * ((c.call_us + c.message_us) * 1e-6 + t_moe * model.hidden * b
                      / (p2p_bw * 1e9)) if layout.pp > 1 else 0.0)
    out["fsdp"] = 0.0
    if layout.shard == "experts":
        dense, _, experts = stage_params(model, layout, stage_index)
        w, gr = b, PRECISIONS[opts.precision].grad
        D, X = layout.dp * layout.cp, layout.edp
        dn = _per_node(D, layout.tp, g)
        xn = _per_node(X, layout.ep * layout.etp, g)
        out["fsdp"] = (2 * ring_seconds(w * dense, D, dn, c) + ring_seconds(gr * dense, D, dn, c)
                       + 2 * ring_seconds(w * experts, X, xn, c)
                       + ring_seconds(gr * experts, X, xn, c))
    return out


def step_time(model: ModelSpec, layout: Layout, opts: MemoryOptions, cluster: Cluster) -> dict:
    """Predicted step of ``layout`` (module docstring): ``{"microbatches", "stage_seconds",
    "compute_seconds", "comm_seconds": {...}, "grad_sync_seconds", "step_seconds",
    "tokens_per_second_per_gpu"}``, the per-micro-batch figures the slowest stage's."""
    c = cluster
    m = opts.microbatches(layout)
    worst = None
    for s, stage in enumerate(stage_layers(model, layout.pp)):
        compute = _stage_flops(model, layout, stage, opts) / (c.tflops * 1e12)
        comm = _stage_comm(model, layout, s, opts, c)
        total_comm = sum(comm.values())
        t = compute + total_comm - c.overlap * min(compute, total_comm)
        if worst is None or t > worst[0]:
            worst = (t, compute, comm, stage)
    t_stage, compute, comm, _ = worst
    sync = 0.0
    if layout.shard != "experts":
        prec = PRECISIONS[opts.precision]
        dense, _, experts = max((stage_params(model, layout, s) for s in range(layout.pp)),
                                key=sum)
        D, X, g = layout.dp * layout.cp, layout.edp, c.gpus_per_node
        dn, xn = _per_node(D, layout.tp, g), _per_node(X, layout.ep * layout.etp, g)
        second = prec.grad if layout.shard == "none" else prec.weight  # all-reduce / ZeRO-1
        sync = (ring_seconds(prec.grad * dense, D, dn, c) + ring_seconds(second * dense, D, dn, c)
                + ring_seconds(prec.grad * experts, X, xn, c)
                + ring_seconds(second * experts, X, xn, c))
    step = (m + layout.pp - 1) * t_stage + sync
    tokens = m * layout.dp * opts.micro_batch * opts.seq_len
    return {"microbatches": m, "stage_seconds": t_stage, "compute_seconds": compute,
            "comm_seconds": comm, "grad_sync_seconds": sync, "step_seconds": step,
            "tokens_per_step": tokens, "tokens_per_second_per_gpu": tokens / step / layout.world}
