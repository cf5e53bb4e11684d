"""The checkpoint's manifest: what model wrote it, in what layout, with what state.

``moe_parallel.json`` beside DCP's files, written last (after every rank's data and DCP's
``.metadata``), so its presence marks a complete checkpoint:

    {"format": 2,
     "layout": {"world_size", "tp", "cp", "ep", "etp", "pp", "dp", "edp"} or null,
     "moe_layers": {layer name: {field: value for field in MODEL_FIELDS}},
     "optimizer": "state" | "hyperparameters" (it had not stepped: no state) | null,
     "optimizer_groups": number of parameter groups, "rng": bool}

Format 2 stores ``extra``, RNG states and optimizer hyperparameters as JSON and tensors
(``payload.py``); format 1 (read, so that ``load`` can name its pickled entries and point to
``upgrade``) pickled them.

``MODEL_FIELDS`` are the ``MoEConfig`` fields that fix the shape or the meaning of a layer's
state; a checkpoint loads only into layers that agree on all of them (the runtime choices:
top-k, capacity, dispatcher, expert implementation, may change).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..config import MoEConfig
from .agreement import CheckpointError

FORMAT = 2
READABLE = (1, 2)
NAME = "moe_parallel.json"
MODEL_FIELDS = ("num_experts", "hidden_size", "ffn_hidden_size", "activation", "router_type",
                "noisy_gating", "expert_bias", "router_bias", "expert_proj_bias",
                "num_shared_experts", "shared_ffn_size", "shared_expert_gate")
LAYOUT_FIELDS = ("world_size", "tp", "cp", "ep", "etp", "pp", "dp", "edp")


def describe_layer(config: MoEConfig) -> dict[str, Any]:
    """The ``MODEL_FIELDS`` of one layer's config."""
    return {f: getattr(config, f) for f in MODEL_FIELDS}


def describe_layout(ps) -> dict[str, int]:
    """The sizes of a ``ParallelState``."""
    return {f: getattr(ps, f) for f in LAYOUT_FIELDS}


def model_mismatches(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Every difference between the MoE layers a checkpoint describes and this model's, one
    sentence each naming the layer, the field and both values (empty: they agree)."""
    problems = []
    for name in sorted(saved.keys() - current.keys()):
        problems.append(f"MoE layer {name} is in the checkpoint but not in this model")
    for name in sorted(current.keys() - saved.keys()):
        problems.append(f"MoE layer {name} is in this model but not in the checkpoint")
    for name in sorted(saved.keys() & current.keys()):
        for field in MODEL_FIELDS:
            want, have = saved[name].get(field), current[name].get(field)
            if want != have:
                problems.append(f"MoE layer {name}: {field} is {want!r} in the checkpoint, "
                                f"{have!r} in this model")
    return problems


def write(directory: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` into ``directory`` atomically (temporary file, then rename)."""
    path = os.path.join(directory, NAME)
    with open(path + ".partial", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)


def read(directory: str) -> Optional[dict[str, Any]]:
    """The manifest of ``directory``, ``None`` when it has none (absent or incomplete);
    ``CheckpointError`` naming the file when it is not JSON, not an object, or of a format
    this version does not read."""
    path = os.path.join(directory, NAME)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, ".metadata")):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}): nothing was "
                              "loaded") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this version reads "
                              f"formats {list(READABLE)}")
    return manifest
