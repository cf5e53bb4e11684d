"""Dense Hugging Face models upcycled (``hf.upcycle``) and merged (``hf.merge_dense_models``)
into MoE models of the corresponding transformers family, in float64 against transformers
itself: the upcycled model's logits equal the dense model's at initialisation, with HF's
forward and with the converted one, under the conditions ``upcycle`` states; the result saves,
loads and exports as a real HF MoE model; a merged model routed one-hot to expert i computes
model i."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from moe_parallel.integrations import hf  # noqa: E402
from tests.helpers.hf_models import build_dense, dense_configs  # noqa: E402

DENSE = sorted(dense_configs())
MOE_CLASS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM",
             "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
EXACT = 1e-10
# HF's (and, by default, our) renormalised top-k weights are float32: with two or more copies
# selected they sum to 1 only to float32 rounding, |sum - 1| <= k 2^-24 (k <= 4 here: 2.4e-7)
FLOAT32_WEIGHTS = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _tokens(seed: int, batch: int = 3, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 32, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _copies_chosen(moe: torch.nn.Module, ids: torch.Tensor, g: int) -> set[int]:
    """The copies (expert // g) that layer 0's router ranks first over the tokens of ``ids``."""
    with torch.no_grad():
        out = moe(ids, output_router_logits=True)
    return set((out.router_logits[0].argmax(-1) // g).tolist())


# (num_experts, top_k, granularity): m = k/g copies selected out of E/g
ONE_COPY = [(4, 1, 1), (4, 2, 2), (8, 4, 4)]  # m = 1: exact with float32 weights
TWO_COPIES = [(4, 2, 1), (8, 4, 2)]  # m = 2: exact only with float64 weights


@pytest.mark.parametrize("E, k, g", ONE_COPY + TWO_COPIES,
                         ids=[f"E{e}k{k}g{g}" for e, k, g in ONE_COPY + TWO_COPIES])
@pytest.mark.parametrize("name", DENSE)
def test_upcycled_logits_equal_the_dense_models(name, E, k, g):
    """HF's forward of the upcycled model, and the converted model's, give the dense logits
    (float64): to 1e-10 when one copy is selected (float32 weights 1/g are exact), else to
    float32 rounding; converted with float64 router scores, to 1e-10 in every case. The router
    does pick different copies for different tokens (condition (3) is exercised)."""
    dense = build_dense(name)
    ids = _tokens(1)
    want = _logits(dense, ids)
    moe = hf.upcycle(dense, E, k, g, seed=3)
    assert type(moe).__name__ == MOE_CLASS[name]
    assert _rel(_logits(dense, ids), want) == 0.0  # the dense model is left as it was
    assert len(_copies_chosen(moe, ids, g)) > 1
    one_copy = k == g
    err_hf = _rel(_logits(moe, ids), want)
    assert err_hf < (EXACT if one_copy else FLOAT32_WEIGHTS), err_hf
    if k == 1:  # MoEConfig refuses renormalised top-1 weights (no router gradient)
        with pytest.raises(ValueError, match="norm_topk_prob=True with top_k=1"):
            hf.convert(copy.deepcopy(moe))
    else:
        ours64 = hf.convert(copy.deepcopy(moe), router_score_dtype=torch.float64)
        assert _rel(_logits(ours64, ids), want) < EXACT
        ours = hf.convert(copy.deepcopy(moe))
        err = _rel(_logits(ours, ids), want)
        assert err < (EXACT if one_copy else FLOAT32_WEIGHTS), err
        assert _rel(_logits(ours, ids), _logits(moe, ids)) < 1e-12  # ours is HF's function


def test_the_float32_weights_are_what_breaks_exactness_with_two_copies():
    """The negative control of the test above: with two copies selected HF's logits do differ
    from the dense ones (by float32 rounding of the weights), so its exact bound is not slack."""
    dense = build_dense("llama")
    ids = _tokens(1)
    err = _rel(_logits(hf.upcycle(dense, 4, 2, 1, seed=3), ids), _logits(dense, ids))
    assert 1e-12 < err < FLOAT32_WEIGHTS, err


@pytest.mark.parametrize("name", DENSE)
def test_upcycled_weights_config_and_determinism(name):
    """Expert e = c·g + s holds shard s of the dense MLP (down scaled by g); router rows equal
    within a copy, different across copies; the MoE config carries the dense fields; the same
    seed gives the same model and the global RNG is untouched."""
    dense = build_dense(name)
    dense.config._attn_implementation = "eager"  # not the default (sdpa): carried over too
    E, k, g = 8, 4, 2
    state = torch.get_rng_state()
    moe = hf.upcycle(dense, E, k, g, seed=5, router_init_std=0.3)
    assert torch.equal(torch.get_rng_state(), state)
    cfg, dcfg = moe.config, dense.config
    assert (cfg._attn_implementation, cfg._experts_implementation) == ("eager", "eager")
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (E, k)
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert width == dcfg.intermediate_size // g
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                  "vocab_size", "tie_word_embeddings", "head_dim", "rope_parameters"):
        assert getattr(cfg, field, None) == getattr(dcfg, field, None), field
    if name != "llama" and name != "mistral":
        assert cfg.norm_topk_prob is True and cfg.decoder_sparse_step == 1
    F = width
    for layer, dlayer in zip(moe.model.layers, dense.model.layers):
        block, mlp = layer.mlp, dlayer.mlp
        for e in range(E):
            c, s = divmod(e, g)
            rows = slice(s * F, (s + 1) * F)
            gate, up = block.experts.gate_up_proj[e].chunk(2)
            assert torch.equal(gate, mlp.gate_proj.weight[rows])
            assert torch.equal(up, mlp.up_proj.weight[rows])
            assert torch.equal(block.experts.down_proj[e], g * mlp.down_proj.weight[:, rows])
            assert torch.equal(block.gate.weight[e], block.gate.weight[c * g])
        copies = block.gate.weight.detach()[::g]
        assert torch.cdist(copies, copies).fill_diagonal_(1).min() > 0
        assert 0.15 < float(copies.std()) < 0.6  # N(0, 0.3²)
    again = hf.upcycle(dense, E, k, g, seed=5, router_init_std=0.3)
    other = hf.upcycle(dense, E, k, g, seed=6, router_init_std=0.3)
    a, b, c = (dict(m.named_parameters()) for m in (moe, again, other))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"],
                           c["model.layers.0.mlp.gate.weight"])


def test_qwen2_shared_expert_starts_at_zero():
    """Qwen2-MoE's shared expert: the requested width, a zero down projection (its output is
    exactly 0), random gate and up projections."""
    moe = hf.upcycle(build_dense("qwen2"), 4, 2, 2, shared_expert_intermediate_size=6)
    for layer in moe.model.layers:
        shared = layer.mlp.shared_expert
        assert shared.down_proj.weight.shape == (12, 6)
        assert not shared.down_proj.weight.any() and shared.up_proj.weight.all()


def _dense_with(name: str, **fields) -> torch.nn.Module:
    cfg = dense_configs()[name]
    for k, v in fields.items():
        setattr(cfg, k, v)
    return build_dense(name, config=type(cfg)(**cfg.to_dict()))


@pytest.mark.parametrize("name, fields, match", [
    ("llama", dict(attention_bias=True), "llama: attention_bias=True is not supported"),
    ("llama", dict(mlp_bias=True), "llama: mlp_bias=True is not supported"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1,
                   layer_types=None), "qwen3: layer_types=.* is not supported"),
])
def test_fields_the_moe_family_cannot_reproduce_are_refused(name, fields, match):
    with pytest.raises(hf.UnsupportedModelError, match=match):
        hf.upcycle(_dense_with(name, **fields), 4, 2)


