"""Rank 0's report: the all-to-all fit and its predictions, the tables, the JSON and the PNG."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from benchmarks.cluster.plot import plot_report
from benchmarks.cluster.units import ms as _ms
from benchmarks.cluster.units import size as _size
from benchmarks.cluster.units import span as _span
from benchmarks.cluster.units import us as _us
from benchmarks.cost_model import FIT_MODEL, fit_alltoall, pipelined_step_seconds, predictions
from benchmarks.record import print_head, save_result


def fit_sweep(sweep: list[dict], ranks_per_node: int) -> dict:
    """:func:`benchmarks.cost_model.fit_alltoall` on the sweep rows (their volumes from the
    real layout); ``{"error": why}`` when it cannot be fitted."""
    points = [{"ep": r["ep"], "bytes": r["bytes"], "seconds": r["time"]["seconds"],
               "messages": r["messages"], "intra_bytes": r["intra_bytes"],
               "inter_bytes": r["inter_bytes"]} for r in sweep]
    if not points:
        return {"error": "no all-to-all was measured (world 1, or --parts without sweep)"}
    try:
        return fit_alltoall(points, ranks_per_node)
    except ValueError as exc:
        return {"error": str(exc)}


def overlap_estimate(layer: dict, fit: dict) -> Optional[dict]:
    """Chunked overlap (:func:`~benchmarks.cost_model.pipelined_step_seconds`) of the
    largest EP size's weak-scaling layer step: compute ``g = t_1``, exposed communication
    ``c = t_ep - t_1``, every extra chunk adding ``4·(call + latency·(ep - 1))`` (the fitted
    fixed cost of the 4 all-to-alls of a forward+backward); None when ``c <= 0`` or no fit."""
    weak = [r for r in layer.get("rows", []) if r["mode"] == "weak"]
    if len(weak) < 2 or "error" in fit:
        return None
    base, top = weak[0], weak[-1]
    g, t = base["time"]["seconds"], top["time"]["seconds"]
    c = t - g
    if c <= 0:
        return None
    ep = top["ep"]
    overhead = 4 * (max(fit["call_us"] or 0.0, 0.0) + max(fit["latency_us"], 0.0) * (ep - 1))
    overhead *= 1e-6
    return {"ep": ep, "gemm_s": g, "comm_s": c, "measured_s": t, "chunk_overhead_s": overhead,
            "pipelined_s": {n: pipelined_step_seconds(c, g, n, overhead)
                            for n in (1, 2, 4, 8)}}


def _print_header(rec: dict) -> None:
    c, topo = rec["config"], rec["topology"]
    print(f"Cluster bench: world {topo['world']} = {topo['nodes']} node(s) x "
          f"{topo['ranks_per_node']} ranks (hosts {', '.join(topo['hostnames'])}), launcher "
          f"{topo['launcher']}, {topo['backend']} {topo['backend_version']}, torch "
          f"{topo['torch']}, {topo['device']} ({topo['devices'][0]}), "
          f"{c['threads_per_rank']} thread(s)/rank, {c['dtype']}")
    load = topo.get("load_avg_1_5_15")
    print(f"EP sizes {c['ep_sizes']} (EP groups of consecutive ranks, the rest DP); "
          f"slowest rank, median of {c['rounds']} rounds x {c['iters']} calls "
          f"[min-max over rounds]"
          + (f"; 1-min load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} "
             f"after on rank 0's host ({os.cpu_count()} cores)" if load else ""))


def _print_sweep(rec: dict) -> None:
    sweep = rec["results"].get("sweep")
    if not sweep:
        return
    print("\nAll-to-all sweep: dist.all_to_all_single, even splits. nccl-tests "
          "conventions: S = one rank's send buffer, algbw = S/t, busbw = algbw*(n-1)/n")
    head = (f"{'ep':>4} {'S/rank':>9} {'intra B':>9} {'inter B':>9} {'calls':>5} "
            f"{'time us':>10} {'[min-max]':>19} {'IQR us':>8} {'algbw':>7} {'busbw':>7}")
    print_head(head)
    for r in sweep:
        t = r["time"]
        print(f"{r['ep']:>4} {_size(r['bytes']):>9} {_size(r['intra_bytes']):>9} "
              f"{_size(r['inter_bytes']):>9} {r['iters']:>5} {_us(t['seconds']):>10} "
              f"{_span(t, _us):>19} {_us(t['iqr']):>8} "
              f"{r['algbw_gbps']:7.3f} {r['busbw_gbps']:7.3f}"
              + ("  <- dispatch volume" if r["dispatch_volume"] else ""))
    print("GB/s = 1e9 B/s; intra/inter B: bytes the rank sends within / across nodes; "
          "calls per round")


def _print_dispatch(rec: dict) -> None:
    c = rec["config"]
    disp = rec["results"].get("dispatch")
    if not disp:
        return
    print(f"\nDispatch + combine, identity experts: T={c['tokens']}/rank H={c['hidden']} "
          f"E={c['experts']} k={c['top_k']}; raw = all_to_all_single moving the same bytes "
          f"(counts, rows there and back); ms per call; busbw of forward+backward "
          f"(4*S moved)")
    head = (f"{'ep':>4} {'routing':<10} {'dispatcher':<22} {'S MiB':>7} {'fwd ms':>8} "
            f"{'raw':>8} {'ratio':>6} {'f+b ms':>8} {'[min-max]':>17} {'raw':>8} "
            f"{'ratio':>6} {'busbw':>7} {'raw bus':>7}")
    print_head(head)
    for r in disp:
        raw = r["variants"]["raw"]
        for kind, v in r["variants"].items():
            if kind == "raw":
                continue
            fb = v["fwd_bwd"]["time"]
            print(f"{r['ep']:>4} {r['routing']:<10} {kind:<22} "
                  f"{r['bytes_per_rank'] / 2**20:7.2f} {_ms(v['fwd']['time']['seconds']):>8} "
                  f"{_ms(raw['fwd']['time']['seconds']):>8} {v['fwd']['ratio']:6.2f} "
                  f"{_ms(fb['seconds']):>8} "
                  f"{_span(fb, _ms):>17} "
                  f"{_ms(raw['fwd_bwd']['time']['seconds']):>8} "
                  f"{v['fwd_bwd']['ratio']:6.2f} {v['fwd_bwd']['busbw_gbps']:7.3f} "
                  f"{raw['fwd_bwd']['busbw_gbps']:7.3f}")
        for kind, why in r["not_available"].items():
            print(f"{r['ep']:>4} {r['routing']:<10} {kind:<22} {why}")
    print("S: mean send buffer per rank (own chunk included); single_hot: EP rank 0 "
          "receives every rank's first choices")


def _print_layer(rec: dict) -> None:
    layer = rec["results"].get("layer")
    if not layer:
        return
    lc = layer["config"]
    print(f"\nMoE layer forward+backward: H={lc['hidden']} F={lc['ffn']} E={lc['experts']} "
          f"k={lc['top_k']} ({lc['dispatcher']}); weak: {lc['weak_tokens_per_rank']} "
          f"tokens/rank, strong: {lc['strong_tokens_per_group']} tokens per EP group")
    head = (f"{'mode':<7} {'ep':>4} {'tok/rank':>8} {'step ms':>9} {'[min-max]':>19} "
            f"{'tok/s/rank':>11} {'effic.':>7}")
    print_head(head)
    for r in layer["rows"]:
        t = r["time"]
        print(f"{r['mode']:<7} {r['ep']:>4} {r['tokens_per_rank']:>8} "
              f"{_ms(t['seconds']):>9} "
              f"{_span(t, _ms):>19} "
              f"{r['tokens_per_s_per_rank']:11.0f} {r['efficiency']:7.3f}")
    print("efficiency: weak t1/t_ep, strong t1/(ep*t_ep); ep 1 = every expert local "
          "(no exchange)")


def _print_overlap(rec: dict) -> None:
    over = rec["results"].get("overlap")
    if not over:
        return
    oc = over["config"]
    print(f"\nOverlap, measured: the layer above with one shared expert (F={oc['shared_ffn']}),"
          f" {oc['tokens_per_rank']} tokens/rank; ratio = step / step without overlap at "
          f"the same ep (< 1: the overlap pays)")
    head = f"{'ep':>4} {'variant':<24} {'step ms':>9} {'[min-max]':>19} {'ratio':>6}"
    print_head(head)
    for r in over["rows"]:
        t = r["time"]
        print(f"{r['ep']:>4} {r['variant']:<24} {_ms(t['seconds']):>9} "
              f"{_span(t, _ms):>19} {r['vs_none']:6.3f}")


def _print_train(rec: dict) -> None:
    train = rec["results"].get("train")
    if not train:
        return
    mfu = "null (" + train["mfu_note"] + ")" if train["mfu"] is None else \
        f"{train['mfu']:.1%} of {train['peak_tflops']:g} TFLOP/s"
    print(f"\nTraining step of moe_parallel.train's model ({' '.join(train['train_args'])}, "
          f"{train['dtype']}): {_ms(train['time']['seconds'])} ms, "
          f"{train['tokens_per_s_per_rank']:.0f} tokens/s/rank, "
          f"{train['achieved_tflops_per_rank']:.4f} TFLOP/s/rank, MFU {mfu}")


def _print_fit(rec: dict) -> bool:
    """The fit's table; False when there is no fit."""
    fit = rec["fit"]
    print("\nAll-to-all cost model fitted to the sweep: " + FIT_MODEL)
    if "error" in fit:
        print(f"  no fit: {fit['error']}")
        return False
    call = "not separable (one message count)" if fit["call_us"] is None else \
        f"{fit['call_us']:.2f} us"
    intra = "-" if fit["intra_gbps"] is None else f"{fit['intra_gbps']:.3f} GB/s"
    inter = ("not measured (one node)" if fit["inter_gbps"] is None and "inter" not in
             fit["terms"] else "-" if fit["inter_gbps"] is None else
             f"{fit['inter_gbps']:.3f} GB/s")
    print(f"  G={fit['ranks_per_node']} ranks/node; call {call}; latency "
          f"{fit['latency_us']:.2f} us per message; intra-node {intra}; inter-node {inter}")
    print(f"  fit error over {len(fit['points'])} points: relative RMS "
          f"{fit['rel_rms']:.1%}, max {fit['max_rel_error']:.1%}")
    for w in fit["warnings"]:
        print(f"  warning: {w}")
    head = f"  {'ep':>4} {'S/rank':>9} {'measured us':>12} {'model us':>10} {'error':>7}"
    print(head + "\n  " + "-" * (len(head) - 2))
    for p in fit["points"]:
        print(f"  {p['ep']:>4} {_size(p['bytes']):>9} {_us(p['seconds']):>12} "
              f"{_us(p['predicted_s']):>10} {p['rel_error']:7.1%}")
    return True


