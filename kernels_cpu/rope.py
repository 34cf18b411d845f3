"""Rotary position embedding in the Hugging Face (rotate-half, non-interleaved) layout."""

import numpy as np
from numba import njit


@njit(cache=True)
def rope_heads(
    src: np.ndarray, t: int, col: int, position: int, inv_freq: np.ndarray, dst: np.ndarray
) -> None:
    """dst[t] (H, D) = the H heads at src[t, col:col + H * D], rotated to `position`: pair i
    is (i, i + D/2), angle = position * inv_freq[i].

    The angle is formed in float32, as transformers forms it, so long positions round alike.
    Each pair is read before it is written, so src may be dst itself (in place).
    """
    heads, dim = dst.shape[1], dst.shape[2]
    half = dim // 2
    pos = np.float32(position)
    for i in range(half):
        angle = pos * inv_freq[i]
        c = np.float32(np.cos(angle))
        s = np.float32(np.sin(angle))
        for h in range(heads):
            a = src[t, col + h * dim + i]
            b = src[t, col + h * dim + i + half]
            dst[t, h, i] = a * c - b * s
            dst[t, h, i + half] = b * c + a * s
