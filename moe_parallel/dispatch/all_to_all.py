"""AllToAllDispatcher: routed rows travel to their experts' EP ranks by uneven all-to-all.

    rows of global expert e  ->  EP rank e // E_local, local expert e % E_local
    y[t] = Σ_{j kept} probs[t, j] · expert_out[row of (t, j)]

(steps in the class docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .. import ops
from ..distributed import collectives as comm
from ..routing.router import Routing
from .base import DispatchHandle, TokenDispatcher, gather_counts
from .in_flight import InFlight
from .row_budget import RowBudget

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState


@dataclass
class AllToAllHandle(DispatchHandle):
    """What ``AllToAllDispatcher.combine`` needs from its ``dispatch``."""

    row_map: Tensor            # [T, k] row of (t, j) in this rank's send buffer, -1 = dropped
    probs: Tensor              # [T, k] combine weights
    tokens_per_expert: Tensor  # [E] this rank's real (unpadded) rows per global expert
    send_splits: list[int]     # rows sent to each EP rank
    recv_splits: list[int]     # rows received from each EP rank
    etp_splits: list[int]      # rows each ETP rank received from its all-to-all (etp > 1)
    chunk_sizes: Tensor        # [etp * ep * E_local] CPU int64, rows in arrival order
    overflow: bool = False
    # per-expert exchange (AllToAllDispatcher._chunked): rows [l][source rank] this rank
    # receives and [l][destination rank] it sends; None for one all-to-all + sort_chunks
    chunk_splits: Optional[tuple[list[list[int]], list[list[int]]]] = None
    # hierarchical exchange (HierarchicalAllToAllDispatcher): its two stages' splits
    stages: Optional[object] = None


MAX_CHUNKED_EXPERTS = 8


def _expert_major_order(etp: int, ep: int, num_local: int) -> Optional[Tensor]:
    """Order that takes chunks ``(t, s, l)`` (ETP source, EP source, local expert; ``l`` fastest)
    to ``(l, t, s)``; None when that is the identity."""
    if etp * ep == 1 or num_local == 1:
        return None
    return torch.arange(etp * ep * num_local).view(etp * ep, num_local).t().reshape(-1)


class AllToAllDispatcher(TokenDispatcher):
    """Expert-parallel dispatch over the EP (and ETP) groups of a ``ParallelState``.

    Global expert ``e`` lives on EP rank ``e // E_local`` (``E_local = E / ep``) as its local
    expert ``e % E_local``; every rank of an ETP group holds ``F / etp`` hidden units of each of
    them. Every rank brings its own tokens (with TP > 1: sequence parallel), possibly none.

    dispatch:
      1. ``permute`` this rank's kept assignments by global expert id: rank-major, expert-minor.
         With ``pad_to > 0`` every expert's segment has exactly ``pad_to`` rows (static shapes).
      2. All-gather every rank's per-expert row counts over the ETP×EP group (as Megatron does),
         then exchange the rows (all-to-all over EP with uneven splits). Received:
         ``[EP source][local expert]``.
      3. ETP > 1: all-gather the rows over ETP: ``[ETP src][EP src][local expert]``.
      4. ``sort_chunks`` to ``[local expert][ETP src][EP src]``: each local expert's rows are
         contiguous; ``group_sizes[l] = Σ_{t,s} count[t, s, l]`` (padding included).
    On CPU with ETP = 1 and 2..``MAX_CHUNKED_EXPERTS`` local experts, steps 1-4 become: permute
    local-expert-major (``[l][destination rank]``), then one all-to-all per local expert
    (``collectives.all_to_all_chunked``), whose rows arrive as ``[l][EP src]``: no ``sort_chunks``.
    combine (the mirror): ``sort_chunks`` back; ETP > 1: reduce-scatter the partial outputs (each
    ETP rank computed ``F / etp`` hidden units, their sum is the expert output) back to the ETP
    rank that received the rows; all-to-all back over EP;
        ``y[t] = Σ_{j kept} probs[t, j] · out[row of (t, j)]``   (``unpermute``).
    Every step is differentiable. Each rank must call ``dispatch``/``combine`` (and backward)
    in the same order as the other ranks of its EP and ETP groups.
    """

    def __init__(
        self, num_experts: int, parallel_state: ParallelState,
        row_budget: Optional[RowBudget] = None, static: bool = False,
    ) -> None:
        super().__init__(num_experts, parallel_state, row_budget)
        self.static = static
        ps = parallel_state
        self.ep_rank = ps.ep_rank
        self.ep_group = ps.group("ep") if ps.ep > 1 else None
        self.etp_group = ps.group("etp") if ps.etp > 1 else None
        self.order = _expert_major_order(self.etp, self.ep, self.num_local_experts)
        self.inverse_order = None if self.order is None else torch.argsort(self.order)

    def _chunk_sizes(self, gathered: Tensor) -> Tensor:
        """``[etp, ep, E_local]`` CPU int64: rows this ETP group's rank ``t`` receives from EP
        rank ``s`` for local expert ``l``, from every ``tp_ep`` rank's send counts ``[w, E]``."""
        ep, etp, E_local = self.ep, self.etp, self.num_local_experts
        return gathered.view(ep, etp, ep, E_local)[:, :, self.ep_rank].transpose(0, 1)

    def _chunked(self, x: Tensor) -> bool:
        """Whether this dispatch exchanges rows per local expert (``all_to_all_chunked``) so
        they arrive expert-major, instead of one all-to-all and ``sort_chunks``: on CPU, with
        ETP = 1 and 2..``MAX_CHUNKED_EXPERTS`` local experts (a local copy costs about as much
        as sending the rows there; each extra exchange adds one round of messages), outside
        ``torch.compile``."""
        return (x.device.type == "cpu" and self.etp == 1 and self.ep > 1
                and 1 < self.num_local_experts <= MAX_CHUNKED_EXPERTS
                and not torch.compiler.is_compiling())  # one traced exchange

    # ---- the EP exchange (``HierarchicalAllToAllDispatcher`` overrides these) -------------
    def _send_order(self, idx: Tensor, chunked: bool) -> Tensor:
        """The ids ``permute`` sorts by, so the send buffer has the exchange's row order."""
        if chunked:  # local expert first, then EP rank: e = r·E_local + l  ->  l·ep + r
            E_local = self.num_local_experts
            return (idx % E_local) * self.ep + idx // E_local
        return idx

    def _global_counts(self, counts: Tensor, chunked: bool) -> Tensor:
        """``permute``'s counts (in ``_send_order``) back in global expert order."""
        if chunked:
            return counts.view(self.num_local_experts, self.ep).t().reshape(self.num_experts)
        return counts

    def _ep_start(self, permuted: Tensor, send_counts: Tensor, gathered: Tensor,
                  chunk_sizes: Tensor, chunked: bool, splits: tuple[list[int], list[int]]):
        """Start the exchange over EP (``splits``: the rows sent to and received from each EP
        rank): ``(rows, Pending, chunk_splits, stages)``; once the ``Pending`` is waited for,
        ``rows`` are ``[EP source][local expert]`` (``chunked``: ``[l][EP src]``).
        ``chunk_splits`` and ``stages`` go to the handle, for combine."""
        if chunked:  # [l][source rank] received, [l][destination rank] sent
            if isinstance(send_counts, int):  # static: pad_to rows everywhere
                chunk_splits = ([[send_counts] * self.ep] * self.num_local_experts,) * 2
            else:
                chunk_splits = (chunk_sizes[0].t().tolist(),
                                send_counts.view(self.ep, self.num_local_experts).t().tolist())
            rows, pending = comm.all_to_all_chunked(permuted, *chunk_splits, self.ep_group,
                                                    async_op=True)
            return rows, pending, chunk_splits, None
        send_splits, recv_splits = splits
        rows, pending = comm.all_to_all(permuted, recv_splits, send_splits, self.ep_group,
                                        async_op=True)
        return rows, pending, None, None

    def _ep_back_start(self, y: Tensor, handle: AllToAllHandle):
        """Start the EP exchange back: ``(y, Pending)``, ``y`` in the send buffer's order once
        waited for (up to ``_ep_back_finish``)."""
        if handle.chunk_splits is not None:
            received, sent = handle.chunk_splits
            return comm.all_to_all_chunked(y, sent, received, self.ep_group, async_op=True)
        return comm.all_to_all(y, handle.send_splits, handle.recv_splits, self.ep_group,
                               async_op=True)

    def _ep_back_finish(self, y: Tensor, handle: AllToAllHandle) -> Tensor:
        """What remains of the exchange back after its ``Pending``: nothing for the flat one."""
        return y

    # ---- dispatch / combine ---------------------------------------------------------------
    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, AllToAllHandle]:
        """``(expert_in, group_sizes [E_local] CPU int64, handle)``: the rows of this rank's local
        experts from every rank of its EP (and ETP) group, grouped by local expert (steps 1-4 of
        the class docstring). A collective over the ``tp_ep``, EP and ETP groups."""
        return self.dispatch_start(x, routing, pad_to).finish()

    def dispatch_start(self, x: Tensor, routing: Routing, pad_to: int = 0) -> InFlight:
        """``dispatch`` with its EP row exchange left in flight (``in_flight.py``): steps 1-2
        run now; ``finish()`` waits and runs 3-4, returning ``dispatch``'s result."""
        E, ep, E_local = self.num_experts, self.ep, self.num_local_experts
        routing, overflow, gathered = self.enforce_row_budget(routing)
        chunked = self._chunked(x)
        idx = self._send_order(routing.expert_idx, chunked)
        # pad_to > 0: the counts are bounded by capacity (apply_capacity) and the ids by the
        # router, so nothing is read back to check them
        permuted, row_map, counts = ops.permute(x, idx, E, routing.keep, pad_to,
                                                validate=pad_to == 0)
        counts = self._global_counts(counts, chunked)
        # static: every rank pads to the same pad_to, so the splits follow from it alone (no
        # counts exchanged, nothing read back); otherwise the padded counts are all-gathered
        if pad_to > 0 and self.static:
            send_counts, chunk_sizes = pad_to, None
            send_splits = recv_splits = [E_local * pad_to] * ep
            etp_splits = [ep * E_local * pad_to] * self.etp
            group_sizes = torch.full((E_local,), self.etp * ep * pad_to, dtype=torch.int64)
            arrival = torch.full((self.etp * ep * E_local,), pad_to, dtype=torch.int64)
        else:
            send_counts = torch.full_like(counts, pad_to) if pad_to > 0 else counts
            if gathered is None or pad_to > 0:  # the budget's gather already holds send_counts
                gathered = gather_counts(send_counts, self.tp_ep_group)
            chunk_sizes = self._chunk_sizes(gathered)
            send_splits = send_counts.view(ep, E_local).sum(1).tolist()
            etp_splits = chunk_sizes.sum((1, 2)).tolist()
            recv_splits = chunk_sizes[comm.group_rank(self.etp_group)].sum(1).tolist()
            group_sizes = chunk_sizes.sum((0, 1))  # [E_local], over ETP and EP sources
            arrival = chunk_sizes.reshape(-1)
        rows, pending, chunk_splits, stages = self._ep_start(
            permuted, send_counts, gathered, chunk_sizes, chunked, (send_splits, recv_splits))
        handle = AllToAllHandle(
            row_map, routing.probs, counts, send_splits, recv_splits, etp_splits,
            arrival, overflow, chunk_splits, stages,
        )

        def finish() -> tuple[Tensor, Tensor, AllToAllHandle]:
            pending.wait()
            out = rows
            if chunk_splits is None:
                out = comm.all_gather(out, self.etp_group, etp_splits)
                if self.order is not None:
                    out = ops.sort_chunks(out, arrival, self.order)
            return out, group_sizes, handle

        return InFlight(finish)

    def combine(self, expert_out: Tensor, handle: AllToAllHandle) -> Tensor:
        """The mirror of ``dispatch``: ``y[t] = Σ_{j kept} probs[t, j] · out[row of (t, j)]``,
        ``[T, H]`` for this rank's own tokens. A collective, as ``dispatch``."""
        return self.combine_start(expert_out, handle).finish()

    def combine_start(self, expert_out: Tensor, handle: AllToAllHandle) -> InFlight[Tensor]:
        """``combine`` with its EP exchange back left in flight; ``finish()`` waits and
        returns ``combine``'s result."""
        y = expert_out
        if handle.chunk_splits is None:
            if self.order is not None:
                y = ops.sort_chunks(y, handle.chunk_sizes[self.order], self.inverse_order)
            y = comm.reduce_scatter(y, handle.etp_splits, self.etp_group)
        y, pending = self._ep_back_start(y, handle)

        def finish() -> Tensor:
            pending.wait()
            out = self._ep_back_finish(y, handle)
            return ops.unpermute(out, handle.row_map, handle.probs, validate=False)

        return InFlight(finish)
