"""Autograd-aware collectives along dim 0, with uneven sizes, for gloo and NCCL.

Over a group of ``w`` ranks (``r`` = this rank's index in it), for tensors split into row blocks:

* ``all_to_all(x, out_splits, in_splits, group)``: block ``i`` of ``x`` (``in_splits[i]`` rows)
  goes to rank ``i``; the result is the blocks received from ranks ``0..w-1`` concatenated
  (``out_splits[i]`` rows from rank ``i``). Backward: the all-to-all with swapped splits.
* ``all_to_all_chunked(x, out_splits, in_splits, group)``: one all-to-all per chunk ``c``:
  input chunk ``c`` (``Σ in_splits[c]`` rows, chunks consecutive in ``x``) is sent with splits
  ``in_splits[c]`` and its received rows land, in rank order, as output chunk ``c`` (chunks
  consecutive in the result). Backward: the same with the splits swapped.
* ``all_gather(x, group, sizes)``: ``cat([x_0, ..., x_{w-1}])`` on every rank, ``x_i`` having
  ``sizes[i]`` rows. Backward: ``reduce_scatter(grad, sizes)`` (every rank's use of ``x_r``
  contributes to its gradient).
* ``reduce_scatter(x, sizes, group)``: ``Σ_i x_i[block r]`` where every rank's ``x`` is split
  into blocks of ``sizes`` rows (``sizes`` identical on all ranks). Backward: ``all_gather``.
* ``all_gather_object(obj, group)``: every rank's picklable ``obj``, in rank order (no autograd).

``all_to_all`` and ``all_to_all_chunked`` take ``async_op=True``: they then return
``(result, Pending)`` with the exchange still in flight (gloo's worker threads, NCCL's stream);
the caller may compute anything that does not read ``result`` and must call ``Pending.wait()``
before reading it. The backward of an asynchronous exchange is synchronous.

Inputs are made contiguous. ``group=None`` means a one-process group (as
``ParallelState.single()`` holds), not the default world group; a group of size 1 returns its
input unchanged without communicating. The split sizes must be consistent across ranks (what
rank ``i`` sends to ``j`` is what ``j`` expects from ``i``); zero-size blocks are allowed.
Uneven all-gathers and reduce-scatters pad every block to the largest one and use the
even-sized collective.

Under ``torch.compile`` ``all_to_all``, and ``all_gather`` / ``reduce_scatter`` with equal
blocks, are the functional collectives (``torch.distributed._functional_collectives``, with
autograd), which trace into the graph; an asynchronous one is returned already waited for (the
compiler schedules the wait).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

__all__ = ["Pending", "all_gather", "all_gather_object", "all_gather_sizes", "all_to_all",
           "all_to_all_chunked", "group_rank", "group_size", "reduce_scatter"]

Group = Optional[dist.ProcessGroup]

# torch >= 2.10 renamed the even-sized collectives; keep the older names as a fallback.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


def group_size(group: Group) -> int:
    """Number of ranks in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This rank's index in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _check_splits(name: str, splits: Sequence[int], world: int) -> list[int]:
    splits = [int(s) for s in splits]
    if len(splits) != world:
        raise ValueError(f"{name} must have one entry per rank ({world}), got {splits}")
    if any(s < 0 for s in splits):
        raise ValueError(f"{name} entries must be >= 0, got {splits}")
    return splits


# ---- all-to-all -------------------------------------------------------------------------------


