"""Int8 GEMV that skips the weight columns whose input is zero: TEAL activation sparsity.

At a linear layer's input, entries with |x| <= threshold count as zero (TEAL picks the
threshold per layer so that a chosen fraction of them does). An input that is zero for every
token multiplies a whole column of the (N, K) weight by zero, so that column need not be
read. For a skipped column to be bytes not fetched it must be contiguous: the int8 weight is
stored input-major, `wt` (K, N) = W.T, and row k of `wt` holds input k's weight for every
output. Decode is memory-bound (see matmul_int8), so reading 60% of the rows takes about 60%
of the time.

The kernel compacts the kept inputs once per call (their indices and values, zero where a
token drops an input the others keep), then splits the kept rows, in blocks of ROW_BLOCK,
evenly across the cores. Each core accumulates every output in its own float32 partial
(T, N): for a block it sweeps the columns in register tiles, reading the block's rows as
ROW_BLOCK sequential streams and keeping a tile's accumulators in registers across the
block, so the partial goes through L1/L2 once per block rather than once per row. The
partials are summed and scaled by `scale` at the end. Splitting the kept rows rather than
the outputs keeps each stream a whole row long: with the outputs split, every row is cut
into short pieces whose starts the hardware prefetcher misses.

With several tokens an input is skipped only if every token drops it, so the savings shrink
with the batch (at 40% independent zeros per token, 4 tokens skip 3% of the rows) and the
FMAs, four per 8 weights, make T = 4 compute-bound: 0.75-0.95x the speed of
matmul_int8.gemv_w8. This kernel is for decode, T = 1 (or a few tokens with correlated
sparsity), on layers with thousands of outputs: below that, its fixed cost per call (about
10 us: compaction, partials, two parallel regions) outweighs the bytes saved (N = 576:
0.55-0.7x of gemv_w8 at 0-50% zeros).

Two measured details (Zen 3, 2 cores, weights streaming from DRAM):
- The hardware prefetcher stops at 4 KiB pages and restarts on each new row, which costs
  most when rows are one page long (N = 4096). The tile loop prefetches PREFETCH bytes
  ahead in each row and, near its end, the same distance into the next block's rows: 5-10%
  at 40% zeros. Prefetching whole blocks ahead, or in row order, was slower.
- `to_input_major` starts the array on a page; with numpy's usual 16-byte offset and
  N = 4096 the last bytes of each row lie on the next row's page, which then has to be
  mapped and (when that row is skipped) fetched for one line: about 5% at 40% zeros.
Even so, skipping 40% of 4 KiB rows at random reads memory at about 75% of the rate of a
sequential pass here (a kernel that only XORs the kept rows does no better), so the gain on
N = 4096 layers is smaller than on wide ones.

Arithmetic is float32 FMA on int8 weights converted to float (sign-extending load, convert,
fused multiply-add: three instructions per 8 weights), not int16 pmaddwd on pairs of rows
(about 20% fewer instructions per weight). At T = 1 the kernel waits on memory: a variant
with most of the arithmetic replaced by XORs of the loaded bytes ran within 5% of it. The
float path needs no activation quantization, so the result is exact up to float32
summation, and its vector IR is plain LLVM (sext, sitofp, fmuladd, prefetch), which any
target lowers, so there is no separate portable path.

Rounding: each core sums its rows in order, then the partials are added, so the float32
rounding (not the exact value) depends on the thread count and, with several tokens, on
which rows the other tokens keep.
"""

from collections.abc import Callable

import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.rows import page_aligned_empty

# float32 lanes per vector (one AVX2 register; LLVM splits or merges it for other targets).
WIDTH = 8
# Kept rows per block: the streams a core reads at once.
ROW_BLOCK = 6
# Bytes ahead of the current column that each row stream prefetches.
PREFETCH = 1024
# Tokens per tile (more are taken in groups), and vectors per tile row for each group size:
# accumulators (tokens * vectors) stay within the 16 AVX2 registers with room for the weights.
MAX_TOKENS = 4
VECTORS = (8, 4, 2, 2)

# Hands out a kernel's working arrays by (name, shape, dtype); see colskip_matmul_w8.
Scratch = Callable[[str, tuple[int, ...], type], np.ndarray]


def to_input_major(w: np.ndarray) -> np.ndarray:
    """int8 (N, K) weight -> C-contiguous int8 (K, N), the layout colskip_matmul_w8 reads.

    The array starts on a page boundary (see the module notes).
    """
    if w.dtype != np.int8 or w.ndim != 2:
        raise ValueError(f"expected a 2-D int8 weight, got {w.dtype} with shape {w.shape}")
    wt = page_aligned_empty((w.shape[1], w.shape[0]), np.int8)
    wt[...] = w.T
    return wt


