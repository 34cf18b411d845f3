"""Symmetric per-output-row int8 quantization (absmax / 127), as llama.cpp's Q8_0 but with one
scale per row: the decode GEMV then reads one scale per row instead of one per 32 values."""

from __future__ import annotations

import numpy as np

from engine.weights import DenseWeight, Int8Weight


def quantize_int8(weight: DenseWeight) -> Int8Weight:
    """Quantize each row to int8 with scale = max|row| / 127 (all-zero rows get scale 0)."""
    w = weight.data
    absmax = np.abs(w).max(axis=1)
    scale = (absmax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return Int8Weight(q, scale, weight.bias)
