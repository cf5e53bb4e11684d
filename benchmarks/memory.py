"""Exact memory counts of one step (deterministic: no process-level measure such as RSS).

* ``saved_tensor_bytes(forward, params)``: the bytes autograd keeps for the backward of one
  ``forward()``: every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
  custom ``ctx.save_for_backward`` included) and still held when ``forward()`` returns (a
  graph the forward built and dropped frees what it saved), counted once per distinct storage
  (``untyped_storage().data_ptr()``, ``nbytes()`` of the whole storage). Storages of ``params``
  (the module's parameters) are reported apart: ``{"activations": bytes, "params": bytes}``.
* ``saved_tensor_breakdown(forward, params)``: the same storages one by one (``SavedStorage``:
  bytes, the shape and dtype of the first tensor saved on it, whether it is a parameter, and
  the innermost ``moe_parallel`` source lines that saved it); their bytes sum to the totals of
  ``saved_tensor_bytes``.
* ``peak_live_bytes(step, device)``: the peak of the bytes of live tensors during ``step()``,
  above what was live when it started: on CPU from the profiler's allocation and free events in
  time order (``torch.profiler.profile(profile_memory=True)``), reading the allocator's
  process-wide total so that frees on other threads (gloo's workers) count
  (``frees_counted_on_every_thread``); on CUDA ``torch.cuda.max_memory_allocated()`` minus the
  allocated bytes at the start.

``python -m benchmarks memory`` (``main``) reports, in one JSON and a PNG beside it:

* the layer's bytes saved for backward at configs a and b (``layer_bench.PRESETS``, one
  process) beside the dense FFN over the same T·k rows and the Hugging Face loop, for each
  expert implementation and recompute mode;
* the expert-parallel peak per rank (``ep_peak_job``: dropless, skewed routing) against
  ``experts.memory.peak_bytes_bound``;
* each rank's bytes by category after one training step of the built-in model
  (``benchmarks.step_memory``) for every layout of ``STEP_LAYOUTS`` on 4 and 8 gloo ranks,
  replicated, optimizer-sharded (ZeRO-1) and EDP-sharded (FSDP2), with and without recompute;
  the table and the PNG give the rank with the largest total of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of ``t``'s storage, None for a tensor without one."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return s.data_ptr(), s.nbytes()


def saved_tensor_bytes(forward: Callable[[], object], params: Iterable[torch.Tensor] = ()
                       ) -> dict[str, int]:
    """``{"activations", "params"}``: bytes of the distinct storages saved for backward by one
    ``forward()`` and held by its output's graph, those of ``params`` apart (module
    docstring). The output of ``forward`` is dropped before returning."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved = _held_storages(forward, site=False)
    return {"activations": sum(n for p, (n, *_) in saved.items() if p not in param_ptrs),
            "params": sum(n for p, (n, *_) in saved.items() if p in param_ptrs)}


