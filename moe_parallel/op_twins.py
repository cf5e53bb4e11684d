"""Plain-PyTorch twins of the moe_parallel ops: the same contracts written with ordinary,
differentiable torch ops. They are the test oracle and the fallback without the extension.
"""

from __future__ import annotations

from typing import Optional

import torch

from .op_checks import (
    IntList,
    _check_block_topology_static,
    _check_bsr_dsd_static,
    _check_bsr_sdd_static,
    _check_bsr_wgrad_static,
    _check_group_sizes_values,
    _check_grouped_gemm_backend,
    _check_grouped_gemm_static,
    _check_grouped_gemm_wgrad_static,
    _check_offsets_values,
    _check_permute_static,
    _check_range_values,
    _check_sort_chunks_static,
    _check_swiglu_backward_static,
    _check_swiglu_static,
    _check_unpermute_backward_static,
    _check_unpermute_static,
)

# --------------------------------------------------------------------------------------------
# Plain-PyTorch twins (differentiable through ordinary autograd).
# --------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def permute_torch(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    keep: Optional[torch.Tensor] = None,
    pad_to: int = 0,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of :func:`permute`: expert-major gather of the kept assignments of ``x``.

    Kept assignments ``(t, j)`` are ordered by ``(expert_idx[t, j], t, j)``; the one of rank ``r``
    within expert ``e`` lands on row ``start(e) + r`` with
    ``start(e) = sum_{e'<e} (pad_to if pad_to > 0 else count(e'))``. Returns
    ``(permuted [N, H], row_map [T, k] int64 (-1 = dropped), tokens_per_expert [E] int64)`` with
    ``N = E * pad_to`` if ``pad_to > 0`` else the number of kept assignments; padding rows are 0.
    """
    _check_permute_static(x, expert_idx, num_experts, keep, pad_to)
    num_tokens, k = expert_idx.shape
    flat = expert_idx.reshape(-1)
    if validate and flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(
            f"expert_idx entries must be in [0, num_experts={num_experts}), "
            f"got min {int(flat.min())} max {int(flat.max())}"
        )
    kept = torch.ones_like(flat, dtype=torch.bool) if keep is None else keep.reshape(-1)
    counts = torch.bincount(flat[kept], minlength=num_experts)
    if validate and pad_to > 0 and counts.numel() and int(counts.max()) > pad_to:
        raise ValueError(
            f"pad_to={pad_to} is smaller than the largest expert count {int(counts.max())}"
        )
    # Stable sort by expert id; dropped assignments get key E and sort last.
    key = torch.where(kept, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    n_kept = int(counts.sum())
    src = order[:n_kept]  # flat assignment index t*k+j of each kept row, in row order
    experts = flat[src]
    seg = torch.full_like(counts, pad_to) if pad_to > 0 else counts
    seg_start = torch.cumsum(seg, 0) - seg
    real_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_kept, device=flat.device) - real_start[experts]
    rows = seg_start[experts] + rank
    row_map = torch.full_like(flat, -1)
    row_map[src] = rows
    gathered = x.index_select(0, torch.div(src, k, rounding_mode="floor"))
    if pad_to > 0:
        permuted = x.new_zeros(num_experts * pad_to, x.shape[1]).index_copy(0, rows, gathered)
    else:
        permuted = gathered
    return permuted, row_map.view(num_tokens, k), counts


def _check_row_map_values(row_map: torch.Tensor, num_rows: int) -> None:
    if row_map.numel() and (int(row_map.min()) < -1 or int(row_map.max()) >= num_rows):
        raise ValueError(
            f"row_map entries must be in [-1, {num_rows}), "
            f"got min {int(row_map.min())} max {int(row_map.max())}"
        )


def unpermute_torch(
    y: torch.Tensor,
    row_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Twin of :func:`unpermute`: ``out[t] = sum_{j: row_map[t,j] >= 0} w[t,j] * y[row_map[t,j]]``.

    ``w = probs`` (any float dtype) or 1. Accumulates in float32 (float64 for float64 ``y``) in the
    order ``j = 0..k-1``; returns ``[T, H]`` in ``y``'s dtype.
    """
    _check_unpermute_static(y, row_map, probs)
    if validate:
        _check_row_map_values(row_map, y.shape[0])
    acc = _acc_dtype(y.dtype)
    num_tokens, k = row_map.shape
    out = torch.zeros(num_tokens, y.shape[1], dtype=acc, device=y.device)
    if y.shape[0] == 0:  # every entry of row_map is -1
        return out.to(y.dtype)
    for j in range(k):
        rows = row_map[:, j]
        term = y.index_select(0, rows.clamp(min=0)).to(acc)
        if probs is not None:
            term = term * probs[:, j].to(acc).unsqueeze(1)
        out = out + torch.where((rows >= 0).unsqueeze(1), term, 0.0)
    return out.to(y.dtype)


