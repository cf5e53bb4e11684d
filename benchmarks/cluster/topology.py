"""Where the ranks are: nodes and ranks per node from every rank's host and launcher variables,
and the bytes a rank sends within and across nodes."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Optional

import torch
import torch.distributed as dist

from benchmarks.cluster.cli import PlanError


def node_layout(ranks: list[dict], ranks_per_node: Optional[int] = None) -> dict:
    """Nodes of the job from every rank's ``{"hostname", "node_index"}`` (rank order):
    a node is a distinct ``(hostname, node_index)`` (``node_index``: the launcher's node rank,
    or None), or with ``ranks_per_node`` ``(hostname, rank // ranks_per_node)``. Returns
    ``{"nodes", "ranks_per_node", "node_of", "hostnames"}``; PlanError when the nodes hold
    different rank counts or ``ranks_per_node`` does not divide the world."""
    world = len(ranks)
    if ranks_per_node is not None and world % ranks_per_node:
        raise PlanError(f"--ranks-per-node {ranks_per_node} does not divide the world size "
                        f"{world}")
    keys = [(r["hostname"], r.get("node_index") if ranks_per_node is None
             else i // ranks_per_node) for i, r in enumerate(ranks)]
    ids: dict = {}
    node_of = [ids.setdefault(k, len(ids)) for k in keys]
    counts = [node_of.count(n) for n in range(len(ids))]
    if len(set(counts)) != 1:
        raise PlanError(f"uneven ranks per node {counts} (nodes {list(ids)}): pass "
                        f"--ranks-per-node")
    return {"nodes": len(ids), "ranks_per_node": counts[0], "node_of": node_of,
            "hostnames": sorted({r["hostname"] for r in ranks})}


def layout_volumes(bytes_per_rank: float, ep: int, node_of: list[int]) -> dict:
    """One even all-to-all over the EP groups of ``ParallelState.build(ep=ep)``: for the rank
    with the most inter-node (then intra-node) traffic, ``messages = ep - 1`` and the bytes it
    sends to ranks of its node and of other nodes (``bytes_per_rank / ep`` per peer)."""
    from moe_parallel.distributed.parallel_state import grid_groups

    world = len(node_of)
    best = (0, 0)
    for members in grid_groups(world, ep=ep)["ep"]:
        for r in members:
            inter = sum(node_of[j] != node_of[r] for j in members)
            intra = len(members) - 1 - inter
            best = max(best, (inter, intra))
    inter, intra = best
    return {"messages": ep - 1, "intra_bytes": bytes_per_rank * intra / ep,
            "inter_bytes": bytes_per_rank * inter / ep}


def _local_world(environ: Mapping[str, str]) -> Optional[int]:
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def _node_index(environ: Mapping[str, str]) -> Optional[int]:
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return None


def gather_ranks(rank: int, local_rank: int, device: torch.device,
                 device_name: Optional[str]) -> list[dict]:
    """Every rank's ``{"rank", "hostname", "local_rank", "local_world", "node_index", "device",
    "device_name", "machine"}`` in rank order (``machine``: ``machine_info()`` on local rank 0
    of every node, else None), gathered on every rank."""
    from benchmarks.machine import machine_info

    mine = {"rank": rank, "hostname": socket.gethostname(), "local_rank": local_rank,
            "local_world": _local_world(os.environ), "node_index": _node_index(os.environ),
            "device": str(device), "device_name": device_name,
            "machine": machine_info() if local_rank == 0 else None}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks


def topology_record(ranks: list[dict], layout: dict, launcher: str, device: torch.device
                    ) -> dict:
    """The ``topology`` of the record: world, nodes, hosts, launcher, backend and its version,
    torch, every rank's device and every node's machine."""
    backend = dist.get_backend()
    return {
        "world": len(ranks), "nodes": layout["nodes"], "ranks_per_node": layout["ranks_per_node"],
        "hostnames": layout["hostnames"], "node_of_rank": layout["node_of"],
        "launcher": launcher, "launcher_local_world": [r["local_world"] for r in ranks],
        "backend": backend,
        "backend_version": (".".join(map(str, torch.cuda.nccl.version()))
                            if backend == "nccl"
                            else f"bundled with torch {torch.__version__}"),
        "torch": torch.__version__, "device": device.type,
        "devices": [r["device_name"] or r["device"] for r in ranks],
        "node_machines": [{"hostname": r["hostname"], "rank": r["rank"], **r["machine"]}
                          for r in ranks if r["machine"] is not None],
    }
