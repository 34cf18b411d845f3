"""Random-weight models of real shapes, so bandwidth-bound speed can be measured offline.

`random:llama-1b` has TinyLlama-1.1B's shape (hidden 2048, 22 layers, ffn 5632, 32/4 heads),
with SmolLM2's tokenizer and so a 49152-token vocabulary (TinyLlama has 32000). Weights are
N(0, 0.02) in f16, written once to a cache folder as a Hugging Face model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from kernels_cpu.jit_cache import cache_dir

SHAPES = {
    "llama-1b": {
        "hidden": 2048,
        "layers": 22,
        "ffn": 5632,
        "heads": 32,
        "kv_heads": 4,
        "vocab": 49152,
    },
    "llama-tiny": {
        "hidden": 256,
        "layers": 4,
        "ffn": 688,
        "heads": 8,
        "kv_heads": 2,
        "vocab": 49152,
    },
}


def random_model_path(spec: str) -> Path:
    """Folder of the random model named by `random:NAME`, built on first use."""
    name = spec.split(":", 1)[1]
    if name not in SHAPES:
        raise ValueError(f"unknown random model {name!r}; choose from {', '.join(SHAPES)}")
    folder = cache_dir() / f"random-{name}"
    if not (folder / "model.safetensors").exists():
        build_random_model(folder, **SHAPES[name])
    return folder


def build_random_model(folder: Path, hidden, layers, ffn, heads, kv_heads, vocab) -> None:
    from engine.loader.model_loader import load_model

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    tensors = {
        "model.embed_tokens.weight": mat(vocab, hidden),
        "lm_head.weight": mat(vocab, hidden),
    }
    tensors["model.norm.weight"] = np.ones(hidden, np.float16)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = mat(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = mat(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = mat(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = mat(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = mat(ffn, hidden)
        tensors[p + "mlp.up_proj.weight"] = mat(ffn, hidden)
        tensors[p + "mlp.down_proj.weight"] = mat(hidden, ffn)
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, np.float16)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float16)
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    load_model(None).tokenizer.save(folder)
