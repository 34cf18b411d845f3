"""The column-skipping int8 GEMV (TEAL activation sparsity) against a float64 numpy reference.

The reference is the definition: xs is x with every |x| <= threshold set to 0, and the result
is xs @ (W * scale[:, None]).T. The kernel sums in float32 (fused multiply-adds, then one
addition per thread's partial and one multiplication by the scale), so each output may differ
from the reference by at most (2 K + 16) * 2**-24 * sum_k |xs[t, k]| |W[n, k]| scale[n]: a
float32 rounding per term with room for the unfused scalar tail (two roundings per term).
"""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_cpu.colskip_int8 import ROW_BLOCK, _compact, colskip_matmul_w8, to_input_major

KS = [1, 7, 17, 576, 4097]
NS = [1, 3, 17, 130, 1000]
MODES = ["none", "40%", "all", "random", "exact zeros"]


def reference(x, w, scale, threshold):
    """Float64 result and error scale sum |xs| |w| scale, both (T, N)."""
    xs = np.where(np.abs(x) <= threshold, 0, x).astype(np.float64)
    ws = w.astype(np.float64) * scale[:, None].astype(np.float64)
    return xs @ ws.T, np.abs(xs) @ np.abs(ws).T


def assert_close(out, x, w, scale, threshold):
    ref, size = reference(x, w, scale, threshold)
    assert out.dtype == np.float32 and out.shape == ref.shape
    bound = (2 * x.shape[1] + 16) * 2.0**-24 * size
    assert np.all(np.abs(out - ref) <= bound)


def make_case(rng, tokens, k, n, mode):
    """Random x, int8 w and scales, and a threshold giving `mode`'s share of zero inputs."""
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    scale = (rng.random(n) + 0.5).astype(np.float32)
    mags = np.sort(np.abs(x).ravel())
    if mode == "none":
        threshold = 0.0
    elif mode == "40%":  # an actual |x| value, so entries equal to it are dropped too
        threshold = float(mags[int(0.4 * (mags.size - 1))])
    elif mode == "all":
        threshold = float(mags[-1])
    elif mode == "random":
        threshold = float(rng.uniform(0, mags[-1]))
    else:
        x[rng.random(x.shape) < 0.5] = 0.0
        threshold = 0.0
    return x, w, scale, threshold


@contextmanager
def numba_threads(count: int):
    before = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        yield
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, numba.config.NUMBA_NUM_THREADS])
@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 6),
    k=st.sampled_from(KS),
    n=st.sampled_from(NS),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(threads, tokens, k, n, mode, seed):
    """With one job, or as many as numba has threads (one float32 partial each)."""
    x, w, scale, threshold = make_case(np.random.default_rng(seed), tokens, k, n, mode)
    with numba_threads(threads):
        out = colskip_matmul_w8(x, to_input_major(w), scale, threshold)
    assert_close(out, x, w, scale, threshold)


@pytest.mark.parametrize("tokens", [1, 5])
def test_all_zero_input_gives_zeros(tokens):
    rng = np.random.default_rng(tokens)
    x = np.zeros((tokens, 576), dtype=np.float32)
    w = rng.integers(-127, 128, size=(130, 576), dtype=np.int8)
    out = colskip_matmul_w8(x, to_input_major(w), np.ones(130, np.float32), 0.0)
    assert np.array_equal(out, np.zeros((tokens, 130), np.float32))


def test_threshold_above_every_input_gives_zeros():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1000)).astype(np.float32)
    w = rng.integers(-127, 128, size=(17, 1000), dtype=np.int8)
    out = colskip_matmul_w8(x, to_input_major(w), np.ones(17, np.float32), 10.0)
    assert np.array_equal(out, np.zeros((3, 17), np.float32))


def test_nan_input_propagates_like_the_dense_product():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[1, 5] = np.nan
    w = rng.integers(-127, 128, size=(9, 64), dtype=np.int8)
    out = colskip_matmul_w8(x, to_input_major(w), np.ones(9, np.float32), 0.5)
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[0]))
    assert_close(out[:1], x[:1], w, np.ones(9, np.float32), 0.5)


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 6),
    k=st.sampled_from(KS),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_compaction_keeps_exactly_the_columns_some_token_needs(tokens, k, mode, seed):
    """Rows of wt the kernel reads are idx[:count] (then whole blocks of padding that repeat
    the last kept row), so a row is read only if some token keeps its input."""
    x, _, _, threshold = make_case(np.random.default_rng(seed), tokens, k, 1, mode)
    idx, xv, count = _compact(x, threshold)
    keep = ~(np.abs(x) <= threshold)
    assert np.array_equal(idx[:count], np.flatnonzero(keep.any(axis=0)))
    assert np.array_equal(xv[:, :count], np.where(keep, x, 0)[:, idx[:count]])
    assert idx.size % ROW_BLOCK == 0 and idx.size >= count + ROW_BLOCK
    assert xv.shape == (tokens, idx.size) and not xv[:, count:].any()
    if count:
        assert np.all(idx[count:] == idx[count - 1])


@settings(max_examples=20, deadline=None)
@given(n=st.sampled_from(NS), k=st.sampled_from(KS), seed=st.integers(0, 2**16))
def test_to_input_major_round_trip(n, k, seed):
    w = np.random.default_rng(seed).integers(-128, 128, size=(n, k), dtype=np.int8)
    wt = to_input_major(w)
    assert wt.shape == (k, n) and wt.dtype == np.int8 and wt.flags.c_contiguous
    assert wt.ctypes.data % 4096 == 0
    assert np.array_equal(wt.T, w)


def test_rejects_layouts_the_kernel_cannot_read():
    w = np.zeros((8, 16), dtype=np.int8)
    x = np.ones((1, 16), dtype=np.float32)
    scale = np.ones(8, dtype=np.float32)
    with pytest.raises(ValueError):
        to_input_major(w.astype(np.int16))
    with pytest.raises(ValueError):
        colskip_matmul_w8(x, w.T, scale, 0.0)  # a transposed view: columns not contiguous
    with pytest.raises(ValueError):
        colskip_matmul_w8(x, to_input_major(w)[:8], scale, 0.0)  # K mismatch
    with pytest.raises(ValueError):
        colskip_matmul_w8(x, to_input_major(w), scale[:4], 0.0)
