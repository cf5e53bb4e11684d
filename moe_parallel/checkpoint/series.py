"""A training run's checkpoints under one root: ``root/step_<N>`` and ``root/latest``.

``root/latest`` holds the step of the newest committed checkpoint; it is replaced atomically
after that checkpoint is committed, and the oldest ones beyond ``keep`` are then removed, with
the unfinished ``step_<N>.tmp`` directories that saves killed midway left behind (saves are
sequential: once one commits, no other is being written). A run killed at any point leaves
``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

import torch
from torch import nn

from ..distributed import ParallelState
from .saving import PendingSave, save

_STEP = re.compile(r"step_(\d+)$")
_UNFINISHED = re.compile(r"step_\d+\.tmp$")


def step_dir(root: str | os.PathLike, step: int) -> str:
    """``root/step_<step>`` (zero-padded to 8 digits)."""
    return os.path.join(os.fspath(root), f"step_{step:08d}")


def latest_step(root: str | os.PathLike) -> Optional[int]:
    """The step ``root/latest`` names, ``None`` when there is no committed checkpoint."""
    path = os.path.join(os.fspath(root), "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def _mark_latest(root: str, step: int, keep: int) -> None:
    path = os.path.join(root, "latest")
    with open(path + ".partial", "w") as f:
        f.write(f"{step}\n")
    os.replace(path + ".partial", path)
    steps = sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP.match(name)))
    for old in steps[:-keep]:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    for name in os.listdir(root):
        if _UNFINISHED.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_step(root: str | os.PathLike, step: int, model: nn.Module,
              optimizer: Optional[torch.optim.Optimizer], ps: ParallelState,
              extra: Optional[dict[str, Any]] = None, keep: int = 2,
              async_save: bool = False) -> Optional[PendingSave]:
    """``save`` to ``step_dir(root, step)``, then point ``latest`` at it and keep the newest
    ``keep`` checkpoints (collective, as ``save``)."""
    root = os.fspath(root)
    if ps.rank == 0:
        os.makedirs(root, exist_ok=True)
    return save(step_dir(root, step), model, optimizer, ps, extra, async_save=async_save,
                on_commit=lambda: _mark_latest(root, step, keep))
