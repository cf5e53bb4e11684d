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
* ``swiglu(h) -> out``: ``silu(h[:, :F]) * h[:, F:]`` for ``h [N, 2F]``, fused in one pass.
* ``block_topology`` / ``bsr_sdd`` / ``bsr_dsd``: block-sparse (dropless) expert products, see
  the functions below and csrc/block_sparse.cpp.

Each public function runs the compiled op when ``moe_parallel._C`` is loaded and its
plain-PyTorch twin ``<op>_torch`` otherwise. The twins implement the same contract with ordinary
differentiable torch ops and serve as the test oracle. With the extension loaded this module
registers the fake (meta) kernels and the autograd formulas of the ops:

* permute:      ``grad_x = unpermute(grad_permuted, row_map, None, T)``
* unpermute:    ``grad_y, grad_probs = unpermute_backward(grad_out, y, row_map, probs, N)``
* sort_chunks:  ``grad_x = sort_chunks(grad, split_sizes[order], argsort(order))``
* grouped_gemm: ``grad_a = grouped_gemm(grad_out, b, gs, not trans_b)``,
  ``grad_b = grouped_gemm_wgrad(a, grad_out, gs, trans_b)``
* swiglu:       ``grad_h = swiglu_backward(grad_out, h)``
* bsr_sdd:      ``grad_x = bsr_dsd(grad_blocks, w^T, row_ptr, block_col)``,
  ``grad_w = bsr_wgrad(x, grad_blocks, ..., trans=False)``
* bsr_dsd:      ``grad_blocks = bsr_sdd(grad_y, w^T, block_row, block_col)``,
  ``grad_w = bsr_wgrad(grad_y, blocks, ..., trans=True)``

Setting ``MOE_PARALLEL_REQUIRE_EXTENSION=1`` turns a failure to load the extension into an
``ImportError`` carrying the cause.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .op_checks import (  # noqa: F401
    FLOAT_DTYPES,
    GROUPED_GEMM_BACKENDS,
    IntList,
    _check_tensor,
)
from .op_twins import (  # noqa: F401  (re-exported)
    _as_index_tensor,
    block_topology_torch,
    bsr_dsd_torch,
    bsr_sdd_torch,
    bsr_wgrad_torch,
    grouped_gemm_torch,
    grouped_gemm_wgrad_torch,
    permute_torch,
    sort_chunks_torch,
    swiglu_backward_torch,
    swiglu_torch,
    unpermute_backward_torch,
    unpermute_torch,
)

__all__ = [
    "has_extension",
    "extension_error",
    "permute",
    "expert_counts",
    "unpermute",
    "sort_chunks",
    "grouped_gemm",
    "GROUPED_GEMM_BACKENDS",
    "swiglu",
    "permute_torch",
    "unpermute_torch",
    "unpermute_backward_torch",
    "sort_chunks_torch",
    "grouped_gemm_torch",
    "grouped_gemm_wgrad_torch",
    "swiglu_torch",
    "swiglu_backward_torch",
    "block_topology",
    "bsr_sdd",
    "bsr_dsd",
    "block_topology_torch",
    "bsr_sdd_torch",
    "bsr_dsd_torch",
    "bsr_wgrad_torch",
]

OP_NAMES = (
    "permute",
    "unpermute",
    "unpermute_backward",
    "sort_chunks",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "block_topology",
    "bsr_sdd",
    "bsr_dsd",
    "bsr_wgrad",
    "swiglu",
    "swiglu_backward",
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


if has_extension():
    from .op_registration import register

    register()


# --------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------


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
    a: torch.Tensor,
    b: torch.Tensor,
    group_sizes: IntList,
    trans_b: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-group matmul: rows of group g of ``out [M, N]`` are ``a_g @ b[g]``.

    ``a [M, K]``; ``b [G, K, N]``, or ``[G, N, K]`` with ``trans_b`` (then ``a_g @ b[g]^T``);
    ``group_sizes [G]`` CPU int64 (or int sequence), entries ``>= 0`` summing to ``M``; groups are
    consecutive row blocks of ``a`` in order. Empty groups (and ``M = 0``) are allowed.
    Gradients: ``grad_a = grouped_gemm(grad_out, b, group_sizes, not trans_b)``,
    ``grad_b[g] = a_g^T @ grad_out_g`` (``grad_out_g^T @ a_g`` with ``trans_b``), with the same
    ``backend``.

    ``backend`` (one of ``GROUPED_GEMM_BACKENDS``) picks the implementation, same result:
    ``"auto"`` (for bfloat16 on sm_90+ with at least 16 groups ``"torch"``, and for the wgrad
    ``"cutlass"`` where its Hopper kernels run; else ``"loop"``),
    ``"loop"`` (one BLAS/cuBLAS GEMM per group); on CUDA only
    ``"streams"`` (the per-group GEMMs on 4 side streams), ``"cublas"``
    (``cublasGemmGroupedBatchedEx``; float32/bfloat16/float16), ``"torch"``
    (``torch._grouped_mm``; bfloat16) and ``"cutlass"`` (a CUTLASS grouped kernel; bfloat16, K and
    N multiples of 8).
    """
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    if has_extension():
        return torch.ops.moe_parallel.grouped_gemm(
            a.contiguous(), b.contiguous(), group_sizes.contiguous(), trans_b, backend
        )
    return grouped_gemm_torch(a, b, group_sizes, trans_b, backend)



def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the first expert GEMM's output: ``out = silu(gate) * up`` for
    ``h = [gate | up]`` ``[N, 2F]``, ``silu(g) = g·sigmoid(g)``; ``out [N, F]`` in h's dtype,
    computed in float32 (float64 for float64) in one pass over ``h``.
    Gradient, with ``s = sigmoid(gate)``: ``grad_gate = grad·up·s·(1 + gate·(1 - s))``,
    ``grad_up = grad·gate·s`` (one pass, ``swiglu_backward``).
    """
    if has_extension():
        return torch.ops.moe_parallel.swiglu(h.contiguous())
    return swiglu_torch(h)


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
