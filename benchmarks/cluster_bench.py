"""Cluster scaling over EP sizes: all-to-all bandwidth, dispatch overhead and the MoE layer's step
time, under any launcher, with a fitted all-to-all cost model.

Running. Under torchrun (one or several nodes), srun or mpirun every process calls
:func:`rank_main`, which joins the job through ``moe_parallel.distributed.init_distributed()``
(NCCL with GPUs, gloo on CPU). Run bare (no RANK/WORLD_SIZE, OMPI_*, PMI_* or SLURM_PROCID in the
environment) it spawns ``--nproc`` (4) local processes itself, each with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT set, which run the same
:func:`rank_main` over gloo; ``--nproc 1`` runs in this process (world 1: the layer at ep 1
only, no all-to-all). Torch threads per rank: 1 on CPU unless ``--threads``.

    python -m benchmarks cluster --nproc 4                      # this machine, 4 gloo ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m benchmarks cluster                                   # 2 nodes x 8 GPUs
    sbatch launch/slurm_bench.sbatch                            # the same under srun

EP sizes: ``--ep-sizes``, else every power of 2 from 2 up to the world that divides it; each
is ``ParallelState.build(ep=ep)``: EP groups of ``ep`` consecutive ranks, the rest EDP/DP (all
groups run at once, as in training). Ranks per node ``G``: ``--ranks-per-node``, else the ranks
sharing a node, a node being a distinct (hostname, launcher node index: torchrun's GROUP_RANK,
SLURM_NODEID) pair; ``nodes = world / G``.

What is measured (each part on every EP size; the variants of one table interleaved round by
round; a figure is the slowest rank's: per round every rank runs ``iters`` calls after a
barrier, ``t_round = max_ranks(elapsed) / iters``; reported: the median over ``--rounds`` rounds,
with min, max and the inter-quartile range over the rounds):

* ``sweep``: one ``dist.all_to_all_single`` over the EP group with even splits, per send-buffer
  size ``S`` in ``--sweep-bytes`` (default 4 KiB .. 32 MiB on CPU, .. 256 MiB on CUDA) plus the
  dispatch's balanced volume ``T·k·H·b``, below 1 MiB with more calls per round
  (:func:`sweep_iters`, up to 10 x ``--iters``); these points fit the cost model (below).
* ``dispatch``: ``build_dispatcher(E, ps, kind)`` per kind in ``--dispatchers`` (default: every
  all-to-all-like kind of ``moe_parallel.dispatch.DISPATCHERS``, the hierarchical
  ``"alltoall_hierarchical"`` included once it is there; it gets
  ``ParallelState.build(ep=ep, ranks_per_node=G)``, and is reported "not available" while
  either is missing), identity experts: ``combine(dispatch(x, routing))`` forward (autograd
  recording) and forward+backward (``y.backward(g)``), ``T = --tokens`` per rank, top-``k``
  over ``E`` experts, against the raw ``all_to_all_single`` calls moving the same bytes with
  the same splits (counts, rows there and back; forward+backward adds the two backward row
  exchanges). ``ratio = ours / raw``. Routings (built as ``Routing`` objects, no router):
  ``balanced`` (token ``t`` takes experts ``(t·k + j) mod E``: every rank sends the same rows to
  each expert), ``zipf`` (popularity of the expert of popularity rank ``i`` ∝ ``1/(i+1)^s``,
  ``s = --zipf-s``, ranks a fixed permutation of the experts, top-k sampled without
  replacement, seed ``--seed`` + rank), ``single_hot`` (every token's first choice is expert 0,
  the others round-robin over the rest: worst case, EP rank 0 receives ``T`` rows from
  everyone).
* ``layer``: ``MoELayer(MoEConfig(--layer-hidden, --layer-ffn, E, k), parallel_state=ps)``
  forward + backward of ``y.sum()`` (its own router; no gradient all-reduce), ep = 1 (every
  expert local, no exchange) and every EP size. Weak scaling: ``--layer-tokens`` per rank,
  efficiency ``t_1 / t_ep``; strong scaling: ``--global-tokens`` per EP group split over its
  ``ep`` ranks, efficiency ``t_1 / (ep · t_ep)``. tokens/s per rank = tokens per rank / step.
* ``overlap``: the same layer with one shared expert (its width ``--layer-ffn``), weak scaling,
  at ep = 1 and every EP size, in the variants of :data:`OVERLAP_VARIANTS`: none,
  ``shared_expert_overlap`` (shared experts while the dispatch exchange is in flight),
  ``overlap_chunks`` 2 and 4 (routed tokens pipelined in chunks), both; step time and its ratio
  to ``none`` at the same EP size (below 1: the overlap pays), printed beside the chunked
  model's prediction.
* ``train`` (``--train-model``): ``moe_parallel.train``'s model (``build_model``, its flags via
  ``--train-args``) at the largest EP size, one ``train_step`` (forward, backward, gradient
  sync, clip, AdamW) per call: tokens/s per rank and model FLOPs utilisation
  ``MFU = tokens/s per rank · F / peak``, ``F = 6·N_active + 12·L·H·S`` FLOPs per token
  (:func:`model_flops_per_token`, PaLM's count), the peak from ``--peak-tflops``, else
  :data:`PEAK_TFLOPS` by GPU name (bf16 dense); on CPU MFU is null with the reason.

Bandwidth, in nccl-tests' conventions for all-to-all: ``S`` = one rank's send buffer (its own
chunk included, as nccl-tests' ``size``), ``algbw = S / t``, ``busbw = algbw · (n - 1)/n`` (n =
EP group size), GB/s = 1e9 B/s. With uneven routing ``S`` is the mean over the ranks (the total
moved / world) and ``t`` the slowest rank's; a dispatch forward moves ``2·S`` (there and back),
forward+backward ``4·S`` (the counts exchange is not counted). ``busbw`` is then the
off-rank bytes per rank per second for even splits; ``offrank_bytes`` is recorded apart.

Cost model (``benchmarks.scaling_bench``): :func:`~benchmarks.scaling_bench.fit_alltoall` fits
``t = call + latency·(ep - 1) + V_intra/B_intra + V_inter/B_inter`` to the sweep (volumes per
rank from the real layout), and the report prints the fitted values, each fitted point with
the model's prediction and error, the flat and hierarchical
(:func:`~benchmarks.scaling_bench.all_to_all_hierarchical_seconds`) predictions up to
``--predict-ep-max`` (256) at the dispatch volume with the fitted G (inter-node bandwidth: the
fitted one, else ``--predict-inter-gbps``, else the intra-node one, flagged ASSUMED), and
where each wins; and the chunked-overlap estimate
(:func:`~benchmarks.scaling_bench.pipelined_step_seconds`) for the largest EP size's layer
step, exposed communication taken as ``t_ep - t_1`` (weak scaling).

Output (rank 0): the tables on stdout, JSON via ``benchmarks.record.save_result`` (default
``benchmarks/results/cluster_<backend>_<date>.json``, ``--out``) holding the config, topology
(nodes, ranks per node, hostnames, backend, NCCL/gloo and torch versions, every rank's device,
and ``benchmarks.machine.machine_info()`` of local rank 0 of every node: ``node_machines``;
``machine`` is rank 0's), every part's rows, the fit and the predictions; a PNG beside it
(``--plot``; skipped with a message without matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from benchmarks import scaling_bench as sb
from benchmarks.local_ranks import free_port, run_ranks

ROUTINGS = ("balanced", "zipf", "single_hot")
PARTS = ("sweep", "dispatch", "layer", "overlap")
# part ``overlap``: MoEConfig overrides of each variant (every variant has one shared expert)
OVERLAP_VARIANTS = {
    "none": {},
    "shared_overlap": {"shared_expert_overlap": True},
    "chunks2": {"overlap_chunks": 2},
    "chunks4": {"overlap_chunks": 4},
    "shared_overlap+chunks2": {"shared_expert_overlap": True, "overlap_chunks": 2},
}
HIERARCHICAL = "alltoall_hierarchical"
# bf16 dense peak TFLOP/s by GPU name (substring of torch.cuda.get_device_name)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "PMI_RANK", "PMI_SIZE", "SLURM_PROCID")
SPAWNED = "MOE_PARALLEL_CLUSTER_BENCH_SPAWNED"  # set in the ranks this script spawns
DEFAULT_SWEEP_BYTES = {"cpu": (4096, 65536, 1 << 20, 8 << 20, 32 << 20),
                       "cuda": (4096, 65536, 1 << 20, 16 << 20, 256 << 20)}


class PlanError(ValueError):
    """Bad command-line input found once the world size is known (the message names the
    option)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- command line -----------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m benchmarks cluster --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks cluster",
                                description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--nproc", type=_positive_int, default=None,
        help="ranks to spawn when run without a launcher (default 4); under a launcher it "
             "must equal the world size if given")
    add("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    add("--train-model", action="store_true",
        help="also time moe_parallel.train's model (tokens/s, MFU)")
    add("--train-args", default="--layers 2 --hidden 128 --ffn 256 --experts 8 --seq-len 64 "
                                "--batch-size 4",
        help="moe_parallel.train flags of that model (--ep is the largest EP size)")
    add("--ep-sizes", type=_positive_int, nargs="+", default=None,
        help="EP sizes (default: powers of 2 from 2 dividing the world)")
    add("--dispatchers", nargs="+", default=None,
        help="dispatcher kinds (default: the all-to-all-like kinds of DISPATCHERS)")
    add("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    add("--zipf-s", type=_positive_float, default=1.2, help="zipf exponent s")
    add("--tokens", type=_positive_int, default=1024, help="tokens per rank (dispatch)")
    add("--hidden", type=_positive_int, default=1024, help="hidden size (sweep volume, dispatch)")
    add("--experts", type=_positive_int, default=None,
        help="experts (default: a multiple of every EP size, >= max(8, 2 x the largest))")
    add("--top-k", type=_positive_int, default=2)
    add("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="default: bfloat16 on CUDA, float32 on CPU")
    add("--sweep-bytes", type=_positive_int, nargs="+", default=None,
        help="send-buffer bytes per rank of the all-to-all sweep, the dispatch volume added "
             f"(default: {DEFAULT_SWEEP_BYTES['cpu']} on CPU, {DEFAULT_SWEEP_BYTES['cuda']} "
             "on CUDA)")
    add("--iters", type=_positive_int, default=3, help="calls per timed round")
    add("--rounds", type=_positive_int, default=5, help="timed rounds")
    add("--warmup", type=_nonneg_int, default=1, help="untimed calls per variant first")
    add("--layer-tokens", type=_positive_int, default=256, help="weak scaling: tokens per rank")
    add("--global-tokens", type=_positive_int, default=None,
        help="strong scaling: tokens per EP group, split over its ranks (default: "
             "--layer-tokens x the largest EP size)")
    add("--layer-hidden", type=_positive_int, default=256)
    add("--layer-ffn", type=_positive_int, default=512)
    add("--layer-dispatcher", default="alltoall",
        help="MoEConfig.token_dispatcher_type of the layer")
    add("--layer-iters", type=_positive_int, default=1)
    add("--layer-rounds", type=_positive_int, default=None, help="default: --rounds")
    add("--peak-tflops", type=_positive_float, default=None,
        help="peak FLOP/s per device for MFU (default: by GPU name, none on CPU)")
    add("--threads", type=_positive_int, default=None,
        help="torch threads per rank (default: 1 on CPU, torch's on CUDA)")
    add("--ranks-per-node", type=_positive_int, default=None,
        help="ranks per node G (default: the ranks sharing a host / launcher node)")
    add("--predict-ep-max", type=_positive_int, default=256)
    add("--predict-inter-gbps", type=_positive_float, default=None,
        help="inter-node GB/s for the predictions when the fit has none")
    add("--seed", type=_nonneg_int, default=0)
    add("--timeout", type=_positive_float, default=600.0,
        help="collective timeout in seconds (a lost rank raises instead of hanging)")
    add("--out", type=Path, default=None, help="JSON path")
    add("--plot", type=Path, default=None, help="PNG path (default: beside the JSON)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check what needs no world size (errors name the option, exit 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.predict_ep_max < 2:
        p.error(f"--predict-ep-max must be >= 2, got {args.predict_ep_max}")
    if args.train_args:
        try:
            shlex.split(args.train_args)
        except ValueError as exc:
            p.error(f"--train-args: {exc}")
    return args


def default_dispatchers() -> list[str]:
    """The all-to-all-like kinds of ``moe_parallel.dispatch.DISPATCHERS`` (the hierarchical one
    included once it is there)."""
    from moe_parallel.dispatch import DISPATCHERS

    return [k for k in DISPATCHERS if k.startswith("alltoall")]


def make_plan(args: argparse.Namespace, world: int) -> dict:
    """EP sizes, experts, strong-scaling tokens and dispatcher kinds for ``world`` ranks.
    :class:`PlanError` naming the option when they do not fit the world."""
    from moe_parallel import MoEConfig
    from moe_parallel.dispatch import DISPATCHERS

    if args.ep_sizes:
        eps = sorted(set(args.ep_sizes))
        for ep in eps:
            if ep < 2 or world % ep:
                raise PlanError(f"--ep-sizes: {ep} must be >= 2 and divide the world size "
                                f"{world}")
    else:
        eps = [2 ** i for i in range(1, world.bit_length()) if world % 2 ** i == 0]
    top = max(eps, default=1)
    lcm = math.lcm(*eps) if eps else 1
    experts = args.experts or lcm * math.ceil(max(8, 2 * top) / lcm)
    for ep in eps:
        if experts % ep:
            raise PlanError(f"--experts {experts} is not divisible by the EP size {ep}")
    if args.top_k > experts:
        raise PlanError(f"--top-k {args.top_k} is above the expert count {experts}")
    global_tokens = args.global_tokens or args.layer_tokens * top
    for ep in eps:
        if global_tokens % ep:
            raise PlanError(f"--global-tokens {global_tokens} is not divisible by the EP size "
                            f"{ep}")
    kinds = args.dispatchers or default_dispatchers()
    for k in kinds:
        if k not in DISPATCHERS and k != HIERARCHICAL:
            raise PlanError(f"--dispatchers: unknown kind {k!r}; known: {', '.join(DISPATCHERS)}")
    if "alltoall" not in kinds:
        kinds = ["alltoall", *kinds]  # the flat one gives the splits of the raw baseline
    try:
        MoEConfig(hidden_size=args.layer_hidden, ffn_hidden_size=args.layer_ffn,
                  num_experts=experts, top_k=args.top_k,
                  token_dispatcher_type=args.layer_dispatcher)
    except ValueError as exc:
        raise PlanError(f"--layer-dispatcher / --layer-hidden / --layer-ffn: {exc}") from None
    return {"ep_sizes": eps, "experts": experts, "global_tokens": global_tokens,
            "dispatchers": list(dict.fromkeys(kinds)),
            "layer_rounds": args.layer_rounds or args.rounds}


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a launcher started this process (any of :data:`LAUNCHER_VARS` set)."""
    return any(v in environ for v in LAUNCHER_VARS)


# ---- pure pieces ------------------------------------------------------------------------------
def summarize(rounds: list[float]) -> dict:
    """``{"seconds": median, "min", "max", "q1", "q3", "iqr", "rounds"}`` of per-round times
    (quartiles: ``statistics.quantiles(..., method="inclusive")``; one round: all equal)."""
    if not rounds:
        raise ValueError("rounds is empty")
    med = statistics.median(rounds)
    q1, _, q3 = (statistics.quantiles(rounds, n=4, method="inclusive") if len(rounds) > 1
                 else (rounds[0],) * 3)
    return {"seconds": med, "min": min(rounds), "max": max(rounds), "q1": q1, "q3": q3,
            "iqr": q3 - q1, "rounds": list(rounds)}


def bandwidth(payload_bytes: float, seconds: float, n: int) -> tuple[float, float]:
    """``(algbw, busbw)`` in GB/s (1e9 B/s), nccl-tests' all-to-all convention:
    ``algbw = payload / t``, ``busbw = algbw · (n - 1) / n`` over ``n`` ranks."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    alg = payload_bytes / seconds / 1e9
    return alg, alg * (n - 1) / n


def zipf_popularity(experts: int, s: float, seed: int) -> torch.Tensor:
    """``[E]`` float64 probabilities: the expert of popularity rank ``i`` gets ``∝ 1/(i+1)^s``;
    ranks are a permutation of the experts drawn with ``seed`` (the same on every rank)."""
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(seed))
    weight = 1.0 / (torch.arange(experts, dtype=torch.float64) + 1) ** s
    pop = torch.empty(experts, dtype=torch.float64)
    pop[order] = weight
    return pop / pop.sum()


def make_routing(kind: str, tokens: int, experts: int, top_k: int, rank: int = 0, seed: int = 0,
                 zipf_s: float = 1.2, device: torch.device | str = "cpu"):
    """A ``moe_parallel.routing.Routing`` of ``tokens`` tokens (see the module docstring for
    ``balanced``, ``zipf`` and ``single_hot``): uniform combine weights ``1/k``, every
    assignment kept, zero logits. ValueError on an unknown kind or ``top_k > experts``."""
    from moe_parallel.routing.router import Routing, count_assignments

    if kind not in ROUTINGS:
        raise ValueError(f"routing kind must be one of {ROUTINGS}, got {kind!r}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    t = torch.arange(tokens)
    if kind == "balanced":
        idx = (t[:, None] * top_k + torch.arange(top_k)) % experts
    elif kind == "single_hot":
        rest = 1 + (t[:, None] * (top_k - 1) + torch.arange(top_k - 1)) % max(experts - 1, 1)
        idx = torch.cat([torch.zeros(tokens, 1, dtype=torch.int64), rest], dim=1)
    else:
        pop = zipf_popularity(experts, zipf_s, seed)
        g = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
        idx = torch.multinomial(pop.expand(tokens, -1), top_k, replacement=False, generator=g)
    idx = idx.to(torch.int64)
    return Routing(probs=torch.full((tokens, top_k), 1.0 / top_k, device=device),
                   expert_idx=idx.to(device), keep=None,
                   logits=torch.zeros(tokens, experts, device=device),
                   routed_per_expert=count_assignments(idx, experts).to(device))


def node_layout(ranks: list[dict], ranks_per_node: Optional[int] = None) -> dict:
    """Nodes of the job from every rank's ``{"hostname", "node_index"}`` (rank order):
    a node is a distinct ``(hostname, node_index)`` (``node_index``: the launcher's node rank,
    or None), or with ``ranks_per_node`` ``(hostname, rank // ranks_per_node)``. Returns
    ``{"nodes", "ranks_per_node", "node_of", "hostnames"}``; PlanError when the nodes hold
    different rank counts or ``ranks_per_node`` does not divide the world."""
    world = len(ranks)
    if ranks_per_node is not None and world % ranks_per_node:
        raise PlanError(f"--ranks-per-node {ranks_per_node} does not divide the world size "
                        f"{world}")
    keys = [(r["hostname"], r.get("node_index") if ranks_per_node is None
             else i // ranks_per_node) for i, r in enumerate(ranks)]
    ids: dict = {}
    node_of = [ids.setdefault(k, len(ids)) for k in keys]
    counts = [node_of.count(n) for n in range(len(ids))]
    if len(set(counts)) != 1:
        raise PlanError(f"uneven ranks per node {counts} (nodes {list(ids)}): pass "
                        f"--ranks-per-node")
    return {"nodes": len(ids), "ranks_per_node": counts[0], "node_of": node_of,
            "hostnames": sorted({r["hostname"] for r in ranks})}


def layout_volumes(bytes_per_rank: float, ep: int, node_of: list[int]) -> dict:
    """One even all-to-all over the EP groups of ``ParallelState.build(ep=ep)``: for the rank
    with the most inter-node (then intra-node) traffic, ``messages = ep - 1`` and the bytes it
    sends to ranks of its node and of other nodes (``bytes_per_rank / ep`` per peer)."""
    from moe_parallel.distributed.parallel_state import grid_groups

    world = len(node_of)
    best = (0, 0)
    for members in grid_groups(world, ep=ep)["ep"]:
        for r in members:
            inter = sum(node_of[j] != node_of[r] for j in members)
            intra = len(members) - 1 - inter
            best = max(best, (inter, intra))
    inter, intra = best
    return {"messages": ep - 1, "intra_bytes": bytes_per_rank * intra / ep,
            "inter_bytes": bytes_per_rank * inter / ep}


def model_flops_per_token(hidden: int, ffn: int, layers: int, vocab: int, seq_len: int,
                          experts: int, top_k: int, activation: str = "swiglu") -> int:
    """Training FLOPs per token of ``moe_parallel.train``'s model, PaLM's count:
    ``6·N_active + 12·L·H·S`` with ``N_active = L·(4H² + E·H + k·m·H·F) + H·V`` (attention
    projections, router, the ``k`` routed experts' ``m`` matrices, m = 3 SwiGLU / 2 GELU, head;
    embeddings are lookups) and ``12·L·H·S`` the attention scores and values (non-causal)."""
    m = sb.ACTIVATION_MATRICES[activation]
    n_active = layers * (4 * hidden * hidden + experts * hidden + top_k * m * hidden * ffn)
    n_active += hidden * vocab
    return 6 * n_active + 12 * layers * hidden * seq_len


def peak_tflops_for(device_name: Optional[str]) -> Optional[float]:
    """bf16 dense peak TFLOP/s of a GPU by name (:data:`PEAK_TFLOPS`), None when unknown."""
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def sweep_iters(iters: int, nbytes: int) -> int:
    """Calls per round of one sweep size: ``iters`` from 1 MiB up, more below (small exchanges
    are latency-bound and noisy): ``min(10·iters, max(iters, round(iters · 1 MiB / S)))``."""
    return min(10 * iters, max(iters, round(iters * 2 ** 20 / nbytes)))


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, v = [], 1
    while v <= hi:
        if v >= lo:
            out.append(v)
        v *= 2
    return out


def predictions(fit: dict, volume_bytes: float, ep_max: int, measured: Mapping[int, float],
                inter_gbps: Optional[float] = None) -> dict:
    """Flat and hierarchical all-to-all times predicted by ``fit`` at ``volume_bytes`` per
    rank for EP sizes up to ``ep_max`` (powers of 2 and the measured sizes that suit the fitted
    G), beside the measured time where there is one (``measured``: ep -> seconds), and which
    wins. Inter-node bandwidth: ``fit``'s, else ``inter_gbps``, else the intra-node one."""
    g = fit["ranks_per_node"]
    latency, call = max(fit["latency_us"], 0.0), max(fit["call_us"] or 0.0, 0.0)
    intra = fit["intra_gbps"]
    if fit["inter_gbps"] is not None:
        inter, inter_src = fit["inter_gbps"], "fitted"
    elif inter_gbps is not None:
        inter, inter_src = inter_gbps, "--predict-inter-gbps"
    else:
        inter, inter_src = intra, "ASSUMED = intra-node (no inter-node point measured)"
    intra_src = "fitted"
    if intra is None:
        intra, intra_src = inter, f"ASSUMED = inter-node ({inter_src})"
    if intra is None:
        return {"error": "the fit gave no usable bandwidth (see its warnings)"}
    eps = sorted({*_pow2_range(2, ep_max), *(e for e in measured if e <= ep_max)})
    rows = []
    for ep in eps:
        if ep > g and ep % g:
            continue
        flat = sb.all_to_all_flat_seconds(volume_bytes, ep, g, latency, intra, inter, call)
        hier = sb.all_to_all_hierarchical_seconds(volume_bytes, ep, g, latency, intra, inter,
                                                  call)
        winner = ("same (one node)" if ep <= g or g == 1 else
                  "hierarchical" if hier < flat else "flat")
        row = {"ep": ep, "nodes": max(1, ep // g), "flat_s": flat, "hierarchical_s": hier,
               "winner": winner, "measured_s": measured.get(ep)}
        if row["measured_s"]:
            row["rel_error"] = (flat - row["measured_s"]) / row["measured_s"]
        rows.append(row)
    multi = [r for r in rows if r["ep"] > g and g > 1]
    hier_wins = [r["ep"] for r in multi if r["winner"] == "hierarchical"]
    flat_wins = [r["ep"] for r in multi if r["winner"] == "flat"]
    if not multi:
        verdict = f"every predicted EP size fits one node of {g}: flat and hierarchical agree"
    else:
        verdict = (f"across nodes (G={g}): flat wins at ep {flat_wins or 'none'}, "
                   f"hierarchical at ep {hier_wins or 'none'}")
    return {"volume_bytes": volume_bytes, "ranks_per_node": g, "latency_us": latency,
            "call_us": call, "intra_gbps": intra, "inter_gbps": inter,
            "intra_source": intra_src, "inter_source": inter_src, "rows": rows,
            "verdict": verdict}


# ---- timing inside the ranks ------------------------------------------------------------------
def _timer(iters: int, rounds: int, warmup: int, sync: Callable[[], None],
           device: torch.device) -> Callable[..., dict]:
    """``time(fns, iters=, rounds=, warmup=, iters_of=)`` -> per name :func:`summarize` of the
    rounds' ``max_ranks(elapsed) / iters`` (``iters_of[name]`` calls for the names it holds);
    the functions run in turn within every round, each after a barrier; the maxima are taken
    in one all-reduce after the last round."""

    def time_fns(fns: dict, iters: int = iters, rounds: int = rounds, warmup: int = warmup,
                 iters_of: Optional[dict] = None) -> dict:
        calls = {name: (iters_of or {}).get(name, iters) for name in fns}
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        sync()
        local: dict = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                sync()
                local[name].append((time.perf_counter() - t0) / calls[name])
        t = torch.tensor([local[n] for n in fns], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return {name: summarize(row) for name, row in zip(fns, t.tolist())}

    return time_fns


def _hierarchical_states(eps: list[int], g: int, flat: dict) -> tuple[dict, dict]:
    """``ParallelState.build(ep=ep, ranks_per_node=g)`` per EP size (``flat[ep]`` itself when it
    was built with those nodes), or why not (every rank gets the same answer: the failures are
    argument checks)."""
    from moe_parallel import ParallelState
    from moe_parallel.dispatch import DISPATCHERS

    states, why = {}, {}
    for ep in eps:
        if HIERARCHICAL not in DISPATCHERS:
            why[ep] = (f"not available: {HIERARCHICAL!r} is not in "
                       f"moe_parallel.dispatch.DISPATCHERS {DISPATCHERS}")
            continue
        if getattr(flat[ep], "ranks_per_node", None) == g:
            states[ep] = flat[ep]
            continue
        try:
            states[ep] = ParallelState.build(ep=ep, ranks_per_node=g)
        except TypeError as exc:
            why[ep] = f"not available: ParallelState.build(ranks_per_node=) failed: {exc}"
        except ValueError as exc:
            why[ep] = f"not available at ep {ep}, ranks_per_node {g}: {exc}"
    return states, why


def _build_dispatchers(kinds: list[str], experts: int, ps, hier_ps, hier_why: Optional[str]
                       ) -> tuple[dict, dict]:
    from moe_parallel.dispatch import build_dispatcher

    built, why = {}, {}
    for kind in kinds:
        if kind == HIERARCHICAL and hier_ps is None:
            why[kind] = hier_why or "not available"
            continue
        try:
            built[kind] = build_dispatcher(experts, hier_ps if kind == HIERARCHICAL else ps,
                                           kind)
        except (TypeError, ValueError) as exc:
            why[kind] = f"not available: build_dispatcher(kind={kind!r}) failed: {exc}"
    # every rank must time the same set (a kind missing on one rank would hang the others)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(built))
    common = set.intersection(*(set(e) for e in everyone))
    for kind in list(built):
        if kind not in common:
            why[kind] = "not available on every rank"
            del built[kind]
    return built, why


def _sweep(cfg: dict, states: dict, layout: dict, dtype: torch.dtype, device: torch.device,
           timer: Callable) -> list[dict]:
    """Part ``sweep`` (module docstring); rank 0's rows."""
    elem = torch.empty((), dtype=dtype).element_size()
    dispatch_volume = cfg["tokens"] * cfg["top_k"] * cfg["hidden"] * elem
    rows = []
    for ep in cfg["ep_sizes"]:
        group = states[ep].group("ep")
        fns, sizes, calls = {}, {}, {}
        for b in sorted({*cfg["sweep_bytes"], dispatch_volume}):
            n = max(ep, b // elem // ep * ep)
            inp = torch.randn(n, dtype=torch.float32, device=device).to(dtype)
            out = torch.empty_like(inp)
            name = str(n * elem)
            sizes[name] = (n * elem, b == dispatch_volume)
            fns[name] = (lambda o=out, i=inp, pg=group: dist.all_to_all_single(o, i, group=pg))
            calls[name] = sweep_iters(cfg["iters"], n * elem)
        times = timer(fns, iters_of=calls)
        for name, t in times.items():
            nbytes, is_dispatch = sizes[name]
            alg, bus = bandwidth(nbytes, t["seconds"], ep)
            rows.append({"ep": ep, "bytes": nbytes, "dispatch_volume": is_dispatch,
                         "iters": calls[name],
                         **layout_volumes(nbytes, ep, layout["node_of"]),
                         "time": t, "algbw_gbps": alg, "busbw_gbps": bus})
        if dist.get_rank() == 0:
            _log(f"  sweep ep={ep}: {len(times)} sizes")
    return rows


def _dispatch_variants(disp: dict, x: torch.Tensor, probs: torch.Tensor, routing,
                       grad_y: torch.Tensor, send: list[int], recv: list[int],
                       send_rows: torch.Tensor, send_counts: torch.Tensor, group) -> dict:
    """The timed functions of one (EP size, routing): ``<kind>:fwd`` / ``<kind>:fwd_bwd`` per
    dispatcher (identity experts) and ``raw:fwd`` / ``raw:fwd_bwd``, the bare
    ``all_to_all_single`` calls moving the same rows with the same splits."""
    H, E = x.shape[1], send_counts.numel()

    def ours(d, backward: bool):
        def fn():
            x.grad = probs.grad = None
            expert_in, _, h = d.dispatch(x, routing, 0)
            y = d.combine(expert_in, h)  # identity experts
            if backward:
                y.backward(grad_y)
        return fn

    def raw_rows(inp, out_splits, in_splits):
        out = inp.new_empty((sum(out_splits), H))
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        return out

    def raw_fwd():
        counts = torch.empty(E, dtype=torch.int64, device=send_counts.device)
        dist.all_to_all_single(counts, send_counts, group=group)  # E_local counts per peer
        there = raw_rows(send_rows, recv, send)
        return raw_rows(there, send, recv)

    def raw_fwd_bwd():
        back = raw_fwd()
        grad_there = raw_rows(back, recv, send)  # backward of combine's exchange
        raw_rows(grad_there, send, recv)         # backward of dispatch's exchange

    fns = {}
    for kind, d in disp.items():
        fns[f"{kind}:fwd"] = ours(d, False)
        fns[f"{kind}:fwd_bwd"] = ours(d, True)
    fns["raw:fwd"], fns["raw:fwd_bwd"] = raw_fwd, raw_fwd_bwd
    return fns


def _dispatch(cfg: dict, states: dict, hier: tuple[dict, dict], dtype: torch.dtype,
              device: torch.device, timer: Callable) -> list[dict]:
    """Part ``dispatch`` (module docstring); rank 0's rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    H, E, k, T = cfg["hidden"], cfg["experts"], cfg["top_k"], cfg["tokens"]
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for ep in cfg["ep_sizes"]:
        ps = states[ep]
        group = ps.group("ep")
        E_local = E // ep
        disp, why = _build_dispatchers(cfg["dispatchers"], E, ps, hier[0].get(ep),
                                       hier[1].get(ep))
        for routing_kind in cfg["routings"]:
            routing = make_routing(routing_kind, T, E, k, rank, cfg["seed"], cfg["zipf_s"],
                                   device)
            g = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + rank)
            x = torch.randn(T, H, generator=g, device=device, dtype=torch.float32).to(dtype)
            grad_y = torch.randn(T, H, generator=g, device=device, dtype=torch.float32).to(dtype)
            with torch.no_grad():
                _, _, handle = disp["alltoall"].dispatch(x, routing, 0)
            send, recv = list(handle.send_splits), list(handle.recv_splits)
            x.requires_grad_(True)
            probs = routing.probs.detach().requires_grad_(True)
            routing = replace(routing, probs=probs)
            send_rows = torch.randn(sum(send), H, generator=g, device=device,
                                    dtype=torch.float32).to(dtype)
            send_counts = torch.zeros(E, dtype=torch.int64, device=device)

            fns = _dispatch_variants(disp, x, probs, routing, grad_y, send, recv, send_rows,
                                     send_counts, group)
            times = timer(fns)
            everyone: list = [None] * world
            dist.all_gather_object(everyone, {"send": send, "recv": recv,
                                              "ep_rank": ps.ep_rank})
            if rank != 0:
                continue
            send_bytes = [sum(e["send"]) * H * elem for e in everyone]
            recv_bytes = [sum(e["recv"]) * H * elem for e in everyone]
            off_rank = [(sum(e["send"]) - e["send"][e["ep_rank"]]) * H * elem for e in everyone]
            s_mean = sum(send_bytes) / world
            row = {"ep": ep, "routing": routing_kind, "experts_per_rank": E_local,
                   "send_bytes_per_rank": send_bytes, "recv_bytes_per_rank": recv_bytes,
                   "offrank_bytes_per_rank": off_rank, "bytes_per_rank": s_mean,
                   "payload_bytes": {"fwd": 2 * s_mean, "fwd_bwd": 4 * s_mean},
                   "max_recv_over_mean": max(recv_bytes) / s_mean if s_mean else None,
                   "variants": {}, "not_available": why}
            for name, t in times.items():
                kind, mode = name.split(":")
                alg, bus = bandwidth(row["payload_bytes"][mode], t["seconds"], ep)
                entry = row["variants"].setdefault(kind, {})
                entry[mode] = {"time": t, "algbw_gbps": alg, "busbw_gbps": bus}
            raw = row["variants"]["raw"]
            for kind, modes in row["variants"].items():
                if kind != "raw":
                    for mode, v in modes.items():
                        v["ratio"] = v["time"]["seconds"] / raw[mode]["time"]["seconds"]
            rows.append(row)
        if rank == 0:
            _log(f"  dispatch ep={ep}: {', '.join(disp)}"
                 + (f" ({'; '.join(f'{k}: {v}' for k, v in why.items())})" if why else ""))
    return rows


def _layer(cfg: dict, states: dict, dtype: torch.dtype, device: torch.device,
           timer: Callable) -> dict:
    """Part ``layer`` (module docstring); rank 0's rows."""
    from moe_parallel import MoEConfig, MoELayer

    rank = dist.get_rank()
    H = cfg["layer_hidden"]
    fns, meta = {}, {}
    for ep in [1, *cfg["ep_sizes"]]:
        torch.manual_seed(cfg["seed"])
        mcfg = MoEConfig(hidden_size=H, ffn_hidden_size=cfg["layer_ffn"],
                         num_experts=cfg["experts"], top_k=cfg["top_k"], params_dtype=dtype,
                         token_dispatcher_type=cfg["layer_dispatcher"])
        layer = MoELayer(mcfg, device=device, parallel_state=states[ep]).train()
        for mode, tokens in (("weak", cfg["layer_tokens"]),
                             ("strong", cfg["global_tokens"] // ep)):
            g = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + rank)
            x = torch.randn(tokens, H, generator=g, device=device,
                            dtype=torch.float32).to(dtype).requires_grad_(True)

            def step(layer=layer, x=x):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).sum().backward()

            fns[f"{ep}:{mode}"] = step
            meta[f"{ep}:{mode}"] = {"ep": ep, "mode": mode, "tokens_per_rank": tokens,
                                    "tokens_per_group": tokens * ep}
    times = timer(fns, iters=cfg["layer_iters"], rounds=cfg["layer_rounds"], warmup=1)
    rows = []
    for name, t in times.items():
        m = meta[name]
        rows.append({**m, "time": t, "tokens_per_s_per_rank": m["tokens_per_rank"]
                     / t["seconds"]})
    for mode in ("weak", "strong"):
        mine = [r for r in rows if r["mode"] == mode]
        base = next(r for r in mine if r["ep"] == 1)
        for r in mine:
            t1, tn = base["time"]["seconds"], r["time"]["seconds"]
            r["efficiency"] = t1 / tn if mode == "weak" else t1 / (r["ep"] * tn)
    return {"config": {"hidden": H, "ffn": cfg["layer_ffn"], "experts": cfg["experts"],
                       "top_k": cfg["top_k"], "dispatcher": cfg["layer_dispatcher"],
                       "weak_tokens_per_rank": cfg["layer_tokens"],
                       "strong_tokens_per_group": cfg["global_tokens"]},
            "rows": sorted(rows, key=lambda r: (r["mode"] != "weak", r["ep"]))}


def _overlap(cfg: dict, states: dict, dtype: torch.dtype, device: torch.device,
             timer: Callable) -> dict:
    """Part ``overlap`` (module docstring); rank 0's rows."""
    from moe_parallel import MoEConfig, MoELayer

    rank, H, tokens = dist.get_rank(), cfg["layer_hidden"], cfg["layer_tokens"]
    fns, meta = {}, {}
    for ep in [1, *cfg["ep_sizes"]]:
        g = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + rank)
        x = torch.randn(tokens, H, generator=g, device=device,
                        dtype=torch.float32).to(dtype).requires_grad_(True)
        for name, over in OVERLAP_VARIANTS.items():
            torch.manual_seed(cfg["seed"])
            mcfg = MoEConfig(hidden_size=H, ffn_hidden_size=cfg["layer_ffn"],
                             num_experts=cfg["experts"], top_k=cfg["top_k"], params_dtype=dtype,
                             token_dispatcher_type=cfg["layer_dispatcher"],
                             num_shared_experts=1, **over)
            layer = MoELayer(mcfg, device=device, parallel_state=states[ep]).train()

            def step(layer=layer, x=x):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).sum().backward()

            fns[f"{ep}:{name}"] = step
            meta[f"{ep}:{name}"] = {"ep": ep, "variant": name, "config": over}
    times = timer(fns, iters=cfg["layer_iters"], rounds=cfg["layer_rounds"], warmup=1)
    rows = [{**meta[k], "time": t, "tokens_per_s_per_rank": tokens / t["seconds"]}
            for k, t in times.items()]
    for r in rows:
        base = next(b for b in rows if b["ep"] == r["ep"] and b["variant"] == "none")
        r["vs_none"] = r["time"]["seconds"] / base["time"]["seconds"]
    return {"config": {"hidden": H, "ffn": cfg["layer_ffn"], "shared_ffn": cfg["layer_ffn"],
                       "experts": cfg["experts"], "top_k": cfg["top_k"],
                       "dispatcher": cfg["layer_dispatcher"], "tokens_per_rank": tokens},
            "rows": sorted(rows, key=lambda r: (r["ep"], list(OVERLAP_VARIANTS).index(
                r["variant"])))}


def _train(cfg: dict, states: dict, device: torch.device, timer: Callable,
           device_name: Optional[str]) -> dict:
    """Part ``train`` (module docstring)."""
    from moe_parallel import train as tr

    ep = max(cfg["ep_sizes"], default=1)
    extra = shlex.split(cfg["train_args"])
    targs = tr._parser().parse_args([*extra, "--ep", str(ep)])
    if device.type == "cuda" and "--dtype" not in extra:
        targs.dtype = "bfloat16"
    ps = states[ep]
    model = tr.build_model(targs, ps).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=targs.lr, weight_decay=0.0)
    source = tr.MarkovSource(targs.vocab, targs.seed + 1)
    batch = tr.local_batch(source.batch(targs.batch_size * ps.dp, targs.seq_len), ps).to(device)
    t = timer({"train": lambda: tr.train_step(model, opt, batch, ps, targs.clip)}, iters=1,
              rounds=cfg["layer_rounds"], warmup=1)["train"]
    tokens = targs.batch_size * targs.seq_len
    flops = model_flops_per_token(targs.hidden, targs.ffn, targs.layers, targs.vocab,
                                  targs.seq_len, targs.experts, targs.top_k)
    peak = cfg["peak_tflops"] or peak_tflops_for(device_name if device.type == "cuda" else None)
    tok_s = tokens / t["seconds"]
    out = {"ep": ep, "train_args": [*extra, "--ep", str(ep)], "dtype": targs.dtype,
           "tokens_per_rank_per_step": tokens, "time": t, "tokens_per_s_per_rank": tok_s,
           "flops_per_token": flops, "achieved_tflops_per_rank": tok_s * flops / 1e12,
           "peak_tflops": peak, "mfu": tok_s * flops / (peak * 1e12) if peak else None}
    if peak is None:
        out["mfu_note"] = (f"no peak FLOP/s for {device_name or device.type}: pass "
                           f"--peak-tflops (table: {PEAK_TFLOPS}, bf16 dense)")
    return out


# ---- one rank ---------------------------------------------------------------------------------
def _local_world(environ: Mapping[str, str]) -> Optional[int]:
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def _node_index(environ: Mapping[str, str]) -> Optional[int]:
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def rank_main(argv: list[str], args: Optional[argparse.Namespace] = None) -> Optional[dict]:
    """One rank of the benchmark: join the job, measure every part, and on rank 0 fit, print
    and save; returns the record on rank 0 (None elsewhere). Exit 2 on every rank when the
    options do not fit the world (the message, naming the option, printed by rank 0)."""
    from benchmarks.machine import machine_info
    from moe_parallel import ParallelState
    from moe_parallel.distributed import init_distributed
    from moe_parallel.distributed.init import detect_launch_env

    args = args or parse_args(argv)
    launcher = "self-spawn" if os.environ.get(SPAWNED) else detect_launch_env().launcher
    rank, world, local_rank = init_distributed(timeout=timedelta(seconds=args.timeout))
    try:
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        torch.set_num_threads(args.threads or (torch.get_num_threads() if cuda else 1))
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
        device_name = torch.cuda.get_device_name(device) if cuda else None
        mine = {"rank": rank, "hostname": socket.gethostname(), "local_rank": local_rank,
                "local_world": _local_world(os.environ), "node_index": _node_index(os.environ),
                "device": str(device), "device_name": device_name,
                "machine": machine_info() if local_rank == 0 else None}
        ranks: list = [None] * world
        dist.all_gather_object(ranks, mine)
        try:
            if args.nproc is not None and launcher != "self-spawn" and args.nproc != world:
                raise PlanError(f"--nproc {args.nproc} does not match the launcher's world size "
                                f"{world} (drop --nproc under a launcher)")
            plan = make_plan(args, world)
            layout = node_layout(ranks, args.ranks_per_node)
        except PlanError as exc:
            if rank == 0:
                print(f"python -m benchmarks cluster: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        cfg = {**{k: getattr(args, k) for k in (
            "tokens", "hidden", "top_k", "routings", "zipf_s", "iters", "rounds",
            "warmup", "layer_tokens", "layer_hidden", "layer_ffn", "layer_dispatcher",
            "layer_iters", "seed", "train_args", "peak_tflops")}, **plan,
            "dtype": str(dtype).removeprefix("torch."), "parts": list(args.parts)
            + (["train"] if args.train_model else []),
            "threads_per_rank": torch.get_num_threads(),
            "sweep_bytes": list(args.sweep_bytes or DEFAULT_SWEEP_BYTES[device.type])}
        backend = dist.get_backend()
        topology = {
            "world": world, "nodes": layout["nodes"], "ranks_per_node": layout["ranks_per_node"],
            "hostnames": layout["hostnames"], "node_of_rank": layout["node_of"],
            "launcher": launcher, "launcher_local_world": [r["local_world"] for r in ranks],
            "backend": backend,
            "backend_version": (".".join(map(str, torch.cuda.nccl.version()))
                                if backend == "nccl"
                                else f"bundled with torch {torch.__version__}"),
            "torch": torch.__version__, "device": device.type,
            "devices": [r["device_name"] or r["device"] for r in ranks],
            "node_machines": [{"hostname": r["hostname"], "rank": r["rank"], **r["machine"]}
                              for r in ranks if r["machine"] is not None],
        }
        if rank == 0:
            _log(f"cluster bench: world {world} = {layout['nodes']} node(s) x "
                 f"{layout['ranks_per_node']} ({launcher}, {backend}); EP sizes "
                 f"{plan['ep_sizes']}, dispatchers {plan['dispatchers']}")
        timer = _timer(args.iters, args.rounds, args.warmup, sync, device)
        states = {ep: ParallelState.build(ep=ep) for ep in [1, *plan["ep_sizes"]]}
        hier = (_hierarchical_states(plan["ep_sizes"], layout["ranks_per_node"], states)
                if HIERARCHICAL in plan["dispatchers"] and "dispatch" in args.parts
                else ({}, {}))
        results: dict = {}
        t_start, load_before = time.perf_counter(), os.getloadavg()
        for part in args.parts:
            t0 = time.perf_counter()
            if part == "sweep":
                results["sweep"] = _sweep(cfg, states, layout, dtype, device, timer)
            elif part == "dispatch":
                results["dispatch"] = _dispatch(cfg, states, hier, dtype, device, timer)
            elif part == "overlap":
                results["overlap"] = _overlap(cfg, states, dtype, device, timer)
            else:
                results["layer"] = _layer(cfg, states, dtype, device, timer)
            if rank == 0:
                _log(f"{part}: {time.perf_counter() - t0:.1f} s")
        if args.train_model:
            results["train"] = _train(cfg, states, device, timer, device_name)
        if rank != 0:
            return None
        cfg["seconds"] = time.perf_counter() - t_start
        topology["load_avg_1_5_15"] = {"before": list(load_before),
                                       "after": list(os.getloadavg())}
        return report(argv, args, cfg, topology, results)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- rank 0: fit, print, save -----------------------------------------------------------------
def fit_sweep(sweep: list[dict], ranks_per_node: int) -> dict:
    """:func:`benchmarks.scaling_bench.fit_alltoall` on the sweep rows (their volumes from the
    real layout); ``{"error": why}`` when it cannot be fitted."""
    points = [{"ep": r["ep"], "bytes": r["bytes"], "seconds": r["time"]["seconds"],
               "messages": r["messages"], "intra_bytes": r["intra_bytes"],
               "inter_bytes": r["inter_bytes"]} for r in sweep]
    if not points:
        return {"error": "no all-to-all was measured (world 1, or --parts without sweep)"}
    try:
        return sb.fit_alltoall(points, ranks_per_node)
    except ValueError as exc:
        return {"error": str(exc)}


def overlap_estimate(layer: dict, fit: dict) -> Optional[dict]:
    """Chunked overlap (:func:`~benchmarks.scaling_bench.pipelined_step_seconds`) of the
    largest EP size's weak-scaling layer step: compute ``g = t_1``, exposed communication
    ``c = t_ep - t_1``, every extra chunk adding ``4·(call + latency·(ep - 1))`` (the fitted
    fixed cost of the 4 all-to-alls of a forward+backward); None when ``c <= 0`` or no fit."""
    weak = [r for r in layer.get("rows", []) if r["mode"] == "weak"]
    if len(weak) < 2 or "error" in fit:
        return None
    base, top = weak[0], weak[-1]
    g, t = base["time"]["seconds"], top["time"]["seconds"]
    c = t - g
    if c <= 0:
        return None
    ep = top["ep"]
    overhead = 4 * (max(fit["call_us"] or 0.0, 0.0) + max(fit["latency_us"], 0.0) * (ep - 1))
    overhead *= 1e-6
    return {"ep": ep, "gemm_s": g, "comm_s": c, "measured_s": t, "chunk_overhead_s": overhead,
            "pipelined_s": {n: sb.pipelined_step_seconds(c, g, n, overhead)
                            for n in (1, 2, 4, 8)}}


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def _us(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e6:.1f}"


def _size(b: float) -> str:
    for unit, f in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= f:
            return f"{b / f:g}{unit}"
    return f"{b:g}B"


def print_report(rec: dict) -> None:
    """The tables of a record (stdout)."""
    c, topo = rec["config"], rec["topology"]
    print(f"Cluster bench: world {topo['world']} = {topo['nodes']} node(s) x "
          f"{topo['ranks_per_node']} ranks (hosts {', '.join(topo['hostnames'])}), launcher "
          f"{topo['launcher']}, {topo['backend']} {topo['backend_version']}, torch "
          f"{topo['torch']}, {topo['device']} ({topo['devices'][0]}), "
          f"{c['threads_per_rank']} thread(s)/rank, {c['dtype']}")
    load = topo.get("load_avg_1_5_15")
    print(f"EP sizes {c['ep_sizes']} (EP groups of consecutive ranks, the rest DP); "
          f"slowest rank, median of {c['rounds']} rounds x {c['iters']} calls "
          f"[min-max over rounds]"
          + (f"; 1-min load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} "
             f"after on rank 0's host ({os.cpu_count()} cores)" if load else ""))
    sweep = rec["results"].get("sweep")
    if sweep:
        print("\nAll-to-all sweep: dist.all_to_all_single, even splits. nccl-tests "
              "conventions: S = one rank's send buffer, algbw = S/t, busbw = algbw*(n-1)/n")
        head = (f"{'ep':>4} {'S/rank':>9} {'intra B':>9} {'inter B':>9} {'calls':>5} "
                f"{'time us':>10} {'[min-max]':>19} {'IQR us':>8} {'algbw':>7} {'busbw':>7}")
        print(head + "\n" + "-" * len(head))
        for r in sweep:
            t = r["time"]
            print(f"{r['ep']:>4} {_size(r['bytes']):>9} {_size(r['intra_bytes']):>9} "
                  f"{_size(r['inter_bytes']):>9} {r['iters']:>5} {_us(t['seconds']):>10} "
                  f"{'[' + _us(t['min']) + '-' + _us(t['max']) + ']':>19} {_us(t['iqr']):>8} "
                  f"{r['algbw_gbps']:7.3f} {r['busbw_gbps']:7.3f}"
                  + ("  <- dispatch volume" if r["dispatch_volume"] else ""))
        print("GB/s = 1e9 B/s; intra/inter B: bytes the rank sends within / across nodes; "
              "calls per round")
    disp = rec["results"].get("dispatch")
    if disp:
        print(f"\nDispatch + combine, identity experts: T={c['tokens']}/rank H={c['hidden']} "
              f"E={c['experts']} k={c['top_k']}; raw = all_to_all_single moving the same bytes "
              f"(counts, rows there and back); ms per call; busbw of forward+backward "
              f"(4*S moved)")
        head = (f"{'ep':>4} {'routing':<10} {'dispatcher':<22} {'S MiB':>7} {'fwd ms':>8} "
                f"{'raw':>8} {'ratio':>6} {'f+b ms':>8} {'[min-max]':>17} {'raw':>8} "
                f"{'ratio':>6} {'busbw':>7} {'raw bus':>7}")
        print(head + "\n" + "-" * len(head))
        for r in disp:
            raw = r["variants"]["raw"]
            for kind, v in r["variants"].items():
                if kind == "raw":
                    continue
                fb = v["fwd_bwd"]["time"]
                print(f"{r['ep']:>4} {r['routing']:<10} {kind:<22} "
                      f"{r['bytes_per_rank'] / 2**20:7.2f} {_ms(v['fwd']['time']['seconds']):>8} "
                      f"{_ms(raw['fwd']['time']['seconds']):>8} {v['fwd']['ratio']:6.2f} "
                      f"{_ms(fb['seconds']):>8} "
                      f"{'[' + _ms(fb['min']) + '-' + _ms(fb['max']) + ']':>17} "
                      f"{_ms(raw['fwd_bwd']['time']['seconds']):>8} "
                      f"{v['fwd_bwd']['ratio']:6.2f} {v['fwd_bwd']['busbw_gbps']:7.3f} "
                      f"{raw['fwd_bwd']['busbw_gbps']:7.3f}")
            for kind, why in r["not_available"].items():
                print(f"{r['ep']:>4} {r['routing']:<10} {kind:<22} {why}")
        print("S: mean send buffer per rank (own chunk included); single_hot: EP rank 0 "
              "receives every rank's first choices")
    layer = rec["results"].get("layer")
    if layer:
        lc = layer["config"]
        print(f"\nMoE layer forward+backward: H={lc['hidden']} F={lc['ffn']} E={lc['experts']} "
              f"k={lc['top_k']} ({lc['dispatcher']}); weak: {lc['weak_tokens_per_rank']} "
              f"tokens/rank, strong: {lc['strong_tokens_per_group']} tokens per EP group")
        head = (f"{'mode':<7} {'ep':>4} {'tok/rank':>8} {'step ms':>9} {'[min-max]':>19} "
                f"{'tok/s/rank':>11} {'effic.':>7}")
        print(head + "\n" + "-" * len(head))
        for r in layer["rows"]:
            t = r["time"]
            print(f"{r['mode']:<7} {r['ep']:>4} {r['tokens_per_rank']:>8} "
                  f"{_ms(t['seconds']):>9} "
                  f"{'[' + _ms(t['min']) + '-' + _ms(t['max']) + ']':>19} "
                  f"{r['tokens_per_s_per_rank']:11.0f} {r['efficiency']:7.3f}")
        print("efficiency: weak t1/t_ep, strong t1/(ep*t_ep); ep 1 = every expert local "
              "(no exchange)")
    over = rec["results"].get("overlap")
    if over:
        oc = over["config"]
        print(f"\nOverlap, measured: the layer above with one shared expert (F={oc['shared_ffn']}),"
              f" {oc['tokens_per_rank']} tokens/rank; ratio = step / step without overlap at "
              f"the same ep (< 1: the overlap pays)")
        head = f"{'ep':>4} {'variant':<24} {'step ms':>9} {'[min-max]':>19} {'ratio':>6}"
        print(head + "\n" + "-" * len(head))
        for r in over["rows"]:
            t = r["time"]
            print(f"{r['ep']:>4} {r['variant']:<24} {_ms(t['seconds']):>9} "
                  f"{'[' + _ms(t['min']) + '-' + _ms(t['max']) + ']':>19} {r['vs_none']:6.3f}")
    train = rec["results"].get("train")
    if train:
        mfu = "null (" + train["mfu_note"] + ")" if train["mfu"] is None else \
            f"{train['mfu']:.1%} of {train['peak_tflops']:g} TFLOP/s"
        print(f"\nTraining step of moe_parallel.train's model ({' '.join(train['train_args'])}, "
              f"{train['dtype']}): {_ms(train['time']['seconds'])} ms, "
              f"{train['tokens_per_s_per_rank']:.0f} tokens/s/rank, "
              f"{train['achieved_tflops_per_rank']:.4f} TFLOP/s/rank, MFU {mfu}")
    fit = rec["fit"]
    print("\nAll-to-all cost model fitted to the sweep: " + sb.FIT_MODEL)
    if "error" in fit:
        print(f"  no fit: {fit['error']}")
        return
    call = "not separable (one message count)" if fit["call_us"] is None else \
        f"{fit['call_us']:.2f} us"
    intra = "-" if fit["intra_gbps"] is None else f"{fit['intra_gbps']:.3f} GB/s"
    inter = ("not measured (one node)" if fit["inter_gbps"] is None and "inter" not in
             fit["terms"] else "-" if fit["inter_gbps"] is None else
             f"{fit['inter_gbps']:.3f} GB/s")
    print(f"  G={fit['ranks_per_node']} ranks/node; call {call}; latency "
          f"{fit['latency_us']:.2f} us per message; intra-node {intra}; inter-node {inter}")
    print(f"  fit error over {len(fit['points'])} points: relative RMS "
          f"{fit['rel_rms']:.1%}, max {fit['max_rel_error']:.1%}")
    for w in fit["warnings"]:
        print(f"  warning: {w}")
    head = f"  {'ep':>4} {'S/rank':>9} {'measured us':>12} {'model us':>10} {'error':>7}"
    print(head + "\n  " + "-" * (len(head) - 2))
    for p in fit["points"]:
        print(f"  {p['ep']:>4} {_size(p['bytes']):>9} {_us(p['seconds']):>12} "
              f"{_us(p['predicted_s']):>10} {p['rel_error']:7.1%}")
    pred = rec["predictions"]
    if "error" in pred:
        print(f"\nNo predictions: {pred['error']}")
        return
    print(f"\nPredicted one all-to-all at the dispatch volume S = {_size(pred['volume_bytes'])} "
          f"per rank, G = {pred['ranks_per_node']}; intra-node {pred['intra_gbps']:.3f} GB/s "
          f"[{pred['intra_source']}], inter-node {pred['inter_gbps']:.3f} GB/s "
          f"[{pred['inter_source']}]; hierarchical = intra-node all-to-all of S, then n-1 "
          f"inter-node messages G x larger (DESIGN.md 10)")
    head = (f"  {'ep':>4} {'nodes':>5} {'flat us':>10} {'hier. us':>10} {'winner':<16} "
            f"{'measured us':>12} {'error':>7}")
    print(head + "\n  " + "-" * (len(head) - 2))
    for r in pred["rows"]:
        err = f"{r['rel_error']:7.1%}" if "rel_error" in r else f"{'':>7}"
        print(f"  {r['ep']:>4} {r['nodes']:>5} {_us(r['flat_s']):>10} "
              f"{_us(r['hierarchical_s']):>10} {r['winner']:<16} {_us(r['measured_s']):>12} "
              f"{err}")
    print(f"  {pred['verdict']}")
    ov = rec.get("overlap")
    if ov:
        pipe = ", ".join(f"{n} chunk(s) {_ms(v)} ms" for n, v in ov["pipelined_s"].items())
        print(f"\nOverlap model (weak scaling, ep {ov['ep']}): GEMM etc. t1 = "
              f"{_ms(ov['gemm_s'])} ms, exposed communication t_ep - t1 = {_ms(ov['comm_s'])} "
              f"ms; pipelined t = max(c, g) + min(c, g)/n with {_us(ov['chunk_overhead_s'])} us "
              f"per extra chunk: {pipe}")
        measured = {int(r["variant"][6:]): r["vs_none"]
                    for r in (over or {}).get("rows", [])
                    if r["ep"] == ov["ep"] and r["variant"] in ("chunks2", "chunks4")}
        if measured:
            base = ov["pipelined_s"][1]
            print("  model vs measured, step ratio to 1 chunk: " + ", ".join(
                f"{n} chunks predicted {ov['pipelined_s'][n] / base:.3f}, measured {m:.3f}"
                for n, m in sorted(measured.items())))


def plot_report(rec: dict, path: Path) -> bool:
    """Sweep bus bandwidth, dispatch ratios, layer efficiency and the flat vs hierarchical
    predictions as one PNG; False (with a message) without matplotlib."""
    from benchmarks.plotting import pyplot

    plt = pyplot()
    if plt is None:
        return False
    res = rec["results"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    for ep in rec["config"]["ep_sizes"]:
        pts = [r for r in res.get("sweep", []) if r["ep"] == ep]
        if pts:
            ax.plot([r["bytes"] for r in pts], [r["busbw_gbps"] for r in pts], "o-",
                    label=f"ep {ep}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("send buffer per rank (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title("all_to_all_single sweep", fontsize=9)
    ax = axes[0][1]
    labels, ratios = [], []
    for r in res.get("dispatch", []):
        for kind, v in r["variants"].items():
            if kind != "raw":
                labels.append(f"ep{r['ep']} {r['routing']}\n{kind}")
                ratios.append(v["fwd_bwd"]["ratio"])
    ax.bar(range(len(ratios)), ratios, color="C1")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=60)
    ax.set_ylabel("ours / raw all-to-all (fwd+bwd)")
    ax.set_title("dispatch overhead", fontsize=9)
    ax = axes[1][0]
    for mode, style in (("weak", "o-"), ("strong", "s--")):
        pts = [r for r in res.get("layer", {}).get("rows", []) if r["mode"] == mode]
        if pts:
            ax.plot([r["ep"] for r in pts], [r["efficiency"] for r in pts], style, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP size")
    ax.set_ylabel("efficiency vs ep 1")
    ax.set_ylim(bottom=0)
    ax.set_title("MoE layer forward+backward", fontsize=9)
    ax = axes[1][1]
    pred = rec.get("predictions")
    if pred and "error" not in pred:
        eps = [r["ep"] for r in pred["rows"]]
        ax.plot(eps, [r["flat_s"] * 1e3 for r in pred["rows"]], "o-", label="flat (model)")
        ax.plot(eps, [r["hierarchical_s"] * 1e3 for r in pred["rows"]], "s--",
                label="hierarchical (model)")
        meas = [(r["ep"], r["measured_s"]) for r in pred["rows"] if r["measured_s"]]
        if meas:
            ax.plot([e for e, _ in meas], [s * 1e3 for _, s in meas], "k^", label="measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"one all-to-all of {_size(pred['volume_bytes'])}/rank, "
                     f"G={pred['ranks_per_node']} (inter: "
                     f"{pred['inter_source'].split(' (')[0]})",
                     fontsize=9)
    ax.set_xlabel("EP size")
    ax.set_ylabel("ms")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    topo = rec["topology"]
    fig.suptitle(f"cluster bench: {topo['nodes']} node(s) x {topo['ranks_per_node']} ranks, "
                 f"{topo['backend']}, {topo['device']}, {rec['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(argv: list[str], args: argparse.Namespace, cfg: dict, topology: dict,
           results: dict) -> dict:
    """Rank 0: fit, predictions, tables, JSON and PNG; returns the record."""
    from benchmarks.record import save_result

    fit = fit_sweep(results.get("sweep", []), topology["ranks_per_node"])
    payload = {"config": cfg, "topology": topology, "results": results, "fit": fit,
               "predictions": None, "overlap": None}
    if "error" not in fit:
        elem = torch.empty((), dtype=getattr(torch, cfg["dtype"])).element_size()
        volume = cfg["tokens"] * cfg["top_k"] * cfg["hidden"] * elem
        measured = {r["ep"]: r["time"]["seconds"] for r in results.get("sweep", [])
                    if r["dispatch_volume"]}
        payload["predictions"] = predictions(fit, volume, args.predict_ep_max, measured,
                                             args.predict_inter_gbps)
        payload["overlap"] = overlap_estimate(results.get("layer", {}), fit)
    print_report(payload)
    stem = f"cluster_{topology['backend']}"
    record, path = save_result("cluster", argv, payload, args.out, stem)
    plot = args.plot or path.with_suffix(".png")
    if plot_report(record, plot):
        record["plot"] = str(plot)
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {plot}")
    sys.stdout.flush()
    return record


# ---- self-spawn -------------------------------------------------------------------------------
def _spawned_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    """Entry of a self-spawned rank: the launcher's variables, then :func:`rank_main`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{SPAWNED: "1"})
    code = 0
    try:
        rank_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  (the traceback goes to stderr, the exit code up)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn(argv: list[str], nproc: int, timeout_s: float) -> int:
    """Run :func:`rank_main` on ``nproc`` fresh local processes (spawn), wait; the first
    non-zero exit code (0 when all succeed). A rank that fails makes the others stop 10 s later;
    the whole run is stopped after ``timeout_s``."""
    entry = importlib.import_module("benchmarks.cluster_bench")._spawned_rank
    codes, why = run_ranks(entry, (nproc, free_port(), argv), nproc, timeout_s, grace_s=10.0)
    if why is not None:
        _log(f"cluster bench: stopped the ranks ({why})")
    return next((c if c > 0 else 1 for c in codes if c != 0), 0)


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    """``python -m benchmarks cluster``: under a launcher this process is one rank; bare, it
    spawns ``--nproc`` ranks (exits with their failure code). Returns rank 0's record when this
    process is rank 0, else None."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if launched(os.environ):
        return rank_main(argv, args)
    nproc = args.nproc or 4
    try:
        make_plan(args, nproc)
    except PlanError as exc:
        build_parser().error(str(exc))
    if nproc == 1:
        return rank_main(argv, args)
    code = spawn([*argv, "--nproc", str(nproc)] if args.nproc is None else argv, nproc,
                 args.timeout * 4)
    if code:
        raise SystemExit(code)
    return None


if __name__ == "__main__":
    main()
