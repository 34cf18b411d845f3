"""Small elementwise ops the forward pass needs between the big kernels: residual adds, bias
adds, scaling and soft-capping, and splitting the fused QKV projection into contiguous q, k,
v."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, result


@cuda.jit(cache=True)
def _add_rows(x, y):
    """x (T, N) += y (T, N)."""
    rows, n = x.shape
    for idx in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        t = idx // n
        x[t, idx - t * n] += y[t, idx - t * n]


@cuda.jit(cache=True)
def _add_bias(x, bias):
    """x (T, N) += bias (N,) on every row."""
    rows, n = x.shape
    for idx in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        t = idx // n
        x[t, idx - t * n] += bias[idx - t * n]


@cuda.jit(cache=True)
def _split(qkv, q, k, v):
    """Copy the column ranges [q | k | v] of qkv (T, W) into the (T, *) arrays q, k, v."""
    rows, width = qkv.shape
    q_end = q.shape[1]
    k_end = q_end + k.shape[1]
    for idx in range(cuda.grid(1), rows * width, cuda.gridsize(1)):
        t = idx // width
        c = idx - t * width
        if c < q_end:
            q[t, c] = qkv[t, c]
        elif c < k_end:
            k[t, c - q_end] = qkv[t, c]
        else:
            v[t, c - k_end] = qkv[t, c]


@cuda.jit(cache=True)
def _scale(x, factor):
    rows, cols = x.shape
    for idx in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        t = idx // cols
        x[t, idx - t * cols] *= factor


def scale_inplace(x, factor: float, stream=0):
    """x (T, N) *= factor (float32); returns x."""
    n = x.shape[0] * x.shape[1]
    if n:
        _scale[elementwise_grid(n), ELEMENTWISE_THREADS, stream](x, np.float32(factor))
    return x


@cuda.jit(cache=True)
def _softcap(x, cap):
    rows, cols = x.shape
    for idx in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        t = idx // cols
        x[t, idx - t * cols] = math.tanh(x[t, idx - t * cols] / cap) * cap


def softcap_inplace(x, cap: float, stream=0):
    """x (T, N) = cap * tanh(x / cap) (Gemma 2's logit soft-capping); returns x."""
    n = x.shape[0] * x.shape[1]
    if n:
        _softcap[elementwise_grid(n), ELEMENTWISE_THREADS, stream](x, np.float32(cap))
    return x


def add_inplace(x, y, stream=0):
    """x (T, N) += y, where y is (T, N) or a bias (N,) added to every row; returns x."""
    n = x.shape[0] * x.shape[1]
    if n:
        kernel = _add_bias if y.ndim == 1 else _add_rows
        kernel[elementwise_grid(n), ELEMENTWISE_THREADS, stream](x, y)
    return x


def split_qkv(qkv, heads: int, kv_heads: int, head_dim: int, out=None, stream=0):
    """Fused (T, (H + 2 Hkv) D) projections -> contiguous q (T, H, D), k and v (T, Hkv, D),
    copied into `out` = (q, k, v) when given, else into new arrays."""
    tokens = qkv.shape[0]
    q_out, k_out, v_out = (None, None, None) if out is None else out
    q = result(q_out, (tokens, heads, head_dim), np.float32, stream)
    k = result(k_out, (tokens, kv_heads, head_dim), np.float32, stream)
    v = result(v_out, (tokens, kv_heads, head_dim), np.float32, stream)
    n = tokens * qkv.shape[1]
    if n:
        q_rows = q.reshape(tokens, heads * head_dim)
        k_rows, v_rows = (a.reshape(tokens, kv_heads * head_dim) for a in (k, v))
        _split[elementwise_grid(n), ELEMENTWISE_THREADS, stream](qkv, q_rows, k_rows, v_rows)
    return q, k, v
