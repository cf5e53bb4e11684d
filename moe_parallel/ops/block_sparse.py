"""Block-sparse (dropless) expert products on the layout of ``block_topology`` (kernels in
csrc/cpu/block_sparse.cpp).

Expert ``e``'s rows are padded to a multiple of the block size ``B``; block ``i`` (row block
``r_i``, column block ``c_i``, ``e_i = c_i // ncb``, ``j_i = c_i % ncb``, ``ncb = N / B``), as
``block_topology`` lists them row-major:
``bsr_sdd``: ``blocks[i] = x[r_i*B:(r_i+1)*B] @ w[e_i][:, j_i*B:(j_i+1)*B]``;
``bsr_dsd``: ``y[r*B:(r+1)*B] = sum_{i in row r} blocks[i] @ w[e_i][j_i*B:(j_i+1)*B]``;
``bsr_wgrad``: per column block ``sum_i x[rows r_i]^T @ blocks[i]`` (``[E, K, N]``; with
``trans`` ``sum_i blocks[i]^T @ x[rows r_i]``, ``[E, N, K]``).
Autograd of the compiled ops: bsr_sdd ``grad_x = bsr_dsd(grad_blocks, w^T, row_ptr, block_col)``,
``grad_w = bsr_wgrad(x, grad_blocks, ..., trans=False)``; bsr_dsd
``grad_blocks = bsr_sdd(grad_y, w^T, block_row, block_col)``,
``grad_w = bsr_wgrad(grad_y, blocks, ..., trans=True)``.
"""

from __future__ import annotations

import torch

from .checks import (
    _acc_dtype,
    _check_block_size,
    _check_float,
    _check_host_index,
    _check_offsets_values,
    _check_range_values,
    _check_same_device,
)
from .extension import has_extension, register

# ---- public functions ----


