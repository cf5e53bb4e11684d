"""Bytes the routed experts keep for their backward, and a bound on a rank's peak live bytes
during one forward and backward of an ``MoELayer`` (grouped experts, all-to-all dispatch).

Notation, per rank: ``T`` tokens; ``S`` rows it sends (its kept assignments, ``T·k`` dropless);
``R`` rows its experts receive (padding included); ``H`` hidden size; ``F`` the local ffn size
(``ffn_hidden_size / etp``) and ``F1`` the first GEMM's width (``2F`` for the SwiGLUs, else
``F``); ``E_l`` local experts; ``s`` the bytes of a ``params_dtype`` element, ``r`` of a router
element (float32, float64 for float64 routers).

Saved for the backward by the expert FFN (``grouped_ffn``, exact):

    A_experts = s·R·c + max(r, s)·R + 8·E_l (+ 8·R with expert_dropout)
                                    c = H + F1 + F ("none"), H + F1 ("activation"), H ("experts")

(the row weights, in the wider of the router's and the rows' dtype, one spare slot aside, the
group sizes, and with ``expert_dropout`` the rows' int64 hashes, from which the backward
regenerates the mask in every mode; for ReLU, whose gradient reads its output, "none" keeps
``H + F`` per row, as many as "activation"). For a balanced load ``R = T·k``; a rank whose
experts receive ``ρ`` times the balanced load has ``R = ρ·T·k``.

Peak live bytes of the rank above what was live before the step (inputs and parameters
excluded, the gradients the step makes included), for any ``recompute`` mode:

    peak <= s·[R·(2H + 2F1 + F) + 2·(S + T)·H]                  experts and dispatch buffers
            + s·E_l·(H·F1 + F·H)                                  expert weight gradients
            + r·(4·T·E + E·H) + 8·(8·T·k + 4·R + 4·w·E + 64)       router, indices, counts

The first line: the expert FFN's rows at its fullest stage, ``R·(2H + 2F1 + F)`` elements
(the backward of the activation under "experts": ``x_e``, the recomputed ``h``, the output
gradient, ``d(w ⊙ a)`` and ``dh``; every other stage of every mode holds less: the forward's
``x_e, h, a, w ⊙ a`` and output, the second GEMM's backward with ``a`` and the output gradient,
the first GEMM's backward with ``dh`` and the input gradient; each autograd node frees its saved
tensors and incoming gradient before the next runs), and on the token side the layer output
and one exchange's send and receive buffers (``[S, H]`` each; a buffer an exchange thread frees
late counts there) with the input gradient. The last line: the router's logits, scores and
their gradients, its weight gradient, the routing indices, row maps and row weights, and the
per-expert counts exchanged over the ``w = ep·etp`` ranks of the ETP×EP group.

Recompute lowers ``A_experts`` (what every layer of a model keeps until its backward), not this
one-layer peak: with ``L`` layers the activation memory is about
``Σ_layers A + max_layers(peak - A)``. Not covered: shared experts (their FFN adds its own
``s·T·(H + F1s + Fs)`` saved and a working set), ``overlap_chunks > 1`` (chunks' buffers in
flight together) and the all-gather dispatcher (``[Σ_ranks T, H]`` gathered tokens); measured
(``benchmarks.memory``, tests/test_activation_memory.py) with ``etp = 1``. A row ceiling
(``max_rows_per_rank``) bounds ``R``.
"""

from __future__ import annotations

import torch

from ..config import MoEConfig
from ..config.choices import RECOMPUTE_MODES


def _sizes(config: MoEConfig, etp: int) -> tuple[int, int, int, int]:
    """``(H, F, F1, s)`` of ``config`` at ETP size ``etp``."""
    H, F = config.hidden_size, config.ffn_hidden_size // etp
    F1 = 2 * F if config.gated else F
    return H, F, F1, config.params_dtype.itemsize


def _router_bytes(config: MoEConfig) -> int:
    """``r``: bytes of one router element: the wider of the router dtype (default float32,
    float64 for float64 models) and the score dtype (default: the router dtype)."""
    default = torch.float64 if config.params_dtype == torch.float64 else torch.float32
    router = config.router_dtype or default
    return max(router.itemsize, (config.router_score_dtype or router).itemsize)


def expert_saved_bytes(config: MoEConfig, rows: int, ep: int = 1, etp: int = 1,
                       recompute: str | None = None) -> int:
    """``A_experts`` (module docstring): the bytes the grouped expert FFN of an EP rank saves
    for its backward for ``rows`` received rows, row weights and group sizes included
    (``recompute`` defaults to ``config.recompute``; with ``expert_dropout`` the rows' hashes
    too)."""
    recompute = config.recompute if recompute is None else recompute
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    H, F, F1, s = _sizes(config, etp)
    none = H + F if config.activation == "relu" else H + F1 + F  # ReLU's gradient reads a
    per_row = {"none": none, "activation": H + F1, "experts": H}[recompute]
    weight = max(_router_bytes(config), s)  # the row weights (dispatch.pipeline._widened)
    hashes = 8 * rows if config.expert_dropout > 0 else 0  # int64 row hashes (no mask kept)
    return s * rows * per_row + weight * rows + 8 * (config.num_experts // ep) + hashes


def peak_bytes_bound(config: MoEConfig, tokens: int, rows_sent: int, rows_received: int,
                     ep: int = 1, etp: int = 1) -> int:
    """The bound on one rank's peak live bytes during a forward and backward of the layer
    (module docstring) for ``tokens`` tokens, ``rows_sent`` rows sent and ``rows_received``
    rows received by its experts, with ``num_experts / ep`` local experts."""
    T, S, R = tokens, rows_sent, rows_received
    H, F, F1, s = _sizes(config, etp)
    E, k = config.num_experts, config.top_k
    r = _router_bytes(config)
    experts = s * (R * (2 * H + 2 * F1 + F) + 2 * (S + T) * H)
    weight_grads = s * (E // ep) * (H * F1 + F * H)
    small = r * (4 * T * E + E * H) + 8 * (8 * T * k + 4 * R + 4 * ep * etp * E + 64)
    return experts + weight_grads + small
