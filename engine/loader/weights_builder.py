"""Turn a TensorSource into ModelWeights, checking every tensor against the config."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.config import ModelConfig
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loader.tensor_source import TensorSource
from engine.quant.formats import Quantizer
from engine.weights import (
    BLOCK_ARRAYS,
    BlockWeight,
    DenseWeight,
    ExpertWeights,
    LayerWeights,
    ModelWeights,
    StackedWeight,
    Weight,
)
from kernels_cpu.simd_blocks import ROWS


class _Reader:
    """Fetches tensors by Hugging Face name, reports missing or mis-shaped ones by name, and
    remembers what it read so that tensors the model would silently ignore can be refused."""

    def __init__(self, source: TensorSource, where: str, native: bool) -> None:
        self.source = source
        self.where = where
        self.native = native
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self._check(name, shape)
        return self.source.load(name)

    def matrix(self, name: str, shape: tuple[int, int]) -> Weight:
        """A weight matrix: in the file's own quantization when loading natively."""
        self._check(name, shape)
        if self.native:
            return self.source.load_native(name)
        return DenseWeight(self.source.load(name))

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.source.has(name):
            raise ModelLoadError(f"{self.where} has no tensor {self.source.describe(name)}")
        found = self.source.shape(name)
        if found != shape:
            raise ModelLoadError(
                f"tensor {self.source.describe(name)} in {self.where} has shape {found}, "
                f"but the config implies {shape}"
            )
        self.used.add(name)

    def optional(self, name: str, shape: tuple[int, ...], required: bool) -> np.ndarray | None:
        return self.get(name, shape) if required or self.source.has(name) else None

    def linear(self, prefix: str, shape: tuple[int, int], bias: bool = False) -> Weight:
        """`prefix`.weight, plus `prefix`.bias when the config requires it or the file has it."""
        weight = self.matrix(prefix + ".weight", shape)
        weight.bias = self.optional(prefix + ".bias", shape[:1], bias)
        return weight

    def refuse_unused(self) -> None:
        unused = self.source.unused(self.used)
        if unused:
            shown = ", ".join(sorted(unused)[:5]) + (" ..." if len(unused) > 5 else "")
            raise UnsupportedModelError(
                f"{self.where} has {len(unused)} tensor(s) this architecture does not use "
                f"(an unsupported variant?): {shown}"
            )


def _keep(weight: Weight, name: str) -> Weight:
    return weight


def build_weights(
    config: ModelConfig,
    source: TensorSource,
    where: str,
    quantize: Quantizer | None = None,
    native: bool = False,
    untie: bool = False,
) -> ModelWeights:
    """Load and fuse all weights of `config`'s model from `source` (described as `where`).

    `quantize` is applied to each matrix as soon as it is loaded, so peak memory stays near
    the quantized size plus one float32 layer, however large the float32 model would be.
    `native`: keep each matrix in the file's own quantization (a GGUF's block types).
    `untie`: give tied embeddings their own output head (quantized as "lm_head"), for a plan
    that stores the two at different precisions.
    """
    r = _Reader(source, where, native)
    c = config
    q = quantize or _keep
    table = r.matrix("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    embed = q(table, "embed")
    layers = [_build_layer(r, c, i, q) for i in range(c.num_layers)]
    final_norm = r.get("model.norm.weight", (c.hidden_size,))
    if c.norm_plus_one:  # stored as w, applied as 1 + w (Gemma)
        final_norm = (final_norm + np.float32(1)).astype(np.float32)
    # As transformers does, a stored lm_head wins even when the config says embeddings are tied.
    if source.has("lm_head.weight") or not c.tie_word_embeddings:
        lm_head = q(r.linear("lm_head", (c.vocab_size, c.hidden_size)), "lm_head")
    elif untie:
        lm_head = q(table, "lm_head")
    else:
        lm_head = embed
    r.refuse_unused()
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _build_layer(r: _Reader, c: ModelConfig, i: int, q: Quantizer) -> LayerWeights:
    p = f"model.layers.{i}."
    h = c.hidden_size
    if c.fused_projections:  # stored as lamina runs them
        qkv = r.linear(p + "self_attn.qkv_proj", (c.q_size + 2 * c.kv_size, h), c.qkv_bias)
    else:
        qkv = _fuse(
            *(
                r.linear(p + f"self_attn.{t}_proj", (rows, h), c.qkv_bias)
                for t, rows in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size))
            )
        )
    mlp: dict = {}
    if c.is_moe(i):
        mlp["experts"] = _build_experts(r, c, i, q)
    else:
        if c.fused_projections:
            gate_up = r.linear(p + "mlp.gate_up_proj", (2 * c.intermediate_size, h), c.mlp_bias)
        else:
            gate_up = _fuse(*(r.linear(p + f"mlp.{t}_proj", (c.intermediate_size, h), c.mlp_bias)
                              for t in ("gate", "up")))  # fmt: skip
        down = r.linear(p + "mlp.down_proj", (h, c.intermediate_size), c.mlp_bias)
        mlp["gate_up"] = q(gate_up, f"layers.{i}.gate_up")
        mlp["down"] = q(down, f"layers.{i}.down")

    def norm(name: str, size: int = h) -> np.ndarray:
        weight = r.get(p + name + ".weight", (size,))
        return (weight + np.float32(1)).astype(np.float32) if c.norm_plus_one else weight

    norms = {}
    if c.qk_norm:
        norms = {f"{t}_norm": norm(f"self_attn.{t}_norm", c.head_dim) for t in ("q", "k")}
    if c.sandwich_norms:  # post_attention_layernorm follows attention here
        norms["post_attn_norm"] = norm("post_attention_layernorm")
        norms["post_ffn_norm"] = norm("post_feedforward_layernorm")
    ffn_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    return LayerWeights(
        attn_norm=norm("input_layernorm"),
        qkv=q(qkv, f"layers.{i}.qkv"),
        o_proj=q(r.linear(p + "self_attn.o_proj", (h, c.q_size), c.o_bias), f"layers.{i}.o_proj"),
        ffn_norm=norm(ffn_norm),
        gate_up=mlp.pop("gate_up", None),
        down=mlp.pop("down", None),
        **mlp,
        **norms,
    )


