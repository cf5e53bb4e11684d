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
    (:func:`megablocks_arguments`, :func:`megablocks_state`). Needs megablocks 0.10.0,
    grouped_gemm 0.3.0 and stanford-stk 0.7.1: ``make megablocks-carry``, then
    ``bash benchmarks/megablocks_install.sh`` and ``PYTHONPATH=build/megablocks/site``.
A step clears the gradients first (``grad = None``, as ``zero_grad()`` does in training), so
no contender pays for accumulating into old gradients, and back-propagates a fixed random
upstream gradient of the output's shape (a dense tensor, as the next layer hands back; a
``.sum()`` loss would hand back a stride-0 expanded one that every contender copies first).
MoE efficiency = t(dense) / t(contender); tokens/s = T / t. Peak memory is the growth of peak
RSS (CPU) or max allocated memory (CUDA) during the first forward+backward of a fresh process.
``--profile [contender ...]`` (default ``grouped``) adds a torch.profiler view of one step of
each: the kernels (or CPU ops) that take the most time and, on CUDA, the share of the step's
wall time the GPU was busy, the largest idle gaps between kernels and the synchronizing calls;
``--trace PREFIX`` also writes each profiled step's Chrome trace.

Presets (``--config``): ``a`` E=8 k=2 H=1024 F=2048 T=4096; ``b`` (fine-grained) E=64 k=6
H=1024 F=256 T=4096; float32. Other sizes via ``--tokens/--hidden/--ffn/--experts/--top-k``.

    python -m benchmarks layer --config a
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import multiprocessing
import resource
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.record import save_result
from benchmarks.timing import median_seconds

PRESETS = {
    "a": dict(experts=8, top_k=2, hidden=1024, ffn=2048, tokens=4096),
    "b": dict(experts=64, top_k=6, hidden=1024, ffn=256, tokens=4096),
}
CONTENDERS = ("dense", "block_sparse", "grouped", "reference", "hf_loop")
BACKEND_CONTENDERS = tuple(f"grouped_{b}" for b in ("streams", "cublas", "torch", "cutlass"))
EXTRA_CONTENDERS = ("megablocks",)  # third-party, not run unless named
ALL_CONTENDERS = CONTENDERS + BACKEND_CONTENDERS + EXTRA_CONTENDERS
MEGABLOCKS_INSTALL = (
    "the 'megablocks' contender needs megablocks==0.10.0, grouped_gemm==0.3.0 and "
    "stanford-stk==0.7.1 (not on this interpreter's path): run `make megablocks-carry` on a "
    "machine with PyPI (sdists into build/megablocks), then `bash benchmarks/megablocks_install.sh`"
    " and run with PYTHONPATH=build/megablocks/site")


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


