"""Gated activations."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, result


@cuda.jit(device=True)
def silu_mul_value(g, u):
    """silu(g) * u in float32; -g is clamped to [-87, 88] as on the CPU (silu is already g or
    0 there to float32 precision), which also keeps expf finite. No `cuda.*`: the int8
    GEMM's activation quantisation (norms.py) calls it too."""
    m = -g if -g > float32(-87.0) else float32(-87.0)
    e = math.exp(m if m < float32(88.0) else float32(88.0))
    return g / (float32(1.0) + e) * u


@cuda.jit(cache=True)
def _silu_mul(gate_up, out):
    """Thread per output."""
    rows, half = out.shape
    for idx in range(cuda.grid(1), rows * half, cuda.gridsize(1)):
        t = idx // half
        i = idx - t * half
        out[t, i] = silu_mul_value(gate_up[t, i], gate_up[t, half + i])


def silu_mul(gate_up, out=None, stream=0):
    """gate_up (T, 2F) float32 holding [gate | up] -> silu(gate) * up, shape (T, F)."""
    return _gated(_silu_mul, gate_up, out, stream)


def _gated(kernel, gate_up, out, stream):
    """Launch a gate kernel over the (T, F) outputs of gate_up (T, 2F)."""
    rows, width = gate_up.shape
    out = result(out, (rows, width // 2), np.float32, stream)
    n = rows * (width // 2)
    if n:
        kernel[elementwise_grid(n), ELEMENTWISE_THREADS, stream](gate_up, out)
    return out


@cuda.jit(cache=True)
def _gelu_tanh_mul(gate_up, out):
    """Thread per output: gelu(gate) with the tanh approximation, times up."""
    rows, half = out.shape
    c = float32(math.sqrt(2.0 / math.pi))
    for idx in range(cuda.grid(1), rows * half, cuda.gridsize(1)):
        t = idx // half
        i = idx - t * half
        g = gate_up[t, i]
        inner = c * (g + float32(0.044715) * g * g * g)
        out[t, i] = float32(0.5) * g * (float32(1.0) + math.tanh(inner)) * gate_up[t, half + i]


def gelu_tanh_mul(gate_up, out=None, stream=0):
    """gate_up (T, 2F) float32 holding [gate | up] -> gelu_tanh(gate) * up, shape (T, F)."""
    return _gated(_gelu_tanh_mul, gate_up, out, stream)
