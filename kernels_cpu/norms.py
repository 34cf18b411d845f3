"""RMSNorm, computed in float32 as Llama-family models define it.

Serial on purpose: the work is microseconds, less than waking numba's thread pool.
"""

import numpy as np
from numba import njit

from kernels_cpu.exact_math import EXACT_MATH
from kernels_cpu.reductions import sum_squares


@njit(cache=True, fastmath=True)
def rmsnorm_into(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out (T, D) = weight * x / sqrt(mean(x**2) + eps), row by row, for float32 x (T, D)."""
    rows, dim = x.shape
    if out.shape != x.shape or weight.shape[0] != dim:
        raise ValueError("out must be shaped like x, and weight (D,)")
    for t in range(rows):
        rmsnorm_row(x, t, weight, eps, out)


@njit(cache=True, fastmath=EXACT_MATH)
def rmsnorm_row(x: np.ndarray, t: int, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[t, :D] = rmsnorm of x[t] (D = len(weight)); shared with the linears that fuse it."""
    dim = weight.shape[0]
    acc = np.float64(sum_squares(x[t, :dim]))
    inv = np.float32(1.0 / np.sqrt(acc / dim + eps))
    for i in range(dim):
        out[t, i] = weight[i] * (x[t, i] * inv)


@njit(cache=True)
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """`rmsnorm_into` into a new array."""
    out = np.empty_like(x)
    rmsnorm_into(x, weight, eps, out)
    return out
