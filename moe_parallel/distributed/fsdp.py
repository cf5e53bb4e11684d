"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with expert-parallel MoE layers.

The recipe (tested in ``tests/test_fsdp.py``): shard the dense submodules over the dense
data-parallel mesh, ``DeviceMesh.from_group(ps.group("dp_cp"), device_type)``, with
``fully_shard`` (each is then all-gathered for its forward and its gradient reduce-scattered
as the mean over DP×CP), and leave every ``MoELayer`` out of FSDP: after the backward,
``sync_gradients(layer, ps)`` reduces its router and shared experts over DP×CP and its routed
experts over EDP. An FSDP unit that holds a layer's routed experts would shard them over DP and
average their gradients there, while each EP rank holds different experts:
``find_fsdp_managing_experts`` detects it and ``MoELayer`` refuses it at its first forward.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

__all__ = ["find_fsdp_managing_experts"]


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
    (During its forward FSDP2 swaps in unsharded parameters, which carry none of the layer's
    parameter tags: the test is by owning module.)"""
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
