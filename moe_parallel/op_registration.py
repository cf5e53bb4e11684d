"""Fake (meta) kernels and autograd formulas of the compiled moe_parallel ops.

``register()`` is called once by ``moe_parallel.ops`` when the extension is loaded.
"""

from __future__ import annotations

import torch

from .op_checks import (
    _check_block_topology_static,
    _check_bsr_dsd_static,
    _check_bsr_sdd_static,
    _check_bsr_wgrad_static,
    _check_grouped_gemm_backend,
    _check_grouped_gemm_static,
    _check_grouped_gemm_wgrad_static,
    _check_permute_static,
    _check_sort_chunks_static,
    _check_swiglu_backward_static,
    _check_swiglu_static,
    _check_unpermute_backward_static,
    _check_unpermute_static,
)

# --------------------------------------------------------------------------------------------
# Fake kernels and autograd formulas of the compiled ops.
# --------------------------------------------------------------------------------------------


def _permute_fake(x, expert_idx, num_experts, keep=None, pad_to=0, validate=True):
    _check_permute_static(x, expert_idx, num_experts, keep, pad_to)
    # N = E * pad_to is static; otherwise it is the (data-dependent) number of kept assignments.
    n = num_experts * pad_to if pad_to > 0 else torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(n, x.shape[1]),
        expert_idx.new_empty(expert_idx.shape),
        expert_idx.new_empty(num_experts),
    )


def _unpermute_fake(y, row_map, probs=None, num_tokens=None, validate=True):
    _check_unpermute_static(y, row_map, probs, num_tokens)
    return y.new_empty(num_tokens, y.shape[1])


def _unpermute_backward_fake(grad_out, y, row_map, probs, num_rows, validate=True):
    _check_unpermute_backward_static(grad_out, y, row_map, probs, num_rows)
    grad_probs = y.new_empty(0) if probs is None else probs.new_empty(probs.shape)
    return y.new_empty(num_rows, y.shape[1]), grad_probs


def _sort_chunks_fake(x, split_sizes, order):
    _check_sort_chunks_static(x, split_sizes, order)
    return torch.empty_like(x)


def _grouped_gemm_fake(a, b, group_sizes, trans_b=False, backend="auto"):
    _check_grouped_gemm_static(a, b, group_sizes, trans_b)
    _check_grouped_gemm_backend(backend, a)
    return a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2])


def _grouped_gemm_wgrad_fake(a, grad_out, group_sizes, trans_b=False, backend="auto"):
    _check_grouped_gemm_wgrad_static(a, grad_out, group_sizes)
    _check_grouped_gemm_backend(backend, a)
    g, k, n = group_sizes.shape[0], a.shape[1], grad_out.shape[1]
    return a.new_empty((g, n, k) if trans_b else (g, k, n))


