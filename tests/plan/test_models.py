"""Model shapes: the presets' parameter counts (exact, against the Hugging Face transformers
implementation of the same configs, and against what the authors publish), and the reading of
HF config.json files of every family ``integrations.hf`` converts."""

from __future__ import annotations

import json

import pytest

from moe_parallel.plan import model_from_hf_config, preset, total_params
from moe_parallel.plan.models import PRESETS, active_params, layer_pieces

# Parameters of transformers 5.25's model of each published config.json, built on the meta
# device (``AutoModelForCausalLM.from_config``): transformers builds no MTP module, so these are
# the main models. ``test_presets_equal_transformers`` recounts them where transformers is
# installed.
HF_TOTALS = {
    "mixtral-8x7b": 46_702_792_704,
    "mixtral-8x22b": 140_630_071_296,
    "deepseek-v3": 671_026_404_352,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-235b-a22b": 235_093_634_560,
    "gpt-oss-120b": 116_829_156_672,
}

# The published config.json fields of each preset (the sources are cited in models.py).
HF_CONFIGS = {
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
    "mixtral-8x22b": dict(model_type="mixtral", hidden_size=6144, intermediate_size=16384,
                          num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                          vocab_size=32768, num_local_experts=8, num_experts_per_tok=2),
    "deepseek-v3": dict(model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61,
                        first_k_dense_replace=3, num_attention_heads=128,
                        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        vocab_size=129280, n_group=8, topk_group=4, norm_topk_prob=True,
                        routed_scaling_factor=2.5, topk_method="noaux_tc",
                        num_nextn_predict_layers=1, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, vocab_size=151936, norm_topk_prob=True,
                          tie_word_embeddings=False),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                            intermediate_size=12288, moe_intermediate_size=1536,
                            num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                            norm_topk_prob=True, tie_word_embeddings=False),
    "gpt-oss-120b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880,
                         num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, num_local_experts=128, num_experts_per_tok=4,
                         vocab_size=201088, swiglu_limit=7.0, attention_bias=True,
                         tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_totals_are_exact_and_match_what_is_published(name):
    model = preset(name)
    main = total_params(model, include_mtp=False)
    assert main == HF_TOTALS[name]
    published = model.published["total"]   # "46.7B", "141B", "671B", "30.5B", "235B", "116.83B"
    assert abs(main - published) <= 0.005 * published


def test_deepseek_v3_mtp_module_is_the_published_11_5b_layer_plus_its_projection():
    model = preset("deepseek-v3")
    layer = sum(p.count for p in layer_pieces(model, "moe"))
    assert round(layer / 1e8) == 115                                 # "11.5B unique parameters"
    mtp = total_params(model) - total_params(model, include_mtp=False)
    assert mtp == layer + 2 * 7168 * 7168 + 3 * 7168                 # + eh_proj and three norms


@pytest.mark.parametrize("name,with_embedding,published", [
    ("mixtral-8x7b", True, 12.9e9),       # "12.9B parameters per token"
    ("mixtral-8x22b", True, 39e9),        # "39B active"
    ("gpt-oss-120b", False, 5.13e9),      # "5.13B active", embedding excluded
])
def test_active_parameters_match_what_is_published(name, with_embedding, published):
    active = active_params(preset(name), include_embedding=with_embedding)
    assert abs(active - published) <= 0.01 * published


def test_unknown_model_names_the_argument_and_the_known_ones():
    with pytest.raises(ValueError, match=r"--model: unknown model 'mixtral-8x9b'.*deepseek-v3"):
        preset("mixtral-8x9b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_published_configs_read_as_the_presets(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIGS[name]))
    spec, ref = model_from_hf_config(tmp_path), preset(name)
    assert total_params(spec) == total_params(ref)
    assert (spec.layer_kinds, spec.experts, spec.top_k, spec.expert_ffn, spec.shared_ffn,
            spec.mtp_layers) == (ref.layer_kinds, ref.experts, ref.top_k, ref.expert_ffn,
                                 ref.shared_ffn, ref.mtp_layers)


def _meta_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_equal_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = dict(HF_CONFIGS[name])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert _meta_count(config) == total_params(preset(name), include_mtp=False)


TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, intermediate_size=96)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2,
                      mlp_only_layers=[0]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      head_dim=32, mlp_only_layers=[1]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, n_shared_experts=2, q_lora_rank=24,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        n_group=2, topk_group=1, num_key_value_heads=4),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=None,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=80,
                        interleave_moe_layer_step=2, head_dim=16),
}


@pytest.mark.parametrize("with_transformers", [True, False], ids=["hf-config", "json-only"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_hf_config_of_every_family_counts_as_transformers_builds_it(
        model_type, with_transformers, tmp_path, monkeypatch):
    """A saved config of each family: the planner's count equals the transformers model's,
    read through transformers' config class and through the plain JSON reader."""
    transformers = pytest.importorskip("transformers")
    import moe_parallel.plan.hf_config as hc

    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **FAMILIES[model_type]})
    config.save_pretrained(tmp_path)
    if not with_transformers:
        monkeypatch.setattr(hc, "_namespace", lambda data, t: hc._JsonConfig(data, t))
    spec = model_from_hf_config(tmp_path / "config.json")
    assert total_params(spec, include_mtp=False) == _meta_count(config)
    assert spec.mtp_layers == (1 if model_type == "deepseek_v3" else 0)


def test_hf_config_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="--config: no such file"):
        model_from_hf_config(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="--config: cannot read"):
        model_from_hf_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"--config .*model_type 'llama' is not supported; "
                                         r"supported: .*mixtral"):
        model_from_hf_config({"model_type": "llama", "hidden_size": 8})
    gelu = dict(HF_CONFIGS["mixtral-8x7b"], hidden_act="gelu")
    with pytest.raises(ValueError, match="--config .*hidden_act='gelu' is not supported"):
        model_from_hf_config(gelu)
