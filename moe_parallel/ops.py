"""Python face of the ``moe_parallel`` custom ops (``torch.ops.moe_parallel.*``).

Index tensors are int64; float tensors are float32, float64, bfloat16 or float16.

* ``permute(x, expert_idx, num_experts, keep=None, pad_to=0) -> (permuted, row_map, tpe)``
  gathers the kept token copies ``x[t]`` of every assignment ``(t, j)`` into expert-major order
  (expert id, then ``t``, then ``j``). Expert ``e``'s segment starts at ``sum_{e'<e} seg(e')``
  with ``seg = pad_to`` if ``pad_to > 0`` else ``count(e)``; padding rows are zero.
* ``unpermute(y, row_map, probs=None) -> out``:
  ``out[t] = sum_{j, row_map[t, j] >= 0} w[t, j] * y[row_map[t, j]]`` with ``w = probs`` or 1,
  accumulated in float32 (float64 for float64 ``y``) in the order ``j = 0..k-1``.
* ``sort_chunks(x, split_sizes, order) -> cat([chunk[order[0]], chunk[order[1]], ...])``.
* ``grouped_gemm(a, b, group_sizes, trans_b=False) -> out``: rows of group ``g`` are
  ``a_g @ b[g]`` (``a_g @ b[g]^T`` when ``trans_b``).

Each public function runs the compiled op when ``moe_parallel._C`` is loaded and its
plain-PyTorch twin ``<op>_torch`` otherwise. The twins implement the same contract with ordinary
differentiable torch ops and serve as the test oracle. With the extension loaded this module
registers the fake (meta) kernels and the autograd formulas of the ops:

* permute:      ``grad_x = unpermute(grad_permuted, row_map, None, T)``
* unpermute:    ``grad_y, grad_probs = unpermute_backward(grad_out, y, row_map, probs, N)``
* sort_chunks:  ``grad_x = sort_chunks(grad, split_sizes[order], argsort(order))``
* grouped_gemm: ``grad_a = grouped_gemm(grad_out, b, gs, not trans_b)``,
  ``grad_b = grouped_gemm_wgrad(a, grad_out, gs, trans_b)``

Setting ``MOE_PARALLEL_REQUIRE_EXTENSION=1`` turns a failure to load the extension into an
``ImportError`` carrying the cause.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

import torch

__all__ = [
    "has_extension",
    "extension_error",
    "permute",
    "unpermute",
    "sort_chunks",
    "grouped_gemm",
    "permute_torch",
    "unpermute_torch",
    "unpermute_backward_torch",
    "sort_chunks_torch",
    "grouped_gemm_torch",
    "grouped_gemm_wgrad_torch",
]

IntList = Union[torch.Tensor, Sequence[int]]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OP_NAMES = (
    "permute",
    "unpermute",
    "unpermute_backward",
    "sort_chunks",
    "grouped_gemm",
    "grouped_gemm_wgrad",
)
_REQUIRE_ENV = "MOE_PARALLEL_REQUIRE_EXTENSION"


def _load_extension() -> Optional[BaseException]:
    """Import ``moe_parallel._C``; return the failure (None on success)."""
    try:
        from moe_parallel import _C  # noqa: F401  (registers torch.ops.moe_parallel.*)
    except Exception as exc:  # ImportError, OSError (bad .so), RuntimeError (registration)
        return exc
    missing = [n for n in OP_NAMES if not hasattr(torch.ops.moe_parallel, n)]
    if missing:
        return ImportError(f"moe_parallel._C loaded but does not register {missing}")
    return None


_EXT_ERROR = _load_extension()
if _EXT_ERROR is not None and os.environ.get(_REQUIRE_ENV, "") == "1":
    raise ImportError(
        f"{_REQUIRE_ENV}=1 but moe_parallel._C failed to load: "
        f"{type(_EXT_ERROR).__name__}: {_EXT_ERROR}"
    ) from _EXT_ERROR


def has_extension() -> bool:
    """True when ``moe_parallel._C`` is loaded and registers every ``moe_parallel`` op."""
    return _EXT_ERROR is None


def extension_error() -> Optional[BaseException]:
    """The exception that prevented loading ``moe_parallel._C`` (None when loaded)."""
    return _EXT_ERROR


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
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(
            f"expert_idx entries must be in [0, num_experts={num_experts}), "
            f"got min {int(flat.min())} max {int(flat.max())}"
        )
    kept = torch.ones_like(flat, dtype=torch.bool) if keep is None else keep.reshape(-1)
    counts = torch.bincount(flat[kept], minlength=num_experts)
    if pad_to > 0 and counts.numel() and int(counts.max()) > pad_to:
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
    y: torch.Tensor, row_map: torch.Tensor, probs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Twin of :func:`unpermute`: ``out[t] = sum_{j: row_map[t,j] >= 0} w[t,j] * y[row_map[t,j]]``.

    ``w = probs`` (any float dtype) or 1. Accumulates in float32 (float64 for float64 ``y``) in the
    order ``j = 0..k-1``; returns ``[T, H]`` in ``y``'s dtype.
    """
    _check_unpermute_static(y, row_map, probs)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``unpermute_backward``.

    ``grad_y [num_rows, H]`` (y's dtype) is zero except ``grad_y[row_map[t,j]] = w[t,j] *
    grad_out[t]``; ``grad_probs [T, k]`` (probs' dtype) is ``<grad_out[t], y[row_map[t,j]]>``
    accumulated in float32/float64, 0 where ``row_map == -1``; an empty ``[0]`` tensor of y's dtype
    when ``probs`` is None.
    """
    _check_unpermute_backward_static(grad_out, y, row_map, probs, num_rows)
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
    a: torch.Tensor, b: torch.Tensor, group_sizes: IntList, trans_b: bool = False
) -> torch.Tensor:
    """Twin of :func:`grouped_gemm`: rows of group g are ``a_g @ b[g]`` (``a_g @ b[g]^T``)."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    _check_grouped_gemm_static(a, b, group_sizes, trans_b)
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
    a: torch.Tensor, grad_out: torch.Tensor, group_sizes: IntList, trans_b: bool = False
) -> torch.Tensor:
    """Twin of ``grouped_gemm_wgrad``: ``grad_b[g] = a_g^T @ grad_out_g`` ([G, K, N]), or
    ``grad_out_g^T @ a_g`` ([G, N, K]) when ``trans_b``; zero for empty groups."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    _check_grouped_gemm_wgrad_static(a, grad_out, group_sizes)
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


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd formulas of the compiled ops.
# --------------------------------------------------------------------------------------------


def _permute_fake(x, expert_idx, num_experts, keep=None, pad_to=0):
    _check_permute_static(x, expert_idx, num_experts, keep, pad_to)
    # N = E * pad_to is static; otherwise it is the (data-dependent) number of kept assignments.
    n = num_experts * pad_to if pad_to > 0 else torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(n, x.shape[1]),
        expert_idx.new_empty(expert_idx.shape),
        expert_idx.new_empty(num_experts),
    )


def _unpermute_fake(y, row_map, probs=None, num_tokens=None):
    _check_unpermute_static(y, row_map, probs, num_tokens)
    return y.new_empty(num_tokens, y.shape[1])


def _unpermute_backward_fake(grad_out, y, row_map, probs, num_rows):
    _check_unpermute_backward_static(grad_out, y, row_map, probs, num_rows)
    grad_probs = y.new_empty(0) if probs is None else probs.new_empty(probs.shape)
    return y.new_empty(num_rows, y.shape[1]), grad_probs


def _sort_chunks_fake(x, split_sizes, order):
    _check_sort_chunks_static(x, split_sizes, order)
    return torch.empty_like(x)


def _grouped_gemm_fake(a, b, group_sizes, trans_b=False):
    _check_grouped_gemm_static(a, b, group_sizes, trans_b)
    return a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2])


def _grouped_gemm_wgrad_fake(a, grad_out, group_sizes, trans_b=False):
    _check_grouped_gemm_wgrad_static(a, grad_out, group_sizes)
    g, k, n = group_sizes.shape[0], a.shape[1], grad_out.shape[1]
    return a.new_empty((g, n, k) if trans_b else (g, k, n))


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
    grad_x = torch.ops.moe_parallel.unpermute(
        y=grad_permuted.contiguous(), row_map=row_map, probs=None, num_tokens=ctx.num_tokens
    )
    return {"x": grad_x}


def _unpermute_setup(ctx, args, output):
    ctx.save_for_backward(args["y"], args["row_map"], args["probs"])


def _unpermute_backward(ctx, grad_out):
    y, row_map, probs = ctx.saved_tensors
    grad_y, grad_probs = torch.ops.moe_parallel.unpermute_backward(
        grad_out.contiguous(), y, row_map, probs, y.shape[0]
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


def _grouped_gemm_backward(ctx, grad_out):
    a, b, group_sizes = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grads = {}
    if ctx.needs_input_grad[0]:  # a
        grads["a"] = torch.ops.moe_parallel.grouped_gemm(grad_out, b, group_sizes, not ctx.trans_b)
    if ctx.needs_input_grad[1]:  # b
        grads["b"] = torch.ops.moe_parallel.grouped_gemm_wgrad(
            a, grad_out, group_sizes, ctx.trans_b
        )
    return grads


def _register() -> None:
    fakes = {
        "permute": _permute_fake,
        "unpermute": _unpermute_fake,
        "unpermute_backward": _unpermute_backward_fake,
        "sort_chunks": _sort_chunks_fake,
        "grouped_gemm": _grouped_gemm_fake,
        "grouped_gemm_wgrad": _grouped_gemm_wgrad_fake,
    }
    for name, fn in fakes.items():
        torch.library.register_fake(f"moe_parallel::{name}", fn)
    rules = {
        "permute": (_permute_setup, _permute_backward),
        "unpermute": (_unpermute_setup, _unpermute_backward),
        "sort_chunks": (_sort_chunks_setup, _sort_chunks_backward),
        "grouped_gemm": (_grouped_gemm_setup, _grouped_gemm_backward),
    }
    for name, (setup, backward) in rules.items():
        backward_fn, setup_context = _autograd_rule(name, setup, backward)
        torch.library.register_autograd(
            f"moe_parallel::{name}", backward_fn, setup_context=setup_context
        )


if has_extension():
    _register()


# --------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------


def permute(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    keep: Optional[torch.Tensor] = None,
    pad_to: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the kept assignments of ``x [T, H]`` into expert-major order.

    ``expert_idx [T, k]`` int64 in ``[0, num_experts)``; ``keep [T, k]`` bool or None (all kept);
    ``pad_to >= 0``. Kept assignments are sorted by ``(expert_idx[t, j], t, j)``; expert ``e``'s
    segment starts at ``sum_{e'<e} seg(e')``, ``seg = pad_to if pad_to > 0 else count``.

    Returns ``permuted [N, H]`` (x's dtype; ``N = E * pad_to`` if ``pad_to > 0`` else the kept
    count; padding rows zero), ``row_map [T, k]`` int64 (row of ``(t, j)``, -1 when dropped) and
    ``tokens_per_expert [E]`` int64 (real counts). A count above ``pad_to > 0`` is an error.
    Gradient: ``grad_x = unpermute(grad_permuted, row_map)``.
    """
    if has_extension():
        if keep is not None:
            keep = keep.contiguous()
        return torch.ops.moe_parallel.permute(
            x.contiguous(), expert_idx.contiguous(), num_experts, keep, pad_to
        )
    return permute_torch(x, expert_idx, num_experts, keep, pad_to)


def unpermute(
    y: torch.Tensor, row_map: torch.Tensor, probs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Weighted scatter-back: ``out[t] = sum_{j: row_map[t,j] >= 0} w[t,j] * y[row_map[t,j]]``.

    ``y [N, H]``; ``row_map [T, k]`` int64 in ``[-1, N)``; ``w = probs [T, k]`` (any float dtype)
    or 1. Accumulation is float32 (float64 for float64 ``y``) in the fixed order ``j = 0..k-1``;
    the result ``[T, H]`` has y's dtype. Gradients: ``grad_y[row_map[t,j]] = w[t,j] *
    grad_out[t]``, ``grad_probs[t,j] = <grad_out[t], y[row_map[t,j]]>`` (0 for dropped).
    """
    if has_extension():
        _check_tensor(row_map, "row_map")
        num_tokens = row_map.shape[0] if row_map.dim() > 0 else 0
        if probs is not None:
            probs = probs.contiguous()
        return torch.ops.moe_parallel.unpermute(
            y=y.contiguous(), row_map=row_map.contiguous(), probs=probs, num_tokens=num_tokens
        )
    return unpermute_torch(y, row_map, probs)


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


def grouped_gemm(
    a: torch.Tensor, b: torch.Tensor, group_sizes: IntList, trans_b: bool = False
) -> torch.Tensor:
    """Per-group matmul: rows of group g of ``out [M, N]`` are ``a_g @ b[g]``.

    ``a [M, K]``; ``b [G, K, N]``, or ``[G, N, K]`` with ``trans_b`` (then ``a_g @ b[g]^T``);
    ``group_sizes [G]`` CPU int64 (or int sequence), entries ``>= 0`` summing to ``M``; groups are
    consecutive row blocks of ``a`` in order. Empty groups (and ``M = 0``) are allowed.
    Gradients: ``grad_a = grouped_gemm(grad_out, b, group_sizes, not trans_b)``,
    ``grad_b[g] = a_g^T @ grad_out_g`` (``grad_out_g^T @ a_g`` with ``trans_b``).
    """
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    if has_extension():
        return torch.ops.moe_parallel.grouped_gemm(
            a.contiguous(), b.contiguous(), group_sizes.contiguous(), trans_b
        )
    return grouped_gemm_torch(a, b, group_sizes, trans_b)
