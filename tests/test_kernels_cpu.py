"""kernels_cpu against plain numpy references, with hypothesis over shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels_cpu
from kernels_cpu.gemv_f32 import matmul_f32, matmul_f32_into

SIZES = st.sampled_from([1, 2, 3, 17, 64, 130])


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(tokens=SIZES, width=st.sampled_from([1, 17, 300]), seed=st.integers(0, 2**16))
def test_gelu_tanh_gate_matches_numpy(tokens, width, seed):
    rng = np.random.default_rng(seed)
    gate_up = rand(rng, tokens, 2 * width) * 3
    out = np.empty((tokens, width), np.float32)
    kernels_cpu.activations.gelu_tanh_mul_into(gate_up, out)
    g, up = gate_up[:, :width].astype(np.float64), gate_up[:, width:]
    ref = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * up
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(tokens=SIZES, dim=st.sampled_from([2, 16, 128]), seed=st.integers(0, 2**16))
def test_head_rmsnorm_matches_numpy(tokens, dim, seed):
    """Each head of the slice normalised on its own; columns outside it untouched."""
    rng = np.random.default_rng(seed)
    heads, start = 3, 7
    x = rng.standard_normal((tokens, start + heads * dim + 5)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    got = x.copy()
    kernels_cpu.norms.head_rmsnorm_(got, start, heads, w, 1e-6)
    want = x.astype(np.float64)
    part = want[:, start : start + heads * dim].reshape(tokens, heads, dim)
    part = part / np.sqrt((part**2).mean(axis=2, keepdims=True) + 1e-6) * w
    want[:, start : start + heads * dim] = part.reshape(tokens, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(tokens=SIZES, dim=st.sampled_from([1, 8, 17, 576, 4097]), seed=st.integers(0, 2**16))
def test_rmsnorm(tokens, dim, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, tokens, dim), rand(rng, dim)
    ref = w * (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5))
    np.testing.assert_allclose(kernels_cpu.rmsnorm(x, w, 1e-5), ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(tokens=SIZES, width=st.sampled_from([1, 17, 96, 4097]), seed=st.integers(0, 2**16))
def test_silu_mul(tokens, width, seed):
    rng = np.random.default_rng(seed)
    gate, up = rand(rng, tokens, width) * 4, rand(rng, tokens, width)
    ref = gate / (1 + np.exp(-gate.astype(np.float64))) * up
    out = kernels_cpu.silu_mul(np.concatenate([gate, up], axis=1))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_silu_mul_at_extreme_gates():
    """Far outside exp's float32 range silu is gate or 0; the clamped fast exp must agree."""
    gate = np.array([[-1000, -100, -88, -87, -20, -1e-3, 0, 1e-3, 20, 87, 88, 100, 1000]], "f4")
    up = np.full_like(gate, 1.5)
    with np.errstate(over="ignore"):  # exp(1000) is inf in float64 too; silu is then 0
        ref = gate / (1 + np.exp(-gate.astype(np.float64))) * up
    out = kernels_cpu.silu_mul(np.concatenate([gate, up], axis=1))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-30)


@settings(max_examples=30, deadline=None)
@given(
    tokens=SIZES,
    heads=st.integers(1, 9),
    half=st.sampled_from([1, 4, 32]),
    start=st.integers(0, 9000),
    seed=st.integers(0, 2**16),
)
def test_rope_matches_rotate_half(tokens, heads, half, start, seed):
    rng = np.random.default_rng(seed)
    dim = 2 * half
    x = rand(rng, tokens, heads, dim)
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    pos = np.arange(start, start + tokens, dtype=np.int64)
    angle = (pos[:, None].astype(np.float32) * inv_freq[None, :]).astype(np.float64)
    cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None, :]
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    ref = x * cos + rotated * sin
    out = np.empty_like(x)
    flat = np.concatenate([rand(rng, tokens, 3), x.reshape(tokens, -1)], axis=1)  # at column 3
    cos_t = np.empty((tokens, half), dtype=np.float32)
    sin_t = np.empty_like(cos_t)
    kernels_cpu.rope_angles_into(pos, inv_freq, cos_t, sin_t)
    for t in range(tokens):
        kernels_cpu.rope_heads(flat, t, 3, cos_t, sin_t, out)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def attention_reference(q, k, v, start, scale, window):
    tokens, heads, _ = q.shape
    group = heads // k.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for t in range(tokens):
        pos = start + t
        lo = max(0, pos - window + 1) if window else 0
        for h in range(heads):
            keys = k[lo : pos + 1, h // group].astype(np.float64)
            s = keys @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[lo : pos + 1, h // group]
    return out


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 4]),
    n=st.sampled_from([1, 15, 16, 17, 100]),
    k=st.sampled_from([1, 17, 576, 4097]),
    seed=st.integers(0, 2**16),
)
def test_matmul_f32(tokens, n, k, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, tokens, k), rand(rng, n, k)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(matmul_f32(x, w), ref, rtol=1e-4, atol=1e-3)


