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

Expert dropout (``config.expert_dropout = p > 0``, training forwards only): each token's row
hash ``u = ops.dropout.token_hash(stream_key(expert_dropout_seed, step, layer), seq_id,
position)`` is computed here, from the token keys of ``set_token_keys`` (``replay.keys``;
without them ``(0, index of the token in this input)``, which is not layout-invariant) and the
step and layer index of ``set_expert_dropout_step``; it travels with the token's rows to the
experts (``dispatch.pipeline``), which drop out their activation by it
(``ops.expert_dropout``). The shared experts get no expert dropout.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, NoReturn, Optional

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import (
    PipelineResult,
    RowBudget,
    TokenDispatcher,
    build_dispatcher,
    run_pipeline,
    start_beside,
)
from .dispatch.in_flight import done
from .distributed.agreement import check_agreement, share_forward_verdict, verdict_group
from .distributed.ddp import check_no_ddp_over_experts
from .distributed.freezing import agree_on_gradients, verdict_columns
from .distributed.fsdp import check_no_fsdp_over_experts
from .eager import eager_only
from .experts import GroupedExperts, RoutedExperts, SharedExpert, build_experts
from .metrics import RoutingStats
from .ops.dropout import stream_key, token_hash
from .routing import Routing, apply_capacity, build_router
from .routing.capacity_schedule import CapacityScheduled
from .routing.losses import attach_to_graph
from .routing.replay import RouterReplay
from .routing.router import TopKRouter, count_assignments

if TYPE_CHECKING:
    from .distributed import ParallelState


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


