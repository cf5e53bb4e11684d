"""Fused SwiGLU: ``swiglu(h) -> silu(h[:, :F]) * h[:, F:]`` for ``h = [gate | up]`` ``[N, 2F]``
and its backward ``swiglu_backward(grad_out, h) -> [grad_gate | grad_up]``; and GPT-OSS's clamped
variant ``clamped_swiglu(h, alpha, limit)``: with ``g = min(gate, L)``, ``u = clamp(up, -L, L)``,
``s = sigmoid(alpha·g)``: ``out = (u + 1)·g·s``;
``grad_gate = grad·(u + 1)·s·(1 + alpha·g·(1 - s))`` where ``gate < L`` (else 0),
``grad_up = grad·g·s`` where ``-L < up < L`` (else 0): torch.clamp's gradient, zero at the
bounds themselves.

``silu(g) = g·sigmoid(g)``, computed in float32 (float64 for float64) in one pass over ``h``;
with ``s = sigmoid(gate)``: ``grad_gate = grad_out·up·s·(1 + gate·(1 - s))``,
``grad_up = grad_out·gate·s``. Autograd of the compiled op:
``grad_h = swiglu_backward(grad_out, h)``.
"""

from __future__ import annotations

import torch

from .checks import _acc_dtype, _check_float, _check_same_device
from .extension import has_extension, register


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


def swiglu_backward(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[grad_gate | grad_up]`` ``[N, 2F]`` of :func:`swiglu` at ``h`` for ``grad_out [N, F]``
    (formula in the module docstring), in h's dtype, one pass."""
    if has_extension():
        return torch.ops.moe_parallel.swiglu_backward(grad_out.contiguous(), h.contiguous())
    return swiglu_backward_torch(grad_out, h)


def clamped_swiglu_backward(grad_out: torch.Tensor, h: torch.Tensor, alpha: float,
                            limit: float) -> torch.Tensor:
    """``[grad_gate | grad_up]`` ``[N, 2F]`` of :func:`clamped_swiglu` at ``h`` (module
    docstring), in h's dtype, one pass."""
    if has_extension():
        return torch.ops.moe_parallel.clamped_swiglu_backward(
            grad_out.contiguous(), h.contiguous(), float(alpha), float(limit))
    return clamped_swiglu_backward_torch(grad_out, h, alpha, limit)


def swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` ``[N, 2F]``, computed in float32 (float64
    for float64) and returned in h's dtype."""
    _check_swiglu_static(h)
    gate, up = h.to(_acc_dtype(h.dtype)).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def swiglu_backward_torch(grad_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[grad_gate | grad_up]`` of ``swiglu``, with ``s = sigmoid(gate)``:
    ``grad_gate = grad_out·up·s·(1 + gate·(1 - s))``, ``grad_up = grad_out·gate·s``."""
    _check_swiglu_backward_static(grad_out, h)
    acc = _acc_dtype(h.dtype)
    gate, up = h.to(acc).chunk(2, dim=-1)
    d = grad_out.to(acc)
    s = torch.sigmoid(gate)
    return torch.cat([d * up * s * (1 + gate * (1 - s)), d * gate * s], dim=-1).to(h.dtype)


def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's clamped SwiGLU of ``h = [gate | up]`` ``[N, 2F]`` (module docstring): ``out``
    ``[N, F]`` in h's dtype, computed in float32 (float64 for float64) in one pass."""
    if has_extension():
        return torch.ops.moe_parallel.clamped_swiglu(h.contiguous(), float(alpha), float(limit))
    return clamped_swiglu_torch(h, alpha, limit)


def clamped_swiglu_torch(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """``(clamp(up, -L, L) + 1)·g·sigmoid(alpha·g)``, ``g = min(gate, L)`` (HF GPT-OSS's
    ``_apply_gate`` on de-interleaved columns), in float32 (float64 for float64)."""
    _check_swiglu_static(h)
    gate, up = h.to(_acc_dtype(h.dtype)).chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return ((up + 1) * gate * torch.sigmoid(gate * alpha)).to(h.dtype)


def clamped_swiglu_backward_torch(grad_out: torch.Tensor, h: torch.Tensor, alpha: float,
                                  limit: float) -> torch.Tensor:
    """``[grad_gate | grad_up]`` of ``clamped_swiglu`` (module docstring)."""
    _check_swiglu_backward_static(grad_out, h)
    acc = _acc_dtype(h.dtype)
    graw, uraw = h.to(acc).chunk(2, dim=-1)
    g, u = graw.clamp(max=limit), uraw.clamp(min=-limit, max=limit)
    d = grad_out.to(acc)
    s = torch.sigmoid(alpha * g)
    dg = d * (u + 1) * s * (1 + alpha * g * (1 - s)) * (graw < limit)
    du = d * g * s * ((uraw > -limit) & (uraw < limit))
    return torch.cat([dg, du], dim=-1).to(h.dtype)


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


# ---- fake kernels and autograd of the compiled ops ----


def _swiglu_fake(h):
    _check_swiglu_static(h)
    return h.new_empty(h.shape[0], h.shape[1] // 2)


def _swiglu_backward_fake(grad_out, h):
    _check_swiglu_backward_static(grad_out, h)
    return torch.empty_like(h)


def _swiglu_setup(ctx, args, output):
    ctx.save_for_backward(args["h"])


def _swiglu_backward(ctx, grad_out):
    (h,) = ctx.saved_tensors
    return {"h": torch.ops.moe_parallel.swiglu_backward(grad_out.contiguous(), h)}


def _clamped_fake(h, alpha, limit):
    return _swiglu_fake(h)


def _clamped_backward_fake(grad_out, h, alpha, limit):
    return _swiglu_backward_fake(grad_out, h)


def _clamped_setup(ctx, args, output):
    ctx.save_for_backward(args["h"])
    ctx.alpha, ctx.limit = args["alpha"], args["limit"]


def _clamped_backward(ctx, grad_out):
    (h,) = ctx.saved_tensors
    return {"h": torch.ops.moe_parallel.clamped_swiglu_backward(grad_out.contiguous(), h,
                                                                 ctx.alpha, ctx.limit)}


register("swiglu", _swiglu_fake, _swiglu_setup, _swiglu_backward)
register("swiglu_backward", _swiglu_backward_fake)
register("clamped_swiglu", _clamped_fake, _clamped_setup, _clamped_backward)
register("clamped_swiglu_backward", _clamped_backward_fake)
