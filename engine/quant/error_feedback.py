"""The optimal-brain-surgeon sweep shared by SparseGPT (pruning) and GPTQ (4-bit rounding).

Both replace a layer's weights column by column with a target (zero, or the nearest value
on a grid) and push each column's error onto the columns not yet replaced, weighted by the
inverse Hessian of the layer's inputs, so that W X stays close on the calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BLOCK = 128  # columns per lazy-update block: their errors reach later columns in one matmul


def compensated_sweep(
    weight: np.ndarray,
    gram: np.ndarray,
    target: Callable[[int, np.ndarray, int], np.ndarray],
    damping: float = 0.01,
) -> np.ndarray:
    """W (out, in) after the sweep, as float64: column i becomes target(i, block, j), where
    block is the current (updated) columns of i's block and j = i's place in it, and its
    error divided by U[i, i] flows to the later columns through U[i, i + 1:].

    `gram` is X^T X (in, in) of the calibration inputs; H = gram + damping * mean(diag) * I,
    and U is the upper Cholesky factor of H^-1. Inputs never seen (a zero diagonal) have
    their weights zeroed first. Columns are processed in blocks of BLOCK, which a target
    that looks ahead (a group's grid) can rely on: a block starts at a multiple of BLOCK.
    """
    w = weight.astype(np.float64)
    h = gram.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * float(np.mean(np.diag(h))) * np.eye(h.shape[0])
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    cols = w.shape[1]
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        block = w[:, b0:b1].copy()
        errors = np.zeros_like(block)
        for j in range(b1 - b0):
            i = b0 + j
            value = target(i, block, j)
            err = (block[:, j] - value) / hinv[i, i]
            block[:, j:] -= err[:, None] * hinv[i, i:b1][None, :]
            block[:, j] = value
            errors[:, j] = err
        w[:, b0:b1] = block
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return w
