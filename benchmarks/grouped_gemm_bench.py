"""Grouped GEMM on GPU: every backend of moe_parallel.grouped_gemm (loop, streams, cublas, torch,
cutlass) vs torch._grouped_mm called directly vs one dense GEMM of the same FLOPs, forward and
forward+backward, for the expert FFN's first GEMM ``[M, H] × [E, H, N]`` (M = T·k rows, N = 2F
for SwiGLU), balanced and Zipf group sizes.

TFLOP/s = 2·M·H·N / time (forward); ×3 for forward+backward (dgrad and wgrad). The summary
gives each backend's forward+backward TFLOP/s ÷ the dense GEMM's and ÷ torch._grouped_mm's.

    python benchmarks/grouped_gemm_bench.py --out results.json [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import cuda_event_ms  # noqa: E402
from moe_parallel import ops  # noqa: E402

CONFIGS = {
    "mixtral_E8_H4096_F14336_k2": dict(E=8, H=4096, N=2 * 14336, T=16384, k=2),
    "finegrained_E64_H2048_F1408_k6": dict(E=64, H=2048, N=2 * 1408, T=16384, k=6),
}


BACKENDS = ("loop", "streams", "cublas", "torch", "cutlass")
# Backend 'cutlass' on sm_90 with each Hopper tile configuration forced (MOE_PARALLEL_SM90_TILE).
SM90_TILES = ("cooperative", "pingpong", "pingpong_thin")
VARIANTS = ("auto", *BACKENDS) + tuple(f"cutlass/{t}" for t in SM90_TILES)
ROWS = tuple(f"moe_parallel[{v}]" for v in VARIANTS) + ("torch._grouped_mm", "dense_mm")


@contextlib.contextmanager
def sm90_tile(row: str):
    """MOE_PARALLEL_SM90_TILE set to the tile of row 'moe_parallel[cutlass/<tile>]' while in the
    block (unset for the other rows)."""
    tile = row.partition("/")[2].rstrip("]")
    old = os.environ.pop("MOE_PARALLEL_SM90_TILE", None)
    if tile:
        os.environ["MOE_PARALLEL_SM90_TILE"] = tile
    try:
        yield
    finally:
        os.environ.pop("MOE_PARALLEL_SM90_TILE", None)
        if old is not None:
            os.environ["MOE_PARALLEL_SM90_TILE"] = old


def warm_up_clocks(seconds: float = 2.0) -> None:
    """Dense matmuls until the GPU has run ``seconds``, so the first timings are not taken at idle
    clocks."""
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(10):
            x @ x
        stop.record()
        stop.synchronize()
        if start.elapsed_time(stop) > seconds * 1e3:
            return


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median of ``benchmarks.harness.cuda_event_ms``'s per-call CUDA-event times."""
    return statistics.median(cuda_event_ms(fn, iters, warmup))


def step(fn, x: torch.Tensor, w: torch.Tensor, go: torch.Tensor) -> None:
    """fn(x, w) and its backward from fresh gradients (x.grad = w.grad = None, as after
    ``zero_grad()``), so the time holds the three products and no gradient accumulation."""
    x.grad = w.grad = None
    fn(x, w).backward(go)


