"""Dropless block-sparse expert FFN (MegaBlocks-style): pad → SDD → activation → DSD → unpad.

For the local experts' rows ``x [N, H]`` grouped by expert with counts ``c_e`` and block size
``B`` (which divides the ffn size ``F``):
    p_e = ceil(c_e / B) · B                   padded rows of expert e (p_e - c_e <= B - 1)
    x_pad [Σ p_e, H]                          expert e's rows at padded_offsets[e] .., then zeros
    blocks = bsr_sdd(x_pad, w1, topology(w1 columns / B))
             the nonzero [B, B] blocks of x_pad @ blockdiag(w1[0], .., w1[E-1])
    a = act(blocks)                           SwiGLU: silu(gate block j) * up block j, where each
                                              row block lists gate blocks 0..n-1 then up blocks
                                              n..2n-1 (n = F / B; w1 columns are gate | up)
    y_pad = bsr_dsd(a, w2, topology(F / B))
    y = y_pad[real rows]                      [N, H]
With projection biases ``b1 [E, F1]``, ``b2 [E, H]`` (GPT-OSS), each block of the first product
adds its expert's ``b1`` columns and each real output row its expert's ``b2``. With row weights
``w [N]`` (the routing weights) each row's activation is scaled by its weight before the second
product (and its ``b2`` by the same weight): ``y[i] = w[i] · expert(x[i])``.
With expert dropout (``dropout``, a ``grouped_ffn.RowDropout``) the activation blocks are
dropped out before the weighting, as ``ops.expert_dropout`` on the padded rows in row layout
(``[Σ p_e, F]``, expert e's group ``p_e`` rows, the padding rows' hashes 0): the mask of a real
row depends only on its hash, its expert and the unit, so it equals the grouped FFN's.
Padding rows are zero in ``x_pad``, never reach ``y`` and receive no gradient (``y`` gathers
only the real rows), so the weight gradients are those of the real rows. Per call at most
``E·(B - 1)`` padding rows are added.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import MoEConfig
from .activation import activate
from .grouped_ffn import RowDropout, expert_rows, weighted

DEFAULT_BLOCK_SIZE = {"cuda": 128, "cpu": 32}


def resolve_block_size(block_size: Optional[int], ffn_size: int, device: torch.device) -> int:
    """The block size for experts with ``ffn_size`` local hidden units on ``device``.

    ``None``: ``DEFAULT_BLOCK_SIZE`` of the device type (128 on CUDA, 32 elsewhere), halved
    until it divides ``ffn_size``. An explicit ``block_size`` must divide ``ffn_size``.
    """
    if block_size is None:
        b = DEFAULT_BLOCK_SIZE.get(torch.device(device).type, DEFAULT_BLOCK_SIZE["cpu"])
        while ffn_size % b:
            b //= 2
        return b
    if block_size <= 0 or ffn_size % block_size:
        raise ValueError(
            f"block_size ({block_size}) must be a positive divisor of the experts' local ffn "
            f"size ({ffn_size} = ffn_hidden_size / expert_tensor_parallel_size)"
        )
    return block_size


def padded_rows(group_sizes: Tensor, block_size: int) -> int:
    """``Σ_e ceil(c_e / B) · B``: the rows of ``x_pad`` for counts ``group_sizes``."""
    return int(((group_sizes + block_size - 1) // block_size).sum()) * block_size


def _row_maps(group_sizes: Tensor, padded_offsets: Tensor, device: torch.device
              ) -> tuple[Tensor, Tensor]:
    """``(pad_map [M_pad, 1], real_map [N, 1])``: the real row held by each row of ``x_pad``
    (-1 for padding rows), and the row of ``x_pad`` holding each real row
    (``padded_offsets[e] + i`` for the ``i``-th row of expert ``e``)."""
    offsets = torch.cumsum(group_sizes, 0) - group_sizes
    shift = torch.repeat_interleave(padded_offsets[:-1] - offsets, group_sizes)
    real = torch.arange(shift.numel(), dtype=torch.int64) + shift
    pad_map = torch.full((int(padded_offsets[-1]), 1), -1, dtype=torch.int64)
    pad_map[real, 0] = torch.arange(real.numel(), dtype=torch.int64)
    return pad_map.to(device), real.view(-1, 1).to(device)


def _activate_blocks(blocks: Tensor, config: MoEConfig, n_blocks: int, block_size: int
                     ) -> Tensor:
    """The activation on the first product's blocks, returned in the second product's layout."""
    b = block_size
    if config.gated:
        gate, up = blocks.view(-1, 2, n_blocks, b, b).unbind(1)
        if config.activation == "clamped_swiglu":
            alpha, limit = config.swiglu_alpha, config.swiglu_limit
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
            return ((up + 1) * gate * torch.sigmoid(alpha * gate)).reshape(-1, b, b)
        return (F.silu(gate) * up).reshape(-1, b, b)
    return activate(blocks, config)


def _drop_blocks(a: Tensor, dropout: RowDropout, padded_sizes: Tensor, n_blocks: int,
                 block_size: int) -> Tensor:
    """``dropout`` on the activation blocks ``a [R·n, B, B]`` (row block r holds column blocks
    r·n .. r·n + n - 1) of the padded rows grouped by ``padded_sizes``, whose hashes
    ``dropout.row_hash`` ``[R·B]`` are; the same layout back."""
    b, n = block_size, n_blocks
    R = a.shape[0] // n
    rows = a.view(R, n, b, b).transpose(1, 2).reshape(R * b, n * b)
    out = dropout.apply(rows, padded_sizes)
    return out.view(R, b, n, b).transpose(1, 2).reshape(R * n, b, b)


def block_sparse_ffn(
    x: Tensor, w1: Tensor, w2: Tensor, group_sizes: Tensor, block_size: int, config: MoEConfig,
    b1: Optional[Tensor] = None, b2: Optional[Tensor] = None,
    row_weights: Optional[Tensor] = None, recompute: str = "none",
    dropout: Optional[RowDropout] = None,
) -> tuple[Tensor, int]:
    """``y [N, H]`` of the experts (see the module docstring) and the padded row count.

    ``x [N, H]`` grouped by expert; ``w1 [E, H, F1]`` (``F1 = 2F`` for the SwiGLUs, else
    ``F``); ``w2 [E, F, H]``; optional biases ``b1 [E, F1]``, ``b2 [E, H]``; ``group_sizes
    [E]`` CPU int64 summing to ``N``; ``F % block_size == 0``. ``row_weights [N]`` (None: 1)
    scales row ``i``'s activation before the second product (its output when ``F > H``, the
    narrower rows), so ``y[i] = w[i]·expert(x[i])``.
    ``recompute="activation"``: the activation and the second product run under
    ``torch.utils.checkpoint`` (their input blocks are kept, the activation is recomputed, and
    with it the second product); ``"experts"`` is the caller's (``GroupedExperts``).
    ``dropout``: the expert dropout of the activation (``row_hash [N]`` of the real rows; module
    docstring), None: none.
    """
    b = block_size
    ffn = w2.shape[1]
    if ffn % b or w1.shape[2] % b:
        raise ValueError(f"block_size ({b}) must divide the ffn size ({ffn})")
    group_sizes = group_sizes.to("cpu", torch.int64)
    n1, n2 = w1.shape[2] // b, ffn // b
    padded_offsets, block_row, block_col, _, _, _ = ops.block_topology(group_sizes, b, n1)
    _, _, block_col2, row_ptr2, _, _ = ops.block_topology(group_sizes, b, n2)
    num_padded = int(padded_offsets[-1])
    scale_output = row_weights is not None and ffn > w2.shape[2]  # the narrower rows: [N, H]
    w_pad = None if scale_output else row_weights
    if num_padded == x.shape[0]:  # every count a multiple of B: x is already x_pad
        real_map, x_pad = None, x
    else:  # row gathers (unpermute with one term per row, -1: a zero row), both directions
        pad_map, real_map = _row_maps(group_sizes, padded_offsets, x.device)
        x_pad = ops.unpermute(x, pad_map, validate=False)  # maps built in range above
        if w_pad is not None:  # padding rows weigh 0
            w_pad = ops.unpermute(w_pad.view(-1, 1), pad_map, validate=False).view(-1)
    if dropout is not None:  # the padded rows' hashes (padding rows: 0) and group sizes
        if dropout.row_hash.shape != (x.shape[0],):
            raise ValueError(f"dropout.row_hash must have shape [N] = [{x.shape[0]}], got "
                             f"{tuple(dropout.row_hash.shape)}")
        hashes = dropout.row_hash if real_map is None else torch.zeros(
            num_padded, dtype=dropout.row_hash.dtype, device=x.device).index_copy_(
                0, real_map.view(-1), dropout.row_hash)
        dropout = dropout._replace(row_hash=hashes)
        padded_sizes = padded_offsets[1:] - padded_offsets[:-1]
    blocks = ops.bsr_sdd(x_pad, w1, block_row, block_col, b)
    if b1 is not None:  # block k holds columns of global column block block_col[k]
        blocks = blocks + b1.reshape(-1, b)[block_col.to(blocks.device)].unsqueeze(1)

    def second(blocks: Tensor, w_pad: Optional[Tensor]) -> Tensor:
        a = _activate_blocks(blocks, config, n2, b)
        if dropout is not None:
            a = _drop_blocks(a, dropout, padded_sizes, n2, b)
        if w_pad is not None:  # row block r holds blocks r·n2 .. r·n2 + n2 - 1
            a = (a.view(-1, n2, b, b) * w_pad.view(-1, 1, b, 1)).to(a.dtype).view(-1, b, b)
        return ops.bsr_dsd(a, w2, row_ptr2, block_col2, num_padded)

    if recompute == "activation":
        y_pad = checkpoint(second, blocks, w_pad, use_reentrant=False, preserve_rng_state=False)
    else:
        y_pad = second(blocks, w_pad)
    y = y_pad if real_map is None else ops.unpermute(y_pad, real_map, validate=False)
    if b2 is not None:
        y = y + (expert_rows(b2, group_sizes) if scale_output
                 else weighted(expert_rows(b2, group_sizes), row_weights))
    if scale_output:
        y = weighted(y, row_weights)
    return y, num_padded
