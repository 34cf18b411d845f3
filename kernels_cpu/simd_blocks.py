"""SIMD tiles for group-quantized weights (4-, 6- and 8-bit values with per-group scales).

A block format stores each group of G consecutive inputs of a row as small integers q with a
float scale d (and, for formats with a minimum, a float m): w = d * (q - zero) + m. The
activations are quantized per 32 inputs to int8 with a float scale s (`matmul_blocks`), so
a product over 32 inputs is an exact integer dot times d * s. This is the arithmetic of
llama.cpp's own CPU kernels, and of GGUF's Q4_0 ... Q6_K, which lamina repacks into it.

Rows are interleaved sixteen at a time, so that the 16 int32 lanes of a vector are 16 rows:
one multiply step takes 4 inputs of each of the 16 rows (64 bytes) against the same 4
activation bytes broadcast, and after the 8 steps of a 32-input block one conversion and one
fused multiply-add by the 16 rows' d times the token's s (and one more for the minimums)
finish the block for all 16 rows. The scaling is shared by 16 rows and the weights by every
token of a tile, and the result is already a vector of 16 outputs: no horizontal sums. (An
earlier layout put 4 columns of one row in each lane: it paid the conversion and scaling per
row, and ran prefill at half llama.cpp's speed.)

The multiply step is the instruction the CPU is best at, picked once at import:

- ``avx512vnni``: vpdpbusd (unsigned x signed bytes, 4 products per lane, accumulated in one
  instruction). 8-bit weights are signed, so they are offset by 128 (a xor) and the offset's
  share, 128 * the activations' sum, is subtracted in integers through the start value;
- ``avx2`` (also on AVX-512 CPUs without VNNI): vpmaddubsw then vpmaddwd by ones. 8-bit
  weights take the sign trick (|w| times x with w's sign), so no int16 sum can saturate;
- ``portable``: widen, multiply, add; LLVM lowers it for any target.

Each block starts from minus the zero point times the block's activation sum, so the dot is
over q - zero, exactly. Each (row, token) pair goes through the same operations in the same
order whatever the tile, so a GEMV, a GEMM and any batch give the same bits for a token.

Layout of one 16-row group (`matmul_blocks.interleave_rows` writes it), per 32-input block:
8-bit values take 8 steps of 64 bytes (row r's 4 bytes at 4 r); 4-bit values take 4 steps
of 64 bytes, the low nibbles holding step p and the high ones step p + 4; 6-bit values are
4-bit ones plus 2 x 64 bytes of their top two bits (step q + 2 j in bits 2 j, 2 j + 1 of
load q). Scales and minimums hold the 16 rows' values of a group side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import _declare, _row_pointer, emit_counted_loop, emit_prefetch, load

ROWS = 16  # rows per interleaved group: the int32 lanes of a vector
BLOCK = 32  # inputs per activation scale, and per step of the tiles
SUM_SPAN = 16  # inputs per activation sum (the smallest group: Q6_K's)
SUPER = 256  # columns per super-block (the second scale level of the K-quants)
GROUPS = (16, 32, 64, 128)

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()


def block_kind(kind: str) -> str:
    """The multiply step the block tiles use for a `simd.host_kind()`: AVX-512 without VNNI
    lacks a byte sign instruction, so it takes the AVX2 step."""
    return "avx2" if kind == "avx512bw" else kind


def activation_offset(kind: str, bits: int) -> int:
    """What the multiply step adds to every weight value (128: 8-bit on vpdpbusd)."""
    return 128 if bits == 8 and block_kind(kind) == "avx512vnni" else 0


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _mask(values: list[int]) -> ir.Constant:
    return ir.Constant(_vec(_I32, len(values)), values)


def _concat(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    return builder.shuffle_vector(a, b, _mask(list(range(2 * a.type.count))))


def _half(builder: ir.IRBuilder, v: ir.Value, which: int) -> ir.Value:
    n = v.type.count // 2
    return builder.shuffle_vector(v, v, _mask(list(range(which * n, which * n + n))))


def _int_dot(builder: ir.IRBuilder, kind: str, bits: int, init, w, x) -> ir.Value:
    """init (16 x i32) + per-lane sums of 4 products of w (64 x i8: unsigned 4-bit values, or
    signed 8-bit ones) and x (64 x i8, signed, |x| <= 127)."""
    module = builder.module
    v16i32 = _vec(_I32, 16)
    kind = block_kind(kind)
    if kind == "avx512vnni":
        if bits == 8:
            w = builder.xor(w, ir.Constant(w.type, [128] * 64))
        fn = _declare(
            module, "llvm.x86.avx512.vpdpbusd.512", v16i32, [v16i32, _vec(_I8, 64), _vec(_I8, 64)]
        )
        return builder.call(fn, [init, w, x])
    if kind == "avx2":
        v32i8, v16i16, v8i32 = _vec(_I8, 32), _vec(_I16, 16), _vec(_I32, 8)
        maddubs = _declare(module, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
        madd = _declare(module, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
        sign = _declare(module, "llvm.x86.avx2.psign.b", v32i8, [v32i8, v32i8])
        ones = ir.Constant(v16i16, [1] * 16)
        halves = []
        for which in (0, 1):
            wh, xh = _half(builder, w, which), _half(builder, x, which)
            if bits == 8:  # |w| * (x with w's sign): the pair sums stay below 2 * 128 * 127
                wh, xh = builder.call(sign, [wh, wh]), builder.call(sign, [xh, wh])
            halves.append(builder.call(madd, [builder.call(maddubs, [wh, xh]), ones]))
        return builder.add(init, _concat(builder, *halves))
    wide = _vec(_I32, 64)
    widen_w = builder.sext if bits == 8 else builder.zext
    prod = builder.mul(widen_w(w, wide), builder.sext(x, wide))
    parts = [builder.shuffle_vector(prod, prod, _mask(list(range(s, 64, 4)))) for s in range(4)]
    sums = builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
    return builder.add(init, sums)


def _to_float(builder: ir.IRBuilder, value: ir.Value, dtype) -> ir.Value:
    """Scale values as stored (float32, float16 bits in uint16, uint8 or int8) to float32."""
    n = value.type.count
    target = _vec(_F32, n)
    if dtype == types.float32:
        return value
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(value, _vec(ir.HalfType(), n)), target)
    if dtype == types.uint8:
        return builder.uitofp(value, target)
    return builder.sitofp(value, target)


def _llvm_elem(dtype) -> ir.Type:
    if dtype == types.float32:
        return _F32
    if dtype == types.uint16:
        return _I16
    return _I8


def _is_array(x, dtypes=None) -> bool:
    return (
        isinstance(x, types.Array)
        and x.layout == "C"
        and x.ndim == 2
        and (dtypes is None or x.dtype in dtypes)
    )


_SCALE_TYPES = (types.float32, types.uint16, types.uint8, types.int8)


def _splat(builder: ir.IRBuilder, value: ir.Value, n: int = ROWS) -> ir.Value:
    vec = builder.insert_element(ir.Constant(_vec(value.type, n), None), value, _I32(0))
    return builder.shuffle_vector(vec, vec, _mask([0] * n))


def _row_factors(builder, arr, dtype, sup, group_row, index, sup_index) -> ir.Value:
    """16 rows' factor for one group: arr's 16 values at `index` (as float), times sup's
    16 at `sup_index` when the format has a second level."""
    base = _row_pointer(builder, arr, group_row, _llvm_elem(dtype))
    elem = _llvm_elem(dtype)
    start = builder.mul(index, index.type(ROWS))
    values = _to_float(builder, load(builder, base, start, _vec(elem, ROWS)), dtype)
    if sup is None:
        return values
    sup_base = _row_pointer(builder, sup, group_row, _I16)
    halves = load(builder, sup_base, builder.mul(sup_index, index.type(ROWS)), _vec(_I16, ROWS))
    return builder.fmul(_to_float(builder, halves, types.uint16), values)


def _block_weights(builder, w_row, hi_row, bits, b) -> list[ir.Value]:
    """The 8 steps' 64-byte weight vectors of block b of one row group."""
    v64 = _vec(_I8, 64)
    intp = b.type
    if bits == 8:
        return [
            load(
                builder,
                w_row,
                builder.mul(builder.add(builder.mul(b, intp(8)), intp(s)), intp(64)),
                v64,
            )
            for s in range(8)
        ]
    fifteen, four = ir.Constant(v64, [15] * 64), ir.Constant(v64, [4] * 64)
    steps = [None] * 8
    for p in range(4):
        at = builder.mul(builder.add(builder.mul(b, intp(4)), intp(p)), intp(64))
        packed = load(builder, w_row, at, v64)
        steps[p] = builder.and_(packed, fifteen)
        steps[p + 4] = builder.lshr(packed, four)
    if hi_row is not None:
        three = ir.Constant(v64, [3] * 64)
        for q in range(2):
            at = builder.mul(builder.add(builder.mul(b, intp(2)), intp(q)), intp(64))
            planes = load(builder, hi_row, at, v64)
            for j in range(4):
                s = q + 2 * j
                bits2 = builder.and_(builder.lshr(planes, ir.Constant(v64, [2 * j] * 64)), three)
                steps[s] = builder.or_(steps[s], builder.shl(bits2, four))
    return steps


