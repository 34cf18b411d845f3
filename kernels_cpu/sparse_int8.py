"""Bitmask-compressed sparse int8 weights and their matmul, for pruned weights.

Decode reads every weight byte once per token, so a pruned matrix is only faster if it moves
fewer bytes and its decoding keeps up with memory. The format stores, per row, one mask bit
per column and the nonzero int8 values in column order:

- ``mask`` uint8 (N, KP // 8), KP = K rounded up to 16: bit b (LSB first) of mask[r, c // 8]
  says w[r, c] != 0, with b = c % 8;
- ``values`` int8, the nonzeros of each row in column order, rows concatenated, then 16 zero
  bytes so a 16-byte vector load from any value offset stays inside the array;
- ``row_ptr`` int64 (N + 1,), where each row's values start.

At 50% zeros that is 0.625 bytes a weight, at 70% 0.425 (plus 8 bytes a row).

The kernel expands the packed values back into dense int16 lanes with a byte shuffle
(pshufb) whose control comes from a 256-entry table indexed by the mask byte, advances the
value pointer by the byte's popcount, and multiply-adds with the int16 activations as the
dense int8 kernels do (pmaddwd). Its integer sums are exact and scaled by matmul_int8's own
`_store_tile`, so the result is bit-identical to `gemv_w8` on the unpacked matrix. The path is
chosen at import: AVX2 (16 columns a step, the loop in inline assembly), SSSE3 (8 columns a
step, LLVM vector IR), or plain numba loops elsewhere.

Speed, measured on a 2-core Zen 3 (AVX2): the expansion costs about 14 instructions per 16
weights and row, so the kernel is compute-bound at ~4 weights a cycle a core, while the dense
int8 GEMV streams ~4 bytes (weights) a cycle a core from memory. With weights streamed from
memory at T=1 it runs at 0.70-0.76x the speed of `gemv_w8` on 11008 x 4096 and 4096 x 11008
at 50% and 70% zeros, and 1.2x on 3072 x 576 (where the dense GEMV is short of bandwidth):
on CPUs with this balance the format saves memory (0.63x and 0.43x of the dense bytes) more
than decode time.
"""

from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic, overload

from kernels_cpu.matmul_int8 import INT16_MAX, _store_tile, quantize_rows_into
from kernels_cpu.simd import stack_tile

KINDS = ("avx2", "ssse3", "portable")
# Columns a mask row is padded to: one AVX2 step.
GROUP = 16
# Output rows per parallel job; rows expanded side by side for one token (sharing the loop
# and activation loads); rows for a pair of tokens (fewer, so the AVX2 loop fits the registers).
JOB_ROWS = 32
TILE_ROWS = 4
PAIR_ROWS = 2


def host_kind() -> str:
    """The widest byte shuffle this CPU supports (the AVX2 loop also uses popcnt)."""
    features = llvm.get_host_cpu_features()
    if features.get("avx2", False) and features.get("popcnt", False):
        return "avx2"
    if features.get("ssse3", False):
        return "ssse3"
    return "portable"


KIND = host_kind()
# The AVX2 loop is inline assembly, which LLVM can only emit with the target's parser loaded.
llvm.initialize_native_asmparser()


class SparsePacked(NamedTuple):
    """A bitmask-packed int8 matrix; see the module docstring for the layout."""

    mask: np.ndarray
    values: np.ndarray
    row_ptr: np.ndarray


