"""Checkpoints that describe the model, not the job: save at one layout, load at any other.

* ``layout.py``: where each rank's routed-expert shard sits in the global expert tensors (DCP
  chunk metadata, SwiGLU's gate | up halves as two chunks);
* ``manifest.py``: the model and layout a checkpoint was written by, and the completeness marker;
* ``api.py``: ``save`` / ``load`` (synchronous or asynchronous, atomic commit, named errors) and
  the checkpoint's state-dict format; their stages in ``saving.py`` and ``loading.py``, the
  state dict's entries in ``state.py``, the ranks' common verdict in ``agreement.py``;
* ``safe_dcp.py``: every DCP read, running no code from the checkpoint (``.metadata`` through
  an allow-list unpickler, non-tensor values through ``torch.load(weights_only=True)``);
* ``shard_files.py``: what the shard files must hold for ``.metadata`` to be believed (present,
  long enough, chunks tiling each tensor, each chunk of the shape and dtype it claims);
* ``series.py``: a run's checkpoints ``root/step_<N>`` with a ``root/latest`` pointer;
* ``convert.py``: ``consolidate`` a checkpoint into one single-process state (safetensors + JSON)
  and ``shard`` one back, ``upgrade`` a pickled (format 1) one; ``python -m
  moe_parallel.checkpoint`` runs them;
* ``payload.py``: the JSON + tensors schema of ``extra``, RNG states and hyperparameters.
"""

from .api import CheckpointError, PendingSave, load, resolve, save
from .convert import consolidate, read_consolidated, shard, upgrade
from .series import latest_step, save_step, step_dir

__all__ = ["CheckpointError", "PendingSave", "consolidate", "latest_step", "load", "resolve",
           "read_consolidated", "save", "save_step", "shard", "step_dir", "upgrade"]
