"""``load`` / ``resolve``: read a checkpoint written at any layout into a model at this layout.

Stages, each on every rank in this order: find the checkpoint (rank 0 resolves it and reads its
manifest, one broadcast), check it against this model (its MoE layers and optimizer, its shard
files, then the keys, global shapes and dtypes of DCP's metadata: one all-gather each,
``agreement.agree``), read into new tensors (DCP, every chunk checked: ``safe_dcp``), then copy
in and apply (model tensors, optimizer state or hyperparameters, RNG states when the layout is
the one that saved).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from ..distributed import ParallelState, ShardedOptimizer
from ..layer import MoELayer
from ..routing.capacity_schedule import FACTOR, dynamic_capacity_mismatch
from . import manifest as mf
from . import payload, safe_dcp, shard_files
from .agreement import CheckpointError, agree, broadcast, check_ps, world
from .layout import as_dtensor, blank_like
from .state import (
    model_state,
    optim_merge,
    optim_split,
    optim_state,
    set_rng_state,
    single_process_quiet,
)

__all__ = ["load", "resolve"]


def resolve(directory: str | os.PathLike) -> str:
    """The complete checkpoint at ``directory`` (``<dir>.old`` when a save died while swapping
    it in); ``FileNotFoundError`` when there is none, ``CheckpointError`` when it is partial,
    another tool's, or its manifest cannot be read."""
    directory = os.fspath(directory)
    for candidate in (directory, directory + ".old"):
        if mf.read(candidate) is not None:
            return candidate
    if not os.path.exists(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}")
    if os.path.isfile(os.path.join(directory, ".metadata")):
        raise CheckpointError(
            f"{directory} is a torch.distributed.checkpoint directory without {mf.NAME}: it was "
            "not written by moe_parallel.checkpoint.save (another tool's checkpoint, or a save "
            "that did not finish); nothing was loaded")
    raise CheckpointError(
        f"{directory} is not a complete checkpoint (no {mf.NAME} or no .metadata: its save did "
        "not finish); nothing was loaded"
    )


