"""One decoder-only transformer forward pass (Llama, Mistral, Qwen2), written against a Backend.

No numba and no formats here: the Backend chooses kernels by weight type and device, the KV
cache hides behind `Backend.attention`, and the layers come from a LayerSource, fetched and
released one at a time (streamed models read them in behind the compute). Every activation
goes into a buffer of the runner's Workspace when the pass fits it, so a warm decode step
allocates nothing per layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from engine.config import ModelConfig
from engine.kv_cache import ForwardBatch
from engine.weights import LayerWeights, ModelWeights

if TYPE_CHECKING:
    from engine.backends import Array, Backend
    from engine.layer_placement import LayerSource


class Workspace:
    """Activation buffers allocated once by the backend, for passes of up to `tokens` tokens
    and `logit_rows` rows of logits. `get` hands out the first `rows` rows of one; a pass
    larger than the workspace (scoring a whole prompt) gets None, and the ops allocate."""

    def __init__(self, backend: Backend, config: ModelConfig, tokens: int, logit_rows: int):
        c = config
        widths = {
            "x": (c.hidden_size,),  # the residual stream
            "h": (c.hidden_size,),  # norm outputs and the linears that feed the residual
            "qkv": (c.q_size + 2 * c.kv_size,),
            "q": (c.num_heads, c.head_dim),
            "k": (c.num_kv_heads, c.head_dim),
            "attn": (c.q_size,),
            "gate_up": (2 * c.intermediate_size,),
            "act": (c.intermediate_size,),
        }
        self._buffers = {name: backend.empty((tokens, *w)) for name, w in widths.items()}
        final = {"last": (c.hidden_size,), "last_norm": (c.hidden_size,), "logits": (c.vocab_size,)}
        self._buffers.update({n: backend.empty((logit_rows, *w)) for n, w in final.items()})

    def get(self, name: str, rows: int) -> Array | None:
        buffer = self._buffers[name]
        return buffer[:rows] if rows <= buffer.shape[0] else None


class Transformer:
    def __init__(
        self, config: ModelConfig, weights: ModelWeights, layers: LayerSource, backend: Backend
    ) -> None:
        self.config = config
        self.weights = weights  # embeddings, final norm and head; layers come from `layers`
        self.layers = layers
        self.backend = backend
        self.inv_freq = config.rope.inv_freq(config.head_dim)
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.window = config.sliding_window or 0

    def forward(self, batch: ForwardBatch, ws: Workspace) -> np.ndarray:
        """Run the batch's tokens; return float32 logits (len(batch.logits_rows), vocab).

        Logits in a workspace buffer are valid until the next pass.
        """
        be, w, c = self.backend, self.weights, self.config
        t = len(batch.token_ids)
        x = be.embed(w.embed, batch.token_ids, out=ws.get("x", t))
        for i in range(c.num_layers):
            layer = self.layers.fetch(i)
            try:
                x = be.add_(x, self._attention_block(i, layer, x, batch, ws))
                h = be.rmsnorm(x, layer.ffn_norm, c.rms_norm_eps, out=ws.get("h", t))
                gate_up = be.linear(h, layer.gate_up, out=ws.get("gate_up", t))
                act = be.silu_mul(gate_up, out=ws.get("act", t))
                x = be.add_(x, be.linear(act, layer.down, out=ws.get("h", t)))
            finally:
                self.layers.release(i)
        rows = len(batch.logits_rows)
        last = be.take_rows(x, batch.logits_rows, out=ws.get("last", rows))
        last = be.rmsnorm(last, w.final_norm, c.rms_norm_eps, out=ws.get("last_norm", rows))
        return be.to_numpy(be.linear(last, w.lm_head, out=ws.get("logits", rows)))

    def _attention_block(
        self, i: int, layer: LayerWeights, x: Array, batch: ForwardBatch, ws: Workspace
    ) -> Array:
        be, c, t = self.backend, self.config, len(batch.token_ids)
        h = be.rmsnorm(x, layer.attn_norm, c.rms_norm_eps, out=ws.get("h", t))
        qkv = be.linear(h, layer.qkv, out=ws.get("qkv", t))
        q_out = ws.get("q", t)  # None exactly when ws.get("k", t) is
        qk_out = None if q_out is None else (q_out, ws.get("k", t))
        q, k, v = be.split_qkv(qkv, c.num_heads, c.num_kv_heads, c.head_dim, out=qk_out)
        be.rope(q, batch.positions, self.inv_freq)
        be.rope(k, batch.positions, self.inv_freq)
        attn = be.attention(i, q, k, v, batch, self.scale, self.window, out=ws.get("attn", t))
        return be.linear(attn, layer.o_proj, out=ws.get("h", t))
