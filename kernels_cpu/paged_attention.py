"""Attention over a paged KV cache: many sequences, each reading its keys through a block table.

The cache of one layer is a pool of fixed-size blocks, (num_blocks, block_size, Hkv, D). A
sequence's position p lives in block block_tables[s, p // block_size] at row p % block_size, so
sequences can share prefix blocks and grow without copying. One call serves a whole batch: the
new query tokens of all sequences are concatenated, which mixes decode steps (one token) and
prefill chunks (many tokens) freely.

Why explicit 8-lane vectors: a key or value row is only D (64-128) floats, so every loop that
numba vectorises by itself is a short one whose setup (trip-count and aliasing checks, remainder
loops, a horizontal sum per key) costs as much as its arithmetic. The `f32x8` type below is an
LLVM <8 x float> value, so the hot loops keep their accumulators in registers across a whole
tile of keys: two query heads take four keys at a time (each key load serves both heads,
each query load four keys) and their eight dot products are summed horizontally together,
and each value row is folded into 32 output lanes of two heads per pass. Lanes past the last
multiple of 8 in D are handled by scalar tails.

The int8 variant stores each (position, kv head) row as int8 with one float32 scale per row.
Rows are read through the same loops: `_vload` converts eight int8 lanes to floats as it loads
them, so no dequantised copy is ever written, and the row scales are applied once per key to
the scores and to the softmax weights, where they cost one multiply per key instead of D.
"""

import functools

import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_jitable, register_model

from kernels_cpu.exact_math import EXACT_MATH
from kernels_cpu.fast_exp import exp_parts, pow2
from kernels_cpu.reductions import abs_max
from kernels_cpu.rope import rope_heads
from kernels_cpu.simd import prefetch

LANES = 8
# Keys per online-softmax step, a multiple of LANES. The running max, sum and output are
# rescaled once per tile, so the rescale is amortised over TILE keys whatever the block size.
TILE = 64
# Scratch rows per thread: the (token, kv head) jobs are split into this many chunks per
# thread, each working in its own row, so a thread that falls behind (a busy core, longer
# contexts) can hand chunks to the others under a dynamic schedule.
CHUNKS_PER_THREAD = 4
# Rows per thread for the parts of a decode step's few jobs (see `_paged`): 64 parts of 256
# positions each, so one sequence of three kv heads spreads up to 10k positions.
PART_ROWS_PER_THREAD = 64

_VEC = ir.VectorType(ir.FloatType(), LANES)
_MASK = ir.VectorType(ir.IntType(32), LANES)
_BYTES = ir.VectorType(ir.IntType(8), LANES)


class F32x8(types.Type):
    """Eight float32 lanes held as one SIMD value (an LLVM <8 x float>)."""

    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _VEC)


def _is_f32_c_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.layout == "C"


def _is_i8_c_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.dtype == types.int8 and arr.layout == "C"


def _lanes_pointer(context, builder, sig, args, vec=_VEC):
    """Pointer to the 8 elements at flat element args[1] of the C-contiguous array args[0]."""
    arr = context.make_array(sig.args[0])(context, builder, args[0])
    index = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.bitcast(builder.gep(arr.data, [index]), vec.as_pointer())


@intrinsic
def _vload(typingctx, arr, index):
    """arr.flat[index : index + 8] of a C-contiguous float32 or int8 array; no bounds check.

    int8 lanes are widened to floats in registers (vpmovsxbd + vcvtdq2ps on x86), so the kernels
    below read an int8 cache unchanged and at a quarter of the bytes.
    """
    if not isinstance(index, types.Integer):
        return None
    if _is_f32_c_array(arr):

        def codegen(context, builder, sig, args):
            return builder.load(_lanes_pointer(context, builder, sig, args), align=4)

    elif _is_i8_c_array(arr):

        def codegen(context, builder, sig, args):
            raw = builder.load(_lanes_pointer(context, builder, sig, args, _BYTES), align=1)
            return builder.sitofp(raw, _VEC)

    else:
        return None
    return f32x8(arr, index), codegen