def group_sizes(M: int, E: int, skew: str) -> torch.Tensor:
    if skew == "balanced":
        sizes = torch.full((E,), M // E, dtype=torch.int64)
    else:  # Zipf-like: weight 1/(i+1)
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        sizes = torch.floor(w / w.sum() * M).to(torch.int64)
    sizes[0] += M - int(sizes.sum())
    return sizes


def bench(cfg: dict, skew: str, dtype: torch.dtype) -> dict:
    E, H, N, M = cfg["E"], cfg["H"], cfg["N"], cfg["T"] * cfg["k"]
    gs = group_sizes(M, E, skew)
    a = torch.randn(M, H, device="cuda", dtype=dtype, requires_grad=True)
    b = (torch.randn(E, H, N, device="cuda", dtype=dtype) * H**-0.5).requires_grad_(True)
    go = torch.randn(M, N, device="cuda", dtype=dtype)
    offs = torch.cumsum(gs, 0).to(device="cuda", dtype=torch.int32)
    ad = torch.randn(M, H, device="cuda", dtype=dtype, requires_grad=True)
    bd = (torch.randn(H, N, device="cuda", dtype=dtype) * H**-0.5).requires_grad_(True)
    flops = 2.0 * M * H * N
    out = {"M": M, "group_sizes": gs.tolist()[:8], "skew": skew, "dtype": str(dtype)}

    assert int(gs[0]) >= 256
    ref = a.detach()[:256].double() @ b.detach()[0].double()  # rows of group 0, float64
    hopper = torch.cuda.get_device_capability()[0] == 9
    candidates = {}
    for v in VARIANTS:
        if hopper or "/" not in v:
            be = v.partition("/")[0]
            candidates[f"moe_parallel[{v}]"] = (
                a, b, lambda x, w, be=be: ops.grouped_gemm(x, w, gs, backend=be))
    candidates["dense_mm"] = (ad, bd, torch.matmul)
    if hasattr(torch, "_grouped_mm"):
        candidates["torch._grouped_mm"] = (a, b, lambda x, w: torch._grouped_mm(x, w, offs=offs))
    for name, (x, w, fn) in candidates.items():
        try:
            with sm90_tile(name):
                t_f = time_ms(lambda fn=fn, x=x, w=w: fn(x, w))
                t_fb = time_ms(lambda fn=fn, x=x, w=w: step(fn, x, w, go))
                row = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops": flops / t_f / 1e9,
                       "fwd_bwd_tflops": 3 * flops / t_fb / 1e9}
                if name != "dense_mm":
                    full = fn(x.detach(), w.detach())[:256].double()
                    row["rel_err_vs_fp64"] = float((full - ref).norm() / ref.norm())
            out[name] = row
        except Exception as exc:  # a backend that does not support this shape/dtype
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def print_summary(runs: dict) -> None:
    """Forward+backward TFLOP/s of each moe_parallel backend ÷ dense and ÷ torch._grouped_mm."""
    print(f"\n{'forward+backward':<45}{'TF/s':>7}{'÷ dense':>9}{'÷ torch._grouped_mm':>21}")
    for key, r in runs.items():
        dense = r.get("dense_mm", {}).get("fwd_bwd_tflops")
        tgm = r.get("torch._grouped_mm", {}).get("fwd_bwd_tflops")
        for name in ROWS[: len(VARIANTS)]:
            tf = r.get(name, {}).get("fwd_bwd_tflops")
            if tf is None:
                continue
            vs_dense = f"{tf / dense:.3f}" if dense else "-"
            vs_tgm = f"{tf / tgm:.3f}" if tgm else "-"
            print(f"{key + ' ' + name[13:-1]:<45}{tf:>7.0f}{vs_dense:>9}{vs_tgm:>21}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    warm_up_clocks()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    print(f"{'config':<34}{'skew':<10}{'backend':<20}{'fwd ms':>9}{'TF/s':>8}"
          f"{'f+b ms':>9}{'TF/s':>8}{'rel err':>10}")
    for cname, cfg in CONFIGS.items():
        for skew in ("balanced", "zipf"):
            r = bench(cfg, skew, dtype)
            results["runs"][f"{cname}/{skew}"] = r
            for backend in ROWS:
                row = r.get(backend)
                if row is None:
                    continue
                if "error" in row:
                    print(f"{cname:<34}{skew:<10}{backend:<20} {row['error'][:60]}")
                    continue
                print(f"{cname:<34}{skew:<10}{backend:<20}{row['fwd_ms']:>9.3f}"
                      f"{row['fwd_tflops']:>8.0f}{row['fwd_bwd_ms']:>9.3f}"
                      f"{row['fwd_bwd_tflops']:>8.0f}"
                      f"{row.get('rel_err_vs_fp64', float('nan')):>10.1e}")
            torch.cuda.empty_cache()
    print_summary(results["runs"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
