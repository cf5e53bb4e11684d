"""Grouped GEMM: ``grouped_gemm(a, b, group_sizes, trans_b=False, backend) -> out`` and its
weight gradient ``grouped_gemm_wgrad``.

The rows of group ``g`` (consecutive row blocks of ``a [M, K]``, ``group_sizes [G]`` summing to
``M``) of ``out`` are ``a_g @ b[g]`` for ``b [G, K, N]`` (``a_g @ b[g]^T`` for ``b [G, N, K]``
when ``trans_b``). ``grouped_gemm_wgrad(a, grad_out, group_sizes, trans_b)`` is
``grad_b[g] = a_g^T @ grad_out_g`` (``grad_out_g^T @ a_g`` when ``trans_b``), zero for empty
groups. ``backend`` is one of ``GROUPED_GEMM_BACKENDS``; every backend gives the same result.
Autograd of the compiled op: ``grad_a = grouped_gemm(grad_out, b, gs, not trans_b)``,
``grad_b = grouped_gemm_wgrad(a, grad_out, gs, trans_b)``, with the forward's backend.
"""

from __future__ import annotations

import torch

from .checks import (
    IntList,
    _as_index_tensor,
    _check_float,
    _check_group_sizes_values,
    _check_host_index,
    _check_same_device,
)
from .extension import has_extension, register

# Grouped GEMM backends (csrc/cuda/grouped_gemm_cuda.cpp); "auto" and "loop" run on every device.
GROUPED_GEMM_BACKENDS = ("auto", "loop", "streams", "cublas", "torch", "cutlass")


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


def grouped_gemm_wgrad(
    a: torch.Tensor,
    grad_out: torch.Tensor,
    group_sizes: IntList,
    trans_b: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Weight gradient of :func:`grouped_gemm`: ``grad_b[g] = a_g^T @ grad_out_g``
    (``[G, K, N]``), or ``grad_out_g^T @ a_g`` (``[G, N, K]``) with ``trans_b``; zero for empty
    groups. ``a [M, K]``, ``grad_out [M, N]``, ``group_sizes`` as for :func:`grouped_gemm`."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    if has_extension():
        return torch.ops.moe_parallel.grouped_gemm_wgrad(
            a.contiguous(), grad_out.contiguous(), group_sizes.contiguous(), trans_b, backend
        )
    return grouped_gemm_wgrad_torch(a, grad_out, group_sizes, trans_b, backend)


# ---- plain-PyTorch twins ----


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


# ---- argument checks ----


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
    _check_host_index(group_sizes, "group_sizes")
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
    _check_host_index(group_sizes, "group_sizes")


# ---- fake kernels and autograd of the compiled ops ----


def _grouped_gemm_fake(a, b, group_sizes, trans_b=False, backend="auto"):
    _check_grouped_gemm_static(a, b, group_sizes, trans_b)
    _check_grouped_gemm_backend(backend, a)
    return a.new_empty(a.shape[0], b.shape[1] if trans_b else b.shape[2])


def _grouped_gemm_wgrad_fake(a, grad_out, group_sizes, trans_b=False, backend="auto"):
    _check_grouped_gemm_wgrad_static(a, grad_out, group_sizes)
    _check_grouped_gemm_backend(backend, a)
    g, k, n = group_sizes.shape[0], a.shape[1], grad_out.shape[1]
    return a.new_empty((g, n, k) if trans_b else (g, k, n))


def _grouped_gemm_setup(ctx, args, output):
    ctx.save_for_backward(args["a"], args["b"], args["group_sizes"])
    ctx.trans_b = args["trans_b"]
    ctx.backend = args["backend"]


def _grouped_gemm_backward(ctx, grad_out):
    a, b, group_sizes = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grads = {}
    if ctx.needs_input_grad[0]:  # a
        grads["a"] = torch.ops.moe_parallel.grouped_gemm(
            grad_out, b, group_sizes, not ctx.trans_b, ctx.backend
        )
    if ctx.needs_input_grad[1]:  # b
        grads["b"] = torch.ops.moe_parallel.grouped_gemm_wgrad(
            a, grad_out, group_sizes, ctx.trans_b, ctx.backend
        )
    return grads


register("grouped_gemm", _grouped_gemm_fake, _grouped_gemm_setup, _grouped_gemm_backward)
register("grouped_gemm_wgrad", _grouped_gemm_wgrad_fake)