def _swiglu_fake(h):
    _check_swiglu_static(h)
    return h.new_empty(h.shape[0], h.shape[1] // 2)


def _swiglu_backward_fake(grad_out, h):
    _check_swiglu_backward_static(grad_out, h)
    return torch.empty_like(h)


def _block_topology_fake(tokens_per_expert, block_size, n_col_blocks):
    _check_block_topology_static(tokens_per_expert, block_size, n_col_blocks)
    num_e = tokens_per_expert.shape[0]
    r = torch.library.get_ctx().new_dynamic_size()  # row blocks: data-dependent
    new = tokens_per_expert.new_empty
    nnz = r * n_col_blocks
    return (
        new(num_e + 1),
        new(nnz),
        new(nnz),
        new(r + 1),
        new(num_e * n_col_blocks + 1),
        new(nnz),
    )


def _bsr_sdd_fake(x, w, block_row, block_col, block_size):
    _check_bsr_sdd_static(x, w, block_row, block_col, block_size)
    return x.new_empty(block_row.shape[0], block_size, block_size)


def _bsr_dsd_fake(blocks, w, row_ptr, block_col, num_rows):
    _check_bsr_dsd_static(blocks, w, row_ptr, block_col, num_rows)
    return blocks.new_empty(num_rows, w.shape[2])


def _bsr_wgrad_fake(x, blocks, block_row, col_ptr, transpose_idx, num_experts, trans=False):
    _check_bsr_wgrad_static(x, blocks, block_row, col_ptr, transpose_idx, num_experts)
    n = (col_ptr.shape[0] - 1) // num_experts * blocks.shape[1]
    k = x.shape[1]
    return x.new_empty((num_experts, n, k) if trans else (num_experts, k, n))


def _arg_names(name: str) -> list[str]:
    """Argument names of ``moe_parallel::<name>`` in schema order."""
    return [a.name for a in getattr(torch.ops.moe_parallel, name).default._schema.arguments]


def _autograd_rule(name: str, setup, backward):
    """Adapt ``setup(ctx, args: dict, output)`` / ``backward(ctx, *grads) -> dict`` to
    torch.library's positional ``inputs`` tuple and per-argument gradient tuple."""
    names = _arg_names(name)

    def setup_context(ctx, inputs, output):
        setup(ctx, dict(zip(names, inputs)), output)

    def backward_fn(ctx, *grads):
        got = backward(ctx, *grads)
        return tuple(got.get(n) for n in names)

    return backward_fn, setup_context


def _permute_setup(ctx, args, output):
    _, row_map, tokens_per_expert = output
    ctx.mark_non_differentiable(row_map, tokens_per_expert)
    ctx.save_for_backward(row_map)
    ctx.num_tokens = args["x"].shape[0]


def _permute_backward(ctx, grad_permuted, _grad_row_map, _grad_tpe):
    (row_map,) = ctx.saved_tensors
    grad_x = torch.ops.moe_parallel.unpermute(  # row_map: the forward's own output
        y=grad_permuted.contiguous(), row_map=row_map, probs=None, num_tokens=ctx.num_tokens,
        validate=False,
    )
    return {"x": grad_x}


def _unpermute_setup(ctx, args, output):
    ctx.save_for_backward(args["y"], args["row_map"], args["probs"])


def _unpermute_backward(ctx, grad_out):
    y, row_map, probs = ctx.saved_tensors
    # row_map passed the forward's range check (or its caller's validate=False promise).
    grad_y, grad_probs = torch.ops.moe_parallel.unpermute_backward(
        grad_out.contiguous(), y, row_map, probs, y.shape[0], validate=False
    )
    return {"y": grad_y, "probs": grad_probs if probs is not None else None}


def _sort_chunks_setup(ctx, args, output):
    ctx.save_for_backward(args["split_sizes"], args["order"])


def _sort_chunks_backward(ctx, grad):
    split_sizes, order = ctx.saved_tensors
    grad_x = torch.ops.moe_parallel.sort_chunks(
        grad.contiguous(), split_sizes[order], torch.argsort(order)
    )
    return {"x": grad_x}


def _grouped_gemm_setup(ctx, args, output):
    ctx.save_for_backward(args["a"], args["b"], args["group_sizes"])
    ctx.trans_b = args["trans_b"]
    ctx.backend = args["backend"]


def _grouped_gemm_backward(ctx, grad_out):
    a, b, group_sizes = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grads = {}
    if ctx.needs_input_grad[0]:  # a
        grads["a"] = torch.ops.moe_parallel.grouped_gemm(
            grad_out, b, group_sizes, not ctx.trans_b, ctx.backend
        )
    if ctx.needs_input_grad[1]:  # b
        grads["b"] = torch.ops.moe_parallel.grouped_gemm_wgrad(
            a, grad_out, group_sizes, ctx.trans_b, ctx.backend
        )
    return grads


def _swiglu_setup(ctx, args, output):
    ctx.save_for_backward(args["h"])


def _swiglu_backward(ctx, grad_out):
    (h,) = ctx.saved_tensors
    return {"h": torch.ops.moe_parallel.swiglu_backward(grad_out.contiguous(), h)}


def _csc_of(block_col: torch.Tensor, num_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(col_ptr, transpose_idx)`` of a block list: blocks in column order, list order within
    a column (stable sort), so the weight-gradient sums run in a fixed order. Static shapes."""
    cols, transpose_idx = torch.sort(block_col, stable=True)
    col_ptr = torch.searchsorted(cols, torch.arange(num_cols + 1, dtype=cols.dtype))
    return col_ptr, transpose_idx


def _bsr_sdd_setup(ctx, args, output):
    ctx.save_for_backward(args["x"], args["w"], args["block_row"], args["block_col"])
    ctx.block_size = args["block_size"]


def _bsr_sdd_backward(ctx, grad_blocks):
    # block_row is row-major (non-decreasing), as block_topology lists it.
    x, w, block_row, block_col = ctx.saved_tensors
    b = ctx.block_size
    num_e = w.shape[0]
    grad_blocks = grad_blocks.contiguous()
    grads = {}
    if ctx.needs_input_grad[0]:  # x: per row block, sum_i grad_blocks[i] @ w[e_i][:, cols j_i]^T
        num_r = x.shape[0] // b
        row_ptr = torch.searchsorted(block_row, torch.arange(num_r + 1, dtype=block_row.dtype))
        grads["x"] = torch.ops.moe_parallel.bsr_dsd(
            grad_blocks, w.transpose(1, 2), row_ptr, block_col, x.shape[0]
        )
    if ctx.needs_input_grad[1]:  # w: per column block, sum_i x[rows_i]^T @ grad_blocks[i]
        col_ptr, transpose_idx = _csc_of(block_col, num_e * (w.shape[2] // b))
        grads["w"] = torch.ops.moe_parallel.bsr_wgrad(
            x, grad_blocks, block_row, col_ptr, transpose_idx, num_e, False
        )
    return grads


def _bsr_dsd_setup(ctx, args, output):
    ctx.save_for_backward(args["blocks"], args["w"], args["row_ptr"], args["block_col"])


def _bsr_dsd_backward(ctx, grad_y):
    blocks, w, row_ptr, block_col = ctx.saved_tensors
    b = blocks.shape[1]
    num_e = w.shape[0]
    grad_y = grad_y.contiguous()
    idx = torch.arange(blocks.shape[0], dtype=row_ptr.dtype)
    block_row = torch.searchsorted(row_ptr, idx, right=True) - 1
    grads = {}
    if ctx.needs_input_grad[0]:  # blocks[i]: grad_y[rows_i] @ w[e_i][rows j_i, :]^T
        grads["blocks"] = torch.ops.moe_parallel.bsr_sdd(
            grad_y, w.transpose(1, 2), block_row, block_col, b
        )
    if ctx.needs_input_grad[1]:  # w[e][rows j]: sum_i blocks[i]^T @ grad_y[rows_i]
        col_ptr, transpose_idx = _csc_of(block_col, num_e * (w.shape[1] // b))
        grads["w"] = torch.ops.moe_parallel.bsr_wgrad(
            grad_y, blocks, block_row, col_ptr, transpose_idx, num_e, True
        )
    return grads


def register() -> None:
    fakes = {
        "permute": _permute_fake,
        "unpermute": _unpermute_fake,
        "unpermute_backward": _unpermute_backward_fake,
        "sort_chunks": _sort_chunks_fake,
        "grouped_gemm": _grouped_gemm_fake,
        "grouped_gemm_wgrad": _grouped_gemm_wgrad_fake,
        "block_topology": _block_topology_fake,
        "bsr_sdd": _bsr_sdd_fake,
        "bsr_dsd": _bsr_dsd_fake,
        "bsr_wgrad": _bsr_wgrad_fake,
        "swiglu": _swiglu_fake,
        "swiglu_backward": _swiglu_backward_fake,
    }
    for name, fn in fakes.items():
        torch.library.register_fake(f"moe_parallel::{name}", fn)
    rules = {
        "permute": (_permute_setup, _permute_backward),
        "unpermute": (_unpermute_setup, _unpermute_backward),
        "sort_chunks": (_sort_chunks_setup, _sort_chunks_backward),
        "grouped_gemm": (_grouped_gemm_setup, _grouped_gemm_backward),
        "bsr_sdd": (_bsr_sdd_setup, _bsr_sdd_backward),
        "bsr_dsd": (_bsr_dsd_setup, _bsr_dsd_backward),
        "swiglu": (_swiglu_setup, _swiglu_backward),
    }
    for name, (setup, backward) in rules.items():
        backward_fn, setup_context = _autograd_rule(name, setup, backward)
        torch.library.register_autograd(
            f"moe_parallel::{name}", backward_fn, setup_context=setup_context
        )


