"""Explicit SIMD integer dot products for numba kernels, chosen from the CPU's features.

numba leaves int8 x int16 -> int32 loops scalar or widens them to float, so the int8 matmuls
emit their inner loop as LLVM vector IR through a numba intrinsic. The multiply-add step is
the instruction the CPU is best at, picked once at import:

- ``avx512vnni``: vpdpwssd, multiply int16 pairs and accumulate in one instruction (512-bit);
- ``avx512bw``: vpmaddwd then vpaddd (512-bit);
- ``avx2``: vpmaddwd then vpaddd (256-bit);
- ``portable``: sign-extend to int32, multiply, add; LLVM lowers it for any target.

The inner loop computes a tile of ROWS weight rows times TOKENS activation rows over a column
range [k0, k1) whose length is a multiple of `lanes(kind)`; callers do the scalar tail.
`make_dot_tile` adds the exact int64 dots into a small array; `make_scaled_tile`, for GEMM
tiles over whole rows, also scales and stores them without leaving vector registers. The
int32 lanes cannot overflow for int16 activations as long as a call covers at most KBLOCK
columns; the lanes are summed in int64.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

KINDS = ("avx512vnni", "avx512bw", "avx2", "portable")  # best first
# Columns per call: |w| <= 127 and |a| <= 32767 give products < 2**22; an int32 lane collects
# at most 2 * KBLOCK / lanes = 256 of them here, below 2**31.
KBLOCK = 2048


# Names a narrower kind than the CPU's best for the kernels to use, so the AVX2 and portable
# paths run (and are tested) on a wider CPU; numba's cache keeps each choice apart (jit_cache).
ISA_ENV = "LAMINA_ISA"


def host_kind() -> str:
    """The multiply-add kind the kernels use: the CPU's best, or the narrower one $LAMINA_ISA
    names (a wider one than the CPU runs, or an unknown name, is an error)."""
    best = best_kind()
    chosen = os.environ.get(ISA_ENV)
    if not chosen:
        return best
    if chosen not in KINDS:
        raise ValueError(f"{ISA_ENV}={chosen!r} is not a kind; choose from {', '.join(KINDS)}")
    if KINDS.index(chosen) < KINDS.index(best):
        raise ValueError(f"{ISA_ENV}={chosen}: this CPU runs at most {best}")
    return chosen


def best_kind() -> str:
    """The best multiply-add kind this CPU supports."""
    features = llvm.get_host_cpu_features()
    has = {name for name, on in features.items() if on}
    if {"avx512bw", "avx512vnni"} <= has:
        return "avx512vnni"
    if "avx512bw" in has:
        return "avx512bw"
    if "avx2" in has:
        return "avx2"
    return "portable"


def lanes(kind: str) -> int:
    """int16 elements per vector step for a kind."""
    return 32 if kind.startswith("avx512") else 16


def _declare(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _madd(builder: ir.IRBuilder, kind: str, acc: ir.Value, w16: ir.Value, a16: ir.Value):
    """acc (int32 x lanes/2) += pairwise sums of w16 * a16 (int16 x lanes)."""
    module = builder.module
    n = lanes(kind)
    i32v = ir.VectorType(ir.IntType(32), n // 2)
    i16v = ir.VectorType(ir.IntType(16), n)
    if kind == "avx512vnni":
        fn = _declare(module, "llvm.x86.avx512.vpdpwssd.512", i32v, [i32v, i16v, i16v])
        return builder.call(fn, [acc, w16, a16])
    if kind in ("avx512bw", "avx2"):
        name = "llvm.x86.avx512.pmaddw.d.512" if kind == "avx512bw" else "llvm.x86.avx2.pmadd.wd"
        fn = _declare(module, name, i32v, [i16v, i16v])
        return builder.add(acc, builder.call(fn, [w16, a16]))
    wide = ir.VectorType(ir.IntType(32), n)
    prod = builder.mul(builder.sext(w16, wide), builder.sext(a16, wide))
    even = builder.shuffle_vector(prod, prod, ir.Constant(i32v, list(range(0, n, 2))))
    odd = builder.shuffle_vector(prod, prod, ir.Constant(i32v, list(range(1, n, 2))))
    return builder.add(acc, builder.add(even, odd))


def _row_pointer(builder: ir.IRBuilder, array, row: ir.Value, elem: ir.Type) -> ir.Value:
    """Pointer to array[row, 0] of a C-contiguous 2D numba array."""
    row_stride = cgutils.unpack_tuple(builder, array.strides)[0]
    base = builder.bitcast(array.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(base, [builder.mul(row, row_stride)]), elem.as_pointer())


def load(builder: ir.IRBuilder, row_ptr: ir.Value, col: ir.Value, vec: ir.VectorType):
    """The vector `vec` at row_ptr[col] (unaligned)."""
    ptr = builder.bitcast(builder.gep(row_ptr, [col]), vec.as_pointer())
    return builder.load(ptr, align=1)


def emit_counted_loop(
    builder: ir.IRBuilder,
    start: ir.Value,
    stop: ir.Value,
    step: ir.Value,
    zeros: list[ir.Value],
    body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]],
) -> list[ir.Value]:
    """Emit `for i in range(start, stop, step)` carrying accumulators that start at `zeros`:
    body(i, accumulators) emits one iteration and returns the new accumulators. Returns
    their values after the loop (the zeros when it does not run), as phis in the block after
    it, where the builder is left."""
    entry = builder.block
    loop = builder.append_basic_block("loop")
    done = builder.append_basic_block("loop.done")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(start.type)
    accs = [builder.phi(zero.type) for zero in zeros]
    new = body(i, accs)
    following = builder.add(i, step)
    body_end = builder.block
    builder.cbranch(builder.icmp_signed("<", following, stop), loop, done)
    i.add_incoming(start, entry)
    i.add_incoming(following, body_end)
    for acc, zero, value in zip(accs, zeros, new, strict=True):
        acc.add_incoming(zero, entry)
        acc.add_incoming(value, body_end)
    builder.position_at_end(done)
    finals = []
    for zero, value in zip(zeros, new, strict=True):
        final = builder.phi(zero.type)
        final.add_incoming(zero, entry)
        final.add_incoming(value, body_end)
        finals.append(final)
    return finals


def emit_prefetch(builder: ir.IRBuilder, address: ir.Value) -> None:
    """Hint the CPU to pull the cache line at `address` (an i8 pointer); never faults."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = _declare(builder.module, "llvm.prefetch.p0", ir.VoidType(), [i8p, i32, i32, i32])
    builder.call(fn, [address, i32(0), i32(3), i32(1)])


