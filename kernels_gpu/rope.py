"""Rotary position embedding in the Hugging Face rotate-half layout of the CPU twin, applied
as the fused QKV projection is split into q, k and v (one launch for all three), k and v
written straight into the rows of a float32 paged KV cache when given one."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, result


@cuda.jit(cache=True)
def _split_rope(qkv, positions, inv_freq, q, k, v, slots, paged):
    """Copy the fused projections [q | k | v] of qkv (T, (H + 2 Hkv) D) into q (T, H, D), k
    and v, rotating q and k on the way. k and v are (blocks, block size, Hkv, D): a paged
    cache whose row for token t is flat slot slots[t] (`paged`), or (T, 1, Hkv, D) scratch
    (row t; `slots` unread).

    Thread per (token, q or k head, pair i), i fastest, so the two halves are read
    coalesced, then per v element. Pair i is (i, i + D/2); the angle is formed in float32 as
    transformers forms it. Each head recomputes its cos/sin: cheaper than a pass through
    memory for a shared table.
    """
    tokens, heads, dim = q.shape
    block_size, kv_heads = k.shape[1], k.shape[2]
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
            slot = slots[t] if paged else t
            blk = slot // block_size
            row = slot - blk * block_size
            k[blk, row, h - heads, i] = a * c - b * s
            k[blk, row, h - heads, i + half] = b * c + a * s
    base = rotated * dim
    for idx in range(cuda.grid(1), tokens * kv_heads * dim, cuda.gridsize(1)):
        t = idx // (kv_heads * dim)
        c = idx - t * kv_heads * dim
        slot = slots[t] if paged else t
        blk = slot // block_size
        v[blk, slot - blk * block_size, c // dim, c % dim] = qkv[t, base + c]


def split_rope(qkv, heads: int, kv_heads: int, head_dim: int, positions, inv_freq, out=None,
               stream=0, slots=None):  # fmt: skip
    """Fused (T, (H + 2 Hkv) D) projections -> q (T, H, D) and k (T, Hkv, D) rotated at
    `positions` (T,) with inv_freq (D/2,), and v (T, Hkv, D), in one launch: into `out` =
    (q, k, v) when given, else into new arrays. With `slots` (T,), out's k and v are a
    float32 paged cache (blocks, block size, Hkv, D) and token t's rows go to flat slot
    slots[t] = block * block size + row (write_kv's job, done in the same launch)."""
    tokens = qkv.shape[0]
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not {heads} + 2 x {kv_heads} heads of "
                         f"an even {head_dim}")  # fmt: skip
    q_out, k_out, v_out = (None, None, None) if out is None else out
    q = result(q_out, (tokens, heads, head_dim), np.float32, stream)
    if slots is None:
        k = result(k_out, (tokens, kv_heads, head_dim), np.float32, stream)
        v = result(v_out, (tokens, kv_heads, head_dim), np.float32, stream)
        k_rows, v_rows = (a.reshape(tokens, 1, kv_heads, head_dim) for a in (k, v))
    else:
        k = k_rows = k_out
        v = v_rows = v_out
        if k.shape[2:] != (kv_heads, head_dim) or v.shape != k.shape or k.dtype != np.float32:
            raise ValueError("the cache is not float32 (blocks, block size, Hkv, D)")
    n = tokens * max((heads + kv_heads) * (head_dim // 2), kv_heads * head_dim)
    if n:
        _split_rope[elementwise_grid(n), ELEMENTWISE_THREADS, stream](
            qkv, positions, inv_freq, q, k_rows, v_rows, positions if slots is None else slots,
            slots is not None,
        )  # fmt: skip
    return q, k, v
