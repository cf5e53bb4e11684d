"""CUDA kernels of moe_parallel against the CPU kernels and float64 plain-PyTorch references.

Every op registered for CUDA (permute, unpermute, unpermute_backward, sort_chunks, grouped_gemm,
grouped_gemm_wgrad, the block-sparse products, swiglu) runs on random non-zero data with ragged
expert counts, empty experts, drops, padding, k in {1, 2, 6, 8}, T = 1 up to T = 4096 x
H = 1024, in float32/float64/bfloat16/float16, forward and backward (the backward ops directly
and through autograd). Freed allocator blocks are filled with 0x7F bytes first, so output rows
a kernel forgets to write show up. Bad input must raise before any moe_parallel kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not ops.has_extension(), reason=f"moe_parallel._C not loaded ({ops.extension_error()!r})"
    ),
]

DEV = "cuda"
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Relative-norm error bounds against float64 references.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Elementwise CUDA-vs-CPU bounds: same accumulation dtype and order, so at most a rounding step.
CLOSE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
K_VALUES = [1, 2, 6, 8]


def M():
    return torch.ops.moe_parallel


# ---------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """CPU tensor of N(0,1) values shifted away from 0 (|v| >= 0.05)."""
    t = torch.randn(*shape, generator=gen(seed), dtype=torch.float64)
    t = t + 0.05 * torch.where(t >= 0, 1.0, -1.0)
    return t.to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert tuple(out.shape) == tuple(ref.shape), (tuple(out.shape), tuple(ref.shape))
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_ref(out: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    err = rel_err(out, ref)
    assert err < bound, f"relative error {err:.3e} >= {bound:.1e}"


def assert_cpu_close(out_cuda: torch.Tensor, out_cpu: torch.Tensor, dtype: torch.dtype) -> None:
    assert out_cuda.device.type == "cuda"
    assert out_cuda.dtype == out_cpu.dtype and out_cuda.shape == out_cpu.shape
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, **CLOSE[dtype])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def poison_allocator() -> None:
    """Fill blocks of the CUDA caching allocator with 0x7F bytes and free them, so the next
    outputs likely reuse that memory: a row a kernel fails to write then holds 0x7F7F.. values."""
    for size in (1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24, 1 << 26):
        blocks = [torch.full((size,), 0x7F, dtype=torch.uint8, device=DEV) for _ in range(3)]
        del blocks


def routing(T: int, k: int, seed: int, drop: float = 0.0, repeats: bool = False):
    """``(expert_idx [T, k] int64, keep [T, k] bool or None, E)`` on CPU: skewed (ragged) expert
    popularity, two experts never chosen; ``repeats`` lets a token pick an expert twice."""
    g = gen(seed)
    E = 2 * k + 3
    weights = torch.rand(E, generator=g, dtype=torch.float64) ** 3 + 0.01
    weights[torch.randperm(E, generator=g)[:2]] = 0.0
    if repeats:
        expert_idx = torch.multinomial(weights, T * k, replacement=True, generator=g).view(T, k)
    else:
        expert_idx = torch.multinomial(weights.expand(T, E).contiguous(), k, generator=g)
    keep = torch.rand(T, k, generator=g) >= drop if drop > 0 else None
    return expert_idx.contiguous(), keep, E


def pad_value(mode: str, expert_idx, keep, E) -> int:
    if mode == "none":
        return 0
    flat = expert_idx.reshape(-1) if keep is None else expert_idx.reshape(-1)[keep.reshape(-1)]
    largest = int(torch.bincount(flat, minlength=E).max()) if flat.numel() else 0
    return max(largest, 1) if mode == "tight" else largest + 3


def on(t):
    return None if t is None else t.to(DEV)


# ---------------------------------------------------------------- float64 references


def ref_permute_index(expert_idx, E, keep, pad_to):
    """(row_map [T, k], src [N] token of each row or -1 for padding, counts [E]), all CPU int64;
    rows of expert e in ascending (t, j) order."""
    T, k = expert_idx.shape
    flat = expert_idx.reshape(-1).tolist()
    kept = keep.reshape(-1).tolist() if keep is not None else [True] * (T * k)
    members = [[] for _ in range(E)]
    for i, (e, kp) in enumerate(zip(flat, kept)):
        if kp:
            members[e].append(i)
    counts = [len(m) for m in members]
    n = E * pad_to if pad_to > 0 else sum(counts)
    row_map, src, start = [-1] * (T * k), [-1] * n, 0
    for e in range(E):
        for r, i in enumerate(members[e]):
            row_map[i] = start + r
            src[start + r] = i // k
        start += pad_to if pad_to > 0 else counts[e]
    return (
        torch.tensor(row_map, dtype=torch.int64).view(T, k),
        torch.tensor(src, dtype=torch.int64),
        torch.tensor(counts, dtype=torch.int64),
    )


def ref_gather(x, src):
    out = torch.zeros(src.numel(), x.shape[1], dtype=torch.float64)
    valid = src >= 0
    out[valid] = x.detach().double().cpu()[src[valid]]
    return out


def ones_or(probs, T: int, k: int) -> torch.Tensor:
    """probs as CPU float64, or ones [T, k] when probs is None."""
    if probs is not None:
        return probs.detach().double().cpu()
    return torch.ones(T, k, dtype=torch.float64)


def ref_unpermute(y, row_map, probs):
    y64, rm = y.detach().double().cpu(), row_map.cpu()
    T, k = rm.shape
    out = torch.zeros(T, y64.shape[1], dtype=torch.float64)
    for j in range(k):
        rows = rm[:, j]
        valid = rows >= 0
        w = ones_or(probs, T, k)[:, j]
        out[valid] += w[valid, None] * y64[rows[valid]]
    return out


def ref_unpermute_grads(grad_out, y, row_map, probs, num_rows):
    g64, y64, rm = grad_out.double().cpu(), y.double().cpu(), row_map.cpu()
    t_idx, j_idx = (rm >= 0).nonzero(as_tuple=True)
    rows = rm[t_idx, j_idx]
    w = ones_or(probs, rm.shape[0], rm.shape[1])[t_idx, j_idx]
    grad_y = torch.zeros(num_rows, y64.shape[1], dtype=torch.float64)
    grad_y[rows] = w[:, None] * g64[t_idx]
    grad_p = torch.zeros(rm.shape, dtype=torch.float64)
    grad_p[t_idx, j_idx] = (g64[t_idx] * y64[rows]).sum(1)
    return grad_y, grad_p


def random_row_map(T: int, k: int, num_rows: int, seed: int, drop: float = 0.25):
    """Injective row_map into [0, num_rows) with some -1 entries; num_rows >= T*k."""
    g = gen(seed)
    rm = torch.randperm(num_rows, generator=g)[: T * k].view(T, k).clone()
    rm[torch.rand(T, k, generator=g) < drop] = -1
    return rm


# ---------------------------------------------------------------- permute


def check_permute(x, expert_idx, E, keep, pad_to):
    """CUDA permute == CPU permute (bitwise) == float64 reference."""
    poison_allocator()
    p, rm, tpe = M().permute(on(x), on(expert_idx), E, on(keep), pad_to)
    p_cpu, rm_cpu, tpe_cpu = M().permute(x, expert_idx, E, keep, pad_to)
    ref_rm, ref_src, ref_counts = ref_permute_index(expert_idx, E, keep, pad_to)
    assert p.device.type == rm.device.type == tpe.device.type == "cuda"
    assert p.dtype == x.dtype and rm.dtype == tpe.dtype == torch.int64
    assert torch.equal(rm.cpu(), ref_rm) and torch.equal(rm_cpu, ref_rm)
    assert torch.equal(tpe.cpu(), ref_counts) and torch.equal(tpe_cpu, ref_counts)
    assert bitwise_equal(p, p_cpu)
    assert torch.equal(p.double().cpu(), ref_gather(x, ref_src))
    return p, rm, tpe


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("pad_mode", ["none", "tight", "slack"])
@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("T,H", [(1, 64), (300, 13), (300, 64)])
def test_permute(dtype, k, pad_mode, drop, T, H):
    expert_idx, keep, E = routing(T, k, seed=T * 31 + k, drop=drop)
    x = randn(T, H, dtype=dtype, seed=k)
    check_permute(x, expert_idx, E, keep, pad_value(pad_mode, expert_idx, keep, E))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_permute_unaligned_and_strided_x(dtype):
    T, H, k = 200, 64, 2
    expert_idx, keep, E = routing(T, k, seed=5, drop=0.2)
    base = randn(T * H + 1, dtype=dtype, seed=3)
    xt = randn(H, T, dtype=dtype, seed=4)
    cases = [
        (base[1:].view(T, H), base.to(DEV)[1:].view(T, H)),  # data pointer not 16-byte aligned
        (xt.t(), xt.to(DEV).t()),  # non-contiguous
    ]
    for x_cpu, x_dev in cases:
        for pad in (0, pad_value("slack", expert_idx, keep, E)):
            poison_allocator()
            p, rm, _ = M().permute(x_dev, on(expert_idx), E, on(keep), pad)
            p_cpu, rm_cpu, _ = M().permute(x_cpu, expert_idx, E, keep, pad)
            assert torch.equal(rm.cpu(), rm_cpu) and bitwise_equal(p, p_cpu)


@pytest.mark.parametrize("k", [2, 8])
def test_permute_repeated_experts(k):
    expert_idx, keep, E = routing(150, k, seed=11, drop=0.1, repeats=True)
    x = randn(150, 32, dtype=torch.bfloat16, seed=1)
    for mode in ("none", "slack"):
        check_permute(x, expert_idx, E, keep, pad_value(mode, expert_idx, keep, E))


def test_permute_all_dropped_and_empty():
    T, H, k = 20, 16, 2
    expert_idx, _, E = routing(T, k, seed=2)
    x = randn(T, H, seed=2)
    none_kept = torch.zeros(T, k, dtype=torch.bool)
    p, rm, tpe = check_permute(x, expert_idx, E, none_kept, 0)
    assert p.shape == (0, H) and bool((rm == -1).all()) and int(tpe.sum()) == 0
    p, _, _ = check_permute(x, expert_idx, E, none_kept, 3)
    assert p.shape == (E * 3, H) and bool((p == 0).all())
    empty_idx = torch.zeros(0, k, dtype=torch.int64)
    p, rm, tpe = check_permute(x[:0], empty_idx, E, None, 0)
    assert p.shape == (0, H) and rm.shape == (0, k) and tpe.shape == (E,)


# ---------------------------------------------------------------- unpermute (+ backward op)

PROBS_KINDS = ["none", "same", "float32", "float64"]


def make_probs(kind, T, k, dtype, seed):
    if kind == "none":
        return None
    pdtype = dtype if kind == "same" else getattr(torch, kind)
    return torch.rand(T, k, generator=gen(seed), dtype=torch.float64).add_(0.1).to(pdtype)


def make_row_map(kind, T, k, seed):
    """(row_map, num_rows): from permute with padding and drops, or a random injective map."""
    if kind == "permute":
        expert_idx, keep, E = routing(T, k, seed=seed, drop=0.2)
        pad = pad_value("slack", expert_idx, keep, E)
        rm, _, _ = ref_permute_index(expert_idx, E, keep, pad)
        return rm, E * pad
    num_rows = T * k + 5
    return random_row_map(T, k, num_rows, seed=seed), num_rows


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("probs_kind", PROBS_KINDS)
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("map_kind", ["permute", "random"])
@pytest.mark.parametrize("T,H", [(1, 64), (257, 13), (257, 64)])
def test_unpermute(dtype, probs_kind, k, map_kind, T, H):
    rm, num_rows = make_row_map(map_kind, T, k, seed=T + k)
    y = randn(num_rows, H, dtype=dtype, seed=k + 1)
    probs = make_probs(probs_kind, T, k, dtype, seed=k + 2)
    poison_allocator()
    out = M().unpermute(on(y), on(rm), on(probs), T)
    out_cpu = M().unpermute(y, rm, probs, T)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_cpu_close(out, out_cpu, dtype)
    assert_ref(out, ref_unpermute(y, rm, probs), TOL[dtype])
    assert bitwise_equal(out, M().unpermute(on(y), on(rm), on(probs), T))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("probs_kind", PROBS_KINDS)
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("map_kind", ["permute", "random"])
@pytest.mark.parametrize("T,H", [(1, 64), (257, 13), (257, 64), (64, 2048)])
def test_unpermute_backward_op(dtype, probs_kind, k, map_kind, T, H):
    rm, num_rows = make_row_map(map_kind, T, k, seed=T * 7 + k)
    y = randn(num_rows, H, dtype=dtype, seed=k + 3)
    g = randn(T, H, dtype=dtype, seed=k + 4)
    probs = make_probs(probs_kind, T, k, dtype, seed=k + 5)
    poison_allocator()
    gy, gp = M().unpermute_backward(on(g), on(y), on(rm), on(probs), num_rows)
    gy_cpu, gp_cpu = M().unpermute_backward(g, y, rm, probs, num_rows)
    ref_gy, ref_gp = ref_unpermute_grads(g, y, rm, probs, num_rows)
    assert gy.dtype == dtype and gy.shape == (num_rows, H)
    assert_cpu_close(gy, gy_cpu, dtype)
    assert_ref(gy, ref_gy, TOL[dtype])
    unreferenced = torch.ones(num_rows, dtype=torch.bool)
    unreferenced[rm[rm >= 0]] = False
    assert bool((gy.cpu()[unreferenced] == 0).all()), "unreferenced grad_y rows must be zero"
    if probs is None:
        assert gp.shape == (0,) and gp.dtype == dtype
    else:
        assert gp.dtype == probs.dtype and gp.shape == (T, k)
        assert gp.device.type == "cuda"
        # Dot products in the accumulation dtype (summation order differs from the CPU's),
        # then rounded to probs' dtype.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert_ref(gp, gp_cpu, max(TOL[acc], TOL[probs.dtype]))
        assert_ref(gp, ref_gp, max(TOL[dtype], TOL[probs.dtype]))
        assert bool((gp.cpu()[rm < 0] == 0).all())
    gy2, gp2 = M().unpermute_backward(on(g), on(y), on(rm), on(probs), num_rows)
    assert bitwise_equal(gy, gy2) and bitwise_equal(gp, gp2)


def test_unpermute_unaligned_inputs():
    T, k, H = 100, 2, 64
    rm, num_rows = make_row_map("random", T, k, seed=9)
    base = randn(num_rows * H + 1, dtype=torch.bfloat16, seed=1)
    g_base = randn(T * H + 1, dtype=torch.bfloat16, seed=2)
    probs = make_probs("float32", T, k, torch.bfloat16, seed=3)
    y, g = base[1:].view(num_rows, H), g_base[1:].view(T, H)
    y_dev = base.to(DEV)[1:].view(num_rows, H)
    g_dev = g_base.to(DEV)[1:].view(T, H)
    out = M().unpermute(y_dev, on(rm), on(probs), T)
    assert_cpu_close(out, M().unpermute(y, rm, probs, T), torch.bfloat16)
    gy, gp = M().unpermute_backward(g_dev, y_dev, on(rm), on(probs), num_rows)
    gy_cpu, gp_cpu = M().unpermute_backward(g, y, rm, probs, num_rows)
    assert_cpu_close(gy, gy_cpu, torch.bfloat16)
    assert_ref(gp, gp_cpu, TOL[torch.float32])


def test_unpermute_empty():
    H, k = 16, 2
    rm = torch.full((5, k), -1, dtype=torch.int64)
    y = torch.zeros(0, H)
    probs = make_probs("same", 5, k, torch.float32, seed=1)
    out = M().unpermute(on(y), on(rm), on(probs), 5)
    assert out.shape == (5, H) and bool((out == 0).all())
    gy, gp = M().unpermute_backward(on(randn(5, H)), on(y), on(rm), on(probs), 0)
    assert gy.shape == (0, H) and gp.shape == (5, k) and bool((gp == 0).all())
    out = M().unpermute(on(y), on(rm[:0]), on(probs[:0]), 0)
    assert out.shape == (0, H)


# ---------------------------------------------------------------- autograd chain


def run_chain(x, expert_idx, E, keep, pad_to, probs, scale, grad):
    """loss = <grad, unpermute(permute(x) * scale, probs)>; returns (out, x.grad, probs.grad)."""
    x = x.detach().requires_grad_(True)
    probs = probs.detach().requires_grad_(True)
    permuted, rm, _ = M().permute(x, expert_idx, E, keep, pad_to)
    y = permuted * scale
    out = M().unpermute(y, rm, probs, x.shape[0])
    (out.float() * grad).sum().backward()
    return out, x.grad, probs.grad


def ref_chain(x, expert_idx, E, keep, pad_to, probs, scale, grad):
    rm, src, _ = ref_permute_index(expert_idx, E, keep, pad_to)
    x64 = x.detach().double().requires_grad_(True)
    p64 = probs.detach().double().requires_grad_(True)
    valid = src >= 0
    permuted = torch.zeros(src.numel(), x.shape[1], dtype=torch.float64)
    permuted = permuted.index_put((valid.nonzero()[:, 0],), x64[src[valid]])
    y = permuted * scale.double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for j in range(rm.shape[1]):
        rows = rm[:, j]
        term = p64[:, j : j + 1] * y[rows.clamp(min=0)]
        out = out + torch.where((rows >= 0)[:, None], term, 0.0)
    (out * grad.double()).sum().backward()
    return out, x64.grad, p64.grad


# Two roundings to the low-precision dtype (y = permuted * scale, then out) on this path.
CHAIN_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("pad_mode", ["none", "slack"])
def test_autograd_chain(dtype, k, pad_mode):
    T, H = 120, 48
    expert_idx, keep, E = routing(T, k, seed=k, drop=0.15)
    pad = pad_value(pad_mode, expert_idx, keep, E)
    n = ref_permute_index(expert_idx, E, keep, pad)[1].numel()
    x = randn(T, H, dtype=dtype, seed=1)
    probs = make_probs("same" if dtype == torch.float64 else "float32", T, k, dtype, seed=2)
    scale = randn(n, H, dtype=dtype, seed=3)
    grad = randn(T, H, dtype=torch.float32, seed=4)
    dev = run_chain(on(x), on(expert_idx), E, on(keep), pad, on(probs), on(scale), on(grad))
    cpu = run_chain(x, expert_idx, E, keep, pad, probs, scale, grad)
    ref = ref_chain(x, expert_idx, E, keep, pad, probs, scale, grad)
    bound = CHAIN_TOL[dtype]
    for d, c, r in zip(dev, cpu, ref):
        assert d.device.type == "cuda"
        assert_ref(d, c, bound)
        assert_ref(d, r, bound)


# ---------------------------------------------------------------- large sizes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("pad_mode", ["none", "slack"])
def test_large(dtype, pad_mode):
    T, H, k = 4096, 1024, 8
    expert_idx, keep, E = routing(T, k, seed=123, drop=0.05)
    pad = pad_value(pad_mode, expert_idx, keep, E)
    x = randn(T, H, dtype=dtype, seed=7)
    probs = make_probs("float32", T, k, dtype, seed=8)
    g = randn(T, H, dtype=dtype, seed=9)

    poison_allocator()
    p, rm, tpe = M().permute(on(x), on(expert_idx), E, on(keep), pad)
    ref_rm, ref_src, ref_counts = ref_permute_index(expert_idx, E, keep, pad)
    assert torch.equal(rm.cpu(), ref_rm) and torch.equal(tpe.cpu(), ref_counts)
    valid = ref_src >= 0
    pc = p.cpu()
    assert bitwise_equal(pc[valid], x[ref_src[valid]]) and bool((pc[~valid] == 0).all())
    p_cpu, _, _ = M().permute(x, expert_idx, E, keep, pad)
    assert bitwise_equal(p, p_cpu)

    y = p * 1.5 + 0.25  # padding rows become non-zero; unpermute never reads them
    y_cpu = y.cpu()
    out = M().unpermute(y, rm, on(probs), T)
    assert_cpu_close(out, M().unpermute(y_cpu, ref_rm, probs, T), dtype)
    assert_ref(out, ref_unpermute(y_cpu, ref_rm, probs), TOL[dtype])

    poison_allocator()
    gy, gp = M().unpermute_backward(on(g), y, rm, on(probs), y.shape[0])
    gy_cpu, gp_cpu = M().unpermute_backward(g, y_cpu, ref_rm, probs, y.shape[0])
    assert_cpu_close(gy, gy_cpu, dtype)
    assert_ref(gp, gp_cpu, TOL[torch.float32])
    ref_gy, ref_gp = ref_unpermute_grads(g, y_cpu, ref_rm, probs, y.shape[0])
    assert_ref(gy, ref_gy, TOL[dtype])
    assert_ref(gp, ref_gp, TOL[dtype])

    # Deterministic: a second run is bitwise identical.
    p2, rm2, _ = M().permute(on(x), on(expert_idx), E, on(keep), pad)
    assert bitwise_equal(p, p2) and torch.equal(rm, rm2)
    assert bitwise_equal(out, M().unpermute(y, rm, on(probs), T))
    gy2, gp2 = M().unpermute_backward(on(g), y, rm, on(probs), y.shape[0])
    assert bitwise_equal(gy, gy2) and bitwise_equal(gp, gp2)


# ---------------------------------------------------------------- sort_chunks, grouped GEMMs


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_sort_chunks(dtype):
    sizes = [3, 0, 5, 1, 0, 7]
    order = [4, 2, 0, 5, 1, 3]
    x = randn(sum(sizes), 24, dtype=dtype, seed=1)
    st, ot = torch.tensor(sizes), torch.tensor(order)
    out = M().sort_chunks(on(x), st, ot)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = [r for i in order for r in range(starts[i], starts[i] + sizes[i])]
    assert out.device.type == "cuda" and out.dtype == dtype
    assert bitwise_equal(out, M().sort_chunks(x, st, ot))
    assert torch.equal(out.double().cpu(), x.double()[rows])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm(dtype, trans_b):
    sizes = [5, 0, 9, 2]
    G, K, N = len(sizes), 24, 40
    a = randn(sum(sizes), K, dtype=dtype, seed=1)
    b = randn(G, N, K, dtype=dtype, seed=2) if trans_b else randn(G, K, N, dtype=dtype, seed=2)
    gs = torch.tensor(sizes)
    out = M().grouped_gemm(on(a), on(b), gs, trans_b)
    bd = b.double().transpose(1, 2) if trans_b else b.double()
    groups = torch.repeat_interleave(torch.arange(G), gs)
    ref = torch.einsum("mk,mkn->mn", a.double(), bd[groups])
    bound = TOL[dtype]
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_ref(out, M().grouped_gemm(a, b, gs, trans_b), bound)
    assert_ref(out, ref, bound)

    grad = randn(sum(sizes), N, dtype=dtype, seed=3)
    gb = M().grouped_gemm_wgrad(on(a), on(grad), gs, trans_b)
    ref_gb = torch.zeros(G, K, N, dtype=torch.float64)
    ref_gb.index_add_(0, groups, torch.einsum("mk,mn->mkn", a.double(), grad.double()))
    ref_gb = ref_gb.transpose(1, 2) if trans_b else ref_gb
    assert gb.device.type == "cuda" and gb.dtype == dtype
    assert_ref(gb, M().grouped_gemm_wgrad(a, grad, gs, trans_b), bound)
    assert_ref(gb, ref_gb, bound)
    assert bool((gb[1] == 0).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [16, 1, 0, 8], [0, 0, 0, 0]])
def test_block_sparse(dtype, counts):
    """bsr_sdd / bsr_dsd on CUDA (host topology) against the CPU ops and float64, forward and
    backward through autograd: ragged counts, empty experts, exact multiples of B, none."""
    B, K, N, H = 8, 24, 16, 40
    tpe = torch.tensor(counts)
    offs, br, bc, rp, _, _ = ops.block_topology(tpe, B, N // B)
    m = int(offs[-1])
    x = randn(m, K, dtype=dtype, seed=1)
    w1 = randn(len(counts), K, N, dtype=dtype, seed=2)
    w2 = randn(len(counts), N, H, dtype=dtype, seed=3)
    cot = randn(m, H, dtype=dtype, seed=4)

    def run(device):
        xs, a, b = (t.to(device).requires_grad_(True) for t in (x, w1, w2))
        y = ops.bsr_dsd(torch.tanh(ops.bsr_sdd(xs, a, br, bc, B)), b, rp, bc, m)
        (y.double() * cot.to(device).double()).sum().backward()
        return [t.detach().cpu() for t in (y, xs.grad, a.grad, b.grad)]

    got, cpu = run(DEV), run("cpu")
    for g, c in zip(got, cpu):
        assert g.dtype == dtype and g.shape == c.shape
        if sum(counts):
            assert c.double().norm() > 0
            assert_ref(g, c, TOL[dtype])
        else:
            assert g.numel() == 0 or bool((g == 0).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n,f", [(1, 1), (37, 13), (300, 64), (4096, 1408), (0, 8)])
def test_swiglu(dtype, n, f):
    """swiglu forward and backward (through autograd) on CUDA against float64 and the CPU op;
    f = 13 takes the one-element path, 64 and 1408 the 16-byte one. Outputs land in poisoned
    allocator blocks, so an unwritten element shows."""
    h = randn(n, 2 * f, dtype=dtype, seed=n + f) * 3
    grad = randn(n, f, dtype=dtype, seed=7)
    poison_allocator()
    hd = h.to(DEV).requires_grad_(True)
    out = ops.swiglu(hd)
    out.backward(grad.to(DEV))
    h64 = h.double().requires_grad_(True)
    gate, up = h64.chunk(2, dim=-1)
    ref = gate * torch.sigmoid(gate) * up
    ref.backward(grad.double())
    assert out.dtype == dtype and out.shape == (n, f) and hd.grad.shape == (n, 2 * f)
    if n == 0:
        return
    assert_ref(out, ref, TOL[dtype])
    assert_ref(hd.grad, h64.grad, TOL[dtype])
    assert_cpu_close(out, M().swiglu(h), dtype)
    assert_cpu_close(hd.grad, M().swiglu_backward(grad, h), dtype)



@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n,f", [(1, 1), (37, 13), (300, 64), (0, 8)])
def test_clamped_swiglu(dtype, n, f):
    """GPT-OSS's clamped SwiGLU on CUDA against float64 (HF's formula, torch.clamp's gradient)
    and the CPU op, with a limit that clamps a good part of h."""
    alpha, limit = 1.702, 2.5
    h = randn(n, 2 * f, dtype=dtype, seed=n + f) * 4
    grad = randn(n, f, dtype=dtype, seed=7)
    poison_allocator()
    hd = h.to(DEV).requires_grad_(True)
    out = ops.clamped_swiglu(hd, alpha, limit)
    out.backward(grad.to(DEV))
    h64 = h.double().requires_grad_(True)
    gate, up = h64.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    ref = (up + 1) * gate * torch.sigmoid(alpha * gate)
    ref.backward(grad.double())
    assert out.dtype == dtype and out.shape == (n, f) and hd.grad.shape == (n, 2 * f)
    if n == 0:
        return
    assert_ref(out, ref, TOL[dtype])
    assert_ref(hd.grad, h64.grad, TOL[dtype])
    assert_cpu_close(out, M().clamped_swiglu(h, alpha, limit), dtype)
    assert_cpu_close(hd.grad, M().clamped_swiglu_backward(grad, h, alpha, limit), dtype)

# ---------------------------------------------------------------- bad input


def assert_raises_before_kernels(exc, match, fn):
    """fn raises exc (message matching) and no moe_parallel CUDA kernel ran; the device stays
    usable afterwards (no device-side assert fired)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with pytest.raises(exc, match=match):
            fn()
        torch.cuda.synchronize()
    kernels = [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "moe_parallel" in e.name
    ]
    assert not kernels, f"kernels ran before the error: {kernels}"
    torch.cuda.synchronize()


