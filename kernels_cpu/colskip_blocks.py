"""4-bit GEMV that skips the inputs whose activation is zero: TEAL on group-quantized weights.

colskip_int8 does this for int8 weights with float arithmetic. At 4 bits that costs too
many instructions per byte (unpack, widen, convert, FMA for every weight), so this kernel
keeps llama.cpp's integer arithmetic: activations quantized to int8 per group of G inputs,
exact integer dots of 4 inputs at a time (vpdpbusd, or vpmaddubsw + vpmaddwd), one float
scaling per group and output: w = d * q + m, q in 0..15, d and m float16 per (group, output).

The weight is stored input-major (`interleave_outputs`): row k holds input k's 4-bit values
for every output, so an input whose activation is dropped is a row never read. The kept
inputs of a group are listed and padded to a multiple of 4 (a padding entry repeats a kept
row with activation 0). A step takes four listed rows, 64 bytes (128 outputs) of each, and
interleaves them with byte and word unpacks into the dword layout the multiply step wants:
lane o holds the 4 rows' values of output o. The nibbles are laid out so that the unpacks
(which work within 16-byte lanes) leave outputs in order: byte p = 16 L + 4 v + i of a
64-byte chunk holds output 16 v + 4 L + i in its low nibble and that plus 64 in its high one.

Each thread takes a share of the outputs (whole 128-output chunks). For each group, a pass
streams PASSES quads (16 rows) through the thread's chunks, adding into int32 accumulators
(in L1/L2), and after the group's last pass one float step adds
float(dot) * d * s + m * s * sum(q_x) into a float row of the outputs (s: the activation
scale). Each line read asks for the same line of the row one pass ahead in the list. The
listing and the activations' rounding run once, before the threads start.

Measured on Zen 4 (2 cores, avx512vnni, group 128, one token, each shape's weights 400 MB
so that they stream from memory), time against the dense block GEMV `matmul_blocks` on the
same weights, nothing skipped / 40% of the inputs skipped:
- 11264 x 2048: 1.28x / 0.85x; 2048 x 5632: 1.36x / 1.00x; 2048 x 2048: 1.39x / 1.05x.
- The skipped rows are bytes never fetched, but a stream of kept rows with holes reads
  memory at about 75-80% of the rate of a sequential pass, and each weight costs more work
  than in the dense kernel, whose layout is already interleaved: 8 unpacks per 512 weights,
  the int32 accumulators' loads and stores, and a fixed 5-10 us a call (the listing, the
  scratch). On the 576-wide default model it is slower than dense.
- Tried and measured worse or no better: walking 64-byte columns across the kept rows with
  accumulators in registers (rows stored whole, or in 128-, 256- and 512-output chunks):
  1.16-1.54x with nothing skipped, and skipping 40% saved only 0-18% (the hardware
  prefetchers fetch the skipped lines between the kept ones); the interleave done with
  shifts and bit selects instead of unpacks; 4, 8 or 32 rows a pass; prefetching 1 or 2
  passes ahead, or 512 B to 2 KB ahead in the row, or not at all; threads splitting the
  groups (each its own partial, summed at the end) instead of the outputs.
- Storing 4 inputs pre-interleaved would need no unpacks but would skip only when all 4
  are dropped: 2.6% of the time at 40%.

With several tokens an input is read if any token keeps it; each token's dropped inputs
multiply as zeros. The union of many tokens' kept inputs is nearly every input, so sparsity
only pays at decode; prefill pays the unpacks once per token. Each output sums its groups
in order whatever the thread count, so the result does not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.activations import silu_mul_row
from kernels_cpu.matmul_blocks import GATED, PLAIN, RMSNORM
from kernels_cpu.norms import rmsnorm_row
from kernels_cpu.rows import page_aligned_empty
from kernels_cpu.simd import _declare, _row_pointer, emit_counted_loop, emit_prefetch, host_kind
from kernels_cpu.simd_blocks import _int_dot, _mask, _splat, _to_float, _vec

KIND = host_kind()
CHUNK = 128  # outputs per 64-byte chunk of a row
QUAD = 4  # rows per multiply step
PASSES = 4  # quads a pass streams at once: 16 rows, each accumulator loaded once a pass
GROUPS = (32, 64, 128)
PASS_TOKENS = 8  # tokens per pass over the weight: bounds the partials

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()

# Output (within a chunk) of the low nibble of byte p; the high nibble holds that plus 64.
_LOW_OUTPUT = np.array([16 * ((p % 16) // 4) + 4 * (p // 16) + p % 4 for p in range(64)])

Scratch = Callable[[str, tuple[int, ...], type], np.ndarray]
_NO_NORM = np.empty(0, np.float32)  # the norm argument without an rmsnorm prologue
_NO_NORM.setflags(write=False)


def padded_outputs(n: int) -> int:
    return -(-n // CHUNK) * CHUNK


def interleave_outputs(q: np.ndarray) -> np.ndarray:
    """4-bit values q (N, Kp) uint8 (row-major, one value a byte) -> the input-major layout
    (Kp, Np / 2) uint8, Np = N padded to CHUNK with zeros, starting on a page."""
    n, kp = q.shape
    np_ = padded_outputs(n)
    qt = np.zeros((kp, np_), np.uint8)
    qt[:, :n] = q.T
    chunks = qt.reshape(kp, np_ // CHUNK, CHUNK)
    packed = chunks[:, :, _LOW_OUTPUT] | (chunks[:, :, _LOW_OUTPUT + 64] << 4)
    out = page_aligned_empty((kp, np_ // 2), np.uint8)
    out[...] = packed.reshape(kp, np_ // 2)
    return out


def deinterleave_outputs(values: np.ndarray, n: int) -> np.ndarray:
    """The inverse of interleave_outputs: (N, Kp) uint8 values."""
    kp, half = values.shape
    chunks = values.reshape(kp, half // 64, 64)
    qt = np.empty((kp, half // 64, CHUNK), np.uint8)
    qt[:, :, _LOW_OUTPUT] = chunks & 15
    qt[:, :, _LOW_OUTPUT + 64] = chunks >> 4
    return np.ascontiguousarray(qt.reshape(kp, -1)[:, :n].T)


def factors_by_group(a: np.ndarray) -> np.ndarray:
    """Per-(output, group) factors (N, Kp / G) -> (Kp / G, Np), zero-padded outputs."""
    n, groups = a.shape
    out = np.zeros((groups, padded_outputs(n)), a.dtype)
    out[:, :n] = a.T
    return out


def _interleave(builder: ir.IRBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """Four rows' 64-byte chunks -> 4 vectors whose dword 4 L + i holds byte 16 L + 4 v + i
    of each row (v the vector's index), in row order: byte then word unpacks."""

    def unpack(a, b, unit, high):
        # Within each 16-byte lane: the low (or high) half's units of a and b, alternating.
        per = 16 // unit
        picks = []
        for lane in range(4):
            for i in range(per // 2):
                src = lane * per + i + (per // 2 if high else 0)
                picks += [src, 64 // unit + src]
        vec = _vec(ir.IntType(8 * unit), 64 // unit)
        a, b = builder.bitcast(a, vec), builder.bitcast(b, vec)
        return builder.bitcast(builder.shuffle_vector(a, b, _mask(picks)), _vec(_I8, 64))

    pairs = [[unpack(rows[r], rows[r + 1], 1, high) for high in (False, True)] for r in (0, 2)]
    return [
        unpack(pairs[0][half], pairs[1][half], 2, high)
        for half in (False, True)
        for high in (False, True)
    ]


def make_stream(kind: str, passes: int, tokens: int):
    """A numba intrinsic stream(values, idx, xq, acc, qd, t, c0, c1): for j < tokens and the
    outputs o of chunks [c0, c1) (128 each), acc[t + j, o] += sum of values[row, o] *
    xq[t + j, i] over the listed rows row = idx[i], 4 qd <= i < 4 (qd + passes).

    values (Kp, Np / 2) uint8 (interleave_outputs); idx (entries,) intp; xq (T, entries)
    int8; acc (T, Np) int32. Each line read asks for the same line of row idx[i + 4 passes],
    so idx must extend that far (padding).
    """

    @intrinsic
    def stream(typingctx, values, idx, xq, acc, qd, t, c0, c1):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (values, xq, acc)):
            return None
        sig = types.none(values, idx, xq, acc, qd, t, c0, c1)

        def codegen(context, builder, signature, args):
            v_a, idx_a, xq_a, acc_a = (
                context.make_array(signature.args[i])(context, builder, args[i]) for i in range(4)
            )
            q0, t0, first_chunk, end_chunk = (
                context.cast(builder, args[i], signature.args[i], types.intp) for i in (4, 5, 6, 7)
            )
            intp = q0.type
            v64b, v16i = _vec(_I8, 64), _vec(_I32, 16)
            row_bytes = cgutils.unpack_tuple(builder, v_a.shape)[1]
            base = builder.bitcast(v_a.data, _I8.as_pointer())

            def row(i):
                k = builder.load(builder.gep(idx_a.data, [i]))
                k = context.cast(builder, k, signature.args[1].dtype, types.intp)
                return builder.gep(base, [builder.mul(k, row_bytes)])

            first = builder.mul(q0, intp(QUAD))
            rows = [row(builder.add(first, intp(i))) for i in range(QUAD * passes)]
            ahead = [row(builder.add(first, intp(QUAD * passes + i))) for i in range(QUAD * passes)]
            acc_rows, words = [], []
            for j in range(tokens):
                tid = builder.add(t0, intp(j))
                acc_rows.append(_row_pointer(builder, acc_a, tid, _I32))
                x_row = _row_pointer(builder, xq_a, tid, _I32)
                words.append(
                    [
                        builder.bitcast(
                            _splat(
                                builder,
                                builder.load(builder.gep(x_row, [builder.add(q0, intp(p))])),
                            ),
                            v64b,
                        )
                        for p in range(passes)
                    ]
                )
            low, four = ir.Constant(v64b, [15] * 64), ir.Constant(v64b, [4] * 64)

            def chunk(c, _):
                offset = builder.mul(c, intp(64))
                ptrs = [
                    builder.bitcast(
                        builder.gep(
                            acc_rows[j], [builder.add(builder.mul(c, intp(CHUNK)), intp(16 * v))]
                        ),
                        v16i.as_pointer(),
                    )
                    for j in range(tokens)
                    for v in range(8)
                ]
                accs = [builder.load(ptr, align=4) for ptr in ptrs]
                for p in range(passes):
                    loaded = []
                    for r in range(QUAD * p, QUAD * p + QUAD):
                        ptr = builder.bitcast(builder.gep(rows[r], [offset]), v64b.as_pointer())
                        loaded.append(builder.load(ptr, align=1))
                        emit_prefetch(builder, builder.gep(ahead[r], [offset]))
                    packed = _interleave(builder, loaded)
                    steps = [builder.and_(v, low) for v in packed]
                    steps += [builder.lshr(v, four) for v in packed]
                    for j in range(tokens):
                        for v in range(8):
                            at = 8 * j + v
                            accs[at] = _int_dot(builder, kind, 4, accs[at], steps[v], words[j][p])
                for ptr, value in zip(ptrs, accs, strict=True):
                    builder.store(value, ptr, align=4)
                return []

            emit_counted_loop(builder, first_chunk, end_chunk, intp(1), [], chunk)
            return context.get_dummy_value()

        return sig, codegen

    return stream


@intrinsic
def _flush(typingctx, acc, part, scale, mins, xs, xm, g, t, o0, o1):
    """part[t, o] += acc[t, o] * scale[g, o] * xs[t, g] + mins[g, o] * xm[t, g] and
    acc[t, o] = 0, for the outputs o0 <= o < o1 (multiples of 16; float16 factors)."""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (acc, part, scale, mins)):
        return None
    sig = types.none(acc, part, scale, mins, xs, xm, g, t, o0, o1)

    def codegen(context, builder, signature, args):
        acc_a, part_a, sc_a, mn_a, xs_a, xm_a = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in range(6)
        )
        g0, t0, first, end = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (6, 7, 8, 9)
        )
        intp = g0.type
        v16f, v16i, v16h = _vec(_F32, 16), _vec(_I32, 16), _vec(_I16, 16)
        fma = _declare(builder.module, "llvm.fma.v16f32", v16f, [v16f, v16f, v16f])
        acc_row = _row_pointer(builder, acc_a, t0, _I32)
        part_row = _row_pointer(builder, part_a, t0, _F32)
        d_row = _row_pointer(builder, sc_a, g0, _I16)
        m_row = _row_pointer(builder, mn_a, g0, _I16)
        s = builder.load(builder.gep(_row_pointer(builder, xs_a, t0, _F32), [g0]))
        sm = builder.load(builder.gep(_row_pointer(builder, xm_a, t0, _F32), [g0]))
        s, sm = _splat(builder, s), _splat(builder, sm)

        def vector(row, o, vec):
            return builder.bitcast(builder.gep(row, [o]), vec.as_pointer())

        def body(o, _):
            acc_ptr, part_ptr = vector(acc_row, o, v16i), vector(part_row, o, v16f)
            d = _to_float(builder, builder.load(vector(d_row, o, v16h), align=2), types.uint16)
            m = _to_float(builder, builder.load(vector(m_row, o, v16h), align=2), types.uint16)
            dot = builder.sitofp(builder.load(acc_ptr, align=4), v16f)
            value = builder.call(fma, [dot, builder.fmul(d, s), builder.load(part_ptr, align=4)])
            builder.store(builder.call(fma, [m, sm, value]), part_ptr, align=4)
            builder.store(ir.Constant(v16i, None), acc_ptr, align=4)
            return []

        emit_counted_loop(builder, first, end, intp(16), [], body)
        return context.get_dummy_value()

    return sig, codegen


_stream_wide = make_stream(KIND, PASSES, 1)
_stream_one = make_stream(KIND, 1, 1)
_stream_wide_2 = make_stream(KIND, PASSES, 2)
_stream_one_2 = make_stream(KIND, 1, 2)


def entries(kp: int, group: int) -> int:
    """Length of the kept-row list for Kp inputs: every row, each group's padding to a
    multiple of 4, and one pass more for the prefetch past the last."""
    return kp + (QUAD - 1) * (kp // group) + QUAD * PASSES


_MAGNITUDE = 0x7FFFFFFF  # the bits of |x| for a float32 x, ordered as |x| is
_FINITE_MAX = 0x7F7FFFFF  # the largest finite float32's bits


@njit(cache=True)
def _quantize_groups(x, t, thr_bits, group, xqd, xs, xm) -> None:
    """Row t of x (its kept entries, |x| > threshold) to int8 per group, all Kp columns.

    Branch-free passes: the magnitude comparisons run on the float bits as integers
    (non-negative floats order as their bits do), and their maximum also finds
    an infinity or NaN: its group gets scale NaN and values 0, so the NaN reaches the output.
    thr_bits: the threshold's float bits.
    """
    k = x.shape[1]
    bits = x[t].view(np.int32)
    scale_bits = xs[t].view(np.int32)
    for g in range(xqd.shape[1] // group):
        lo = g * group
        hi = max(lo, min(lo + group, k))
        top = 0
        kept_top = 0
        for col in range(lo, hi):
            b = bits[col] & _MAGNITUDE
            top = max(top, b)
            kept_top = max(kept_top, b if b > thr_bits else 0)
        total = 0
        if top > _FINITE_MAX:
            xqd[t, lo : lo + group] = 0
            xs[t, g] = np.float32(np.nan)
            xm[t, g] = np.float32(np.nan)
            continue
        scale_bits[g] = kept_top  # the float with these bits, through xs's memory
        amax = xs[t, g]
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        for col in range(lo, hi):
            keep = (bits[col] & _MAGNITUDE) > thr_bits
            q = np.int8(np.rint((x[t, col] if keep else np.float32(0.0)) * inv))
            xqd[t, col] = q
            total += q
        for col in range(hi, lo + group):
            xqd[t, col] = 0
        scale = amax / np.float32(127.0)
        xs[t, g] = scale
        xm[t, g] = np.float32(total) * scale


@njit(cache=True)
def _compact_into(x, threshold, group, keep, xqd, idx, quad_start, xq, xs, xm) -> int:
    """List the inputs some token keeps, group by group, and quantize them per token.

    keep (Kp,) uint8 and xqd (T, Kp) int8 scratch; idx (entries,) the kept rows, each
    group's padded to a multiple of 4 with its last kept row; quad_start (groups + 1,) where
    each group's quads start; xq (T, entries) int8 each token's value at each listed row (0
    where it drops the input, and at padding); xs, xm (T, groups) the activation scale and
    scale times the sum of the group's values. |x| <= threshold (>= 0) counts as zero.
    Returns the number of quads. All but the listing are branch-free passes: a branch per
    input on the threshold mispredicts half the time, which took 8-11 us at K = 2048.
    """
    tokens, k = x.shape
    kp = keep.shape[0]
    groups = kp // group
    thr_bits = np.int64(np.array([np.float32(threshold)]).view(np.int32)[0])
    keep[:] = 0
    for t in range(tokens):
        _quantize_groups(x, t, thr_bits, group, xqd, xs, xm)
        bits = x[t].view(np.int32)
        for col in range(k):
            keep[col] |= (bits[col] & _MAGNITUDE) > thr_bits
    count = 0
    for g in range(groups):
        quad_start[g] = count // QUAD
        begin = count
        for col in range(g * group, g * group + group):
            idx[count] = col
            count += keep[col]
        pad = -count % QUAD
        for i in range(count, count + pad):
            idx[i] = idx[count - 1]
        for t in range(tokens):
            for i in range(begin, count):
                xq[t, i] = xqd[t, idx[i]]
            for i in range(count, count + pad):
                xq[t, i] = 0
        count += pad
    quad_start[groups] = count // QUAD
    last = idx[count - 1] if count > 0 else 0
    for i in range(count, idx.shape[0]):
        idx[i] = last
    return count // QUAD


@njit(cache=True, inline="always")
def _group_rows(values, idx, xq, acc, q0, q1, t, pair, c0, c1) -> None:
    """Stream a group's quads [q0, q1) for token t (and t + 1 with `pair`) into acc, over
    the chunks [c0, c1)."""
    qd = q0
    while qd + PASSES <= q1:
        if pair:
            _stream_wide_2(values, idx, xq, acc, qd, t, c0, c1)
        else:
            _stream_wide(values, idx, xq, acc, qd, t, c0, c1)
        qd += PASSES
    while qd < q1:
        if pair:
            _stream_one_2(values, idx, xq, acc, qd, t, c0, c1)
        else:
            _stream_one(values, idx, xq, acc, qd, t, c0, c1)
        qd += 1


@njit(cache=True, parallel=True)
def _colskip_pass(x, k, h, norm, eps, prologue, threshold, values, scale, mins, out, accumulate,
                  keep, xqd, idx, quad_start, xq, xs, xm, wide, acc, jobs) -> None:  # fmt: skip
    """One pass over the weight for the tokens of x (see colskip_matmul_w4_into)."""
    tokens, n = out.shape
    kp = values.shape[0]
    groups = scale.shape[0]
    if prologue == PLAIN:
        _compact_into(x, threshold, kp // groups, keep, xqd, idx, quad_start, xq, xs, xm)
    else:
        for t in range(tokens):
            if prologue == RMSNORM:
                rmsnorm_row(x, t, norm, eps, h)
            else:
                silu_mul_row(x, t, h)
        _compact_into(h, threshold, kp // groups, keep, xqd, idx, quad_start, xq, xs, xm)
    chunks = values.shape[1] // 64
    for job in prange(jobs):
        c0, c1 = job * chunks // jobs, (job + 1) * chunks // jobs
        o0, o1 = c0 * CHUNK, c1 * CHUNK
        wide[:tokens, o0:o1] = 0
        acc[:tokens, o0:o1] = 0
        for g in range(groups):
            q0, q1 = quad_start[g], quad_start[g + 1]
            if q0 == q1:
                continue
            for t in range(0, tokens - 1, 2):
                _group_rows(values, idx, xq, acc, q0, q1, t, True, c0, c1)
            if tokens % 2:
                _group_rows(values, idx, xq, acc, q0, q1, tokens - 1, False, c0, c1)
            for t in range(tokens):
                _flush(acc, wide, scale, mins, xs, xm, g, t, o0, o1)
        for t in range(tokens):
            for col in range(o0, min(o1, n)):
                out[t, col] = out[t, col] + wide[t, col] if accumulate else wide[t, col]


def colskip_matmul_w4_into(
    x: np.ndarray,
    values: np.ndarray,
    scale: np.ndarray,
    mins: np.ndarray,
    threshold: float,
    k: int,
    out: np.ndarray,
    *,
    h: np.ndarray | None = None,
    norm: np.ndarray | None = None,
    eps: float = 0.0,
    prologue: int = PLAIN,
    accumulate: bool = False,
    scratch: Scratch | None = None,
) -> np.ndarray:
    """out (T, N) (+)= input (T, k) @ W.T, W[o, i] = d * q + m per group of inputs, with
    every input entry of magnitude <= threshold taken as 0 and the rows of inputs no token
    keeps never read. The input is x (prologue PLAIN), rmsnorm(x) with weights norm and eps
    (RMSNORM) or silu(gate) * up of x (T, 2k) (GATED), the last two computed into h (T, k).

    values (Kp, Np / 2) uint8 from interleave_outputs; scale and mins (Kp / G, Np) float16
    bits from factors_by_group. Activations are quantized to int8 per group of G inputs (the
    kept ones). Tokens go PASS_TOKENS at a time. `scratch(name, shape, dtype)` hands out the
    working arrays (by default new ones). A Python wrapper because the split needs numba's
    thread count, which a cached njit function cannot read; it also checks the layout the
    SIMD loops rely on.
    """
    if values.dtype != np.uint8 or values.ndim != 2 or values.shape[1] % 64:
        raise ValueError("values must be (Kp, Np / 2) uint8 from interleave_outputs")
    kp, half = values.shape
    groups = scale.shape[0] if scale.ndim == 2 else 0
    if not groups or kp % groups or kp // groups not in GROUPS:
        raise ValueError(f"scale {scale.shape} does not give a group of {GROUPS} inputs")
    for name, a in (("values", values), ("scale", scale), ("mins", mins)):
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    for name, a in (("scale", scale), ("mins", mins)):
        if a.dtype != np.uint16 or a.shape != (groups, 2 * half):
            raise ValueError(f"{name} must be (Kp / G, Np) float16 bits")
    tokens, n = out.shape
    width = 2 * k if prologue == GATED else k
    if x.ndim != 2 or x.shape != (tokens, width) or k > kp or n > 2 * half:
        raise ValueError(
            f"shapes do not match: x {x.shape}, values {values.shape}, out {out.shape}"
        )
    take = scratch or _new_array
    if prologue != PLAIN and (h is None or h.shape != (tokens, k)):
        raise ValueError(f"h must be ({tokens}, {k}) for a prologue")
    if prologue == RMSNORM and (norm is None or norm.shape != (k,)):
        raise ValueError(f"norm must be ({k},)")
    h = take("colskip4.h", (tokens, k), np.float32) if h is None else h
    norm = _NO_NORM if norm is None else norm
    size = entries(kp, kp // groups)
    step = min(tokens, PASS_TOKENS)
    jobs = max(1, min(numba.get_num_threads(), half // 64))
    keep = take("colskip4.keep", (kp,), np.uint8)
    idx = take("colskip4.idx", (size,), np.intp)
    quad_start = take("colskip4.quads", (groups + 1,), np.intp)
    wide = take("colskip4.wide", (step, 2 * half), np.float32)
    acc = take("colskip4.acc", (step, 2 * half), np.int32)
    threshold = max(threshold, 0.0)
    for t0 in range(0, tokens, PASS_TOKENS):
        t1 = min(tokens, t0 + PASS_TOKENS)
        rows = t1 - t0
        _colskip_pass(
            x[t0:t1], k, h[t0:t1], norm, eps, prologue, threshold, values, scale, mins,
            out[t0:t1], accumulate, keep, take("colskip4.xqd", (rows, kp), np.int8), idx,
            quad_start, take("colskip4.xq", (rows, size), np.int8),
            take("colskip4.xs", (rows, groups), np.float32),
            take("colskip4.xm", (rows, groups), np.float32), wide, acc, jobs,
        )  # fmt: skip
    return out


def colskip_matmul_w4(
    x: np.ndarray, values: np.ndarray, scale: np.ndarray, mins: np.ndarray, threshold: float,
    n: int,
) -> np.ndarray:  # fmt: skip
    """`colskip_matmul_w4_into` of x (T, K) into a new (T, n) array."""
    out = np.empty((x.shape[0], n), np.float32)
    return colskip_matmul_w4_into(x, values, scale, mins, threshold, x.shape[1], out)


def _new_array(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.empty(shape, dtype=dtype)
