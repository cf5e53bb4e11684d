"""Dropless block-sparse vs grouped-GEMM dropless vs capacity mode, under three routings.

One MoE layer, forward+backward, on one process. The routing is imposed (the router's own
probabilities are kept, the expert choice is drawn from a fixed pattern):
  * balanced:   every expert receives exactly T·k/E assignments;
  * zipf:       expert popularity ∝ 1/rank^1.2, k distinct experts per token;
  * single_hot: every token's first choice is expert 0, the other k-1 uniform.
Modes: ``block_sparse`` and ``grouped`` (both dropless), ``capacity_1.0`` and
``capacity_1.25`` (capacity factor, padded to capacity as Switch/GShard do, grouped GEMM).
Per case: median seconds per forward+backward (all cases timed side by side in one process,
round-robin), exact memory counts (``benchmarks.memory``: bytes saved for backward by one
forward, parameters excluded, and the peak of live tensor bytes during the first
forward+backward above those live before it), rows computed, padding fraction (rows computed
that are padding) and drop rate. A block-size sweep of the block-sparse mode backs the CPU
default of ``block_sparse.DEFAULT_BLOCK_SIZE``.

    python -m benchmarks.dropless_bench                     # table + JSON in benchmarks/results/
    python -m benchmarks.dropless_bench --tokens 1024 --repeats 2 --block-sizes 32
    python -m benchmarks.dropless_bench --replot benchmarks/results/dropless_....json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import median_seconds
from benchmarks.memory import peak_live_bytes, saved_tensor_bytes
from benchmarks.plotting import pyplot
from benchmarks.record import print_head, save_result

ROUTINGS = ("balanced", "zipf", "single_hot")
MODES = {
    "block_sparse": dict(expert_impl="block_sparse"),
    "grouped": dict(expert_impl="grouped"),
    "capacity_1.0": dict(expert_impl="grouped", capacity_factor=1.0, pad_to_capacity=True),
    "capacity_1.25": dict(expert_impl="grouped", capacity_factor=1.25, pad_to_capacity=True),
}


def expert_pattern(kind: str, tokens: int, experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[T, k]`` distinct expert ids per token following the routing ``kind``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "balanced":  # token t takes experts t·k .. t·k+k-1 (mod E): exact balance
        idx = (torch.arange(tokens * k) % experts).view(tokens, k)
        return idx[torch.randperm(tokens, generator=g)]
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
        return torch.multinomial(weights.expand(tokens, experts), k, generator=g)
    if kind == "single_hot":
        rest = torch.multinomial(torch.ones(tokens, experts - 1), k - 1, generator=g) + 1
        return torch.cat([torch.zeros(tokens, 1, dtype=torch.int64), rest], dim=1)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")


class ImposedRouter(nn.Module):
    """The layer's router with the expert choice replaced by ``pattern``: probs are the
    router's softmax at the imposed experts, renormalised (gradients reach the router)."""

    def __init__(self, router: nn.Module, pattern: torch.Tensor, num_experts: int) -> None:
        super().__init__()
        self.weight = router.weight
        self.register_buffer("pattern", pattern)
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor, num_seqs: int = 1, count: bool = True,
                check: bool = True, valid: torch.Tensor | None = None):
        """The router's call contract (``TopKRouter.forward``); no losses, nothing counted."""
        from moe_parallel.routing.router import Routing

        logits = x.float() @ self.weight.float().t()
        probs = logits.softmax(-1).gather(1, self.pattern)
        probs = probs / probs.sum(-1, keepdim=True)
        routed = torch.bincount(self.pattern.reshape(-1), minlength=self.num_experts)
        return Routing(probs, self.pattern, None, logits, routed), {}