def _bad_cases():
    """name -> (exception type, argument the message must name, call)."""
    T, H, k = 6, 8, 2
    P = M()
    x = randn(T, H).to(DEV)
    idx, _, E = routing(T, k, seed=1)
    idx_d = idx.to(DEV)
    too_big, negative = idx_d.clone(), idx_d.clone()
    too_big[0, 0] = E
    negative[1, 0] = -1
    y = randn(T * k, H).to(DEV)
    rm = torch.arange(T * k).view(T, k).to(DEV)
    probs = make_probs("same", T, k, torch.float32, seed=1).to(DEV)
    g = randn(T, H).to(DEV)
    b = randn(1, H, 4)
    sizes = torch.tensor([T * k])
    cpu_keep = torch.ones(T, k, dtype=torch.bool)
    h = randn(T, 2 * H).to(DEV)
    return {
        "swiglu_odd_width": (ValueError, "h", lambda: P.swiglu(h[:, :-1].contiguous())),
        "swiglu_int": (ValueError, "h", lambda: P.swiglu(h.long())),
        "swiglu_grad_on_cpu": (RuntimeError, "grad_out", lambda: P.swiglu_backward(g.cpu(), h)),
        "swiglu_grad_shape": (ValueError, "grad_out", lambda: P.swiglu_backward(h, h)),
        "expert_idx_on_cpu": (RuntimeError, "expert_idx", lambda: P.permute(x, idx, E)),
        "keep_on_cpu": (RuntimeError, "keep", lambda: P.permute(x, idx_d, E, cpu_keep)),
        "x_int": (ValueError, "x", lambda: P.permute(x.int(), idx_d, E)),
        "expert_idx_int32": (ValueError, "expert_idx", lambda: P.permute(x, idx_d.int(), E)),
        "expert_idx_too_big": (ValueError, "expert_idx", lambda: P.permute(x, too_big, E)),
        "expert_idx_negative": (ValueError, "expert_idx", lambda: P.permute(x, negative, E)),
        "pad_to_too_small": (ValueError, "pad_to", lambda: P.permute(x, idx_d, E, None, 1)),
        "row_map_on_cpu": (RuntimeError, "row_map", lambda: P.unpermute(y, rm.cpu(), probs, T)),
        "probs_on_cpu": (RuntimeError, "probs", lambda: P.unpermute(y, rm, probs.cpu(), T)),
        "y_int": (ValueError, "y", lambda: P.unpermute(y.long(), rm, probs, T)),
        "probs_int": (ValueError, "probs", lambda: P.unpermute(y, rm, probs.int(), T)),
        "row_map_too_big": (ValueError, "row_map", lambda: P.unpermute(y, rm + 1, probs, T)),
        "row_map_negative": (ValueError, "row_map", lambda: P.unpermute(y, rm - 2, probs, T)),
        "bwd_grad_out_dtype": (
            ValueError,
            "grad_out",
            lambda: P.unpermute_backward(g.double(), y, rm, probs, T * k),
        ),
        "bwd_grad_out_on_cpu": (
            RuntimeError,
            "grad_out",
            lambda: P.unpermute_backward(g.cpu(), y, rm, probs, T * k),
        ),
        "bwd_row_map_too_big": (
            ValueError,
            "row_map",
            lambda: P.unpermute_backward(g, y, rm + 1, probs, T * k),
        ),
        "sort_chunks_sizes_on_cuda": (
            RuntimeError,
            "split_sizes",
            lambda: P.sort_chunks(y, sizes.to(DEV), torch.tensor([0])),
        ),
        "grouped_gemm_sizes_on_cuda": (
            RuntimeError,
            "group_sizes",
            lambda: P.grouped_gemm(y, b.to(DEV), sizes.to(DEV), False),
        ),
        "grouped_gemm_b_on_cpu": (RuntimeError, "b", lambda: P.grouped_gemm(y, b, sizes, False)),
    }


BAD_NAMES = [
    "expert_idx_on_cpu",
    "keep_on_cpu",
    "x_int",
    "expert_idx_int32",
    "expert_idx_too_big",
    "expert_idx_negative",
    "pad_to_too_small",
    "row_map_on_cpu",
    "probs_on_cpu",
    "y_int",
    "probs_int",
    "row_map_too_big",
    "row_map_negative",
    "bwd_grad_out_dtype",
    "bwd_grad_out_on_cpu",
    "bwd_row_map_too_big",
    "sort_chunks_sizes_on_cuda",
    "grouped_gemm_sizes_on_cuda",
    "grouped_gemm_b_on_cpu",
]


@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_input(case):
    exc, name, fn = _bad_cases()[case]
    assert_raises_before_kernels(exc, rf"\b{name}\b", fn)
    # The device is still healthy: a valid call works.
    x = randn(4, 8).to(DEV)
    idx = torch.tensor([[0], [1], [0], [2]], device=DEV)
    p, rm, tpe = M().permute(x, idx, 3)
    assert tpe.tolist() == [2, 1, 1] and rm.view(-1).tolist() == [0, 2, 1, 3]
