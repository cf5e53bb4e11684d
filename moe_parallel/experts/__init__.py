"""Expert FFNs: the routed experts as stacked weights and the always-active shared experts.

* ``base.py``: ``RoutedExperts``, the declared interface of every routed-experts implementation
  (``forward(rows, group_sizes) -> ExpertsOutput(y, padded_rows)`` on rows grouped by local
  expert);
* ``grouped.py``: ``GroupedExperts`` (``y_e = act(x_e @ w1[e]) @ w2[e]`` for every local expert,
  by grouped GEMM or block-sparse products, each row optionally scaled by its routing weight),
  ``shard_expert_weights`` (the EP/ETP shard) and ``shard_expert_bias``;
* ``grouped_ffn.py``: ``grouped_ffn``, the grouped-GEMM expert FFN as one autograd function
  whose saved tensors follow ``config.recompute``;
* ``memory.py``: ``expert_saved_bytes`` (what the experts keep for backward, per recompute mode)
  and ``peak_bytes_bound`` (a rank's peak live bytes in one forward+backward);
* ``block_sparse.py``: the dropless block-sparse (MegaBlocks-style) expert FFN;
* ``shared.py``: ``SharedExpert``, one dense FFN applied to every token (optionally gated);
* ``activation.py``: SwiGLU / clamped SwiGLU / GELU / ReLU on the first GEMM's output.

``build_experts`` picks the class by ``config.expert_impl`` from ``EXPERT_CLASSES`` (keyed by
``config.EXPERT_IMPLS``; ``"grouped"`` and ``"block_sparse"`` are the two computations of
``GroupedExperts``). A new implementation is one new module with a ``RoutedExperts`` subclass
(constructor ``(config, num_local_experts, ffn_size, device, first_expert, etp_rank)``) plus its
line in ``EXPERT_CLASSES`` and its name in ``config.ExpertImpl``.
"""

from __future__ import annotations

import torch

from ..config import MoEConfig
from .activation import activate
from .base import ExpertsOutput, RoutedExperts
from .block_sparse import block_sparse_ffn, padded_rows, resolve_block_size
from .grouped import GroupedExperts, shard_expert_bias, shard_expert_weights
from .grouped_ffn import grouped_ffn
from .memory import expert_saved_bytes, peak_bytes_bound
from .shared import SharedExpert

__all__ = [
    "EXPERT_CLASSES",
    "ExpertsOutput",
    "GroupedExperts",
    "RoutedExperts",
    "SharedExpert",
    "activate",
    "block_sparse_ffn",
    "build_experts",
    "expert_saved_bytes",
    "grouped_ffn",
    "padded_rows",
    "peak_bytes_bound",
    "resolve_block_size",
    "shard_expert_bias",
    "shard_expert_weights",
]

# The routed-experts class of each ``expert_impl`` (one entry per ``config.EXPERT_IMPLS``).
EXPERT_CLASSES: dict[str, type[RoutedExperts]] = {
    "grouped": GroupedExperts,
    "block_sparse": GroupedExperts,
}


def build_experts(config: MoEConfig, num_local_experts: int, ffn_size: int,
                  device: torch.device | str | None = None, first_expert: int = 0,
                  etp_rank: int = 0) -> RoutedExperts:
    """``EXPERT_CLASSES[config.expert_impl]`` holding global experts ``first_expert ..
    + num_local_experts`` with ``ffn_size`` hidden units each (the ETP rank ``etp_rank``'s
    share of ``ffn_hidden_size``)."""
    cls = EXPERT_CLASSES[config.expert_impl]
    return cls(config, num_local_experts, ffn_size, device=device, first_expert=first_expert,
               etp_rank=etp_rank)
