"""Routing traces: a ``RoutingRecord`` (``routing.record``) written to safetensors files, one per
rank and step, and read back as the global view of the step.

Layout: ``DIR/step_{step:08d}/rank_{rank:05d}.safetensors``, one file per rank of the run
(``save_trace``). Each file holds that rank's rows: the tokens its MoE layers routed, keyed by
``(seq_id, position)``, one row per key, sorted by key. ``load_trace`` of a step directory merges
every rank's file (``RoutingRecord.merge``); of one rank file, that rank's rows.

Tensors (CPU, contiguous), for each recorded layer ``i`` (``0 ..`` the record's layer count - 1,
in the model's order of the recorded layers) and each field the layer has set:

=========================  ===========  ================  =========================================
name                       dtype        shape             meaning
=========================  ===========  ================  =========================================
``layer{i}.seq_id``        int64        ``[N]``           the token's sequence id
``layer{i}.position``      int64        ``[N]``           the token's position in its sequence
``layer{i}.expert_idx``    int64        ``[N, k]``        global expert id of each of ``k`` slots
``layer{i}.selected``      bool         ``[N, k]``        the router selected the slot (top-p)
``layer{i}.kept``          bool         ``[N, k]``        the assignment survived capacity
``layer{i}.weights``       router's     ``[N, k]``        combine weight of each slot (optional)
``layer{i}.logits``        router's     ``[N, E]``        router logits (optional)
=========================  ===========  ================  =========================================

Metadata (safetensors header, str -> str):

================  ==========================================================================
key               value
================  ==========================================================================
``format``        ``"moe_parallel.routing_trace"``
``version``       ``"1"``
``step``          the step (decimal)
``rank``          the writing rank, ``0 .. world_size - 1``
``world_size``    the number of ranks, each of which writes a file of the step
``num_experts``   ``E``
``top_k``         ``k``
``num_layers``    the record's layer count
``layer_names``   JSON list of the layers' module names (may be empty)
``truncated``     ``"1"`` when the rank's recording hit its byte budget and left forwards out,
                  else ``"0"``
================  ==========================================================================

Reading uses safetensors only (no unpickling). A file whose ``format`` is not this one, or
whose header cannot be read, is refused with ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..routing.record import LayerRouting, RoutingRecord

__all__ = ["TRACE_FORMAT", "TRACE_VERSION", "TraceInfo", "load_trace", "rank_file",
           "save_trace", "step_dir", "trace_info", "trace_steps"]

TRACE_FORMAT = "moe_parallel.routing_trace"
TRACE_VERSION = "1"
_FIELDS = tuple(f.name for f in fields(LayerRouting))
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_RANK_RE = re.compile(r"^rank_(\d{5,})\.safetensors$")
# metadata every rank file of one step must agree on
_AGREED = ("format", "version", "step", "world_size", "num_experts", "top_k", "num_layers",
           "layer_names")

PathLike = Union[str, os.PathLike]


def step_dir(directory: PathLike, step: int) -> Path:
    """``directory/step_{step:08d}``."""
    return Path(directory) / f"step_{step:08d}"


def rank_file(directory: PathLike, step: int, rank: int) -> Path:
    """``directory/step_{step:08d}/rank_{rank:05d}.safetensors``."""
    return step_dir(directory, step) / f"rank_{rank:05d}.safetensors"


def save_trace(record: RoutingRecord, directory: PathLike, step: int, rank: int,
               world_size: int, truncated: bool = False) -> Path:
    """Write ``record`` (this rank's rows) to ``rank_file(directory, step, rank)`` in the
    module's format, creating the directories; returns the file's path. The file is written
    under a temporary name and renamed, so a reader never sees half a file."""
    for name, value, low in (("step", step, 0), ("rank", rank, 0), ("world_size", world_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"save_trace: {name} must be an int >= {low}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"save_trace: rank must be < world_size={world_size}, got {rank}")
    if not isinstance(record, RoutingRecord):
        raise ValueError(f"save_trace: record must be a RoutingRecord, got "
                         f"{type(record).__name__}")
    tensors = {f"layer{i}.{name}": t.detach().to("cpu", copy=True).contiguous()
               for i, layer in enumerate(record.layers) for name, t in layer.tensors().items()}
    metadata = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "step": str(step),
                "rank": str(rank), "world_size": str(world_size),
                "num_experts": str(record.num_experts), "top_k": str(record.top_k),
                "num_layers": str(record.num_layers),
                "layer_names": json.dumps(list(record.layer_names)),
                "truncated": "1" if truncated else "0"}
    path = rank_file(directory, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def trace_steps(directory: PathLike) -> list[int]:
    """The steps with a ``step_NNNNNNNN`` directory under ``directory``, ascending (an absent
    ``directory`` has none)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if p.is_dir() and (m := _STEP_RE.match(p.name)))


