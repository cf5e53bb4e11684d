"""One MoE layer, forward+backward, on one process, against its peers on the same config.

Contenders, timed side by side in one process (round-robin, median per contender):
  * ``dense``: a dense SwiGLU FFN of one expert's size on the T·k rows: the same FLOPs;
  * ``grouped`` / ``block_sparse``: ``MoELayer`` (dropless) with either expert computation
    (``grouped`` is the default; "grouped speedup" = t(contender) / t(grouped));
  * ``grouped_<backend>`` (CUDA; not run unless named): ``grouped`` with
    ``grouped_gemm_backend`` = streams / cublas / torch / cutlass;
  * ``reference``: ``moe_parallel.reference.ReferenceMoE`` (loop over experts);
  * ``hf_loop``: the Hugging Face Mixtral sparse-MoE block pattern (softmax router, top-k,
    renormalise, loop over experts with ``torch.where`` + ``index_add_``);
  * ``megablocks`` (CUDA, bfloat16; not run unless named): MegaBlocks' dropless
    ``megablocks.layers.dmoe.dMoE`` with ``mlp_impl="grouped"``, holding the same weights
    (``benchmarks.megablocks_contender``). Needs megablocks 0.10.0,
    grouped_gemm 0.3.0 and stanford-stk 0.7.1: ``make megablocks-carry``, then
    ``bash benchmarks/megablocks_install.sh`` and ``PYTHONPATH=build/megablocks/site``;
  * ``grouped_compiled`` / ``dense_compiled`` (only with ``--compile [BACKEND]``, backend
    ``inductor`` (default) or ``aot_eager``): the ``grouped`` layer (same seed, weights and
    input) and the ``dense`` FFN, each under ``torch.compile(..., backend=BACKEND,
    fullgraph=True)``. The first step (forward+backward, which compiles both graphs) is timed
    apart as ``compile_seconds`` before the memory counts and the timing (whose warm-up and
    rounds then run the compiled code); with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` it is a
    cold compile (``compile_caches_disabled`` in the row), else the on-disk caches may shorten
    it. Each compiled row holds ``compiled_speedup`` = t(eager twin) / t(compiled),
    ``max_rel_diff`` (output) and ``max_rel_diff_grad`` (every gradient: input and parameters)
    against its eager twin after one step each: max |compiled - eager| / max |eager|, the
    worst over the tensors.
A step clears the gradients first (``grad = None``, as ``zero_grad()`` does in training), so
no contender pays for accumulating into old gradients, and back-propagates a fixed random
upstream gradient of the output's shape (a dense tensor, as the next layer hands back; a
``.sum()`` loss would hand back a stride-0 expanded one that every contender copies first).
MoE efficiency = t(dense) / t(contender); tokens/s = T / t. Memory, exact counts
(``benchmarks.memory``), after one warm-up step with the gradients reset to None:
  * ``saved MiB``: bytes autograd keeps for the backward of one forward, each distinct storage
    once, the contender's parameters excluded (reported apart as ``saved_param_mib``);
  * ``peak MiB``: the peak of live tensor bytes during one forward+backward above those live
    before it (parameters and inputs excluded; the gradients it makes included): the profiler's
    allocation and free events on CPU, ``torch.cuda.max_memory_allocated()`` on CUDA.
``--profile [contender ...]`` (default ``grouped``) adds a torch.profiler view of one step of
each: the kernels (or CPU ops) that take the most time and, on CUDA, the share of the step's
wall time the GPU was busy, the largest idle gaps between kernels and the synchronizing calls;
``--trace PREFIX`` also writes each profiled step's Chrome trace.

Presets (``--config``): ``a`` E=8 k=2 H=1024 F=2048 T=4096; ``b`` (fine-grained) E=64 k=6
H=1024 F=256 T=4096; float32. Other sizes via ``--tokens/--hidden/--ffn/--experts/--top-k``;
``--recompute`` sets ``MoEConfig.recompute`` of the ``MoELayer`` contenders, ``--force-balance``
their ``MoEConfig.force_balance`` (every expert gets T·k/E rows, ±1; the other contenders keep
their top-k routing).

    python -m benchmarks layer --config a
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.harness import device_sync, median_seconds
from benchmarks.megablocks_contender import MEGABLOCKS_INSTALL, megablocks_dmoe
from benchmarks.memory import peak_live_bytes, saved_tensor_bytes
from benchmarks.record import print_head, save_result

PRESETS = {
    "a": dict(experts=8, top_k=2, hidden=1024, ffn=2048, tokens=4096),
    "b": dict(experts=64, top_k=6, hidden=1024, ffn=256, tokens=4096),
}
CONTENDERS = ("dense", "block_sparse", "grouped", "reference", "hf_loop")
BACKEND_CONTENDERS = tuple(f"grouped_{b}" for b in ("streams", "cublas", "torch", "cutlass"))
EXTRA_CONTENDERS = ("megablocks",)  # third-party, not run unless named
ALL_CONTENDERS = CONTENDERS + BACKEND_CONTENDERS + EXTRA_CONTENDERS
COMPILED_CONTENDERS = ("dense_compiled", "grouped_compiled")  # added by --compile only
COMPILE_BACKENDS = ("inductor", "aot_eager")



class HFMixtralLoop(nn.Module):
    """The Hugging Face Mixtral sparse-MoE block pattern: per expert, gather its tokens with
    ``torch.where`` on the one-hot routing mask, run its SwiGLU FFN, scale by the routing
    weight and ``index_add_`` into the output. Weights taken from an ``MoELayer``."""

    def __init__(self, layer: nn.Module, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Parameter(layer.router.weight.detach().clone())
        w1 = layer.experts.w1.detach()
        f = w1.shape[2] // 2
        self.w_gate = nn.ParameterList(nn.Parameter(w1[e, :, :f].t().contiguous())
                                       for e in range(w1.shape[0]))
        self.w_up = nn.ParameterList(nn.Parameter(w1[e, :, f:].t().contiguous())
                                     for e in range(w1.shape[0]))
        self.w_down = nn.ParameterList(nn.Parameter(w.t().contiguous())
                                       for w in layer.experts.w2.detach())

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, self.gate.dtype)  # the router's fp32 gate
        logits = F.linear(x.to(dtype), self.gate.to(dtype))
        weights = logits.softmax(-1, dtype=torch.promote_types(dtype, torch.float32))
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.w_down)).permute(2, 1, 0)
        for e in range(len(self.w_down)):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            h = x[token]
            y = F.linear(F.silu(F.linear(h, self.w_gate[e])) * F.linear(h, self.w_up[e]),
                         self.w_down[e])
            out.index_add_(0, token, y * weights[token, slot, None])
        return out


class Contender(NamedTuple):
    """A built contender: ``step()`` (forward+backward), ``forward()`` (its output), the
    ``leaves`` a step resets the gradient of, and its ``params`` (the leaves but the input)."""
    step: Callable[[], None]
    forward: Callable[[], Tensor]
    leaves: list[Tensor]
    params: list[Tensor]


def build(case: dict, contender: str) -> Contender:
    """``contender`` on ``case``: its forward+backward step, forward, leaves and parameters.
    A contender of ``COMPILED_CONTENDERS`` compiles its eager twin (the name without
    ``_compiled``) with ``torch.compile(backend=case["compile"], fullgraph=True)``; nothing is
    compiled before its first call."""
    from moe_parallel import MoEConfig, MoELayer, ReferenceMoE

    compiled = contender in COMPILED_CONTENDERS
    if compiled and case.get("compile") not in COMPILE_BACKENDS:
        raise ValueError(f"contender {contender!r} needs case['compile'] in "
                         f"{COMPILE_BACKENDS}, got {case.get('compile')!r}")
    contender = contender.removesuffix("_compiled") if compiled else contender

    def maybe_compile(fn):
        return torch.compile(fn, backend=case["compile"], fullgraph=True) if compiled else fn

    device, dtype = case["device"], getattr(torch, case["dtype"])
    impl = ("grouped" if contender.startswith("grouped") or contender == "megablocks"
            else "block_sparse")
    backend = contender[len("grouped_"):] if contender in BACKEND_CONTENDERS else "auto"
    cfg = MoEConfig(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                    num_experts=case["experts"], top_k=case["top_k"], params_dtype=dtype,
                    expert_impl=impl, grouped_gemm_backend=backend, check_finite=False,
                    recompute=case.get("recompute", "none"),
                    force_balance=case.get("force_balance", False))
    torch.manual_seed(0)
    layer = MoELayer(cfg, device=device)
    sync = device_sync(device)
    if contender == "dense":
        rows = case["tokens"] * case["top_k"]
        x = torch.randn(rows, case["hidden"], device=device, dtype=dtype, requires_grad=True)
        w1 = layer.experts.w1[0].detach().clone().requires_grad_(True)
        w2 = layer.experts.w2[0].detach().clone().requires_grad_(True)

        leaves = [x, w1, w2]

        def dense_ffn():
            gate, up = (x @ w1).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ w2

        run = maybe_compile(dense_ffn)
    else:
        x = torch.randn(case["tokens"], case["hidden"], device=device, dtype=dtype,
                        requires_grad=True)
        module = {"reference": lambda: ReferenceMoE.from_layer(layer),
                  "hf_loop": lambda: HFMixtralLoop(layer, case["top_k"]),
                  "megablocks": lambda: megablocks_dmoe(case, layer)}.get(
                      contender, lambda: layer)()
        if contender == "megablocks":
            with torch.no_grad():  # the same function as ours, up to its bfloat16 router
                ours, theirs = layer(x).float(), module(x).float()
            print(f"megablocks vs grouped output: relative error "
                  f"{float((theirs - ours).norm() / ours.norm()):.2e}", file=sys.stderr)
            del layer, ours, theirs
        leaves = [x, *module.parameters()]
        call = maybe_compile(module)

        def run():
            y = call(x)
            return y[0] if isinstance(y, tuple) else y

    upstream: list[Tensor] = []

    def step():
        for t in leaves:  # as a training step after zero_grad(set_to_none=True)
            t.grad = None
        y = run()
        if not upstream:  # the output's gradient, as the next layer hands it back: made once
            gen = torch.Generator(device=device).manual_seed(1)
            upstream.append(torch.randn(y.shape, generator=gen, device=device, dtype=y.dtype))
        y.backward(upstream[0])
        sync()

    return Contender(step, run, leaves, leaves[1:])


def measure_memory(case: dict, contender: str) -> dict[str, float]:
    """MiB saved for backward by one forward (``saved_mib``; parameters apart:
    ``saved_param_mib``) and the peak of live tensors during one step (``peak_live_mib``), after
    one warm-up step, the gradients reset to None (module docstring)."""
    c = build(case, contender)
    c.step()
    for t in c.leaves:
        t.grad = None
    saved = saved_tensor_bytes(c.forward, c.params)
    peak = peak_live_bytes(c.step, case["device"])
    return {"saved_mib": saved["activations"] / 2**20, "saved_param_mib": saved["params"] / 2**20,
            "peak_live_mib": peak / 2**20}


def sync_sites(step) -> list[str]:
    """The host synchronizations of one CUDA ``step``, each as the innermost moe_parallel (or
    benchmark) source line that caused it (from ``torch.cuda.set_sync_debug_mode``)."""
    import traceback

    sites: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "moe_parallel" in f.filename or "benchmarks" in f.filename]
        f = frames[-1] if frames else None
        sites.append(f"{Path(f.filename).name}:{f.lineno} {f.name}: {f.line}" if f else "?")

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sites


def profile_step(case: dict, contender: str = "grouped", top: int = 15,
                 trace: str | None = None) -> str:
    """A table of the ``top`` kernels (CUDA) or ops (CPU) by total time over one step after a
    warm-up, and on CUDA the GPU-busy share of the step's wall time (kernel time ÷ wall), the
    8 largest idle gaps between kernels, the number of host synchronizations (CUDA runtime
    calls named ``*Synchronize``) and the torch calls that synchronized (:func:`sync_sites`).
    ``trace``: a path for the step's Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    step = build(case, contender).step
    step()
    cuda = case["device"] == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
    if trace:
        prof.export_chrome_trace(trace)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=top)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels)  # µs, kernels do not overlap on one stream
        starts = [e.time_range.start for e in kernels]
        ends = [e.time_range.end for e in kernels]
        wall = (max(ends) - min(starts)) if kernels else 0.0
        syncs = sum(1 for e in prof.events() if e.name.endswith("Synchronize"))
        order = sorted(kernels, key=lambda e: e.time_range.start)
        gaps = sorted(((b.time_range.start - a.time_range.end, a.name, b.name)
                       for a, b in zip(order, order[1:])), reverse=True)[:8]
        text += "largest GPU idle gaps (µs, kernel before -> kernel after):\n" + "".join(
            f"  {g:8.1f}  {a[:60]} -> {b[:60]}\n" for g, a, b in gaps)
        text += (f"\n{len(kernels)} kernels, {busy / 1e3:.2f} ms busy over {wall / 1e3:.2f} ms "
                 f"from first to last kernel: GPU busy {busy / max(wall, 1e-9):.1%}; "
                 f"{syncs} host synchronizations\n")
        sites = sync_sites(step)  # the step's own final synchronize is not a torch-op sync
        text += f"{len(sites)} synchronizing torch calls:\n" + "".join(
            f"  {s}\n" for s in sites)
    return text


