"""Every rank of a checkpoint's save or load reaches the same verdict.

The world is torch.distributed's default group (one process when it is not initialised):

* ``world()``: ``(rank, world_size)``;
* ``broadcast(value)``: rank 0's ``value`` on every rank; ``gather(obj)``: every rank's ``obj``;
* ``agree(problems, what)``: ``CheckpointError("<what>: <problems>")`` on every rank when any
  rank has a problem (the distinct problems sorted, the first 12 and a count of the rest, and
  in a world of several ranks the ranks that found them);
* ``check_same_everywhere(extra, stepped)``: ``CheckpointError("save refused: ...")`` on every
  rank unless all ranks pass the same ``extra`` (compared by a SHA-256 of a canonical pickle)
  and all or none of them have optimizer state;
* ``check_ps(ps)``: the ``ParallelState`` of this world (``single()`` for one process).
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

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


def _canonical(obj: Any) -> Any:
    """A form of ``obj`` whose pickle is the same in every process for equal values (a
    tensor's pickle carries a per-save id, a set's order follows the process's hash seed)."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        return ("tensor", str(obj.dtype), tuple(obj.shape), t.view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return ("dict", sorted(((repr(k), _canonical(v)) for k, v in obj.items()), key=repr))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_canonical(v) for v in obj])
    if isinstance(obj, (set, frozenset)):
        return ("set", sorted(repr(_canonical(v)) for v in obj))
    return obj


def check_same_everywhere(extra: dict[str, Any], stepped: bool) -> None:
    """``CheckpointError`` on every rank unless every rank has the same ``extra`` (written
    once) and, for all or none of them, optimizer state."""
    if world()[1] == 1:
        return
    gathered = gather((hashlib.sha256(pickle.dumps(_canonical(extra))).hexdigest(), stepped))
    problems = []
    if len({g[0] for g in gathered}) > 1:
        problems.append("extra differs between ranks (it is written once: pass the same "
                        "value on every rank)")
    if len({g[1] for g in gathered}) > 1:
        problems.append("some ranks' optimizers hold state and others' do not: "
                        f"{[r for r, g in enumerate(gathered) if g[1]]} do")
    if problems:
        raise CheckpointError("save refused: " + "; ".join(problems))


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
