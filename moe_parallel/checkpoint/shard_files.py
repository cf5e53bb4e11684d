"""What a checkpoint's shard files must hold for DCP's ``.metadata`` to be believed.

DCP's ``.metadata`` lists, for every entry, its global size and dtype, the chunks it was saved
as, and for every chunk the file (``__<rank>_<n>.distcp``), the byte offset and the length that
hold it. A load that trusted it blindly would leave parts of a tensor unread, or read a chunk of
another shape or dtype and cast it, or fail halfway with the model half overwritten. Here:

* ``storage_problems(path, metadata)``: before anything is read, every file the metadata names
  exists and is long enough for every chunk it holds (one sentence per file: missing, or
  truncated with its size and the bytes needed);
* ``coverage_problems(metadata)``: the chunks of each tensor entry tile its global size (their
  volumes add up to it), so that no element of a loaded tensor is left unread;
* ``chunk_problem(file, key, tensor, entry, offsets)``: a chunk as read from its file has the
  shape the metadata gives for it and the entry's dtype (``None`` when it does).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional

from torch import Tensor
from torch.distributed.checkpoint import metadata as dcp_metadata

__all__ = ["chunk_problem", "coverage_problems", "storage_problems"]


def storage_problems(path: str | os.PathLike, metadata: dcp_metadata.Metadata) -> list[str]:
    """Files of ``metadata.storage_data`` (relative to ``path``) that are missing or shorter
    than the last byte of a chunk they hold."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        file = os.path.join(os.fspath(path), name)
        try:
            size = os.path.getsize(file)
        except OSError:
            problems.append(f"shard file {file} is missing (the metadata puts chunks in it)")
            continue
        if size < end:
            problems.append(f"shard file {file} is truncated: {size} bytes, the metadata puts "
                            f"chunks up to byte {end} in it")
    return problems


def coverage_problems(metadata: dcp_metadata.Metadata) -> list[str]:
    """Tensor entries whose saved chunks do not add up to the entry's global size."""
    problems = []
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            continue
        total = math.prod(entry.size)
        covered = sum(math.prod(c.sizes) for c in entry.chunks)
        if covered != total:
            problems.append(f"entry {key} of global shape {list(entry.size)} is saved as chunks "
                            f"of {covered} elements in all, not {total}")
    return problems


def chunk_problem(file: str, key: str, tensor: Any,
                  entry: dcp_metadata.TensorStorageMetadata,
                  offsets: Sequence[int]) -> Optional[str]:
    """Why ``tensor``, read from ``file`` as the chunk at ``offsets`` of entry ``key``
    (described by ``entry``), is not what the metadata says it is; ``None`` when it is."""
    chunk = next((c for c in entry.chunks if tuple(c.offsets) == tuple(offsets)), None)
    dtype = entry.properties.dtype
    if chunk is None:
        return f"the metadata of entry {key} has no chunk at {list(offsets)}"
    if not isinstance(tensor, Tensor):
        return (f"shard file {file} holds a {type(tensor).__name__} for entry {key}, not a "
                "tensor")
    if tuple(tensor.shape) != tuple(chunk.sizes):
        return (f"shard file {file} holds entry {key}'s chunk at {list(chunk.offsets)} with "
                f"shape {list(tensor.shape)}, the metadata says {list(chunk.sizes)}")
    if tensor.dtype != dtype:
        return (f"shard file {file} holds entry {key} as {tensor.dtype}, the metadata says "
                f"{dtype}")
    return None
