"""The main job: train a small decoder-only MoE transformer language model on generated data.

Data: a random Markov source over ``vocab`` tokens: each token has a fixed table of 4 successors
drawn with probabilities (0.55, 0.25, 0.15, 0.05). Its conditional entropy (the lowest reachable
cross-entropy) is printed beside the loss. Every FFN is an ``MoELayer``; the layers' aux losses
reach the router through the output's autograd graph (``set_aux_loss_scale``).

Parallel layout (under torchrun / mpirun / srun; ``dp`` is derived): experts over EP (and ETP);
the dense part is replicated and data-parallel. With ``--tp`` > 1 each TP rank of a data shard
sees the same batch and hands the MoE layers its 1/tp slice of the sequence (sequence
parallelism), gathering their outputs back; its loss is then the shard's loss / tp and the
replicated parameters' gradients are summed over TP (``distributed.sync_gradients``).

With ``--expert-bias`` every layer balances its load without an aux loss (DeepSeek-V3): after
each optimizer step ``distributed.update_expert_biases`` sums the routed counts of all ranks and
nudges each layer's selection bias toward balance.

With ``--deepspeed CONFIG.json`` the model trains under the DeepSpeed engine
(``integrations.deepspeed``: ZeRO 0/1/2, expert gradients reduced over EDP, clipping by the
global norm); ``--local_rank``, which the ``deepspeed`` launcher passes, is accepted (the rank
comes from the environment). The config's ``optimizer``/``scheduler`` sections, when present,
replace the AdamW and the warm-up/cosine schedule; ``gradient_clipping`` and
``train_micro_batch_size_per_gpu`` default to ``--clip`` and ``--batch-size``.

    python -m moe_parallel.train --steps 150 --experts 8 --top-k 2 --capacity-factor 1.25
    torchrun --nproc-per-node 4 -m moe_parallel.train --ep 2 --tp 2
    launch/deepspeed.sh 4 ds_config.json --ep 2
"""

from __future__ import annotations

import argparse
import math
import os
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint
from .config import DISPATCHERS, DROP_POLICIES, EXPERT_IMPLS, MoEConfig
from .cpu_memory import reuse_freed_memory
from .distributed import (
    ParallelState,
    clip_grad_norm,
    init_distributed,
    sync_gradients,
    update_capacity_factors,
    update_expert_biases,
)
from .distributed import collectives as comm
from .layer import MoELayer, set_aux_loss_scale
from .ops import GROUPED_GEMM_BACKENDS

SUCCESSOR_PROBS = (0.55, 0.25, 0.15, 0.05)


class MarkovSource:
    """Markov token source: next ~ successors[prev] with SUCCESSOR_PROBS."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(0, vocab, (vocab, len(SUCCESSOR_PROBS)), generator=g)
        self.probs = torch.tensor(SUCCESSOR_PROBS)
        self.generator = g

    @property
    def entropy(self) -> float:
        """Conditional entropy in nats (an upper bound when successors collide)."""
        return float(-(self.probs * self.probs.log()).sum())

    def batch(self, batch_size: int, seq_len: int) -> Tensor:
        """[batch_size, seq_len + 1] token ids."""
        g = self.generator
        out = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.vocab, (batch_size,), generator=g)
        choice = torch.multinomial(
            self.probs.expand(batch_size * seq_len, -1), 1, generator=g
        ).view(batch_size, seq_len)
        for s in range(1, seq_len + 1):
            out[:, s] = self.successors[out[:, s - 1], choice[:, s - 1]]
        return out


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MoE FFN."""

    def __init__(self, config: MoEConfig, heads: int) -> None:
        super().__init__()
        H = config.hidden_size
        self.heads = heads
        self.ln1 = nn.LayerNorm(H, dtype=config.params_dtype)
        self.qkv = nn.Linear(H, 3 * H, bias=False, dtype=config.params_dtype)
        self.proj = nn.Linear(H, H, bias=False, dtype=config.params_dtype)
        self.ln2 = nn.LayerNorm(H, dtype=config.params_dtype)
        self.moe = MoELayer(config)
        self.tp_group = None

    def _moe(self, x: Tensor) -> Tensor:
        """MoE on ``x [S, B, H]``; with TP, on this TP rank's slice of S, gathered back."""
        tp = comm.group_size(self.tp_group)
        if tp == 1:
            return self.moe(x)
        chunk = x.shape[0] // tp
        mine = x[comm.group_rank(self.tp_group) * chunk:][:chunk]
        return comm.all_gather(self.moe(mine), self.tp_group, sizes=[chunk] * tp)

    def forward(self, x: Tensor) -> Tensor:
        """``x + attn(ln1(x))``, then ``+ moe(ln2(·))``; ``[B, S, H]`` in and out."""
        B, S, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.heads, H // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, H))
        # MoELayer takes sequence-major [S, B, H].
        return x + self._moe(self.ln2(x).transpose(0, 1)).transpose(0, 1)


