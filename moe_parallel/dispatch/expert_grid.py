"""What every expert-parallel dispatcher shares: its place in the expert grid, the all-gather of
every ETP×EP rank's per-expert row counts, and the row budget enforced on those counts.

Global expert ``e`` lives on EP rank ``e // E_local`` (``E_local = E / ep``); the ETP×EP
(``tp_ep``) group orders its ``w = etp·ep`` ranks as ``r = etp_rank + etp·ep_rank``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor

from ..distributed import collectives as comm
from ..routing.router import Routing
from .row_budget import RowBudget

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState


def set_expert_grid(
    dispatcher, num_experts: int, ps: ParallelState, row_budget: Optional[RowBudget]
) -> None:
    """What every expert-parallel dispatcher keeps: the expert-grid sizes (``E % ep``
    checked), the ETP×EP (``tp_ep``) group and the row budget."""
    if num_experts % ps.ep:
        raise ValueError(f"num_experts {num_experts} is not divisible by ep {ps.ep}")
    dispatcher.num_experts = num_experts
    dispatcher.ep, dispatcher.etp = ps.ep, ps.etp
    dispatcher.num_local_experts = num_experts // ps.ep
    dispatcher.tp_ep_group = ps.group("tp_ep") if ps.ep * ps.etp > 1 else None
    dispatcher.row_budget = row_budget


def gather_counts(counts: Tensor, group) -> Tensor:
    """``[w, E]`` CPU int64: every ``tp_ep`` rank's ``counts [E]``, in group rank order
    (``r = etp_rank + etp·ep_rank``)."""
    w = comm.group_size(group)
    return comm.all_gather(counts.view(1, -1), group, [1] * w).to("cpu")


def enforce_budget(dispatcher, routing: Routing) -> tuple[Routing, bool, Optional[Tensor]]:
    """The routing after the row budget, whether it overflowed, and every ``tp_ep`` rank's kept
    counts ``[w, E]`` of it (None without a budget: nothing was gathered)."""
    if dispatcher.row_budget is None:
        return routing, False, None
    return dispatcher.row_budget.enforce(
        routing, dispatcher.num_experts, dispatcher.ep,
        lambda c: gather_counts(c, dispatcher.tp_ep_group),
    )
