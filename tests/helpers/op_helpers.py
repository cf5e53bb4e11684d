"""Shared helpers of the op tests: tolerances and error measures, seeded inputs (routing, the
unpermute and grouped-GEMM inputs) and the float64 loop references every op is checked against.
"""

from __future__ import annotations

import pytest
import torch

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


# ---------------------------------------------------------------- inputs


def pad_value(mode: str, expert_idx, keep, E) -> int:
    if mode == "none":
        return 0
    flat = expert_idx.reshape(-1) if keep is None else expert_idx.reshape(-1)[keep.reshape(-1)]
    largest = int(torch.bincount(flat, minlength=E).max())
    return largest if mode == "tight" else largest + 3


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


def op_under_test(name: str, impl: str):
    """``ops.<name>`` ("public"), its twin ``ops.<name>_torch`` ("twin") or the compiled
    ``torch.ops.moe_parallel.<name>`` ("compiled"; skipped without the extension)."""
    if impl == "public":
        return getattr(ops, name)
    if impl == "twin":
        return getattr(ops, f"{name}_torch")
    if not EXT:
        pytest.skip("moe_parallel._C not loaded")
    return getattr(torch.ops.moe_parallel, name)


def assert_bad_input(name: str, impl: str, args: tuple, match: str) -> None:
    """The op rejects ``args`` with a ValueError/RuntimeError whose message matches ``match``
    (the argument's name)."""
    fn = op_under_test(name, impl)
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn(*args)


def bad_input_test(cases: dict, impls: tuple[str, ...] = ("public", "twin")):
    """A test over ``cases`` (``{id: (op name, args, message pattern)}``) x ``impls``: each
    call is rejected with an error naming the argument (``assert_bad_input``)."""

    @pytest.mark.parametrize("impl", list(impls))
    @pytest.mark.parametrize("case", list(cases))
    def test(impl, case):
        name, args, match = cases[case]
        assert_bad_input(name, impl, args, match)

    return test
