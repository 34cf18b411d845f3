"""Mixture-of-experts routing: pick each token's experts, and group the tokens by expert.

A router's logits (T, E) become each token's top k experts and their weights, as
transformers computes them (softmax over all experts in float32, the k largest, optionally
renormalised to sum to one). Grouping then lists, expert by expert, the tokens routed to it,
so the backend runs one GEMM per expert over its tokens (and a decode step only the k experts
its token picked), on the ordinary linear kernels. A single token (decode) instead runs its
k experts stacked in one array per field through two parallel regions (`moe_decode_*`): one
over every chosen expert's gate_up rows and one over their down rows, with the same tiles
and rounding as the linear kernels, so both paths give the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kernels_cpu.activations import silu_mul_row
from kernels_cpu.matmul_blocks import _offset as block_offset
from kernels_cpu.matmul_blocks import _quantize_row as quantize_block_row
from kernels_cpu.matmul_blocks import _tile_1 as tile_1
from kernels_cpu.matmul_int8 import INT16_MAX, JOB_ROWS, PREFETCH_BYTES
from kernels_cpu.matmul_int8 import _dot_tile as dot_tile
from kernels_cpu.matmul_int8 import _quantize_row as quantize_int16_row
from kernels_cpu.matmul_int8 import _store_tile as store_tile
from kernels_cpu.simd import prefetch, stack_tile
from kernels_cpu.simd_blocks import ROWS


@njit(cache=True)
def route_top_k_into(
    logits: np.ndarray, normalize: bool, ids: np.ndarray, weights: np.ndarray
) -> None:
    """ids (T, k) int32 and weights (T, k) float32 of each token's k most probable experts,
    most probable first (ties to the lower index);
    `normalize` rescales a token's k weights to sum to one."""
    tokens, experts = logits.shape
    k = ids.shape[1]
    if ids.shape[0] != tokens or weights.shape != ids.shape or not 1 <= k <= experts:
        raise ValueError("ids and weights must be (T, k) with 1 <= k <= experts")
    probs = np.empty(experts, np.float32)
    taken = np.empty(experts, np.bool_)
    for t in range(tokens):
        top = logits[t, 0]
        for e in range(1, experts):
            top = max(top, logits[t, e])
        total = np.float32(0)
        for e in range(experts):
            probs[e] = np.exp(logits[t, e] - top)
            total += probs[e]
        for e in range(experts):
            probs[e] /= total
            taken[e] = False
        chosen = np.float32(0)
        for j in range(k):
            best = -1
            for e in range(experts):  # NaN logits never win; the first free expert stands in
                if not taken[e] and (best < 0 or probs[e] > probs[best]):
                    best = e
            taken[best] = True
            ids[t, j] = best
            weights[t, j] = probs[best]
            chosen += probs[best]
        if normalize:
            for j in range(k):
                weights[t, j] /= chosen


@njit(cache=True)
def group_by_expert_into(
    ids: np.ndarray, weights: np.ndarray, starts: np.ndarray, rows: np.ndarray, scales: np.ndarray
) -> None:
    """A counting sort of the (token, choice) pairs by expert: expert e's tokens are
    rows[starts[e]:starts[e + 1]] in token order, with their routing weights in scales.
    starts (E + 1,), rows and scales (T * k,)."""
    tokens, k = ids.shape
    experts = starts.shape[0] - 1
    if rows.shape[0] != tokens * k or scales.shape[0] != tokens * k:
        raise ValueError("rows and scales must hold T * k entries")
    starts[:] = 0
    for t in range(tokens):
        for j in range(k):
            e = ids[t, j]
            if e < 0 or e >= experts:
                raise IndexError("expert index out of range")
            starts[e + 1] += 1
    for e in range(experts):
        starts[e + 1] += starts[e]
    fill = starts[:-1].copy()
    for t in range(tokens):
        for j in range(k):
            e = ids[t, j]
            rows[fill[e]] = t
            scales[fill[e]] = weights[t, j]
            fill[e] += 1


