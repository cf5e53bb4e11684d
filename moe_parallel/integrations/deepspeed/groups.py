"""The expert groups and optimizer parameter groups DeepSpeed expects for our expert grid.

* ``moe_group_name(ps)``: ``"ep_size_<ep>"`` (``"ep_size_<ep>_etp_<etp>"`` when etp > 1);
* ``register_groups(ps)``: ``ps``'s EDP group and ETP×EP block in ``deepspeed.utils.groups``'s
  expert-data-parallel and expert-parallel registries under that name;
* ``moe_param_groups(model, ps)``: a dense group and one ``{"moe": True, "name": ...}`` group of
  the routed-expert parameters, as DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer`` would build them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ...distributed.grads import is_expert_param
from ...distributed.parallel_state import ParallelState

__all__ = ["moe_group_name", "moe_param_groups", "register_groups"]


def moe_group_name(parallel_state: ParallelState) -> str:
    """The DeepSpeed expert group name of ``parallel_state``'s expert grid: ``"ep_size_<ep>"``
    (DeepSpeed's own naming; with etp = 1 DeepSpeed would build the same groups under it), and
    ``"ep_size_<ep>_etp_<etp>"`` when etp > 1."""
    ps = parallel_state
    return f"ep_size_{ps.ep}" if ps.etp == 1 else f"ep_size_{ps.ep}_etp_{ps.etp}"


def register_groups(ps: ParallelState) -> str:
    """Put ``ps``'s EDP group and ETP×EP block in ``deepspeed.utils.groups``'s expert-data-
    parallel and expert-parallel registries under ``moe_group_name(ps)``. A different group
    already registered under that name is a ``ValueError``."""
    from deepspeed.utils import groups

    name = moe_group_name(ps)
    for groups_, ranks_, ours in (
        (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, "edp"),
        (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, "tp_ep"),
    ):
        known = ranks_.get(name)
        if known is not None and sorted(known) != ps.ranks[ours]:
            raise ValueError(
                f"DeepSpeed already has an expert group {name!r} with ranks {sorted(known)}, "
                f"but this ParallelState's {ours} group is {ps.ranks[ours]} (a DeepSpeed MoE "
                "layer with another rank order?); use one layout per expert group name")
        groups_[name] = ps.group(ours)
        ranks_[name] = list(ps.ranks[ours])
    return name


def moe_param_groups(model: nn.Module | Iterable[nn.Parameter], parallel_state: ParallelState,
                     **group_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups for DeepSpeed: ``{"name": "dense", "params": [...]}`` (every
    trainable parameter that is not a routed expert's) and ``{"name": moe_group_name(ps),
    "moe": True, "params": [...]}`` (the routed experts), each with ``group_options`` (``lr``,
    ``weight_decay``, ...); empty groups are left out. Pass them as ``model_parameters`` to
    ``deepspeed.initialize`` or to a torch optimizer given as ``optimizer``. ZeRO 1/2 need the
    MoE group (it reduces and partitions its parameters over EDP).
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    params = [p for p in params if p.requires_grad]
    name = moe_group_name(parallel_state)
    expert = [p for p in params if is_expert_param(p)]
    wrong = [p for p in expert if getattr(p, "group_name", name) != name]
    if wrong:
        raise ValueError(f"{len(wrong)} expert parameter(s) carry group_name "
                         f"{wrong[0].group_name!r}, not {name!r}: prepare(model, ps) with the "
                         "same ParallelState")
    groups_ = [{**group_options, "name": "dense",
                "params": [p for p in params if not is_expert_param(p)]},
               {**group_options, "name": name, "moe": True, "params": expert}]
    return [g for g in groups_ if g["params"]]
