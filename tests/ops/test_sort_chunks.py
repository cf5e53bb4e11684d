"""sort_chunks against its plain-PyTorch twin and a float64 loop reference: forward and backward
on ragged chunk sizes with empty chunks in float32, float64 and bfloat16 (exact, a permutation
copies values), tensors or int sequences as sizes and order, gradcheck, and bad input (errors name
the argument). The public function falls back to the twin without the extension.
"""

from __future__ import annotations

import pytest
import torch

from moe_parallel import ops
from tests.helpers.op_helpers import (
    DTYPES,
    H,
    bad_input_test,
    gen,
    randn,
    ref_sort_chunks,
    ref_sort_chunks_grad,
)

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


# ---------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_sort_chunks():
    sizes, order = torch.tensor([2, 0, 3, 1]), torch.tensor([2, 0, 3, 1])
    x = randn(6, 3, dtype=torch.float64, seed=13, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.sort_chunks(x, sizes, order), (x,))


# ---------------------------------------------------------------- bad input


def _bad_cases():
    meta = torch.device("meta")
    xs = randn(6, 4, seed=22)
    ss, od = torch.tensor([2, 0, 4]), torch.tensor([1, 2, 0])
    return {
        "sort_chunks_int_x": ("sort_chunks", (xs.long(), ss, od), r"\bx\b"),
        "sort_chunks_sum": ("sort_chunks", (xs, torch.tensor([2, 0, 3]), od), "split_sizes"),
        "sort_chunks_negative": ("sort_chunks", (xs, torch.tensor([7, -1, 0]), od), "split_sizes"),
        "sort_chunks_float_sizes": ("sort_chunks", (xs, ss.float(), od), "split_sizes"),
        "sort_chunks_order_repeat": ("sort_chunks", (xs, ss, torch.tensor([1, 1, 0])), "order"),
        "sort_chunks_order_range": ("sort_chunks", (xs, ss, torch.tensor([1, 3, 0])), "order"),
        "sort_chunks_order_length": ("sort_chunks", (xs, ss, torch.tensor([1, 0])), "order"),
        "sort_chunks_sizes_device": ("sort_chunks", (xs, ss.to(meta), od), "split_sizes"),
        "sort_chunks_order_device": ("sort_chunks", (xs, ss, od.to(meta)), "order"),
    }


test_bad_input = bad_input_test(_bad_cases())
