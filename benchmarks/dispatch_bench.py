"""Expert-parallel dispatch overhead against raw all-to-all, and the MoE layer against DeepSpeed's.

Every measurement runs on ``w`` gloo CPU processes (``torch.set_num_threads(1)`` each), spawned
fresh per world size (``benchmarks.harness.run_gloo_job``). A time is the slowest rank's: per
round every rank runs ``iters`` calls after a barrier and the round's time is
``max_ranks(elapsed) / iters``; the reported value is the median over ``repeats`` rounds (with
min, max and quartiles), the variants of one table interleaved round by round
(``benchmarks.harness.time_rounds``).

Part 1, dispatch overhead (``w`` = 2, 4, 8; ``ep = w``; experts are the identity, so only the
token movement is timed). Per rank ``T`` tokens of width ``H`` routed top-``k`` over ``E``
experts by the layer's router (computed once, outside the timed region):
  * ours and raw: ``benchmarks.exchange`` (``dispatch`` then ``combine`` with autograd
    recording, against the ``all_to_all_single`` calls moving the same rows with the same
    uneven splits; forward, and forward+backward).
  * ``ratio = ours / raw`` (the project's target is ``ratio <= 1.3``).
  * bytes moved per forward, all ranks: ``Σ_r Σ_{j≠r} send_r[j] · H · elem · 2`` (rows leaving
    their rank, there and back; forward+backward moves twice that) plus the counts exchange.
  Modes: ``dropless`` (``pad_to = 0``, uneven splits) and ``capacity`` (capacity factor 1.25,
  padded to capacity: every expert segment ``C`` rows, even splits). With ``--profile-iters``,
  ``torch.profiler`` records ours (and raw) forward+backward on every rank; rank 0's self CPU
  time, summed by op family (``op_profile.op_family``) and listed by op, says where the time goes.

Part 2, the layer against ``deepspeed.moe.layer.MoE`` on ``--layer-world`` (4) processes,
``ep_size = w``: top-2 (``top2_2nd_expert_sampling=False``: plain top-2 as ours, no Gumbel noise
on the second choice), capacity factor 1.25 for train and eval, ``min_capacity = 4``, experts
``Linear(H, F, bias=False) -> GELU -> Linear(F, H, bias=False)`` (ours: ``activation="gelu"``,
the same FLOPs per row; ``expert_impl`` MoEConfig's default unless ``--expert-impl``).
Capacity C = ceil(T·k/E·1.25) in both; which assignments are dropped differs (DeepSpeed keeps
by position, first choices first; ours by ``drop_policy``, default "probs").
Forward+backward step time (``layer(x).sum().backward()``, gradients reset to None) of
DeepSpeed, ours in capacity mode (padded to capacity as DeepSpeed is, and unpadded) and ours
dropless. DeepSpeed runs on its CPU accelerator over the same gloo group
(``benchmarks.deepspeed_moe`` says how). Without DeepSpeed the table says why and holds ours
only. Default layer size H=512, F=1024 (not H=1024, F=2048: that step takes about 4 s on 4
ranks sharing 2 cores).

    python -m benchmarks.dispatch_bench                       # tables + JSON in benchmarks/results/
    python -m benchmarks.dispatch_bench --worlds 2 4 --parts dispatch --profile-iters 0
    python -m benchmarks.dispatch_bench --parts layer --layer-hidden 1024 --layer-ffn 2048
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.deepspeed_moe import deepspeed_layer, prepare_deepspeed
from benchmarks.dispatch_report import TARGET_RATIO, print_dispatch, print_layer, print_profiles
from benchmarks.exchange import dispatch_combine_fns, raw_alltoall_fns
from benchmarks.harness import Stopwatch, run_gloo_job, summarize_rounds
from benchmarks.op_profile import profile_calls
from benchmarks.record import save_result
from moe_parallel.config import EXPERT_IMPLS

DISPATCH_MODES = ("dropless", "capacity")
CAPACITY_FACTOR = 1.25
MIN_CAPACITY = 4


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _time_interleaved(fns: dict, iters: int, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Per name, :func:`benchmarks.harness.summarize` of ``repeats`` rounds of the slowest
    rank's ``elapsed of iters calls / iters`` seconds, the functions in turn in each round."""
    return summarize_rounds(fns, repeats, iters=iters, warmup=warmup, across_ranks=True)


# ---- part 1: dispatch overhead ----------------------------------------------------------------


