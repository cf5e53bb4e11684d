"""Exact memory counts of one step (deterministic: no process-level measure such as RSS).

* ``saved_tensor_bytes(forward, params)``: the bytes autograd keeps for the backward of one
  ``forward()``: every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
  custom ``ctx.save_for_backward`` included) counted once per distinct storage
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
"""

from __future__ import annotations

import contextlib
import ctypes
import traceback
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
    ``forward()``, those of ``params`` apart (module docstring). The output of ``forward`` is
    dropped before returning."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None:
            saved[storage[0]] = storage[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {"activations": sum(n for p, n in saved.items() if p not in param_ptrs),
            "params": sum(n for p, n in saved.items() if p in param_ptrs)}


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
    """The distinct storages saved for backward by one ``forward()``, in the order they were
    first saved (module docstring). ``sum(s.nbytes for s in result if not s.param)`` equals
    ``saved_tensor_bytes(forward, params)["activations"]``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, SavedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage is not None and storage[0] not in saved:
            saved[storage[0]] = SavedStorage(storage[1], tuple(t.shape), t.dtype,
                                             storage[0] in param_ptrs, _site())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return list(saved.values())


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


def main(argv: list[str] | None = None) -> dict:
    """``python -m benchmarks.memory``: the layer's bytes saved for backward at configs a and b
    beside the dense FFN and the HF loop, per recompute mode; and the expert-parallel peak per
    rank (``--ep`` gloo ranks, dropless, skewed routing) against ``peak_bytes_bound``. Prints
    the tables, writes the JSON."""
    import argparse

    from benchmarks.harness import run_gloo_job
    from benchmarks.layer_bench import PRESETS
    from benchmarks.record import print_head, save_result
    from moe_parallel.config.choices import RECOMPUTE_MODES

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
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
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
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
    record, _ = save_result("memory", argv, {"layer": layer, "ep": ep}, args.out,
                            "memory_cpu")
    return record


if __name__ == "__main__":
    main()