class MoELayer(CapacityScheduled):
    """One Mixture-of-Experts FFN layer over this process's tokens.

    ``dispatcher`` defaults to ``LocalDispatcher`` (every expert on this process); any
    ``TokenDispatcher`` (``moe_parallel.dispatch.base``) can replace it, in which case
    ``experts`` (a ``RoutedExperts``, by default ``experts.build_experts`` of the config) must
    hold that dispatcher's local experts.

    With ``parallel_state`` (a ``ParallelState``) the defaults become the dispatcher named by
    ``config.token_dispatcher_type`` (all-to-all over EP then all-gather over ETP, or all-gather
    over the ETP×EP group) and ``GroupedExperts`` holding this rank's ``E / ep`` experts with
    ``F / etp`` hidden units each. Every parameter is tagged for gradient sync:
    ``param.expert_parallel`` (True for the routed experts) and ``param.sync_group``
    (``"edp"`` for the routed experts, ``"dp"`` for the dense router and shared experts); with
    TP > 1 the dense ones also carry ``sequence_parallel`` (each TP rank brings distinct tokens,
    so their gradients are summed over TP too). ``distributed.sync_gradients`` reads these tags.
    The capacity factor and its dynamic schedule (``capacity``, ``current_capacity_factor``,
    ``update_capacity_factor``) come from ``routing.capacity_schedule.CapacityScheduled``.
    """

    def __init__(
        self,
        config: MoEConfig,
        dispatcher: Optional[TokenDispatcher] = None,
        experts: Optional[RoutedExperts] = None,
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
            experts = build_experts(
                config, local, config.ffn_hidden_size // (ps.etp if ps is not None else 1),
                device=device, first_expert=ps.ep_rank * local if ps is not None else 0,
                etp_rank=ps.etp_rank if ps is not None else 0,
            )
        elif not isinstance(experts, RoutedExperts):
            raise TypeError(f"experts must be a moe_parallel.experts.RoutedExperts, got "
                            f"{type(experts).__name__}")
        if config.expert_dropout > 0 and not getattr(experts, "takes_row_hashes", False):
            raise ValueError(f"expert_dropout={config.expert_dropout} needs experts that take "
                             f"row hashes (takes_row_hashes, e.g. GroupedExperts), got "
                             f"{type(experts).__name__}")
        self.experts = experts
        self.shared_expert = (
            SharedExpert(config, device=device) if config.num_shared_experts else None
        )
        budget = RowBudget.from_config(config)
        if dispatcher is None:
            dispatcher = build_dispatcher(config.num_experts, ps, config.token_dispatcher_type,
                                          budget, static=config.static_exchange)
        elif not isinstance(dispatcher, TokenDispatcher):
            raise TypeError(f"dispatcher must be a moe_parallel.dispatch.TokenDispatcher, got "
                            f"{type(dispatcher).__name__}")
        elif budget is not None and dispatcher.row_budget is None:
            dispatcher.set_row_budget(budget)
        self.dispatcher = dispatcher
        self._tag_parameters()
        self.last_losses: dict[str, Tensor] = {}
        self.last_stats: RoutingStats | None = None
        # The group this layer's exchanges span (None: every expert is here).
        self._group = ps.group("tp_ep") if ps is not None and ps.ep * ps.etp > 1 else None
        # The group that shares each forward's verdict (None: this rank alone).
        self._verdict = verdict_group(ps, config.verdict_scope)
        self._agreed = ps is None  # the ranks' configs are compared at the first forward
        self.aux_loss_scale = 1.0  # gradient of the aux losses per backward (set_aux_loss_scale)
        self.replay = RouterReplay()  # record / replay the routing (routing.replay)
        # expert dropout: the step and layer index of its mask (set_expert_dropout_step) and
        # their stream key, a CPU int64 scalar changed in place (no recompilation per step)
        self.expert_dropout_step, self.expert_dropout_layer = 0, 0
        self._dropout_key = torch.tensor(stream_key(config.expert_dropout_seed, 0, 0),
                                         dtype=torch.int64)
        self._init_capacity_schedule(device)  # dynamic_capacity: the factor and its counts

    @classmethod
    def shard_from(cls, full: MoELayer, parallel_state: ParallelState) -> MoELayer:
        """The expert-parallel layer of this rank holding ``full``'s weights: router, shared
        experts and buffers copied, routed experts sliced to this rank's (EP, ETP) shard.

        Every rank building the same ``full`` layer (same seed) and calling this gives a model
        whose distributed forward/backward equals ``full``'s on the union of the ranks' tokens.
        """
        ps, fe = parallel_state, full.experts
        if not isinstance(fe, GroupedExperts):
            raise TypeError(f"shard_from slices GroupedExperts, got {type(fe).__name__}")
        layer = cls(full.config, device=fe.w1.device, parallel_state=ps,
                    experts=GroupedExperts.from_full(full.config, fe.w1, fe.w2, ps.ep_rank, ps.ep,
                                                     ps.etp_rank, ps.etp, fe.b1, fe.b2))
        own = dict(layer.named_parameters()) | dict(layer.named_buffers())
        with torch.no_grad():
            for name, t in list(full.named_parameters()) + list(full.named_buffers()):
                if not name.startswith("experts."):
                    own[name].copy_(t)
        layer.aux_loss_scale = full.aux_loss_scale
        layer.set_expert_dropout_step(full.expert_dropout_step, full.expert_dropout_layer)
        return layer

    def _tag_parameters(self) -> None:
        """Mark routed-expert parameters (synced over EDP) apart from dense ones (over DP)."""
        expert_ids = {id(p) for p in self.experts.parameters()}
        tp = self.parallel_state.tp if self.parallel_state is not None else 1
        for p in self.parameters():
            p.expert_parallel = id(p) in expert_ids
            p.sync_group = "edp" if p.expert_parallel else "dp"
            p.sequence_parallel = not p.expert_parallel and tp > 1

    def set_expert_dropout_step(self, step: int, layer_index: int) -> None:
        """The training step and this layer's index in its model, which with
        ``config.expert_dropout_seed`` select the expert dropout mask of the next forwards
        (``moe_parallel.set_expert_dropout_step`` sets every layer of a model)."""
        for name, v in (("step", step), ("layer_index", layer_index)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self.expert_dropout_step, self.expert_dropout_layer = step, layer_index
        self._dropout_key.fill_(stream_key(self.config.expert_dropout_seed, step, layer_index))

    @property
    def drops_experts(self) -> bool:
        """Whether the next forward drops out the experts' activation: training mode with
        ``config.expert_dropout > 0``."""
        return self.training and self.config.expert_dropout > 0

    @contextlib.contextmanager
    def token_keys_narrowed(self, shape: Sequence[int], dim: int, start: int, length: int
                            ) -> Iterator[None]:
        """Within the block the token keys (``set_token_keys``) are those of
        ``x.narrow(dim, start, length)`` for an input of leading ``shape``, when router replay or
        the expert dropout reads them (e.g. a tensor-parallel rank's slice of the sequence)."""
        keys = self.replay.keys
        if keys is None or not (self.replay.active or self.drops_experts):
            yield
            return
        self.replay.keys = keys.narrow(shape, dim, start, length)
        try:
            yield
        finally:
            self.replay.keys = keys

    def _row_hashes(self, shape: Sequence[int], device: torch.device) -> Optional[Tensor]:
        """``[T]`` int64: each token's expert-dropout hash (module docstring) for an input of
        leading ``shape``; None when this forward drops nothing."""
        if not self.drops_experts:
            return None
        keys = self.replay.keys
        if keys is None:
            n = 1
            for d in shape:
                n *= d
            seq_id = torch.zeros(n, dtype=torch.int64, device=device)
            position = torch.arange(n, dtype=torch.int64, device=device)
        else:
            seq_id, position = keys.expanded(shape)
        return token_hash(self._dropout_key, seq_id.to(device), position.to(device))

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the last forward's losses (None when no loss is enabled)."""
        return sum(self.last_losses.values()) if self.last_losses else None

    def route(self, x: Tensor, num_seqs: int = 1, check: bool = True,
              valid: Optional[Tensor] = None,
              assignment: Optional[tuple[Tensor, Optional[Tensor], Tensor]] = None,
              ) -> tuple[Routing, dict[str, Tensor], int]:
        """Router plus capacity: the routing to dispatch, the losses, and the pad length
        (``check=False``: the caller tests the logits for ``check_finite``; ``valid``: ``[T]``
        bool, the non-padding tokens, see ``forward``). ``assignment``: a replayed
        ``(expert_idx, selected, kept)`` (``routing.replay``): the router takes
        ``(expert_idx, selected)`` for its selection, and only the ``kept`` assignments compete
        for capacity (without capacity, ``kept`` is the keep mask)."""
        kw = {} if valid is None else {"valid": valid}
        if assignment is not None:
            kw["assignment"] = assignment[:2]
        routing, losses = self.router(x, num_seqs=num_seqs, count=False, check=check, **kw)
        capacity = self.capacity(x.shape[0])
        pad_to = 0
        keep = routing.keep
        if assignment is not None:
            kept = assignment[2]
            keep = kept if keep is not None or capacity is not None or not bool(kept.all()) \
                else None
        if capacity is not None:
            keep = apply_capacity(  # the router's (or a replay's, checked) ids: in range
                routing.expert_idx, routing.probs, self.config.num_experts, capacity,
                self.config.drop_policy, keep, validate=False,
            )
            pad_to = capacity if self.config.pad_to_capacity else 0
        if keep is not routing.keep:
            routing = replace(routing, keep=keep)
        return routing, losses, pad_to

    def _count_routed(self, routed_per_expert: Tensor, capacity_counts: Optional[Tensor] = None
                      ) -> None:
        if isinstance(self.router, TopKRouter):  # the counts behind the expert-bias update
            counts = self.router.local_tokens_per_expert
            counts += routed_per_expert.to(counts.dtype)
        if capacity_counts is not None:
            self.capacity_counts += capacity_counts

    def _check_host(self, ps: ParallelState) -> None:
        """Refuse a DistributedDataParallel or FSDP2 unit that manages this layer's expert
        parameters (they would overwrite or average the experts over the wrong group). Local
        and cheap (``check_no_ddp_over_experts``, ``check_no_fsdp_over_experts``): it runs at
        every forward, so a wrapper is refused whenever it first runs the layer."""
        if self._group is None:
            return
        check_no_fsdp_over_experts(self.experts, ps)
        check_no_ddp_over_experts(self, ps)

    def _route_collectively(self, tokens: Tensor, num_seqs: int, valid: Optional[Tensor],
                            assignment=None):
        """``route`` and the tokens to dispatch, with the verdict on every rank's forward
        shared by the ``verdict_scope`` group (one all-gather of ``[input ok, logits finite]``
        per forward: ``share_forward_verdict``). The same all-gather compares the ranks'
        freezing and decides for all of them whether the dispatch carries gradients back to the
        tokens and the routing weights (``distributed.freezing``): when no rank needs them, no
        rank runs those exchanges' backward."""
        if self._verdict is None:
            return (*self.route(tokens, num_seqs, valid=valid, assignment=assignment), tokens)
        routing, losses, pad_to = self.route(tokens, num_seqs, check=False, valid=valid,
                                             assignment=assignment)
        finite = torch.isfinite(routing.logits).all() if self.config.check_finite else True
        table = share_forward_verdict(self.parallel_state, None, finite, tokens.device,
                                      self.config.verdict_scope,
                                      tokens.shape[0] if self.config.static_exchange else None,
                                      verdict_columns(self, tokens, routing.probs))
        tokens, probs = agree_on_gradients(self, table, self.parallel_state, self._verdict,
                                           tokens, routing.probs)
        if probs is not routing.probs:
            routing = replace(routing, probs=probs)
        return routing, losses, pad_to, tokens

    def _routed(self, tokens: Tensor, routing: Routing, pad_to: int,
                row_hash: Optional[Tensor] = None) -> PipelineResult:
        """The routed experts' combined output ``[T, H]`` (``dispatch.run_pipeline``, in
        ``overlap_chunks`` chunks), the shared experts' output as its ``side`` (None without
        them), and what the statistics need. The shared experts start while the first dispatch
        exchange is in flight and finish after the last combine, with or without
        ``shared_expert_overlap``: the autograd graph, hence every gradient, is the same; the
        option only puts them on a side CUDA stream (``start_beside``), beside the exchanges and
        the routed experts' kernels.
        With ``scale_expert_input`` (Llama-4) the output is
        ``Σ_j expert_{idx[t, j]}(probs[t, j] · x[t])``: each of a token's ``k`` assignments goes
        out as its own row ``probs[t, j]·x[t]`` with combine weight 1, and the ``k`` outputs are
        summed. Otherwise the routing weights travel to the experts, which scale each row's
        activation before their second GEMM, and the combine is an unweighted sum
        (``dispatch.pipeline``): no expert output rows are kept for the backward.
        ``row_hash [T]``: the tokens' expert-dropout hashes, sent with their rows (None: no
        expert dropout)."""
        cfg, side = self.config, None
        if self.shared_expert is not None:
            shared = self.shared_expert
            side = (partial(start_beside, shared, tokens) if cfg.shared_expert_overlap
                    else lambda: done(shared(tokens)))
        if not cfg.scale_expert_input:
            return run_pipeline(self.dispatcher, self.experts, tokens, routing, pad_to,
                                cfg.overlap_chunks, side, row_hash=row_hash)
        T, k = routing.expert_idx.shape
        rows = (tokens.unsqueeze(1) * routing.probs.unsqueeze(-1).to(tokens.dtype))
        route = replace(
            routing, expert_idx=routing.expert_idx.reshape(T * k, 1),
            probs=torch.ones(T * k, 1, dtype=routing.probs.dtype, device=rows.device),
            keep=None if routing.keep is None else routing.keep.reshape(T * k, 1))
        out = run_pipeline(self.dispatcher, self.experts, rows.reshape(T * k, tokens.shape[1]),
                           route, pad_to, cfg.overlap_chunks, side, weights_to_experts=False,
                           row_hash=None if row_hash is None else row_hash.repeat_interleave(k))
        return replace(out, y=out.y.view(T, k, out.y.shape[-1]).sum(dim=1),
                       row_map=out.row_map.reshape(T, k))

    def _input_tokens(self, x: Tensor, padding_mask: Optional[Tensor]
                      ) -> tuple[Tensor, Optional[Tensor]]:
        """``x`` checked (shape ``[T, H]`` or ``[S, B, H]``, ``params_dtype``) as tokens ``[T, H]``,
        and the non-padding tokens ``valid`` ``[T]`` bool (None without ``padding_mask``)."""
        cfg = self.config
        if not isinstance(x, Tensor) or x.dim() not in (2, 3) or x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"x must be [T, hidden_size] or [S, B, hidden_size] with hidden_size="
                f"{cfg.hidden_size}, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if x.dtype != cfg.params_dtype:
            raise ValueError(
                f"x dtype {x.dtype} does not match config.params_dtype {cfg.params_dtype}"
            )
        tokens = x.reshape(-1, cfg.hidden_size)
        if padding_mask is None:
            return tokens, None
        if (not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool
                or padding_mask.shape != x.shape[:-1]):
            raise ValueError(
                f"padding_mask must be a bool tensor of shape {tuple(x.shape[:-1])} (x's shape "
                f"without hidden_size; True = padding), got "
                f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)} "
                f"{tuple(getattr(padding_mask, 'shape', ()))}"
            )
        return tokens, ~padding_mask.reshape(-1).to(tokens.device)

    def _refuse_collectively(self, refused: ValueError) -> NoReturn:
        """This rank's input was refused: take part in the collectives its peers run before
        their verdict (the first forward's config agreement, then ``share_forward_verdict``),
        which raises ``refused`` here and a ``ValueError`` naming this rank on its peers."""
        self._check_host(self.parallel_state)
        device = next(self.parameters()).device
        if not self._agreed:
            self._agree(device)
        share_forward_verdict(self.parallel_state, refused, True, device,
                              self.config.verdict_scope, 0 if self.config.static_exchange else None,
                              verdict_columns(self, None, None))
        raise refused  # share_forward_verdict raised it already

    @eager_only
    def _agree(self, device: torch.device) -> None:
        """``check_agreement`` of this layer's config, once (eager, also under compile)."""
        check_agreement(self.config, self.parallel_state, device)
        self._agreed = True

    def _prepare(self, tokens: Tensor) -> Tensor:
        """The tokens the router and the experts see. At every eager forward the DDP/FSDP hosts
        are checked; at the first forward the ranks' configs are compared (a collective: a clear
        error, not a hang; under ``torch.compile`` it runs outside the graph, so a
        ``fullgraph=True`` compile needs one eager forward first).
        Expert-parallel with autograd on and no shared verdict (``verdict_scope="none"``), the
        tokens require grad (the exchange's backward is a collective every rank joins; with a
        verdict the ranks decide that together, ``_route_collectively``); Mixtral's
        ``jitter_noise`` multiplies them in training by ``U(1 - eps, 1 + eps)``."""
        cfg = self.config
        if not torch.compiler.is_compiling():  # frame inspection: not traceable
            self._check_host(self.parallel_state)
        if not self._agreed:
            self._agree(tokens.device)
        if (self._group is not None and self._verdict is None and torch.is_grad_enabled()
                and not tokens.requires_grad):
            tokens = tokens.detach().requires_grad_()
        if self.training and cfg.jitter_noise > 0:
            eps = cfg.jitter_noise
            tokens = tokens * torch.empty_like(tokens).uniform_(1.0 - eps, 1.0 + eps)
        return tokens

    def _attach_training_state(self, y: Tensor, num_tokens: int, routing: Routing,
                               losses: dict[str, Tensor], routed: PipelineResult,
                               valid: Optional[Tensor]) -> Tensor:
        """``y`` with the losses on its graph (their gradient: ``aux_loss_scale``) and the routed
        counts (non-padding tokens; with ``dynamic_capacity`` also ``[dropped, routed, slots]``)
        added when the backward passes: once per step, recomputed or not."""
        cfg = self.config
        total = sum(losses.values()) if losses else None
        counted = (routing.routed_per_expert if valid is None
                   else count_assignments(routing.expert_idx, cfg.num_experts, valid))
        cap_counts = None
        if cfg.dynamic_capacity:  # [dropped, routed, slots] of this forward
            routed_n = routing.routed_per_expert.sum()
            kept_n = routed.tokens_per_expert.sum()
            slots = cfg.num_experts * (self.capacity(num_tokens) or 0)
            cap_counts = torch.stack([routed_n - kept_n, routed_n,
                                      torch.full_like(routed_n, slots)]).to(torch.int64)
        return attach_to_graph(y, total, self.aux_loss_scale,
                               partial(self._count_routed, counted, cap_counts))

    @staticmethod
    def _statistics(routing: Routing, routed: PipelineResult) -> RoutingStats:
        """The forward's ``RoutingStats``; warns when a row budget made it drop assignments."""
        if routed.overflow:
            warnings.warn(
                "dropless MoE: the rows per rank exceeded max_rows_per_rank/max_rows_factor; "
                "this forward fell back to capacity and dropped assignments "
                "(see RoutingStats.overflow and drop_rate)", RuntimeWarning, stacklevel=3,
            )
        return RoutingStats.from_counts(
            routing.routed_per_expert, routed.tokens_per_expert, routed.row_map,
            routed.num_rows, routed.padded_rows, routed.overflow, routing.experts_per_token,
        )

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
        rank of them calls it (and its backward) in the same order, possibly with zero tokens;
        and its verdict (input refused, non-finite logits) is shared by the ``verdict_scope``
        group (default: every rank of the pipeline stage), whose ranks all call it too.
        """
        cfg = self.config
        try:
            tokens, valid = self._input_tokens(x, padding_mask)
            assignment = (self.replay.assignment(x.shape[:-1], cfg.num_experts, cfg.top_k,
                                                 cfg.top_p, tokens.device)
                          if self.replay.active else None)
            row_hash = self._row_hashes(x.shape[:-1], tokens.device)
        except ValueError as refused:
            if self._verdict is None:
                raise
            self._refuse_collectively(refused)
        tokens = self._prepare(tokens)
        num_seqs = x.shape[1] if x.dim() == 3 else 1
        routing, losses, pad_to, tokens = self._route_collectively(tokens, num_seqs, valid,
                                                                   assignment)
        if self.replay.mode == "record":
            self.replay.add(x.shape[:-1], routing.expert_idx, routing.selected, routing.keep,
                            routing.probs, routing.logits)
        routed = self._routed(tokens, routing, pad_to, row_hash)
        y = routed.y if routed.side is None else routed.y + routed.side
        if self.training and torch.is_grad_enabled():  # eval / no_grad: training state untouched
            y = self._attach_training_state(y, tokens.shape[0], routing, losses, routed, valid)
            losses = {k: v.detach() for k, v in losses.items()}
            self.last_losses = losses
        self.last_stats = stats = self._statistics(routing, routed)
        y = y.reshape(x.shape)
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


def set_expert_dropout_step(model: nn.Module, step: int) -> int:
    """Before the forwards of training step ``step`` (an int >= 0): every ``MoELayer`` of
    ``model`` takes ``step`` and its index in ``model.modules()`` order (0, 1, ...; the order of
    ``replay.named_moe_layers``) as the step and layer of its expert dropout mask
    (``config.expert_dropout``; module docstring). The same on every rank and layout of a run
    gives the same masks; a recomputed forward (activation checkpointing) reuses them. Returns
    the number of layers set."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for i, layer in enumerate(layers):
        layer.set_expert_dropout_step(step, i)
    return len(layers)
