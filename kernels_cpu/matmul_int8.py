"""Int8-weight matmuls: int8 weights with per-output-row float32 scales, float32 in and out.

The activations are quantized per token on entry (dynamic symmetric scales) and multiplied
in integers with the SIMD dot products of `simd`, so the widening costs one instruction per
16 or 32 weights instead of the int -> float conversion and FMA per 8 weights.

- Decode (`gemv_w8`, a few tokens) is memory-bound: activations are quantized to int16
  (error below 2**-15 of the token's largest value, far under the weights' int8 error) and
  the kernel's job is to stream the weight bytes at memory bandwidth.
- Prefill and batches (`gemm_w8`) are compute-bound: a 4-row x 2-token register tile uses
  each loaded vector several times. Activations are int16 by default too: on SmolLM2, int8
  activations (W8A8) cost 3.7% perplexity against 0.4% for int16, at the same speed here.

Both split output rows across cores with prange; rows of an int8 weight are contiguous.

A linear's neighbours are fused into it, so a decoder layer is a few kernel calls, each one
dispatch from Python and one parallel region: the quantization pass on entry can first
compute the input from x (rmsnorm(x), or silu(gate) * up of a gate_up row) into scratch `h`,
and the stores can add into `out` (the residual stream) instead of overwriting it. The
prologue runs the same row functions as the standalone kernels, so fused and unfused inputs
are the same bits.
"""

import numpy as np
from numba import njit, prange

from kernels_cpu.activations import silu_mul_row
from kernels_cpu.exact_math import EXACT_MATH
from kernels_cpu.norms import rmsnorm_row
from kernels_cpu.reductions import abs_max
from kernels_cpu.simd import (
    KBLOCK,
    host_kind,
    lanes,
    make_dot_tile,
    make_scaled_tile,
    prefetch,
    stack_tile,
)

KIND = host_kind()
LANES = lanes(KIND)
INT16_MAX = 32767
# The GEMV reads one row at a time and asks for the bytes PREFETCH_BYTES ahead by hand: the
# hardware prefetcher alone, or reading four rows at once (four short streams it never
# learns), left a core at half its read bandwidth (measured on Zen 4, 2048-wide rows, one
# thread: 22 GB/s four rows at a time, 40 GB/s one row with 8 KB prefetch; 2 KB ahead: 33).
PREFETCH_BYTES = 8192
# Output rows per parallel job of the GEMV and of the GEMM.
JOB_ROWS = 16
GEMM_JOB_ROWS = 32

_dot_1x1 = make_dot_tile(KIND, 1, 1)
_dot_1x2 = make_dot_tile(KIND, 1, 2)
_dot_4x1 = make_dot_tile(KIND, 4, 1)
_dot_4x2 = make_dot_tile(KIND, 4, 2)
_dot_4x4 = make_dot_tile(KIND, 4, 4)
_scaled_4x1 = make_scaled_tile(KIND, 4, 1)
_scaled_4x2 = make_scaled_tile(KIND, 4, 2)
_scaled_4x4 = make_scaled_tile(KIND, 4, 4)


# No `arcp`: with it, dividing by a qmax the compiler sees as a constant becomes a multiply
# by its rounded reciprocal, so gemv_w8 (constant) and gemm_w8 (argument) would scale the same
# token differently by an ulp, and batched outputs would drift from one-by-one outputs.
@njit(cache=True, fastmath=EXACT_MATH)
def _quantize_row(x: np.ndarray, t: int, qmax: int, a: np.ndarray, a_scale: np.ndarray) -> None:
    amax = abs_max(x[t])
    scale = amax / np.float32(qmax) if amax > 0 else np.float32(1.0)
    inv = np.float32(1.0) / scale
    for i in range(x.shape[1]):
        a[t, i] = np.int16(np.rint(x[t, i] * inv))
    a_scale[t] = scale


@njit(cache=True, fastmath=True)
def quantize_rows_into(x: np.ndarray, qmax: int, a: np.ndarray, a_scale: np.ndarray) -> None:
    """Per-row symmetric quantization of float32 x (T, K) to integers in [-qmax, qmax].

    Writes the values as int16 (the dot products' input width) into a[:, :K], which may be
    wider (a padded row), and the float32 row scales into a_scale (T,).
    """
    if a.shape[0] != x.shape[0] or a.shape[1] < x.shape[1] or a_scale.shape[0] != x.shape[0]:
        raise ValueError("quantize_rows_into: a or a_scale does not fit x")
    for t in range(x.shape[0]):
        _quantize_row(x, t, qmax, a, a_scale)