@intrinsic
def _vstore(typingctx, arr, index, value):
    """arr.flat[index : index + 8] = value; no bounds check."""
    if not (_is_f32_c_array(arr) and isinstance(index, types.Integer) and value == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _lanes_pointer(context, builder, sig, args), align=4)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def _vstore_half(typingctx, arr, index, value, half):
    """arr.flat[index : index + 4] = lanes 4 * half .. 4 * half + 3 of value (half: 0 or 1)."""
    if not (
        _is_f32_c_array(arr)
        and isinstance(index, types.Integer)
        and value == f32x8
        and isinstance(half, types.IntegerLiteral)
    ):
        return None
    start = 4 * half.literal_value

    def codegen(context, builder, sig, args):
        quad = ir.VectorType(ir.FloatType(), 4)
        lanes = builder.shuffle_vector(
            args[2],
            args[2],
            ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(start, start + 4))),
        )
        ptr = _lanes_pointer(context, builder, sig, args, quad)
        builder.store(lanes, ptr, align=4)
        return context.get_dummy_value()

    return types.none(arr, index, value, half), codegen


@intrinsic
def _vzero(typingctx):
    """Eight zero lanes."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_VEC, None)

    return f32x8(), codegen


def _fmuladd(builder, a, b, c):
    """a * b + c, fused where the target has FMA."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fmuladd.v8f32"
    )
    return builder.call(fn, [a, b, c])