def _print_predictions(rec: dict) -> bool:
    """The predictions' table; False when there are none."""
    pred = rec["predictions"]
    if "error" in pred:
        print(f"\nNo predictions: {pred['error']}")
        return False
    print(f"\nPredicted one all-to-all at the dispatch volume S = {_size(pred['volume_bytes'])} "
          f"per rank, G = {pred['ranks_per_node']}; intra-node {pred['intra_gbps']:.3f} GB/s "
          f"[{pred['intra_source']}], inter-node {pred['inter_gbps']:.3f} GB/s "
          f"[{pred['inter_source']}]; hierarchical = intra-node all-to-all of S, then n-1 "
          f"inter-node messages G x larger (DESIGN.md 10)")
    head = (f"  {'ep':>4} {'nodes':>5} {'flat us':>10} {'hier. us':>10} {'winner':<16} "
            f"{'measured us':>12} {'error':>7}")
    print(head + "\n  " + "-" * (len(head) - 2))
    for r in pred["rows"]:
        err = f"{r['rel_error']:7.1%}" if "rel_error" in r else f"{'':>7}"
        print(f"  {r['ep']:>4} {r['nodes']:>5} {_us(r['flat_s']):>10} "
              f"{_us(r['hierarchical_s']):>10} {r['winner']:<16} {_us(r['measured_s']):>12} "
              f"{err}")
    print(f"  {pred['verdict']}")
    return True


