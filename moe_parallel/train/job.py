"""The main job as named stages: parse and validate the flags, set up the process group and
the parallel layout, build the model, data (``data.MarkovSource`` or ``token_file.TokenFile``)
and optimizer, resume, run the step loop (progress, log lines, checkpoints), and report the loss
curve and throughput."""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint
from ..cpu_memory import reuse_freed_memory
from ..distributed import ParallelState, init_distributed
from ..layer import set_expert_dropout_step
from ..observe import MetricSinks, RouterMetrics
from ..observe.traces import save_trace
from ..replay import named_moe_layers, router_recording, set_router_replay, set_token_keys
from .args import _parse, check_world, exit_on_error, launch_world_size
from .data import MarkovSource
from .freeze import describe_freezing, freeze
from .model import build_model, compile_blocks, shard_for_memory
from .progress import Progress, line_figures, new_routing_log, record_routing, step_line
from .step import build_optimizer, deepspeed_engine, engine_train_step, lr_lambda, train_step
from .token_file import TokenFile

Source = Union[MarkovSource, TokenFile]


@dataclass
class Job:
    """Everything the step loop uses: the flags, the layout, and what was built for them
    (``opt`` is ``None`` under the DeepSpeed ``engine``, whose ZeRO state is partitioned)."""

    args: argparse.Namespace
    ps: ParallelState
    device: torch.device
    model: nn.Module
    source: Source
    opt: Optional[torch.optim.Optimizer]
    sched: Any
    engine: Any = None

    @property
    def lead(self) -> bool:
        """Whether this rank prints (rank 0)."""
        return self.ps.rank == 0

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all data-parallel ranks."""
        return self.args.batch_size * self.ps.dp * self.args.seq_len


def setup_parallel(args: argparse.Namespace) -> tuple[ParallelState, int]:
    """Check the layout against the launcher's world size, initialise the process group (any
    supported launcher) and build the ``ParallelState``; returns it and the local rank."""
    world = launch_world_size()
    if world is not None:  # before any process group exists
        exit_on_error(check_world, args, world)
    _, world, local_rank = init_distributed(timeout=timedelta(seconds=args.timeout_s))
    exit_on_error(check_world, args, world)
    ps = ParallelState.build(tp=args.tp, ep=args.ep, etp=args.etp,
                             ranks_per_node=args.ranks_per_node) if (
        world > 1 or args.deepspeed) else ParallelState.single()
    return ps, local_rank


def resolve_device(args: argparse.Namespace) -> torch.device:
    """``--device`` (``auto``: this rank's GPU when CUDA is available, else cpu); on cpu freed
    memory is kept for reuse (``cpu_memory``: no page faults on each step's large tensors)."""
    if args.device == "auto":
        args.device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()
    return device


def seed_host_rngs(seed: int) -> None:
    """Seed Python's and NumPy's global generators with ``seed``. The job draws from neither,
    but a checkpoint saves them and ``--resume`` restores them, so seeded they end the same in
    a run that was interrupted and resumed as in one that was not."""
    random.seed(seed)
    np.random.seed(seed)


def build_source(args: argparse.Namespace) -> Source:
    """The data: ``--data``'s token file (windows ordered by ``--seed``; every id checked against
    ``--vocab``, an HF model's vocabulary once ``build_job`` has set it), else the Markov source
    (``--seed + 1``); a refusal is argparse's usage error, the same on every rank."""
    if args.data is None:
        return MarkovSource(args.vocab, args.seed + 1)
    return exit_on_error(lambda: TokenFile(args.data, args.data_dtype, vocab=args.vocab,
                                           seq_len=args.seq_len, seed=args.seed))


def build_job(args: argparse.Namespace, ps: ParallelState, local_rank: int) -> Job:
    """The model on its device (sharded as ``--shard`` says: ``shard_for_memory``), the data
    source (``build_source``; an HF model's vocabulary) and the optimizer and schedule: AdamW
    (``build_optimizer``) with ``lr_lambda``, or the DeepSpeed engine's. Python's and NumPy's
    generators are seeded with ``--seed`` (``seed_host_rngs``). ``--freeze``: those parts
    frozen before sharding and the optimizer (``freeze.freeze``). ``--compile``: every block
    compiled in place (``compile_blocks``)."""
    seed_host_rngs(args.seed)
    device = resolve_device(args)
    model = build_model(args, ps).to(device)
    if args.freeze is not None:  # before FSDP and the optimizer, which see the trainable ones
        exit_on_error(freeze, model, args.freeze)
    model = shard_for_memory(model, args.shard, ps)
    if args.compile is not None:
        compile_blocks(model, args.compile)
    if args.hf_model or args.upcycle_from:
        args.vocab = model.hf.config.vocab_size
    source = build_source(args)
    if args.deepspeed:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeedEngine requires it
        engine, sched = deepspeed_engine(args, model, ps)
        return Job(args, ps, device, model, source, None, sched, engine)
    opt = build_optimizer(model, args, ps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    return Job(args, ps, device, model, source, opt, sched)


def announce(job: Job) -> None:
    """Rank 0's header: device, layout, model, capacity, DeepSpeed stage, the data (the Markov
    source's loss floor, or the token file's size and unigram entropy)."""
    args, ps = job.args, job.ps
    if not job.lead:
        return
    what = (f"{job.model.hf.config.model_type} from {args.hf_model}" if args.hf_model else
            f"{job.model.hf.config.model_type} upcycled from {args.upcycle_from} (granularity "
            f"{args.granularity})" if args.upcycle_from else
            f"{args.layers} layers, H={args.hidden}, E={args.experts}, top-{args.top_k}")
    zero = (f"DeepSpeed ZeRO-{job.engine.zero_optimization_stage()}; " if job.engine else
            f"sharded: {args.shard}; " if args.shard != "none" else "")
    print(f"moe_parallel demo on {job.device}: {ps.world_size} process(es) tp={ps.tp} "
          f"ep={ps.ep} etp={ps.etp} dp={ps.dp} edp={ps.edp}; {what}, "
          f"capacity_factor={args.capacity_factor or None}; {zero}"
          f"{job.source.describe()}, "
          f"uniform {math.log(args.vocab):.3f}", flush=True)
    if args.freeze is not None:
        print(describe_freezing(job.model, args.freeze), flush=True)


def resume(job: Job, history: list[float]) -> int:
    """Load ``--resume``'s checkpoint (model, AdamW state, schedule, data position, losses so
    far, appended to ``history``) into this run's layout; returns the step to continue from (0
    without ``--resume`` or without a checkpoint)."""
    args, ps = job.args, job.ps
    if not args.resume:
        return 0
    step = checkpoint.latest_step(args.save_dir) if args.resume == "latest" else int(args.resume)
    if step is None:
        if job.lead:
            print(f"--resume: no checkpoint in {args.save_dir} yet, starting at step 0",
                  flush=True)
        return 0
    extra = checkpoint.load(checkpoint.step_dir(args.save_dir, step), job.model, job.opt, ps)
    job.sched.load_state_dict(extra["scheduler"])
    exit_on_error(job.source.load_state, extra["data"])
    history.extend(extra["history"])
    if job.lead:
        print(f"resumed from {checkpoint.step_dir(args.save_dir, step)} at step {extra['step']}",
              flush=True)
    return extra["step"]


def run_step(job: Job) -> tuple[float, float]:
    """One optimizer step on this rank's slice of the next global batch; returns the lm loss
    averaged over the data-parallel ranks and the step's tokens/s."""
    args, ps = job.args, job.ps
    batch = job.source.next_batch(args.batch_size, args.seq_len, ps).to(job.device)
    t0 = time.perf_counter()
    if job.engine is not None:  # the engine steps its scheduler itself
        lm_loss, _ = engine_train_step(job.engine, batch, ps)
    else:
        lm_loss, _ = train_step(job.model, job.opt, batch, ps, args.clip)
        job.sched.step()
    if ps.dp > 1:
        torch.distributed.all_reduce(lm_loss, group=ps.group("dp"))
        lm_loss /= ps.dp
    return lm_loss.item(), job.tokens_per_step / (time.perf_counter() - t0)


def first_sample(job: Job, step: int) -> int:
    """The run-wide index of the first sample of ``step``'s global batch: ``--data``'s count of
    samples consumed (restored by a resume), else ``step · --batch-size · dp``. Data-parallel
    rank ``r`` holds samples ``first + r · B .. first + (r + 1) · B - 1`` of it, in both sources
    the same sequences for any layout of the same global batch."""
    if isinstance(job.source, TokenFile):
        return job.source.consumed
    return step * job.args.batch_size * job.ps.dp


def set_step_keys(job: Job, step: int) -> None:
    """The keys of ``step``'s tokens on every MoE layer (``set_token_keys``): ``seq_id`` = the
    sample's run-wide index (``first_sample`` plus this data-parallel rank's offset),
    ``position`` = ``0 .. S - 1``; the same token has the same key at every layout."""
    B, S = job.args.batch_size, job.args.seq_len
    first = first_sample(job, step) + job.ps.dp_rank * B
    # the MoE layers take sequence-major [S, B, H]
    set_token_keys(job.model, torch.arange(first, first + B, device=job.device).view(1, B),
                   torch.arange(S, device=job.device).view(S, 1))


def prepare_expert_dropout(job: Job, step: int) -> None:
    """With ``--expert-dropout``, before ``step``'s forward: the step of every MoE layer's
    dropout mask (``set_expert_dropout_step``) and its tokens' keys (``set_step_keys``), so
    the masks are the same at every layout; nothing otherwise."""
    if job.args.expert_dropout:
        set_expert_dropout_step(job.model, step)
        set_step_keys(job, step)


def start_trace(job: Job, step: int) -> bool:
    """Before a ``--trace-steps`` step's forward: the ``--trace-layers`` (all by default) record
    their routing with the combine weights (and ``--trace-logits``), each within its share of
    ``--trace-max-mib``; the tokens' keys are ``set_step_keys``'s. Returns whether ``step``
    is traced (other steps: nothing is done)."""
    args = job.args
    if args.trace_routing is None or step not in args.trace_steps:
        return False
    count = len(args.trace_layers) if args.trace_layers is not None else len(
        named_moe_layers(job.model))
    set_router_replay(job.model, "record", layers=args.trace_layers, weights=True,
                      logits=args.trace_logits,
                      max_bytes=max(1, int(args.trace_max_mib * 2**20) // count))
    set_step_keys(job, step)
    return True


def finish_trace(job: Job, step: int) -> None:
    """After a traced step: this rank's recording to ``--trace-routing``'s
    ``step_<step>/rank_<rank>.safetensors`` (``observe.traces``; truncated when a layer's
    budget left a forward out), then recording off."""
    truncated = any(m.replay.truncated for _, m in named_moe_layers(job.model)
                    if m.replay.mode == "record")
    save_trace(router_recording(job.model), job.args.trace_routing, step, job.ps.rank,
               job.ps.world_size, truncated)
    set_router_replay(job.model, "off")


def open_sinks(job: Job) -> MetricSinks:
    """``--tensorboard``, ``--metrics-jsonl`` and ``--wandb-project``'s sinks on rank 0 (empty on
    the other ranks, and without those flags). With any of them, rank 0 tells every rank whether
    it could open them (one broadcast): a path it cannot write stops every rank with the error,
    not rank 0 alone while the others wait for it at the next collective."""
    args = job.args
    if not (args.tensorboard or args.metrics_jsonl or args.wandb_project):
        return MetricSinks(enabled=False)
    sinks, error = MetricSinks(enabled=False), None
    if job.lead:
        try:
            sinks = MetricSinks(args.tensorboard, args.metrics_jsonl, args.wandb_project)
        except OSError as e:
            error = e
    if job.ps.world_size > 1:
        failed = torch.tensor([error is not None], dtype=torch.int64, device=job.device)
        dist.broadcast(failed, src=0)
        if error is None and bool(failed):
            raise SystemExit(f"rank {job.ps.rank}: rank 0 could not open the metric sinks "
                             "(--tensorboard / --metrics-jsonl / --wandb-project); its error "
                             "says why")
    if error is not None:
        raise SystemExit(f"rank 0: cannot open the metric sinks (--tensorboard / "
                         f"--metrics-jsonl / --wandb-project): {error}")
    return sinks


def log_step(job: Job, step: int, loss: float, tok_s: float, routing_log: dict,
             progress: Progress, watch: RouterMetrics, sinks: MetricSinks) -> None:
    """The log line of ``step`` and its record in the metric sinks: every MoE layer's figures
    summed over the ranks (``RouterMetrics.collect``: one collective on every rank); the line
    shows their load per expert summed over the layers and the drop rate."""
    layers = watch.collect()
    load, drop = line_figures(layers)
    factor = routing_log["capacity_factor"][-1][0]
    dynamic = job.model.moe_layers()[0].config.dynamic_capacity
    progress.write(step_line(step, loss, tok_s, load, drop,
                             routing_log["experts_per_token"][-1],
                             factor if dynamic else None))
    sinks.write(step, layers, loss=loss, tokens_per_s=tok_s)


def save_if_due(job: Job, done: int, history: list[float],
                pending: Optional[checkpoint.PendingSave]) -> Optional[checkpoint.PendingSave]:
    """After ``done`` steps: with ``--save-dir``, every ``--save-every`` steps and at the end,
    wait for the previous save and write step ``done`` (model, optimizer, schedule, losses, data
    position); returns the save still pending (``--async-save``), else ``pending``."""
    args = job.args
    if not args.save_dir or not (done == args.steps or
                                 (args.save_every and done % args.save_every == 0)):
        return pending
    if pending is not None:
        pending.wait()
    extra = {"step": done, "scheduler": job.sched.state_dict(), "history": history,
             "data": job.source.state()}
    return checkpoint.save_step(args.save_dir, done, job.model, job.opt, job.ps, extra,
                                args.keep_checkpoints, args.async_save)


def train_loop(job: Job, start: int, history: list[float]) -> dict[str, list]:
    """Steps ``start .. --steps - 1``: each step's loss appended to ``history``, its routing
    figures to the returned log, progress and (every ``--log-every`` steps and at the last) a
    log line on rank 0 and a record in the metric sinks (``log_step``; the same steps on every
    rank, the only steps whose router metrics are reduced), routing traces on ``--trace-steps``
    (``start_trace``, ``finish_trace``), checkpoints when due."""
    args = job.args
    routing_log = new_routing_log()
    progress = Progress(start, args.steps, job.lead, args.progress_every)
    watch, sinks = RouterMetrics(job.model, job.ps), open_sinks(job)
    pending: Optional[checkpoint.PendingSave] = None
    try:
        for step in range(start, args.steps):
            prepare_expert_dropout(job, step)
            traced = start_trace(job, step)
            loss, tok_s = run_step(job)
            if traced:
                finish_trace(job, step)
            history.append(loss)
            record_routing(routing_log, job.model)
            progress.update(step + 1, loss, tok_s)
            if step % args.log_every == 0 or step == args.steps - 1:
                log_step(job, step, loss, tok_s, routing_log, progress, watch, sinks)
            pending = save_if_due(job, step + 1, history, pending)
    finally:
        progress.close()
        watch.close()
        sinks.close()
    if pending is not None:
        pending.wait()
    return routing_log


def report(job: Job, start: int, history: list[float], elapsed: float) -> dict:
    """Rank 0's summary line: the mean loss of the first and of the last (up to) 5 steps against
    the data's entropy (the Markov source's floor, a token file's unigram entropy), and the
    tokens/s over the steps run; returns those figures."""
    n = min(5, len(history))
    first, last = sum(history[:n]) / n, sum(history[-n:]) / n
    tokens_per_s = (job.args.steps - start) * job.tokens_per_step / max(elapsed, 1e-9)
    if job.lead:
        print(f"loss {first:.3f} -> {last:.3f} ({job.source.loss_reference()}) in "
              f"{job.args.steps} steps, {tokens_per_s:,.0f} tok/s overall", flush=True)
    return {"first_loss": first, "last_loss": last, "tokens_per_s": tokens_per_s}


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse and validate ``argv``, initialise the process group (any supported launcher),
    train, print the loss curve and throughput on rank 0; returns ``{first_loss, last_loss,
    history, model, optimizer}`` (``history``: every step's loss, those before a resume
    included; ``optimizer``: None under DeepSpeed),
    ``tokens_per_s`` and, per step run, this rank's ``experts_per_token``, ``drop_rate`` and
    ``capacity_factor``."""
    args = _parse(argv)
    ps, local_rank = setup_parallel(args)
    job = build_job(args, ps, local_rank)
    announce(job)
    history: list[float] = []
    start = resume(job, history)
    t_start = time.perf_counter()
    routing_log = train_loop(job, start, history)
    summary = report(job, start, history, time.perf_counter() - t_start)
    return {**summary, "history": history, "model": job.model, "optimizer": job.opt,
            **routing_log}