def build_case(case: dict):
    """The layer of one (routing, mode, block size) case, its forward+backward step and its
    forward alone."""
    from moe_parallel import MoEConfig, MoELayer

    device, dtype = case["device"], getattr(torch, case["dtype"])
    cfg = MoEConfig(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                    num_experts=case["experts"], top_k=case["top_k"], params_dtype=dtype,
                    block_size=case["block_size"], **MODES[case["mode"]])
    torch.manual_seed(0)
    layer = MoELayer(cfg, device=device)
    pattern = expert_pattern(case["routing"], case["tokens"], case["experts"], case["top_k"])
    layer.router = ImposedRouter(layer.router, pattern.to(device), case["experts"])
    x = torch.randn(case["tokens"], case["hidden"], device=device, dtype=dtype,
                    requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        return layer(x)

    def step():
        forward().sum().backward()
        sync()

    return layer, step, forward


def measure_memory(case: dict) -> dict:
    """Exact memory counts of the case's first forward+backward (``benchmarks.memory``): bytes
    saved for backward by the forward (parameters excluded) and the peak of live tensor bytes
    during the step above those live before it; and the routing statistics of the case."""
    torch.set_num_threads(case["threads"])
    layer, step, forward = build_case(case)
    saved = saved_tensor_bytes(forward, layer.parameters())
    layer.zero_grad(set_to_none=True)
    peak = peak_live_bytes(step, case["device"])
    s = layer.last_stats
    computed = s.padded_rows if s.padded_rows is not None else s.expert_rows
    return {
        "block_size": layer.experts.block_size,
        "saved_mib": saved["activations"] / 2**20,
        "peak_live_mib": peak / 2**20,
        "rows_routed": s.num_routed,
        "rows_computed": computed,
        "padding_fraction": 1.0 - s.num_processed / computed if computed else 0.0,
        "drop_rate": s.drop_rate,
        "max_load": s.max_load,
    }


def time_cases(cases: list[dict], repeats: int) -> list[float]:
    """Median seconds per forward+backward of every case, timed side by side in this process:
    one warm-up step each, then ``repeats`` rounds running every case once per round."""
    seconds = median_seconds({i: build_case(c)[1] for i, c in enumerate(cases)}, repeats,
                             progress=True)
    return [seconds[i] for i in range(len(cases))]


def plot_sweep(results: list[dict], path: Path) -> bool:
    """The block-size sweep as a PNG: time relative to grouped dropless and padding fraction
    vs B, per routing; False (with a message) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    grouped = {r["routing"]: r["seconds"] for r in results
               if r["mode"] == "grouped" and not r.get("sweep")}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for routing in sorted({r["routing"] for r in results if r.get("sweep")}):
        rows = sorted((r for r in results if r.get("sweep") and r["routing"] == routing),
                      key=lambda r: r["block_size"])
        bs = [r["block_size"] for r in rows]
        ax1.plot(bs, [r["seconds"] / grouped[routing] for r in rows], "o-", label=routing)
        ax2.plot(bs, [100 * r["padding_fraction"] for r in rows], "o-", label=routing)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_ylabel("time / grouped dropless")
    ax2.set_ylabel("padding rows (%)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size B")
        ax.grid(alpha=0.3)
        ax.legend()
    c = results[0]
    fig.suptitle(f"block-sparse block size: T={c['tokens']} H={c['hidden']} F={c['ffn']} "
                 f"E={c['experts']} k={c['top_k']} {c['dtype']} on {c['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--block-sizes", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="block-size sweep of block_sparse (balanced and zipf routings)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the sweep plot of a recorded JSON (next to it)")
    args = p.parse_args(argv)
    if args.replot is not None:
        recorded = json.loads(args.replot.read_text())
        plot_sweep(recorded["results"], args.replot.with_suffix(".png"))
        return recorded

    common = dict(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts,
                  top_k=args.top_k, dtype=args.dtype, device=args.device,
                  threads=args.threads, repeats=args.repeats, block_size=None)
    cases = [dict(common, routing=r, mode=m) for r in ROUTINGS for m in MODES]
    cases += [dict(common, routing=r, mode="block_sparse", block_size=b, sweep=True)
              for b in args.block_sizes for r in ("balanced", "zipf")]
    results = []
    for i, case in enumerate(cases, 1):
        results.append({**case, **measure_memory(case)})
        print(f"memory [{i}/{len(cases)}] {case['routing']} {case['mode']}", file=sys.stderr,
              flush=True)
    torch.set_num_threads(args.threads)
    for r, seconds in zip(results, time_cases(cases, args.repeats)):
        r["seconds"] = seconds

    print(f"\nT={args.tokens} H={args.hidden} F={args.ffn} E={args.experts} k={args.top_k} "
          f"{args.dtype} on {args.device}, {args.threads} threads, forward+backward")
    head = (f"{'routing':<10} {'mode':<14} {'B':>4} {'ms':>8} {'vs grouped':>10} "
            f"{'saved MiB':>9} {'peak MiB':>8} {'rows':>7} {'padding':>8} {'dropped':>8}")
    print_head(head)
    grouped = {r["routing"]: r["seconds"] for r in results
               if r["mode"] == "grouped" and not r.get("sweep")}
    for r in results:
        print(f"{r['routing']:<10} {r['mode'] + ('*' if r.get('sweep') else ''):<14} "
              f"{r['block_size'] or '-':>4} {r['seconds'] * 1e3:8.1f} "
              f"{r['seconds'] / grouped[r['routing']]:10.3f} {r['saved_mib']:9.1f} "
              f"{r['peak_live_mib']:8.1f} "
              f"{r['rows_computed']:7d} {r['padding_fraction']:8.2%} {r['drop_rate']:8.2%}")
    print("* block-size sweep")
    out, path = save_result("dropless", argv, {"results": results}, args.out,
                            f"dropless_{args.device}")
    if any(r.get("sweep") for r in results) and plot_sweep(results, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main()
