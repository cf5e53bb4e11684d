"""Gradient synchronisation and global gradient-norm clipping across the dense and expert grids.

Convention (Megatron-Core's): every rank's loss is the mean over the tokens of its dense
data-parallel shard (identical on the TP ranks of that shard); the target gradient is that of
the mean of those losses over the ``R = dp·cp`` shards. Parameters say how they are held through
the attributes set by ``MoELayer`` (untagged parameters are dense and replicated):

* ``sync_group == "edp"`` (routed experts, ``expert_parallel``): each EP/ETP rank holds a shard;
  its gradient already sums the contributions of every token of the EP group, so it is summed
  over EDP only, then divided by ``R``.
* ``sync_group == "dp"`` (everything else): summed over DP×CP, divided by ``R``; parameters with
  ``sequence_parallel`` (router and shared experts when TP ranks bring distinct tokens) are also
  summed over TP, since each TP rank saw only its part of the tokens.

Gradients are flattened into buckets of at most ``bucket_mb`` per (group, dtype): one
all-reduce per bucket.

Parameters sharded by FSDP2 (``DTensor``; ``sharding.shard_model``) have their gradients
reduced by FSDP during the backward, with the same result on their shard; ``sync_gradients``
skips them, and the norm counts each shard once over its mesh.

Frozen parameters (``requires_grad=False``) are left out everywhere: no all-reduce carries
them, the norm does not count them and clipping does not scale them, even when they still hold
a gradient from before they were frozen. Every rank must freeze alike (the buckets, hence the
all-reduces, follow from it): ``sync_gradients`` checks that over the pipeline stage at its
first call and whenever the freezing changes (``freezing.ensure_same_freezing``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from .freezing import ensure_same_freezing
from .parallel_state import ParallelState


def is_expert_param(p: Tensor) -> bool:
    """True for parameters sharded over the expert grid (synced over EDP)."""
    return getattr(p, "sync_group", "dp") == "edp"


def _params_with_grad(params: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    """The trainable parameters (``requires_grad``) that hold a gradient."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return [p for p in params if p.requires_grad and p.grad is not None]


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: its local shard for a DTensor, ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_groups(t: Tensor) -> tuple:
    """The process groups over which ``t`` (a DTensor) is sharded, one per mesh dimension with
    a ``Shard`` placement; ``()`` for a plain tensor or a replicated DTensor."""
    if not isinstance(t, DTensor):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(t.placements) if pl.is_shard())


