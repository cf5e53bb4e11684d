"""The moe_parallel ops against their plain-PyTorch twins and float64 loop references.

Every op is checked forward and backward on random data (ragged counts with empty experts,
drops, padding, zero-size chunks/groups) in float32, float64 and bfloat16, through gradcheck and
torch.library.opcheck, on bad input (errors name the argument) and for bitwise determinism.
Tests that call ``torch.ops.moe_parallel`` directly need the compiled extension; the public
functions fall back to the twins without it, so their tests always run.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import moe_parallel
from moe_parallel import ops

EXT = ops.has_extension()
needs_ext = pytest.mark.skipif(
    not EXT, reason=f"moe_parallel._C not loaded ({ops.extension_error()!r}); twins tested only"
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
H = 8


def tol(*dtypes: torch.dtype) -> float:
    """Tolerance of the least precise dtype involved."""
    return max(TOL[d] for d in dtypes)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute ‖out‖ when ref is zero)."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    err = rel_err(out, ref)
    assert err < bound, f"relative error {err:.3e} >= {bound:.1e}"


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype=torch.float32, seed: int = 0, requires_grad: bool = False):
    t = torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def make_routing(T: int, k: int, seed: int, drop: float = 0.0, repeats: bool = False):
    """Random ``(expert_idx [T, k], keep or None, E)``: two experts never chosen, the others
    chosen a random (ragged) number of times; ``repeats`` allows an expert twice per token;
    ``drop`` > 0 drops that fraction of assignments (at least one)."""
    g = gen(seed)
    E = k + 4
    active = torch.randperm(E, generator=g)[: k + 2]
    if repeats:
        expert_idx = active[torch.randint(0, k + 2, (T, k), generator=g)]
    else:
        expert_idx = active[torch.rand(T, k + 2, generator=g).argsort(1)[:, :k]]
    keep = None
    if drop > 0:
        keep = torch.rand(T, k, generator=g) >= drop
        keep[0, 0] = False  # at least one drop
    return expert_idx.contiguous(), keep, E


# ---------------------------------------------------------------- float64 loop references


def ref_permute(x, expert_idx, E, keep, pad_to):
    T, k = expert_idx.shape
    ei = expert_idx.tolist()
    kp = keep.tolist() if keep is not None else [[True] * k for _ in range(T)]
    members = [
        [(t, j) for t in range(T) for j in range(k) if kp[t][j] and ei[t][j] == e] for e in range(E)
    ]
    counts = [len(m) for m in members]
    n = E * pad_to if pad_to > 0 else sum(counts)
    out = torch.zeros(n, x.shape[1], dtype=torch.float64)
    row_map = [[-1] * k for _ in range(T)]
    start = 0
    for e in range(E):
        for r, (t, j) in enumerate(members[e]):
            out[start + r] = x[t].double()
            row_map[t][j] = start + r
        start += pad_to if pad_to > 0 else counts[e]
    return out, torch.tensor(row_map, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)


def ref_permute_grad(grad_permuted, row_map):
    T, k = row_map.shape
    g = torch.zeros(T, grad_permuted.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                g[t] += grad_permuted[r].double()
    return g


def ref_unpermute(y, row_map, probs):
    T, k = row_map.shape
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                w = 1.0 if probs is None else float(probs[t, j])
                out[t] += w * y[r].double()
    return out


def ref_unpermute_grads(grad_out, y, row_map, probs):
    T, k = row_map.shape
    grad_y = torch.zeros(y.shape, dtype=torch.float64)
    grad_p = torch.zeros(T, k, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                w = 1.0 if probs is None else float(probs[t, j])
                grad_y[r] = w * grad_out[t].double()
                grad_p[t, j] = float(grad_out[t].double() @ y[r].double())
    return grad_y, grad_p


def ref_sort_chunks(x, sizes, order):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = [r for i in order for r in range(starts[i], starts[i] + sizes[i])]
    return x.double()[rows] if rows else x.double()[:0]


def ref_sort_chunks_grad(grad, sizes, order):
    # chunk order[p] of x went to output block p
    out_start = [sum(sizes[order[q]] for q in range(p)) for p in range(len(order))]
    gx = torch.zeros(grad.shape, dtype=torch.float64)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for p, i in enumerate(order):
        gx[starts[i] : starts[i] + sizes[i]] = grad[out_start[p] : out_start[p] + sizes[i]].double()
    return gx


def group_of_rows(sizes):
    return [g for g, s in enumerate(sizes) for _ in range(s)]


def ref_grouped_gemm(a, b, sizes, trans_b):
    bd = b.double().transpose(1, 2) if trans_b else b.double()  # [G, K, N]
    out = torch.zeros(a.shape[0], bd.shape[2], dtype=torch.float64)
    for i, g in enumerate(group_of_rows(sizes)):
        for n in range(bd.shape[2]):
            out[i, n] = sum(float(a[i, kk]) * float(bd[g, kk, n]) for kk in range(a.shape[1]))
    return out


def ref_grouped_gemm_grads(a, b, sizes, trans_b, grad_out):
    """(grad_a, grad_b) of ``out = a_g @ B_g`` with ``B_g = b[g]`` (``b[g]^T`` if trans_b)."""
    bd = b.double().transpose(1, 2) if trans_b else b.double()  # [G, K, N]
    grad_a = torch.zeros(a.shape, dtype=torch.float64)
    grad_bkn = torch.zeros(bd.shape, dtype=torch.float64)
    for i, g in enumerate(group_of_rows(sizes)):
        grad_a[i] = bd[g] @ grad_out[i].double()
        grad_bkn[g] += torch.outer(a[i].double(), grad_out[i].double())
    return grad_a, (grad_bkn.transpose(1, 2) if trans_b else grad_bkn)


# ---------------------------------------------------------------- permute

K_VALUES = [1, 2, 6]
PAD_MODES = ["none", "tight", "slack"]


def pad_value(mode: str, expert_idx, keep, E) -> int:
    if mode == "none":
        return 0
    flat = expert_idx.reshape(-1) if keep is None else expert_idx.reshape(-1)[keep.reshape(-1)]
    largest = int(torch.bincount(flat, minlength=E).max())
    return largest if mode == "tight" else largest + 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_permute(dtype, k, pad_mode, drop):
    T = 11
    expert_idx, keep, E = make_routing(T, k, seed=k * 7 + int(drop * 10), drop=drop)
    pad_to = pad_value(pad_mode, expert_idx, keep, E)
    x = randn(T, H, dtype=dtype, seed=1, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()

    out, row_map, tpe = ops.permute(x, expert_idx, E, keep, pad_to)
    t_out, t_row_map, t_tpe = ops.permute_torch(x_twin, expert_idx, E, keep, pad_to)
    r_out, r_row_map, r_tpe = ref_permute(x.detach(), expert_idx, E, keep, pad_to)

    assert out.dtype == dtype and row_map.dtype == torch.int64 and tpe.dtype == torch.int64
    assert torch.equal(row_map, r_row_map) and torch.equal(t_row_map, r_row_map)
    assert torch.equal(tpe, r_tpe) and torch.equal(t_tpe, r_tpe)
    assert (tpe == 0).sum() >= 2  # empty experts present
    if drop > 0:
        assert (row_map == -1).any()
    # A permutation copies values: exact against the reference.
    assert torch.equal(out.detach(), r_out.to(dtype)) and torch.equal(t_out.detach(), out.detach())
    if pad_to > 0:
        assert out.shape[0] == E * pad_to
        padding = torch.ones(out.shape[0], dtype=torch.bool)
        padding[row_map[row_map >= 0]] = False
        assert padding.sum() == E * pad_to - int(tpe.sum())
        assert torch.equal(out.detach()[padding], torch.zeros_like(out.detach()[padding]))

    grad = randn(*out.shape, dtype=dtype, seed=2)
    (gx,) = torch.autograd.grad(out, x, grad)
    (t_gx,) = torch.autograd.grad(t_out, x_twin, grad)
    r_gx = ref_permute_grad(grad, r_row_map)
    assert gx.dtype == dtype
    assert_close(gx, r_gx, tol(dtype))
    assert_close(gx, t_gx, tol(dtype))


@pytest.mark.parametrize("repeats", [False, True])
def test_permute_repeated_experts_and_empty_input(repeats):
    """Order is (expert, t, j) also when a token picks an expert twice; T = 0 is allowed."""
    expert_idx, keep, E = make_routing(9, 3, seed=5, drop=0.2, repeats=repeats)
    x = randn(9, H, dtype=torch.float64, seed=3)
    out, row_map, tpe = ops.permute(x, expert_idx, E, keep)
    r_out, r_row_map, r_tpe = ref_permute(x, expert_idx, E, keep, 0)
    assert torch.equal(out, r_out) and torch.equal(row_map, r_row_map)
    assert torch.equal(tpe, r_tpe)

    empty = torch.empty(0, H, dtype=torch.float32)
    out, row_map, tpe = ops.permute(empty, torch.empty(0, 2, dtype=torch.int64), 4, None, 3)
    assert out.shape == (12, H) and torch.equal(out, torch.zeros(12, H))
    assert row_map.shape == (0, 2) and torch.equal(tpe, torch.zeros(4, dtype=torch.int64))


# ---------------------------------------------------------------- unpermute

PROBS_KINDS = ["none", "float32", "float64"]


def unpermute_inputs(dtype, k, probs_kind, pad_mode, seed=0):
    T = 10
    expert_idx, keep, E = make_routing(T, k, seed=seed + k, drop=0.3)
    pad_to = pad_value(pad_mode, expert_idx, keep, E)
    _, row_map, _ = ref_permute(torch.zeros(T, 1), expert_idx, E, keep, pad_to)
    n = E * pad_to if pad_to > 0 else int((row_map >= 0).sum())
    y = randn(n, H, dtype=dtype, seed=seed + 11)
    probs = None
    if probs_kind != "none":
        probs = torch.rand(T, k, generator=gen(seed + 12), dtype=torch.float64) + 0.1
        probs = probs.to(getattr(torch, probs_kind))
    return y, row_map, probs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("probs_kind", PROBS_KINDS)
@pytest.mark.parametrize("pad_mode", ["none", "slack"])
def test_unpermute(dtype, k, probs_kind, pad_mode):
    y, row_map, probs = unpermute_inputs(dtype, k, probs_kind, pad_mode)
    assert (row_map == -1).any()
    y.requires_grad_()
    y_twin = y.detach().clone().requires_grad_()
    p = p_twin = None
    if probs is not None:
        p = probs.clone().requires_grad_()
        p_twin = probs.clone().requires_grad_()

    out = ops.unpermute(y, row_map, p)
    t_out = ops.unpermute_torch(y_twin, row_map, p_twin)
    r_out = ref_unpermute(y.detach(), row_map, probs)
    assert out.dtype == dtype and out.shape == (row_map.shape[0], H)
    # probs are cast to the accumulation dtype (float32, float64 for float64 y), which is exact
    # or within float32 rounding: y's dtype sets the tolerance of out and grad_y.
    bound = tol(dtype)
    assert_close(out, r_out, bound)
    assert_close(out, t_out, bound)

    grad = randn(*out.shape, dtype=dtype, seed=4)
    inputs = (y,) if p is None else (y, p)
    twin_inputs = (y_twin,) if p is None else (y_twin, p_twin)
    grads = torch.autograd.grad(out, inputs, grad)
    t_grads = torch.autograd.grad(t_out, twin_inputs, grad)
    r_gy, r_gp = ref_unpermute_grads(grad, y.detach(), row_map, probs)
    assert grads[0].dtype == dtype
    assert_close(grads[0], r_gy, bound)
    assert_close(grads[0], t_grads[0], bound)
    if p is not None:
        assert grads[1].dtype == probs.dtype
        gp_bound = tol(dtype, probs.dtype)  # grad_probs is rounded to probs' dtype
        assert_close(grads[1], r_gp, gp_bound)
        assert_close(grads[1], t_grads[1], gp_bound)
        assert torch.equal(grads[1][row_map == -1], torch.zeros_like(grads[1][row_map == -1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("probs_kind", PROBS_KINDS)
def test_unpermute_backward_op(dtype, probs_kind):
    """unpermute_backward (twin always, compiled op when built) against the loop reference."""
    y, row_map, probs = unpermute_inputs(dtype, 2, probs_kind, "slack", seed=3)
    grad_out = randn(row_map.shape[0], H, dtype=dtype, seed=5)
    r_gy, r_gp = ref_unpermute_grads(grad_out, y, row_map, probs)
    impls = [ops.unpermute_backward_torch]
    if EXT:
        impls.append(torch.ops.moe_parallel.unpermute_backward)
    for fn in impls:
        gy, gp = fn(grad_out, y, row_map, probs, y.shape[0])
        assert gy.dtype == dtype and gy.shape == y.shape
        assert_close(gy, r_gy, tol(dtype))
        if probs is None:
            assert gp.shape == (0,) and gp.dtype == dtype
        else:
            assert gp.dtype == probs.dtype
            assert_close(gp, r_gp, tol(dtype, probs.dtype))


# ---------------------------------------------------------------- sort_chunks

CHUNK_CASES = {
    "ragged_with_zeros": [3, 0, 5, 1, 0, 4],
    "single": [7],
    "all_zero": [0, 0, 0],
    "leading_trailing_zero": [0, 2, 6, 0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_sort_chunks(dtype, case):
    sizes = CHUNK_CASES[case]
    order = torch.randperm(len(sizes), generator=gen(len(sizes))).tolist()
    if len(sizes) > 1 and order == list(range(len(sizes))):
        order = order[::-1]
    x = randn(sum(sizes), H, dtype=dtype, seed=6, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    split_t, order_t = torch.tensor(sizes), torch.tensor(order)

    out = ops.sort_chunks(x, split_t, order_t)
    out_lists = ops.sort_chunks(x.detach(), sizes, order)  # int sequences are accepted too
    t_out = ops.sort_chunks_torch(x_twin, split_t, order_t)
    r_out = ref_sort_chunks(x.detach(), sizes, order)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.detach(), r_out.to(dtype))
    assert torch.equal(out_lists, out.detach()) and torch.equal(t_out.detach(), out.detach())

    grad = randn(*out.shape, dtype=dtype, seed=7)
    (gx,) = torch.autograd.grad(out, x, grad)
    (t_gx,) = torch.autograd.grad(t_out, x_twin, grad)
    r_gx = ref_sort_chunks_grad(grad, sizes, order)
    assert torch.equal(gx, r_gx.to(dtype)) and torch.equal(t_gx, gx)


# ---------------------------------------------------------------- grouped_gemm

GROUP_CASES = {
    "ragged_with_empty": [3, 0, 5, 1, 0],
    "single": [6],
    "m_zero": [0, 0, 0],
}


def gemm_inputs(dtype, case, trans_b, K=5, N=4, seed=0):
    sizes = GROUP_CASES[case]
    G, M = len(sizes), sum(sizes)
    a = randn(M, K, dtype=dtype, seed=seed + 8)
    b = randn(*((G, N, K) if trans_b else (G, K, N)), dtype=dtype, seed=seed + 9)
    return a, b, sizes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm(dtype, case, trans_b):
    a, b, sizes = gemm_inputs(dtype, case, trans_b)
    gs = torch.tensor(sizes, dtype=torch.int64)
    a.requires_grad_()
    b.requires_grad_()
    a_t, b_t = (t.detach().clone().requires_grad_() for t in (a, b))

    out = ops.grouped_gemm(a, b, gs, trans_b)
    out_list = ops.grouped_gemm(a.detach(), b.detach(), sizes, trans_b)
    t_out = ops.grouped_gemm_torch(a_t, b_t, gs, trans_b)
    r_out = ref_grouped_gemm(a.detach(), b.detach(), sizes, trans_b)
    n = b.shape[1] if trans_b else b.shape[2]
    assert out.dtype == dtype and out.shape == (sum(sizes), n)
    assert_close(out, r_out, tol(dtype))
    assert_close(out, t_out, tol(dtype))
    assert bitwise_equal(out_list, out.detach())

    grad = randn(*out.shape, dtype=dtype, seed=10)
    ga, gb = torch.autograd.grad(out, (a, b), grad)
    t_ga, t_gb = torch.autograd.grad(t_out, (a_t, b_t), grad)
    r_ga, r_gb = ref_grouped_gemm_grads(a.detach(), b.detach(), sizes, trans_b, grad)
    assert ga.dtype == dtype and gb.dtype == dtype and gb.shape == b.shape
    assert_close(ga, r_ga, tol(dtype))
    assert_close(gb, r_gb, tol(dtype))
    assert_close(ga, t_ga, tol(dtype))
    assert_close(gb, t_gb, tol(dtype))
    for g, s in enumerate(sizes):
        if s == 0:
            assert torch.equal(gb[g], torch.zeros_like(gb[g]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trans_b", [False, True])
def test_grouped_gemm_wgrad_op(dtype, trans_b):
    """grouped_gemm_wgrad (twin always, compiled op when built) against the loop reference."""
    a, b, sizes = gemm_inputs(dtype, "ragged_with_empty", trans_b, seed=1)
    gs = torch.tensor(sizes)
    grad_out = randn(a.shape[0], b.shape[1] if trans_b else b.shape[2], dtype=dtype, seed=11)
    _, r_gb = ref_grouped_gemm_grads(a, b, sizes, trans_b, grad_out)
    impls = [ops.grouped_gemm_wgrad_torch]
    if EXT:
        impls.append(torch.ops.moe_parallel.grouped_gemm_wgrad)
    for fn in impls:
        gb = fn(a, grad_out, gs, trans_b)
        assert gb.dtype == dtype and gb.shape == b.shape
        assert_close(gb, r_gb, tol(dtype))
        assert torch.equal(gb[1], torch.zeros_like(gb[1]))  # empty group


# ---------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("pad_to", [0, 9])
def test_gradcheck_permute(pad_to):
    expert_idx, keep, E = make_routing(7, 2, seed=21, drop=0.3)
    x = randn(7, 3, dtype=torch.float64, seed=12, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, expert_idx, E, keep, pad_to)[0], (x,))


@pytest.mark.parametrize("with_probs", [False, True])
def test_gradcheck_unpermute(with_probs):
    y, row_map, probs = unpermute_inputs(
        torch.float64, 2, "float64" if with_probs else "none", "slack", seed=4
    )
    y = y[:, :3].contiguous().requires_grad_()
    if with_probs:
        probs.requires_grad_()
        assert torch.autograd.gradcheck(ops.unpermute, (y, row_map, probs))
    else:
        assert torch.autograd.gradcheck(lambda y: ops.unpermute(y, row_map), (y,))


def test_gradcheck_sort_chunks():
    sizes, order = torch.tensor([2, 0, 3, 1]), torch.tensor([2, 0, 3, 1])
    x = randn(6, 3, dtype=torch.float64, seed=13, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.sort_chunks(x, sizes, order), (x,))


@pytest.mark.parametrize("trans_b", [False, True])
def test_gradcheck_grouped_gemm(trans_b):
    a, b, sizes = gemm_inputs(torch.float64, "ragged_with_empty", trans_b, K=3, N=2, seed=2)
    gs = torch.tensor(sizes)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_gemm(a, b, gs, trans_b), (a, b))


# ---------------------------------------------------------------- compiled-op glue


def _dispatched_ops(fn):
    """Names of the ops that reach the dispatcher's Python mode while running ``fn``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@needs_ext
