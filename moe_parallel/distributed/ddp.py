"""``DistributedDataParallel`` for models with expert-parallel MoE layers.

Plain DDP treats every parameter as replicated over its process group: at construction it
broadcasts rank 0's copy (each EP rank holds *different* experts) and it averages every
gradient over the whole group (expert gradients belong to EDP). ``wrap_ddp`` gives DDP the
dense parameters only, over the dense data-parallel group DP×CP, with DDP's overlapped bucketed
all-reduce; the expert parameters, and the routers' per-rank count buffers, are left out. After
the backward, ``sync_gradients(model, ps, dense=False)`` reduces the rest:

    dense g   = mean over DP×CP                      (DDP, during the backward)
    expert g  = Σ over EDP / (dp·cp)                 (sync_gradients)
    seq-parallel dense g += Σ over TP                (sync_gradients; TP > 1 only)

which is what ``sync_gradients(model, ps)`` computes without DDP. Frozen parameters
(``requires_grad=False``) travel in no bucket (DDP leaves them out, as ``sync_gradients`` does);
freeze before wrapping (DDP builds its buckets once) and alike on every rank: ``wrap_ddp``
checks that over the stage first (``freezing.check_same_freezing``). ``find_ddp_managing_experts``
detects the unsafe case (a DDP that manages expert parameters) and ``check_no_ddp_over_experts``
refuses it; ``MoELayer`` runs that check at every forward, so a model wrapped after it already
ran (e.g. a warm-up forward) is refused at the first forward the DDP runs.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .freezing import check_same_freezing
from .grads import is_expert_param
from .parallel_state import ParallelState, grid_groups

__all__ = ["check_no_ddp_over_experts", "find_ddp_managing_experts", "wrap_ddp"]

# Router buffers that differ per rank by design (counts of this rank's tokens).
PER_RANK_BUFFERS = ("local_tokens_per_expert",)


def _left_out(model: nn.Module) -> list[str]:
    names = [n for n, p in model.named_parameters() if is_expert_param(p)]
    names += [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in PER_RANK_BUFFERS]
    return names


def wrap_ddp(model: nn.Module, ps: ParallelState, **ddp_kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model)`` over ``ps``'s DP×CP group, managing the dense
    parameters only (see the module docstring); ``ddp_kwargs`` go to DDP (``bucket_cap_mb``,
    ``find_unused_parameters``, ...). Call ``sync_gradients(model, ps, dense=False)`` after
    each backward, before the optimizer step. Build the model identically on every rank, and
    freeze it (if at all) before wrapping and alike on every rank: a collective over the
    stage compares the freezing (``ValueError`` on every rank naming each rank's frozen
    parameters); ``ValueError`` too when no dense parameter is trainable (nothing for DDP to
    reduce: use ``sync_gradients(model, ps)`` alone).
    """
    if "process_group" in ddp_kwargs:
        raise ValueError("wrap_ddp sets process_group (the DP×CP group of ps); do not pass it")
    check_same_freezing(model, ps)
    if not any(p.requires_grad and not is_expert_param(p) for p in model.parameters()):
        raise ValueError("wrap_ddp: no dense parameter of the model requires grad (all frozen), "
                         "so DistributedDataParallel would have nothing to reduce; call "
                         "sync_gradients(model, ps) after each backward without DDP")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, _left_out(model))
    return DistributedDataParallel(model, process_group=ps.group("dp_cp"), **ddp_kwargs)


# The frame of a DDP forward (compared by identity: a code object's hash reads its contents).
_DDP_FORWARD = DistributedDataParallel.forward.__code__


def find_ddp_managing_experts(module: nn.Module) -> Optional[DistributedDataParallel]:
    """The ``DistributedDataParallel`` whose forward is running ``module`` (found on the call
    stack) that manages any of ``module``'s expert parameters, else None. The walk compares
    each frame's code object with ``DistributedDataParallel.forward``'s (a subclass that
    overrides ``forward`` calls it through ``super()``) and reads the locals of those frames
    only: about 0.1 µs per frame, cheap enough for every forward."""
    frame = sys._getframe(1)
    expert: Optional[set[int]] = None
    while frame is not None:
        if frame.f_code is _DDP_FORWARD:
            owner = frame.f_locals.get("self")
            if isinstance(owner, DistributedDataParallel):
                if expert is None:
                    expert = {id(p) for p in module.parameters() if is_expert_param(p)}
                managed = getattr(owner, "_module_parameters", [])
                if any(id(p) in expert for p in managed):
                    return owner
        frame = frame.f_back
    return None


def _overwritten_ranks(ddp: DistributedDataParallel, ps: ParallelState) -> tuple[int, list[int]]:
    """The rank DDP's constructor broadcast from (its group's rank 0) and the ranks of its group
    whose expert shard differs from that rank's (those not in its EDP group)."""
    group = getattr(ddp, "process_group", None)
    members = dist.get_process_group_ranks(group) if group is not None else [0]
    src = members[0]
    same = next(g for g in grid_groups(ps.world_size, ps.tp, ps.cp, ps.ep, ps.etp, ps.pp)["edp"]
                if src in g)
    return src, [r for r in members if r not in same]


def check_no_ddp_over_experts(module: nn.Module, ps: ParallelState) -> None:
    """``ValueError`` when a plain ``DistributedDataParallel`` is running ``module`` (an
    expert-parallel layer over ``ps``) and manages its expert parameters: its constructor
    broadcast rank 0's experts over every rank of its group and its backward averages expert
    gradients over that group, while each EP rank holds different experts. Every rank of the
    group runs the same check on the same wrapping, so all of them raise."""
    ddp = find_ddp_managing_experts(module)
    if ddp is None:
        return
    src, overwritten = _overwritten_ranks(ddp, ps)
    lost = (f"the experts of ranks {overwritten} were overwritten by rank {src}'s when "
            "DistributedDataParallel was built, and " if overwritten else "")
    raise ValueError(
        "a DistributedDataParallel manages the expert parameters of an expert-parallel "
        f"MoELayer (ep={ps.ep}, etp={ps.etp}): {lost}it averages expert gradients over its "
        "whole group. Rebuild the model and wrap it with "
        "moe_parallel.distributed.wrap_ddp(model, ps), then call "
        "sync_gradients(model, ps, dense=False) after backward"
    )
