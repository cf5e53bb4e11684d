"""The benchmark scripts run end to end at tiny sizes and write their JSON (not timed tests)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.__main__ import BENCHMARKS
from benchmarks.__main__ import main as bench_main
from benchmarks.layer_bench import HFMixtralLoop
from benchmarks.machine import machine_info
from moe_parallel import MoEConfig, MoELayer, ReferenceMoE, ops


def test_entry_point_lists_and_rejects(capsys):
    assert bench_main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in BENCHMARKS)
    assert bench_main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_machine_info_without_gpu():
    info = machine_info()
    assert info["cpu"] and info["torch"] == torch.__version__
    assert isinstance(info["heap_reuse"], bool)
    if not info["gpus"]:
        assert info["gpu_note"]


@pytest.mark.skipif(not ops.has_extension(), reason="needs moe_parallel._C")
def test_ops_bench_tiny(tmp_path):
    out = tmp_path / "ops.json"
    bench_main(["ops", "--tokens", "64", "--hidden", "16", "--ffn", "24", "--experts", "4",
                "--top-k", "2", "--ep", "2", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["op"] for r in rows][:2] == ["permute fwd", "permute bwd"]
    assert [r["op"] for r in rows][-2:] == ["swiglu fwd", "swiglu bwd"]
    assert len(rows) == 10
    assert all(r["op_ms"] > 0 and r["twin_ms"] > 0 and r["baseline_ms"] > 0 for r in rows)


def test_layer_bench_tiny(tmp_path):
    out = tmp_path / "layer.json"
    bench_main(["layer", "--tokens", "64", "--hidden", "16", "--ffn", "32", "--experts", "4",
                "--top-k", "2", "--repeats", "1", "--no-memory", "--out", str(out)])
    rows = {r["contender"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"dense", "block_sparse", "grouped", "reference", "hf_loop"}
    assert rows["dense"]["moe_efficiency"] == 1.0
    assert all(r["seconds"] > 0 for r in rows.values())


def test_saved_tensor_bytes_counts_each_storage_once():
    """``y = (x @ w).relu()`` in float64 saves x [n, h], w [h, f] and the relu output [n, f]."""
    from benchmarks.memory import saved_tensor_bytes

    n, h, f = 7, 5, 3
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(h, f, dtype=torch.float64, requires_grad=True)
    assert saved_tensor_bytes(lambda: (x @ w).relu()) == {
        "activations": (n * h + h * f + n * f) * 8, "params": 0}
    assert saved_tensor_bytes(lambda: (x @ w).relu(), [w]) == {
        "activations": (n * h + n * f) * 8, "params": h * f * 8}


def test_peak_live_bytes_is_the_running_maximum():
    """Live bytes: 8000, 12000, 4000, 20000 (peak), 0: the peak above the start is 20000."""
    from benchmarks.memory import peak_live_bytes

    def step():
        a = torch.empty(1000, dtype=torch.float64)
        b = torch.empty(500, dtype=torch.float64)
        del a
        c = torch.empty(2000, dtype=torch.float64)
        del b, c

    assert peak_live_bytes(step) == 20000


def test_dropless_bench_tiny_counts_memory(tmp_path):
    out = tmp_path / "dropless.json"
    bench_main(["dropless", "--tokens", "64", "--hidden", "16", "--ffn", "32", "--experts", "4",
                "--top-k", "2", "--repeats", "1", "--block-sizes", "16", "--out", str(out)])
    rows = {(r["routing"], r["mode"], r.get("sweep", False)): r
            for r in json.loads(out.read_text())["results"]}
    assert len(rows) == 14  # 3 routings x 4 modes, and the block-size sweep on 2 routings
    assert all(r["saved_mib"] > 0 and r["peak_live_mib"] > 0 and r["seconds"] > 0
               for r in rows.values())
    # capacity 1.25: C = ceil(64 * 2 / 4 * 1.25) = 40 rows for each of 4 experts, 128 of them real
    cap = rows[("balanced", "capacity_1.25", False)]
    assert cap["rows_computed"] == 160 and cap["rows_routed"] == 128
    assert all(rows[(r, "grouped", False)]["drop_rate"] == 0 for r in ("zipf", "single_hot"))
    assert rows[("single_hot", "capacity_1.0", False)]["drop_rate"] > 0


def test_layer_bench_tiny_reports_memory(tmp_path):
    out = tmp_path / "layer.json"
    bench_main(["layer", "--tokens", "64", "--hidden", "16", "--ffn", "32", "--experts", "4",
                "--top-k", "2", "--repeats", "1", "--contenders", "grouped", "hf_loop",
                "--out", str(out)])
    rows = {r["contender"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"dense", "grouped", "hf_loop"}
    for r in rows.values():
        assert r["saved_mib"] > 0 and r["saved_param_mib"] > 0 and r["peak_live_mib"] > 0
    h, f = 16, 32  # dense saves its weights w1 [H, 2F] and w2 [F, H] (float32) as parameters
    assert rows["dense"]["saved_param_mib"] * 2**20 == (h * 2 * f + f * h) * 4


def test_layer_bench_profile_lists_the_experts_gemms():
    from benchmarks.layer_bench import profile_step

    case = dict(tokens=64, hidden=16, ffn=32, experts=4, top_k=2, dtype="float32",
                device="cpu", threads=1)
    text = profile_step(case, top=40)
    assert "moe_parallel::grouped_gemm" in text and "moe_parallel::permute" in text


def test_hf_loop_computes_the_same_layer():
    """The HF Mixtral-style contender is the same function as the layer (float64)."""
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=12, num_experts=6, top_k=2,
                    params_dtype=torch.float64)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(30, 16, dtype=torch.float64)
    with torch.no_grad():
        y_ref, _ = ReferenceMoE.from_layer(layer)(x)
        y_hf = HFMixtralLoop(layer, cfg.top_k)(x)
    assert float((y_hf - y_ref).norm() / y_ref.norm()) < 1e-12


def test_megablocks_state_is_the_same_layer():
    """The 'megablocks' contender's arguments and weight layout give our layer's function:
    MegaBlocks' dMoE math (softmax, top-k, L1 renormalise; per expert act(x w1ᵀ)·(x v1ᵀ) w2
    with [E·F, H] weights viewed [E, F, H]) on :func:`megablocks_state` (float64, no
    megablocks needed)."""
    from benchmarks.megablocks_contender import megablocks_arguments, megablocks_state

    e, h, f, k = 4, 16, 64, 2
    args = megablocks_arguments(dict(hidden=h, ffn=f, experts=e, top_k=k, dtype="bfloat16",
                                     device="cpu"))
    assert (args["ffn_hidden_size"], args["moe_num_experts"], args["moe_top_k"]) == (f, e, k)
    act = args["activation_fn"]
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=h, ffn_hidden_size=f, num_experts=e, top_k=k,
                               params_dtype=torch.float64))
    st = megablocks_state(layer)
    w1, v1, w2 = (st[f"experts.mlp.{n}"].view(e, -1, h) for n in ("w1", "v1", "w2"))
    x = torch.randn(40, h, dtype=torch.float64)
    weights, chosen = torch.topk((x @ st["router.layer.weight"].t()).softmax(-1), k, dim=-1)
    weights = weights / torch.norm(weights, p=args["moe_normalize_expert_weights"], dim=-1,
                                   keepdim=True)
    y = torch.zeros_like(x)
    for i in range(e):
        rows, slot = torch.where(chosen == i)
        out = (act(x[rows] @ w1[i].t()) * (x[rows] @ v1[i].t())) @ w2[i]
        y.index_add_(0, rows, out * weights[rows, slot, None])
    with torch.no_grad():
        y_ref, _ = ReferenceMoE.from_layer(layer)(x)
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-12


def test_megablocks_contender_is_opt_in_and_named_when_missing(capsys):
    from benchmarks.layer_bench import CONTENDERS

    assert "megablocks" not in CONTENDERS
    tiny = ["layer", "--tokens", "64", "--hidden", "16", "--ffn", "32", "--experts", "4",
            "--repeats", "1", "--no-memory", "--contenders", "megablocks"]
    with pytest.raises(SystemExit):
        bench_main(tiny)
    err = capsys.readouterr().err
    assert ("megablocks_install.sh" in err and "make megablocks-carry" in err) or (
        "--device cuda --dtype bfloat16" in err)


def test_dropless_sweep_plot(tmp_path):
    """The block-size sweep plot is drawn when matplotlib is there, skipped cleanly if not."""
    from benchmarks.dropless_bench import plot_sweep

    base = dict(tokens=8, hidden=4, ffn=8, experts=2, top_k=1, dtype="float32", device="cpu")
    results = [dict(base, routing="zipf", mode="grouped", seconds=1.0, block_size=None)]
    results += [dict(base, routing="zipf", mode="block_sparse", sweep=True, block_size=b,
                     seconds=1.0 + b / 100, padding_fraction=b / 200) for b in (4, 8)]
    path = tmp_path / "sweep.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot_sweep(results, path) is False and not path.exists()
    else:
        assert plot_sweep(results, path) is True and path.stat().st_size > 1000


def test_routing_bench_tiny(tmp_path):
    from benchmarks import routing_bench
    from moe_parallel.routing import DROP_POLICIES

    out = tmp_path / "routing.json"
    rec = routing_bench.main(["--steps", "5", "--top-p", "0.3", "--train-args",
                              "--layers 1 --hidden 16 --ffn 16 --seq-len 8 --batch-size 2",
                              "--out", str(out)])
    runs = rec["runs"]
    assert set(runs) == {"top2", "top_p", *(f"cap_{p}" for p in DROP_POLICIES),
                         "dynamic_batch_priority"}
    assert runs["top2"]["mean_experts_per_token"] == 2.0
    assert 1.0 <= runs["top_p"]["mean_experts_per_token"] <= 4.0
    assert all(runs[f"cap_{p}"]["mean_drop_rate"] > 0 for p in DROP_POLICIES)
    assert runs["top2"]["mean_drop_rate"] == 0.0
    assert len(runs["dynamic_batch_priority"]["capacity_factor"]) == 5
    assert json.loads(out.read_text())["runs"]["top_p"]["top_p"] == 0.3


def test_routing_bench_calibrates_p():
    from benchmarks import routing_bench

    seen = []

    def fake_run(args):  # mean experts per token = 1 + 4p, as a real run would grow with p
        p = float(args[args.index("--top-p") + 1])
        seen.append(p)
        return {"mean_experts_per_token": 1 + 4 * p}

    real = routing_bench.run
    routing_bench.run = fake_run
    try:
        p, tried = routing_bench.calibrate([], 4, 6, 0.05, [])
    finally:
        routing_bench.run = real
    assert seen == [0.5, 0.25]  # 3.0 > 2 -> lower half; 2.0 within tolerance
    assert p == 0.25 and len(tried) == 2


def test_dispatch_bench_layer_compile_tiny(tmp_path):
    """``dispatch_bench --layer-compile``: the static-exchange layer, eager and compiled with
    fullgraph on 4 gloo ranks, timed beside the others; the same rows and drops."""
    from benchmarks.dispatch_bench import main

    out = tmp_path / "dispatch.json"
    main(["--parts", "layer", "--no-deepspeed", "--layer-tokens", "64", "--layer-hidden", "32",
          "--layer-ffn", "64", "--layer-repeats", "1", "--layer-compile", "aot_eager",
          "--out", str(out)])
    layer = json.loads(out.read_text())["results"]["layer"]
    times = layer["times"]
    assert times["ours_static_compiled"]["seconds"] > 0 and times["ours_static"]["seconds"] > 0
    assert layer["compile_seconds_rank0"] > 0
    assert layer["rows_per_rank"]["ours_static_compiled"] == layer["rows_per_rank"]["ours_static"]
