"""Token dispatchers: move routed tokens to their experts and bring the results back.

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
Every dispatcher takes an optional ``row_budget`` (``row_budget.RowBudget``): before anything
moves, it all-gathers the kept counts of its group and enforces the ceiling on rows per rank.

Dispatchers: ``LocalDispatcher`` (every expert here), ``AllToAllDispatcher`` (tokens travel to
their experts' EP ranks) and ``AllGatherDispatcher`` (every rank of the ETP×EP group sees all
its tokens); ``build_dispatcher`` picks one by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from . import comm, ops
from .router import Routing
from .row_budget import RowBudget

if TYPE_CHECKING:
    from .parallel_state import ParallelState


@dataclass
class LocalHandle:
    """What ``LocalDispatcher.combine`` needs from its ``dispatch``."""

    row_map: Tensor            # [T, k] row of (t, j) in expert_in, -1 when dropped
    probs: Tensor              # [T, k] combine weights
    tokens_per_expert: Tensor  # [E] real (unpadded) rows per expert
    overflow: bool = False


class LocalDispatcher:
    """All experts live on this process: dispatch is a permutation, combine its weighted inverse.

    ``pad_to > 0`` lays every expert's rows out as exactly ``pad_to`` rows (zero padding after
    the real ones), giving static shapes for capacity mode.
    """

    def __init__(self, num_experts: int, row_budget: Optional[RowBudget] = None) -> None:
        self.num_experts = num_experts
        self.row_budget = row_budget

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, LocalHandle]:
        overflow = False
        if self.row_budget is not None:
            routing, overflow, _ = self.row_budget.enforce(
                routing, self.num_experts, 1, lambda c: c.view(1, -1).to("cpu")
            )
        # One host round trip checks the ids and brings the group sizes (dropless) along.
        host_counts = ops.expert_counts(
            routing.expert_idx, self.num_experts, routing.keep, pad_to
        )
        expert_in, row_map, counts = ops.permute(
            x, routing.expert_idx, self.num_experts, routing.keep, pad_to, validate=False
        )
        if pad_to > 0:
            group_sizes = torch.full((self.num_experts,), pad_to, dtype=torch.int64)
        else:
            group_sizes = host_counts
        return expert_in, group_sizes, LocalHandle(row_map, routing.probs, counts, overflow)

    def combine(self, expert_out: Tensor, handle: LocalHandle) -> Tensor:
        return ops.unpermute(expert_out, handle.row_map, handle.probs, validate=False)


# ---- expert parallel ----------------------------------------------------------------------------


@dataclass
class AllToAllHandle:
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


MAX_CHUNKED_EXPERTS = 8


def _expert_major_order(etp: int, ep: int, num_local: int) -> Optional[Tensor]:
    """Order that takes chunks ``(t, s, l)`` (ETP source, EP source, local expert; ``l`` fastest)
    to ``(l, t, s)``; None when that is the identity."""
    if etp * ep == 1 or num_local == 1:
        return None
    return torch.arange(etp * ep * num_local).view(etp * ep, num_local).t().reshape(-1)


def _set_expert_grid(
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


def _gather_counts(counts: Tensor, group) -> Tensor:
    """``[w, E]`` CPU int64: every ``tp_ep`` rank's ``counts [E]``, in group rank order
    (``r = etp_rank + etp·ep_rank``)."""
    w = comm.group_size(group)
    return comm.all_gather(counts.view(1, -1), group, [1] * w).to("cpu")


def _enforce_budget(dispatcher, routing: Routing) -> tuple[Routing, bool, Optional[Tensor]]:
    """The routing after the row budget, whether it overflowed, and every ``tp_ep`` rank's kept
    counts ``[w, E]`` of it (None without a budget: nothing was gathered)."""
    if dispatcher.row_budget is None:
        return routing, False, None
    return dispatcher.row_budget.enforce(
        routing, dispatcher.num_experts, dispatcher.ep,
        lambda c: _gather_counts(c, dispatcher.tp_ep_group),
    )


class AllToAllDispatcher:
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
    (``comm.all_to_all_chunked``), whose rows arrive as ``[l][EP src]``: no ``sort_chunks``.
    combine (the mirror): ``sort_chunks`` back; ETP > 1: reduce-scatter the partial outputs (each
    ETP rank computed ``F / etp`` hidden units, their sum is the expert output) back to the ETP
    rank that received the rows; all-to-all back over EP;
        ``y[t] = Σ_{j kept} probs[t, j] · out[row of (t, j)]``   (``unpermute``).
    Every step is differentiable. Each rank must call ``dispatch``/``combine`` (and backward)
    in the same order as the other ranks of its EP and ETP groups.
    """

    def __init__(
        self, num_experts: int, parallel_state: ParallelState,
        row_budget: Optional[RowBudget] = None,
    ) -> None:
        ps = parallel_state
        _set_expert_grid(self, num_experts, ps, row_budget)
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
        as sending the rows there; each extra exchange adds one round of messages)."""
        return (x.device.type == "cpu" and self.etp == 1 and self.ep > 1
                and 1 < self.num_local_experts <= MAX_CHUNKED_EXPERTS)

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, AllToAllHandle]:
        E, ep, E_local = self.num_experts, self.ep, self.num_local_experts
        routing, overflow, gathered = _enforce_budget(self, routing)
        chunked = self._chunked(x)
        idx = routing.expert_idx
        if chunked:  # local expert first, then EP rank: e = r·E_local + l  ->  l·ep + r
            idx = (idx % E_local) * ep + idx // E_local
        permuted, row_map, counts = ops.permute(x, idx, E, routing.keep, pad_to)
        if chunked:
            counts = counts.view(E_local, ep).t().reshape(E)  # back to global expert order
        send_counts = torch.full_like(counts, pad_to) if pad_to > 0 else counts
        if gathered is None or pad_to > 0:  # the budget's gather already holds send_counts
            gathered = _gather_counts(send_counts, self.tp_ep_group)
        chunk_sizes = self._chunk_sizes(gathered)
        send_splits = send_counts.view(ep, E_local).sum(1).tolist()
        etp_splits = chunk_sizes.sum((1, 2)).tolist()
        recv_splits = chunk_sizes[comm.group_rank(self.etp_group)].sum(1).tolist()
        group_sizes = chunk_sizes.sum((0, 1))  # [E_local], over ETP and EP sources
        chunk_splits = None
        if chunked:  # [l][source rank] received, [l][destination rank] sent
            chunk_splits = (chunk_sizes[0].t().tolist(),
                            send_counts.view(ep, E_local).t().tolist())
            rows = comm.all_to_all_chunked(permuted, *chunk_splits, self.ep_group)
        else:
            rows = comm.all_to_all(permuted, recv_splits, send_splits, self.ep_group)
            rows = comm.all_gather(rows, self.etp_group, etp_splits)
            if self.order is not None:
                rows = ops.sort_chunks(rows, chunk_sizes.reshape(-1), self.order)
        handle = AllToAllHandle(
            row_map, routing.probs, counts, send_splits, recv_splits, etp_splits,
            chunk_sizes.reshape(-1), overflow, chunk_splits,
        )
        return rows, group_sizes, handle

    def combine(self, expert_out: Tensor, handle: AllToAllHandle) -> Tensor:
        y = expert_out
        if handle.chunk_splits is not None:
            received, sent = handle.chunk_splits
            y = comm.all_to_all_chunked(y, sent, received, self.ep_group)
        else:
            if self.order is not None:
                y = ops.sort_chunks(y, handle.chunk_sizes[self.order], self.inverse_order)
            y = comm.reduce_scatter(y, handle.etp_splits, self.etp_group)
            y = comm.all_to_all(y, handle.send_splits, handle.recv_splits, self.ep_group)
        return ops.unpermute(y, handle.row_map, handle.probs, validate=False)


# ---- expert parallel, all-gather flavour ------------------------------------------------------


@dataclass
class AllGatherHandle:
    """What ``AllGatherDispatcher.combine`` needs from its ``dispatch``.

    The gathered token space is ``cat([tokens of tp_ep rank 0], ..., [tokens of rank w-1])``
    (``T_all`` tokens); this rank's own tokens are its rows ``[offset, offset + T)``.
    """

    gathered_row_map: Tensor   # [T_all, k] row of (t, j) in expert_in; -1: dropped or not local
    gathered_probs: Tensor     # [T_all, k] combine weights of every gathered token
    gathered_idx: Tensor       # [T_all, k] global expert ids of every gathered assignment
    gathered_keep: Tensor      # [T_all, k] bool: kept assignments (any expert)
    token_counts: list[int]    # tokens of each tp_ep rank (the reduce-scatter splits)
    pads: list[int]            # pad_to of each tp_ep rank (0: that rank does not pad)
    group_rank: int            # this rank's index in the tp_ep group
    num_local_experts: int
    tokens_per_expert: Tensor  # [E] this rank's own real (unpadded) kept assignments per expert
    overflow: bool = False

    @property
    def offset(self) -> int:
        return sum(self.token_counts[: self.group_rank])

    @cached_property
    def row_map(self) -> Tensor:
        """``[T, k]`` for this rank's own tokens: the row of ``(t, j)`` in the ``expert_in`` of
        the EP rank owning expert ``e = idx[t, j]`` (the same row on each of its ETP ranks), -1
        when dropped. Every rank holds the whole group's routing, so no communication is needed:
        sorting the gathered kept assignments by ``(e, t, j)`` (as ``permute`` does) gives each
        its position ``within`` its expert, and with ``l = e mod E_local``
            row = l · Σ_r pads[r] + within                   (padded),
            row = Σ_{e - l <= e' < e} count(e') + within      (otherwise).
        On the owning rank this equals ``gathered_row_map`` of those rows."""
        E_local = self.num_local_experts
        flat, kept = self.gathered_idx.reshape(-1), self.gathered_keep.reshape(-1)
        num_experts = self.tokens_per_expert.numel()
        key = torch.where(kept, flat, torch.full_like(flat, num_experts))  # dropped sort last
        order = torch.sort(key, stable=True).indices
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat[kept], minlength=num_experts)
        start = torch.cumsum(counts, 0) - counts  # sorted position of each expert's first row
        e = torch.where(kept, flat, torch.zeros_like(flat))
        within = pos - start[e]
        local = e % E_local
        pad = sum(self.pads)
        seg_start = local * pad if pad > 0 else start[e] - start[e - local]
        rows = torch.where(kept, seg_start + within, torch.full_like(flat, -1))
        T = self.token_counts[self.group_rank]
        return rows.view_as(self.gathered_idx)[self.offset: self.offset + T]


class AllGatherDispatcher:
    """Expert-parallel dispatch by all-gather over the ETP×EP (``tp_ep``) group, as Megatron's
    ``MoEAllGatherTokenDispatcher``: suited to TP-heavy layouts and large ``k``, where most
    gathered tokens have work on every rank.

    Global expert ``e`` lives on EP rank ``e // E_local`` as its local expert ``e % E_local``;
    every ETP rank holds ``F / etp`` hidden units of each. Let ``r = 0..w-1`` index the
    ``w = etp · ep`` ranks of the group (``r = etp_rank + etp · ep_rank``), each with its own
    ``T_r >= 0`` tokens.

    dispatch:
      1. all-gather ``(T_r, pad_to_r)``, then the tokens ``x``, the routing ``(expert_idx, keep)``
         and ``probs``: ``X = cat_r x_r`` ``[T_all, H]`` and likewise ``IDX, KEEP, P``.
      2. Keep the assignments of local experts, ``ep_rank·E_local <= IDX < (ep_rank+1)·E_local``,
         and ``permute`` them by local id ``IDX - ep_rank·E_local`` (order ``(l, t, j)``).
         ``pad_to_r > 0`` anywhere: every local expert's segment has ``Σ_r pad_to_r`` rows (its
         kept rows, then zeros), the same static size as ``AllToAllDispatcher`` gives it.
      ``group_sizes[l]`` = rows of local expert ``l`` (padding included).
    combine: ``Y[t] = Σ_{j kept, IDX[t, j] local} P[t, j] · out[row of (t, j)]`` (``unpermute``
      into the gathered token space), then reduce-scatter over the group by ``T_r``:
          ``y_r = Σ_{ranks q} Y_q[rows of r]``,
      which adds the contributions of the experts on the other EP ranks and, with ETP > 1, the
      partial sums over ``F / etp`` hidden units of the ETP ranks. The result is
      ``y[t] = Σ_{j kept} probs[t, j] · expert_{idx[t, j]}(x[t])``, as ``AllToAllDispatcher``.
    Gradients reach ``x`` (the all-gather's backward is a reduce-scatter) and ``probs`` (the
    router: ``grad P[t, j] = <grad Y[t], out[row]>``, summed over the group). Every rank of the
    group must call ``dispatch``/``combine`` (and backward) in the same order.
    """

    def __init__(
        self, num_experts: int, parallel_state: ParallelState,
        row_budget: Optional[RowBudget] = None,
    ) -> None:
        ps = parallel_state
        _set_expert_grid(self, num_experts, ps, row_budget)
        self.first_expert = ps.ep_rank * self.num_local_experts
        self.group = self.tp_ep_group

    def dispatch(
        self, x: Tensor, routing: Routing, pad_to: int = 0
    ) -> tuple[Tensor, Tensor, AllGatherHandle]:
        E, E_local, group = self.num_experts, self.num_local_experts, self.group
        w = comm.group_size(group)
        routing, overflow, _ = _enforce_budget(self, routing)
        idx = routing.expert_idx
        keep = torch.ones_like(idx, dtype=torch.bool) if routing.keep is None else routing.keep
        tokens_per_expert = torch.bincount(idx[keep], minlength=E)

        meta = torch.tensor([[x.shape[0], pad_to]], dtype=torch.int64, device=x.device)
        token_counts, pads = comm.all_gather(meta, group, [1] * w).t().tolist()
        xs = comm.all_gather(x, group, token_counts)
        k = idx.shape[1]
        route = comm.all_gather(torch.cat([idx, keep.to(idx.dtype)], 1), group, token_counts)
        idx_all, keep_all = route[:, :k], route[:, k:].bool()
        probs_all = comm.all_gather(routing.probs, group, token_counts)

        local_idx = idx_all - self.first_expert
        local = keep_all & (local_idx >= 0) & (local_idx < E_local)
        local_idx = torch.where(local, local_idx, torch.zeros_like(local_idx))
        pad = sum(pads)
        expert_in, row_map, counts = ops.permute(xs, local_idx, E_local, local, pad)
        if pad > 0:
            group_sizes = torch.full((E_local,), pad, dtype=torch.int64)
        else:
            group_sizes = counts.to("cpu", torch.int64)
        handle = AllGatherHandle(
            row_map, probs_all, idx_all, keep_all, token_counts, pads, comm.group_rank(group),
            E_local, tokens_per_expert, overflow,
        )
        return expert_in, group_sizes, handle

    def combine(self, expert_out: Tensor, handle: AllGatherHandle) -> Tensor:
        y = ops.unpermute(expert_out, handle.gathered_row_map, handle.gathered_probs,
                          validate=False)
        return comm.reduce_scatter(y, handle.token_counts, self.group)


DISPATCHERS = ("alltoall", "allgather")


def build_dispatcher(
    num_experts: int,
    parallel_state: Optional[ParallelState] = None,
    kind: str = "alltoall",
    row_budget: Optional[RowBudget] = None,
):
    """The dispatcher for a layer: ``LocalDispatcher`` without ``parallel_state``, else
    ``AllToAllDispatcher`` (``kind="alltoall"``) or ``AllGatherDispatcher`` (``"allgather"``),
    as Megatron's ``moe_token_dispatcher_type``; ``row_budget`` caps the rows per rank."""
    if kind not in DISPATCHERS:
        raise ValueError(f"dispatcher kind must be one of {DISPATCHERS}, got {kind!r}")
    if parallel_state is None:
        return LocalDispatcher(num_experts, row_budget)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, parallel_state, row_budget)
    return AllToAllDispatcher(num_experts, parallel_state, row_budget)
