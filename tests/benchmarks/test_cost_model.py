"""The EP cost model of benchmarks/scaling_bench.py: formulas on hand-computed small numbers,
monotonicity in the EP size, and ValueError naming every bad parameter."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import cost_model as cm
from benchmarks import scaling_bench as sb

# a layer whose communication and GEMM times are equal at ep=16 (hand-computed below):
# V = T·k·H·b = 1000·1·1000·1 = 1e6 B; ep=16, G=8: f_nv = 7/16, f_ib = 8/16;
# t_a2a = max(1e6·7/16 / 450e9, 1e6·0.5 / 50e9) = max(9.72e-7, 1e-5) = 1e-5 s; t_comm = 4e-5 s;
# FLOPs = 3 · 2·T·k·H·3F = 18·1e9 = 1.8e10; at 450 TFLOP/s t_gemm = 4e-5 s.
SMALL = dict(tokens=1000, hidden=1000, ffn=1000, experts=16, top_k=1, dtype_bytes=1, ep=16,
             gpus_per_node=8, nvlink_gbps=450.0, ib_gbps=50.0, gemm_tflops=450.0)


def test_a2a_bytes_is_tokens_topk_hidden_bytes():
    assert cm.a2a_bytes(4, 8, 2, 2) == 4 * 2 * 8 * 2 == 128
    assert cm.a2a_bytes(4096, 7168, 8, 2) == 469_762_048


@pytest.mark.parametrize("ep,g,expected", [
    (1, 8, (1.0, 0.0, 0.0)),
    (4, 8, (1 / 4, 3 / 4, 0.0)),
    (8, 8, (1 / 8, 7 / 8, 0.0)),
    (16, 8, (1 / 16, 7 / 16, 8 / 16)),
    (256, 8, (1 / 256, 7 / 256, 248 / 256)),
    (8, 4, (1 / 8, 3 / 8, 4 / 8)),
])
def test_link_fractions(ep, g, expected):
    got = cm.link_fractions(ep, g)
    assert got == pytest.approx(expected, abs=1e-15)
    assert sum(got) == pytest.approx(1.0, abs=1e-15)


def test_all_to_all_seconds_takes_slower_link():
    # ep=16: IB part 1e9·0.5/50e9 = 0.01 s beats NVLink part 1e9·7/16/450e9 = 9.72e-4 s
    assert cm.all_to_all_seconds(1e9, 16, 8, 450.0, 50.0) == pytest.approx(0.01, rel=1e-12)
    assert cm.all_to_all_seconds(1e9, 16, 8, 450.0, 50.0, latency_us=5.0) == pytest.approx(
        0.010005, rel=1e-12)
    # one node: NVLink only, 9e9·7/8 / 450e9 = 0.0175 s
    assert cm.all_to_all_seconds(9e9, 8, 8, 450.0, 50.0) == pytest.approx(0.0175, rel=1e-12)
    # a single rank sends nothing over any link
    assert cm.all_to_all_seconds(9e9, 1, 8) == 0.0
    # NVLink slower than IB share: 1e9·7/16 / 1e9 = 0.4375 s
    assert cm.all_to_all_seconds(1e9, 16, 8, 1.0, 50.0) == pytest.approx(0.4375, rel=1e-12)


def test_expert_gemm_flops():
    # per row: 2·H·2F + 2·F·H = 2·8·32 + 2·16·8 = 768; 8 rows (T·k) -> 6144 forward
    assert cm.expert_gemm_flops(4, 8, 16, 2) == (6144, 12288)
    # GELU/ReLU: 2·H·F + 2·F·H = 512 per row
    assert cm.expert_gemm_flops(4, 8, 16, 2, "gelu") == (4096, 8192)
    assert cm.expert_gemm_flops(4, 8, 16, 2, "relu") == (4096, 8192)


def test_predict_layer_hand_computed():
    r = cm.predict_layer(**SMALL)
    assert r["a2a_bytes"] == 1_000_000
    assert (r["nvlink_fraction"], r["ib_fraction"]) == pytest.approx((7 / 16, 0.5))
    assert r["a2a_ms"] == pytest.approx(0.01, rel=1e-12)
    assert r["comm_ms"] == pytest.approx(0.04, rel=1e-12)
    assert r["gemm_flops"] == 18_000_000_000
    assert r["gemm_ms"] == pytest.approx(0.04, rel=1e-12)
    assert r["step_ms"] == pytest.approx(0.08, rel=1e-12)
    assert r["comm_share"] == pytest.approx(0.5, rel=1e-12)
    assert r["tokens_per_s_per_gpu"] == pytest.approx(1000 / 8e-5, rel=1e-12)
    assert (r["nodes"], r["experts_per_gpu"], r["rows_per_expert"]) == (2, 1, 1000.0)


@pytest.mark.parametrize("overlap,step_ms,share", [
    (0.0, 0.08, 0.5),
    (0.5, 0.06, 1 / 3),  # hides 0.5·min(0.04, 0.04) = 0.02 ms
    (1.0, 0.04, 0.0),
])
def test_predict_layer_overlap(overlap, step_ms, share):
    r = cm.predict_layer(**SMALL, overlap=overlap)
    assert r["step_ms"] == pytest.approx(step_ms, rel=1e-12)
    assert r["comm_share"] == pytest.approx(share, abs=1e-12)
    assert r["comm_ms"] == pytest.approx(0.04, rel=1e-12)  # total traffic time unchanged


def test_overlap_hides_at_most_the_shorter_part():
    # GEMM 4x the communication: full overlap leaves the GEMM time, comm fully hidden
    r = cm.predict_layer(**{**SMALL, "gemm_tflops": 112.5}, overlap=1.0)
    assert r["gemm_ms"] == pytest.approx(0.16, rel=1e-12)
    assert r["step_ms"] == pytest.approx(0.16, rel=1e-12)
    assert r["comm_share"] == pytest.approx(0.0, abs=1e-12)


def test_latency_adds_four_times_per_layer():
    r0 = cm.predict_layer(**SMALL)
    r1 = cm.predict_layer(**SMALL, latency_us=10.0)
    assert r1["comm_ms"] - r0["comm_ms"] == pytest.approx(0.04, rel=1e-9)


def test_more_ep_ranks_more_inter_node_traffic():
    kw = {k: v for k, v in SMALL.items() if k != "ep"}
    kw["experts"] = 256
    rows = cm.cost_model_rows(cm.EP_SIZES, **kw)
    assert [r["ep"] for r in rows] == [8, 16, 32, 64, 128, 256]
    ib = [r["ib_fraction"] for r in rows]
    assert ib[0] == 0.0 and all(a < b for a, b in zip(ib, ib[1:]))
    assert all(a < b for a, b in zip([r["comm_ms"] for r in rows],
                                     [r["comm_ms"] for r in rows][1:]))
    assert all(a < b for a, b in zip([r["comm_share"] for r in rows],
                                     [r["comm_share"] for r in rows][1:]))
    # balanced routing: the GEMM work per GPU does not depend on EP
    assert len({r["gemm_flops"] for r in rows}) == 1
    # the IB share tends to 1, so comm time tends to 4·V/BW_ib = 4·1e6/50e9 s = 0.08 ms
    assert rows[-1]["comm_ms"] == pytest.approx(0.08 * 248 / 256, rel=1e-12)
    assert rows[-1]["comm_ms"] < 0.08


def test_bigger_nodes_less_inter_node_traffic():
    ib = [cm.link_fractions(64, g)[2] for g in (4, 8, 16, 32)]
    assert ib == pytest.approx([60 / 64, 56 / 64, 48 / 64, 32 / 64])


def test_default_model_is_comm_bound_across_nodes():
    rows = cm.cost_model_rows(cm.EP_SIZES, **cm.DEFAULT_MODEL,
                              **{k: v for k, v in cm.DEFAULT_ASSUMPTIONS.items()})
    # one node: 4 · 469.76 MB · 7/8 / 450 GB/s = 3.654 ms; GEMM 18·4096·8·7168·2048 / 600e12
    assert rows[0]["comm_ms"] == pytest.approx(4 * 469_762_048 * 7 / 8 / 450e9 * 1e3)
    assert rows[0]["gemm_ms"] == pytest.approx(18 * 4096 * 8 * 7168 * 2048 / 600e12 * 1e3)
    assert rows[0]["comm_share"] < 0.5 < rows[1]["comm_share"]


@pytest.mark.parametrize("name,bad", [
    ("tokens", 0), ("hidden", -1), ("ffn", 0), ("experts", 0), ("top_k", True),
    ("dtype_bytes", 0), ("ep", 0), ("gpus_per_node", 0), ("nvlink_gbps", 0.0),
    ("ib_gbps", -1.0), ("gemm_tflops", 0.0), ("gemm_tflops", math.inf), ("overlap", 1.5),
    ("overlap", -0.1), ("latency_us", -1.0), ("activation", "tanh"), ("tokens", 2.5),
])
def test_bad_parameter_raises_naming_it(name, bad):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cm.predict_layer(**{**SMALL, name: bad})


def test_indivisible_layouts_raise():
    with pytest.raises(ValueError, match=r"experts 24 is not divisible by ep 16"):
        cm.predict_layer(**{**SMALL, "experts": 24})
    with pytest.raises(ValueError, match=r"\bep 12\b.*gpus_per_node 8"):
        cm.link_fractions(12, 8)
    with pytest.raises(ValueError, match=r"\bvolume_bytes\b"):
        cm.all_to_all_seconds(-1.0, 8)


def test_split_tokens():
    assert sb.split_tokens(10, 4) == [3, 3, 2, 2]
    assert sb.split_tokens(2048, 8) == [256] * 8
    assert sb.split_tokens(5, 1) == [5]


def test_core_bound():
    assert [sb.core_bound(n, 2) for n in (1, 2, 4, 8)] == [1.0, 1.0, 0.5, 0.25]
    assert sb.core_bound(8, 16) == 1.0
    assert sb.core_bound(8, 2, base_procs=2) == 0.25  # base of 2 procs on 2 cores: no loss


def test_main_cost_model_only_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sb, "plot_cost_model", lambda cm, path: False)
    monkeypatch.setattr(sb, "_machine_info", lambda: {"cpu": "test"})
    out = tmp_path / "s.json"
    res = sb.main(["--skip-measure", "--ep-sizes", "8", "16", "--gemm-tflops", "450",
                   "--cm-tokens", "1000", "--cm-hidden", "1000", "--cm-ffn", "1000",
                   "--cm-experts", "16", "--cm-top-k", "1", "--cm-dtype-bytes", "1",
                   "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data) == {"date", "command", "machine", "measured", "cost_model"}
    assert data["measured"] is None and res["measured"] is None
    assert data["machine"] == {"cpu": "test"}
    assert data["command"].startswith("python -m benchmarks.scaling_bench --skip-measure")
    a = data["cost_model"]["assumptions"]
    assert (a["nvlink_gbps"], a["ib_gbps"], a["gemm_tflops"]) == (450.0, 50.0, 450.0)
    assert a["assumed"] == ["gpus_per_node", "ib_gbps", "latency_us", "nvlink_gbps", "overlap"]
    rows = data["cost_model"]["rows"]
    assert [r["ep"] for r in rows] == [8, 16]
    assert rows[1]["step_ms"] == pytest.approx(0.08, rel=1e-12)
    assert "ASSUMED" in capsys.readouterr().out


# ---- fitted all-to-all model, hierarchical exchange, pipelined overlap --------------------------
def _synthetic(call_us, latency_us, intra_gbps, inter_gbps, g, eps, sizes):
    """Points of one all-to-all each, exactly on the fitted model's line."""
    return [{"ep": ep, "bytes": b,
             "seconds": cm.all_to_all_flat_seconds(b, ep, g, latency_us, intra_gbps, inter_gbps,
                                                   call_us)}
            for ep in eps for b in sizes]


