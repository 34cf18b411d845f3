"""RMSNorm, computed in float32 as Llama-family models define it.

Serial on purpose: the work is microseconds, less than waking numba's thread pool.
"""

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, D) float32 -> weight * x / sqrt(mean(x**2) + eps), row by row."""
    rows, dim = x.shape
    out = np.empty_like(x)
    for t in range(rows):
        acc = 0.0
        for i in range(dim):
            acc += x[t, i] * x[t, i]
        inv = np.float32(1.0 / np.sqrt(acc / dim + eps))
        for i in range(dim):
            out[t, i] = weight[i] * (x[t, i] * inv)
    return out
