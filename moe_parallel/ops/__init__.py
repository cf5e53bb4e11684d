"""Python face of the ``moe_parallel`` custom ops (``torch.ops.moe_parallel.*``).

Index tensors are int64; float tensors are float32, float64, bfloat16 or float16.

* ``permute(x, expert_idx, num_experts, keep=None, pad_to=0) -> (permuted, row_map, tpe)``
  gathers the kept token copies ``x[t]`` of every assignment ``(t, j)`` into expert-major order
  (expert id, then ``t``, then ``j``). Expert ``e``'s segment starts at ``sum_{e'<e} seg(e')``
  with ``seg = pad_to`` if ``pad_to > 0`` else ``count(e)``; padding rows are zero.
* ``unpermute(y, row_map, probs=None) -> out``:
  ``out[t] = sum_{j, row_map[t, j] >= 0} w[t, j] * y[row_map[t, j]]`` with ``w = probs`` or 1,
  accumulated in float32 (float64 for float64 ``y``) in the order ``j = 0..k-1``.
* ``sort_chunks(x, split_sizes, order) -> cat([chunk[order[0]], chunk[order[1]], ...])``.
* ``grouped_gemm(a, b, group_sizes, trans_b=False) -> out``: rows of group ``g`` are
  ``a_g @ b[g]`` (``a_g @ b[g]^T`` when ``trans_b``); ``grouped_gemm_wgrad(a, grad_out,
  group_sizes, trans_b=False)``: its weight gradient ``grad_b[g] = a_g^T @ grad_out_g``.
* ``swiglu(h) -> out``: ``silu(h[:, :F]) * h[:, F:]`` for ``h [N, 2F]``, fused in one pass;
  ``clamped_swiglu(h, alpha, limit)``: GPT-OSS's clamped variant (``swiglu.py``);
  ``swiglu_backward(grad_out, h)`` / ``clamped_swiglu_backward(...)``: their gradients.
* ``block_topology`` / ``bsr_sdd`` / ``bsr_dsd``: block-sparse (dropless) expert products, see
  ``block_sparse`` and csrc/cpu/block_sparse.cpp.
* ``expert_dropout(a, row_hash, group_sizes, first_expert, unit_offset, p) -> out``: inverted
  dropout of the experts' activation whose mask is a counter-based hash of (row hash, global
  expert, global hidden unit) (``dropout``; csrc/dropout_hash.h); its own adjoint.

Each public function runs the compiled op when ``moe_parallel._C`` is loaded and its
plain-PyTorch twin ``<op>_torch`` otherwise. The twins implement the same contract with ordinary
differentiable torch ops and serve as the test oracle. With the extension loaded each family
registers the fake (meta) kernels and the autograd formulas of its ops:

* permute:      ``grad_x = unpermute(grad_permuted, row_map, None, T)``
* unpermute:    ``grad_y, grad_probs = unpermute_backward(grad_out, y, row_map, probs, N)``
* sort_chunks:  ``grad_x = sort_chunks(grad, split_sizes[order], argsort(order))``
* grouped_gemm: ``grad_a = grouped_gemm(grad_out, b, gs, not trans_b)``,
  ``grad_b = grouped_gemm_wgrad(a, grad_out, gs, trans_b)``
* swiglu:       ``grad_h = swiglu_backward(grad_out, h)`` (``clamped_swiglu_backward`` likewise)
* bsr_sdd:      ``grad_x = bsr_dsd(grad_blocks, w^T, row_ptr, block_col)``,
  ``grad_w = bsr_wgrad(x, grad_blocks, ..., trans=False)``
* bsr_dsd:      ``grad_blocks = bsr_sdd(grad_y, w^T, block_row, block_col)``,
  ``grad_w = bsr_wgrad(grad_y, blocks, ..., trans=True)``
* expert_dropout: ``grad_a = expert_dropout(grad_out, row_hash, group_sizes, ...)``

Setting ``MOE_PARALLEL_REQUIRE_EXTENSION=1`` turns a failure to load the extension into an
``ImportError`` carrying the cause.

Modules (each op family holds its public functions, twins, argument checks, fake kernels and
autograd formulas):

* ``extension``: loading ``moe_parallel._C``, ``OP_NAMES``, ``has_extension``,
  ``extension_error`` and the torch.library registration helper;
* ``checks``: argument checks and helpers shared by the families (``IntList``,
  ``FLOAT_DTYPES``);
* ``permute``: ``permute``, ``expert_counts``, ``unpermute`` (and ``unpermute_backward``);
* ``sort_chunks``: ``sort_chunks``;
* ``grouped_gemm``: ``grouped_gemm`` (and ``grouped_gemm_wgrad``), ``GROUPED_GEMM_BACKENDS``;
* ``swiglu``: ``swiglu`` (and ``swiglu_backward``);
* ``block_topology``: ``block_topology``, the host layout of the block-sparse products;
* ``block_sparse``: ``bsr_sdd``, ``bsr_dsd`` (and ``bsr_wgrad``);
* ``dropout``: ``expert_dropout`` and its hash (``stream_key``, ``token_hash``).
"""

from __future__ import annotations

from .block_sparse import (
    bsr_dsd,
    bsr_dsd_torch,
    bsr_sdd,
    bsr_sdd_torch,
    bsr_wgrad_torch,
)
from .block_topology import block_topology, block_topology_torch
from .checks import FLOAT_DTYPES, IntList
from .dropout import expert_dropout, expert_dropout_torch, stream_key, token_hash
from .extension import OP_NAMES, extension_error, has_extension
from .grouped_gemm import (
    GROUPED_GEMM_BACKENDS,
    grouped_gemm,
    grouped_gemm_torch,
    grouped_gemm_wgrad,
    grouped_gemm_wgrad_torch,
)
from .permute import (
    expert_counts,
    permute,
    permute_torch,
    unpermute,
    unpermute_backward_torch,
    unpermute_torch,
)
from .sort_chunks import sort_chunks, sort_chunks_torch
from .swiglu import (
    clamped_swiglu,
    clamped_swiglu_backward,
    clamped_swiglu_backward_torch,
    clamped_swiglu_torch,
    swiglu,
    swiglu_backward,
    swiglu_backward_torch,
    swiglu_torch,
)

__all__ = [
    "OP_NAMES",
    "FLOAT_DTYPES",
    "IntList",
    "has_extension",
    "extension_error",
    "permute",
    "expert_counts",
    "unpermute",
    "sort_chunks",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "GROUPED_GEMM_BACKENDS",
    "swiglu",
    "swiglu_backward",
    "clamped_swiglu",
    "clamped_swiglu_backward",
    "clamped_swiglu_torch",
    "clamped_swiglu_backward_torch",
    "permute_torch",
    "unpermute_torch",
    "unpermute_backward_torch",
    "sort_chunks_torch",
    "grouped_gemm_torch",
    "grouped_gemm_wgrad_torch",
    "swiglu_torch",
    "swiglu_backward_torch",
    "block_topology",
    "bsr_sdd",
    "bsr_dsd",
    "block_topology_torch",
    "bsr_sdd_torch",
    "bsr_dsd_torch",
    "bsr_wgrad_torch",
    "expert_dropout",
    "expert_dropout_torch",
    "stream_key",
    "token_hash",
]
