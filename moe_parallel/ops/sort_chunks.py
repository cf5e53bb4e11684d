"""Row-block reordering: ``sort_chunks(x, split_sizes, order) -> cat([chunk[order[0]], ...])``.

``x [N, H]`` is split into ``chunk[i]`` of ``split_sizes[i] >= 0`` rows (summing to ``N``) and
the chunks are concatenated in the order given by the permutation ``order``.
Autograd of the compiled op: ``grad_x = sort_chunks(grad, split_sizes[order], argsort(order))``.
"""

from __future__ import annotations

import torch

from .checks import (
    IntList,
    _as_index_tensor,
    _check_float,
    _check_group_sizes_values,
    _check_host_index,
)
from .extension import has_extension, register


def sort_chunks(x: torch.Tensor, split_sizes: IntList, order: IntList) -> torch.Tensor:
    """Reorder row blocks: ``out = cat([chunk[order[0]], chunk[order[1]], ...])``.

    ``x [N, H]`` is split into ``chunk[i]`` of ``split_sizes[i] >= 0`` rows (sum ``N``);
    ``order`` is a permutation of ``0..n-1``. Both are CPU int64 tensors or int sequences.
    Gradient: ``grad_x = sort_chunks(grad, split_sizes[order], argsort(order))``.
    """
    split_sizes = _as_index_tensor(split_sizes, "split_sizes")
    order = _as_index_tensor(order, "order")
    if has_extension():
        return torch.ops.moe_parallel.sort_chunks(
            x.contiguous(), split_sizes.contiguous(), order.contiguous()
        )
    return sort_chunks_torch(x, split_sizes, order)


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


def _check_sort_chunks_static(
    x: torch.Tensor, split_sizes: torch.Tensor, order: torch.Tensor
) -> None:
    _check_float(x, "x", 2)
    _check_host_index(split_sizes, "split_sizes")
    _check_host_index(order, "order")
    if order.shape != split_sizes.shape:
        raise ValueError(
            f"order must have the length of split_sizes ({split_sizes.shape[0]}), "
            f"got {order.shape[0]}"
        )


# ---- fake kernel and autograd of the compiled op ----


def _sort_chunks_fake(x, split_sizes, order):
    _check_sort_chunks_static(x, split_sizes, order)
    return torch.empty_like(x)


def _sort_chunks_setup(ctx, args, output):
    ctx.save_for_backward(args["split_sizes"], args["order"])


def _sort_chunks_backward(ctx, grad):
    split_sizes, order = ctx.saved_tensors
    grad_x = torch.ops.moe_parallel.sort_chunks(
        grad.contiguous(), split_sizes[order], torch.argsort(order)
    )
    return {"x": grad_x}


register("sort_chunks", _sort_chunks_fake, _sort_chunks_setup, _sort_chunks_backward)
