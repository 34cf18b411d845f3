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


@njit(cache=True, fastmath=EXACT_MATH)
def head_rmsnorm_(x: np.ndarray, start: int, heads: int, weight: np.ndarray, eps: float) -> None:
    """In place: each of the `heads` heads of D = len(weight) columns from column `start` of
    every row of x, rmsnormed with `weight` (Qwen3's q and k norms, before rope)."""
    dim = weight.shape[0]
    if start < 0 or start + heads * dim > x.shape[1]:
        raise ValueError("the heads run past x's columns")
    for t in range(x.shape[0]):
        for h in range(heads):
            base = start + h * dim
            acc = np.float64(sum_squares(x[t, base : base + dim]))
            inv = np.float32(1.0 / np.sqrt(acc / dim + eps))
            for i in range(dim):
                x[t, base + i] = weight[i] * (x[t, base + i] * inv)
