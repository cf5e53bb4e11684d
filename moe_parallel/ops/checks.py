"""Argument checks and helpers shared by the op families.

Index tensors are int64; float tensors are one of ``FLOAT_DTYPES``. The static checks (dtype,
rank, shape, device) need no data and run in the fake kernels and the twins; the value checks
(index ranges, sums, offsets) read the data and run in the twins. Every message names the
argument and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

IntList = Union[torch.Tensor, Sequence[int]]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_index_tensor(v: IntList, name: str) -> torch.Tensor:
    """A list/tuple of ints becomes a CPU int64 tensor; tensors pass through unchanged."""
    if isinstance(v, torch.Tensor):
        return v
    try:
        return torch.tensor(list(v), dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a CPU int64 tensor or a sequence of ints: {exc}") from exc


# ---- static checks ----


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


def _check_host_index(t: torch.Tensor, name: str) -> None:
    """``t`` is host metadata: a 1-D int64 CPU tensor."""
    _check_index(t, name, 1)
    _check_cpu(t, name)


def _check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
        )


def _check_cpu(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU int64 tensor, got device {t.device}")


# ---- value checks ----


def _check_group_sizes_values(group_sizes: torch.Tensor, total: int, name: str, what: str) -> None:
    if group_sizes.numel() and int(group_sizes.min()) < 0:
        raise ValueError(f"{name} entries must be >= 0, got {group_sizes.tolist()}")
    s = int(group_sizes.sum())
    if s != total:
        raise ValueError(f"{name} must sum to {what}={total}, got sum {s}")


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


def _check_block_size(block_size: int, name: str = "block_size") -> None:
    if block_size <= 0:
        raise ValueError(f"{name} must be > 0, got {block_size}")
