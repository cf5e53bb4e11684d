"""``save`` / ``load``: training state on ``torch.distributed.checkpoint`` (DCP), any layout to any.

A checkpoint directory holds DCP's files (``.metadata`` and one ``.distcp`` file per writing rank)
and ``moe_parallel.json`` (``manifest.py``). Its state dict, flattened by DCP:

    model.<fqn>                 every parameter and persistent buffer (expert bias included);
                                routed experts as global tensors (``layout.py``), the rest whole
    optim.state.<fqn>.<name>    optimizer state by parameter name (``get_optimizer_state_dict``);
                                tensors shaped like their parameter share its layout
    optim.param_groups.*        hyperparameters (learning rate, betas, ...)
    optim_hyperparameters       instead of ``optim.*`` for an optimizer that has not stepped
    extra                       the caller's picklable ``extra`` (step, data position, scheduler)
    rng.rank<r>                 each rank's RNG states (torch CPU and CUDA, Python, NumPy)

Replicated tensors are written once (DCP deduplicates identical write items over ranks). A save
writes to ``<dir>.tmp`` and, when every rank is done, renames it to ``<dir>`` (the previous
checkpoint goes to ``<dir>.old`` for the instant of the swap): a save killed midway leaves the
previous checkpoint intact. Every check before a load runs on every rank and ends in the same
verdict everywhere (a named error on all ranks, before any tensor is read).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..distributed import ParallelState, job_timeout
from ..layer import MoELayer
from . import manifest as mf
from .layout import GlobalLayout, sharded_layouts

__all__ = ["CheckpointError", "PendingSave", "load", "resolve", "save"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded as asked (raised on every rank alike)."""


# ---- every rank decides the same -------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if _world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order."""
    world = _world()[1]
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _agree(problems: list[str], what: str) -> None:
    """Raise ``CheckpointError`` on every rank when any rank has a problem."""
    world = _world()[1]
    gathered = _gather(problems)
    found = [(r, p) for r, ps in enumerate(gathered) for p in ps]
    if found:
        first = sorted({p for _, p in found})
        ranks = sorted({r for r, _ in found})
        raise CheckpointError(f"{what}: " + "; ".join(first[:12])
                              + (f" (and {len(first) - 12} more)" if len(first) > 12 else "")
                              + (f" [on rank(s) {ranks}]" if world > 1 else ""))


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every single-process save and load, even when asked for one: silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield


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


def _check_same_everywhere(extra: dict[str, Any], stepped: bool) -> None:
    """``CheckpointError`` on every rank unless every rank has the same ``extra`` (written
    once) and, for all or none of them, optimizer state."""
    if _world()[1] == 1:
        return
    gathered = _gather((hashlib.sha256(pickle.dumps(_canonical(extra))).hexdigest(), stepped))
    problems = []
    if len({g[0] for g in gathered}) > 1:
        problems.append("extra differs between ranks (it is written once: pass the same "
                        "value on every rank)")
    if len({g[1] for g in gathered}) > 1:
        problems.append("some ranks' optimizers hold state and others' do not: "
                        f"{[r for r, g in enumerate(gathered) if g[1]]} do")
    if problems:
        raise CheckpointError("save refused: " + "; ".join(problems))


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


# ---- the state dict ---------------------------------------------------------------------------


def _layer_names(model: nn.Module, keys: dict[int, str]) -> dict[str, MoELayer]:
    """Canonical name (the state-dict prefix, wrappers stripped) of every MoE layer."""
    return {keys[id(m.router.weight)].removesuffix(".router.weight"): m
            for m in model.modules() if isinstance(m, MoELayer)}


def _param_keys(model: nn.Module, msd: dict[str, Any]) -> dict[int, str]:
    """``id(parameter) -> key of msd`` for the plain-tensor parameters (keys are DCP's canonical
    names: DDP's ``module.`` and similar wrapper prefixes removed), matched by storage."""
    def plain(t: Any) -> bool:
        return isinstance(t, Tensor) and not isinstance(t, DTensor)

    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in msd.items() if plain(t)}
    keys = {}
    for p in model.parameters():
        key = by_storage.get((p.data_ptr(), tuple(p.shape))) if plain(p) else None
        if key is not None:
            keys[id(p)] = key
    return keys


def _model_state(model: nn.Module, distributed: bool
                 ) -> tuple[dict[str, Any], dict[str, GlobalLayout], dict[str, MoELayer]]:
    """The model's state dict (DCP's ``get_model_state_dict``) with the routed experts
    annotated with their global layout; the layouts by key; the MoE layers by name."""
    layouts = sharded_layouts(model, strict=distributed)
    msd = get_model_state_dict(model)
    keys = _param_keys(model, msd)
    by_key = {keys[pid]: layout for pid, layout in layouts.items()}
    for key, layout in by_key.items():
        msd[key] = layout.annotate(msd[key])
    return msd, by_key, _layer_names(model, keys)


