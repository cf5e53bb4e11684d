"""One forward and backward of an ``MoELayer``, with everything the equivalence tests compare."""

from __future__ import annotations

import torch

from moe_parallel import MoELayer


def forward_backward(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor):
    """``(y, x.grad, {name: param.grad}, tokens_per_expert, dropped)`` of ``layer(x)`` with the
    output gradient ``gy`` (gradients zeroed first; ``x`` is not modified)."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y, aux = layer(x, return_aux=True)
    y.backward(gy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads, aux.stats.tokens_per_expert, aux.stats.dropped