def all_to_all(
    x: Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int], group: Group,
    async_op: bool = False,
):
    """Send ``input_split_sizes[i]`` rows of ``x`` (consecutive blocks) to rank ``i``; return the
    ``output_split_sizes[i]`` rows received from each rank ``i``, concatenated in rank order.

    ``sum(input_split_sizes) == x.shape[0]``. Differentiable: the gradient is the all-to-all of
    the output gradient with the splits swapped. ``async_op``: ``(result, Pending)``, see the
    module docstring.
    """
    world = group_size(group)
    out_splits = _check_splits("output_split_sizes", output_split_sizes, world)
    in_splits = _check_splits("input_split_sizes", input_split_sizes, world)
    if sum(in_splits) != x.shape[0]:
        raise ValueError(
            f"input_split_sizes {in_splits} must sum to x.shape[0]={x.shape[0]}"
        )
    if world == 1:
        if out_splits != in_splits:
            raise ValueError(
                f"a one-rank all_to_all needs equal splits, got {out_splits} and {in_splits}"
            )
        return (x, Pending()) if async_op else x
    if torch.compiler.is_compiling():
        y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
        return (y, Pending()) if async_op else y
    return _exchange(x, [out_splits], [in_splits], group, async_op)


class Pending:
    """An exchange in flight: ``wait()`` blocks until its result may be read (idempotent)."""

    def __init__(self) -> None:
        self._works: list = []
        self._keep: list[Tensor] = []  # the buffers the exchange reads and writes

    def wait(self) -> None:
        works, self._works, self._keep = self._works, [], []
        for work in works:
            work.wait()


def _exchange(x: Tensor, out_splits: list[list[int]], in_splits: list[list[int]], group,
              async_op: bool):
    if not async_op:
        return _AllToAll.apply(x, out_splits, in_splits, group, None)
    pending = Pending()
    return _AllToAll.apply(x, out_splits, in_splits, group, pending), pending


def _all_to_all_raw(x: Tensor, out_splits: list[list[int]], in_splits: list[list[int]],
                    group, pending: Optional[Pending] = None) -> Tensor:
    """One ``all_to_all_single`` per chunk, each writing into its slice of one output; with
    ``pending`` they are left in flight and recorded there."""
    out = x.new_empty((sum(map(sum, out_splits)), *x.shape[1:]))
    x = x.contiguous()
    src = dst = 0
    for o, i in zip(out_splits, in_splits):
        n_in, n_out = sum(i), sum(o)
        work = dist.all_to_all_single(out.narrow(0, dst, n_out), x.narrow(0, src, n_in), o, i,
                                      group=group, async_op=pending is not None)
        if pending is not None:
            pending._works.append(work)
        src, dst = src + n_in, dst + n_out
    if pending is not None:
        pending._keep += [x, out]
    return out


class _AllToAll(torch.autograd.Function):
    """Chunked all-to-all (one chunk: the plain one); backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all_raw(x, out_splits, in_splits, group, pending)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_x = _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group, None)
        return grad_x, None, None, None, None


def all_to_all_chunked(
    x: Tensor, output_splits: Sequence[Sequence[int]], input_splits: Sequence[Sequence[int]],
    group: Group, async_op: bool = False,
):
    """Chunk ``c`` of ``x`` (the next ``sum(input_splits[c])`` rows) goes out as an all-to-all
    with splits ``input_splits[c]``; what it brings back (``output_splits[c][i]`` rows from
    rank ``i``, in rank order) is chunk ``c`` of the result. Chunked exchanges reorder rows
    ``[chunk][rank]`` on the sender into ``[chunk][rank]`` on the receiver with no local copy.

    Both split lists have one entry per chunk, each with one entry per rank. Differentiable:
    the gradient is the chunked all-to-all of the output gradient with the splits swapped.
    ``async_op``: ``(result, Pending)``, see the module docstring.
    """
    world = group_size(group)
    if len(output_splits) != len(input_splits):
        raise ValueError(f"output_splits ({len(output_splits)} chunks) and input_splits "
                         f"({len(input_splits)} chunks) must have the same number of chunks")
    out_splits = [_check_splits("output_splits[c]", o, world) for o in output_splits]
    in_splits = [_check_splits("input_splits[c]", i, world) for i in input_splits]
    if sum(map(sum, in_splits)) != x.shape[0]:
        raise ValueError(f"input_splits must sum to x.shape[0]={x.shape[0]}, got "
                         f"{sum(map(sum, in_splits))}")
    if world == 1:
        if out_splits != in_splits:
            raise ValueError("a one-rank all_to_all_chunked needs equal splits, got "
                             f"{out_splits} and {in_splits}")
        return (x, Pending()) if async_op else x
    return _exchange(x, out_splits, in_splits, group, async_op)


# ---- all-gather / reduce-scatter --------------------------------------------------------------


def all_gather_sizes(n: int, group: Group, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. its row count), in group rank order. ``device`` must suit the
    backend (CPU for gloo, the rank's GPU for NCCL)."""
    world = group_size(group)
    if world == 1:
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group=group)
    return out.tolist()