class MoETransformerLM(nn.Module):
    """Decoder-only language model: token + position embeddings, ``layers`` pre-norm blocks
    (causal self-attention, then an ``MoELayer`` as the FFN), final norm, vocabulary head."""

    def __init__(self, config: MoEConfig, vocab: int, layers: int, heads: int, max_len: int):
        super().__init__()
        H = config.hidden_size
        self.embed = nn.Embedding(vocab, H, dtype=config.params_dtype)
        self.pos = nn.Embedding(max_len, H, dtype=config.params_dtype)
        self.blocks = nn.ModuleList(Block(config, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(H, dtype=config.params_dtype)
        self.head = nn.Linear(H, vocab, bias=False, dtype=config.params_dtype)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layer of every block, in order."""
        return [b.moe for b in self.blocks]

    def parallelize(self, ps: ParallelState) -> MoETransformerLM:
        """Shard every MoE layer's experts over EP/ETP (from the full weights this model holds)
        and tag the replicated parameters for gradient sync over TP as well (see module doc)."""
        if ps.world_size == 1:
            return self
        if ps.cp > 1 or ps.pp > 1:
            raise ValueError(f"the demo model supports tp, ep, etp and dp; got {ps}")
        for block in self.blocks:
            block.moe = MoELayer.shard_from(block.moe, ps)
            block.tp_group = ps.group("tp")
        for p in self.parameters():
            if getattr(p, "sync_group", "dp") == "dp":
                p.sequence_parallel = ps.tp > 1
        return self

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, S, vocab]`` for ``tokens`` ``[B, S]``."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_config(args: argparse.Namespace) -> MoEConfig:
    """The ``MoEConfig`` of every layer from the command-line flags."""
    return MoEConfig(
        hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts,
        top_k=args.top_k, capacity_factor=args.capacity_factor or None,
        aux_loss_coeff=args.aux_loss_coeff, z_loss_coeff=args.z_loss_coeff,
        score_function=args.score_function, expert_bias=args.expert_bias,
        bias_update_rate=args.bias_update_rate,
        params_dtype=getattr(torch, args.dtype), token_dispatcher_type=args.dispatcher,
        expert_impl=args.expert_impl, block_size=args.block_size,
        grouped_gemm_backend=args.grouped_gemm_backend,
        max_rows_factor=args.max_rows_factor, row_overflow=args.row_overflow,
        overlap_chunks=args.overlap_chunks, top_p=args.top_p,
        dynamic_loss_coeff=args.dynamic_loss_coeff, drop_policy=args.drop_policy,
        dynamic_capacity=args.dynamic_capacity, target_drop_rate=args.target_drop_rate,
        capacity_factor_min=args.capacity_factor_min,
        capacity_factor_max=args.capacity_factor_max,
        capacity_update_rate=args.capacity_update_rate,
    )


class HFCausalLM(nn.Module):
    """A converted transformers causal LM (``integrations.hf.load_pretrained``) with the built-in
    model's interface: ``forward(tokens [B, S]) -> logits``, ``moe_layers()``."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def moe_layers(self) -> list[MoELayer]:
        """Every converted block's ``MoELayer``, in order."""
        return [m for m in self.hf.modules() if isinstance(m, MoELayer)]

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, S, vocab]``."""
        return self.hf(tokens, use_cache=False).logits


def build_model(args: argparse.Namespace, ps: ParallelState) -> nn.Module:
    """The full model from ``args.seed`` (identical on every rank), then sharded for ``ps``; with
    ``--hf-model`` the converted transformers model, each rank reading its own experts."""
    torch.manual_seed(args.seed)
    if args.hf_model:
        from .integrations import hf

        model = HFCausalLM(hf.load_pretrained(
            args.hf_model, parallel_state=ps, dtype=getattr(torch, args.dtype),
            **_runtime_fields(build_config(args))))
        for p in model.parameters():  # the dense part is replicated over TP, as parallelize
            if getattr(p, "sync_group", "dp") == "dp":
                p.sequence_parallel = ps.tp > 1
    else:
        model = MoETransformerLM(build_config(args), args.vocab, args.layers, args.heads,
                                 args.seq_len).parallelize(ps)
    set_aux_loss_scale(model, 1.0 / ps.tp)  # each TP rank's share, as its lm loss / tp
    return model


_RUNTIME_FIELDS = ("capacity_factor", "aux_loss_coeff", "z_loss_coeff", "expert_bias",
                   "bias_update_rate", "token_dispatcher_type", "expert_impl", "block_size",
                   "grouped_gemm_backend", "max_rows_factor", "row_overflow", "overlap_chunks",
                   "drop_policy", "dynamic_capacity", "target_drop_rate", "capacity_factor_min",
                   "capacity_factor_max", "capacity_update_rate")


def _runtime_fields(config: MoEConfig) -> dict:
    """The flags that apply to a converted model's layers too (the model fields come from its
    config); ``--expert-bias`` only where the family has none (DeepSeek-V3 keeps its own)."""
    fields = {f: getattr(config, f) for f in _RUNTIME_FIELDS}
    if not fields["expert_bias"]:
        del fields["expert_bias"]
    return fields


def local_batch(global_batch: Tensor, ps: ParallelState) -> Tensor:
    """This rank's data-parallel slice of the global batch (TP ranks of a shard share it)."""
    per_rank = global_batch.shape[0] // ps.dp
    return global_batch[ps.dp_rank * per_rank:][:per_rank]


