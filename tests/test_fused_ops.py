"""The CPU backend's fused ops against the unfused computation in plain numpy.

norm_linear (rmsnorm + linear), linear_add_ (gate product + linear + residual add) and
attention on fused projections (split + rope + cache write + paged attention) each run as one
kernel call on int8 weights; here every format is checked against float64 numpy, over shapes
that take every kernel path: 1, 2 and 17 tokens, rows of 1, 17, 576 and 4097 columns, GQA
ratios 1 to 4, head dims that are not multiples of the SIMD width, ragged batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.backends.cpu import CPUBackend
from engine.kv_cache import ForwardBatch, PagedKVCache
from engine.loader.gguf_blocks import dequantize
from engine.weights import BlockWeight, ColskipInt8Weight, DenseWeight, SparseInt8Weight
from kernels_cpu.sparse_int8 import unpack_bitmask
from tests.test_backend_out import FORMATS, make_weight


def weight(rng, fmt: str, n: int, k: int, bias: bool):
    """A weight of each format; activation-sparse ones drop only exact zeros here, so the
    float64 reference needs no threshold (test_colskip_int8 checks the skipping)."""
    w = make_weight(rng, fmt, n, k, bias)
    return dataclasses.replace(w, threshold=0.0) if fmt == "colskip" else w


def dequantized(w) -> np.ndarray:
    """The float64 (N, K) matrix a weight of any format stands for."""
    if isinstance(w, DenseWeight):
        return w.data.astype(np.float64)
    if isinstance(w, BlockWeight):
        return dequantize(w).astype(np.float64)
    if isinstance(w, SparseInt8Weight):
        data = unpack_bitmask(w.mask, w.values, w.row_ptr, w.in_features)
    elif isinstance(w, ColskipInt8Weight):
        data = w.data_t.T
    else:
        data = w.data
    return data.astype(np.float64) * w.scale[:, None].astype(np.float64)


def rmsnorm_ref(x: np.ndarray, norm: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm


def silu_mul_ref(gate_up: np.ndarray) -> np.ndarray:
    gate, up = np.split(gate_up.astype(np.float64), 2, axis=1)
    return gate / (1 + np.exp(-gate)) * up


def assert_linear_close(got, h, w_ref, bias=None, step=2e-4):
    """Within the activation rounding of the exact product (`step` of each row's largest
    input: int16 activations by default, 1/254 of a block's for int8 ones), plus float32
    rounding."""
    want = h @ w_ref.T + (0 if bias is None else bias)
    bound = step * np.abs(h).max(axis=1, keepdims=True) * np.abs(w_ref).sum(axis=1)
    assert np.all(np.abs(got - want) <= bound + 1e-4 * (1 + np.abs(want))), np.abs(got - want).max()


# Formats and shapes through every kernel path: GEMV (1-2 tokens) and GEMM, one column,
# odd widths, one SIMD block and several.
LINEAR_CASES = {
    "fmt": st.sampled_from(FORMATS),
    "tokens": st.sampled_from([1, 2, 17]),
    "n": st.sampled_from([1, 17, 64]),
    "k": st.sampled_from([1, 17, 576, 4097]),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=40, deadline=None)
@given(**LINEAR_CASES, bias=st.booleans())
def test_norm_linear_is_rmsnorm_then_linear(fmt, tokens, n, k, bias, seed):
    rng = np.random.default_rng(seed)
    w = weight(rng, fmt, n, k, bias)
    x = rng.standard_normal((tokens, k)).astype(np.float32) * 3
    norm = rng.standard_normal(k).astype(np.float32)
    got = CPUBackend().norm_linear(x, norm, 1e-5, w)
    assert_linear_close(got, rmsnorm_ref(x, norm, 1e-5), dequantized(w), w.bias, step_of(w))


@settings(max_examples=40, deadline=None)
@given(**LINEAR_CASES, gated=st.booleans())
def test_linear_add_adds_the_linear_into_the_residual(fmt, tokens, n, k, gated, seed):
    rng = np.random.default_rng(seed)
    w = weight(rng, fmt, n, k, bias=False)
    x = rng.standard_normal((tokens, 2 * k if gated else k)).astype(np.float32) * 4
    residual = rng.standard_normal((tokens, n)).astype(np.float32)
    before = residual.astype(np.float64)
    assert CPUBackend().linear_add_(residual, x, w, gated=gated) is residual
    h = silu_mul_ref(x) if gated else x.astype(np.float64)
    assert_linear_close(residual - before, h, dequantized(w), step=step_of(w))


def step_of(w) -> float:
    """The activations' rounding step: int8 per 32 inputs for block formats, else int16."""
    return 1 / 250 if isinstance(w, BlockWeight) else 2e-4


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fused_linears_give_the_composed_bits(fmt):
    """The int8 and block kernels' prologue and epilogue are the standalone kernels' own row
    functions: fusing changes no bit, in the GEMV (1-2 tokens) or the GEMM."""
    import kernels_cpu

    rng = np.random.default_rng(0)
    be = CPUBackend()
    w = make_weight(rng, fmt, 33, 96, bias=False)
    norm = rng.standard_normal(96).astype(np.float32)
    for tokens in (1, 2, 3, 16):
        x = rng.standard_normal((tokens, 96)).astype(np.float32)
        gate_up = rng.standard_normal((tokens, 192)).astype(np.float32)
        fused = be.norm_linear(x, norm, 1e-5, w)
        assert np.array_equal(fused, be.linear(kernels_cpu.rmsnorm(x, norm, 1e-5), w))
        residual = rng.standard_normal((tokens, 33)).astype(np.float32)
        want = residual + be.linear(kernels_cpu.silu_mul(gate_up), w)
        assert np.array_equal(be.linear_add_(residual, gate_up, w, gated=True), want)


def rope_ref(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x (T, H, D), in float64 from float32 angles as transformers forms them."""
    angle = (positions[:, None].astype(np.float32) * inv_freq[None, :]).astype(np.float64)
    cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def attention_ref(qkv_seq, heads, kv_heads, dim, inv_freq, scale, window, new):
    """Causal attention of the last `new` tokens of one sequence's qkv (L, ...) over all L."""
    length = qkv_seq.shape[0]
    pos = np.arange(length)
    x = qkv_seq.astype(np.float64)
    q = rope_ref(x[:, : heads * dim].reshape(length, heads, dim), pos, inv_freq)
    k_end = (heads + kv_heads) * dim
    k = rope_ref(x[:, heads * dim : k_end].reshape(length, kv_heads, dim), pos, inv_freq)
    v = x[:, k_end:].reshape(length, kv_heads, dim)
    group = heads // kv_heads
    out = np.zeros((new, heads, dim))
    for row, p in enumerate(range(length - new, length)):
        lo = max(0, p - window + 1) if window else 0
        for h in range(heads):
            s = k[lo : p + 1, h // group] @ q[p, h] * scale
            e = np.exp(s - s.max())
            out[row, h] = (e / e.sum()) @ v[lo : p + 1, h // group]
    return out.reshape(new, heads * dim)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@settings(max_examples=25, deadline=None)
@given(
    kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([2, 6, 10, 64, 72]),
    contexts=st.lists(
        st.tuples(st.integers(0, 40), st.sampled_from([1, 17])), min_size=1, max_size=3
    ),
    window=st.sampled_from([0, 5]),
    seed=st.integers(0, 2**16),
)
def test_attention_on_fused_projections(kv_dtype, kv_heads, group, dim, contexts, window, seed):
    """Sequences with `cached` tokens already in the cache (written by earlier passes) run
    `new` tokens together in one ragged pass."""
    rng = np.random.default_rng(seed)
    heads = group * kv_heads
    be = CPUBackend()
    cache = PagedKVCache(be, 1, kv_heads, dim, 64, 16, kv_dtype)
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    width = (heads + 2 * kv_heads) * dim
    seqs = {i: rng.standard_normal((c + n, width)).astype(np.float32) for i, (c, n) in
            enumerate(contexts)}  # fmt: skip
    scale = dim**-0.5
    for i, (cached, _) in enumerate(contexts):
        cache.add_sequence(i, [])
        if cached:
            batch = ForwardBatch.build(cache, [(i, [0] * cached)])
            be.attention(0, seqs[i][:cached], batch, heads, inv_freq, scale, window)
            cache.commit(i, [0] * cached)
    batch = ForwardBatch.build(cache, [(i, [0] * n) for i, (_, n) in enumerate(contexts)])
    qkv = np.concatenate([seqs[i][c:] for i, (c, _) in enumerate(contexts)])
    got = be.attention(0, qkv, batch, heads, inv_freq, scale, window)
    want = np.concatenate([
        attention_ref(seqs[i], heads, kv_heads, dim, inv_freq, scale, window, n)
        for i, (_, n) in enumerate(contexts)
    ])  # fmt: skip
    tol = 6e-2 if kv_dtype == "int8" else 2e-4  # int8 rows: each element within max/254
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_a_token_attends_alike_alone_in_a_batch_and_in_a_prefill(kv_dtype):
    """Long contexts are attended in parts; a decode step of few jobs spreads the parts over
    the cores and merges them afterwards, a prefill merges them job by job. The last token of
    a 700-token sequence gets the same bits both ways, and in a batch with another sequence."""
    heads, kv_heads, dim, length = 4, 2, 64, 700
    rng = np.random.default_rng(0)
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    qkv = rng.standard_normal((length, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    other = rng.standard_normal((30, qkv.shape[1])).astype(np.float32)

    def last_row(chunks):
        """Run the chunks (sequence id, qkv rows) as successive passes; the last pass's output
        row of sequence 0."""
        be = CPUBackend()
        cache = PagedKVCache(be, 1, kv_heads, dim, 64, 16, kv_dtype)
        for pass_chunks in chunks:
            for seq, _ in pass_chunks:
                if seq not in cache:
                    cache.add_sequence(seq, [])
            batch = ForwardBatch.build(cache, [(seq, [0] * len(x)) for seq, x in pass_chunks])
            x = np.concatenate([x for _, x in pass_chunks])
            out = be.attention(0, x, batch, heads, inv_freq, dim**-0.5, 0)
            for seq, rows in pass_chunks:
                cache.commit(seq, [0] * len(rows))
        return out[len(pass_chunks[0][1]) - 1]

    prefill = last_row([[(0, qkv)]])
    alone = last_row([[(0, qkv[:-1])], [(0, qkv[-1:])]])
    batched = last_row([[(0, qkv[:-1]), (1, other[:-1])], [(0, qkv[-1:]), (1, other[-1:])]])
    np.testing.assert_array_equal(alone, prefill)
    np.testing.assert_array_equal(batched, prefill)


def test_a_biased_linear_adds_its_bias_before_the_residual():
    """residual += (x @ W + b), rounded as the unfused ops round it, on both GEMV and GEMM."""
    rng = np.random.default_rng(3)
    be = CPUBackend()
    w = make_weight(rng, "int8", 33, 96, bias=True)
    for tokens in (1, 5):
        x = rng.standard_normal((tokens, 96)).astype(np.float32)
        residual = rng.standard_normal((tokens, 33)).astype(np.float32) * 100
        want = residual + be.linear(x, w)
        np.testing.assert_array_equal(be.linear_add_(residual, x, w), want)
