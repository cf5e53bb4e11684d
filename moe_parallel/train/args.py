"""The main job's command line: one function per argument group, and the checks every flag
value passes before any process group or model is built.

``_parse(argv)`` parses and applies ``check_flags`` (the rules on the flags alone);
``check_world(args, world)`` applies the rules that need the world size, which
``launch_world_size()`` reads from the launcher's environment. Each check raises ``ValueError``
naming the flag(s); ``_parse`` and ``exit_on_error`` turn it into argparse's usage error (exit
status 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from collections.abc import Callable
from typing import Optional, TypeVar

import torch.distributed as dist

from ..config import (
    DISPATCHERS,
    DROP_POLICIES,
    EXPERT_IMPLS,
    RECOMPUTE_MODES,
    ROW_OVERFLOWS,
    SCORE_FUNCTIONS,
    SHARD_MODES,
)
from ..distributed import detect_launch_env
from ..ops import GROUPED_GEMM_BACKENDS
from .freeze import parts_arg
from .model import CONFIG_FLAGS, build_config
from .token_file import DATA_DTYPES, check_length, token_count

DESCRIPTION = ("The main job: train a small decoder-only MoE transformer language model on "
               "generated data, or on a file of token ids (--data).")

_T = TypeVar("_T")

# dest -> smallest allowed value (None: the flag may be left unset)
_AT_LEAST = {"steps": 1, "batch_size": 1, "seq_len": 1, "vocab": 1, "hidden": 1, "ffn": 1,
             "layers": 1, "heads": 1, "experts": 1, "top_k": 1, "tp": 1, "ep": 1, "etp": 1,
             "dp": 1, "ranks_per_node": 1, "overlap_chunks": 1, "block_size": 1,
             "log_every": 1, "progress_every": 0, "save_every": 0, "keep_checkpoints": 1,
             "lr": 0.0, "clip": 0.0}


def _model_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("model").add_argument
    add("--vocab", type=int, default=64,
        help="vocabulary size (the Markov source's); with --data it must exceed every id in "
             "the file and is not set by it: 256 for a byte-level file, the tokenizer's size "
             "otherwise")
    add("--hidden", type=int, default=64, help="model width H")
    add("--ffn", type=int, default=128, help="expert FFN hidden size F")
    add("--layers", type=int, default=2, help="transformer blocks, each with an MoE FFN")
    add("--heads", type=int, default=4, help="attention heads")
    add("--experts", type=int, default=8, help="routed experts per MoE layer")
    add("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
        help="parameter and activation dtype (the router computes in float32)")
    add("--hf-model", default=None, metavar="PATH",
        help="train a transformers MoE model from a local save_pretrained directory (its MoE "
             "blocks converted, each rank reading its own experts; the size flags then come "
             "from its config, the data from its vocabulary)")
    add("--upcycle-from", default=None, metavar="PATH",
        help="train an MoE model upcycled from the dense transformers model (Llama, Mistral, "
             "Qwen2, Qwen3) in this local save_pretrained directory: every MLP becomes --experts "
             "experts, copies (or with --granularity G, 1/G shards) of it, --top-k per token "
             "(integrations.hf.upcycle, seeded by --seed, the same on every rank), then "
             "converted for this rank's layout; the other sizes come from its config")
    add("--granularity", type=int, default=1, metavar="G",
        help="with --upcycle-from: each expert takes 1/G of the dense MLP's hidden units "
             "(G divides --experts, --top-k and the MLP width)")


def _layout_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("parallel layout").add_argument
    add("--tp", type=int, default=1, help="tensor (sequence) parallel size")
    add("--ep", type=int, default=1, help="expert parallel size")
    add("--etp", type=int, default=1, help="expert tensor parallel size")
    add("--dp", type=int, default=None,
        help="data parallel size (derived: world / tp; given only to check it)")
    add("--ranks-per-node", type=int, default=None,
        help="ranks per node for the hierarchical all-to-all (default: the launcher's "
             "LOCAL_WORLD_SIZE)")
    add("--device", default="auto",
        help="'auto' (this rank's GPU when CUDA is available, else cpu), cpu, cuda")
    add("--timeout-s", type=float, default=300.0,
        help="collective timeout in seconds: a lost rank ends the job with an error")


def _routing_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("routing").add_argument
    add("--top-k", type=int, default=2, help="experts per token")
    add("--top-p", type=float, default=None,
        help="dynamic-k routing: each token takes experts until their probability reaches P, "
             "at most --top-k")
    add("--dynamic-loss-coeff", type=float, default=0.0,
        help="weight of the router-entropy loss of dynamic routing")
    add("--aux-loss-coeff", type=float, default=1e-2, help="Switch load-balancing loss weight")
    add("--z-loss-coeff", type=float, default=1e-3, help="router z-loss weight")
    add("--score-function", choices=SCORE_FUNCTIONS, default="softmax",
        help="router scores (DeepSeek-V3 uses sigmoid with --expert-bias)")
    add("--expert-bias", action="store_true",
        help="aux-loss-free balancing: a selection bias updated after every step from the "
             "counts of all ranks (update_expert_biases)")
    add("--bias-update-rate", type=float, default=1e-3,
        help="expert-bias step: b += rate * sign(mean load - load)")


def _capacity_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("capacity").add_argument
    add("--capacity-factor", type=float, default=0.0,
        help="expert capacity factor; 0 for dropless")
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
    add("--max-rows-factor", type=float, default=None,
        help="dropless: ceiling on rows per rank, times the balanced load (None: no ceiling)")
    add("--row-overflow", choices=ROW_OVERFLOWS, default="error",
        help="over the row ceiling: raise, or drop the excess for that step")


def _dispatch_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("dispatch, overlap and experts").add_argument
    add("--dispatcher", choices=DISPATCHERS,
        default="alltoall", help="token dispatcher of the expert-parallel layers "
        "(alltoall_hierarchical: inside each node, then across nodes)")
    add("--overlap-chunks", type=int, default=1,
        help="pipeline each layer's routed tokens in this many chunks, so one chunk's expert "
             "GEMMs overlap the next chunk's all-to-all")
    add("--expert-impl", choices=EXPERT_IMPLS, default="grouped",
        help="expert computation: grouped GEMMs or block-sparse products")
    add("--grouped-gemm-backend", choices=GROUPED_GEMM_BACKENDS, default="auto",
        help="grouped GEMM implementation (all but auto/loop need CUDA)")
    add("--block-size", type=int, default=None,
        help="block-sparse block size (None: 128 on CUDA, 32 on CPU)")
    add("--recompute", choices=RECOMPUTE_MODES, default="none",
        help="what the routed experts' backward recomputes instead of keeping: 'activation' "
             "the activation, 'experts' the expert FFN from its input rows (MoEConfig.recompute)")
    add("--expert-dropout", type=float, default=0.0, metavar="P",
        help="dropout probability in [0, 1) on the routed experts' hidden activation, in "
             "training (MoEConfig.expert_dropout; seeded by --seed): the mask follows each "
             "token's sample and position, the step and the layer, the same at every layout")


def _training_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("training").add_argument
    add("--steps", type=int, default=150, help="optimizer steps (>= 1)")
    add("--batch-size", type=int, default=16, help="sequences per data-parallel rank")
    add("--seq-len", type=int, default=64, help="tokens per sequence")
    add("--lr", type=float, default=3e-3, help="AdamW peak learning rate (warm-up, cosine)")
    add("--clip", type=float, default=1.0, help="global gradient-norm clipping threshold")
    add("--seed", type=int, default=0, help="model and data seed (the same on every rank)")
    add("--shard", choices=SHARD_MODES, default="none",
        help="memory sharding over the data-parallel replicas: 'experts' shards weights, "
             "gradients and optimizer state with FSDP2 (routed experts over EDP, the rest over "
             "DP; distributed.shard_model), 'optimizer' only the optimizer state (ZeRO-1: "
             "distributed.ShardedOptimizer); not with --deepspeed, whose ZeRO stage does this")
    add("--freeze", type=parts_arg, default=None, metavar="PART[,PART...]",
        help="train with these parts frozen (requires_grad=False; not in the optimizer, still "
             "in checkpoints): moe (every MoE layer: router, routed and shared experts), dense "
             "(everything outside the MoE layers), router, experts (the routed experts); e.g. "
             "--freeze router,dense (train.freeze)")
    add("--compile", nargs="?", const="inductor", default=None,
        choices=("inductor", "aot_eager", "eager"), metavar="BACKEND",
        help="torch.compile every transformer block (Module.compile, in place; state and "
             "checkpoints unchanged) with BACKEND (default inductor; aot_eager, eager); a "
             "block's expert-parallel exchanges stay outside its graphs (graph breaks)")
    add("--deepspeed", default=None, metavar="CONFIG.json",
        help="train under the DeepSpeed engine with this config (ZeRO stage 0, 1 or 2; tp=1; "
             "see integrations.deepspeed); launch with launch/deepspeed.sh")
    add("--local_rank", "--local-rank", type=int, default=None,
        help="passed by the deepspeed launcher; accepted and ignored (the local rank comes "
             "from LOCAL_RANK in the environment)")


def _data_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("data").add_argument
    add("--data", default=None, metavar="PATH",
        help="train on this flat file of token ids (nanoGPT's train.bin, a Megatron .bin), "
             "memory-mapped, each data-parallel rank reading its own windows; default: the "
             "generated Markov source")
    add("--data-dtype", choices=tuple(DATA_DTYPES), default="uint16",
        help="the token ids' type in --data (little-endian, no header)")


def _checkpoint_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("checkpoint").add_argument
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


def _logging_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("logging").add_argument
    add("--log-every", type=int, default=25,
        help="steps between log lines (loss, tokens/s, load per expert, drops)")
    add("--progress-every", type=int, default=0,
        help="when stdout is not a terminal: steps between plain progress lines, which "
             "replace the live bar (0: about 16 lines per run)")
    add("--tensorboard", default=None, metavar="DIR",
        help="at every --log-every step, write the loss and each MoE layer's router metrics "
             "summed over all ranks (load per expert, imbalance, drops, experts per token, "
             "router entropy, loss terms) to a TensorBoard event file in DIR (rank 0; needs "
             "the tensorboard package: the observe extra)")
    add("--metrics-jsonl", default=None, metavar="FILE",
        help="append the same records to FILE as JSON Lines, one object per logging step "
             "(schema: moe_parallel.observe.sinks)")
    add("--wandb-project", default=None, metavar="NAME",
        help="log the same scalars to an offline Weights & Biases run of project NAME (needs "
             "the wandb package; upload later with `wandb sync`)")


def _int_list(text: str) -> list[int]:
    """``"1,5,9"`` -> ``[1, 5, 9]`` (argparse type of the list flags)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,5,10; got "
                                         f"{text!r}") from None


