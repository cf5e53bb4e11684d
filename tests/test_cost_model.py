"""The EP cost model of benchmarks/scaling_bench.py: formulas on hand-computed small numbers,
monotonicity in the EP size, and ValueError naming every bad parameter."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import scaling_bench as sb

# a layer whose communication and GEMM times are equal at ep=16 (hand-computed below):
# V = T·k·H·b = 1000·1·1000·1 = 1e6 B; ep=16, G=8: f_nv = 7/16, f_ib = 8/16;
# t_a2a = max(1e6·7/16 / 450e9, 1e6·0.5 / 50e9) = max(9.72e-7, 1e-5) = 1e-5 s; t_comm = 4e-5 s;
# FLOPs = 3 · 2·T·k·H·3F = 18·1e9 = 1.8e10; at 450 TFLOP/s t_gemm = 4e-5 s.
SMALL = dict(tokens=1000, hidden=1000, ffn=1000, experts=16, top_k=1, dtype_bytes=1, ep=16,
             gpus_per_node=8, nvlink_gbps=450.0, ib_gbps=50.0, gemm_tflops=450.0)


def test_a2a_bytes_is_tokens_topk_hidden_bytes():
    assert sb.a2a_bytes(4, 8, 2, 2) == 4 * 2 * 8 * 2 == 128
    assert sb.a2a_bytes(4096, 7168, 8, 2) == 469_762_048


@pytest.mark.parametrize("ep,g,expected", [
    (1, 8, (1.0, 0.0, 0.0)),
    (4, 8, (1 / 4, 3 / 4, 0.0)),
    (8, 8, (1 / 8, 7 / 8, 0.0)),
    (16, 8, (1 / 16, 7 / 16, 8 / 16)),
    (256, 8, (1 / 256, 7 / 256, 248 / 256)),
    (8, 4, (1 / 8, 3 / 8, 4 / 8)),
])
def test_link_fractions(ep, g, expected):
    got = sb.link_fractions(ep, g)
    assert got == pytest.approx(expected, abs=1e-15)
    assert sum(got) == pytest.approx(1.0, abs=1e-15)


def test_all_to_all_seconds_takes_slower_link():
    # ep=16: IB part 1e9·0.5/50e9 = 0.01 s beats NVLink part 1e9·7/16/450e9 = 9.72e-4 s
    assert sb.all_to_all_seconds(1e9, 16, 8, 450.0, 50.0) == pytest.approx(0.01, rel=1e-12)
    assert sb.all_to_all_seconds(1e9, 16, 8, 450.0, 50.0, latency_us=5.0) == pytest.approx(
        0.010005, rel=1e-12)
    # one node: NVLink only, 9e9·7/8 / 450e9 = 0.0175 s
    assert sb.all_to_all_seconds(9e9, 8, 8, 450.0, 50.0) == pytest.approx(0.0175, rel=1e-12)
    # a single rank sends nothing over any link
    assert sb.all_to_all_seconds(9e9, 1, 8) == 0.0
    # NVLink slower than IB share: 1e9·7/16 / 1e9 = 0.4375 s
    assert sb.all_to_all_seconds(1e9, 16, 8, 1.0, 50.0) == pytest.approx(0.4375, rel=1e-12)


def test_expert_gemm_flops():
    # per row: 2·H·2F + 2·F·H = 2·8·32 + 2·16·8 = 768; 8 rows (T·k) -> 6144 forward
    assert sb.expert_gemm_flops(4, 8, 16, 2) == (6144, 12288)
    # GELU/ReLU: 2·H·F + 2·F·H = 512 per row
    assert sb.expert_gemm_flops(4, 8, 16, 2, "gelu") == (4096, 8192)
    assert sb.expert_gemm_flops(4, 8, 16, 2, "relu") == (4096, 8192)


def test_predict_layer_hand_computed():
    r = sb.predict_layer(**SMALL)
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
    r = sb.predict_layer(**SMALL, overlap=overlap)
    assert r["step_ms"] == pytest.approx(step_ms, rel=1e-12)
    assert r["comm_share"] == pytest.approx(share, abs=1e-12)
    assert r["comm_ms"] == pytest.approx(0.04, rel=1e-12)  # total traffic time unchanged


def test_overlap_hides_at_most_the_shorter_part():
    # GEMM 4x the communication: full overlap leaves the GEMM time, comm fully hidden
    r = sb.predict_layer(**{**SMALL, "gemm_tflops": 112.5}, overlap=1.0)
    assert r["gemm_ms"] == pytest.approx(0.16, rel=1e-12)
    assert r["step_ms"] == pytest.approx(0.16, rel=1e-12)
    assert r["comm_share"] == pytest.approx(0.0, abs=1e-12)


def test_latency_adds_four_times_per_layer():
    r0 = sb.predict_layer(**SMALL)
    r1 = sb.predict_layer(**SMALL, latency_us=10.0)
    assert r1["comm_ms"] - r0["comm_ms"] == pytest.approx(0.04, rel=1e-9)


def test_more_ep_ranks_more_inter_node_traffic():
    kw = {k: v for k, v in SMALL.items() if k != "ep"}
    kw["experts"] = 256
    rows = sb.cost_model_rows(sb.EP_SIZES, **kw)
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
    ib = [sb.link_fractions(64, g)[2] for g in (4, 8, 16, 32)]
    assert ib == pytest.approx([60 / 64, 56 / 64, 48 / 64, 32 / 64])


def test_default_model_is_comm_bound_across_nodes():
    rows = sb.cost_model_rows(sb.EP_SIZES, **sb.DEFAULT_MODEL,
                              **{k: v for k, v in sb.DEFAULT_ASSUMPTIONS.items()})
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
        sb.predict_layer(**{**SMALL, name: bad})


def test_indivisible_layouts_raise():
    with pytest.raises(ValueError, match=r"experts 24 is not divisible by ep 16"):
        sb.predict_layer(**{**SMALL, "experts": 24})
    with pytest.raises(ValueError, match=r"\bep 12\b.*gpus_per_node 8"):
        sb.link_fractions(12, 8)
    with pytest.raises(ValueError, match=r"\bvolume_bytes\b"):
        sb.all_to_all_seconds(-1.0, 8)


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
