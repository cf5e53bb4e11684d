"""The fused SwiGLU op against a float64 reference: forward, backward, gradcheck, opcheck,
thread-count independence and bad input. ``h = [gate | up]`` ``[N, 2F]``;
``out = silu(gate) * up``. Widths F cover the 8-column vector body, its scalar tail and both."""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops

EXT = ops.has_extension()
needs_ext = pytest.mark.skipif(not EXT, reason="moe_parallel._C not loaded; twin tested only")

TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SHAPES = [(1, 1), (7, 5), (33, 8), (300, 37), (129, 64), (0, 16)]


def reference(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64, written out: gate / (1 + exp(-gate)) * up."""
    gate, up = h.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_h(n: int, f: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2 * f, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,f", SHAPES)
def test_forward_and_backward_match_float64(dtype, n, f):
    h = make_h(n, f, dtype, seed=n + f).requires_grad_(True)
    out = ops.swiglu(h)
    assert out.shape == (n, f) and out.dtype == dtype
    grad = torch.randn(n, f, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(dtype))
    h64 = h.detach().double().requires_grad_(True)
    ref = reference(h64)
    ref.backward(grad)
    if n == 0:
        assert h.grad.shape == (0, 2 * f)
        return
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(h.grad, h64.grad) < TOL[dtype]


@pytest.mark.parametrize("f", [8, 13])
def test_extreme_gates_stay_finite_and_exact(f):
    """Gates far in both tails (sigmoid saturates): finite, and equal to the float64 values
    wherever those are representable in float32."""
    h = make_h(64, f, torch.float32, seed=3)
    h[:, :f] = torch.linspace(-100, 100, 64 * f).view(64, f)
    h.requires_grad_(True)
    out = ops.swiglu(h)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
    h64 = h.detach().double().requires_grad_(True)
    ref = reference(h64)
    ref.backward(torch.ones_like(ref))
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(h.grad, h64.grad) < TOL[torch.float32]


def test_twin_matches_float64():
    h = make_h(40, 11, torch.float32, seed=5)
    assert rel_err(ops.swiglu_torch(h), reference(h)) < TOL[torch.float32]
    grad = torch.randn(40, 11, generator=torch.Generator().manual_seed(6))
    h64 = h.double().requires_grad_(True)
    reference(h64).backward(grad.double())
    assert rel_err(ops.swiglu_backward_torch(grad, h), h64.grad) < TOL[torch.float32]


@needs_ext
def test_gradcheck():
    h = make_h(6, 9, torch.float64, seed=7).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,))


@needs_ext
@pytest.mark.parametrize("f", [5, 16])
def test_opcheck(f):
    h = make_h(4, f, torch.float64, seed=8).requires_grad_(True)
    torch.library.opcheck(torch.ops.moe_parallel.swiglu.default, (h,))
    grad = torch.randn(4, f, dtype=torch.float64)
    torch.library.opcheck(torch.ops.moe_parallel.swiglu_backward.default, (grad, h.detach()))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_threads(dtype):
    h = make_h(257, 72, dtype, seed=9)  # 257·72 elements: above the parallel grain
    grad = make_h(257, 36, dtype, seed=10)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append((torch.ops.moe_parallel.swiglu(h),
                         torch.ops.moe_parallel.swiglu_backward(grad, h)))
    finally:
        torch.set_num_threads(before)
    for out, gh in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(gh, runs[0][1])


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (lambda: torch.ops.moe_parallel.swiglu(torch.randn(6)), "h must be a 2-D"),
    (lambda: torch.ops.moe_parallel.swiglu(torch.randn(3, 5)), "h must have an even number"),
    (lambda: torch.ops.moe_parallel.swiglu(torch.ones(3, 4, dtype=torch.int64)),
     "h must have dtype"),
    (lambda: torch.ops.moe_parallel.swiglu_backward(torch.randn(3, 3), torch.randn(3, 4)),
     r"grad_out must have shape \[N, F\]"),
    (lambda: torch.ops.moe_parallel.swiglu_backward(torch.randn(3, 2, dtype=torch.float64),
                                                    torch.randn(3, 4)),
     "grad_out must have the dtype of h"),
])
def test_bad_input_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_twin_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="h must have an even number"):
        ops.swiglu_torch(torch.randn(2, 3))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        ops.swiglu_backward_torch(torch.randn(2, 2), torch.randn(2, 6))


# ---- clamped SwiGLU (GPT-OSS) ----------------------------------------------------------------

def clamped_reference(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Hugging Face GPT-OSS's ``_apply_gate`` on [gate | up] halves, in float64."""
    gate, up = h.double().chunk(2, dim=-1)
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


CLAMPS = [(1.702, 7.0), (1.0, 2.5)]  # GPT-OSS's values; a tight limit (a third of h clamped)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,f", SHAPES)
@pytest.mark.parametrize("alpha,limit", CLAMPS)
def test_clamped_forward_and_backward_match_float64(dtype, n, f, alpha, limit):
    h = make_h(n, f, dtype, seed=n + f, scale=4.0).requires_grad_(True)
    out = ops.clamped_swiglu(h, alpha, limit)
    assert out.shape == (n, f) and out.dtype == dtype
    grad = torch.randn(n, f, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(dtype))
    h64 = h.detach().double().requires_grad_(True)
    ref = clamped_reference(h64, alpha, limit)
    ref.backward(grad)
    if n == 0:
        assert h.grad.shape == (0, 2 * f)
        return
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(h.grad, h64.grad) < TOL[dtype]
    clamped = (h64.detach()[:, :f] > limit) | (h64.detach()[:, f:].abs() > limit)
    assert n * f < 20 or clamped.any()  # the clamps are exercised, their zero gradient too


def test_clamped_twin_matches_float64():
    h = make_h(40, 11, torch.float64, seed=5, scale=4.0)
    alpha, limit = CLAMPS[1]
    assert rel_err(ops.clamped_swiglu_torch(h, alpha, limit),
                   clamped_reference(h, alpha, limit)) < TOL[torch.float64]
    grad = torch.randn(40, 11, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h64 = h.clone().requires_grad_(True)
    clamped_reference(h64, alpha, limit).backward(grad)
    assert rel_err(ops.clamped_swiglu_backward_torch(grad, h, alpha, limit),
                   h64.grad) < TOL[torch.float64]


@needs_ext
def test_clamped_gradcheck_and_opcheck():
    h = make_h(6, 9, torch.float64, seed=7, scale=4.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.clamped_swiglu(t, 1.3, 2.5), (h,))
    torch.library.opcheck(torch.ops.moe_parallel.clamped_swiglu.default, (h, 1.3, 2.5))
    grad = torch.randn(6, 9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.moe_parallel.clamped_swiglu_backward.default,
                          (grad, h.detach(), 1.3, 2.5))
