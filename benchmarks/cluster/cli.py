"""The command line of ``python -m benchmarks cluster`` and the plan it makes for a world size
(EP sizes, experts, strong-scaling tokens, dispatcher kinds): errors name the option."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import benchmarks.cluster as package
from benchmarks.cluster.routings import ROUTINGS

PARTS = ("sweep", "dispatch", "layer", "overlap")
HIERARCHICAL = "alltoall_hierarchical"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "PMI_RANK", "PMI_SIZE", "SLURM_PROCID")
SPAWNED = "MOE_PARALLEL_CLUSTER_BENCH_SPAWNED"  # set in the ranks this script spawns
DEFAULT_SWEEP_BYTES = {"cpu": (4096, 65536, 1 << 20, 8 << 20, 32 << 20),
                       "cuda": (4096, 65536, 1 << 20, 16 << 20, 256 << 20)}


class PlanError(ValueError):
    """Bad command-line input found once the world size is known (the message names the
    option)."""


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m benchmarks cluster --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks cluster",
                                description=package.__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--nproc", type=_positive_int, default=None,
        help="ranks to spawn when run without a launcher (default 4); under a launcher it "
             "must equal the world size if given")
    add("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    add("--train-model", action="store_true",
        help="also time moe_parallel.train's model (tokens/s, MFU)")
    add("--train-args", default="--layers 2 --hidden 128 --ffn 256 --experts 8 --seq-len 64 "
                                "--batch-size 4",
        help="moe_parallel.train flags of that model (--ep is the largest EP size)")
    add("--ep-sizes", type=_positive_int, nargs="+", default=None,
        help="EP sizes (default: powers of 2 from 2 dividing the world)")
    add("--dispatchers", nargs="+", default=None,
        help="dispatcher kinds (default: the all-to-all-like kinds of DISPATCHERS)")
    add("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    add("--zipf-s", type=_positive_float, default=1.2, help="zipf exponent s")
    add("--tokens", type=_positive_int, default=1024, help="tokens per rank (dispatch)")
    add("--hidden", type=_positive_int, default=1024, help="hidden size (sweep volume, dispatch)")
    add("--experts", type=_positive_int, default=None,
        help="experts (default: a multiple of every EP size, >= max(8, 2 x the largest))")
    add("--top-k", type=_positive_int, default=2)
    add("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="default: bfloat16 on CUDA, float32 on CPU")
    add("--sweep-bytes", type=_positive_int, nargs="+", default=None,
        help="send-buffer bytes per rank of the all-to-all sweep, the dispatch volume added "
             f"(default: {DEFAULT_SWEEP_BYTES['cpu']} on CPU, {DEFAULT_SWEEP_BYTES['cuda']} "
             "on CUDA)")
    add("--iters", type=_positive_int, default=3, help="calls per timed round")
    add("--rounds", type=_positive_int, default=5, help="timed rounds")
    add("--warmup", type=_nonneg_int, default=1, help="untimed calls per variant first")
    add("--layer-tokens", type=_positive_int, default=256, help="weak scaling: tokens per rank")
    add("--global-tokens", type=_positive_int, default=None,
        help="strong scaling: tokens per EP group, split over its ranks (default: "
             "--layer-tokens x the largest EP size)")
    add("--layer-hidden", type=_positive_int, default=256)
    add("--layer-ffn", type=_positive_int, default=512)
    add("--layer-dispatcher", default="alltoall",
        help="MoEConfig.token_dispatcher_type of the layer")
    add("--layer-iters", type=_positive_int, default=1)
    add("--layer-rounds", type=_positive_int, default=None, help="default: --rounds")
    add("--peak-tflops", type=_positive_float, default=None,
        help="peak FLOP/s per device for MFU (default: by GPU name, none on CPU)")
    add("--threads", type=_positive_int, default=None,
        help="torch threads per rank (default: 1 on CPU, torch's on CUDA)")
    add("--ranks-per-node", type=_positive_int, default=None,
        help="ranks per node G (default: the ranks sharing a host / launcher node)")
    add("--predict-ep-max", type=_positive_int, default=256)
    add("--predict-inter-gbps", type=_positive_float, default=None,
        help="inter-node GB/s for the predictions when the fit has none")
    add("--seed", type=_nonneg_int, default=0)
    add("--timeout", type=_positive_float, default=600.0,
        help="collective timeout in seconds (a lost rank raises instead of hanging)")
    add("--out", type=Path, default=None, help="JSON path")
    add("--plot", type=Path, default=None, help="PNG path (default: beside the JSON)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check what needs no world size (errors name the option, exit 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.predict_ep_max < 2:
        p.error(f"--predict-ep-max must be >= 2, got {args.predict_ep_max}")
    if args.train_args:
        try:
            shlex.split(args.train_args)
        except ValueError as exc:
            p.error(f"--train-args: {exc}")
    return args


def default_dispatchers() -> list[str]:
    """The all-to-all-like kinds of ``moe_parallel.dispatch.DISPATCHERS`` (the hierarchical one
    included once it is there)."""
    from moe_parallel.dispatch import DISPATCHERS

    return [k for k in DISPATCHERS if k.startswith("alltoall")]


def make_plan(args: argparse.Namespace, world: int) -> dict:
    """EP sizes, experts, strong-scaling tokens and dispatcher kinds for ``world`` ranks.
    :class:`PlanError` naming the option when they do not fit the world."""
    from moe_parallel import MoEConfig
    from moe_parallel.dispatch import DISPATCHERS

    if args.ep_sizes:
        eps = sorted(set(args.ep_sizes))
        for ep in eps:
            if ep < 2 or world % ep:
                raise PlanError(f"--ep-sizes: {ep} must be >= 2 and divide the world size "
                                f"{world}")
    else:
        eps = [2 ** i for i in range(1, world.bit_length()) if world % 2 ** i == 0]
    top = max(eps, default=1)
    lcm = math.lcm(*eps) if eps else 1
    experts = args.experts or lcm * math.ceil(max(8, 2 * top) / lcm)
    for ep in eps:
        if experts % ep:
            raise PlanError(f"--experts {experts} is not divisible by the EP size {ep}")
    if args.top_k > experts:
        raise PlanError(f"--top-k {args.top_k} is above the expert count {experts}")
    global_tokens = args.global_tokens or args.layer_tokens * top
    for ep in eps:
        if global_tokens % ep:
            raise PlanError(f"--global-tokens {global_tokens} is not divisible by the EP size "
                            f"{ep}")
    kinds = args.dispatchers or default_dispatchers()
    for k in kinds:
        if k not in DISPATCHERS and k != HIERARCHICAL:
            raise PlanError(f"--dispatchers: unknown kind {k!r}; known: {', '.join(DISPATCHERS)}")
    if "alltoall" not in kinds:
        kinds = ["alltoall", *kinds]  # the flat one gives the splits of the raw baseline
    try:
        MoEConfig(hidden_size=args.layer_hidden, ffn_hidden_size=args.layer_ffn,
                  num_experts=experts, top_k=args.top_k,
                  token_dispatcher_type=args.layer_dispatcher)
    except ValueError as exc:
        raise PlanError(f"--layer-dispatcher / --layer-hidden / --layer-ffn: {exc}") from None
    return {"ep_sizes": eps, "experts": experts, "global_tokens": global_tokens,
            "dispatchers": list(dict.fromkeys(kinds)),
            "layer_rounds": args.layer_rounds or args.rounds}


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a launcher started this process (any of :data:`LAUNCHER_VARS` set)."""
    return any(v in environ for v in LAUNCHER_VARS)