def test_qwen3_sliding_window_on_every_layer_is_carried():
    """Qwen3 with sliding attention on every layer (a window of 3 < the 7 tokens) becomes a
    Qwen3-MoE with ``use_sliding_window``: the logits stay the dense ones (and differ without
    the window, so the window is in play)."""
    dense = _dense_with("qwen3", use_sliding_window=True, sliding_window=3, max_window_layers=0,
                        layer_types=None)
    assert set(dense.config.layer_types) == {"sliding_attention"}
    ids = _tokens(3)
    moe = hf.upcycle(dense, 4, 2, 2)
    assert moe.config.use_sliding_window and moe.config.sliding_window == 3
    assert _rel(_logits(moe, ids), _logits(dense, ids)) < EXACT
    moe.config.sliding_window = None
    for layer in moe.model.layers:
        layer.self_attn.sliding_window = None
    assert _rel(_logits(moe, ids), _logits(dense, ids)) > 1e-3


def test_unsupported_models_and_bad_arguments_are_named():
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=32, hidden_size=12, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2))
    with pytest.raises(hf.UnsupportedModelError, match="model_type='mixtral' is not a supported"):
        hf.upcycle(mixtral, 4, 2)
    with pytest.raises(hf.UnsupportedModelError, match="LlamaModel is not a \\*ForCausalLM"):
        hf.upcycle(build_dense("llama").model, 4, 2)
    dense = build_dense("llama")
    bad = [((4, 2, 3), "granularity=3 must divide intermediate_size"),
           ((6, 2, 4), "granularity=4 must divide num_experts=6"),
           ((8, 2, 4), "granularity=4 must divide top_k=2"),
           ((4, 5, 1), "top_k must be <= num_experts"),
           ((0, 1, 1), "num_experts must be an int >= 1"),
           ((4, 2, 0), "granularity must be an int >= 1")]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            hf.upcycle(dense, *args)
    with pytest.raises(ValueError, match="router_init_std must be a float > 0"):
        hf.upcycle(dense, 4, 2, router_init_std=0.0)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size is for Qwen2"):
        hf.upcycle(dense, 4, 2, shared_expert_intermediate_size=4)


