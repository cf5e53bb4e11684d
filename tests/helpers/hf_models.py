"""Tiny random transformers models of every family ``integrations.hf`` converts, in float64
(H = 12 differs from 2F = 16 and from F, so a transposed weight cannot pass); every weight but
the norms' (HF's ones) drawn at random, none zero."""

from __future__ import annotations

import torch
import transformers as T

COMMON = dict(vocab_size=32, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64)
DS = dict(q_lora_rank=None, kv_lora_rank=4, qk_rope_head_dim=2, qk_nope_head_dim=4,
          v_head_dim=4, first_k_dense_replace=0)

def configs():
    return {
        "mixtral": T.MixtralConfig(**COMMON, intermediate_size=8, num_local_experts=4,
                                   num_experts_per_tok=2),
        "qwen2_moe": T.Qwen2MoeConfig(**COMMON, intermediate_size=16, moe_intermediate_size=8,
                                      shared_expert_intermediate_size=10, num_experts=4,
                                      num_experts_per_tok=2, norm_topk_prob=True),
        "qwen3_moe": T.Qwen3MoeConfig(**COMMON, intermediate_size=16, moe_intermediate_size=8,
                                      num_experts=4, num_experts_per_tok=2, head_dim=6),
        "olmoe": T.OlmoeConfig(**COMMON, intermediate_size=8, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": T.DeepseekV3Config(**COMMON, **DS, intermediate_size=16,
                                          moe_intermediate_size=8, n_routed_experts=8,
                                          num_experts_per_tok=3, n_group=4, topk_group=2,
                                          n_shared_experts=1, routed_scaling_factor=2.5),
        "deepseek_v2": T.DeepseekV2Config(**COMMON, **DS, intermediate_size=16,
                                          moe_intermediate_size=8, n_routed_experts=8,
                                          num_experts_per_tok=3, n_group=4, topk_group=2,
                                          topk_method="group_limited_greedy",
                                          n_shared_experts=1, routed_scaling_factor=1.5),
        "gpt_oss": T.GptOssConfig(**COMMON, intermediate_size=8, num_local_experts=4,
                                  num_experts_per_tok=2, head_dim=6),
        "llama4": T.Llama4TextConfig(**COMMON, intermediate_size=8, intermediate_size_mlp=16,
                                     num_local_experts=4, num_experts_per_tok=1, head_dim=6),
    }

def build(name, seed=0):
    cfg = configs()[name]
    torch.manual_seed(seed)
    cfg._experts_implementation = "eager"  # the loop over experts: float64 (grouped_mm is not)
    model = (T.Llama4ForCausalLM(cfg) if name == "llama4" else
             T.AutoModelForCausalLM.from_config(cfg)).double()
    with torch.no_grad():  # random, never zero (HF zero-inits some biases and routers)
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.copy_(torch.randn_like(p) * 0.5)
    for module in model.modules():  # DeepSeek-V3 keeps its selection bias in float32
        if getattr(module, "e_score_correction_bias", None) is not None:
            module.e_score_correction_bias = torch.randn(
                module.e_score_correction_bias.shape, dtype=torch.float32) * 0.1
    return model


# ---- dense models (integrations.hf.upcycle / merge_dense_models) ------------------------------

DENSE_COMMON = dict(vocab_size=32, hidden_size=12, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def dense_configs():
    """Tiny dense configs of the families ``upcycle`` supports, each with fields off their
    defaults that change attention, norms or RoPE (so a field not carried over shows in the
    logits): grouped-query attention everywhere; Llama head_dim 8 != H/heads, RoPE theta 500,
    eps 1e-5; Mistral a sliding window of 3 tokens; Qwen2 sliding attention on layer 1 only,
    tied embeddings; Qwen3 head_dim 4, attention bias, linear RoPE scaling."""
    return {
        "llama": T.LlamaConfig(**DENSE_COMMON, head_dim=8, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
        "mistral": T.MistralConfig(**DENSE_COMMON, sliding_window=3,
                                   rope_parameters={"rope_type": "default",
                                                    "rope_theta": 2000.0}),
        "qwen2": T.Qwen2Config(**DENSE_COMMON, use_sliding_window=True, sliding_window=3,
                               max_window_layers=1, tie_word_embeddings=True),
        "qwen3": T.Qwen3Config(**DENSE_COMMON, head_dim=4, attention_bias=True,
                               rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 300.0}),
    }


def build_dense(name, seed=0, config=None):
    """A tiny dense causal LM of ``dense_configs()[name]`` (or ``config``) in float64, every
    weight drawn at random and none zero (the norms' around 1)."""
    cfg = config if config is not None else dense_configs()[name]
    cfg._experts_implementation = "eager"  # carried into the upcycled model: float64 experts
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else torch.randn_like(p) * 0.5)
    return model