def test_alltoall_volumes():
    assert cm.alltoall_volumes(800.0, 4, 8) == (3, 600.0, 0.0)
    assert cm.alltoall_volumes(1600.0, 16, 4) == (15, 300.0, 1200.0)
    assert cm.alltoall_volumes(100.0, 8, 1) == (7, 0.0, 87.5)
    with pytest.raises(ValueError, match=r"\bep 12\b.*ranks_per_node 8"):
        cm.alltoall_volumes(1.0, 12, 8)


def test_fit_recovers_known_parameters():
    pts = _synthetic(20.0, 5.0, 40.0, 4.0, 4, (2, 4, 8, 16), (1e3, 1e5, 1e7))
    fit = cm.fit_alltoall(pts, 4)
    assert fit["terms"] == ["call", "message", "intra", "inter"]
    for key, want in (("call_us", 20.0), ("latency_us", 5.0), ("intra_gbps", 40.0),
                      ("inter_gbps", 4.0)):
        assert fit[key] == pytest.approx(want, rel=1e-9), key
    assert fit["rel_rms"] < 1e-9 and fit["max_rel_error"] < 1e-9 and fit["warnings"] == []
    assert [p["ep"] for p in fit["points"]] == [2, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
    assert fit["points"][-1]["inter_bytes"] == pytest.approx(1e7 * 12 / 16)


def test_fit_one_node_leaves_inter_out():
    fit = cm.fit_alltoall(_synthetic(0.0, 7.0, 3.0, None, 8, (2, 4, 8), (1e4, 1e6)), 8)
    assert fit["terms"] == ["call", "message", "intra"] and fit["inter_gbps"] is None
    assert fit["latency_us"] == pytest.approx(7.0, rel=1e-9)
    assert fit["intra_gbps"] == pytest.approx(3.0, rel=1e-9)
    assert abs(fit["call_us"]) < 1e-6
    # one EP size: a per-call latency cannot be told from the per-message one
    one = cm.fit_alltoall(_synthetic(30.0, 10.0, 2.0, None, 4, (4,), (1e4, 1e6)), 4)
    assert one["terms"] == ["message", "intra"] and one["call_us"] is None
    assert one["latency_us"] == pytest.approx(10.0 + 30.0 / 3, rel=1e-9)


def test_fit_relative_error_and_explicit_layout():
    pts = [{"ep": 2, "bytes": 1e6, "seconds": 1.1e-3, "messages": 1, "intra_bytes": 5e5,
            "inter_bytes": 0.0},
           {"ep": 2, "bytes": 1e4, "seconds": 1.0e-5, "messages": 1, "intra_bytes": 5e3,
            "inter_bytes": 0.0},
           {"ep": 2, "bytes": 1e5, "seconds": 1.2e-4, "messages": 1, "intra_bytes": 5e4,
            "inter_bytes": 0.0}]
    fit = cm.fit_alltoall(pts, 2)
    rel = [p["rel_error"] for p in fit["points"]]
    assert fit["rel_rms"] == pytest.approx(math.sqrt(sum(e * e for e in rel) / 3))
    assert fit["max_rel_error"] == pytest.approx(max(abs(e) for e in rel))
    assert 0 < fit["rel_rms"] < 0.2


def test_fit_warns_on_a_slope_without_bandwidth():
    pts = [{"ep": 2, "bytes": b, "seconds": t} for b, t in ((1e3, 2e-3), (1e6, 1e-3))]
    fit = cm.fit_alltoall(pts, 2)
    assert fit["intra_gbps"] is None and "intra slope" in fit["warnings"][0]


@pytest.mark.parametrize("points, match", [
    ([], "points is empty"),
    ([{"ep": 1, "bytes": 1.0, "seconds": 1.0}], r"points\[0\]\.ep must be >= 2"),
    ([{"ep": 2, "bytes": 0, "seconds": 1.0}], r"points\[0\]\.bytes"),
    ([{"ep": 2, "bytes": 1.0, "seconds": -1.0}], r"points\[0\]\.seconds"),
    ([{"ep": 2, "bytes": 1.0, "seconds": 1.0, "messages": 1}], "go together"),
    ([{"ep": 2, "bytes": 1.0, "seconds": 1.0}] * 3, "do not determine"),
    (["x"], r"points\[0\] must be a dict"),
])
def test_fit_bad_points_raise(points, match):
    with pytest.raises(ValueError, match=match):
        cm.fit_alltoall(points, 2)


def test_fit_bad_ranks_per_node_raises():
    with pytest.raises(ValueError, match=r"\branks_per_node\b"):
        cm.fit_alltoall([{"ep": 2, "bytes": 1.0, "seconds": 1.0}], 0)


def test_flat_and_hierarchical_hand_computed():
    # V = 1.6e6 B, ep = 16 on 4 nodes of G = 4, latency 10 us, call 0, intra 100, inter 10 GB/s
    # flat: 15 messages; 1.6e6·3/16 = 3e5 B intra, 1.6e6·12/16 = 1.2e6 B inter
    flat = cm.all_to_all_flat_seconds(1.6e6, 16, 4, 10.0, 100.0, 10.0)
    assert flat == pytest.approx(150e-6 + 3e5 / 100e9 + 1.2e6 / 10e9, rel=1e-12)
    # hierarchical: 3 intra messages of V·3/4 = 1.2e6 B, then 3 inter of V·3/4 = 1.2e6 B
    hier = cm.all_to_all_hierarchical_seconds(1.6e6, 16, 4, 10.0, 100.0, 10.0)
    assert hier == pytest.approx(30e-6 + 1.2e6 / 100e9 + 30e-6 + 1.2e6 / 10e9, rel=1e-12)
    assert hier < flat  # 9 fewer messages (90 us) beat 9e5 B more over the node (9 us)
    # a call cost counts once flat, once per stage hierarchical
    assert cm.all_to_all_hierarchical_seconds(1.6e6, 16, 4, 10.0, 100.0, 10.0, 5.0) == (
        pytest.approx(hier + 10e-6, rel=1e-12))
    # bandwidth-bound (no latency): the extra intra-node bytes make hierarchical lose
    assert (cm.all_to_all_hierarchical_seconds(1.6e8, 16, 4, 0.0, 10.0, 10.0)
            > cm.all_to_all_flat_seconds(1.6e8, 16, 4, 0.0, 10.0, 10.0))
    # one node, or one rank per node: the same exchange
    for ep, g in ((4, 8), (8, 8), (8, 1)):
        assert cm.all_to_all_hierarchical_seconds(1e6, ep, g, 3.0, 50.0, 5.0, 2.0) == (
            cm.all_to_all_flat_seconds(1e6, ep, g, 3.0, 50.0, 5.0, 2.0))
    # inside one node no inter-node bandwidth is needed
    assert cm.all_to_all_flat_seconds(8e5, 8, 8, 0.0, 7.0) == pytest.approx(8e5 * 7 / 8 / 7e9)
    assert cm.all_to_all_flat_seconds(1e6, 1, 8, 5.0, 1.0) == 0.0


@pytest.mark.parametrize("fn", [cm.all_to_all_flat_seconds, cm.all_to_all_hierarchical_seconds])
@pytest.mark.parametrize("kwargs, name", [
    (dict(volume_bytes=-1.0), "volume_bytes"), (dict(ep=0), "ep"),
    (dict(ranks_per_node=0), "ranks_per_node"), (dict(latency_us=-1.0), "latency_us"),
    (dict(intra_gbps=0.0), "intra_gbps"), (dict(inter_gbps=None), "inter_gbps"),
    (dict(inter_gbps=-2.0), "inter_gbps"), (dict(call_us=math.inf), "call_us"),
    (dict(ep=6), "ranks_per_node"),  # 6 ranks do not fill nodes of 4
])
def test_alltoall_models_bad_parameter_raises_naming_it(fn, kwargs, name):
    base = dict(volume_bytes=1e6, ep=16, ranks_per_node=4, latency_us=1.0, intra_gbps=10.0,
                inter_gbps=1.0, call_us=0.0)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn(**{**base, **kwargs})


@pytest.mark.parametrize("comm, gemm, chunks, overhead, expected", [
    (4.0, 6.0, 1, 0.0, 10.0),        # no chunking: nothing hidden
    (4.0, 6.0, 2, 0.0, 8.0),         # max 6 + min 4 / 2
    (4.0, 6.0, 4, 0.0, 7.0),
    (6.0, 4.0, 4, 0.0, 7.0),         # symmetric in comm and GEMM
    (4.0, 6.0, 4, 1.0, 8.5),         # comm 4 + 3·1 = 7 > GEMM 6: 7 + 6/4
    (0.0, 5.0, 8, 0.0, 5.0),
])
def test_pipelined_step_hand_computed(comm, gemm, chunks, overhead, expected):
    t = cm.pipelined_step_seconds(comm, gemm, chunks, overhead)
    assert t == pytest.approx(expected, rel=1e-12)
    # the two-stage pipeline it stands for: (c + g)/n + (n - 1)·max(c, g)/n
    c = comm + (chunks - 1) * overhead
    assert t == pytest.approx((c + gemm) / chunks + (chunks - 1) * max(c, gemm) / chunks)


def test_pipelined_matches_predict_layer_overlap():
    # overlap fraction 1 - 1/n of predict_layer = n chunks without overhead
    r = cm.predict_layer(**SMALL, overlap=0.75)
    t = cm.pipelined_step_seconds(r["comm_ms"], r["gemm_ms"], 4)
    assert t == pytest.approx(r["step_ms"], rel=1e-12)


@pytest.mark.parametrize("kwargs, name", [
    (dict(comm_s=-1.0), "comm_s"), (dict(gemm_s=math.nan), "gemm_s"), (dict(chunks=0), "chunks"),
    (dict(chunks=1.5), "chunks"), (dict(chunk_overhead_s=-1e-6), "chunk_overhead_s"),
])
def test_pipelined_bad_parameter_raises_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cm.pipelined_step_seconds(**{**dict(comm_s=1.0, gemm_s=1.0, chunks=2), **kwargs})


def test_message_latency_adds_per_peer():
    base = cm.all_to_all_seconds(1e9, 16, 8, 450.0, 50.0, latency_us=5.0)
    per = cm.all_to_all_seconds(1e9, 16, 8, 450.0, 50.0, latency_us=5.0, message_latency_us=2.0)
    assert per - base == pytest.approx(15 * 2e-6, rel=1e-9)
    with pytest.raises(ValueError, match=r"\bmessage_latency_us\b"):
        cm.predict_layer(**SMALL, message_latency_us=-1.0)


def _cluster_result(tmp_path, fit: dict):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"date": "2026-12-02", "fit": fit}))
    return path


