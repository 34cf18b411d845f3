"""CPU Backend: numba kernels from kernels_cpu, numpy BLAS for float32 matmuls."""

from __future__ import annotations

import mmap
import statistics
import time

import numpy as np
import psutil
from threadpoolctl import ThreadpoolController

import kernels_cpu
from engine.kv_cache import ForwardBatch
from engine.weights import (
    LAYER_LINEARS,
    ColskipInt8Weight,
    DenseWeight,
    Int8Weight,
    ModelWeights,
    SparseInt8Weight,
    Weight,
)
from kernels_cpu.colskip_int8 import colskip_matmul_w8
from kernels_cpu.gemv_f32 import matmul_f32
from kernels_cpu.matmul_int8 import INT16_MAX, embed_rows_w8, gemm_w8, gemv_w8
from kernels_cpu.paged_attention import (
    paged_attention,
    paged_attention_int8,
    write_kv,
    write_kv_int8,
)
from kernels_cpu.sparse_int8 import sparse_matmul_w8, unpack_bitmask

# Up to this many tokens a numba GEMV beats BLAS (and avoids BLAS threads fighting numba's).
SMALL_BATCH = 4
# Up to this many tokens the int8 GEMV (one token at a time over each row) beats the GEMM's
# 4-row x 2-token tiles; from 3 tokens the tiles' reuse wins (1.3-2x at 4-8 tokens).
INT8_GEMV_TOKENS = 2
# Found once: building a controller scans the loaded libraries (~0.3 ms); limiting is ~12 us.
_BLAS = ThreadpoolController()


class CPUBackend:
    """Runs the model on the CPU.

    numba's thread pool owns the cores. OpenBLAS threads that linger spinning after a GEMM
    steal them from the next numba kernel (measured: decode fell from ~35 to ~5 tok/s), so
    the model's BLAS calls run single-threaded; the user's own numpy keeps its threads.
    """

    name = "cpu"

    def embed(self, table: Weight, token_ids: np.ndarray) -> np.ndarray:
        if isinstance(table, Int8Weight):
            return embed_rows_w8(table.data, table.scale, token_ids)
        return np.ascontiguousarray(table.data[token_ids], dtype=np.float32)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return kernels_cpu.rmsnorm(x, weight, eps)

    def linear(self, x: np.ndarray, weight: Weight) -> np.ndarray:
        if isinstance(weight, DenseWeight):
            out = self._linear_f32(x, weight)
        elif isinstance(weight, Int8Weight):
            out = self._linear_int8(x, weight)
        elif isinstance(weight, SparseInt8Weight):
            w = weight
            out = sparse_matmul_w8(x, w.mask, w.values, w.row_ptr, w.scale, w.in_features)
        elif isinstance(weight, ColskipInt8Weight):
            out = colskip_matmul_w8(x, weight.data_t, weight.scale, weight.threshold)
        else:
            raise TypeError(f"CPUBackend has no kernel for {type(weight).__name__}")
        if weight.bias is not None:
            out += weight.bias
        return out

    def _linear_f32(self, x: np.ndarray, weight: DenseWeight) -> np.ndarray:
        if x.shape[0] <= SMALL_BATCH:
            return matmul_f32(x, weight.data)
        with _BLAS.limit(limits=1, user_api="blas"):
            return x @ weight.data.T

    def _linear_int8(self, x: np.ndarray, weight: Int8Weight) -> np.ndarray:
        """Decode streams the int8 bytes; prefill is compute-bound. Both use int16 activations."""
        if x.shape[0] <= INT8_GEMV_TOKENS:
            return gemv_w8(x, weight.data, weight.scale)
        return gemm_w8(x, weight.data, weight.scale, INT16_MAX)

    def prepare_weights(self, weights: ModelWeights) -> None:
        """Pick dense or sparse per sparse linear by timing both on one token, as decode runs.

        A bitmask only pays when the kernel can expand it faster than memory delivers the
        dense bytes, which depends on the sparsity, the shape and the CPU. Linears of the same
        shape and sparsity (to 5%) share one measurement; losers are unpacked to dense int8.
        """
        choices: dict[str, str] = {}
        for layer in weights.layers:
            for name in LAYER_LINEARS:
                weight = getattr(layer, name)
                if not isinstance(weight, SparseInt8Weight):
                    continue
                sparsity = 1 - weight.values.size / (weight.out_features * weight.in_features)
                key = f"{weight.out_features}x{weight.in_features}@{round(sparsity * 20) / 20:g}"
                if key not in choices:
                    choices[key] = _faster_format(weight)
                if choices[key] == "dense":
                    setattr(layer, name, _unpacked(weight))

    def split_qkv(
        self, qkv: np.ndarray, heads: int, kv_heads: int, head_dim: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fused (T, (H + 2*Hkv) * D) projections -> contiguous q (T,H,D), k and v (T,Hkv,D)."""
        tokens = qkv.shape[0]
        q_end = heads * head_dim
        k_end = q_end + kv_heads * head_dim
        q = np.ascontiguousarray(qkv[:, :q_end]).reshape(tokens, heads, head_dim)
        k = np.ascontiguousarray(qkv[:, q_end:k_end]).reshape(tokens, kv_heads, head_dim)
        v = qkv[:, k_end:].reshape(tokens, kv_heads, head_dim)
        return q, k, v

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> None:
        kernels_cpu.rope_inplace(x, positions, inv_freq)

    def attention(
        self,
        layer: int,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        batch: ForwardBatch,
        scale: float,
        window: int,
    ) -> np.ndarray:
        """Write this pass's k, v (T, Hkv, D) into the paged cache, then attend q (T, H, D)
        of every sequence in the batch over its own blocks."""
        cache = batch.cache
        where = (batch.block_tables, batch.query_start, batch.context_lens, scale, window)
        kc, vc = cache.k[layer], cache.v[layer]
        if cache.k_scale is None:
            write_kv(kc, vc, k, v, batch.slots)
            out = paged_attention(q, kc, vc, *where)
        else:
            ks, vs = cache.k_scale[layer], cache.v_scale[layer]
            write_kv_int8(kc, vc, ks, vs, k, v, batch.slots)
            out = paged_attention_int8(q, kc, vc, ks, vs, *where)
        return out.reshape(q.shape[0], -1)

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        return kernels_cpu.silu_mul(gate_up)

    def add_(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x += y
        return x

    def take_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[rows])

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def allocate_kv(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return zeroed_huge_pages(shape, np.dtype(dtype))

    def free_memory(self) -> int:
        """Bytes free where `allocate_kv` allocates: available RAM (sizes the KV cache)."""
        return psutil.virtual_memory().available


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
