"""DCP reads that run no code from the checkpoint: ``SafeFileSystemReader``, ``SafeLoadPlanner``,
``load``.

``torch.distributed.checkpoint`` keeps two kinds of pickle in a checkpoint directory, and its own
reader and planner unpickle both without restriction. Here:

* ``.metadata`` (a pickled ``Metadata``: every key's size, dtype, chunks and file offsets) is
  unpickled by ``SafeFileSystemReader.read_metadata``, whose unpickler resolves only the globals
  in ``ALLOWED`` (DCP's metadata dataclasses and enums, the filesystem's ``_StorageInfo`` /
  ``_StoragePrefix``, ``torch.Size``, torch's dtypes, layouts and memory formats, ``pathlib``
  paths, ``collections.OrderedDict``). Any other global raises ``CheckpointError`` naming
  ``module.name`` and the file before the object is built; a truncated or malformed file raises
  ``CheckpointError`` naming the file.
* every non-tensor value (a "bytes item", ``torch.save`` of the object) is read by
  ``SafeLoadPlanner.load_bytes`` with ``torch.load(weights_only=True)``; a pickled object
  outside torch's weights-only allow-list raises ``CheckpointError`` naming the key.

``SafeFileSystemReader.read_data`` also checks every chunk it reads against the metadata
(``shard_files``): a missing or short file, or a chunk of another shape or dtype, raises
``CheckpointError`` naming the file instead of being cast or half read.

``load(state, path)`` reads the metadata first (so a refused ``.metadata`` raises before any
tensor is read, on every rank that reads it), then runs DCP with both, and raises a
``CheckpointError`` on every rank when any rank's read failed: a rank's own ``CheckpointError``
as itself, anything else (DCP wraps it in its ``CheckpointException``, which is not an
``Exception``) as one sentence naming the ranks.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import re
from typing import Any, Optional

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.futures import Future
from torch.serialization import _get_layout

from . import shard_files
from .agreement import CheckpointError

__all__ = ["ALLOWED", "SafeEmptyLoadPlanner", "SafeFileSystemReader", "SafeLoadPlanner",
           "load"]

_DCP_CLASSES = (
    dcp_metadata.Metadata, dcp_metadata.StorageMeta, dcp_metadata.MetadataIndex,
    dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties,
    dcp_metadata._MEM_FORMAT_ENCODING, dcp_filesystem._StorageInfo, dcp_filesystem._StoragePrefix,
    pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath, pathlib.WindowsPath,
    collections.OrderedDict, torch.Size,
)
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)

# (module, name) -> the object a ``.metadata`` pickle may reference: the classes above, the
# layout lookup ``torch.layout`` pickles through, and every dtype/layout/memory format of torch.
ALLOWED: dict[tuple[str, str], Any] = {
    **{(c.__module__, c.__qualname__): c for c in _DCP_CLASSES},
    ("torch.serialization", "_get_layout"): _get_layout,
    **{("torch", n): v for n, v in vars(torch).items() if isinstance(v, _TORCH_CONSTANTS)},
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``ALLOWED`` globals (``file`` names the source)."""

    def __init__(self, stream: Any, file: str) -> None:
        super().__init__(stream)
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"DCP metadata {self.file} refers to {module}.{name}, which is not one of the "
                "types DCP metadata consists of: refused to unpickle it (nothing was loaded)"
            ) from None