def all_gather_object(obj: object, group: Group) -> list:
    """Every rank's picklable ``obj``, in group rank order (``[obj]`` for a one-rank group);
    not differentiable (``dist.all_gather_object``)."""
    world = group_size(group)
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _all_gather_raw(x: Tensor, sizes: list[int], group) -> Tensor:
    rest = x.shape[1:]
    width = max(sizes)
    if width == 0:  # every rank knows: nothing to move
        return x.new_empty((0, *rest))
    if all(s == width for s in sizes):
        out = x.new_empty((len(sizes) * width, *rest))
        _all_gather_single(out, x.contiguous(), group=group)
        return out
    padded = x.new_zeros((width, *rest))
    padded[: x.shape[0]] = x
    buf = x.new_empty((len(sizes) * width, *rest))
    _all_gather_single(buf, padded, group=group)
    return torch.cat([buf[i * width: i * width + s] for i, s in enumerate(sizes)])


def _reduce_scatter_raw(x: Tensor, sizes: list[int], rank: int, group) -> Tensor:
    rest = x.shape[1:]
    width = max(sizes)
    if width == 0:
        return x.new_empty((0, *rest))
    if all(s == width for s in sizes):
        out = x.new_empty((width, *rest))
        _reduce_scatter_single(out, x.contiguous(), group=group)
        return out
    padded = x.new_zeros((len(sizes), width, *rest))
    for i, block in enumerate(x.split(sizes, 0)):
        padded[i, : sizes[i]] = block
    out = x.new_empty((width, *rest))
    _reduce_scatter_single(out, padded.view(len(sizes) * width, *rest), group=group)
    return out[: sizes[rank]]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_raw(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _reduce_scatter_raw(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


def all_gather(x: Tensor, group: Group, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """``cat([x_0, ..., x_{w-1}], 0)`` on every rank of ``group``; ``x_i`` is rank ``i``'s ``x``.

    Ranks may hold different row counts; ``sizes`` (every rank's ``x.shape[0]``, in rank order)
    saves one small all-gather when the caller knows them. Differentiable: the gradient of ``x``
    is the sum over ranks of their output gradient's block ``r`` (a reduce-scatter).
    """
    world = group_size(group)
    if world == 1:
        return x
    rank = group_rank(group)
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], group, x.device)
    sizes = _check_splits("sizes", sizes, world)
    if sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes[{rank}]={sizes[rank]} must equal x.shape[0]={x.shape[0]}")
    if torch.compiler.is_compiling() and len(set(sizes)) == 1:
        return funcol.all_gather_single_autograd(x.contiguous(), 0, group)
    return _AllGather.apply(x, sizes, rank, group)


def reduce_scatter(x: Tensor, split_sizes: Sequence[int], group: Group) -> Tensor:
    """Sum of every rank's ``x`` (split into blocks of ``split_sizes`` rows), block ``r`` only.

    ``split_sizes`` is the same on every rank and sums to ``x.shape[0]``. Differentiable: the
    gradient of ``x`` is the all-gather of the output gradients.
    """
    world = group_size(group)
    sizes = _check_splits("split_sizes", split_sizes, world)
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"split_sizes {sizes} must sum to x.shape[0]={x.shape[0]}")
    if world == 1:
        return x
    if torch.compiler.is_compiling() and len(set(sizes)) == 1:
        return funcol.reduce_scatter_single_autograd(x.contiguous(), "sum", 0, group)
    return _ReduceScatter.apply(x, sizes, group_rank(group), group)