def time_contenders(case: dict, contenders: list[str], repeats: int,
                    built: dict[str, Contender] | None = None) -> dict[str, float]:
    """Median seconds per step, all contenders side by side (one warm-up, then rounds);
    ``built``: contenders already built (and possibly run), the others are built here."""
    built = built or {}
    steps = {c: (built[c] if c in built else build(case, c)).step for c in contenders}
    return median_seconds(steps, repeats, progress=True)


def _rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (``b`` the reference)."""
    return float((a.detach() - b.detach()).abs().max()
                 / b.detach().abs().max().clamp_min(torch.finfo(b.dtype).tiny))


def compiled_vs_eager(case: dict, contender: str, compiled: Contender) -> dict[str, float]:
    """``{"max_rel_diff", "max_rel_diff_grad"}`` of the already-compiled ``contender`` against
    a fresh build of its eager twin (same seed, weights and input): one step each, then the
    output (a forward each) and every leaf's gradient, the worst over the gradients."""
    eager = build(case, contender.removesuffix("_compiled"))
    eager.step()
    compiled.step()
    grads = [_rel_diff(c.grad, e.grad) for c, e in zip(compiled.leaves, eager.leaves, strict=True)]
    return {"max_rel_diff": _rel_diff(compiled.forward(), eager.forward()),
            "max_rel_diff_grad": max(grads)}


