"""One rank of the cluster bench: join the job, check the plan against the world, measure every
part in turn, and on rank 0 hand the results to the report."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from benchmarks.cluster.cli import (
    DEFAULT_SWEEP_BYTES,
    HIERARCHICAL,
    SPAWNED,
    PlanError,
    log,
    make_plan,
    parse_args,
)
from benchmarks.cluster.dispatch import hierarchical_states, run_dispatch
from benchmarks.cluster.layer import run_layer, run_overlap
from benchmarks.cluster.report import report
from benchmarks.cluster.sweep import run_sweep
from benchmarks.cluster.topology import gather_ranks, node_layout, topology_record
from benchmarks.cluster.train import run_train
from benchmarks.harness import Stopwatch, device_sync, summarize_rounds

CONFIG_OPTIONS = ("tokens", "hidden", "top_k", "routings", "zipf_s", "iters", "rounds", "warmup",
                  "layer_tokens", "layer_hidden", "layer_ffn", "layer_dispatcher", "layer_iters",
                  "seed", "train_args", "peak_tflops")


def make_timer(args: argparse.Namespace, device: torch.device) -> Callable[..., dict]:
    """``timer(fns, iters=, rounds=, warmup=, iters_of=)``: per name the
    :func:`benchmarks.harness.summarize` of the slowest rank's per-call seconds of every round
    (``benchmarks.harness.time_rounds`` across ranks), defaults from ``--iters``, ``--rounds``
    and ``--warmup``."""
    sync = device_sync(device)

    def timer(fns: dict, iters: int = args.iters, rounds: int = args.rounds,
              warmup: int = args.warmup, iters_of: Optional[dict] = None) -> dict:
        return summarize_rounds(fns, rounds, iters=iters, warmup=warmup, sync=sync,
                                iters_of=iters_of, across_ranks=True, device=device)

    return timer


def _plan(args: argparse.Namespace, launcher: str, ranks: list[dict]) -> tuple[dict, dict]:
    """``(plan, node layout)``; on options that do not fit the world, rank 0 prints why and
    every rank exits with 2."""
    world = len(ranks)
    try:
        if args.nproc is not None and launcher != "self-spawn" and args.nproc != world:
            raise PlanError(f"--nproc {args.nproc} does not match the launcher's world size "
                            f"{world} (drop --nproc under a launcher)")
        return make_plan(args, world), node_layout(ranks, args.ranks_per_node)
    except PlanError as exc:
        if dist.get_rank() == 0:
            print(f"python -m benchmarks cluster: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _config(args: argparse.Namespace, plan: dict, dtype: torch.dtype,
            device: torch.device) -> dict:
    """The ``config`` of the record: the options, the plan, dtype, parts and threads."""
    return {**{k: getattr(args, k) for k in CONFIG_OPTIONS}, **plan,
            "dtype": str(dtype).removeprefix("torch."),
            "parts": list(args.parts) + (["train"] if args.train_model else []),
            "threads_per_rank": torch.get_num_threads(),
            "sweep_bytes": list(args.sweep_bytes or DEFAULT_SWEEP_BYTES[device.type])}


def _run_parts(args: argparse.Namespace, cfg: dict, layout: dict, dtype: torch.dtype,
               device: torch.device, device_name: Optional[str]) -> dict:
    """Every part asked for, in order (rank 0 holds the rows)."""
    from moe_parallel import ParallelState

    timer = make_timer(args, device)
    states = {ep: ParallelState.build(ep=ep) for ep in [1, *cfg["ep_sizes"]]}
    hier = (hierarchical_states(cfg["ep_sizes"], layout["ranks_per_node"], states)
            if HIERARCHICAL in cfg["dispatchers"] and "dispatch" in args.parts else ({}, {}))
    parts = {"sweep": lambda: run_sweep(cfg, states, layout, dtype, device, timer),
             "dispatch": lambda: run_dispatch(cfg, states, hier, dtype, device, timer),
             "layer": lambda: run_layer(cfg, states, dtype, device, timer),
             "overlap": lambda: run_overlap(cfg, states, dtype, device, timer)}
    results: dict = {}
    for part in args.parts:
        with Stopwatch() as sw:
            results[part] = parts[part]()
        if dist.get_rank() == 0:
            log(f"{part}: {sw.seconds:.1f} s")
    if args.train_model:
        results["train"] = run_train(cfg, states, device, timer, device_name)
    return results


def rank_main(argv: list[str], args: Optional[argparse.Namespace] = None) -> Optional[dict]:
    """One rank of the benchmark: join the job, measure every part, and on rank 0 fit, print
    and save; returns the record on rank 0 (None elsewhere). Exit 2 on every rank when the
    options do not fit the world (the message, naming the option, printed by rank 0)."""
    from moe_parallel.distributed import init_distributed
    from moe_parallel.distributed.init import detect_launch_env

    args = args or parse_args(argv)
    launcher = "self-spawn" if os.environ.get(SPAWNED) else detect_launch_env().launcher
    rank, world, local_rank = init_distributed(timeout=timedelta(seconds=args.timeout))
    try:
        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        torch.set_num_threads(args.threads or (torch.get_num_threads() if cuda else 1))
        dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
        device_name = torch.cuda.get_device_name(device) if cuda else None
        ranks = gather_ranks(rank, local_rank, device, device_name)
        plan, layout = _plan(args, launcher, ranks)
        cfg = _config(args, plan, dtype, device)
        topology = topology_record(ranks, layout, launcher, device)
        if rank == 0:
            log(f"cluster bench: world {world} = {layout['nodes']} node(s) x "
                f"{layout['ranks_per_node']} ({launcher}, {topology['backend']}); EP sizes "
                f"{plan['ep_sizes']}, dispatchers {plan['dispatchers']}")
        load_before = os.getloadavg()
        with Stopwatch() as sw:
            results = _run_parts(args, cfg, layout, dtype, device, device_name)
        if rank != 0:
            return None
        cfg["seconds"] = sw.seconds
        topology["load_avg_1_5_15"] = {"before": list(load_before),
                                       "after": list(os.getloadavg())}
        return report(argv, args, cfg, topology, results)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
