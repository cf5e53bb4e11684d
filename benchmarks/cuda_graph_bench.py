"""``python -m benchmarks cuda_graph``: the static layer's training step (forward + backward)
eager against its CUDA-graph replay (``torch.cuda.make_graphed_callables``) on one GPU, side by
side in one run; prints the table and writes JSON to ``benchmarks/results/``.

The layer is ``MoEConfig.static_exchange`` with ``verdict_scope="none"`` and
``check_finite=False`` (no host synchronisation, so it can be captured); before timing, the
replay's output and gradients are compared with eager's (relative error printed)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moe_parallel import MoEConfig, MoELayer

SHAPES = {  # name: (tokens, hidden, ffn, experts, top_k)
    "small": (512, 512, 1024, 8, 2),
    "mixtral_like": (4096, 4096, 14336 // 4, 8, 2),
    "finegrained": (4096, 2048, 1408, 64, 6),
}


def _time(step, repeats: int) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_shape(name: str, dtype: torch.dtype, repeats: int) -> dict:
    T, H, F, E, K = SHAPES[name]
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=K,
                    capacity_factor=1.25, pad_to_capacity=True, static_exchange=True,
                    verdict_scope="none", check_finite=False, params_dtype=dtype,
                    init_std=0.02)
    torch.manual_seed(0)
    eager = MoELayer(cfg, device="cuda")
    graphed_layer = MoELayer(cfg, device="cuda")
    graphed_layer.load_state_dict(eager.state_dict())
    x = torch.randn(T, H, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn(T, H, device="cuda", dtype=dtype)
    graphed = torch.cuda.make_graphed_callables(graphed_layer, (x,), num_warmup_iters=3)

    def eager_step():
        eager(x).backward(gy)

    def graph_step():
        graphed(x).backward(gy)

    y0, y1 = eager(x), graphed(x)
    err = float((y1.double() - y0.double()).norm() / y0.double().norm())
    t_eager, t_graph = _time(eager_step, repeats), _time(graph_step, repeats)
    return {"shape": name, "tokens": T, "hidden": H, "ffn": F, "experts": E, "top_k": K,
            "dtype": str(dtype).removeprefix("torch."), "eager_ms": 1e3 * t_eager,
            "graph_ms": 1e3 * t_graph, "saved_ms": 1e3 * (t_eager - t_graph),
            "speedup": t_eager / t_graph, "rel_err": err}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks cuda_graph", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph needs a CUDA device")
    rows = [run_shape(s, getattr(torch, args.dtype), args.repeats) for s in args.shapes]
    print(f"{'shape':<14}{'eager ms':>10}{'graph ms':>10}{'saved ms':>10}{'speedup':>9}"
          f"{'rel err':>10}")
    for r in rows:
        print(f"{r['shape']:<14}{r['eager_ms']:>10.3f}{r['graph_ms']:>10.3f}"
              f"{r['saved_ms']:>10.3f}{r['speedup']:>9.3f}{r['rel_err']:>10.2e}")
    out = Path(args.out or f"benchmarks/results/cuda_graph_{torch.cuda.get_device_name()}"
               .replace(" ", "_") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
