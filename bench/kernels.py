"""Kernel table: GB/s of each decode GEMV against the memory bandwidth measured in the same run."""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.bandwidth import read_bandwidth_gbps
from kernels_cpu.gemv_f32 import matmul_f32
from kernels_cpu.gemv_int8 import gemm_w8

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


def run_kernels(runs: int = 9) -> list[dict]:
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth_gbps()
    rows = []
    for label, n, k in SHAPES:
        x = rng.standard_normal((1, k)).astype(np.float32)
        w8 = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        scale = rng.random(n).astype(np.float32)
        w32 = rng.standard_normal((n, k)).astype(np.float32)
        cases = [
            ("gemv_int8", lambda x=x, w=w8, s=scale: gemm_w8(x, w, s), w8.nbytes + scale.nbytes),
            ("gemv_f32", lambda x=x, w=w32: matmul_f32(x, w), w32.nbytes),
        ]
        for kernel, fn, nbytes in cases:
            seconds = _median_seconds(fn, runs)
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
