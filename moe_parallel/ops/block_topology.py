"""Block layout of the dropless (block-sparse) expert product: host metadata for ``bsr_sdd``,
``bsr_dsd`` and ``bsr_wgrad`` (kernel in csrc/cpu/block_sparse.cpp).

Expert ``e``'s ``c_e`` rows are padded to ``p_e = ceil(c_e / B) * B``; every row block of
expert ``e`` holds the column blocks ``e*n_col_blocks .. (e+1)*n_col_blocks-1``, listed
row-major (CSR ``row_ptr``) and column-major (CSC ``col_ptr``, ``transpose_idx``).
"""

from __future__ import annotations

import torch

from .checks import IntList, _as_index_tensor, _check_block_size, _check_host_index
from .extension import has_extension, register


def block_topology(
    tokens_per_expert: IntList, block_size: int, n_col_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block layout of the dropless expert product (host metadata, all CPU int64).

    Expert ``e``'s ``c_e = tokens_per_expert[e] >= 0`` rows are padded to
    ``p_e = ceil(c_e / B) * B``. Returns ``padded_offsets [E+1]`` (exclusive prefix sum of
    ``p_e``), and the nonzero ``B x B`` blocks of the ``[sum p_e, E * n_col_blocks * B]``
    block-diagonal matrix: every row block ``r`` of expert ``e`` holds the column blocks
    ``e*n_col_blocks .. (e+1)*n_col_blocks-1``. Row-major: ``block_row [nnz]``,
    ``block_col [nnz]``, ``row_ptr [R+1]`` (CSR, ``R = sum p_e / B``); column-major:
    ``col_ptr [E*n_col_blocks+1]`` (CSC) and ``transpose_idx [nnz]`` (row-major index of the
    k-th block in column order). Use ``n_col_blocks = N / B`` for weights ``w [E, K, N]``.
    """
    tokens_per_expert = _as_index_tensor(tokens_per_expert, "tokens_per_expert")
    if has_extension():
        return torch.ops.moe_parallel.block_topology(
            tokens_per_expert.contiguous(), block_size, n_col_blocks
        )
    return block_topology_torch(tokens_per_expert, block_size, n_col_blocks)


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


def _check_block_topology_static(
    tokens_per_expert: torch.Tensor, block_size: int, n_col_blocks: int
) -> None:
    _check_host_index(tokens_per_expert, "tokens_per_expert")
    _check_block_size(block_size)
    if n_col_blocks <= 0:
        raise ValueError(f"n_col_blocks must be > 0, got {n_col_blocks}")


def _block_topology_fake(tokens_per_expert, block_size, n_col_blocks):
    _check_block_topology_static(tokens_per_expert, block_size, n_col_blocks)
    num_e = tokens_per_expert.shape[0]
    r = torch.library.get_ctx().new_dynamic_size()  # row blocks: data-dependent
    new = tokens_per_expert.new_empty
    nnz = r * n_col_blocks
    return new(num_e + 1), new(nnz), new(nnz), new(r + 1), new(num_e * n_col_blocks + 1), new(nnz)


register("block_topology", _block_topology_fake)
