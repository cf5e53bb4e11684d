"""Token dispatch: move routed tokens to their experts and bring the results back.

Contract of every dispatcher (``base.TokenDispatcher``, which each one subclasses):
    expert_in, group_sizes, handle = dispatcher.dispatch(x, routing, pad_to)
    y = dispatcher.combine(expert_out, handle)
``x`` [T, H] are this rank's tokens; ``expert_in`` [N, H] holds the rows of this rank's local
experts grouped by local expert, ``group_sizes`` [E_local] (CPU int64) their row counts (padding
included); ``expert_out`` is the experts' output for those rows. ``combine`` returns
    y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]            [T, H].
Every handle (``base.DispatchHandle``) also carries, for the routing statistics, ``row_map``
[T, k] (-1 where ``(t, j)`` was dropped), ``tokens_per_expert`` [E] (this rank's kept assignments
per global expert) and ``overflow`` (True when a ``RowBudget`` ceiling made this forward drop
assignments). Every dispatcher takes an optional ``row_budget`` (``RowBudget``; later:
``set_row_budget``): before anything moves, it all-gathers the kept counts of its group and
enforces the ceiling on rows per rank. ``dispatch_start`` / ``combine_start`` start the same
work and return it in flight (``in_flight.InFlight``).

Modules: ``base.py`` (``TokenDispatcher``, ``DispatchHandle``, ``ExpertGrid``: the declared
interface and the expert grid every dispatcher is built on), ``local.py`` (``LocalDispatcher``:
every expert here), ``all_to_all.py`` (``AllToAllDispatcher``: tokens travel to their experts'
EP ranks), ``hierarchical.py`` (``HierarchicalAllToAllDispatcher``: the same exchange inside
nodes, then across), ``all_gather.py`` (``AllGatherDispatcher``: every rank of the ETP×EP group
sees all its tokens), ``row_budget.py`` (the ceiling on rows per rank), ``in_flight.py`` (a
started dispatch/combine, and ``start_beside``, compute on a side CUDA stream, for overlap),
``pipeline.py`` (dispatch → experts → combine, optionally in pipelined chunks).

``build_dispatcher`` picks one by name from ``DISPATCHER_CLASSES`` (keyed by
``config.DISPATCHERS``). A new expert-parallel dispatcher is one new module with a
``TokenDispatcher`` subclass (constructor ``(num_experts, parallel_state, row_budget)``) plus
its line in ``DISPATCHER_CLASSES`` and its name in ``config.DispatcherType``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..config import DISPATCHERS
from .all_gather import AllGatherDispatcher, AllGatherHandle
from .all_to_all import MAX_CHUNKED_EXPERTS, AllToAllDispatcher, AllToAllHandle
from .base import DispatchHandle, ExpertGrid, TokenDispatcher
from .hierarchical import HierarchicalAllToAllDispatcher
from .in_flight import InFlight, start_beside
from .local import LocalDispatcher, LocalHandle
from .pipeline import PipelineResult, run_pipeline
from .row_budget import RowBudget, kept_counts

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState

__all__ = [
    "DISPATCHERS",
    "DISPATCHER_CLASSES",
    "MAX_CHUNKED_EXPERTS",
    "AllGatherDispatcher",
    "AllGatherHandle",
    "AllToAllDispatcher",
    "AllToAllHandle",
    "DispatchHandle",
    "ExpertGrid",
    "HierarchicalAllToAllDispatcher",
    "InFlight",
    "LocalDispatcher",
    "LocalHandle",
    "PipelineResult",
    "RowBudget",
    "TokenDispatcher",
    "build_dispatcher",
    "kept_counts",
    "run_pipeline",
    "start_beside",
]

# The expert-parallel dispatchers by ``token_dispatcher_type`` (one entry per ``DISPATCHERS``).
DISPATCHER_CLASSES: dict[str, type[TokenDispatcher]] = {
    "alltoall": AllToAllDispatcher,
    "alltoall_hierarchical": HierarchicalAllToAllDispatcher,
    "allgather": AllGatherDispatcher,
}


def build_dispatcher(
    num_experts: int,
    parallel_state: Optional[ParallelState] = None,
    kind: str = "alltoall",
    row_budget: Optional[RowBudget] = None,
    static: bool = False,
) -> TokenDispatcher:
    """The dispatcher for a layer: ``LocalDispatcher`` without ``parallel_state``, else
    ``DISPATCHER_CLASSES[kind]``: ``AllToAllDispatcher`` (``kind="alltoall"``),
    ``HierarchicalAllToAllDispatcher`` (``"alltoall_hierarchical"``) or ``AllGatherDispatcher``
    (``"allgather"``), as Megatron's ``moe_token_dispatcher_type``; ``row_budget`` caps the
    rows per rank; ``static`` (``"alltoall"`` only): padded dispatches take their splits from
    ``pad_to`` alone (``MoEConfig.static_exchange``)."""
    if kind not in DISPATCHERS:
        raise ValueError(f"dispatcher kind must be one of {DISPATCHERS}, got {kind!r}")
    if parallel_state is None:
        return LocalDispatcher(num_experts, row_budget)
    if static:
        if kind != "alltoall":
            raise ValueError(f"static exchange needs kind='alltoall', got {kind!r}")
        return AllToAllDispatcher(num_experts, parallel_state, row_budget, static=True)
    return DISPATCHER_CLASSES[kind](num_experts, parallel_state, row_budget)
