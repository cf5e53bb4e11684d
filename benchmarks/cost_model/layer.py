"""The GPU-cluster cost of one MoE layer, per GPU, forward + backward (pure functions).

For T tokens per GPU, hidden H, expert ffn F, E experts, top-k k, b bytes per element, EP size
ep, G GPUs per node; routing assumed balanced (every GPU sends and receives T·k rows):
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
    communication share = exposed communication / t_step = (t_comm - o·min(...)) / t_step;
  * chunked overlap (:func:`pipelined_step_seconds`): ``max(c, g) + min(c, g)/n``.
Not modelled: router, permutation and activation kernels, load imbalance, the grouped-GEMM
efficiency drop when experts get few rows, all-to-all message overheads beyond ``latency``,
congestion of the IB fabric. The bandwidth and throughput defaults (NVLink 450 GB/s per GPU per
direction, IB 50 GB/s per GPU = 400 Gb/s NDR, bf16 grouped GEMM 600 TFLOP/s) are assumptions
typical of H100 clusters, not measurements. The default layer is DeepSeek-V3-like: T=4096,
H=7168, F=2048, E=256, k=8, bf16.
"""

from __future__ import annotations

import math

from benchmarks.cost_model.checks import nonneg_float, positive_float, positive_int

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


def a2a_bytes(tokens: int, hidden: int, top_k: int, dtype_bytes: int) -> int:
    """Bytes one GPU sends (and receives) in one all-to-all: ``T·k·H·b``."""
    for name, v in (("tokens", tokens), ("hidden", hidden), ("top_k", top_k),
                    ("dtype_bytes", dtype_bytes)):
        positive_int(name, v)
    return tokens * top_k * hidden * dtype_bytes


def link_fractions(ep: int, gpus_per_node: int = 8) -> tuple[float, float, float]:
    """``(f_self, f_nv, f_ib)``: shares of one all-to-all's volume that stay on the GPU, cross
    NVLink and cross InfiniBand, for an EP group packed onto full nodes:
    ``1/ep``, ``(min(ep, G) - 1)/ep``, ``(ep - min(ep, G))/ep``. They sum to 1.
    ``ep > G`` must be a multiple of G (full nodes)."""
    positive_int("ep", ep)
    positive_int("gpus_per_node", gpus_per_node)
    if ep > gpus_per_node and ep % gpus_per_node:
        raise ValueError(f"ep {ep} above gpus_per_node {gpus_per_node} must be a multiple of it "
                         f"(EP ranks packed onto full nodes)")
    intra = min(ep, gpus_per_node)
    return 1 / ep, (intra - 1) / ep, (ep - intra) / ep

def all_to_all_seconds(volume_bytes: float, ep: int, gpus_per_node: int = 8,
                       nvlink_gbps: float = 450.0, ib_gbps: float = 50.0,
                       latency_us: float = 0.0, message_latency_us: float = 0.0) -> float:
    """One all-to-all: ``latency + message_latency·(ep - 1) + max(V·f_nv / BW_nv, V·f_ib /
    BW_ib)`` seconds, the bandwidths in GB/s (1e9 B/s) per GPU per direction (``latency``: a
    fixed cost per call; ``message_latency``: per peer message, as :func:`fit_alltoall`
    fits it; both default 0)."""
    if not volume_bytes >= 0:
        raise ValueError(f"volume_bytes must be >= 0, got {volume_bytes!r}")
    nv_bw = positive_float("nvlink_gbps", nvlink_gbps) * 1e9
    ib_bw = positive_float("ib_gbps", ib_gbps) * 1e9
    latency = nonneg_float("latency_us", latency_us) * 1e-6
    per_message = nonneg_float("message_latency_us", message_latency_us) * 1e-6
    _, f_nv, f_ib = link_fractions(ep, gpus_per_node)
    return (latency + per_message * (ep - 1)
            + max(volume_bytes * f_nv / nv_bw, volume_bytes * f_ib / ib_bw))


def expert_gemm_flops(tokens: int, hidden: int, ffn: int, top_k: int,
                      activation: str = "swiglu") -> tuple[int, int]:
    """``(forward, backward)`` expert GEMM FLOPs of one GPU: forward ``2·T·k·H·m·F`` with
    ``m = 3`` for SwiGLU (gate, up, down) and 2 for GELU/ReLU; backward ``2 × forward``."""
    for name, v in (("tokens", tokens), ("hidden", hidden), ("ffn", ffn), ("top_k", top_k)):
        positive_int(name, v)
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
    positive_int("experts", experts)
    positive_int("ep", ep)
    if experts % ep:
        raise ValueError(f"experts {experts} is not divisible by ep {ep}")
    if isinstance(overlap, bool) or not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be in [0, 1], got {overlap!r}")
    tflops = positive_float("gemm_tflops", gemm_tflops)
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
    c = nonneg_float("comm_s", comm_s)
    g = nonneg_float("gemm_s", gemm_s)
    n = positive_int("chunks", chunks)
    c += (n - 1) * nonneg_float("chunk_overhead_s", chunk_overhead_s)
    return max(c, g) + min(c, g) / n