def bsr_sdd(
    x: torch.Tensor,
    w: torch.Tensor,
    block_row: torch.Tensor,
    block_col: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Sampled dense-dense product: ``blocks [nnz, B, B]`` with
    ``blocks[i] = x[r_i*B:(r_i+1)*B] @ w[e_i][:, j_i*B:(j_i+1)*B]``.

    ``x [M_pad, K]`` holds each expert's rows padded to a multiple of ``B`` (layout of
    ``padded_offsets``); ``w [E, K, N]`` with ``N % B == 0``; ``r_i = block_row[i]``,
    ``c_i = block_col[i]``, ``e_i = c_i // (N/B)``, ``j_i = c_i % (N/B)``. Padding contract:
    padding rows of ``x`` produce padding rows of ``blocks``; they never mix with real rows in
    ``bsr_sdd``/``bsr_dsd`` (all products are row-wise), but an activation with ``act(0) != 0``
    or non-zero padding rows make them non-zero, so callers must zero (or ignore) the padding
    rows of the final output, and must zero the padding rows of ``x`` (or of the incoming
    gradient) for the weight gradients to be those of the real rows only.
    Differentiable in ``x`` and ``w``; the backward needs ``block_row`` in row-major
    (non-decreasing) order, as ``block_topology`` lists it.
    """
    if has_extension():
        return torch.ops.moe_parallel.bsr_sdd(
            x.contiguous(), w.contiguous(), block_row.contiguous(), block_col.contiguous(),
            block_size,
        )
    return bsr_sdd_torch(x, w, block_row, block_col, block_size)


def bsr_dsd(
    blocks: torch.Tensor,
    w: torch.Tensor,
    row_ptr: torch.Tensor,
    block_col: torch.Tensor,
    num_rows: int,
) -> torch.Tensor:
    """Block-sparse times dense: ``y [num_rows, K']`` with ``y[rB:(r+1)B]`` the sum over the
    blocks i of row block r (``row_ptr[r] <= i < row_ptr[r+1]``) of
    ``blocks[i] @ w[e_i][j_i*B:(j_i+1)*B]``.

    ``blocks [nnz, B, B]`` (e.g. ``act(bsr_sdd(...))``), ``w [E, N, K']`` (the second expert
    GEMM's weight, e.g. ``w2 [E, F, H]``), ``N % B == 0``; row blocks without blocks are zero.
    Differentiable in ``blocks`` and ``w``.
    """
    if has_extension():
        return torch.ops.moe_parallel.bsr_dsd(
            blocks.contiguous(), w.contiguous(), row_ptr.contiguous(), block_col.contiguous(),
            num_rows,
        )
    return bsr_dsd_torch(blocks, w, row_ptr, block_col, num_rows)


# ---- plain-PyTorch twins ----


def _weight_col_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """``w [E, K, N]`` as ``[E * N/B, K, B]``: entry ``e*N/B + j`` is ``w[e][:, jB:(j+1)B]``."""
    e, k, n = w.shape
    blocked = w.reshape(e, k, n // block_size, block_size)
    return blocked.permute(0, 2, 1, 3).reshape(-1, k, block_size)


def bsr_sdd_torch(
    x: torch.Tensor,
    w: torch.Tensor,
    block_row: torch.Tensor,
    block_col: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Twin of ``bsr_sdd``: ``blocks[i] = x[rows r_i] @ w[e_i][:, cols j_i]``."""
    _check_bsr_sdd_static(x, w, block_row, block_col, block_size)
    b = block_size
    _check_range_values(block_row, x.shape[0] // b, "block_row", "[0, x.size(0) / block_size)")
    _check_range_values(
        block_col, w.shape[0] * (w.shape[2] // b), "block_col", "[0, E * N / block_size)"
    )
    acc = _acc_dtype(x.dtype)
    xb = x.to(acc).reshape(-1, b, x.shape[1])[block_row]  # [nnz, B, K]
    wb = _weight_col_blocks(w.to(acc), b)[block_col]  # [nnz, K, B]
    return torch.bmm(xb, wb).to(x.dtype)


def bsr_dsd_torch(
    blocks: torch.Tensor,
    w: torch.Tensor,
    row_ptr: torch.Tensor,
    block_col: torch.Tensor,
    num_rows: int,
) -> torch.Tensor:
    """Twin of ``bsr_dsd``: ``y[rows r] = sum_{i in row r} blocks[i] @ w[e_i][rows j_i, :]``."""
    _check_bsr_dsd_static(blocks, w, row_ptr, block_col, num_rows)
    b = blocks.shape[1]
    nnz = blocks.shape[0]
    _check_offsets_values(row_ptr, nnz, "row_ptr", "blocks.size(0)")
    num_e, n, k = w.shape
    _check_range_values(block_col, num_e * (n // b), "block_col", "[0, E * N / block_size)")
    acc = _acc_dtype(blocks.dtype)
    wb = w.to(acc).reshape(-1, b, k)[block_col]  # [nnz, B, K]
    prod = torch.bmm(blocks.to(acc), wb)
    nrb = num_rows // b
    block_row = torch.repeat_interleave(torch.arange(nrb), row_ptr.diff())
    y = torch.zeros(nrb, b, k, dtype=acc, device=blocks.device).index_add(0, block_row, prod)
    return y.reshape(num_rows, k).to(blocks.dtype)


def bsr_wgrad_torch(
    x: torch.Tensor,
    blocks: torch.Tensor,
    block_row: torch.Tensor,
    col_ptr: torch.Tensor,
    transpose_idx: torch.Tensor,
    num_experts: int,
    trans: bool = False,
) -> torch.Tensor:
    """Twin of ``bsr_wgrad``: per column block ``c = e*ncb + j``, the sum over its blocks of
    ``x[rows_i]^T @ blocks[i]`` into ``out[e][:, cols j]`` (``[E, K, N]``), or with ``trans``
    ``blocks[i]^T @ x[rows_i]`` into ``out[e][rows j, :]`` (``[E, N, K]``)."""
    _check_bsr_wgrad_static(x, blocks, block_row, col_ptr, transpose_idx, num_experts)
    b = blocks.shape[1]
    nnz = blocks.shape[0]
    _check_range_values(block_row, x.shape[0] // b, "block_row", "[0, x.size(0) / block_size)")
    _check_offsets_values(col_ptr, nnz, "col_ptr", "blocks.size(0)")
    _check_range_values(transpose_idx, max(nnz, 1), "transpose_idx", "[0, nnz)")
    c = col_ptr.shape[0] - 1
    ncb = c // num_experts
    k = x.shape[1]
    acc = _acc_dtype(x.dtype)
    col_of = torch.empty(nnz, dtype=torch.int64)
    col_of[transpose_idx] = torch.repeat_interleave(torch.arange(c), col_ptr.diff())
    xb = x.to(acc).reshape(-1, b, k)[block_row]  # [nnz, B, K]
    prod = torch.bmm(xb.transpose(1, 2), blocks.to(acc))  # [nnz, K, B]
    per_col = torch.zeros(c, k, b, dtype=acc, device=x.device).index_add(0, col_of, prod)
    out = per_col.reshape(num_experts, ncb, k, b).permute(0, 2, 1, 3)
    out = out.reshape(num_experts, k, ncb * b)
    if trans:
        out = out.transpose(1, 2).contiguous()
    return out.to(x.dtype)


# ---- argument checks ----


def _check_bsr_sdd_static(
    x: torch.Tensor,
    w: torch.Tensor,
    block_row: torch.Tensor,
    block_col: torch.Tensor,
    block_size: int,
) -> None:
    _check_block_size(block_size)
    _check_float(x, "x", 2)
    _check_float(w, "w", 3)
    if w.dtype != x.dtype:
        raise ValueError(f"w must have the dtype of x ({x.dtype}), got {w.dtype}")
    _check_same_device(w, "w", x, "x")
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w must have shape [E, K, N] with K = x.size(1) = {x.shape[1]}, got {tuple(w.shape)}"
        )
    if w.shape[2] % block_size:
        raise ValueError(
            f"w.size(2) (N={w.shape[2]}) must be a multiple of block_size={block_size}"
        )
    if x.shape[0] % block_size:
        raise ValueError(
            f"x.size(0) (M_pad={x.shape[0]}) must be a multiple of block_size={block_size}"
        )
    _check_host_index(block_row, "block_row")
    _check_host_index(block_col, "block_col")
    if block_col.shape != block_row.shape:
        raise ValueError(
            f"block_col must have {block_row.shape[0]} entries (block_row), "
            f"got {block_col.shape[0]}"
        )


def _check_blocks(blocks: torch.Tensor) -> int:
    _check_float(blocks, "blocks", 3)
    b = blocks.shape[1]
    if b <= 0 or blocks.shape[2] != b:
        raise ValueError(
            f"blocks must have shape [nnz, B, B] with B > 0, got {tuple(blocks.shape)}"
        )
    return b


def _check_bsr_dsd_static(
    blocks: torch.Tensor,
    w: torch.Tensor,
    row_ptr: torch.Tensor,
    block_col: torch.Tensor,
    num_rows: int,
) -> None:
    b = _check_blocks(blocks)
    _check_float(w, "w", 3)
    if w.dtype != blocks.dtype:
        raise ValueError(f"w must have the dtype of blocks ({blocks.dtype}), got {w.dtype}")
    _check_same_device(w, "w", blocks, "blocks")
    if w.shape[1] % b:
        raise ValueError(f"w.size(1) (N={w.shape[1]}) must be a multiple of the block size {b}")
    if num_rows < 0 or num_rows % b:
        raise ValueError(
            f"num_rows ({num_rows}) must be a non-negative multiple of the block size {b}"
        )
    _check_host_index(row_ptr, "row_ptr")
    if row_ptr.shape[0] != num_rows // b + 1:
        raise ValueError(
            f"row_ptr must have num_rows / B + 1 = {num_rows // b + 1} entries, "
            f"got {row_ptr.shape[0]}"
        )
    _check_host_index(block_col, "block_col")
    if block_col.shape[0] != blocks.shape[0]:
        raise ValueError(
            f"block_col must have blocks.size(0) = {blocks.shape[0]} entries, "
            f"got {block_col.shape[0]}"
        )


def _check_bsr_wgrad_static(
    x: torch.Tensor,
    blocks: torch.Tensor,
    block_row: torch.Tensor,
    col_ptr: torch.Tensor,
    transpose_idx: torch.Tensor,
    num_experts: int,
) -> None:
    _check_float(x, "x", 2)
    b = _check_blocks(blocks)
    if blocks.dtype != x.dtype:
        raise ValueError(f"blocks must have the dtype of x ({x.dtype}), got {blocks.dtype}")
    _check_same_device(blocks, "blocks", x, "x")
    if x.shape[0] % b:
        raise ValueError(f"x.size(0) (M_pad={x.shape[0]}) must be a multiple of the block size {b}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    named = ((block_row, "block_row"), (col_ptr, "col_ptr"), (transpose_idx, "transpose_idx"))
    for t, name in named:
        _check_host_index(t, name)
    c = col_ptr.shape[0] - 1
    if c < 1 or c % num_experts:
        raise ValueError(
            f"col_ptr must have E * n_col_blocks + 1 entries with E = num_experts = {num_experts}, "
            f"got {col_ptr.shape[0]}"
        )
    for t, name in ((block_row, "block_row"), (transpose_idx, "transpose_idx")):
        if t.shape[0] != blocks.shape[0]:
            raise ValueError(
                f"{name} must have blocks.size(0) = {blocks.shape[0]} entries, got {t.shape[0]}"
            )


# ---- fake kernels and autograd of the compiled ops ----


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


register("bsr_sdd", _bsr_sdd_fake, _bsr_sdd_setup, _bsr_sdd_backward)
register("bsr_dsd", _bsr_dsd_fake, _bsr_dsd_setup, _bsr_dsd_backward)
register("bsr_wgrad", _bsr_wgrad_fake)
