"""Adopt the process groups of an already-initialised Megatron-Core ``parallel_state``.

``parallel_state_from_megatron()`` reads Megatron's groups (it creates none, so it is not a
collective and may be called on any subset of ranks) and returns a :class:`ParallelState` that
holds those same group objects. Megatron-Core is not a dependency: it is imported only when no
``mpu`` object is given.

Group mapping (Megatron-Core >= 0.10 names)::

    tp     get_tensor_model_parallel_group()
    cp     get_context_parallel_group()
    dp     get_data_parallel_group(with_context_parallel=False)
    dp_cp  get_data_parallel_group(with_context_parallel=True)
    pp     get_pipeline_model_parallel_group()
    ep     get_expert_model_parallel_group()
    etp    get_expert_tensor_parallel_group()
    edp    get_expert_data_parallel_group()
    tp_ep  get_expert_tensor_and_model_parallel_group()

Sizes are the group sizes; the rank is the one rank common to the tp, cp, dp and pp groups.
Every group's members must equal what ``grid_groups`` gives for those sizes, i.e. Megatron must
use its default ``order="tp-cp-ep-dp-pp"``; any other layout raises ``ValueError`` naming the
group, because ParallelState's coordinate properties assume that layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch.distributed as dist

from ...distributed.parallel_state import GROUP_NAMES, ParallelState, grid_groups

# name -> (Megatron-Core function, keyword arguments)
MEGATRON_GROUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "tp": ("get_tensor_model_parallel_group", {}),
    "cp": ("get_context_parallel_group", {}),
    "dp": ("get_data_parallel_group", {"with_context_parallel": False}),
    "dp_cp": ("get_data_parallel_group", {"with_context_parallel": True}),
    "pp": ("get_pipeline_model_parallel_group", {}),
    "ep": ("get_expert_model_parallel_group", {}),
    "etp": ("get_expert_tensor_parallel_group", {}),
    "edp": ("get_expert_data_parallel_group", {}),
    "tp_ep": ("get_expert_tensor_and_model_parallel_group", {}),
    "stage": ("get_tensor_and_data_parallel_group", {"with_context_parallel": True}),
}
assert set(MEGATRON_GROUPS) == set(GROUP_NAMES)


def _import_mpu() -> Any:
    try:
        from megatron.core import parallel_state as mpu
    except ImportError as e:
        raise ImportError(
            "parallel_state_from_megatron() without an mpu argument needs megatron-core "
            "(pip install megatron-core); or pass an object with Megatron's parallel_state API"
        ) from e
    return mpu


def _megatron_group(mpu: Any, name: str) -> Any:
    fn_name, kwargs = MEGATRON_GROUPS[name]
    fn = getattr(mpu, fn_name, None)
    if fn is None:
        raise AttributeError(
            f"{type(mpu).__name__} has no {fn_name}() (needed for the {name!r} group; "
            "megatron-core >= 0.10 provides it)"
        )
    group = fn(**kwargs)
    if group is None:
        raise ValueError(f"Megatron's {name!r} group ({fn_name}) is not initialised")
    return group


def parallel_state_from_megatron(mpu: Optional[Any] = None, *,
                                 group_ranks: Optional[Callable[[Any], list[int]]] = None
                                 ) -> ParallelState:
    """A ParallelState over the groups of an initialised Megatron-Core ``parallel_state``.

    ``mpu``: the ``megatron.core.parallel_state`` module (default) or any object with the same
    getters. ``group_ranks``: maps a group to its global ranks (default
    ``torch.distributed.get_process_group_ranks``; tests pass fakes). Raises ``RuntimeError``
    if Megatron is not initialised, ``ValueError`` if its layout is not ``tp-cp-ep-dp-pp``.
    """
    mpu = _import_mpu() if mpu is None else mpu
    is_init = getattr(mpu, "model_parallel_is_initialized", None)
    if is_init is not None and not is_init():
        raise RuntimeError("Megatron's model parallel state is not initialised "
                           "(call megatron.core.parallel_state.initialize_model_parallel first)")
    ranks_of = group_ranks or dist.get_process_group_ranks

    groups = {name: _megatron_group(mpu, name) for name in GROUP_NAMES}
    ranks = {name: sorted(int(r) for r in ranks_of(g)) for name, g in groups.items()}

    common = set(ranks["tp"]) & set(ranks["cp"]) & set(ranks["dp"]) & set(ranks["pp"])
    if len(common) != 1:
        raise ValueError(f"Megatron's tp, cp, dp and pp groups share ranks {sorted(common)}, "
                         "expected exactly this rank")
    rank = common.pop()
    sizes = {n: len(ranks[n]) for n in ("tp", "cp", "ep", "etp", "pp")}
    world_size = len(ranks["tp"]) * len(ranks["dp_cp"]) * len(ranks["pp"])
    if dist.is_available() and dist.is_initialized() and group_ranks is None:
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"Megatron's groups imply rank {rank} of {world_size}, torch.distributed says "
                f"{dist.get_rank()} of {dist.get_world_size()}"
            )

    expected = grid_groups(world_size, **sizes)
    for name in GROUP_NAMES:
        mine = next((g for g in expected[name] if rank in g), None)
        if mine != ranks[name]:
            raise ValueError(
                f"Megatron's {name!r} group of rank {rank} is {ranks[name]}, moe_parallel's "
                f"tp-cp-ep-dp-pp layout ({sizes}, world {world_size}) expects {mine}; "
                "initialise Megatron with order='tp-cp-ep-dp-pp'"
            )

    state = ParallelState.build(**sizes, world_size=world_size, rank=rank, create_groups=False)
    state.groups = groups
    return state
