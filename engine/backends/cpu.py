"""CPU Backend: numba kernels from kernels_cpu, numpy BLAS for float32 matmuls."""

from __future__ import annotations

import math
import mmap
import statistics
import time
import weakref
from collections.abc import Collection

import numba
import numpy as np
import psutil
from threadpoolctl import ThreadpoolController

import kernels_cpu
from engine.kv_cache import ForwardBatch
from engine.weights import (
    BlockWeight,
    ColskipBlockWeight,
    ColskipInt8Weight,
    DenseWeight,
    ExpertWeights,
    Int8Weight,
    ModelWeights,
    SparseInt8Weight,
    StackedWeight,
    Weight,
)
from kernels_cpu.activations import gelu_tanh_mul_into
from kernels_cpu.colskip_blocks import colskip_matmul_w4_into
from kernels_cpu.colskip_int8 import colskip_matmul_w8
from kernels_cpu.gemv_f32 import matmul_f32_into
from kernels_cpu.matmul_blocks import (
    GATED,
    PLAIN,
    RMSNORM,
    activation_shapes,
    dequantize_rows_into,
    matmul_blocks_into,
    padded_inputs,
)
from kernels_cpu.matmul_int8 import (
    INT16_MAX,
    embed_rows_w8_into,
    gemm_w8_into,
    gemv_w8,
    gemv_w8_into,
)
from kernels_cpu.moe import (
    group_by_expert_into,
    moe_decode_blocks_into,
    moe_decode_w8_into,
    route_top_k_into,
    scale_up_half_,
)
from kernels_cpu.norms import head_rmsnorm_
from kernels_cpu.paged_attention import attend_qkv_into, attention_scratch_shape
from kernels_cpu.simd_blocks import ROWS
from kernels_cpu.sparse_int8 import padded_columns, sparse_matmul_w8, unpack_bitmask

# Up to this many tokens a numba GEMV beats BLAS (and avoids BLAS threads fighting numba's).
SMALL_BATCH = 4
# Up to this many tokens the int8 GEMV (one token at a time over each row) beats the GEMM's
# 4-row x 2-token tiles; from 3 tokens the tiles' reuse wins (1.3-2x at 4-8 tokens).
INT8_GEMV_TOKENS = 2
# Scratch names of the block kernels' quantized activations (matmul_blocks.activation_shapes).
_BLOCK_SCRATCH = ("blocks_xq", "blocks_xsum", "blocks_xs", "blocks_xm")
# The block kernels' norm argument when there is none: read-only, as the layers' norms are.
_NO_NORM = np.empty(0, np.float32)
_NO_NORM.setflags(write=False)
# Found once: building a controller scans the loaded libraries (~0.3 ms); limiting is ~12 us.
_BLAS = ThreadpoolController()


class Scratch:
    """Kernel working memory reused across calls: quantized activations, attention rows,
    activation-sparsity partials.

    Each name owns one flat buffer of one dtype that only grows; `take` hands out a
    C-contiguous view of its front in the requested shape. A kernel's scratch is dead once
    the call returns, so one buffer serves every layer and weight, and after the first pass
    at the largest batch nothing is allocated again. Built views are kept per (name, shape):
    making one costs about as much as dispatching a small kernel. Not for concurrent callers
    (one engine loop drives a backend).
    """

    MAX_VIEWS = 512  # chunked prefills of many sizes: drop the kept views now and then

    def __init__(self, empty=np.empty) -> None:
        self._empty = empty  # (size, dtype) -> a flat array where the kernels run
        self._flat: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        view = self._views.get((name, shape))
        if view is None:
            size = math.prod(shape)
            flat = self._flat.get(name)
            if flat is None or flat.size < size or flat.dtype != dtype:
                flat = self._flat[name] = self._empty(size, dtype)
                self._views = {key: v for key, v in self._views.items() if key[0] != name}
            if len(self._views) >= self.MAX_VIEWS:
                self._views.clear()
            view = self._views[(name, shape)] = flat[:size].reshape(shape)
        return view


