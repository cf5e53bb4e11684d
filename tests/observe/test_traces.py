"""Routing traces (moe_parallel.observe.traces) and the train job's --trace-routing.

* One process: a recorded MoELayer forward (capacity drops, weights and logits) saved and loaded
  back: every field equal to ``router_recording``'s, and the weights, logits, experts and kept
  mask equal to that forward's ``MoEAux.routing`` (float64, exact), rows matched by key; the
  built-in model with one of its layers traced.
* ``max_bytes``: a budget of one forward keeps the first and leaves the second out; the file
  says truncated. The job's ``--trace-max-mib`` below one forward: empty layers, truncated.
* Tracing a step changes no loss and no parameter of the run; recording is off afterwards.
* Refusals: a missing rank file, rank files of another step or world size, a safetensors file
  that is not a trace, a file that is not safetensors; the trace flags' rules.
* The train job on 4 gloo ranks at tp2·ep2 with --trace-routing: per traced step one row per
  (sequence, position) of the global batch, the routing of one process running the same job
  on the same global batch (no load-balancing loss, so the step-0 update is the same too):
  at steps 0 and 1 the same experts for every key, weights and logits to 1e-12.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from moe_parallel import MoEConfig, MoELayer, train
from moe_parallel.distributed import ParallelState
from moe_parallel.observe.traces import (
    load_trace,
    rank_file,
    save_trace,
    step_dir,
    trace_info,
    trace_steps,
)
from moe_parallel.replay import router_recording, set_router_replay, set_token_keys
from moe_parallel.routing.record import token_key
from tests.helpers.dist_harness import get_pool, own_groups

S, B = 6, 4
BASE = dict(hidden_size=8, ffn_hidden_size=6, num_experts=6, top_k=2,
            params_dtype=torch.float64, init_std=0.5)


def _layer(**changes) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**{**BASE, **changes}))
    layer.train()
    return layer


def _x(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, BASE["hidden_size"], generator=gen, dtype=torch.float64)


def _keys(first: int = 100):
    return torch.arange(first, first + B).view(1, B), torch.arange(S).view(S, 1)


def test_saved_trace_loads_back_equal_to_the_recording_and_the_forward(tmp_path):
    layer = _layer(capacity_factor=0.75)
    seq, pos = _keys()
    set_token_keys(layer, seq, pos)
    set_router_replay(layer, "record", weights=True, logits=True)
    _, aux = layer(_x(), return_aux=True)
    record = router_recording(layer)
    path = save_trace(record, tmp_path, 3, 0, 1)
    assert path == tmp_path / "step_00000003" / "rank_00000.safetensors"
    assert trace_steps(tmp_path) == [3]
    for loaded in (load_trace(path), load_trace(step_dir(tmp_path, 3))):
        assert (loaded.num_experts, loaded.top_k, loaded.layer_names) == (6, 2, [""])
        want, got = record.layers[0].tensors(), loaded.layers[0].tensors()
        assert got.keys() == want.keys() == {"seq_id", "position", "expert_idx", "selected",
                                             "kept", "weights", "logits"}
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    # the forward's routing, token t = s·B + b (sequence-major), rows sorted by key
    r = aux.routing
    keys = token_key(seq.expand(S, B).reshape(-1), pos.expand(S, B).reshape(-1))
    order = torch.sort(keys).indices
    got = load_trace(path).layers[0]
    assert torch.equal(got.keys(), keys[order])
    assert got.weights.dtype == torch.float64
    assert torch.equal(got.weights, r.probs.detach()[order])
    assert torch.equal(got.logits, r.logits.detach()[order])
    assert torch.equal(got.expert_idx, r.expert_idx[order])
    assert torch.equal(got.kept, r.keep[order])
    assert got.selected.all() and not got.kept.all()  # capacity dropped some assignments


def test_the_built_in_model_traces_the_chosen_layer(tmp_path):
    args = train._parse(["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "3",
                         "--heads", "2", "--experts", "4", "--vocab", "32", "--seq-len", "8"])
    model = train.build_model(args, ParallelState.single())
    tokens = torch.randint(0, 32, (B, 8), generator=torch.Generator().manual_seed(2))
    set_router_replay(model, "record", layers=[1], weights=True)
    set_token_keys(model, torch.arange(B).view(1, B), torch.arange(8).view(8, 1))
    model(tokens)
    record = router_recording(model)
    loaded = load_trace(save_trace(record, tmp_path, 0, 0, 1))
    assert loaded.layer_names == ["blocks.1.moe"] and loaded.num_layers == 1
    want, got = record.layers[0].tensors(), loaded.layers[0].tensors()
    assert got.keys() == want.keys() and "logits" not in got
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.layers[0].num_tokens == B * 8


def test_max_bytes_keeps_the_first_forward_and_marks_the_file_truncated(tmp_path):
    layer = _layer()
    per_forward = S * B * (8 + 8 + 2 * 8 + 2 + 2 + 2 * 8)  # keys, idx, masks, weights
    set_router_replay(layer, "record", weights=True, max_bytes=per_forward + 100)
    set_token_keys(layer, *_keys(100))
    layer(_x(1))
    set_token_keys(layer, *_keys(200))
    layer(_x(2))
    truncated = layer.replay.truncated
    assert truncated
    path = save_trace(router_recording(layer), tmp_path, 0, 0, 1, truncated=truncated)
    got = load_trace(path).layers[0]
    assert got.num_tokens == S * B and got.nbytes == per_forward
    assert sorted(set(got.seq_id.tolist())) == list(range(100, 100 + B))
    info = trace_info(path)
    assert info.truncated and info.truncated_ranks == [0]
    untruncated = save_trace(load_trace(path), tmp_path, 1, 0, 1)
    assert not trace_info(untruncated).truncated


TINY = ["--dtype", "float64", "--hidden", "16", "--ffn", "8", "--layers", "2", "--heads", "2",
        "--experts", "4", "--top-k", "2", "--vocab", "32", "--seq-len", "8",
        "--capacity-factor", "0", "--log-every", "100"]


def test_job_budget_below_one_forward_writes_empty_truncated_layers(tmp_path):
    train.main(TINY + ["--steps", "2", "--batch-size", "2", "--trace-routing", str(tmp_path),
                       "--trace-steps", "1", "--trace-max-mib", "0.0001"])
    assert trace_steps(tmp_path) == [1]
    info, record = trace_info(step_dir(tmp_path, 1)), load_trace(step_dir(tmp_path, 1))
    assert info.truncated and info.world_size == 1
    assert [layer.num_tokens for layer in record.layers] == [0, 0]


def test_tracing_leaves_training_unchanged(tmp_path):
    run = TINY + ["--steps", "3", "--batch-size", "2"]
    plain = train.main(run)
    traced = train.main(run + ["--trace-routing", str(tmp_path), "--trace-steps", "1",
                               "--trace-logits"])
    assert traced["history"] == plain["history"]
    for (name, p), q in zip(plain["model"].named_parameters(), traced["model"].parameters()):
        assert torch.equal(p, q), name
    assert trace_steps(tmp_path) == [1]
    assert all(m.replay.mode == "off" for m in traced["model"].moe_layers())


def _two_rank_files(tmp_path, **rank1):
    record = load_trace(save_trace(_recorded(), tmp_path / "a", 2, 0, 2))
    other = {"step": 2, "world_size": 2, **rank1}
    made = save_trace(record, tmp_path / "b", other["step"], 1, other["world_size"])
    shutil.move(str(made), str(rank_file(tmp_path / "a", 2, 1)))
    return step_dir(tmp_path / "a", 2)


def _recorded():
    layer = _layer()
    set_token_keys(layer, *_keys())
    set_router_replay(layer, "record", weights=True)
    layer(_x())
    return router_recording(layer)


def test_refusals(tmp_path):
    path = save_trace(_recorded(), tmp_path / "miss", 2, 0, 2)
    with pytest.raises(ValueError, match=r"world_size=2 needs the files of ranks 0..1; "
                                         r"missing rank\(s\) \[1\]"):
        load_trace(path.parent)
    assert load_trace(path).layers[0].num_tokens == S * B  # the one file alone reads
    with pytest.raises(ValueError, match=r"rank_00001.safetensors and rank_00000.safetensors "
                                         r"disagree on step \(3 vs 2\)"):
        load_trace(_two_rank_files(tmp_path / "step", step=3))
    with pytest.raises(ValueError, match=r"disagree on world_size \(3 vs 2\)"):
        load_trace(_two_rank_files(tmp_path / "world", world_size=3))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"foreign.safetensors: not a routing trace \(metadata "
                                         r"format='pt'"):
        load_trace(foreign)
    shutil.copy(foreign, rank_file(tmp_path / "miss", 2, 1))
    with pytest.raises(ValueError, match=r"rank_00001.safetensors: not a routing trace"):
        load_trace(path.parent)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    with pytest.raises(ValueError, match=r"garbage.safetensors: not a readable safetensors"):
        load_trace(garbage)
    with pytest.raises(ValueError, match=r"no such file or step directory"):
        load_trace(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"save_trace: rank must be < world_size=2, got 2"):
        save_trace(_recorded(), tmp_path, 0, 2, 2)


@pytest.mark.parametrize("flags, message", [
    (["--trace-routing", "T"], "--trace-routing needs --trace-steps"),
    (["--trace-steps", "1"], "--trace-steps need(s) --trace-routing DIR"),
    (["--trace-logits"], "--trace-logits need(s) --trace-routing DIR"),
    (["--trace-routing", "T", "--trace-steps", "0,3"],
     "--trace-steps must lie in [0, --steps 3), got [3]"),
    (["--trace-routing", "T", "--trace-steps", "0", "--trace-layers", "0,2"],
     "--trace-layers must be distinct indices in [0, --layers 2), got 0,2"),
    (["--trace-routing", "T", "--trace-steps", "0", "--trace-max-mib", "0"],
     "--trace-max-mib must be > 0, got 0.0"),
    (["--trace-routing", "T", "--trace-steps", "x"], "expected comma-separated integers"),
])
def test_trace_flag_rules(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train._parse(["--steps", "3", "--layers", "2"] + flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# ---- the train job on 4 ranks -----------------------------------------------------------------

# no load-balancing loss: each rank's is of its own tokens, so the update would differ
DIST = TINY + ["--steps", "2", "--trace-steps", "0,1", "--trace-logits", "--aux-loss-coeff", "0"]
GLOBAL_BATCH, SEQ, E, K = 4, 8, 4, 2


def _traced_job(directory: str) -> list[float]:
    with own_groups():
        out = train.main(DIST + ["--batch-size", "2", "--tp", "2", "--ep", "2",
                                 "--trace-routing", directory])
    return out["history"]


@pytest.mark.distributed
def test_job_traces_on_tp2_ep2_equal_one_process(tmp_path):
    get_pool(4).run(_traced_job, str(tmp_path / "dist"), timeout=300)
    train.main(DIST + ["--batch-size", str(GLOBAL_BATCH), "--trace-routing",
                       str(tmp_path / "one")])
    assert trace_steps(tmp_path / "dist") == trace_steps(tmp_path / "one") == [0, 1]
    # every (sample, position) of the global batch of each step, once
    for step in (0, 1):
        info = trace_info(step_dir(tmp_path / "dist", step))
        assert (info.world_size, info.ranks, info.truncated) == (4, [0, 1, 2, 3], False)
        per_rank = [load_trace(rank_file(tmp_path / "dist", step, r)).layers[0].num_tokens
                    for r in range(4)]
        assert per_rank == [GLOBAL_BATCH * SEQ // 4] * 4  # each tp rank its half of S
        seq = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        want_keys = token_key(seq.repeat_interleave(SEQ), torch.arange(SEQ).repeat(GLOBAL_BATCH))
        dist, one = (load_trace(step_dir(tmp_path / d, step)) for d in ("dist", "one"))
        assert dist.num_layers == one.num_layers == 2
        for a, b in zip(dist.layers, one.layers):
            for r in (a, b):
                assert torch.equal(r.keys(), want_keys)
                assert int(r.expert_idx.min()) >= 0 and int(r.expert_idx.max()) < E
                assert not bool((r.kept & ~r.selected).any())
                assert r.weights.dtype == r.logits.dtype == torch.float64
            # the same routing: step 0 from identical weights, step 1 after an update that
            # equals the one-process update to rounding; every token's top-k order is clear of
            # rounding (margins > 1e-9), so equal experts are required, not a matter of luck
            top = b.logits.sort(dim=1, descending=True).values
            assert float((top[:, :K] - top[:, 1:K + 1]).min()) > 1e-9
            assert float((a.logits - b.logits).abs().max()) <= 1e-12 * float(
                b.logits.abs().max())
            assert torch.equal(a.expert_idx, b.expert_idx)
            assert torch.equal(a.selected, b.selected) and torch.equal(a.kept, b.kept)
            assert float((a.weights - b.weights).abs().max()) <= 1e-12