@dataclass
class _TileOperands:
    """What the block loop of a tile reads: pointers to the row group's arrays and to each
    token's activation rows, and the formats' static choices."""

    kind: str
    bits: int
    blocks: ir.Value
    w_row: ir.Value
    hi_row: ir.Value | None
    scale: tuple  # (array, dtype, second level or None)
    mins: tuple | None
    group_row: ir.Value
    x_rows: list
    sum_rows: list
    s_rows: list
    m_rows: list
    neg_start: ir.Value
    prefetch: bool


# How far ahead of the block it reads a GEMV tile asks for its weights, in bytes. A burst of
# hints per 16-row group (16 KB at 2048 inputs) left a core at 28-35 GB/s; a hint per line,
# 4 KB ahead: 64 GB/s (2 KB: 60, 8 KB: 52, 16 KB: 49), Zen 4, 5632 x 2048 Q4_0, 2 threads.
PREFETCH_AHEAD = 4096


def _prefetch_ahead(builder: ir.IRBuilder, w_row: ir.Value, b: ir.Value, bits: int) -> None:
    """Ask for the cache lines of the block PREFETCH_AHEAD bytes past block b: a steady
    stream of hints, one per line read, rather than a burst per row group."""
    intp = b.type
    block_bytes = 512 if bits == 8 else 256
    base = builder.bitcast(w_row, _I8.as_pointer())
    start = builder.add(builder.mul(b, intp(block_bytes)), intp(PREFETCH_AHEAD))
    for line in range(0, block_bytes, 64):
        emit_prefetch(builder, builder.gep(base, [builder.add(start, intp(line))]))


