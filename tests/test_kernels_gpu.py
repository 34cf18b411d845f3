"""kernels_gpu against their kernels_cpu twins and numpy references, on numba's CUDA simulator.

conftest.py turns the simulator on (unless LAMINA_REAL_GPU=1). The simulator runs every CUDA
thread as a Python thread, so shapes are tiny and examples few; the sizes still straddle the
kernels' edges: one and several GEMV row blocks (4 rows), GEMM tiles (16), attention tiles
(64 keys), K not a multiple of 4 (the int8 GEMV's word path) and rows longer than a block.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import cuda

import kernels_cpu
import kernels_gpu
from kernels_cpu import matmul_int8 as cpu_int8
from kernels_cpu import moe as cpu_moe
from kernels_cpu import paged_attention as cpu_attention
from kernels_gpu import (
    activations,
    elementwise,
    embedding,
    matmul_f32,
    matmul_int8,
    moe,
    norms,
    rope,
)
from kernels_gpu import paged_attention as gpu_attention

pytestmark = pytest.mark.skipif(not kernels_gpu.available(), reason="no CUDA GPU or simulator")

FEW = settings(max_examples=6, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def fast_thread_switches():
    """The simulator's barriers wait for each thread to get the GIL; switching every 1 ms
    instead of 5 ms makes them several times cheaper."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    yield
    sys.setswitchinterval(old)


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def on_device(*arrays: np.ndarray):
    return [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


def int8_matrix(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(-127, 128, size=(n, k), dtype=np.int8), rng.random(n).astype(np.float32)


def test_available_and_simulated():
    assert kernels_gpu.available() is True
    assert kernels_gpu.simulated() == (os.environ.get("NUMBA_ENABLE_CUDASIM") == "1")


@FEW
@given(
    tokens=st.sampled_from([1, 5, 9, 17]),  # 9 and 17: the tiled kernel, one and two row tiles
    n=st.sampled_from([1, 5, 17]),
    k=st.sampled_from([1, 17, 40]),
    bias=st.booleans(),
    accumulate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matmul_f32(tokens, n, k, bias, accumulate, seed):
    """With the epilogue's bias and accumulation into `out`."""
    rng = np.random.default_rng(seed)
    x, w, b, start = rand(rng, tokens, k), rand(rng, n, k), rand(rng, n), rand(rng, tokens, n)
    x_d, w_d, b_d, out_d = on_device(x, w, b, start)
    got = matmul_f32.matmul_f32(x_d, w_d, out_d if accumulate else None,
                                bias=b_d if bias else None, accumulate=accumulate)  # fmt: skip
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    ref = ref + start if accumulate else ref
    np.testing.assert_allclose(got.copy_to_host(), ref, rtol=1e-5, atol=1e-5)


@FEW
@given(
    tokens=st.sampled_from([1, 6, 9]),
    n=st.sampled_from([1, 5, 17]),
    k=st.sampled_from([3, 17, 32, 68]),  # multiples of 4 take the int32-word GEMV
    seed=st.integers(0, 2**16),
)
def test_matmul_w8_weight_only(tokens, n, k, seed):
    """Float32 activations against dequantised weights: the exact product to float32 error,
    and the CPU's int16-activation kernel to within its activation rounding."""
    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, k)
    w, scale = int8_matrix(rng, n, k)
    out = matmul_int8.matmul_w8(*on_device(x, w, scale)).copy_to_host()
    ref = x.astype(np.float64) @ (w.astype(np.float64) * scale[:, None]).T
    magnitude = np.abs(x).max() * np.abs(w * scale[:, None]).sum(axis=1)
    assert np.all(np.abs(out - ref) <= 1e-6 * magnitude + 1e-6)
    cpu = cpu_int8.gemm_w8(x, w, scale, cpu_int8.INT16_MAX)
    assert np.all(np.abs(out - cpu) <= 1e-4 * magnitude + 1e-6)


@FEW
@given(
    tokens=st.sampled_from([1, 3]),
    k=st.sampled_from([1, 17, 130]),
    gated=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_rows_prologues_equal_the_unfused_kernels(tokens, k, gated, seed):
    """rmsnorm(x) or silu(gate) * up, quantised in one launch: the same bits as the rmsnorm or
    gate kernel's output quantised after it (and those kernels agree with the CPU's)."""
    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, 2 * k if gated else k) * 3
    w = rand(rng, k)
    x_d, w_d = on_device(x, w)
    if gated:
        fused = norms.quantize_rows(x_d, 32767, mode=norms.GATED)
        unfused = norms.quantize_rows(activations.silu_mul(x_d), 32767)
    else:
        fused = norms.quantize_rows(x_d, 32767, mode=norms.RMSNORM, weight=w_d, eps=1e-5)
        unfused = norms.quantize_rows(norms.rmsnorm(x_d, w_d, 1e-5), 32767)
    for got, want in zip(fused, unfused, strict=True):
        np.testing.assert_array_equal(got.copy_to_host(), want.copy_to_host())


@FEW
@given(
    tokens=st.sampled_from([1, 3]),
    k=st.sampled_from([1, 17, 130]),  # 130: more elements than the block's 128 threads
    qmax=st.sampled_from([127, 32767]),
    seed=st.integers(0, 2**16),
)
def test_quantize_rows_equals_cpu(tokens, k, qmax, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, k) * 10
    x[0] = 0  # a zero row gets scale 1
    a, a_scale = matmul_int8.quantize_rows(*on_device(x), qmax)
    ref_a, ref_scale = cpu_int8.quantize_rows(x, qmax)
    np.testing.assert_array_equal(a.copy_to_host(), ref_a)
    np.testing.assert_array_equal(a_scale.copy_to_host(), ref_scale)


@settings(max_examples=8, deadline=None)
@given(
    tokens=st.sampled_from([1, 3, 5]),
    n=st.sampled_from([1, 17]),
    k=st.sampled_from([5, 32, 36]),  # 32, 36: whole int32 words, the decode GEMV
    act_max=st.sampled_from([127, 32767]),
    bias=st.booleans(),
    accumulate=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(tokens=17, n=17, k=33, act_max=127, bias=True, accumulate=True, seed=0)  # tiled
def test_gemm_w8_equals_cpu_bit_for_bit(tokens, n, k, act_max, bias, accumulate, seed):
    """Same quantised activations, exact integer sums, the same float64 scaling: same bits;
    the epilogue adds the bias and then adds into `out` as the CPU backend does, unfused."""
    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, k)
    w, scale = int8_matrix(rng, n, k)
    b, start = rand(rng, n), rand(rng, tokens, n)
    x_d, w_d, scale_d, b_d, out_d = on_device(x, w, scale, b, start)
    got = matmul_int8.gemm_w8(x_d, w_d, scale_d, act_max, out_d if accumulate else None,
                              bias=b_d if bias else None, accumulate=accumulate)  # fmt: skip
    expected = cpu_int8.gemm_w8(x, w, scale, act_max)
    if bias:
        expected += b
    if accumulate:
        expected = start + expected
    np.testing.assert_array_equal(got.copy_to_host(), expected)


@FEW
@given(
    tokens=st.sampled_from([1, 3]),
    dim=st.sampled_from([1, 17, 130]),
    seed=st.integers(0, 2**16),
)
def test_rmsnorm_equals_cpu(tokens, dim, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, tokens, dim), rand(rng, dim)
    out = norms.rmsnorm(*on_device(x, w), 1e-5).copy_to_host()
    np.testing.assert_allclose(out, kernels_cpu.rmsnorm(x, w, 1e-5), rtol=1e-6, atol=1e-7)


@FEW
@given(tokens=st.sampled_from([1, 3]), width=st.sampled_from([1, 17, 130]), seed=st.integers(0, 99))
def test_gelu_gate_and_scale_equal_cpu(tokens, width, seed):
    rng = np.random.default_rng(seed)
    gate_up = rand(rng, tokens, 2 * width) * 3
    (d_gate_up,) = on_device(gate_up)
    want = np.empty((tokens, width), np.float32)
    kernels_cpu.activations.gelu_tanh_mul_into(gate_up, want)
    got = kernels_gpu.activations.gelu_tanh_mul(d_gate_up).copy_to_host()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    kernels_gpu.elementwise.scale_inplace(d_gate_up, 0.5)
    np.testing.assert_array_equal(d_gate_up.copy_to_host(), gate_up * np.float32(0.5))


@FEW
@given(tokens=st.sampled_from([1, 3]), heads=st.sampled_from([1, 3]), seed=st.integers(0, 99))
def test_head_rmsnorm_equals_cpu(tokens, heads, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, tokens, 5 + 2 * heads * 16), rand(rng, 16)
    d_x, d_w = on_device(x, w)
    norms.head_rmsnorm_(d_x, 5, heads, d_w, 1e-6)
    want = x.copy()
    kernels_cpu.norms.head_rmsnorm_(want, 5, heads, w, 1e-6)
    np.testing.assert_allclose(d_x.copy_to_host(), want, rtol=1e-6, atol=1e-7)


@FEW
@given(
    tokens=st.sampled_from([1, 3]),
    heads=st.integers(1, 3),
    half=st.sampled_from([1, 4, 32]),
    start=st.integers(0, 9000),
    seed=st.integers(0, 2**16),
)
def test_split_rope_equals_cpu(tokens, heads, half, start, seed):
    """q and k rotated as the CPU rotates them, v copied, from the fused projections."""
    rng = np.random.default_rng(seed)
    dim, kv_heads = 2 * half, max(1, heads - 1)
    qkv = rand(rng, tokens, (heads + 2 * kv_heads) * dim)
    inv_freq = (1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    pos = np.arange(start, start + tokens, dtype=np.int64)
    q, k, v = rope.split_rope(*on_device(qkv), heads, kv_heads, dim, *on_device(pos, inv_freq))
    cos = np.empty((tokens, half), dtype=np.float32)
    sin = np.empty_like(cos)
    kernels_cpu.rope_angles_into(pos, inv_freq, cos, sin)
    for got, first, count in ((q, 0, heads), (k, heads, kv_heads)):
        x = np.ascontiguousarray(qkv[:, first * dim : (first + count) * dim])
        ref = np.empty((tokens, count, dim), np.float32)
        for t in range(tokens):
            kernels_cpu.rope_heads(x, t, 0, cos, sin, ref)
        # cos/sin of angles up to ~9000 rad: the two libms may differ by an ulp of the angle.
        np.testing.assert_allclose(got.copy_to_host(), ref, rtol=1e-5, atol=1e-5)
    v_cols = qkv[:, (heads + kv_heads) * dim :]
    np.testing.assert_array_equal(v.copy_to_host().reshape(tokens, -1), v_cols)


@FEW
@given(tokens=st.sampled_from([1, 5]), kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_split_rope_into_the_cache_equals_split_then_write_kv(tokens, kv_heads, seed):
    """k and v written straight into their cache slots: the bits of the split into scratch
    followed by write_kv, and no other cache row touched."""
    rng = np.random.default_rng(seed)
    heads, dim, blocks, block_size = 2 * kv_heads, 8, 3, 4
    qkv, inv_freq = rand(rng, tokens, (heads + 2 * kv_heads) * dim), rand(rng, dim // 2)
    pos = np.arange(7, 7 + tokens, dtype=np.int64)
    slots = rng.choice(blocks * block_size, tokens, replace=False).astype(np.int64)
    shape = (blocks, block_size, kv_heads, dim)
    start = [rand(rng, *shape), rand(rng, *shape)]
    where = on_device(qkv, pos, inv_freq)
    fused = on_device(*start)
    q = cuda.device_array((tokens, heads, dim), np.float32)
    rope.split_rope(where[0], heads, kv_heads, dim, *where[1:], (q, *fused),
                    slots=on_device(slots)[0])  # fmt: skip
    q_ref, k, v = rope.split_rope(where[0], heads, kv_heads, dim, *where[1:])
    unfused = on_device(*start)
    gpu_attention.write_kv(*unfused, k, v, *on_device(slots))
    np.testing.assert_array_equal(q.copy_to_host(), q_ref.copy_to_host())
    for got, want in zip(fused, unfused, strict=True):
        np.testing.assert_array_equal(got.copy_to_host(), want.copy_to_host())


@FEW
@given(
    tokens=st.sampled_from([1, 3]),
    width=st.sampled_from([1, 17, 96]),
    seed=st.integers(0, 2**16),
)
def test_silu_mul_equals_cpu(tokens, width, seed):
    rng = np.random.default_rng(seed)
    gate_up = np.concatenate([rand(rng, tokens, width) * 4, rand(rng, tokens, width)], axis=1)
    out = activations.silu_mul(*on_device(gate_up)).copy_to_host()
    np.testing.assert_allclose(out, kernels_cpu.silu_mul(gate_up), rtol=1e-6, atol=1e-7)


def test_silu_mul_at_extreme_gates():
    gate = np.array([[-1000, -100, -88, -87, -20, -1e-3, 0, 1e-3, 20, 87, 88, 100, 1000]], "f4")
    gate_up = np.concatenate([gate, np.full_like(gate, 1.5)], axis=1)
    out = activations.silu_mul(*on_device(gate_up)).copy_to_host()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, kernels_cpu.silu_mul(gate_up), rtol=1e-6, atol=1e-30)


@FEW
@given(
    vocab=st.sampled_from([1, 7]),
    k=st.sampled_from([1, 17, 70]),
    tokens=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_row_gathers_equal_cpu(vocab, k, tokens, seed):
    rng = np.random.default_rng(seed)
    w, scale = int8_matrix(rng, vocab, k)
    table = rand(rng, vocab, k)
    ids = rng.integers(0, vocab, tokens).astype(np.int64)
    w_d, scale_d, table_d, ids_d = on_device(w, scale, table, ids)
    embedded = embedding.embed_rows_w8(w_d, scale_d, ids_d).copy_to_host()
    np.testing.assert_array_equal(embedded, cpu_int8.embed_rows_w8(w, scale, ids))
    np.testing.assert_array_equal(embedding.gather_rows(table_d, ids_d).copy_to_host(), table[ids])


@FEW
@given(
    tokens=st.sampled_from([1, 3]),
    heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
    head_dim=st.sampled_from([1, 8]),
    seed=st.integers(0, 2**16),
)
def test_add_inplace(tokens, heads, head_dim, seed):
    rng = np.random.default_rng(seed)
    width = (heads[0] + 2 * heads[1]) * head_dim
    x, y = rand(rng, tokens, width), rand(rng, tokens, width)
    x_d, y_d = on_device(x, y)
    np.testing.assert_array_equal(elementwise.add_inplace(x_d, y_d).copy_to_host(), x + y)


@FEW
@given(
    n=st.sampled_from([1, 3]),
    half=st.sampled_from([1, 17, 96]),
    seed=st.integers(0, 2**16),
)
def test_scale_up_half_equals_cpu(n, half, seed):
    rng = np.random.default_rng(seed)
    gate_up, scales = rand(rng, n, 2 * half), rng.random(n).astype(np.float32)
    gate_up_d, scales_d = on_device(gate_up, scales)
    assert moe.scale_up_half_(gate_up_d, scales_d) is gate_up_d
    cpu_moe.scale_up_half_(gate_up, scales)
    np.testing.assert_array_equal(gate_up_d.copy_to_host(), gate_up)


@FEW
@given(
    tokens=st.sampled_from([1, 4, 9]),
    k=st.sampled_from([1, 17, 70]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_add_rows_at_adds_into_the_rows_given(tokens, k, data, seed):
    rng = np.random.default_rng(seed)
    rows = np.array(data.draw(st.permutations(range(tokens)))[: data.draw(st.integers(1, tokens))])
    dst, src = rand(rng, tokens, k), rand(rng, len(rows), k)
    dst_d, rows_d, src_d = on_device(dst, rows, src)
    assert moe.add_rows_at(dst_d, rows_d, src_d) is dst_d
    dst[rows] += src
    np.testing.assert_array_equal(dst_d.copy_to_host(), dst)


@FEW
@given(
    tokens=st.sampled_from([1, 5]),
    kv_heads=st.sampled_from([1, 2]),
    dim=st.sampled_from([1, 8, 40]),  # 40: more elements than the quantising warp
    seed=st.integers(0, 2**16),
)
def test_write_kv_equals_cpu(tokens, kv_heads, dim, seed):
    rng = np.random.default_rng(seed)
    num_blocks, block_size = 3, 4
    k, v = rand(rng, tokens, kv_heads, dim), rand(rng, tokens, kv_heads, dim) * 100
    k[0, 0] = 0  # an all-zero row: scale 0, zeros
    slots = rng.choice(num_blocks * block_size, tokens, replace=False).astype(np.int64)
    shape = (num_blocks, block_size, kv_heads, dim)
    caches = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
    int8_caches = [np.zeros(shape, np.int8), np.zeros(shape, np.int8)]
    scales = [np.zeros(shape[:3], np.float32), np.zeros(shape[:3], np.float32)]

    gpu = on_device(*caches, k, v, slots)
    gpu_attention.write_kv(*gpu)
    cpu_attention.write_kv(*caches, k, v, slots)
    for got, want in zip(gpu[:2], caches, strict=True):
        np.testing.assert_array_equal(got.copy_to_host(), want)

    gpu = on_device(*int8_caches, *scales, k, v, slots)
    gpu_attention.write_kv_int8(*gpu)
    cpu_attention.write_kv_int8(*int8_caches, *scales, k, v, slots)
    for got, want in zip(gpu[:4], int8_caches + scales, strict=True):
        np.testing.assert_array_equal(got.copy_to_host(), want)


def paged_batch(rng, lengths, new_tokens, block_size, heads, kv_heads, dim, shared_blocks):
    """q and a pool of shuffled blocks holding each sequence's keys and values.

    Sequence 1 starts with sequence 0's first `shared_blocks` blocks (a cached prefix). Rows no
    sequence owns, and table entries past a sequence's end, are NaN: reading one poisons the
    output. Returns (q, k_cache, v_cache, block_tables, query_start, context_lens).
    """
    counts = [-(-n // block_size) for n in lengths]
    num_blocks = sum(counts) - shared_blocks + 1
    order = rng.permutation(num_blocks)
    tables = np.full((len(lengths), max(counts) + 1), order[-1], dtype=np.int32)
    taken = 0
    for s, count in enumerate(counts):
        own = shared_blocks if s == 1 else 0
        tables[s, :own] = tables[0, :own]
        tables[s, own:count] = order[taken : taken + count - own]
        taken += count - own
    k_cache = np.full((num_blocks, block_size, kv_heads, dim), np.nan, dtype=np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    for s, n in enumerate(lengths):
        for p in range(shared_blocks * block_size if s == 1 else 0, n):
            k_cache[tables[s, p // block_size], p % block_size] = rand(rng, kv_heads, dim)
            v_cache[tables[s, p // block_size], p % block_size] = rand(rng, kv_heads, dim)
    q = rand(rng, sum(new_tokens), heads, dim) * 2
    query_start = np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int64)
    return q, k_cache, v_cache, tables, query_start, np.array(lengths, dtype=np.int64)


def quantize_pool(cache):
    """The int8 form of a pool from `paged_batch` via the CPU writer; NaN rows get NaN scales."""
    kv_heads, dim = cache.shape[2:]
    flat = cache.reshape(-1, kv_heads, dim)
    slots = np.flatnonzero(~np.isnan(flat).any(axis=(1, 2)))
    q = np.zeros(cache.shape, dtype=np.int8)
    scale = np.full(cache.shape[:3], np.nan, dtype=np.float32)
    rows = flat[slots]
    cpu_attention.write_kv_int8(q, np.empty_like(q), scale, np.empty_like(scale), rows, rows, slots)
    return q, scale


def check_attention(data, heads, dim, window, block_size, splits, seed, int8, softcap=0.0):
    rng = np.random.default_rng(seed)
    lengths = data.draw(st.lists(st.integers(1, 70), min_size=1, max_size=2), label="lengths")
    new_tokens = [data.draw(st.integers(1, min(n, 2)), label="new") for n in lengths]
    shared = 0
    if len(lengths) == 2:
        shared = data.draw(st.integers(0, min(lengths) // block_size), label="shared")
        # The shared blocks are full and both sequences go past them.
        shared = min(shared, (min(lengths) - 1) // block_size)
    q, k_cache, v_cache, tables, starts, lens = paged_batch(
        rng, lengths, new_tokens, block_size, *heads, dim, shared
    )
    scale = 1 / np.sqrt(dim)
    where = (tables, starts, lens)
    if int8:
        k8, k_scale = quantize_pool(k_cache)
        v8, v_scale = quantize_pool(v_cache)
        cache = (k8, v8, k_scale, v_scale)
        ref = cpu_attention.paged_attention_int8(q, *cache, *where, scale, window, softcap)
        run = gpu_attention.paged_attention_int8
    else:
        cache = (k_cache, v_cache)
        ref = cpu_attention.paged_attention(q, *cache, *where, scale, window, softcap)
        run = gpu_attention.paged_attention
    device = on_device(q, *cache, *where)
    out = run(*device, scale, window, splits=splits, softcap=softcap).copy_to_host()
    assert not np.isnan(ref).any()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# (query heads, kv heads): MHA, GQA and MQA groups
HEADS = st.sampled_from([(2, 2), (4, 2), (3, 1)])


@settings(max_examples=5, deadline=None)
@given(
    data=st.data(),
    heads=HEADS,
    dim=st.sampled_from([4, 8]),
    window=st.sampled_from([0, 1, 5]),
    block_size=st.sampled_from([1, 4, 16]),
    splits=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_equals_cpu(data, heads, dim, window, block_size, splits, seed):
    """Decode and prefill chunks together, GQA, sliding windows, shared prefix blocks, and
    keys divided among several blocks (splits), some of them left empty."""
    check_attention(data, heads, dim, window, block_size, splits, seed, int8=False)


@settings(max_examples=4, deadline=None)
@given(
    data=st.data(),
    heads=HEADS,
    dim=st.sampled_from([4, 8]),
    window=st.sampled_from([0, 5]),
    block_size=st.sampled_from([1, 4, 16]),
    splits=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_int8_equals_cpu(data, heads, dim, window, block_size, splits, seed):
    check_attention(data, heads, dim, window, block_size, splits, seed, int8=True)


@settings(max_examples=3, deadline=None)
@given(
    data=st.data(),
    heads=HEADS,
    softcap=st.sampled_from([0.5, 2.0]),
    int8=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_soft_caps_as_cpu(data, heads, softcap, int8, seed):
    """Gemma 2's capped scores, on both cache formats."""
    check_attention(data, heads, 8, 0, 4, 2, seed, int8=int8, softcap=softcap)


def test_softcap_inplace_matches_numpy():
    x = np.random.default_rng(3).normal(0, 20, (3, 37)).astype(np.float32)
    d = cuda.to_device(x)
    kernels_gpu.elementwise.softcap_inplace(d, 30.0)
    np.testing.assert_allclose(d.copy_to_host(), np.tanh(x / 30) * 30, rtol=1e-5, atol=1e-5)


def test_paged_attention_chunks_a_large_group():
    """17 query heads on one kv head take two blocks (16 + 1 heads); head_dim 72 > the 64
    threads, so threads own two output dimensions; 70 keys are two tiles."""
    rng = np.random.default_rng(0)
    q, k_cache, v_cache, tables, starts, lens = paged_batch(rng, [70], [2], 16, 17, 1, 72, 0)
    where = (tables, starts, lens, 0.125, 0)
    ref = cpu_attention.paged_attention(q, k_cache, v_cache, *where)
    out = gpu_attention.paged_attention(
        *on_device(q, k_cache, v_cache), *on_device(*where[:3]), *where[3:]
    )
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.integers(1, 64),
    kv_heads=st.integers(1, 8),
    max_context=st.integers(1, 100_000),
    sm_count=st.integers(1, 200),
)
def test_attention_splits_bounds(tokens, kv_heads, max_context, sm_count):
    splits = gpu_attention.attention_splits(tokens, kv_heads, max_context, sm_count)
    assert 1 <= splits <= gpu_attention.MAX_SPLITS
    keys_per_split = gpu_attention.TILE * gpu_attention.MIN_SPLIT_TILES
    assert splits == 1 or (splits - 1) * keys_per_split < max_context


def test_wrappers_fill_the_buffers_given():
    """`out` and scratch buffers (quantised activations, split partials) get the bits the
    allocating calls return."""
    rng = np.random.default_rng(1)
    tokens, heads, kv_heads, dim = 2, 4, 2, 8

    def empty(shape, dtype=np.float32):
        return cuda.device_array(shape, dtype=dtype)

    qkv = on_device(rand(rng, tokens, (heads + 2 * kv_heads) * dim))[0]
    shapes = [(tokens, heads, dim), (tokens, kv_heads, dim), (tokens, kv_heads, dim)]
    buffers = [empty(shape) for shape in shapes]
    where = on_device(np.array([3, 9]), np.full(dim // 2, 0.1, np.float32))
    got = rope.split_rope(qkv, heads, kv_heads, dim, *where, out=buffers)
    want = rope.split_rope(qkv, heads, kv_heads, dim, *where)
    for a, buffer, ref in zip(got, buffers, want, strict=True):
        assert a is buffer
        np.testing.assert_array_equal(a.copy_to_host(), ref.copy_to_host())

    x = rand(rng, tokens, 40)
    w, scale = int8_matrix(rng, 5, 40)
    act = (empty((tokens, 40), np.int16), empty(tokens))
    out = empty((tokens, 5))
    assert matmul_int8.gemm_w8(*on_device(x, w, scale), 32767, out, 0, act) is out
    np.testing.assert_array_equal(out.copy_to_host(), cpu_int8.gemm_w8(x, w, scale, 32767))
    ref_a, ref_scale = cpu_int8.quantize_rows(x, 32767)
    np.testing.assert_array_equal(act[0].copy_to_host(), ref_a)
    np.testing.assert_array_equal(act[1].copy_to_host(), ref_scale)

    q, k_cache, v_cache, tables, starts, lens = paged_batch(
        rng, [70], [1], 4, heads, kv_heads, dim, 0
    )
    args = (*on_device(q, k_cache, v_cache, tables, starts, lens), 0.3, 0, 2)
    parts = [empty(shape) for shape in gpu_attention.partials_shapes(2, 1, heads, dim)]
    out = empty((1, heads, dim))
    assert gpu_attention.paged_attention(*args, out=out, parts=parts) is out
    np.testing.assert_array_equal(
        out.copy_to_host(), gpu_attention.paged_attention(*args).copy_to_host()
    )
