"""``python -m moe_parallel.plan``: which parallel layouts of a model fit a cluster, and which is
fastest. See ``moe_parallel.plan`` for the formulas."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from .activations import RECOMPUTE_MODES
from .cost import Cluster, cluster_from_fit
from .hf_config import model_from_hf_config
from .layouts import AXES, SHARD_MODES, enumerate_layouts
from .memory import PRECISIONS, MemoryOptions
from .models import PRESETS, ModelSpec, active_params, preset, total_params
from .planner import evaluate
from .report import table, to_json
from .units import format_bytes, parse_bytes


def _int_list(flag: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of positive ints (e.g. 1,2,4)")
        return values
    parse.__name__ = flag
    return parse


def _choice_list(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: each value must be one of {', '.join(allowed)}")
        return values
    return parse


def _size(flag: str):
    def parse(text: str) -> int:
        try:
            return parse_bytes(text, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` documents every option)."""
    p = argparse.ArgumentParser(
        prog="python -m moe_parallel.plan",
        description="Predict the memory per GPU and the step time of every parallel layout "
                    "(tp, cp, pp, ep, etp; sharding and recompute modes) of an MoE model on a "
                    "cluster, and rank the layouts that fit.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"a preset: {', '.join(PRESETS)}")
    src.add_argument("--config", help="a Hugging Face config.json (or its directory) of a "
                                      "family moe_parallel.integrations.hf converts")
    p.add_argument("--list-models", action="store_true", help="print the presets and exit")
    p.add_argument("--gpus", type=int, help="GPUs in the job (the world size)")
    p.add_argument("--gpu-memory", type=_size("--gpu-memory"), default="80GB",
                   help="memory per GPU, e.g. 80GB (10^9 bytes), 80GiB, 81920MiB "
                        "(default 80GB)")
    p.add_argument("--reserve", type=_size("--reserve"), default="0GB",
                   help="memory per GPU kept for what the planner does not count (CUDA context,"
                        " NCCL, fragmentation); default 0GB")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default 8, or the --alltoall-fit's ranks per node)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (4096)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per data-parallel rank per micro-batch (1)")
    p.add_argument("--global-batch", type=int, default=1024,
                   help="sequences per optimizer step (1024); micro-batches per step = "
                        "ceil(global / (dp x micro-batch))")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16",
                   help="bf16: bf16 weights, fp32 gradients, master and AdamW moments; fp32: "
                        "everything fp32 (default bf16)")
    p.add_argument("--imbalance", type=float, default=1.25,
                   help="rows the most loaded rank's experts receive over the balanced load "
                        "(1.0 = perfectly balanced; default 1.25)")
    for axis in AXES:
        p.add_argument(f"--{axis}", type=_int_list(f"--{axis}"), default=None,
                       help=f"{axis} sizes to try, comma-separated (default: every size that "
                            f"suits the model{', inside a node' if axis in ('tp', 'etp') else ''}"
                            f"{'; default 1' if axis == 'cp' else ''})")
    p.add_argument("--shard", type=_choice_list(SHARD_MODES), default=list(SHARD_MODES),
                   help="sharding modes to try: none (replicated), optimizer (AdamW state over "
                        "DP x CP and EDP), experts (FSDP2: dense over DP x CP, experts over EDP)")
    p.add_argument("--recompute", type=_choice_list(RECOMPUTE_MODES),
                   default=list(RECOMPUTE_MODES),
                   help="recompute modes to try: none, activation, experts")
    p.add_argument("--mtp-layers", type=int, default=None,
                   help="multi-token-prediction modules (default: the model's)")
    cost = p.add_argument_group("cost model (defaults: H100-class assumptions)")
    cost.add_argument("--alltoall-fit", help="a 'python -m benchmarks cluster' result JSON: "
                                             "use its fitted latencies and bandwidths")
    cost.add_argument("--tflops", type=float, help="achieved TFLOP/s per GPU (600)")
    cost.add_argument("--intra-gbps", type=float, help="intra-node GB/s per GPU (450)")
    cost.add_argument("--inter-gbps", type=float, help="inter-node GB/s per GPU (50)")
    cost.add_argument("--call-us", type=float, help="fixed µs per collective call (0)")
    cost.add_argument("--message-us", type=float, help="µs per peer message (0)")
    cost.add_argument("--overlap", type=float,
                      help="fraction of the smaller of communication and compute hidden (0)")
    p.add_argument("--top", type=int, default=20, help="rows of the table (20)")
    p.add_argument("--json", help="write every evaluated layout to this JSON file")
    return p


