"""Every rank must build the same process grid.

``check_same_layout(layout)`` compares, over the default (world) group, the sizes each rank
passes to ``ParallelState.build``: one all-gather of ``[len(layout)]`` int64 before any group is
created (``dist.new_group`` needs every rank to create the same groups in the same order), so
ranks asking for different grids all raise ``ValueError`` naming each rank's layout instead of
waiting in ``new_group`` until the collective timeout. The gathered table is the same on every
rank, so every rank decides alike. (``agreement.check_agreement`` does the same per layer for
its ``MoEConfig``, over the layer's ETP×EP group.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives

__all__ = ["check_same_layout"]

INVALID = -1  # how a size that is not a positive int travels (the caller's validation names it)


def _world_device() -> torch.device:
    """Where the default group's tensors live: the current GPU for a CUDA-only backend (NCCL),
    else the CPU."""
    backend = str(dist.get_backend())
    if "gloo" in backend or backend == "mpi" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _code(value: object) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2 ** 62
    return int(value) if ok else INVALID


def check_same_layout(layout: dict[str, object]) -> None:
    """Raise ``ValueError`` on every rank unless every rank of the default group passes the same
    ``layout`` (size name -> value; a value that is not a positive int compares as invalid).
    A collective over the default group: one all-gather of ``len(layout)`` int64 (nothing when
    ``torch.distributed`` is not initialised or the world has one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    w = dist.get_world_size()
    mine = torch.tensor([[_code(v) for v in layout.values()]], dtype=torch.int64,
                        device=_world_device())
    table = collectives.all_gather(mine, dist.group.WORLD, [1] * w).tolist()  # [w, sizes]
    if all(row == table[0] for row in table):
        return
    by_layout: dict[tuple[int, ...], list[int]] = {}
    for rank, row in enumerate(table):
        by_layout.setdefault(tuple(row), []).append(rank)
    detail = "; ".join(
        f"ranks {ranks} " + " ".join(f"{name}={'invalid' if v == INVALID else v}"
                                     for name, v in zip(layout, row))
        for row, ranks in by_layout.items()
    )
    raise ValueError(f"ranks built ParallelState with different layouts: {detail}; every rank "
                     "must pass the same sizes")
