"""Kernel table: GB/s of each decode GEMV against the memory bandwidth measured in the same run.

Each timing cycles through enough copies of the weight (>= 256 MiB) that they cannot stay in
the CPU caches, as in a real decode step where every matrix is read once per token.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.bandwidth import read_bandwidth_gbps
from kernels_cpu.colskip_int8 import colskip_matmul_w8, to_input_major
from kernels_cpu.gemv_f32 import matmul_f32
from kernels_cpu.matmul_int8 import gemv_w8
from kernels_cpu.sparse_int8 import pack_bitmask, sparse_matmul_w8

# (rows, cols) of the default model's fused matrices and of Llama-7B's.
SHAPES = [
    ("smollm2-qkv", 960, 576),
    ("smollm2-gate_up", 3072, 576),
    ("smollm2-down", 576, 1536),
    ("smollm2-head", 49152, 576),
    ("llama7b-attn", 4096, 4096),
    ("llama7b-up", 11008, 4096),
    ("llama7b-down", 4096, 11008),
]


def _median_seconds(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


STREAM_BYTES = 256 * 2**20


def _copies(rng: np.random.Generator, n: int, k: int, dtype: type) -> list[np.ndarray]:
    """Enough random (n, k) matrices of `dtype` to total STREAM_BYTES."""
    count = max(1, -(-STREAM_BYTES // (n * k * np.dtype(dtype).itemsize)))
    if dtype is np.int8:
        return [rng.integers(-127, 128, size=(n, k), dtype=np.int8) for _ in range(count)]
    return [rng.standard_normal((n, k)).astype(dtype) for _ in range(count)]


# Sparse kernels are timed on the Llama-7B shapes, where decode is bandwidth-bound.
SPARSE_SHAPES = ("llama7b-up", "llama7b-down")
WEIGHT_SPARSITIES = (0.5, 0.7)
ACTIVATION_SPARSITY = 0.4


def _pruned(rng: np.random.Generator, w: np.ndarray, sparsity: float) -> np.ndarray:
    """w with each weight set to zero with probability `sparsity` (unstructured)."""
    return np.where(rng.random(w.shape, dtype=np.float32) < sparsity, np.int8(0), w)


def _cases(rng, label, n, k, x, scale):
    """(kernel, fn, calls, bytes per call) for every kernel timed on this shape."""
    w8s = _copies(rng, n, k, np.int8)
    w32s = _copies(rng, n, k, np.float32)
    yield "gemv_int8", lambda: [gemv_w8(x, w, scale) for w in w8s], len(w8s), n * k + 4 * n
    yield "gemv_f32", lambda: [matmul_f32(x, w) for w in w32s], len(w32s), 4 * n * k
    if label not in SPARSE_SHAPES:
        return
    for sparsity in WEIGHT_SPARSITIES:
        packed = [pack_bitmask(_pruned(rng, w, sparsity)) for w in w8s]
        nbytes = sum(a.nbytes for a in packed[0]) + 4 * n

        def sparse(packed=packed):
            return [sparse_matmul_w8(x, *p, scale, k) for p in packed]

        yield f"sparse_int8@{sparsity:g}", sparse, len(packed), nbytes
    wts = [to_input_major(w) for w in w8s]
    # a threshold under which ACTIVATION_SPARSITY of x's entries fall
    threshold = float(np.quantile(np.abs(x), ACTIVATION_SPARSITY))
    kept = int((np.abs(x) > threshold).sum())

    def colskip():
        return [colskip_matmul_w8(x, wt, scale, threshold) for wt in wts]

    yield f"colskip_int8@{ACTIVATION_SPARSITY:g}", colskip, len(wts), kept * n + 4 * n


def run_kernels(runs: int = 9) -> list[dict]:
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth_gbps()
    rows = []
    for label, n, k in SHAPES:
        x = rng.standard_normal((1, k)).astype(np.float32)
        scale = rng.random(n).astype(np.float32)
        dense_seconds = None
        for kernel, fn, calls, nbytes in _cases(rng, label, n, k, x, scale):
            seconds = _median_seconds(fn, runs) / calls
            dense_seconds = dense_seconds or seconds  # gemv_int8 comes first
            gbps = nbytes / seconds / 1e9
            rows.append(
                {
                    "kernel": kernel,
                    "shape": f"{n}x{k}",
                    "model": label,
                    "us": seconds * 1e6,
                    "gbps": gbps,
                    "bandwidth_gbps": bandwidth,
                    "vs_bandwidth": gbps / bandwidth,
                    "vs_dense_int8": dense_seconds / seconds,
                }
            )
    return rows