def _held_storages(forward: Callable[[], object], site: bool
                   ) -> dict[int, tuple[int, tuple, torch.dtype, str]]:
    """``data_ptr -> (nbytes, shape, dtype, site)`` of the storages saved for backward during
    ``forward()`` whose saved tensor is still alive when it returns, in the order first saved
    (``site``: the saving source lines, else ""). Keyed by address only among live storages:
    a storage freed during the forward may hand its address to a later one."""
    records: list[tuple[weakref.ref, int, int, tuple, torch.dtype, str]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None:
            records.append((weakref.ref(t), storage[0], storage[1], tuple(t.shape), t.dtype,
                            _site() if site else ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    held: dict[int, tuple[int, tuple, torch.dtype, str]] = {}
    for ref, ptr, nbytes, shape, dtype, where in records:
        if ref() is not None and ptr not in held:
            held[ptr] = (nbytes, shape, dtype, where)
    del out
    return held


class SavedStorage(NamedTuple):
    """One storage saved for backward (``saved_tensor_breakdown``)."""

    nbytes: int          # bytes of the whole storage
    shape: tuple         # shape of the first tensor saved on it
    dtype: torch.dtype
    param: bool          # a storage of ``params``
    site: str            # innermost moe_parallel frames that saved it, innermost first


def _site(depth: int = 2) -> str:
    """The innermost ``depth`` frames of the caller's stack inside ``moe_parallel`` (or, when
    none, inside any non-torch file), innermost first, as ``file:line function``."""
    stack = traceback.extract_stack()[:-2]
    frames = [f for f in stack if "/moe_parallel/" in f.filename]
    if not frames:
        frames = [f for f in stack if "/torch/" not in f.filename]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                      for f in reversed(frames[-depth:]))


def saved_tensor_breakdown(forward: Callable[[], object], params: Iterable[torch.Tensor] = ()
                           ) -> list[SavedStorage]:
    """The distinct storages saved for backward by one ``forward()`` and held by its output's
    graph, in the order they were first saved (module docstring).
    ``sum(s.nbytes for s in result if not s.param)`` equals
    ``saved_tensor_bytes(forward, params)["activations"]``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    return [SavedStorage(n, shape, dtype, ptr in param_ptrs, where)
            for ptr, (n, shape, dtype, where) in _held_storages(forward, site=True).items()]


@contextlib.contextmanager
def frees_counted_on_every_thread() -> Iterator[bool]:
    """Inside: the CPU allocator counts every tensor allocated inside in one process-wide
    total, whichever thread frees it (c10's ``FLAGS_caffe2_report_cpu_memory_usage``, set
    through ``libc10``'s exported symbol and restored on the way out); yields whether that is
    in effect (False where the symbol is not exported). Without it the profiler misses a free
    made on a thread it does not profile: gloo's worker threads release the exchange buffers
    they hold, so the peak of an expert-parallel step would count them as live forever."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
        flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")
    except (OSError, ValueError):
        yield False
        return
    before = flag.value
    flag.value = True
    try:
        yield True
    finally:
        flag.value = before


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def peak_live_bytes(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of live tensors during ``step()`` above those live at its start (module
    docstring). On CPU, under ``frees_counted_on_every_thread()``: the maximum of the
    allocator's process-wide total at the step's allocation and free events, minus the total
    before the first of them (a free on any thread lowers the total; tensors that existed
    before the step are not in it, so their frees do not either); where that is not available,
    the running sum of the events (frees on other threads then go unseen)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with frees_counted_on_every_thread() as tracked, profile(
            activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = torch.device("cpu").type
    events = sorted(
        (e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
         if e.tag == _EventType.Allocation and e.extra_fields.device.type == cpu),
        key=lambda e: e.start_time_ns)
    if not events:
        return 0
    if tracked:
        first = events[0].extra_fields
        base = first.total_allocated - first.alloc_size
        return max(0, max(e.extra_fields.total_allocated for e in events) - base)
    live = peak = 0
    for e in events:
        live += e.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


# ---- the expert-parallel layer's peak per rank -------------------------------------------------


def skewed_layer(config, parallel_state, skew: float, seed: int = 0):
    """This rank's shard of an ``MoELayer`` of ``config`` (which needs ``router_bias=True``)
    whose router bias ``linspace(skew, 0, E)`` sends more tokens to the low expert ids, hence
    to the low EP ranks (``skew=0``: the router's own spread)."""
    from moe_parallel import MoELayer

    torch.manual_seed(seed)
    full = MoELayer(config)
    with torch.no_grad():
        full.router.bias.copy_(torch.linspace(skew, 0.0, config.num_experts))
    return MoELayer.shard_from(full, parallel_state)


def measure_rank(layer, tokens: int, seed: int = 0) -> dict:
    """On every rank of ``layer``'s groups together (a collective): one warm-up step, then
    ``saved`` (bytes saved for backward by one forward, parameters apart), ``peak`` (peak live
    bytes of one forward+backward, gradients reset to None before it), this rank's ``tokens``,
    ``rows_sent``, ``rows_received`` and ``peak_bound`` (``experts.memory.peak_bytes_bound``)."""
    from moe_parallel.experts.memory import peak_bytes_bound

    cfg, ps = layer.config, layer.parallel_state
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen, dtype=cfg.params_dtype)
    x.requires_grad_()
    gy = torch.randn(tokens, cfg.hidden_size, generator=gen, dtype=cfg.params_dtype)
    params = list(layer.parameters())

    def reset():
        for t in [x, *params]:
            t.grad = None

    def step():
        layer(x).backward(gy)

    step()
    reset()
    saved = saved_tensor_bytes(lambda: layer(x), params)["activations"]
    _, aux = layer(x, return_aux=True)
    peak = peak_live_bytes(step)
    reset()
    sent, received = int(aux.stats.tokens_per_expert.sum()), int(aux.stats.expert_rows)
    ep, etp = (ps.ep, ps.etp) if ps is not None else (1, 1)
    return {"tokens": tokens, "rows_sent": sent, "rows_received": received, "saved": saved,
            "peak": peak, "peak_bound": peak_bytes_bound(cfg, tokens, sent, received, ep, etp)}


def ep_peak_job(job: dict) -> list[dict]:
    """One gloo rank of the ``main`` EP measurement (``harness.run_gloo_job``): ``measure_rank``
    in each recompute mode of ``job["modes"]``, ep = world size, dropless, router skewed by
    ``job["skew"]``, ``job["tokens"][rank]`` tokens."""
    import torch.distributed as dist

    from moe_parallel import MoEConfig
    from moe_parallel.distributed.parallel_state import ParallelState

    ps = ParallelState.build(ep=dist.get_world_size())
    rank, out = dist.get_rank(), []
    for mode in job["modes"]:
        cfg = MoEConfig(hidden_size=job["hidden"], ffn_hidden_size=job["ffn"],
                        num_experts=job["experts"], top_k=job["top_k"], router_bias=True,
                        check_finite=False, recompute=mode)
        layer = skewed_layer(cfg, ps, job["skew"])
        out.append(dict(measure_rank(layer, job["tokens"][rank], seed=rank), mode=mode))
    return out


def _layer_saved(case: dict) -> list[dict]:
    """Saved MiB (parameters apart) of one forward at ``case``: the dense FFN, the HF loop and
    the layer (grouped and block-sparse experts) in every recompute mode."""
    from benchmarks.layer_bench import build
    from moe_parallel import MoEConfig, MoELayer
    from moe_parallel.config.choices import RECOMPUTE_MODES

    rows = []
    for name in ("dense", "hf_loop"):
        c = build(case, name)
        got = saved_tensor_bytes(c.forward, c.params)
        rows.append({"contender": name, "recompute": "-", **_mib(got)})
        del c
    x = torch.randn(case["tokens"], case["hidden"], requires_grad=True)
    for impl in ("grouped", "block_sparse"):
        for mode in RECOMPUTE_MODES:
            cfg = MoEConfig(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                            num_experts=case["experts"], top_k=case["top_k"], expert_impl=impl,
                            recompute=mode, check_finite=False)
            torch.manual_seed(0)
            moe = MoELayer(cfg)
            got = saved_tensor_bytes(partial(moe, x), moe.parameters())
            rows.append({"contender": impl, "recompute": mode, **_mib(got)})
            del moe
    dense = rows[0]["saved_mib"]
    for r in rows:
        r["vs_dense"] = r["saved_mib"] / dense
    return rows


def _grouped_breakdown(case: dict) -> list[dict]:
    """``saved_tensor_breakdown`` of the default layer's forward at ``case``, JSON-ready."""
    from moe_parallel import MoEConfig, MoELayer

    cfg = MoEConfig(hidden_size=case["hidden"], ffn_hidden_size=case["ffn"],
                    num_experts=case["experts"], top_k=case["top_k"], check_finite=False)
    torch.manual_seed(0)
    moe = MoELayer(cfg)
    x = torch.randn(case["tokens"], case["hidden"], requires_grad=True)
    return [{"bytes": s.nbytes, "shape": list(s.shape), "dtype": str(s.dtype).split(".")[-1],
             "param": s.param, "site": s.site}
            for s in saved_tensor_breakdown(partial(moe, x), moe.parameters())]


def _mib(saved: dict[str, int]) -> dict[str, float]:
    return {"saved_mib": saved["activations"] / 2**20, "saved_param_mib": saved["params"] / 2**20,
            "saved_bytes": saved["activations"], "saved_param_bytes": saved["params"]}


# ---- per-rank bytes by category after one training step ----------------------------------------

# the layouts of the sweep on each world size (ParallelState.build keyword arguments)
STEP_LAYOUTS: dict[int, list[dict]] = {
    4: [dict(ep=4), dict(ep=2), dict(ep=1)],
    8: [dict(ep=8), dict(ep=4), dict(ep=2, etp=2)],
}
STEP_CATEGORIES = ("params", "grads", "optimizer", "activations")


def layout_name(layout: dict, world: int) -> str:
    """``"ep2·etp2·edp2"``: ``ep`` and the other sizes above 1 of ``layout`` with the derived
    ``edp`` (``world / (pp·ep·etp)``)."""
    sizes = dict(layout, edp=world // (layout.get("pp", 1) * layout.get("ep", 1)
                                        * layout.get("etp", 1)))
    return "·".join(f"{k}{sizes.get(k, 1)}" for k in ("tp", "cp", "ep", "etp", "edp", "pp")
                    if k == "ep" or sizes.get(k, 1) > 1)


def step_sweep(worlds: list[int], dims: dict, seq_len: int, batch: int,
               modes: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    """``benchmarks.step_memory.sweep_job`` on each of ``worlds`` gloo ranks (one job per world,
    every layout of ``STEP_LAYOUTS[world]`` and every mode inside it): one dict per (world,
    layout, mode, rank) with the rank's exact bytes (``step_memory.measure``), ``world``,
    ``rank`` and ``layout_name``; and the whole model's bytes (``full_model_bytes``)."""
    from benchmarks.harness import run_gloo_job

    rows, full = [], {}
    for world in worlds:
        job = dict(layouts=STEP_LAYOUTS[world], modes=[list(m) for m in modes], dims=dims,
                   seq_len=seq_len, batch=batch)
        ranks = run_gloo_job("benchmarks.step_memory:sweep_job", world, job, timeout_s=1800)
        for rank, got in enumerate(ranks):
            full = got["full_model"]
            rows += [dict(m, world=world, rank=rank, layout_name=layout_name(m["layout"], world))
                     for m in got["rows"]]
    return rows, full


def fullest_ranks(rows: list[dict]) -> list[dict]:
    """Per (world, layout, shard, recompute), in order of first appearance: the rank whose
    total (``STEP_CATEGORIES`` summed) is the largest, with ``total`` set (the rank that must
    fit)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["world"], r["layout_name"], r["shard"], r["recompute"])
        total = sum(r[c] for c in STEP_CATEGORIES)
        if key not in best or total > best[key]["total"]:
            best[key] = dict(r, total=total)
    return list(best.values())


def print_step_table(fullest: list[dict], full: dict, dims: dict, seq_len: int,
                     batch: int) -> None:
    """The sweep's table: per layout and mode, the fullest rank's MiB by category, its routed
    experts' parameters + gradients + optimizer state, and its share of the model's expert
    parameters (``1/N``)."""
    from benchmarks.record import print_head

    mib = 2 ** 20
    print(f"\nper-rank bytes by category after one training step (benchmarks.step_memory): "
          f"built-in model vocab={dims['vocab']} H={dims['hidden']} F={dims['ffn']} "
          f"E={dims['experts']} k={dims['top_k']} layers={dims['layers']} float32 AdamW, "
          f"{batch} x {seq_len} tokens per data-parallel rank; the whole model "
          f"{full['params'] / mib:.2f} MiB of parameters, its routed experts "
          f"{full['expert_params'] / mib:.2f} MiB")
    print_head(f"{'ranks':>5} {'layout':<15}{'shard':<11}{'recompute':<11}{'rank':>4}"
               f"{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'total':>9}"
               f"{'experts':>9}{'share':>8}")
    for r in fullest:
        expert = r["expert_params"] + r["expert_grads"] + r["expert_optimizer"]
        share = full["expert_params"] / r["expert_params"]
        print(f"{r['world']:>5} {r['layout_name']:<15}{r['shard']:<11}{r['recompute']:<11}"
              f"{r['rank']:>4}" + "".join(f"{r[c] / mib:>9.2f}" for c in STEP_CATEGORIES)
              + f"{r['total'] / mib:>9.2f}{expert / mib:>9.2f}{'1/' + format(share, '.3g'):>8}")
    print("MiB of the rank with the largest total; activ: bytes the whole model's forward "
          "saves for backward; experts: the routed experts' parameters + gradients + optimizer "
          "state; share: the rank's expert parameters over the model's (1/(EP·ETP·EDP) when "
          "sharded over EDP). shard=optimizer keeps each tensor's state whole on one rank "
          "(ZeroRedundancyOptimizer): its fullest rank holds more than an even split")


def plot_memory(record: dict, path: Path) -> bool:
    """The record as a PNG: stacked bars of the fullest rank's bytes by category (hatched: the
    routed experts' part) for each (world, layout, shard, recompute) of the step sweep, and a
    panel per layer config of the MiB saved for backward (dense FFN, HF loop, the layer per
    expert implementation and recompute mode). False (with a message) without matplotlib or
    with nothing to draw."""
    from benchmarks.plotting import pyplot, save_figure

    fullest = record.get("step", {}).get("fullest", [])
    configs = [(name, rows) for name, rows in record.get("layer", {}).items()
               if rows and "contender" in rows[0]]
    if not fullest and not configs:
        return False
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.patches import Patch

    layout = ([["step"] * max(1, len(configs))] if fullest else []) + \
        ([[name for name, _ in configs]] if configs else [])
    fig, axes = plt.subplot_mosaic(layout, figsize=(max(12, 0.42 * len(fullest) + 2),
                                                    4.8 * len(layout)))
    colors = dict(zip(STEP_CATEGORIES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    mib = 2 ** 20
    if fullest:
        ax, x, pos, groups = axes["step"], 0.0, [], []
        for r in fullest:
            key = (r["world"], r["layout_name"])
            if not groups or groups[-1][0] != key:
                x += 0.8 if groups else 0.0
                groups.append((key, [x]))
            else:
                groups[-1][1].append(x)
            pos.append(x)
            x += 1.0
        for c in STEP_CATEGORIES:
            expert = [r.get(f"expert_{c}", 0) / mib for r in fullest]
            dense = [(r[c] - r.get(f"expert_{c}", 0)) / mib for r in fullest]
            bottom = [sum(r[k] for k in STEP_CATEGORIES[:STEP_CATEGORIES.index(c)]) / mib
                      for r in fullest]
            ax.bar(pos, dense, 0.8, bottom=bottom, color=colors[c])
            ax.bar(pos, expert, 0.8, bottom=[b + d for b, d in zip(bottom, dense)],
                   color=colors[c], hatch="///", edgecolor="white", linewidth=0)
        short = {"optimizer": "optim"}
        ax.set_xticks(pos, [f"{short.get(r['shard'], r['shard'])}\n{r['recompute']}"
                            for r in fullest], fontsize=6.5)
        top = max(r["total"] for r in fullest) / mib
        for (world, name), xs in groups:
            ax.text(sum(xs) / len(xs), top * 1.03, f"{world} ranks\n{name}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_ylim(0, top * 1.16)
        ax.set_ylabel("MiB on the fullest rank")
        ax.set_xlabel("--shard (upper line: none, optim[izer], experts), recompute (lower line)",
                      fontsize=8)
        handles = [Patch(color=colors[c], label=c) for c in STEP_CATEGORIES]
        handles.append(Patch(facecolor="lightgrey", edgecolor="white", hatch="///",
                             label="routed experts' part"))
        ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=5,
                  bbox_to_anchor=(0.5, -0.16))
        ax.grid(axis="y", alpha=0.3)
        d = record["step"]["dims"]
        ax.set_title(f"bytes per rank after one training step: built-in model H={d['hidden']} "
                     f"F={d['ffn']} E={d['experts']} k={d['top_k']} layers={d['layers']} "
                     f"float32 AdamW, gloo ranks", fontsize=10)
    for name, rows in configs:
        ax = axes[name]
        labels = [r["contender"].replace("hf_loop", "HF loop") if r["recompute"] == "-"
                  else f"{r['contender'].replace('block_sparse', 'block-sparse')}\n"
                       f"{r['recompute']}" for r in rows]
        shades = {"dense": "grey", "hf_loop": "tab:purple", "grouped": "tab:blue",
                  "block_sparse": "tab:cyan"}
        ax.bar(range(len(rows)), [r["saved_mib"] for r in rows], 0.8,
               color=[shades.get(r["contender"], "tab:blue") for r in rows])
        dense = rows[0]["saved_mib"]
        ax.axhline(dense, color="black", lw=0.8, ls="--", label="dense FFN")
        ax.axhline(1.2 * dense, color="black", lw=0.8, ls=":", label="1.2 x dense")
        for i, r in enumerate(rows):
            ax.text(i, r["saved_mib"], f"{r['saved_mib']:.0f}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("MiB saved for backward")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
        case = record.get("layer_cases", {}).get(name)
        dims = (f": T={case['tokens']} H={case['hidden']} F={case['ffn']} E={case['experts']} "
                f"k={case['top_k']}" if case else "")
        ax.set_title(f"layer config {name}{dims}, float32, one process", fontsize=10)
    save_figure(fig, path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> dict:
    """``python -m benchmarks memory``: the layer's bytes saved for backward at configs a and b
    beside the dense FFN and the HF loop, per recompute mode; the expert-parallel peak per
    rank (``--ep`` gloo ranks, dropless, skewed routing) against ``peak_bytes_bound``; and each
    rank's bytes by category after one training step of the built-in model for every layout of
    ``STEP_LAYOUTS`` on ``--worlds`` gloo ranks, replicated, optimizer-sharded and EDP-sharded,
    per recompute mode. Prints the tables, writes the JSON and a PNG beside it."""
    import argparse

    from benchmarks.harness import run_gloo_job
    from benchmarks.layer_bench import PRESETS
    from benchmarks.record import print_head, save_result
    from moe_parallel.config.choices import RECOMPUTE_MODES

    p = argparse.ArgumentParser(prog="python -m benchmarks memory",
                                description=" ".join(main.__doc__.split()))
    p.add_argument("--configs", nargs="*", default=sorted(PRESETS), choices=sorted(PRESETS))
    p.add_argument("--ep", type=int, default=4, help="gloo ranks of the EP measurement (0: skip)")
    p.add_argument("--ep-tokens", type=int, nargs="+", default=[512, 384, 640, 256],
                   help="tokens of each rank (cycled)")
    p.add_argument("--ep-hidden", type=int, default=512)
    p.add_argument("--ep-ffn", type=int, default=1024)
    p.add_argument("--ep-experts", type=int, default=8)
    p.add_argument("--ep-top-k", type=int, default=2)
    p.add_argument("--skew", type=float, default=1.0,
                   help="router bias linspace(skew, 0, E): more tokens to the low EP ranks")
    p.add_argument("--breakdown", action="store_true",
                   help="list every storage the grouped layer saves (saved_tensor_breakdown) "
                        "instead of the table of contenders and recompute modes")
    p.add_argument("--worlds", type=int, nargs="*", default=[4, 8],
                   help=f"gloo world sizes of the per-rank step sweep, of {sorted(STEP_LAYOUTS)} "
                        "(none or 0: skip it)")
    p.add_argument("--step-shards", nargs="+", default=["none", "optimizer", "experts"],
                   choices=["none", "optimizer", "experts"])
    p.add_argument("--step-recompute", nargs="+", default=["none", "experts"],
                   choices=list(RECOMPUTE_MODES))
    p.add_argument("--step-vocab", type=int, default=256)
    p.add_argument("--step-hidden", type=int, default=128)
    p.add_argument("--step-ffn", type=int, default=256)
    p.add_argument("--step-experts", type=int, default=16)
    p.add_argument("--step-top-k", type=int, default=2)
    p.add_argument("--step-layers", type=int, default=2)
    p.add_argument("--step-heads", type=int, default=4)
    p.add_argument("--step-seq-len", type=int, default=128)
    p.add_argument("--step-batch", type=int, default=4, help="sequences per data-parallel rank")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the PNG of a recorded JSON (beside it)")
    args = p.parse_args(argv)
    if args.replot is not None:
        import json

        recorded = json.loads(args.replot.read_text())
        if plot_memory(recorded, args.replot.with_suffix(".png")):
            print(f"wrote {args.replot.with_suffix('.png')}")
        return recorded
    worlds = [w for w in args.worlds if w != 0]
    bad = [w for w in worlds if w not in STEP_LAYOUTS]
    if bad:
        p.error(f"--worlds: {bad} not among {sorted(STEP_LAYOUTS)} (or 0 to skip the sweep)")
    torch.set_num_threads(args.threads)

    layer = {}
    for name in args.configs:
        case = dict(PRESETS[name], dtype="float32", device="cpu", threads=args.threads)
        head = (f"\nconfig {name}: T={case['tokens']} H={case['hidden']} F={case['ffn']} "
                f"E={case['experts']} k={case['top_k']} float32")
        if args.breakdown:
            layer[name] = parts = _grouped_breakdown(case)
            print(f"{head}: every storage the layer's forward saves for backward (grouped, "
                  f"recompute none), {sum(r['bytes'] for r in parts if not r['param'])} bytes "
                  "without the parameters")
            print_head(f"{'bytes':>12} {'MiB':>9}  {'shape':<18}{'dtype':<9}param  saved by")
            for r in parts:
                print(f"{r['bytes']:>12} {r['bytes'] / 2**20:>9.3f}  {str(tuple(r['shape'])):<18}"
                      f"{r['dtype']:<9}{'yes' if r['param'] else '':<7}{r['site']}")
            continue
        layer[name] = _layer_saved(case)
        print(f"{head}, bytes saved for backward by one forward")
        print_head(f"{'contender':<14}{'recompute':<12}{'saved MiB':>11}{'x dense':>9}"
                   f"{'params MiB':>12}")
        for r in layer[name]:
            print(f"{r['contender']:<14}{r['recompute']:<12}{r['saved_mib']:>11.2f}"
                  f"{r['vs_dense']:>9.3f}{r['saved_param_mib']:>12.2f}")

    ep = []
    if args.ep > 0:
        tokens = [args.ep_tokens[r % len(args.ep_tokens)] for r in range(args.ep)]
        job = dict(hidden=args.ep_hidden, ffn=args.ep_ffn, experts=args.ep_experts,
                   top_k=args.ep_top_k, skew=args.skew, tokens=tokens,
                   modes=list(RECOMPUTE_MODES))
        ranks = run_gloo_job("benchmarks.memory:ep_peak_job", args.ep, job, timeout_s=1800)
        ep = [dict(m, rank=r) for r, ms in enumerate(ranks) for m in ms]
        print(f"\nexpert parallel: ep={args.ep} gloo ranks, dropless, router bias "
              f"linspace({args.skew}, 0, E); H={args.ep_hidden} F={args.ep_ffn} "
              f"E={args.ep_experts} k={args.ep_top_k} float32 (SwiGLU); one forward+backward")
        print_head(f"{'rank':>4} {'recompute':<11}{'T':>6}{'S':>7}{'R':>7}{'saved MiB':>11}"
                   f"{'peak MiB':>10}{'bound MiB':>11}{'peak/bound':>12}")
        for m in sorted(ep, key=lambda m: (RECOMPUTE_MODES.index(m["mode"]), m["rank"])):
            print(f"{m['rank']:>4} {m['mode']:<11}{m['tokens']:>6}{m['rows_sent']:>7}"
                  f"{m['rows_received']:>7}{m['saved'] / 2**20:>11.2f}{m['peak'] / 2**20:>10.2f}"
                  f"{m['peak_bound'] / 2**20:>11.2f}{m['peak'] / m['peak_bound']:>12.3f}")
        print("T tokens, S rows sent, R rows received by the rank's experts; bound: "
              "moe_parallel.experts.memory.peak_bytes_bound")
    step = {}
    if worlds:
        dims = dict(vocab=args.step_vocab, hidden=args.step_hidden, ffn=args.step_ffn,
                    experts=args.step_experts, top_k=args.step_top_k, layers=args.step_layers,
                    heads=args.step_heads)
        modes = [(s, r) for s in args.step_shards for r in args.step_recompute]
        rows, full = step_sweep(worlds, dims, args.step_seq_len, args.step_batch, modes)
        fullest = fullest_ranks(rows)
        print_step_table(fullest, full, dims, args.step_seq_len, args.step_batch)
        step = {"dims": dims, "seq_len": args.step_seq_len, "batch": args.step_batch,
                "layouts": {str(w): STEP_LAYOUTS[w] for w in worlds}, "full_model": full,
                "fullest": fullest, "ranks": rows}
    cases = {name: {k: PRESETS[name][k] for k in ("tokens", "hidden", "ffn", "experts",
                                                  "top_k")} for name in layer}
    record, path = save_result("memory", argv, {"layer": layer, "layer_cases": cases, "ep": ep,
                                                "step": step}, args.out, "memory_cpu")
    if plot_memory(record, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