def megablocks_arguments(case: dict) -> dict:
    """Keyword arguments of ``megablocks.layers.arguments.Arguments`` (0.10.0) for the layer
    ``MoELayer`` runs on ``case``: dropless top-k MoE with SwiGLU experts, no biases.

    * ``hidden_size``/``ffn_hidden_size``/``moe_num_experts``/``moe_top_k`` = H/F/E/k: its
      ``ffn_hidden_size`` is the intermediate size of one expert, as ours (``SparseGLU`` holds
      ``w1``, ``v1``, ``w2`` as ``[E·F, H]``, viewed ``[E, F, H]`` per expert);
    * ``mlp_type="glu"`` + ``activation_fn=F.silu``: its ``GroupedGLU`` computes
      ``(act(x w1ᵀ) * (x v1ᵀ)) w2``, SwiGLU with ``w1`` the gate and ``v1`` the up projection
      (its default activation is tanh-GELU, hence the explicit ``F.silu``);
    * ``mlp_impl="grouped"``: grouped_gemm's ``gmm`` (bfloat16 only; its default build runs one
      cuBLAS GEMM per expert, ``GROUPED_GEMM_CUTLASS=1`` a CUTLASS grouped kernel); ``"sparse"``
      (stk block-sparse Triton kernels) refuses triton >= 3.2. ``memory_optimized_mlp=False``:
      the plain autograd path (its GLU variant recomputes the activation in backward);
    * router: ``softmax`` over experts then top-k, renormalised with
      ``moe_normalize_expert_weights=1`` (L1, = our ``norm_topk_prob``); its router weight and
      logits are in the parameter dtype (bfloat16) where ours are float32, so near-tied
      choices may differ; no jitter, ``moe_loss_weight=0`` (no load-balancing loss, as our
      ``aux_loss_coeff=0``; with a weight it would also append to a global list every training
      step), ``moe_zloss_weight=0``;
    * ``bias=False`` (our experts have none; with a bias dMoE returns ``(y, bias)``);
    * ``bf16=True, fp16=False`` (``fp16`` defaults to True there): bfloat16 parameters, the
      only dtype grouped_gemm takes; ``moe_expert_model_parallelism=False``: one process, all
      experts local; ``device`` explicit (its default asks ``torch.cuda.current_device()``);
    * ``init_method``: normal(0, 0.02), as ``MoEConfig.init_std``; the weights are overwritten
      with our layer's anyway (:func:`megablocks_state`).
    """
    if case["dtype"] != "bfloat16":
        raise ValueError(f"the 'megablocks' contender runs bfloat16 only (grouped_gemm), got "
                         f"--dtype {case['dtype']}")
    if case["ffn"] * case["experts"] < 128:  # dMoE takes log2(F·E // 128) in its constructor
        raise ValueError("MegaBlocks' dMoE needs ffn·experts >= 128")
    return dict(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                moe_num_experts=case["experts"], moe_top_k=case["top_k"],
                mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu,
                memory_optimized_mlp=False, moe_normalize_expert_weights=1,
                moe_loss_weight=0.0, moe_zloss_weight=0.0, moe_jitter_eps=None,
                bias=False, return_bias=False, bf16=True, fp16=False,
                moe_expert_model_parallelism=False, device=torch.device(case["device"]),
                init_method=partial(nn.init.normal_, mean=0.0, std=0.02))


def megablocks_state(layer: nn.Module) -> dict[str, Tensor]:
    """``layer``'s weights under the parameter names and layouts of MegaBlocks' ``dMoE``:
    ``router.layer.weight`` ``[E, H]``; ``experts.mlp.w1`` (gate) and ``experts.mlp.v1`` (up),
    ``[E·F, H]``, from our ``w1`` ``[E, H, 2F]`` (gate columns first); ``experts.mlp.w2``
    ``[E·F, H]`` from our ``w2`` ``[E, F, H]``."""
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    e, h, f2 = w1.shape
    f = f2 // 2
    return {"router.layer.weight": layer.router.weight.detach(),
            "experts.mlp.w1": w1[:, :, :f].transpose(1, 2).reshape(e * f, h),
            "experts.mlp.v1": w1[:, :, f:].transpose(1, 2).reshape(e * f, h),
            "experts.mlp.w2": w2.reshape(e * f, h)}


