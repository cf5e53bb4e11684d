"""Routed expert FFNs: all local experts as stacked weights, computed with grouped or block-sparse
GEMMs.

Routed experts (``GroupedExperts``), for the rows of local expert ``e`` (consecutive in ``x``):
    h = x_e @ w1[e]                     w1: [E_local, H, F]   (SwiGLU: [E_local, H, 2F], gate | up)
    a = act(h)                          SwiGLU: silu(h[:, :F]) * h[:, F:]; clamped SwiGLU;
                                        GELU (erf); ReLU
    y_e = a @ w2[e]                     w2: [E_local, F, H]
With row weights ``w`` (the routing weights, ``forward(..., row_weights)``) the activation of
row ``i`` is scaled by ``w[i]`` before the second GEMM: ``y[i] = w[i] · expert(x[i])``, so the
combine is an unweighted sum and keeps no expert output rows for its backward.
With ``expert_proj_bias`` (GPT-OSS) ``h += b1[e]`` (``b1 [E_local, (2)F]``, gate | up) and
``y_e += b2[e]`` (``b2 [E_local, H]``), both initialised to zero. Without biases act(0) = 0 for
every activation, so zero padding rows produce zero outputs; with them padding rows are never
read back and get no gradient.
``config.expert_impl`` picks the computation of the same formula: ``"grouped"``
(``ops.grouped_gemm`` in one autograd function, ``grouped_ffn.py``, the default) or
``"block_sparse"`` (dropless block-sparse products, ``block_sparse.py``); ``config.recompute``
what their backward recomputes instead of keeping.

With row hashes (``forward(..., row_hash=...)``, ``takes_row_hashes``; sent by the layer in
training when ``config.expert_dropout > 0``) the activation is dropped out before the second
GEMM with the mask of ``ops.expert_dropout`` (global expert ``first_expert + e``, global hidden
unit ``etp_rank · ffn_size + j``), the same on every EP/ETP layout.

Expert parallelism shards the stacked weights (``shard_expert_weights``): EP rank ``p`` holds
experts ``[p·E/ep, (p+1)·E/ep)``, ETP rank ``q`` the hidden units ``[q·F/etp, (q+1)·F/etp)`` of
each; the experts' output is the sum over ETP ranks of their partial outputs.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import MoEConfig
from .activation import fc1_width
from .base import ExpertsOutput, RoutedExperts
from .block_sparse import block_sparse_ffn, resolve_block_size
from .grouped_ffn import RowDropout, grouped_ffn


def shard_expert_bias(bias: Tensor, ep_rank: int, ep: int) -> Tensor:
    """The EP rank's experts ``bias[p·E/ep : (p+1)·E/ep]`` of a full expert projection bias
    ``[E, D]`` (``b1`` or ``b2``; these are refused with ``etp > 1``); a new contiguous tensor."""
    El = bias.shape[0] // ep
    return bias[ep_rank * El:(ep_rank + 1) * El].clone(memory_format=torch.contiguous_format)


def shard_expert_weights(
    w1: Tensor, w2: Tensor, ep_rank: int, ep: int, etp_rank: int, etp: int, gated: bool
) -> tuple[Tensor, Tensor]:
    """The (EP rank, ETP rank) shard of full stacked expert weights (or of their gradients).

    ``w1 [E, H, F]`` (gated: ``[E, H, 2F]``, gate | up), ``w2 [E, F, H]``. With
    ``El = E / ep``, ``Fl = F / etp``, ``e = ep_rank·El .. +El`` and ``f = etp_rank·Fl .. +Fl``:
        w1_shard = w1[e][:, :, f]                      ([El, H, Fl])
                 = cat(w1[e][:, :, f], w1[e][:, :, F + f])   when gated ([El, H, 2Fl])
        w2_shard = w2[e][:, f, :]                      ([El, Fl, H])
    Returns new contiguous tensors (no storage shared with the inputs).
    """
    E, F_full = w2.shape[0], w2.shape[1]
    if E % ep or F_full % etp:
        raise ValueError(f"E={E} must be divisible by ep={ep} and F={F_full} by etp={etp}")
    if not (0 <= ep_rank < ep and 0 <= etp_rank < etp):
        raise ValueError(f"ranks out of range: ep_rank={ep_rank}/{ep}, etp_rank={etp_rank}/{etp}")
    if w1.shape[0] != E or w1.shape[2] != (2 * F_full if gated else F_full):
        raise ValueError(f"w1 {tuple(w1.shape)} does not match w2 {tuple(w2.shape)} "
                         f"(gated={gated})")
    El, Fl = E // ep, F_full // etp
    e = slice(ep_rank * El, (ep_rank + 1) * El)
    f = slice(etp_rank * Fl, (etp_rank + 1) * Fl)
    w1_e = w1[e]
    if gated:
        up = slice(F_full + f.start, F_full + f.stop)
        w1_s = torch.cat([w1_e[:, :, f], w1_e[:, :, up]], dim=2)
    else:
        w1_s = w1_e[:, :, f].clone(memory_format=torch.contiguous_format)
    return w1_s, w2[e][:, f, :].clone(memory_format=torch.contiguous_format)


class GroupedExperts(RoutedExperts):
    """``num_local_experts`` expert FFNs of hidden size ``ffn_size`` as two stacked weights;
    ``forward`` takes row weights (``takes_row_weights``).

    With ``expert_impl="block_sparse"``, ``block_size`` is resolved for the weights' device
    (``block_sparse.resolve_block_size``) and ``forward`` reports its padded row count in
    ``ExpertsOutput.padded_rows`` (``None`` for ``"grouped"``, which pads nothing).
    ``b1``/``b2`` are None without ``expert_proj_bias``. ``forward`` also takes each row's token
    hash (``takes_row_hashes``) for the expert dropout.
    """

    takes_row_weights = True
    takes_row_hashes = True

    def __init__(
        self,
        config: MoEConfig,
        num_local_experts: int | None = None,
        ffn_size: int | None = None,
        device: torch.device | str | None = None,
        first_expert: int = 0,
        etp_rank: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_local_experts = num_local_experts or config.num_experts
        self.ffn_size = ffn_size or config.ffn_hidden_size
        if config.ffn_hidden_size % self.ffn_size:
            raise ValueError(f"ffn_size {self.ffn_size} must divide ffn_hidden_size "
                             f"{config.ffn_hidden_size}")
        self.first_expert, self.etp_rank = first_expert, etp_rank
        self.etp = config.ffn_hidden_size // self.ffn_size
        if config.expert_proj_bias and self.etp > 1:
            raise ValueError(
                "expert_proj_bias=True is not supported with expert tensor parallelism "
                f"(etp={self.etp}): the second projection's bias would be added once per ETP "
                "rank; use etp=1"
            )
        kw = dict(device=device, dtype=config.params_dtype)
        H, Fw = config.hidden_size, fc1_width(config, self.ffn_size)
        self.w1 = nn.Parameter(torch.empty(self.num_local_experts, H, Fw, **kw))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, self.ffn_size, H, **kw))
        if config.expert_proj_bias:
            self.b1 = nn.Parameter(torch.zeros(self.num_local_experts, Fw, **kw))
            self.b2 = nn.Parameter(torch.zeros(self.num_local_experts, H, **kw))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.block_size = (
            resolve_block_size(config.block_size, self.ffn_size, self.w1.device)
            if config.expert_impl == "block_sparse" else None
        )
        self.reset_parameters()

    @classmethod
    def from_full(
        cls,
        config: MoEConfig,
        w1: Tensor,
        w2: Tensor,
        ep_rank: int = 0,
        ep: int = 1,
        etp_rank: int = 0,
        etp: int = 1,
        b1: Tensor | None = None,
        b2: Tensor | None = None,
    ) -> GroupedExperts:
        """The local experts of (``ep_rank``, ``etp_rank``), copied from full weights ``w1``
        ``[E, H, (2)F]`` and ``w2`` ``[E, F, H]`` (see ``shard_expert_weights``) and, with
        ``expert_proj_bias``, biases ``b1 [E, (2)F]``, ``b2 [E, H]``."""
        w1_s, w2_s = shard_expert_weights(w1.detach(), w2.detach(), ep_rank, ep, etp_rank, etp,
                                          config.gated)
        experts = cls(config, w1_s.shape[0], w2_s.shape[1], device=w1.device,
                      first_expert=ep_rank * w1_s.shape[0], etp_rank=etp_rank)
        with torch.no_grad():
            experts.w1.copy_(w1_s)
            experts.w2.copy_(w2_s)
            if experts.b1 is not None:
                if b1 is None or b2 is None:
                    raise ValueError("expert_proj_bias=True: from_full needs b1 and b2")
                experts.b1.copy_(shard_expert_bias(b1.detach(), ep_rank, ep))
                experts.b2.copy_(shard_expert_bias(b2.detach(), ep_rank, ep))
        return experts

    def reset_parameters(self) -> None:
        """N(0, init_std), layout-invariant: global expert e's full weights are drawn from a
        generator seeded ``base + e`` (``base``: one draw from torch's global RNG) and sliced to
        this rank's ETP shard, so one seed gives the same model on every EP/ETP layout."""
        cfg = self.config
        base = int(torch.randint(0, 2**62, (1,)))
        device = self.w1.device
        H, F = cfg.hidden_size, cfg.ffn_hidden_size
        with torch.no_grad():
            for i in range(self.num_local_experts):
                g = torch.Generator(device).manual_seed(base + self.first_expert + i)
                w1 = torch.randn(1, H, fc1_width(cfg, F), generator=g, device=device,
                                 dtype=torch.float32)
                w2 = torch.randn(1, F, H, generator=g, device=device, dtype=torch.float32)
                w1, w2 = shard_expert_weights(w1, w2, 0, 1, self.etp_rank, self.etp, cfg.gated)
                self.w1[i].copy_(w1[0] * cfg.init_std)
                self.w2[i].copy_(w2[0] * cfg.init_std)

    def dropout_of(self, row_hash: Optional[Tensor]) -> Optional[RowDropout]:
        """The expert dropout of a forward with ``row_hash [N]`` (int64, or float64 holding
        integers below 2^53): None without hashes or with ``config.expert_dropout == 0``."""
        p = self.config.expert_dropout
        if row_hash is None or p == 0:
            return None
        return RowDropout(row_hash.to(torch.int64), p, self.first_expert,
                          self.etp_rank * self.ffn_size)

    def forward(self, x: Tensor, group_sizes: Tensor, row_weights: Optional[Tensor] = None,
                row_hash: Optional[Tensor] = None) -> ExpertsOutput:
        """``ExpertsOutput(y [N, H], padded_rows)`` for ``x`` [N, H] grouped by local expert;
        ``group_sizes`` [E_local] CPU int64, sum N; ``row_weights [N]`` (None: 1):
        ``y[i] = row_weights[i] · expert(x[i])``, the weight applied to the activation before
        the second GEMM. ``config.recompute`` sets what the backward recomputes
        (``grouped_ffn.py``; for block-sparse experts ``torch.utils.checkpoint``).
        ``row_hash [N]``: each row's token hash (``ops.dropout.token_hash``); with
        ``config.expert_dropout = p > 0`` the activation is dropped out by it (module
        docstring); None: no dropout."""
        cfg = self.config
        dropout = self.dropout_of(row_hash)
        if self.block_size is not None:
            ffn = partial(block_sparse_ffn, w1=self.w1, w2=self.w2, group_sizes=group_sizes,
                          block_size=self.block_size, config=cfg, b1=self.b1, b2=self.b2,
                          recompute=cfg.recompute, dropout=dropout)
            if cfg.recompute == "experts" and torch.is_grad_enabled():
                y, padded = checkpoint(lambda x, w: ffn(x, row_weights=w), x, row_weights,
                                       use_reentrant=False, preserve_rng_state=False)
            else:
                y, padded = ffn(x, row_weights=row_weights)
            return ExpertsOutput(y, padded)
        return ExpertsOutput(grouped_ffn(x, self.w1, self.w2, group_sizes, cfg, row_weights,
                                         self.b1, self.b2, dropout=dropout), None)