def _optim_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                 by_key: dict[str, GlobalLayout]) -> dict[str, Any]:
    """The optimizer's state by parameter name (``get_optimizer_state_dict``; it creates the
    state of an optimizer that has none with a zero-learning-rate step), each tensor shaped
    like a routed-expert parameter annotated with that parameter's layout."""
    osd = get_optimizer_state_dict(model, optimizer)
    for key, entries in osd["state"].items():
        layout = by_key.get(key)
        if layout is None:
            continue
        for name, value in entries.items():
            if isinstance(value, Tensor) and tuple(value.shape) == layout.local_shape:
                entries[name] = layout.annotate(value)
    return osd


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _rng_state() -> bytes:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return pickle.dumps(state)


def _set_rng_state(blob: bytes) -> None:
    state = pickle.loads(blob)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_ps(ps: Optional[ParallelState]) -> ParallelState:
    rank, world = _world()
    if ps is None:
        if world > 1:
            raise ValueError(f"ps (the ParallelState) is required with world_size {world} > 1")
        return ParallelState.single()
    if ps.world_size != world:
        raise ValueError(f"ps describes world_size {ps.world_size}, torch.distributed has {world}")
    return ps


# ---- save ---------------------------------------------------------------------------------------


class PendingSave:
    """An asynchronous save in flight: ``wait()`` blocks until every rank's files are written,
    then commits the checkpoint (collective: every rank calls it)."""

    def __init__(self, future: Future, commit) -> None:
        self._future, self._commit, self.done = future, commit, False

    def wait(self) -> None:
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


def _async_group():
    """A gloo group for the background writer's collectives (created once per job)."""
    if _world()[1] == 1:
        return None
    key = id(dist.group.WORLD)
    if key not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[key] = dist.new_group(backend="gloo", timeout=job_timeout())
    return _ASYNC_GROUPS[key]


def save(directory: str | os.PathLike, model: nn.Module,
         optimizer: Optional[torch.optim.Optimizer] = None, ps: Optional[ParallelState] = None,
         extra: Optional[dict[str, Any]] = None, *, async_save: bool = False,
         on_commit: Optional[Callable[[], None]] = None) -> Optional[PendingSave]:
    """Save ``model`` (and ``optimizer``, this rank's RNG states, ``extra``) to ``directory``.

    Collective over the world: every rank calls it with its own shard. ``extra`` must be
    picklable and the same on every rank (it is written once). ``async_save=True`` copies the
    state to CPU, writes it in a background thread (DCP's ``async_save``) and returns a
    ``PendingSave`` whose ``wait()`` (on every rank) commits it; otherwise returns ``None``
    once the checkpoint is committed. ``on_commit`` runs on rank 0 right after the commit
    (before the other ranks leave it).
    """
    ps = _check_ps(ps)
    rank, world = _world()
    directory = os.fspath(directory)
    tmp = directory + ".tmp"
    extra = dict(extra or {})
    msd, by_key, layers = _model_state(model, world > 1)
    state: dict[str, Any] = {"model": msd, "extra": pickle.dumps(extra),
                             "rng": {f"rank{rank}": _rng_state()}}
    # An optimizer that has not stepped is saved as its hyperparameters: creating its state
    # here would change the run (AdamW's step count starts at 1 instead of 0).
    stepped = optimizer is not None and bool(optimizer.state)
    _check_same_everywhere(extra, stepped)
    if stepped:
        state["optim"] = _optim_state(model, optimizer, by_key)
    elif optimizer is not None:
        state["optim_hyperparameters"] = pickle.dumps(_hyperparameters(optimizer))
    manifest = {"format": mf.FORMAT, "layout": mf.describe_layout(ps),
                "moe_layers": {n: mf.describe_layer(m.config) for n, m in layers.items()},
                "optimizer": None if optimizer is None else ("state" if stepped else
                                                             "hyperparameters"),
                "optimizer_groups": len(optimizer.param_groups) if optimizer else 0,
                "rng": True}
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    def commit() -> None:
        _barrier()
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
        _barrier()

    writer = dcp.FileSystemWriter(tmp)
    if not async_save:
        with single_process_quiet():
            dcp.save(state, storage_writer=writer, no_dist=world == 1)
        commit()
        return None
    with single_process_quiet():
        future = dcp.async_save(_to_cpu(state), storage_writer=writer, process_group=_async_group(),
                                async_stager=_Staged(), no_dist=world == 1)
    return PendingSave(future, commit)


# ---- load ---------------------------------------------------------------------------------------


