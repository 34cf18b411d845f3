"""Rotary position embedding in place, in the Hugging Face rotate-half layout of the CPU twin."""

from __future__ import annotations

import math

from numba import cuda, float32

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid


@cuda.jit(cache=True)
def _rope(x, positions, inv_freq):
    """Thread per (token, head, pair i); i fastest, so the two halves are read coalesced.

    Pair i is (i, i + D/2); the angle is formed in float32 as transformers forms it. Each head
    recomputes its cos/sin: cheaper than a pass through memory for a shared table.
    """
    tokens, heads, dim = x.shape
    half = dim // 2
    for idx in range(cuda.grid(1), tokens * heads * half, cuda.gridsize(1)):
        i = idx % half
        th = idx // half
        h = th % heads
        t = th // heads
        angle = float32(positions[t]) * inv_freq[i]
        c = float32(math.cos(angle))
        s = float32(math.sin(angle))
        a = x[t, h, i]
        b = x[t, h, i + half]
        x[t, h, i] = a * c - b * s
        x[t, h, i + half] = b * c + a * s


def rope_inplace(x, positions, inv_freq, stream=0) -> None:
    """Rotate x (T, H, D) float32 in place; positions (T,) ints, inv_freq (D/2,) float32."""
    tokens, heads, dim = x.shape
    n = tokens * heads * (dim // 2)
    if n:
        _rope[elementwise_grid(n), ELEMENTWISE_THREADS, stream](x, positions, inv_freq)
