"""Tiny random-weight Hugging Face models of each supported architecture, saved to disk.

They share SmolLM2's tokenizer (so `LLM` can load them) and are big enough in init scale that
greedy decoding has clear winners instead of near-ties.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 49152

BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# name -> (config class, model class, overrides)
VARIANTS = {
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama-mha-tied-rope3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
            "rope_theta": 50000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "llama-linear-rope-mqa": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"num_key_value_heads": 1, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
    "llama-all-biases": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"attention_bias": True, "mlp_bias": True},
    ),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2-bias-tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"tie_word_embeddings": True, "num_attention_heads": 8, "num_key_value_heads": 2},
    ),
    # q/k norms, and a head_dim other than hidden / heads
    "qwen3-qknorm-tied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"tie_word_embeddings": True, "head_dim": 32, "num_hidden_layers": 4},
    ),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    # dynamic NTK stretches past max_position_embeddings: the 40-token tests cross 24
    "llama-dynamic-ntk": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"max_position_embeddings": 24, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    ),
    "phi3-fused": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False}),
    # LongRoPE switches to its long factors past 32 positions, within the 40-token tests
    "phi3-longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "original_max_position_embeddings": 32,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                "long_factor": [1.2, 1.5, 2.1, 2.9, 4.0, 5.5, 7.5, 10.0],
            },
        },
    ),
    # sliding and global layers with their own ropes, q/k norms, sandwich norms, GELU gate
    "gemma3_text-mixed": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            },
        },
    ),
    # alternating sliding and global layers, one rope, soft-capping small enough to bite
    "gemma2-softcap": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "num_hidden_layers": 3,
        },
    ),
    # a plain-MLP layer between MoE ones, top 2 of 8 renormalised
    "qwen3_moe-renorm": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 3,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    # top 3 of 4, weights as the softmax gives them
    "qwen3_moe-softmax": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 48,
            "norm_topk_prob": False,
            "tie_word_embeddings": True,
        },
    ),
    "mixtral-window": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 48,
            "sliding_window": 16,
            "num_key_value_heads": 1,
        },
    ),
    "qwen3-bias-untied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"tie_word_embeddings": False, "attention_bias": True, "num_key_value_heads": 1},
    ),
}


def build_tiny_model(name: str, folder: Path, tokenizer, dtype=torch.float32, shard: bool = False):
    """Save a seeded random model `name` plus tokenizer to `folder`; return the HF model (f32)."""
    config_cls, model_cls, overrides = VARIANTS[name]
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initialises biases to zero and q/k norms to one; make them matter
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
            if path.endswith(("q_norm", "k_norm")):
                module.weight.normal_(1.0, 0.3)
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dim() == 1 and not weight.any():
                weight.normal_(0.0, 0.3)  # Gemma's norms, stored as w and applied as 1 + w
            elif weight is not None and not weight.any():
                weight.normal_(0.0, 1.0)  # routers start at zero: every expert would tie
        for param in model.parameters():  # stacked experts are bare parameters
            if param.dim() == 3 and not param.any():
                param.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(folder, max_shard_size="2MB" if shard else "10GB")
    tokenizer.save_pretrained(folder)
    return model.to(torch.float32)
