"""The bitmask sparse int8 format and its matmul, against the dense int8 GEMV bit for bit.

Every path the host can run is checked (the host's own, which the engine uses, and the
simpler ones below it), so the SSSE3 and portable fallbacks stay tested on AVX2 machines.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_cpu import sparse_int8 as sp
from kernels_cpu.matmul_int8 import gemv_w8

RUNNABLE = list(sp.KINDS[sp.KINDS.index(sp.KIND) :])
SHAPES_N = (1, 3, 4, 17, 130)
SHAPES_K = (1, 7, 16, 17, 576, 2048, 4097)


def _pruned(rng: np.random.Generator, n: int, k: int, sparsity: float, pattern: str):
    """A random int8 (n, k) matrix, the full range -128..127, with `sparsity` of it zeroed.

    "2:4" keeps two of every four columns; `sparsity` then only says which matrices are
    pruned at all (0 keeps everything).
    """
    w = rng.integers(-128, 128, size=(n, k), dtype=np.int8)
    if pattern == "2:4" and sparsity > 0:
        groups = -(-k // 4)
        keep = np.argsort(rng.random((n, groups, 4)), axis=2)[:, :, :2]
        kept = np.zeros((n, groups, 4), dtype=bool)
        np.put_along_axis(kept, keep, True, axis=2)
        w[~kept.reshape(n, groups * 4)[:, :k]] = 0
    else:
        w[rng.random((n, k)) < sparsity] = 0
    return w


@st.composite
def problems(draw):
    tokens = draw(st.integers(1, 8), label="tokens")
    n = draw(st.sampled_from(SHAPES_N), label="n")
    k = draw(st.sampled_from(SHAPES_K), label="k")
    sparsity = draw(
        st.one_of(st.sampled_from((0.0, 0.5, 0.7, 1.0)), st.floats(0.0, 1.0)), label="sparsity"
    )
    pattern = draw(st.sampled_from(("unstructured", "2:4")), label="pattern")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    w = _pruned(rng, n, k, sparsity, pattern)
    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.01, 100)).astype(np.float32)
    scale = rng.uniform(1e-4, 1e-1, size=n).astype(np.float32)
    return x, w, scale


@pytest.mark.parametrize("kind", RUNNABLE)
@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_sparse_matmul_equals_dense_gemv(kind, problem):
    x, w, scale = problem
    packed = sp.pack_bitmask(w)
    got = sp.sparse_matmul_w8(x, *packed, scale, w.shape[1], kind=kind)
    assert got.dtype == np.float32
    assert np.array_equal(got, gemv_w8(x, w, scale))


@pytest.mark.parametrize("kind", RUNNABLE)
def test_extreme_values_do_not_overflow(kind):
    """-128 weights times the largest activations over blocks of columns stay exact."""
    k = 4097
    w = np.full((5, k), -128, dtype=np.int8)
    w[1] = 127
    w[2, ::2] = 0
    x = np.full((3, k), 7.5, dtype=np.float32)
    x[1] = -7.5
    scale = np.ones(5, dtype=np.float32)
    got = sp.sparse_matmul_w8(x, *sp.pack_bitmask(w), scale, k, kind=kind)
    assert np.array_equal(got, gemv_w8(x, w, scale))
    assert got[0, 0] == np.float32(-128 * 7.5 * k)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.sampled_from((1, 7, 8, 15, 16, 17, 33, 576, 4097)),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_layout_and_round_trip(n, k, sparsity, seed):
    w = _pruned(np.random.default_rng(seed), n, k, sparsity, "unstructured")
    mask, values, row_ptr = sp.pack_bitmask(w)
    kp = -(-k // 16) * 16
    assert mask.dtype == np.uint8 and mask.shape == (n, kp // 8)
    assert values.dtype == np.int8 and row_ptr.dtype == np.int64 and row_ptr.shape == (n + 1,)
    cols = np.arange(k)
    bits = (mask[:, cols // 8] >> (cols % 8)) & 1
    assert np.array_equal(bits.astype(bool), w != 0)
    assert not np.unpackbits(mask, axis=1, bitorder="little")[:, k:].any()
    for r in range(n):
        assert np.array_equal(values[row_ptr[r] : row_ptr[r + 1]], w[r][w[r] != 0])
    assert row_ptr[0] == 0 and values.shape == (row_ptr[-1] + 16,)
    assert not values[row_ptr[-1] :].any()
    assert np.array_equal(sp.unpack_bitmask(mask, values, row_ptr, k), w)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_packed_bytes_at_half_sparsity(pattern):
    """Half the values plus a bit a weight: 0.625 of the dense bytes, plus 8 bytes a row."""
    w = _pruned(np.random.default_rng(0), 256, 4096, 0.5, pattern)
    mask, values, row_ptr = sp.pack_bitmask(w)
    assert (mask.nbytes + values.nbytes + row_ptr.nbytes) / w.nbytes < 0.64


def test_unpack_rejects_inconsistent_parts():
    w = _pruned(np.random.default_rng(2), 4, 20, 0.5, "unstructured")
    mask, values, row_ptr = sp.pack_bitmask(w)
    with pytest.raises(ValueError):
        sp.unpack_bitmask(mask, values, row_ptr[:-1], 20)
    with pytest.raises(ValueError):
        sp.unpack_bitmask(mask, values[:-1], row_ptr, 20)
    with pytest.raises(ValueError):
        sp.unpack_bitmask(mask, values, row_ptr, 40)
    with pytest.raises(ValueError):
        sp.pack_bitmask(w.astype(np.int16))


def test_matmul_rejects_mismatched_shapes():
    w = _pruned(np.random.default_rng(3), 4, 20, 0.5, "unstructured")
    packed = sp.pack_bitmask(w)
    scale = np.ones(4, dtype=np.float32)
    with pytest.raises(ValueError):
        sp.sparse_matmul_w8(np.ones((1, 40), np.float32), *packed, scale, 40)
    with pytest.raises(ValueError):
        sp.sparse_matmul_w8(np.ones((1, 20), np.float32), *packed, scale[:3], 20)