def _find(directory: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The resolved path and manifest of rank 0's ``resolve(directory)``, on every rank (one
    broadcast); its ``FileNotFoundError`` or ``CheckpointError`` raised on every rank."""
    found: tuple = ("ok", None, None)
    if world()[0] == 0:
        try:
            path = resolve(directory)
            found = ("ok", path, mf.read(path))
        except Exception as e:  # every rank raises it, none waits for rank 0
            found = (type(e).__name__, str(e), None)
    kind, path, saved = broadcast(found)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(path)
    if kind != "ok":
        raise CheckpointError(path)
    return path, saved


def _manifest_problems(saved: dict[str, Any], layers: dict[str, MoELayer],
                       optimizer: Optional[torch.optim.Optimizer]) -> list[str]:
    """Differences between the manifest ``saved`` and this model's MoE layers
    (``manifest.model_mismatches``) and ``optimizer`` (state saved, number of groups)."""
    current = {n: mf.describe_layer(m.config) for n, m in layers.items()}
    problems = mf.model_mismatches(saved["moe_layers"], current)
    if optimizer is not None:
        if saved["optimizer"] is None:
            problems.append("the checkpoint holds no optimizer state (load with "
                            "optimizer=None)")
        elif saved["optimizer_groups"] != len(optimizer.param_groups):
            problems.append(f"the checkpoint's optimizer has {saved['optimizer_groups']} "
                            f"parameter groups, this one {len(optimizer.param_groups)}")
    return problems


def _state_option(key: str, saved: bool) -> Optional[str]:
    """The layer option behind a key only one side holds (None: no option decides it)."""
    layer, _, name = key.rpartition(".")
    return f"{layer}: {dynamic_capacity_mismatch(saved)}" if name == FACTOR else None


def _shape_problems(state: dict[str, Any], metadata) -> list[str]:
    """Keys of this model/optimizer missing from the checkpoint, model keys of the checkpoint
    this model lacks, and global shapes or dtypes that differ (a tensor is never cast on
    load)."""
    saved = metadata.state_dict_metadata
    problems = []
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for key, entries in state.get("optim", {}).get("state", {}).items():
        flat.update({f"optim.state.{key}.{n}": v for n, v in entries.items()})
    for key, value in flat.items():
        if key not in saved:
            problems.append(_state_option(key, False) or f"{key} is not in the checkpoint")
        elif isinstance(value, Tensor):
            shape = tuple(getattr(value, "global_shape", value.shape))
            have = tuple(getattr(saved[key], "size", ()))
            if have != shape:
                problems.append(f"{key} has global shape {list(have)} in the checkpoint, "
                                f"{list(shape)} in this model")
            dtype = getattr(getattr(saved[key], "properties", None), "dtype", None)
            if dtype is not None and dtype != value.dtype:
                problems.append(f"{key} is {dtype} in the checkpoint, {value.dtype} in this "
                                "model (convert the model to the checkpoint's dtype, load, "
                                "then convert it back)")
    for key in saved:
        if key.startswith("model.") and key not in flat:
            problems.append(_state_option(key, True)
                            or f"{key} is in the checkpoint but not in this model")
    return problems


_LEGACY = ["extra", "rng", "optim_hyperparameters", "optim.param_groups"]


def _payload_problems(metadata, names: list[str]) -> list[str]:
    """Entries that hold a pickle (never read: ``payload.py`` stores them as JSON and
    tensors), and entries of ``names`` the checkpoint lacks."""
    problems = [f"entry {key} holds pickled bytes, which are never loaded (a checkpoint "
                "written before moe_parallel checkpoint format 2, or a crafted one); if you "
                "trust its origin, convert it with `python -m moe_parallel.checkpoint upgrade "
                "--trust-pickles DIR`" for key in payload.pickled(metadata, _LEGACY)]
    return problems + [f"entry {name} is not in the checkpoint" for name in names
                       if name not in metadata.state_dict_metadata]


def _optimizer_template(model: nn.Module, optimizer: torch.optim.Optimizer,
                        by_key: dict[str, Any]) -> dict[str, Any]:
    """``optim_state`` of ``optimizer``; an optimizer without state gets it (DCP's
    zero-learning-rate step) even when its parameters hold gradients, which are kept."""
    grads = {}
    if not optimizer.state:
        for group in optimizer.param_groups:
            for p in group["params"]:
                grads[p], p.grad = p.grad, None
    try:
        return optim_state(model, optimizer, by_key)
    finally:
        for p, grad in grads.items():
            p.grad = grad


def _blank(tree: dict[str, Any], into: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """``tree`` (nested dicts) with each tensor replaced by a new ``blank_like`` one; the pairs
    (tensor, its blank) appended to ``into``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _blank(value, into)
        elif isinstance(value, Tensor):
            out[key] = blank_like(value)
            into.append((value, out[key]))
        else:
            out[key] = value
    return out


