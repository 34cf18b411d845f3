"""Row gathers: embedding lookups (float32 or int8 tables) and picking rows of activations."""

from __future__ import annotations

import numpy as np
from numba import cuda, float32

from kernels_gpu.launch import ELEMENTWISE_THREADS, elementwise_grid, no_scale, result


@cuda.jit(cache=True)
def _gather(table, scale, ids, out):
    """out[t] = table[ids[t]] (* scale[ids[t]] unless `scale` is empty); thread per element,
    consecutive threads along a row, so each row is read and written coalesced."""
    rows, k = out.shape
    for idx in range(cuda.grid(1), rows * k, cuda.gridsize(1)):
        t = idx // k
        i = idx - t * k
        r = ids[t]
        value = float32(table[r, i])
        if scale.size > 0:
            value *= scale[r]
        out[t, i] = value


def _launch(table, scale, ids, out, stream):
    out = result(out, (ids.shape[0], table.shape[1]), np.float32, stream)
    n = ids.shape[0] * table.shape[1]
    if n:
        _gather[elementwise_grid(n), ELEMENTWISE_THREADS, stream](table, scale, ids, out)
    return out


def embed_rows_w8(w, scale, ids, out=None, stream=0):
    """Rows `ids` (T,) of an int8 table w (V, K) with row scales (V,), as float32 (T, K)."""
    return _launch(w, scale, ids, out, stream)


def gather_rows(x, ids, out=None, stream=0):
    """Rows `ids` (T,) of a float32 (R, K) array: an embedding lookup, or the rows whose
    logits are wanted."""
    return _launch(x, no_scale(), ids, out, stream)
