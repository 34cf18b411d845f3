"""RMSNorm with the CPU twin's numerics (float32 squares summed in float64, float32 output),
and the int8 GEMM's per-token activation quantisation, which can start from rmsnorm(x) or
silu(gate) * up in the same launch (`quantize_rows`): it shares the rms reduction, and a
device function that uses `cuda.*` must live in its kernel's module (see launch.py)."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int16

from kernels_gpu.activations import silu_mul_value
from kernels_gpu.launch import ROW_THREADS, result

# What `quantize_rows` quantises: x itself, rmsnorm(x), or silu(gate) * up of x = [gate | up].
PLAIN, RMSNORM, GATED = 0, 1, 2


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


@cuda.jit(device=True)
def _input(x, t, i, mode, weight, inv, k):
    """Element i of the row the quantisation reads: the expressions of `_rmsnorm` and of the
    silu gate kernel, so fused and unfused give the same bits."""
    if mode == RMSNORM:
        return weight[i] * (x[t, i] * inv)
    if mode == GATED:
        return silu_mul_value(x[t, i], x[t, k + i])
    return x[t, i]


@cuda.jit(cache=True)
def _quantize_rows(x, mode, weight, eps, qmax, a, a_scale):
    """One block per row: a[t] = rint(h[t] / s) with s = max|h[t]| / qmax (1 for a zero row),
    h the row `_input` gives (computed twice rather than stored).

    The same float32 operations as the CPU's `_quantize_row` (an IEEE division, a multiply by
    its reciprocal, round half to even), so the integers and scales are identical.
    """
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    k = a.shape[1]
    inv = _inverse_rms(x, t, 0, k, eps) if mode == RMSNORM else float32(1)
    peaks = cuda.shared.array(ROW_THREADS, float32)
    peak = float32(0)
    for i in range(tid, k, ROW_THREADS):
        v = abs(_input(x, t, i, mode, weight, inv, k))
        peak = v if v > peak else peak
    peaks[tid] = peak
    cuda.syncthreads()
    for i in range(ROW_THREADS):
        peak = peaks[i] if peaks[i] > peak else peak
    s = peak / float32(qmax) if peak > 0 else float32(1)
    inv_s = float32(1) / s
    for i in range(tid, k, ROW_THREADS):
        a[t, i] = int16(round(_input(x, t, i, mode, weight, inv, k) * inv_s))
    if tid == 0:
        a_scale[t] = s


def quantize_rows(x, qmax: int, out=None, stream=0, mode: int = PLAIN, weight=None, eps=0.0):
    """Per-row symmetric quantisation to int16 in [-qmax, qmax] of x (T, K) float32, or of
    rmsnorm(x) with `weight` (K,) and eps (mode RMSNORM), or of silu(gate) * up of x (T, 2K)
    (mode GATED).

    Returns device arrays (values (T, K) int16, scales (T,) float32), like the CPU twin:
    `out` = (values, scales) when given, else new ones.
    """
    tokens = x.shape[0]
    k = x.shape[1] // 2 if mode == GATED else x.shape[1]
    a_out, scale_out = (None, None) if out is None else out
    a = result(a_out, (tokens, k), np.int16, stream)
    a_scale = result(scale_out, (tokens,), np.float32, stream)
    if mode == RMSNORM and (weight is None or weight.shape[0] != k):
        raise ValueError("an rmsnorm prologue needs its (K,) weight")
    weight = x[0] if weight is None else weight  # unread: any float32 vector
    if tokens:
        _quantize_rows[tokens, ROW_THREADS, stream](x, mode, weight, float(eps), qmax, a, a_scale)
    return a, a_scale
