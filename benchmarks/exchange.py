"""The timed functions of a dispatch + combine against the raw all-to-all moving the same rows.

``dispatch_combine_fns`` gives ``ours`` forward (``combine(dispatch(x, routing, pad_to))``,
identity experts, autograd recording) and forward+backward (``y.backward(grad_y)``), gradients
reset to None before each call. ``raw_alltoall_fns`` gives the bare
``torch.distributed.all_to_all_single`` calls that move the same bytes with the same splits,
outputs allocated per call: forward = counts (``E`` int64 sent, ``E_local`` per peer), rows
there (``send`` splits out, ``recv`` in) and back; forward+backward adds the two row exchanges
of the backward (the gradient of combine's and of dispatch's all-to-all).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Fns = tuple[Callable[[], object], Callable[[], object]]


def dispatch_combine_fns(dispatcher, x: torch.Tensor, probs: torch.Tensor, routing,
                         grad_y: torch.Tensor, pad_to: int = 0) -> Fns:
    """``(forward, forward+backward)`` of ``dispatcher`` on ``x`` routed by ``routing`` (whose
    ``probs`` is the leaf ``probs``), identity experts."""

    def fwd():
        x.grad = probs.grad = None
        expert_in, _, handle = dispatcher.dispatch(x, routing, pad_to)
        return dispatcher.combine(expert_in, handle)

    def fwd_bwd():
        fwd().backward(grad_y)

    return fwd, fwd_bwd


def raw_alltoall_fns(send_rows: torch.Tensor, send_counts: torch.Tensor, send: list[int],
                     recv: list[int], group) -> Fns:
    """``(forward, forward+backward)`` of the raw exchange of ``send_rows`` (``sum(send)`` rows
    of width H) over ``group``: see the module docstring."""
    hidden, experts = send_rows.shape[1], send_counts.numel()

    def rows(inp, out_splits, in_splits):
        out = inp.new_empty((sum(out_splits), hidden))
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        return out

    def fwd():
        counts = torch.empty(experts, dtype=torch.int64, device=send_counts.device)
        dist.all_to_all_single(counts, send_counts, group=group)  # E_local counts per peer
        there = rows(send_rows, recv, send)
        return rows(there, send, recv)

    def fwd_bwd():
        back = fwd()
        grad_there = rows(back, recv, send)  # backward of combine's exchange
        rows(grad_there, send, recv)         # backward of dispatch's exchange

    return fwd, fwd_bwd
