"""One MoE layer, forward+backward, on one process: MoELayer vs the loop-over-experts reference
vs a dense FFN doing the same FLOPs (T·k rows through one expert-sized FFN).

MoE efficiency = dense-equivalent time / MoE layer time (1.0 is the limit).

    python -m benchmarks.layer_bench --tokens 4096 --hidden 1024 --ffn 2048 --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moe_parallel import MoEConfig, MoELayer, ReferenceMoE, ops
from moe_parallel.experts import activate


def _time(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after two warm-ups."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=0.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    cfg = MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts,
                    top_k=args.top_k, capacity_factor=args.capacity_factor or None,
                    params_dtype=dtype)
    torch.manual_seed(0)
    layer = MoELayer(cfg, device=args.device)
    ref = ReferenceMoE.from_layer(layer)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    rows = args.tokens * args.top_k
    xd = torch.randn(rows, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    w1 = layer.experts.w1[0].detach().clone().requires_grad_(True)
    w2 = layer.experts.w2[0].detach().clone().requires_grad_(True)

    def run_layer():
        layer(x).sum().backward()

    def run_ref():
        ref(x)[0].sum().backward()

    def run_dense():
        (activate(xd @ w1, cfg.activation) @ w2).sum().backward()

    t_dense = _time(run_dense, args.repeats, args.device)
    t_layer = _time(run_layer, args.repeats, args.device)
    t_ref = _time(run_ref, args.repeats, args.device)
    result = {
        "config": vars(args) | {"out": str(args.out)},
        "extension": ops.has_extension(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "seconds": {"dense_equivalent": t_dense, "moe_layer": t_layer, "reference": t_ref},
        "moe_efficiency": t_dense / t_layer,
        "speedup_vs_reference": t_ref / t_layer,
        "tokens_per_s": args.tokens / t_layer,
    }
    print(f"{'what':<22}{'ms fwd+bwd':>12}")
    for k, v in result["seconds"].items():
        print(f"{k:<22}{1e3 * v:>12.2f}")
    print(f"MoE efficiency {result['moe_efficiency']:.3f}   "
          f"speed vs reference {result['speedup_vs_reference']:.2f}x   "
          f"{result['tokens_per_s']:,.0f} tokens/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
