"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with expert-parallel MoE layers.

The recipe (tested in ``tests/test_fsdp.py``): shard the dense submodules over the dense
data-parallel mesh, ``DeviceMesh.from_group(ps.group("dp_cp"), device_type)``, with
``fully_shard`` (each is then all-gathered for its forward and its gradient reduce-scattered
as the mean over DP×CP), and leave every ``MoELayer`` out of FSDP: after the backward,
``sync_gradients(layer, ps)`` reduces its router and shared experts over DP×CP and its routed
experts over EDP. An FSDP unit that holds a layer's routed experts would shard them over DP and
average their gradients there, while each EP rank holds different experts:
``find_fsdp_managing_experts`` detects it and ``check_no_fsdp_over_experts`` refuses it;
``MoELayer`` runs that check at every forward (so also after a warm-up forward ran unwrapped).
``fully_shard`` replaces each parameter it manages with its own (untagged) ``nn.Parameter``:
while every parameter of the experts still carries the layer's expert tag, no FSDP unit manages
them and the check is one attribute read per parameter; otherwise it walks the call stack.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from .grads import is_expert_param
from .parallel_state import ParallelState

__all__ = ["check_no_fsdp_over_experts", "find_fsdp_managing_experts"]


def _managed_modules(fsdp_module: nn.Module) -> list[nn.Module]:
    """The modules whose parameters an FSDP2 unit manages (empty when its state cannot be
    read: no false alarm)."""
    try:
        group = fsdp_module._get_fsdp_state()._fsdp_param_group
        return [] if group is None else [p._module_info.module for p in group.fsdp_params]
    except AttributeError:
        return []


def find_fsdp_managing_experts(experts: nn.Module) -> Optional[nn.Module]:
    """The FSDP2 unit on the call stack (``experts``'s layer running inside it) that manages
    a parameter of the routed-expert module ``experts`` (or of its submodules), else None.
    (FSDP2 swaps in its own sharded and unsharded parameters, which carry none of the layer's
    parameter tags: when every parameter is tagged none is managed, else the test is by owning
    module.)"""
    if all(is_expert_param(p) for p in experts.parameters()):  # none replaced by fully_shard
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    owners = {id(m) for m in experts.modules()}
    frame = sys._getframe(1)
    while frame is not None:
        unit = frame.f_locals.get("self")
        if isinstance(unit, FSDPModule) and any(id(m) in owners
                                                for m in _managed_modules(unit)):
            return unit
        frame = frame.f_back
    return None


def check_no_fsdp_over_experts(experts: nn.Module, ps: ParallelState) -> None:
    """``ValueError`` when an FSDP2 unit running the layer manages a parameter of its routed
    experts ``experts`` (expert-parallel over ``ps``): it would shard them and average their
    gradients over its data-parallel mesh, while each EP rank holds different experts."""
    if find_fsdp_managing_experts(experts) is not None:
        raise ValueError(
            "an FSDP unit (fully_shard) manages the expert parameters of an expert-parallel "
            f"MoELayer (ep={ps.ep}, etp={ps.etp}): it would shard and average them over the "
            "data-parallel mesh, while each EP rank holds different experts. fully_shard "
            "the dense submodules only and call sync_gradients(layer, ps) for the MoE "
            "layers (moe_parallel.distributed.fsdp)"
        )
