"""grouped_gemm and grouped_gemm_wgrad against their plain-PyTorch twins and float64 loop
references: forward and both gradients on ragged groups with empty ones, one group and no rows,
with and without trans_b, in float32, float64 and bfloat16, gradcheck, and bad input (errors name
the argument). Tests that call ``torch.ops.moe_parallel`` directly need the compiled extension;
the public function falls back to the twin without it. Backend selection is tested in
test_grouped_gemm_backend.py, the CUDA backends in test_cuda_grouped_gemm.py.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops
from tests.helpers.op_helpers import (
    DTYPES,
    EXT,
    GROUP_CASES,
    assert_close,
    bad_input_test,
    bitwise_equal,
    gemm_inputs,
    randn,
    ref_grouped_gemm,
    ref_grouped_gemm_grads,
    tol,
)


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


@pytest.mark.parametrize("trans_b", [False, True])
def test_gradcheck_grouped_gemm(trans_b):
    a, b, sizes = gemm_inputs(torch.float64, "ragged_with_empty", trans_b, K=3, N=2, seed=2)
    gs = torch.tensor(sizes)
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_gemm(a, b, gs, trans_b), (a, b))


# ---------------------------------------------------------------- bad input


def _bad_cases():
    a, b = randn(6, 3, seed=20), randn(2, 3, 5, seed=21)
    gs = torch.tensor([4, 2])
    meta = torch.device("meta")
    return {
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


test_bad_input = bad_input_test(_bad_cases())


def _bad_backward_cases():
    a, go2, gs = randn(5, 3, seed=25), randn(5, 2, seed=26), torch.tensor([3, 2])
    return {
        "wgrad_int_a": ("grouped_gemm_wgrad", (a.long(), go2.long(), gs), r"\ba\b"),
        "wgrad_rows": ("grouped_gemm_wgrad", (a, go2[:4], gs), "grad_out"),
        "wgrad_sum": ("grouped_gemm_wgrad", (a, go2, torch.tensor([3, 1])), "group_sizes"),
        "wgrad_sizes_device": ("grouped_gemm_wgrad", (a, go2, gs.to("meta")), "group_sizes"),
    }


test_bad_input_backward_ops = bad_input_test(_bad_backward_cases(), ("compiled", "twin"))
