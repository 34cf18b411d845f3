"""Int8-weight matmuls: int8 weights (N, K) with a float32 scale per output row.

Two numerics, as on the CPU:

- `matmul_w8`, weight-only: float32 activations times dequantised weights, float32 sums (the
  kernels of matmul_f32). No activation pass, so decode reads just the weight bytes.
- `gemm_w8`, the twin of kernels_cpu.matmul_int8.gemm_w8 (and of gemv_w8, which is gemm_w8
  with act_max 32767): activations quantised per token to [-act_max, act_max] by
  `quantize_rows`, products summed exactly in integers, scaled in float64 as the CPU does, so
  both devices give the same bits. A K tile's integer sum fits int32 (16 * 32767 * 127 <
  2**31) and is added into an int64 total, so any K is exact.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, float64, int16, int32, int64

from kernels_gpu.launch import ROW_THREADS, result
from kernels_gpu.matmul_f32 import TILE, TILE_PAD, float_matmul


@cuda.jit(cache=True)
def _quantize_rows(x, qmax, a, a_scale):
    """One block per row: a[t] = rint(x[t] / s) with s = max|x[t]| / qmax (1 for a zero row).

    The same float32 operations as the CPU's `_quantize_row` (an IEEE division, a multiply by
    its reciprocal, round half to even), so the integers and scales are identical.
    """
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    k = x.shape[1]
    peaks = cuda.shared.array(ROW_THREADS, float32)
    peak = float32(0)
    for i in range(tid, k, ROW_THREADS):
        v = abs(x[t, i])
        peak = v if v > peak else peak
    peaks[tid] = peak
    cuda.syncthreads()
    for i in range(ROW_THREADS):
        peak = peaks[i] if peaks[i] > peak else peak
    s = peak / float32(qmax) if peak > 0 else float32(1)
    inv = float32(1) / s
    for i in range(tid, k, ROW_THREADS):
        a[t, i] = int16(round(x[t, i] * inv))
    if tid == 0:
        a_scale[t] = s


@cuda.jit(cache=True)
def _gemm_int(a, a_scale, w, scale, out):
    """matmul_f32's tiled `_gemm` on integers: quantised a (T, K) times int8 w (N, K)."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t0 = cuda.blockIdx.y * TILE
    n0 = cuda.blockIdx.x * TILE
    tokens, k = a.shape
    n = w.shape[0]
    xs = cuda.shared.array((TILE, TILE_PAD), int32)
    ws = cuda.shared.array((TILE, TILE_PAD), int32)
    total = int64(0)
    for k0 in range(0, k, TILE):
        c = k0 + tx
        xs[ty, tx] = a[t0 + ty, c] if t0 + ty < tokens and c < k else 0
        ws[ty, tx] = w[n0 + ty, c] if n0 + ty < n and c < k else 0
        cuda.syncthreads()
        tile_sum = int32(0)
        for i in range(TILE):
            tile_sum += xs[ty, i] * ws[tx, i]
        total += tile_sum
        cuda.syncthreads()
    t = t0 + ty
    r = n0 + tx
    if t < tokens and r < n:
        # As the CPU's _store_tile: exact float64 product of the scales, one rounding.
        both = float64(a_scale[t]) * float64(scale[r])
        out[t, r] = float32(float64(total) * both)


def matmul_w8(x, w, scale, out=None, stream=0):
    """Weight-only int8: x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T -> (T, N) float32."""
    return float_matmul(x, w, scale, out, stream)


def quantize_rows(x, qmax: int, out=None, stream=0):
    """Per-row symmetric quantisation of x (T, K) float32 to int16 in [-qmax, qmax].

    Returns device arrays (values (T, K) int16, scales (T,) float32), like the CPU twin:
    `out` = (values, scales) when given, else new ones.
    """
    tokens, k = x.shape
    a_out, scale_out = (None, None) if out is None else out
    a = result(a_out, (tokens, k), np.int16, stream)
    a_scale = result(scale_out, (tokens,), np.float32, stream)
    if tokens:
        _quantize_rows[tokens, ROW_THREADS, stream](x, qmax, a, a_scale)
    return a, a_scale


def gemm_w8(x, w, scale, act_max: int, out=None, stream=0, act=None):
    """x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T with x quantised per token.

    act_max 127 is W8A8, 32767 matches the CPU's default int16 activations. `act`: scratch
    (int16 (T, K), float32 (T,)) for the quantised activations, else allocated per call.
    """
    tokens, k = x.shape
    n = w.shape[0]
    if k != w.shape[1]:
        raise ValueError(f"x has {k} columns, w has {w.shape[1]}")
    out = result(out, (tokens, n), np.float32, stream)
    if tokens == 0 or n == 0:
        return out
    a, a_scale = quantize_rows(x, act_max, act, stream)
    grid = (-(-n // TILE), -(-tokens // TILE))
    _gemm_int[grid, (TILE, TILE), stream](a, a_scale, w, scale, out)
    return out
