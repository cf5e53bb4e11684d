"""Bandwidth of the moe_parallel CUDA ops against a device-to-device copy and plain PyTorch.

    python benchmarks/cuda_ops_bench.py [--tokens 16384 --hidden 4096 --topk 8 --experts 64]
                                        [--dtype bf16] [--iters 50] [--out results.json]

Each op is timed with CUDA events around one call (host syncs inside the call included), after
warm-up; the median of --iters runs is reported. Achieved bandwidth = bytes the op logically
reads + writes / median time, and is also given as a fraction of the copy bandwidth measured in
the same run (clone of a [N, H] tensor: 2 * N * H * elem bytes per clone).

Byte model (e = element size, N = T * k rows, ints counted at their size):
    permute             read N rows of x, write N rows          2*N*H*e + T*k*(8 + 8)
    unpermute           read N rows of y, write T rows          (N + T)*H*e + T*k*(8 + 4)
    unpermute_backward  read T rows of grad_out and N of y,     (T + 2*N)*H*e + T*k*(8 + 4 + 4)
                        write N rows of grad_y
    sort_chunks         read and write N rows                   2*N*H*e
The plain-PyTorch rows run the twins from moe_parallel.ops (index_select / index_copy / cat) and
an index_add_ formulation of unpermute on the same inputs and use the same byte counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import cuda_event_ms  # noqa: E402
from moe_parallel import ops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def unpermute_index_add(y, row_map, probs):
    """out[t] = sum_j probs[t,j] * y[row_map[t,j]] via one float32 index_add_ (atomics)."""
    T, k = row_map.shape
    flat = row_map.reshape(-1)
    kept = (flat >= 0).nonzero()[:, 0]
    rows = flat[kept]
    tokens = torch.div(kept, k, rounding_mode="floor")
    vals = y.index_select(0, rows).float() * probs.reshape(-1)[kept].float().unsqueeze(1)
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, tokens, vals).to(y.dtype)


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python benchmarks/cuda_ops_bench.py --help``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true", help="skip the plain-PyTorch versions")
    ap.add_argument("--out", help="write the results as JSON to this path")
    return ap


def make_inputs(T: int, H: int, k: int, E: int, dtype: torch.dtype) -> dict:
    """The ops' inputs on CUDA (seed 0): tokens, top-k routing of random logits, the permuted
    rows' map, and the chunk order of an 8-rank expert-parallel regroup."""
    M = torch.ops.moe_parallel
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=dtype, generator=g)
    logits = torch.randn(T, E, device=dev, generator=g)
    top, expert_idx = logits.topk(k, dim=1)
    probs = torch.softmax(top, dim=1)  # float32 router weights
    permuted, row_map, tpe = M.permute(x, expert_idx, E, None, 0)
    N = permuted.shape[0]
    # sort_chunks as in expert-parallel dispatch: 8 ranks x E/8 local experts, regrouped
    # (rank, expert) -> (expert, rank).
    ranks = 8 if E % 8 == 0 else 1
    return {"x": x, "expert_idx": expert_idx, "probs": probs, "row_map": row_map, "N": N,
            "y": torch.randn(N, H, device=dev, dtype=dtype, generator=g),
            "grad_out": torch.randn(T, H, device=dev, dtype=dtype, generator=g),
            "split_sizes": tpe.cpu(),
            "order": torch.arange(E).view(ranks, E // ranks).t().reshape(-1)}


def byte_model(T: int, H: int, k: int, N: int, e: int) -> dict[str, int]:
    """Bytes each op logically reads + writes (the module docstring's table)."""
    idx_bytes = T * k
    return {
        "permute": 2 * N * H * e + idx_bytes * 16,
        "unpermute": (N + T) * H * e + idx_bytes * 12,
        "unpermute_backward": (T + 2 * N) * H * e + idx_bytes * 16,
        "sort_chunks": 2 * N * H * e,
    }


def make_cases(inp: dict, T: int, E: int, with_torch: bool) -> list[tuple]:
    """``(op, impl, fn)`` of every timed call: the moe_parallel ops, then (``with_torch``)
    their plain-PyTorch twins and an index_add_ unpermute."""
    M = torch.ops.moe_parallel
    x, expert_idx, probs, row_map = inp["x"], inp["expert_idx"], inp["probs"], inp["row_map"]
    y, grad_out, N = inp["y"], inp["grad_out"], inp["N"]
    split_sizes, order = inp["split_sizes"], inp["order"]
    cases = [
        ("permute", "moe_parallel", lambda: M.permute(x, expert_idx, E, None, 0)),
        ("unpermute", "moe_parallel", lambda: M.unpermute(y, row_map, probs, T)),
        ("unpermute_backward", "moe_parallel",
         lambda: M.unpermute_backward(grad_out, y, row_map, probs, N)),
        ("sort_chunks", "moe_parallel", lambda: M.sort_chunks(y, split_sizes, order)),
    ]
    if with_torch:
        cases += [
            ("permute", "torch twin", lambda: ops.permute_torch(x, expert_idx, E)),
            ("unpermute", "torch twin", lambda: ops.unpermute_torch(y, row_map, probs)),
            ("unpermute", "torch index_add", lambda: unpermute_index_add(y, row_map, probs)),
            ("unpermute_backward", "torch twin",
             lambda: ops.unpermute_backward_torch(grad_out, y, row_map, probs, N)),
            ("sort_chunks", "torch twin", lambda: ops.sort_chunks_torch(y, split_sizes, order)),
        ]
    return cases


def time_cases(cases: list[tuple], model: dict, copy_gbps: float, iters: int,
               warmup: int) -> list[dict]:
    """Median, p10 and p90 ms of every case (``cuda_event_ms``) and its achieved bandwidth,
    also as a fraction of the copy's."""
    results = []
    for op, impl, fn in cases:
        times = cuda_event_ms(fn, iters, warmup)
        med = statistics.median(times)
        gbps = model[op] / med / 1e6
        q = statistics.quantiles(times, n=10)
        results.append(dict(op=op, impl=impl, median_ms=med, p10_ms=q[0], p90_ms=q[-1],
                            bytes=model[op], gbps=gbps, fraction_of_copy=gbps / copy_gbps))
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    """Time every op and its twins, print the table, write ``--out``; 1 without CUDA or the
    extension."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.iters < 20:
        ap.error("--iters must be >= 20")
    if not torch.cuda.is_available():
        print("cuda_ops_bench: no CUDA device", file=sys.stderr)
        return 1
    if not ops.has_extension():
        print(
            f"cuda_ops_bench: moe_parallel._C not loaded: {ops.extension_error()!r}",
            file=sys.stderr,
        )
        return 1
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    T, H, k, E = args.tokens, args.hidden, args.topk, args.experts
    e = torch.tensor([], dtype=dtype).element_size()
    inp = make_inputs(T, H, k, E, dtype)
    N, y = inp["N"], inp["y"]
    model = byte_model(T, H, k, N, e)
    copy_times = cuda_event_ms(lambda: y.clone(), args.iters, args.warmup)
    copy_ms = statistics.median(copy_times)
    copy_gbps = 2 * N * H * e / copy_ms / 1e6
    results = time_cases(make_cases(inp, T, E, not args.no_torch), model, copy_gbps,
                         args.iters, args.warmup)
    name = torch.cuda.get_device_name(dev)
    print(f"device: {name}   torch {torch.__version__}")
    print(f"T={T} H={H} k={k} E={E} dtype={args.dtype} N={N} iters={args.iters} (median)")
    print(f"device-to-device copy (clone of [N, H]): {copy_ms:.3f} ms, {copy_gbps:.0f} GB/s")
    print(f"{'op':<20} {'impl':<16} {'ms':>9} {'GB/s':>8} {'x copy':>7}")
    for r in results:
        print(
            f"{r['op']:<20} {r['impl']:<16} {r['median_ms']:>9.3f} {r['gbps']:>8.0f} "
            f"{r['fraction_of_copy']:>7.2f}"
        )
    if args.out:
        report = dict(
            device=name,
            torch=torch.__version__,
            config=dict(
                tokens=T,
                hidden=H,
                topk=k,
                experts=E,
                dtype=args.dtype,
                rows=N,
                iters=args.iters,
                warmup=args.warmup,
            ),
            copy=dict(median_ms=copy_ms, gbps=copy_gbps, bytes=2 * N * H * e),
            results=results,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
