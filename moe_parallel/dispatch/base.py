"""The declared dispatcher interface: ``TokenDispatcher``, the ``DispatchHandle`` every dispatch
hands to its combine, and the ``ExpertGrid`` every dispatcher is built on.

    expert_in, group_sizes, handle = dispatcher.dispatch(x, routing, pad_to)
    y = dispatcher.combine(expert_out, handle)
    y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]                [T, H]

Global expert ``e`` lives on EP rank ``e // E_local`` (``E_local = E / ep``) as its local expert
``e % E_local``; the ETP×EP (``tp_ep``) group orders its ``w = etp·ep`` ranks as
``r = etp_rank + etp·ep_rank``. Without a ``ParallelState`` the grid is one rank holding every
expert (``ep = etp = 1``, no group).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from ..distributed import collectives as comm
from ..routing.router import Routing
from .in_flight import InFlight, done
from .row_budget import RowBudget

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState


@dataclass(frozen=True)
class ExpertGrid:
    """Where the experts live: ``num_experts`` global experts over ``ep`` EP ranks (this one:
    ``ep_rank``), each expert's hidden units over ``etp`` ETP ranks, and the ``tp_ep`` group
    that spans them (None when ``ep·etp = 1``)."""

    num_experts: int
    ep: int = 1
    etp: int = 1
    ep_rank: int = 0
    tp_ep_group: Any = None

    @classmethod
    def build(cls, num_experts: int, parallel_state: Optional[ParallelState] = None
              ) -> ExpertGrid:
        """The grid of ``parallel_state`` (``num_experts % ep`` checked); one rank without it."""
        ps = parallel_state
        if ps is None:
            return cls(num_experts)
        if num_experts % ps.ep:
            raise ValueError(f"num_experts {num_experts} is not divisible by ep {ps.ep}")
        group = ps.group("tp_ep") if ps.ep * ps.etp > 1 else None
        return cls(num_experts, ps.ep, ps.etp, ps.ep_rank, group)

    @property
    def num_local_experts(self) -> int:
        """``E_local = E / ep``: the experts of each EP rank."""
        return self.num_experts // self.ep


def gather_counts(counts: Tensor, group) -> Tensor:
    """``[w, E]`` CPU int64: every ``tp_ep`` rank's ``counts [E]``, in group rank order
    (``r = etp_rank + etp·ep_rank``)."""
    w = comm.group_size(group)
    return comm.all_gather(counts.view(1, -1), group, [1] * w).to("cpu")


class DispatchHandle:
    """What a dispatch hands to its combine; every dispatcher's handle subclasses this and adds
    what its own combine needs. Declared for the caller (the routing statistics):

    * ``row_map`` ``[T, k]`` int64: the row of ``expert_in`` holding assignment ``(t, j)`` of this
      rank's tokens (on the EP rank owning its expert), -1 where ``(t, j)`` was dropped;
    * ``tokens_per_expert`` ``[E]``: this rank's kept assignments per global expert (real rows,
      padding excluded);
    * ``overflow``: True when a ``RowBudget`` ceiling made this forward drop assignments.
    Padding rows (``pad_to > 0``) are part of ``expert_in`` and ``group_sizes``, not of these.
    """

    row_map: Tensor
    tokens_per_expert: Tensor
    overflow: bool


class TokenDispatcher(abc.ABC):
    """Moves routed tokens to their experts and brings the results back.

    Built from ``(num_experts, parallel_state=None, row_budget=None)``: ``grid`` (``ExpertGrid``)
    is fixed at construction; ``row_budget`` (``RowBudget`` or None) caps the rows per rank and
    may be set later with ``set_row_budget``. ``dispatch`` and ``combine`` are abstract;
    ``dispatch_start`` / ``combine_start`` run them synchronously and return finished
    ``InFlight`` work (a dispatcher with an asynchronous exchange overrides them). Each rank must
    call them (and their backward) in the same order as the other ranks of its groups.
    """

    grid: ExpertGrid
    row_budget: Optional[RowBudget]

    def __init__(self, num_experts: int, parallel_state: Optional[ParallelState] = None,
                 row_budget: Optional[RowBudget] = None) -> None:
        self.grid = ExpertGrid.build(num_experts, parallel_state)
        self.row_budget = row_budget

    @property
    def num_experts(self) -> int:
        """``E``: the global experts (``grid.num_experts``)."""
        return self.grid.num_experts

    @property
    def num_local_experts(self) -> int:
        """``E_local = E / ep``: the experts of each EP rank."""
        return self.grid.num_local_experts

    @property
    def ep(self) -> int:
        """The EP size (``grid.ep``)."""
        return self.grid.ep

    @property
    def etp(self) -> int:
        """The ETP size (``grid.etp``)."""
        return self.grid.etp

    @property
    def tp_ep_group(self) -> Any:
        """The ETP×EP group (``grid.tp_ep_group``; None when ``ep·etp = 1``)."""
        return self.grid.tp_ep_group

    def set_row_budget(self, row_budget: Optional[RowBudget]) -> None:
        """Cap the rows per rank of later dispatches with ``row_budget`` (None: no ceiling)."""
        self.row_budget = row_budget

    @abc.abstractmethod
    def dispatch(self, x: Tensor, routing: Routing, pad_to: int = 0
                 ) -> tuple[Tensor, Tensor, DispatchHandle]:
        """``(expert_in [N, H], group_sizes [E_local] CPU int64, handle)``: the rows of this rank's
        local experts, grouped by local expert, and their row counts (padding included; with
        ``pad_to > 0`` every expert's segment holds exactly ``pad_to`` rows from each source
        rank: its kept rows, then zeros). ``x`` [T, H] are this rank's tokens (T may be 0).
        Before anything moves, a ``row_budget`` is enforced on the group's kept counts."""

    @abc.abstractmethod
    def combine(self, expert_out: Tensor, handle: DispatchHandle) -> Tensor:
        """``y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]`` ``[T, H]`` for this
        rank's own tokens; ``expert_out`` [N, H] are the experts' outputs for ``expert_in``."""

    def dispatch_start(self, x: Tensor, routing: Routing, pad_to: int = 0) -> InFlight:
        """``dispatch`` started: ``finish()`` returns its result (here: computed now)."""
        return done(self.dispatch(x, routing, pad_to))

    def combine_start(self, expert_out: Tensor, handle: DispatchHandle) -> InFlight[Tensor]:
        """``combine`` started: ``finish()`` returns its result (here: computed now)."""
        return done(self.combine(expert_out, handle))

    def enforce_row_budget(self, routing: Routing) -> tuple[Routing, bool, Optional[Tensor]]:
        """The routing after the row budget, whether it overflowed, and every ``tp_ep`` rank's
        kept counts ``[w, E]`` of it (None without a budget: nothing was gathered). A collective
        over the ``tp_ep`` group when a budget is set."""
        if self.row_budget is None:
            return routing, False, None
        group = self.tp_ep_group
        return self.row_budget.enforce(routing, self.num_experts, self.ep,
                                       lambda c: gather_counts(c, group))
