"""HierarchicalAllToAllDispatcher: the EP all-to-all in two stages, inside the node, then
across nodes (Tutel's 2D-hierarchical all-to-all), so each rank sends ``n - 1`` messages across
nodes, each ``g`` times larger, instead of ``ep - g`` small ones.

An EP group of ``ep = n·g`` ranks spans ``n`` nodes with ``g`` ranks each; EP rank ``a·g + i``
is rank ``i`` of node ``a`` (``ParallelState``'s ``ep_node`` group: the ``g`` ranks of node
``a``; ``ep_rail``: the ``n`` ranks with local index ``i``). With ``C[s, d, l]`` the rows EP rank
``s`` sends to local expert ``l`` of EP rank ``d``, rank ``(a, j)``:
  1. permutes its rows as ``[dest local index j'][dest node b][l]`` and all-to-alls them over
     ``ep_node``: rank ``(a, i)`` sends it the rows ``[b][l]`` it holds for ``(b, j)``, every b;
     received ``[i][b][l]`` (sizes ``C[(a, i), (b, j), l]``);
  2. ``sort_chunks`` to ``[b][i][l]``: one block per destination node, ``g`` sources each;
  3. all-to-alls over ``ep_rail``: block ``b`` to rank ``(b, j)``; received from ``(a', j)``:
     ``[i][l]`` of every ``(a', i)``, i.e. ``[EP source][local expert]``, exactly what the flat
     all-to-all delivers. ETP gather and the expert-major reorder follow unchanged.
Combine runs the stages backwards (3, 2⁻¹, 1 with the splits swapped). Only rows move, so
the results equal the flat dispatcher's bitwise. With ``g = ep`` (one node) or ``g = 1`` (one
EP rank per node) one stage is empty and this is the flat all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from .. import ops
from ..distributed import collectives as comm
from .all_to_all import AllToAllDispatcher, AllToAllHandle
from .row_budget import RowBudget

if TYPE_CHECKING:
    from ..distributed.parallel_state import ParallelState


@dataclass
class Stages:
    """The splits of the two stages, for combine (and backward) to run them backwards."""

    node_recv: list[int]   # stage 1: rows from each rank of this node
    node_send: list[int]   # stage 1: rows to each rank of this node
    blocks: Tensor         # [n·g·E_local] CPU int64: sizes of the [b][i][l] chunks
    rail_recv: list[int]   # stage 3: rows from each node (its rank with this local index)
    rail_send: list[int]   # stage 3: rows to each node


class HierarchicalAllToAllDispatcher(AllToAllDispatcher):
    """``AllToAllDispatcher`` with the EP exchange in two stages (module docstring).

    Needs the ``ep_node`` and ``ep_rail`` groups of ``ParallelState.build`` (nodes from its
    ``ranks_per_node``, by default the launcher's ``LOCAL_WORLD_SIZE``). Same contract and
    results as ``AllToAllDispatcher``; never uses its per-expert (chunked) exchange.
    """

    def __init__(
        self, num_experts: int, parallel_state: ParallelState,
        row_budget: Optional[RowBudget] = None,
    ) -> None:
        super().__init__(num_experts, parallel_state, row_budget)
        ps = parallel_state
        g = ps.ep_per_node
        if g is None:
            rpn = ps.ranks_per_node
            raise ValueError(
                "token_dispatcher_type='alltoall_hierarchical' needs each EP group to lie on "
                "its nodes in equal consecutive blocks of ranks; "
                + (f"with ranks_per_node={rpn} the EP group {ps.ranks.get('ep')} does not"
                   if rpn is not None else "this parallel_state knows no nodes")
                + ": build it with ParallelState.build(..., ranks_per_node=R), R dividing the "
                "world, or use token_dispatcher_type='alltoall'"
            )
        self.ep_per_node, self.nodes = g, self.ep // g
        self.two_stage = 1 < g < self.ep
        if self.two_stage:
            self.node_group, self.rail_group = ps.group("ep_node"), ps.group("ep_rail")
            if self.node_group is None or self.rail_group is None:
                raise ValueError(
                    "parallel_state has no ep_node/ep_rail process groups (built with "
                    "create_groups=False or by hand): build it with ParallelState.build(...)"
                )
            n, E_local = self.nodes, self.num_local_experts
            # chunks (i, b, l) -> (b, i, l)
            self.block_order = torch.arange(g * n * E_local).view(g, n, E_local).permute(
                1, 0, 2).reshape(-1)
            self.block_inverse = torch.argsort(self.block_order)

    def _chunked(self, x: Tensor) -> bool:
        return False

    def _send_order(self, idx: Tensor, chunked: bool) -> Tensor:
        if not self.two_stage:
            return idx
        g, n, E_local = self.ep_per_node, self.nodes, self.num_local_experts
        r, l = idx // E_local, idx % E_local  # EP rank r = b·g + j'  ->  order (j', b, l)
        return ((r % g) * n + r // g) * E_local + l

    def _global_counts(self, counts: Tensor, chunked: bool) -> Tensor:
        if not self.two_stage:
            return counts
        g, n, E_local = self.ep_per_node, self.nodes, self.num_local_experts
        return counts.view(g, n, E_local).transpose(0, 1).reshape(self.num_experts)

    def _ep_start(self, permuted: Tensor, send_counts: Tensor, gathered: Tensor,
                  chunk_sizes: Tensor, chunked: bool, splits: tuple[list[int], list[int]]):
        if not self.two_stage:
            return super()._ep_start(permuted, send_counts, gathered, chunk_sizes, False,
                                     splits)
        ep, etp, g, n, E_local = self.ep, self.etp, self.ep_per_node, self.nodes, \
            self.num_local_experts
        me = self.ep_rank
        a, j = divmod(me, g)
        # C[s, d, l]: rows EP rank s (this ETP rank's EP group) sends to local expert l of d
        C = gathered.view(ep, etp, ep, E_local)[:, comm.group_rank(self.etp_group)]
        blocks = C.view(n, g, n, g, E_local)[a, :, :, j, :]  # [i][b][l] received in stage 1
        node_send = send_counts.view(n, g, E_local).sum((0, 2)).tolist()
        node_recv = blocks.sum((1, 2)).tolist()
        rows = comm.all_to_all(permuted, node_recv, node_send, self.node_group)
        rows = ops.sort_chunks(rows, blocks.reshape(-1), self.block_order)  # [b][i][l]
        rail_send = blocks.sum((0, 2)).tolist()
        rail_recv = C[:, me].reshape(n, g * E_local).sum(1).tolist()
        rows, pending = comm.all_to_all(rows, rail_recv, rail_send, self.rail_group,
                                        async_op=True)
        stages = Stages(node_recv, node_send, blocks.reshape(-1).clone(), rail_recv, rail_send)
        return rows, pending, None, stages

    def _ep_back_start(self, y: Tensor, handle: AllToAllHandle):
        if not self.two_stage:
            return super()._ep_back_start(y, handle)
        st = handle.stages
        return comm.all_to_all(y, st.rail_send, st.rail_recv, self.rail_group, async_op=True)

    def _ep_back_finish(self, y: Tensor, handle: AllToAllHandle) -> Tensor:
        if not self.two_stage:
            return y
        st = handle.stages
        y = ops.sort_chunks(y, st.blocks[self.block_order], self.block_inverse)  # [i][b][l]
        return comm.all_to_all(y, st.node_send, st.node_recv, self.node_group)
