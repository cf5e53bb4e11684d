"""``save`` / ``load``: training state on ``torch.distributed.checkpoint`` (DCP), any layout to any.

A checkpoint directory holds DCP's files (``.metadata`` and one ``.distcp`` file per writing rank)
and ``moe_parallel.json`` (``manifest.py``). Its state dict, flattened by DCP:

    model.<fqn>                 every parameter and persistent buffer (expert bias included);
                                routed experts as global tensors (``layout.py``), the rest whole
    optim.state.<fqn>.<name>    optimizer state by parameter name (``get_optimizer_state_dict``);
                                tensors shaped like their parameter share its layout
    optim_hyperparameters(.*)   the optimizer's non-tensor values: its groups' settings
                                (learning rate, betas, ...) and non-tensor state
    extra(.*)                   the caller's ``extra`` (step, data position, scheduler)
    rng.rank<r>(.*)             each rank's RNG states (torch CPU and CUDA, Python, NumPy)

Each of the last three is a JSON document (uint8 tensor of its UTF-8 bytes) and its tensors
(``<name>.<path>``), schema in ``payload.py``: nothing in a checkpoint is a pickle, and an entry
that holds one (format 1) is refused on load (``upgrade`` converts it).

Replicated tensors are written once (DCP deduplicates identical write items over ranks). A save
writes to ``<dir>.tmp`` and, when every rank is done, renames it to ``<dir>`` (the previous
checkpoint goes to ``<dir>.old`` for the instant of the swap): a save killed midway leaves the
previous checkpoint intact. Every check before a load runs on every rank and ends in the same
verdict everywhere (a named error on all ranks, before any tensor is read).

The stages live in ``saving.py`` (collect, prepare, write, commit), ``loading.py`` (find,
check, read, apply), ``state.py`` (the state dict's entries) and ``agreement.py`` (the ranks'
common verdict); this module is their public face.
"""

from __future__ import annotations

from .agreement import CheckpointError
from .loading import load, resolve
from .saving import PendingSave, save
from .state import single_process_quiet

__all__ = ["CheckpointError", "PendingSave", "load", "resolve", "save", "single_process_quiet"]
