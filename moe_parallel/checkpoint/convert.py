"""One file for one process, and back: ``consolidate``, ``shard``; and ``upgrade``.

``consolidate(dir, out)`` reads a checkpoint in one process (no process group) and writes its
full, single-process state, never a pickle:
    ``*.safetensors``: the model's tensors (routed experts as global ``w1 [E, H, (2)F]``,
        ``w2 [E, F, H]``), the manifest in the file's metadata (key ``moe_parallel``);
    any other name: the state ``{"model": {...}, "optim": {...} (when saved; or
        "optim_hyperparameters": [...] before its first step), "extra": {...}}`` as
        ``payload.py`` encodes it: its tensors as safetensors at ``out`` (keys are their paths,
        e.g. ``model.<fqn>``, ``optim.state.<fqn>.exp_avg``), the JSON document and the
        manifest in ``out.json`` (``{"manifest": ..., "state": ...}``); the optimizer state is
        keyed by parameter name as ``get_optimizer_state_dict`` gives it.
``read_consolidated(file)`` reads either back (or a ``torch.save`` file of that state, with
``torch.load(weights_only=True)`` only), ``shard(file, dir)`` writes it as a checkpoint
directory that ``load`` reads at any layout (without RNG states: they belong to the job that
saved). ``upgrade(dir, trust_pickles=True)`` rewrites a format-1 checkpoint (pickled ``extra``,
RNG states and hyperparameters) in format 2; it unpickles, so only for a trusted checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import manifest as mf
from . import payload, safe_dcp
from .agreement import CheckpointError
from .loading import resolve
from .state import optim_merge, optim_split, rng_encode, single_process_quiet

META_KEY = "moe_parallel"


def _read_all(path: str) -> dict[str, Any]:
    """Every entry of a checkpoint as full tensors, nested as saved (what DCP's
    ``format_utils.dcp_to_torch_save`` reads)."""
    state: dict[str, Any] = {}
    with single_process_quiet():
        safe_dcp.load(state, path, no_dist=True, planner=safe_dcp.SafeEmptyLoadPlanner())
    return state


def _legacy_refused(state: dict[str, Any], path: str) -> None:
    """``CheckpointError`` when the checkpoint read holds pickled bytes (format 1)."""
    pickled = sorted(k for k, v in state.items() if isinstance(v, bytes))
    if pickled or "param_groups" in state.get("optim", {}):
        raise CheckpointError(
            f"checkpoint {path}: entries {pickled or ['optim.param_groups']} hold pickled "
            "bytes, which are never loaded; if you trust its origin, convert it with "
            "`python -m moe_parallel.checkpoint upgrade --trust-pickles DIR`")


def _full_state(state: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The consolidated state (module docstring) of the entries ``_read_all`` read."""
    result: dict[str, Any] = {"model": state["model"],
                              "extra": payload.from_entries(state, "extra")}
    if manifest["optimizer"] is not None:
        values = payload.from_entries(state, "optim_hyperparameters")
        if "optim" in state:
            params = [g["params"] for g in values["groups"]]
            result["optim"] = optim_merge(state["optim"], params, values)
        else:  # saved before the optimizer's first step
            result["optim_hyperparameters"] = values["groups"]
    return result


