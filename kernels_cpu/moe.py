"""Mixture-of-experts routing: pick each token's experts, and group the tokens by expert.

A router's logits (T, E) become each token's top k experts and their weights, as
transformers computes them (softmax over all experts in float32, the k largest, optionally
renormalised to sum to one). Grouping then lists, expert by expert, the tokens routed to it,
so the backend runs one GEMM per expert over its tokens (and a decode step only the k experts
its token picked). The expert MLPs themselves run on the ordinary linear kernels.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
def put_rows(src: np.ndarray, rows: np.ndarray, dst: np.ndarray) -> None:
    """dst[rows[i]] = src[i]: the inverse of take_rows_into, for distinct rows."""
    n, k = dst.shape
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0 or r >= n:
            raise IndexError("row index out of range")
        for c in range(k):
            dst[r, c] = src[i, c]
