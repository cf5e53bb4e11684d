"""Fake (meta) kernels and autograd formulas of the compiled moe_parallel ops.

``register()`` is called once by ``moe_parallel.ops`` when the extension is loaded.
"""

from __future__ import annotations

import torch

from .op_checks import (
    _check_grouped_gemm_static,
    _check_grouped_gemm_wgrad_static,
    _check_permute_static,
    _check_sort_chunks_static,
    _check_unpermute_backward_static,
    _check_unpermute_static,
)

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


def register() -> None:
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


