"""Where a rank's local tensor sits in the global tensor of the full model (DCP chunk metadata).

Routed experts are the only sharded state. ``GroupedExperts`` of EP rank ``p`` and ETP rank ``q``
(``El = E/ep`` experts from ``e0 = p·El``, ``Fl = F/etp`` hidden units from ``f0 = q·Fl``) holds:

    w2 local [El, Fl, H]   = global w2 [E, F, H][e0:e0+El, f0:f0+Fl, :]        one chunk
    w1 local [El, H, Fl]   = global w1 [E, H, F][e0:e0+El, :, f0:f0+Fl]        one chunk
    w1 local [El, H, 2Fl]  (SwiGLU, gate | up) = two chunks of global w1 [E, H, 2F]:
        local [:, :, 0:Fl]   -> global [e0:e0+El, :, f0:f0+Fl]
        local [:, :, Fl:2Fl] -> global [e0:e0+El, :, F+f0:F+f0+Fl]
    b1 local [El, (2)F], b2 local [El, H] (``expert_proj_bias``, no ETP) = rows e0..e0+El

``GlobalLayout.annotate`` returns an alias of the local tensor (same storage) carrying DCP's
``CheckpointableTensor`` fields (``global_shape``, ``global_offsets``, ``local_offsets``,
``local_sizes``), so ``torch.distributed.checkpoint`` writes each chunk at its global offsets
(EDP replicas of a chunk are written once) and, on load, reads into each chunk the part of the
saved global tensor it covers, whatever layout wrote it. Every other tensor is replicated: it
is saved whole, once (a DTensor, e.g. a dense parameter FSDP2 shards over DP, as DCP writes
DTensors: each shard at its offsets).

Sharded over EDP (FSDP2, ``distributed.shard_model``) the routed-expert tensor is a DTensor
whose global tensor is the EP/ETP-local one above, and this rank holds the box ``[o, o + n)``
of it (``Shard`` placements, torch.chunk's split). ``GlobalLayout.shard`` composes the two:
each chunk clipped to the box,

    global_offset += max(local_offset, o) - local_offset,   local_offset = max(local_offset, o) - o,
    size = min(local_offset + size, o + n) - max(local_offset, o)     (per dimension; empty: none)

and ``annotate_shard`` annotates the DTensor's local tensor with it (``shard_spec`` keeps the
DTensor's mesh and placements, so ``as_dtensor`` turns a tensor read for it back into one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..experts import GroupedExperts

__all__ = ["Chunk", "GlobalLayout", "as_dtensor", "blank_like", "expert_layouts",
           "sharded_layouts"]

_CHUNK_FIELDS = ("global_shape", "global_offsets", "local_offsets", "local_sizes", "shard_spec")


@dataclass(frozen=True)
class Chunk:
    """``local[local_offset : local_offset + size] = global[global_offset : ... + size]``."""

    global_offset: tuple[int, ...]
    local_offset: tuple[int, ...]
    size: tuple[int, ...]


@dataclass(frozen=True)
class GlobalLayout:
    """A local tensor of ``local_shape`` as ``chunks`` of a global tensor of ``shape``."""

    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    def annotate(self, local: Tensor) -> Tensor:
        """An alias of ``local`` (shared storage, so a load writes into it) with DCP's chunk
        metadata; ``ValueError`` when ``local`` does not have ``local_shape``."""
        if tuple(local.shape) != self.local_shape:
            raise ValueError(f"tensor of shape {tuple(local.shape)} does not match its layout's "
                             f"local shape {self.local_shape}")
        alias = local.detach().view(local.shape)
        alias.global_shape = self.shape
        alias.global_offsets = tuple(c.global_offset for c in self.chunks)
        alias.local_offsets = tuple(c.local_offset for c in self.chunks)
        alias.local_sizes = tuple(c.size for c in self.chunks)
        return alias

    def shard(self, offset: tuple[int, ...], shape: tuple[int, ...]) -> GlobalLayout:
        """The layout of the box ``[offset, offset + shape)`` of the local tensor (module
        docstring): each chunk clipped to it, in the box's coordinates."""
        chunks = []
        for c in self.chunks:
            lo = tuple(max(lc, o) for lc, o in zip(c.local_offset, offset))
            hi = tuple(min(lc + n, o + m)
                       for lc, n, o, m in zip(c.local_offset, c.size, offset, shape))
            if all(h > low for h, low in zip(hi, lo)):
                chunks.append(Chunk(
                    tuple(g + low - lc for g, low, lc in zip(c.global_offset, lo, c.local_offset)),
                    tuple(low - o for low, o in zip(lo, offset)),
                    tuple(h - low for h, low in zip(hi, lo))))
        return GlobalLayout(self.shape, tuple(shape), tuple(chunks))

    def annotate_shard(self, tensor: DTensor) -> Tensor:
        """An alias of the local tensor of ``tensor`` (a DTensor over this layout's local
        tensor, e.g. FSDP2's over EDP) with the chunk metadata of its box (``shard``) and its
        ``shard_spec`` (mesh, placements, shape, stride: ``as_dtensor``)."""
        if tuple(tensor.shape) != self.local_shape:
            raise ValueError(f"DTensor of shape {tuple(tensor.shape)} does not match its "
                             f"layout's local shape {self.local_shape}")
        local = tensor.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            tensor.shape, tensor.device_mesh, tensor.placements)
        alias = self.shard(tuple(offset), tuple(shape)).annotate(local)
        alias.shard_spec = (tensor.device_mesh, tuple(tensor.placements), tensor.shape,
                            tensor.stride())
        return alias


