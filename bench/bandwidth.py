"""Measured memory read bandwidth: the ceiling a memory-bound decode step is compared with."""

from __future__ import annotations

import statistics
import time

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True)
def _sum_rows(a: np.ndarray) -> float:
    """Sum a 2-D array row by row in parallel; each row is one vectorised stream."""
    out = np.zeros(a.shape[0], dtype=np.float32)
    for r in prange(a.shape[0]):
        row = a[r]
        acc = np.float32(0.0)
        for i in range(row.size):
            acc += row[i]
        out[r] = acc
    return out.sum()


def read_bandwidth_gbps(megabytes: int = 512, repeats: int = 7) -> float:
    """Median GB/s of a parallel streaming read over an array far larger than the caches."""
    a = np.ones((megabytes, 2**20 // 4), dtype=np.float32)
    _sum_rows(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _sum_rows(a)
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times) / 1e9
