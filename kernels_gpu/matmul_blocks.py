"""Matmuls and row lookups on group-quantised weights (4-, 6- and 8-bit values with per-group
factors), read in the CPU's layout as they are loaded: w = d * (q - zero) + m per group.

The layout (kernels_cpu.simd_blocks) interleaves rows 16 at a time. Per 32-input block of a
16-row group, 4-bit values are 4 steps x 16 rows x one int32 word: the word of (step p, row
r) holds inputs 4p..4p+3 of r in its low nibbles and 4p+16..4p+19 in its high ones; 6-bit
values add 2 x 16 words of their top two bits; 8-bit values are 8 steps of 16 words. So 16
threads on the 16 rows of a group read 64 contiguous bytes per load.

The arithmetic is the CPU's (and llama.cpp's): the activations are quantised per 32 inputs
to int8 (norms.quantize_blocks, with its rmsnorm or gate prologue), each block's dot is an
exact integer, scaled by d times the block's activation scale into a float32 sum by fused
multiply-adds, plus m times the block's activation sum.

- Decode (`_gemv_blocks`, up to GEMV_MAX_TOKENS tokens): a block of 16 rows x SLOTS threads
  per row group; thread slot j sums blocks j, j + SLOTS, ... of its row, and the slots'
  sums are added in slot order. The whole GPU reads each weight byte once with
  16 x SLOTS loads in flight per group.
- Prefill (`_gemm_blocks`): a thread per (row, token), weights shared through the caches,
  summing blocks into the same SLOTS partials in the same order, so a token's outputs have
  the same bits whether it was decoded alone or in a prompt (the CPU's sums run in one
  chain over the blocks instead, so the devices differ by float rounding).
"""

from __future__ import annotations

import numpy as np
from kernels_cpu.matmul_blocks import activation_shapes, padded_inputs
from kernels_cpu.simd_blocks import ROWS, SUPER
from numba import cuda, float32, int32

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, empty, no_scale, result
from kernels_gpu.matmul_f32 import GEMV_MAX_TOKENS, TOKENS, _epilogue, signed_byte
from kernels_gpu.norms import BLOCK, PLAIN, quantize_blocks

SLOTS = 8  # partial sums per (row, token): a GEMV block's threads per row
GEMM_TOKENS = 16  # tokens per GEMM block, beside its 16 rows


