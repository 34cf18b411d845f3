"""RMSNorm with the CPU twin's numerics (float32 squares summed in float64, float32 output),
and the int8 GEMM's per-token activation quantisation, which can start from rmsnorm(x) or
silu(gate) * up in the same launch (`quantize_rows`): it shares the rms reduction, and a
device function that uses `cuda.*` must live in its kernel's module (see launch.py)."""

from __future__ import annotations

import math

import numpy as np
from kernels_cpu.simd_blocks import BLOCK, SUM_SPAN
from numba import cuda, float32, float64, int16, int32

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


@cuda.jit(cache=True)
def _quantize_blocks(x, mode, weight, eps, k, xq, xsum, xs, xm):
    """One block per row t: each thread takes whole 32-input blocks b of the row `_input`
    gives, padded with zeros from k to xq's width: xq = rint(h * 127 / max|h|) as int8,
    xs[b] = max|h| / 127, and per 16 inputs their integer sum xsum and xsum * xs (xm).

    The float32 operations of the CPU's block `_quantize_row` in its order, so the integers
    and scales are identical."""
    t = cuda.blockIdx.x
    inv = _inverse_rms(x, t, 0, k, eps) if mode == RMSNORM else float32(1)
    for b in range(cuda.threadIdx.x, xs.shape[1], ROW_THREADS):
        lo = b * BLOCK
        hi = lo + BLOCK if lo + BLOCK < k else k
        peak = float32(0)
        for i in range(lo, hi):
            v = abs(_input(x, t, i, mode, weight, inv, k))
            peak = v if v > peak else peak
        scale = peak / float32(127.0)
        inv_s = float32(127.0) / peak if peak > 0 else float32(0)
        for half in range(2):
            total = int32(0)
            for i in range(lo + half * SUM_SPAN, lo + half * SUM_SPAN + SUM_SPAN):
                q = int32(0)
                if i < hi:
                    q = int32(round(_input(x, t, i, mode, weight, inv, k) * inv_s))
                xq[t, i] = q
                total += q
            xsum[t, 2 * b + half] = total
            xm[t, 2 * b + half] = float32(total) * scale
        xs[t, b] = scale


def quantize_blocks(x, k: int, act, stream=0, mode: int = PLAIN, weight=None, eps=0.0):
    """The block matmuls' activations: x (T, k) float32, or rmsnorm(x) with `weight` (k,)
    (mode RMSNORM), or silu(gate) * up of x (T, 2k) (GATED), quantised per 32 inputs into
    `act` = (xq (T, Kp) int8, xsum (T, Kp / 16) int32, xs (T, Kp / 32) float32, xm (T, Kp /
    16) float32) with Kp >= k a multiple of 32, which it fills and returns."""
    xq, xsum, xs, xm = act
    tokens, kp = xq.shape
    if kp % BLOCK or kp < k or xs.shape != (tokens, kp // BLOCK):
        raise ValueError("the activation scratch does not fit k and the tokens")
    if xsum.shape != (tokens, kp // SUM_SPAN) or xm.shape != xsum.shape:
        raise ValueError("xsum and xm must be (T, Kp / 16)")
    if x.shape != (tokens, 2 * k if mode == GATED else k):
        raise ValueError(f"x is {tuple(x.shape)} for {tokens} tokens of {k} inputs")
    if mode == RMSNORM and (weight is None or weight.shape[0] != k):
        raise ValueError("an rmsnorm prologue needs its (k,) weight")
    weight = x[0] if weight is None else weight  # unread: any float32 vector
    if tokens:
        _quantize_blocks[tokens, ROW_THREADS, stream](x, mode, weight, float(eps), k, *act)
    return act
