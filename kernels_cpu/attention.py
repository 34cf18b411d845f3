"""Causal attention of new query tokens over a sequence's cached keys and values."""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True)
def causal_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    scale: float,
    window: int,
) -> np.ndarray:
    """Softmax attention for q (T, H, D) whose tokens sit at positions start .. start+T-1.

    k_cache/v_cache (S, Hkv, D) already hold positions 0 .. start+T-1. Query head h reads
    kv head h // (H // Hkv) (GQA). `window` > 0 limits each query to its last `window` keys
    (Mistral sliding window); 0 means unlimited.
    """
    tokens, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = np.empty((tokens, heads, dim), dtype=np.float32)
    for job in prange(tokens * heads):
        t = job // heads
        h = job % heads
        kvh = h // group
        pos = start + t
        first = 0
        if window > 0 and pos - window + 1 > 0:
            first = pos - window + 1
        n = pos + 1 - first
        scores = np.empty(n, dtype=np.float32)
        best = -np.inf
        for j in range(n):
            acc = np.float32(0.0)
            for d in range(dim):
                acc += q[t, h, d] * k_cache[first + j, kvh, d]
            acc *= scale
            scores[j] = acc
            best = max(best, acc)
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(dim):
            out[t, h, d] = 0.0
        for j in range(n):
            w = scores[j] * inv
            for d in range(dim):
                out[t, h, d] += w * v_cache[first + j, kvh, d]
    return out
