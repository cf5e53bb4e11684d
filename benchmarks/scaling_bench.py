"""Expert-parallel scaling: measured on this machine (gloo, CPU) and a cost model for GPU clusters.

Part A, measured. One ``MoELayer`` (dropless block-sparse, the default), forward + backward of
``y.sum()`` with the input requiring a gradient (so all four all-to-alls run), on N = 1, 2, 4, 8
processes with EP = N (``num_experts / N`` experts per rank), gloo over loopback, one torch
thread per process. No gradient all-reduce is timed (with EP = world the expert weights need
none; the router's DP all-reduce is left out). Per step every rank waits at a barrier, times its
own forward + backward, and the step time is the maximum over ranks; the reported figure is the
median over the timed steps after the warm-up steps.
  * weak scaling: ``T`` tokens per process; efficiency ``t_1 / t_N``;
  * strong scaling: ``T_global`` tokens split over the N processes; efficiency
    ``t_1 / (N · t_N)``;
  * tokens/s = global tokens / step time;
  * bound = min(1, C/N) on C cores: the best efficiency a CPU-bound run can reach there.
(``t_1`` is the smallest process count run when 1 is not among them; strong efficiency then
``N_min · t_min / (N · t_N)``.) On a machine with C cores, runs with N > C processes are
oversubscribed: their numbers show the overheads of expert parallelism on CPU (all-to-all over
gloo, process contention), not the speedup a GPU cluster would see.

Part B, cost model (``benchmarks.cost_model.layer``: its docstring gives the formulas), per GPU
and per MoE layer, forward + backward, over EP sizes (``--ep-sizes``) for a DeepSeek-V3-like
layer by default (``--cm-*``). The bandwidth and throughput defaults are assumptions typical of
H100 clusters, not measurements; pass measured values with the CLI options.

Part C, fitted to a cluster (``--fit RESULT.json``, a ``python -m benchmarks cluster`` result):
its all-to-all fit (``benchmarks.cost_model.fit_alltoall``: ``t = call + latency·(ep - 1) +
V_intra/B_intra + V_inter/B_inter``) replaces the defaults: ``gpus_per_node`` = its ranks per
node, NVLink = its intra-node bandwidth, IB = its inter-node bandwidth (kept ASSUMED when it
measured one node only), ``latency_us`` = its per-call and ``message_latency_us`` = its
per-message latency (one all-to-all then costs ``latency + message_latency·(ep - 1) +
max(...)``). An option given on the command line still wins; the table says which values are
fitted, given or assumed.

    python -m benchmarks.scaling_bench              # tables, JSON + PNG in benchmarks/results/
    python -m benchmarks.scaling_bench --procs 1 2 --steps 3 --out /tmp/s.json
    python -m benchmarks.scaling_bench --skip-measure --gemm-tflops 498   # cost model only
    python -m benchmarks.scaling_bench --skip-measure --fit benchmarks/results/cluster_X.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date
from pathlib import Path

from benchmarks.cost_model import (
    ACTIVATION_MATRICES,
    DEFAULT_ASSUMPTIONS,
    DEFAULT_MODEL,
    EP_SIZES,
    cost_model_rows,
    fitted_assumptions,
    load_fit,
)
from benchmarks.harness import Stopwatch, run_gloo_job, summarize_rounds
from benchmarks.plotting import pyplot, save_figure
from benchmarks.record import print_head

EXPERT_IMPL = "grouped"  # the measured layers' expert computation (MoEConfig's default)


# ---- measured scaling ---------------------------------------------------------------------
def split_tokens(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` ranks, the remainder one each to the first ranks."""
    return [total // parts + (r < total % parts) for r in range(parts)]


def core_bound(procs: int, cores: int, base_procs: int = 1) -> float:
    """The best efficiency ``procs`` CPU-bound processes can reach on ``cores`` cores, against
    ``base_procs``: ``min(procs, cores) / procs · base_procs / min(base_procs, cores)``
    (weak and strong alike: the work per step is spread over at most ``cores`` cores)."""
    return min(procs, cores) / procs * base_procs / min(base_procs, cores)


def scaling_job(spec: dict) -> dict:
    """One rank (:func:`benchmarks.harness.run_gloo_job`): build the EP layer, time every case
    (a step: gradients reset to None, then ``layer(x).sum().backward()``), per case the
    slowest rank's seconds of every timed step."""
    import torch
    import torch.distributed as dist

    from moe_parallel import MoEConfig, MoELayer, ParallelState

    rank, world = dist.get_rank(), dist.get_world_size()
    ps = ParallelState.build(ep=world)
    cfg = MoEConfig(hidden_size=spec["hidden"], ffn_hidden_size=spec["ffn"],
                    num_experts=spec["experts"], top_k=spec["top_k"],
                    expert_impl=spec["expert_impl"])
    torch.manual_seed(0)
    layer = MoELayer(cfg, parallel_state=ps)
    out = {}
    for mode, tokens in spec["cases"].items():
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(tokens[rank], spec["hidden"], generator=g, requires_grad=True)

        def step(x=x):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).sum().backward()

        t = summarize_rounds({mode: step}, spec["steps"], warmup=spec["warmup"],
                             across_ranks=True)[mode]
        out[mode] = t["rounds"]
        if rank == 0:
            print(f"  N={world} {mode}: median {t['seconds'] * 1e3:.1f} ms", file=sys.stderr,
                  flush=True)
    return out


