"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with expert-parallel MoE layers.

Two recipes (tested in ``tests/distributed/test_fsdp.py`` and ``test_edp_sharding.py``):

* ``sharding.shard_model(model, ps)``: every routed-expert module is its own FSDP unit over
  the expert-data-parallel mesh ``DeviceMesh.from_group(ps.group("edp"))``, the dense
  parameters are units over the dense mesh ``DeviceMesh.from_group(ps.group("dp_cp"))``;
* by hand: ``fully_shard`` the dense submodules over the dense mesh and leave every
  ``MoELayer`` out of FSDP; after the backward ``sync_gradients(layer, ps)`` reduces its router
  and shared experts over DP×CP and its routed experts over EDP.

What is refused: an FSDP unit that manages a layer's routed experts over any other group than
EDP, or together with other parameters. A unit over DP (or any group that spans several EP or
ETP ranks) would shard and average the experts over ranks that hold *different* experts.
``find_fsdp_managing_experts`` finds such a unit (the experts' own, or one running the layer,
found on the call stack) and ``check_no_fsdp_over_experts`` refuses it; ``MoELayer`` runs that
check at every forward (so also after a warm-up forward ran unwrapped). ``fully_shard``
replaces each parameter it manages with its own ``nn.Parameter``: ``shard_model`` copies the
layer's tags onto them, so while every parameter of the experts is tagged (sharded by
``shard_model``, or not sharded at all) the check is one attribute read per parameter.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch.distributed as dist
from torch import nn

from .grads import is_expert_param
from .parallel_state import ParallelState

__all__ = ["check_no_fsdp_over_experts", "find_fsdp_managing_experts"]


def _fsdp_params(fsdp_module: nn.Module) -> list:
    """The ``FSDPParam`` records of an FSDP2 unit (empty when its state cannot be read: no
    false alarm)."""
    try:
        state = fsdp_module._get_fsdp_state()
    except AttributeError:
        return []
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return [p for g in groups for p in g.fsdp_params]


def _managed_modules(fsdp_module: nn.Module) -> list[nn.Module]:
    """The modules whose parameters an FSDP2 unit manages."""
    try:
        return [p._module_info.module for p in _fsdp_params(fsdp_module)]
    except AttributeError:
        return []


def _shard_ranks(fsdp_param) -> Optional[list[int]]:
    """The global ranks an ``FSDPParam`` is sharded over; None for a mesh that also replicates
    (HSDP) or whose group cannot be read."""
    info = getattr(fsdp_param, "mesh_info", None)
    group = getattr(info, "shard_process_group", None)
    if group is None or getattr(info, "replicate_process_group", None) is not None:
        return None
    return dist.get_process_group_ranks(group)


def _own_units(experts: nn.Module) -> list[nn.Module]:
    """``experts`` and its submodules that are FSDP2 units."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in experts.modules() if isinstance(m, FSDPModule)]


def _edp_unit(unit: nn.Module, owners: set[int], ps: ParallelState) -> bool:
    """Whether ``unit`` manages only parameters of the experts (``owners``: their modules'
    ids), each sharded over exactly the EDP group of ``ps``."""
    records = _fsdp_params(unit)
    try:
        return bool(records) and all(
            id(p._module_info.module) in owners and _shard_ranks(p) == ps.ranks["edp"]
            for p in records)
    except AttributeError:
        return False


def find_fsdp_managing_experts(experts: nn.Module, ps: Optional[ParallelState] = None
                               ) -> Optional[nn.Module]:
    """An FSDP2 unit that manages a parameter of the routed-expert module ``experts`` (or of
    its submodules) other than the one ``shard_model`` builds, else None.

    Searched: ``experts`` and its submodules (a unit of their own is accepted when it manages
    only their parameters, sharded over ``ps``'s EDP group; without ``ps`` every unit is
    reported), then the FSDP units on the call stack (``experts``'s layer running inside them),
    which must not manage them at all. FSDP2 swaps in its own parameters, which carry none of
    the layer's tags unless ``shard_model`` copied them: when every parameter is tagged the
    answer is None at once."""
    if all(is_expert_param(p) for p in experts.parameters()):  # none replaced, or shard_model's
        return None
    owners = {id(m) for m in experts.modules()}
    for unit in _own_units(experts):
        if ps is None or not _edp_unit(unit, owners, ps):
            return unit
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        unit = frame.f_locals.get("self")
        if isinstance(unit, FSDPModule) and any(id(m) in owners
                                                for m in _managed_modules(unit)):
            return unit
        frame = frame.f_back
    return None


def check_no_fsdp_over_experts(experts: nn.Module, ps: ParallelState) -> None:
    """``ValueError`` when an FSDP2 unit manages a parameter of the routed experts ``experts``
    (expert-parallel over ``ps``) other than over their EDP group alone
    (``find_fsdp_managing_experts``): it would shard them and average their gradients over
    ranks that hold different experts, or mix them with parameters reduced over DP×CP."""
    unit = find_fsdp_managing_experts(experts, ps)
    if unit is not None:
        raise ValueError(
            "an FSDP unit (fully_shard) manages the expert parameters of an expert-parallel "
            f"MoELayer (ep={ps.ep}, etp={ps.etp}) over other ranks than its expert-data-parallel "
            f"group {ps.ranks.get('edp')} or together with other parameters: it would shard and "
            "average them over ranks that hold different experts. Either shard the experts over "
            "EDP with moe_parallel.distributed.shard_model(model, ps), or fully_shard the dense "
            "submodules only and call sync_gradients(layer, ps) for the MoE layers "
            "(moe_parallel.distributed.fsdp)"
        )