def compile_contenders(case: dict, contenders: list[str]) -> tuple[dict[str, Contender],
                                                                    dict[str, float]]:
    """Build the compiled ``contenders`` and run each one step after ``torch._dynamo.reset()``:
    the contenders and the wall seconds of that first (compiling) step of each."""
    from benchmarks.harness import Stopwatch

    torch._dynamo.reset()
    built, seconds = {}, {}
    for c in contenders:
        built[c] = build(case, c)
        with Stopwatch() as sw:
            built[c].step()
        seconds[c] = sw.seconds
        print(f"compiled {c} ({case['compile']}): first step {sw.seconds:.1f} s",
              file=sys.stderr, flush=True)
    return built, seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m benchmarks layer --help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="a")
    for name in ("tokens", "hidden", "ffn", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--recompute", default="none", choices=("none", "activation", "experts"),
                   help="MoEConfig.recompute of the MoELayer contenders")
    p.add_argument("--force-balance", action="store_true",
                   help="MoEConfig.force_balance of the MoELayer contenders: round-robin "
                        "expert assignment, T*k/E rows per expert")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--contenders", nargs="*", default=list(CONTENDERS),
                   choices=ALL_CONTENDERS)
    p.add_argument("--compile", nargs="?", const="inductor", default=None,
                   choices=COMPILE_BACKENDS, metavar="BACKEND",
                   help="add the grouped_compiled and dense_compiled contenders: grouped and "
                        "dense under torch.compile(backend=BACKEND, fullgraph=True); BACKEND "
                        f"one of {', '.join(COMPILE_BACKENDS)} (default inductor)")
    p.add_argument("--profile", nargs="*", choices=ALL_CONTENDERS + COMPILED_CONTENDERS,
                   help="print a profile of one step of each named contender (none named: "
                        "grouped)")
    p.add_argument("--trace", help="with --profile: write each profiled step's Chrome trace "
                                   "to TRACE_<contender>.json")
    p.add_argument("--no-memory", action="store_true", help="skip the memory counts")
    p.add_argument("--out", type=Path, default=None)
    return p