def padded_columns(k: int) -> int:
    """KP: k rounded up to a multiple of GROUP."""
    return -(-k // GROUP) * GROUP


def pack_bitmask(w: np.ndarray) -> SparsePacked:
    """Pack an int8 (N, K) matrix into mask, values and row_ptr."""
    if w.dtype != np.int8 or w.ndim != 2:
        raise ValueError(f"expected a 2-D int8 matrix, got {w.dtype} {w.shape}")
    n, k = w.shape
    nonzero = np.zeros((n, padded_columns(k)), dtype=bool)
    nonzero[:, :k] = w != 0
    mask = np.packbits(nonzero, axis=1, bitorder="little")
    values = np.concatenate([w[nonzero[:, :k]], np.zeros(16, dtype=np.int8)])
    row_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(nonzero.sum(axis=1), out=row_ptr[1:])
    return SparsePacked(mask, values, row_ptr)


def unpack_bitmask(mask: np.ndarray, values: np.ndarray, row_ptr: np.ndarray, k: int) -> np.ndarray:
    """The int8 (N, k) matrix that `pack_bitmask` packed; checks the parts agree."""
    n = mask.shape[0]
    if mask.dtype != np.uint8 or mask.ndim != 2 or mask.shape[1] * 8 != padded_columns(k):
        raise ValueError(f"mask {mask.dtype} {mask.shape} does not fit {k} columns")
    nonzero = np.unpackbits(mask, axis=1, bitorder="little").astype(bool)
    counts = nonzero.sum(axis=1)
    if (
        row_ptr.shape != (n + 1,)
        or row_ptr[0] != 0
        or not np.array_equal(np.diff(row_ptr), counts)
        or values.shape[0] < row_ptr[-1] + 16
    ):
        raise ValueError("row_ptr and values do not match the mask")
    if nonzero[:, k:].any():
        raise ValueError("mask has bits set in the padding columns")
    out = np.zeros(nonzero.shape, dtype=np.int8)
    out[nonzero] = values[: row_ptr[-1]]
    return np.ascontiguousarray(out[:, :k])


def _shuffle_tables() -> tuple[np.ndarray, np.ndarray]:
    """pshufb controls indexed by a mask byte, as (ssse3, avx2) tables.

    ssse3 (256, 16): 8 int16 lanes; lane j's high byte takes the position of column j's value
    among the byte's set bits (0x80, a zero, where bit j is clear) and its low byte is zeroed,
    so an arithmetic shift right by 8 leaves the sign-extended weight.
    avx2 (512, 8): 8 int8 lanes holding the positions directly; entries 256-511 add 8, for
    the second mask byte of a 16-column step, whose values sit in bytes 8-15 of the source.
    """
    ssse3 = np.full((256, 16), 0x80, dtype=np.uint8)
    avx2 = np.full((2, 256, 8), 0x80, dtype=np.uint8)
    for m in range(256):
        rank = 0
        for j in range(8):
            if m >> j & 1:
                ssse3[m, 2 * j + 1] = rank
                avx2[0, m, j] = rank
                avx2[1, m, j] = rank + 8
                rank += 1
    return ssse3, avx2.reshape(512, 8)


_SHUFFLE_SSSE3, _SHUFFLE_AVX2 = _shuffle_tables()
# Steps per int32 accumulator flush: a lane collects two products a step, and 256 products of
# |w| <= 128 and |a| <= 32767 stay below 2**31.
BLOCK_STEPS = 128


def _declare(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(module, ir.FunctionType(ret, args), name)


def _emit_ssse3(builder, mask_rows, table, value_starts, a_rows, kp, ahead):
    """The SSSE3 loops over [0, kp) for a tile, 8 columns a step; int64 dots [row x token].

    `mask_rows` point at the rows' mask bytes, `value_starts` at their first values, `a_rows`
    at the padded int16 activation rows, `ahead` at the next tile's values and mask bytes
    (prefetched a line a step).
    """
    i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    v16 = ir.VectorType(i8, 16)
    a16 = ir.VectorType(i16, 8)
    i32v = ir.VectorType(i32, 4)
    zero = ir.Constant(i32v, None)
    module = builder.module
    shuffle = _declare(module, "llvm.x86.ssse3.pshuf.b.128", v16, [v16, v16])
    madd = _declare(module, "llvm.x86.sse2.pmadd.wd", i32v, [a16, a16])
    ctpop = _declare(module, "llvm.ctpop.i8", i8, [i8])
    prefetch = _declare(module, "llvm.prefetch.p0", ir.VoidType(), [i8.as_pointer()] + [i32] * 3)
    i64v = ir.VectorType(i64, 4)
    reduce_add = _declare(module, "llvm.vector.reduce.add.v4i64", i64, [i64v])
    tiles = len(mask_rows) * len(a_rows)

    def load16(ptr):
        return builder.load(builder.bitcast(ptr, v16.as_pointer()), align=1)

    entry = builder.block
    outer = builder.append_basic_block("sparse.block")
    inner = builder.append_basic_block("sparse.step")
    flush = builder.append_basic_block("sparse.flush")
    done = builder.append_basic_block("sparse.done")
    builder.cbranch(builder.icmp_signed(">", kp, i64(0)), outer, done)

    builder.position_at_end(outer)
    block_start = builder.phi(i64)
    block_values = [builder.phi(p.type) for p in value_starts]
    totals = [builder.phi(i64) for _ in range(tiles)]
    block_end = builder.add(block_start, i64(BLOCK_STEPS * 8))
    block_end = builder.select(builder.icmp_signed("<", block_end, kp), block_end, kp)
    builder.branch(inner)

    builder.position_at_end(inner)
    col = builder.phi(i64)
    value_at = [builder.phi(p.type) for p in value_starts]
    accs = [builder.phi(i32v) for _ in range(tiles)]
    acts = [
        builder.load(builder.bitcast(builder.gep(a, [col]), a16.as_pointer()), align=1)
        for a in a_rows
    ]
    byte = builder.lshr(col, i64(3))
    new_accs, next_values = [], []
    for r, mask_row in enumerate(mask_rows):
        bits = builder.load(builder.gep(mask_row, [byte]))
        control = load16(builder.gep(table, [builder.shl(builder.zext(bits, i64), i64(4))]))
        picked = builder.bitcast(builder.call(shuffle, [load16(value_at[r]), control]), a16)
        w16 = builder.ashr(picked, ir.Constant(a16, [8] * 8))
        next_values.append(
            builder.gep(value_at[r], [builder.zext(builder.call(ctpop, [bits]), i64)])
        )
        for t, act in enumerate(acts):
            acc = accs[r * len(a_rows) + t]
            new_accs.append(builder.add(acc, builder.call(madd, [w16, act])))
    ahead_values, ahead_mask = ahead
    for at in (
        builder.gep(ahead_values, [builder.shl(col, i64(3))]),
        builder.gep(ahead_mask, [builder.lshr(builder.mul(col, i64(len(mask_rows))), i64(3))]),
    ):
        builder.call(prefetch, [at, i32(0), i32(3), i32(1)])
    next_col = builder.add(col, i64(8))
    builder.cbranch(builder.icmp_signed("<", next_col, block_end), inner, flush)
    col.add_incoming(block_start, outer)
    col.add_incoming(next_col, inner)
    for phi, start, new in zip(value_at, block_values, next_values, strict=True):
        phi.add_incoming(start, outer)
        phi.add_incoming(new, inner)
    for acc, new in zip(accs, new_accs, strict=True):
        acc.add_incoming(zero, outer)
        acc.add_incoming(new, inner)

    builder.position_at_end(flush)
    new_totals = [
        builder.add(total, builder.call(reduce_add, [builder.sext(acc, i64v)]))
        for total, acc in zip(totals, new_accs, strict=True)
    ]
    builder.cbranch(builder.icmp_signed("<", block_end, kp), outer, done)
    block_start.add_incoming(i64(0), entry)
    block_start.add_incoming(block_end, flush)
    for phi, start, new in zip(block_values, value_starts, next_values, strict=True):
        phi.add_incoming(start, entry)
        phi.add_incoming(new, flush)
    for phi, new in zip(totals, new_totals, strict=True):
        phi.add_incoming(i64(0), entry)
        phi.add_incoming(new, flush)

    builder.position_at_end(done)
    dots = []
    for new in new_totals:
        dot = builder.phi(i64)
        dot.add_incoming(i64(0), entry)
        dot.add_incoming(new, flush)
        dots.append(dot)
    return dots


def _avx2_steps(rows: int, tokens: int) -> tuple[str, str]:
    """AT&T assembly and constraints for `count` AVX2 steps of a rows x tokens tile.

    A step expands 16 columns of each row: its two mask bytes pick two 8-byte pshufb controls
    from the table, the row's next values are loaded as two 8-byte halves (the second at the
    first byte's popcount), one 128-bit pshufb places them, vpmovsxbw widens them to int16 and
    vpmaddwd multiplies them with each token. Written out by hand: LLVM's register allocation
    of the same loop in IR spilled and copied registers, 20-22 instructions a row and step
    against these 14, and ran 15% slower.

    Operands: value pointers and int32 accumulators (in/out); mask offset, activation pointer,
    step count and prefetch pointer (in/out, advanced); scratch; then the inputs: mask row
    pointers, the table and, for two tokens, the byte stride between activation rows.
    """
    n_acc = rows * tokens
    vp = list(range(rows))
    acc = list(range(rows, rows + n_acc))
    idx, act, count, pf, tmp = range(rows + n_acc, rows + n_acc + 5)
    xc, xv, xw, xp = range(rows + n_acc + 5, rows + n_acc + 9)
    first_input = rows + n_acc + 9 + rows + n_acc + 4  # after the outputs and tied inputs
    mask = list(range(first_input, first_input + rows))
    table, stride = first_input + rows, first_input + rows + 1

    def reg(n: int, size: str = "q") -> str:
        return f"${{{n}:{size}}}"

    lines = ["1:"]
    for r in range(rows):
        lines += [
            f"movzbl ({reg(mask[r])},{reg(idx)}), {reg(tmp, 'k')}",
            f"vmovq ({reg(table)},{reg(tmp)},8), {reg(xc, 'x')}",
            f"vmovq ({reg(vp[r])}), {reg(xv, 'x')}",
            f"popcntq {reg(tmp)}, {reg(tmp)}",
            f"vmovhps ({reg(vp[r])},{reg(tmp)}), {reg(xv, 'x')}, {reg(xv, 'x')}",
            f"addq {reg(tmp)}, {reg(vp[r])}",
            f"movzbl 1({reg(mask[r])},{reg(idx)}), {reg(tmp, 'k')}",
            f"vmovhps 2048({reg(table)},{reg(tmp)},8), {reg(xc, 'x')}, {reg(xc, 'x')}",
            f"popcntq {reg(tmp)}, {reg(tmp)}",
            f"addq {reg(tmp)}, {reg(vp[r])}",
            f"vpshufb {reg(xc, 'x')}, {reg(xv, 'x')}, {reg(xv, 'x')}",
            f"vpmovsxbw {reg(xv, 'x')}, {reg(xw, 't')}",
        ]
        for t in range(tokens):
            src = f"({reg(act)})" if t == 0 else f"({reg(act)},{reg(stride)})"
            a = reg(acc[r * tokens + t], "t")
            lines += [
                f"vpmaddwd {src}, {reg(xw, 't')}, {reg(xp, 't')}",
                f"vpaddd {reg(xp, 't')}, {a}, {a}",
            ]
    # The next tile's values (a line a step) and mask bytes (2 * rows bytes a step, from the
    # tile's last row: the next `rows` rows are covered by the time this tile ends).
    lines += [
        f"prefetcht0 ({reg(pf)})",
        f"prefetcht0 ({reg(mask[-1])},{reg(idx)},{2 * rows})",
        f"addq $$64, {reg(pf)}",
        f"addq $$32, {reg(act)}",
        f"addq $$2, {reg(idx)}",
        f"decq {reg(count)}",
        "jnz 1b",
    ]
    outs = ["=r"] * rows + ["=x"] * n_acc + ["=r"] * 4 + ["=&r"] + ["=&x"] * 4
    tied = [str(i) for i in range(rows + n_acc + 4)]
    ins = ["r"] * (rows + 1) + (["r"] if tokens > 1 else [])
    constraints = ",".join(outs + tied + ins + ["~{cc}", "~{memory}"])
    # llvmlite writes the text into the IR as it is: "\0A" is the IR escape for a newline.
    return "\\0A".join(lines), constraints


def _emit_avx2(builder, mask_rows, table, value_starts, a_rows, kp, ahead):
    """`_emit_ssse3` for AVX2: blocks of BLOCK_STEPS 16-column steps run by `_avx2_steps`."""
    rows, tokens = len(mask_rows), len(a_rows)
    i64 = ir.IntType(64)
    i32v = ir.VectorType(ir.IntType(32), 8)
    zero = ir.Constant(i32v, None)
    text, constraints = _avx2_steps(rows, tokens)
    n_acc = rows * tokens
    out_types = [i64] * rows + [i32v] * n_acc + [i64] * 5 + [i32v] * 4
    in_types = [i64] * rows + [i32v] * n_acc + [i64] * (4 + rows + 1 + (tokens > 1))
    asm = ir.InlineAsm(
        ir.FunctionType(ir.LiteralStructType(out_types), in_types),
        text,
        constraints,
        side_effect=True,
    )
    i64v = ir.VectorType(i64, 8)
    reduce_add = _declare(builder.module, "llvm.vector.reduce.add.v8i64", i64, [i64v])

    def as_int(ptr):
        return builder.ptrtoint(ptr, i64)

    first_pf = as_int(ahead[0])
    first_vps = [as_int(v) for v in value_starts]
    mask_ints = [as_int(m) for m in mask_rows]
    table_int = as_int(table)
    entry = builder.block
    block = builder.append_basic_block("sparse.block")
    done = builder.append_basic_block("sparse.done")
    builder.cbranch(builder.icmp_signed(">", kp, i64(0)), block, done)

    builder.position_at_end(block)
    start = builder.phi(i64)
    pf = builder.phi(i64)
    vps = [builder.phi(i64) for _ in range(rows)]
    totals = [builder.phi(i64) for _ in range(n_acc)]
    left = builder.sub(kp, start)
    span = builder.select(
        builder.icmp_signed("<", left, i64(BLOCK_STEPS * 16)), left, i64(BLOCK_STEPS * 16)
    )
    args = vps + [zero] * n_acc
    args += [
        builder.lshr(start, i64(3)),
        as_int(builder.gep(a_rows[0], [start])),
        builder.lshr(span, i64(4)),
        pf,
    ]
    args += mask_ints + [table_int]
    if tokens > 1:
        args.append(builder.sub(as_int(a_rows[1]), as_int(a_rows[0])))
    result = builder.call(asm, args)
    new_vps = [builder.extract_value(result, r) for r in range(rows)]
    new_totals = []
    for i, total in enumerate(totals):
        acc = builder.sext(builder.extract_value(result, rows + i), i64v)
        new_totals.append(builder.add(total, builder.call(reduce_add, [acc])))
    new_pf = builder.extract_value(result, rows + n_acc + 3)
    end = builder.add(start, span)
    builder.cbranch(builder.icmp_signed("<", end, kp), block, done)
    start.add_incoming(i64(0), entry)
    start.add_incoming(end, block)
    pf.add_incoming(first_pf, entry)
    pf.add_incoming(new_pf, block)
    for phi, first, new in zip(vps, first_vps, new_vps, strict=True):
        phi.add_incoming(first, entry)
        phi.add_incoming(new, block)
    for phi, new in zip(totals, new_totals, strict=True):
        phi.add_incoming(i64(0), entry)
        phi.add_incoming(new, block)

    builder.position_at_end(done)
    dots = []
    for new in new_totals:
        dot = builder.phi(i64)
        dot.add_incoming(i64(0), entry)
        dot.add_incoming(new, block)
        dots.append(dot)
    return dots


def _row_pointer(builder, array, row, elem):
    """Pointer to array[row, 0] of a C-contiguous 2-D numba array."""
    row_stride = cgutils.unpack_tuple(builder, array.strides)[0]
    base = builder.bitcast(array.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(base, [builder.mul(row, row_stride)]), elem.as_pointer())


@intrinsic
def _simd_dot(typingctx, kind, rows, tokens, mask, values, table, a, r, t, row_ptr, sums):
    """sums[i, j] = exact dot of packed row r + i with activation row t + j (all KP columns).

    kind, rows and tokens are literals: each combination is its own unrolled loop.
    """
    for arg in (kind, rows, tokens):
        if not isinstance(arg, types.Literal):
            raise RequireLiteralValue(f"{arg} must be a literal")
    sig = types.none(kind, rows, tokens, mask, values, table, a, r, t, row_ptr, sums)
    emit = _emit_avx2 if kind.literal_value == "avx2" else _emit_ssse3
    n_rows, n_tokens = rows.literal_value, tokens.literal_value

    def codegen(context, builder, signature, args):
        mask_arr, values_arr, table_arr, a_arr, ptr_arr, sums_arr = (
            context.make_array(signature.args[i])(context, builder, args[i])
            for i in (3, 4, 5, 6, 9, 10)
        )
        r0, t0 = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (7, 8))
        i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
        values_ptr = builder.bitcast(values_arr.data, i8.as_pointer())
        ptr_base = builder.bitcast(ptr_arr.data, i64.as_pointer())

        def values_of(row):
            return builder.gep(values_ptr, [builder.load(builder.gep(ptr_base, [row]))])

        rows_at = [builder.add(r0, i64(i)) for i in range(n_rows)]
        next_row = builder.add(r0, i64(n_rows))
        dots = emit(
            builder,
            [_row_pointer(builder, mask_arr, row, i8) for row in rows_at],
            builder.bitcast(table_arr.data, i8.as_pointer()),
            [values_of(row) for row in rows_at],
            [_row_pointer(builder, a_arr, builder.add(t0, i64(j)), i16) for j in range(n_tokens)],
            builder.mul(cgutils.unpack_tuple(builder, mask_arr.shape)[1], i64(8)),
            [values_of(next_row), _row_pointer(builder, mask_arr, next_row, i8)],
        )
        sums_base = builder.bitcast(sums_arr.data, i64.as_pointer())
        for idx, dot in enumerate(dots):
            builder.store(dot, builder.gep(sums_base, [i64(idx)]))
        return context.get_dummy_value()

    return sig, codegen


def _dot(kind, rows, tokens, mask, values, a, r, t, row_ptr, sums):
    """Typing stub: the kernels' tile dot, resolved per literal kind by the overload below."""


@njit(cache=True)
def _portable_dot(mask, values, a, r, t, row_ptr, sums) -> None:
    """The tile dot in plain loops, for CPUs without a byte shuffle."""
    rows, tokens = sums.shape
    for i in range(rows):
        p = row_ptr[r + i]
        for j in range(tokens):
            sums[i, j] = 0
        for byte in range(mask.shape[1]):
            bits = mask[r + i, byte]
            for b in range(8):
                if bits >> b & 1:
                    v = np.int64(values[p])
                    p += 1
                    for j in range(tokens):
                        sums[i, j] += v * a[t + j, byte * 8 + b]


@overload(_dot, jit_options={"cache": True})
def _dot_impl(kind, rows, tokens, mask, values, a, r, t, row_ptr, sums):
    if not isinstance(kind, types.StringLiteral):
        raise RequireLiteralValue("kind must be a literal")
    if kind.literal_value == "portable":

        def portable(kind, rows, tokens, mask, values, a, r, t, row_ptr, sums):
            _portable_dot(mask, values, a, r, t, row_ptr, sums)

        return portable
    table = _SHUFFLE_AVX2 if kind.literal_value == "avx2" else _SHUFFLE_SSSE3

    def simd(kind, rows, tokens, mask, values, a, r, t, row_ptr, sums):
        _simd_dot(kind, rows, tokens, mask, values, table, a, r, t, row_ptr, sums)

    return simd


@njit(cache=True, parallel=True, fastmath=True)
def _sparse_matmul(x, mask, values, row_ptr, scale, kind, out, padded, a_scale):
    """The kernel for one shuffle kind: a literal, so each kind compiles its own loops.

    Activations are quantized into padded (T, KP) int16 and a_scale (T,), scratch; the
    columns past K are zeroed. Rows go in jobs of JOB_ROWS across cores; within a job,
    TILE_ROWS rows are expanded together for an odd token and PAIR_ROWS rows for each pair of
    tokens, so several tokens share one expansion.
    """
    tokens, k = x.shape
    n, kp = mask.shape[0], mask.shape[1] * 8
    if padded.shape[0] != tokens or padded.shape[1] != kp or out.shape != (tokens, n):
        raise ValueError("padded must be (T, KP) and out (T, N)")
    quantize_rows_into(x, INT16_MAX, padded, a_scale)
    padded[:, k:] = 0
    for job in prange((n + JOB_ROWS - 1) // JOB_ROWS):
        quad = stack_tile(TILE_ROWS, 1)
        pairs = stack_tile(PAIR_ROWS, 2)
        pair = stack_tile(1, 2)
        one = stack_tile(1, 1)
        r = job * JOB_ROWS
        end = min(r + JOB_ROWS, n)
        while r < end:
            if r + TILE_ROWS <= end:
                for t in range(0, tokens - 1, 2):
                    for rr in range(r, r + TILE_ROWS, PAIR_ROWS):
                        _dot(kind, PAIR_ROWS, 2, mask, values, padded, rr, t, row_ptr, pairs)
                        _store_tile(pairs, rr, t, a_scale, scale, out, False)
                if tokens % 2:
                    _dot(kind, TILE_ROWS, 1, mask, values, padded, r, tokens - 1, row_ptr, quad)
                    _store_tile(quad, r, tokens - 1, a_scale, scale, out, False)
                r += TILE_ROWS
            else:
                for t in range(0, tokens - 1, 2):
                    _dot(kind, 1, 2, mask, values, padded, r, t, row_ptr, pair)
                    _store_tile(pair, r, t, a_scale, scale, out, False)
                if tokens % 2:
                    _dot(kind, 1, 1, mask, values, padded, r, tokens - 1, row_ptr, one)
                    _store_tile(one, r, tokens - 1, a_scale, scale, out, False)
                r += 1


# One entry point per kind with the kind as a constant: a kind passed from Python would be
# typed as a plain string, and numba's literal dispatch (`literally`) costs 0.2 s a call.
@njit(cache=True)
def _matmul_avx2(x, mask, values, row_ptr, scale, out, padded, a_scale):
    _sparse_matmul(x, mask, values, row_ptr, scale, "avx2", out, padded, a_scale)


@njit(cache=True)
def _matmul_ssse3(x, mask, values, row_ptr, scale, out, padded, a_scale):
    _sparse_matmul(x, mask, values, row_ptr, scale, "ssse3", out, padded, a_scale)


@njit(cache=True)
def _matmul_portable(x, mask, values, row_ptr, scale, out, padded, a_scale):
    _sparse_matmul(x, mask, values, row_ptr, scale, "portable", out, padded, a_scale)


_MATMULS = {"avx2": _matmul_avx2, "ssse3": _matmul_ssse3, "portable": _matmul_portable}


def sparse_matmul_w8(
    x: np.ndarray,
    mask: np.ndarray,
    values: np.ndarray,
    row_ptr: np.ndarray,
    scale: np.ndarray,
    k: int,
    kind: str = KIND,
    *,
    out: np.ndarray | None = None,
    act: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """x (T, k) float32 @ (W * scale[:, None]).T -> (T, N) float32 for a packed int8 W.

    Bit-identical to `gemv_w8(x, W, scale)`. `kind` picks the path (default: the host's; a
    kind the CPU lacks would crash it). The result goes into `out` (T, N) if given; `act`,
    scratch for the quantized activations, is (int16 (T, KP), float32 (T,)) with KP =
    padded_columns(k), allocated here if not given.
    """
    if x.ndim != 2 or x.shape[1] != k or mask.shape[1] * 8 != padded_columns(k):
        raise ValueError(f"x {x.shape} and mask {mask.shape} do not fit {k} columns")
    if scale.shape != (mask.shape[0],) or row_ptr.shape != (mask.shape[0] + 1,):
        raise ValueError("scale and row_ptr must have one entry per row (row_ptr one more)")
    tokens = x.shape[0]
    if out is None:
        out = np.empty((tokens, mask.shape[0]), dtype=np.float32)
    if act is None:
        act = (
            np.empty((tokens, padded_columns(k)), dtype=np.int16),
            np.empty(tokens, dtype=np.float32),
        )
    _MATMULS[kind](x, mask, values, row_ptr, scale, out, *act)
    return out
