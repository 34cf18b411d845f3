"""Int8 weight-only matmuls: int8 weights with per-output-row float32 scales, float32 inputs.

Decode is memory-bound, so the kernel's job is to stream the weight bytes once at close to
memory bandwidth: four output rows per iteration share each loaded x value, the int8 -> f32
widening vectorises under fastmath, and prange splits the rows across cores. Prefill is
compute-bound instead; there `dequantize_rows` widens a tile of rows for a BLAS GEMM.
"""

import numpy as np
from numba import njit, prange

ROWS = 4


@njit(cache=True, parallel=True, fastmath=True)
def gemm_w8(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T -> (T, N) float32, for small T."""
    tokens, k = x.shape
    n = w.shape[0]
    out = np.empty((tokens, n), dtype=np.float32)
    full = n // ROWS
    for b in prange(full + (n - full * ROWS)):
        if b < full:
            r = b * ROWS
            for t in range(tokens):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for i in range(k):
                    xi = x[t, i]
                    a0 += xi * np.float32(w[r, i])
                    a1 += xi * np.float32(w[r + 1, i])
                    a2 += xi * np.float32(w[r + 2, i])
                    a3 += xi * np.float32(w[r + 3, i])
                out[t, r] = a0 * scale[r]
                out[t, r + 1] = a1 * scale[r + 1]
                out[t, r + 2] = a2 * scale[r + 2]
                out[t, r + 3] = a3 * scale[r + 3]
        else:  # the n % ROWS leftover rows, one per job
            r = full * ROWS + (b - full)
            for t in range(tokens):
                acc = np.float32(0.0)
                for i in range(k):
                    acc += x[t, i] * np.float32(w[r, i])
                out[t, r] = acc * scale[r]
    return out


@njit(cache=True, parallel=True, fastmath=True)
def dequantize_rows(w: np.ndarray, scale: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of an int8 matrix widened to float32 and scaled: a tile for a BLAS GEMM."""
    k = w.shape[1]
    out = np.empty((hi - lo, k), dtype=np.float32)
    for r in prange(hi - lo):
        s = scale[lo + r]
        for i in range(k):
            out[r, i] = np.float32(w[lo + r, i]) * s
    return out


@njit(cache=True)
def embed_rows_w8(w: np.ndarray, scale: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Look up rows `ids` of an int8 embedding table, dequantized to float32."""
    k = w.shape[1]
    out = np.empty((ids.shape[0], k), dtype=np.float32)
    for t in range(ids.shape[0]):
        s = scale[ids[t]]
        for i in range(k):
            out[t, i] = np.float32(w[ids[t], i]) * s
    return out
