"""Expert dropout whose mask is a pure function of where an element is, not of the process's RNG:
``expert_dropout(a, row_hash, group_sizes, first_expert, unit_offset, p) -> out``.

``a [N, F]`` holds the experts' hidden activations, rows grouped by local expert
(``group_sizes [G]``, CPU int64, summing to ``N``): row ``r`` of group ``g`` belongs to global
expert ``e = first_expert + g``, column ``j`` is global hidden unit ``unit_offset + j``, and
``u = row_hash[r] mod 2^32`` names the row's token. With uint32 arithmetic (wrapping mod 2^32)::

    mix32(x)      = x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
    row_key(u, e) = mix32(u ^ mix32(e * 0x9E3779B9 + 0x7F4A7C15))
    bits(u, e, j) = mix32(row_key(u, e) + j * 0x85EBCA77)
    keep[r, j]    = bits(u, e, unit_offset + j) >= floor(p * 2^32)
    out[r, j]     = a[r, j] * s  if keep[r, j]  else 0,      s = 1 / (1 - p)

``s`` is rounded to the math type (float32; float64 for float64) and the product is computed
there and rounded once to ``a``'s dtype: the compiled op (CPU and CUDA) and the twin give
bitwise-equal results. Each element is dropped with probability ``floor(p·2^32) / 2^32``
(``p`` up to 2^-32). The mask does not depend on the rows' order, their padding, the device,
the threads, or which rank holds the expert or which slice of its hidden units (``unit_offset``
is the ETP rank's first unit): so a model split any way draws the same mask. The op is its own
adjoint: ``grad_a = expert_dropout(grad_out, row_hash, ...)``.

The row hash of a token comes from ``token_hash(stream_key(seed, step, layer), seq_id,
position)``: ``stream_key`` (host integers) folds the seed, the training step and the layer
index into 32 bits, ``token_hash`` (int64 torch ops) folds in the token's key::

    stream_key(seed, step, layer):
        k = mix32(lo(layer) ^ 0x6A09E667)
        k = mix32(k + lo(step));   k = mix32(k ^ hi(step))
        k = mix32(k + lo(seed));   k = mix32(k ^ hi(seed))
    token_hash(k, s, q):                                   (s = seq_id, q = position)
        h = mix32(k ^ lo(s));      h = mix32(h + hi(s))
        h = mix32(h ^ lo(q));      h = mix32(h + hi(q))

with ``lo(v) = v mod 2^32``, ``hi(v) = (v >> 32) mod 2^32`` (two's complement for negative ids).
The twins compute every uint32 product with int64 torch ops split into 16-bit halves, so no
intermediate reaches 2^63 (no signed overflow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

from .checks import (
    IntList,
    _as_index_tensor,
    _check_float,
    _check_group_sizes_values,
    _check_host_index,
    _check_index,
    _check_same_device,
)
from .extension import has_extension, register

M32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x21F0AAAD, 0x735A2D97
_EXPERT_MUL, _EXPERT_ADD = 0x9E3779B9, 0x7F4A7C15
_UNIT_MUL = 0x85EBCA77
_LAYER_SALT = 0x6A09E667

IntOrTensor = Union[int, torch.Tensor]


# ---- the hash: host integers and int64 tensors ----


def mix32(x: int) -> int:
    """``mix32`` of the module docstring on a host integer in ``[0, 2^32)``."""
    x &= M32
    x ^= x >> 16
    x = (x * _MIX1) & M32
    x ^= x >> 15
    x = (x * _MIX2) & M32
    x ^= x >> 15
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x · c mod 2^32`` for int64 ``x`` in ``[0, 2^32)`` and ``c < 2^32``: the 16-bit halves of
    ``x`` times ``c`` (each product < 2^48)."""
    lo, hi = x & 0xFFFF, x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & M32


def mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 tensor of values in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 15)


def stream_key(seed: int, step: int, layer: int) -> int:
    """The 32-bit key of one layer's dropout at one training step (module docstring); host
    integers ``seed``, ``step`` (any int, taken mod 2^64) and ``layer`` (taken mod 2^32)."""
    seed, step, layer = (int(v) & 0xFFFFFFFFFFFFFFFF for v in (seed, step, layer))
    k = mix32((layer & M32) ^ _LAYER_SALT)
    k = mix32(k + (step & M32))
    k = mix32(k ^ (step >> 32))
    k = mix32(k + (seed & M32))
    return mix32(k ^ (seed >> 32))


