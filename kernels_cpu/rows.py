"""Row-wise helpers of the forward pass: gathers (embedding lookups in a float table, the rows
whose logits are wanted) and adding a bias to every row; page-aligned weight arrays."""

import numpy as np
from numba import njit

PAGE = 4096


def page_aligned_empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a page: input-major weights whose rows
    are skipped must not share their last page with the next row (see colskip_int8)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(size + PAGE, np.uint8)
    start = -buf.ctypes.data % PAGE
    return buf[start : start + size].view(dtype).reshape(shape)


@njit(cache=True)
def take_rows_into(x: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out (R, K) = x[rows] as float32, for x (N, K) of any real dtype and rows (R,) ints.

    np.take(..., out=) would buffer through a temporary whenever it checks the indices
    (mode="raise"); this loop checks them and writes `out` directly.
    """
    n, k = x.shape
    if out.shape[0] != rows.shape[0] or out.shape[1] != k:
        raise ValueError("out must be (len(rows), K)")
    for t in range(rows.shape[0]):
        r = rows[t]
        if r < 0 or r >= n:
            raise IndexError("row index out of range")
        for i in range(k):
            out[t, i] = x[r, i]


@njit(cache=True)
def put_rows(src: np.ndarray, rows: np.ndarray, dst: np.ndarray) -> None:
    """dst[rows[i]] = src[i]: the inverse of take_rows_into, for distinct rows."""
    n, k = dst.shape
    if src.shape[0] != rows.shape[0] or src.shape[1] != k:
        raise ValueError("src must be (len(rows), K)")
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0 or r >= n:
            raise IndexError("row index out of range")
        for c in range(k):
            dst[r, c] = src[i, c]


@njit(cache=True)
def add_bias_inplace(x: np.ndarray, bias: np.ndarray) -> None:
    """x (T, N) += bias (N,) on every row. numpy's broadcasting `x += bias` goes through a
    temporary as large as x."""
    rows, n = x.shape
    if bias.shape[0] != n:
        raise ValueError("bias must have one entry per column")
    for t in range(rows):
        for i in range(n):
            x[t, i] += bias[i]


@njit(cache=True)
def masked_copy_into(x: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    """out[i] = x[i] where bit i of the int32 words `mask` is set (bit i % 32 of word
    i // 32, as llguidance writes token masks), else -inf; for out (N,) and x (>= N,).

    Ten times numpy's unpackbits + where on a 49k vocabulary, once per constrained token.
    """
    n = out.shape[0]
    if x.shape[0] < n or mask.shape[0] * 32 < n:
        raise ValueError("x and mask must cover out")
    for w in range((n + 31) // 32):
        word = mask[w]
        base = w * 32
        for b in range(min(32, n - base)):
            out[base + b] = x[base + b] if (word >> b) & 1 else -np.inf
