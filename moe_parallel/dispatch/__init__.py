"""Token dispatch: move routed tokens to their experts and bring the results back.

Contract of every dispatcher (the expert-parallel ones follow it too):
    expert_in, group_sizes, handle = dispatcher.dispatch(x, routing, pad_to)
    y = dispatcher.combine(expert_out, handle)
``x`` [T, H] are this rank's tokens; ``expert_in`` [N, H] holds the rows of this rank's local
experts grouped by local expert, ``group_sizes`` [E_local] (CPU int64) their row counts (padding
included); ``expert_out`` is the experts' output for those rows. ``combine`` returns
    y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]            [T, H].
Every handle also carries, for the routing statistics, ``row_map`` [T, k] (-1 where ``(t, j)``
was dropped), ``tokens_per_expert`` [E] (this rank's kept assignments per global expert) and
``overflow`` (True when a ``RowBudget`` ceiling made this forward drop assignments).
Every dispatcher takes an optional ``row_budget`` (``RowBudget``): before anything moves, it
all-gathers the kept counts of its group and enforces the ceiling on rows per rank.

Modules: ``local.py`` (``LocalDispatcher``: every expert here), ``all_to_all.py``
(``AllToAllDispatcher``: tokens travel to their experts' EP ranks), ``hierarchical.py``
(``HierarchicalAllToAllDispatcher``: the same exchange inside nodes, then across), ``all_gather.py``
(``AllGatherDispatcher``: every rank of the ETP×EP group sees all its tokens), ``expert_grid.py``
(what the expert-parallel ones share), ``row_budget.py`` (the ceiling on rows per rank),
``in_flight.py`` (a started dispatch/combine: ``dispatch_start``/``combine_start``, and
``start_beside``, compute on a side CUDA stream, for overlap); ``build_dispatcher`` picks one
by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..config import DISPATCHERS
from .all_gather import AllGatherDispatcher, AllGatherHandle
from .all_to_all import MAX_CHUNKED_EXPERTS, AllToAllDispatcher, AllToAllHandle
from .hierarchical import HierarchicalAllToAllDispatcher
from .in_flight import InFlight, start_beside, start_combine, start_dispatch
from .local import LocalDispatcher, LocalHandle
from .row_budget import RowBudget, kept_counts

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState

__all__ = [
    "DISPATCHERS",
    "MAX_CHUNKED_EXPERTS",
    "AllGatherDispatcher",
    "AllGatherHandle",
    "AllToAllDispatcher",
    "AllToAllHandle",
    "HierarchicalAllToAllDispatcher",
    "InFlight",
    "LocalDispatcher",
    "LocalHandle",
    "RowBudget",
    "build_dispatcher",
    "kept_counts",
    "start_beside",
    "start_combine",
    "start_dispatch",
]




def build_dispatcher(
    num_experts: int,
    parallel_state: Optional[ParallelState] = None,
    kind: str = "alltoall",
    row_budget: Optional[RowBudget] = None,
):
    """The dispatcher for a layer: ``LocalDispatcher`` without ``parallel_state``, else
    ``AllToAllDispatcher`` (``kind="alltoall"``), ``HierarchicalAllToAllDispatcher``
    (``"alltoall_hierarchical"``) or ``AllGatherDispatcher`` (``"allgather"``), as Megatron's
    ``moe_token_dispatcher_type``; ``row_budget`` caps the rows per rank."""
    if kind not in DISPATCHERS:
        raise ValueError(f"dispatcher kind must be one of {DISPATCHERS}, got {kind!r}")
    if parallel_state is None:
        return LocalDispatcher(num_experts, row_budget)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, parallel_state, row_budget)
    if kind == "alltoall_hierarchical":
        return HierarchicalAllToAllDispatcher(num_experts, parallel_state, row_budget)
    return AllToAllDispatcher(num_experts, parallel_state, row_budget)
