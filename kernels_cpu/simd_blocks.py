"""SIMD tiles for group-quantized weights (4-bit and 8-bit values with per-group scales).

A block format stores each group of G consecutive inputs of a row as small integers q with a
float scale d (and, for formats with a minimum, a float m): w = d * (q - zero) + m. The
activations are quantized per 32 inputs to int8 with a float scale s (`matmul_blocks`), so
a product over a group is an exact integer dot times d * s. This is the arithmetic of
llama.cpp's own CPU kernels, and of GGUF's Q4_0 ... Q6_K, which lamina repacks into it.

The tile walks the columns in chunks of 64. A chunk's integer products land in 16 int32
lanes, lane i holding the sum over columns 4i..4i+3; each lane is converted to float and
accumulated with one fused multiply-add by its group's d * s, so a (row, token) pair keeps a
16-lane float accumulator, summed by a fixed tree at the end. The multiply step is the one
instruction the CPU is best at, picked once at import:

- ``avx512vnni``: vpdpbusd (unsigned x signed bytes, 4 products per lane, accumulated in one
  instruction). 8-bit weights are signed, so they are offset by 128 (a xor) and the offset's
  share, 128 * the activations' sum, is subtracted in integers through the start value;
- ``avx2`` (also on AVX-512 CPUs without VNNI): vpmaddubsw then vpmaddwd by ones. 8-bit
  weights take the sign trick (|w| times x with w's sign), so no int16 sum can saturate;
- ``portable``: widen, multiply, add; LLVM lowers it for any target.

The starting value of each lane comes from the caller (`xinit`): minus the zero point times
the lane's activation sum, so the dot is over q - zero, exactly. The minimum's share, m times
the sum of s * x over the group, is a second multiply-add per lane from `xm` (s times each
lane's activation sum).

Each (row, token) pair goes through the same operations in the same order whatever the
tile's shape, so a GEMV, a GEMM and any batch give the same bits for a token.

4-bit rows hold 32 bytes per chunk: byte j carries column j in its low nibble and column
j + 32 in its high one, so a chunk unpacks with one mask and one shift into column order.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import _declare, _row_pointer

CHUNK = 64  # columns per step; the padded width of every block-format row is a multiple
LANES = 16  # int32 lanes per chunk, 4 columns each
ACT_GROUP = 32  # activations share one int8 scale per 32 columns
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


def _load_vec(builder: ir.IRBuilder, row_ptr: ir.Value, index: ir.Value, vec: ir.VectorType):
    ptr = builder.bitcast(builder.gep(row_ptr, [index]), vec.as_pointer())
    return builder.load(ptr, align=1)


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


def _two_bit_planes(builder: ir.IRBuilder, planes: ir.Value) -> ir.Value:
    """16 bytes of 2-bit fields (column j, j + 16, j + 32, j + 48 of a chunk in byte j, from
    bit 0) -> the 64 columns' bits 4 and 5, in column order."""
    three = ir.Constant(planes.type, [3] * 16)
    parts = [
        builder.and_(builder.lshr(planes, ir.Constant(planes.type, [2 * p] * 16)), three)
        for p in range(4)
    ]
    both = _concat(
        builder, _concat(builder, parts[0], parts[1]), _concat(builder, parts[2], parts[3])
    )
    return builder.shl(both, ir.Constant(both.type, [4] * 64))


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


