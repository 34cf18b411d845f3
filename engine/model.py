"""One decoder-only transformer forward pass (Llama, Mistral, Qwen2), written against a Backend.

No numba and no formats here: the Backend chooses kernels by weight type and device, and the
KV cache hides behind `Backend.attention`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import ForwardBatch
from engine.weights import LayerWeights, ModelWeights


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, backend: Any) -> None:
        self.config = config
        self.weights = weights
        self.backend = backend
        self.inv_freq = config.rope.inv_freq(config.head_dim)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.window = config.sliding_window or 0

    def forward(self, batch: ForwardBatch) -> np.ndarray:
        """Run the batch's tokens; return float32 logits (len(batch.logits_rows), vocab)."""
        be, w, c = self.backend, self.weights, self.config
        x = be.embed(w.embed, batch.token_ids)
        for i, layer in enumerate(w.layers):
            x = be.add_(x, self._attention_block(i, layer, x, batch))
            h = be.rmsnorm(x, layer.ffn_norm, c.rms_norm_eps)
            x = be.add_(x, be.linear(be.silu_mul(be.linear(h, layer.gate_up)), layer.down))
        x = be.rmsnorm(be.take_rows(x, batch.logits_rows), w.final_norm, c.rms_norm_eps)
        return be.to_numpy(be.linear(x, w.lm_head))

    def _attention_block(
        self, i: int, layer: LayerWeights, x: np.ndarray, batch: ForwardBatch
    ) -> np.ndarray:
        be, c = self.backend, self.config
        h = be.rmsnorm(x, layer.attn_norm, c.rms_norm_eps)
        qkv = be.linear(h, layer.qkv)
        q, k, v = be.split_qkv(qkv, c.num_heads, c.num_kv_heads, c.head_dim)
        be.rope(q, batch.positions, self.inv_freq)
        be.rope(k, batch.positions, self.inv_freq)
        attn = be.attention(i, q, k, v, batch, self.scale, self.window)
        return be.linear(attn, layer.o_proj)