def int8_matrix(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(-127, 128, size=(n, k), dtype=np.int8), rng.random(n).astype(np.float32)


def w8_reference(x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ (w.astype(np.float64) * scale[:, None]).T


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 3, 4]),
    n=st.sampled_from([1, 3, 4, 5, 17, 64, 4097]),
    k=st.sampled_from([1, 7, 17, 32, 576, 2047, 2048, 4097]),
    seed=st.integers(0, 2**16),
)
def test_gemv_w8_matches_float_reference(tokens, n, k, seed):
    """Decode GEMV: int16 activations keep it within float32-like error of the exact product."""
    from kernels_cpu.matmul_int8 import gemv_w8

    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, k)
    w, scale = int8_matrix(rng, n, k)
    ref = w8_reference(x, w, scale)
    bound = 2e-4 * np.abs(x).max() * np.abs(w * scale[:, None]).sum(axis=1)
    assert np.all(np.abs(gemv_w8(x, w, scale) - ref) <= bound + 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 5, 6, 7, 17, 64]),  # 4-token tiles, a pair, an odd one
    n=st.sampled_from([1, 3, 4, 5, 17, 130]),
    # 2048 is the longest row one SIMD call covers; 2064 needs two column blocks.
    k=st.sampled_from([1, 7, 17, 32, 576, 2048, 2064, 4097]),
    seed=st.integers(0, 2**16),
)
def test_gemm_w8_is_exact_on_int8_activations(tokens, n, k, seed):
    """W8A8: activations already on an int8 grid (times a per-token scale) give exact sums."""
    from kernels_cpu.matmul_int8 import gemm_w8

    rng = np.random.default_rng(seed)
    grid = rng.integers(-127, 128, size=(tokens, k)).astype(np.float32)
    grid[:, 0] = 127  # pin each token's absmax so its scale is exactly the one chosen below
    x = grid * rng.choice([0.5, 0.25, 2.0], size=(tokens, 1)).astype(np.float32)
    w, scale = int8_matrix(rng, n, k)
    ref = w8_reference(x, w, scale)
    np.testing.assert_allclose(gemm_w8(x, w, scale, 127), ref, rtol=1e-5, atol=1e-5 * k)


@settings(max_examples=20, deadline=None)
@given(
    tokens=st.sampled_from([1, 9, 64]), k=st.sampled_from([1, 17, 4097]), seed=st.integers(0, 99)
)
@pytest.mark.parametrize("act_max", [127, 32767])
def test_gemm_w8_error_is_bounded_by_activation_rounding(tokens, k, seed, act_max):
    """Arbitrary activations: the error is at most half a quantization step per activation."""
    from kernels_cpu.matmul_int8 import gemm_w8

    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, k)
    w, scale = int8_matrix(rng, 33, k)
    step = np.abs(x).max(axis=1, keepdims=True) / act_max
    bound = 0.5 * step * np.abs(w * scale[:, None]).sum(axis=1) * 1.001 + 1e-4
    got = gemm_w8(x, w, scale, act_max)
    assert np.all(np.abs(got - w8_reference(x, w, scale)) <= bound)


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.sampled_from([2, 3, 5]),
    n=st.sampled_from([1, 17, 130]),
    k=st.sampled_from([7, 576, 2064]),
    accumulate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemv_w8_tokens_together_equal_one_by_one_bit_for_bit(tokens, n, k, accumulate, seed):
    """The GEMV's two-token tile (a row against two tokens per pass) rounds as its one-token
    tile: a verification pass or a batch of two gives each token its own decode's bits."""
    from kernels_cpu.matmul_int8 import gemv_w8_into

    def together(x, w, scale, out, a, a_scale, accumulate):
        gemv_w8_into(x, w, scale, out, a, a_scale, accumulate=accumulate)

    assert_rows_equal_one_by_one(together, tokens, n, k, accumulate, seed)