def _unpickle_metadata(stream: Any, file: str) -> dcp_metadata.Metadata:
    """The ``Metadata`` pickled in ``stream`` (read from ``file``), through
    ``_MetadataUnpickler``; ``CheckpointError`` naming ``file`` for anything else."""
    try:
        metadata = _MetadataUnpickler(stream, file).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated (EOF, UnpicklingError) or malformed (bad arguments)
        raise CheckpointError(f"DCP metadata {file} is truncated or corrupt "
                              f"({type(e).__name__}: {e}): nothing was loaded") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"DCP metadata {file} holds a {type(metadata).__name__}, not "
                              "DCP's Metadata: nothing was loaded")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` unpickles ``.metadata`` with the
    ``ALLOWED`` globals only, and whose ``read_data`` checks every chunk it reads against the
    metadata (module docstring)."""

    def set_up_storage_reader(self, metadata: dcp_metadata.Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        """DCP's set-up, keeping ``metadata`` for ``read_data``'s checks."""
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self.metadata = metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read ``plan``'s items, as ``FileSystemReader.read_data`` does, file by file:
        ``CheckpointError`` naming the file when it is missing or too short, when a chunk
        cannot be read, or when a chunk is not of the shape and dtype the metadata gives
        (``shard_files.chunk_problem``); a chunk is never cast or reshaped to fit."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path,
                                []).append(item)
        for relative_path, items in per_file.items():
            file = os.fspath(self.fs.concat_path(self.path, relative_path))
            try:
                with self.fs.create_stream(file, "rb") as stream:
                    for item in items:
                        self._read_item(stream, file, item, planner)
            except CheckpointError:
                raise
            except Exception as e:  # missing, short, or not what torch.save wrote
                raise CheckpointError(f"shard file {file} cannot be read ({type(e).__name__}: "
                                      f"{e}): nothing was loaded") from None
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_item(self, stream: Any, file: str, item: ReadItem, planner: LoadPlanner) -> None:
        """One item of ``read_data`` from the open ``stream`` of ``file``."""
        info = self.storage_data[item.storage_index]
        data = self.transforms.transform_load_stream(
            item, info.transform_descriptors or (), self._slice_file(stream, info))
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(data.read(-1)))
            return
        seekable = data if data.seekable() else io.BytesIO(data.read(-1))
        chunk = torch.load(seekable, map_location="cpu", weights_only=True)
        key = item.storage_index.fqn
        entry = self.metadata.state_dict_metadata[key]
        problem = shard_files.chunk_problem(file, key, chunk, entry, item.storage_index.offset)
        if problem is not None:
            raise CheckpointError(problem + ": nothing was loaded")
        chunk = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != chunk.size():
            raise CheckpointError(f"shard file {file}: entry {key} reads a block of shape "
                                  f"{list(chunk.shape)} into one of {list(target.shape)}")
        target.copy_(chunk)
        planner.commit_tensor(item, target)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        """``FileSystemReader.read_metadata`` (the global ``.metadata``, or rank ``rank``'s
        ``__<rank>.metadata``, with ``storage_meta.load_id`` set to this reader's) through the
        restricted unpickler; ``CheckpointError`` naming the file when it is refused, truncated,
        corrupt or unreadable."""
        file = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(file, "rb") as stream:
                metadata = _unpickle_metadata(stream, os.fspath(file))
        except OSError as e:
            raise CheckpointError(f"DCP metadata {file} cannot be read ({e}): nothing was "
                                  "loaded") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _refused(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its message."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    if found:
        return found.group(1)
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
    return found.group(1) if found else str(error).splitlines()[0]


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose bytes items are read with ``torch.load(weights_only=True)``:
    a pickled object outside torch's weights-only allow-list raises ``CheckpointError`` naming
    the state-dict key."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Put the object read from ``value`` at ``read_item``'s key (nested as saved when the
        state dict was flattened), as ``DefaultLoadPlanner.load_bytes`` does."""
        key = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint entry {key!r} holds a pickled object "
                                  f"({_refused(e)}) that is not plain data: refused to "
                                  "unpickle it") from None
        except Exception as e:
            raise CheckpointError(f"checkpoint entry {key!r} cannot be read "
                                  f"({type(e).__name__}: {e})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], obj)
        else:
            self.state_dict[key] = obj


class SafeEmptyLoadPlanner(SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """DCP's ``_EmptyStateDictLoadPlanner`` (fills an empty state dict with every entry of the
    checkpoint, as saved) with ``SafeLoadPlanner``'s bytes items."""


def _own_error(error: CheckpointException) -> CheckpointError:
    """The first ``CheckpointError`` among the ranks' failures DCP gathered in ``error``, or
    one naming the ranks that failed and the first failure's type and message (not DCP's
    stacked tracebacks)."""
    failures = {rank: (f[0] if isinstance(f, tuple) else f)
                for rank, f in sorted(error.failures.items())}
    for exc in failures.values():
        if isinstance(exc, CheckpointError):
            return exc
    rank, first = next(iter(failures.items()))
    line = str(first).strip().splitlines()[0] if str(first).strip() else ""
    return CheckpointError(f"reading the checkpoint failed on rank(s) {list(failures)} (rank "
                           f"{rank}: {type(first).__name__}: {line}): nothing was loaded")


def load(state: dict[str, Any], path: str | os.PathLike, *, no_dist: bool = False,
         planner: Optional[LoadPlanner] = None) -> None:
    """Read the checkpoint at ``path`` into ``state`` in place (DCP's ``_load_state_dict``, the
    step ``dcp.load`` runs for a state dict without ``Stateful`` values, so that a planner that
    adds keys fills ``state`` itself) with ``SafeFileSystemReader`` and ``planner`` (default
    ``SafeLoadPlanner()``). Collective over the default group unless ``no_dist``.

    The metadata is read (and refused) before DCP starts. Any rank's failure while reading
    raises a ``CheckpointError`` on every rank (DCP gathers them): the first rank's own
    ``CheckpointError`` as itself, another exception as one sentence naming the ranks."""
    reader = SafeFileSystemReader(path)
    reader.read_metadata()
    try:
        _load_state_dict(state, storage_reader=reader, planner=planner or SafeLoadPlanner(),
                         no_dist=no_dist)
    except CheckpointException as e:
        raise CheckpointError(str(_own_error(e))) from None
