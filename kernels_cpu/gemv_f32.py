"""Float32 matrix-vector and small-batch products for decode, parallel over output rows."""

import numpy as np
from numba import njit, prange

ROW_BLOCK = 16


@njit(cache=True, parallel=True, fastmath=True)
def matmul_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, K) @ w.T for w (N, K), both float32 and row-major; meant for small T."""
    tokens, k = x.shape
    n = w.shape[0]
    out = np.empty((tokens, n), dtype=np.float32)
    blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for b in prange(blocks):
        lo = b * ROW_BLOCK
        hi = min(lo + ROW_BLOCK, n)
        for t in range(tokens):
            for r in range(lo, hi):
                acc = np.float32(0.0)
                for i in range(k):
                    acc += x[t, i] * w[r, i]
                out[t, r] = acc
    return out