def resolve(directory: str | os.PathLike) -> str:
    """The complete checkpoint at ``directory`` (``<dir>.old`` when a save died while swapping
    it in); ``FileNotFoundError`` when there is none, ``CheckpointError`` when it is partial."""
    directory = os.fspath(directory)
    for candidate in (directory, directory + ".old"):
        if mf.read(candidate) is not None:
            return candidate
    if not os.path.exists(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}")
    raise CheckpointError(
        f"{directory} is not a complete checkpoint (no {mf.NAME} or no .metadata: its save did "
        "not finish); nothing was loaded"
    )


def _shape_problems(state: dict[str, Any], metadata) -> list[str]:
    """Keys of this model/optimizer missing from the checkpoint, model keys of the checkpoint
    this model lacks, and global shapes that differ."""
    saved = metadata.state_dict_metadata
    problems = []
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for key, entries in state.get("optim", {}).get("state", {}).items():
        flat.update({f"optim.state.{key}.{n}": v for n, v in entries.items()})
    for key, value in flat.items():
        if key not in saved:
            problems.append(f"{key} is not in the checkpoint")
        elif isinstance(value, Tensor):
            shape = tuple(getattr(value, "global_shape", value.shape))
            have = tuple(getattr(saved[key], "size", ()))
            if have != shape:
                problems.append(f"{key} has global shape {list(have)} in the checkpoint, "
                                f"{list(shape)} in this model")
    for key in saved:
        if key.startswith("model.") and key not in flat:
            problems.append(f"{key} is in the checkpoint but not in this model")
    return problems


def load(directory: str | os.PathLike, model: nn.Module,
         optimizer: Optional[torch.optim.Optimizer] = None, ps: Optional[ParallelState] = None
         ) -> dict[str, Any]:
    """Load a checkpoint written by ``save`` at any layout into ``model`` (and ``optimizer``)
    at this layout; returns the saved ``extra``. RNG states are restored when the layout is the
    one that saved (each rank its own), and left alone otherwise (a warning says so).

    Collective over the world. Before any tensor is read, every rank checks that the checkpoint
    is complete, describes the same MoE layers (``manifest.MODEL_FIELDS``), holds optimizer
    state when ``optimizer`` is given, and has every key of this model with its global shape;
    otherwise every rank raises ``CheckpointError`` (or ``FileNotFoundError``) naming them.
    """
    ps = _check_ps(ps)
    rank, world = _world()
    found: tuple = ("ok", None, None)
    if rank == 0:
        try:
            path = resolve(directory)
            found = ("ok", path, mf.read(path))
        except (FileNotFoundError, CheckpointError) as e:
            found = (type(e).__name__, str(e), None)
    kind, path, saved = _broadcast(found)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(path)
    if kind != "ok":
        raise CheckpointError(path)

    msd, by_key, layers = _model_state(model, world > 1)
    state: dict[str, Any] = {"model": msd}
    current = {n: mf.describe_layer(m.config) for n, m in layers.items()}
    problems = mf.model_mismatches(saved["moe_layers"], current)
    kind = saved["optimizer"]
    if optimizer is not None:
        if kind is None:
            problems.append("the checkpoint holds no optimizer state (load with "
                            "optimizer=None)")
        elif saved["optimizer_groups"] != len(optimizer.param_groups):
            problems.append(f"the checkpoint's optimizer has {saved['optimizer_groups']} "
                            f"parameter groups, this one {len(optimizer.param_groups)}")
    what = f"checkpoint {path} does not match this model"
    _agree(problems, what)
    metadata = dcp.FileSystemReader(path).read_metadata()
    _agree(_shape_problems(state, metadata), what)
    if optimizer is not None and kind == "state":
        state["optim"] = _optim_state(model, optimizer, by_key)
        _agree(_shape_problems(state, metadata), what)
    elif optimizer is not None:
        state["optim_hyperparameters"] = b""

    same_layout = saved["rng"] and saved["layout"] == mf.describe_layout(ps)
    state["extra"] = b""
    if same_layout:
        state["rng"] = {f"rank{rank}": b""}
    with single_process_quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=world == 1)
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    elif "optim_hyperparameters" in state:  # saved before its first step: no state
        optimizer.state.clear()
        for group, saved_group in zip(optimizer.param_groups,
                                      pickle.loads(state["optim_hyperparameters"])):
            group.update(saved_group)
    if same_layout:
        _set_rng_state(state["rng"][f"rank{rank}"])
    elif rank == 0 and saved["rng"]:
        warnings.warn(f"checkpoint {path} was saved at layout {saved['layout']}, this is "
                      f"{mf.describe_layout(ps)}: RNG states not restored", stacklevel=2)
    return pickle.loads(state["extra"])
