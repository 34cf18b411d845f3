"""Attention over the paged KV cache on the device: the twin of kernels_cpu.paged_attention.

Same layout, arguments and results: one layer's cache is k_cache/v_cache (num_blocks,
block_size, Hkv, D), float32, or int8 with float32 row scales (num_blocks, block_size, Hkv);
position p of sequence s lives in block block_tables[s, p // block_size], row
p % block_size. A batch concatenates each sequence's new query tokens (decode steps and
prefill chunks alike): sequence s owns q rows query_start[s]:query_start[s + 1], and
context_lens[s] counts its cached tokens including those new ones, already written.

`_attend` runs one block per (token, kv head, split): the block takes up to MAX_GROUP query
heads of the kv head's GQA group together, so each key and value row is read once per group.
Keys come TILE at a time, one per thread: a thread walks the block table for its key, dots
the row with every query head (queries sit in shared memory, read as broadcasts), and the
block then folds the tile into an online softmax (running max, sum and unnormalised output in
shared memory; every thread computes the group's running max and sum itself, so a tile costs
two barriers). For the output, threads own dimensions d, so value rows are read coalesced.

A decode step has few (token, kv head) pairs, too few blocks to fill a GPU while each walks a
long context: with `splits` > 1 each pair's key tiles are divided among that many blocks,
which write partial (max, sum, output) triples that `_combine` merges (flash decoding).
`attention_splits` picks the count from the batch and the GPU's size.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int8, int64

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, empty, no_scale, result

TILE = 64  # keys per step = threads per attention block
HEAD_SLOTS = 1024  # query and output floats per block in shared memory: group chunk x D
MAX_GROUP = 16  # query heads per block at most
MAX_SPLITS = 32
MIN_SPLIT_TILES = 4  # a split walks at least this many tiles; merging is not free
COMBINE_THREADS = 64
KV_THREADS = 32  # a warp quantises one (token, kv head) row of the int8 cache
NEG_INF = float32(-math.inf)


@cuda.jit(cache=True)
def _attend(
    q,
    k,
    v,
    k_scale,
    v_scale,
    block_tables,
    query_start,
    context_lens,
    scale,
    window,
    block_size,
    kv_heads,
    chunk,
    out,
    part_acc,
    part_max,
    part_sum,
    softcap,
):
    """Grid (T, Hkv * chunks, splits), TILE threads. k, v are the caches as (rows, D) with row
    (block * block_size + r) * Hkv + kv head, k_scale/v_scale their flat row scales or empty;
    softcap > 0 caps scores to softcap * tanh(score / softcap)."""
    t = cuda.blockIdx.x
    split = cuda.blockIdx.z
    splits = cuda.gridDim.z
    tid = cuda.threadIdx.x
    heads = q.shape[1]
    dim = q.shape[2]
    group = heads // kv_heads
    chunks = (group + chunk - 1) // chunk
    kvh = cuda.blockIdx.y // chunks
    h0 = kvh * group + (cuda.blockIdx.y - kvh * chunks) * chunk
    gc = chunk if (kvh + 1) * group - h0 > chunk else (kvh + 1) * group - h0
    quantized = k_scale.size > 0

    s = 0
    while query_start[s + 1] <= t:
        s += 1
    pos = int64(context_lens[s]) - int64(query_start[s + 1]) + t
    first = int64(0)
    if window > 0 and pos - window + 1 > 0:
        first = pos - window + 1
    tiles = (pos - first) // TILE + 1
    per_split = (tiles + splits - 1) // splits
    tile_lo = split * per_split
    tile_hi = tile_lo + per_split if tile_lo + per_split < tiles else tiles

    qs = cuda.shared.array(HEAD_SLOTS, float32)
    acc = cuda.shared.array(HEAD_SLOTS, float32)
    scores = cuda.shared.array((MAX_GROUP, TILE), float32)
    probs = cuda.shared.array((MAX_GROUP, TILE), float32)
    # Double-buffered by tile parity: the next tile's keys are written while slow threads
    # may still read these in the value pass, with no barrier in between.
    rows = cuda.shared.array((2, TILE), int64)
    v_row_scale = cuda.shared.array((2, TILE), float32)
    best = cuda.local.array(MAX_GROUP, float32)
    total = cuda.local.array(MAX_GROUP, float32)
    corr = cuda.local.array(MAX_GROUP, float32)
    dots = cuda.local.array(MAX_GROUP, float32)

    for i in range(tid, gc * dim, TILE):
        g = i // dim
        qs[i] = q[t, h0 + g, i - g * dim] * scale
        acc[i] = 0
    for g in range(gc):
        best[g] = NEG_INF
        total[g] = 0
    cuda.syncthreads()

    for tile in range(tile_lo, tile_hi):
        b = tile % 2
        p0 = first + tile * TILE
        n = TILE if pos + 1 - p0 > TILE else pos + 1 - p0
        if tid < n:  # scores of this thread's key against the group
            p = p0 + tid
            blk = int64(block_tables[s, p // block_size])
            row = (blk * block_size + p % block_size) * kv_heads + kvh
            rows[b, tid] = row
            for g in range(gc):
                dots[g] = 0
            for d in range(dim):
                kd = float32(k[row, d])
                for g in range(gc):
                    dots[g] += qs[g * dim + d] * kd
            if quantized:
                for g in range(gc):
                    dots[g] *= k_scale[row]
                v_row_scale[b, tid] = v_scale[row]
            if softcap > 0:
                for g in range(gc):
                    dots[g] = softcap * math.tanh(dots[g] / softcap)
            for g in range(gc):
                scores[g, tid] = dots[g]
        cuda.syncthreads()
        for g in range(gc):  # new running max; probabilities of this thread's key
            m = best[g]
            for j in range(n):
                m = scores[g, j] if scores[g, j] > m else m
            corr[g] = math.exp(best[g] - m)
            best[g] = m
            if tid < n:
                probs[g, tid] = math.exp(scores[g, tid] - m)
        cuda.syncthreads()
        for g in range(gc):
            run = total[g] * corr[g]
            for j in range(n):
                run += probs[g, j]
            total[g] = run
        for d in range(tid, dim, TILE):
            for g in range(gc):
                dots[g] = acc[g * dim + d] * corr[g]
            for j in range(n):
                vd = float32(v[rows[b, j], d])
                if quantized:
                    vd *= v_row_scale[b, j]
                for g in range(gc):
                    dots[g] += probs[g, j] * vd
            for g in range(gc):
                acc[g * dim + d] = dots[g]

    # Each thread wrote only its own dimensions of acc: no barrier needed to read them.
    for d in range(tid, dim, TILE):
        for g in range(gc):
            if splits == 1:
                out[t, h0 + g, d] = acc[g * dim + d] * (float32(1) / total[g])
            else:
                part_acc[split, t, h0 + g, d] = acc[g * dim + d]
    if splits > 1 and tid < gc:
        part_max[split, t, h0 + tid] = best[tid]
        part_sum[split, t, h0 + tid] = total[tid]


@cuda.jit(cache=True)
def _combine(part_acc, part_max, part_sum, out):
    """Block per (token, head): merge the splits' partials; an empty split has max -inf."""
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    splits = part_max.shape[0]
    m = part_max[0, t, h]
    for sp in range(1, splits):
        m = part_max[sp, t, h] if part_max[sp, t, h] > m else m
    weight_sum = float32(0)
    for sp in range(splits):
        weight_sum += part_sum[sp, t, h] * math.exp(part_max[sp, t, h] - m)
    inv = float32(1) / weight_sum
    for d in range(cuda.threadIdx.x, out.shape[2], cuda.blockDim.x):
        o = float32(0)
        for sp in range(splits):
            o += part_acc[sp, t, h, d] * math.exp(part_max[sp, t, h] - m)
        out[t, h, d] = o * inv