def test_public_functions_call_compiled_ops():
    expert_idx, keep, E = make_routing(6, 2, seed=1, drop=0.2)
    x = randn(6, H, seed=1, requires_grad=True)
    a, b, sizes = gemm_inputs(torch.float32, "ragged_with_empty", False)

    def run():
        y, row_map, _ = ops.permute(x, expert_idx, E, keep)
        ops.unpermute(ops.sort_chunks(y, [y.shape[0]], [0]), row_map).sum().backward()
        ops.grouped_gemm(a.requires_grad_(), b.requires_grad_(), sizes).sum().backward()
        _, br, bc, rp, _, _ = ops.block_topology(torch.tensor([3, 0, 2]), 2, 2)
        xb = randn(6, 3, seed=2, requires_grad=True)
        w1, w2 = randn(3, 3, 4, seed=3, requires_grad=True), randn(3, 4, 3, seed=4)
        blocks = ops.bsr_sdd(xb, w1, br, bc, 2)
        ops.bsr_dsd(blocks, w2.requires_grad_(), rp, bc, 6).sum().backward()  # uses bsr_wgrad
        ops.swiglu(randn(3, 4, seed=5, requires_grad=True)).sum().backward()

    seen = set(_dispatched_ops(run))
    for name in ops.OP_NAMES:
        assert f"moe_parallel.{name}.default" in seen, (name, sorted(seen))


