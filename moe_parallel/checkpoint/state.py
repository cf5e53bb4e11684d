"""The state dict a checkpoint holds, as DCP reads and writes it (layout in ``api.py``).

* ``model_state(model, distributed)``: ``get_model_state_dict`` with every routed-expert tensor
  annotated with its global layout (``layout.py``; FSDP2's DTensor over EDP by its local box),
  the layouts by key, the MoE layers by name;
* ``optim_state(model, optimizer, by_key)``: ``get_optimizer_state_dict`` with the tensors shaped
  like a routed-expert parameter annotated with that parameter's layout;
* ``hyperparameters(optimizer)``: each parameter group's settings without its parameters;
* ``optim_split(osd)`` / ``optim_merge(tensors, params, saved)``: the optimizer's non-tensor
  values (its groups' settings, any state value that is not a tensor) apart from its tensors,
  and back;
* ``rng_state()`` (``rng_encode``) / ``set_rng_state(state)``: this process's RNG states (torch
  CPU and CUDA, Python, NumPy) as tensors and plain values (``payload.py`` stores them), and
  back;
* ``single_process_quiet()``: DCP's warning about an uninitialised process group silenced.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..layer import MoELayer
from .layout import GlobalLayout, sharded_layouts

__all__ = ["hyperparameters", "model_state", "optim_merge", "optim_split", "optim_state",
           "rng_encode", "rng_state", "set_rng_state", "single_process_quiet"]


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save and load, even when asked for one: silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield


def _layer_names(model: nn.Module, keys: dict[int, str]) -> dict[str, MoELayer]:
    """Canonical name (the state-dict prefix, wrappers stripped) of every MoE layer."""
    return {keys[id(m.router.weight)].removesuffix(".router.weight"): m
            for m in model.modules() if isinstance(m, MoELayer)}


def _param_keys(model: nn.Module, msd: dict[str, Any]) -> dict[int, str]:
    """``id(parameter) -> key of msd`` (keys are DCP's canonical names: DDP's ``module.`` and
    similar wrapper prefixes removed): plain-tensor parameters matched by storage, FSDP2's
    (DTensor) by DCP's own name mapping (``_get_fqns``)."""
    def plain(t: Any) -> bool:
        return isinstance(t, Tensor) and not isinstance(t, DTensor)

    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in msd.items() if plain(t)}
    keys = {}
    for name, p in model.named_parameters():
        if plain(p):
            key = by_storage.get((p.data_ptr(), tuple(p.shape)))
        else:
            fqns = [f for f in _get_fqns(model, name) if f in msd]
            key = fqns[0] if len(fqns) == 1 else None
        if key is not None:
            keys[id(p)] = key
    return keys


def _annotated(layout: GlobalLayout, value: Tensor) -> Tensor:
    """``value`` (a routed-expert tensor, or its optimizer state) annotated with its global
    layout: a DTensor (sharded over EDP by FSDP2) by its local shard's box."""
    return layout.annotate_shard(value) if isinstance(value, DTensor) else layout.annotate(value)


def model_state(model: nn.Module, distributed: bool
                ) -> tuple[dict[str, Any], dict[str, GlobalLayout], dict[str, MoELayer]]:
    """The model's state dict (DCP's ``get_model_state_dict``) with the routed experts
    annotated with their global layout; the layouts by key; the MoE layers by name."""
    layouts = sharded_layouts(model, strict=distributed)
    msd = get_model_state_dict(model)
    keys = _param_keys(model, msd)
    by_key = {keys[pid]: layout for pid, layout in layouts.items()}
    for key, layout in by_key.items():
        msd[key] = _annotated(layout, msd[key])
    return msd, by_key, _layer_names(model, keys)


def optim_state(model: nn.Module, optimizer: torch.optim.Optimizer,
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
                entries[name] = _annotated(layout, value)
    return osd


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every parameter group's settings (``lr``, ``betas``, ...), its ``params`` left out."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def optim_split(osd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``get_optimizer_state_dict``'s ``osd`` as its tensors ``{"state": {key: {name: tensor}}}``
    and its other values ``{"groups": [settings and params], "state": {key: {name: value}}}``
    (DCP would pickle those)."""
    tensors: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, Any]] = {}
    for key, entries in osd["state"].items():
        for name, v in entries.items():
            (tensors if isinstance(v, Tensor) else values).setdefault(key, {})[name] = v
    return {"state": tensors}, {"groups": osd["param_groups"], "state": values}


def optim_merge(tensors: dict[str, Any], params: list[list[str]],
                saved: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict of ``tensors`` (``{"state": ...}``, read from a checkpoint),
    the non-tensor values ``saved`` (``optim_split``) and this optimizer's ``params`` (each
    group's parameter names), for ``set_optimizer_state_dict``."""
    state = {k: dict(v) for k, v in tensors["state"].items()}
    for key, values in saved["state"].items():
        state.setdefault(key, {}).update(values)
    groups = [{**group, "params": names} for group, names in zip(saved["groups"], params)]
    return {"state": state, "param_groups": groups}


def rng_encode(states: dict[str, Any]) -> dict[str, Any]:
    """RNG states as saved: ``states`` holds ``torch`` (a tensor), ``python``
    (``random.getstate()``), ``numpy`` (``np.random.get_state()``) and optionally ``cuda``
    (tensors); the Python and NumPy state words become int64 tensors."""
    version, words, gauss = states["python"]
    algorithm, keys, pos, has_gauss, cached = states["numpy"]
    out = {"torch": states["torch"],
           "python": (version, torch.tensor(words, dtype=torch.int64), gauss),
           "numpy": (algorithm, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos),
                     int(has_gauss), float(cached))}
    if "cuda" in states:
        out["cuda"] = list(states["cuda"])
    return out


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA when initialised, Python, NumPy) as
    ``rng_encode`` stores them, each generator's state word for word."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return rng_encode(state)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states ``rng_state`` returned (CUDA's when saved and available)."""
    torch.set_rng_state(state["torch"])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    algorithm, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