def _trace_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument_group("routing traces").add_argument
    add("--trace-routing", default=None, metavar="DIR",
        help="on each --trace-steps step, every rank writes its MoE layers' routing (experts, "
             "kept assignments, combine weights per token key) to "
             "DIR/step_<8 digits>/rank_<5 digits>.safetensors (moe_parallel.observe.traces; "
             "load_trace(DIR/step_...) reads a step back)")
    add("--trace-steps", type=_int_list, default=None, metavar="S1,S2,...",
        help="the steps to trace, counted from 0 as in the log lines (needed with "
             "--trace-routing)")
    add("--trace-layers", type=_int_list, default=None, metavar="I,J,...",
        help="the MoE layers to trace, by index (default: all)")
    add("--trace-logits", action="store_true",
        help="also keep each token's router logits in the trace")
    add("--trace-max-mib", type=float, default=64.0,
        help="each rank's trace file of a step holds at most this many MiB of tensors (split "
             "evenly over the traced layers); a layer's forward beyond it is left out and the "
             "file says truncated=1")


_GROUPS: tuple[Callable[[argparse.ArgumentParser], None], ...] = (
    _training_flags, _data_flags, _model_flags, _routing_flags, _capacity_flags, _dispatch_flags,
    _layout_flags, _checkpoint_flags, _logging_flags, _trace_flags)


