"""Every rank of a checkpoint's save or load reaches the same verdict.

The world is torch.distributed's default group (one process when it is not initialised):

* ``world()``: ``(rank, world_size)``;
* ``broadcast(value)``: rank 0's ``value`` on every rank; ``gather(obj)``: every rank's ``obj``;
* ``agree(problems, what)``: ``CheckpointError("<what>: <problems>")`` on every rank when any
  rank has a problem (the distinct problems sorted, the first 12 and a count of the rest, and
  in a world of several ranks the ranks that found them);
* ``check_same_everywhere(extra_digest, stepped, problems)``: ``CheckpointError("save refused:
  ...")`` on every rank unless all ranks pass the same ``extra`` (compared by the SHA-256 of its
  canonical JSON and tensors, ``payload.digest``), all or none of them have optimizer state and
  no rank found a value that cannot be saved (``problems``);
* ``check_ps(ps)``: the ``ParallelState`` of this world (``single()`` for one process).
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist

from ..distributed import ParallelState, collectives

__all__ = ["CheckpointError", "agree", "barrier", "broadcast", "check_ps",
           "check_same_everywhere", "gather", "world"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded as asked (raised on every rank alike)."""


def _world_group() -> Optional[dist.ProcessGroup]:
    """The default group, ``None`` (one process) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group; ``(0, 1)`` without one."""
    group = _world_group()
    return collectives.group_rank(group), collectives.group_size(group)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order."""
    return collectives.all_gather_object(obj, _world_group())


def barrier() -> None:
    """Wait for every rank of the world (nothing in one process)."""
    if world()[1] > 1:
        dist.barrier()


def agree(problems: list[str], what: str) -> None:
    """Raise ``CheckpointError`` on every rank when any rank has a problem."""
    size = world()[1]
    gathered = gather(problems)
    found = [(r, p) for r, ps in enumerate(gathered) for p in ps]
    if found:
        first = sorted({p for _, p in found})
        ranks = sorted({r for r, _ in found})
        raise CheckpointError(f"{what}: " + "; ".join(first[:12])
                              + (f" (and {len(first) - 12} more)" if len(first) > 12 else "")
                              + (f" [on rank(s) {ranks}]" if size > 1 else ""))


def check_same_everywhere(extra_digest: str, stepped: bool, problems: list[str]) -> None:
    """``CheckpointError`` on every rank unless every rank has the same ``extra`` (its
    ``extra_digest``: it is written once), all or none have optimizer state, and no rank has
    ``problems`` (values it cannot save, each naming its key path and type)."""
    gathered = gather((extra_digest, stepped, problems))
    found = sorted({p for g in gathered for p in g[2]})
    if len({g[0] for g in gathered if not g[2]}) > 1:
        found.append("extra differs between ranks (it is written once: pass the same "
                     "value on every rank)")
    if len({g[1] for g in gathered}) > 1:
        found.append("some ranks' optimizers hold state and others' do not: "
                     f"{[r for r, g in enumerate(gathered) if g[1]]} do")
    if found:
        raise CheckpointError("save refused: " + "; ".join(found))


def check_ps(ps: Optional[ParallelState]) -> ParallelState:
    """``ps``, or ``ParallelState.single()`` in one process; ``ValueError`` when ``ps`` is
    missing in a world of several ranks or describes another world size."""
    size = world()[1]
    if ps is None:
        if size > 1:
            raise ValueError(f"ps (the ParallelState) is required with world_size {size} > 1")
        return ParallelState.single()
    if ps.world_size != size:
        raise ValueError(f"ps describes world_size {ps.world_size}, torch.distributed has {size}")
    return ps
