"""``save``: write a model's (and optimizer's) state to ``<dir>.tmp``, then commit it as ``<dir>``.

Stages, each on every rank in this order: collect the state and the manifest (one all-gather:
the ranks agree on ``extra`` and on optimizer state), prepare ``<dir>.tmp`` (rank 0, then a
barrier), write (DCP, synchronous or in a background thread), commit (barrier; rank 0 writes the
manifest, swaps ``<dir>.tmp`` in through ``<dir>.old`` and runs ``on_commit``; barrier).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from ..distributed import ParallelState, job_timeout
from ..layer import MoELayer
from . import manifest as mf
from . import payload
from .agreement import barrier, check_ps, check_same_everywhere, world
from .state import (
    hyperparameters,
    model_state,
    optim_split,
    optim_state,
    rng_state,
    single_process_quiet,
)

__all__ = ["PendingSave", "save"]


class PendingSave:
    """An asynchronous save in flight: ``wait()`` blocks until every rank's files are written,
    then commits the checkpoint (collective: every rank calls it)."""

    def __init__(self, future: Future, commit: Callable[[], None]) -> None:
        self._future, self._commit, self.done = future, commit, False

    def wait(self) -> None:
        """Block until the write is done, then commit (once; later calls return at once)."""
        if not self.done:
            self._future.result()
            self._commit()
            self.done = True


class _Staged:
    """DCP ``AsyncStager`` for a state dict already copied to CPU (ours keeps chunk metadata)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _to_cpu(obj: Any) -> Any:
    """A CPU copy of a nested state dict, chunk metadata kept."""
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, Tensor):
        copy = obj.detach().to("cpu", copy=True)
        for name in ("global_shape", "global_offsets", "local_offsets", "local_sizes"):
            if hasattr(obj, name):
                setattr(copy, name, getattr(obj, name))
        return copy
    return obj


_ASYNC_GROUPS: dict[int, Any] = {}


def _async_group() -> Optional[dist.ProcessGroup]:
    """A gloo group for the background writer's collectives (created once per job)."""
    if world()[1] == 1:
        return None
    key = id(dist.group.WORLD)
    if key not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[key] = dist.new_group(backend="gloo", timeout=job_timeout())
    return _ASYNC_GROUPS[key]


def _manifest(ps: ParallelState, layers: dict[str, MoELayer],
              optimizer: Optional[torch.optim.Optimizer], stepped: bool) -> dict[str, Any]:
    """The manifest (``manifest.py``) of a save at layout ``ps`` of ``layers``, with the
    optimizer's state (``stepped``), its hyperparameters only, or none."""
    return {"format": mf.FORMAT, "layout": mf.describe_layout(ps),
            "moe_layers": {n: mf.describe_layer(m.config) for n, m in layers.items()},
            "optimizer": None if optimizer is None else ("state" if stepped else
                                                         "hyperparameters"),
            "optimizer_groups": len(optimizer.param_groups) if optimizer else 0,
            "rng": True}


def _encoded(value: Any, name: str, problems: list[str]) -> dict[str, Tensor]:
    """``payload.to_entries(value, name)``; what it refuses goes to ``problems``."""
    try:
        return payload.to_entries(value, name)
    except TypeError as e:
        problems.append(str(e))
        return {}


def _collect(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ps: ParallelState,
             extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict this rank writes and the manifest. Collective: every rank checks that
    all pass the same ``extra``, that all or none hold optimizer state, and that every
    non-tensor value fits ``payload.py``'s schema (else ``CheckpointError`` on every rank)."""
    rank, size = world()
    msd, by_key, layers = model_state(model, size > 1)
    problems: list[str] = []
    extra_entries = _encoded(extra, "extra", problems)
    state: dict[str, Any] = {"model": msd, **extra_entries,
                             **_encoded(rng_state(), f"rng.rank{rank}", problems)}
    # An optimizer that has not stepped is saved as its hyperparameters: creating its state
    # here would change the run (AdamW's step count starts at 1 instead of 0).
    stepped = optimizer is not None and bool(optimizer.state)
    if stepped:
        state["optim"], values = optim_split(optim_state(model, optimizer, by_key))
    elif optimizer is not None:
        values = {"groups": hyperparameters(optimizer), "state": {}}
    if optimizer is not None:
        state.update(_encoded(values, "optim_hyperparameters", problems))
    check_same_everywhere(payload.digest(extra_entries), stepped, problems)
    return state, _manifest(ps, layers, optimizer, stepped)


def _committer(directory: str, manifest: dict[str, Any],
               on_commit: Optional[Callable[[], None]]) -> Callable[[], None]:
    """The commit of a save written to ``<directory>.tmp``: a collective (barrier, rank 0
    writes the manifest, replaces ``directory`` through ``<directory>.old`` and runs
    ``on_commit``, barrier)."""
    rank = world()[0]
    tmp = directory + ".tmp"

    def commit() -> None:
        barrier()
        if rank == 0:
            mf.write(tmp, manifest)
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(directory):
                os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
            if on_commit is not None:
                on_commit()
        barrier()

    return commit


def save(directory: str | os.PathLike, model: nn.Module,
         optimizer: Optional[torch.optim.Optimizer] = None, ps: Optional[ParallelState] = None,
         extra: Optional[dict[str, Any]] = None, *, async_save: bool = False,
         on_commit: Optional[Callable[[], None]] = None) -> Optional[PendingSave]:
    """Save ``model`` (and ``optimizer``, this rank's RNG states, ``extra``) to ``directory``.

    Collective over the world: every rank calls it with its own shard. ``extra`` must be
    the same on every rank (it is written once) and fit ``payload.py``'s schema (None, bool,
    int, finite float, str, list, tuple, dict with str keys, tensors). ``async_save=True``
    copies the state to CPU, writes it in a background thread (DCP's ``async_save``) and returns a
    ``PendingSave`` whose ``wait()`` (on every rank) commits it; otherwise returns ``None``
    once the checkpoint is committed. ``on_commit`` runs on rank 0 right after the commit
    (before the other ranks leave it).
    """
    ps = check_ps(ps)
    rank, size = world()
    directory = os.fspath(directory)
    tmp = directory + ".tmp"
    state, manifest = _collect(model, optimizer, ps, dict(extra or {}))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    commit = _committer(directory, manifest, on_commit)
    writer = dcp.FileSystemWriter(tmp)
    if not async_save:
        with single_process_quiet():
            dcp.save(state, storage_writer=writer, no_dist=size == 1)
        commit()
        return None
    with single_process_quiet():
        future = dcp.async_save(_to_cpu(state), storage_writer=writer, process_group=_async_group(),
                                async_stager=_Staged(), no_dist=size == 1)
    return PendingSave(future, commit)