def print_table(args: argparse.Namespace, case: dict, rows: list[dict]) -> None:
    """The contenders' table: time, efficiency, tokens/s, speedup vs grouped, memory."""
    ours = next((r["seconds"] for r in rows if r["contender"] == "grouped"), None)
    compiled = args.compile is not None
    print(f"\nconfig {args.config}: T={case['tokens']} H={case['hidden']} F={case['ffn']} "
          f"E={case['experts']} k={case['top_k']} {args.dtype} on {args.device}, "
          f"{args.threads} threads, recompute={args.recompute}, "
          f"force_balance={args.force_balance}, forward+backward"
          + (f", compile backend {args.compile}" if compiled else ""))
    head = (f"{'contender':<18}{'ms':>10}{'efficiency':>12}{'tokens/s':>11}"
            f"{'grouped speedup':>17}{'saved MiB':>11}{'peak MiB':>10}"
            + (f"{'compiled speedup':>18}{'compile s':>11}{'max rel diff':>14}"
               if compiled else ""))
    print_head(head)
    for r in rows:
        speed = f"{r['seconds'] / ours:.3f}x" if ours else "-"
        mem = {k: f"{r[k]:.1f}" if r[k] is not None else "-"
               for k in ("saved_mib", "peak_live_mib")}
        extra = ""
        if compiled and "compiled_speedup" in r:
            extra = (f"{r['compiled_speedup']:>17.3f}x{r['compile_seconds']:>11.1f}"
                     f"{max(r['max_rel_diff'], r['max_rel_diff_grad']):>14.1e}")
        elif compiled:
            extra = f"{'-':>18}{'-':>11}{'-':>14}"
        print(f"{r['contender']:<18}{r['seconds'] * 1e3:10.1f}{r['moe_efficiency']:12.3f}"
              f"{r['tokens_per_s']:11,.0f}{speed:>17}{mem['saved_mib']:>11}"
              f"{mem['peak_live_mib']:>10}{extra}")
    print("saved MiB: tensors saved for backward by one forward, parameters excluded; "
          "peak MiB: live tensors during forward+backward above those live before it")
    if compiled:
        print("compiled speedup: t(eager twin) / t(compiled); compile s: the first step "
              "(compiles forward and backward); max rel diff: output and gradients vs eager, "
              "max |compiled - eager| / max |eager|")


