"""Token permutation: ``permute`` (expert-major gather), ``unpermute`` (weighted scatter-back)
and ``unpermute_backward``.

* ``permute(x, expert_idx, num_experts, keep=None, pad_to=0) -> (permuted, row_map, tpe)``
  gathers the kept token copies ``x[t]`` of every assignment ``(t, j)`` into expert-major order
  (expert id, then ``t``, then ``j``). Expert ``e``'s segment starts at ``sum_{e'<e} seg(e')``
  with ``seg = pad_to`` if ``pad_to > 0`` else ``count(e)``; padding rows are zero.
* ``unpermute(y, row_map, probs=None) -> out``:
  ``out[t] = sum_{j, row_map[t, j] >= 0} w[t, j] * y[row_map[t, j]]`` with ``w = probs`` or 1,
  accumulated in float32 (float64 for float64 ``y``) in the order ``j = 0..k-1``.
* ``unpermute_backward(grad_out, y, row_map, probs, N) -> (grad_y, grad_probs)``:
  ``grad_y[row_map[t, j]] = w[t, j] * grad_out[t]``,
  ``grad_probs[t, j] = <grad_out[t], y[row_map[t, j]]>`` (0 for dropped).

Autograd of the compiled ops: permute ``grad_x = unpermute(grad_permuted, row_map, None, T)``;
unpermute ``grad_y, grad_probs = unpermute_backward(grad_out, y, row_map, probs, N)`` when
``probs`` needs a gradient (then ``y`` is saved for backward), otherwise ``y`` is not saved and
``grad_y`` is the row gather by the inverse of ``row_map`` (``src[row_map[t, j]] = t``; zero
rows where nothing points), weighted by ``probs`` when given (``unpermute(grad_out, src, w)``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .checks import (
    _acc_dtype,
    _check_float,
    _check_index,
    _check_same_device,
    _check_tensor,
)
from .extension import has_extension, register

# ---- public functions ----


def permute(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    keep: Optional[torch.Tensor] = None,
    pad_to: int = 0,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the kept assignments of ``x [T, H]`` into expert-major order.

    ``expert_idx [T, k]`` int64 in ``[0, num_experts)``; ``keep [T, k]`` bool or None (all kept);
    ``pad_to >= 0``. Kept assignments are sorted by ``(expert_idx[t, j], t, j)``; expert ``e``'s
    segment starts at ``sum_{e'<e} seg(e')``, ``seg = pad_to if pad_to > 0 else count``.

    Returns ``permuted [N, H]`` (x's dtype; ``N = E * pad_to`` if ``pad_to > 0`` else the kept
    count; padding rows zero), ``row_map [T, k]`` int64 (row of ``(t, j)``, -1 when dropped) and
    ``tokens_per_expert [E]`` int64 (real counts). A count above ``pad_to > 0`` is an error.
    Gradient: ``grad_x = unpermute(grad_permuted, row_map)``.

    ``validate=False`` skips the data-dependent checks (the ``expert_idx`` range and the
    ``pad_to`` bound; on CUDA each a device-to-host read) for ids the caller has checked, e.g.
    with :func:`expert_counts`; ids out of range or counts above ``pad_to`` are then undefined
    behaviour.
    """
    if has_extension():
        if keep is not None:
            keep = keep.contiguous()
        return torch.ops.moe_parallel.permute(
            x.contiguous(), expert_idx.contiguous(), num_experts, keep, pad_to, validate
        )
    return permute_torch(x, expert_idx, num_experts, keep, pad_to, validate)


