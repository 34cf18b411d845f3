"""Gated activations."""

import math

import numpy as np
from numba import njit

from kernels_cpu.exact_math import EXACT_MATH
from kernels_cpu.fast_exp import exp_parts, pow2


@njit(cache=True, fastmath=True)
def silu_mul_into(gate_up: np.ndarray, out: np.ndarray) -> None:
    """out (T, F) = silu(gate) * up for gate_up (T, 2F) holding [gate | up].

    exp(-gate) comes from the vectorised `exp_parts` (a libm call per element cost about as
    much as a decode step's whole MLP matmul at 16 tokens); -gate is clamped to [-87, 88],
    where silu is already gate itself or 0 to float32 precision. Two passes per row, exp into
    `out` and then the quotient: fused into one loop, LLVM left it scalar (3x slower).
    """
    rows, width = gate_up.shape
    half = width // 2
    if out.shape[0] != rows or out.shape[1] != half:
        raise ValueError("out must be (T, F) for gate_up (T, 2F)")
    for t in range(rows):
        silu_mul_row(gate_up, t, out)


# error_model="numpy": numba's default checks every float division for a zero divisor (to
# raise ZeroDivisionError), which kept the quotient loop scalar (6x slower); 1 + exp(-g) >= 1.
@njit(cache=True, fastmath=EXACT_MATH, error_model="numpy")
def silu_mul_row(gate_up: np.ndarray, t: int, out: np.ndarray) -> None:
    """out[t, :F] = silu(gate) * up of row t; shared with the linears that fuse it."""
    half = gate_up.shape[1] // 2
    for i in range(half):
        m, k = exp_parts(min(max(-gate_up[t, i], np.float32(-87.0)), np.float32(88.0)))
        out[t, i] = m * pow2(k)
    for i in range(half):
        out[t, i] = gate_up[t, i] / (np.float32(1.0) + out[t, i]) * gate_up[t, half + i]


@njit(cache=True, fastmath=EXACT_MATH)
def gelu_tanh_mul_into(gate_up: np.ndarray, out: np.ndarray) -> None:
    """out (T, F) = gelu(gate) * up for gate_up (T, 2F) = [gate | up], GELU with the tanh
    approximation (Gemma's gelu_pytorch_tanh):
    gelu(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g**3)))."""
    rows, width = gate_up.shape
    half = width // 2
    if out.shape[0] != rows or out.shape[1] != half:
        raise ValueError("out must be (T, F) for gate_up (T, 2F)")
    c = np.float32(math.sqrt(2.0 / math.pi))
    for t in range(rows):
        for i in range(half):
            g = gate_up[t, i]
            inner = c * (g + np.float32(0.044715) * g * g * g)
            out[t, i] = (
                np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)) * gate_up[t, half + i]
            )


@njit(cache=True)
def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """`silu_mul_into` into a new (T, F) array."""
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=np.float32)
    silu_mul_into(gate_up, out)
    return out
