"""ParallelState: the dense and expert process grids over one world, and this rank's place in them.

Dense grid  ``world = PP × DP × CP × TP``,   rank = tp + TP·(cp + CP·(dp + DP·pp))
Expert grid ``world = PP × EDP × EP × ETP``, rank = etp + ETP·(ep + EP·(edp + EDP·pp))
(TP / ETP fastest, as Megatron-Core's ``tp-cp-ep-dp-pp`` order.) ``dp = world / (pp·cp·tp)`` and
``edp = world / (pp·ep·etp)`` are derived. Groups held (torch ProcessGroups, one per grid axis
through this rank): dense ``tp, cp, dp, dp_cp, pp``; expert ``ep, etp, edp, tp_ep`` (the ETP×EP
block); ``stage``, the ``tp·cp·dp = ep·etp·edp`` ranks of this pipeline stage (the whole world
when ``pp = 1``: every group but ``pp`` lies inside it). Every rank creates every group in the
same order, as ``new_group`` requires.

Nodes: ranks ``[m·R, (m+1)·R)`` share node ``m`` (``R = ranks_per_node``, the launcher's local
world). When each EP group spans ``n > 1`` nodes with ``g > 1`` of its ranks on each (EP rank
``e = a·g + i``: node ``a``, local index ``i``), two more groups serve the hierarchical
all-to-all: ``ep_node`` (the ``g`` EP ranks of this node) and ``ep_rail`` (the ``n`` EP ranks
with this local index, one per node).
"""

from __future__ import annotations

import itertools
import os
import socket
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from . import collectives
from .init import destroy_groups_at_exit, job_timeout
from .layout_agreement import check_same_layout

GROUP_NAMES = ("tp", "cp", "dp", "dp_cp", "pp", "ep", "etp", "edp", "tp_ep", "stage")
NODE_GROUP_NAMES = ("ep_node", "ep_rail")


