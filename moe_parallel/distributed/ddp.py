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

which is what ``sync_gradients(model, ps)`` computes without DDP. ``find_ddp_managing_experts``
detects the unsafe case (a DDP that manages expert parameters); ``MoELayer`` calls it at its
first forward.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .grads import is_expert_param
from .parallel_state import ParallelState

__all__ = ["find_ddp_managing_experts", "wrap_ddp"]

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
    each backward, before the optimizer step. Build the model identically on every rank.
    """
    if "process_group" in ddp_kwargs:
        raise ValueError("wrap_ddp sets process_group (the DP×CP group of ps); do not pass it")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, _left_out(model))
    return DistributedDataParallel(model, process_group=ps.group("dp_cp"), **ddp_kwargs)


def find_ddp_managing_experts(module: nn.Module) -> Optional[DistributedDataParallel]:
    """The ``DistributedDataParallel`` whose forward is running ``module`` (found on the call
    stack) if it manages any of ``module``'s expert parameters, else None."""
    expert = {id(p) for p in module.parameters() if is_expert_param(p)}
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, DistributedDataParallel):
            managed = getattr(owner, "_module_parameters", [])
            return owner if any(id(p) in expert for p in managed) else None
        frame = frame.f_back
    return None