def _mode_inputs(job: dict, ps, mode: str) -> dict:
    """This rank's layer (for its router and dispatcher), tokens, routing and the splits of its
    all-to-all in one dispatch ``mode`` (the router runs once, outside the timed region)."""
    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.dispatch import AllToAllDispatcher

    H, E, k, T = job["hidden"], job["experts"], job["top_k"], job["tokens"]
    dtype = getattr(torch, job["dtype"])
    extra = (dict(capacity_factor=CAPACITY_FACTOR, pad_to_capacity=True)
             if mode == "capacity" else {})
    # the experts are not run here (identity); a tiny F keeps their weights small
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=64, num_experts=E, top_k=k,
                    activation="gelu", params_dtype=dtype, **extra)
    torch.manual_seed(0)  # the same router on every rank
    layer = MoELayer(cfg, parallel_state=ps)
    disp = layer.dispatcher
    assert isinstance(disp, AllToAllDispatcher), type(disp)
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    x = torch.randn(T, H, generator=g, dtype=dtype)
    with torch.no_grad():
        routing, _, pad_to = layer.route(x)
    x.requires_grad_(True)
    probs = routing.probs.detach().requires_grad_(True)
    routing = replace(routing, probs=probs)
    grad_y = torch.randn(T, H, generator=g, dtype=dtype)
    _, _, handle = disp.dispatch(x, routing, pad_to)
    send, recv = list(handle.send_splits), list(handle.recv_splits)
    return {"disp": disp, "x": x, "probs": probs, "routing": routing, "pad_to": pad_to,
            "grad_y": grad_y, "send": send, "recv": recv,
            "send_rows": torch.randn(sum(send), H, generator=g, dtype=dtype),
            "send_counts": torch.zeros(E, dtype=torch.int64)}