def _strip_intrinsic(rows: int, tokens: int, vectors: int, prefetch: bool):
    """An intrinsic strip(out, wt, idx, xv, i0, t0, c0, c1) for one block of kept rows.

    For g < tokens and c in [c0, c1), a multiple of vectors * WIDTH columns:
    out[t0 + g, c] += sum over r < rows of xv[t0 + g, i0 + r] * wt[idx[i0 + r], c],
    summed in r order with fused multiply-adds where the target has them. With `prefetch`,
    each row asks for the line min(PREFETCH, N) bytes ahead, or past its end the matching
    line of row idx[i0 + rows + r] (the next block), so idx must hold rows more entries.
    """
    f32 = ir.FloatType()
    f32v = ir.VectorType(f32, WIDTH)
    i8v = ir.VectorType(ir.IntType(8), WIDTH)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    splat = ir.Constant(ir.VectorType(i32, WIDTH), None)

    @intrinsic
    def strip(typingctx, out, wt, idx, xv, i0, t0, c0, c1):
        sig = types.none(out, wt, idx, xv, i0, t0, c0, c1)

        def codegen(context, builder, signature, args):
            out_a, wt_a, idx_a, xv_a = (
                context.make_array(signature.args[i])(context, builder, args[i]) for i in range(4)
            )
            first, tok, lo, hi = (
                context.cast(builder, args[i], signature.args[i], types.intp) for i in range(4, 8)
            )
            intp = lo.type

            def const(v):
                return ir.Constant(intp, v)

            def row_of(i):
                k = builder.load(builder.gep(idx_a.data, [i]))
                k = context.cast(builder, k, signature.args[2].dtype, types.intp)
                return builder.gep(wt_base, [builder.mul(k, wt_stride)])

            def f32_row(array, row):
                base = builder.bitcast(array.data, i8p)
                stride = cgutils.unpack_tuple(builder, array.strides)[0]
                return builder.bitcast(
                    builder.gep(base, [builder.mul(row, stride)]), f32.as_pointer()
                )

            module = builder.module
            fmuladd = cgutils.get_or_insert_function(
                module, ir.FunctionType(f32v, [f32v] * 3), f"llvm.fmuladd.v{WIDTH}f32"
            )
            prefetch_fn = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
            )
            wt_base = builder.bitcast(wt_a.data, i8p)
            wt_stride = cgutils.unpack_tuple(builder, wt_a.strides)[0]
            n = cgutils.unpack_tuple(builder, wt_a.shape)[1]
            w_rows, next_rows, x_bcast = [], [], []
            for r in range(rows):
                i = builder.add(first, const(r))
                w_rows.append(row_of(i))
                if prefetch:
                    next_rows.append(row_of(builder.add(i, const(rows))))
                x_bcast.append([])
                for g in range(tokens):
                    x_row = f32_row(xv_a, builder.add(tok, const(g)))
                    xg = builder.load(builder.gep(x_row, [i]))
                    xg = builder.insert_element(ir.Constant(f32v, None), xg, i32(0))
                    x_bcast[r].append(builder.shuffle_vector(xg, xg, splat))
            out_rows = [f32_row(out_a, builder.add(tok, const(g))) for g in range(tokens)]

            width = vectors * WIDTH

            def sweep(start, stop, ahead):
                """Tiles at columns [start, stop); row r prefetches ahead[r] + column."""
                entry = builder.block
                loop = builder.append_basic_block("strip.loop")
                done = builder.append_basic_block("strip.done")
                builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)
                builder.position_at_end(loop)
                c = builder.phi(intp)
                acc_ptrs = [
                    [
                        builder.bitcast(
                            builder.gep(out_rows[g], [builder.add(c, const(v * WIDTH))]),
                            f32v.as_pointer(),
                        )
                        for v in range(vectors)
                    ]
                    for g in range(tokens)
                ]
                accs = [[builder.load(p, align=4) for p in ptrs] for ptrs in acc_ptrs]
                for r in range(rows):
                    if ahead:
                        # Read access, locality 2 (keep in L2), data cache.
                        target = builder.gep(ahead[r], [c])
                        builder.call(prefetch_fn, [target, i32(0), i32(2), i32(1)])
                    for v in range(vectors):
                        ptr = builder.gep(w_rows[r], [builder.add(c, const(v * WIDTH))])
                        raw = builder.load(builder.bitcast(ptr, i8v.as_pointer()), align=1)
                        w = builder.sitofp(raw, f32v)
                        for g in range(tokens):
                            accs[g][v] = builder.call(fmuladd, [w, x_bcast[r][g], accs[g][v]])
                for g in range(tokens):
                    for v in range(vectors):
                        builder.store(accs[g][v], acc_ptrs[g][v], align=4)
                step = builder.add(c, const(width))
                body_end = builder.block
                builder.cbranch(builder.icmp_signed("<", step, stop), loop, done)
                c.add_incoming(start, entry)
                c.add_incoming(step, body_end)
                builder.position_at_end(done)

            if not prefetch:
                sweep(lo, hi, None)
            else:
                # Rows shorter than PREFETCH prefetch the next block's line at the same column.
                dist = builder.select(
                    builder.icmp_signed("<", n, const(PREFETCH)), n, const(PREFETCH)
                )
                # Split where the prefetch passes the row's end, on a tile boundary, so that
                # neither loop chooses its prefetch address per row and tile.
                split = builder.sub(n, dist)
                split = builder.select(builder.icmp_signed("<", split, lo), lo, split)
                split = builder.select(builder.icmp_signed(">", split, hi), hi, split)
                tiles = builder.sdiv(
                    builder.add(builder.sub(split, lo), const(width - 1)), const(width)
                )
                split = builder.add(lo, builder.mul(tiles, const(width)))
                sweep(lo, split, [builder.gep(p, [dist]) for p in w_rows])
                past = builder.sub(dist, n)
                sweep(split, hi, [builder.gep(p, [past]) for p in next_rows])
            return context.get_dummy_value()

        return sig, codegen

    return strip


