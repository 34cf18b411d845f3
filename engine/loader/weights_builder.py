"""Turn a TensorSource into ModelWeights, checking every tensor against the config."""

from __future__ import annotations

import numpy as np

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.loader.tensor_source import TensorSource
from engine.weights import DenseWeight, LayerWeights, ModelWeights


class _Reader:
    """Fetches tensors by Hugging Face name and reports missing or mis-shaped ones by name."""

    def __init__(self, source: TensorSource, where: str) -> None:
        self.source = source
        self.where = where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if not self.source.has(name):
            raise ModelLoadError(f"{self.where} has no tensor {name!r}")
        found = self.source.shape(name)
        if found != shape:
            raise ModelLoadError(
                f"tensor {name!r} in {self.where} has shape {found}, but the config implies {shape}"
            )
        return self.source.load(name)


def build_weights(config: ModelConfig, source: TensorSource, where: str) -> ModelWeights:
    """Load and fuse all weights of `config`'s model from `source` (described as `where`)."""
    r = _Reader(source, where)
    c = config
    embed = r.get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    layers = [_build_layer(r, c, i) for i in range(c.num_layers)]
    final_norm = r.get("model.norm.weight", (c.hidden_size,))
    if c.tie_word_embeddings:
        lm_head = DenseWeight(embed)
    else:
        lm_head = DenseWeight(r.get("lm_head.weight", (c.vocab_size, c.hidden_size)))
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _build_layer(r: _Reader, c: ModelConfig, i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    h = c.hidden_size
    q = r.get(p + "self_attn.q_proj.weight", (c.q_size, h))
    k = r.get(p + "self_attn.k_proj.weight", (c.kv_size, h))
    v = r.get(p + "self_attn.v_proj.weight", (c.kv_size, h))
    bias = None
    if c.qkv_bias:
        bias = np.concatenate(
            [
                r.get(p + "self_attn.q_proj.bias", (c.q_size,)),
                r.get(p + "self_attn.k_proj.bias", (c.kv_size,)),
                r.get(p + "self_attn.v_proj.bias", (c.kv_size,)),
            ]
        )
    gate = r.get(p + "mlp.gate_proj.weight", (c.intermediate_size, h))
    up = r.get(p + "mlp.up_proj.weight", (c.intermediate_size, h))
    return LayerWeights(
        attn_norm=r.get(p + "input_layernorm.weight", (h,)),
        qkv=DenseWeight(np.concatenate([q, k, v]), bias),
        o_proj=DenseWeight(r.get(p + "self_attn.o_proj.weight", (h, c.q_size))),
        ffn_norm=r.get(p + "post_attention_layernorm.weight", (h,)),
        gate_up=DenseWeight(np.concatenate([gate, up])),
        down=DenseWeight(r.get(p + "mlp.down_proj.weight", (h, c.intermediate_size))),
    )
