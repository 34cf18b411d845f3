"""Rotary position embedding in the Hugging Face (rotate-half, non-interleaved) layout."""

import numpy as np
from numba import njit


@njit(cache=True)
def rope_inplace(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> None:
    """Rotate x (T, H, D) in place; pair i is (i, i + D/2), angle = position * inv_freq[i].

    The angle is formed in float32, as transformers forms it, so long positions round alike.
    """
    tokens, heads, dim = x.shape
    half = dim // 2
    for t in range(tokens):
        pos = np.float32(positions[t])
        for i in range(half):
            angle = pos * inv_freq[i]
            c = np.float32(np.cos(angle))
            s = np.float32(np.sin(angle))
            for h in range(heads):
                a = x[t, h, i]
                b = x[t, h, i + half]
                x[t, h, i] = a * c - b * s
                x[t, h, i + half] = b * c + a * s
