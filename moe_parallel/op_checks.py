"""Argument checks of the moe_parallel ops (shared by the fake kernels and the twins).

The static checks (dtype, rank, shape, device) need no data; the value checks (index ranges,
sums) read the data. Every message names the argument and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

IntList = Union[torch.Tensor, Sequence[int]]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Grouped GEMM backends (csrc/cuda/grouped_gemm_cuda.cpp); "auto" and "loop" run on every device.
GROUPED_GEMM_BACKENDS = ("auto", "loop", "streams", "cublas", "torch", "cutlass")

# --------------------------------------------------------------------------------------------
# Argument checks. The static checks (dtype, rank, shape, device) are shared by the fake kernels
# and the twins; the twins also run the data-dependent checks. Messages name the argument.
# --------------------------------------------------------------------------------------------


def _check_tensor(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t: torch.Tensor, name: str, ndim: int) -> None:
    _check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_index(t: torch.Tensor, name: str, ndim: int) -> None:
    _check_tensor(t, name)
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
        )


def _check_cpu(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU int64 tensor, got device {t.device}")


def _check_permute_static(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    keep: Optional[torch.Tensor],
    pad_to: int,
) -> None:
    _check_float(x, "x", 2)
    _check_index(expert_idx, "expert_idx", 2)
    _check_same_device(expert_idx, "expert_idx", x, "x")
    if expert_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_idx must have x.size(0)={x.shape[0]} rows, got shape {tuple(expert_idx.shape)}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if pad_to < 0:
        raise ValueError(f"pad_to must be >= 0, got {pad_to}")
    if keep is not None:
        _check_tensor(keep, "keep")
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor, got {keep.dtype}")
        if keep.shape != expert_idx.shape:
            raise ValueError(
                f"keep must have the shape of expert_idx {tuple(expert_idx.shape)}, "
                f"got {tuple(keep.shape)}"
            )
        _check_same_device(keep, "keep", x, "x")


def _check_unpermute_static(
    y: torch.Tensor,
    row_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    num_tokens: Optional[int] = None,
) -> None:
    _check_float(y, "y", 2)
    _check_index(row_map, "row_map", 2)
    _check_same_device(row_map, "row_map", y, "y")
    if num_tokens is not None and num_tokens != row_map.shape[0]:
        raise ValueError(
            f"num_tokens must equal row_map.size(0)={row_map.shape[0]}, got {num_tokens}"
        )
    if probs is not None:
        _check_float(probs, "probs", 2)
        if probs.shape != row_map.shape:
            raise ValueError(
                f"probs must have the shape of row_map {tuple(row_map.shape)}, "
                f"got {tuple(probs.shape)}"
            )
        _check_same_device(probs, "probs", y, "y")


def _check_unpermute_backward_static(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    row_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    num_rows: int,
) -> None:
    _check_unpermute_static(y, row_map, probs)
    _check_float(grad_out, "grad_out", 2)
    if grad_out.dtype != y.dtype:
        raise ValueError(f"grad_out must have the dtype of y ({y.dtype}), got {grad_out.dtype}")
    _check_same_device(grad_out, "grad_out", y, "y")
    if grad_out.shape != (row_map.shape[0], y.shape[1]):
        raise ValueError(
            f"grad_out must have shape {(row_map.shape[0], y.shape[1])}, "
            f"got {tuple(grad_out.shape)}"
        )
    if num_rows != y.shape[0]:
        raise ValueError(f"num_rows must equal y.size(0)={y.shape[0]}, got {num_rows}")


def _check_sort_chunks_static(
    x: torch.Tensor, split_sizes: torch.Tensor, order: torch.Tensor
) -> None:
    _check_float(x, "x", 2)
    _check_index(split_sizes, "split_sizes", 1)
    _check_cpu(split_sizes, "split_sizes")
    _check_index(order, "order", 1)
    _check_cpu(order, "order")
    if order.shape != split_sizes.shape:
        raise ValueError(
            f"order must have the length of split_sizes ({split_sizes.shape[0]}), "
            f"got {order.shape[0]}"
        )


def _check_grouped_gemm_static(
    a: torch.Tensor, b: torch.Tensor, group_sizes: torch.Tensor, trans_b: bool
) -> None:
    _check_float(a, "a", 2)
    _check_float(b, "b", 3)
    if b.dtype != a.dtype:
        raise ValueError(f"b must have the dtype of a ({a.dtype}), got {b.dtype}")
    _check_same_device(b, "b", a, "a")
    k_b = b.shape[2] if trans_b else b.shape[1]
    if k_b != a.shape[1]:
        raise ValueError(
            f"b {tuple(b.shape)} (trans_b={trans_b}) does not match a's inner size K={a.shape[1]}"
        )
    _check_index(group_sizes, "group_sizes", 1)
    _check_cpu(group_sizes, "group_sizes")
    if group_sizes.shape[0] != b.shape[0]:
        raise ValueError(
            f"group_sizes must have b.size(0)={b.shape[0]} entries, got {group_sizes.shape[0]}"
        )


def _check_grouped_gemm_backend(backend: str, a: torch.Tensor) -> None:
    if backend not in GROUPED_GEMM_BACKENDS:
        allowed = ", ".join(repr(b) for b in GROUPED_GEMM_BACKENDS)
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if a.device.type != "cuda" and backend not in ("auto", "loop"):
        raise ValueError(
            f"backend={backend!r} runs on CUDA tensors only; on {a.device} use 'auto' or 'loop'"
        )


def _check_grouped_gemm_wgrad_static(
    a: torch.Tensor, grad_out: torch.Tensor, group_sizes: torch.Tensor
) -> None:
    _check_float(a, "a", 2)
    _check_float(grad_out, "grad_out", 2)
    if grad_out.dtype != a.dtype:
        raise ValueError(f"grad_out must have the dtype of a ({a.dtype}), got {grad_out.dtype}")
    _check_same_device(grad_out, "grad_out", a, "a")
    if grad_out.shape[0] != a.shape[0]:
        raise ValueError(
            f"grad_out must have a.size(0)={a.shape[0]} rows, got {tuple(grad_out.shape)}"
        )
    _check_index(group_sizes, "group_sizes", 1)
    _check_cpu(group_sizes, "group_sizes")


def _check_group_sizes_values(group_sizes: torch.Tensor, total: int, name: str, what: str) -> None:
    if group_sizes.numel() and int(group_sizes.min()) < 0:
        raise ValueError(f"{name} entries must be >= 0, got {group_sizes.tolist()}")
    s = int(group_sizes.sum())
    if s != total:
        raise ValueError(f"{name} must sum to {what}={total}, got sum {s}")




def _check_swiglu_static(h: torch.Tensor) -> None:
    _check_float(h, "h", 2)
    if h.shape[1] % 2:
        raise ValueError(
            f"h must have an even number of columns [N, 2F] (gate | up), got {tuple(h.shape)}"
        )


def _check_swiglu_backward_static(grad_out: torch.Tensor, h: torch.Tensor) -> None:
    _check_swiglu_static(h)
    _check_float(grad_out, "grad_out", 2)
    if grad_out.dtype != h.dtype:
        raise ValueError(f"grad_out must have the dtype of h ({h.dtype}), got {grad_out.dtype}")
    _check_same_device(grad_out, "grad_out", h, "h")
    want = (h.shape[0], h.shape[1] // 2)
    if tuple(grad_out.shape) != want:
        raise ValueError(f"grad_out must have shape [N, F] = {list(want)} for h "
                         f"{tuple(h.shape)}, got {tuple(grad_out.shape)}")


# ---- block-sparse (dropless) products ----


def _check_block_size(block_size: int, name: str = "block_size") -> None:
    if block_size <= 0:
        raise ValueError(f"{name} must be > 0, got {block_size}")


def _check_block_topology_static(
    tokens_per_expert: torch.Tensor, block_size: int, n_col_blocks: int
) -> None:
    _check_index(tokens_per_expert, "tokens_per_expert", 1)
    _check_cpu(tokens_per_expert, "tokens_per_expert")
    _check_block_size(block_size)
    if n_col_blocks <= 0:
        raise ValueError(f"n_col_blocks must be > 0, got {n_col_blocks}")


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
    _check_index(block_row, "block_row", 1)
    _check_cpu(block_row, "block_row")
    _check_index(block_col, "block_col", 1)
    _check_cpu(block_col, "block_col")
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
    _check_index(row_ptr, "row_ptr", 1)
    _check_cpu(row_ptr, "row_ptr")
    if row_ptr.shape[0] != num_rows // b + 1:
        raise ValueError(
            f"row_ptr must have num_rows / B + 1 = {num_rows // b + 1} entries, "
            f"got {row_ptr.shape[0]}"
        )
    _check_index(block_col, "block_col", 1)
    _check_cpu(block_col, "block_col")
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
        _check_index(t, name, 1)
        _check_cpu(t, name)
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


def _check_range_values(t: torch.Tensor, hi: int, name: str, allowed: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
        raise ValueError(
            f"{name} entries must lie in {allowed} = [0, {hi}), "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )


def _check_offsets_values(ptr: torch.Tensor, total: int, name: str, what: str) -> None:
    if ptr.numel() == 0 or int(ptr[0]) != 0 or int(ptr[-1]) != total:
        raise ValueError(
            f"{name} must start with 0 and end with {what} ({total}), got {ptr.tolist()}"
        )
    if ptr.numel() > 1 and bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {ptr.tolist()}")
