"""Group-wise 4-bit weights made by lamina: round-to-nearest (RTN) or GPTQ.

Each group of `group` inputs of a row gets a float16 scale d and minimum m, and values
q = round((w - m) / d) in 0..15, so w ~ d * q + m: llama.cpp's Q4_1 layout at group 32, at
4 + 32 / group bits a weight (5 at 32, 4.5 at 64, 4.25 at 128). The asymmetric grid fits
each group's range, which matters for the skewed rows of small models. The result is a
`BlockWeight`, run by the same kernels as GGUF's 4-bit types.
"""

from __future__ import annotations

import numpy as np

from engine.weights import BlockWeight, DenseWeight
from kernels_cpu.matmul_blocks import padded_width

# Shrinking a group's range toward zero clips its outliers and refines the grid for the
# rest; each group keeps the factor with the least squared error (1.0, plain min-max, among
# them): 10-12% less squared error than min-max at groups of 64 and 128 on the default
# model's linears.
SHRINK = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)
_SEARCH_ROWS = 2048  # rows searched at a time: the candidates' temporaries stay small


def group_grid(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (scale, minimum) of w (N, Kp), rounded to float16 as they are stored and
    returned as float32: (N, Kp / group) each; the range of each group is shrunk by the
    factor of SHRINK that minimises its squared rounding error. A constant group gets
    scale 0."""
    n, kp = w.shape
    scale = np.empty((n, kp // group), np.float32)
    minimum = np.empty_like(scale)
    for r0 in range(0, n, _SEARCH_ROWS):
        rows = slice(r0, r0 + _SEARCH_ROWS)
        scale[rows], minimum[rows] = _best_grid(w[rows].reshape(-1, kp // group, group))
    return scale, minimum


def _grid(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = ((high - low) / 15).astype(np.float16).astype(np.float32)
    return scale, low.astype(np.float16).astype(np.float32)


def _best_grid(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, high = groups.min(axis=2), groups.max(axis=2)
    best = None
    for factor in SHRINK:
        scale, minimum = _grid(low * factor, high * factor)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        q = np.clip(np.rint((groups - minimum[:, :, None]) * inv[:, :, None]), 0, 15)
        err = ((q * scale[:, :, None] + minimum[:, :, None] - groups) ** 2).sum(axis=2)
        if best is None:
            best, best_err, best_scale, best_min = factor, err, scale, minimum
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, minimum, best_min)
    return best_scale, best_min


def quantize_to_grid(w: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Values q (uint8, 0..15) nearest to w on each group's grid d * q + m."""
    n, kp = w.shape
    group = kp // scale.shape[1]
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    groups = (w.reshape(n, kp // group, group) - minimum[:, :, None]) * inv[:, :, None]
    return np.clip(np.rint(groups), 0, 15).astype(np.uint8).reshape(n, kp)


def padded_rows(weight: DenseWeight, group: int) -> np.ndarray:
    """The float32 matrix with zero columns up to the block layout's padded width."""
    n, k = weight.data.shape
    w = np.zeros((n, padded_width(k, group)), np.float32)
    w[:, :k] = weight.data
    return w


def to_block_weight(
    q: np.ndarray, scale: np.ndarray, minimum: np.ndarray, source: DenseWeight
) -> BlockWeight:
    """The BlockWeight ("int4-g<group>") of 4-bit values q (N, Kp) with float32 scales and
    minimums (exact in float16) quantized from `source` (its width and bias)."""
    group = q.shape[1] // scale.shape[1]
    halves = [a.astype(np.float16).view(np.uint16) for a in (scale, minimum)]
    k = source.in_features
    return BlockWeight.from_rows(q, 4, halves[0], k, f"int4-g{group}", mins=halves[1],
                                 bias=source.bias)  # fmt: skip


def quantize_int4(weight: DenseWeight, group: int = 32) -> BlockWeight:
    """Round-to-nearest 4-bit quantization of a float matrix, groups of `group` inputs."""
    w = padded_rows(weight, group)
    scale, minimum = group_grid(w, group)
    return to_block_weight(quantize_to_grid(w, scale, minimum), scale, minimum, weight)
