"""``shard_model``: FSDP2 (``fully_shard``) over both grids, the routed experts over EDP.

Units, built bottom-up (``fully_shard`` requires it):

* each routed-expert module (a module all of whose parameters carry ``sync_group == "edp"``,
  e.g. ``MoELayer.experts``): its own unit over the expert-data-parallel mesh
  ``DeviceMesh.from_group(ps.group("edp"))``. Each EP/ETP rank's expert shard is split once
  more over its EDP replicas, so weights, gradients and optimizer state of the experts are
  ``1/(EP·ETP·EDP)`` of the model's per rank (up to FSDP's padding of a dimension that EDP does
  not divide: the first dimension it divides is sharded, dim 0 when none is);
* each module that holds a routed-expert module (the MoE layer: router, shared experts) and
  each of ``dense_modules``: a unit over the dense mesh ``DeviceMesh.from_group(ps.group
  ("dp_cp"))``; then ``model`` itself, for every parameter not in a unit yet.

Gradients, reduce-scattered by FSDP in the backward (the contract of ``grads.sync_gradients``,
Megatron-Core's: the target is the gradient of the mean of the ``R = dp·cp`` shards' losses):

    expert g = Σ over EDP / R        dense g = Σ over DP×CP / R  (+ Σ over TP: sequence_parallel)

FSDP reduces with a plain sum and divides by ``R`` afterwards (``set_gradient_divide_factor``,
``set_force_sum_reduction_for_comms``: gloo has no pre-multiplied sum). A dense unit whose
parameters carry ``sequence_parallel`` (TP ranks see distinct tokens) also sums its reduced
shard over TP (``set_all_reduce_hook``: the shard of a DP×CP coordinate is the same on its TP
ranks). A grid of one rank is not sharded: with ``edp == 1`` the experts, with ``dp·cp == 1``
the dense parameters stay plain tensors and ``sync_gradients(model, ps)`` reduces them as
without FSDP (it skips the parameters FSDP manages); call it after every backward either way.
(torch 2.14's FSDP2 divides a one-rank unit's gradient by the divide factor twice.)

Every sharded parameter keeps the attributes of the parameter it replaces (``sync_group``,
``expert_parallel``, ``sequence_parallel``, ...), which ``sync_gradients``, ``global_grad_norm``
and the checkpoint read. ``fsdp.check_no_fsdp_over_experts`` accepts these expert units (their
mesh is the EDP group, they manage nothing else) and refuses any other unit over the experts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .grads import is_expert_param
from .parallel_state import ParallelState

__all__ = ["expert_modules", "shard_model"]


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every routed-expert module of ``model``: the largest submodules all
    of whose parameters are routed-expert parameters (``is_expert_param``), in module order.
    ``ValueError`` when an expert parameter is held directly by a module that also holds other
    parameters (its experts cannot form a unit of their own)."""
    found: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") or not prefix for prefix, _ in found):
            continue  # inside a routed-expert module already found
        params = list(module.parameters())
        if params and all(is_expert_param(p) for p in params):
            found.append((name, module))
            covered.update(id(p) for p in params)
    stray = [n for n, p in model.named_parameters() if is_expert_param(p) and id(p) not in covered]
    if stray:
        raise ValueError(f"expert parameters {stray} share their module with other parameters: "
                         "shard_model shards each routed-expert module as a unit of its own")
    return found


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module that holds submodule ``name`` (``model`` for a top-level one)."""
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def _mesh(ps: ParallelState, group_name: str, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(ps.group(group_name), device_type)


def _expert_placement(size: int):
    """FSDP's placement for an expert tensor over ``size`` ranks: ``Shard(d)`` on the first
    dimension ``size`` divides (no padding), else ``Shard(0)`` (padded)."""
    from torch.distributed.tensor import Shard

    def place(p: nn.Parameter):
        dims = [d for d in range(p.dim()) if p.shape[d] % size == 0]
        return Shard(dims[0] if dims else 0)

    return place


def _tags(module: nn.Module) -> dict[str, dict]:
    """``name -> attributes`` of every parameter ``module`` holds (``fully_shard`` replaces each
    parameter with a new one: these are copied onto it)."""
    return {n: dict(vars(p)) for n, p in module.named_parameters()}


def _retag(module: nn.Module, tags: dict[str, dict]) -> None:
    for name, p in module.named_parameters():
        for key, value in tags.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)


def _unmanaged(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that no FSDP unit manages yet (plain tensors)."""
    from torch.distributed.tensor import DTensor

    return [p for p in module.parameters() if not isinstance(p, DTensor)]


def _tp_sum_hook(ps: ParallelState):
    group = ps.group("tp")

    def hook(reduced: torch.Tensor) -> None:
        dist.all_reduce(reduced, group=group)

    return hook