@njit(cache=True)
def scale_up_half_(gate_up: np.ndarray, scales: np.ndarray) -> None:
    """Multiply the up half of each row of gate_up (n, 2F) = [gate | up] by its token's
    routing weight: the expert's output down(silu(gate) * up) comes out weighted, so the
    down projection adds it straight into the residual."""
    n, width = gate_up.shape
    half = width // 2
    for r in range(n):
        s = scales[r]
        for i in range(half, width):
            gate_up[r, i] *= s


@njit(cache=True)
def _ascending(ids: np.ndarray, scales: np.ndarray, order_ids, order_scales) -> None:
    """One token's k experts and weights sorted by expert, the order the grouped path adds
    them into the residual in (so both paths give the same bits)."""
    k = ids.shape[0]
    for j in range(k):
        order_ids[j], order_scales[j] = ids[j], scales[j]
    for j in range(1, k):
        e, s, i = order_ids[j], order_scales[j], j - 1
        while i >= 0 and order_ids[i] > e:
            order_ids[i + 1], order_scales[i + 1] = order_ids[i], order_scales[i]
            i -= 1
        order_ids[i + 1], order_scales[i + 1] = e, s


@njit(cache=True)
def _gated_rows(hidden: np.ndarray, scales: np.ndarray, gated: np.ndarray) -> None:
    """Each expert's up half scaled by its weight, then silu(gate) * up, row by row: the
    steps of the grouped path (scale_up_half_, then the gated prologue), in its order."""
    for j in range(hidden.shape[0]):
        scale_up_half_(hidden[j : j + 1], scales[j : j + 1])
        silu_mul_row(hidden, j, gated)


@njit(cache=True)
def _add_rows(residual: np.ndarray, partial: np.ndarray) -> None:
    """residual[0] += each row of partial in turn (the experts in ascending order)."""
    for j in range(partial.shape[0]):
        for i in range(residual.shape[1]):
            residual[0, i] += partial[j, i]


@njit(cache=True, inline="always", fastmath=True)
def _expert_rows_w8(data, scale, ids, a, a_scale, job, jobs, out) -> None:
    """Job `job` of `jobs` per expert: out[j, rows] for JOB_ROWS rows of expert ids[j]'s
    stacked int8 weight times activation row j, with matmul_int8's GEMV tiles, prefetch
    and rounding."""
    j, lo = job // jobs, job % jobs * JOB_ROWS
    w, s = data[ids[j]], scale[ids[j]]
    one = stack_tile(1, 1)
    k = w.shape[1]
    for r in range(lo, min(lo + JOB_ROWS, w.shape[0])):
        ahead = r * k + PREFETCH_BYTES
        for off in range(0, k, 64):
            prefetch(w, ahead + off)
        dot_tile(w, r, a, j, one)
        store_tile(one, r, j, a_scale, s, out, False)


@njit(cache=True, parallel=True, fastmath=True)
def moe_decode_w8_into(
    x, ids, scales, gu_data, gu_scale, dn_data, dn_scale, residual, order_ids, order_scales,
    a, a_scale, hidden, gated, a2, a2_scale, partial,
) -> None:  # fmt: skip
    """One token's mixture of experts with int8 experts stacked (E, N, K): residual (1, H)
    += sum over its k experts (ids, scales: the route) of scale * down(silu(gate) * up) of
    x (1, H), the normalised input, in two parallel regions (every expert's gate_up rows,
    then every expert's down rows) instead of two per expert. Bit for bit what the grouped
    path computes. Scratch: order_ids/order_scales (k,), a (k, H) int16 and a_scale (k,),
    hidden (k, 2F), gated (k, F), a2 (k, F) int16 and a2_scale (k,), partial (k, H)."""
    k = ids.shape[0]
    two_f, h = gu_data.shape[1], gu_data.shape[2]
    f = dn_data.shape[2]
    if (x.shape != (1, h) or residual.shape != (1, h) or dn_data.shape[1] != h
            or two_f != 2 * f or hidden.shape != (k, two_f) or partial.shape != (k, h)
            or a.shape != (k, h) or a2.shape != (k, f) or gated.shape != (k, f)):  # fmt: skip
        raise ValueError("shapes of the stacked experts and scratch disagree")
    _ascending(ids, scales, order_ids, order_scales)
    quantize_int16_row(x, 0, INT16_MAX, a, a_scale)
    for j in range(1, k):  # every expert reads the same input: one quantization, k rows
        a[j] = a[0]
        a_scale[j] = a_scale[0]
    jobs = (two_f + JOB_ROWS - 1) // JOB_ROWS
    for job in prange(k * jobs):
        _expert_rows_w8(gu_data, gu_scale, order_ids, a, a_scale, job, jobs, hidden)
    _gated_rows(hidden, order_scales, gated)
    for j in range(k):
        quantize_int16_row(gated, j, INT16_MAX, a2, a2_scale)
    jobs = (h + JOB_ROWS - 1) // JOB_ROWS
    for job in prange(k * jobs):
        _expert_rows_w8(dn_data, dn_scale, order_ids, a2, a2_scale, job, jobs, partial)
    _add_rows(residual, partial)


