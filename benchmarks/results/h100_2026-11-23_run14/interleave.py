"""Interleaved forward+backward timing of the fine-grained grouped GEMM: backends auto / torch /
cutlass vs torch._grouped_mm and dense, ROUNDS rounds, each a median of 20 CUDA-event times."""
import statistics
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.grouped_gemm_bench import group_sizes, step, time_ms, warm_up_clocks  # noqa: E402
from moe_parallel import ops  # noqa: E402

ROUNDS = 7
E, H, N, M = 64, 2048, 2 * 1408, 16384 * 6
warm_up_clocks()
for skew in ("balanced", "zipf"):
    gs = group_sizes(M, E, skew)
    a = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = (torch.randn(E, H, N, device="cuda", dtype=torch.bfloat16) * H**-0.5).requires_grad_(True)
    go = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    offs = torch.cumsum(gs, 0).to(device="cuda", dtype=torch.int32)
    bd = (torch.randn(H, N, device="cuda", dtype=torch.bfloat16) * H**-0.5).requires_grad_(True)
    fns = {be: (lambda be=be: step(lambda x, w: ops.grouped_gemm(x, w, gs, backend=be), a, b, go))
           for be in ("auto", "torch", "cutlass", "loop")}
    fns["torch._grouped_mm"] = lambda: step(lambda x, w: torch._grouped_mm(x, w, offs=offs), a, b, go)
    fns["dense_mm"] = lambda: step(torch.matmul, a, bd, go)
    times = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            times[k].append(time_ms(fn))
    dense = statistics.median(times["dense_mm"])
    tgm = statistics.median(times["torch._grouped_mm"])
    print(f"finegrained {skew}: median of {ROUNDS} interleaved rounds, fwd+bwd ms")
    for k, t in times.items():
        med = statistics.median(t)
        print(f"  {k:<18} {med:7.3f} ms  ÷dense {dense / med:.3f}  ÷torch._grouped_mm "
              f"{tgm / med:.3f}  rounds {' '.join(f'{x:.2f}' for x in t)}")