def megablocks_dmoe(case: dict, layer: nn.Module) -> nn.Module:
    """MegaBlocks' ``dMoE`` for ``case`` holding ``layer``'s weights; a ``RuntimeError`` naming
    what to install when megablocks does not import."""
    try:
        with warnings.catch_warnings():  # its import-time FutureWarnings (torch.jit.script)
            warnings.simplefilter("ignore")
            import grouped_gemm  # noqa: F401  (megablocks only warns when it is missing)
            from megablocks.layers.arguments import Arguments
            from megablocks.layers.dmoe import dMoE
    except ImportError as e:
        raise RuntimeError(f"{MEGABLOCKS_INSTALL}: {e}") from e
    if case["device"] != "cuda":
        raise ValueError("the 'megablocks' contender runs on CUDA only (--device cuda)")
    module = dMoE(Arguments(**megablocks_arguments(case)))
    params = dict(module.named_parameters())
    state = megablocks_state(layer)
    if set(params) != set(state):
        raise RuntimeError(f"megablocks dMoE parameters {sorted(params)}, expected "
                           f"{sorted(state)}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))
    return module


def build(case: dict, contender: str):
    """The forward+backward step of ``contender`` on ``case`` (and the module it runs)."""
    from moe_parallel import MoEConfig, MoELayer, ReferenceMoE

    device, dtype = case["device"], getattr(torch, case["dtype"])
    impl = ("grouped" if contender.startswith("grouped") or contender == "megablocks"
            else "block_sparse")
    backend = contender[len("grouped_"):] if contender in BACKEND_CONTENDERS else "auto"
    cfg = MoEConfig(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                    num_experts=case["experts"], top_k=case["top_k"], params_dtype=dtype,
                    expert_impl=impl, grouped_gemm_backend=backend, check_finite=False)
    torch.manual_seed(0)
    layer = MoELayer(cfg, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if contender == "dense":
        rows = case["tokens"] * case["top_k"]
        x = torch.randn(rows, case["hidden"], device=device, dtype=dtype, requires_grad=True)
        w1 = layer.experts.w1[0].detach().clone().requires_grad_(True)
        w2 = layer.experts.w2[0].detach().clone().requires_grad_(True)

        leaves = [x, w1, w2]

        def run():
            gate, up = (x @ w1).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ w2
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

        def run():
            y = module(x)
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

    return step


def measure_memory(case: dict, contender: str) -> float:
    """MiB of peak-memory growth during the first step of ``contender`` in this process."""
    torch.set_num_threads(case["threads"])
    step = build(case, contender)
    if case["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


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

    step = build(case, contender)
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


def time_contenders(case: dict, contenders: list[str], repeats: int) -> dict[str, float]:
    """Median seconds per step, all contenders side by side (one warm-up, then rounds)."""
    return median_seconds({c: build(case, c) for c in contenders}, repeats, progress=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="a")
    for name in ("tokens", "hidden", "ffn", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--contenders", nargs="*", default=list(CONTENDERS),
                   choices=ALL_CONTENDERS)
    p.add_argument("--profile", nargs="*", choices=ALL_CONTENDERS,
                   help="print a profile of one step of each named contender (none named: "
                        "grouped)")
    p.add_argument("--trace", help="with --profile: write each profiled step's Chrome trace "
                                   "to TRACE_<contender>.json")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    case = dict(PRESETS[args.config])
    for name in ("tokens", "hidden", "ffn", "experts", "top_k"):
        if getattr(args, name) is not None:
            case[name] = getattr(args, name)
    case.update(dtype=args.dtype, device=args.device, threads=args.threads)
    contenders = list(dict.fromkeys(["dense", *args.contenders]))
    if "megablocks" in contenders + (args.profile or []):  # fail before any timing
        missing = [m for m in ("megablocks", "grouped_gemm", "stk")
                   if importlib.util.find_spec(m) is None]
        if missing:
            p.error(f"{MEGABLOCKS_INSTALL} (missing: {', '.join(missing)})")
        if args.dtype != "bfloat16" or args.device != "cuda":
            p.error("the 'megablocks' contender runs on --device cuda --dtype bfloat16 only")

    memory = {}
    if not args.no_memory:
        ctx = multiprocessing.get_context("spawn")
        for c in contenders:  # a fresh process each: independent peaks
            with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                memory[c] = pool.submit(measure_memory, case, c).result()
            print(f"memory {c}: {memory[c]:.0f} MiB", file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    seconds = time_contenders(case, contenders, args.repeats)

    rows = []
    for c in contenders:
        rows.append({"contender": c, "seconds": seconds[c],
                     "moe_efficiency": seconds["dense"] / seconds[c],
                     "tokens_per_s": case["tokens"] / seconds[c],
                     "peak_mem_mib": memory.get(c)})
    ours = seconds.get("grouped")  # MoEConfig's default expert_impl
    print(f"\nconfig {args.config}: T={case['tokens']} H={case['hidden']} F={case['ffn']} "
          f"E={case['experts']} k={case['top_k']} {args.dtype} on {args.device}, "
          f"{args.threads} threads, forward+backward")
    head = (f"{'contender':<14}{'ms':>10}{'efficiency':>12}{'tokens/s':>11}"
            f"{'grouped speedup':>17}{'peak MiB':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speed = f"{r['seconds'] / ours:.3f}x" if ours else "-"
        mem = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
        print(f"{r['contender']:<14}{r['seconds'] * 1e3:10.1f}{r['moe_efficiency']:12.3f}"
              f"{r['tokens_per_s']:11,.0f}{speed:>17}{mem:>10}")
    if args.profile is not None:
        for c in args.profile or ["grouped"]:
            trace = f"{args.trace}_{c}.json" if args.trace else None
            print(f"\nprofile of one {c} step:\n{profile_step(case, c, trace=trace)}")
    return save_result("layer", argv, {"case": case, "results": rows}, args.out,
                       f"layer_{args.config}_{args.device}")[0]


if __name__ == "__main__":
    main()