class CPUBackend:
    """Runs the model on the CPU.

    numba's thread pool owns the cores. OpenBLAS threads that linger spinning after a GEMM
    steal them from the next numba kernel (measured: decode fell from ~35 to ~5 tok/s), so
    the model's BLAS calls run single-threaded; the user's own numpy keeps its threads.

    Every op writes into `out` when given one (the runner's workspace) and takes its
    kernels' working arrays from `self.scratch`, so with `out` a call allocates no array.
    """

    name = "cpu"
    separate_memory = False
    expert_bytes_read = 0  # see Backend; counted per instance from the first MoE layer on

    def __init__(self) -> None:
        self.scratch = Scratch()
        # The pass whose rotary tables are kept: a weak reference, as the batch holds the KV
        # cache, which holds this backend (a strong one would leave the cache to the GC).
        self._rope_batch: weakref.ref | None = None
        self._rope_tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def empty(self, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
        """An uninitialised activation buffer (the runner's workspace)."""
        return np.empty(shape, dtype=np.dtype(dtype))

    def embed(
        self, table: Weight, token_ids: np.ndarray, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        if out is None:
            out = np.empty((len(token_ids), table.in_features), dtype=np.float32)
        if isinstance(table, Int8Weight):
            embed_rows_w8_into(table.data, table.scale, token_ids, out)
        elif isinstance(table, BlockWeight):
            dequantize_rows_into(*table.kernel_arrays, table.out_features, token_ids, out)
        else:
            kernels_cpu.take_rows_into(table.data, token_ids, out)
        return out

    def linear(self, x: np.ndarray, weight: Weight, *, out: np.ndarray | None = None) -> np.ndarray:
        return self._linear(x, weight, out)

    def norm_linear(
        self,
        x: np.ndarray,
        norm: np.ndarray,
        eps: float,
        weight: Weight,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        return self._linear(x, weight, out, norm=norm, eps=eps)

    def linear_add_(
        self, residual: np.ndarray, x: np.ndarray, weight: Weight, *, gated: bool = False
    ) -> np.ndarray:
        return self._linear(x, weight, residual, gated=gated, accumulate=True)

    def _linear(
        self,
        x: np.ndarray,
        weight: Weight,
        out: np.ndarray | None,
        norm: np.ndarray | None = None,
        eps: float = 0.0,
        gated: bool = False,
        accumulate: bool = False,
    ) -> np.ndarray:
        """The three linear ops: an rmsnorm (`norm`) or gate product (`gated`) before, an add
        into `out` (`accumulate`) after. The int8, block and activation-sparse int4 kernels
        fuse both; other formats compose."""
        tokens = x.shape[0]
        if accumulate and weight.bias is not None:  # out += (x @ W + b), rounded as unfused
            result = self.scratch.take("biased_out", out.shape, np.float32)
            out += self._linear(x, weight, result, norm, eps, gated)
            return out
        if out is None:
            out = np.empty((tokens, weight.out_features), dtype=np.float32)
        h = None  # where the prologue computes the linear's input
        if norm is not None or gated:
            h = self.scratch.take("h", (tokens, weight.in_features), np.float32)
        if type(weight) is Int8Weight:
            self._linear_int8(x, weight, out, h, norm, eps, accumulate)
        elif type(weight) is BlockWeight:
            self._linear_blocks(x, weight, out, h, norm, eps, accumulate)
        elif type(weight) is StackedWeight:
            self._linear_stacked(x, weight, out, h, norm, eps, accumulate)
        elif type(weight) is ColskipBlockWeight:
            self._linear_colskip4(x, weight, out, h, norm, eps, accumulate)
        else:
            self._composed(x, weight, out, h, norm, eps, accumulate)
        if weight.bias is not None:
            kernels_cpu.add_bias_inplace(out, weight.bias)
        return out

    def _linear_int8(self, x, weight: Int8Weight, out, h, norm, eps, accumulate) -> None:
        """Decode streams the int8 bytes; prefill is compute-bound. Both use int16 activations
        and run the prologue and the add themselves."""
        a, a_scale = self._activations(tokens := x.shape[0], weight.in_features)
        if tokens <= INT8_GEMV_TOKENS:
            gemv_w8_into(x, weight.data, weight.scale, out, a, a_scale, h, norm, eps, accumulate)
        else:
            gemm_w8_into(
                x, weight.data, weight.scale, INT16_MAX, out, a, a_scale, h, norm, eps, accumulate
            )

    def _linear_blocks(self, x, weight: BlockWeight, out, h, norm, eps, accumulate) -> None:
        """Block formats (GGUF types, int4) run the prologue and the add themselves."""
        tokens = x.shape[0]
        take = self.scratch.take
        shapes = activation_shapes(tokens, padded_inputs(weight.scale, weight.group))
        scratch = [
            take(name, shape, dtype)
            for name, (shape, dtype) in zip(_BLOCK_SCRATCH, shapes, strict=True)
        ]
        k = weight.in_features
        if h is None:
            prologue, h = PLAIN, take("h", (tokens, k), np.float32)
        else:
            prologue = GATED if norm is None else RMSNORM
        norm = _NO_NORM if norm is None else norm
        matmul_blocks_into(
            x, *weight.kernel_arrays, k, out, *scratch, h, norm, eps, prologue, accumulate
        )

    def _linear_colskip4(self, x, w: ColskipBlockWeight, out, h, norm, eps, accumulate) -> None:
        """Activation-sparse int4 runs the prologue and the add itself."""
        prologue = PLAIN if h is None else (GATED if norm is None else RMSNORM)
        colskip_matmul_w4_into(
            x, w.values, w.scale, w.mins, w.threshold, w.in_features, out, h=h, norm=norm,
            eps=eps, prologue=prologue, accumulate=accumulate, scratch=self.scratch.take,
        )  # fmt: skip

    def _linear_stacked(self, x, weight: StackedWeight, out, h, norm, eps, accumulate) -> None:
        """Parts in different formats: the prologue once, then each part into its columns."""
        x = _prologue(x, h, norm, eps)
        start = 0
        for part in weight.parts:
            columns = out[:, start : start + part.out_features]
            self._linear(x, part, columns, accumulate=accumulate)
            start += part.out_features

    def _composed(self, x, weight: Weight, out, h, norm, eps, accumulate) -> None:
        """A format whose kernel fuses nothing: the prologue, the kernel and the add in turn."""
        kernel = _LINEAR_KERNELS.get(type(weight))
        if kernel is None:
            raise TypeError(f"CPUBackend has no kernel for {type(weight).__name__}")
        x = _prologue(x, h, norm, eps)
        if accumulate:
            result = self.scratch.take("linear_out", out.shape, np.float32)
            kernel(self, x, weight, result)
            out += result
        else:
            kernel(self, x, weight, out)

    def _linear_sparse(self, x: np.ndarray, w: SparseInt8Weight, out: np.ndarray) -> None:
        act = self._activations(x.shape[0], padded_columns(w.in_features))
        sparse_matmul_w8(x, w.mask, w.values, w.row_ptr, w.scale, w.in_features, out=out, act=act)

    def _linear_colskip(self, x: np.ndarray, w: ColskipInt8Weight, out: np.ndarray) -> None:
        colskip_matmul_w8(x, w.data_t, w.scale, w.threshold, out=out, scratch=self.scratch.take)

    def _linear_f32(self, x: np.ndarray, weight: DenseWeight, out: np.ndarray) -> None:
        if x.shape[0] <= SMALL_BATCH:
            matmul_f32_into(x, weight.data, out)
            return
        # As many BLAS threads as the kernels have: a 512-token prefill of the default model
        # ran 486-517 tok/s with one, 535-571 with two (Zen 4, 2 cores, interleaved).
        with _BLAS.limit(limits=numba.get_num_threads(), user_api="blas"):
            np.matmul(x, weight.data.T, out=out)

    def _activations(self, tokens: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Scratch for int16-quantized activations (T, width) and their scales (T,)."""
        take = self.scratch.take
        return take("act", (tokens, width), np.int16), take("act_scale", (tokens,), np.float32)

    def prepare_weights(self, weights: ModelWeights, layers: Collection[int] | None = None) -> None:
        """Stack each mixture-of-experts layer's experts for the fused decode kernels, and
        pick dense or sparse per sparse linear by timing both on one token, as decode runs.

        A bitmask only pays when the kernel can expand it faster than memory delivers the
        dense bytes, which depends on the sparsity, the shape and the CPU. Linears of the same
        shape and sparsity (to 5%) share one measurement; losers are unpacked to dense int8.
        `layers`: the decoder layers to prepare (default: all).
        """
        choices: dict[str, str] = {}
        chosen = range(len(weights.layers)) if layers is None else layers
        for layer in (weights.layers[i] for i in chosen):
            if layer.experts is not None:
                layer.experts.stack()  # for the fused decode kernels
            for name, weight in layer.linears():
                if not isinstance(weight, SparseInt8Weight):
                    continue
                sparsity = 1 - weight.values.size / (weight.out_features * weight.in_features)
                key = f"{weight.out_features}x{weight.in_features}@{round(sparsity * 20) / 20:g}"
                if key not in choices:
                    choices[key] = _faster_format(weight)
                if choices[key] == "dense":
                    layer.set_linear(name, _unpacked(weight))

    def attention(
        self,
        layer: int,
        qkv: np.ndarray,
        batch: ForwardBatch,
        heads: int,
        inv_freq: np.ndarray,
        scale: float,
        window: int,
        *,
        out: np.ndarray | None = None,
        softcap: float = 0.0,
    ) -> np.ndarray:
        cache = batch.cache
        kc, vc = cache.k[layer], cache.v[layer]
        kv_heads, dim = kc.shape[2], kc.shape[3]
        tokens = qkv.shape[0]
        if out is None:
            out = np.empty((tokens, heads * dim), dtype=np.float32)
        elif not out.flags.c_contiguous:  # the (T, H, D) view below would be a copy
            raise ValueError("attention's out must be C-contiguous")
        take = self.scratch.take
        q = take("q", (tokens, heads, dim), np.float32)
        k = take("k", (tokens, kv_heads, dim), np.float32)
        v = take("v", (tokens, kv_heads, dim), np.float32)
        shape = attention_scratch_shape(heads, kv_heads, dim, numba.config.NUMBA_NUM_THREADS)
        scratch = take("attention", shape, np.float32)
        ks = None if cache.k_scale is None else cache.k_scale[layer]
        vs = None if cache.v_scale is None else cache.v_scale[layer]
        cos, sin = self._rope_angles(batch, inv_freq)
        attend_qkv_into(
            qkv, cos, sin, kc, vc, ks, vs, batch.slots, batch.block_tables,
            batch.query_start, batch.context_lens, scale, window, q, k, v,
            out.reshape(tokens, heads, dim), scratch, softcap,
        )  # fmt: skip
        return out

    def _rope_angles(self, batch: ForwardBatch, inv_freq: np.ndarray) -> tuple[np.ndarray, ...]:
        """cos, sin (T, D/2) of the pass's rotary angles: computed at its first layer and
        reused by the others (per layer they took a tenth of a 16-token step's attention).
        Kept per frequency table, for models whose layers rotate differently."""
        if self._rope_batch is None or self._rope_batch() is not batch:
            self._rope_batch, self._rope_tables = weakref.ref(batch), []
        for freq, cos, sin in self._rope_tables:
            if freq is inv_freq or np.array_equal(freq, inv_freq):
                return cos, sin
        shape = (len(batch.positions), len(inv_freq))
        n = len(self._rope_tables)
        cos = self.scratch.take(f"rope_cos{n}", shape, np.float32)
        sin = self.scratch.take(f"rope_sin{n}", shape, np.float32)
        kernels_cpu.rope_angles_into(batch.positions, inv_freq, cos, sin)
        self._rope_tables.append((inv_freq, cos, sin))
        return cos, sin

    def moe_add_(
        self,
        residual: np.ndarray,
        norm: np.ndarray,
        eps: float,
        experts: ExpertWeights,
        top_k: int,
        normalize: bool,
    ) -> np.ndarray:
        """Each expert runs once over the tokens routed to it (a decode step: only its
        token's k experts), its up half scaled by the routing weights, and its down
        projection adds into those tokens' rows of the residual, in expert order."""
        tokens, hidden = residual.shape
        take = self.scratch.take
        x = take("moe_x", residual.shape, np.float32)
        kernels_cpu.rmsnorm_into(residual, norm, eps, x)
        logits = take("moe_logits", (tokens, experts.count), np.float32)
        # Not BLAS, whose bits change with the row count: a token's route must not depend on
        # its batch (and a few dozen rows gain nothing from it).
        matmul_f32_into(x, experts.router.data, logits)
        ids = take("moe_ids", (tokens, top_k), np.int32)
        weights = take("moe_weights", (tokens, top_k), np.float32)
        route_top_k_into(logits, normalize, ids, weights)
        if tokens == 1 and self._moe_decode(x, ids[0], weights[0], experts, residual):
            return residual
        starts = take("moe_starts", (experts.count + 1,), np.int64)
        rows = take("moe_rows", (tokens * top_k,), np.int64)
        scales = take("moe_scales", (tokens * top_k,), np.float32)
        group_by_expert_into(ids, weights, starts, rows, scales)
        bounds = starts.tolist()
        for e in range(experts.count):
            lo, hi = bounds[e], bounds[e + 1]
            if lo == hi:
                continue
            self.expert_bytes_read += experts.expert_nbytes(e)
            n, gate_up = hi - lo, experts.gate_up[e]
            if n == tokens == 1:  # decode: the expert reads and adds into the residual itself
                x_e, out_e = x, residual
            else:
                x_e = take("moe_x_e", (n, hidden), np.float32)
                out_e = take("moe_out_e", (n, hidden), np.float32)
                kernels_cpu.take_rows_into(x, rows[lo:hi], x_e)
                kernels_cpu.take_rows_into(residual, rows[lo:hi], out_e)
            h = self._linear(x_e, gate_up, take("moe_gate_up", (n, gate_up.out_features),
                                                np.float32))  # fmt: skip
            scale_up_half_(h, scales[lo:hi])
            self._linear(h, experts.down[e], out_e, gated=True, accumulate=True)
            if out_e is not residual:
                kernels_cpu.put_rows(out_e, rows[lo:hi], residual)
        return residual

    def _moe_decode(self, x, ids, scales, experts: ExpertWeights, residual) -> bool:
        """One token's experts by the fused kernels when both projections are stacked in
        int8 or in one block format (rows a multiple of 16); whether it ran."""
        stacked = experts.stacked or {}
        gu, dn = stacked.get("gate_up"), stacked.get("down")
        kind = type(gu)
        if kind is not type(dn) or kind not in (Int8Weight, BlockWeight):
            return False
        k, take = len(ids), self.scratch.take
        h, f = residual.shape[1], experts.down[0].in_features
        if kind is BlockWeight and (f * 2 % ROWS or h % ROWS):
            return False
        order = take("moe_order", (k,), np.int32), take("moe_order_scales", (k,), np.float32)
        hidden = take("moe_hidden", (k, 2 * f), np.float32)
        gated = take("moe_gated", (k, f), np.float32)
        partial = take("moe_partial", (k, h), np.float32)
        if kind is Int8Weight:
            a, a_scale = take("moe_a", (k, h), np.int16), take("moe_a_scale", (k,), np.float32)
            a2 = take("moe_a2", (k, f), np.int16)
            a2_scale = take("moe_a2_scale", (k,), np.float32)
            moe_decode_w8_into(
                x, ids, scales, gu.data, gu.scale, dn.data, dn.scale, residual, *order, a,
                a_scale, hidden, gated, a2, a2_scale, partial,
            )  # fmt: skip
        else:
            shapes = (activation_shapes(k, padded_inputs(w.scale[0], w.group)) for w in (gu, dn))
            first, second = (
                [take(f"moe_{name}{i}", shape, dtype)
                 for name, (shape, dtype) in zip(_BLOCK_SCRATCH, pair, strict=True)]
                for i, pair in enumerate(shapes)
            )  # fmt: skip
            moe_decode_blocks_into(
                x, ids, scales, _block_fields(gu), gu.group, gu.zero, _block_fields(dn),
                dn.group, dn.zero, residual, *order, *first, hidden, gated, *second, partial,
            )  # fmt: skip
        for e in ids.tolist():
            self.expert_bytes_read += experts.expert_nbytes(e)
        return True

    def softcap_(self, x: np.ndarray, cap: float) -> np.ndarray:
        x /= np.float32(cap)  # transformers' order: divide, tanh, multiply
        np.tanh(x, out=x)
        x *= np.float32(cap)
        return x

    def scale_(self, x: np.ndarray, factor: float) -> np.ndarray:
        x *= np.float32(factor)
        return x

    def glu(
        self, gate_up: np.ndarray, activation: str, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        if out is None:
            out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
        _GATES[activation](gate_up, out)
        return out

    def norm_add_(
        self, residual: np.ndarray, x: np.ndarray, norm: np.ndarray, eps: float
    ) -> np.ndarray:
        h = self.scratch.take("h", x.shape, np.float32)
        kernels_cpu.rmsnorm_into(x, norm, eps, h)
        residual += h
        return residual

    def qk_norm_(
        self,
        qkv: np.ndarray,
        q_norm: np.ndarray,
        k_norm: np.ndarray,
        eps: float,
        heads: int,
        kv_heads: int,
    ) -> np.ndarray:
        head_rmsnorm_(qkv, 0, heads, q_norm, eps)
        head_rmsnorm_(qkv, heads * q_norm.shape[0], kv_heads, k_norm, eps)
        return qkv

    def take_rows(
        self, x: np.ndarray, rows: np.ndarray, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        if out is None:
            out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
        kernels_cpu.take_rows_into(x, rows, out)
        return out

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def allocate_kv(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return zeroed_huge_pages(shape, np.dtype(dtype))

    def free_memory(self) -> int:
        """Bytes free where `allocate_kv` allocates: available RAM (sizes the KV cache)."""
        return psutil.virtual_memory().available


# The gated activations of `glu`, by name.
_GATES = {"silu": kernels_cpu.silu_mul_into, "gelu_tanh": gelu_tanh_mul_into}

# The formats whose kernels fuse no neighbours (int8 has its own path in `_linear`).
_LINEAR_KERNELS = {
    DenseWeight: CPUBackend._linear_f32,
    SparseInt8Weight: CPUBackend._linear_sparse,
    ColskipInt8Weight: CPUBackend._linear_colskip,
}


def _block_fields(w: BlockWeight) -> tuple:
    """A BlockWeight's arrays in the order the block kernels take them."""
    return (w.values, w.high, w.scale, w.scale_sup, w.mins, w.mins_sup)


def _prologue(x: np.ndarray, h: np.ndarray | None, norm: np.ndarray | None, eps: float):
    """A linear's input computed apart: rmsnorm(x) or the gate product into h (x itself
    when h is None)."""
    if h is None:
        return x
    if norm is not None:
        kernels_cpu.rmsnorm_into(x, norm, eps, h)
    else:
        kernels_cpu.silu_mul_into(x, h)
    return h


def _unpacked(w: SparseInt8Weight) -> Int8Weight:
    return Int8Weight(unpack_bitmask(w.mask, w.values, w.row_ptr, w.in_features), w.scale, w.bias)


def _faster_format(w: SparseInt8Weight, repeats: int = 7) -> str:
    x = np.random.default_rng(0).standard_normal((1, w.in_features)).astype(np.float32)
    dense = _unpacked(w)

    def sparse_call():
        sparse_matmul_w8(x, w.mask, w.values, w.row_ptr, w.scale, w.in_features)

    def dense_call():
        gemv_w8(x, dense.data, dense.scale)

    times = {"sparse": [], "dense": []}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, call in (("sparse", sparse_call), ("dense", dense_call)):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: statistics.median(times[name]))


def zeroed_huge_pages(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero array in anonymous memory backed by transparent huge pages where the OS has them.

    Like np.zeros, memory is only taken when first written. But the KV cache's first writes
    land in the middle of decode steps, and faulting in 4 KB pages cost 6 us each on the
    test machine (a 16-sequence decode step spent 3 ms in them); 2 MB pages fault 25x
    faster per byte.
    """
    nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
    buffer = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