def test_main_uses_a_cluster_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sb, "plot_cost_model", lambda cm, path: False)
    monkeypatch.setattr(sb, "_machine_info", lambda: {"cpu": "test"})
    fit = cm.fit_alltoall(_synthetic(20.0, 5.0, 40.0, 4.0, 4, (2, 4, 8), (1e4, 1e6)), 4)
    src = _cluster_result(tmp_path, fit)
    out = tmp_path / "s.json"
    sb.main(["--skip-measure", "--fit", str(src), "--ep-sizes", "8", "16", "--cm-experts", "16",
             "--out", str(out)])
    a = json.loads(out.read_text())["cost_model"]["assumptions"]
    assert a["gpus_per_node"] == 4 and a["fit_source"] == str(src)
    for key, want in (("nvlink_gbps", 40.0), ("ib_gbps", 4.0), ("latency_us", 20.0),
                      ("message_latency_us", 5.0)):
        assert a[key] == pytest.approx(want, rel=1e-9), key
        assert a["source"][key] == "fitted"
    assert a["fitted"] == ["gpus_per_node", "ib_gbps", "latency_us", "message_latency_us",
                           "nvlink_gbps"]
    assert a["assumed"] == ["gemm_tflops", "overlap"]
    text = capsys.readouterr().out
    assert f"FITTED from {src}" in text and "[fitted]" in text
    # the rows use them: ep 16 on G = 4: 15 messages, 4/16 of V over NVLink(intra), 12/16 over IB
    rows = json.loads(out.read_text())["cost_model"]["rows"]
    v = cm.a2a_bytes(4096, 7168, 8, 2)
    want = 20e-6 + 15 * 5e-6 + max(v * 3 / 16 / 40e9, v * 12 / 16 / 4e9)
    assert rows[1]["a2a_ms"] == pytest.approx(want * 1e3, rel=1e-9)


