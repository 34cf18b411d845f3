"""One-shot weight pruning: magnitude, Wanda, and an optional SparseGPT-style reconstruction.

Pruning decides, per output row, which weights become exactly zero:

- magnitude keeps the largest |W|;
- Wanda (Sun et al., 2023) keeps the largest |W_ij| * ||X_j||, where ||X_j|| is the L2 norm of
  input feature j over calibration tokens: a small weight on a loud input matters more than a
  larger one on a quiet input;
- the pattern is unstructured (the same number of zeros in every row, anywhere in it) or N:M
  (in every group of M consecutive inputs of a row, exactly N are kept: 2:4, 4:8).

`reconstruct` then updates the kept weights to compensate for the removed ones, in the spirit
of SparseGPT (Frantar & Alistarh, 2023): an optimal-brain-surgeon update with the inverse
Hessian X^T X of the layer's calibration inputs, column by column through its Cholesky factor.
Whether it helps is measured with `lamina perplexity`, not assumed.
"""

from __future__ import annotations

import re

import numpy as np

from engine.errors import InvalidInputError
from engine.quant.error_feedback import compensated_sweep

PRUNE_METHODS = ("magnitude", "wanda")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (n, m) for "n:m" (n of every m kept); anything else is refused."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise InvalidInputError(
            f"sparsity pattern must be 'unstructured' or 'N:M' with 0 < N < M, got {pattern!r}"
        )
    return int(match.group(1)), int(match.group(2))


def prune_scores(
    weight: np.ndarray, method: str, input_norm: np.ndarray | None = None
) -> np.ndarray:
    """Importance of each weight of (out, in) `weight`: higher is kept first."""
    if method == "magnitude":
        return np.abs(weight)
    if method == "wanda":
        if input_norm is None:
            raise ValueError("Wanda pruning needs the calibration norm of every input feature")
        return np.abs(weight) * input_norm[None, :]
    raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(PRUNE_METHODS)}")


def keep_mask(scores: np.ndarray, sparsity: float, pattern: str = "unstructured") -> np.ndarray:
    """Boolean (out, in) mask of the weights to keep.

    Unstructured: round(sparsity * in) zeros in every row, the lowest scores (ties broken by
    column order, so the result is deterministic). N:M: the `sparsity` argument must equal
    1 - N/M; in every group of M consecutive columns the N highest scores are kept, and a
    trailing partial group keeps the same share, rounded up.
    """
    rows, cols = scores.shape
    nm = parse_pattern(pattern)
    if nm is None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        drop = round(sparsity * cols)
        order = np.argsort(scores, axis=1, kind="stable")
        mask = np.ones((rows, cols), dtype=bool)
        np.put_along_axis(mask, order[:, :drop], False, axis=1)
        return mask
    n, m = nm
    if abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(f"pattern {pattern} means sparsity {1 - n / m:g}, not {sparsity:g}")
    mask = np.zeros((rows, cols), dtype=bool)
    full = cols - cols % m
    if full:
        groups = scores[:, :full].reshape(rows, full // m, m)
        top = np.argsort(-groups, axis=2, kind="stable")[:, :, :n]
        np.put_along_axis(mask[:, :full].reshape(rows, full // m, m), top, True, axis=2)
    if cols > full:
        tail = cols - full
        keep = -(-tail * n // m)
        top = np.argsort(-scores[:, full:], axis=1, kind="stable")[:, :keep]
        np.put_along_axis(mask[:, full:], top, True, axis=1)
    return mask


def reconstruct(
    weight: np.ndarray, mask: np.ndarray, gram: np.ndarray, damping: float = 0.01
) -> np.ndarray:
    """Zero the weights outside `mask` and update the kept ones to keep W X close (SparseGPT):
    the sequential optimal-brain-surgeon update of `compensated_sweep`, each column's target
    being its masked value. Returns a new float32 (out, in) matrix with exactly the mask's
    zeros."""

    def target(i: int, block: np.ndarray, j: int) -> np.ndarray:
        return np.where(mask[:, i], block[:, j], 0.0)

    w = compensated_sweep(weight, gram, target, damping)
    w[~mask] = 0.0
    return w.astype(np.float32)