def _emit_block_loop(builder: ir.IRBuilder, o: _TileOperands, halves: bool, per_scale) -> list:
    """The loop over 32-input blocks; returns each token's 16-lane float sums after it.

    `halves`: two scale groups a block (group 16), their dots kept apart; otherwise one dot a
    block, scaled by group b // per_scale."""
    intp = o.blocks.type
    v16f = _vec(_F32, ROWS)
    fma = _declare(builder.module, "llvm.fma.v16f32", v16f, [v16f, v16f, v16f])

    def block(b: ir.Value, accs: list[ir.Value]) -> list[ir.Value]:
        steps = _block_weights(builder, o.w_row, o.hi_row, o.bits, b)
        if o.prefetch:
            _prefetch_ahead(builder, o.w_row, b, o.bits)
        sup_index = builder.udiv(b, intp(SUPER // BLOCK))
        two = builder.mul(b, intp(2))
        index = [two, builder.add(two, intp(1))] if halves else [builder.udiv(b, per_scale)]
        arr, dtype, sup = o.scale
        d = [_row_factors(builder, arr, dtype, sup, o.group_row, i, sup_index) for i in index]
        m = []
        if o.mins is not None:
            arr, dtype, sup = o.mins
            m = [_row_factors(builder, arr, dtype, sup, o.group_row, i, sup_index) for i in index]
        new = []
        for j, acc in enumerate(accs):
            sums = [
                builder.load(builder.gep(o.sum_rows[j], [builder.add(two, intp(h))]))
                for h in (0, 1)
            ]
            sums = sums if halves else [builder.add(sums[0], sums[1])]
            lanes = [_splat(builder, builder.mul(total, o.neg_start)) for total in sums]
            for s in range(8):
                at = builder.add(builder.mul(b, intp(8)), intp(s))
                word = builder.load(builder.gep(o.x_rows[j], [at]), align=1)
                x = builder.bitcast(_splat(builder, word), _vec(_I8, 64))
                part = s // 4 if halves else 0
                lanes[part] = _int_dot(builder, o.kind, o.bits, lanes[part], steps[s], x)
            scale_x = _splat(builder, builder.load(builder.gep(o.s_rows[j], [b])))
            for part, dots in enumerate(lanes):
                both = builder.fmul(d[part], scale_x)
                acc = builder.call(fma, [builder.sitofp(dots, v16f), both, acc])
            if m:
                xm = [
                    builder.load(builder.gep(o.m_rows[j], [builder.add(two, intp(h))]))
                    for h in (0, 1)
                ]
                xm = xm if halves else [builder.fadd(xm[0], xm[1])]
                for part, value in enumerate(xm):
                    acc = builder.call(fma, [m[part], _splat(builder, value), acc])
            new.append(acc)
        return new

    zeros = [ir.Constant(v16f, None)] * len(o.x_rows)
    return emit_counted_loop(builder, intp(0), o.blocks, intp(1), zeros, block)


def make_rows_tile(kind: str, tokens: int, prefetch: bool):
    """A numba intrinsic tile(w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum,
    xs, xm, start, t, out, accumulate): out[t + j, 16 g + r] (+)= row 16 g + r . token t + j
    for the 16 rows of group g (fewer in a last group: out's width bounds the stores) and
    j < tokens.

    w: (groups, Kp * 8) uint8 4-bit values or (groups, Kp * 16) int8 values, high None or
    (groups, Kp * 4) uint8 top bits of 6-bit values; scale, mins: (groups, Kp / group * 16)
    float32, float16 bits (uint16), uint8 or int8; scale_sup, mins_sup: (groups, Kp / 256 *
    16) float16 bits or None; mins None for formats without; group one of GROUPS. xq (T, Kp) int8
    activations; xsum (T, Kp / 16) int32 sums of each 16 of them; xs (T, Kp / 32) float32
    scales; xm (T, Kp / 16) float32 sums times their scale (read with mins); start the zero
    point plus the step's weight offset; out (T, N) float32. With `prefetch`, the block loop
    hints the weights PREFETCH_AHEAD bytes ahead (the memory-bound GEMV's tiles).
    """

    @intrinsic
    def tile(typingctx, w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum, xs, xm,
             start, t, out, accumulate):  # fmt: skip
        if not (_is_array(w, (types.uint8, types.int8)) and _is_array(scale, _SCALE_TYPES)):
            return None
        has_high = not isinstance(high, types.NoneType)
        if has_high and not (_is_array(high, (types.uint8,)) and w.dtype == types.uint8):
            return None
        has_min = not isinstance(mins, types.NoneType)
        if has_min and not _is_array(mins, _SCALE_TYPES):
            return None
        for sup in (scale_sup, mins_sup):
            if not isinstance(sup, types.NoneType) and not _is_array(sup, (types.uint16,)):
                return None
        if not isinstance(accumulate, types.Boolean) or not isinstance(out, types.Array):
            return None
        argtypes = (w, high, scale, scale_sup, mins, mins_sup, group, g, xq, xsum, xs, xm,
                    start, t, out, accumulate)  # fmt: skip
        bits = 4 if w.dtype == types.uint8 else 8

        def codegen(context, builder, signature, args):
            def arr(i):
                if isinstance(signature.args[i], types.NoneType):
                    return None
                return context.make_array(signature.args[i])(context, builder, args[i])

            w_a, hi_a, sc_a, scs_a, mn_a, mns_a = (arr(i) for i in range(6))
            xq_a, xsum_a, xs_a, xm_a, out_a = (arr(i) for i in (8, 9, 10, 11, 14))
            size, g0, zero_pt, t0 = (
                context.cast(builder, args[i], signature.args[i], types.intp)
                for i in (6, 7, 12, 13)
            )
            intp = g0.type
            kp = cgutils.unpack_tuple(builder, xq_a.shape)[1]
            tok = [builder.add(t0, intp(j)) for j in range(tokens)]
            operands = _TileOperands(
                kind=kind,
                bits=bits,
                blocks=builder.udiv(kp, intp(BLOCK)),
                w_row=_row_pointer(builder, w_a, g0, _I8),
                hi_row=None if hi_a is None else _row_pointer(builder, hi_a, g0, _I8),
                scale=(sc_a, signature.args[2].dtype, scs_a),
                mins=None if mn_a is None else (mn_a, signature.args[4].dtype, mns_a),
                group_row=g0,
                x_rows=[_row_pointer(builder, xq_a, tid, _I32) for tid in tok],
                sum_rows=[_row_pointer(builder, xsum_a, tid, _I32) for tid in tok],
                s_rows=[_row_pointer(builder, xs_a, tid, _F32) for tid in tok],
                m_rows=[_row_pointer(builder, xm_a, tid, _F32) for tid in tok],
                neg_start=builder.trunc(builder.neg(zero_pt), _I32),
                prefetch=prefetch,
            )
            # Groups of 16 inputs (Q6_K) take two scales a block; larger groups one, shared
            # by group / 32 blocks. The two loops are emitted apart, the choice made once.
            halves_block = builder.append_basic_block("rows.halves")
            whole_block = builder.append_basic_block("rows.whole")
            merge = builder.append_basic_block("rows.store")
            halves = builder.icmp_unsigned("==", size, intp(16))
            builder.cbranch(halves, halves_block, whole_block)
            results = []
            for block, two in ((halves_block, True), (whole_block, False)):
                builder.position_at_end(block)
                per_scale = builder.udiv(size, intp(BLOCK))
                accs = _emit_block_loop(builder, operands, two, per_scale)
                results.append((accs, builder.block))
                builder.branch(merge)
            builder.position_at_end(merge)
            v16f = _vec(_F32, ROWS)
            finals = []
            for j in range(tokens):
                final = builder.phi(v16f)
                for accs, pred in results:
                    final.add_incoming(accs[j], pred)
                finals.append(final)
            n = cgutils.unpack_tuple(builder, out_a.shape)[1]
            valid = builder.sub(n, builder.mul(g0, intp(ROWS)))
            lane_ids = ir.Constant(_vec(intp, ROWS), list(range(ROWS)))
            mask = builder.icmp_signed("<", lane_ids, _splat(builder, valid))
            v16p = v16f.as_pointer()
            load_m = _declare(builder.module, "llvm.masked.load.v16f32.p0", v16f,
                              [v16p, _I32, mask.type, v16f])  # fmt: skip
            store_m = _declare(builder.module, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                               [v16f, v16p, _I32, mask.type])  # fmt: skip
            for j in range(tokens):
                row_ptr = _row_pointer(builder, out_a, tok[j], _F32)
                ptr = builder.bitcast(builder.gep(row_ptr, [builder.mul(g0, intp(ROWS))]), v16p)
                old = builder.call(load_m, [ptr, _I32(4), mask, ir.Constant(v16f, None)])
                value = builder.select(args[15], builder.fadd(old, finals[j]), finals[j])
                builder.call(store_m, [value, ptr, _I32(4), mask])
            return context.get_dummy_value()

        return types.none(*argtypes), codegen

    return tile