# Wide tiles with prefetch for the bulk of the columns, one-vector tiles for the rest.
_wide = [_strip_intrinsic(ROW_BLOCK, g, VECTORS[g - 1], True) for g in range(1, MAX_TOKENS + 1)]
_narrow = [_strip_intrinsic(ROW_BLOCK, g, 1, False) for g in range(1, MAX_TOKENS + 1)]
_wide1, _wide2, _wide3, _wide4 = _wide
_narrow1, _narrow2, _narrow3, _narrow4 = _narrow


@njit(cache=True)
def compact_size(k: int) -> int:
    """Entries of `_compact`'s idx and of each xv row for K inputs: whole blocks, plus one
    block for the prefetch of "the next block" past the last."""
    return ((k + ROW_BLOCK - 1) // ROW_BLOCK + 1) * ROW_BLOCK


@njit(cache=True)
def _compact_into(x, threshold, keep, idx, xv) -> int:
    """Indices of the inputs some token keeps and their values, padded for whole blocks.

    Fills idx (compact_size(K),) and xv (T, compact_size(K)), using keep (K,) uint8 as
    scratch, and returns how many inputs are kept. xv[t, i] is x[t, idx[i]], or 0 where
    token t drops it. Past `count` the index repeats the last kept row and the values are 0,
    so a partial last block adds exact zeros and the prefetch of "the next block" reads a
    row already fetched. `not (|x| <= threshold)` keeps NaN inputs, so they propagate as
    they would through the dense product.
    Three branch-free passes (mask, indices, values), each with the token loop outside:
    one pass with the token loop inside and data-dependent branches took 3.5x as long at
    T = 1 (33 us at K = 11008, 3% of a 40%-sparse 11008 x 4096 GEMV, one core idle) and 5x
    at T = 4.
    """
    tokens, k = x.shape
    size = compact_size(k)
    if keep.shape[0] != k or idx.shape[0] != size or xv.shape != (tokens, size):
        raise ValueError("keep, idx or xv does not fit x")
    thr = np.float32(threshold)
    keep[:] = 0
    for t in range(tokens):
        for col in range(k):
            keep[col] |= not (abs(x[t, col]) <= thr)
    count = 0
    for col in range(k):
        idx[count] = col
        count += keep[col]
    idx[count:] = idx[count - 1] if count > 0 else 0
    for t in range(tokens):
        for i in range(count):
            v = x[t, idx[i]]
            xv[t, i] = v if not (abs(v) <= thr) else np.float32(0.0)
        xv[t, count:] = 0
    return count


@njit(cache=True)
def _compact(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """`_compact_into` into new arrays: (idx, xv, count)."""
    tokens, k = x.shape
    size = compact_size(k)
    idx = np.empty(size, dtype=np.intp)
    xv = np.empty((tokens, size), dtype=np.float32)
    count = _compact_into(x, threshold, np.empty(k, dtype=np.uint8), idx, xv)
    return idx, xv, count


@njit(cache=True, inline="always")
def _block(part, wt, idx, xv, i0, t0, group) -> None:
    """Add one block of kept rows times tokens t0 .. t0 + group into `part`."""
    n = wt.shape[1]
    wide = n - n % (WIDTH * VECTORS[group - 1])
    narrow = n - n % WIDTH
    if group == 1:
        _wide1(part, wt, idx, xv, i0, t0, 0, wide)
        _narrow1(part, wt, idx, xv, i0, t0, wide, narrow)
    elif group == 2:
        _wide2(part, wt, idx, xv, i0, t0, 0, wide)
        _narrow2(part, wt, idx, xv, i0, t0, wide, narrow)
    elif group == 3:
        _wide3(part, wt, idx, xv, i0, t0, 0, wide)
        _narrow3(part, wt, idx, xv, i0, t0, wide, narrow)
    else:
        _wide4(part, wt, idx, xv, i0, t0, 0, wide)
        _narrow4(part, wt, idx, xv, i0, t0, wide, narrow)
    for col in range(narrow, n):
        for t in range(t0, t0 + group):
            acc = part[t, col]
            for i in range(i0, i0 + ROW_BLOCK):
                acc += xv[t, i] * np.float32(wt[idx[i], col])
            part[t, col] = acc


@njit(cache=True, parallel=True)
def _colskip(x, wt, scale, threshold, out, keep, idx, xv, parts):
    """colskip_matmul_w8 with the kept rows split into len(parts) jobs, one partial each."""
    tokens = x.shape[0]
    n = wt.shape[1]
    if parts.shape[0] < 1 or parts.shape[1:] != (tokens, n) or out.shape != (tokens, n):
        raise ValueError("parts must be (jobs, T, N) and out (T, N)")
    count = _compact_into(x, threshold, keep, idx, xv)
    blocks = (count + ROW_BLOCK - 1) // ROW_BLOCK
    jobs = max(1, min(parts.shape[0], blocks))
    for job in prange(jobs):
        part = parts[job]
        part[:] = 0
        for b in range(job * blocks // jobs, (job + 1) * blocks // jobs):
            for t0 in range(0, tokens, MAX_TOKENS):
                _block(part, wt, idx, xv, b * ROW_BLOCK, t0, min(MAX_TOKENS, tokens - t0))
    chunk = 1024
    for c in prange((n + chunk - 1) // chunk):
        for t in range(tokens):
            for col in range(c * chunk, min(n, (c + 1) * chunk)):
                acc = parts[0, t, col]
                for job in range(1, jobs):
                    acc += parts[job, t, col]
                out[t, col] = acc * scale[col]


def colskip_matmul_w8(
    x: np.ndarray,
    wt: np.ndarray,
    scale: np.ndarray,
    threshold: float,
    *,
    out: np.ndarray | None = None,
    scratch: Scratch | None = None,
) -> np.ndarray:
    """xs (T, K) float32 @ (W * scale[:, None]).T -> (T, N) float32, skipping zero inputs.

    `wt` is the input-major int8 weight (K, N) = W.T (see to_input_major) and `scale` (N,)
    the float32 scale of each output. xs is x with every entry |x[t, k]| <= threshold set to
    0 (threshold 0.0 skips exact zeros only); row k of `wt` is read only if some token keeps
    input k. The result goes into `out` (T, N) if given. `scratch(name, shape, dtype)` hands
    out the working arrays (compacted inputs, one partial output per thread); by default
    they are new. A Python wrapper because the row split needs numba's thread count, which a
    cached njit function cannot read; it also checks the layout the SIMD loop relies on.
    """
    if wt.dtype != np.int8 or wt.ndim != 2 or wt.strides[1] != 1:
        raise ValueError("wt must be a 2-D int8 array with contiguous rows (see to_input_major)")
    if x.ndim != 2 or x.shape[1] != wt.shape[0] or scale.shape != (wt.shape[1],):
        raise ValueError(
            f"shapes do not match: x {x.shape}, wt {wt.shape} (K, N), scale {scale.shape}"
        )
    (tokens, k), n = x.shape, wt.shape[1]
    if out is None:
        out = np.empty((tokens, n), dtype=np.float32)
    elif out.shape != (tokens, n) or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 {(tokens, n)} array")
    take = scratch or _new_array
    size = compact_size(k)
    _colskip(
        x,
        wt,
        scale,
        threshold,
        out,
        take("colskip.keep", (k,), np.uint8),
        take("colskip.idx", (size,), np.intp),
        take("colskip.xv", (tokens, size), np.float32),
        # One partial per thread numba may run, not per thread running now: the split decides
        # how the float sums group, and the engine changes the running count with the load.
        take("colskip.parts", (config.NUMBA_NUM_THREADS, tokens, n), np.float32),
    )
    return out


def _new_array(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.empty(shape, dtype=dtype)