def _parser() -> argparse.ArgumentParser:
    """The main job's argument parser: every group of ``_GROUPS``, defaults shown in --help."""
    p = argparse.ArgumentParser(prog="moe_parallel.train", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group in _GROUPS:
        group(p)
    return p


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and apply ``check_flags``; a violated rule
    ends the program with argparse's usage error naming the flag (exit status 2)."""
    p = _parser()
    args = p.parse_args(argv)
    exit_on_error(check_flags, args, parser=p)
    return args


def exit_on_error(check: Callable[..., _T], *check_args,
                  parser: Optional[argparse.ArgumentParser] = None) -> _T:
    """Run ``check(*check_args)`` and return its result; its ``ValueError`` becomes
    ``parser.error`` (usage, exit 2)."""
    try:
        return check(*check_args)
    except ValueError as exc:
        (parser or _parser()).error(str(exc))


def flag(dest: str) -> str:
    """The option string of ``dest``: ``top_k`` -> ``--top-k``."""
    return "--local_rank" if dest == "local_rank" else "--" + dest.replace("_", "-")


def check_flags(args: argparse.Namespace) -> None:
    """The rules on the flags alone (``ValueError`` naming the flag): sizes and counts at least
    ``_AT_LEAST``, the combinations of the checkpoint and DeepSpeed flags, the model's
    divisibility (``--hidden % --heads``, ``--seq-len % --tp``), the metric sinks' packages
    (``--tensorboard``, ``--wandb-project``), the trace flags (``_check_trace_flags``),
    ``--hf-model`` a directory
    with a config.json, ``--upcycle-from``'s flags (``_check_upcycle_flags``), ``--data`` a
    non-empty file of whole ``--data-dtype`` ids holding at least ``--batch-size`` sequences,
    and every ``MoEConfig`` rule with its fields named by their flags."""
    for dest, least in _AT_LEAST.items():
        value = getattr(args, dest)
        if value is not None and value < least:
            raise ValueError(f"{flag(dest)} must be >= {least}, got {value}")
    if args.timeout_s <= 0:
        raise ValueError(f"--timeout-s must be > 0, got {args.timeout_s}")
    _check_checkpoint_flags(args)
    if args.freeze is not None and {"moe", "dense"} <= set(args.freeze):
        raise ValueError("--freeze moe,dense freezes every parameter: leave a part trainable")
    if args.freeze is not None and args.deepspeed is not None:
        raise ValueError("--freeze is not supported with --deepspeed yet")
    _check_metric_flags(args)
    _check_trace_flags(args)
    if args.seq_len % args.tp:
        raise ValueError(f"--seq-len {args.seq_len} must be divisible by --tp {args.tp}")
    if args.data is not None:
        check_length(args.data, token_count(args.data, args.data_dtype), args.seq_len,
                     args.batch_size, 1)
    if args.expert_dropout and args.hf_model is not None:
        raise ValueError("--expert-dropout supports the built-in model only, not --hf-model (its "
                         "MoE blocks take batch-major tokens, for which the job sets no keys)")
    if args.compile is not None and args.hf_model is not None:
        raise ValueError("--compile compiles the built-in model's blocks; it is not supported "
                         "with --hf-model")
    if args.upcycle_from is not None:
        _check_upcycle_flags(args)
    elif args.granularity != 1:
        raise ValueError("--granularity needs --upcycle-from")
    if args.hf_model is not None:
        _check_hf_model(args.hf_model)
    elif args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    try:
        build_config(args)
    except ValueError as exc:
        raise ValueError(config_error(str(exc))) from exc


def _check_checkpoint_flags(args: argparse.Namespace) -> None:
    """``--save-dir`` for the checkpoint flags, ``--resume``'s value, none with --deepspeed."""
    if args.save_dir is None and (args.resume is not None or args.save_every or args.async_save):
        raise ValueError("--resume, --save-every and --async-save need --save-dir")
    if args.resume not in (None, "latest") and not args.resume.isdigit():
        raise ValueError(f"--resume takes a step number or nothing (the latest), got "
                         f"{args.resume!r}")
    if args.deepspeed is not None and args.save_dir is not None:
        raise ValueError("--save-dir (and --resume) are not supported with --deepspeed yet (the "
                         "ZeRO optimizer state is partitioned by DeepSpeed)")
    if args.deepspeed is not None and args.shard != "none":
        raise ValueError(f"--shard {args.shard} is not used with --deepspeed: the DeepSpeed "
                         "engine shards the optimizer state itself (zero_optimization.stage in "
                         "its config); drop --shard")
    if args.deepspeed is not None and args.tp > 1:
        raise ValueError(f"--deepspeed needs --tp 1 (DeepSpeed reduces dense gradients over the "
                         f"whole world), got --tp {args.tp}")


def _check_metric_flags(args: argparse.Namespace) -> None:
    """``--tensorboard`` and ``--wandb-project`` need their packages installed; no metric flag
    is an empty string."""
    for dest in ("tensorboard", "metrics_jsonl", "wandb_project"):
        if getattr(args, dest) == "":
            raise ValueError(f"{flag(dest)} needs a non-empty value")
    for dest, package, hint in (("tensorboard", "tensorboard", "moe_parallel[observe]"),
                                ("wandb_project", "wandb", "wandb")):
        if getattr(args, dest) is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"{flag(dest)} needs the {package} package, which is not "
                             f"installed (pip install '{hint}')")


