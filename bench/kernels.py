"""Kernel table: GB/s of each decode GEMV against the memory bandwidth measured in the same run.

Each timing cycles through enough copies of the weight (>= 256 MiB) that they cannot stay in
the CPU caches, as in a real decode step where every matrix is read once per token.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.bandwidth import read_bandwidth_gbps
from kernels_cpu.gemv_f32 import matmul_f32
from kernels_cpu.matmul_int8 import gemv_w8

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


def run_kernels(runs: int = 9) -> list[dict]:
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth_gbps()
    rows = []
    for label, n, k in SHAPES:
        x = rng.standard_normal((1, k)).astype(np.float32)
        scale = rng.random(n).astype(np.float32)
        w8s = _copies(rng, n, k, np.int8)
        w32s = _copies(rng, n, k, np.float32)
        cases = [
            (
                "gemv_int8",
                lambda ws=w8s, x=x, s=scale: [gemv_w8(x, w, s) for w in ws],
                len(w8s),
                n * k + 4 * n,
            ),
            ("gemv_f32", lambda ws=w32s, x=x: [matmul_f32(x, w) for w in ws], len(w32s), 4 * n * k),
        ]
        for kernel, fn, calls, nbytes in cases:
            seconds = _median_seconds(fn, runs) / calls
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
                }
            )
    return rows