def _opcheck_samples():
    """(op name, args, kwargs) covering every op, with and without optional arguments."""
    f64 = torch.float64
    samples = []
    for pad_to, drop in [(0, 0.0), (0, 0.3), (8, 0.3)]:
        expert_idx, keep, E = make_routing(7, 2, seed=31 + pad_to, drop=drop)
        x = randn(7, 4, dtype=f64, seed=14, requires_grad=True)
        samples.append(("permute", (x, expert_idx, E, keep, pad_to), {}))
    for probs_kind in ["none", "float32"]:
        y, row_map, probs = unpermute_inputs(torch.float32, 2, probs_kind, "slack", seed=5)
        y.requires_grad_()
        if probs is not None:
            probs.requires_grad_()
        kw = dict(y=y, row_map=row_map, probs=probs, num_tokens=row_map.shape[0])
        samples.append(("unpermute", (), kw))
        grad_out = randn(row_map.shape[0], H, seed=15)
        args = (
            grad_out,
            y.detach(),
            row_map,
            None if probs is None else probs.detach(),
            y.shape[0],
        )
        samples.append(("unpermute_backward", args, {}))
    for sizes, order in [([2, 0, 3, 1], [3, 1, 0, 2]), ([0, 0], [1, 0])]:
        x = randn(sum(sizes), 3, dtype=f64, seed=16, requires_grad=True)
        samples.append(("sort_chunks", (x, torch.tensor(sizes), torch.tensor(order)), {}))
    for case, trans_b in [
        ("ragged_with_empty", False),
        ("ragged_with_empty", True),
        ("m_zero", True),
    ]:
        a, b, sizes = gemm_inputs(f64, case, trans_b, seed=3)
        gs = torch.tensor(sizes)
        samples.append(("grouped_gemm", (a.requires_grad_(), b.requires_grad_(), gs, trans_b), {}))
        grad_out = randn(a.shape[0], b.shape[1] if trans_b else b.shape[2], dtype=f64, seed=17)
        samples.append(("grouped_gemm_wgrad", (a.detach(), grad_out, gs, trans_b), {}))
    return samples


