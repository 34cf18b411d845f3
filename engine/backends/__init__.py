"""The Backend protocol: the few ops model.py calls, implemented by cpu.py and cuda.py.

A backend owns where arrays live (numpy on the CPU, numba device arrays on a GPU) and picks a
kernel by weight format. Every op that produces an activation takes `out=`: the runner's
workspace passes preallocated views, so a warm decode step allocates nothing per layer;
without it the op allocates (tests, one-off calls).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from engine.kv_cache import ForwardBatch
    from engine.weights import ExpertWeights, ModelWeights, Weight

Array = Any  # np.ndarray on the CPU, a numba DeviceNDArray on a GPU


class Backend(Protocol):
    name: str
    # True when the backend computes in memory of its own (a GPU): weights are placed there
    # under a device budget, and layers that do not fit are copied in while others compute.
    separate_memory: bool
    # Bytes of the experts `moe_add_` has run (each once a pass): what a mixture of experts
    # reads beyond its shared weights, for the bench's bytes per token.
    expert_bytes_read: int

    def prepare_weights(
        self, weights: ModelWeights, layers: Collection[int] | None = None
    ) -> None: ...

    def empty(self, shape: tuple[int, ...], dtype: str = "float32") -> Array: ...

    def allocate_kv(self, shape: tuple[int, ...], dtype: str) -> Array: ...

    def free_memory(self) -> int: ...

    def embed(self, table: Weight, token_ids: np.ndarray, *, out: Array | None = None) -> Array: ...

    def linear(self, x: Array, weight: Weight, *, out: Array | None = None) -> Array: ...

    def norm_linear(
        self, x: Array, norm: Array, eps: float, weight: Weight, *, out: Array | None = None
    ) -> Array:
        """rmsnorm(x) with weights `norm`, then the linear: one fused op where the format
        allows, so the normalised x never makes a round trip through memory."""
        ...

    def linear_add_(
        self, residual: Array, x: Array, weight: Weight, *, gated: bool = False
    ) -> Array:
        """residual += x @ weight (with `gated`, x is [gate | up] and the input is
        silu(gate) * up); returns residual. The residual stream's add rides on the linear."""
        ...

    def attention(
        self,
        layer: int,
        qkv: Array,
        batch: ForwardBatch,
        heads: int,
        inv_freq: np.ndarray,
        scale: float,
        window: int,
        *,
        out: Array | None = None,
        softcap: float = 0.0,
    ) -> Array:
        """From the fused projections qkv (T, (H + 2 Hkv) D): rotate q and k to the batch's
        positions, write k and v into the layer's paged cache, and attend each sequence's new
        queries over its own blocks (scores capped to softcap * tanh(score / softcap) when
        softcap > 0); -> (T, H * D)."""
        ...

    def qk_norm_(
        self, qkv: Array, q_norm: Array, k_norm: Array, eps: float, heads: int, kv_heads: int
    ) -> Array:
        """In place on the fused projections qkv (T, (H + 2 Hkv) D): each of the H query
        heads rmsnormed with q_norm (D,), each of the Hkv key heads with k_norm (Qwen3, before
        rope); returns qkv."""
        ...

    def moe_add_(
        self,
        residual: Array,
        norm: Array,
        eps: float,
        experts: ExpertWeights,
        top_k: int,
        normalize: bool,
    ) -> Array:
        """residual += the mixture of experts of rmsnorm(residual) with weights `norm`: the
        router's softmax picks each token's top_k experts (their weights renormalised to sum
        to one when `normalize`), and only those experts run (SwiGLU MLPs), each weighted
        by its probability; returns residual."""
        ...

    def softcap_(self, x: Array, cap: float) -> Array:
        """x = cap * tanh(x / cap) in place (Gemma 2's final logits); returns x."""
        ...

    def scale_(self, x: Array, factor: float) -> Array:
        """x *= factor in place (Gemma's embeddings, scaled by sqrt(hidden)); returns x."""
        ...

    def glu(self, gate_up: Array, activation: str, *, out: Array | None = None) -> Array:
        """act(gate) * up of gate_up (T, 2F) = [gate | up]; activation "silu" or
        "gelu_tanh"; -> (T, F)."""
        ...

    def norm_add_(self, residual: Array, x: Array, norm: Array, eps: float) -> Array:
        """residual += rmsnorm(x) with weights `norm` (Gemma's post-norms); returns residual."""
        ...

    def take_rows(self, x: Array, rows: np.ndarray, *, out: Array | None = None) -> Array: ...

    def to_numpy(self, x: Array) -> np.ndarray: ...


class DeviceBackend(Backend, Protocol):
    """A backend with memory of its own (`separate_memory`): placement copies layers in
    through pinned host buffers and device buffers, ordered on its stream."""

    stream: Any  # the numba CUDA stream the kernels run on

    def pinned_empty(self, nbytes: int) -> np.ndarray: ...

    def device_empty(self, nbytes: int) -> Array: ...