def _check_trace_flags(args: argparse.Namespace) -> None:
    """``--trace-routing`` with ``--trace-steps`` (steps in ``[0, --steps)``), the other trace
    flags only with it, ``--trace-layers`` distinct indices of the model's ``--layers``,
    ``--trace-max-mib`` > 0; not with ``--hf-model`` (its MoE blocks take batch-major tokens, for
    which the job sets no token keys)."""
    if args.trace_routing is None:
        given = [flag(d) for d in ("trace_steps", "trace_layers") if getattr(args, d) is not None]
        given += ["--trace-logits"] if args.trace_logits else []
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --trace-routing DIR")
        return
    if args.trace_routing == "":
        raise ValueError("--trace-routing needs a non-empty value")
    if not args.trace_steps:
        raise ValueError("--trace-routing needs --trace-steps (the steps to trace, e.g. 0,10,100)")
    bad = [s for s in args.trace_steps if not 0 <= s < args.steps]
    if bad:
        raise ValueError(f"--trace-steps must lie in [0, --steps {args.steps}), got {bad}")
    if not args.trace_max_mib > 0:
        raise ValueError(f"--trace-max-mib must be > 0, got {args.trace_max_mib}")
    if args.hf_model is not None:
        raise ValueError("--trace-routing supports the built-in model only, not --hf-model")
    layers = args.trace_layers
    if layers is not None and (len(set(layers)) != len(layers)
                               or not all(0 <= i < args.layers for i in layers)):
        raise ValueError(f"--trace-layers must be distinct indices in [0, --layers "
                         f"{args.layers}), got {','.join(map(str, layers))}")


