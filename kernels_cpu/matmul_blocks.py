"""Matmuls on group-quantized weights (4-, 6- and 8-bit values with per-group scales).

Weights are stored as `simd_blocks` describes: w = d * (q - zero) + m per group of `group`
columns, rows padded to a multiple of 32 columns (Kp) and interleaved 16 at a time
(`interleave_rows`). The activations are quantized on entry per 32 columns to int8 (the
accuracy of llama.cpp's Q8_0 activations), with the sums the tiles need, then multiplied in
integers.

One driver serves decode and prefill: each parallel job takes a few 16-row groups; up to
two tokens walk them with a hand prefetch a few KB ahead (memory-bound: the job is to
stream the weight bytes), more tokens take 4-token tiles so each block of weights loaded and
unpacked serves four tokens (compute-bound). Every tile does the same operations per
(row, token), so the paths give the same bits.

The input can be computed first from x into the scratch h (rmsnorm(x), or silu(gate) * up of
x = [gate | up]), and the result can be added into `out`, as in `matmul_int8`.
"""

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from kernels_cpu.activations import silu_mul_row
from kernels_cpu.exact_math import EXACT_MATH
from kernels_cpu.norms import rmsnorm_row
from kernels_cpu.simd import host_kind
from kernels_cpu.simd_blocks import (
    BLOCK,
    GROUPS,
    ROWS,
    SUM_SPAN,
    SUPER,
    activation_offset,
    make_rows_tile,
)

KIND = host_kind()
# Up to this many tokens, tiles of one or two tokens; beyond, 4-token tiles.
GEMV_TOKENS = 2
JOB_GROUPS = 2  # 16-row groups per parallel job

_tile_1 = make_rows_tile(KIND, 1, prefetch=True)
_tile_2 = make_rows_tile(KIND, 2, prefetch=True)
_tile_4 = make_rows_tile(KIND, 4, prefetch=False)  # compute-bound: weights stay cached
_tile_1_gemm = make_rows_tile(KIND, 1, prefetch=False)


