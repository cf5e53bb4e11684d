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