def _group_lanes(builder, arr, arr_type, sup, row, chunk, group) -> ir.Value:
    """The 16-lane vector of this row's per-group factor over one chunk: arr[row, g] (times
    sup[row, g // (SUPER / group)] when the format has a second level) for each lane's g.

    `group` is a run-time value: one branch per size in GROUPS, which the loop-invariant
    switch makes free (or LLVM unswitches), so one compiled kernel serves every group size.
    """
    intp = chunk.type
    elem = arr_type.dtype
    row_ptr = _row_pointer(builder, arr, row, _llvm_elem(elem))
    factor = None
    if sup is not None:
        sup_ptr = _row_pointer(builder, sup, row, _F32)
        factor = builder.load(builder.gep(sup_ptr, [builder.udiv(chunk, intp(SUPER // CHUNK))]))
    v16f = _vec(_F32, LANES)
    merge = builder.append_basic_block("group.merge")
    cases = []
    switch = builder.switch(group, merge)
    for size in GROUPS:
        block = builder.append_basic_block(f"group.{size}")
        switch.add_case(ir.Constant(group.type, size), block)
        builder.position_at_end(block)
        per_chunk = max(CHUNK // size, 1)
        if size <= CHUNK:
            first = builder.mul(chunk, intp(per_chunk))
        else:
            first = builder.udiv(chunk, intp(size // CHUNK))
        stored = _load_vec(builder, row_ptr, first, _vec(_llvm_elem(elem), per_chunk))
        values = _to_float(builder, stored, elem)
        if factor is not None:
            splat = builder.insert_element(ir.Constant(values.type, None), factor, _I32(0))
            values = builder.fmul(
                builder.shuffle_vector(splat, splat, _mask([0] * per_chunk)), values
            )
        lanes = [(4 * i) // size if size <= CHUNK else 0 for i in range(LANES)]
        cases.append((builder.shuffle_vector(values, values, _mask(lanes)), builder.block))
        builder.branch(merge)
    builder.position_at_end(merge)
    result = builder.phi(v16f)
    result.add_incoming(ir.Constant(v16f, None), switch.parent)
    for value, block in cases:
        result.add_incoming(value, block)
    return result


def _llvm_elem(dtype) -> ir.Type:
    if dtype == types.float32:
        return _F32
    if dtype == types.uint16:
        return _I16
    return _I8


def _pair_sums(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """[a0+a1, a2+a3, ..., b0+b1, ...]: the two vectors' adjacent lanes summed."""
    n = a.type.count
    even = builder.shuffle_vector(a, b, _mask(list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(a, b, _mask(list(range(1, 2 * n, 2))))
    return builder.fadd(even, odd)


def _float_lane_sums(builder: ir.IRBuilder, accs: list[ir.Value]) -> ir.Value:
    """<len(accs) x float>: each accumulator's lanes summed by the same balanced tree (adjacent
    lanes, then adjacent pairs, ...) whatever the number of accumulators, which share the
    shuffles. len(accs) is a power of two."""
    level = accs if len(accs) > 1 else [accs[0], accs[0]]
    level = [_pair_sums(builder, a, b) for a, b in zip(level[::2], level[1::2])]
    span = LANES // 2
    while span > 1:
        if len(level) == 1:
            level = [_pair_sums(builder, level[0], level[0])]
        else:
            level = [_pair_sums(builder, a, b) for a, b in zip(level[::2], level[1::2])]
        span //= 2
    while len(level) > 1:
        level = [_concat(builder, a, b) for a, b in zip(level[::2], level[1::2])]
    return builder.shuffle_vector(level[0], level[0], _mask(list(range(len(accs)))))


def _is_array(x, dtypes=None) -> bool:
    return (
        isinstance(x, types.Array)
        and x.layout == "C"
        and x.ndim == 2
        and (dtypes is None or x.dtype in dtypes)
    )


_SCALE_TYPES = (types.float32, types.uint16, types.uint8, types.int8)


def make_block_tile(kind: str, rows: int, tokens: int):
    """A numba intrinsic tile(w, high, scale, scale_sup, mins, mins_sup, group, r, xq, xinit, xs,
    xm, t, out, accumulate) that computes out[t + j, r + i] (+)= row r + i . token t + j for
    i < rows, j < tokens.

    w: (N, Kp / 2) uint8 paired nibbles (4-bit) or (N, Kp) int8 values (8-bit); high: None,
    or (N, Kp / 4) uint8 holding the upper two bits of 6-bit values whose low four are the
    nibbles of w (byte j of a chunk's 16: columns j, j + 16, j + 32, j + 48, from bit 0); scale and
    mins (N, Kp / group) as float32, float16 bits (uint16), uint8 or int8; scale_sup and
    mins_sup (N, Kp / 256) float32 second levels or None; mins None for formats without
    one; group one of GROUPS (any other leaves those factors zero). xq (T, Kp) int8 activations, xinit (T, Kp / 4) int32
    lane starts, xs (T, Kp / 32) float32 activation scales, xm (T, Kp / 4) float32 lane sums
    times their scale (read only with mins); out (T, N) float32. All C-contiguous.
    rows * tokens must be a power of two.
    """
    if rows * tokens & (rows * tokens - 1):
        raise ValueError("a block tile has a power of two of outputs")

    @intrinsic
    def tile(typingctx, w, high, scale, scale_sup, mins, mins_sup, group, r, xq, xinit, xs, xm,
             t, out, accumulate):  # fmt: skip
        if not isinstance(group, types.Integer):
            return None
        if not (_is_array(w, (types.uint8, types.int8)) and _is_array(scale, _SCALE_TYPES)):
            return None
        has_high = not isinstance(high, types.NoneType)
        if has_high and not (_is_array(high, (types.uint8,)) and w.dtype == types.uint8):
            return None
        has_min = not isinstance(mins, types.NoneType)
        if has_min and not _is_array(mins, _SCALE_TYPES):
            return None
        for sup in (scale_sup, mins_sup):
            if not isinstance(sup, types.NoneType) and not _is_array(sup, (types.float32,)):
                return None
        if not isinstance(accumulate, types.Boolean):
            return None
        argtypes = (w, high, scale, scale_sup, mins, mins_sup, group, r, xq, xinit, xs, xm, t,
                    out, accumulate)  # fmt: skip
        sig = types.none(*argtypes)
        bits = 4 if w.dtype == types.uint8 else 8

        def codegen(context, builder, signature, args):
            def arr(i):
                if isinstance(signature.args[i], types.NoneType):
                    return None
                return context.make_array(signature.args[i])(context, builder, args[i])

            w_a, hi_a, sc_a, scs_a, mn_a, mns_a = (arr(i) for i in range(6))
            xq_a, xi_a, xs_a, xm_a, out_a = (arr(i) for i in (8, 9, 10, 11, 13))
            r0, t0, g = (
                context.cast(builder, args[i], signature.args[i], types.intp) for i in (7, 12, 6)
            )
            intp = r0.type
            kp = cgutils.unpack_tuple(builder, xq_a.shape)[1]
            chunks = builder.udiv(kp, intp(CHUNK))
            w_rows = [
                _row_pointer(builder, w_a, builder.add(r0, intp(i)), _I8) for i in range(rows)
            ]
            row_ids = [builder.add(r0, intp(i)) for i in range(rows)]
            tok_ids = [builder.add(t0, intp(j)) for j in range(tokens)]
            x_rows = [_row_pointer(builder, xq_a, tid, _I8) for tid in tok_ids]
            i_rows = [_row_pointer(builder, xi_a, tid, _I32) for tid in tok_ids]
            s_rows = [_row_pointer(builder, xs_a, tid, _F32) for tid in tok_ids]
            m_rows = [_row_pointer(builder, xm_a, tid, _F32) for tid in tok_ids]
            v16f = _vec(_F32, LANES)
            fma = _declare(builder.module, "llvm.fma.v16f32", v16f, [v16f, v16f, v16f])
            zero = ir.Constant(v16f, None)

            entry = builder.block
            loop = builder.append_basic_block("blocks.loop")
            done = builder.append_basic_block("blocks.done")
            builder.cbranch(builder.icmp_unsigned(">", chunks, intp(0)), loop, done)
            builder.position_at_end(loop)
            c = builder.phi(intp)
            accs = [builder.phi(v16f) for _ in range(rows * tokens)]
            xs_v, inits, x_scales, x_mins = [], [], [], []
            for j in range(tokens):
                xs_v.append(
                    _load_vec(builder, x_rows[j], builder.mul(c, intp(CHUNK)), _vec(_I8, 64))
                )
                inits.append(
                    _load_vec(builder, i_rows[j], builder.mul(c, intp(LANES)), _vec(_I32, 16))
                )
                pair = _load_vec(builder, s_rows[j], builder.mul(c, intp(2)), _vec(_F32, 2))
                x_scales.append(
                    builder.shuffle_vector(pair, pair, _mask([i // 8 for i in range(16)]))
                )
                if has_min:
                    x_mins.append(_load_vec(builder, m_rows[j], builder.mul(c, intp(LANES)), v16f))
            new = []
            for i in range(rows):
                if bits == 4:
                    packed = _load_vec(builder, w_rows[i], builder.mul(c, intp(32)), _vec(_I8, 32))
                    low = builder.and_(packed, ir.Constant(packed.type, [15] * 32))
                    high = builder.lshr(packed, ir.Constant(packed.type, [4] * 32))
                    wv = _concat(builder, low, high)
                    if hi_a is not None:
                        hi_row = _row_pointer(builder, hi_a, row_ids[i], _I8)
                        planes = _load_vec(builder, hi_row, builder.mul(c, intp(16)), _vec(_I8, 16))
                        wv = builder.or_(wv, _two_bit_planes(builder, planes))
                else:
                    wv = _load_vec(builder, w_rows[i], builder.mul(c, intp(CHUNK)), _vec(_I8, 64))
                d = _group_lanes(builder, sc_a, signature.args[2], scs_a, row_ids[i], c, g)
                m = None
                if has_min:
                    m = _group_lanes(builder, mn_a, signature.args[4], mns_a, row_ids[i], c, g)
                for j in range(tokens):
                    dot = _int_dot(builder, kind, bits, inits[j], wv, xs_v[j])
                    both = builder.fmul(d, x_scales[j])
                    acc = builder.call(fma, [builder.sitofp(dot, v16f), both, accs[i * tokens + j]])
                    if m is not None:
                        acc = builder.call(fma, [m, x_mins[j], acc])
                    new.append(acc)
            next_c = builder.add(c, intp(1))
            body_end = builder.block
            builder.cbranch(builder.icmp_unsigned("<", next_c, chunks), loop, done)
            c.add_incoming(intp(0), entry)
            c.add_incoming(next_c, body_end)
            for acc, value in zip(accs, new, strict=True):
                acc.add_incoming(zero, entry)
                acc.add_incoming(value, body_end)

            builder.position_at_end(done)
            finals = []
            for value in new:
                final = builder.phi(v16f)
                final.add_incoming(zero, entry)
                final.add_incoming(value, body_end)
                finals.append(final)
            by_token = [finals[i * tokens + j] for j in range(tokens) for i in range(rows)]
            sums = _float_lane_sums(builder, by_token)
            for j in range(tokens):
                part = builder.shuffle_vector(
                    sums, sums, _mask(list(range(j * rows, (j + 1) * rows)))
                )
                row_ptr = _row_pointer(builder, out_a, tok_ids[j], _F32)
                ptr = builder.bitcast(builder.gep(row_ptr, [r0]), _vec(_F32, rows).as_pointer())
                old = builder.load(ptr, align=4)
                builder.store(builder.select(args[14], builder.fadd(old, part), part), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile
