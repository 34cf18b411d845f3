"""RMSNorm with the CPU twin's numerics: float32 squares summed in float64, float32 output."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64

from kernels_gpu.launch import ROW_THREADS, result


@cuda.jit(device=True)
def _inverse_rms(x, t, base, dim, eps):
    """1 / sqrt(mean(x[t, base : base + dim] ** 2) + eps) for the whole block. The float64
    sum costs a few adds per thread even where float64 is slow, and keeps the scale equal to
    the CPU's in practice."""
    tid = cuda.threadIdx.x
    partials = cuda.shared.array(ROW_THREADS, float64)
    acc = float64(0)
    for i in range(tid, dim, ROW_THREADS):
        v = x[t, base + i]
        acc += v * v
    partials[tid] = acc
    cuda.syncthreads()
    total = float64(0)
    for i in range(ROW_THREADS):
        total += partials[i]
    return float32(1.0 / math.sqrt(total / dim + eps))


@cuda.jit(cache=True)
def _rmsnorm(x, weight, eps, out):
    """One block per row."""
    t = cuda.blockIdx.x
    inv = _inverse_rms(x, t, 0, x.shape[1], eps)
    for i in range(cuda.threadIdx.x, x.shape[1], ROW_THREADS):
        out[t, i] = weight[i] * (x[t, i] * inv)


def rmsnorm(x, weight, eps: float, out=None, stream=0):
    """x (T, D) float32 -> weight * x / sqrt(mean(x**2) + eps), row by row, on the device."""
    out = result(out, tuple(x.shape), np.float32, stream)
    if x.shape[0]:
        _rmsnorm[x.shape[0], ROW_THREADS, stream](x, weight, float(eps), out)
    return out


@cuda.jit(cache=True)
def _head_rmsnorm(x, start, weight, eps):
    """One block per (row, head), in place."""
    t = cuda.blockIdx.x
    base = start + cuda.blockIdx.y * weight.shape[0]
    inv = _inverse_rms(x, t, base, weight.shape[0], eps)
    for i in range(cuda.threadIdx.x, weight.shape[0], ROW_THREADS):
        x[t, base + i] = weight[i] * (x[t, base + i] * inv)


def head_rmsnorm_(x, start: int, heads: int, weight, eps: float, stream=0):
    """In place on the device: `heads` heads of len(weight) columns from column `start` of
    each row of x, rmsnormed with `weight` (kernels_cpu.norms.head_rmsnorm_'s twin)."""
    if start < 0 or start + heads * weight.shape[0] > x.shape[1]:
        raise ValueError("the heads run past x's columns")
    if x.shape[0] and heads:
        _head_rmsnorm[(x.shape[0], heads), ROW_THREADS, stream](x, start, weight, float(eps))
    return x
