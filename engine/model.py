"""One decoder-only transformer forward pass (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, and
the mixtures of experts Qwen3-MoE and Mixtral).

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
from engine.weights import ModelWeights

if TYPE_CHECKING:
    from engine.backends import Array, Backend
    from engine.layer_placement import LayerSource


Widths = dict[str, tuple[int, ...]]


def activation_widths(c: ModelConfig) -> tuple[Widths, Widths]:
    """The workspace's float32 buffers: their shapes per token of a pass, and per row of
    logits (the last token of each sequence)."""
    per_token = {
        "x": (c.hidden_size,),  # the residual stream
        "qkv": (c.q_size + 2 * c.kv_size,),
        "attn": (c.q_size,),
        "gate_up": (2 * c.intermediate_size,),
    }
    if c.sandwich_norms:  # the outputs the post-norms read, and the gate's product
        per_token.update(out=(c.hidden_size,), gated=(c.intermediate_size,))
    per_row = {"last": (c.hidden_size,), "logits": (c.vocab_size,)}
    return per_token, per_row


class Workspace:
    """Activation buffers allocated once by the backend, for passes of up to `tokens` tokens
    and `logit_rows` rows of logits. `views(rows)` maps each buffer's name to its first `rows`
    rows (kept per row count: slicing costs as much as a small kernel call); a buffer too
    small for a pass (scoring a whole prompt) is left out, and the op given None allocates."""

    def __init__(self, backend: Backend, config: ModelConfig, tokens: int, logit_rows: int):
        per_token, per_row = activation_widths(config)
        self._buffers = {name: backend.empty((tokens, *w)) for name, w in per_token.items()}
        self._buffers.update({n: backend.empty((logit_rows, *w)) for n, w in per_row.items()})
        self._views: dict[int, dict[str, Array]] = {}

    def views(self, rows: int) -> dict[str, Array]:
        views = self._views.get(rows)
        if views is None:
            if len(self._views) > 1024:  # chunked prefills of many sizes
                self._views.clear()
            views = self._views[rows] = {
                name: buffer[:rows] for name, buffer in self._buffers.items() if rows <= len(buffer)
            }
        return views


class Transformer:
    def __init__(
        self, config: ModelConfig, weights: ModelWeights, layers: LayerSource, backend: Backend
    ) -> None:
        self.config = config
        self.weights = weights  # embeddings, final norm and head; layers come from `layers`
        self.layers = layers
        self.backend = backend
        self.ropes = [config.layer_rope(i) for i in range(config.num_layers)]
        self.inv_freqs = {rope: rope.inv_freq(config.head_dim) for rope in set(self.ropes)}
        # YaRN and LongRoPE scale cos and sin, so q . k by the factor's square.
        base = config.attention_scale or 1.0 / math.sqrt(config.head_dim)
        self.scales = [base * rope.cos_sin_factor() ** 2 for rope in self.ropes]
        self.windows = [config.window(i) for i in range(config.num_layers)]

    def forward(self, batch: ForwardBatch, ws: Workspace) -> np.ndarray:
        """Run the batch's tokens; return float32 logits (len(batch.logits_rows), vocab).

        Logits in a workspace buffer are valid until the next pass. A layer is five ops: the
        norms ride on the linears after them, the residual adds on the linears before them,
        and rope and the cache write on attention.
        """
        be, w, c = self.backend, self.weights, self.config
        eps = c.rms_norm_eps
        buf = ws.views(len(batch.token_ids)).get
        inv_freqs = self.inv_freqs
        if any(rope.varies_with_length for rope in inv_freqs):  # from the pass's largest
            longest = int(batch.positions.max()) + 1  # position, as transformers does
            inv_freqs = {rope: rope.inv_freq(c.head_dim, longest) for rope in inv_freqs}
        x = be.embed(w.embed, batch.token_ids, out=buf("x"))
        if c.embed_scale != 1.0:
            be.scale_(x, c.embed_scale)
        for i in range(c.num_layers):
            layer = self.layers.fetch(i)
            try:
                qkv = be.norm_linear(x, layer.attn_norm, eps, layer.qkv, out=buf("qkv"))
                if c.qk_norm:
                    be.qk_norm_(qkv, layer.q_norm, layer.k_norm, eps, c.num_heads, c.num_kv_heads)
                attn = be.attention(
                    i, qkv, batch, c.num_heads, inv_freqs[self.ropes[i]], self.scales[i],
                    self.windows[i], out=buf("attn"), softcap=c.attention_softcap,
                )  # fmt: skip
                if c.sandwich_norms:
                    self._sandwich_rest(layer, x, attn, buf)
                    continue
                be.linear_add_(x, attn, layer.o_proj)
                if layer.experts is not None:
                    be.moe_add_(x, layer.ffn_norm, eps, layer.experts, c.experts_per_token,
                                c.normalize_top_k)  # fmt: skip
                    continue
                gate_up = be.norm_linear(x, layer.ffn_norm, eps, layer.gate_up, out=buf("gate_up"))
                be.linear_add_(x, gate_up, layer.down, gated=True)
            finally:
                self.layers.release(i)
        last_buf = ws.views(len(batch.logits_rows)).get
        last = be.take_rows(x, batch.logits_rows, out=last_buf("last"))
        logits = be.norm_linear(last, w.final_norm, eps, w.lm_head, out=last_buf("logits"))
        if c.final_softcap:
            be.softcap_(logits, c.final_softcap)
        return be.to_numpy(logits)

    def _sandwich_rest(self, layer, x: Array, attn: Array, buf) -> None:
        """The rest of a Gemma 2/3 layer, whose norms also follow attention and the MLP:
        x += norm(attn @ o_proj); x += norm(down(act(gate) * up) of norm(x))."""
        be, eps = self.backend, self.config.rms_norm_eps
        be.norm_add_(x, be.linear(attn, layer.o_proj, out=buf("out")), layer.post_attn_norm, eps)
        gate_up = be.norm_linear(x, layer.ffn_norm, eps, layer.gate_up, out=buf("gate_up"))
        gated = be.glu(gate_up, self.config.mlp_activation, out=buf("gated"))
        be.norm_add_(x, be.linear(gated, layer.down, out=buf("out")), layer.post_ffn_norm, eps)