def _check_upcycle_flags(args: argparse.Namespace) -> None:
    """``--upcycle-from``: not with --hf-model, a save_pretrained directory, --granularity
    >= 1 dividing --experts and --top-k; not with the flags the converted HF models lack
    (--compile, --trace-routing, --expert-dropout: as with --hf-model)."""
    if args.hf_model is not None:
        raise ValueError("--upcycle-from and --hf-model both name the model: give one")
    _check_hf_model(args.upcycle_from, "--upcycle-from")
    if args.granularity < 1:
        raise ValueError(f"--granularity must be >= 1, got {args.granularity}")
    for dest in ("experts", "top_k"):
        if getattr(args, dest) % args.granularity:
            raise ValueError(f"--granularity {args.granularity} must divide {flag(dest)} "
                             f"{getattr(args, dest)}")
    for dest, given in (("compile", args.compile is not None),
                        ("trace_routing", args.trace_routing is not None),
                        ("expert_dropout", bool(getattr(args, "expert_dropout", 0.0)))):
        if given:
            raise ValueError(f"{flag(dest)} supports the built-in model only, not "
                             "--upcycle-from (a converted transformers model)")


def _check_hf_model(path: str, option: str = "--hf-model") -> None:
    """``option`` (``--hf-model``, ``--upcycle-from``) names a save_pretrained directory: it
    exists and holds config.json."""
    if not os.path.isdir(path):
        raise ValueError(f"{option} {path}: no such directory (a local save_pretrained "
                         "directory is needed)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{option} {path}: the directory has no config.json (not a "
                         "save_pretrained directory)")