def _byte_counts(send: list[int], hidden: int, experts: int, dtype: torch.dtype) -> dict:
    """Rows and bytes every rank sends (all ranks' splits gathered; module docstring)."""
    world = dist.get_world_size()
    all_send = [torch.zeros(world, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(all_send, torch.tensor(send, dtype=torch.int64))
    elem = torch.empty((), dtype=dtype).element_size()
    off_rank_rows = sum(int(s.sum() - s[r]) for r, s in enumerate(all_send))
    total_rows = sum(int(s.sum()) for s in all_send)
    return {
        "rows_sent_per_rank": [int(s.sum()) for s in all_send],
        "send_splits_rank0": [int(v) for v in all_send[0]],
        "bytes_fwd_off_rank": 2 * off_rank_rows * hidden * elem,
        "bytes_fwd_incl_self": 2 * total_rows * hidden * elem,
        "bytes_counts_ours": world * (world - 1) * experts * 8,   # all-gather of E counts
        "bytes_counts_raw": world * (world - 1) * (experts // world) * 8,
    }


def _dispatch_mode(job: dict, ps, mode: str) -> dict:
    """Rank side of part 1 for one mode: ours vs raw all-to-all (see the module docstring)."""
    m = _mode_inputs(job, ps, mode)
    ours_fwd, ours_fwd_bwd = dispatch_combine_fns(m["disp"], m["x"], m["probs"], m["routing"],
                                                  m["grad_y"], m["pad_to"])
    raw_fwd, raw_fwd_bwd = raw_alltoall_fns(m["send_rows"], m["send_counts"], m["send"],
                                            m["recv"], ps.group("ep"))
    times = _time_interleaved(
        {"ours_fwd": ours_fwd, "raw_fwd": raw_fwd, "ours_fwd_bwd": ours_fwd_bwd,
         "raw_fwd_bwd": raw_fwd_bwd}, job["iters"], job["repeats"])
    res = {"world": dist.get_world_size(), "mode": mode, "pad_to": m["pad_to"],
           **_byte_counts(m["send"], job["hidden"], job["experts"], getattr(torch, job["dtype"])),
           "times": times}
    for what in ("fwd", "fwd_bwd"):
        res[f"ratio_{what}"] = times[f"ours_{what}"]["seconds"] / times[f"raw_{what}"]["seconds"]
    if job["profile_iters"] > 0:
        res["profile_ours_fwd_bwd_rank0"] = profile_calls(ours_fwd_bwd, job["profile_iters"],
                                                          job["profile_top"])
        res["profile_raw_fwd_bwd_rank0"] = profile_calls(raw_fwd_bwd, job["profile_iters"], 6)
    return res


def dispatch_job(job: dict) -> dict:
    """Rank side of part 1: every mode on this world size (rank 0 returns the results)."""
    from moe_parallel import ParallelState

    ps = ParallelState.build(ep=dist.get_world_size())
    results = {mode: _dispatch_mode(job, ps, mode) for mode in job["modes"]}
    return results if dist.get_rank() == 0 else {}


# ---- part 2: the layer against DeepSpeed ------------------------------------------------------


def layer_job(job: dict) -> dict:
    """Rank side of part 2: forward+backward step time of every variant."""
    from moe_parallel import MoEConfig, MoELayer, ParallelState

    world, rank = dist.get_world_size(), dist.get_rank()
    H, F, E, k, T = job["hidden"], job["ffn"], job["experts"], job["top_k"], job["tokens"]
    dtype = getattr(torch, job["dtype"])
    ps = ParallelState.build(ep=world)
    base = dict(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=k, activation="gelu",
                params_dtype=dtype, min_capacity=MIN_CAPACITY)
    if job["expert_impl"]:
        base["expert_impl"] = job["expert_impl"]
    ours = {
        "ours_capacity_padded": dict(capacity_factor=CAPACITY_FACTOR, pad_to_capacity=True),
        "ours_capacity": dict(capacity_factor=CAPACITY_FACTOR),
        "ours_dropless": dict(),
    }
    layers = {}
    ds_error = None
    if job["deepspeed"]:
        try:
            torch.manual_seed(0)
            layers["deepspeed"] = deepspeed_layer(job, world, CAPACITY_FACTOR, MIN_CAPACITY)
        except Exception as exc:  # noqa: BLE001  (report ours only)
            ds_error = f"rank {rank}: {type(exc).__name__}: {exc}"
    if job.get("compile"):  # the static exchange, eager and under torch.compile(fullgraph)
        static = dict(capacity_factor=CAPACITY_FACTOR, pad_to_capacity=True,
                      static_exchange=True, verdict_scope="none", check_finite=False)
        ours.update(ours_static=static, ours_static_compiled=static)
    for name, extra in ours.items():
        torch.manual_seed(0)
        layers[name] = MoELayer(MoEConfig(**base, **extra), parallel_state=ps).train()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1000 + rank), dtype=dtype,
                    requires_grad=True)
    runs = dict(layers)
    compile_seconds = None
    if job.get("compile"):
        layer = layers["ours_static_compiled"]
        layer(x)  # the first forward compares the ranks' configs, eagerly
        runs["ours_static_compiled"] = torch.compile(layer, backend=job["compile"],
                                                     fullgraph=True)
        t0 = time.perf_counter()
        runs["ours_static_compiled"](x).sum().backward()  # compiles forward and backward
        compile_seconds = time.perf_counter() - t0

    def make_step(name, layer):
        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y = layer(x)
            (y[0] if isinstance(y, tuple) else y).sum().backward()
        return step

    steps = {name: make_step(name, runs[name]) for name in layers}
    times = _time_interleaved(steps, job["iters"], job["repeats"], warmup=1)
    profiles = ({name: profile_calls(step, job["profile_iters"], job["profile_top"])
                 for name, step in steps.items()} if job["profile_iters"] > 0 else {})
    rows = {}
    for name, layer in layers.items():
        if name == "deepspeed":  # [E, C, H] dispatched: this rank's experts see E·C rows
            C = max(math.ceil(T / E * CAPACITY_FACTOR * k), MIN_CAPACITY)
            rows[name] = {"rows_computed": int(E * C), "drop_rate": None}
        else:
            s = layer.last_stats
            rows[name] = {"rows_computed": s.padded_rows if s.padded_rows is not None
                          else s.expert_rows, "drop_rate": s.drop_rate}
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return {"times": times, "rows_per_rank": {n: [g[n] for g in gathered] for n in rows},
            "profiles_rank0": profiles, "deepspeed_error": ds_error,
            "compile_seconds_rank0": compile_seconds} if rank == 0 else {}


# ---- driver -----------------------------------------------------------------------------------


def _launch(kind: str, world: int, job: dict, timeout_s: float) -> list:
    """Every rank's result of ``<kind>_job(job)`` on ``world`` fresh gloo ranks."""
    return run_gloo_job(f"benchmarks.dispatch_bench:{kind}_job", world, dict(job, kind=kind),
                        timeout_s)


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m benchmarks dispatch --help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("dispatch", "layer"),
                   default=["dispatch", "layer"])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--modes", nargs="+", choices=DISPATCH_MODES, default=list(DISPATCH_MODES))
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=5, help="calls per timed round (dispatch)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (dispatch)")
    p.add_argument("--profile-iters", type=int, default=3,
                   help="profiled calls of ours forward+backward per world size (0: none)")
    p.add_argument("--profile-top", type=int, default=12)
    p.add_argument("--layer-world", type=int, default=4)
    p.add_argument("--layer-tokens", type=int, default=2048)
    p.add_argument("--layer-hidden", type=int, default=512)
    p.add_argument("--layer-ffn", type=int, default=1024)
    p.add_argument("--layer-iters", type=int, default=1)
    p.add_argument("--layer-repeats", type=int, default=3)
    p.add_argument("--layer-profile-iters", type=int, default=0,
                   help="profiled steps per layer variant (0: none)")
    p.add_argument("--expert-impl", choices=EXPERT_IMPLS, default=None,
                   help="ours expert_impl (default: MoEConfig's)")
    p.add_argument("--layer-compile", nargs="?", const="inductor", default=None,
                   choices=("inductor", "aot_eager"), metavar="BACKEND",
                   help="part 2 adds ours with the static exchange (MoEConfig.static_exchange,"
                        " verdict_scope='none', check_finite=False), eager and under "
                        "torch.compile(fullgraph=True) with BACKEND (default inductor)")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--out", type=Path, default=None)
    return p