# ---- the upcycled model as an HF checkpoint ----------------------------------------------------


@pytest.mark.parametrize("name", DENSE)
def test_upcycled_model_saves_loads_and_exports(name, tmp_path):
    """``save_pretrained`` of the upcycled model: ``from_pretrained`` (the MoE class) and
    ``load_pretrained`` give the dense logits; ``export`` of the converted model is what
    ``save_pretrained`` wrote, and ``from_pretrained`` of it gives our logits."""
    from safetensors.torch import load_file, save_file

    dense = build_dense(name)
    ids = _tokens(2)
    want = _logits(dense, ids)
    moe = hf.upcycle(dense, 4, 2, 2, seed=1)
    moe.save_pretrained(tmp_path / "moe")
    cls = getattr(transformers, MOE_CLASS[name])
    kw = dict(dtype=torch.float64, experts_implementation="eager")
    back = cls.from_pretrained(tmp_path / "moe", **kw)
    assert _rel(_logits(back, ids), want) < EXACT
    ours = hf.load_pretrained(tmp_path / "moe", dtype=torch.float64)
    assert _rel(_logits(ours, ids), want) < EXACT
    exported = hf.export(ours)
    disk = load_file(tmp_path / "moe" / "model.safetensors")
    assert exported.keys() == disk.keys()
    assert all(torch.equal(exported[k], disk[k]) for k in disk)
    out = tmp_path / "exported"
    back.config.save_pretrained(out)
    save_file(exported, out / "model.safetensors", metadata={"format": "pt"})
    again = cls.from_pretrained(out, **kw)
    assert _rel(_logits(again, ids), _logits(ours, ids)) < 1e-12


# ---- merging dense models ----------------------------------------------------------------------


def _sources(name: str, n: int) -> list[torch.nn.Module]:
    """``n`` dense models equal but for their MLPs (each MLP drawn with its own seed)."""
    base = build_dense(name)
    models = []
    for i in range(n):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if ".mlp." in pname:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        models.append(m)
    return models