def consolidate(directory: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the checkpoint at ``directory`` as one single-process state to ``out`` (module
    docstring); returns what was written (with its ``manifest``)."""
    path = resolve(directory)
    manifest = mf.read(path)
    state = _read_all(path)
    _legacy_refused(state, path)
    out = os.fspath(out)
    result = _full_state(state, manifest)
    if out.endswith(".safetensors"):
        tensors = {k: v.contiguous() for k, v in state["model"].items()}
        save_file(tensors, out, metadata={META_KEY: json.dumps(manifest)})
        return {"model": tensors, "manifest": manifest}
    doc, tensors = payload.encode(result, "consolidated")
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={META_KEY: json.dumps(manifest)})
    with open(out + ".json", "w") as f:
        json.dump({"manifest": manifest, "state": doc}, f, indent=1, allow_nan=False)
    return {**result, "manifest": manifest}


def read_consolidated(path: str | os.PathLike) -> dict[str, Any]:
    """The state ``consolidate`` wrote to ``path`` (with ``path.json`` beside it: everything;
    a ``*.safetensors`` file alone: the model), or a ``torch.save`` file of that state read
    with ``torch.load(weights_only=True)``; ``CheckpointError`` naming the file when it holds
    pickled objects (refused) or is none of these."""
    path = os.fspath(path)
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            side = json.load(f)
        state = payload.decode(side["state"], load_file(path), path)
        return {**state, "manifest": side["manifest"]}
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
        if meta is None:
            raise ValueError(f"{path} has no {META_KEY!r} metadata: it was not written by "
                             "consolidate, so its MoE layers are not described")
        return {"model": load_file(path), "manifest": json.loads(meta)}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(
            f"{path} is not a moe_parallel consolidated checkpoint (safetensors with "
            f"{os.path.basename(path)}.json beside it), and as a torch.save file it holds "
            "pickled objects outside torch's weights-only allow-list, which are refused: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _write(directory: str, state: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Write ``state`` (one process) and ``manifest`` as the checkpoint ``directory``, through
    ``<directory>.tmp`` and ``<directory>.old``."""
    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    with single_process_quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=True)
    mf.write(tmp, {**manifest, "format": mf.FORMAT})
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _optimizer_entries(optim: Any, groups: Any) -> tuple[dict[str, Any], Any]:
    """The entries of a consolidated optimizer state ``optim`` (or, before its first step,
    its ``groups``' settings) and the manifest's ``optimizer`` value."""
    if optim is not None:
        tensors, values = optim_split(optim)
        return {"optim": tensors, **payload.to_entries(values, "optim_hyperparameters")}, "state"
    if groups is not None:
        values = {"groups": groups, "state": {}}
        return payload.to_entries(values, "optim_hyperparameters"), "hyperparameters"
    return {}, None


def shard(file: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Write a consolidated file (``consolidate``'s output) as a checkpoint directory."""
    src = read_consolidated(file)
    for key in ("model", "manifest"):
        if key not in src:
            raise ValueError(f"{file} has no {key!r} entry: not a consolidated checkpoint")
    entries, kind = _optimizer_entries(src.get("optim"), src.get("optim_hyperparameters"))
    state = {"model": src["model"], **payload.to_entries(src.get("extra", {}), "extra"),
             **entries}
    manifest = {**src["manifest"], "layout": None, "rng": False, "optimizer": kind}
    if kind is None:
        manifest["optimizer_groups"] = 0
    _write(os.fspath(directory), state, manifest)


def upgrade(directory: str | os.PathLike, trust_pickles: bool = False) -> None:
    """Rewrite a checkpoint whose ``extra``, RNG states or optimizer hyperparameters are
    pickled (format 1) in format 2 (``payload.py``), layout and RNG states kept. Unpickling
    runs any code the pickles hold: ``CheckpointError`` unless ``trust_pickles``."""
    if not trust_pickles:
        raise CheckpointError(
            f"upgrade of {os.fspath(directory)} refused: it unpickles the checkpoint's entries, "
            "which runs any code they hold; pass trust_pickles=True (--trust-pickles) only for "
            "a checkpoint from a trusted source")
    path = resolve(directory)
    manifest, state = mf.read(path), _read_all(path)
    new = {"model": state["model"],
           **payload.to_entries(pickle.loads(state["extra"]) if "extra" in state else {}, "extra")}
    for rank, blob in state.get("rng", {}).items():
        new.update(payload.to_entries(rng_encode(pickle.loads(blob)), f"rng.{rank}"))
    groups = state.get("optim_hyperparameters")
    entries, _ = _optimizer_entries(state.get("optim"),
                                    None if groups is None else pickle.loads(groups))
    _write(path, {**new, **entries}, manifest)
