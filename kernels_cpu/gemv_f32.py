"""Float32 matrix-vector and small-batch products for decode, parallel over output rows."""

import numpy as np
from numba import njit, prange

ROW_BLOCK = 16


@njit(cache=True, parallel=True, fastmath=True)
def matmul_f32_into(x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out (T, N) = x (T, K) @ w.T for w (N, K), float32 and row-major; meant for small T."""
    tokens, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or out.shape[0] != tokens or out.shape[1] != n:
        raise ValueError("x, w and out do not fit: (T, K) @ (N, K).T -> (T, N)")
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


@njit(cache=True)
def matmul_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`matmul_f32_into` into a new (T, N) array."""
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    matmul_f32_into(x, w, out)
    return out