def padded_width(k: int, group: int = BLOCK, two_level: bool = False) -> int:
    """Columns of a block-format row holding k inputs: a multiple of the 32-input block, of
    the group and, for two-level scales, of the 256-input super-block."""
    unit = max(BLOCK, group, SUPER if two_level else 0)
    return -(-k // unit) * unit


def row_groups(n: int) -> int:
    """16-row groups holding n rows."""
    return -(-n // ROWS)


def padded_inputs(scale: np.ndarray, group: int) -> int:
    """Kp of a block-format matrix from its (groups, Kp / group * 16) scales."""
    return scale.shape[1] * group // ROWS


def _grouped(a: np.ndarray) -> np.ndarray:
    """(N, C) -> (groups, C, 16) with zero rows up to a multiple of 16."""
    n, c = a.shape
    padded = np.zeros((row_groups(n) * ROWS, c), a.dtype)
    padded[:n] = a
    return padded.reshape(-1, ROWS, c).transpose(0, 2, 1)


def interleave_values(q: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Row-major values q (N, Kp) -> the tiles' layout (values, high): 8 bits: int8 q as
    8-bit steps; 4: uint8 q below 16 as 4-bit steps; 6: uint8 q below 64 as 4-bit steps and
    the planes of their top two bits."""
    blocks = q.shape[1] // BLOCK
    # (groups, blocks, 8 steps, 16 rows, 4 bytes)
    steps = _grouped(q).reshape(-1, blocks, 8, 4, ROWS).transpose(0, 1, 2, 4, 3)
    if bits == 8:
        return np.ascontiguousarray(steps.astype(np.int8)).reshape(-1, blocks * 512), None
    low = steps & 15
    values = (low[:, :, :4] | (low[:, :, 4:] << 4)).reshape(-1, blocks * 256)
    if bits == 4:
        return np.ascontiguousarray(values), None
    top = steps >> 4  # step q + 2 j of load q in bits 2 j, 2 j + 1
    planes = [top[:, :, load::2] for load in (0, 1)]
    packed = [p[:, :, 0] | p[:, :, 1] << 2 | p[:, :, 2] << 4 | p[:, :, 3] << 6 for p in planes]
    high = np.stack(packed, axis=2).reshape(-1, blocks * 128)
    return np.ascontiguousarray(values), np.ascontiguousarray(high)


def interleave_factors(a: np.ndarray | None) -> np.ndarray | None:
    """Per-row factors (N, C) (scales, minimums, their second level) -> (groups, C * 16),
    the 16 rows of a group side by side."""
    if a is None:
        return None
    return np.ascontiguousarray(_grouped(a)).reshape(row_groups(a.shape[0]), -1)


def deinterleave_nibbles(values: np.ndarray, n: int) -> np.ndarray:
    """The row-major values (n, Kp) uint8 of 4-bit `values` in the tiles' layout: the
    inverse of interleave_values(q, 4)."""
    groups, width = values.shape
    blocks = width // 256
    packed = values.reshape(groups, blocks, 4, ROWS, 4)  # (group, block, step, row, byte)
    steps = np.concatenate([packed & 15, packed >> 4], axis=2)
    return steps.transpose(0, 3, 1, 2, 4).reshape(groups * ROWS, blocks * BLOCK)[:n]


def deinterleave_factors(a: np.ndarray, n: int) -> np.ndarray:
    """The per-row factors (n, C) of interleaved ones: the inverse of interleave_factors."""
    groups = a.shape[0]
    return a.reshape(groups, -1, ROWS).transpose(0, 2, 1).reshape(groups * ROWS, -1)[:n]


def _offset(w):
    """What the multiply step adds to each weight value of w (see simd_blocks)."""


@overload(_offset)
def _offset_impl(w):
    offset = activation_offset(KIND, 8 if w.dtype == types.int8 else 4)
    return lambda w: offset


def packs_nibbles(w):
    """Whether block-format values w hold 4-bit values (uint8) or 8-bit ones (int8)."""


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
    """Row r's factor for group g: sub's (times its super-block's sup when given)."""
    value = scale_value(sub, r // ROWS, g * ROWS + r % ROWS)
    if sup is not None:
        value = half_to_float(sup[r // ROWS, (g * group // SUPER) * ROWS + r % ROWS]) * value
    return value


@njit(cache=True, inline="always")
def value_at(w, high, r, i):
    """The integer q of column i in row r of interleaved block-format values."""
    g, lane = divmod(r, ROWS)
    b, within = divmod(i, BLOCK)
    step, byte = divmod(within, 4)
    if not packs_nibbles(w):
        return np.int32(w[g, ((b * 8 + step) * ROWS + lane) * 4 + byte])
    packed = w[g, ((b * 4 + step % 4) * ROWS + lane) * 4 + byte]
    q = np.int32(packed >> 4) if step >= 4 else np.int32(packed & 15)
    if high is not None:
        plane = high[g, ((b * 2 + step % 2) * ROWS + lane) * 4 + byte]
        q |= np.int32((plane >> (2 * (step // 2))) & 3) << 4
    return q


@njit(cache=True, fastmath=EXACT_MATH)
def _quantize_row(src, t, k, xq, xsum, xs, xm) -> None:
    """Row t of src (its first k columns, zeros after) to int8 per 32 columns, with the sum
    of each 16 (and that sum times the scale)."""
    kp = xq.shape[1]
    for b in range(kp // BLOCK):
        lo = b * BLOCK
        hi = min(lo + BLOCK, k)
        amax = np.float32(0.0)
        for i in range(lo, hi):
            amax = max(amax, abs(src[t, i]))
        scale = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        for i in range(lo, lo + BLOCK):
            xq[t, i] = np.int8(np.rint(src[t, i] * inv)) if i < hi else 0
        xs[t, b] = scale
        for half in range(2 * b, 2 * b + 2):
            total = np.int32(0)
            for i in range(SUM_SPAN * half, SUM_SPAN * half + SUM_SPAN):
                total += np.int32(xq[t, i])
            xsum[t, half] = total
            xm[t, half] = np.float32(total) * scale


# The linear's input: x itself, rmsnorm(x), or silu(gate) * up of x = [gate | up].
PLAIN, RMSNORM, GATED = 0, 1, 2


@njit(cache=True)
def _prepare_row(x, t, k, h, norm, eps, prologue, xq, xsum, xs, xm) -> None:
    """Quantize row t of the linear's input, computed into h first unless it is x itself."""
    if prologue == PLAIN:
        _quantize_row(x, t, k, xq, xsum, xs, xm)
        return
    if prologue == RMSNORM:
        rmsnorm_row(x, t, norm, eps, h)
    else:
        silu_mul_row(x, t, h)
    _quantize_row(h, t, k, xq, xsum, xs, xm)


# A parallel twin of the serial loop in the driver (numba caches per Python function).
@njit(cache=True, parallel=True)
def _prepare_rows_parallel(x, k, h, norm, eps, prologue, xq, xsum, xs, xm) -> None:
    for t in prange(x.shape[0]):
        _prepare_row(x, t, k, h, norm, eps, prologue, xq, xsum, xs, xm)


@njit(cache=True, inline="always")
def _fits_super(sup, groups, kp) -> bool:
    return sup.shape[0] == groups and sup.shape[1] * SUPER == kp * ROWS


@njit(cache=True)
def _check(
    x, w, high, scale, scale_sup, mins, mins_sup, group, k, out, xq, xsum, xs, xm, h, norm,
    prologue,
) -> None:  # fmt: skip
    """Shapes the tiles rely on (they index without bounds checks)."""
    tokens = x.shape[0]
    kp = xq.shape[1]
    groups = (out.shape[1] + ROWS - 1) // ROWS
    if group not in GROUPS:
        raise ValueError("group must be 16, 32, 64 or 128")
    if kp % BLOCK or kp % group or k > kp:
        raise ValueError("xq must be (T, padded_width(K))")
    width = kp * 8 if packs_nibbles(w) else kp * 16
    if w.shape[0] != groups or w.shape[1] != width:
        raise ValueError("w does not match out and the padded width")
    if high is not None and (high.shape[0] != groups or high.shape[1] != kp * 4):
        raise ValueError("high must be (groups, Kp * 4)")
    if scale.shape[0] != groups or scale.shape[1] * group != kp * ROWS:
        raise ValueError("scale must be (groups, Kp / group * 16)")
    if mins is not None and mins.shape != scale.shape:
        raise ValueError("mins must be shaped as scale")
    if scale_sup is not None and not _fits_super(scale_sup, groups, kp):
        raise ValueError("scale_sup must be (groups, Kp / 256 * 16)")
    if mins_sup is not None and not _fits_super(mins_sup, groups, kp):
        raise ValueError("mins_sup must be (groups, Kp / 256 * 16)")
    if x.shape[1] != (2 * k if prologue == GATED else k):
        raise ValueError("x does not match the weight's inputs")
    if prologue != PLAIN and (h.shape[0] != tokens or h.shape[1] != k):
        raise ValueError("h must be (T, K)")
    if prologue == RMSNORM and norm.shape[0] != k:
        raise ValueError("norm must be (K,)")
    if out.shape[0] != tokens:
        raise ValueError("out must be (T, N)")
    if xq.shape[0] != tokens or xsum.shape != (tokens, kp // 16) or xm.shape != xsum.shape:
        raise ValueError("xsum and xm must be (T, Kp / 16)")
    if xs.shape != (tokens, kp // BLOCK):
        raise ValueError("xs must be (T, Kp / 32)")


@njit(cache=True, parallel=True)
def matmul_blocks_into(
    x, w, high, scale, scale_sup, mins, mins_sup, group, zero, k, out, xq, xsum, xs, xm,
    h, norm, eps, prologue, accumulate,
):  # fmt: skip
    """out (T, N) (+)= input (T, k) @ W.T for a block-format W (see simd_blocks for the
    arrays); the input is x (prologue PLAIN), rmsnorm(x) with weights norm (K,) and eps
    (RMSNORM) or silu(gate) * up of x (T, 2K) (GATED), the last two computed into h (T, K).

    xq (T, Kp) int8, xsum (T, Kp / 16) int32, xs (T, Kp / 32) and xm (T, Kp / 16) float32
    are scratch for the quantized activations. h and norm are arrays whatever the prologue,
    so one compiled driver serves every linear of a weight format (each distinct argument
    type costs a compilation of seconds).
    """
    _check(
        x, w, high, scale, scale_sup, mins, mins_sup, group, k, out, xq, xsum, xs, xm, h, norm,
        prologue,
    )  # fmt: skip
    if x.shape[0] == 0:
        return
    start = zero + _offset(w)
    tokens = x.shape[0]
    groups = w.shape[0]
    gemv = tokens <= GEMV_TOKENS
    if gemv:
        for t in range(tokens):
            _prepare_row(x, t, k, h, norm, eps, prologue, xq, xsum, xs, xm)
    else:
        _prepare_rows_parallel(x, k, h, norm, eps, prologue, xq, xsum, xs, xm)
    quads = tokens // 4 * 4
    for job in prange((groups + JOB_GROUPS - 1) // JOB_GROUPS):
        for g in range(job * JOB_GROUPS, min(job * JOB_GROUPS + JOB_GROUPS, groups)):
            if gemv:
                if tokens == 2:
                    _tile_2(w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum, xs,
                            xm, start, 0, out, accumulate)  # fmt: skip
                else:
                    _tile_1(w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum, xs,
                            xm, start, 0, out, accumulate)  # fmt: skip
                continue
            for t in range(0, quads, 4):
                _tile_4(w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum, xs, xm,
                        start, t, out, accumulate)  # fmt: skip
            for t in range(quads, tokens):
                _tile_1_gemm(w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum, xs, xm,
                        start, t, out, accumulate)  # fmt: skip


def activation_shapes(tokens: int, kp: int) -> tuple[tuple[tuple[int, int], type], ...]:
    """(shape, dtype) of the scratch (xq, xsum, xs, xm) of `matmul_blocks_into` over kp
    (padded) inputs."""
    return (
        ((tokens, kp), np.int8),
        ((tokens, kp // SUM_SPAN), np.int32),
        ((tokens, kp // BLOCK), np.float32),
        ((tokens, kp // SUM_SPAN), np.float32),
    )


def activation_scratch(tokens: int, kp: int) -> tuple[np.ndarray, ...]:
    """New scratch (xq, xsum, xs, xm) for `matmul_blocks_into` over kp (padded) inputs."""
    return tuple(np.empty(shape, dtype) for shape, dtype in activation_shapes(tokens, kp))


def matmul_blocks(x, w, high, scale, scale_sup, mins, mins_sup, group, zero, k, n) -> np.ndarray:
    """`matmul_blocks_into` into a new (T, n) array, with its own scratch."""
    out = np.empty((x.shape[0], n), np.float32)
    scratch = activation_scratch(x.shape[0], padded_inputs(scale, group))
    h, norm = np.empty((x.shape[0], k), np.float32), np.empty(0, np.float32)
    matmul_blocks_into(
        x, w, high, scale, scale_sup, mins, mins_sup, group, zero, k, out, *scratch, h, norm, 0.0,
        PLAIN, False,
    )  # fmt: skip
    return out


@njit(cache=True)
def dequantize_rows_into(
    w, high, scale, scale_sup, mins, mins_sup, group, zero, n, ids, out
) -> None:
    """out (T, K) = rows `ids` (< n) of a block-format matrix as float32: d * (q - zero) + m,
    in that order (the GGUF dequantizers' arithmetic). Embedding lookups; K = out.shape[1]."""
    k = out.shape[1]
    if out.shape[0] != ids.shape[0]:
        raise ValueError("out must be (len(ids), K)")
    for t in range(ids.shape[0]):
        row = ids[t]
        if row < 0 or row >= n:
            raise IndexError("row id outside the matrix")
        for g in range((k + group - 1) // group):
            d = _factor(scale, scale_sup, row, g, group)
            m = np.float32(0.0) if mins is None else _factor(mins, mins_sup, row, g, group)
            for i in range(g * group, min(g * group + group, k)):
                value = d * np.float32(value_at(w, high, row, i) - zero)
                out[t, i] = value + m if mins is not None else value