def measure(procs: list[int], tokens_per_proc: int, strong_tokens: int, hidden: int, ffn: int,
            experts: int, top_k: int, warmup: int, steps: int, timeout_s: float) -> dict:
    """Weak and strong scaling rows over ``procs`` (see the module docstring)."""
    for n in procs:
        if experts % n:
            raise ValueError(f"experts {experts} is not divisible by the process count {n}")
        if strong_tokens < n:
            raise ValueError(f"strong_tokens {strong_tokens} is below the process count {n}")
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    rows: list[dict] = []
    for n in sorted(procs):
        print(f"measuring N={n} ...", file=sys.stderr, flush=True)
        cases = {"weak": [tokens_per_proc] * n, "strong": split_tokens(strong_tokens, n)}
        spec = dict(hidden=hidden, ffn=ffn, experts=experts, top_k=top_k, warmup=warmup,
                    steps=steps, cases=cases, expert_impl=EXPERT_IMPL)
        with Stopwatch() as sw:
            times = run_gloo_job("benchmarks.scaling_bench:scaling_job", n, spec, timeout_s)[0]
        print(f"  N={n} done in {sw.seconds:.1f} s", file=sys.stderr, flush=True)
        for mode, toks in cases.items():
            step = statistics.median(times[mode])
            rows.append({"mode": mode, "procs": n, "ep": n, "experts_per_rank": experts // n,
                         "tokens_per_proc": toks, "global_tokens": sum(toks),
                         "step_s": step, "step_s_all": times[mode],
                         "tokens_per_s": sum(toks) / step})
    for mode in ("weak", "strong"):
        mrows = [r for r in rows if r["mode"] == mode]
        base = mrows[0]
        for r in mrows:
            if mode == "weak":
                r["efficiency"] = base["step_s"] / r["step_s"]
            else:
                r["efficiency"] = base["procs"] * base["step_s"] / (r["procs"] * r["step_s"])
            r["core_bound"] = core_bound(r["procs"], cores, base["procs"])
    return {"config": {"hidden": hidden, "ffn": ffn, "experts": experts, "top_k": top_k,
                       "dtype": "float32", "expert_impl": EXPERT_IMPL,
                       "tokens_per_proc": tokens_per_proc, "strong_tokens": strong_tokens,
                       "warmup": warmup, "steps": steps, "threads_per_proc": 1,
                       "backend": "gloo"},
            "load_avg_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
            "note": (f"{os.cpu_count()} cores; runs with more processes than cores are "
                     "oversubscribed: the efficiencies show the overheads of expert parallelism "
                     "on CPU, not the speedup of a GPU cluster"),
            "rows": rows}