def _checked_state(path: str, saved: dict[str, Any], model: nn.Module,
                   optimizer: Optional[torch.optim.Optimizer], rng: Optional[str]
                   ) -> tuple[dict[str, Any], list[list[str]], list[tuple[Tensor, Tensor]]]:
    """The state dict to read the checkpoint at ``path`` into, the optimizer groups' parameter
    names, and the pairs (model tensor, the new tensor read for it).

    Every tensor of the state dict is new (``_blank``): nothing of ``model`` or ``optimizer``
    is written by the read. The entries of ``extra``, the optimizer's non-tensor values and RNG
    states ``rng`` are empty tensors (``payload.template``). Before it is returned every rank
    agrees that the checkpoint matches: the manifest, then the payload entries, its shard files
    (present, long enough, tiling each tensor: ``shard_files``), the model's keys, global shapes
    and dtypes, then (with optimizer state) the optimizer's. ``CheckpointError`` on every rank
    otherwise."""
    msd, by_key, layers = model_state(model, world()[1] > 1)
    state: dict[str, Any] = {"model": msd}
    what = f"checkpoint {path} does not match this model"
    agree(_manifest_problems(saved, layers, optimizer), what)
    metadata = safe_dcp.SafeFileSystemReader(path).read_metadata()
    names = ["extra"] + ([rng] if rng else [])
    names += ["optim_hyperparameters"] if optimizer is not None else []
    agree(_payload_problems(metadata, names), f"checkpoint {path} refused")
    agree(shard_files.storage_problems(path, metadata) + shard_files.coverage_problems(metadata),
          f"checkpoint {path} is damaged, nothing was loaded")
    agree(_shape_problems(state, metadata), what)
    params: list[list[str]] = []
    if optimizer is not None and saved["optimizer"] == "state":
        osd = _optimizer_template(model, optimizer, by_key)
        state["optim"], params = optim_split(osd)[0], [g["params"] for g in osd["param_groups"]]
        agree(_shape_problems(state, metadata), what)
    pairs: list[tuple[Tensor, Tensor]] = []
    state["model"] = _blank(state["model"], pairs)
    if "optim" in state:
        state["optim"] = _blank(state["optim"], [])
    for name in names:
        state.update(payload.template(metadata, name))
    return state, params, pairs


def _as_dtensors(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` (nested dicts) with each tensor read for a DTensor's shard made that DTensor
    again (``layout.as_dtensor``): FSDP2's optimizer state stays a DTensor."""
    return {k: _as_dtensors(v) if isinstance(v, dict) else
            as_dtensor(v) if isinstance(v, Tensor) else v for k, v in tree.items()}


def _apply_optimizer(state: dict[str, Any], params: list[list[str]], model: nn.Module,
                     optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Put the optimizer state read into ``optimizer``; for an optimizer saved before its first
    step, clear its state and restore its groups' hyperparameters."""
    if optimizer is None:
        return
    values = payload.from_entries(state, "optim_hyperparameters")
    if "optim" in state:
        # a ShardedOptimizer holds (and read) the state of the parameters this rank owns only
        options = StateDictOptions(strict=not isinstance(optimizer, ShardedOptimizer))
        set_optimizer_state_dict(model, optimizer,
                                 optim_merge(_as_dtensors(state["optim"]), params, values),
                                 options=options)
    else:  # saved before its first step: no state
        optimizer.state.clear()
        for group, saved_group in zip(optimizer.param_groups, values["groups"]):
            group.update(saved_group)


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
    Nothing is unpickled: an entry that holds pickled bytes (a checkpoint written before format
    2) is refused the same way, before any tensor is read.

    All or nothing: the checkpoint is read into new tensors and copied into ``model`` only when
    every rank has read all of it. A shard file that is missing, truncated, or holds a chunk of
    another shape or dtype than ``.metadata`` says raises ``CheckpointError`` naming the file
    on every rank, and ``model`` and ``optimizer`` are left as they were (an optimizer without
    state keeps none). The price: while loading, each rank holds a second copy of its share of
    the model and optimizer state, on their devices.
    """
    ps = check_ps(ps)
    rank, size = world()
    path, saved = _find(directory)
    same_layout = saved["rng"] and saved["layout"] == mf.describe_layout(ps)
    rng = f"rng.rank{rank}" if same_layout else None
    fresh = optimizer is not None and not optimizer.state
    try:
        state, params, pairs = _checked_state(path, saved, model, optimizer, rng)
        with single_process_quiet():
            safe_dcp.load(state, path, no_dist=size == 1)
    except BaseException:
        if fresh:  # the state DCP's template step gave it
            optimizer.state.clear()
        raise
    with torch.no_grad():
        for target, read in pairs:
            target.copy_(read)
    _apply_optimizer(state, params, model, optimizer)
    if rng is not None:
        set_rng_state(payload.from_entries(state, rng))
    elif rank == 0 and saved["rng"]:
        warnings.warn(f"checkpoint {path} was saved at layout {saved['layout']}, this is "
                      f"{mf.describe_layout(ps)}: RNG states not restored", stacklevel=2)
    return payload.from_entries(state, "extra")