# Where each MoE architecture keeps its router and experts, and its experts' gate, up and
# down projections, under the Hugging Face names.
_MOE_NAMES = {
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
}


def _build_experts(r: _Reader, c: ModelConfig, i: int, q: Quantizer) -> ExpertWeights:
    """Layer i's router and experts, each expert's gate and up fused as dense MLPs are."""
    block, (gate, up, down) = _MOE_NAMES[c.architecture]
    p = f"model.layers.{i}.{block}."
    h, f = c.hidden_size, c.expert_intermediate_size
    router = r.matrix(p + "gate.weight", (c.num_experts, h))
    if not isinstance(router, DenseWeight):  # a quantized router in a GGUF: float32 anyway
        router = DenseWeight(r.source.load(p + "gate.weight"))
    gate_ups, downs = [], []
    for e in range(c.num_experts):
        x = f"{p}experts.{e}."
        fused = _fuse(r.matrix(x + gate + ".weight", (f, h)), r.matrix(x + up + ".weight", (f, h)))
        gate_ups.append(q(fused, f"layers.{i}.experts.{e}.gate_up"))
        downs.append(q(r.matrix(x + down + ".weight", (h, f)), f"layers.{i}.experts.{e}.down"))
    return ExpertWeights(router, gate_ups, downs)


def _fuse(*parts: Weight) -> Weight:
    """Stack linears that read the same input into one, so a layer makes fewer matmul calls.

    Float matrices, and block-format ones of one layout, are concatenated; a mix (a Q4_K_M
    file's Q4_K attn_q with its Q6_K attn_v) becomes a StackedWeight of concatenated runs.
    """
    bias = None
    if any(w.bias is not None for w in parts):
        bias = np.concatenate(
            [w.bias if w.bias is not None else np.zeros(w.out_features, np.float32) for w in parts]
        )
    runs: list[list[Weight]] = []
    for w in parts:
        # interleaved block rows concatenate in whole groups of 16
        whole = not isinstance(w, BlockWeight) or (
            bool(runs) and runs[-1][-1].out_features % ROWS == 0
        )
        if runs and whole and _layout(runs[-1][0]) == _layout(w):
            runs[-1].append(w)
        else:
            runs.append([w])
    fused = [_concatenated(run) for run in runs]
    if len(fused) == 1:
        fused[0].bias = bias
        return fused[0]
    return StackedWeight(fused, bias)


def _layout(w: Weight) -> tuple:
    return w.layout() if isinstance(w, BlockWeight) else (type(w).__name__,)


def _concatenated(run: list[Weight]) -> Weight:
    first = run[0]
    if len(run) == 1:
        return dataclasses.replace(first, bias=None)
    if isinstance(first, BlockWeight):
        stack = [
            None if first_arr is None else np.concatenate([getattr(w, f) for w in run])
            for f, first_arr in ((f, getattr(first, f)) for f in BLOCK_ARRAYS)
        ]
        kinds = "+".join(dict.fromkeys(w.kind for w in run))
        rows = sum(w.out_features for w in run)
        fields = dict(zip(BLOCK_ARRAYS, stack, strict=True))
        return dataclasses.replace(first, **fields, kind=kinds, out_features=rows, bias=None)
    return DenseWeight(np.concatenate([w.data for w in run]))
