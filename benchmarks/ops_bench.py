"""The custom ops, forward and backward, against their plain-PyTorch twins and against the
memory copy (data-movement ops) or dense GEMM (grouped GEMM) of the same bytes / FLOPs.

For routing ``T`` tokens of width ``H`` to ``k`` of ``E`` experts (``N = T·k`` rows):
  * permute fwd: gather ``N`` rows; bwd: ``unpermute`` without weights;
  * unpermute fwd: weighted sum of ``k`` rows per token; bwd: ``unpermute_backward``;
  * sort_chunks fwd/bwd: reorder ``N`` rows in ``ep·E_local`` chunks (``--ep``);
  * grouped_gemm fwd ``[N, H] × [E, H, F]``; bwd: dgrad + wgrad;
  * swiglu fwd on ``h [N, F]`` (gate | up halves); bwd: ``swiglu_backward``. Its twin is the
    unfused PyTorch code (``silu(gate) * up``; the backward formula in elementwise torch ops).
Baselines: ``copy`` = ``clone`` of the bytes the op writes (an ``[N, H]`` tensor, ``[T, H]`` for
unpermute fwd, ``[N, F/2]`` / ``[N, F]`` for swiglu fwd / bwd); ``dense`` = one
``[N, H] × [H, F]`` GEMM (fwd) and its two backward GEMMs.
Columns: median ms of the compiled op and of its twin, twin ÷ op (speedup), and
baseline ÷ op (1.0 = as fast as the copy / dense GEMM). All timings side by side in one process.

    python -m benchmarks ops --tokens 4096 --hidden 1024 --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.harness import median_seconds
from benchmarks.record import print_head, save_result
from moe_parallel import ops


def cases(T: int, H: int, F: int, E: int, k: int, ep: int, dtype, device) -> dict:
    """name -> (op fn, twin fn, baseline fn, baseline kind)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    probs = torch.rand(T, k, generator=g).to(device)
    permuted, row_map, counts = ops.permute(x, idx, E)
    N = permuted.shape[0]
    grad_rows = torch.randn(N, H, generator=g).to(device, dtype)
    grad_tok = torch.randn(T, H, generator=g).to(device, dtype)
    M = torch.ops.moe_parallel
    gs = counts.to("cpu")
    if E % ep:
        raise ValueError(f"--ep ({ep}) must divide --experts ({E})")
    sizes = gs.clone()  # chunks: experts in rank-major order, reordered expert-major
    order = torch.arange(E).view(ep, E // ep).t().reshape(-1)
    inverse = torch.argsort(order)
    w = (torch.randn(E, H, F, generator=g) * 0.02).to(device, dtype)
    a_dense = permuted
    w_dense = w[0]
    grad_out = torch.randn(N, F, generator=g).to(device, dtype)
    copy_rows = lambda: grad_rows.clone()  # noqa: E731
    h = torch.randn(N, F - F % 2, generator=g).to(device, dtype)
    grad_act = torch.randn(N, h.shape[1] // 2, generator=g).to(device, dtype)

    def swiglu_unfused():
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    return {
        "permute fwd": (lambda: ops.permute(x, idx, E),
                        lambda: ops.permute_torch(x, idx, E), copy_rows, "copy"),
        "permute bwd": (lambda: ops.unpermute(grad_rows, row_map),
                        lambda: ops.unpermute_torch(grad_rows, row_map), copy_rows, "copy"),
        "unpermute fwd": (lambda: ops.unpermute(permuted, row_map, probs),
                          lambda: ops.unpermute_torch(permuted, row_map, probs),
                          lambda: grad_tok.clone(), "copy"),
        "unpermute bwd": (lambda: M.unpermute_backward(grad_tok, permuted, row_map, probs, N),
                          lambda: ops.unpermute_backward_torch(grad_tok, permuted, row_map,
                                                               probs, N),
                          copy_rows, "copy"),
        "sort_chunks fwd": (lambda: ops.sort_chunks(permuted, sizes, order),
                            lambda: ops.sort_chunks_torch(permuted, sizes, order),
                            copy_rows, "copy"),
        "sort_chunks bwd": (lambda: ops.sort_chunks(permuted, sizes[order], inverse),
                            lambda: ops.sort_chunks_torch(permuted, sizes[order], inverse),
                            copy_rows, "copy"),
        "grouped_gemm fwd": (lambda: ops.grouped_gemm(permuted, w, gs),
                             lambda: ops.grouped_gemm_torch(permuted, w, gs),
                             lambda: a_dense @ w_dense, "dense"),
        "grouped_gemm bwd": (lambda: (ops.grouped_gemm(grad_out, w, gs, True),
                                      M.grouped_gemm_wgrad(permuted, grad_out, gs, False)),
                             lambda: (ops.grouped_gemm_torch(grad_out, w, gs, True),
                                      ops.grouped_gemm_wgrad_torch(permuted, grad_out, gs)),
                             lambda: (grad_out @ w_dense.t(), a_dense.t() @ grad_out),
                             "dense"),
        "swiglu fwd": (lambda: ops.swiglu(h), swiglu_unfused, lambda: grad_act.clone(), "copy"),
        "swiglu bwd": (lambda: M.swiglu_backward(grad_act, h),
                       lambda: ops.swiglu_backward_torch(grad_act, h), lambda: h.clone(), "copy"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2048, help="grouped GEMM output width")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=4, help="EP size of the sort_chunks reorder")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not ops.has_extension():
        raise SystemExit(f"moe_parallel._C is not loaded: {ops.extension_error()!r}")

    dtype = getattr(torch, args.dtype)
    table = cases(args.tokens, args.hidden, args.ffn, args.experts, args.top_k, args.ep,
                  dtype, args.device)
    rows = []
    for i, (name, (op, twin, base, kind)) in enumerate(table.items(), 1):
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        ms = {k: v * 1e3 for k, v in median_seconds({"op": op, "twin": twin, "base": base},
                                                    args.repeats, sync).items()}
        rows.append({"op": name, "op_ms": ms["op"], "twin_ms": ms["twin"],
                     "baseline": kind, "baseline_ms": ms["base"],
                     "speedup_vs_twin": ms["twin"] / ms["op"],
                     "baseline_ratio": ms["base"] / ms["op"]})
        print(f"[{i}/{len(table)}] {name}", file=sys.stderr, flush=True)

    print(f"\nT={args.tokens} H={args.hidden} F={args.ffn} E={args.experts} k={args.top_k} "
          f"ep={args.ep} {args.dtype} on {args.device}, {torch.get_num_threads()} threads")
    head = (f"{'op':<18}{'op ms':>9}{'twin ms':>9}{'vs twin':>9}{'baseline':>10}"
            f"{'base ms':>9}{'base/op':>9}")
    print_head(head)
    for r in rows:
        print(f"{r['op']:<18}{r['op_ms']:9.2f}{r['twin_ms']:9.2f}{r['speedup_vs_twin']:8.2f}x"
              f"{r['baseline']:>10}{r['baseline_ms']:9.2f}{r['baseline_ratio']:9.2f}")
    return save_result("ops", argv, {"config": {k: str(v) for k, v in vars(args).items()},
                                     "results": rows}, args.out, f"ops_{args.device}")[0]


if __name__ == "__main__":
    main()