def token_hash(key: IntOrTensor, seq_id: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``[T]`` int64 in ``[0, 2^32)``: the row hash ``u`` of each token (module docstring) from
    a ``stream_key`` (a host int or a 0-dim int64 tensor) and the tokens' integer keys
    ``seq_id``, ``position`` (same shape ``[T]``)."""
    if isinstance(key, torch.Tensor):
        key = key.to(torch.int64)
    s, q = seq_id.to(torch.int64), position.to(torch.int64)
    h = mix32_torch((s & M32) ^ key)
    h = mix32_torch((h + ((s >> 32) & M32)) & M32)
    h = mix32_torch(h ^ (q & M32))
    return mix32_torch((h + ((q >> 32) & M32)) & M32)


def dropout_threshold(p: float) -> int:
    """``floor(p · 2^32)``: a unit is kept when its 32 bits are at least this."""
    return int(float(p) * 2.0**32)


def expert_dropout_keep_torch(row_hash: torch.Tensor, group_sizes: IntList, first_expert: int,
                              unit_offset: int, num_units: int, p: float) -> torch.Tensor:
    """``keep [N, num_units]`` bool of the module docstring (the twin's mask)."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    dev = row_hash.device
    G = group_sizes.shape[0]
    experts = first_expert + torch.repeat_interleave(
        torch.arange(G, dtype=torch.int64), group_sizes).to(dev)
    e_key = mix32_torch((_mul32(experts, _EXPERT_MUL) + _EXPERT_ADD) & M32)
    key = mix32_torch((row_hash.to(torch.int64) & M32) ^ e_key)
    units = unit_offset + torch.arange(num_units, dtype=torch.int64, device=dev)
    bits = mix32_torch((key.unsqueeze(1) + _mul32(units, _UNIT_MUL).unsqueeze(0)) & M32)
    return bits >= dropout_threshold(p)


# ---- public function and twin ----


def expert_dropout(a: torch.Tensor, row_hash: torch.Tensor, group_sizes: IntList,
                   first_expert: int, unit_offset: int, p: float) -> torch.Tensor:
    """Inverted dropout of the experts' activation ``a [N, F]`` with the position-keyed mask of
    the module docstring: ``out = a · keep / (1 - p)``, ``keep`` a function of
    ``(row_hash[r] mod 2^32, first_expert + g(r), unit_offset + j)`` only. ``row_hash [N]``
    int64 on ``a``'s device; ``group_sizes [G]`` CPU int64 (or ints) summing to ``N``;
    ``first_expert + G <= 2^32``, ``unit_offset + F <= 2^32``; ``0 <= p < 1``. Gradient: the
    same op on the output gradient (the mask is fixed)."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    if has_extension():
        return torch.ops.moe_parallel.expert_dropout(
            a.contiguous(), row_hash.contiguous(), group_sizes.contiguous(), int(first_expert),
            int(unit_offset), float(p))
    return expert_dropout_torch(a, row_hash, group_sizes, first_expert, unit_offset, p)


def expert_dropout_torch(a: torch.Tensor, row_hash: torch.Tensor, group_sizes: IntList,
                         first_expert: int, unit_offset: int, p: float) -> torch.Tensor:
    """Twin of :func:`expert_dropout` in plain (differentiable) torch ops, bitwise equal to it:
    ``where(keep, (a·s) in a's dtype, 0)`` with the product in float32 (float64 for float64)."""
    group_sizes = _as_index_tensor(group_sizes, "group_sizes")
    _check_expert_dropout_static(a, row_hash, group_sizes, first_expert, unit_offset, p)
    _check_group_sizes_values(group_sizes, a.shape[0], "group_sizes", "a.size(0)")
    keep = expert_dropout_keep_torch(row_hash, group_sizes, first_expert, unit_offset,
                                     a.shape[1], p)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0 / (1.0 - float(p)), dtype=acc, device=a.device)
    scaled = (a.to(acc) * scale).to(a.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=a.dtype, device=a.device))


# ---- argument checks ----


def _check_expert_dropout_static(a: torch.Tensor, row_hash: torch.Tensor,
                                 group_sizes: torch.Tensor, first_expert: int, unit_offset: int,
                                 p: float) -> None:
    _check_float(a, "a", 2)
    _check_index(row_hash, "row_hash", 1)
    _check_same_device(row_hash, "row_hash", a, "a")
    if row_hash.shape[0] != a.shape[0]:
        raise ValueError(f"row_hash must have a.size(0) = {a.shape[0]} entries (one per row), "
                         f"got {row_hash.shape[0]}")
    _check_host_index(group_sizes, "group_sizes")
    if not 0 <= first_expert or first_expert + group_sizes.shape[0] > 2**32:
        raise ValueError(f"first_expert must be >= 0 with first_expert + G <= 2^32 (G = "
                         f"{group_sizes.shape[0]} groups), got {first_expert}")
    if not 0 <= unit_offset or unit_offset + a.shape[1] > 2**32:
        raise ValueError(f"unit_offset must be >= 0 with unit_offset + F <= 2^32 (F = "
                         f"{a.shape[1]} columns), got {unit_offset}")
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p < 1):
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")


# ---- fake kernel and autograd of the compiled op ----


def _expert_dropout_fake(a, row_hash, group_sizes, first_expert, unit_offset, p):
    _check_expert_dropout_static(a, row_hash, group_sizes, first_expert, unit_offset, p)
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _expert_dropout_setup(ctx, args, output):
    ctx.save_for_backward(args["row_hash"], args["group_sizes"])
    ctx.first_expert, ctx.unit_offset, ctx.p = (args["first_expert"], args["unit_offset"],
                                                args["p"])


def _expert_dropout_backward(ctx, grad_out):
    row_hash, group_sizes = ctx.saved_tensors
    return {"a": torch.ops.moe_parallel.expert_dropout(
        grad_out.contiguous(), row_hash, group_sizes, ctx.first_expert, ctx.unit_offset, ctx.p)}


if has_extension():
    register("expert_dropout", _expert_dropout_fake, _expert_dropout_setup,
             _expert_dropout_backward)

__all__: Sequence[str] = (
    "expert_dropout",
    "expert_dropout_keep_torch",
    "expert_dropout_torch",
    "mix32",
    "mix32_torch",
    "stream_key",
    "token_hash",
)
