"""One optimizer step of the main job: the language-model loss, backward with the gradients
synced over their groups, clipping by the global norm, the optimizer step and the per-step
router updates (expert biases, dynamic capacity factors); the same under the DeepSpeed engine;
the optimizer (AdamW, its state sharded with ``--shard optimizer``) and the learning-rate
schedule (10 warm-up steps, then a cosine decay)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import (
    ParallelState,
    ShardedOptimizer,
    clip_grad_norm,
    sync_gradients,
    update_capacity_factors,
    update_expert_biases,
)
from .model import MoETransformerLM


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of ``logits [B, S, V]`` against ``tokens[:, 1:]`` (``tokens``
    ``[B, S+1]``), computed in at least float32."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32))
                           .reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def backward_step(model: MoETransformerLM, tokens: Tensor, ps: ParallelState) -> Tensor:
    """Forward and backward on this rank's ``tokens [B, S+1]``, gradients synced over their
    groups (``sync_gradients``); returns the lm loss (detached)."""
    loss = lm_loss(model(tokens[:, :-1]), tokens)
    # the MoE losses are on the graph already (scale 1/tp: build_model)
    (loss / ps.tp).backward()
    sync_gradients(model, ps)
    return loss.detach()


def train_step(model: MoETransformerLM, opt: torch.optim.Optimizer, tokens: Tensor,
               ps: ParallelState, clip: float) -> tuple[Tensor, Tensor]:
    """One optimizer step on this rank's ``tokens [B, S+1]``; returns (lm loss, grad norm)."""
    opt.zero_grad(set_to_none=True)
    loss = backward_step(model, tokens, ps)
    return loss, optimizer_step(model, opt, ps, clip)


def optimizer_step(model: MoETransformerLM, opt: torch.optim.Optimizer, ps: ParallelState,
                   clip: float) -> Tensor:
    """Clip the synced gradients (global norm), step, update the expert biases and the dynamic
    capacity factors; returns the gradient norm before clipping."""
    norm = clip_grad_norm(model, ps, clip)
    opt.step()
    update_expert_biases(model, ps)  # aux-loss-free balancing (layers with expert_bias only)
    update_capacity_factors(model, ps)  # layers with dynamic_capacity only
    return norm


def build_optimizer(model: nn.Module, args: argparse.Namespace,
                    ps: ParallelState) -> torch.optim.Optimizer:
    """AdamW(lr=--lr, no weight decay) over ``model``'s trainable parameters (``--freeze``
    leaves the frozen ones out); with ``--shard optimizer`` on several ranks its state sharded
    over the data-parallel replicas (``distributed.ShardedOptimizer``: the experts' over EDP,
    the rest over DP)."""
    if args.shard == "optimizer" and ps.world_size > 1:
        return ShardedOptimizer(model, ps, torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                             weight_decay=0.0)


def lr_lambda(args: argparse.Namespace) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s``: 10 warm-up steps, then a cosine decay,
    ``min(1, (s + 1) / 10) * (1 + cos(pi * s / --steps)) / 2``."""
    return lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps))


def deepspeed_engine(args: argparse.Namespace, model: nn.Module, ps: ParallelState):
    """The DeepSpeed engine of ``--deepspeed``'s config for ``model`` (``integrations.deepspeed
    .initialize``) and its learning-rate scheduler. Without an ``optimizer`` section the
    optimizer is AdamW(lr=--lr) over ``moe_param_groups``; without a ``scheduler`` section the
    schedule is ``lr_lambda`` (the engine steps it). ``gradient_clipping`` and
    ``train_micro_batch_size_per_gpu`` default to ``--clip`` and ``--batch-size``;
    ``gradient_accumulation_steps`` must be 1 (one micro-batch per step here)."""
    from ..integrations import deepspeed as ds_moe

    cfg = ds_moe.check_config(args.deepspeed, ps)
    cfg.setdefault("train_micro_batch_size_per_gpu", args.batch_size)
    cfg.setdefault("gradient_clipping", args.clip)
    if cfg.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError(f"--deepspeed {args.deepspeed}: gradient_accumulation_steps must be 1 "
                         f"in moe_parallel.train, got {cfg['gradient_accumulation_steps']}")
    if cfg.get("train_batch_size", args.batch_size * ps.dp) != args.batch_size * ps.dp:
        raise ValueError(f"--deepspeed {args.deepspeed}: train_batch_size "
                         f"{cfg['train_batch_size']} is not --batch-size {args.batch_size} x "
                         f"dp {ps.dp}")
    optimizer = None if "optimizer" in cfg else torch.optim.AdamW(
        ds_moe.moe_param_groups(model, ps, lr=args.lr, weight_decay=0.0))
    schedule = None if "scheduler" in cfg else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args)))
    engine, _, _, sched = ds_moe.initialize(model, ps, cfg, optimizer=optimizer,
                                            lr_scheduler=schedule)
    return engine, sched


def engine_train_step(engine, tokens: Tensor, ps: ParallelState) -> tuple[Tensor, Tensor]:
    """One optimizer step of the DeepSpeed ``engine`` on this rank's ``tokens [B, S+1]``
    (backward with the engine's gradient reduction, its clipped step, then the expert-bias
    update); returns (lm loss, the gradient norm before clipping, 0 without clipping)."""
    loss = lm_loss(engine(tokens[:, :-1]), tokens)
    engine.backward(loss)
    engine.step()
    update_expert_biases(engine.module, ps)
    update_capacity_factors(engine.module, ps)
    norm = engine.get_global_grad_norm()
    return loss.detach(), torch.as_tensor(0.0 if norm is None else float(norm))