@intrinsic
def _vfma(typingctx, acc, x, y):
    """acc + x * y lane by lane."""
    if not (acc == f32x8 and x == f32x8 and y == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return _fmuladd(builder, args[1], args[2], args[0])

    return f32x8(acc, x, y), codegen


@intrinsic
def _vfma_scalar(typingctx, acc, s, y):
    """acc + s * y with the float s broadcast to every lane."""
    if not (acc == f32x8 and isinstance(s, types.Float) and y == f32x8):
        return None

    def codegen(context, builder, sig, args):
        scalar = context.cast(builder, args[1], sig.args[1], types.float32)
        lane0 = builder.insert_element(ir.Constant(_VEC, ir.Undefined), scalar, ir.IntType(32)(0))
        splat = builder.shuffle_vector(lane0, lane0, ir.Constant(_MASK, None))
        return _fmuladd(builder, splat, args[2], args[0])

    return f32x8(acc, s, y), codegen


def _pair_sums(builder, a, b):
    """[a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (vhaddps order)."""
    even = builder.shuffle_vector(a, b, ir.Constant(_MASK, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(a, b, ir.Constant(_MASK, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.fadd(even, odd)


@intrinsic
def _hsum8(typingctx, v0, v1, v2, v3, v4, v5, v6, v7):
    """Lane i of the result is the sum of the lanes of v_i: eight dot products finished at once.

    A tree of pairwise sums (three shuffle-add levels) replaces eight separate horizontal
    reductions of four steps each.
    """
    if any(v != f32x8 for v in (v0, v1, v2, v3, v4, v5, v6, v7)):
        return None

    def codegen(context, builder, sig, args):
        t0 = _pair_sums(builder, args[0], args[1])
        t1 = _pair_sums(builder, args[2], args[3])
        t2 = _pair_sums(builder, args[4], args[5])
        t3 = _pair_sums(builder, args[6], args[7])
        # u0 lanes: sums of v0..v3 over lanes 0-3, then of v0..v3 over lanes 4-7; u1 for v4..v7.
        u0 = _pair_sums(builder, t0, t1)
        u1 = _pair_sums(builder, t2, t3)
        low = builder.shuffle_vector(u0, u1, ir.Constant(_MASK, [0, 1, 2, 3, 8, 9, 10, 11]))
        high = builder.shuffle_vector(u0, u1, ir.Constant(_MASK, [4, 5, 6, 7, 12, 13, 14, 15]))
        return builder.fadd(low, high)

    return f32x8(v0, v1, v2, v3, v4, v5, v6, v7), codegen


@njit(cache=True, fastmath=True)
def _exp_shifted(x, n, shift):
    """x[:n] = exp(x[:n] - shift) for x <= shift; returns their sum.

    numba calls expf once per element, which costs more than the dot products around it;
    `exp_parts` vectorises. Arguments below -87 are clamped: exp(-87) ~ 1.6e-38 is negligible
    next to the max term, which is 1.
    """
    for j in range(n):
        m, k = exp_parts(max(x[j] - shift, np.float32(-87.0)))
        x[j] = m * pow2(k)
    total = np.float32(0.0)
    for j in range(n):
        total += x[j]
    return total


@njit(cache=True, fastmath=True, inline="always")
def _score_tails(qs, kf, base, j0, keys, g, dim, vec_dim, scores):
    """Add the scalar tail of D (past its last multiple of 8) to keys j0..j0+keys-1 of head g."""
    if vec_dim < dim:
        q0 = g * dim
        for i in range(keys):
            row = base[j0 + i]
            extra = np.float32(0.0)
            for d in range(vec_dim, dim):
                extra += qs[q0 + d] * kf[row + d]
            scores[g, j0 + i] += extra


@njit(cache=True, fastmath=True)
def _scores(qs, kf, base, n, dim, scores):
    """scores[g, j] = qs[g] . (key row at kf[base[j]:]) for j < n and every head g.

    Query heads go two at a time over four keys: each key vector loaded serves both heads
    (6 loads per 8 FMAs, where one head over eight keys needs 9), and the eight dot products
    are summed horizontally together. An odd last head takes eight keys at a time. A key's
    lanes are summed in the same order either way, so its score does not depend on the path.
    base is padded past n with a valid row, so the last keys may overrun n; those scores are
    computed and never read.
    """
    group, tile = scores.shape
    vec_dim = dim - dim % LANES
    g = 0
    while g + 1 < group:
        q0 = g * dim
        q1 = q0 + dim
        for j0 in range(0, n, 4):
            b0, b1, b2, b3 = base[j0], base[j0 + 1], base[j0 + 2], base[j0 + 3]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _vzero()
            for c in range(0, vec_dim, LANES):
                x = _vload(qs, q0 + c)
                y = _vload(qs, q1 + c)
                k0 = _vload(kf, b0 + c)
                k1 = _vload(kf, b1 + c)
                k2 = _vload(kf, b2 + c)
                k3 = _vload(kf, b3 + c)
                a0 = _vfma(a0, x, k0)
                a1 = _vfma(a1, x, k1)
                a2 = _vfma(a2, x, k2)
                a3 = _vfma(a3, x, k3)
                a4 = _vfma(a4, y, k0)
                a5 = _vfma(a5, y, k1)
                a6 = _vfma(a6, y, k2)
                a7 = _vfma(a7, y, k3)
            sums = _hsum8(a0, a1, a2, a3, a4, a5, a6, a7)
            _vstore_half(scores, g * tile + j0, sums, 0)
            _vstore_half(scores, (g + 1) * tile + j0, sums, 1)
            _score_tails(qs, kf, base, j0, 4, g, dim, vec_dim, scores)
            _score_tails(qs, kf, base, j0, 4, g + 1, dim, vec_dim, scores)
        g += 2
    if g < group:
        q0 = g * dim
        for j0 in range(0, n, LANES):
            b0, b1, b2, b3 = base[j0], base[j0 + 1], base[j0 + 2], base[j0 + 3]
            b4, b5, b6, b7 = base[j0 + 4], base[j0 + 5], base[j0 + 6], base[j0 + 7]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _vzero()
            for c in range(0, vec_dim, LANES):
                qv = _vload(qs, q0 + c)
                a0 = _vfma(a0, qv, _vload(kf, b0 + c))
                a1 = _vfma(a1, qv, _vload(kf, b1 + c))
                a2 = _vfma(a2, qv, _vload(kf, b2 + c))
                a3 = _vfma(a3, qv, _vload(kf, b3 + c))
                a4 = _vfma(a4, qv, _vload(kf, b4 + c))
                a5 = _vfma(a5, qv, _vload(kf, b5 + c))
                a6 = _vfma(a6, qv, _vload(kf, b6 + c))
                a7 = _vfma(a7, qv, _vload(kf, b7 + c))
            _vstore(scores, g * tile + j0, _hsum8(a0, a1, a2, a3, a4, a5, a6, a7))
            _score_tails(qs, kf, base, j0, LANES, g, dim, vec_dim, scores)


@njit(cache=True, fastmath=True)
def _accumulate(acc, vf, base, n, dim, weights):
    """acc[g] += sum_j weights[g, j] * (value row at vf[base[j]:]) for j < n and every g.

    Query heads go two at a time over a 32-lane slice of the value rows: four vectors per
    head stay in registers over the whole tile of keys (eight independent FMA chains), and
    each value vector loaded serves both heads. An odd last head, leftover whole vectors and
    a scalar tail follow. Each output lane adds its keys in order whatever the path.
    """
    group = weights.shape[0]
    vec_dim = dim - dim % LANES
    c = 0
    while c + 4 * LANES <= vec_dim:
        g = 0
        while g + 1 < group:
            o = g * dim + c
            p = o + dim
            a0, a1, a2, a3 = (
                _vload(acc, o),
                _vload(acc, o + 8),
                _vload(acc, o + 16),
                _vload(acc, o + 24),
            )
            e0, e1, e2, e3 = (
                _vload(acc, p),
                _vload(acc, p + 8),
                _vload(acc, p + 16),
                _vload(acc, p + 24),
            )
            for j in range(n):
                w = weights[g, j]
                u = weights[g + 1, j]
                b = base[j] + c
                v0 = _vload(vf, b)
                v1 = _vload(vf, b + 8)
                v2 = _vload(vf, b + 16)
                v3 = _vload(vf, b + 24)
                a0 = _vfma_scalar(a0, w, v0)
                a1 = _vfma_scalar(a1, w, v1)
                a2 = _vfma_scalar(a2, w, v2)
                a3 = _vfma_scalar(a3, w, v3)
                e0 = _vfma_scalar(e0, u, v0)
                e1 = _vfma_scalar(e1, u, v1)
                e2 = _vfma_scalar(e2, u, v2)
                e3 = _vfma_scalar(e3, u, v3)
            _vstore(acc, o, a0)
            _vstore(acc, o + 8, a1)
            _vstore(acc, o + 16, a2)
            _vstore(acc, o + 24, a3)
            _vstore(acc, p, e0)
            _vstore(acc, p + 8, e1)
            _vstore(acc, p + 16, e2)
            _vstore(acc, p + 24, e3)
            g += 2
        if g < group:
            o = g * dim + c
            a0, a1, a2, a3 = (
                _vload(acc, o),
                _vload(acc, o + 8),
                _vload(acc, o + 16),
                _vload(acc, o + 24),
            )
            for j in range(n):
                w = weights[g, j]
                b = base[j] + c
                a0 = _vfma_scalar(a0, w, _vload(vf, b))
                a1 = _vfma_scalar(a1, w, _vload(vf, b + 8))
                a2 = _vfma_scalar(a2, w, _vload(vf, b + 16))
                a3 = _vfma_scalar(a3, w, _vload(vf, b + 24))
            _vstore(acc, o, a0)
            _vstore(acc, o + 8, a1)
            _vstore(acc, o + 16, a2)
            _vstore(acc, o + 24, a3)
        c += 4 * LANES
    while c < vec_dim:
        for g in range(group):
            o = g * dim + c
            a0 = _vload(acc, o)
            for j in range(n):
                a0 = _vfma_scalar(a0, weights[g, j], _vload(vf, base[j] + c))
            _vstore(acc, o, a0)
        c += LANES
    for g in range(group):
        for d in range(vec_dim, dim):
            extra = np.float32(0.0)
            for j in range(n):
                extra += weights[g, j] * vf[base[j] + d]
            acc[g * dim + d] += extra


# Positions per part of a query's context. Parts are attended apart (each its own online
# softmax) and merged in order, so the few queries of a decode step can spread over every
# core: one sequence of a model with 3 kv heads is only 3 (token, kv head) jobs. The parts
# depend on the context alone, never on the batch, so a token's output has the same bits
# whether it is decoded alone, in a batch, or in a prefill.
PART = 256


@register_jitable
def _part_floats(group: int, dim: int) -> int:
    """float32 words of one part's result: best (group), total (group), acc (group * dim)."""
    return 2 * group + group * dim


@register_jitable
def scratch_floats(heads: int, kv_heads: int, dim: int) -> int:
    """float32 words of one scratch row (see `_attend_part` and `_paged`), a multiple of 16
    (64 bytes), so rows share no cache line and each starts 8-byte aligned for its int64
    part: a work area plus two part results."""
    group = heads // kv_heads
    words = 2 * TILE + group * dim + group * TILE + 2 * TILE + 2 * _part_floats(group, dim)
    return -(-words // 16) * 16


@functools.cache  # asked for once per layer and step
def attention_scratch_shape(heads: int, kv_heads: int, dim: int, threads: int) -> tuple[int, int]:
    """Shape of the float32 scratch `paged_attention_into` takes for `threads` numba threads:
    CHUNKS_PER_THREAD work rows and PART_ROWS_PER_THREAD part rows each, whatever the batch
    and its contexts."""
    rows = (CHUNKS_PER_THREAD + PART_ROWS_PER_THREAD) * threads
    return rows, scratch_floats(heads, kv_heads, dim)


@njit(cache=True, inline="always")
def _prefetch_row(flat, start, n):
    """Ask for the cache lines of flat[start:start + n] now. A tile's key and value rows are
    scattered over the cache's blocks (other heads' rows lie between them), which the
    hardware prefetcher does not follow: fetched one by one on demand, a 512-token decode
    read them at a third of the memory's bandwidth."""
    for byte in range(0, n * flat.itemsize, 64):
        prefetch(flat, start * flat.itemsize + byte)


@njit(cache=True)
def _prefetch_tile(kf, vf, table, block_size, kv_heads, dim, kvh, lo, hi):
    """Ask for the key and value rows of kv head kvh at positions lo..min(hi, lo + TILE) - 1
    (the first tile `_attend_part` will read), so they arrive while the job before runs."""
    b = lo // block_size
    row = lo - b * block_size
    for _ in range(min(TILE, hi - lo)):
        slot = (np.int64(table[b]) * block_size + row) * kv_heads + kvh
        _prefetch_row(kf, slot * dim, dim)
        _prefetch_row(vf, slot * dim, dim)
        row += 1
        if row == block_size:
            row = 0
            b += 1
            if b == table.shape[0]:
                break


@njit(cache=True, fastmath=True)
def _attend_part(
    q, kf, vf, ksf, vsf, table, block_size, kv_heads, t, kvh, lo, hi, scale, fs, part, softcap
):  # fmt: skip
    """Online-softmax attention of token t's GQA group (kv head kvh) over positions lo..hi-1,
    unnormalised, into `part`: best (group), total (group), acc (group * dim).

    kf/vf are the flat caches. Keys are taken TILE at a time: base[j] is the flat offset of
    key j's row, found by walking the block table with a (block, row) counter instead of a
    division per key and shared by the key and value passes. Per query head, a running max
    `best` and sum `total` let each tile's exponentials be added to the unnormalised output
    `acc` after rescaling it by exp(old max - new max).

    ksf/vsf are the flat per-row scales of an int8 cache, or None for a float32 one; numba
    prunes the `is not None` branches at compile time, so the float32 build carries no trace
    of them. A key's scale multiplies its scores, a value's scale its softmax weights (after
    they are summed into `total`, which must not see it).

    fs is a float32 scratch row, carved into base (int64), the scaled queries, the tile's
    scores and row scales. softcap > 0 caps the scores to softcap * tanh(score / softcap)
    before the softmax (Gemma 2's attention logit soft-capping).
    """
    group = q.shape[1] // kv_heads
    dim = q.shape[2]
    h0 = kvh * group
    gd = group * dim
    base = fs[: 2 * TILE].view(np.int64)
    o = 2 * TILE
    qs = fs[o : o + gd]
    o += gd
    scores = fs[o : o + group * TILE].reshape((group, TILE))
    o += group * TILE
    k_row_scale = fs[o : o + TILE]
    v_row_scale = fs[o + TILE : o + 2 * TILE]
    best = part[:group]
    total = part[group : 2 * group]
    acc = part[2 * group : 2 * group + gd]
    acc[:] = 0
    total[:] = 0
    for g in range(group):
        for d in range(dim):
            qs[g * dim + d] = q[t, h0 + g, d] * scale
    b = lo // block_size
    row = lo - b * block_size
    blk = np.int64(table[b])
    p0 = lo
    while p0 < hi:
        n = min(TILE, hi - p0)
        for j in range(n):
            slot = (blk * block_size + row) * kv_heads + kvh
            base[j] = slot * dim
            _prefetch_row(kf, slot * dim, dim)
            _prefetch_row(vf, slot * dim, dim)
            if ksf is not None:
                k_row_scale[j] = ksf[slot]
                v_row_scale[j] = vsf[slot]
            row += 1
            if row == block_size and p0 + j + 1 < hi:
                row = 0
                b += 1
                blk = np.int64(table[b])
        for j in range(n, TILE):
            base[j] = base[n - 1]
        _scores(qs, kf, base, n, dim, scores)
        if ksf is not None:
            for g in range(group):
                for j in range(n):
                    scores[g, j] *= k_row_scale[j]
        if softcap > 0:
            for g in range(group):
                for j in range(n):
                    scores[g, j] = softcap * np.tanh(scores[g, j] / softcap)
        for g in range(group):
            m = scores[g, 0]
            for j in range(1, n):
                m = max(m, scores[g, j])
            if p0 == lo:
                best[g] = m
            elif m > best[g]:
                correction = np.exp(best[g] - m)
                best[g] = m
                total[g] *= correction
                for d in range(g * dim, (g + 1) * dim):
                    acc[d] *= correction
            total[g] += _exp_shifted(scores[g], n, best[g])
        if vsf is not None:
            for g in range(group):
                for j in range(n):
                    scores[g, j] *= v_row_scale[j]
        _accumulate(acc, vf, base, n, dim, scores)
        p0 += n


@njit(cache=True, fastmath=EXACT_MATH)
def _merge(into, part, group, dim):
    """Fold a later part's result into `into` (both laid out as `_attend_part` writes them).
    IEEE order: both drivers in `_paged` merge, and must get the same bits."""
    for g in range(group):
        m = max(into[g], part[g])
        a = np.exp(into[g] - m)
        b = np.exp(part[g] - m)
        into[g] = m
        into[group + g] = into[group + g] * a + part[group + g] * b
        o = 2 * group + g * dim
        for d in range(o, o + dim):
            into[d] = into[d] * a + part[d] * b


@njit(cache=True, fastmath=EXACT_MATH)
def _finish(part, out, t, h0, group, dim):
    """out[t, h0:h0 + group] = the part's acc / total: the normalised attention output."""
    for g in range(group):
        inv = np.float32(1.0) / part[group + g]
        o = 2 * group + g * dim
        for d in range(dim):
            out[t, h0 + g, d] = part[o + d] * inv


@njit(cache=True)
def _job_span(query_start, context_lens, window, kv_heads, job):
    """(token, kv head, sequence, first position, parts, end) of a (token, kv head) job: it
    attends positions first..end-1 in parts of PART."""
    t = job // kv_heads
    s = np.searchsorted(query_start, t, side="right") - 1
    pos = np.int64(context_lens[s]) - np.int64(query_start[s + 1]) + t
    first = np.int64(0)
    if window > 0 and pos - window + 1 > 0:
        first = pos - window + 1
    return t, job % kv_heads, s, first, (pos - first) // PART + 1, pos + 1


@njit(cache=True, parallel=True, fastmath=True)
def _paged(
    q,
    kf,
    vf,
    ksf,
    vsf,
    block_size,
    kv_heads,
    block_tables,
    query_start,
    context_lens,
    scale,
    window,
    out,
    scratch,
    softcap,
):
    """The batch driver shared by both cache formats.

    A job is one (token, kv head) over its context, cut into parts of PART positions. With
    jobs for every core (prefill, batches) the jobs are cut into up to CHUNKS_PER_THREAD
    contiguous chunks per thread, and a chunk runs its jobs' parts one after another in its
    work row, merging them as it goes. With fewer jobs than two per thread (a decode step of
    one or a few sequences) the parts themselves are spread over the chunks, each written to
    a part row, and merged in order afterwards. Both ways compute each part and
    each merge alike, so the bits do not depend on the way. (numba's thread ids would pick
    a row per thread, but a function that reads them cannot be cached.)
    """
    tokens, heads, dim = q.shape
    group = heads // kv_heads
    if out.shape != q.shape:
        raise ValueError("out must be shaped like q (T, H, D)")
    threads = scratch.shape[0] // (CHUNKS_PER_THREAD + PART_ROWS_PER_THREAD)
    if threads < 1 or scratch.shape[1] < scratch_floats(heads, kv_heads, dim):
        raise ValueError("scratch must be shaped as attention_scratch_shape says")
    work = threads * CHUNKS_PER_THREAD  # rows [0, work) are work rows, the rest part rows
    pf = _part_floats(group, dim)
    jobs = tokens * kv_heads
    units = 0  # (job, part) pairs, when few enough jobs to spread their parts
    if jobs < 2 * threads:
        for job in range(jobs):
            units += _job_span(query_start, context_lens, window, kv_heads, job)[4]
    spread = jobs < units <= scratch.shape[0] - work
    items = units if spread else jobs
    chunks = min(work, items)
    for c in prange(chunks):
        fs = scratch[c]
        into = fs[fs.shape[0] - 2 * pf : fs.shape[0] - pf]
        later = fs[fs.shape[0] - pf :]
        for item in range(c * items // chunks, (c + 1) * items // chunks):
            job, i0, i1 = item, 0, 0
            if spread:  # item is the index of a (job, part) pair: find them
                job, i0 = 0, item
                while True:
                    parts = _job_span(query_start, context_lens, window, kv_heads, job)[4]
                    if i0 < parts:
                        break
                    i0 -= parts
                    job += 1
                i1 = i0 + 1
            t, kvh, s, first, parts, end = _job_span(
                query_start, context_lens, window, kv_heads, job
            )
            if not spread:
                i1 = parts
                if item + 1 < (c + 1) * items // chunks:  # the next job's first tile
                    _, nkvh, ns, nfirst, _, nend = _job_span(
                        query_start, context_lens, window, kv_heads, item + 1
                    )
                    _prefetch_tile(
                        kf, vf, block_tables[ns], block_size, kv_heads, dim, nkvh, nfirst, nend
                    )
            for i in range(i0, i1):
                if spread:
                    dest = scratch[work + item, :pf]
                else:
                    dest = into if i == i0 else later
                lo = first + i * PART
                hi = min(lo + PART, end)
                _attend_part(
                    q, kf, vf, ksf, vsf, block_tables[s], block_size, kv_heads, t, kvh, lo, hi,
                    np.float32(scale), fs, dest, np.float32(softcap),
                )  # fmt: skip
                if not spread and i > i0:
                    _merge(into, later, group, dim)
            if not spread:
                _finish(into, out, t, kvh * group, group, dim)
    if spread:
        unit = 0
        for job in range(jobs):
            t, kvh, s, first, parts, end = _job_span(
                query_start, context_lens, window, kv_heads, job
            )
            into = scratch[work + unit, :pf]
            for i in range(1, parts):
                _merge(into, scratch[work + unit + i, :pf], group, dim)
            _finish(into, out, t, kvh * group, group, dim)
            unit += parts


@njit(cache=True)
def paged_attention_into(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    query_start: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    window: int,
    out: np.ndarray,
    scratch: np.ndarray,
    softcap: float = 0.0,
) -> None:
    """Causal softmax attention of a batch's new tokens q (T, H, D) over a paged cache.

    Sequence s owns query rows query_start[s] : query_start[s + 1]; context_lens[s] counts its
    cached tokens including the new ones, which are its last positions and already written to
    the C-contiguous k_cache/v_cache (num_blocks, block_size, Hkv, D). Query head h reads kv
    head h // (H // Hkv) (GQA). `window` > 0 limits each query to its last `window` keys
    (Mistral sliding window); 0 means unlimited. `softcap` > 0 caps each score (after
    `scale`) to softcap * tanh(score / softcap) (Gemma 2). Writes out (T, H, D) float32;
    scratch is float32 of `attention_scratch_shape`, whatever T and the contexts are.

    One job is one (token, kv head): its GQA group of query heads is handled together so each
    key and value row is read once per group while it is in L1, and the online softmax keeps
    the output in a small scratch row instead of a score buffer as long as the context.
    """
    _, block_size, kv_heads, _ = k_cache.shape
    _paged(
        q,
        k_cache.reshape(k_cache.size),
        v_cache.reshape(v_cache.size),
        None,
        None,
        block_size,
        kv_heads,
        block_tables,
        query_start,
        context_lens,
        scale,
        window,
        out,
        scratch,
        softcap,
    )


@njit(cache=True)
def paged_attention_int8_into(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_scale: np.ndarray,
    v_scale: np.ndarray,
    block_tables: np.ndarray,
    query_start: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    window: int,
    out: np.ndarray,
    scratch: np.ndarray,
    softcap: float = 0.0,
) -> None:
    """`paged_attention_into` over an int8 cache written by `write_kv_int8`.

    k_cache/v_cache are int8 (num_blocks, block_size, Hkv, D) and k_scale/v_scale float32
    (num_blocks, block_size, Hkv), all C-contiguous; row (block, r, h) stands for
    cache[block, r, h] * scale[block, r, h]. Same batch layout, GQA, causal and window rules,
    and result as `paged_attention_into`. The cache is a quarter of the float32 bytes, which
    is what a long-context decode step is bound by.
    """
    _, block_size, kv_heads, _ = k_cache.shape
    _paged(
        q,
        k_cache.reshape(k_cache.size),
        v_cache.reshape(v_cache.size),
        k_scale.reshape(k_scale.size),
        v_scale.reshape(v_scale.size),
        block_size,
        kv_heads,
        block_tables,
        query_start,
        context_lens,
        scale,
        window,
        out,
        scratch,
        softcap,
    )


@njit(cache=True)
def attend_qkv_into(
    qkv: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_scale: np.ndarray | None,
    v_scale: np.ndarray | None,
    slots: np.ndarray,
    block_tables: np.ndarray,
    query_start: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    window: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    scratch: np.ndarray,
    softcap: float = 0.0,
) -> None:
    """A layer's whole attention from its fused projections, in one call from Python.

    qkv (T, (H + 2 Hkv) D) holds each token's [q | k | v]. q and k are rotated by the
    `rope_angles_into` tables cos, sin (T, D/2) into q (T, H, D) and k (T, Hkv, D), v is
    copied to v (T, Hkv, D), k and v are stored at `slots` of the cache (float32, or int8
    with k_scale/v_scale as in
    `write_kv_int8`; None for a float32 cache), and q attends as in `paged_attention_into`.
    A decode step's rope, cache write and attention used to be five calls, each costing a
    dispatch as long as its work.
    """
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    q_end = heads * dim
    k_end = q_end + kv_heads * dim
    if qkv.shape[0] != tokens or qkv.shape[1] != k_end + kv_heads * dim:
        raise ValueError("qkv must be (T, (H + 2 Hkv) D) for q (T, H, D) and the cache's Hkv")
    if k.shape != (tokens, kv_heads, dim) or v.shape != k.shape:
        raise ValueError("k and v must be (T, Hkv, D)")
    if cos.shape != (tokens, dim // 2) or sin.shape != cos.shape:
        raise ValueError("cos and sin must be (T, D/2)")
    for t in range(tokens):
        rope_heads(qkv, t, 0, cos, sin, q)
        rope_heads(qkv, t, q_end, cos, sin, k)
        for h in range(kv_heads):
            for d in range(dim):
                v[t, h, d] = qkv[t, k_end + h * dim + d]
    if k_scale is None:
        write_kv(k_cache, v_cache, k, v, slots)
        paged_attention_into(
            q, k_cache, v_cache, block_tables, query_start, context_lens, scale, window, out,
            scratch, softcap,
        )  # fmt: skip
    else:
        write_kv_int8(k_cache, v_cache, k_scale, v_scale, k, v, slots)
        paged_attention_int8_into(
            q, k_cache, v_cache, k_scale, v_scale, block_tables, query_start, context_lens,
            scale, window, out, scratch, softcap,
        )  # fmt: skip


def _new_scratch(q: np.ndarray, kv_heads: int) -> np.ndarray:
    shape = attention_scratch_shape(q.shape[1], kv_heads, q.shape[2], config.NUMBA_NUM_THREADS)
    return np.empty(shape, dtype=np.float32)


def paged_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    query_start: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    window: int,
    softcap: float = 0.0,
) -> np.ndarray:
    """`paged_attention_into` into a new (T, H, D) array, with its own scratch."""
    out = np.empty(q.shape, dtype=np.float32)
    where = (block_tables, query_start, context_lens, scale, window)
    scratch = _new_scratch(q, k_cache.shape[2])
    paged_attention_into(q, k_cache, v_cache, *where, out, scratch, softcap)
    return out


def paged_attention_int8(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_scale: np.ndarray,
    v_scale: np.ndarray,
    block_tables: np.ndarray,
    query_start: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    window: int,
    softcap: float = 0.0,
) -> np.ndarray:
    """`paged_attention_int8_into` into a new (T, H, D) array, with its own scratch."""
    out = np.empty(q.shape, dtype=np.float32)
    where = (block_tables, query_start, context_lens, scale, window)
    scratch = _new_scratch(q, k_cache.shape[2])
    paged_attention_int8_into(q, k_cache, v_cache, k_scale, v_scale, *where, out, scratch, softcap)
    return out


@njit(cache=True)
def write_kv(
    k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray, slots: np.ndarray
) -> None:
    """Store k, v (T, Hkv, D) at flat slots (T,) = block * block_size + row of the paged cache.

    Serial: a step writes only T rows per layer, far less work than waking a thread pool.
    Element loops rather than `k_cache[blk, row] = k[t]`: the slice assignment's shape check
    compiles numba's string formatting for its error message, 2 s of a cold start.
    """
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        blk = slots[t] // block_size
        row = slots[t] - blk * block_size
        for h in range(k.shape[1]):
            for d in range(k.shape[2]):
                k_cache[blk, row, h, d] = k[t, h, d]
                v_cache[blk, row, h, d] = v[t, h, d]


@njit(cache=True)
def _quantize_row(x, dst):
    """dst = round(x / s) in int8 for s = max|x| / 127; returns s."""
    s = abs_max(x) / np.float32(127.0)
    if s == 0:
        dst[:] = 0
        return s
    for d in range(x.shape[0]):
        dst[d] = np.int8(min(max(np.round(x[d] / s), np.float32(-127.0)), np.float32(127.0)))
    return s


@njit(cache=True)
def write_kv_int8(
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_scale: np.ndarray,
    v_scale: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    slots: np.ndarray,
) -> None:
    """`write_kv` for an int8 cache: each (token, kv head) row of k, v is quantised on the way in.

    Symmetric, one float32 scale per row: scale = max|x| / 127, q = round(x / scale), so every
    element comes back within scale / 2. A per-row scale follows the outliers of one head at one
    position without a calibration pass; an all-zero row gets scale 0 and zeros.
    """
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        blk = slots[t] // block_size
        row = slots[t] - blk * block_size
        for h in range(k.shape[1]):
            k_scale[blk, row, h] = _quantize_row(k[t, h], k_cache[blk, row, h])
            v_scale[blk, row, h] = _quantize_row(v[t, h], v_cache[blk, row, h])
