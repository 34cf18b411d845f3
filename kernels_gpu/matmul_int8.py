"""Int8-weight matmuls: int8 weights (N, K) with a float32 scale per output row.

Two numerics, as on the CPU:

- `matmul_w8`, weight-only: float32 activations times dequantised weights, float32 sums (the
  kernels of matmul_f32). No activation pass, so decode reads just the weight bytes.
- `gemm_w8`, the twin of kernels_cpu.matmul_int8.gemm_w8 (and of gemv_w8, which is gemm_w8
  with act_max 32767): activations quantised per token to [-act_max, act_max] by
  `quantize_rows`, products summed exactly in integers, scaled in float64 as the CPU does, so
  both devices give the same bits (the quantisation, with its rmsnorm or gate prologue, is
  in norms.py, beside the rmsnorm it shares a reduction with). A K tile's integer sum fits int32 (16 * 32767 * 127 <
  2**31) and is added into an int64 total, so any K is exact. Decode (a few tokens, rows of
  whole int32 words) runs `_gemv_int`, laid out as matmul_f32's GEMV: one warp per output
  row reading it once as words, a few tokens' sums per lane, so no thread computes padding;
  prefill runs the tiled `_gemm_int`.

Both add the bias and store or add into `out` (the residual stream) in their epilogue,
instead of two more launches.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, float64, int32, int64

from kernels_gpu.launch import no_scale, result
from kernels_gpu.matmul_f32 import (
    GEMV_MAX_TOKENS,
    ROWS,
    TILE,
    TILE_PAD,
    TOKENS,
    WARP,
    _epilogue,
    float_matmul,
    signed_byte,
)
from kernels_gpu.norms import GATED, PLAIN, quantize_rows
from kernels_gpu.warp import lane_totals


@cuda.jit(device=True)
def _scaled(total, t, r, a_scale, scale):
    """As the CPU's _store_tile: the exact float64 product of the scales, one rounding."""
    return float32(float64(total) * (float64(a_scale[t]) * float64(scale[r])))


@cuda.jit(cache=True)
def _gemv_int(a, a_scale, w4, scale, bias, out, accumulate):
    """Block (WARP, ROWS): warp y of block b computes out[:, b * ROWS + y] from int8 rows seen
    as int32 words w4 (N, K / 4), bytes little-endian, TOKENS tokens per pass over the row."""
    lane = cuda.threadIdx.x
    warp = cuda.threadIdx.y
    row = cuda.blockIdx.x * ROWS + warp
    tokens = a.shape[0]
    words = w4.shape[1]
    live = row < w4.shape[0]
    acc = cuda.local.array(TOKENS, int64)
    for t0 in range(0, tokens, TOKENS):
        nt = TOKENS if tokens - t0 > TOKENS else tokens - t0
        for j in range(TOKENS):
            acc[j] = 0
        if live:
            for c in range(lane, words, WARP):
                word = w4[row, c]
                for b in range(4):
                    wb = signed_byte(word, b)
                    for j in range(nt):
                        acc[j] += int32(a[t0 + j, 4 * c + b]) * wb
        total = lane_totals(acc, nt, lane)
        if live and lane < nt:
            t = t0 + lane
            _epilogue(_scaled(total, t, row, a_scale, scale), t, row, bias, out, accumulate)


@cuda.jit(cache=True)
def _gemm_int(a, a_scale, w, scale, bias, out, accumulate):
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
        _epilogue(_scaled(total, t, r, a_scale, scale), t, r, bias, out, accumulate)


def matmul_w8(x, w, scale, out=None, stream=0):
    """Weight-only int8: x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T -> (T, N) float32."""
    return float_matmul(x, w, scale, out, stream)


def gemm_w8(
    x,
    w,
    scale,
    act_max: int,
    out=None,
    stream=0,
    act=None,
    bias=None,
    accumulate=False,
    prologue: int = PLAIN,
    norm=None,
    eps: float = 0.0,
):
    """x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T with x quantised per token, plus
    `bias` (N,) when given; `accumulate` adds the result into `out` instead of storing it.

    act_max 127 is W8A8, 32767 matches the CPU's default int16 activations. `act`: scratch
    (int16 (T, K), float32 (T,)) for the quantised activations, else allocated per call.
    `prologue` RMSNORM quantises rmsnorm(x) (norm (K,), eps) instead of x, GATED silu(gate) *
    up of x (T, 2K), in the quantisation's launch (norms.quantize_rows).
    """
    tokens, k = x.shape[0], w.shape[1]
    n = w.shape[0]
    if x.shape[1] != (2 * k if prologue == GATED else k):
        raise ValueError(f"x has {x.shape[1]} columns for w's {k}")
    if accumulate and out is None:
        raise ValueError("accumulate needs out")
    out = result(out, (tokens, n), np.float32, stream)
    if tokens == 0 or n == 0:
        return out
    a, a_scale = quantize_rows(x, act_max, act, stream, prologue, norm, eps)
    bias = no_scale() if bias is None else bias
    if tokens <= GEMV_MAX_TOKENS and k % 4 == 0 and w.is_c_contiguous():
        words = w.view(np.int32)
        _gemv_int[-(-n // ROWS), (WARP, ROWS), stream](
            a, a_scale, words, scale, bias, out, accumulate
        )
    else:
        grid = (-(-n // TILE), -(-tokens // TILE))
        _gemm_int[grid, (TILE, TILE), stream](a, a_scale, w, scale, bias, out, accumulate)
    return out
