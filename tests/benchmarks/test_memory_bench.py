"""benchmarks.memory and benchmarks.step_memory: the breakdown of saved storages, the peak
across threads, each rank's bytes by category under the sharding modes, the CLI and its PNG."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from benchmarks.memory import (
    layout_name,
    main,
    peak_live_bytes,
    saved_tensor_breakdown,
    saved_tensor_bytes,
)
from moe_parallel import MoEConfig, MoELayer
from tests.helpers.dist_harness import get_pool

# every expert dimension divisible by EDP = 2 and 4: FSDP pads nothing
TINY = dict(vocab=32, hidden=16, ffn=32, experts=4, top_k=2, layers=2, heads=2)
SEQ_LEN, BATCH = 16, 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_breakdown_lists_each_storage_once_and_sums_to_the_totals():
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2,
                    params_dtype=torch.float64)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    parts = saved_tensor_breakdown(lambda: layer(x), layer.parameters())
    totals = saved_tensor_bytes(lambda: layer(x), layer.parameters())
    assert sum(p.nbytes for p in parts if not p.param) == totals["activations"]
    assert sum(p.nbytes for p in parts if p.param) == totals["params"]
    rows = [p for p in parts if p.shape == (18, 16)]  # the expert input rows, T·k = 18
    assert len(rows) == 1 and rows[0].nbytes == 18 * 16 * 8 and "grouped" in rows[0].site


def test_peak_counts_a_free_made_on_another_thread():
    """8000 B allocated, handed to a thread that frees it, then 8000 B again: the peak is
    8000 (a running sum of this thread's events alone would say 16000)."""
    holder = []

    def step():
        holder.append(torch.empty(1000, dtype=torch.float64))
        t = threading.Thread(target=holder.clear)
        t.start()
        t.join()
        b = torch.empty(1000, dtype=torch.float64)
        del b

    assert peak_live_bytes(step) == 8000


@pytest.mark.distributed
def test_memory_cli_tiny(tmp_path):
    out = tmp_path / "memory.json"
    main(["--configs", "--ep", "2", "--ep-tokens", "24", "8", "--ep-hidden", "16",
          "--ep-ffn", "32", "--ep-experts", "4", "--worlds", "0", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m benchmarks memory")
    ep = record["ep"]
    assert {m["mode"] for m in ep} == {"none", "activation", "experts"}
    assert {m["rank"] for m in ep} == {0, 1}
    for m in ep:
        assert 0 < m["peak"] <= m["peak_bound"], m
    assert sum(m["rows_sent"] for m in ep if m["mode"] == "none") == (24 + 8) * 2


def _by_mode(layout: dict) -> dict[str, dict]:
    """On a pool rank: ``step_memory.measure`` of ``TINY`` in each sharding mode (no
    recompute), and the whole model's bytes."""
    from benchmarks.step_memory import full_model_bytes, measure
    from tests.helpers.dist_harness import parallel_state

    ps = parallel_state(**layout)
    got = {shard: measure(ps, TINY, SEQ_LEN, BATCH, shard) for shard in
           ("none", "optimizer", "experts")}
    return dict(got, full=full_model_bytes(TINY, SEQ_LEN), edp=ps.edp, dp=ps.dp)


def _moments(m: dict) -> int:
    """The experts' parameters + gradients + AdamW moments (the step counters apart)."""
    return (m["expert_params"] + m["expert_grads"] + m["expert_optimizer"]
            - m["expert_optimizer_scalars"])


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [dict(ep=2), dict(ep=1)], ids=["ep2-edp2", "ep1-edp4"])
def test_sharding_modes_divide_what_they_shard(layout):
    """4 ranks. EDP-sharded (FSDP2): every rank's expert weights, gradients and AdamW moments
    are exactly 1/(EP·ETP·EDP) of the model's (nothing padded at these sizes), its step
    counters those of the replicated rank. Optimizer-sharded (ZeRO-1): weights, gradients and
    activations as replicated, less optimizer state on every rank, and over all ranks exactly
    the replicated state divided by EDP (experts) and DP (the rest): each tensor's state lives
    on one rank of its group."""
    ranks = get_pool(4).run(_by_mode, layout, timeout=300)
    ep = layout["ep"]
    edp, dp, full = ranks[0]["edp"], ranks[0]["dp"], ranks[0]["full"]
    assert edp == 4 // ep and dp == 4
    for r in ranks:
        none, opt, fsdp = r["none"], r["optimizer"], r["experts"]
        # replicated: the rank holds 1/EP of the model's experts, the moments twice the weights
        assert none["expert_params"] * ep == full["expert_params"]
        assert _moments(none) * ep == 4 * full["expert_params"]
        # EDP-sharded: 1/(EP·EDP) of the replicated total
        assert fsdp["expert_params"] * ep * edp == full["expert_params"]
        assert fsdp["expert_grads"] * ep * edp == full["expert_params"]
        assert _moments(fsdp) * ep * edp == _moments(none) * ep
        assert fsdp["expert_optimizer_scalars"] == none["expert_optimizer_scalars"] > 0
        assert fsdp["params"] < none["params"] and fsdp["optimizer"] < none["optimizer"]
        # optimizer-sharded: only the optimizer state shrinks
        for key in ("params", "grads", "activations", "expert_params", "expert_grads"):
            assert opt[key] == none[key], key
        assert 0 < opt["optimizer"] < none["optimizer"]
    experts = sum(r["optimizer"]["expert_optimizer"] for r in ranks)
    assert experts * edp == sum(r["none"]["expert_optimizer"] for r in ranks)
    dense = sum(r["optimizer"]["optimizer"] - r["optimizer"]["expert_optimizer"] for r in ranks)
    assert dense * dp == sum(r["none"]["optimizer"] - r["none"]["expert_optimizer"]
                             for r in ranks)


@pytest.mark.distributed
def test_memory_cli_step_sweep_tiny(tmp_path):
    """The sweep through the CLI on 4 fresh gloo ranks: every (layout, mode, rank) recorded
    with the command, the fullest rank's categories summing to its total, and the PNG."""
    out = tmp_path / "memory.json"
    main(["--configs", "--ep", "0", "--worlds", "4", "--step-shards", "none", "experts",
          "--step-recompute", "none", "experts", "--step-vocab", "32", "--step-hidden", "16",
          "--step-ffn", "32", "--step-experts", "4", "--step-heads", "2", "--step-seq-len",
          "16", "--step-batch", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m benchmarks memory --configs --ep 0")
    step = record["step"]
    assert len(step["ranks"]) == 3 * 4 * 4  # layouts x modes x ranks
    assert {r["layout_name"] for r in step["fullest"]} == {"ep4", "ep2·edp2", "ep1·edp4"}
    assert len(step["fullest"]) == 3 * 4
    for r in step["fullest"]:
        parts = [r[c] for c in ("params", "grads", "optimizer", "activations")]
        assert all(p > 0 for p in parts) and sum(parts) == r["total"]
        same = [m for m in step["ranks"] if (m["layout_name"], m["shard"], m["recompute"])
                == (r["layout_name"], r["shard"], r["recompute"])]
        assert r["total"] == max(sum(m[c] for c in ("params", "grads", "optimizer",
                                                    "activations")) for m in same)
    # recompute of the experts saves less for backward than no recompute, rank by rank
    saved = {(m["layout_name"], m["shard"], m["recompute"], m["rank"]): m["activations"]
             for m in step["ranks"]}
    for (name, shard, recompute, rank), got in saved.items():
        if recompute == "experts":
            assert 0 < got < saved[(name, shard, "none", rank)]
    pytest.importorskip("matplotlib")
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_layout_name_derives_edp():
    assert layout_name(dict(ep=2, etp=2), 8) == "ep2·etp2·edp2"
    assert layout_name(dict(ep=8), 8) == "ep8"
    assert layout_name(dict(tp=2, ep=2), 4) == "tp2·ep2·edp2"
    assert layout_name({}, 4) == "ep1·edp4"


def test_memory_cli_rejects_an_unknown_world(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--configs", "--ep", "0", "--worlds", "4", "6"])
    assert exc.value.code == 2
    assert "--worlds: [6] not among [4, 8]" in capsys.readouterr().err
