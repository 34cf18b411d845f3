"""Matmuls on group-quantized weights (4-bit and 8-bit values with per-group scales).

Weights are stored as `simd_blocks` describes: w = d * (q - zero) + m per group of `group`
columns, rows padded to a multiple of 64 columns (Kp). The activations are quantized on
entry per 32 columns to int8 (the accuracy of llama.cpp's Q8_0 activations), with the two
per-lane sums the tiles need, then multiplied in integers.

One driver serves decode and prefill: up to two tokens walk the rows one at a time with a
hand prefetch ahead (memory-bound: the job is to stream the weight bytes; 4-row tiles read
four short streams at once and ran 15-50% slower, Zen 4, 5632 x 2048, out of cache), more
tokens take 4-row x 4-token tiles so each weight chunk loaded and unpacked serves four
tokens (compute-bound). Both
tiles do the same operations per (row, token), so the two paths give the same bits.

The input can be computed first from x into the scratch h (rmsnorm(x), or silu(gate) * up of
x = [gate | up]), and the result can be added into `out`, as in `matmul_int8`.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from kernels_cpu.activations import silu_mul_row
from kernels_cpu.exact_math import EXACT_MATH
from kernels_cpu.norms import rmsnorm_row
from kernels_cpu.simd import host_kind, prefetch
from kernels_cpu.simd_blocks import (
    ACT_GROUP,
    CHUNK,
    LANES,
    SUPER,
    activation_offset,
    make_block_tile,
)

KIND = host_kind()
# Up to this many tokens, the GEMV's one-token tiles; beyond, 4-token tiles.
GEMV_TOKENS = 2
JOB_ROWS = 16  # output rows per parallel job
# Bytes of the next rows the GEMV asks for ahead of reading them (see matmul_int8.gemv_w8).
PREFETCH_BYTES = 8192

_tile_1x1 = make_block_tile(KIND, 1, 1)
_tile_1x2 = make_block_tile(KIND, 1, 2)
_tile_4x1 = make_block_tile(KIND, 4, 1)
_tile_4x4 = make_block_tile(KIND, 4, 4)


def padded_width(k: int, group: int = CHUNK, two_level: bool = False) -> int:
    """Columns of a block-format row holding k inputs: a multiple of the 64-column chunk, of
    the group and, for two-level scales, of the 256-column super-block."""
    unit = max(CHUNK, group, SUPER if two_level else 0)
    return -(-k // unit) * unit


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(N, Kp) 6-bit values in column order -> the (N, Kp / 4) bytes of their upper two
    bits: byte j of a chunk's 16 holds columns j, j + 16, j + 32 and j + 48, from bit 0."""
    n, kp = q.shape
    planes = (q >> 4).reshape(n, kp // CHUNK, 4, CHUNK // 4)
    packed = planes[:, :, 0] | planes[:, :, 1] << 2 | planes[:, :, 2] << 4 | planes[:, :, 3] << 6
    return packed.reshape(n, kp // 4)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(N, Kp) values in column order (uint8, their low 4 bits; Kp a multiple of 64) -> the
    (N, Kp / 2) bytes of the 4-bit layout: byte j of a 64-column chunk holds columns j (low
    nibble) and j + 32 (high)."""
    n, kp = q.shape
    pairs = q.reshape(n, kp // CHUNK, 2, CHUNK // 2)
    return ((pairs[:, :, 0, :] & 15) | (pairs[:, :, 1, :] << 4)).reshape(n, kp // 2)


def _offset(w):
    """What the multiply step adds to each weight value of w (see simd_blocks)."""


@overload(_offset)
def _offset_impl(w):
    offset = activation_offset(KIND, 8 if w.dtype == types.int8 else 4)
    return lambda w: offset


def packs_nibbles(w):
    """Whether block-format values w hold two 4-bit values a byte (uint8) or one (int8)."""


@overload(packs_nibbles)
def _packs_nibbles_impl(w):
    nibbles = w.dtype == types.uint8
    return lambda w: nibbles


@intrinsic
def half_to_float(typingctx, bits):
    """float32 of a float16 given by its bits (uint16); exact."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


def scale_value(arr, r, g):
    """arr[r, g] as float32, for scale arrays of any stored type."""


@overload(scale_value)
def _scale_value_impl(arr, r, g):
    if arr.dtype == types.uint16:
        return lambda arr, r, g: half_to_float(arr[r, g])
    return lambda arr, r, g: np.float32(arr[r, g])


@njit(cache=True, inline="always")
def _factor(sub, sup, r, g, group):
    """One group's scale (or minimum): sub[r, g], times its super-block's sup when given."""
    value = scale_value(sub, r, g)
    if sup is not None:
        value = sup[r, g * group // SUPER] * value
    return value


@njit(cache=True, inline="always")
def value_at(w, high, r, i):
    """The integer q of column i in row r of block-format values w (and high bits `high`)."""
    if not packs_nibbles(w):
        return np.int32(w[r, i])
    chunk, pos = divmod(i, CHUNK)
    byte = w[r, chunk * (CHUNK // 2) + pos % (CHUNK // 2)]
    q = np.int32(byte >> 4) if pos >= CHUNK // 2 else np.int32(byte & 15)
    if high is not None:
        plane = high[r, chunk * (CHUNK // 4) + pos % (CHUNK // 4)]
        q |= np.int32((plane >> (2 * (pos // (CHUNK // 4)))) & 3) << 4
    return q


@njit(cache=True, fastmath=EXACT_MATH)
def _quantize_row(src, t, k, start, xq, xinit, xs, xm) -> None:
    """Row t of src (its first k columns, zeros after) to int8 per 32 columns, with each
    4-column lane's start (-start * sum) and scaled sum."""
    kp = xq.shape[1]
    for b in range(kp // ACT_GROUP):
        lo = b * ACT_GROUP
        hi = min(lo + ACT_GROUP, k)
        amax = np.float32(0.0)
        for i in range(lo, hi):
            amax = max(amax, abs(src[t, i]))
        scale = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        for i in range(lo, lo + ACT_GROUP):
            xq[t, i] = np.int8(np.rint(src[t, i] * inv)) if i < hi else 0
        xs[t, b] = scale
        for lane in range(b * ACT_GROUP // 4, (b + 1) * ACT_GROUP // 4):
            total = np.int32(0)
            for i in range(4 * lane, 4 * lane + 4):
                total += np.int32(xq[t, i])
            xinit[t, lane] = -start * total
            xm[t, lane] = np.float32(total) * scale


# The linear's input: x itself, rmsnorm(x), or silu(gate) * up of x = [gate | up].
PLAIN, RMSNORM, GATED = 0, 1, 2


@njit(cache=True)
def _prepare_row(x, t, k, h, norm, eps, prologue, start, xq, xinit, xs, xm) -> None:
    """Quantize row t of the linear's input, computed into h first unless it is x itself."""
    if prologue == PLAIN:
        _quantize_row(x, t, k, start, xq, xinit, xs, xm)
        return
    if prologue == RMSNORM:
        rmsnorm_row(x, t, norm, eps, h)
    else:
        silu_mul_row(x, t, h)
    _quantize_row(h, t, k, start, xq, xinit, xs, xm)


# A parallel twin of the serial loop in the driver (numba caches per Python function).
@njit(cache=True, parallel=True)
def _prepare_rows_parallel(x, k, h, norm, eps, prologue, start, xq, xinit, xs, xm) -> None:
    for t in prange(x.shape[0]):
        _prepare_row(x, t, k, h, norm, eps, prologue, start, xq, xinit, xs, xm)


@njit(cache=True)
def _check(x, w, high, scale, mins, group, k, out, xq, xinit, xs, xm, h, norm, prologue) -> None:
    """Shapes the tiles rely on (they index without bounds checks)."""
    tokens = x.shape[0]
    kp = xq.shape[1]
    n = out.shape[1]
    if kp % CHUNK or kp % group or k > kp:
        raise ValueError("xq must be (T, padded_width(K))")
    width = kp // 2 if packs_nibbles(w) else kp
    if w.shape[0] != n or w.shape[1] != width:
        raise ValueError("w does not match out and the padded width")
    if high is not None and (high.shape[0] != n or high.shape[1] * 4 != kp):
        raise ValueError("high must be (N, Kp / 4)")
    if scale.shape[0] != n or scale.shape[1] * group != kp:
        raise ValueError("scale must be (N, Kp / group)")
    if mins is not None and mins.shape != scale.shape:
        raise ValueError("mins must be shaped as scale")
    if x.shape[1] != (2 * k if prologue == GATED else k):
        raise ValueError("x does not match the weight's inputs")
    if prologue != PLAIN and (h.shape[0] != tokens or h.shape[1] != k):
        raise ValueError("h must be (T, K)")
    if prologue == RMSNORM and norm.shape[0] != k:
        raise ValueError("norm must be (K,)")
    if out.shape[0] != tokens:
        raise ValueError("out must be (T, N)")
    if xq.shape[0] != tokens or xinit.shape != (tokens, kp // 4) or xm.shape != (tokens, kp // 4):
        raise ValueError("xinit and xm must be (T, Kp / 4)")
    if xs.shape != (tokens, kp // ACT_GROUP):
        raise ValueError("xs must be (T, Kp / 32)")


@njit(cache=True, parallel=True)
def matmul_blocks_into(
    x, w, high, scale, scale_sup, mins, mins_sup, group, zero, k, out, xq, xinit, xs, xm,
    h, norm, eps, prologue, accumulate,
):  # fmt: skip
    """out (T, N) (+)= input (T, k) @ W.T for a block-format W (see simd_blocks for the
    arrays); the input is x (prologue PLAIN), rmsnorm(x) with weights norm (K,) and eps
    (RMSNORM) or silu(gate) * up of x (T, 2K) (GATED), the last two computed into h (T, K).

    xq (T, Kp) int8, xinit (T, Kp / 4) int32, xs (T, Kp / 32) and xm (T, Kp / 4) float32 are
    scratch for the quantized activations. h and norm are arrays whatever the prologue, so
    one compiled driver serves every linear of a weight format (each distinct argument type
    costs a compilation of seconds).
    """
    _check(x, w, high, scale, mins, group, k, out, xq, xinit, xs, xm, h, norm, prologue)
    start = zero + _offset(w)
    tokens = x.shape[0]
    n = out.shape[1]
    row_bytes = w.shape[1]
    gemv = tokens <= GEMV_TOKENS
    if gemv:
        for t in range(tokens):
            _prepare_row(x, t, k, h, norm, eps, prologue, start, xq, xinit, xs, xm)
    else:
        _prepare_rows_parallel(x, k, h, norm, eps, prologue, start, xq, xinit, xs, xm)
    quads = tokens // 4 * 4
    for job in prange((n + JOB_ROWS - 1) // JOB_ROWS):
        r = job * JOB_ROWS
        end = min(r + JOB_ROWS, n)
        if gemv:
            for row in range(r, end):
                ahead = row * row_bytes + PREFETCH_BYTES
                for off in range(0, row_bytes, 64):
                    prefetch(w, ahead + off)
                if tokens == 2:
                    _tile_1x2(w, high, scale, scale_sup, mins, mins_sup, group, row, xq, xinit, xs, xm,
                              0, out, accumulate)  # fmt: skip
                else:
                    _tile_1x1(w, high, scale, scale_sup, mins, mins_sup, group, row, xq, xinit, xs, xm,
                              0, out, accumulate)  # fmt: skip
            continue
        for row in range(r, end - 3, 4):
            for t in range(0, quads, 4):
                _tile_4x4(w, high, scale, scale_sup, mins, mins_sup, group, row, xq, xinit, xs, xm,
                          t, out, accumulate)  # fmt: skip
            for t in range(quads, tokens):
                _tile_4x1(w, high, scale, scale_sup, mins, mins_sup, group, row, xq, xinit, xs, xm,
                          t, out, accumulate)  # fmt: skip
        for row in range(r + (end - r) // 4 * 4, end):
            for t in range(tokens):
                _tile_1x1(w, high, scale, scale_sup, mins, mins_sup, group, row, xq, xinit, xs, xm,
                          t, out, accumulate)  # fmt: skip


def activation_scratch(tokens: int, kp: int) -> tuple[np.ndarray, ...]:
    """New scratch (xq, xinit, xs, xm) for `matmul_blocks_into` over kp (padded) inputs."""
    return (
        np.empty((tokens, kp), np.int8),
        np.empty((tokens, kp // 4), np.int32),
        np.empty((tokens, kp // ACT_GROUP), np.float32),
        np.empty((tokens, kp // 4), np.float32),
    )


def matmul_blocks(x, w, high, scale, scale_sup, mins, mins_sup, group, zero, k) -> np.ndarray:
    """`matmul_blocks_into` into a new (T, N) array, with its own scratch."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    scratch = activation_scratch(x.shape[0], scale.shape[1] * group)
    h, norm = np.empty((x.shape[0], k), np.float32), np.empty(0, np.float32)
    matmul_blocks_into(
        x, w, high, scale, scale_sup, mins, mins_sup, group, zero, k, out, *scratch, h, norm, 0.0,
        PLAIN, False,
    )  # fmt: skip
    return out


@njit(cache=True)
def dequantize_rows_into(w, high, scale, scale_sup, mins, mins_sup, group, zero, ids, out) -> None:
    """out (T, K) = rows `ids` of a block-format matrix as float32: d * (q - zero) + m, in
    that order (the GGUF dequantizers' arithmetic). Embedding lookups; K = out.shape[1]."""
    k = out.shape[1]
    if out.shape[0] != ids.shape[0]:
        raise ValueError("out must be (len(ids), K)")
    for t in range(ids.shape[0]):
        row = ids[t]
        if row < 0 or row >= w.shape[0]:
            raise IndexError("row id outside the matrix")
        for g in range((k + group - 1) // group):
            d = _factor(scale, scale_sup, row, g, group)
            m = np.float32(0.0) if mins is None else _factor(mins, mins_sup, row, g, group)
            for i in range(g * group, min(g * group + group, k)):
                value = d * np.float32(value_at(w, high, row, i) - zero)
                out[t, i] = value + m if mins is not None else value


__all__ = ["LANES", "dequantize_rows_into", "matmul_blocks", "matmul_blocks_into", "padded_width"]