def expert_counts(
    expert_idx: torch.Tensor,
    num_experts: int,
    keep: Optional[torch.Tensor] = None,
    pad_to: int = 0,
) -> torch.Tensor:
    """Kept assignments per expert, ``[E]`` int64 on the CPU, with the checks of
    :func:`permute` on ``expert_idx`` (every entry in ``[0, num_experts)``) and ``pad_to`` (no
    count above it when ``pad_to > 0``), from one device-to-host copy. After it,
    ``permute(..., validate=False)`` needs no further host round trip: dropless dispatch reads
    its group sizes and checks its ids together.
    """
    _check_tensor(expert_idx, "expert_idx")
    if expert_idx.dtype != torch.int64:
        raise ValueError(f"expert_idx must have dtype int64, got {expert_idx.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    flat = expert_idx.reshape(-1)
    E = num_experts
    bad = (flat < 0) | (flat >= E)
    kept = bad.logical_not() if keep is None else keep.reshape(-1) & bad.logical_not()
    # bin e < E: kept assignments of e; bin E: dropped; bin E + 1: out of range
    key = torch.where(bad, E + 1, torch.where(kept, flat, E))
    bins = torch.zeros(E + 2, dtype=torch.int64, device=flat.device)
    host = bins.scatter_add_(0, key, torch.ones_like(key)).cpu()
    if int(host[E + 1]):
        lo, hi = torch.aminmax(flat)  # for the message only: the error path reads them
        raise ValueError(
            f"expert_idx entries must lie in [0, num_experts) = [0, {E}), got values in "
            f"[{int(lo)}, {int(hi)}]"
        )
    counts = host[:E]
    if pad_to > 0 and counts.numel() and int(counts.max()) > pad_to:
        raise ValueError(
            f"pad_to ({pad_to}) is smaller than the kept assignments of expert "
            f"{int(counts.argmax())} ({int(counts.max())}); pad_to must be 0 or >= the largest "
            "per-expert count"
        )
    return counts


def unpermute(
    y: torch.Tensor,
    row_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Weighted scatter-back: ``out[t] = sum_{j: row_map[t,j] >= 0} w[t,j] * y[row_map[t,j]]``.

    ``y [N, H]``; ``row_map [T, k]`` int64 in ``[-1, N)``; ``w = probs [T, k]`` (any float dtype)
    or 1. Accumulation is float32 (float64 for float64 ``y``) in the fixed order ``j = 0..k-1``;
    the result ``[T, H]`` has y's dtype. Gradients: ``grad_y[row_map[t,j]] = w[t,j] *
    grad_out[t]``, ``grad_probs[t,j] = <grad_out[t], y[row_map[t,j]]>`` (0 for dropped).
    ``validate=False`` skips the ``row_map`` range check (on CUDA a device-to-host read) for a
    row map in range by construction, such as the one :func:`permute` returned for ``y``.
    """
    if has_extension():
        _check_tensor(row_map, "row_map")
        num_tokens = row_map.shape[0] if row_map.dim() > 0 else 0
        if probs is not None:
            probs = probs.contiguous()
        return torch.ops.moe_parallel.unpermute(
            y=y.contiguous(), row_map=row_map.contiguous(), probs=probs, num_tokens=num_tokens,
            validate=validate,
        )
    return unpermute_torch(y, row_map, probs, validate)


# ---- plain-PyTorch twins ----


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


# ---- argument checks ----


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


def _check_row_map_values(row_map: torch.Tensor, num_rows: int) -> None:
    if row_map.numel() and (int(row_map.min()) < -1 or int(row_map.max()) >= num_rows):
        raise ValueError(
            f"row_map entries must be in [-1, {num_rows}), "
            f"got min {int(row_map.min())} max {int(row_map.max())}"
        )


# ---- fake kernels and autograd of the compiled ops ----


def _permute_fake(x, expert_idx, num_experts, keep=None, pad_to=0, validate=True):
    _check_permute_static(x, expert_idx, num_experts, keep, pad_to)
    # N = E * pad_to, or T * k when every assignment is kept, is static; otherwise it is the
    # (data-dependent) number of kept assignments.
    if pad_to > 0:
        n = num_experts * pad_to
    elif keep is None:
        n = expert_idx.numel()
    else:
        n = torch.library.get_ctx().new_dynamic_size()
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


def scatter_to_rows(values: torch.Tensor, row_map: torch.Tensor, num_rows: int,
                    fill: float = 0) -> torch.Tensor:
    """``out [num_rows]``: ``out[row_map[t, j]] = values[t, j]`` (``values`` ``[T, k]`` or
    ``[T·k]``), ``fill`` for a row no ``(t, j)`` points at; dropped entries (-1) land in one
    spare slot, so nothing is read back to the host. Differentiable in ``values``."""
    dest = torch.where(row_map >= 0, row_map, num_rows).reshape(-1)
    out = torch.full((num_rows + 1,), fill, dtype=values.dtype, device=values.device)
    return out.scatter(0, dest, values.reshape(-1))[:num_rows]


def _row_sources(row_map: torch.Tensor, num_rows: int, missing: int) -> torch.Tensor:
    """The adjoint's gather map ``src [num_rows]``: ``src[row_map[t, j]] = t`` and ``missing``
    for a row no ``(t, j)`` points at."""
    T, k = row_map.shape
    tok = torch.arange(T, device=row_map.device).repeat_interleave(k)
    return scatter_to_rows(tok, row_map, num_rows, missing)


def _unpermute_setup(ctx, args, output):
    # y is read by the backward only for grad_probs: saved only when probs needs a gradient.
    ctx.keeps_y = args["probs"] is not None and ctx.needs_input_grad[2]
    ctx.num_rows = args["y"].shape[0]
    ctx.save_for_backward(args["y"] if ctx.keeps_y else None, args["row_map"], args["probs"])


def _unpermute_backward(ctx, grad_out):
    y, row_map, probs = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    if not ctx.keeps_y:  # grad_y[row_map[t, j]] = w[t, j] * grad_out[t]: a row gather
        T, N = grad_out.shape[0], ctx.num_rows
        if probs is None:  # rows nobody points at read the appended zero row T
            padded = torch.cat([grad_out, grad_out.new_zeros(1, grad_out.shape[1])])
            return {"y": padded.index_select(0, _row_sources(row_map, N, T))}
        w = scatter_to_rows(probs, row_map, N)
        grad_y = torch.ops.moe_parallel.unpermute(
            y=grad_out, row_map=_row_sources(row_map, N, -1).view(N, 1), probs=w.view(N, 1),
            num_tokens=N, validate=False)
        return {"y": grad_y}
    # row_map passed the forward's range check (or its caller's validate=False promise).
    grad_y, grad_probs = torch.ops.moe_parallel.unpermute_backward(
        grad_out, y, row_map, probs, y.shape[0], validate=False
    )
    return {"y": grad_y, "probs": grad_probs}


register("permute", _permute_fake, _permute_setup, _permute_backward)
register("unpermute", _unpermute_fake, _unpermute_setup, _unpermute_backward)
register("unpermute_backward", _unpermute_backward_fake)
