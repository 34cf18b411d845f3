"""Small elementwise ops the forward pass needs between the big kernels: residual adds (the
ones a matmul's epilogue does not do), scaling and soft-capping."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid


@cuda.jit(cache=True)
def _add_rows(x, y):
    """x (T, N) += y (T, N)."""
    rows, n = x.shape
    for idx in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        t = idx // n
        x[t, idx - t * n] += y[t, idx - t * n]


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
    """x (T, N) += y (T, N); returns x."""
    n = x.shape[0] * x.shape[1]
    if n:
        _add_rows[elementwise_grid(n), ELEMENTWISE_THREADS, stream](x, y)
    return x