def run_dispatch(args: argparse.Namespace, common: dict) -> dict:
    """Part 1 on every world size: its tables, and ``{"config", "target_ratio", "rows"}``."""
    job = dict(common, kind="dispatch", tokens=args.tokens, hidden=args.hidden,
               modes=args.modes, iters=args.iters, repeats=args.repeats,
               profile_iters=args.profile_iters, profile_top=args.profile_top)
    rows = []
    for world in args.worlds:
        _log(f"dispatch: {world} ranks ...")
        with Stopwatch() as sw:
            rank0 = _launch("dispatch", world, job, args.timeout)[0]
        rows += [rank0[m] for m in args.modes]
        _log(f"dispatch: {world} ranks done in {sw.seconds:.0f} s")
    cfg = (f"T={args.tokens}/rank H={args.hidden} E={args.experts} k={args.top_k} "
           f"{args.dtype}, gloo, 1 thread/rank on {os.cpu_count()} cores")
    print_dispatch(rows, cfg)
    print_profiles(rows)
    return {"config": job, "target_ratio": TARGET_RATIO, "rows": rows}


def run_layer(args: argparse.Namespace, common: dict) -> dict:
    """Part 2 (DeepSpeed when it is there, else ours only): its table, and rank 0's result."""
    ds = {"available": False, "error": "--no-deepspeed"} if args.no_deepspeed else None
    if ds is None:
        _log("layer: preparing DeepSpeed (first use JIT-builds its CPU comm op) ...")
        ds = prepare_deepspeed()
    note = None
    if not ds["available"]:
        note = f"DeepSpeed not available ({ds['error']}): ours only"
        _log(note)
    job = dict(common, kind="layer", tokens=args.layer_tokens, hidden=args.layer_hidden,
               ffn=args.layer_ffn, iters=args.layer_iters, repeats=args.layer_repeats,
               expert_impl=args.expert_impl, deepspeed=ds["available"],
               profile_iters=args.layer_profile_iters, profile_top=args.profile_top,
               compile=args.layer_compile)
    _log(f"layer: {args.layer_world} ranks ...")
    try:
        res = _launch("layer", args.layer_world, job, args.timeout)[0]
    except RuntimeError as exc:
        if not job["deepspeed"]:
            raise
        # a rank died or hung inside DeepSpeed: measure ours alone rather than nothing
        res = {"deepspeed_error": str(exc).splitlines()[-1]}
        _log(f"layer: the run with DeepSpeed failed ({exc}); again without it ...")
        job = dict(job, deepspeed=False)
        res = dict(_launch("layer", args.layer_world, job, args.timeout)[0],
                   deepspeed_error=res["deepspeed_error"])
    if res["deepspeed_error"]:
        note = f"DeepSpeed failed in the ranks ({res['deepspeed_error']}): ours only"
        _log(note)
    res.update(config=job, world=args.layer_world, deepspeed=ds, deepspeed_note=note)
    cfg = (f"{args.layer_world} ranks (ep={args.layer_world}), T={args.layer_tokens}/rank "
           f"H={args.layer_hidden} F={args.layer_ffn} E={args.experts} k={args.top_k} "
           f"gelu {args.dtype}, capacity factor {CAPACITY_FACTOR}"
           + (f", DeepSpeed {ds['version']}" if ds["available"] else ""))
    print_layer(res, cfg)
    return res


def main(argv: list[str] | None = None) -> dict:
    """Run the parts asked for, print their tables and write the JSON
    ``{"date", "command", "machine", "results": {"dispatch": [...], "layer": {...}}}``."""
    args = build_parser().parse_args(argv)
    results: dict = {}
    common = dict(experts=args.experts, top_k=args.top_k, dtype=args.dtype)
    if "dispatch" in args.parts:
        results["dispatch"] = run_dispatch(args, common)
    if "layer" in args.parts:
        results["layer"] = run_layer(args, common)
    return save_result("dispatch", argv, {"results": results}, args.out, "dispatch")[0]


if __name__ == "__main__":
    main()
