"""Expert FFNs: the routed experts as stacked weights and the always-active shared experts.

* ``grouped.py``: ``GroupedExperts`` (``y_e = act(x_e @ w1[e]) @ w2[e]`` for every local expert,
  by grouped GEMM or block-sparse products), ``shard_expert_weights`` (the EP/ETP shard) and
  ``shard_expert_bias``;
* ``block_sparse.py``: the dropless block-sparse (MegaBlocks-style) expert FFN;
* ``shared.py``: ``SharedExpert``, one dense FFN applied to every token (optionally gated);
* ``activation.py``: SwiGLU / clamped SwiGLU / GELU / ReLU on the first GEMM's output.
"""

from .activation import activate
from .block_sparse import block_sparse_ffn, padded_rows, resolve_block_size
from .grouped import GroupedExperts, shard_expert_bias, shard_expert_weights
from .shared import SharedExpert

__all__ = [
    "GroupedExperts",
    "SharedExpert",
    "activate",
    "block_sparse_ffn",
    "padded_rows",
    "resolve_block_size",
    "shard_expert_bias",
    "shard_expert_weights",
]