def config_error(message: str) -> str:
    """``message`` (a ``MoEConfig`` error) with every field that a flag sets named by its flag:
    ``top_k must be <= num_experts`` -> ``--top-k must be <= --experts``."""
    fields = sorted(CONFIG_FLAGS, key=len, reverse=True)
    return re.sub(r"\b(" + "|".join(fields) + r")\b",
                  lambda m: flag(CONFIG_FLAGS[m.group(1)]), message)


def launch_world_size() -> Optional[int]:
    """The world size: the initialised default group's, else the launcher's environment's
    (``detect_launch_env``; 1 without a launcher); ``None`` where that environment is invalid
    (``init_distributed`` then reports it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return detect_launch_env(os.environ).world_size
    except ValueError:
        return None


def check_world(args: argparse.Namespace, world: int) -> None:
    """The rules that need the world size (``ValueError`` naming the flags): parallel sizes need
    as many processes, --tp and --ep x --etp divide the world, --dp is world / tp, --ranks-per-node
    divides the world; for the built-in model --experts % --ep and --ffn % --etp; --data holds
    one global batch (--batch-size x world / tp sequences)."""
    if world == 1:
        asked = {flag(n): getattr(args, n) for n in ("tp", "ep", "etp") if getattr(args, n) > 1}
        if asked:
            raise ValueError(
                f"{', '.join(f'{k} {v}' for k, v in asked.items())} need(s) that many processes "
                "but this is a single process; launch with torchrun --nproc-per-node N (or "
                "mpirun / srun), or drop the flag")
    if world % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide the world size {world}")
    if world % (args.ep * args.etp):
        raise ValueError(f"--ep {args.ep} x --etp {args.etp} = {args.ep * args.etp} does not "
                         f"divide the world size {world}")
    if args.dp is not None and args.dp != world // args.tp:
        raise ValueError(f"--dp {args.dp} does not match world {world} / tp {args.tp} = "
                         f"{world // args.tp}")
    if args.ranks_per_node is not None and world % args.ranks_per_node:
        raise ValueError(f"--ranks-per-node {args.ranks_per_node} does not divide the world "
                         f"size {world}")
    if args.data is not None:
        check_length(args.data, token_count(args.data, args.data_dtype), args.seq_len,
                     args.batch_size, world // args.tp)
    if args.hf_model is None and args.experts % args.ep:
        raise ValueError(f"--experts {args.experts} is not divisible by --ep {args.ep}")
    if args.hf_model is None and args.upcycle_from is None and args.ffn % args.etp:
        raise ValueError(f"--ffn {args.ffn} is not divisible by --etp {args.etp}")
