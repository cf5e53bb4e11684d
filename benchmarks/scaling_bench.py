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

    python -m benchmarks.scaling_bench              # tables, JSON + PNG in benchmarks/results/
    python -m benchmarks.scaling_bench --procs 1 2 --steps 3 --out /tmp/s.json
    python -m benchmarks.scaling_bench --skip-measure --gemm-tflops 498   # cost model only
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

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


def all_to_all_seconds(volume_bytes: float, ep: int, gpus_per_node: int = 8,
                       nvlink_gbps: float = 450.0, ib_gbps: float = 50.0,
                       latency_us: float = 0.0) -> float:
    """One all-to-all: ``latency + max(V·f_nv / BW_nv, V·f_ib / BW_ib)`` seconds, the
    bandwidths in GB/s (1e9 B/s) per GPU per direction."""
    if not volume_bytes >= 0:
        raise ValueError(f"volume_bytes must be >= 0, got {volume_bytes!r}")
    nv_bw = _positive_float("nvlink_gbps", nvlink_gbps) * 1e9
    ib_bw = _positive_float("ib_gbps", ib_gbps) * 1e9
    if isinstance(latency_us, bool) or not 0 <= latency_us < math.inf:
        raise ValueError(f"latency_us must be a finite number >= 0, got {latency_us!r}")
    _, f_nv, f_ib = link_fractions(ep, gpus_per_node)
    return latency_us * 1e-6 + max(volume_bytes * f_nv / nv_bw, volume_bytes * f_ib / ib_bw)


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
                  latency_us: float = 0.0, activation: str = "swiglu") -> dict:
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
    t_a2a = all_to_all_seconds(volume, ep, gpus_per_node, nvlink_gbps, ib_gbps, latency_us)
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


# ---- measured scaling ---------------------------------------------------------------------
def split_tokens(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` ranks, the remainder one each to the first ranks."""
    return [total // parts + (r < total % parts) for r in range(parts)]


def core_bound(procs: int, cores: int, base_procs: int = 1) -> float:
    """The best efficiency ``procs`` CPU-bound processes can reach on ``cores`` cores, against
    ``base_procs``: ``min(procs, cores) / procs · base_procs / min(base_procs, cores)``
    (weak and strong alike: the work per step is spread over at most ``cores`` cores)."""
    return min(procs, cores) / procs * base_procs / min(base_procs, cores)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        ctx = mp.start_processes(worker, args=(world, _free_port(), spec, out_path),
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
    print(f"ASSUMED: {a['gpus_per_node']} GPUs/node, NVLink {a['nvlink_gbps']:g} GB/s, "
          f"IB {a['ib_gbps']:g} GB/s per GPU, grouped GEMM {a['gemm_tflops']:g} TFLOP/s, "
          f"overlap {a['overlap']:g}, latency {a['latency_us']:g} us per all-to-all")
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
    fig.suptitle(f"MoE layer cost model, T={m['tokens']} H={m['hidden']} F={m['ffn']} "
                 f"E={m['experts']} k={m['top_k']}; ASSUMED NVLink {a['nvlink_gbps']:g} GB/s, "
                 f"IB {a['ib_gbps']:g} GB/s, GEMM {a['gemm_tflops']:g} TFLOP/s, "
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
    c.add_argument("--gpus-per-node", type=int, default=DEFAULT_ASSUMPTIONS["gpus_per_node"])
    c.add_argument("--nvlink-gbps", type=float, default=DEFAULT_ASSUMPTIONS["nvlink_gbps"],
                   help="NVLink GB/s per GPU per direction")
    c.add_argument("--ib-gbps", type=float, default=DEFAULT_ASSUMPTIONS["ib_gbps"],
                   help="InfiniBand GB/s per GPU per direction")
    c.add_argument("--gemm-tflops", type=float, default=DEFAULT_ASSUMPTIONS["gemm_tflops"],
                   help="grouped-GEMM TFLOP/s (e.g. a value measured by grouped_gemm_bench)")
    c.add_argument("--overlap", type=float, default=DEFAULT_ASSUMPTIONS["overlap"],
                   help="fraction of min(comm, GEMM) hidden by overlap, 0..1")
    c.add_argument("--latency-us", type=float, default=DEFAULT_ASSUMPTIONS["latency_us"],
                   help="fixed latency per all-to-all")
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
    cluster = {"gpus_per_node": args.gpus_per_node, "nvlink_gbps": args.nvlink_gbps,
               "ib_gbps": args.ib_gbps, "gemm_tflops": args.gemm_tflops,
               "overlap": args.overlap, "latency_us": args.latency_us}
    rows = cost_model_rows(args.ep_sizes, **model, **cluster)
    cost_model = {
        "assumptions": {
            **cluster, "model": model,
            "assumed": sorted(k for k, v in DEFAULT_ASSUMPTIONS.items() if cluster[k] == v),
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