OPCHECK_SAMPLES = _opcheck_samples()


@needs_ext
@pytest.mark.parametrize(
    "name,args,kwargs",
    OPCHECK_SAMPLES,
    ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(OPCHECK_SAMPLES)],
)
def test_opcheck(name, args, kwargs):
    # All default sub-tests apply: schema, autograd registration, fake tensor (permute's
    # data-dependent row count goes through ctx.new_dynamic_size()) and aot_dispatch_dynamic.
    op = getattr(torch.ops.moe_parallel, name).default
    torch.library.opcheck(op, args, kwargs)


@needs_ext
def test_fake_kernels_on_meta():
    """The registered fake kernels give the contract's output shapes on meta tensors."""
    meta = torch.device("meta")
    gs = torch.tensor([2, 0, 3])
    a = torch.empty(5, 4, device=meta)
    out = torch.ops.moe_parallel.grouped_gemm(a, torch.empty(3, 4, 6, device=meta), gs, False)
    assert out.shape == (5, 6) and out.device == meta
    out = torch.ops.moe_parallel.grouped_gemm(a, torch.empty(3, 6, 4, device=meta), gs, True)
    assert out.shape == (5, 6)
    wg = torch.ops.moe_parallel.grouped_gemm_wgrad(a, torch.empty(5, 6, device=meta), gs, True)
    assert wg.shape == (3, 6, 4)
    x = torch.empty(5, 4, device=meta)
    assert torch.ops.moe_parallel.sort_chunks(x, gs, torch.tensor([2, 1, 0])).shape == (5, 4)
    ei = torch.empty(5, 2, dtype=torch.int64, device=meta)
    permuted, row_map, tpe = torch.ops.moe_parallel.permute(x, ei, 3, None, 4)
    assert permuted.shape == (12, 4) and row_map.shape == (5, 2) and tpe.shape == (3,)
    y = torch.empty(12, 4, device=meta, dtype=torch.bfloat16)
    out = torch.ops.moe_parallel.unpermute(y=y, row_map=row_map, probs=None, num_tokens=5)
    assert out.shape == (5, 4) and out.dtype == torch.bfloat16
    probs = torch.empty(5, 2, device=meta)
    go = torch.empty(5, 4, device=meta, dtype=torch.bfloat16)
    gy, gp = torch.ops.moe_parallel.unpermute_backward(go, y, row_map, probs, 12)
    assert gy.shape == (12, 4) and gy.dtype == torch.bfloat16 and gp.shape == (5, 2)
    assert gp.dtype == torch.float32