@cuda.jit(cache=True)
def _write_kv(k_cache, v_cache, k, v, slots):
    """Thread per (token, kv head, d), d fastest: rows are copied coalesced."""
    block_size = k_cache.shape[1]
    tokens, kv_heads, dim = k.shape
    for idx in range(cuda.grid(1), tokens * kv_heads * dim, cuda.gridsize(1)):
        d = idx % dim
        th = idx // dim
        h = th % kv_heads
        t = th // kv_heads
        blk = slots[t] // block_size
        row = slots[t] - blk * block_size
        k_cache[blk, row, h, d] = k[t, h, d]
        v_cache[blk, row, h, d] = v[t, h, d]


@cuda.jit(device=True)
def _to_int8(x, s):
    """round(x / s) clamped to [-127, 127], or 0 for a zero row (s == 0); as the CPU twin."""
    if s == 0:
        return int8(0)
    q = round(x / s)
    return int8(-127 if q < -127 else (127 if q > 127 else q))


@cuda.jit(cache=True)
def _write_kv_int8(k_cache, v_cache, k_scale, v_scale, k, v, slots):
    """Block (warp) per (token, kv head): scale = max|row| / 127, then the rounded quotients."""
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    lane = cuda.threadIdx.x
    dim = k.shape[2]
    block_size = k_cache.shape[1]
    blk = slots[t] // block_size
    row = slots[t] - blk * block_size
    peaks = cuda.shared.array((2, KV_THREADS), float32)
    k_peak = float32(0)
    v_peak = float32(0)
    for d in range(lane, dim, KV_THREADS):
        a = abs(k[t, h, d])
        k_peak = a if a > k_peak else k_peak
        a = abs(v[t, h, d])
        v_peak = a if a > v_peak else v_peak
    peaks[0, lane] = k_peak
    peaks[1, lane] = v_peak
    cuda.syncthreads()
    for i in range(KV_THREADS):
        k_peak = peaks[0, i] if peaks[0, i] > k_peak else k_peak
        v_peak = peaks[1, i] if peaks[1, i] > v_peak else v_peak
    k_s = k_peak / float32(127)
    v_s = v_peak / float32(127)
    for d in range(lane, dim, KV_THREADS):
        k_cache[blk, row, h, d] = _to_int8(k[t, h, d], k_s)
        v_cache[blk, row, h, d] = _to_int8(v[t, h, d], v_s)
    if lane == 0:
        k_scale[blk, row, h] = k_s
        v_scale[blk, row, h] = v_s