def as_dtensor(tensor: Tensor) -> Tensor:
    """``tensor`` as the DTensor ``annotate_shard`` took it from (its ``shard_spec``), sharing
    its storage; ``tensor`` itself when it has none."""
    spec = getattr(tensor, "shard_spec", None)
    if spec is None:
        return tensor
    mesh, placements, shape, stride = spec
    return DTensor.from_local(tensor, mesh, placements, run_check=False, shape=shape,
                              stride=stride)


def blank_like(tensor: Tensor) -> Tensor:
    """A new uninitialised tensor like ``tensor`` (a DTensor stays one) carrying the chunk
    metadata (and ``shard_spec``) ``GlobalLayout.annotate`` or ``annotate_shard`` gave it, if
    any: a load reads into it the same chunks."""
    blank = torch.empty_like(tensor.detach())
    for name in _CHUNK_FIELDS:
        if hasattr(tensor, name):
            setattr(blank, name, getattr(tensor, name))
    return blank


def expert_layouts(experts: GroupedExperts) -> dict[str, GlobalLayout]:
    """The layouts of ``experts.w1`` and ``experts.w2`` (module docstring)."""
    cfg = experts.config
    E, H, F = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size
    El, Fl, e0 = experts.num_local_experts, experts.ffn_size, experts.first_expert
    f0 = experts.etp_rank * Fl
    w2 = GlobalLayout((E, F, H), (El, Fl, H), (Chunk((e0, f0, 0), (0, 0, 0), (El, Fl, H)),))
    if cfg.gated:
        halves = tuple(Chunk((e0, 0, base + f0), (0, 0, i * Fl), (El, H, Fl))
                       for i, base in enumerate((0, F)))
        w1 = GlobalLayout((E, H, 2 * F), (El, H, 2 * Fl), halves)
    else:
        w1 = GlobalLayout((E, H, F), (El, H, Fl), (Chunk((e0, 0, f0), (0, 0, 0), (El, H, Fl)),))
    layouts = {"w1": w1, "w2": w2}
    for name in ("b1", "b2"):  # whole rows of experts (expert projection biases: etp = 1)
        bias = getattr(experts, name, None)
        if bias is not None:
            D = bias.shape[1]
            layouts[name] = GlobalLayout((E, D), (El, D), (Chunk((e0, 0), (0, 0), (El, D)),))
    return layouts


def sharded_layouts(model: nn.Module, strict: bool = True) -> dict[int, GlobalLayout]:
    """``id(parameter) -> layout`` for every routed-expert weight of ``model``.

    ``strict`` (a multi-process job): ``ValueError`` for an expert-parallel parameter
    (``expert_parallel`` tag) that is not a ``GroupedExperts`` weight: its global layout is
    unknown, and saving it whole under its name would let every rank's shard overwrite the
    others'. In one process such a parameter is the whole tensor and is saved as it is.
    """
    layouts: dict[int, GlobalLayout] = {}
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            for name, layout in expert_layouts(module).items():
                layouts[id(getattr(module, name))] = layout
    for name, p in model.named_parameters():
        if strict and getattr(p, "expert_parallel", False) and id(p) not in layouts:
            raise ValueError(
                f"parameter {name} is tagged expert_parallel but is not a GroupedExperts weight: "
                "its place in the global expert tensor is unknown, so it cannot be checkpointed "
                "across layouts"
            )
    return layouts