def ep_node_layout(ep_groups: list[list[int]], ranks_per_node: int) -> Optional[int]:
    """``g``, the EP ranks per node of every EP group (``ep_groups``: sorted global ranks), when
    each group's ranks fall on its nodes in equal consecutive blocks (``e = a·g + i``); None
    when they do not (the hierarchical all-to-all then cannot run)."""
    sizes = set()
    for members in ep_groups:
        nodes = [r // ranks_per_node for r in members]
        blocks = [len(list(b)) for _, b in itertools.groupby(nodes)]
        if len(set(blocks)) != 1 or len(blocks) != len(set(nodes)):
            return None
        sizes.add(blocks[0])
    return sizes.pop() if len(sizes) == 1 else None


def node_groups(ep_groups: list[list[int]], g: int) -> dict[str, list[list[int]]]:
    """The ``ep_node`` groups (``g`` consecutive EP ranks) and ``ep_rail`` groups (EP ranks
    ``i, i + g, i + 2g, ...``) of every EP group, for ``g`` EP ranks per node."""
    return {"ep_node": [m[a:a + g] for m in ep_groups for a in range(0, len(m), g)],
            "ep_rail": [m[i::g] for m in ep_groups for i in range(g)]}


def _check_sizes(world: int, tp: int, cp: int, ep: int, etp: int, pp: int) -> tuple[int, int]:
    """Validate the grid sizes; return the derived (dp, edp)."""
    for name, v in (("world_size", world), ("tp", tp), ("cp", cp), ("ep", ep), ("etp", etp),
                    ("pp", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if world % (tp * cp * pp):
        raise ValueError(
            f"world_size {world} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {tp * cp * pp}"
        )
    if world % (etp * ep * pp):
        raise ValueError(
            f"world_size {world} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = "
            f"{etp * ep * pp}"
        )
    return world // (tp * cp * pp), world // (etp * ep * pp)


def grid_groups(world: int, tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1,
                pp: int = 1) -> dict[str, list[list[int]]]:
    """Every group of every axis, as sorted rank lists (pure: no process group is created)."""
    dp, edp = _check_sizes(world, tp, cp, ep, etp, pp)

    def dense(t, c, d, p):
        return t + tp * (c + cp * (d + dp * p))

    def expert(t, e, d, p):
        return t + etp * (e + ep * (d + edp * p))

    def axis(shape, index_fn, vary):
        """Groups along the axes in ``vary`` (indices into shape), one per other coordinate."""
        fixed = [i for i in range(len(shape)) if i not in vary]
        groups = []
        for f in itertools.product(*(range(shape[i]) for i in fixed)):
            members = []
            for v in itertools.product(*(range(shape[i]) for i in vary)):
                coord = [0] * len(shape)
                for i, val in zip(fixed, f):
                    coord[i] = val
                for i, val in zip(vary, v):
                    coord[i] = val
                members.append(index_fn(*coord))
            groups.append(sorted(members))
        return groups

    ds, es = (tp, cp, dp, pp), (etp, ep, edp, pp)
    return {
        "tp": axis(ds, dense, [0]),
        "cp": axis(ds, dense, [1]),
        "dp": axis(ds, dense, [2]),
        "dp_cp": axis(ds, dense, [1, 2]),
        "pp": axis(ds, dense, [3]),
        "etp": axis(es, expert, [0]),
        "ep": axis(es, expert, [1]),
        "edp": axis(es, expert, [2]),
        "tp_ep": axis(es, expert, [0, 1]),
        "stage": axis(ds, dense, [0, 1, 2]),
    }


def _world_and_rank(world_size: Optional[int], rank: Optional[int]) -> tuple[int, int]:
    """``world_size`` and ``rank``, each defaulting to the initialised torch.distributed's
    (``RuntimeError`` when it is not); ``ValueError`` when the rank is outside the world."""
    if world_size is None or rank is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelState.build needs torch.distributed initialised "
                "(see moe_parallel.init_distributed) or explicit world_size and rank"
            )
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return world_size, rank


def _default_ranks_per_node(ranks_per_node: Optional[int], world_size: int) -> int:
    """``ranks_per_node``, default ``LOCAL_WORLD_SIZE``, else the whole world (unchecked)."""
    if ranks_per_node is None:
        return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return ranks_per_node


def _check_ranks_per_node(ranks_per_node: int, world_size: int) -> int:
    """``ranks_per_node``; ``ValueError`` unless it is a positive int dividing ``world_size``."""
    if (isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int)
            or ranks_per_node < 1 or world_size % ranks_per_node):
        raise ValueError(f"ranks_per_node must be a positive int dividing world_size "
                         f"{world_size} (default LOCAL_WORLD_SIZE), got {ranks_per_node!r}")
    return ranks_per_node


Groups = dict[str, Optional[dist.ProcessGroup]]


def _create_grid_groups(all_groups: dict[str, list[list[int]]], rank: int, create: bool,
                        timeout: Optional[timedelta]) -> tuple[dict[str, list[int]], Groups]:
    """This rank's members and group of every ``GROUP_NAMES`` axis; with ``create`` every group
    of ``all_groups`` is created (``dist.new_group``, the same order on every rank), else the
    groups are ``None``."""
    ranks, groups = {}, {}
    for name in GROUP_NAMES:
        for members in all_groups[name]:
            pg = dist.new_group(members, timeout=timeout) if create else None
            if rank in members:
                ranks[name], groups[name] = members, pg
    return ranks, groups


def _create_node_groups(ep_groups: list[list[int]], g: int, rank: int, create: bool,
                        timeout: Optional[timedelta], ranks: dict[str, list[int]],
                        groups: Groups) -> None:
    """Add this rank's ``ep_node`` and ``ep_rail`` members and groups (``node_groups``) to
    ``ranks`` and ``groups``: a group equal to an EP group is the ``ep`` group, a one-rank
    group (or any without ``create``) is ``None``, the others are created on every rank."""
    for name, lists in node_groups(ep_groups, g).items():
        for members in lists:
            # the same decision on every rank, as new_group needs
            if members in ep_groups:  # one node, or one EP rank per node
                pg = groups["ep"] if rank in members else None
            elif len(members) == 1 or not create:
                pg = None
            else:
                pg = dist.new_group(members, timeout=timeout)
            if rank in members:
                ranks[name], groups[name] = members, pg


def _warn_if_nodes_span_hosts(world: int, ranks_per_node: int) -> None:
    """Warn when a node of ``ranks_per_node`` consecutive ranks holds ranks of several hosts
    (e.g. mpirun's round-robin placement): the hierarchical all-to-all stays correct but its
    "intra-node" stage then crosses hosts. A collective over the world (one all-gather)."""
    hosts = collectives.all_gather_object(socket.gethostname(), dist.group.WORLD)
    mixed = [m for m in range(world // ranks_per_node)
             if len(set(hosts[m * ranks_per_node:(m + 1) * ranks_per_node])) > 1]
    if mixed:
        warnings.warn(
            f"ranks_per_node={ranks_per_node} puts ranks of different hosts on node(s) {mixed} "
            f"(hosts by rank: {hosts}); the hierarchical all-to-all's intra-node stage crosses "
            "hosts there. Place consecutive ranks on each host (mpirun --map-by node is "
            "round-robin; use --map-by slot) or pass the matching ranks_per_node",
            RuntimeWarning, stacklevel=3)


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates and process groups of both grids.

    Build with ``ParallelState.build(tp=..., ep=...)`` after ``torch.distributed`` is initialised
    (or with ``world_size``/``rank`` given and ``create_groups=False`` for pure rank arithmetic).
    ``ParallelState.single()`` is the one-process state (all sizes 1, no groups).
    """

    world_size: int = 1
    rank: int = 0
    tp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    dp: int = 1
    edp: int = 1
    ranks: dict[str, list[int]] = field(default_factory=dict)
    groups: dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    ranks_per_node: Optional[int] = None  # None: unknown (not built by ``build``)
    ep_per_node: Optional[int] = None  # g: EP ranks per node, None when not in equal blocks

    @classmethod
    def single(cls) -> ParallelState:
        """The one-process state: world size 1, every size 1, every group ``None``."""
        names = GROUP_NAMES + NODE_GROUP_NAMES
        return cls(ranks={n: [0] for n in names}, groups={n: None for n in names},
                   ranks_per_node=1, ep_per_node=1)

    @classmethod
    def build(cls, tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1, pp: int = 1, *,
              world_size: Optional[int] = None, rank: Optional[int] = None,
              create_groups: bool = True,
              timeout: Optional[timedelta] = None,
              ranks_per_node: Optional[int] = None) -> ParallelState:
        """Both grids over the world for the given sizes, and this rank's groups in them.

        ``tp, cp, ep, etp, pp`` are the tensor, context, expert, expert-tensor and pipeline
        parallel sizes; ``dp = world / (pp·cp·tp)`` and ``edp = world / (pp·ep·etp)`` are
        derived. ``world_size`` and ``rank`` default to those of the initialised
        ``torch.distributed`` (else ``RuntimeError``). ``ValueError`` (naming the sizes) unless
        every size is >= 1 and the world is divisible by ``pp·cp·tp`` and by ``pp·ep·etp``.
        With ``create_groups`` (the default) every rank creates every group with
        ``dist.new_group`` in the same order, so this is a collective: call it on all ranks.
        Before any group is created one all-gather over the default group compares every
        rank's sizes (``layout_agreement.check_same_layout``): ranks passing different ones
        all raise ``ValueError`` naming each rank's layout, instead of timing out in
        ``new_group``;
        ``create_groups=False`` computes the rank lists only (no communication, groups ``None``).
        Expert-count rules are checked by ``check_experts`` (``MoELayer`` calls it).
        Creating groups registers ``destroy_groups_at_exit`` (every group is destroyed at
        interpreter exit, before finalisation, so that gloo's threads cannot abort the process).
        Every created group waits at most ``timeout`` in a collective (default: the timeout
        ``init_distributed`` gave the default group, else torch's default), so a lost or stalled
        rank makes the others raise instead of hanging in the layer's all-to-all.
        ``ranks_per_node`` (default: ``LOCAL_WORLD_SIZE`` from the launcher, else the whole world
        on one node) must divide the world; it places the nodes (module docstring) and, when an
        EP group spans several nodes with several ranks on each, adds the ``ep_node`` and
        ``ep_rail`` groups (else they are the ``ep`` group itself or ``None``: one stage of the
        hierarchical exchange is then empty).
        """
        world_size, rank = _world_and_rank(world_size, rank)
        ranks_per_node = _default_ranks_per_node(ranks_per_node, world_size)
        if create_groups:  # every rank decides alike below, or none creates a group
            check_same_layout(dict(world_size=world_size, tp=tp, cp=cp, ep=ep, etp=etp, pp=pp,
                                   ranks_per_node=ranks_per_node))
        dp, edp = _check_sizes(world_size, tp, cp, ep, etp, pp)
        ranks_per_node = _check_ranks_per_node(ranks_per_node, world_size)
        timeout = timeout if timeout is not None else job_timeout()
        all_groups = grid_groups(world_size, tp, cp, ep, etp, pp)
        g = ep_node_layout(all_groups["ep"], ranks_per_node)
        if create_groups:
            destroy_groups_at_exit()  # a clean exit even for a program that never destroys them
        ranks, groups = _create_grid_groups(all_groups, rank, create_groups, timeout)
        if g is not None and 1 < g < ep and create_groups:
            _warn_if_nodes_span_hosts(world_size, ranks_per_node)
        if g is not None:
            _create_node_groups(all_groups["ep"], g, rank, create_groups, timeout, ranks, groups)
        return cls(world_size, rank, tp, cp, ep, etp, pp, dp, edp, ranks, groups,
                   ranks_per_node, g)

    # ---- coordinates ------------------------------------------------------------------------
    def group_rank(self, name: str) -> int:
        """This rank's index inside its group ``name``."""
        return self.ranks[name].index(self.rank)

    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        """The process group ``name`` (one of ``GROUP_NAMES``) through this rank; ``None`` in
        ``single()`` and with ``create_groups=False``."""
        return self.groups[name]

    @property
    def tp_rank(self) -> int:
        """This rank's coordinate on the tensor-parallel axis (``0 .. tp - 1``)."""
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        """This rank's coordinate on the context-parallel axis (``0 .. cp - 1``)."""
        return self.rank // self.tp % self.cp

    @property
    def dp_rank(self) -> int:
        """This rank's coordinate on the data-parallel axis (``0 .. dp - 1``)."""
        return self.rank // (self.tp * self.cp) % self.dp

    @property
    def pp_rank(self) -> int:
        """This rank's coordinate on the pipeline axis (``0 .. pp - 1``)."""
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def etp_rank(self) -> int:
        """This rank's coordinate on the expert-tensor-parallel axis (``0 .. etp - 1``)."""
        return self.rank % self.etp

    @property
    def ep_rank(self) -> int:
        """This rank's coordinate on the expert-parallel axis (``0 .. ep - 1``)."""
        return self.rank // self.etp % self.ep

    @property
    def edp_rank(self) -> int:
        """This rank's coordinate on the expert-data-parallel axis (``0 .. edp - 1``)."""
        return self.rank // (self.etp * self.ep) % self.edp

    def check_expert_groups(self) -> None:
        """``ValueError`` unless the groups an expert-parallel layer communicates over exist:
        ``tp_ep`` when ``ep·etp > 1``, ``ep`` when ``ep > 1``, ``etp`` when ``etp > 1``."""
        needed = ["tp_ep"] if self.ep * self.etp > 1 else []
        needed += [n for n in ("ep", "etp") if getattr(self, n) > 1]
        missing = [n for n in needed if self.groups.get(n) is None]
        if missing:
            raise ValueError(
                f"parallel_state has no process group for {missing} (ep={self.ep}, "
                f"etp={self.etp}): it was built with create_groups=False or by hand; build it "
                "with ParallelState.build(...) on every rank after init_distributed()"
            )

    def check_experts(self, num_experts: int, ffn_hidden_size: int) -> None:
        """The expert-grid rules: ``num_experts % ep == 0`` and ``ffn_hidden_size % etp == 0``."""
        if num_experts % self.ep:
            raise ValueError(f"num_experts {num_experts} is not divisible by ep {self.ep}")
        if ffn_hidden_size % self.etp:
            raise ValueError(
                f"ffn_hidden_size {ffn_hidden_size} is not divisible by etp {self.etp}"
            )

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp}, cp={self.cp}, "
                f"dp={self.dp}, pp={self.pp}, ep={self.ep}, etp={self.etp}, edp={self.edp})")
