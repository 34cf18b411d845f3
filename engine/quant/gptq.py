"""GPTQ: 4-bit weights whose rounding errors are compensated on calibration text.

Each column is rounded to its group's grid in turn (the grid of a group is fitted when the
sweep reaches it, to the weights as updated so far) and its error is spread over the columns
not yet rounded through the inverse Hessian of the layer's inputs (`compensated_sweep`).
The Hessians are the Gram matrices X^T X the sparsity code gathers (`collect_input_stats`).
"""

from __future__ import annotations

import numpy as np

from engine.quant.calibration import calibration_text, collect_input_stats
from engine.quant.error_feedback import BLOCK, compensated_sweep
from engine.quant.formats import WeightPlan, convert_weights
from engine.quant.int4 import group_grid, padded_rows, quantize_to_grid, to_block_weight
from engine.weights import BlockWeight, DenseWeight

CALIBRATION_TOKENS = 4096


def gptq_int4(weight: DenseWeight, gram: np.ndarray, group: int) -> BlockWeight:
    """The GPTQ 4-bit BlockWeight of a float matrix, given its inputs' Gram matrix (in, in)."""
    w = padded_rows(weight, group)
    n, kp = w.shape
    k = weight.in_features
    h = np.zeros((kp, kp))
    h[:k, :k] = gram
    scale = np.zeros((n, kp // group), np.float32)
    minimum = np.zeros_like(scale)
    q = np.zeros((n, kp), np.uint8)

    def target(i: int, block: np.ndarray, j: int) -> np.ndarray:
        g = i // group
        if i % group == 0:  # groups never straddle a block: BLOCK is a multiple of group
            fitted = group_grid(block[:, j : j + group].astype(np.float32), group)
            scale[:, g : g + 1], minimum[:, g : g + 1] = fitted
        column = block[:, j : j + 1].astype(np.float32)
        q[:, i : i + 1] = quantize_to_grid(column, scale[:, g : g + 1], minimum[:, g : g + 1])
        return q[:, i].astype(np.float64) * scale[:, g] + minimum[:, g]

    assert BLOCK % group == 0
    compensated_sweep(w, h, target)
    return to_block_weight(q, scale, minimum, weight)


def quantize_gptq(loaded, plan: WeightPlan, calibration: str | None, stats=None) -> dict:
    """Convert the float model `loaded` in place: its decoder linears that `plan` makes int4
    by GPTQ, every other matrix as `plan` says (round to nearest for an int4 embedding or
    head, which have no calibrated inputs). `stats`: collect_input_stats' result with Gram
    matrices, if already gathered (it is consumed). Returns the recipe a checkpoint records."""
    if stats is None:
        text = calibration_text(calibration)
        stats = collect_input_stats(loaded, text, CALIBRATION_TOKENS, gram=True)

    def linear(weight: DenseWeight, i: int, name: str) -> BlockWeight | None:
        gram = stats.pop((i, name)).gram  # the Gram matrices of a big model fill the RAM
        if plan.format_for(f"layers.{i}.{name}") != "int4":
            return None
        return gptq_int4(weight, gram, plan.group_size)

    convert_weights(loaded.weights, plan, linear)
    return {
        "quantization": {
            "method": "gptq",
            "group_size": plan.group_size,
            "calibration": calibration or "pydoc_data.topics",
            "calibration_tokens": CALIBRATION_TOKENS,
        }
    }