def _print_overlap_model(rec: dict) -> None:
    over = rec["results"].get("overlap")
    ov = rec.get("overlap")
    if not ov:
        return
    pipe = ", ".join(f"{n} chunk(s) {_ms(v)} ms" for n, v in ov["pipelined_s"].items())
    print(f"\nOverlap model (weak scaling, ep {ov['ep']}): GEMM etc. t1 = "
          f"{_ms(ov['gemm_s'])} ms, exposed communication t_ep - t1 = {_ms(ov['comm_s'])} "
          f"ms; pipelined t = max(c, g) + min(c, g)/n with {_us(ov['chunk_overhead_s'])} us "
          f"per extra chunk: {pipe}")
    measured = {int(r["variant"][6:]): r["vs_none"]
                for r in (over or {}).get("rows", [])
                if r["ep"] == ov["ep"] and r["variant"] in ("chunks2", "chunks4")}
    if measured:
        base = ov["pipelined_s"][1]
        print("  model vs measured, step ratio to 1 chunk: " + ", ".join(
            f"{n} chunks predicted {ov['pipelined_s'][n] / base:.3f}, measured {m:.3f}"
            for n, m in sorted(measured.items())))


def print_report(rec: dict) -> None:
    """The tables of a record (stdout)."""
    for part in (_print_header, _print_sweep, _print_dispatch, _print_layer, _print_overlap,
                 _print_train):
        part(rec)
    if _print_fit(rec) and _print_predictions(rec):
        _print_overlap_model(rec)


def report(argv: list[str], args: argparse.Namespace, cfg: dict, topology: dict,
           results: dict) -> dict:
    """Rank 0: fit, predictions, tables, JSON and PNG; returns the record."""
    fit = fit_sweep(results.get("sweep", []), topology["ranks_per_node"])
    payload = {"config": cfg, "topology": topology, "results": results, "fit": fit,
               "predictions": None, "overlap": None}
    if "error" not in fit:
        elem = torch.empty((), dtype=getattr(torch, cfg["dtype"])).element_size()
        volume = cfg["tokens"] * cfg["top_k"] * cfg["hidden"] * elem
        measured = {r["ep"]: r["time"]["seconds"] for r in results.get("sweep", [])
                    if r["dispatch_volume"]}
        payload["predictions"] = predictions(fit, volume, args.predict_ep_max, measured,
                                             args.predict_inter_gbps)
        payload["overlap"] = overlap_estimate(results.get("layer", {}), fit)
    print_report(payload)
    stem = f"cluster_{topology['backend']}"
    record, path = save_result("cluster", argv, payload, args.out, stem)
    plot = args.plot or path.with_suffix(".png")
    if plot_report(record, plot):
        record["plot"] = str(plot)
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {plot}")
    sys.stdout.flush()
    return record