def _router_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP input (the router's input in the MoE model) on ``ids``, ``[T, H]``."""
    seen = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0]
                                                                                   .shape[-1])))
             for layer in model.model.layers]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _force_expert(merged: torch.nn.Module, source: torch.nn.Module, i: int,
                  ids: torch.Tensor) -> torch.nn.Module:
    """A copy of ``merged`` whose routers give expert ``i`` the logit 120 and every other
    expert 0 on every token of ``ids`` (row i = X⁺·120 for the layer's router inputs X, fewer
    tokens than H, so X·row = 120 to rounding): in float32, softmax is then exactly one-hot
    (e^-120 underflows to 0), so expert i gets weight 1 and any other selected expert 0.
    Once routed so, the merged model's router inputs are model i's."""
    forced = copy.deepcopy(merged)
    with torch.no_grad():
        for layer, x in zip(forced.model.layers, _router_inputs(source, ids)):
            w = layer.mlp.gate.weight
            w.zero_()
            w[i] = torch.linalg.pinv(x) @ torch.full((x.shape[0],), 120.0, dtype=x.dtype)
    return forced


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("name", DENSE)
def test_merged_model_routed_one_hot_computes_that_model(name, top_k):
    """Three dense models that differ only in their MLPs, merged (other weights averaged, or
    taken from one model): routed one-hot to expert i, the merged model's logits equal model
    i's (float64, 1e-12) with HF's forward and with the converted model's."""
    sources = _sources(name, 3)
    ids = _tokens(7, batch=2, seq=5)  # 10 tokens < H = 12
    for dense in ("mean", 1):
        merged = hf.merge_dense_models(sources, top_k=top_k, dense=dense, seed=2)
        assert type(merged).__name__ == MOE_CLASS[name]
        assert merged.config.num_experts == 3
        for i, source in enumerate(sources):
            want = _logits(source, ids)
            forced = _force_expert(merged, source, i, ids)
            assert _rel(_logits(forced, ids), want) < 1e-12, (dense, i)
            if top_k == 1 and name in ("llama", "mistral"):
                continue  # Mixtral's top-1 weight is always 1: MoEConfig refuses it
            ours = hf.convert(copy.deepcopy(forced))
            assert _rel(_logits(ours, ids), want) < 1e-12, (dense, i)
        others = [_rel(_logits(_force_expert(merged, sources[0], j, ids), ids),
                       _logits(sources[0], ids)) for j in (1, 2)]
        assert min(others) > 1e-3  # the experts do differ: routing elsewhere changes the logits


def test_merged_weights_and_checks():
    """Experts are the models' MLPs as they are; dense weights the mean or one model's; models
    whose configs differ are refused naming the field; bad arguments are named."""
    sources = _sources("qwen3", 2)
    with torch.no_grad():  # make the non-MLP weights differ so the mean is visible
        sources[1].model.norm.weight.mul_(3.0)
    mean = hf.merge_dense_models(sources, top_k=2)
    one = hf.merge_dense_models(sources, top_k=2, dense=1)
    norms = [s.model.norm.weight for s in sources]
    assert torch.allclose(mean.model.norm.weight, (norms[0] + norms[1]) / 2, rtol=0, atol=1e-15)
    assert torch.equal(one.model.norm.weight, norms[1])
    for i, s in enumerate(sources):
        for layer, dlayer in zip(mean.model.layers, s.model.layers):
            gate, up = layer.mlp.experts.gate_up_proj[i].chunk(2)
            assert torch.equal(gate, dlayer.mlp.gate_proj.weight)
            assert torch.equal(up, dlayer.mlp.up_proj.weight)
            assert torch.equal(layer.mlp.experts.down_proj[i], dlayer.mlp.down_proj.weight)
    other = _dense_with("qwen3", rms_norm_eps=1e-3)
    with pytest.raises(ValueError, match="differ in config field 'rms_norm_eps'"):
        hf.merge_dense_models([sources[0], other])
    with pytest.raises(ValueError, match="dense must be 'mean' or a model index in \\[0, 2\\)"):
        hf.merge_dense_models(sources, dense=2)
    with pytest.raises(ValueError, match="top_k must be <= the number of models"):
        hf.merge_dense_models(sources, top_k=3)
    with pytest.raises(ValueError, match="models must hold at least one"):
        hf.merge_dense_models([])
