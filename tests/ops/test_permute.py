"""permute, unpermute and unpermute_backward against their plain-PyTorch twins and float64 loop
references: forward and backward on random routings (ragged counts with empty experts, drops,
padding, repeated experts, no tokens) in float32, float64 and bfloat16, gradcheck, and bad input
(errors name the argument). Tests that call ``torch.ops.moe_parallel`` directly need the compiled
extension; the public functions fall back to the twins without it, so their tests always run.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops
from tests.helpers.op_helpers import (
    DTYPES,
    EXT,
    H,
    assert_close,
    bad_input_test,
    make_routing,
    needs_ext,
    pad_value,
    randn,
    ref_permute,
    ref_permute_grad,
    ref_unpermute,
    ref_unpermute_grads,
    tol,
    unpermute_inputs,
)

# ---------------------------------------------------------------- permute

K_VALUES = [1, 2, 6]
PAD_MODES = ["none", "tight", "slack"]


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


# ---------------------------------------------------------------- bad input


def _bad_cases():
    x = randn(6, 4, seed=18)
    ei = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    y = randn(12, 4, seed=19)
    _, row_map, _ = ops.permute_torch(x, ei, 4)
    probs = torch.rand(6, 2)
    meta = torch.device("meta")
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
    }


test_bad_input = bad_input_test(_bad_cases())


def _bad_backward_cases():
    y, row_map = randn(4, 3, seed=23), torch.tensor([[0, -1], [2, 1]])
    go = randn(2, 3, seed=24)
    ub = "unpermute_backward"
    return {
        "ub_grad_out_dtype": (ub, (go.double(), y, row_map, None, 4), "grad_out"),
        "ub_grad_out_shape": (ub, (go[:1], y, row_map, None, 4), "grad_out"),
        "ub_row_map_range": (ub, (go, y, row_map + 3, None, 4), "row_map"),
        "ub_probs_shape": (ub, (go, y, row_map, torch.rand(2, 3), 4), "probs"),
        "ub_num_rows": (ub, (go, y, row_map, None, 5), "num_rows"),
    }


test_bad_input_backward_ops = bad_input_test(_bad_backward_cases(), ("compiled", "twin"))


@needs_ext
def test_bad_num_tokens():
    y, row_map = randn(4, 3, seed=27), torch.tensor([[0, -1], [2, 1]])
    with pytest.raises((ValueError, RuntimeError), match="num_tokens"):
        torch.ops.moe_parallel.unpermute(y=y, row_map=row_map, probs=None, num_tokens=3)