def assert_rows_equal_one_by_one(run, tokens, n, k, accumulate, seed) -> None:
    """`run` over all tokens gives each token's row the bits of the one-token GEMV, storing
    or adding into out."""
    from kernels_cpu.matmul_int8 import gemv_w8_into

    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, k)
    w, scale = int8_matrix(rng, n, k)
    start = rand(rng, tokens, n)
    got = start.copy()
    a, a_scale = np.empty((tokens, k), np.int16), np.empty(tokens, np.float32)
    run(x, w, scale, got, a, a_scale, accumulate)
    for t in range(tokens):
        one = start[t : t + 1].copy()
        gemv_w8_into(x[t : t + 1], w, scale, one, a[:1], a_scale[:1], accumulate=accumulate)
        assert np.array_equal(got[t], one[0])


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.sampled_from([3, 4, 6, 7, 17]),
    n=st.sampled_from([4, 5, 130]),
    k=st.sampled_from([32, 576, 2048, 2064]),  # one SIMD call per row (scaled tiles), or not
    accumulate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_w8_rows_equal_gemv_w8_bit_for_bit(tokens, n, k, accumulate, seed):
    """Every GEMM tile (the scaled 4x4 and 4x2 tiles, the edge tiles) rounds as the GEMV does,
    storing or adding into out: a token's output does not depend on its batch."""
    from kernels_cpu.matmul_int8 import INT16_MAX, gemm_w8_into

    def gemm(x, w, scale, out, a, a_scale, accumulate):
        gemm_w8_into(x, w, scale, INT16_MAX, out, a, a_scale, accumulate=accumulate)

    assert_rows_equal_one_by_one(gemm, tokens, n, k, accumulate, seed)


def test_zero_activations_give_zero_and_no_nan():
    from kernels_cpu.matmul_int8 import gemm_w8, gemv_w8

    w, scale = int8_matrix(np.random.default_rng(0), 9, 40)
    zeros = np.zeros((8, 40), np.float32)
    for out in (gemv_w8(zeros[:1], w, scale), gemm_w8(zeros, w, scale, 127)):
        assert np.array_equal(out, np.zeros((out.shape[0], 9), np.float32))


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 17, 300]), k=st.sampled_from([1, 17, 64]), seed=st.integers(0, 2**16))
def test_int8_embedding_lookup(n, k, seed):
    from kernels_cpu.matmul_int8 import embed_rows_w8

    rng = np.random.default_rng(seed)
    w, scale = int8_matrix(rng, n, k)
    ids = rng.integers(0, n, size=9)
    full = w.astype(np.float32) * scale[:, None]
    np.testing.assert_allclose(embed_rows_w8(w, scale, ids), full[ids], rtol=1e-6)


def test_into_kernels_refuse_buffers_of_the_wrong_shape():
    """They index without bounds checks, so a short `out` or scratch must be an error."""
    from kernels_cpu.matmul_int8 import gemm_w8_into, gemv_w8_into

    rng = np.random.default_rng(0)
    x, w = rand(rng, 3, 40), rand(rng, 9, 40)
    w8, scale = int8_matrix(rng, 9, 40)
    a, a_scale, short = np.empty((3, 40), np.int16), np.empty(3, np.float32), np.empty((3, 8), "f4")
    with pytest.raises(ValueError, match="out"):
        gemv_w8_into(x, w8, scale, short, a, a_scale)
    with pytest.raises(ValueError, match="a must be"):
        gemm_w8_into(x, w8, scale, 127, np.empty((3, 9), "f4"), a[:, :20].copy(), a_scale)
    with pytest.raises(ValueError):
        matmul_f32_into(x, w, short)
    with pytest.raises(ValueError):
        kernels_cpu.rmsnorm_into(x, w[0], 1e-5, short)
    with pytest.raises(ValueError):
        kernels_cpu.silu_mul_into(x, short)


def test_row_gathers_check_the_indices():
    from kernels_cpu.matmul_int8 import embed_rows_w8

    rng = np.random.default_rng(0)
    table = rand(rng, 5, 3)
    out = np.empty((2, 3), np.float32)
    kernels_cpu.take_rows_into(table, np.array([4, 0]), out)
    np.testing.assert_array_equal(out, table[[4, 0]])
    with pytest.raises(IndexError):
        kernels_cpu.take_rows_into(table, np.array([5, 0]), out)
    with pytest.raises(IndexError):
        embed_rows_w8(*int8_matrix(rng, 5, 3), np.array([0, -1]))


def test_add_bias_inplace():
    rng = np.random.default_rng(0)
    x, bias = rand(rng, 4, 7), rand(rng, 7)
    want = x + bias
    kernels_cpu.add_bias_inplace(x, bias)
    np.testing.assert_array_equal(x, want)