def unpermute_backward_torch(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    row_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    num_rows: int,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``unpermute_backward``.

    ``grad_y [num_rows, H]`` (y's dtype) is zero except ``grad_y[row_map[t,j]] = w[t,j] *
    grad_out[t]``; ``grad_probs [T, k]`` (probs' dtype) is ``<grad_out[t], y[row_map[t,j]]>``
    accumulated in float32/float64, 0 where ``row_map == -1``; an empty ``[0]`` tensor of y's dtype
    when ``probs`` is None.
    """
    _check_unpermute_backward_static(grad_out, y, row_map, probs, num_rows)
    if validate:
        _check_row_map_values(row_map, y.shape[0])
    acc = _acc_dtype(y.dtype)
    t_idx, j_idx = (row_map >= 0).nonzero(as_tuple=True)
    rows = row_map[t_idx, j_idx]
    g = grad_out.index_select(0, t_idx).to(acc)
    vals = g if probs is None else g * probs[t_idx, j_idx].to(acc).unsqueeze(1)
    grad_y = torch.zeros(num_rows, y.shape[1], dtype=y.dtype, device=y.device)
    grad_y[rows] = vals.to(y.dtype)
    if probs is None:
        return grad_y, y.new_empty(0)
    dots = (g * y.index_select(0, rows).to(acc)).sum(1)
    grad_probs = torch.zeros(row_map.shape, dtype=acc, device=y.device)
    grad_probs[t_idx, j_idx] = dots
    return grad_y, grad_probs.to(probs.dtype)


def _as_index_tensor(v: IntList, name: str) -> torch.Tensor:
    """A list/tuple of ints becomes a CPU int64 tensor; tensors pass through unchanged."""
    if isinstance(v, torch.Tensor):
        return v
    try:
        return torch.tensor(list(v), dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a CPU int64 tensor or a sequence of ints: {exc}") from exc


def sort_chunks_torch(x: torch.Tensor, split_sizes: IntList, order: IntList) -> torch.Tensor:
    """Twin of :func:`sort_chunks`: ``cat([chunk[order[0]], chunk[order[1]], ...])``.

    ``chunk[i]`` is the i-th block of ``x`` rows when ``x`` is split by ``split_sizes``.
    """
    split_sizes = _as_index_tensor(split_sizes, "split_sizes")
    order = _as_index_tensor(order, "order")
    _check_sort_chunks_static(x, split_sizes, order)
    _check_group_sizes_values(split_sizes, x.shape[0], "split_sizes", "x.size(0)")
    n = order.shape[0]
    if not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1}, got {order.tolist()}")
    if n == 0:
        return x.clone()
    chunks = x.split(split_sizes.tolist(), 0)
    return torch.cat([chunks[i] for i in order.tolist()], 0)


def grouped_gemm_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    group_sizes: IntList,
    trans_b: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Twin of :func:`grouped_gemm`: rows of group g are ``a_g @ b[g]`` (``a_g @ b[g]^T``).
    ``backend`` is checked as the op checks it; the twin is the per-group loop."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    _check_grouped_gemm_static(a, b, group_sizes, trans_b)
    _check_grouped_gemm_backend(backend, a)
    _check_group_sizes_values(group_sizes, a.shape[0], "group_sizes", "a.size(0)")
    parts = [
        a_g @ (b[g].transpose(0, 1) if trans_b else b[g])
        for g, a_g in enumerate(a.split(group_sizes.tolist(), 0))
    ]
    if not parts:  # G = 0, M = 0
        n = b.shape[1] if trans_b else b.shape[2]
        return a.new_zeros(0, n)
    return torch.cat(parts, 0)


def grouped_gemm_wgrad_torch(
    a: torch.Tensor,
    grad_out: torch.Tensor,
    group_sizes: IntList,
    trans_b: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Twin of ``grouped_gemm_wgrad``: ``grad_b[g] = a_g^T @ grad_out_g`` ([G, K, N]), or
    ``grad_out_g^T @ a_g`` ([G, N, K]) when ``trans_b``; zero for empty groups."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    _check_grouped_gemm_wgrad_static(a, grad_out, group_sizes)
    _check_grouped_gemm_backend(backend, a)
    _check_group_sizes_values(group_sizes, a.shape[0], "group_sizes", "a.size(0)")
    sizes = group_sizes.tolist()
    pairs = zip(a.split(sizes, 0), grad_out.split(sizes, 0))
    mats = [go_g.t() @ a_g if trans_b else a_g.t() @ go_g for a_g, go_g in pairs]
    if not mats:
        shape = (
            (0, grad_out.shape[1], a.shape[1]) if trans_b else (0, a.shape[1], grad_out.shape[1])
        )
        return a.new_zeros(shape)
    return torch.stack(mats, 0)




# ---- block-sparse (dropless) products; contracts in ops.py / csrc/block_sparse.cpp ----


def swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` ``[N, 2F]``, computed in float32 (float64
    for float64) and returned in h's dtype."""
    _check_swiglu_static(h)
    gate, up = h.to(_acc_dtype(h.dtype)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def swiglu_backward_torch(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[grad_gate | grad_up]`` of ``swiglu``, with ``s = sigmoid(gate)``:
    ``grad_gate = grad_out·up·s·(1 + gate·(1 - s))``, ``grad_up = grad_out·gate·s``."""
    _check_swiglu_backward_static(grad_out, h)
    acc = _acc_dtype(h.dtype)
    gate, up = h.to(acc).chunk(2, dim=-1)
    d = grad_out.to(acc)
    s = torch.sigmoid(gate)
    return torch.cat([d * up * s * (1 + gate * (1 - s)), d * gate * s], dim=-1).to(h.dtype)


def block_topology_torch(
    tokens_per_expert: torch.Tensor, block_size: int, n_col_blocks: int
) -> tuple[torch.Tensor, ...]:
    """Twin of ``block_topology``: ``(padded_offsets, block_row, block_col, row_ptr, col_ptr,
    transpose_idx)``, all CPU int64."""
    _check_block_topology_static(tokens_per_expert, block_size, n_col_blocks)
    c = tokens_per_expert
    if c.numel() and int(c.min()) < 0:
        raise ValueError(f"tokens_per_expert entries must be >= 0, got {c.tolist()}")
    num_e = c.shape[0]
    nblk = (c + block_size - 1) // block_size
    zero = torch.zeros(1, dtype=torch.int64)
    padded_offsets = torch.cat([zero, torch.cumsum(nblk * block_size, 0)])
    expert_of_row = torch.repeat_interleave(torch.arange(num_e), nblk)  # [R]
    r = expert_of_row.shape[0]
    j = torch.arange(n_col_blocks)
    block_row = torch.arange(r).repeat_interleave(n_col_blocks)
    block_col = (expert_of_row[:, None] * n_col_blocks + j[None, :]).reshape(-1)
    row_ptr = torch.arange(r + 1, dtype=torch.int64) * n_col_blocks
    transpose_idx = torch.argsort(block_col, stable=True)
    col_counts = torch.bincount(block_col, minlength=num_e * n_col_blocks)
    col_ptr = torch.cat([zero, torch.cumsum(col_counts, 0)])
    return padded_offsets, block_row, block_col, row_ptr, col_ptr, transpose_idx


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
