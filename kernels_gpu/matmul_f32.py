"""out = x @ w.T (times a per-row scale): float32 activations, float32 sums.

Serves float32 weights (and the lm head) through `matmul_f32`, and int8 weights with their row
scales through matmul_int8.matmul_w8 (the weight-only int8 path), since an int8 weight is
converted to float as it is loaded.

- Few tokens (decode): one warp per output row reads the row once, lanes on consecutive
  elements (coalesced), TOKENS tokens at a time so each weight is loaded once per pass. Int8
  rows whose length is a multiple of 4 are read as int32 words (`_gemv_words`): a warp loads
  128 contiguous bytes per instruction instead of 32, and unpacks the bytes in registers.
- More tokens (prefill): TILE x TILE output tiles; each block stages a TILE x TILE slice of x
  and of w in shared memory per step along K, so every weight read from memory is used TILE
  times. A plain tiled kernel, not cuBLAS: correct everywhere, a fraction of peak.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from kernels_gpu.launch import no_scale, result
from kernels_gpu.warp import WARP, lane_totals

ROWS = 4  # output rows (warps) per GEMV block
TOKENS = 4  # tokens per pass over a weight row; their sums live in registers
GEMV_MAX_TOKENS = 8  # above this the tiled kernel's reuse of weight tiles wins
TILE = 16
TILE_PAD = TILE + 1  # row length of shared tiles: the padding avoids bank conflicts


@cuda.jit(device=True)
def signed_byte(word, b):
    """Byte b (little-endian) of an int32 word, sign-extended to int32: how the GEMVs read
    int8 rows four weights per load. No `cuda.*`, so matmul_int8 calls it too."""
    byte = (word >> (8 * b)) & 0xFF
    return int32(byte - ((byte & 0x80) << 1))


@cuda.jit(device=True)
def _epilogue(value, t, row, bias, out, accumulate):
    """out[t, row] = value (+ bias[row]), or += it: the bias is added before the residual,
    as the CPU backend adds it to a linear's result before adding that into the stream."""
    if bias.size > 0:
        value += bias[row]
    if accumulate:
        out[t, row] += value
    else:
        out[t, row] = value


@cuda.jit(device=True)
def _store_row_sums(acc, t0, nt, row, live, scale, bias, out, accumulate):
    """Sum the lanes' partials acc[:nt] of one row by warp shuffles, write out[t0:, row]
    through `_epilogue`, lane j token t0 + j. All threads of the block call it.

    An empty `scale` means unscaled, an empty `bias` no bias.
    """
    lane = cuda.threadIdx.x
    total = lane_totals(acc, nt, lane)
    if live and lane < nt:
        if scale.size > 0:
            total *= scale[row]
        _epilogue(total, t0 + lane, row, bias, out, accumulate)


@cuda.jit(cache=True)
def _gemv(x, w, scale, bias, out, accumulate):
    """Block (WARP, ROWS): warp y of block b computes out[:, b * ROWS + y]."""
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * ROWS + cuda.threadIdx.y
    tokens, k = x.shape
    live = row < w.shape[0]
    acc = cuda.local.array(TOKENS, float32)
    for t0 in range(0, tokens, TOKENS):
        nt = TOKENS if tokens - t0 > TOKENS else tokens - t0
        for j in range(TOKENS):
            acc[j] = 0
        if live:
            for c in range(lane, k, WARP):
                wc = float32(w[row, c])
                for j in range(nt):
                    acc[j] += x[t0 + j, c] * wc
        _store_row_sums(acc, t0, nt, row, live, scale, bias, out, accumulate)


@cuda.jit(cache=True)
def _gemv_words(x, w4, scale, bias, out, accumulate):
    """`_gemv` for int8 rows seen as int32 words w4 (N, K / 4), bytes little-endian."""
    lane = cuda.threadIdx.x
    row = cuda.blockIdx.x * ROWS + cuda.threadIdx.y
    tokens = x.shape[0]
    words = w4.shape[1]
    live = row < w4.shape[0]
    acc = cuda.local.array(TOKENS, float32)
    for t0 in range(0, tokens, TOKENS):
        nt = TOKENS if tokens - t0 > TOKENS else tokens - t0
        for j in range(TOKENS):
            acc[j] = 0
        if live:
            for c in range(lane, words, WARP):
                word = w4[row, c]
                for b in range(4):
                    wb = float32(signed_byte(word, b))
                    for j in range(nt):
                        acc[j] += x[t0 + j, 4 * c + b] * wb
        _store_row_sums(acc, t0, nt, row, live, scale, bias, out, accumulate)


@cuda.jit(cache=True)
def _gemm(x, w, scale, bias, out, accumulate):
    """Block (TILE, TILE) computes the tile out[by*TILE:, bx*TILE:]; thread (tx, ty) one entry."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t0 = cuda.blockIdx.y * TILE
    n0 = cuda.blockIdx.x * TILE
    tokens, k = x.shape
    n = w.shape[0]
    xs = cuda.shared.array((TILE, TILE_PAD), float32)  # [token, k]
    ws = cuda.shared.array((TILE, TILE_PAD), float32)  # [row, k]
    acc = float32(0)
    for k0 in range(0, k, TILE):
        c = k0 + tx
        # Both tiles are read along K by consecutive threads: coalesced.
        xs[ty, tx] = x[t0 + ty, c] if t0 + ty < tokens and c < k else float32(0)
        ws[ty, tx] = float32(w[n0 + ty, c]) if n0 + ty < n and c < k else float32(0)
        cuda.syncthreads()
        for i in range(TILE):
            acc += xs[ty, i] * ws[tx, i]
        cuda.syncthreads()
    t = t0 + ty
    r = n0 + tx
    if t < tokens and r < n:
        if scale.size > 0:
            acc *= scale[r]
        _epilogue(acc, t, r, bias, out, accumulate)


def float_matmul(x, w, scale, out=None, stream=0, bias=None, accumulate=False):
    """x (T, K) float32 @ w.T * scale (N,) for w (N, K) float32 or int8 and any T, plus
    `bias` (N,) when given; `accumulate` adds the result into `out` instead of storing it.

    An empty `scale` (launch.no_scale) means unscaled.
    """
    tokens, k = x.shape
    n = w.shape[0]
    if k != w.shape[1]:
        raise ValueError(f"x has {k} columns, w has {w.shape[1]}")
    if accumulate and out is None:
        raise ValueError("accumulate needs out")
    out = result(out, (tokens, n), np.float32, stream)
    if tokens == 0 or n == 0:
        return out
    bias = no_scale() if bias is None else bias
    if tokens > GEMV_MAX_TOKENS:
        grid = (-(-n // TILE), -(-tokens // TILE))
        _gemm[grid, (TILE, TILE), stream](x, w, scale, bias, out, accumulate)
    elif w.dtype == np.int8 and k % 4 == 0 and w.is_c_contiguous():
        words = w.view(np.int32)
        _gemv_words[-(-n // ROWS), (WARP, ROWS), stream](x, words, scale, bias, out, accumulate)
    else:
        _gemv[-(-n // ROWS), (WARP, ROWS), stream](x, w, scale, bias, out, accumulate)
    return out


def matmul_f32(x, w, out=None, stream=0, bias=None, accumulate=False):
    """x (T, K) float32 @ w.T (+ bias) for w (N, K) float32 -> (T, N) float32, all device
    arrays; `accumulate` adds into `out`."""
    return float_matmul(x, w, no_scale(), out, stream, bias, accumulate)