@njit(cache=True)
def quantize_rows(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_rows_into` into new arrays: (values (T, K) int16, scales (T,) float32)."""
    a = np.empty(x.shape, dtype=np.int16)
    a_scale = np.empty(x.shape[0], dtype=np.float32)
    quantize_rows_into(x, qmax, a, a_scale)
    return a, a_scale


@njit(cache=True)
def _prepare_row(x, t, h, norm, eps, qmax, a, a_scale) -> None:
    """Quantize row t of the linear's input into a, a_scale. The input is x itself when h is
    None; otherwise it is computed into the scratch h first: rmsnorm(x) with weights `norm`,
    or, with norm None, silu(gate) * up of x = [gate | up]."""
    if h is None:
        _quantize_row(x, t, qmax, a, a_scale)
    else:
        if norm is not None:
            rmsnorm_row(x, t, norm, eps, h)
        else:
            silu_mul_row(x, t, h)
        _quantize_row(h, t, qmax, a, a_scale)


# A twin of the serial loop in gemv_w8_into rather than njit(parallel=True) of one function:
# numba's disk cache keys on the Python function, so the two compilations would overwrite
# each other's cache entries.
@njit(cache=True, parallel=True)
def _prepare_rows_parallel(x, h, norm, eps, qmax, a, a_scale) -> None:
    for t in prange(x.shape[0]):
        _prepare_row(x, t, h, norm, eps, qmax, a, a_scale)


@njit(cache=True)
def _check_matmul(x, w, out, a, a_scale, h, norm) -> None:
    """Shapes the kernels rely on (they index without bounds checks)."""
    tokens = x.shape[0]
    n, k = w.shape
    if h is None or norm is not None:
        if x.shape[1] != k:
            raise ValueError("x and w differ in K")
    elif x.shape[1] != 2 * k:
        raise ValueError("a gated input x must be (T, 2K) for w (N, K)")
    if h is not None and (h.shape[0] != tokens or h.shape[1] != k):
        raise ValueError("h must be (T, K)")
    if h is None and norm is not None:
        raise ValueError("a fused rmsnorm needs the scratch h")
    if norm is not None and norm.shape[0] != k:
        raise ValueError("norm must be (K,)")
    if out.shape[0] != tokens or out.shape[1] != n:
        raise ValueError("out must be (T, N)")
    if a.shape[0] != tokens or a.shape[1] != k or a_scale.shape[0] != tokens:
        raise ValueError("a must be (T, K) and a_scale (T,)")


@njit(cache=True, inline="always")
def _dot_tile(w: np.ndarray, r: int, a: np.ndarray, t: int, sums: np.ndarray) -> None:
    """sums[i, j] = sum(w[r + i] * a[t + j]) exactly in int64, for (1 or 4) x (1, 2 or 4)
    tiles."""
    rows, tokens = sums.shape
    k = w.shape[1]
    kv = k - k % LANES
    for i in range(rows):
        for j in range(tokens):
            sums[i, j] = 0
    for k0 in range(0, kv, KBLOCK):
        k1 = min(k0 + KBLOCK, kv)
        if rows == 4 and tokens == 4:
            _dot_4x4(w, r, a, t, k0, k1, sums)
        elif rows == 4 and tokens == 2:
            _dot_4x2(w, r, a, t, k0, k1, sums)
        elif rows == 4:
            _dot_4x1(w, r, a, t, k0, k1, sums)
        elif tokens == 2:
            _dot_1x2(w, r, a, t, k0, k1, sums)
        else:
            _dot_1x1(w, r, a, t, k0, k1, sums)
    for c in range(kv, k):
        for i in range(rows):
            for j in range(tokens):
                sums[i, j] += np.int64(w[r + i, c]) * np.int64(a[t + j, c])


@njit(cache=True, inline="always")
def _store_tile(sums, r, t, a_scale, scale, out, accumulate) -> None:
    """Scale a tile of exact integer sums to float32; store it in `out`, or add it there.

    In float64 the product of the two float32 scales is exact and the sum is exact, so the
    result rounds the same whatever order the compiler multiplies in: a token's output then
    does not depend on which kernel or tile served it (batched equals one by one, bit for bit).
    """
    for i in range(sums.shape[0]):
        for j in range(sums.shape[1]):
            both = np.float64(a_scale[t + j]) * np.float64(scale[r + i])
            value = np.float32(np.float64(sums[i, j]) * both)
            if accumulate:
                out[t + j, r + i] += value
            else:
                out[t + j, r + i] = value


@njit(cache=True, parallel=True, fastmath=True)
def gemv_w8_into(
    x: np.ndarray,
    w: np.ndarray,
    scale: np.ndarray,
    out: np.ndarray,
    a: np.ndarray,
    a_scale: np.ndarray,
    h: np.ndarray | None = None,
    norm: np.ndarray | None = None,
    eps: float = 0.0,
    accumulate: bool = False,
) -> None:
    """out (T, N) = x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T, for small T.

    a (T, K) int16 and a_scale (T,) float32 are scratch for the quantized activations.
    Fused neighbours: with scratch h (T, K), the input is rmsnorm(x) (norm (K,), eps) or,
    without norm, silu(gate) * up of x (T, 2K); `accumulate` adds the result into out.
    """
    _check_matmul(x, w, out, a, a_scale, h, norm)
    for t in range(x.shape[0]):
        _prepare_row(x, t, h, norm, eps, INT16_MAX, a, a_scale)
    tokens = x.shape[0]
    k = w.shape[1]
    n = w.shape[0]
    for job in prange((n + JOB_ROWS - 1) // JOB_ROWS):
        two, one = stack_tile(1, 2), stack_tile(1, 1)
        for r in range(job * JOB_ROWS, min(job * JOB_ROWS + JOB_ROWS, n)):
            ahead = r * k + PREFETCH_BYTES
            for off in range(0, k, 64):
                prefetch(w, ahead + off)
            # Two tokens per pass over the row: its bytes are loaded and widened once.
            for t in range(0, tokens - 1, 2):
                _dot_tile(w, r, a, t, two)
                _store_tile(two, r, t, a_scale, scale, out, accumulate)
            if tokens % 2:
                _dot_tile(w, r, a, tokens - 1, one)
                _store_tile(one, r, tokens - 1, a_scale, scale, out, accumulate)


@njit(cache=True)
def gemv_w8(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`gemv_w8_into` into a new (T, N) array, with its own scratch."""
    tokens = x.shape[0]
    out = np.empty((tokens, w.shape[0]), dtype=np.float32)
    a = np.empty(x.shape, dtype=np.int16)
    gemv_w8_into(x, w, scale, out, a, np.empty(tokens, dtype=np.float32))
    return out


@njit(cache=True, inline="always")
def _whole_rows(w: np.ndarray) -> bool:
    """Whether one SIMD call covers w's rows (no column blocks, no scalar tail): the rows the
    scaled tiles take."""
    return w.shape[1] % LANES == 0 and w.shape[1] <= KBLOCK


@njit(cache=True, inline="always")
def _block_tile(w, r, a, t, a_scale, scale, out, accumulate, sums) -> None:
    """Rows r..r+3 x the 4 or 2 tokens from t (as `sums` is shaped), scaled into `out`.

    Rows that one SIMD call covers (most hidden sizes) take the scaled tiles, whose epilogue
    stays in vector registers; others go through `_dot_tile`'s column blocks and scalar tail
    and `_store_tile`.
    """
    if _whole_rows(w):
        if sums.shape[1] == 4:
            _scaled_4x4(w, r, a, t, a_scale, scale, out, accumulate)
        else:
            _scaled_4x2(w, r, a, t, a_scale, scale, out, accumulate)
    else:
        _dot_tile(w, r, a, t, sums)
        _store_tile(sums, r, t, a_scale, scale, out, accumulate)


@njit(cache=True)
def _edge_tiles(w, r, end, a, a_scale, scale, out, accumulate) -> None:
    """The parts of rows r..end a GEMM's 4x2 tiles miss: an odd last token, leftover rows.

    Not inlined, so the hot loop in `gemm_w8` stays small (10% faster at 16 tokens).
    """
    tokens = a.shape[0]
    quad = stack_tile(4, 1)
    one = stack_tile(1, 1)
    full = r + (end - r) // 4 * 4
    if tokens % 2:
        for row in range(r, full, 4):
            if _whole_rows(w):
                _scaled_4x1(w, row, a, tokens - 1, a_scale, scale, out, accumulate)
            else:
                _dot_tile(w, row, a, tokens - 1, quad)
                _store_tile(quad, row, tokens - 1, a_scale, scale, out, accumulate)
    for row in range(full, end):
        for t in range(tokens):
            _dot_tile(w, row, a, t, one)
            _store_tile(one, row, t, a_scale, scale, out, accumulate)


@njit(cache=True, parallel=True, fastmath=True)
def gemm_w8_into(
    x: np.ndarray,
    w: np.ndarray,
    scale: np.ndarray,
    act_max: int,
    out: np.ndarray,
    a: np.ndarray,
    a_scale: np.ndarray,
    h: np.ndarray | None = None,
    norm: np.ndarray | None = None,
    eps: float = 0.0,
    accumulate: bool = False,
) -> None:
    """out (T, N) = x (T, K) float32 @ (w (N, K) int8 * scale (N,)).T, for any T.

    Activations are quantized per token to [-act_max, act_max] into the scratch a (T, K)
    int16 and a_scale (T,): 127 is W8A8, 32767 keeps float32-like activations at the same
    speed on the pmaddwd/vpdpwssd paths. Fused neighbours (h, norm, eps, accumulate) as in
    `gemv_w8_into`. Each parallel job covers GEMM_JOB_ROWS rows.
    A 4-row block is multiplied by four tokens at a time (then a pair, then an odd one): each
    weight vector loaded and widened serves four tokens (4 x 2 tiles were 5-19% slower at 16
    tokens). Meanwhile a block four or more ahead is prefetched, a slice per tile: weights
    stream from memory (a model is bigger than the caches) and short rows read four at a time
    defeat the hardware prefetcher (see gemv_w8). One block ahead was too late at 16 tokens
    (Zen 4, weights out of cache: 252 -> 300 GMAC/s at 3072x576, 272 -> 315 at 49152x576).
    """
    _check_matmul(x, w, out, a, a_scale, h, norm)
    _prepare_rows_parallel(x, h, norm, eps, act_max, a, a_scale)
    n, k = w.shape
    tokens = x.shape[0]
    quads = tokens // 4
    tiles = quads + tokens % 4 // 2  # 4-token tiles, then a 2-token one if two are left
    # With few tokens a block is done long before memory delivers the next: look further.
    blocks_ahead = max(4, 16 // max(tiles, 1))
    for job in prange((n + GEMM_JOB_ROWS - 1) // GEMM_JOB_ROWS):
        quad = stack_tile(4, 4)
        pair = stack_tile(4, 2)
        r = job * GEMM_JOB_ROWS
        end = min(r + GEMM_JOB_ROWS, n)
        for block in range(r, end - 3, 4):
            ahead = (block + 4 * blocks_ahead) * k
            for p in range(tiles):
                for off in range(p * 4 * k // tiles // 64 * 64, (p + 1) * 4 * k // tiles, 64):
                    prefetch(w, ahead + off)
                if p < quads:
                    _block_tile(w, block, a, 4 * p, a_scale, scale, out, accumulate, quad)
                else:
                    _block_tile(w, block, a, 4 * p, a_scale, scale, out, accumulate, pair)
        _edge_tiles(w, r, end, a, a_scale, scale, out, accumulate)


@njit(cache=True)
def gemm_w8(x: np.ndarray, w: np.ndarray, scale: np.ndarray, act_max: int) -> np.ndarray:
    """`gemm_w8_into` into a new (T, N) array, with its own scratch."""
    tokens = x.shape[0]
    out = np.empty((tokens, w.shape[0]), dtype=np.float32)
    a = np.empty(x.shape, dtype=np.int16)
    gemm_w8_into(x, w, scale, act_max, out, a, np.empty(tokens, dtype=np.float32))
    return out


@njit(cache=True)
def embed_rows_w8_into(w: np.ndarray, scale: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out (T, K) = rows `ids` (T,) of an int8 embedding table (V, K), dequantized to float32."""
    k = w.shape[1]
    if out.shape[0] != ids.shape[0] or out.shape[1] != k:
        raise ValueError("out must be (len(ids), K)")
    for t in range(ids.shape[0]):
        row = ids[t]
        if row < 0 or row >= w.shape[0]:
            raise IndexError("token id outside the embedding table")
        s = scale[row]
        for i in range(k):
            out[t, i] = np.float32(w[row, i]) * s


@njit(cache=True)
def embed_rows_w8(w: np.ndarray, scale: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Look up rows `ids` of an int8 embedding table, dequantized to float32."""
    out = np.empty((ids.shape[0], w.shape[1]), dtype=np.float32)
    embed_rows_w8_into(w, scale, ids, out)
    return out
