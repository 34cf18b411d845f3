"""Turn a TensorSource into ModelWeights, checking every tensor against the config."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.config import ModelConfig
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loader.tensor_source import TensorSource
from engine.weights import DenseWeight, LayerWeights, ModelWeights, Weight


class _Reader:
    """Fetches tensors by Hugging Face name, reports missing or mis-shaped ones by name, and
    remembers what it read so that tensors the model would silently ignore can be refused."""

    def __init__(self, source: TensorSource, where: str) -> None:
        self.source = source
        self.where = where
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if not self.source.has(name):
            raise ModelLoadError(f"{self.where} has no tensor {self.source.describe(name)}")
        found = self.source.shape(name)
        if found != shape:
            raise ModelLoadError(
                f"tensor {self.source.describe(name)} in {self.where} has shape {found}, "
                f"but the config implies {shape}"
            )
        self.used.add(name)
        return self.source.load(name)

    def optional(self, name: str, shape: tuple[int, ...], required: bool) -> np.ndarray | None:
        return self.get(name, shape) if required or self.source.has(name) else None

    def linear(self, prefix: str, shape: tuple[int, int], bias: bool = False) -> DenseWeight:
        """`prefix`.weight, plus `prefix`.bias when the config requires it or the file has it."""
        return DenseWeight(
            self.get(prefix + ".weight", shape), self.optional(prefix + ".bias", shape[:1], bias)
        )

    def refuse_unused(self) -> None:
        unused = self.source.unused(self.used)
        if unused:
            shown = ", ".join(sorted(unused)[:5]) + (" ..." if len(unused) > 5 else "")
            raise UnsupportedModelError(
                f"{self.where} has {len(unused)} tensor(s) this architecture does not use "
                f"(an unsupported variant?): {shown}"
            )


Quantizer = Callable[[DenseWeight], Weight]


def _keep(weight: DenseWeight) -> Weight:
    return weight


def build_weights(
    config: ModelConfig, source: TensorSource, where: str, quantize: Quantizer | None = None
) -> ModelWeights:
    """Load and fuse all weights of `config`'s model from `source` (described as `where`).

    `quantize` is applied to each matrix as soon as it is loaded, so peak memory stays near
    the quantized size plus one float32 layer, however large the float32 model would be.
    """
    r = _Reader(source, where)
    c = config
    q = quantize or _keep
    embed = q(DenseWeight(r.get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))))
    layers = [_build_layer(r, c, i, q) for i in range(c.num_layers)]
    final_norm = r.get("model.norm.weight", (c.hidden_size,))
    # As transformers does, a stored lm_head wins even when the config says embeddings are tied.
    if source.has("lm_head.weight") or not c.tie_word_embeddings:
        lm_head = q(r.linear("lm_head", (c.vocab_size, c.hidden_size)))
    else:
        lm_head = embed
    r.refuse_unused()
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _build_layer(r: _Reader, c: ModelConfig, i: int, q: Quantizer) -> LayerWeights:
    p = f"model.layers.{i}."
    h = c.hidden_size
    qp = r.linear(p + "self_attn.q_proj", (c.q_size, h), c.qkv_bias)
    kp = r.linear(p + "self_attn.k_proj", (c.kv_size, h), c.qkv_bias)
    vp = r.linear(p + "self_attn.v_proj", (c.kv_size, h), c.qkv_bias)
    gate = r.linear(p + "mlp.gate_proj", (c.intermediate_size, h), c.mlp_bias)
    up = r.linear(p + "mlp.up_proj", (c.intermediate_size, h), c.mlp_bias)
    return LayerWeights(
        attn_norm=r.get(p + "input_layernorm.weight", (h,)),
        qkv=q(_fuse(qp, kp, vp)),
        o_proj=q(r.linear(p + "self_attn.o_proj", (h, c.q_size), c.o_bias)),
        ffn_norm=r.get(p + "post_attention_layernorm.weight", (h,)),
        gate_up=q(_fuse(gate, up)),
        down=q(r.linear(p + "mlp.down_proj", (h, c.intermediate_size), c.mlp_bias)),
    )


def _fuse(*parts: DenseWeight) -> DenseWeight:
    """Stack linears that read the same input into one, so a layer makes fewer matmul calls."""
    data = np.concatenate([w.data for w in parts])
    if all(w.bias is None for w in parts):
        return DenseWeight(data)
    biases = [w.bias if w.bias is not None else np.zeros(w.out_features, np.float32) for w in parts]
    return DenseWeight(data, np.concatenate(biases))
