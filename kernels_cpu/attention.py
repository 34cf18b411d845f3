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

    One job is one (token, kv head): the query heads of its GQA group are handled together so
    each key and value row is read once per group, and the output is accumulated in a small
    local array.
    """
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = np.empty((tokens, heads, dim), dtype=np.float32)
    for job in prange(tokens * kv_heads):
        t = job // kv_heads
        kvh = job % kv_heads
        h0 = kvh * group
        pos = start + t
        first = 0
        if window > 0 and pos - window + 1 > 0:
            first = pos - window + 1
        n = pos + 1 - first
        scores = np.empty((group, n), dtype=np.float32)
        for j in range(n):
            key = k_cache[first + j, kvh]
            for g in range(group):
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += q[t, h0 + g, d] * key[d]
                scores[g, j] = acc * scale
        for g in range(group):
            best = scores[g, 0]
            for j in range(1, n):
                best = max(best, scores[g, j])
            total = np.float32(0.0)
            for j in range(n):
                e = np.exp(scores[g, j] - best)
                scores[g, j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(n):
                scores[g, j] *= inv
        acc_out = np.zeros((group, dim), dtype=np.float32)
        for j in range(n):
            value = v_cache[first + j, kvh]
            for g in range(group):
                w = scores[g, j]
                for d in range(dim):
                    acc_out[g, d] += w * value[d]
        for g in range(group):
            for d in range(dim):
                out[t, h0 + g, d] = acc_out[g, d]
    return out
