"""Expert activations on the first GEMM's output ``h``, and that GEMM's width.

    swiglu:         silu(h[:, :F]) * h[:, F:]    (h [rows, 2F] = gate | up; ``ops.swiglu``, fused)
    clamped_swiglu: (clamp(up, -L, L) + 1)·g·sigmoid(α·g), g = min(gate, L)   (GPT-OSS; fused,
                    ``ops.clamped_swiglu``; α = ``swiglu_alpha``, L = ``swiglu_limit``)
    gelu:           gelu(h) (erf form)           relu: max(h, 0)             (h [rows, F])
Every one has act(0) = 0, so zero padding rows stay zero (without expert projection biases).
``activate_backward(grad, h, config)`` is the gradient with respect to ``h`` of
``<grad, activate(h)>``, from ``h`` alone (what a recomputing backward needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..config import MoEConfig


def activate(h: Tensor, config: MoEConfig) -> Tensor:
    """Apply ``config.activation`` to the first GEMM's output ``h`` ([rows, F] or [rows, 2F])."""
    activation = config.activation
    if activation == "swiglu":
        return ops.swiglu(h)
    if activation == "clamped_swiglu":
        return ops.clamped_swiglu(h, config.swiglu_alpha, config.swiglu_limit)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError("activation must be one of ('swiglu', 'clamped_swiglu', 'gelu', 'relu'), "
                     f"got {activation!r}")


def activate_backward(grad: Tensor, h: Tensor, config: MoEConfig) -> Tensor:
    """``d<grad, activate(h)>/dh``: the gradient of the first GEMM's output ``h`` given the
    activation's output gradient ``grad`` ([rows, F]); the same values autograd gives
    ``activate`` (the fused SwiGLU backward ops; aten's GELU / threshold backward)."""
    activation = config.activation
    if activation == "swiglu":
        return ops.swiglu_backward(grad, h)
    if activation == "clamped_swiglu":
        return ops.clamped_swiglu_backward(grad, h, config.swiglu_alpha, config.swiglu_limit)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    raise ValueError("activation must be one of ('swiglu', 'clamped_swiglu', 'gelu', 'relu'), "
                     f"got {activation!r}")


def fc1_width(config: MoEConfig, ffn_size: int) -> int:
    """Output width of the first expert GEMM: ``2·ffn_size`` for SwiGLU (gate | up), else
    ``ffn_size``."""
    return 2 * ffn_size if config.gated else ffn_size
