"""kernels_cpu.paged_attention against a dense float64 numpy reference, with hypothesis.

Each sequence's keys and values are generated densely, scattered into randomly chosen blocks
of a shared pool, and the kernel must read them back through the block tables. The reference
never touches the pool, so a wrong block, row, head or position shows up as a mismatch; pool
slots that no sequence owns hold NaN, so reading one poisons the output.

The int8 cache is checked the same way against the reference on its dequantised rows, which
are exact in float32, so the tolerance stays tight; unowned int8 rows carry a NaN scale.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_cpu.paged_attention import (
    paged_attention,
    paged_attention_int8,
    write_kv,
    write_kv_int8,
)

HEADS = [(4, 4), (4, 2), (6, 2), (4, 1), (9, 3)]
# Lengths around the block sizes (1, 4, 16) and the kernel's 64-key tile, plus anything up to 150.
LENGTHS = st.one_of(
    st.sampled_from([1, 2, 3, 4, 5, 15, 16, 17, 33, 63, 64, 65, 129]), st.integers(1, 150)
)


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def reference(q, k, v, scale, window, softcap=0.0):
    """Dense causal attention of q (n, H, D), the last n positions of k/v (L, Hkv, D), float64;
    scores capped to softcap * tanh(score / softcap) when softcap > 0 (as transformers'
    Gemma 2)."""
    n, heads, _ = q.shape
    length, kv_heads, _ = k.shape
    group = heads // kv_heads
    k = np.repeat(k.astype(np.float64), group, axis=1)
    v = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("ihd,phd->hip", q.astype(np.float64), k) * scale
    if softcap > 0:
        scores = np.tanh(scores / softcap) * softcap
    pos = np.arange(length - n, length)[:, None]
    keys = np.arange(length)[None, :]
    visible = keys <= pos
    if window > 0:
        visible &= keys > pos - window
    scores = np.where(visible[None], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hip,phd->ihd", p, v)


def build_batch(rng, lengths, new_tokens, block_size, heads, kv_heads, dim, shared_blocks):
    """Dense per-sequence K/V/Q, and the same K/V scattered into a pool of shuffled blocks.

    Sequence 1 reuses the first `shared_blocks` blocks of sequence 0 (as prefix caching does):
    its dense K/V start with sequence 0's and its block table points at the same blocks.
    """
    ks = [rand(rng, n, kv_heads, dim) for n in lengths]
    vs = [rand(rng, n, kv_heads, dim) for n in lengths]
    shared = shared_blocks * block_size
    if shared:
        ks[1][:shared] = ks[0][:shared]
        vs[1][:shared] = vs[0][:shared]
    counts = [-(-n // block_size) for n in lengths]
    spare = 3
    num_blocks = sum(counts) - shared_blocks + spare
    order = rng.permutation(num_blocks)
    max_blocks = max(counts) + 2
    # Entries past a sequence's last block point at a NaN block: reading one poisons the output.
    tables = np.full((len(lengths), max_blocks), order[-1], dtype=np.int32)
    taken = 0
    for s, count in enumerate(counts):
        own = 0
        if s == 1 and shared_blocks:
            tables[1, :shared_blocks] = tables[0, :shared_blocks]
            own = shared_blocks
        tables[s, own:count] = order[taken : taken + count - own]
        taken += count - own
    k_cache = np.full((num_blocks, block_size, kv_heads, dim), np.nan, dtype=np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    for s, n in enumerate(lengths):
        for p in range(n):
            k_cache[tables[s, p // block_size], p % block_size] = ks[s][p]
            v_cache[tables[s, p // block_size], p % block_size] = vs[s][p]
    qs = [rand(rng, m, heads, dim) * rng.uniform(0.5, 4.0) for m in new_tokens]
    return ks, vs, qs, k_cache, v_cache, tables


def quantize_rows(x):
    """write_kv_int8 of the rows x (L, Hkv, D) into a dense cache; returns (int8, scales)."""
    length, kv_heads, dim = x.shape
    q = np.zeros((length, 1, kv_heads, dim), dtype=np.int8)
    scale = np.zeros((length, 1, kv_heads), dtype=np.float32)
    write_kv_int8(q, np.empty_like(q), scale, np.empty_like(scale), x, x, np.arange(length))
    return q[:, 0], scale[:, 0]


def dequantize(q, scale):
    return q.astype(np.float32) * scale[..., None]


def quantize_pool(cache):
    """The int8 form of a float pool from build_batch: owned rows through write_kv_int8 (the same
    rows, so the same bits, as quantize_rows gives for the dense K/V), NaN rows get a NaN scale.
    """
    kv_heads, dim = cache.shape[2:]
    flat = cache.reshape(-1, kv_heads, dim)
    slots = np.flatnonzero(~np.isnan(flat).any(axis=(1, 2)))
    q = np.zeros(cache.shape, dtype=np.int8)
    scale = np.full(cache.shape[:3], np.nan, dtype=np.float32)
    write_kv_int8(q, np.empty_like(q), scale, np.empty_like(scale), flat[slots], flat[slots], slots)
    return q, scale


def check(data, dim, heads, kv_heads, window, block_size, seed, int8=False, softcap=0.0):
    rng = np.random.default_rng(seed)
    lengths = data.draw(st.lists(LENGTHS, min_size=1, max_size=4), label="lengths")
    new_tokens = [data.draw(st.integers(1, n), label="new") for n in lengths]
    shared_blocks = 0
    if len(lengths) >= 2:
        full_blocks = min(lengths[0], lengths[1]) // block_size
        shared_blocks = data.draw(st.integers(0, min(full_blocks, 3)), label="shared")
    index = data.draw(st.sampled_from([np.int32, np.int64]), label="index dtype")
    ks, vs, qs, k_cache, v_cache, tables = build_batch(
        rng, lengths, new_tokens, block_size, heads, kv_heads, dim, shared_blocks
    )
    query_start = np.concatenate([[0], np.cumsum(new_tokens)]).astype(index)
    context_lens = np.array(lengths, dtype=index)
    scale = 1 / np.sqrt(dim)
    if int8:
        ks = [dequantize(*quantize_rows(k)) for k in ks]
        vs = [dequantize(*quantize_rows(v)) for v in vs]
        k8, k_scale = quantize_pool(k_cache)
        v8, v_scale = quantize_pool(v_cache)
        out = paged_attention_int8(
            np.concatenate(qs),
            k8,
            v8,
            k_scale,
            v_scale,
            tables,
            query_start,
            context_lens,
            scale,
            window,
            softcap,
        )
    else:
        out = paged_attention(
            np.concatenate(qs), k_cache, v_cache, tables, query_start, context_lens, scale, window,
            softcap,
        )  # fmt: skip
    assert out.shape == (sum(new_tokens), heads, dim) and out.dtype == np.float32
    for s in range(len(lengths)):
        ref = reference(qs[s], ks[s], vs[s], scale, window, softcap)
        got = out[query_start[s] : query_start[s + 1]]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    dim=st.sampled_from([8, 64]),
    heads=st.sampled_from(HEADS),
    window=st.sampled_from([0, 3]),
    block_size=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_matches_dense_reference(data, dim, heads, window, block_size, seed):
    check(data, dim, heads[0], heads[1], window, block_size, seed)


@settings(max_examples=15, deadline=None)
@given(
    data=st.data(),
    dim=st.sampled_from([1, 12, 20]),
    window=st.sampled_from([0, 70]),
    block_size=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_odd_head_dim_and_wide_window(data, dim, window, block_size, seed):
    """Head sizes that are not a multiple of 8 take the scalar tails; a window wider than a tile."""
    check(data, dim, 6, 2, window, block_size, seed)


@settings(max_examples=20, deadline=None)
@given(
    data=st.data(),
    heads=st.sampled_from(HEADS),
    window=st.sampled_from([0, 3]),
    softcap=st.sampled_from([0.5, 2.0, 50.0]),
    int8=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_soft_caps_scores(data, heads, window, softcap, int8, seed):
    """Gemma 2's soft-capping: each score (after the scale) becomes softcap * tanh(score /
    softcap) before the softmax, float32 and int8 caches alike."""
    check(data, 8, heads[0], heads[1], window, 4, seed, int8=int8, softcap=softcap)


@pytest.mark.parametrize("window", [0, 100])
def test_long_decode_batch(window):
    """Decode steps over contexts of several tiles, where the online-softmax rescale matters."""
    rng = np.random.default_rng(window)
    lengths, new_tokens, block_size = [700, 1, 257], [1, 1, 3], 16
    ks, vs, qs, k_cache, v_cache, tables = build_batch(
        rng, lengths, new_tokens, block_size, 9, 3, 64, 0
    )
    # Peaky queries: later tiles often raise the running max.
    qs = [q * 3 for q in qs]
    query_start = np.array([0, 1, 2, 5])
    out = paged_attention(
        np.concatenate(qs), k_cache, v_cache, tables, query_start, np.array(lengths), 0.125, window
    )
    for s in range(3):
        ref = reference(qs[s], ks[s], vs[s], 0.125, window)
        np.testing.assert_allclose(
            out[query_start[s] : query_start[s + 1]], ref, rtol=1e-4, atol=1e-4
        )


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.sampled_from([1, 4, 16]),
    num_blocks=st.integers(1, 6),
    kv_heads=st.sampled_from([1, 2, 3]),
    dim=st.sampled_from([8, 64]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_write_kv_round_trip(block_size, num_blocks, kv_heads, dim, data, seed):
    rng = np.random.default_rng(seed)
    capacity = num_blocks * block_size
    tokens = data.draw(st.integers(0, capacity), label="tokens")
    slots = rng.choice(capacity, size=tokens, replace=False).astype(np.int64)
    k_cache = rand(rng, num_blocks, block_size, kv_heads, dim)
    v_cache = rand(rng, num_blocks, block_size, kv_heads, dim)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    k, v = rand(rng, tokens, kv_heads, dim), rand(rng, tokens, kv_heads, dim)
    write_kv(k_cache, v_cache, k, v, slots)
    flat_k = k_cache.reshape(capacity, kv_heads, dim)
    flat_v = v_cache.reshape(capacity, kv_heads, dim)
    np.testing.assert_array_equal(flat_k[slots], k)
    np.testing.assert_array_equal(flat_v[slots], v)
    np.testing.assert_array_equal(k_cache[slots // block_size, slots % block_size], k)
    untouched = np.ones(capacity, dtype=bool)
    untouched[slots] = False
    np.testing.assert_array_equal(flat_k[untouched], k_before.reshape(flat_k.shape)[untouched])
    np.testing.assert_array_equal(flat_v[untouched], v_before.reshape(flat_v.shape)[untouched])


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    dim=st.sampled_from([1, 8, 17, 64]),
    heads=st.sampled_from(HEADS + [(1, 1)]),
    window=st.sampled_from([0, 3, 70]),
    block_size=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_int8_matches_dequantized_reference(
    data, dim, heads, window, block_size, seed
):
    check(data, dim, heads[0], heads[1], window, block_size, seed, int8=True)


@pytest.mark.parametrize("window", [0, 100])
def test_int8_attention_close_to_float(window):
    """Quantisation error on real-sized heads is small next to the attention output itself."""
    rng = np.random.default_rng(window)
    lengths, new_tokens, block_size = [700, 1, 257], [1, 1, 3], 16
    _, _, qs, k_cache, v_cache, tables = build_batch(
        rng, lengths, new_tokens, block_size, 9, 3, 64, 0
    )
    q = np.concatenate(qs)
    query_start = np.array([0, 1, 2, 5])
    context_lens = np.array(lengths)
    k8, k_scale = quantize_pool(k_cache)
    v8, v_scale = quantize_pool(v_cache)
    want = paged_attention(q, k_cache, v_cache, tables, query_start, context_lens, 0.125, window)
    got = paged_attention_int8(
        q, k8, v8, k_scale, v_scale, tables, query_start, context_lens, 0.125, window
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=0.03)
    assert np.abs(got - want).mean() < 0.03 * np.abs(want).mean()


@settings(max_examples=30, deadline=None)
@given(
    block_size=st.sampled_from([1, 4, 16]),
    num_blocks=st.integers(1, 6),
    kv_heads=st.sampled_from([1, 2, 3]),
    dim=st.sampled_from([1, 8, 17, 64]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_write_kv_int8_round_trip(block_size, num_blocks, kv_heads, dim, data, seed):
    """Each written row comes back within half its scale; zero rows stay exactly zero."""
    rng = np.random.default_rng(seed)
    capacity = num_blocks * block_size
    tokens = data.draw(st.integers(0, capacity), label="tokens")
    slots = rng.choice(capacity, size=tokens, replace=False).astype(np.int64)
    caches = [rng.integers(-127, 128, (num_blocks, block_size, kv_heads, dim), dtype=np.int8)]
    caches.append(caches[0][::-1].copy())
    scales = [rand(rng, num_blocks, block_size, kv_heads) for _ in range(2)]
    before = [c.copy() for c in caches + scales]
    # Scale the rows over a wide range, and zero some of them (and some single elements).
    x = [
        rand(rng, tokens, kv_heads, dim)
        * np.exp(rng.uniform(-8, 8, (tokens, kv_heads, 1))).astype(np.float32)
        * (rng.random((tokens, kv_heads, 1)) > 0.2)
        * (rng.random((tokens, kv_heads, dim)) > 0.1)
        for _ in range(2)
    ]
    write_kv_int8(*caches, *scales, *x, slots)
    untouched = np.ones(capacity, dtype=bool)
    untouched[slots] = False
    for cache, scale, rows, old_cache, old_scale in zip(caches, scales, x, before[:2], before[2:]):
        flat_q = cache.reshape(capacity, kv_heads, dim)
        flat_s = scale.reshape(capacity, kv_heads)
        q, s = flat_q[slots], flat_s[slots]
        np.testing.assert_array_equal(cache[slots // block_size, slots % block_size], q)
        peak = np.abs(rows).max(axis=-1)
        np.testing.assert_allclose(s, peak / 127, rtol=1e-6)
        assert np.abs(q.astype(np.int32)).max(initial=0) <= 127
        error = np.abs(dequantize(q, s) - rows)
        assert np.all(error <= s[..., None] * np.float32(0.5 + 1e-5))
        assert np.all(dequantize(q, s)[rows == 0] == 0)
        np.testing.assert_array_equal(flat_q[untouched], old_cache.reshape(flat_q.shape)[untouched])
        np.testing.assert_array_equal(flat_s[untouched], old_scale.reshape(flat_s.shape)[untouched])