def write_kv(k_cache, v_cache, k, v, slots, stream=0) -> None:
    """Store k, v (T, Hkv, D) at flat slots (T,) = block * block_size + row of the cache."""
    n = k.shape[0] * k.shape[1] * k.shape[2]
    if n:
        _write_kv[elementwise_grid(n), ELEMENTWISE_THREADS, stream](k_cache, v_cache, k, v, slots)


def write_kv_int8(k_cache, v_cache, k_scale, v_scale, k, v, slots, stream=0) -> None:
    """`write_kv` for an int8 cache, quantising each (token, kv head) row with its own scale."""
    if k.shape[0]:
        grid = (k.shape[0], k.shape[1])
        _write_kv_int8[grid, KV_THREADS, stream](k_cache, v_cache, k_scale, v_scale, k, v, slots)


def attention_splits(tokens: int, kv_heads: int, max_context: int, sm_count: int) -> int:
    """Blocks per (token, kv head) for a batch whose longest context is `max_context`.

    Enough to give about two blocks per SM, as long as each split keeps MIN_SPLIT_TILES tiles.
    """
    wanted = -(-2 * sm_count // max(1, tokens * kv_heads))
    useful = -(-max_context // (TILE * MIN_SPLIT_TILES))
    return max(1, min(wanted, useful, MAX_SPLITS))


def partials_shapes(splits: int, tokens: int, heads: int, dim: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the float32 (acc, max, sum) partials a split attention writes and merges."""
    return (splits, tokens, heads, dim), (splits, tokens, heads), (splits, tokens, heads)


def _launch(
    q,
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    tables,
    starts,
    lens,
    scale,
    window,
    splits,
    out,
    parts,
    stream,
    softcap,
):
    tokens, heads, dim = q.shape
    num_blocks, block_size, kv_heads, cache_dim = k_cache.shape
    if cache_dim != dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit a cache of {tuple(k_cache.shape)}")
    if dim > HEAD_SLOTS:
        raise ValueError(f"head_dim {dim} is more than the {HEAD_SLOTS} a block holds")
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    out = result(out, (tokens, heads, dim), np.float32, stream)
    if tokens == 0:
        return out
    group = heads // kv_heads
    chunk = min(group, MAX_GROUP, HEAD_SLOTS // dim)
    rows = num_blocks * block_size * kv_heads
    if splits == 1:  # unread with one split
        parts = [empty(4), empty(3), empty(3)]
    elif parts is None:
        shapes = partials_shapes(splits, tokens, heads, dim)
        parts = [cuda.device_array(shape, dtype=np.float32, stream=stream) for shape in shapes]
    part_acc, part_max, part_sum = parts
    grid = (tokens, kv_heads * -(-group // chunk), splits)
    _attend[grid, TILE, stream](
        q,
        k_cache.reshape(rows, dim),
        v_cache.reshape(rows, dim),
        k_scale,
        v_scale,
        tables,
        starts,
        lens,
        np.float32(scale),
        window,
        block_size,
        kv_heads,
        chunk,
        out,
        part_acc,
        part_max,
        part_sum,
        np.float32(softcap),
    )
    if splits > 1:
        _combine[(tokens, heads), COMBINE_THREADS, stream](part_acc, part_max, part_sum, out)
    return out


def paged_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    query_start,
    context_lens,
    scale: float,
    window: int,
    splits: int = 1,
    out=None,
    stream=0,
    parts=None,
    softcap: float = 0.0,
):
    """Causal softmax attention of q (T, H, D) over a float32 paged cache -> (T, H, D) float32.

    The arguments of kernels_cpu.paged_attention.paged_attention, as device arrays (q, caches
    float32; block_tables (B, max_blocks), query_start (B + 1,), context_lens (B,) integers),
    plus `splits` (see `attention_splits`). window > 0 keeps each query's last `window` keys;
    softcap > 0 caps the scores (Gemma 2). `parts`: scratch for the splits' partials
    (`partials_shapes`), else allocated per call.
    """
    return _launch(
        q,
        k_cache,
        v_cache,
        no_scale(),
        no_scale(),
        block_tables,
        query_start,
        context_lens,
        scale,
        window,
        splits,
        out,
        parts,
        stream,
        softcap,
    )


def paged_attention_int8(
    q,
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    block_tables,
    query_start,
    context_lens,
    scale: float,
    window: int,
    splits: int = 1,
    out=None,
    stream=0,
    parts=None,
    softcap: float = 0.0,
):
    """`paged_attention` over an int8 cache and its (num_blocks, block_size, Hkv) row scales,
    as written by `write_kv_int8`."""
    rows = k_scale.shape[0] * k_scale.shape[1] * k_scale.shape[2]
    return _launch(
        q,
        k_cache,
        v_cache,
        k_scale.reshape(rows),
        v_scale.reshape(rows),
        block_tables,
        query_start,
        context_lens,
        scale,
        window,
        splits,
        out,
        parts,
        stream,
        softcap,
    )
