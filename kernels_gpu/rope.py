"""Rotary position embedding in the Hugging Face rotate-half layout of the CPU twin, applied
as the fused QKV projection is split into q, k and v (one launch for all three)."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, result


@cuda.jit(cache=True)
def _split_rope(qkv, positions, inv_freq, q, k, v):
    """Copy the fused projections [q | k | v] of qkv (T, (H + 2 Hkv) D) into q (T, H, D), k
    and v (T, Hkv, D), rotating q and k on the way.

    Thread per (token, q or k head, pair i), i fastest, so the two halves are read
    coalesced, then per v element. Pair i is (i, i + D/2); the angle is formed in float32 as
    transformers forms it. Each head recomputes its cos/sin: cheaper than a pass through
    memory for a shared table.
    """
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    half = dim // 2
    rotated = heads + kv_heads
    for idx in range(cuda.grid(1), tokens * rotated * half, cuda.gridsize(1)):
        i = idx % half
        th = idx // half
        h = th % rotated
        t = th // rotated
        angle = float32(positions[t]) * inv_freq[i]
        c = float32(math.cos(angle))
        s = float32(math.sin(angle))
        a = qkv[t, h * dim + i]
        b = qkv[t, h * dim + i + half]
        if h < heads:
            q[t, h, i] = a * c - b * s
            q[t, h, i + half] = b * c + a * s
        else:
            k[t, h - heads, i] = a * c - b * s
            k[t, h - heads, i + half] = b * c + a * s
    base = rotated * dim
    for idx in range(cuda.grid(1), tokens * kv_heads * dim, cuda.gridsize(1)):
        t = idx // (kv_heads * dim)
        c = idx - t * kv_heads * dim
        v[t, c // dim, c % dim] = qkv[t, base + c]


def split_rope(qkv, heads: int, kv_heads: int, head_dim: int, positions, inv_freq, out=None,
               stream=0):  # fmt: skip
    """Fused (T, (H + 2 Hkv) D) projections -> q (T, H, D) and k (T, Hkv, D) rotated at
    `positions` (T,) with inv_freq (D/2,), and v (T, Hkv, D), in one launch: into `out` =
    (q, k, v) when given, else into new arrays."""
    tokens = qkv.shape[0]
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not {heads} + 2 x {kv_heads} heads of "
                         f"an even {head_dim}")  # fmt: skip
    q_out, k_out, v_out = (None, None, None) if out is None else out
    q = result(q_out, (tokens, heads, head_dim), np.float32, stream)
    k = result(k_out, (tokens, kv_heads, head_dim), np.float32, stream)
    v = result(v_out, (tokens, kv_heads, head_dim), np.float32, stream)
    n = tokens * max((heads + kv_heads) * (head_dim // 2), kv_heads * head_dim)
    if n:
        _split_rope[elementwise_grid(n), ELEMENTWISE_THREADS, stream](
            qkv, positions, inv_freq, q, k, v
        )
    return q, k, v
