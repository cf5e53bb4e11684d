"""MoELayer: router → capacity → dispatcher → grouped experts → dispatcher → (+ shared experts).

    y[t] = Σ_{j kept} probs[t, j] · expert_{idx[t, j]}(x[t])  +  shared(x[t])

Input ``[T, H]`` or ``[S, B, H]`` (sequence-major, as in Megatron); the output has the input's
shape. In a training forward (training mode, autograd on) the router losses ride on the
output's autograd graph, as Megatron-Core's ``MoEAuxLossAutoScaler`` does: the backward of
whatever loss uses the output gives each of them the gradient ``aux_loss_scale`` (1.0; see
``set_aux_loss_scale``), so they are not added to the training loss, and activation
recomputation cannot lose them. The routed counts behind the expert-bias update are added in
that backward, once per step even when the forward is recomputed. The losses (detached: for
logging) and routing statistics are kept on the layer (``last_losses``, ``aux_loss``,
``last_stats``, the losses of training forwards only) and returned with ``return_aux=True``.
Eval and ``no_grad`` forwards leave the training state alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import (
    InFlight,
    RowBudget,
    build_dispatcher,
    start_beside,
    start_combine,
    start_dispatch,
)
from .distributed import collectives
from .distributed.agreement import check_agreement
from .distributed.ddp import find_ddp_managing_experts
from .distributed.fsdp import find_fsdp_managing_experts
from .experts import GroupedExperts, SharedExpert
from .metrics import RoutingStats
from .routing import Routing, apply_capacity, build_router, expert_capacity, next_capacity_factor
from .routing.losses import attach_to_graph
from .routing.router import count_assignments

if TYPE_CHECKING:
    from .distributed import ParallelState


@dataclass
class _Routed:
    """What ``MoELayer._routed`` returns: the combined routed output, the side computation's
    result, and what ``RoutingStats`` needs."""

    y: Tensor
    side: Optional[Tensor]
    tokens_per_expert: Tensor  # [E] kept assignments of this rank's tokens per expert
    row_map: Tensor            # [T, k] -1 where dropped
    num_rows: int              # rows the local experts received
    padded_rows: Optional[int]
    overflow: bool


@dataclass(frozen=True)
class MoEAux:
    """Side outputs of one forward: coefficient-scaled losses, routing statistics, and the
    routing itself (``Routing``: logits, probs, expert ids; on the autograd graph)."""

    losses: dict[str, Tensor]
    stats: RoutingStats
    routing: Optional[Routing] = None

    @property
    def total_loss(self) -> Tensor | None:
        """Sum of the losses, None when no loss is enabled. In training they are already on the
        output's autograd graph: this value is for logging (detached), not for the loss."""
        return sum(self.losses.values()) if self.losses else None


