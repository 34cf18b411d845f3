"""Mixture-of-experts helpers around the expert linears: weighting an expert's tokens and
adding its output into their rows of the residual.

Routing and grouping run on the host (kernels_cpu.moe), since which experts have tokens
decides which launches happen; these kernels take the grouped rows and routing weights of
one expert, uploaded to the device.
"""

from __future__ import annotations

from numba import cuda

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid


@cuda.jit(cache=True)
def _scale_up_half(gate_up, scales):
    """gate_up (n, 2F) = [gate | up]: up[r] *= scales[r]; thread per up element."""
    rows, width = gate_up.shape
    half = width // 2
    for idx in range(cuda.grid(1), rows * half, cuda.gridsize(1)):
        r = idx // half
        gate_up[r, half + idx - r * half] *= scales[r]


def scale_up_half_(gate_up, scales, stream=0):
    """Multiply the up half of each row of gate_up (n, 2F) float32 by its token's routing
    weight scales (n,): down(silu(gate) * up) then comes out weighted, so the down
    projection's output adds straight into the residual. Returns gate_up."""
    n = gate_up.shape[0] * (gate_up.shape[1] // 2)
    if n:
        _scale_up_half[elementwise_grid(n), ELEMENTWISE_THREADS, stream](gate_up, scales)
    return gate_up


@cuda.jit(cache=True)
def _add_rows_at(dst, rows, src):
    """dst[rows[i]] += src[i]; thread per element, consecutive threads along a row."""
    n, k = src.shape
    for idx in range(cuda.grid(1), n * k, cuda.gridsize(1)):
        i = idx // k
        c = idx - i * k
        dst[rows[i], c] += src[i, c]


def add_rows_at(dst, rows, src, stream=0):
    """dst (R, K) float32: row rows[i] += src[i] for src (n, K). The rows must be distinct
    (an expert's tokens are): the adds are plain, not atomic. Returns dst."""
    n = src.shape[0] * src.shape[1]
    if n:
        _add_rows_at[elementwise_grid(n), ELEMENTWISE_THREADS, stream](dst, rows, src)
    return dst