def _metadata(path: Path) -> dict[str, str]:
    """The file's header metadata, checked to be a trace's (``ValueError`` naming the file)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"routing trace {path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != TRACE_FORMAT:
        raise ValueError(f"routing trace {path}: not a routing trace (metadata format="
                         f"{meta.get('format')!r}, expected {TRACE_FORMAT!r})")
    if meta.get("version") != TRACE_VERSION:
        raise ValueError(f"routing trace {path}: format version {meta.get('version')!r}, this "
                         f"reader knows version {TRACE_VERSION!r}")
    missing = [k for k in ("step", "rank", "world_size", "num_experts", "top_k", "num_layers",
                           "layer_names", "truncated") if k not in meta]
    if missing:
        raise ValueError(f"routing trace {path}: metadata lacks {missing}")
    return meta


def _read(path: Path, meta: dict[str, str]) -> RoutingRecord:
    """The ``RoutingRecord`` held by one rank file (its rows as written)."""
    n = int(meta["num_layers"])
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            layer, _, name = key.partition(".")
            i = int(layer[5:]) if layer.startswith("layer") and layer[5:].isdigit() else -1
            if not 0 <= i < n or name not in _FIELDS:
                raise ValueError(f"routing trace {path}: unexpected tensor {key!r} (a file of "
                                 f"{n} layers holds layer<i>.<field>, field one of {_FIELDS})")
            parts[i][name] = f.get_tensor(key)
    layers = []
    for i, p in enumerate(parts):
        lacking = [k for k in ("seq_id", "position", "expert_idx", "selected", "kept")
                   if k not in p]
        if lacking:
            raise ValueError(f"routing trace {path}: layer {i} lacks {lacking}")
        layers.append(LayerRouting(**p))
    return RoutingRecord(layers, int(meta["num_experts"]), int(meta["top_k"]),
                         json.loads(meta["layer_names"]))


@dataclass(frozen=True)
class TraceInfo:
    """What a trace's metadata says (``trace_info``): the step, the world size, ``num_experts``,
    ``top_k``, the layer names, the ranks whose files it read, and those whose recording was
    truncated (their byte budget left forwards out)."""

    step: int
    world_size: int
    num_experts: int
    top_k: int
    layer_names: list[str]
    ranks: list[int]
    truncated_ranks: list[int]

    @property
    def truncated(self) -> bool:
        return bool(self.truncated_ranks)


def _files(path: PathLike) -> list[tuple[Path, dict[str, str]]]:
    """The rank files of ``path`` (a step directory: all of them, checked to agree and to be
    complete; a file: itself) with their metadata."""
    path = Path(path)
    if path.is_file():
        return [(path, _metadata(path))]
    if not path.is_dir():
        raise ValueError(f"routing trace {path}: no such file or step directory")
    found = sorted(p for p in path.iterdir() if _RANK_RE.match(p.name))
    if not found:
        raise ValueError(f"routing trace {path}: no rank_NNNNN.safetensors file in the directory")
    files = [(p, _metadata(p)) for p in found]
    first_path, first = files[0]
    for p, meta in files[1:]:
        differ = [k for k in _AGREED if meta[k] != first[k]]
        if differ:
            raise ValueError(
                f"routing trace {path}: {p.name} and {first_path.name} disagree on "
                + ", ".join(f"{k} ({meta[k]} vs {first[k]})" for k in differ))
    for p, meta in files:
        if int(_RANK_RE.match(p.name).group(1)) != int(meta["rank"]):
            raise ValueError(f"routing trace {p}: the file name says rank "
                             f"{int(_RANK_RE.match(p.name).group(1))}, its metadata rank "
                             f"{meta['rank']}")
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != int(first["step"]):
        raise ValueError(f"routing trace {path}: the directory says step {int(m.group(1))}, its "
                         f"files step {first['step']}")
    world = int(first["world_size"])
    ranks = {int(meta["rank"]) for _, meta in files}
    missing = sorted(set(range(world)) - ranks)
    extra = sorted(ranks - set(range(world)))
    if missing or extra:
        raise ValueError(
            f"routing trace {path}: world_size={world} needs the files of ranks 0..{world - 1}; "
            + (f"missing rank(s) {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected rank(s) {extra}" if extra else ""))
    return files


def load_trace(path: PathLike) -> RoutingRecord:
    """The routing trace at ``path``: a step directory (every rank's file, merged into the
    global view: per layer one row per key, sorted by key) or one rank file (its rows).
    ``ValueError`` naming what is wrong: a file that is not a trace, rank files that disagree
    on format, version, step, world size, ``num_experts``, ``top_k`` or layers, a missing rank,
    a key two ranks recorded with different assignments."""
    return RoutingRecord.merge([_read(p, meta) for p, meta in _files(path)])


def trace_info(path: PathLike) -> TraceInfo:
    """The metadata of the trace at ``path`` (as ``load_trace`` reads it), with the ranks whose
    recording was truncated."""
    files = _files(path)
    meta = files[0][1]
    ranks = [int(m["rank"]) for _, m in files]
    return TraceInfo(step=int(meta["step"]), world_size=int(meta["world_size"]),
                     num_experts=int(meta["num_experts"]), top_k=int(meta["top_k"]),
                     layer_names=json.loads(meta["layer_names"]), ranks=ranks,
                     truncated_ranks=[r for r, (_, m) in zip(ranks, files)
                                      if m["truncated"] == "1"])
