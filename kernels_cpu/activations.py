"""Gated activations."""

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """gate_up (T, 2F) holding [gate | up] -> silu(gate) * up, shape (T, F)."""
    rows, width = gate_up.shape
    half = width // 2
    out = np.empty((rows, half), dtype=gate_up.dtype)
    for t in range(rows):
        for i in range(half):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, half + i]
    return out
