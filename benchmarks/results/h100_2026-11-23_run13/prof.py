import sys
import torch
sys.path.insert(0, ".")
from benchmarks.grouped_gemm_bench import group_sizes  # noqa: E402
from moe_parallel import ops  # noqa: E402
E, H, N, M = 64, 2048, 2 * 1408, 16384 * 6
gs = group_sizes(M, E, "balanced")
a = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
b = (torch.randn(E, H, N, device="cuda", dtype=torch.bfloat16) * H**-0.5).requires_grad_(True)
go = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
offs = torch.cumsum(gs, 0).to(device="cuda", dtype=torch.int32)
fns = {"ours_torch": lambda: ops.grouped_gemm(a, b, gs, backend="torch").backward(go),
       "ours_auto": lambda: ops.grouped_gemm(a, b, gs, backend="auto").backward(go),
       "direct": lambda: torch._grouped_mm(a, b, offs=offs).backward(go)}
for name, fn in fns.items():
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print("=====", name)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=90))
