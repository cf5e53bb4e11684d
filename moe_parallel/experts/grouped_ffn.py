"""The grouped-GEMM expert FFN, whose saved tensors follow the recompute mode.

For the rows ``x [N, H]`` grouped by local expert (``group_sizes [E_local]``), optional row
weights ``w [N]`` (the routing weights, applied before the second GEMM) and optional biases:

    h  = x_e @ w1[e] (+ b1[e])                 [N, F1]   (F1 = 2F for the SwiGLUs, else F)
    a  = act(h)                                [N, F]
    y  = (w ⊙ a)_e @ w2[e] (+ w ⊙ b2[e])        [N, H]    (w ⊙ a: row i scaled by w[i])

so ``y[i] = w[i] · expert_{l(i)}(x[i])`` and a combine of such rows is an unweighted sum. The
scaling is applied where the rows are narrower: to ``a`` when ``F <= H``, else to the second
GEMM's output (``(w ⊙ a) w2 = w ⊙ (a w2)``; likewise ``dw2`` scales ``a`` or ``g``).
Backward, for ``g = dL/dy``:

    dw2[e] = (w ⊙ a)_e^T g_e                   db2[e] = Σ_{i in e} w[i] g[i]
    da_w   = g_e @ w2[e]^T                     dw[i]  = <da_w[i], a[i]> (+ <g[i], b2[e]>)
    dh     = act'(h; w ⊙ da_w)                 db1[e] = Σ_{i in e} dh[i]
    dw1[e] = x_e^T dh_e                        dx     = dh_e @ w1[e]^T

What the forward saves for that backward (``config.recompute``, Megatron-Core's recompute
modules), besides ``x``, ``w`` and the weights:

    "none":       h and a                      (nothing recomputed)
    "activation": h; a = act(h) is recomputed   (Megatron-Core ``moe_act``)
    "experts":    nothing; h = x @ w1 (+ b1) and a are recomputed (the expert part of
                  Megatron-Core ``moe``; the dispatch exchanges are not repeated)

With expert dropout (``RowDropout``: training with ``config.expert_dropout = p > 0``) the
activation becomes ``a' = ops.expert_dropout(a, row_hash, ...)`` (``a · keep / (1 - p)``, the
mask a function of each row's token hash, its global expert and the global hidden unit) and
``a'`` takes ``a``'s place in ``y``, ``dw2`` and ``dw``; ``da`` is the same op applied to
``w ⊙ da_w`` (the mask is fixed, the op its own adjoint). No mode saves the mask: the backward
regenerates it from the saved ``[N]`` row hashes (every mode keeps ``a`` or recomputes it before
the dropout, so the saved bytes below are unchanged, plus 8 bytes per row for the hashes).

Saved bytes per row, at element size s: ``s·(H + F1 + F)`` for "none", ``s·(H + F1)`` for
"activation" (ReLU: ``s·(H + F)`` for both, its gradient reads its output), ``s·H`` for "experts",
plus the row weight (``experts.memory.expert_saved_bytes``). No mode recomputes the second GEMM.
The gradients are the same in every mode: the recomputation runs the forward's own ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import ops
from ..config import MoEConfig
from ..config.choices import RECOMPUTE_MODES
from .activation import activate, activate_backward


def expert_rows(bias: Tensor, group_sizes: Tensor) -> Tensor:
    """``[N, D]``: row ``i`` holds ``bias[e]`` of the expert ``e`` that row ``i`` belongs to
    (``group_sizes [E]`` CPU int64, rows grouped by expert)."""
    sizes = group_sizes.to(bias.device)
    return bias.repeat_interleave(sizes, dim=0, output_size=int(group_sizes.sum()))


def expert_sums(rows: Tensor, group_sizes: Tensor) -> Tensor:
    """``[E, D]``: ``Σ_{i in e} rows[i]`` for each expert ``e`` (the adjoint of
    ``expert_rows``), accumulated in float32 (float64 for float64), in rows' dtype."""
    E, acc = group_sizes.shape[0], _acc(rows.dtype)
    ids = torch.arange(E, device=rows.device).repeat_interleave(
        group_sizes.to(rows.device), output_size=rows.shape[0])
    sums = rows.new_zeros(E, rows.shape[1], dtype=acc).index_add_(0, ids, rows.to(acc))
    return sums.to(rows.dtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_dots(u: Tensor, v: Tensor) -> Tensor:
    """``[N]``: ``<u[i], v[i]>`` for ``u, v [N, D]``, accumulated in float32 (float64 for
    float64), as ``N`` one-row products (``bmm``: one read of each, no ``[N, D]`` temporary).
    Lower precisions go through float32 copies in row chunks whose temporaries never exceed
    ``u``'s own bytes."""
    acc = _acc(u.dtype)
    if u.dtype == acc:
        return torch.bmm(u.unsqueeze(1), v.to(acc).unsqueeze(2)).view(-1)
    if u.shape[0] == 0:
        return u.new_zeros(0, dtype=acc)
    rows = max(1, (u.shape[0] * u.element_size()) // (2 * acc.itemsize))  # two float32 copies
    return torch.cat([torch.bmm(a.to(acc).unsqueeze(1), b.to(acc).unsqueeze(2)).view(-1)
                      for a, b in zip(u.split(rows), v.split(rows))])


def weighted(rows: Tensor, w: Optional[Tensor]) -> Tensor:
    """``w ⊙ rows`` (row ``i`` times ``w[i]``), computed at the wider of the two dtypes and
    returned in rows' dtype; ``rows`` itself when ``w`` is None."""
    if w is None:
        return rows
    return (rows * w.unsqueeze(1)).to(rows.dtype)


class RowDropout(NamedTuple):
    """The expert dropout of one call (``ops.expert_dropout``): ``row_hash [N]`` int64, each
    row's token hash (any value for padding rows); ``p`` in (0, 1); ``first_expert`` the global
    id of local expert 0; ``unit_offset`` the global index of this rank's first hidden unit
    (``etp_rank · F_local``)."""

    row_hash: Tensor
    p: float
    first_expert: int
    unit_offset: int

    def apply(self, a: Tensor, group_sizes: Tensor) -> Tensor:
        """``a · keep / (1 - p)`` for ``a [N, F]`` grouped by local expert (``group_sizes``)."""
        return ops.expert_dropout(a, self.row_hash, group_sizes, self.first_expert,
                                  self.unit_offset, self.p)


def _fc1(x: Tensor, w1: Tensor, b1: Optional[Tensor], group_sizes: Tensor, backend: str
         ) -> Tensor:
    h = ops.grouped_gemm(x, w1, group_sizes, backend=backend)
    return h if b1 is None else h + expert_rows(b1, group_sizes)


def _scales_output(w2: Tensor) -> bool:
    """Whether the row weights scale the second GEMM's output ``[N, H]`` rather than its input
    ``[N, F]`` (``w2 [E, F, H]``): the narrower of the two, ``F > H``."""
    return w2.shape[1] > w2.shape[2]


class _SecondGemm(torch.autograd.Function):
    """``y = (w ⊙ a) w2 (+ w ⊙ b2)``, keeping of the rows only what ``keep`` names:

    * ``"a"``: its input ``a``;
    * ``"h"``: ``src = h`` (which the activation before it keeps anyway); ``a = act(h)`` is
      recomputed; it returns ``da`` to the activation's own node;
    * ``"x"``: its input is ``h``, ``src = x``; ``h = x w1 (+ b1)`` and ``a`` are recomputed;
      it returns ``dh`` (the gradients of ``x``, ``w1``, ``b1`` flow through the first GEMM's
      node).
    Each node's backward frees what it saved (and its incoming gradient) before the next node's
    runs, so the peak of the backward holds one stage's tensors at a time.
    With ``drop = (p, first_expert, unit_offset)`` (``RowDropout``) the activation is dropped
    out by the rows' ``row_hash`` before it is used; what is kept is the activation before
    the dropout, whose mask the backward regenerates from ``row_hash``."""

    @staticmethod
    def forward(ctx, inp, src, w, w2, b2, w1, b1, group_sizes, config, keep, row_hash=None,
                drop=None):
        backend = config.grouped_gemm_backend
        a = activate(inp, config) if keep == "x" else inp
        if drop is not None:
            a = RowDropout(row_hash, *drop).apply(a, group_sizes)
        if w is None or not _scales_output(w2):
            y = ops.grouped_gemm(weighted(a, w), w2, group_sizes, backend=backend)
        else:  # w ⊙ (a w2), in place: the narrower row scaling
            y = ops.grouped_gemm(a, w2, group_sizes, backend=backend).mul_(w.unsqueeze(1))
        if b2 is not None:
            y = y + weighted(expert_rows(b2, group_sizes), w)
        rows = {"a": (inp, None, None), "h": (src, None, None), "x": (src, w1, b1)}[keep]
        ctx.save_for_backward(w, w2, b2, *rows, row_hash)
        ctx.group_sizes, ctx.config, ctx.keep, ctx.drop = group_sizes, config, keep, drop
        return y

    @staticmethod
    def backward(ctx, g):
        w, w2, b2, rows, w1, b1, row_hash = ctx.saved_tensors
        gs, cfg, keep = ctx.group_sizes, ctx.config, ctx.keep
        drop = None if ctx.drop is None else RowDropout(row_hash, *ctx.drop)
        backend = cfg.grouped_gemm_backend
        need_inp, _, need_w, need_w2, need_b2 = ctx.needs_input_grad[:5]
        g = g.contiguous()
        h = _fc1(rows, w1, b1, gs, backend) if keep == "x" else rows if keep == "h" else None
        a = rows if keep == "a" else activate(h, cfg)
        if drop is not None:  # the forward's mask, regenerated from the row hashes
            a = drop.apply(a, gs)
        if keep == "h":
            h = None
        grad_w2 = None
        if need_w2:  # (w ⊙ a)^T g = a^T (w ⊙ g): the narrower of the two scalings
            if w is None or not _scales_output(w2):
                grad_w2 = ops.grouped_gemm_wgrad(weighted(a, w), g, gs, backend=backend)
            else:
                grad_w2 = ops.grouped_gemm_wgrad(a, weighted(g, w), gs, backend=backend)
        grad_b2 = expert_sums(weighted(g, w), gs) if b2 is not None and need_b2 else None
        grad_in = grad_w = None
        if need_inp or need_w:
            grad_in = ops.grouped_gemm(g, w2, gs, trans_b=True, backend=backend)  # d(w ⊙ a)
            if w is not None and need_w:
                dots = row_dots(grad_in, a)
                if b2 is not None:
                    dots = dots + row_dots(g, expert_rows(b2, gs))
                grad_w = dots.to(w.dtype)
            del a
            if w is not None:  # in place: w ⊙ d(w ⊙ a), at the wider dtype, as ``weighted``
                grad_in.mul_(w.unsqueeze(1))
            if drop is not None:  # the dropout's adjoint: the same op
                grad_in = drop.apply(grad_in, gs)
            if keep == "x":
                grad_in = activate_backward(grad_in, h, cfg)
        return grad_in, None, grad_w, grad_w2, grad_b2, None, None, None, None, None, None, None


def grouped_ffn(x: Tensor, w1: Tensor, w2: Tensor, group_sizes: Tensor, config: MoEConfig,
                row_weights: Optional[Tensor] = None, b1: Optional[Tensor] = None,
                b2: Optional[Tensor] = None, recompute: Optional[str] = None,
                dropout: Optional[RowDropout] = None) -> Tensor:
    """``y [N, H]``, ``y[i] = w[i] · expert_{l(i)}(x[i])`` (module docstring) for ``x [N, H]``
    grouped by local expert, ``w1 [E, H, F1]``, ``w2 [E, F, H]``, ``group_sizes [E]`` CPU
    int64 summing to N, ``row_weights [N]`` (None: 1), biases ``b1 [E, F1]``, ``b2 [E, H]``.
    ``recompute`` (default ``config.recompute``): one of ``RECOMPUTE_MODES``, what the backward
    recomputes instead of keeping. ``dropout``: the expert dropout of the activation (module
    docstring; None: none).

    Autograd nodes, each freeing what it saved before the next one's backward runs: the first
    grouped GEMM (``ops.grouped_gemm``: keeps ``x``), the activation (``"none"`` and
    ``"activation"``: keeps ``h``; for ReLU its output) and the weighted second GEMM
    (``_SecondGemm``: keeps ``a``, or ``h``, or ``x`` and recomputes ``h`` and the activation
    itself under ``"experts"``)."""
    recompute = config.recompute if recompute is None else recompute
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if row_weights is not None and row_weights.shape != (x.shape[0],):
        raise ValueError(f"row_weights must have shape [N] = [{x.shape[0]}] (one weight per "
                         f"row of x), got {tuple(row_weights.shape)}")
    if dropout is not None and dropout.row_hash.shape != (x.shape[0],):
        raise ValueError(f"dropout.row_hash must have shape [N] = [{x.shape[0]}] (one hash per "
                         f"row of x), got {tuple(dropout.row_hash.shape)}")
    row_hash, drop = (None, None) if dropout is None else (dropout.row_hash, tuple(dropout[1:]))
    h = _fc1(x, w1, b1, group_sizes, config.grouped_gemm_backend)
    if recompute == "experts":
        return _SecondGemm.apply(h, x, row_weights, w2, b2, w1, b1, group_sizes, config, "x",
                                 row_hash, drop)
    a = activate(h, config)
    # ReLU's own node keeps its output a, as large as h: keeping h besides would add to it
    keep, src = ("a", None) if recompute == "none" or config.activation == "relu" else ("h", h)
    return _SecondGemm.apply(a, src, row_weights, w2, b2, None, None, group_sizes, config, keep,
                             row_hash, drop)