def _buckets(grads: list[Tensor], bucket_bytes: int) -> Iterable[list[Tensor]]:
    """Consecutive runs of ``grads`` of at most ``bucket_bytes`` (a larger tensor stands alone)."""
    bucket: list[Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def _allreduce_bucketed(grads: list[Tensor], group, bucket_bytes: int) -> None:
    """Sum ``grads`` in place over ``group`` with one all-reduce per flat bucket."""
    if group is None or dist.get_world_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        for bucket in _buckets(same, bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)


def sync_gradients(params: Iterable[Tensor] | nn.Module, ps: ParallelState, *,
                   average: bool = True, bucket_mb: float = 25.0, dense: bool = True) -> None:
    """Make every gradient the gradient of the global loss (see the module docstring).

    ``params``: a module or an iterable of parameters (those without a gradient, and frozen
    ones, ``requires_grad=False``, are skipped; every rank must freeze alike: checked over the
    pipeline stage at the first call and whenever the freezing changes, a ``ValueError`` on
    every rank naming each rank's frozen parameters otherwise).
    Expert parameters (``sync_group == "edp"``) are summed over EDP, the others over DP×CP, and
    ``sequence_parallel`` ones also over TP; then expert and dense gradients are divided by
    ``R = dp·cp``. ``average=False`` skips that division (for losses already normalised by the
    global token count). Gradients travel in flattened buckets of at most ``bucket_mb`` MiB per
    group and dtype. A collective over those groups: call it on every rank, once after
    backward and before the optimizer step (in place of DDP's gradient all-reduce).
    Parameters that FSDP2 shards (``DTensor``, e.g. by ``shard_model``) are skipped: FSDP
    reduced their gradients in the backward.
    ``dense=False`` leaves the DP×CP reduction of the dense gradients to the DDP of
    ``wrap_ddp`` (which averages them during the backward) and does the rest: experts over
    EDP, sequence-parallel parameters over TP.
    """
    params = params if isinstance(params, nn.Module) else list(params)
    ensure_same_freezing(params, ps)
    # FSDP2's parameters (DTensor) were reduced by FSDP in the backward
    params = [p for p in _params_with_grad(params) if not isinstance(p, DTensor)]
    bucket_bytes = int(bucket_mb * 2**20)
    expert = [p.grad for p in params if is_expert_param(p)]
    dense_grads = [p.grad for p in params if not is_expert_param(p)] if dense else []
    seq_parallel = [p.grad for p in params
                    if not is_expert_param(p) and getattr(p, "sequence_parallel", False)]
    _allreduce_bucketed(expert, ps.group("edp"), bucket_bytes)
    _allreduce_bucketed(dense_grads, ps.group("dp_cp"), bucket_bytes)
    _allreduce_bucketed(seq_parallel, ps.group("tp"), bucket_bytes)
    if average and ps.dp * ps.cp > 1:
        scale = 1.0 / (ps.dp * ps.cp)
        for g in expert + dense_grads:
            g.mul_(scale)


def global_grad_norm(params: Iterable[Tensor] | nn.Module, ps: ParallelState,
                     norm_type: float = 2.0) -> Tensor:
    """The norm over every trainable parameter of the whole model, each counted exactly once
    (frozen ones, ``requires_grad=False``, are left out).

    Call after ``sync_gradients``. Dense replicated gradients are equal on every rank and count
    once; expert shards are summed over the ETP×EP block (``tp_ep``); parameters marked
    ``tensor_parallel`` (sharded over TP by the user's model) are summed over TP; the local
    shards of a DTensor gradient (FSDP2's, ``shard_model``) are summed over the mesh
    dimensions it is sharded on as well (an expert's over EDP, a dense one's over DP×CP);
    everything is summed over PP. Returns a float32 scalar on the gradients' device; with a
    float64 gradient the sums run in float64 and only the result is rounded, so the norm does
    not depend on how a float64 model is sharded or split over ranks.
    """
    params = _params_with_grad(params)
    if not params:
        return torch.zeros(())
    device = _local(params[0].grad).device
    dtype = (torch.float64 if any(p.grad.dtype == torch.float64 for p in params)
             else torch.float32)
    inf = math.isinf(norm_type)
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM

    def local(ps_: list[Tensor]) -> Tensor:
        if not ps_:
            return torch.zeros((), device=device, dtype=dtype)
        norms = torch.stack([_local(p.grad).detach().to(dtype).norm(norm_type) for p in ps_])
        return norms.max() if inf else norms.pow(norm_type).sum()

    def kind(p: Tensor) -> Optional[str]:
        if is_expert_param(p):
            return "tp_ep"
        return "tp" if getattr(p, "tensor_parallel", False) else None

    # parameters by (the tag's group, the groups their DTensor shards span), in first-seen order
    # (every rank holds the same parameters, so every rank reduces alike)
    parts: dict[tuple, list[Tensor]] = {}
    for group_name in ("tp_ep", "tp", None):  # these three always, as before
        parts[(group_name, ())] = []
    for p in params:
        parts.setdefault((kind(p), _shard_groups(p.grad)), []).append(p)
    values = []
    for (group_name, shard_groups), ps_ in parts.items():
        value = local(ps_)
        groups = list(shard_groups) + ([ps.group(group_name)] if group_name else [])
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(value, op=op, group=group)
        values.append(value)
    total = torch.stack(values).max() if inf else torch.stack(values).sum()
    pp_group = ps.group("pp")
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, op=op, group=pp_group)
    return (total if inf else total.pow(1.0 / norm_type)).float()


def clip_grad_norm(params: Iterable[Tensor] | nn.Module, ps: ParallelState, max_norm: float,
                   norm_type: float = 2.0) -> Tensor:
    """Clip the gradients of the whole model by their global norm, as
    ``torch.nn.utils.clip_grad_norm_`` does on one process (over the trainable parameters;
    frozen ones are neither counted nor scaled).

    ``total = global_grad_norm(params, ps, norm_type)`` (every parameter counted once across
    TP, EP, ETP, EDP and PP); every gradient is scaled by ``min(1, max_norm / (total + 1e-6))``
    in place. Returns ``total`` (``global_grad_norm``'s scalar). Call after ``sync_gradients``,
    on every rank (it all-reduces over ``tp_ep``, ``tp``, ``pp`` and the meshes of sharded
    gradients).
    """
    params = _params_with_grad(params)
    total = global_grad_norm(params, ps, norm_type)
    coeff = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        grad = _local(p.grad).detach()
        grad.mul_(coeff.to(grad.device, grad.dtype))
    return total
