"""Rotary position embedding in the Hugging Face (rotate-half, non-interleaved) layout."""

import numpy as np
from numba import njit


@njit(cache=True)
def rope_angles_into(
    positions: np.ndarray, inv_freq: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> None:
    """cos, sin (T, D/2) = cos and sin of positions[t] * inv_freq[i].

    The angle is formed in float32, as transformers forms it, so long positions round alike.
    A pass computes them once for all its layers: computed in every layer, they took a tenth
    of a 16-token decode step's attention.
    """
    shape = (positions.shape[0], inv_freq.shape[0])
    if cos.shape != shape or sin.shape != shape:
        raise ValueError("cos and sin must be (len(positions), len(inv_freq))")
    for t in range(positions.shape[0]):
        pos = np.float32(positions[t])
        for i in range(inv_freq.shape[0]):
            angle = pos * inv_freq[i]
            cos[t, i] = np.cos(angle)
            sin[t, i] = np.sin(angle)


@njit(cache=True)
def rope_heads(
    src: np.ndarray, t: int, col: int, cos: np.ndarray, sin: np.ndarray, dst: np.ndarray
) -> None:
    """dst[t] (H, D) = the H heads at src[t, col:col + H * D], rotated by row t of the
    `rope_angles_into` tables: pair i is (i, i + D/2).

    Each pair is read before it is written, so src may be dst itself (in place).
    """
    heads, dim = dst.shape[1], dst.shape[2]
    half = dim // 2
    for h in range(heads):
        o = col + h * dim
        for i in range(half):
            a = src[t, o + i]
            b = src[t, o + i + half]
            dst[t, h, i] = a * cos[t, i] - b * sin[t, i]
            dst[t, h, i + half] = b * cos[t, i] + a * sin[t, i]