class MoELayer(nn.Module):
    """One Mixture-of-Experts FFN layer over this process's tokens.

    ``dispatcher`` defaults to ``LocalDispatcher`` (every expert on this process); any object
    with the same ``dispatch``/``combine`` contract (``moe_parallel.dispatch``) can replace it, in
    which case ``experts`` must hold that dispatcher's local experts.

    With ``parallel_state`` (a ``ParallelState``) the defaults become the dispatcher named by
    ``config.token_dispatcher_type`` (all-to-all over EP then all-gather over ETP, or all-gather
    over the ETP×EP group) and ``GroupedExperts`` holding this rank's ``E / ep`` experts with
    ``F / etp`` hidden units each. Every parameter is tagged for gradient sync:
    ``param.expert_parallel`` (True for the routed experts) and ``param.sync_group``
    (``"edp"`` for the routed experts, ``"dp"`` for the dense router and shared experts); with
    TP > 1 the dense ones also carry ``sequence_parallel`` (each TP rank brings distinct tokens,
    so their gradients are summed over TP too). ``distributed.sync_gradients`` reads these tags.
    """

    def __init__(
        self,
        config: MoEConfig,
        dispatcher=None,
        experts: nn.Module | None = None,
        device: torch.device | str | None = None,
        parallel_state: Optional[ParallelState] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel_state = ps = parallel_state
        self.router = build_router(config).to(device)
        if ps is not None:
            ps.check_experts(config.num_experts, config.ffn_hidden_size)
            ps.check_expert_groups()
        if experts is None:
            local = config.num_experts // ps.ep if ps is not None else config.num_experts
            experts = GroupedExperts(
                config, local, config.ffn_hidden_size // (ps.etp if ps is not None else 1),
                device=device, first_expert=ps.ep_rank * local if ps is not None else 0,
                etp_rank=ps.etp_rank if ps is not None else 0,
            )
        self.experts = experts
        self.shared_expert = (
            SharedExpert(config, device=device) if config.num_shared_experts else None
        )
        budget = RowBudget.from_config(config)
        if dispatcher is None:
            dispatcher = build_dispatcher(config.num_experts, ps, config.token_dispatcher_type,
                                          budget)
        elif budget is not None:
            if not hasattr(dispatcher, "row_budget"):
                raise ValueError(
                    f"max_rows_per_rank/max_rows_factor need a dispatcher with a row_budget; "
                    f"{type(dispatcher).__name__} has none"
                )
            dispatcher.row_budget = dispatcher.row_budget or budget
        self.dispatcher = dispatcher
        self._tag_parameters()
        self.last_losses: dict[str, Tensor] = {}
        self.last_stats: RoutingStats | None = None
        # The group this layer's exchanges span (None: every expert is here).
        self._group = ps.group("tp_ep") if ps is not None and ps.ep * ps.etp > 1 else None
        self._agreed = ps is None  # the ranks' configs are compared at the first forward
        self.aux_loss_scale = 1.0  # gradient of the aux losses per backward (set_aux_loss_scale)
        if config.dynamic_capacity:
            # the training capacity factor (saved with the model: a persistent float64 buffer),
            # and this rank's [dropped, routed, slots] since the last update_capacity_factor
            # (float64 on the CPU whatever the module's device and dtype: read every forward)
            self.register_buffer("capacity_factor_now",
                                 torch.tensor(float(config.capacity_factor), dtype=torch.float64))
            self.register_buffer("capacity_counts",
                                 torch.zeros(3, dtype=torch.int64, device=device),
                                 persistent=False)

    @classmethod
    def shard_from(cls, full: MoELayer, parallel_state: ParallelState) -> MoELayer:
        """The expert-parallel layer of this rank holding ``full``'s weights: router, shared
        experts and buffers copied, routed experts sliced to this rank's (EP, ETP) shard.

        Every rank building the same ``full`` layer (same seed) and calling this gives a model
        whose distributed forward/backward equals ``full``'s on the union of the ranks' tokens.
        """
        ps = parallel_state
        device = full.experts.w1.device
        fe = full.experts
        layer = cls(full.config, device=device, parallel_state=ps, experts=GroupedExperts.from_full(
            full.config, fe.w1, fe.w2, ps.ep_rank, ps.ep, ps.etp_rank, ps.etp,
            getattr(fe, "b1", None), getattr(fe, "b2", None)))
        own = dict(layer.named_parameters()) | dict(layer.named_buffers())
        with torch.no_grad():
            for name, t in list(full.named_parameters()) + list(full.named_buffers()):
                if not name.startswith("experts."):
                    own[name].copy_(t)
        layer.aux_loss_scale = full.aux_loss_scale
        return layer

    def _tag_parameters(self) -> None:
        """Mark routed-expert parameters (synced over EDP) apart from dense ones (over DP)."""
        expert_ids = {id(p) for p in self.experts.parameters()}
        tp = self.parallel_state.tp if self.parallel_state is not None else 1
        for p in self.parameters():
            p.expert_parallel = id(p) in expert_ids
            p.sync_group = "edp" if p.expert_parallel else "dp"
            p.sequence_parallel = not p.expert_parallel and tp > 1

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the last forward's losses (None when no loss is enabled)."""
        return sum(self.last_losses.values()) if self.last_losses else None

    def _apply(self, fn, recurse=True):
        factor = self._buffers.get("capacity_factor_now")
        super()._apply(fn, recurse)
        if factor is not None:  # stays a float64 CPU scalar (never rounded, read without sync)
            self._buffers["capacity_factor_now"] = factor
        return self

    def current_capacity_factor(self, training: bool) -> float | None:
        """The factor of a training (or eval) forward: ``eval_capacity_factor`` in eval when
        set, else the dynamic factor (``dynamic_capacity``) or ``capacity_factor``."""
        cfg = self.config
        if not training and cfg.eval_capacity_factor is not None:
            return cfg.eval_capacity_factor
        return float(self.capacity_factor_now) if cfg.dynamic_capacity else cfg.capacity_factor

    @torch.no_grad()
    def update_capacity_factor(self, counts: Optional[Tensor] = None) -> float:
        """One step of the dynamic capacity schedule (``routing.capacity.next_capacity_factor``)
        from ``counts`` = ``[dropped, routed, slots]`` (summed over the ranks; None: this rank's
        ``capacity_counts``); resets the counts and returns the new factor."""
        cfg = self.config
        if not cfg.dynamic_capacity:
            raise RuntimeError("update_capacity_factor needs a config with dynamic_capacity=True")
        c = self.capacity_counts if counts is None else counts
        dropped, routed, slots = (int(v) for v in c.tolist())
        factor = next_capacity_factor(
            float(self.capacity_factor_now), dropped, routed, slots - (routed - dropped), slots,
            cfg.target_drop_rate, cfg.capacity_update_rate, cfg.capacity_factor_min,
            cfg.capacity_factor_max)
        self.capacity_factor_now.fill_(factor)
        self.capacity_counts.zero_()
        return factor

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for ``num_tokens`` tokens in token-choice mode (None = dropless)."""
        cfg = self.config
        factor = self.current_capacity_factor(self.training)
        if cfg.router_type != "topk" or factor is None:
            return None
        return expert_capacity(num_tokens, cfg.num_experts, cfg.top_k, factor, cfg.min_capacity)

    def route(self, x: Tensor, num_seqs: int = 1, check: bool = True,
              valid: Optional[Tensor] = None) -> tuple[Routing, dict[str, Tensor], int]:
        """Router plus capacity: the routing to dispatch, the losses, and the pad length
        (``check=False``: the caller tests the logits for ``check_finite``; ``valid``: ``[T]``
        bool, the non-padding tokens, see ``forward``)."""
        kw = {} if valid is None else {"valid": valid}
        routing, losses = self.router(x, num_seqs=num_seqs, count=False, check=check, **kw)
        capacity = self.capacity(x.shape[0])
        pad_to = 0
        if capacity is not None:
            keep = apply_capacity(
                routing.expert_idx, routing.probs, self.config.num_experts, capacity,
                self.config.drop_policy, routing.keep,
            )
            routing = replace(routing, keep=keep)
            pad_to = capacity if self.config.pad_to_capacity else 0
        return routing, losses, pad_to

    def _count_routed(self, routed_per_expert: Tensor, capacity_counts: Optional[Tensor] = None
                      ) -> None:
        counts = getattr(self.router, "local_tokens_per_expert", None)
        if counts is not None:
            counts += routed_per_expert.to(counts.dtype)
        if capacity_counts is not None:
            self.capacity_counts += capacity_counts

    def _check_host(self, ps: ParallelState) -> None:
        """Refuse a DistributedDataParallel or FSDP2 unit that manages this layer's expert
        parameters (they would overwrite or average the experts over the wrong group)."""
        if self._group is None:
            return
        if find_fsdp_managing_experts(self.experts) is not None:
            raise ValueError(
                "an FSDP unit (fully_shard) manages the expert parameters of an expert-parallel "
                f"MoELayer (ep={ps.ep}, etp={ps.etp}): it would shard and average them over the "
                "data-parallel mesh, while each EP rank holds different experts. fully_shard "
                "the dense submodules only and call sync_gradients(layer, ps) for the MoE "
                "layers (moe_parallel.distributed.fsdp)"
            )
        if find_ddp_managing_experts(self) is not None:
            raise ValueError(
                "a DistributedDataParallel manages the expert parameters of an expert-parallel "
                f"MoELayer (ep={ps.ep}, etp={ps.etp}): it would overwrite every rank's experts "
                "with rank 0's and average expert gradients over the whole group. Wrap the "
                "model with moe_parallel.distributed.wrap_ddp(model, ps) and call "
                "sync_gradients(model, ps, dense=False) after backward"
            )

    def _route_collectively(self, tokens: Tensor, num_seqs: int, valid: Optional[Tensor]):
        """``route``, with the finiteness verdict (``check_finite``) shared by the ETP×EP group:
        when any rank's router logits are non-finite every rank raises ``FloatingPointError``
        (naming those ranks), so no rank enters the exchange its peers skipped."""
        ps, group = self.parallel_state, self._group
        if group is None or not self.config.check_finite:
            return self.route(tokens, num_seqs, valid=valid)
        result = self.route(tokens, num_seqs, check=False, valid=valid)
        ok = torch.isfinite(result[0].logits).all().to(torch.int64).view(1, 1)
        w = collectives.group_size(group)
        verdict = collectives.all_gather(ok, group, [1] * w).view(-1).tolist()  # one host read
        if not all(verdict):
            bad = [ps.ranks["tp_ep"][i] for i, flag in enumerate(verdict) if not flag]
            raise FloatingPointError(
                f"non-finite router logits on rank(s) {bad} of this layer's ETP×EP group "
                f"{ps.ranks['tp_ep']}: every rank of the group skips this forward (NaN/Inf in the "
                "input or the router weight; check_finite=False lets them propagate)"
            )
        return result

    def _routed(self, tokens: Tensor, routing: Routing, pad_to: int,
                side: Optional[Callable[[], InFlight[Tensor]]] = None) -> _Routed:
        """The routed experts' combined output ``[T, H]`` and what the statistics need; ``side``
        (the shared experts, ``start_beside``) starts while the first dispatch exchange is in
        flight and finishes after the last combine (on CUDA it runs on a side stream, beside
        the exchanges and the routed experts' kernels).
        With ``scale_expert_input`` (Llama-4) the output is
        ``Σ_j expert_{idx[t, j]}(probs[t, j] · x[t])``: each of a token's ``k`` assignments goes
        out as its own row ``probs[t, j]·x[t]`` with combine weight 1, and the ``k`` outputs are
        summed. With ``overlap_chunks = n`` the rows are dispatched in ``n`` consecutive chunks
        (empty ones included, so every rank runs the same collectives), pipelined:
        ``start(0); side; for i: start(i+1), finish(i), experts(i), combine_start(i)``; then
        every combine finishes. Each row's result is the same as unchunked."""
        scaled = self.config.scale_expert_input
        rows, route = tokens, routing
        if scaled:
            T, k = routing.expert_idx.shape
            rows = (tokens.unsqueeze(1) * routing.probs.unsqueeze(-1).to(tokens.dtype))
            rows = rows.reshape(T * k, tokens.shape[1])
            route = replace(
                routing, expert_idx=routing.expert_idx.reshape(T * k, 1),
                probs=torch.ones(T * k, 1, dtype=routing.probs.dtype, device=rows.device),
                keep=None if routing.keep is None else routing.keep.reshape(T * k, 1))
        n = self.config.overlap_chunks
        bounds = [rows.shape[0] * i // n for i in range(n + 1)]
        pieces = [(rows[a:b], replace(route, expert_idx=route.expert_idx[a:b],
                                      probs=route.probs[a:b],
                                      keep=None if route.keep is None else route.keep[a:b]))
                  for a, b in zip(bounds, bounds[1:])] if n > 1 else [(rows, route)]
        dispatcher, padded = self.dispatcher, None
        started = [start_dispatch(dispatcher, *pieces[0], pad_to)]
        side_started = side() if side is not None else None
        combines, handles, num_rows = [], [], 0
        for i in range(n):
            if i + 1 < n:
                started.append(start_dispatch(dispatcher, *pieces[i + 1], pad_to))
            expert_in, group_sizes, handle = started[i].finish()
            out = self.experts(expert_in, group_sizes)
            combines.append(start_combine(dispatcher, out, handle))
            handles.append(handle)
            num_rows += expert_in.shape[0]
            chunk_padded = getattr(self.experts, "last_padded_rows", None)
            if chunk_padded is not None:
                padded = (padded or 0) + chunk_padded
        ys = [c.finish() for c in combines]
        side_out = side_started.finish() if side_started is not None else None
        y = ys[0] if n == 1 else torch.cat(ys)
        row_map = (handles[0].row_map if n == 1
                   else torch.cat([h.row_map for h in handles]))
        tokens_per_expert = handles[0].tokens_per_expert
        for h in handles[1:]:
            tokens_per_expert = tokens_per_expert + h.tokens_per_expert
        if scaled:
            y, row_map = y.view(T, k, y.shape[-1]).sum(dim=1), row_map.reshape(T, k)
        overflow = any(getattr(h, "overflow", False) for h in handles)
        return _Routed(y, side_out, tokens_per_expert, row_map, num_rows, padded, overflow)

    def forward(self, x: Tensor, return_aux: bool = False,
                padding_mask: Optional[Tensor] = None) -> Tensor | tuple[Tensor, MoEAux]:
        """``y[t] = Σ_{j kept} probs[t, j] · expert_{idx[t, j]}(x[t]) + shared(x[t])``.

        ``x``: ``[T, H]`` or ``[S, B, H]`` (sequence-major) in ``config.params_dtype``; ``y`` has
        its shape. With ``return_aux`` returns ``(y, MoEAux(losses, stats))``; the same are kept
        on the layer (``last_losses`` and ``aux_loss`` for training forwards only, ``last_stats``).
        ``padding_mask``: bool, ``x.shape[:-1]``, True marks a padding token (Megatron-Core's
        convention). Padding tokens are routed and computed like the others (their outputs are
        well defined; in capacity mode they take capacity like any token, as in Megatron-Core),
        but they are left out of the losses and of the counts behind the expert-bias update;
        ``RoutingStats`` still counts them (they are load the experts carry).
        With a ``parallel_state`` this is a collective over the layer's EP/ETP groups: every
        rank of them calls it (and its backward) in the same order, possibly with zero tokens.
        """
        cfg = self.config
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"x must be [T, hidden_size] or [S, B, hidden_size] with hidden_size="
                f"{cfg.hidden_size}, got shape {tuple(x.shape)}"
            )
        if x.dtype != cfg.params_dtype:
            raise ValueError(
                f"x dtype {x.dtype} does not match config.params_dtype {cfg.params_dtype}"
            )
        shape = x.shape
        num_seqs = shape[1] if x.dim() == 3 else 1
        tokens = x.reshape(-1, cfg.hidden_size)
        valid = None
        if padding_mask is not None:
            if (not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool
                    or padding_mask.shape != shape[:-1]):
                raise ValueError(
                    f"padding_mask must be a bool tensor of shape {tuple(shape[:-1])} (x's shape "
                    f"without hidden_size; True = padding), got "
                    f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)} "
                    f"{tuple(getattr(padding_mask, 'shape', ()))}"
                )
            valid = ~padding_mask.reshape(-1).to(tokens.device)
        ps = self.parallel_state
        training_step = self.training and torch.is_grad_enabled()
        if not self._agreed:
            self._check_host(ps)
            check_agreement(cfg, ps, tokens.device)  # collective: a clear error, not a hang
            self._agreed = True
        if self._group is not None and torch.is_grad_enabled() and not tokens.requires_grad:
            # The backward of the dispatch exchange is a collective: a rank whose input needs no
            # gradient would skip it while its peers wait in it. Every rank takes part.
            tokens = tokens.detach().requires_grad_()

        if self.training and cfg.jitter_noise > 0:  # Mixtral: the input to router and experts
            eps = cfg.jitter_noise
            tokens = tokens * torch.empty_like(tokens).uniform_(1.0 - eps, 1.0 + eps)

        routing, losses, pad_to = self._route_collectively(tokens, num_seqs, valid)
        shared = None
        if self.shared_expert is not None:
            if cfg.shared_expert_overlap:  # computed while the dispatch exchange is in flight
                shared = partial(start_beside, self.shared_expert, tokens)
            else:
                shared_out = self.shared_expert(tokens)
        routed = self._routed(tokens, routing, pad_to, shared)
        y = routed.y
        if self.shared_expert is not None:
            y = y + (routed.side if shared is not None else shared_out)
        if training_step:
            # The losses ride on the output's graph (their gradient: aux_loss_scale), and the
            # routed counts are added when the backward passes: once per step, recomputed or not.
            total = sum(losses.values()) if losses else None
            counted = (routing.routed_per_expert if valid is None
                       else count_assignments(routing.expert_idx, cfg.num_experts, valid))
            cap_counts = None
            if cfg.dynamic_capacity:  # [dropped, routed, slots] of this forward
                routed_n = routing.routed_per_expert.sum()
                kept_n = routed.tokens_per_expert.sum()
                slots = cfg.num_experts * (self.capacity(tokens.shape[0]) or 0)
                cap_counts = torch.stack([routed_n - kept_n, routed_n,
                                          torch.full_like(routed_n, slots)]).to(torch.int64)
            y = attach_to_graph(y, total, self.aux_loss_scale,
                                partial(self._count_routed, counted, cap_counts))
            losses = {k: v.detach() for k, v in losses.items()}

        overflow = routed.overflow
        if overflow:
            warnings.warn(
                "dropless MoE: the rows per rank exceeded max_rows_per_rank/max_rows_factor; "
                "this forward fell back to capacity and dropped assignments "
                "(see RoutingStats.overflow and drop_rate)", RuntimeWarning, stacklevel=2,
            )
        stats = RoutingStats.from_counts(
            routing.routed_per_expert, routed.tokens_per_expert, routed.row_map,
            routed.num_rows, routed.padded_rows, overflow, routing.experts_per_token,
        )
        if training_step:  # eval / no_grad: training state untouched
            self.last_losses = losses
        self.last_stats = stats
        y = y.reshape(shape)
        return (y, MoEAux(losses, stats, routing)) if return_aux else y


def set_aux_loss_scale(model: nn.Module, scale: float) -> int:
    """Set the gradient that the aux losses of every ``MoELayer`` in ``model`` receive in each
    backward (default 1.0, Megatron-Core's ``MoEAuxLossAutoScaler.set_loss_scale``): e.g.
    ``1/N`` when N micro-batches accumulate with their losses divided by N, times the loss
    scale of mixed-precision training. Returns the number of layers set."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.aux_loss_scale = float(scale)
    return len(layers)
