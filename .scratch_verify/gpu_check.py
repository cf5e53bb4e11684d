import sys, torch
sys.path.insert(0, ".")
import moe_parallel._C  # noqa
ops = torch.ops.moe_parallel
torch.manual_seed(0)
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())
n = 0
# device-generic sort_chunks / grouped_gemm on CUDA == CPU
for dt in [torch.float32, torch.float64, torch.bfloat16, torch.float16]:
    sizes = torch.tensor([3, 0, 7, 1, 0, 5]); order = torch.randperm(6)
    x = torch.randn(16, 40).to(dt)
    assert torch.equal(ops.sort_chunks(x.to(dev), sizes, order).cpu(), ops.sort_chunks(x, sizes, order)); n += 1
    assert ops.sort_chunks(torch.randn(0, 4, device=dev).to(dt), torch.tensor([0, 0]), torch.tensor([1, 0])).shape == (0, 4); n += 1
    for trans_b in [False, True]:
        for gl in [[3, 0, 5, 1], [0, 0], [9]]:
            G, M, K, N = len(gl), sum(gl), 16, 24
            gs = torch.tensor(gl); a = torch.randn(M, K).to(dt)
            b = (torch.randn(G, N, K) if trans_b else torch.randn(G, K, N)).to(dt)
            out = ops.grouped_gemm(a.to(dev), b.to(dev), gs, trans_b).cpu().double()
            ref = ops.grouped_gemm(a.double(), b.double(), gs, trans_b)
            tol = 1e-9 if dt == torch.float64 else (3e-2 if dt in (torch.bfloat16, torch.float16) else 1e-2)
            assert (out - ref).abs().max().item() <= tol * 10 if M else out.shape == (0, N); n += 1
            go = torch.randn(M, N).to(dt)
            gb = ops.grouped_gemm_wgrad(a.to(dev), go.to(dev), gs, trans_b).cpu().double()
            rb = ops.grouped_gemm_wgrad(a.double(), go.double(), gs, trans_b)
            assert gb.shape == b.shape and (gb - rb).abs().max().item() <= tol * 10; n += 1
# CUDA kernels (other engineer) vs CPU kernels
for dt in [torch.float32, torch.bfloat16, torch.float64]:
    for k, pad in [(1, 0), (2, 0), (6, 0), (2, 1)]:
        T, E, H = 1000, 16, 72
        idx = torch.stack([torch.randperm(E - 2)[:k] for _ in range(T)]); keep = torch.rand(T, k) > 0.25
        x = torch.randn(T, H).to(dt); pad_to = 400 if pad else 0
        pc = ops.permute(x, idx, E, keep, pad_to); pg = ops.permute(x.to(dev), idx.to(dev), E, keep.to(dev), pad_to)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(pc, pg)); n += 1
        probs = torch.rand(T, k)
        uc = ops.unpermute(pc[0], pc[1], probs, T); ug = ops.unpermute(pg[0], pg[1], probs.to(dev), T).cpu()
        assert (uc.double() - ug.double()).abs().max().item() <= (1e-2 if dt == torch.bfloat16 else 1e-5); n += 1
        g = torch.randn(T, H).to(dt)
        bc = ops.unpermute_backward(g, pc[0], pc[1], probs, pc[0].shape[0])
        bg = ops.unpermute_backward(g.to(dev), pg[0], pg[1], probs.to(dev), pg[0].shape[0])
        for a, b in zip(bc, bg):
            assert a.dtype == b.dtype and (a.double() - b.cpu().double()).abs().max().item() <= (1e-2 if dt == torch.bfloat16 else 1e-4); n += 1
print("gpu value checks ok:", n)
xc = torch.randn(4, 3, device=dev); ic = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0]], device=dev)
cases = [
 ("idx cpu", lambda: ops.permute(xc, ic.cpu(), 3), "expert_idx"),
 ("idx range", lambda: ops.permute(xc, ic + 1, 3), "expert_idx"),
 ("pad_to", lambda: ops.permute(xc, ic, 3, None, 2), "pad_to"),
 ("keep cpu", lambda: ops.permute(xc, ic, 3, torch.ones(4, 2, dtype=torch.bool)), "keep"),
 ("row_map range", lambda: ops.unpermute(torch.randn(7, 3, device=dev), ic + 7, None, 4), "row_map"),
 ("probs cpu", lambda: ops.unpermute(torch.randn(7, 3, device=dev), ic, torch.rand(4, 2), 4), "probs"),
 ("split_sizes cuda", lambda: ops.sort_chunks(xc, torch.tensor([4], device=dev), torch.tensor([0])), "split_sizes"),
 ("group_sizes cuda", lambda: ops.grouped_gemm(xc, torch.randn(1, 3, 2, device=dev), torch.tensor([4], device=dev)), "group_sizes"),
 ("b cpu", lambda: ops.grouped_gemm(xc, torch.randn(1, 3, 2), torch.tensor([4])), "b"),
]
for name, fn, word in cases:
    try: fn(); print("NO ERROR", name)
    except Exception as e: print("ok " if word in str(e).splitlines()[0] else "BAD", name, type(e).__name__, str(e).splitlines()[0])
