"""The memory model: the activations of the built-in model against the bytes it saves for
backward (one process, float32 and bfloat16, each recompute mode), and the documented formulas
of the sharding, recompute, imbalance and pipeline terms."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_parallel.plan import Layout, MemoryOptions, builtin_model, layout_memory, preset
from moe_parallel.plan.memory import stage_memory

SMALL = dict(vocab=64, hidden=32, ffn=48, experts=8, top_k=2, layers=2, heads=4)


def _recompute_modes() -> list[str]:
    from moe_parallel import MoEConfig

    return (["none", "activation", "experts"]
            if "recompute" in MoEConfig.__dataclass_fields__ else ["none"])


@pytest.mark.parametrize("recompute", _recompute_modes())
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_one_process_activations_match_the_bytes_saved_for_backward(dtype, precision,
                                                                    recompute):
    from benchmarks.memory import saved_tensor_bytes
    from moe_parallel import MoEConfig
    from moe_parallel.train import MoETransformerLM, lm_loss

    extra = {} if recompute == "none" else {"recompute": recompute}
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=48, num_experts=8, top_k=2,
                    params_dtype=dtype, **extra)
    model = MoETransformerLM(cfg, SMALL["vocab"], SMALL["layers"], SMALL["heads"], 32)
    tokens = torch.randint(0, SMALL["vocab"], (2, 33), generator=torch.Generator().manual_seed(1))
    got = saved_tensor_bytes(lambda: lm_loss(model(tokens[:, :-1]), tokens),
                             model.parameters())["activations"]
    rows = [layer.last_stats.expert_rows for layer in model.moe_layers()]
    assert rows == [2 * 32 * 2] * 2  # one process: every assignment is a row
    pred = layout_memory(builtin_model(seq_len=32, **SMALL), Layout(1, recompute=recompute),
                         MemoryOptions(seq_len=32, micro_batch=2, precision=precision))
    assert abs(pred["activations"] - got) <= 0.15 * got, (got, pred["activations"])


def test_deepseek_v3_expert_state_at_ep64_on_1024_gpus():
    """EP=64 on 1,024 GPUs (EDP=16): about 10.2B expert parameters per GPU, bf16 weights
    20 GB, fp32 gradients 41 GB, AdamW master and moments 123 GB; 1/16 of it sharded."""
    model = replace(preset("deepseek-v3"), mtp_layers=0)
    opts = MemoryOptions(seq_len=4096)
    none = layout_memory(model, Layout(1024, ep=64), opts)
    experts = none["param_counts"]["experts"]
    assert experts == 58 * 256 * 3 * 7168 * 2048 / 64
    assert round(experts / 1e8) == 102
    dense = none["param_counts"]["dense"]
    router = none["param_counts"]["router"]
    assert none["params"] == 2 * (dense - router + experts) + 4 * router
    assert (round(2 * experts / 1e9), round(4 * experts / 1e9), round(12 * experts / 1e9)) \
        == (20, 41, 123)
    sharded = layout_memory(model, Layout(1024, ep=64, shard="experts"), opts)
    assert sharded["param_counts"]["experts"] == experts
    assert sharded["params"] == pytest.approx(4 * (dense / 1024 + experts / 16))
    assert sharded["optimizer"] == pytest.approx(8 * (dense / 1024 + experts / 16))


def test_sharding_modes_follow_their_formulas():
    model = preset("mixtral-8x7b")
    opts = MemoryOptions(seq_len=4096, global_batch=256)
    by_mode = {s: layout_memory(model, Layout(64, tp=2, ep=8, shard=s), opts)
               for s in ("none", "optimizer", "experts")}
    c = by_mode["none"]["param_counts"]
    d, r, e = c["dense"], c["router"], c["experts"]
    D, X = 32, 8                      # dp·cp = 64/2, edp = 64/8
    assert by_mode["none"]["optimizer"] == pytest.approx(4 * (d - r + e) + 8 * (d + e))
    assert by_mode["optimizer"]["optimizer"] == pytest.approx((4 * (d - r) + 8 * d) / D
                                                             + 12 * e / X)
    assert by_mode["optimizer"]["params"] == by_mode["none"]["params"]
    assert by_mode["experts"]["grads"] == pytest.approx(4 * (d / D + e / X))
    assert by_mode["experts"]["fsdp_buffers"] > 0 == by_mode["none"]["fsdp_buffers"]
    totals = [by_mode[s]["total"] for s in ("experts", "optimizer", "none")]
    assert totals == sorted(totals)
    for s in by_mode.values():  # the sharding changes no activation
        assert s["activations"] == by_mode["none"]["activations"]


def test_recompute_drops_exactly_the_expert_terms():
    model = preset("qwen3-30b-a3b")
    opts = MemoryOptions(seq_len=4096, imbalance=1.5)
    lay = Layout(16, ep=8, etp=2)
    act = {r: layout_memory(model, replace(lay, recompute=r), opts)["activations"]
           for r in ("none", "activation", "experts")}
    rows = 1.5 * 2 * 4096 * 8            # ρ · etp · T · k received rows per layer
    F = 768 // 2                         # F / etp
    assert act["none"] - act["activation"] == pytest.approx(48 * rows * F * 2)
    assert act["activation"] - act["experts"] == pytest.approx(48 * rows * 2 * F * 2)


def test_imbalance_scales_the_received_rows_and_the_dispatch_buffers():
    model = preset("mixtral-8x7b")
    lay = Layout(8, ep=8)
    one, two = (layout_memory(model, lay, MemoryOptions(seq_len=2048, imbalance=rho))
                for rho in (1.0, 2.0))
    H, F = 4096, 14336
    per_row = 2 * (H + 2 * F + F) + 4    # input, fc1, activation; the fp32 routing weight
    rows = 2048 * 2                      # T·k
    assert two["activations"] - one["activations"] == pytest.approx(32 * rows * per_row)
    assert two["dispatch"] - one["dispatch"] == pytest.approx(2 * H * 2 * rows)
    assert layout_memory(model, Layout(8), MemoryOptions(seq_len=2048))["dispatch"] == 0


def test_pipeline_stages_hold_their_micro_batches_in_flight():
    model = preset("qwen3-30b-a3b")
    lay = Layout(32, pp=4, ep=8)
    opts = MemoryOptions(seq_len=4096, global_batch=64)   # 8 micro-batches per DP rank
    stages = [stage_memory(model, lay, opts, s) for s in range(4)]
    assert [s["in_flight"] for s in stages] == [4, 3, 2, 1]
    assert layout_memory(model, lay, opts)["total"] == max(s["total"] for s in stages)
    few = MemoryOptions(seq_len=4096, global_batch=16)     # 2 micro-batches
    assert stage_memory(model, lay, few, 0)["in_flight"] == 2
    assert stages[0]["param_counts"]["experts"] == stages[3]["param_counts"]["experts"]


@pytest.mark.parametrize("field,value,message", [
    ("imbalance", 0.0, "--imbalance: must be a positive number"),
    ("precision", "fp16", "--precision: must be one of"),
    ("seq_len", 0, "--seq-len: must be a positive int"),
    ("global_batch", -4, "--global-batch: must be a positive int"),
])
def test_bad_options_name_the_argument(field, value, message):
    with pytest.raises(ValueError, match=message):
        MemoryOptions(**{"seq_len": 4096, field: value})
