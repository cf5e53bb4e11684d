"""A checkpoint's values that are not model tensors, stored without pickle: JSON plus tensors.

Schema ``moe_parallel.payload``, version 1: one JSON document

    {"schema": "moe_parallel.payload", "version": 1, "value": V}
    V = null | true | false | int | finite float | str
      | [V, ...]                       a list
      | {"__tuple__": [V, ...]}        a tuple
      | {"__tensor__": "<path>"}       a tensor, stored beside the document under its path
      | {"<str>": V, ...}              a dict with str keys ("__tuple__", "__tensor__" reserved)

A tensor's path is the dict keys and list indices from the root to it, joined by ``.``. A float
is written as its shortest repr, so it reads back bitwise; a tensor reads back on the CPU. Any
other type (a set, an object, a non-str key, NaN or infinity) is refused when encoding with a
``TypeError`` naming its path and type.

In a checkpoint the value named ``name`` is the entry ``name`` (a uint8 tensor of the
document's UTF-8 bytes) and one entry ``name.<path>`` per tensor (``to_entries`` /
``from_entries``); ``template`` gives the empty tensors DCP reads them into (shapes and dtypes
from DCP's metadata), ``pickled`` the entries of a name that hold pickled bytes instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

__all__ = ["SCHEMA", "VERSION", "decode", "digest", "dumps", "encode", "from_entries", "pickled",
           "template", "to_entries"]

SCHEMA, VERSION = "moe_parallel.payload", 1
_TUPLE, _TENSOR = "__tuple__", "__tensor__"


def encode(value: Any, where: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The schema's document for ``value`` and its tensors by path; ``TypeError`` naming the
    path (``where`` first) and type of anything the schema cannot hold."""
    tensors: dict[str, Tensor] = {}

    def walk(v: Any, path: tuple[str, ...]) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float) and math.isfinite(v):
            return v
        if isinstance(v, (list, tuple)):
            items = [walk(x, path + (str(i),)) for i, x in enumerate(v)]
            return {_TUPLE: items} if isinstance(v, tuple) else items
        if isinstance(v, dict) and all(isinstance(k, str) and k not in (_TUPLE, _TENSOR)
                                       for k in v):
            return {k: walk(x, path + (k,)) for k, x in v.items()}
        if type(v) is Tensor or type(v) is torch.nn.Parameter:
            key = ".".join(path)
            if key in tensors:
                raise TypeError(f"{where}.{key}: two tensors have this path")
            tensors[key] = v.detach().cpu()
            return {_TENSOR: key}
        what = f"{type(v).__name__} {v!r}" if isinstance(v, float) else type(v).__name__
        if isinstance(v, dict):
            what = "dict with a key that is not a str or is reserved (__tuple__, __tensor__)"
        raise TypeError(f"{'.'.join((where,) + path)} is a {what}: a checkpoint holds only "
                        "None, bool, int, finite float, str, list, tuple, dict with str keys "
                        "and tensors")

    return {"schema": SCHEMA, "version": VERSION, "value": walk(value, ())}, tensors


def decode(doc: dict[str, Any], tensors: dict[str, Tensor], where: str) -> Any:
    """The value ``encode`` described by ``doc``; ``ValueError`` for another schema or version
    or a tensor that is missing."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("version") != VERSION:
        raise ValueError(f"{where}: not a {SCHEMA} version {VERSION} document")

    def walk(v: Any) -> Any:
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            if set(v) == {_TUPLE}:
                return tuple(walk(x) for x in v[_TUPLE])
            if set(v) == {_TENSOR}:
                if v[_TENSOR] not in tensors:
                    raise ValueError(f"{where}: tensor {v[_TENSOR]!r} is missing")
                return tensors[v[_TENSOR]]
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(doc["value"])


def dumps(doc: dict[str, Any]) -> bytes:
    """The canonical UTF-8 JSON of ``doc`` (sorted keys, no spaces)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def to_entries(value: Any, name: str) -> dict[str, Tensor]:
    """``value`` as checkpoint entries: ``name`` (the document) and ``name.<path>`` (tensors)."""
    doc, tensors = encode(value, name)
    entries = {name: torch.frombuffer(bytearray(dumps(doc)), dtype=torch.uint8)}
    entries.update({f"{name}.{k}": t for k, t in tensors.items()})
    return entries


def from_entries(entries: dict[str, Tensor], name: str) -> Any:
    """The value ``to_entries`` stored as ``entries`` under ``name``."""
    doc = json.loads(bytes(entries[name].numpy().tobytes()).decode())
    prefix = name + "."
    return decode(doc, {k[len(prefix):]: t for k, t in entries.items() if k.startswith(prefix)},
                  name)


def digest(entries: dict[str, Tensor]) -> str:
    """SHA-256 of entries (keys, dtypes, shapes and bytes): equal values, equal digests."""
    h = hashlib.sha256()
    for key in sorted(entries):
        t = entries[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _under(key: str, name: str) -> bool:
    return key == name or key.startswith(name + ".")


def template(metadata, name: str) -> dict[str, Tensor]:
    """Empty tensors (shape and dtype from DCP's ``metadata``) for the entries of ``name``."""
    return {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in metadata.state_dict_metadata.items()
            if _under(k, name) and isinstance(m, TensorStorageMetadata)}


def pickled(metadata, names: list[str]) -> list[str]:
    """The entries under ``names`` that DCP's ``metadata`` lists as bytes (pickles)."""
    return sorted(k for k, m in metadata.state_dict_metadata.items()
                  if isinstance(m, BytesStorageMetadata) and any(_under(k, n) for n in names))