def test_main_fit_of_one_node_keeps_ib_assumed_and_cli_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sb, "plot_cost_model", lambda cm, path: False)
    monkeypatch.setattr(sb, "_machine_info", lambda: {"cpu": "test"})
    fit = cm.fit_alltoall(_synthetic(0.0, 5.0, 3.0, None, 8, (2, 4, 8), (1e4, 1e6)), 8)
    src = _cluster_result(tmp_path, fit)
    out = tmp_path / "s.json"
    sb.main(["--skip-measure", "--fit", str(src), "--nvlink-gbps", "100", "--out", str(out)])
    a = json.loads(out.read_text())["cost_model"]["assumptions"]
    assert a["source"]["nvlink_gbps"] == "given" and a["nvlink_gbps"] == 100.0
    assert a["source"]["ib_gbps"] == "assumed" and a["ib_gbps"] == 50.0
    assert a["source"]["message_latency_us"] == "fitted"
    assert "ib_gbps" in a["assumed"]


@pytest.mark.parametrize("content, match", [
    ({"date": "x"}, "holds no 'fit'"),
    ({"fit": {"error": "no all-to-all was measured"}}, "fit failed"),
])
def test_main_bad_fit_file_names_the_option(tmp_path, content, match, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit):
        sb.main(["--skip-measure", "--fit", str(path)])
    err = capsys.readouterr().err
    assert "--fit" in err and match in err