def main(argv: list[str] | None = None) -> dict:
    """Count memory (unless ``--no-memory``), time the contenders side by side, print the
    table (and profiles) and write the JSON ``{"date", "command", "machine", "case",
    "results"}``."""
    p = build_parser()
    args = p.parse_args(argv)
    case = dict(PRESETS[args.config])
    for name in ("tokens", "hidden", "ffn", "experts", "top_k"):
        if getattr(args, name) is not None:
            case[name] = getattr(args, name)
    case.update(dtype=args.dtype, device=args.device, threads=args.threads,
                recompute=args.recompute, force_balance=args.force_balance)
    contenders = list(dict.fromkeys(["dense", *args.contenders]))
    compiled = []
    if args.compile is not None:
        case["compile"] = args.compile
        if "grouped" not in contenders:
            contenders.append("grouped")
        compiled = list(COMPILED_CONTENDERS)
        for c in compiled:  # each right after its eager twin
            contenders.insert(contenders.index(c.removesuffix("_compiled")) + 1, c)
    elif set(args.profile or []) & set(COMPILED_CONTENDERS):
        p.error("--profile of a compiled contender needs --compile [BACKEND]")
    if "megablocks" in contenders + (args.profile or []):  # fail before any timing
        missing = [m for m in ("megablocks", "grouped_gemm", "stk")
                   if importlib.util.find_spec(m) is None]
        if missing:
            p.error(f"{MEGABLOCKS_INSTALL} (missing: {', '.join(missing)})")
        if args.dtype != "bfloat16" or args.device != "cuda":
            p.error("the 'megablocks' contender runs on --device cuda --dtype bfloat16 only")

    torch.set_num_threads(args.threads)
    built, compile_seconds = compile_contenders(case, compiled) if compiled else ({}, {})
    memory = {}
    if not args.no_memory:
        for c in contenders:
            memory[c] = measure_memory(case, c)
            print(f"memory {c}: " + ", ".join(f"{k} {v:.1f}" for k, v in memory[c].items()),
                  file=sys.stderr, flush=True)
    seconds = time_contenders(case, contenders, args.repeats, built)
    none = {"saved_mib": None, "saved_param_mib": None, "peak_live_mib": None}
    rows = [{"contender": c, "seconds": seconds[c], "moe_efficiency": seconds["dense"] / seconds[c],
             "tokens_per_s": case["tokens"] / seconds[c], **memory.get(c, none)}
            for c in contenders]
    if compiled:
        from torch._inductor import config as inductor_config

        for r in rows:
            c = r["contender"]
            if c in compiled:
                r.update(compile_backend=args.compile, compile_seconds=compile_seconds[c],
                         compile_caches_disabled=bool(inductor_config.force_disable_caches),
                         compiled_speedup=seconds[c.removesuffix("_compiled")] / seconds[c],
                         **compiled_vs_eager(case, c, built[c]))
    print_table(args, case, rows)
    if args.profile is not None:
        for c in args.profile or ["grouped"]:
            trace = f"{args.trace}_{c}.json" if args.trace else None
            print(f"\nprofile of one {c} step:\n{profile_step(case, c, trace=trace)}")
    return save_result("layer", argv, {"case": case, "results": rows}, args.out,
                       f"layer_{args.config}_{args.device}")[0]


if __name__ == "__main__":
    main()
