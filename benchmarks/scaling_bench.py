"""Expert-parallel scaling: measured on this machine (gloo, CPU) and a cost model for GPU clusters.

Part A, measured. One ``MoELayer`` (dropless block-sparse, the default), forward + backward of
``y.sum()`` with the input requiring a gradient (so all four all-to-alls run), on N = 1, 2, 4, 8
processes with EP = N (``num_experts / N`` experts per rank), gloo over loopback, one torch
thread per process. No gradient all-reduce is timed (with EP = world the expert weights need
none; the router's DP all-reduce is left out). Per step every rank waits at a barrier, times its
own forward + backward, and the step time is the maximum over ranks; the reported figure is the
median over the timed steps after the warm-up steps.
  * weak scaling: ``T`` tokens per process; efficiency ``t_1 / t_N``;
  * strong scaling: ``T_global`` tokens split over the N processes; efficiency
    ``t_1 / (N · t_N)``;
  * tokens/s = global tokens / step time;
  * bound = min(1, C/N) on C cores: the best efficiency a CPU-bound run can reach there.
(``t_1`` is the smallest process count run when 1 is not among them; strong efficiency then
``N_min · t_min / (N · t_N)``.) On a machine with C cores, runs with N > C processes are
oversubscribed: their numbers show the overheads of expert parallelism on CPU (all-to-all over
gloo, process contention), not the speedup a GPU cluster would see.

Part B, cost model (pure functions below), per GPU and per MoE layer, forward + backward, for
T tokens per GPU, hidden H, expert ffn F, E experts, top-k k, b bytes per element, EP size ep,
G GPUs per node; routing assumed balanced (every GPU sends and receives T·k rows):
  * all-to-all volume per direction:      V = T·k·H·b bytes (each of 4 all-to-alls: dispatch
    and combine, forward and backward);
  * EP ranks packed onto nodes (ep ≤ G: one node; ep > G: ep/G full nodes), traffic spread
    evenly over the ep ranks of the group:
        self share   f_self = 1/ep                    (stays on the GPU, no link)
        NVLink share f_nv   = (min(ep, G) - 1)/ep
        IB share     f_ib   = (ep - min(ep, G))/ep
  * one all-to-all:  t_a2a = latency + max(V·f_nv / BW_nv, V·f_ib / BW_ib)
    (NVLink and InfiniBand carry their parts at the same time; BW per GPU per direction,
    full duplex, GB/s = 1e9 B/s); communication per layer  t_comm = 4·t_a2a;
  * expert GEMM FLOPs, forward: 2·T·k·H·(3F) for SwiGLU (gate and up ``H×2F``: 2·H·2F, down
    ``F×H``: 2·F·H per row), 2·T·k·H·(2F) for GELU/ReLU; backward = 2 × forward (dgrad + wgrad);
    t_gemm = (forward + backward FLOPs) / grouped-GEMM throughput;
  * overlap fraction o ∈ [0, 1] of the shorter of t_comm and t_gemm hidden behind the other:
        t_step = t_gemm + t_comm - o·min(t_comm, t_gemm)    (default o = 0: no overlap);
    communication share = exposed communication / t_step = (t_comm - o·min(...)) / t_step.
Not modelled: router, permutation and activation kernels, load imbalance, the grouped-GEMM
efficiency drop when experts get few rows, all-to-all message overheads beyond ``latency``,
congestion of the IB fabric. The bandwidth and throughput defaults (NVLink 450 GB/s per GPU per
direction, IB 50 GB/s per GPU = 400 Gb/s NDR, bf16 grouped GEMM 600 TFLOP/s) are assumptions
typical of H100 clusters, not measurements; pass measured values with the CLI options. The
default layer is DeepSeek-V3-like: T=4096, H=7168, F=2048, E=256, k=8, bf16 (``--cm-*``).

Part C, fitted to a cluster (``--fit RESULT.json``, a ``python -m benchmarks cluster`` result):
its all-to-all fit (:func:`fit_alltoall`: ``t = call + latency·(ep - 1) + V_intra/B_intra +
V_inter/B_inter``) replaces the defaults: ``gpus_per_node`` = its ranks per node, NVLink = its
intra-node bandwidth, IB = its inter-node bandwidth (kept ASSUMED when it measured one node
only), ``latency_us`` = its per-call and ``message_latency_us`` = its per-message latency (one
all-to-all then costs ``latency + message_latency·(ep - 1) + max(...)``). An option given on
the command line still wins; the table says which values are fitted, given or assumed. Also
pure here: :func:`all_to_all_hierarchical_seconds` (DESIGN.md §10) and
:func:`pipelined_step_seconds` (chunked overlap), which the cluster bench prints.

    python -m benchmarks.scaling_bench              # tables, JSON + PNG in benchmarks/results/
    python -m benchmarks.scaling_bench --procs 1 2 --steps 3 --out /tmp/s.json
    python -m benchmarks.scaling_bench --skip-measure --gemm-tflops 498   # cost model only
    python -m benchmarks.scaling_bench --skip-measure --fit benchmarks/results/cluster_X.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from benchmarks.local_ranks import free_port
from benchmarks.plotting import pyplot

EXPERT_IMPL = "grouped"  # the measured layers' expert computation (MoEConfig's default)
EP_SIZES = (8, 16, 32, 64, 128, 256)
DEFAULT_ASSUMPTIONS = {
    "gpus_per_node": 8,
    "nvlink_gbps": 450.0,  # H100 NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction
    "ib_gbps": 50.0,  # one 400 Gb/s NDR NIC per GPU
    "gemm_tflops": 600.0,  # bf16 grouped GEMM, forward+backward average
    "overlap": 0.0,
    "latency_us": 0.0,
}
# cost-model layer, DeepSeek-V3-like: 256 routed experts of ffn 2048, top-8, hidden 7168
DEFAULT_MODEL = {"tokens": 4096, "hidden": 7168, "ffn": 2048, "experts": 256, "top_k": 8,
                 "dtype_bytes": 2, "activation": "swiglu"}
ACTIVATION_MATRICES = {"swiglu": 3, "gelu": 2, "relu": 2}


# ---- cost model (pure) ------------------------------------------------------------------------
def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _positive_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def a2a_bytes(tokens: int, hidden: int, top_k: int, dtype_bytes: int) -> int:
    """Bytes one GPU sends (and receives) in one all-to-all: ``T·k·H·b``."""
    for name, v in (("tokens", tokens), ("hidden", hidden), ("top_k", top_k),
                    ("dtype_bytes", dtype_bytes)):
        _positive_int(name, v)
    return tokens * top_k * hidden * dtype_bytes


def link_fractions(ep: int, gpus_per_node: int = 8) -> tuple[float, float, float]:
    """``(f_self, f_nv, f_ib)``: shares of one all-to-all's volume that stay on the GPU, cross
    NVLink and cross InfiniBand, for an EP group packed onto full nodes:
    ``1/ep``, ``(min(ep, G) - 1)/ep``, ``(ep - min(ep, G))/ep``. They sum to 1.
    ``ep > G`` must be a multiple of G (full nodes)."""
    _positive_int("ep", ep)
    _positive_int("gpus_per_node", gpus_per_node)
    if ep > gpus_per_node and ep % gpus_per_node:
        raise ValueError(f"ep {ep} above gpus_per_node {gpus_per_node} must be a multiple of it "
                         f"(EP ranks packed onto full nodes)")
    intra = min(ep, gpus_per_node)
    return 1 / ep, (intra - 1) / ep, (ep - intra) / ep


def _nonneg_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def all_to_all_seconds(volume_bytes: float, ep: int, gpus_per_node: int = 8,
                       nvlink_gbps: float = 450.0, ib_gbps: float = 50.0,
                       latency_us: float = 0.0, message_latency_us: float = 0.0) -> float:
    """One all-to-all: ``latency + message_latency·(ep - 1) + max(V·f_nv / BW_nv, V·f_ib /
    BW_ib)`` seconds, the bandwidths in GB/s (1e9 B/s) per GPU per direction (``latency``: a
    fixed cost per call; ``message_latency``: per peer message, as :func:`fit_alltoall`
    fits it; both default 0)."""
    if not volume_bytes >= 0:
        raise ValueError(f"volume_bytes must be >= 0, got {volume_bytes!r}")
    nv_bw = _positive_float("nvlink_gbps", nvlink_gbps) * 1e9
    ib_bw = _positive_float("ib_gbps", ib_gbps) * 1e9
    latency = _nonneg_float("latency_us", latency_us) * 1e-6
    per_message = _nonneg_float("message_latency_us", message_latency_us) * 1e-6
    _, f_nv, f_ib = link_fractions(ep, gpus_per_node)
    return (latency + per_message * (ep - 1)
            + max(volume_bytes * f_nv / nv_bw, volume_bytes * f_ib / ib_bw))


def expert_gemm_flops(tokens: int, hidden: int, ffn: int, top_k: int,
                      activation: str = "swiglu") -> tuple[int, int]:
    """``(forward, backward)`` expert GEMM FLOPs of one GPU: forward ``2·T·k·H·m·F`` with
    ``m = 3`` for SwiGLU (gate, up, down) and 2 for GELU/ReLU; backward ``2 × forward``."""
    for name, v in (("tokens", tokens), ("hidden", hidden), ("ffn", ffn), ("top_k", top_k)):
        _positive_int(name, v)
    if activation not in ACTIVATION_MATRICES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_MATRICES)}, "
                         f"got {activation!r}")
    fwd = 2 * tokens * top_k * hidden * ACTIVATION_MATRICES[activation] * ffn
    return fwd, 2 * fwd


def predict_layer(tokens: int, hidden: int, ffn: int, experts: int, top_k: int,
                  dtype_bytes: int, ep: int, gpus_per_node: int = 8,
                  nvlink_gbps: float = 450.0, ib_gbps: float = 50.0,
                  gemm_tflops: float = 600.0, overlap: float = 0.0,
                  latency_us: float = 0.0, activation: str = "swiglu",
                  message_latency_us: float = 0.0) -> dict:
    """Predicted forward + backward of one MoE layer on one GPU of an EP group of ``ep``
    (formulas in the module docstring). Times in milliseconds; ``comm_share`` is the exposed
    communication over the step time. Raises ValueError naming any invalid parameter, and when
    ``experts`` is not divisible by ``ep``."""
    _positive_int("experts", experts)
    _positive_int("ep", ep)
    if experts % ep:
        raise ValueError(f"experts {experts} is not divisible by ep {ep}")
    if isinstance(overlap, bool) or not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be in [0, 1], got {overlap!r}")
    tflops = _positive_float("gemm_tflops", gemm_tflops)
    volume = a2a_bytes(tokens, hidden, top_k, dtype_bytes)
    f_self, f_nv, f_ib = link_fractions(ep, gpus_per_node)
    t_a2a = all_to_all_seconds(volume, ep, gpus_per_node, nvlink_gbps, ib_gbps, latency_us,
                               message_latency_us)
    fwd, bwd = expert_gemm_flops(tokens, hidden, ffn, top_k, activation)
    t_comm = 4 * t_a2a
    t_gemm = (fwd + bwd) / (tflops * 1e12)
    hidden_comm = overlap * min(t_comm, t_gemm)
    t_step = t_gemm + t_comm - hidden_comm
    return {
        "ep": ep,
        "nodes": math.ceil(ep / gpus_per_node),
        "experts_per_gpu": experts // ep,
        "rows_per_expert": tokens * top_k * ep / experts,
        "a2a_bytes": volume,
        "self_fraction": f_self,
        "nvlink_fraction": f_nv,
        "ib_fraction": f_ib,
        "a2a_ms": t_a2a * 1e3,
        "comm_ms": t_comm * 1e3,
        "gemm_flops": fwd + bwd,
        "gemm_ms": t_gemm * 1e3,
        "step_ms": t_step * 1e3,
        "comm_share": (t_comm - hidden_comm) / t_step,
        "tokens_per_s_per_gpu": tokens / t_step,
    }


def cost_model_rows(ep_sizes: tuple[int, ...] | list[int] = EP_SIZES, **kwargs) -> list[dict]:
    """``predict_layer(ep=ep, **kwargs)`` for every EP size."""
    return [predict_layer(ep=ep, **kwargs) for ep in ep_sizes]


# ---- fitted all-to-all model, hierarchical exchange, pipelined overlap (pure) ---------------
FIT_MODEL = ("t = call + latency·messages + intra_bytes / intra_bw + inter_bytes / inter_bw "
             "(least squares on the relative error)")
FIT_TERMS = ("call", "message", "intra", "inter")


def _volume(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number of bytes >= 0, got {v!r}")
    return float(v)


def alltoall_volumes(volume_bytes: float, ep: int, ranks_per_node: int
                     ) -> tuple[int, float, float]:
    """``(messages, intra_bytes, inter_bytes)`` of one rank in a balanced flat all-to-all over
    ``ep`` ranks packed onto nodes of ``G = ranks_per_node``, the rank's send buffer ``V =
    volume_bytes`` (own chunk included, ``V/ep`` per destination, as nccl-tests counts it):
    ``ep - 1`` messages, ``V·(min(ep, G) - 1)/ep`` bytes to ranks of its node and
    ``V·(ep - min(ep, G))/ep`` to other nodes. ``ep > G`` must be a multiple of G."""
    v = _volume("volume_bytes", volume_bytes)
    _positive_int("ep", ep)
    g = _positive_int("ranks_per_node", ranks_per_node)
    if ep > g and ep % g:
        raise ValueError(f"ep {ep} above ranks_per_node {g} must be a multiple of it "
                         f"(EP ranks packed onto full nodes)")
    intra = min(ep, g)
    return ep - 1, v * (intra - 1) / ep, v * (ep - intra) / ep


def fit_alltoall(points: list[dict], ranks_per_node: int) -> dict:
    """Fit the flat all-to-all cost model, linear in its parameters,

        t = call + latency·m + V_intra·β_intra + V_inter·β_inter,

    to measured ``points`` (dicts with ``ep``, ``bytes`` = one rank's send buffer, ``seconds`` =
    one all-to-all, slowest rank; optionally ``messages``, ``intra_bytes``, ``inter_bytes`` from
    the real layout, else :func:`alltoall_volumes` with ``ranks_per_node``). ``m = ep - 1``
    messages per rank; ``call`` is a fixed cost per call, ``latency`` one per peer message;
    bandwidth ``= 1/β``. Least squares on the relative error (every row of the system divided
    by its measured ``t``, solved by ``numpy.linalg.lstsq`` on unit-scaled columns), so short
    and long transfers weigh alike. A term the points cannot determine is left out: ``inter``
    (``inter_gbps`` None) when no point sends across nodes, ``intra`` when none sends within a
    node, and ``call`` (``call_us`` None; ``latency_us`` then holds the whole fixed cost, per
    message) when every point has the same message count.

    Returns ``{"model", "ranks_per_node", "terms", "call_us", "latency_us", "intra_gbps",
    "inter_gbps", "coefficients", "rel_rms", "max_rel_error", "points", "warnings"}``: ``rel_rms
    = sqrt(mean(((pred - t)/t)²))``, ``max_rel_error = max |pred - t|/t`` over the points, each
    point with its ``predicted_s`` and ``rel_error``; a fitted slope <= 0 gives a bandwidth of
    None and a warning. ValueError naming the bad field of a bad point, a bad
    ``ranks_per_node``, no points, or points that do not determine the terms.
    """
    import numpy as np

    g = _positive_int("ranks_per_node", ranks_per_node)
    rows = []
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise ValueError(f"points[{i}] must be a dict, got {type(p).__name__}")
        ep = _positive_int(f"points[{i}].ep", p.get("ep"))
        if ep < 2:
            raise ValueError(f"points[{i}].ep must be >= 2 (an all-to-all between ranks), "
                             f"got {ep}")
        volume = _positive_float(f"points[{i}].bytes", p.get("bytes"))
        seconds = _positive_float(f"points[{i}].seconds", p.get("seconds"))
        explicit = [k for k in ("messages", "intra_bytes", "inter_bytes") if k in p]
        if explicit and len(explicit) < 3:
            raise ValueError(f"points[{i}] gives {explicit}: messages, intra_bytes and "
                             f"inter_bytes go together")
        if explicit:
            m = _positive_int(f"points[{i}].messages", p["messages"])
            vi = _volume(f"points[{i}].intra_bytes", p["intra_bytes"])
            vx = _volume(f"points[{i}].inter_bytes", p["inter_bytes"])
        else:
            m, vi, vx = alltoall_volumes(volume, ep, g)
        rows.append({"ep": ep, "bytes": volume, "seconds": seconds, "messages": m,
                     "intra_bytes": vi, "inter_bytes": vx})
    if not rows:
        raise ValueError("points is empty: nothing to fit")
    col = {"call": [1.0] * len(rows), "message": [float(r["messages"]) for r in rows],
           "intra": [r["intra_bytes"] for r in rows], "inter": [r["inter_bytes"] for r in rows]}
    terms = [t for t in FIT_TERMS
             if (t == "call" and len(set(col["message"])) > 1) or t == "message"
             or (t in ("intra", "inter") and any(v > 0 for v in col[t]))]
    a = np.array([[col[t][j] for t in terms] for j in range(len(rows))], dtype=np.float64)
    t_meas = np.array([r["seconds"] for r in rows], dtype=np.float64)
    scale = np.abs(a).max(axis=0)
    weighted = a / t_meas[:, None] / scale
    coef, _, rank, _ = np.linalg.lstsq(weighted, np.ones(len(rows)), rcond=None)
    if rank < len(terms):
        raise ValueError(
            f"points do not determine the terms {terms}: {len(rows)} point(s) of rank {rank}; "
            f"measure more volumes per EP size (and two EP sizes for a per-call latency)")
    coef = coef / scale
    pred = a @ coef
    rel = (pred - t_meas) / t_meas
    c = dict(zip(terms, (float(v) for v in coef)))
    warnings = []

    def bandwidth(term: str) -> float | None:
        if term not in c:
            return None
        if c[term] <= 0:
            warnings.append(f"fitted {term} slope {c[term]:.3g} s/B <= 0: the points show no "
                            f"{term}-node bandwidth cost; {term}_gbps left None")
            return None
        return 1.0 / c[term] / 1e9

    intra_gbps, inter_gbps = bandwidth("intra"), bandwidth("inter")
    for term in ("call", "message"):
        if c.get(term, 0.0) < 0:
            warnings.append(f"fitted {term} latency {c[term] * 1e6:.3g} us < 0")
    for r, p_s, e in zip(rows, pred, rel):
        r.update(predicted_s=float(p_s), rel_error=float(e))
    return {
        "model": FIT_MODEL,
        "ranks_per_node": g,
        "terms": terms,
        "call_us": c["call"] * 1e6 if "call" in c else None,
        "latency_us": c["message"] * 1e6,
        "intra_gbps": intra_gbps,
        "inter_gbps": inter_gbps,
        "coefficients": {"call_s": c.get("call"), "message_s": c["message"],
                         "intra_s_per_byte": c.get("intra"), "inter_s_per_byte": c.get("inter")},
        "rel_rms": float(np.sqrt(np.mean(rel ** 2))),
        "max_rel_error": float(np.max(np.abs(rel))),
        "points": rows,
        "warnings": warnings,
    }


def _transfer_seconds(volume: float, gbps: float | None, what: str) -> float:
    """``volume / bandwidth`` over the ``what`` ("intra"/"inter") link; ``gbps`` must be given
    when ``volume > 0``."""
    if volume == 0:
        return 0.0
    if gbps is None:
        raise ValueError(f"{what}_gbps is needed: this all-to-all sends {volume:g} B {what}-node")
    return volume / (_positive_float(f"{what}_gbps", gbps) * 1e9)


def _phase_seconds(messages: int, volume: float, gbps: float | None, what: str,
                   latency_us: float, call_us: float) -> float:
    """One all-to-all phase on one link: ``call + latency·messages + volume / bandwidth`` (0
    with no messages)."""
    if messages == 0:
        return 0.0
    return (call_us + latency_us * messages) * 1e-6 + _transfer_seconds(volume, gbps, what)


def all_to_all_flat_seconds(volume_bytes: float, ep: int, ranks_per_node: int,
                            latency_us: float, intra_gbps: float | None,
                            inter_gbps: float | None = None, call_us: float = 0.0) -> float:
    """One flat all-to-all in :func:`fit_alltoall`'s model: with ``V = volume_bytes`` (a rank's
    send buffer), ``G = min(ep, ranks_per_node)``,

        t = call + latency·(ep - 1) + V·(G - 1)/ep / B_intra + V·(ep - G)/ep / B_inter

    seconds (the link times add: no overlap of NVLink and network is assumed, unlike
    :func:`all_to_all_seconds`). ``inter_gbps`` may be None when ``ep <= ranks_per_node``."""
    _nonneg_float("latency_us", latency_us)
    _nonneg_float("call_us", call_us)
    m, vi, vx = alltoall_volumes(volume_bytes, ep, ranks_per_node)
    if m == 0:
        return 0.0
    return ((call_us + latency_us * m) * 1e-6 + _transfer_seconds(vi, intra_gbps, "intra")
            + _transfer_seconds(vx, inter_gbps, "inter"))


def all_to_all_hierarchical_seconds(volume_bytes: float, ep: int, ranks_per_node: int,
                                    latency_us: float, intra_gbps: float | None,
                                    inter_gbps: float | None = None,
                                    call_us: float = 0.0) -> float:
    """One hierarchical all-to-all (DESIGN.md §10) in :func:`fit_alltoall`'s model, over ``ep``
    ranks on ``n = ep / G`` nodes of ``G = ranks_per_node`` ranks, ``V = volume_bytes`` per rank:

      1. intra-node all-to-all of the whole volume over the G ranks of the node (rank ``g``
         receives the rows bound for local rank ``g`` of every node):
         ``call + latency·(G - 1) + V·(G - 1)/G / B_intra``;
      2. ``n - 1`` inter-node messages to the same local rank of every other node, each G times
         a flat message (``G·V/ep``): ``call + latency·(n - 1) + V·(n - 1)/n / B_inter``.

    The inter-node volume equals the flat one (``V·(ep - G)/ep``); the exchange trades
    ``ep - G - n + 1`` fewer messages for ``V·(G - 1)·(1/G - 1/ep)`` more intra-node bytes and
    one more call. With ``ep <= G`` (one node) or ``G = 1`` it is the flat all-to-all."""
    _nonneg_float("latency_us", latency_us)
    _nonneg_float("call_us", call_us)
    v = _volume("volume_bytes", volume_bytes)
    alltoall_volumes(v, ep, ranks_per_node)  # validates ep against ranks_per_node
    g = ranks_per_node
    if ep <= g or g == 1:
        return all_to_all_flat_seconds(v, ep, g, latency_us, intra_gbps, inter_gbps, call_us)
    n = ep // g
    return (_phase_seconds(g - 1, v * (g - 1) / g, intra_gbps, "intra", latency_us, call_us)
            + _phase_seconds(n - 1, v * (n - 1) / n, inter_gbps, "inter", latency_us, call_us))


def pipelined_step_seconds(comm_s: float, gemm_s: float, chunks: int = 1,
                           chunk_overhead_s: float = 0.0) -> float:
    """Communication and expert GEMMs pipelined over ``chunks`` equal chunks (chunk i's GEMMs
    hide chunk i+1's exchange): a two-stage pipeline of ``n = chunks`` items, each stage taking
    ``c/n`` and ``g/n``, lasts ``(c + g)/n + (n - 1)·max(c, g)/n``, i.e.

        t = max(c, g) + min(c, g) / n,   c = comm_s + (n - 1)·chunk_overhead_s,  g = gemm_s

    (every extra chunk adds one more exchange's fixed cost ``chunk_overhead_s`` to the
    communication). ``n = 1``: ``c + g``, nothing hidden; ``n -> ∞``: ``max(c, g)``. Overlap
    hidden ``= c + g - t``, exposed communication ``= t - g``; in ``predict_layer``'s terms the
    overlap fraction is ``1 - 1/n`` (without chunk overhead)."""
    c = _nonneg_float("comm_s", comm_s)
    g = _nonneg_float("gemm_s", gemm_s)
    n = _positive_int("chunks", chunks)
    c += (n - 1) * _nonneg_float("chunk_overhead_s", chunk_overhead_s)
    return max(c, g) + min(c, g) / n


def load_fit(path: str | Path) -> dict:
    """The ``fit`` of a cluster bench result JSON (``python -m benchmarks cluster``).
    ValueError when the file has none or its fit failed."""
    data = json.loads(Path(path).read_text())
    fit = data.get("fit") if isinstance(data, dict) else None
    if not isinstance(fit, dict):
        raise ValueError(f"{path} holds no 'fit' (not a cluster bench result?)")
    if fit.get("error"):
        raise ValueError(f"{path}: its all-to-all fit failed: {fit['error']}")
    return fit


def fitted_assumptions(fit: dict) -> dict:
    """The cost-model parameters a :func:`fit_alltoall` result gives: ``gpus_per_node`` (its
    ranks per node), ``nvlink_gbps`` (intra-node bandwidth), ``ib_gbps`` (inter-node),
    ``latency_us`` (per call) and ``message_latency_us`` (per peer message). Parameters the fit
    left None or fitted <= 0 are absent (the caller keeps its default for them)."""
    out = {"gpus_per_node": fit.get("ranks_per_node"), "nvlink_gbps": fit.get("intra_gbps"),
           "ib_gbps": fit.get("inter_gbps"), "latency_us": fit.get("call_us"),
           "message_latency_us": fit.get("latency_us")}
    return {k: v for k, v in out.items() if v is not None and v > 0}


# ---- measured scaling ---------------------------------------------------------------------
def split_tokens(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` ranks, the remainder one each to the first ranks."""
    return [total // parts + (r < total % parts) for r in range(parts)]


def core_bound(procs: int, cores: int, base_procs: int = 1) -> float:
    """The best efficiency ``procs`` CPU-bound processes can reach on ``cores`` cores, against
    ``base_procs``: ``min(procs, cores) / procs · base_procs / min(base_procs, cores)``
    (weak and strong alike: the work per step is spread over at most ``cores`` cores)."""
    return min(procs, cores) / procs * base_procs / min(base_procs, cores)


def _worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    """One rank: build the EP layer, time every case, rank 0 writes the per-step maxima."""
    import torch
    import torch.distributed as dist

    from moe_parallel import MoEConfig, MoELayer, ParallelState

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=spec["timeout"]))
    try:
        ps = ParallelState.build(ep=world)
        cfg = MoEConfig(hidden_size=spec["hidden"], ffn_hidden_size=spec["ffn"],
                        num_experts=spec["experts"], top_k=spec["top_k"],
                        expert_impl=spec["expert_impl"])
        torch.manual_seed(0)
        layer = MoELayer(cfg, parallel_state=ps)
        out = {}
        for mode, tokens in spec["cases"].items():
            g = torch.Generator().manual_seed(1000 + rank)
            x = torch.randn(tokens[rank], spec["hidden"], generator=g, requires_grad=True)
            times = []
            for i in range(spec["warmup"] + spec["steps"]):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                layer(x).sum().backward()
                if i >= spec["warmup"]:
                    times.append(time.perf_counter() - t0)
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[mode] = t.tolist()
            if rank == 0:
                print(f"  N={world} {mode}: median {statistics.median(out[mode]) * 1e3:.1f} ms",
                      file=sys.stderr, flush=True)
        if rank == 0:
            Path(out_path).write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def run_world(world: int, spec: dict, timeout_s: float) -> dict[str, list[float]]:
    """Spawn ``world`` ranks running :func:`_worker`; their per-step times (max over ranks)
    per case. A run past ``timeout_s`` kills the ranks and raises RuntimeError."""
    import torch.multiprocessing as mp

    # the worker by its module name, also when this file runs as __main__
    worker = importlib.import_module("benchmarks.scaling_bench")._worker
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "times.json")
        ctx = mp.start_processes(worker, args=(world, free_port(), spec, out_path),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{world} ranks still running after {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return json.loads(Path(out_path).read_text())


def measure(procs: list[int], tokens_per_proc: int, strong_tokens: int, hidden: int, ffn: int,
            experts: int, top_k: int, warmup: int, steps: int, timeout_s: float) -> dict:
    """Weak and strong scaling rows over ``procs`` (see the module docstring)."""
    for n in procs:
        if experts % n:
            raise ValueError(f"experts {experts} is not divisible by the process count {n}")
        if strong_tokens < n:
            raise ValueError(f"strong_tokens {strong_tokens} is below the process count {n}")
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows: list[dict] = []
    for n in sorted(procs):
        print(f"measuring N={n} ...", file=sys.stderr, flush=True)
        cases = {"weak": [tokens_per_proc] * n, "strong": split_tokens(strong_tokens, n)}
        spec = dict(hidden=hidden, ffn=ffn, experts=experts, top_k=top_k, warmup=warmup,
                    steps=steps, timeout=timeout_s, cases=cases, expert_impl=EXPERT_IMPL)
        t0 = time.perf_counter()
        times = run_world(n, spec, timeout_s)
        print(f"  N={n} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for mode, toks in cases.items():
            step = statistics.median(times[mode])
            rows.append({"mode": mode, "procs": n, "ep": n, "experts_per_rank": experts // n,
                         "tokens_per_proc": toks, "global_tokens": sum(toks),
                         "step_s": step, "step_s_all": times[mode],
                         "tokens_per_s": sum(toks) / step})
    for mode in ("weak", "strong"):
        mrows = [r for r in rows if r["mode"] == mode]
        base = mrows[0]
        for r in mrows:
            if mode == "weak":
                r["efficiency"] = base["step_s"] / r["step_s"]
            else:
                r["efficiency"] = base["procs"] * base["step_s"] / (r["procs"] * r["step_s"])
            r["core_bound"] = core_bound(r["procs"], cores, base["procs"])
    return {"config": {"hidden": hidden, "ffn": ffn, "experts": experts, "top_k": top_k,
                       "dtype": "float32", "expert_impl": EXPERT_IMPL,
                       "tokens_per_proc": tokens_per_proc, "strong_tokens": strong_tokens,
                       "warmup": warmup, "steps": steps, "threads_per_proc": 1,
                       "backend": "gloo"},
            "load_avg_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
            "note": (f"{os.cpu_count()} cores; runs with more processes than cores are "
                     "oversubscribed: the efficiencies show the overheads of expert parallelism "
                     "on CPU, not the speedup of a GPU cluster"),
            "rows": rows}


def _machine_info() -> dict:
    """``benchmarks.machine.machine_info()``, imported here: the cost model needs no torch."""
    from benchmarks.machine import machine_info

    return machine_info()


# ---- output -----------------------------------------------------------------------------------
def print_measured(measured: dict) -> None:
    c = measured["config"]
    print(f"\nMeasured: H={c['hidden']} F={c['ffn']} E={c['experts']} k={c['top_k']} float32 "
          f"{c['expert_impl']}, gloo, 1 thread per process, forward+backward, median of "
          f"{c['steps']}")
    head = (f"{'mode':<7} {'procs':>5} {'E/rank':>6} {'tok/proc':>8} {'global':>7} "
            f"{'step ms':>8} {'tokens/s':>9} {'effic.':>7} {'bound':>6}")
    print(head)
    print("-" * len(head))
    for r in measured["rows"]:
        toks = r["tokens_per_proc"]
        per = str(toks[0]) if len(set(toks)) == 1 else f"~{r['global_tokens'] // r['procs']}"
        print(f"{r['mode']:<7} {r['procs']:>5} {r['experts_per_rank']:>6} {per:>8} "
              f"{r['global_tokens']:>7} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['efficiency']:7.3f} {r['core_bound']:6.3f}")
    load = measured["load_avg_1_5_15"]
    print("weak: t1/tN; strong: t1/(N*tN); bound: min(1, cores/N), the best a CPU-bound run "
          "can reach here.")
    print(f"{measured['note']}. 1-min load average "
          f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after.")


def print_cost_model(cm: dict) -> None:
    a, m = cm["assumptions"], cm["assumptions"]["model"]
    print(f"\nCost model (per GPU, one MoE layer forward+backward): T={m['tokens']} "
          f"H={m['hidden']} F={m['ffn']} E={m['experts']} k={m['top_k']} "
          f"{m['dtype_bytes']} B/elem {m['activation']}")
    source = a.get("source", {})
    tag = lambda k: source.get(k, "assumed" if k in a.get("assumed", ()) else "given")  # noqa: E731
    print(f"{a['gpus_per_node']} GPUs/node [{tag('gpus_per_node')}], NVLink "
          f"{a['nvlink_gbps']:.4g} GB/s [{tag('nvlink_gbps')}], IB {a['ib_gbps']:.4g} GB/s per "
          f"GPU [{tag('ib_gbps')}], grouped GEMM {a['gemm_tflops']:g} TFLOP/s "
          f"[{tag('gemm_tflops')}], overlap {a['overlap']:g} [{tag('overlap')}], latency "
          f"{a['latency_us']:.4g} us per all-to-all [{tag('latency_us')}] + "
          f"{a.get('message_latency_us', 0.0):.4g} us per message "
          f"[{tag('message_latency_us')}]")
    if a.get("assumed"):
        print(f"ASSUMED (defaults, not measurements): {', '.join(a['assumed'])}")
    if a.get("fitted"):
        print(f"FITTED from {a['fit_source']}: {', '.join(a['fitted'])}")
    head = (f"{'EP':>4} {'nodes':>5} {'E/GPU':>5} {'NVLink':>7} {'IB':>7} {'a2a ms':>7} "
            f"{'comm ms':>8} {'GEMM ms':>8} {'step ms':>8} {'comm %':>7}")
    print(head)
    print("-" * len(head))
    for r in cm["rows"]:
        print(f"{r['ep']:>4} {r['nodes']:>5} {r['experts_per_gpu']:>5} "
              f"{r['nvlink_fraction']:7.1%} {r['ib_fraction']:7.1%} {r['a2a_ms']:7.2f} "
              f"{r['comm_ms']:8.2f} {r['gemm_ms']:8.2f} {r['step_ms']:8.2f} "
              f"{r['comm_share']:7.1%}")
    print(f"all-to-all volume per direction {cm['rows'][0]['a2a_bytes'] / 1e6:.1f} MB, "
          f"4 per layer; NVLink/IB = share of that volume on each link.")


def plot_cost_model(cm: dict, path: Path) -> bool:
    """Predicted step time (GEMM, exposed communication) and communication share vs EP, as a
    PNG; False (with a message) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    rows, a, m = cm["rows"], cm["assumptions"], cm["assumptions"]["model"]
    eps = [r["ep"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(eps, [r["step_ms"] for r in rows], "o-", label="step (predicted)")
    ax1.plot(eps, [r["gemm_ms"] for r in rows], "s--", label="expert GEMMs")
    ax1.plot(eps, [r["step_ms"] - r["gemm_ms"] for r in rows], "^--",
             label="exposed all-to-all")
    ax1.set_ylabel("ms per layer (forward+backward)")
    ax2.plot(eps, [100 * r["comm_share"] for r in rows], "o-", color="C3")
    ax2.set_ylabel("communication share of step (%)")
    ax2.set_ylim(0, 100)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.set_xlabel("EP size")
        ax.grid(alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax1.legend()
    src = a.get("source", {})
    fig.suptitle(f"MoE layer cost model, T={m['tokens']} H={m['hidden']} F={m['ffn']} "
                 f"E={m['experts']} k={m['top_k']}; NVLink {a['nvlink_gbps']:.4g} GB/s "
                 f"({src.get('nvlink_gbps', 'assumed')}), IB {a['ib_gbps']:.4g} GB/s "
                 f"({src.get('ib_gbps', 'assumed')}), GEMM {a['gemm_tflops']:g} TFLOP/s, "
                 f"overlap {a['overlap']:g}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling_bench",
                                description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("measured scaling (this machine, gloo)")
    g.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    g.add_argument("--tokens-per-proc", type=int, default=1024, help="weak scaling")
    g.add_argument("--strong-tokens", type=int, default=2048,
                   help="global tokens of strong scaling")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--ffn", type=int, default=512)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--steps", type=int, default=5)
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per process count")
    g.add_argument("--skip-measure", action="store_true")
    c = p.add_argument_group("cost model (GPU cluster); defaults are ASSUMED H100 values")
    c.add_argument("--cm-tokens", type=int, default=DEFAULT_MODEL["tokens"],
                   help="tokens per GPU")
    c.add_argument("--cm-hidden", type=int, default=DEFAULT_MODEL["hidden"])
    c.add_argument("--cm-ffn", type=int, default=DEFAULT_MODEL["ffn"])
    c.add_argument("--cm-experts", type=int, default=DEFAULT_MODEL["experts"])
    c.add_argument("--cm-top-k", type=int, default=DEFAULT_MODEL["top_k"])
    c.add_argument("--cm-dtype-bytes", type=int, default=DEFAULT_MODEL["dtype_bytes"])
    c.add_argument("--cm-activation", default=DEFAULT_MODEL["activation"],
                   choices=tuple(ACTIVATION_MATRICES))
    c.add_argument("--ep-sizes", type=int, nargs="+", default=list(EP_SIZES))
    c.add_argument("--gpus-per-node", type=int, default=None)
    c.add_argument("--nvlink-gbps", type=float, default=None,
                   help="NVLink GB/s per GPU per direction")
    c.add_argument("--ib-gbps", type=float, default=None,
                   help="InfiniBand GB/s per GPU per direction")
    c.add_argument("--gemm-tflops", type=float, default=None,
                   help="grouped-GEMM TFLOP/s (e.g. a value measured by grouped_gemm_bench)")
    c.add_argument("--overlap", type=float, default=None,
                   help="fraction of min(comm, GEMM) hidden by overlap, 0..1")
    c.add_argument("--latency-us", type=float, default=None,
                   help="fixed latency per all-to-all")
    c.add_argument("--message-latency-us", type=float, default=None,
                   help="latency per peer message of an all-to-all (x (ep - 1))")
    c.add_argument("--fit", type=Path, default=None, metavar="RESULT.json",
                   help="a `python -m benchmarks cluster` result: use its fitted ranks per "
                        "node, bandwidths and latencies instead of the defaults")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: next to the JSON)")
    args = p.parse_args(argv)

    measured = None
    if not args.skip_measure:
        measured = measure(args.procs, args.tokens_per_proc, args.strong_tokens, args.hidden,
                           args.ffn, args.experts, args.top_k, args.warmup, args.steps,
                           args.timeout)

    model = {"tokens": args.cm_tokens, "hidden": args.cm_hidden, "ffn": args.cm_ffn,
             "experts": args.cm_experts, "top_k": args.cm_top_k,
             "dtype_bytes": args.cm_dtype_bytes, "activation": args.cm_activation}
    try:
        fitted = fitted_assumptions(load_fit(args.fit)) if args.fit is not None else {}
    except (OSError, ValueError) as exc:
        p.error(f"--fit {args.fit}: {exc}")
    defaults = {**DEFAULT_ASSUMPTIONS, "message_latency_us": 0.0}
    cluster, source = {}, {}
    for k, default in defaults.items():
        given = getattr(args, k)
        if given is not None:
            cluster[k], source[k] = given, "given"
        elif k in fitted:
            cluster[k], source[k] = fitted[k], "fitted"
        elif k == "message_latency_us":  # not part of the default model
            cluster[k], source[k] = default, "not modelled"
        else:
            cluster[k], source[k] = default, "assumed"
    try:
        rows = cost_model_rows(args.ep_sizes, **model, **cluster)
    except ValueError as exc:
        p.error(str(exc))
    cost_model = {
        "assumptions": {
            **cluster, "model": model,
            "assumed": sorted(k for k, v in source.items() if v == "assumed"),
            "fitted": sorted(k for k, v in source.items() if v == "fitted"),
            "fit_source": str(args.fit) if args.fit is not None else None,
            "source": source,
            "note": ("bandwidths and GEMM throughput left at their defaults are assumptions "
                     "typical of H100 clusters, not measurements; balanced routing; EP ranks "
                     "packed onto full nodes; formulas in benchmarks/scaling_bench.py"),
        },
        "rows": rows,
    }

    if measured is not None:
        print_measured(measured)
    print_cost_model(cost_model)

    cmd = ["python -m benchmarks.scaling_bench", *(sys.argv[1:] if argv is None else argv)]
    out = {"date": str(date.today()), "command": " ".join(cmd), "machine": _machine_info(),
           "measured": measured, "cost_model": cost_model}
    path = args.out or Path(__file__).parent / "results" / f"scaling_{date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = args.plot or path.with_suffix(".png")
    if plot_cost_model(cost_model, plot):
        out["plot"] = str(plot)
        print(f"wrote {plot}")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