def pick(arrays, e):
    """arrays[e], or None when arrays is None (compiled by the overload below)."""
    return None if arrays is None else arrays[e]


@overload(pick)
def _pick_impl(arrays, e):
    """arrays[e], or None for a field the format lacks (a None argument)."""
    if isinstance(arrays, types.NoneType):
        return lambda arrays, e: None
    return lambda arrays, e: arrays[e]


@njit(cache=True, inline="always")
def _expert_rows_blocks(w, group, ids, act, start, job, groups, out) -> None:
    """Job `job` of `groups` per expert: out[j] for one 16-row group of expert ids[j]'s
    stacked block weight w (its six fields) times activation row j (act: xq, xsum, xs, xm),
    with matmul_blocks' one-token tile."""
    j, g = job // groups, job % groups
    e = ids[j]
    xq, xsum, xs, xm = act
    tile_1(w[0][e], pick(w[1], e), w[2][e], pick(w[3], e), pick(w[4], e), pick(w[5], e),
           group, g, xq, xsum, xs, xm, start, j, out, False)  # fmt: skip


@njit(cache=True, parallel=True)
def moe_decode_blocks_into(
    x, ids, scales, gu, gu_group, gu_zero, dn, dn_group, dn_zero, residual, order_ids,
    order_scales, xq, xsum, xs, xm, hidden, gated, xq2, xsum2, xs2, xm2, partial,
) -> None:  # fmt: skip
    """`moe_decode_w8_into` for experts in a block format: gu and dn are the (values, high,
    scale, scale_sup, mins, mins_sup) of the stacked gate_up and down (arrays with a leading
    expert axis, or None for fields the format lacks), with their groups and zeros as
    BlockWeight's.
    Scratch: xq.. (k, Kp of H) and xq2.. (k, Kp of F) as matmul_blocks' activations,
    hidden (k, 2F), gated (k, F), partial (k, H)."""
    k = ids.shape[0]
    h, f = residual.shape[1], gated.shape[1]
    _ascending(ids, scales, order_ids, order_scales)
    quantize_block_row(x, 0, h, xq, xsum, xs, xm)
    for j in range(1, k):
        xq[j], xsum[j], xs[j], xm[j] = xq[0], xsum[0], xs[0], xm[0]
    groups = gu[0].shape[1]
    if (hidden.shape != (k, groups * ROWS) or hidden.shape[1] != 2 * f
            or partial.shape != (k, dn[0].shape[1] * ROWS) or partial.shape[1] != h):  # fmt: skip
        raise ValueError("shapes of the stacked experts and scratch disagree (rows % 16?)")
    start = gu_zero + block_offset(gu[0][0])
    for job in prange(k * groups):
        _expert_rows_blocks(gu, gu_group, order_ids, (xq, xsum, xs, xm), start, job, groups,
                            hidden)  # fmt: skip
    _gated_rows(hidden, order_scales, gated)
    for j in range(k):
        quantize_block_row(gated, j, f, xq2, xsum2, xs2, xm2)
    groups = dn[0].shape[1]
    start = dn_zero + block_offset(dn[0][0])
    for job in prange(k * groups):
        _expert_rows_blocks(dn, dn_group, order_ids, (xq2, xsum2, xs2, xm2), start, job, groups,
                            partial)  # fmt: skip
    _add_rows(residual, partial)