def _model(args: argparse.Namespace) -> ModelSpec:
    model = preset(args.model) if args.model else model_from_hf_config(args.config)
    if args.mtp_layers is not None:
        if args.mtp_layers < 0:
            raise ValueError(f"--mtp-layers: must be >= 0, got {args.mtp_layers}")
        from dataclasses import replace
        model = replace(model, mtp_layers=args.mtp_layers)
    return model


def _cluster(args: argparse.Namespace) -> Cluster:
    given = {"gpus_per_node": args.gpus_per_node, "tflops": args.tflops,
             "intra_gbps": args.intra_gbps, "inter_gbps": args.inter_gbps,
             "call_us": args.call_us, "message_us": args.message_us, "overlap": args.overlap}
    if args.alltoall_fit:
        return cluster_from_fit(args.alltoall_fit, **given)
    return Cluster(**{k: v for k, v in given.items() if v is not None})


def _describe(model: ModelSpec) -> str:
    main = total_params(model, include_mtp=False)
    mtp = total_params(model) - main
    extra = f" (+{mtp / 1e9:.2f}B in {model.mtp_layers} MTP module)" if mtp else ""
    return (f"{model.name}: {main / 1e9:.2f}B parameters{extra}, "
            f"{active_params(model) / 1e9:.2f}B active per token, {model.layers} layers "
            f"({model.moe_layers} MoE), {model.experts} experts of {model.expert_ffn}, "
            f"top-{model.top_k}; from {model.source}")


def main(argv: list[str] | None = None) -> int:
    """Run the planner (module docstring); 0 on success, argparse's exit on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        for name in PRESETS:
            print(_describe(preset(name)))
        return 0
    if not (args.model or args.config):
        parser.error("one of --model or --config is required")
    if args.gpus is None:
        parser.error("--gpus is required")
    try:
        model = _model(args)
        cluster = _cluster(args)
        opts = MemoryOptions(seq_len=args.seq_len, micro_batch=args.micro_batch,
                             global_batch=args.global_batch, precision=args.precision,
                             imbalance=args.imbalance)
        if args.top < 1:
            raise ValueError(f"--top: must be >= 1, got {args.top}")
        layouts = enumerate_layouts(model, args.gpus, args.seq_len,
                                    {a: getattr(args, a) for a in AXES}, args.shard,
                                    args.recompute, cluster.gpus_per_node)
    except ValueError as e:
        parser.error(str(e))
    budget = args.gpu_memory - args.reserve
    if budget <= 0:
        parser.error(f"--reserve {args.reserve} B leaves nothing of --gpu-memory "
                     f"{args.gpu_memory} B")
    results = evaluate(model, layouts, opts, cluster, budget)
    fitting = sum(e.fits for e in results)
    print(f"model: {_describe(model)}")
    print(f"cluster: {args.gpus} GPUs, {cluster.gpus_per_node} per node, "
          f"{format_bytes(args.gpu_memory)} GiB each, budget {format_bytes(budget)} GiB; "
          f"cost model {cluster.source}")
    print(f"workload: {args.seq_len} tokens x micro-batch {args.micro_batch}, global batch "
          f"{args.global_batch} sequences, {args.precision}, imbalance {args.imbalance}")
    print(f"{len(results)} layouts evaluated, {fitting} fit"
          + ("" if fitting else f"; none fits in {format_bytes(budget)} GiB: the smallest "
                                f"predicted are listed"))
    print(table(results, args.top))
    if args.json:
        header = {"command": "python -m moe_parallel.plan " + shlex.join(
                      sys.argv[1:] if argv is None else argv),
                  "date": datetime.date.today().isoformat(),
                  "model": {**model.to_dict(), "total_params": total_params(model),
                            "active_params": active_params(model)},
                  "cluster": {"gpus": args.gpus, "gpu_memory_bytes": args.gpu_memory,
                              "budget_bytes": budget, **cluster.to_dict()},
                  "options": {"seq_len": args.seq_len, "micro_batch": args.micro_batch,
                              "global_batch": args.global_batch, "precision": args.precision,
                              "imbalance": args.imbalance},
                  "formulas": "moe_parallel/plan/__init__.py"}
        Path(args.json).write_text(json.dumps(to_json(header, results), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