def backward_step(model: MoETransformerLM, tokens: Tensor, ps: ParallelState) -> Tensor:
    """Forward and backward on this rank's ``tokens [B, S+1]``, gradients synced over their
    groups (``sync_gradients``); returns the lm loss (detached)."""
    logits = model(tokens[:, :-1])
    lm_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32))
                              .reshape(-1, logits.shape[-1]),
                              tokens[:, 1:].reshape(-1))
    loss = lm_loss / ps.tp  # the MoE losses are on the graph already (scale 1/tp: build_model)
    loss.backward()
    sync_gradients(model, ps)
    return lm_loss.detach()


def train_step(model: MoETransformerLM, opt: torch.optim.Optimizer, tokens: Tensor,
               ps: ParallelState, clip: float) -> tuple[Tensor, Tensor]:
    """One optimizer step on this rank's ``tokens [B, S+1]``; returns (lm loss, grad norm)."""
    opt.zero_grad(set_to_none=True)
    lm_loss = backward_step(model, tokens, ps)
    return lm_loss, optimizer_step(model, opt, ps, clip)


def optimizer_step(model: MoETransformerLM, opt: torch.optim.Optimizer, ps: ParallelState,
                   clip: float) -> Tensor:
    """Clip the synced gradients (global norm), step, update the expert biases and the dynamic
    capacity factors; returns the gradient norm before clipping."""
    norm = clip_grad_norm(model, ps, clip)
    opt.step()
    update_expert_biases(model, ps)  # aux-loss-free balancing (layers with expert_bias only)
    update_capacity_factors(model, ps)  # layers with dynamic_capacity only
    return norm