def _shard_dense(module: nn.Module, ps: ParallelState, mesh, kwargs: dict, what: str) -> None:
    """One unit over the dense mesh for the parameters of ``module`` not in a unit yet; their
    gradients ``Σ over DP×CP / R``, and ``+ Σ over TP`` when they are ``sequence_parallel``."""
    from torch.distributed.fsdp import fully_shard

    params = [p for p in _unmanaged(module) if not is_expert_param(p)]
    if not params:
        return
    # experts left unsharded (edp == 1) stay out of the dense unit: sync_gradients reduces them
    ignored = {p for p in _unmanaged(module) if is_expert_param(p)}
    flags = {bool(getattr(p, "sequence_parallel", False)) for p in params}
    if len(flags) > 1:
        raise ValueError(
            f"{what} holds parameters with and without sequence_parallel: their gradients are "
            "reduced over different groups (TP as well, or not), so they cannot share an FSDP "
            "unit; pass their submodules in dense_modules so that each unit holds one kind")
    tags = _tags(module)
    unit = fully_shard(module, mesh=mesh, ignored_params=ignored or None, **kwargs)
    _retag(module, tags)
    unit.set_gradient_divide_factor(float(ps.dp * ps.cp))
    unit.set_force_sum_reduction_for_comms(True)
    if flags == {True} and ps.tp > 1:
        unit.set_all_reduce_hook(_tp_sum_hook(ps))


def shard_model(model: nn.Module, ps: ParallelState, *, dense_modules: Iterable[nn.Module] = (),
                mp_policy: Optional[object] = None, reshard_after_forward: bool = True,
                keep_unsharded_last: int = 0, device_type: Optional[str] = None) -> nn.Module:
    """Shard ``model`` with FSDP2 over both grids (module docstring); returns ``model``.

    ``dense_modules``: submodules to make dense units of their own (e.g. the transformer
    blocks; the finer the units, the less is all-gathered at once), sharded after the MoE
    layers and before ``model``. ``mp_policy``: a ``torch.distributed.fsdp.MixedPrecisionPolicy``
    for every unit, e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)``: forward and backward in bfloat16, gradients reduced in float32
    and kept, with the optimizer state, in the parameters' own dtype (build the MoE layers with
    ``params_dtype=torch.bfloat16``, the dtype they compute in, then convert the model to float32
    for its master weights). ``reshard_after_forward``: free the gathered parameters after the
    forward (gather again in the backward); ``keep_unsharded_last``: the units of the last that
    many MoE layers (in module order) keep them from forward to backward instead, which saves
    their all-gathers where the backward starts. ``device_type`` (default: that of the model's
    first parameter) is the meshes'.

    Call on every rank after the model is on its device and before the optimizer is built
    (FSDP replaces the parameters); then, after every backward, ``sync_gradients(model, ps)``.
    ``ValueError`` when a unit would mix parameters reduced over different groups, when
    ``keep_unsharded_last`` is negative, or with ``mp_policy`` when a grid has one rank.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if isinstance(keep_unsharded_last, bool) or not isinstance(keep_unsharded_last, int) \
            or keep_unsharded_last < 0:
        raise ValueError(f"keep_unsharded_last must be an int >= 0, got {keep_unsharded_last!r}")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise ValueError("mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or "
                         f"None, got {type(mp_policy).__name__}")
    if mp_policy is not None and (ps.edp == 1 or ps.dp * ps.cp == 1):
        raise ValueError(
            f"mp_policy needs both grids sharded (edp = {ps.edp}, dp·cp = {ps.dp * ps.cp}): a "
            "grid of one rank is left to sync_gradients, unsharded and without the policy's "
            "casts; build the model in its compute dtype instead")
    if device_type is None:
        first = next(model.parameters(), None)
        device_type = first.device.type if first is not None else "cpu"
    experts = expert_modules(model)
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    kept = {name for name, _ in experts[len(experts) - keep_unsharded_last:]} \
        if keep_unsharded_last else set()
    if ps.edp > 1:
        edp_mesh = _mesh(ps, "edp", device_type)
        for name, module in experts:
            tags = _tags(module)
            unit = fully_shard(module, mesh=edp_mesh, shard_placement_fn=_expert_placement(ps.edp),
                               reshard_after_forward=reshard_after_forward and name not in kept,
                               **kw)
            _retag(module, tags)
            unit.set_gradient_divide_factor(float(ps.dp * ps.cp))
            unit.set_force_sum_reduction_for_comms(True)
    if ps.dp * ps.cp > 1:
        dense_mesh = _mesh(ps, "dp_cp", device_type)
        for name, _ in experts:
            layer_name = name.rpartition(".")[0]
            _shard_dense(_owner(model, name), ps, dense_mesh,
                         {**kw, "reshard_after_forward": reshard_after_forward and
                          name not in kept}, f"module {layer_name or 'model'}")
        for module in dense_modules:
            _shard_dense(module, ps, dense_mesh,
                         {**kw, "reshard_after_forward": reshard_after_forward},
                         type(module).__name__)
        _shard_dense(model, ps, dense_mesh, kw, "the model's remaining parameters")
    return model