@cuda.jit(device=True)
def _factor(arr, sup, g, r, gi, group):
    """Row r of group g's factor for input group gi: arr's (float32, float16, or an integer
    sub-factor), times its super-block's float16 `sup` when given."""
    value = float32(arr[g, gi * ROWS + r])
    if sup.size > 0:
        value = float32(sup[g, (gi * group // SUPER) * ROWS + r]) * value
    return value


@cuda.jit(device=True)
def _block_dots(w, high, bits, g, r, b, xq, t):
    """Exact integer dots of block b of row r of group g with token t's int8 inputs
    (xq as int32 words), over the block's first 16 inputs and its last 16."""
    first = int32(0)
    second = int32(0)
    if bits == 8:
        for s in range(8):
            word = w[g, (b * 8 + s) * ROWS + r]
            xw = xq[t, b * 8 + s]
            dot = int32(0)
            for y in range(4):
                dot += signed_byte(word, y) * signed_byte(xw, y)
            if s < 4:
                first += dot
            else:
                second += dot
        return first, second
    for p in range(4):
        word = w[g, (b * 4 + p) * ROWS + r]
        x_low = xq[t, b * 8 + p]
        x_high = xq[t, b * 8 + p + 4]
        plane = high[g, (b * 2 + p % 2) * ROWS + r] if bits == 6 else int32(0)
        for y in range(4):
            q_low = (word >> (8 * y)) & 15
            q_high = (word >> (8 * y + 4)) & 15
            if bits == 6:
                q_low |= ((plane >> (8 * y + 2 * (p // 2))) & 3) << 4
                q_high |= ((plane >> (8 * y + 2 * (p // 2) + 4)) & 3) << 4
            first += int32(q_low) * signed_byte(x_low, y)
            second += int32(q_high) * signed_byte(x_high, y)
    return first, second


@cuda.jit(device=True)
def _value(w, high, bits, g, r, i):
    """The integer q of input i of row r of group g."""
    b = i // BLOCK
    step = (i % BLOCK) // 4
    y = i % 4
    if bits == 8:
        return signed_byte(w[g, (b * 8 + step) * ROWS + r], y)
    word = w[g, (b * 4 + step % 4) * ROWS + r]
    q = (word >> (8 * y + (4 if step >= 4 else 0))) & 15
    if bits == 6:
        plane = high[g, (b * 2 + step % 2) * ROWS + r]
        q |= ((plane >> (8 * y + 2 * (step // 2))) & 3) << 4
    return int32(q)


@cuda.jit(device=True)
def _add_block(acc, w, high, bits, scale, scale_sup, mins, mins_sup, group, zero, g, r, b,
               xq, xsum, xs, xm, t):  # fmt: skip
    """acc plus token t's share of block b of row (g, r)."""
    first, second = _block_dots(w, high, bits, g, r, b, xq, t)
    s = xs[t, b]
    if group == 16:  # a factor per 16 inputs: the halves scale apart
        d0 = _factor(scale, scale_sup, g, r, 2 * b, group)
        d1 = _factor(scale, scale_sup, g, r, 2 * b + 1, group)
        acc = cuda.fma(float32(first - zero * xsum[t, 2 * b]), d0 * s, acc)
        acc = cuda.fma(float32(second - zero * xsum[t, 2 * b + 1]), d1 * s, acc)
        if mins.size > 0:
            m0 = _factor(mins, mins_sup, g, r, 2 * b, group)
            m1 = _factor(mins, mins_sup, g, r, 2 * b + 1, group)
            acc = cuda.fma(m0, xm[t, 2 * b], acc)
            acc = cuda.fma(m1, xm[t, 2 * b + 1], acc)
        return acc
    gi = b // (group // BLOCK)
    d = _factor(scale, scale_sup, g, r, gi, group)
    dot = first + second - zero * (xsum[t, 2 * b] + xsum[t, 2 * b + 1])
    acc = cuda.fma(float32(dot), d * s, acc)
    if mins.size > 0:
        m = _factor(mins, mins_sup, g, r, gi, group)
        acc = cuda.fma(m, xm[t, 2 * b] + xm[t, 2 * b + 1], acc)
    return acc


@cuda.jit(cache=True)
def _gemv_blocks(
    w,
    high,
    bits,
    scale,
    scale_sup,
    mins,
    mins_sup,
    group,
    zero,
    xq,
    xsum,
    xs,
    xm,
    bias,
    out,
    accumulate,
):
    """Block (ROWS, SLOTS) per row group: thread (r, j) sums blocks j, j + SLOTS, ... of
    row r for TOKENS tokens at a time; the slots' sums meet in shared memory, in order."""
    weight = (w, high, bits, scale, scale_sup, mins, mins_sup, group, zero)
    r = cuda.threadIdx.x
    j = cuda.threadIdx.y
    g = cuda.blockIdx.x
    row = g * ROWS + r
    tokens, n = out.shape
    blocks = xs.shape[1]
    part = cuda.shared.array((SLOTS, TOKENS, ROWS), float32)
    acc = cuda.local.array(TOKENS, float32)
    for t0 in range(0, tokens, TOKENS):
        nt = TOKENS if tokens - t0 > TOKENS else tokens - t0
        for u in range(TOKENS):
            acc[u] = float32(0)
        for b in range(j, blocks, SLOTS):
            for u in range(nt):
                acc[u] = _add_block(acc[u], *weight, g, r, b, xq, xsum, xs, xm, t0 + u)
        cuda.syncthreads()  # the previous tokens' sums were read
        for u in range(TOKENS):
            part[j, u, r] = acc[u]
        cuda.syncthreads()
        if j < nt and row < n:
            total = part[0, j, r]
            for i in range(1, SLOTS):
                total += part[i, j, r]
            _epilogue(total, t0 + j, row, bias, out, accumulate)


@cuda.jit(cache=True)
def _gemm_blocks(
    w,
    high,
    bits,
    scale,
    scale_sup,
    mins,
    mins_sup,
    group,
    zero,
    xq,
    xsum,
    xs,
    xm,
    bias,
    out,
    accumulate,
):
    """Block (ROWS, GEMM_TOKENS): a thread per (row, token), its blocks summed into the
    GEMV's SLOTS partials (block b into b % SLOTS) and those added in the same order."""
    weight = (w, high, bits, scale, scale_sup, mins, mins_sup, group, zero)
    r = cuda.threadIdx.x
    g = cuda.blockIdx.x
    t = cuda.blockIdx.y * GEMM_TOKENS + cuda.threadIdx.y
    row = g * ROWS + r
    tokens, n = out.shape
    if t >= tokens:
        return
    acc = cuda.local.array(SLOTS, float32)
    for j in range(SLOTS):
        acc[j] = float32(0)
    for b in range(xs.shape[1]):
        acc[b % SLOTS] = _add_block(acc[b % SLOTS], *weight, g, r, b, xq, xsum, xs, xm, t)
    if row < n:
        total = acc[0]
        for j in range(1, SLOTS):
            total += acc[j]
        _epilogue(total, t, row, bias, out, accumulate)


@cuda.jit(cache=True)
def _block_rows(w, high, bits, scale, scale_sup, mins, mins_sup, group, zero, ids, out):
    """Grid-stride over out (T, K): out[t, i] = d * (q - zero) + m of row ids[t], in the
    GGUF dequantisers' order."""
    tokens, k = out.shape
    start = cuda.grid(1)
    for e in range(start, tokens * k, cuda.gridsize(1)):
        t = e // k
        i = e % k
        g = ids[t] // ROWS
        r = ids[t] % ROWS
        d = _factor(scale, scale_sup, g, r, i // group, group)
        value = d * float32(_value(w, high, bits, g, r, i) - zero)
        if mins.size > 0:
            value += _factor(mins, mins_sup, g, r, i // group, group)
        out[t, i] = value


def _operands(blocks: tuple) -> tuple:
    """The kernels' weight operands from (values, high, scale, scale_sup, mins, mins_sup,
    group, zero): values and high as int32 words, the bits per value, float16 bits as
    float16, and typed empty arrays for the absent ones (a kernel takes no None)."""
    values, high, scale, scale_sup, mins, mins_sup, group, zero = blocks
    if values.dtype not in (np.uint8, np.int8) or values.shape[1] % 4:
        raise ValueError("block values must be uint8 or int8 rows of whole int32 words")
    bits = 8 if values.dtype == np.int8 else 4 if high is None else 6
    high = empty(2, np.int32) if high is None else high.view(np.int32)

    def factors(a):
        if a is None:
            return empty(2)
        return a.view(np.float16) if a.dtype == np.uint16 else a

    return (values.view(np.int32), high, bits, factors(scale), factors(scale_sup),
            factors(mins), factors(mins_sup), group, zero)  # fmt: skip


def gemm_blocks(
    x,
    blocks: tuple,
    k: int,
    n: int,
    out=None,
    stream=0,
    act=None,
    bias=None,
    accumulate=False,
    prologue: int = PLAIN,
    norm=None,
    eps: float = 0.0,
):
    """out (T, n) (+)= input (T, k) @ W.T for a block-format W given as `blocks` = (values,
    high, scale, scale_sup, mins, mins_sup, group, zero) (kernels_cpu.simd_blocks' arrays,
    None where absent), plus `bias` (n,) when given. The input is x, rmsnorm(x) with `norm`
    (prologue RMSNORM) or silu(gate) * up of x (T, 2k) (GATED), quantised in one launch into
    `act` (scratch of `activation_shapes`, else allocated per call)."""
    values, scale, group = blocks[0], blocks[2], blocks[6]
    tokens = x.shape[0]
    kp = padded_inputs(scale, group)
    groups = -(-n // ROWS)
    if values.shape[0] != groups or scale.shape[0] != groups or kp < k:
        raise ValueError("the block arrays do not fit n and k")
    if accumulate and out is None:
        raise ValueError("accumulate needs out")
    out = result(out, (tokens, n), np.float32, stream)
    if tokens == 0 or n == 0:
        return out
    if act is None:
        act = tuple(
            cuda.device_array(s, d, stream=stream) for s, d in activation_shapes(tokens, kp)
        )
    xq, xsum, xs, xm = quantize_blocks(x, k, act, stream, prologue, norm, eps)
    bias = no_scale() if bias is None else bias
    args = (*_operands(blocks), xq.view(np.int32), xsum, xs, xm, bias, out, accumulate)
    if tokens <= GEMV_MAX_TOKENS:
        _gemv_blocks[groups, (ROWS, SLOTS), stream](*args)
    else:
        grid = (groups, -(-tokens // GEMM_TOKENS))
        _gemm_blocks[grid, (ROWS, GEMM_TOKENS), stream](*args)
    return out


def block_rows(blocks: tuple, k: int, ids, out=None, stream=0):
    """Rows `ids` (T,) of a block-format matrix (`blocks` as gemm_blocks takes them) as
    float32 (T, k): the embedding lookup of a quantised table."""
    out = result(out, (ids.shape[0], k), np.float32, stream)
    if out.size:
        _block_rows[elementwise_grid(out.size), ELEMENTWISE_THREADS, stream](
            *_operands(blocks), ids, out
        )
    return out
