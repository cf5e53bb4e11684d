"""DeepSpeed's MoE layer on CPU, the contender of ``python -m benchmarks dispatch`` part 2.

DeepSpeed runs with ``DS_ACCELERATOR=cpu`` and ``TORCH_EXTENSIONS_DIR`` (default
``build/torch_extensions``; its first use JIT-builds the ``deepspeed_shm_comm`` op, which
:func:`prepare_deepspeed` does once in the parent before the ranks start). Each rank calls
``deepspeed.init_distributed(dist_backend="gloo")`` over the initialised torch.distributed and
``MoE.set_deepspeed_parallelism()`` (creates its ``ep_size_<w>`` expert and expert-data groups).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from benchmarks.harness import Stopwatch

_REPO = Path(__file__).resolve().parent.parent


def deepspeed_env() -> None:
    """``DS_ACCELERATOR=cpu`` and ``TORCH_EXTENSIONS_DIR=build/torch_extensions`` unless set."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / "build" / "torch_extensions"))


def prepare_deepspeed() -> dict:
    """Import DeepSpeed for CPU and JIT-build its shm comm op once (before the ranks, which
    would otherwise all build it at once). ``{"available": bool, "version", "seconds",
    "error"}``; never raises."""
    deepspeed_env()
    with Stopwatch() as sw:
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator
            from deepspeed.moe.layer import MoE  # noqa: F401

            builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
            if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                builder.load(verbose=False)
            return {"available": True, "version": deepspeed.__version__,
                    "accelerator": get_accelerator().device_name(),
                    "seconds": sw.seconds,
                    "env": {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")}}
        except Exception as exc:  # noqa: BLE001  (any failure: report ours only)
            return {"available": False, "seconds": sw.seconds,
                    "error": f"{type(exc).__name__}: {exc}"}


def deepspeed_layer(job: dict, world: int, capacity_factor: float, min_capacity: int
                    ) -> torch.nn.Module:
    """``deepspeed.moe.layer.MoE`` of ``job``'s size (``hidden``, ``ffn``, ``experts``,
    ``top_k``, ``dtype``) with ``ep_size = world``: plain top-2 (``top2_2nd_expert_sampling=
    False``), ``capacity_factor`` for train and eval, ``min_capacity``, experts
    ``Linear(H, F, bias=False) -> GELU -> Linear(F, H, bias=False)``, in train mode."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the initialised torch.distributed
    H, F = job["hidden"], job["ffn"]
    expert = torch.nn.Sequential(torch.nn.Linear(H, F, bias=False), torch.nn.GELU(),
                                 torch.nn.Linear(F, H, bias=False))
    layer = MoE(H, expert, num_experts=job["experts"], ep_size=world, k=job["top_k"],
                capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                min_capacity=min_capacity, drop_tokens=True, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()  # creates the ep_size_<w> expert / expert-data groups
    return layer.to(getattr(torch, job["dtype"])).train()