# ---------------------------------------------------------------- extension loading


def _load_ops_copy(monkeypatch, require: bool):
    """Execute ops.py afresh as a separate module with ``moe_parallel._C`` made unimportable."""
    monkeypatch.setitem(__import__("sys").modules, "moe_parallel._C", None)
    monkeypatch.delattr(moe_parallel, "_C", raising=False)
    if require:
        monkeypatch.setenv("MOE_PARALLEL_REQUIRE_EXTENSION", "1")
    else:
        monkeypatch.delenv("MOE_PARALLEL_REQUIRE_EXTENSION", raising=False)
    spec = importlib.util.spec_from_file_location("moe_parallel._ops_without_ext", ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_extension_falls_back_to_twins(monkeypatch):
    fallback = _load_ops_copy(monkeypatch, require=False)
    assert not fallback.has_extension()
    assert isinstance(fallback.extension_error(), ImportError)
    expert_idx, keep, E = make_routing(5, 2, seed=2)
    x = randn(5, H, dtype=torch.float64, seed=2)
    out, row_map, tpe = fallback.permute(x, expert_idx, E, keep)
    r_out, r_row_map, r_tpe = ref_permute(x, expert_idx, E, keep, 0)
    assert torch.equal(out, r_out) and torch.equal(row_map, r_row_map)


def test_required_extension_raises_with_cause(monkeypatch):
    with pytest.raises(ImportError, match="MOE_PARALLEL_REQUIRE_EXTENSION.*_C") as info:
        _load_ops_copy(monkeypatch, require=True)
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------- bad input


def _bad_cases():
    x = randn(6, 4, seed=18)
    ei = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    y = randn(12, 4, seed=19)
    _, row_map, _ = ops.permute_torch(x, ei, 4)
    probs = torch.rand(6, 2)
    a, b = randn(6, 3, seed=20), randn(2, 3, 5, seed=21)
    gs = torch.tensor([4, 2])
    meta = torch.device("meta")
    xs = randn(6, 4, seed=22)
    ss, od = torch.tensor([2, 0, 4]), torch.tensor([1, 2, 0])
    return {
        # permute
        "permute_int_x": ("permute", (x.long(), ei, 4), "x"),
        "permute_float_expert_idx": ("permute", (x, ei.float(), 4), "expert_idx"),
        "permute_1d_x": ("permute", (x[:, 0], ei, 4), "x"),
        "permute_1d_expert_idx": ("permute", (x, ei[:, 0], 4), "expert_idx"),
        "permute_rows_mismatch": ("permute", (x, ei[:5], 4), "expert_idx"),
        "permute_negative_expert": ("permute", (x, ei - 1, 4), "expert_idx"),
        "permute_expert_ge_E": ("permute", (x, ei, 3), "expert_idx"),
        "permute_keep_dtype": ("permute", (x, ei, 4, torch.ones(6, 2, dtype=torch.int64)), "keep"),
        "permute_keep_shape": ("permute", (x, ei, 4, torch.ones(6, 1, dtype=torch.bool)), "keep"),
        "permute_pad_to_too_small": ("permute", (x, ei, 4, None, 2), "pad_to"),
        "permute_pad_to_negative": ("permute", (x, ei, 4, None, -1), "pad_to"),
        "permute_expert_idx_device": ("permute", (x.to(meta), ei, 4), "expert_idx"),
        "permute_keep_device": (
            "permute",
            (x, ei, 4, torch.ones(6, 2, dtype=torch.bool, device=meta)),
            "keep",
        ),
        # unpermute
        "unpermute_int_y": ("unpermute", (y.long(), row_map), r"\by\b"),
        "unpermute_float_row_map": ("unpermute", (y, row_map.float()), "row_map"),
        "unpermute_1d_row_map": ("unpermute", (y, row_map[:, 0]), "row_map"),
        "unpermute_row_map_ge_N": ("unpermute", (y[:5], row_map), "row_map"),
        "unpermute_row_map_lt_minus_1": ("unpermute", (y, row_map - 2), "row_map"),
        "unpermute_probs_shape": ("unpermute", (y, row_map, probs[:, :1]), "probs"),
        "unpermute_probs_dtype": ("unpermute", (y, row_map, probs.long()), "probs"),
        "unpermute_probs_device": ("unpermute", (y, row_map, probs.to(meta)), "probs"),
        "unpermute_row_map_device": ("unpermute", (y.to(meta), row_map), "row_map"),
        # sort_chunks
        "sort_chunks_int_x": ("sort_chunks", (xs.long(), ss, od), r"\bx\b"),
        "sort_chunks_sum": ("sort_chunks", (xs, torch.tensor([2, 0, 3]), od), "split_sizes"),
        "sort_chunks_negative": ("sort_chunks", (xs, torch.tensor([7, -1, 0]), od), "split_sizes"),
        "sort_chunks_float_sizes": ("sort_chunks", (xs, ss.float(), od), "split_sizes"),
        "sort_chunks_order_repeat": ("sort_chunks", (xs, ss, torch.tensor([1, 1, 0])), "order"),
        "sort_chunks_order_range": ("sort_chunks", (xs, ss, torch.tensor([1, 3, 0])), "order"),
        "sort_chunks_order_length": ("sort_chunks", (xs, ss, torch.tensor([1, 0])), "order"),
        "sort_chunks_sizes_device": ("sort_chunks", (xs, ss.to(meta), od), "split_sizes"),
        "sort_chunks_order_device": ("sort_chunks", (xs, ss, od.to(meta)), "order"),
        # grouped_gemm
        "gemm_int_a": ("grouped_gemm", (a.long(), b.long(), gs), r"\ba\b"),
        "gemm_dtype_mismatch": ("grouped_gemm", (a, b.double(), gs), r"\bb\b"),
        "gemm_2d_b": ("grouped_gemm", (a, b[0], gs), r"\bb\b"),
        "gemm_1d_a": ("grouped_gemm", (a[:, 0], b, gs), r"\ba\b"),
        "gemm_k_mismatch": ("grouped_gemm", (a, b, gs, True), r"\bb\b"),
        "gemm_sum": ("grouped_gemm", (a, b, torch.tensor([4, 1])), "group_sizes"),
        "gemm_negative": ("grouped_gemm", (a, b, torch.tensor([7, -1])), "group_sizes"),
        "gemm_length": ("grouped_gemm", (a, b, torch.tensor([6])), "group_sizes"),
        "gemm_float_sizes": ("grouped_gemm", (a, b, gs.float()), "group_sizes"),
        "gemm_sizes_device": ("grouped_gemm", (a, b, gs.to(meta)), "group_sizes"),
        "gemm_b_device": ("grouped_gemm", (a, b.to(meta), gs), r"\bb\b"),
    }


BAD_CASES = _bad_cases()
PUBLIC = {n: getattr(ops, n) for n in ("permute", "unpermute", "sort_chunks", "grouped_gemm")}
TWINS = {n: getattr(ops, f"{n}_torch") for n in PUBLIC}


@pytest.mark.parametrize("impl", ["public", "twin"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input(impl, case):
    name, args, match = BAD_CASES[case]
    fn = (PUBLIC if impl == "public" else TWINS)[name]
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn(*args)


def _bad_backward_cases():
    y, row_map = randn(4, 3, seed=23), torch.tensor([[0, -1], [2, 1]])
    go = randn(2, 3, seed=24)
    a, go2, gs = randn(5, 3, seed=25), randn(5, 2, seed=26), torch.tensor([3, 2])
    ub = "unpermute_backward"
    return {
        "ub_grad_out_dtype": (ub, (go.double(), y, row_map, None, 4), "grad_out"),
        "ub_grad_out_shape": (ub, (go[:1], y, row_map, None, 4), "grad_out"),
        "ub_row_map_range": (ub, (go, y, row_map + 3, None, 4), "row_map"),
        "ub_probs_shape": (ub, (go, y, row_map, torch.rand(2, 3), 4), "probs"),
        "ub_num_rows": (ub, (go, y, row_map, None, 5), "num_rows"),
        "wgrad_int_a": ("grouped_gemm_wgrad", (a.long(), go2.long(), gs), r"\ba\b"),
        "wgrad_rows": ("grouped_gemm_wgrad", (a, go2[:4], gs), "grad_out"),
        "wgrad_sum": ("grouped_gemm_wgrad", (a, go2, torch.tensor([3, 1])), "group_sizes"),
        "wgrad_sizes_device": ("grouped_gemm_wgrad", (a, go2, gs.to("meta")), "group_sizes"),
    }


BAD_BACKWARD_CASES = _bad_backward_cases()


@pytest.mark.parametrize("impl", ["compiled", "twin"])
@pytest.mark.parametrize("case", list(BAD_BACKWARD_CASES))
def test_bad_input_backward_ops(impl, case):
    name, args, match = BAD_BACKWARD_CASES[case]
    if impl == "compiled":
        if not EXT:
            pytest.skip("moe_parallel._C not loaded")
        fn = getattr(torch.ops.moe_parallel, name)
    else:
        fn = getattr(ops, f"{name}_torch")
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn(*args)


@needs_ext
def test_bad_num_tokens():
    y, row_map = randn(4, 3, seed=27), torch.tensor([[0, -1], [2, 1]])
    with pytest.raises((ValueError, RuntimeError), match="num_tokens"):
        torch.ops.moe_parallel.unpermute(y=y, row_map=row_map, probs=None, num_tokens=3)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    """Two runs of every op, forward and backward, are bitwise equal."""
    expert_idx, keep, E = make_routing(40, 6, seed=41, drop=0.2)
    probs = torch.rand(40, 6, generator=gen(42))
    a_sizes = [7, 0, 13, 20]

    def run():
        x = randn(40, 16, dtype=dtype, seed=43, requires_grad=True)
        p = probs.clone().requires_grad_()
        b = randn(4, 16, 16, dtype=dtype, seed=44, requires_grad=True)
        y, row_map, tpe = ops.permute(x, expert_idx, E, keep)
        sizes = tpe.tolist()
        order = list(range(len(sizes)))[::-1]
        y = ops.sort_chunks(y, sizes, order)
        y = ops.sort_chunks(y, [sizes[i] for i in order], torch.argsort(torch.tensor(order)))
        out = ops.unpermute(y, row_map, p)
        h = ops.grouped_gemm(out, b, a_sizes, False)
        h = ops.grouped_gemm(h, b, a_sizes, True)
        h.pow(2).sum().backward()
        return [out, h, row_map, tpe, x.grad, p.grad, b.grad]

    first, second = run(), run()
    for u, v in zip(first, second):
        assert bitwise_equal(u, v)