def _machine_info() -> dict:
    """``benchmarks.machine.machine_info()``, imported here: the cost model needs no torch."""
    from benchmarks.machine import machine_info

    return machine_info()


# ---- output -----------------------------------------------------------------------------------
def print_measured(measured: dict) -> None:
    c = measured["config"]
    print(f"\nMeasured: H={c['hidden']} F={c['ffn']} E={c['experts']} k={c['top_k']} float32 "
          f"{c['expert_impl']}, gloo, 1 thread per process, forward+backward, median of "
          f"{c['steps']}")
    head = (f"{'mode':<7} {'procs':>5} {'E/rank':>6} {'tok/proc':>8} {'global':>7} "
            f"{'step ms':>8} {'tokens/s':>9} {'effic.':>7} {'bound':>6}")
    print_head(head)
    for r in measured["rows"]:
        toks = r["tokens_per_proc"]
        per = str(toks[0]) if len(set(toks)) == 1 else f"~{r['global_tokens'] // r['procs']}"
        print(f"{r['mode']:<7} {r['procs']:>5} {r['experts_per_rank']:>6} {per:>8} "
              f"{r['global_tokens']:>7} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['efficiency']:7.3f} {r['core_bound']:6.3f}")
    load = measured["load_avg_1_5_15"]
    print("weak: t1/tN; strong: t1/(N*tN); bound: min(1, cores/N), the best a CPU-bound run "
          "can reach here.")
    print(f"{measured['note']}. 1-min load average "
          f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after.")


def print_cost_model(cm: dict) -> None:
    a, m = cm["assumptions"], cm["assumptions"]["model"]
    print(f"\nCost model (per GPU, one MoE layer forward+backward): T={m['tokens']} "
          f"H={m['hidden']} F={m['ffn']} E={m['experts']} k={m['top_k']} "
          f"{m['dtype_bytes']} B/elem {m['activation']}")
    source = a.get("source", {})
    tag = lambda k: source.get(k, "assumed" if k in a.get("assumed", ()) else "given")  # noqa: E731
    print(f"{a['gpus_per_node']} GPUs/node [{tag('gpus_per_node')}], NVLink "
          f"{a['nvlink_gbps']:.4g} GB/s [{tag('nvlink_gbps')}], IB {a['ib_gbps']:.4g} GB/s per "
          f"GPU [{tag('ib_gbps')}], grouped GEMM {a['gemm_tflops']:g} TFLOP/s "
          f"[{tag('gemm_tflops')}], overlap {a['overlap']:g} [{tag('overlap')}], latency "
          f"{a['latency_us']:.4g} us per all-to-all [{tag('latency_us')}] + "
          f"{a.get('message_latency_us', 0.0):.4g} us per message "
          f"[{tag('message_latency_us')}]")
    if a.get("assumed"):
        print(f"ASSUMED (defaults, not measurements): {', '.join(a['assumed'])}")
    if a.get("fitted"):
        print(f"FITTED from {a['fit_source']}: {', '.join(a['fitted'])}")
    head = (f"{'EP':>4} {'nodes':>5} {'E/GPU':>5} {'NVLink':>7} {'IB':>7} {'a2a ms':>7} "
            f"{'comm ms':>8} {'GEMM ms':>8} {'step ms':>8} {'comm %':>7}")
    print_head(head)
    for r in cm["rows"]:
        print(f"{r['ep']:>4} {r['nodes']:>5} {r['experts_per_gpu']:>5} "
              f"{r['nvlink_fraction']:7.1%} {r['ib_fraction']:7.1%} {r['a2a_ms']:7.2f} "
              f"{r['comm_ms']:8.2f} {r['gemm_ms']:8.2f} {r['step_ms']:8.2f} "
              f"{r['comm_share']:7.1%}")
    print(f"all-to-all volume per direction {cm['rows'][0]['a2a_bytes'] / 1e6:.1f} MB, "
          f"4 per layer; NVLink/IB = share of that volume on each link.")


def plot_cost_model(cm: dict, path: Path) -> bool:
    """Predicted step time (GEMM, exposed communication) and communication share vs EP, as a
    PNG; False (with a message) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    rows, a, m = cm["rows"], cm["assumptions"], cm["assumptions"]["model"]
    eps = [r["ep"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(eps, [r["step_ms"] for r in rows], "o-", label="step (predicted)")
    ax1.plot(eps, [r["gemm_ms"] for r in rows], "s--", label="expert GEMMs")
    ax1.plot(eps, [r["step_ms"] - r["gemm_ms"] for r in rows], "^--",
             label="exposed all-to-all")
    ax1.set_ylabel("ms per layer (forward+backward)")
    ax2.plot(eps, [100 * r["comm_share"] for r in rows], "o-", color="C3")
    ax2.set_ylabel("communication share of step (%)")
    ax2.set_ylim(0, 100)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.set_xlabel("EP size")
        ax.grid(alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax1.legend()
    src = a.get("source", {})
    fig.suptitle(f"MoE layer cost model, T={m['tokens']} H={m['hidden']} F={m['ffn']} "
                 f"E={m['experts']} k={m['top_k']}; NVLink {a['nvlink_gbps']:.4g} GB/s "
                 f"({src.get('nvlink_gbps', 'assumed')}), IB {a['ib_gbps']:.4g} GB/s "
                 f"({src.get('ib_gbps', 'assumed')}), GEMM {a['gemm_tflops']:g} TFLOP/s, "
                 f"overlap {a['overlap']:g}", fontsize=9)
    save_figure(fig, path, dpi=120)
    return True


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m benchmarks scaling --help``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling_bench",
                                description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("measured scaling (this machine, gloo)")
    g.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    g.add_argument("--tokens-per-proc", type=int, default=1024, help="weak scaling")
    g.add_argument("--strong-tokens", type=int, default=2048,
                   help="global tokens of strong scaling")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--ffn", type=int, default=512)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--steps", type=int, default=5)
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per process count")
    g.add_argument("--skip-measure", action="store_true")
    c = p.add_argument_group("cost model (GPU cluster); defaults are ASSUMED H100 values")
    c.add_argument("--cm-tokens", type=int, default=DEFAULT_MODEL["tokens"],
                   help="tokens per GPU")
    c.add_argument("--cm-hidden", type=int, default=DEFAULT_MODEL["hidden"])
    c.add_argument("--cm-ffn", type=int, default=DEFAULT_MODEL["ffn"])
    c.add_argument("--cm-experts", type=int, default=DEFAULT_MODEL["experts"])
    c.add_argument("--cm-top-k", type=int, default=DEFAULT_MODEL["top_k"])
    c.add_argument("--cm-dtype-bytes", type=int, default=DEFAULT_MODEL["dtype_bytes"])
    c.add_argument("--cm-activation", default=DEFAULT_MODEL["activation"],
                   choices=tuple(ACTIVATION_MATRICES))
    c.add_argument("--ep-sizes", type=int, nargs="+", default=list(EP_SIZES))
    c.add_argument("--gpus-per-node", type=int, default=None)
    c.add_argument("--nvlink-gbps", type=float, default=None,
                   help="NVLink GB/s per GPU per direction")
    c.add_argument("--ib-gbps", type=float, default=None,
                   help="InfiniBand GB/s per GPU per direction")
    c.add_argument("--gemm-tflops", type=float, default=None,
                   help="grouped-GEMM TFLOP/s (e.g. a value measured by grouped_gemm_bench)")
    c.add_argument("--overlap", type=float, default=None,
                   help="fraction of min(comm, GEMM) hidden by overlap, 0..1")
    c.add_argument("--latency-us", type=float, default=None,
                   help="fixed latency per all-to-all")
    c.add_argument("--message-latency-us", type=float, default=None,
                   help="latency per peer message of an all-to-all (x (ep - 1))")
    c.add_argument("--fit", type=Path, default=None, metavar="RESULT.json",
                   help="a `python -m benchmarks cluster` result: use its fitted ranks per "
                        "node, bandwidths and latencies instead of the defaults")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: next to the JSON)")
    return p


def cluster_assumptions(args: argparse.Namespace, fitted: dict) -> tuple[dict, dict]:
    """``(values, source)`` of every cost-model parameter: the option when given, else the
    fit's value, else the default; ``source[k]`` says which ("given", "fitted", "assumed",
    or "not modelled" for a message latency nobody gave)."""
    defaults = {**DEFAULT_ASSUMPTIONS, "message_latency_us": 0.0}
    cluster, source = {}, {}
    for k, default in defaults.items():
        given = getattr(args, k)
        if given is not None:
            cluster[k], source[k] = given, "given"
        elif k in fitted:
            cluster[k], source[k] = fitted[k], "fitted"
        elif k == "message_latency_us":  # not part of the default model
            cluster[k], source[k] = default, "not modelled"
        else:
            cluster[k], source[k] = default, "assumed"
    return cluster, source


def cost_model_record(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    """``{"assumptions", "rows"}`` of the cost model for ``args`` (errors through ``p``)."""
    model = {"tokens": args.cm_tokens, "hidden": args.cm_hidden, "ffn": args.cm_ffn,
             "experts": args.cm_experts, "top_k": args.cm_top_k,
             "dtype_bytes": args.cm_dtype_bytes, "activation": args.cm_activation}
    try:
        fitted = fitted_assumptions(load_fit(args.fit)) if args.fit is not None else {}
    except (OSError, ValueError) as exc:
        p.error(f"--fit {args.fit}: {exc}")
    cluster, source = cluster_assumptions(args, fitted)
    try:
        rows = cost_model_rows(args.ep_sizes, **model, **cluster)
    except ValueError as exc:
        p.error(str(exc))
    return {
        "assumptions": {
            **cluster, "model": model,
            "assumed": sorted(k for k, v in source.items() if v == "assumed"),
            "fitted": sorted(k for k, v in source.items() if v == "fitted"),
            "fit_source": str(args.fit) if args.fit is not None else None,
            "source": source,
            "note": ("bandwidths and GEMM throughput left at their defaults are assumptions "
                     "typical of H100 clusters, not measurements; balanced routing; EP ranks "
                     "packed onto full nodes; formulas in benchmarks/cost_model/layer.py"),
        },
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    """Measure (unless ``--skip-measure``), evaluate the cost model, print both and write the
    JSON ``{"date", "command", "machine", "measured", "cost_model"}`` and the PNG."""
    p = build_parser()
    args = p.parse_args(argv)
    measured = None
    if not args.skip_measure:
        measured = measure(args.procs, args.tokens_per_proc, args.strong_tokens, args.hidden,
                           args.ffn, args.experts, args.top_k, args.warmup, args.steps,
                           args.timeout)
    cost_model = cost_model_record(args, p)
    if measured is not None:
        print_measured(measured)
    print_cost_model(cost_model)

    cmd = ["python -m benchmarks.scaling_bench", *(sys.argv[1:] if argv is None else argv)]
    out = {"date": str(date.today()), "command": " ".join(cmd), "machine": _machine_info(),
           "measured": measured, "cost_model": cost_model}
    path = args.out or Path(__file__).parent / "results" / f"scaling_{date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = args.plot or path.with_suffix(".png")
    if plot_cost_model(cost_model, plot):
        out["plot"] = str(plot)
        print(f"wrote {plot}")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