def lr_lambda(args: argparse.Namespace):
    """The learning-rate multiplier of step ``s``: 10 warm-up steps, then a cosine decay."""
    return lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps))


def deepspeed_engine(args: argparse.Namespace, model: nn.Module, ps: ParallelState):
    """The DeepSpeed engine of ``--deepspeed``'s config for ``model`` (``integrations.deepspeed
    .initialize``) and its learning-rate scheduler. Without an ``optimizer`` section the
    optimizer is AdamW(lr=--lr) over ``moe_param_groups``; without a ``scheduler`` section the
    schedule is ``lr_lambda`` (the engine steps it). ``gradient_clipping`` and
    ``train_micro_batch_size_per_gpu`` default to ``--clip`` and ``--batch-size``;
    ``gradient_accumulation_steps`` must be 1 (one micro-batch per step here)."""
    from .integrations import deepspeed as ds_moe

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
    logits = engine(tokens[:, :-1])
    lm_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32))
                              .reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    engine.backward(lm_loss)
    engine.step()
    update_expert_biases(engine.module, ps)
    update_capacity_factors(engine.module, ps)
    norm = engine.get_global_grad_norm()
    return lm_loss.detach(), torch.as_tensor(0.0 if norm is None else float(norm))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--steps", type=int, default=150, help="optimizer steps (>= 1)")
    add("--batch-size", type=int, default=16, help="sequences per data-parallel rank")
    add("--seq-len", type=int, default=64, help="tokens per sequence")
    add("--vocab", type=int, default=64, help="vocabulary size of the Markov source")
    add("--hidden", type=int, default=64, help="model width H")
    add("--ffn", type=int, default=128, help="expert FFN hidden size F")
    add("--layers", type=int, default=2, help="transformer blocks, each with an MoE FFN")
    add("--heads", type=int, default=4, help="attention heads")
    add("--experts", type=int, default=8, help="routed experts per MoE layer")
    add("--top-k", type=int, default=2, help="experts per token")
    add("--capacity-factor", type=float, default=0.0,
        help="expert capacity factor; 0 for dropless")
    add("--top-p", type=float, default=None,
        help="dynamic-k routing: each token takes experts until their probability reaches P, "
             "at most --top-k")
    add("--dynamic-loss-coeff", type=float, default=0.0,
        help="weight of the router-entropy loss of dynamic routing")
    add("--drop-policy", choices=DROP_POLICIES,
        default="probs", help="which assignments an expert over capacity keeps")
    add("--dynamic-capacity", action="store_true",
        help="the capacity factor follows the drop rate measured over the ranks (starts at "
             "--capacity-factor)")
    add("--target-drop-rate", type=float, default=0.01, help="dynamic capacity: drop target")
    add("--capacity-factor-min", type=float, default=1.0, help="dynamic capacity: lower bound")
    add("--capacity-factor-max", type=float, default=4.0, help="dynamic capacity: upper bound")
    add("--capacity-update-rate", type=float, default=0.1,
        help="dynamic capacity: relative change per step")
    add("--expert-impl", choices=EXPERT_IMPLS, default="grouped",
        help="expert computation: grouped GEMMs or block-sparse products")
    add("--grouped-gemm-backend", choices=GROUPED_GEMM_BACKENDS, default="auto",
        help="grouped GEMM implementation (all but auto/loop need CUDA)")
    add("--block-size", type=int, default=None,
        help="block-sparse block size (None: 128 on CUDA, 32 on CPU)")
    add("--max-rows-factor", type=float, default=None,
        help="dropless: ceiling on rows per rank, times the balanced load (None: no ceiling)")
    add("--row-overflow", choices=("error", "capacity"), default="error",
        help="over the row ceiling: raise, or drop the excess for that step")
    add("--aux-loss-coeff", type=float, default=1e-2, help="Switch load-balancing loss weight")
    add("--z-loss-coeff", type=float, default=1e-3, help="router z-loss weight")
    add("--score-function", choices=("softmax", "sigmoid"), default="softmax",
        help="router scores (DeepSeek-V3 uses sigmoid with --expert-bias)")
    add("--expert-bias", action="store_true",
        help="aux-loss-free balancing: a selection bias updated after every step from the "
             "counts of all ranks (update_expert_biases)")
    add("--bias-update-rate", type=float, default=1e-3,
        help="expert-bias step: b += rate * sign(mean load - load)")
    add("--lr", type=float, default=3e-3, help="AdamW peak learning rate (warm-up, cosine)")
    add("--clip", type=float, default=1.0, help="global gradient-norm clipping threshold")
    add("--log-every", type=int, default=25, help="steps between log lines")
    add("--seed", type=int, default=0, help="model and data seed (the same on every rank)")
    add("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
        help="parameter and activation dtype (the router computes in float32)")
    add("--tp", type=int, default=1, help="tensor (sequence) parallel size")
    add("--ep", type=int, default=1, help="expert parallel size")
    add("--etp", type=int, default=1, help="expert tensor parallel size")
    add("--dispatcher", choices=DISPATCHERS,
        default="alltoall", help="token dispatcher of the expert-parallel layers "
        "(alltoall_hierarchical: inside each node, then across nodes)")
    add("--ranks-per-node", type=int, default=None,
        help="ranks per node for the hierarchical all-to-all (default: the launcher's "
             "LOCAL_WORLD_SIZE)")
    add("--overlap-chunks", type=int, default=1,
        help="pipeline each layer's routed tokens in this many chunks, so one chunk's expert "
             "GEMMs overlap the next chunk's all-to-all")
    add("--dp", type=int, default=None,
        help="data parallel size (derived: world / tp; given only to check it)")
    add("--device", default="auto",
        help="'auto' (this rank's GPU when CUDA is available, else cpu), cpu, cuda")
    add("--timeout-s", type=float, default=300.0,
        help="collective timeout in seconds: a lost rank ends the job with an error")
    add("--hf-model", default=None, metavar="PATH",
        help="train a transformers MoE model from a local save_pretrained directory (its MoE "
             "blocks converted, each rank reading its own experts; the size flags then come "
             "from its config, the data from its vocabulary)")
    add("--save-dir", default=None,
        help="checkpoint root: DIR/step_<N> (moe_parallel.checkpoint, loadable at any layout) "
             "and DIR/latest; written every --save-every steps and at the end")
    add("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    add("--keep-checkpoints", type=int, default=2, help="checkpoints kept in --save-dir")
    add("--async-save", action="store_true",
        help="write checkpoints in the background (DCP async_save) while training goes on")
    add("--resume", nargs="?", const="latest", default=None, metavar="STEP",
        help="continue from --save-dir's latest checkpoint (or that of step STEP), at this "
             "run's layout; without one, start from step 0")
    add("--deepspeed", default=None, metavar="CONFIG.json",
        help="train under the DeepSpeed engine with this config (ZeRO stage 0, 1 or 2; tp=1; "
             "see integrations.deepspeed); launch with launch/deepspeed.sh")
    add("--local_rank", "--local-rank", type=int, default=None,
        help="passed by the deepspeed launcher; accepted and ignored (the local rank comes "
             "from LOCAL_RANK in the environment)")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.save_every < 0 or args.keep_checkpoints < 1:
        p.error(f"--save-every must be >= 0 and --keep-checkpoints >= 1, got {args.save_every} "
                f"and {args.keep_checkpoints}")
    if args.save_dir is None and (args.resume is not None or args.save_every or args.async_save):
        p.error("--resume, --save-every and --async-save need --save-dir")
    if args.resume not in (None, "latest") and not args.resume.isdigit():
        p.error(f"--resume takes a step number or nothing (the latest), got {args.resume!r}")
    if args.deepspeed is not None and args.save_dir is not None:
        p.error("--save-dir (and --resume) are not supported with --deepspeed yet (the ZeRO "
                "optimizer state is partitioned by DeepSpeed)")
    if args.deepspeed is not None and args.tp > 1:
        p.error(f"--deepspeed needs --tp 1 (DeepSpeed reduces dense gradients over the whole "
                f"world), got --tp {args.tp}")
    return args


def _global_stats(model: MoETransformerLM, ps: ParallelState,
                  device: torch.device) -> tuple[list[int], float]:
    """Tokens per expert summed over layers and ranks, and the drop rate."""
    stats = [m.last_stats for m in model.moe_layers()]
    load = torch.stack([s.tokens_per_expert for s in stats]).sum(0).double()
    counts = torch.cat([load, torch.tensor([float(sum(s.dropped for s in stats)),
                                            float(sum(s.num_routed for s in stats))])])
    if ps.world_size > 1:
        counts = counts.to(device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    dropped, routed = counts[-2:].tolist()
    return [int(v) for v in counts[:-2].tolist()], dropped / max(routed, 1.0)


def _resume(args: argparse.Namespace, model: MoETransformerLM, opt: torch.optim.Optimizer,
            sched, source: MarkovSource, ps: ParallelState, history: list[float]) -> int:
    """Load ``--resume``'s checkpoint (model, AdamW state, schedule, data position, losses so
    far) into this run's layout; returns the step to continue from (0 without a checkpoint)."""
    step = checkpoint.latest_step(args.save_dir) if args.resume == "latest" else int(args.resume)
    if step is None:
        if ps.rank == 0:
            print(f"--resume: no checkpoint in {args.save_dir} yet, starting at step 0",
                  flush=True)
        return 0
    extra = checkpoint.load(checkpoint.step_dir(args.save_dir, step), model, opt, ps)
    sched.load_state_dict(extra["scheduler"])
    source.generator.set_state(extra["data"])
    history.extend(extra["history"])
    if ps.rank == 0:
        print(f"resumed from {checkpoint.step_dir(args.save_dir, step)} at step {extra['step']}",
              flush=True)
    return extra["step"]


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, initialise the process group (any supported launcher), train, print the
    loss curve and throughput on rank 0; returns ``{first_loss, last_loss, history, model}``
    (``history``: every step's loss, those before a resume included), ``tokens_per_s`` and,
    per step run, this rank's ``experts_per_token``, ``drop_rate`` and ``capacity_factor``."""
    args = _parse(argv)
    rank, world, local_rank = init_distributed(timeout=timedelta(seconds=args.timeout_s))
    if world == 1:
        asked = {f"--{n}": getattr(args, n) for n in ("tp", "ep", "etp") if getattr(args, n) > 1}
        if asked:
            raise ValueError(
                f"{', '.join(f'{k} {v}' for k, v in asked.items())} need(s) that many processes "
                "but this is a single process; launch with torchrun --nproc-per-node N (or "
                "mpirun / srun), or drop the flag"
            )
    ps = ParallelState.build(tp=args.tp, ep=args.ep, etp=args.etp,
                             ranks_per_node=args.ranks_per_node) if (
        world > 1 or args.deepspeed) else ParallelState.single()
    if args.dp is not None and args.dp != ps.dp:
        raise ValueError(f"--dp {args.dp} does not match world {world} / tp {args.tp} = {ps.dp}")
    if args.seq_len % args.tp:
        raise ValueError(f"--seq-len {args.seq_len} must be divisible by --tp {args.tp}")
    if args.device == "auto":
        args.device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # see cpu_memory: no page faults on each step's large tensors
    model = build_model(args, ps).to(device)
    if args.hf_model:
        args.vocab = model.hf.config.vocab_size
    source = MarkovSource(args.vocab, args.seed + 1)
    engine = None
    if args.deepspeed:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeedEngine requires it
        engine, sched = deepspeed_engine(args, model, ps)
        opt = None  # the engine's (its ZeRO state is partitioned)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    lead = rank == 0
    if lead:
        what = (f"{model.hf.config.model_type} from {args.hf_model}" if args.hf_model else
                f"{args.layers} layers, H={args.hidden}, E={args.experts}, top-{args.top_k}")
        print(f"moe_parallel demo on {device}: {world} process(es) tp={ps.tp} ep={ps.ep} "
              f"etp={ps.etp} dp={ps.dp} edp={ps.edp}; {what}, "
              f"capacity_factor={args.capacity_factor or None}; "
              + (f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}; " if engine else "") +
              f"loss floor (source entropy) ~{source.entropy:.3f}, "
              f"uniform {math.log(args.vocab):.3f}", flush=True)
    history: list[float] = []
    start = _resume(args, model, opt, sched, source, ps, history) if args.resume else 0
    pending: Optional[checkpoint.PendingSave] = None
    tokens_per_step = args.batch_size * ps.dp * args.seq_len
    t_start = time.perf_counter()
    # per step, this rank's: mean experts per token and drop rate over the layers, and every
    # layer's training capacity factor after the step (dynamic capacity moves it)
    routing_log: dict[str, list] = {"experts_per_token": [], "drop_rate": [],
                                    "capacity_factor": []}
    bar = tqdm(range(start, args.steps), desc="train", dynamic_ncols=True, disable=not lead,
               initial=start, total=args.steps)
    for step in bar:
        batch = local_batch(source.batch(args.batch_size * ps.dp, args.seq_len), ps).to(device)
        t0 = time.perf_counter()
        if engine is not None:  # the engine steps its scheduler itself
            lm_loss, _ = engine_train_step(engine, batch, ps)
        else:
            lm_loss, _ = train_step(model, opt, batch, ps, args.clip)
            sched.step()
        if ps.dp > 1:
            torch.distributed.all_reduce(lm_loss, group=ps.group("dp"))
            lm_loss /= ps.dp
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        history.append(lm_loss.item())
        local = [m.last_stats for m in model.moe_layers()]  # this rank's, no communication
        routing_log["experts_per_token"].append(
            sum(st.mean_experts_per_token for st in local) / len(local))
        routing_log["drop_rate"].append(
            sum(st.dropped for st in local) / max(sum(st.num_routed for st in local), 1))
        routing_log["capacity_factor"].append(
            [m.current_capacity_factor(True) for m in model.moe_layers()])
        bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{tok_s:,.0f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            load, drop = _global_stats(model, ps, device)
            if lead:
                imbalance = max(load) / (sum(load) / len(load)) if sum(load) else 0.0
                factors = routing_log["capacity_factor"][-1]
                cap = (f"  capacity factor {factors[0]:.3f}" if factors[0] is not None
                       and model.moe_layers()[0].config.dynamic_capacity else "")
                tqdm.write(f"step {step:4d}  loss {history[-1]:.4f}  tok/s {tok_s:,.0f}  "
                           f"load/expert {load} (max/mean {imbalance:.2f})  "
                           f"drop {100 * drop:.1f}%  experts/token "
                           f"{routing_log['experts_per_token'][-1]:.2f}{cap}")
        done = step + 1
        if args.save_dir and (done == args.steps or (args.save_every and
                                                     done % args.save_every == 0)):
            if pending is not None:
                pending.wait()
            extra = {"step": done, "scheduler": sched.state_dict(), "history": history,
                     "data": source.generator.get_state()}
            pending = checkpoint.save_step(args.save_dir, done, model, opt, ps, extra,
                                           args.keep_checkpoints, args.async_save)
    if pending is not None:
        pending.wait()
    elapsed = time.perf_counter() - t_start
    run = args.steps - start
    n = min(5, len(history))  # mean of the first and of the last (up to) 5 steps
    first, last = sum(history[:n]) / n, sum(history[-n:]) / n
    if lead:
        print(f"loss {first:.3f} -> {last:.3f} (floor ~{source.entropy:.3f}) in {args.steps} "
              f"steps, {run * tokens_per_step / max(elapsed, 1e-9):,.0f} tok/s overall",
              flush=True)
    return {"first_loss": first, "last_loss": last, "history": history, "model": model,
            "tokens_per_s": run * tokens_per_step / max(elapsed, 1e-9), **routing_log}


if __name__ == "__main__":
    main()