def _dot_loop(
    builder: ir.IRBuilder,
    kind: str,
    w_rows: list[ir.Value],
    a_rows: list[ir.Value],
    k0: ir.Value,
    k1: ir.Value,
) -> list[ir.Value]:
    """Emit the multiply-add loop over columns [k0, k1); return its int32 accumulators
    [row r x token t] in row-major order, as phis in the block after the loop, where the
    builder is left."""
    n = lanes(kind)
    i8v = ir.VectorType(ir.IntType(8), n)
    i16v = ir.VectorType(ir.IntType(16), n)
    zero = ir.Constant(ir.VectorType(ir.IntType(32), n // 2), None)

    def body(col: ir.Value, accs: list[ir.Value]) -> list[ir.Value]:
        acts = [load(builder, a, col, i16v) for a in a_rows]
        new_accs = []
        for r, w in enumerate(w_rows):
            w16 = builder.sext(load(builder, w, col, i8v), i16v)
            for t, act in enumerate(acts):
                new_accs.append(_madd(builder, kind, accs[r * len(a_rows) + t], w16, act))
        return new_accs

    zeros = [zero] * (len(w_rows) * len(a_rows))
    return emit_counted_loop(builder, k0, k1, k0.type(n), zeros, body)


def emit_dot_tile(
    builder: ir.IRBuilder,
    kind: str,
    w_rows: list[ir.Value],
    a_rows: list[ir.Value],
    k0: ir.Value,
    k1: ir.Value,
) -> list[ir.Value]:
    """Emit the loop; return int64 dots [row r x token t] in row-major order.

    `w_rows` point at int8 weight rows, `a_rows` at int16 activation rows.
    """
    finals = _dot_loop(builder, kind, w_rows, a_rows, k0, k1)
    i64v = ir.VectorType(ir.IntType(64), finals[0].type.count)
    reduce_add = _declare(
        builder.module, f"llvm.vector.reduce.add.v{i64v.count}i64", ir.IntType(64), [i64v]
    )
    return [builder.call(reduce_add, [builder.sext(final, i64v)]) for final in finals]


def _pair_halves(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """Lanes [a0+a1, a2+a3, ..., b0+b1, b2+b3, ...]: the two vectors' adjacent lanes summed."""
    n = a.type.count
    pick = ir.VectorType(ir.IntType(32), n)
    even = builder.shuffle_vector(a, b, ir.Constant(pick, list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(a, b, ir.Constant(pick, list(range(1, 2 * n, 2))))
    return builder.add(even, odd)


def _lane_sums(builder: ir.IRBuilder, accs: list[ir.Value]) -> ir.Value:
    """One <len(accs) x i64> vector of the accumulators' lane sums, in their order.

    A tree: each level sums adjacent lanes of two vectors into one, so the sums share their
    shuffles instead of each paying a horizontal reduction. The first level adds in int32:
    two lanes hold at most 4 * KBLOCK / lanes products of |w| <= 128 and |a| <= 32767, below
    2**31; the rest run in int64. len(accs) must be a power of two, at least 2. When there are
    more accumulators than int32 lanes (a 4x4 tile on AVX2), the tree ends with several whole
    vectors, which are joined in order.
    """
    width = accs[0].type.count
    i64v = ir.VectorType(ir.IntType(64), width)
    level = [builder.sext(_pair_halves(builder, a, b), i64v) for a, b in zip(accs[::2], accs[1::2])]
    span = width // 2  # lanes per accumulator in each vector of `level`
    while span > 1:
        if len(level) == 1:
            level = [_pair_halves(builder, level[0], level[0])]
        else:
            level = [_pair_halves(builder, a, b) for a, b in zip(level[::2], level[1::2])]
        span //= 2
    while len(level) > 1:
        both = ir.Constant(ir.VectorType(ir.IntType(32), 2 * level[0].type.count),
                           list(range(2 * level[0].type.count)))  # fmt: skip
        level = [builder.shuffle_vector(a, b, both) for a, b in zip(level[::2], level[1::2])]
    keep = ir.Constant(ir.VectorType(ir.IntType(32), len(accs)), list(range(len(accs))))
    return builder.shuffle_vector(level[0], level[0], keep)


def make_dot_tile(kind: str, rows: int, tokens: int):
    """A numba intrinsic dot(w, r, a, t, k0, k1, sums) that adds a tile into `sums`.

    w is a C-contiguous int8 (N, K) array, a an int16 (T, K) array and sums a C-contiguous
    int64 (rows, tokens) array; sums[i, j] += sum(w[r + i, k0:k1] * a[t + j, k0:k1]).
    Adding in place through fixed offsets (rather than returning a tuple the caller indexes)
    keeps the epilogue free of tuple spills and index arithmetic: 15-25% of a GEMM at 16 tokens.
    """

    @intrinsic
    def dot_tile(typingctx, w, r, a, t, k0, k1, sums):
        sig = types.none(w, r, a, t, k0, k1, sums)

        def codegen(context, builder, signature, args):
            w_arr = context.make_array(signature.args[0])(context, builder, args[0])
            a_arr = context.make_array(signature.args[2])(context, builder, args[2])
            s_arr = context.make_array(signature.args[6])(context, builder, args[6])
            r0, t0, lo, hi = (
                context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3, 4, 5)
            )
            w_rows = [
                _row_pointer(
                    builder, w_arr, builder.add(r0, ir.Constant(r0.type, i)), ir.IntType(8)
                )
                for i in range(rows)
            ]
            a_rows = [
                _row_pointer(
                    builder, a_arr, builder.add(t0, ir.Constant(t0.type, j)), ir.IntType(16)
                )
                for j in range(tokens)
            ]
            dots = emit_dot_tile(builder, kind, w_rows, a_rows, lo, hi)
            i64 = ir.IntType(64)
            base = builder.bitcast(s_arr.data, i64.as_pointer())
            for idx, dot in enumerate(dots):
                ptr = builder.gep(base, [ir.Constant(lo.type, idx)])
                builder.store(builder.add(builder.load(ptr), dot), ptr)
            return context.get_dummy_value()

        return sig, codegen

    return dot_tile


def make_scaled_tile(kind: str, rows: int, tokens: int):
    """A numba intrinsic tile(w, r, a, t, a_scale, scale, out, accumulate) for a GEMM's tiles
    over whole rows: out[t + j, r + i] (+)= (w[r + i] . a[t + j]) * a_scale[t + j] * scale[r + i].

    w is int8 (N, K), a int16 (T, K) with K a multiple of `lanes(kind)` and at most KBLOCK,
    a_scale (T,), scale (N,) and out (T, N) float32, all C-contiguous. The epilogue stays in
    vector registers: the dots are summed by a shared tree, converted to float64 (exact: they
    are integers below 2**53), multiplied by a_scale * scale formed in float64 (exact), and
    rounded once to float32: the operations of matmul_int8's `_store_tile`, so the same bits.
    rows * tokens must be a power of two; `accumulate` a bool.
    """
    if rows * tokens < 2 or rows * tokens & (rows * tokens - 1):
        raise ValueError("a scaled tile has a power of two of outputs, at least 2")

    @intrinsic
    def tile(typingctx, w, r, a, t, a_scale, scale, out, accumulate):
        arrays = (w, a, a_scale, scale, out)
        if not all(isinstance(x, types.Array) and x.layout == "C" for x in arrays):
            return None
        if not isinstance(accumulate, types.Boolean):
            return None
        sig = types.none(w, r, a, t, a_scale, scale, out, accumulate)

        def codegen(context, builder, signature, args):
            w_arr, a_arr, as_arr, sc_arr, out_arr = (
                context.make_array(signature.args[i])(context, builder, args[i])
                for i in (0, 2, 4, 5, 6)
            )
            r0, t0 = (context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 3))
            intp = r0.type
            i32 = ir.IntType(32)
            k = cgutils.unpack_tuple(builder, w_arr.shape)[1]
            w_rows = [
                _row_pointer(builder, w_arr, builder.add(r0, intp(i)), ir.IntType(8))
                for i in range(rows)
            ]
            a_rows = [
                _row_pointer(builder, a_arr, builder.add(t0, intp(j)), ir.IntType(16))
                for j in range(tokens)
            ]
            finals = _dot_loop(builder, kind, w_rows, a_rows, intp(0), k)
            by_token = [finals[i * tokens + j] for j in range(tokens) for i in range(rows)]
            n = rows * tokens
            f32, f64 = ir.FloatType(), ir.DoubleType()
            sums = builder.sitofp(_lane_sums(builder, by_token), ir.VectorType(f64, n))
            scale_ptr = builder.gep(builder.bitcast(sc_arr.data, f32.as_pointer()), [r0])
            quad = builder.load(
                builder.bitcast(scale_ptr, ir.VectorType(f32, rows).as_pointer()), align=4
            )
            row_scales = builder.fpext(quad, ir.VectorType(f64, rows))
            repeat = ir.Constant(
                ir.VectorType(i32, n), [i for _ in range(tokens) for i in range(rows)]
            )
            row_scales = builder.shuffle_vector(row_scales, row_scales, repeat)
            a_base = builder.bitcast(as_arr.data, f32.as_pointer())
            token_scales = ir.Constant(ir.VectorType(f64, tokens), None)
            for j in range(tokens):
                value = builder.fpext(
                    builder.load(builder.gep(a_base, [builder.add(t0, intp(j))])), f64
                )
                token_scales = builder.insert_element(token_scales, value, i32(j))
            spread = ir.Constant(
                ir.VectorType(i32, n), [j for j in range(tokens) for _ in range(rows)]
            )
            token_scales = builder.shuffle_vector(token_scales, token_scales, spread)
            both = builder.fmul(token_scales, row_scales)
            values = builder.fptrunc(builder.fmul(sums, both), ir.VectorType(f32, n))
            chunk = ir.VectorType(f32, rows)
            for j in range(tokens):
                pick = ir.Constant(ir.VectorType(i32, rows), list(range(j * rows, (j + 1) * rows)))
                part = builder.shuffle_vector(values, values, pick)
                row_ptr = _row_pointer(builder, out_arr, builder.add(t0, intp(j)), f32)
                ptr = builder.bitcast(builder.gep(row_ptr, [r0]), chunk.as_pointer())
                old = builder.load(ptr, align=4)
                builder.store(builder.select(args[7], builder.fadd(old, part), part), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@intrinsic
def prefetch(typingctx, array, byte_offset):
    """Hint the CPU to pull the cache line at array.data + byte_offset; never faults.

    Rows shorter than ~1 KB defeat the hardware prefetcher when a kernel walks several rows
    at once, so the int8 GEMV asks for the tile it will read next by hand.
    """
    sig = types.none(array, byte_offset)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
        emit_prefetch(builder, builder.gep(base, [offset]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def stack_tile(typingctx, rows, cols):
    """An int64 (rows, cols) C-contiguous array on the calling function's stack (literal sizes).

    For the small tiles of sums the matmuls fill per row block: np.empty there cost two heap
    allocations per parallel job (about 200 a call for a 1536-row GEMV), and a stack tile is
    free and may live in registers once inlined. The array must not outlive the function
    that creates it (do not return it); uninitialised, like np.empty.
    """
    for arg in (rows, cols):
        if not isinstance(arg, types.IntegerLiteral):
            raise RequireLiteralValue(f"{arg} must be a literal")
    array_type = types.Array(types.int64, 2, "C")

    def codegen(context, builder, signature, args):
        r, c = rows.literal_value, cols.literal_value
        data = cgutils.alloca_once(builder, ir.IntType(64), size=r * c)
        intp = context.get_value_type(types.intp)
        array = context.make_array(array_type)(context, builder)
        populate_array(
            array,
            data=data,
            shape=[intp(r), intp(c)],
            strides=[intp(8 * c), intp(8)],
            itemsize=intp(8),
            meminfo=None,
        )
        return array._getvalue()

    return array_type(rows, cols), codegen
