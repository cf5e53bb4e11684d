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
