"""Backend ops with `out=`: the allocating call's bits, written into the caller's buffer, and
once warm no allocation that grows with the work.

Two counts, as in test_workspace.py: tracemalloc for arrays (numpy reports its data buffers
to it) and numba's runtime statistics for allocations inside kernels. numba also counts a
small record per array argument at every call from Python (its reference to the array), so
its count must stay the same when the shapes grow tenfold rather than be zero.
The CUDA backend runs on the simulator, where only the results and buffers are checked.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from numba.core.runtime import _nrt_python, rtsys

import kernels_gpu
from engine.backends.cpu import CPUBackend
from engine.kv_cache import ForwardBatch, PagedKVCache
from engine.quant.int4 import quantize_int4
from engine.weights import ColskipInt8Weight, DenseWeight, Int8Weight, SparseInt8Weight
from kernels_cpu.colskip_int8 import to_input_major
from kernels_cpu.sparse_int8 import pack_bitmask
from tests.cudasim import pooled_blocks

# Bytes a warm call may allocate: a few Python objects (views, the BLAS thread limit's
# bookkeeping), of which no more when the shapes grow tenfold. The larger shapes' arrays are
# several KiB, so any activation or scratch allocated per call would show.
SMALL, GROWTH = 4096, 1024
FORMATS = ["dense", "int8", "sparse", "colskip", "int4"]
# Per format, token counts that take each kernel: numba GEMV / BLAS; int8 GEMV / GEMM.
PATHS = {"dense": [1, 8], "int8": [1, 3], "sparse": [1, 3], "colskip": [1, 3], "int4": [1, 3]}


@pytest.fixture(scope="module")
def nrt_stats():
    _nrt_python.memsys_enable_stats()
    yield
    _nrt_python.memsys_disable_stats()


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def make_weight(rng: np.random.Generator, fmt: str, n: int, k: int, bias: bool):
    b = rand(rng, n) if bias else None
    if fmt == "dense":
        return DenseWeight(rand(rng, n, k), b)
    if fmt == "int4":
        return quantize_int4(DenseWeight(rand(rng, n, k), b), group=int(rng.choice([32, 64, 128])))
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    w[rng.random((n, k)) < 0.5] = 0
    scale = rng.random(n).astype(np.float32) / 100
    if fmt == "int8":
        return Int8Weight(w, scale, b)
    if fmt == "sparse":
        return SparseInt8Weight(*pack_bitmask(w), scale, k, b)
    return ColskipInt8Weight(to_input_major(w), scale, 0.3, b)


def warm_allocations(call: Callable[[], object]) -> tuple[int, int]:
    """(peak bytes tracemalloc sees, numba runtime allocations) of call() once it is warm."""
    call()
    call()  # compiled, and the backend's scratch has grown
    tracemalloc.start()
    try:
        before = rtsys.get_allocation_stats().alloc
        call()
        numba_allocs = rtsys.get_allocation_stats().alloc - before
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, numba_allocs


def assert_allocates_nothing(calls: list[Callable[[], object]]) -> None:
    """The calls (one op, on small then tenfold shapes) allocate no array and no kernel memory."""
    peaks, counts = zip(*(warm_allocations(call) for call in calls), strict=True)
    assert max(peaks) < SMALL and max(peaks) - min(peaks) < GROWTH, peaks
    assert len(set(counts)) == 1 and counts[0] <= 24, counts


def check_into(result: np.ndarray, out: np.ndarray, want: np.ndarray) -> None:
    assert result is out
    np.testing.assert_array_equal(out, want)


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    tokens=st.integers(1, 9),
    n=st.sampled_from([1, 17, 64]),
    k=st.sampled_from([1, 16, 40, 130]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_into_out_is_bit_identical(fmt, tokens, n, k, bias, seed):
    """linear and norm_linear into `out` (linear_add_ always writes into its residual:
    test_fused_ops checks it)."""
    rng = np.random.default_rng(seed)
    be, w, x = CPUBackend(), make_weight(rng, fmt, n, k, bias), rand(rng, tokens, k)
    out = np.full((tokens, n), np.nan, dtype=np.float32)
    check_into(be.linear(x, w, out=out), out, be.linear(x, w))
    norm = rand(rng, k)
    check_into(be.norm_linear(x, norm, 1e-5, w, out=out), out, be.norm_linear(x, norm, 1e-5, w))


def linear_ops(be, x, w, out):
    """The three linear ops on x (T, K) into out (T, N): plain, norm-fused, gated and added."""
    norm, gate_up = x[0].copy(), np.concatenate([x, x], axis=1)
    return [
        lambda: be.linear(x, w, out=out),
        lambda: be.norm_linear(x, norm, 1e-5, w, out=out),
        lambda: be.linear_add_(out, x, w),
        lambda: be.linear_add_(out, gate_up, w, gated=True),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", [0, 1])
@pytest.mark.parametrize("op", range(4))
def test_linear_with_out_allocates_nothing(fmt, path, op, nrt_stats):
    rng = np.random.default_rng(0)
    be, tokens = CPUBackend(), PATHS[fmt][path]
    calls = []
    for n, k in [(120, 160), (1200, 1600)]:
        w, x = make_weight(rng, fmt, n, k, bias=True), rand(rng, tokens, k)
        out = np.zeros((tokens, n), dtype=np.float32)
        calls.append(linear_ops(be, x, w, out)[op])
    assert_allocates_nothing(calls)


def elementwise_ops(rng: np.random.Generator, tokens: int, width: int):
    """(name, call(be, out), out shape) for the ops besides linear and attention."""
    x = rand(rng, tokens, width)
    table = Int8Weight(
        rng.integers(-127, 128, size=(50, width), dtype=np.int8), rng.random(50, dtype=np.float32)
    )
    ids = rng.integers(0, 50, tokens)
    rows = np.array([tokens - 1, 0])
    return [
        ("embed int8", lambda be, out: be.embed(table, ids, out=out), (tokens, width)),
        ("embed f32", lambda be, out: be.embed(DenseWeight(x), rows, out=out), (2, width)),
        ("take_rows", lambda be, out: be.take_rows(x, rows, out=out), (2, width)),
    ]


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 6), width=st.sampled_from([1, 8, 33, 576]), seed=st.integers(0, 99))
def test_elementwise_ops_into_out_are_bit_identical(tokens, width, seed):
    be = CPUBackend()
    for _, call, shape in elementwise_ops(np.random.default_rng(seed), tokens, width):
        out = np.full(shape, np.nan, dtype=np.float32)
        check_into(call(be, out), out, call(be, None))


@pytest.mark.parametrize("op", range(3))
def test_elementwise_ops_with_out_allocate_nothing(op, nrt_stats):
    be, calls = CPUBackend(), []
    for tokens, width in [(2, 64), (20, 640)]:
        _, call, shape = elementwise_ops(np.random.default_rng(0), tokens, width)[op]
        out = np.empty(shape, dtype=np.float32)
        calls.append(lambda call=call, out=out: call(be, out))
    assert_allocates_nothing(calls)


INV_FREQ = np.array([1.0, 0.1, 0.01, 0.001, 0.0001], np.float32)  # head_dim 10


def attention_case(be, rng, tokens, kv_dtype, heads=6, kv_heads=2, dim=10, put=np.asarray):
    """qkv (placed by `put`) and a batch of one sequence: 9 positions cached, then `tokens`
    new ones."""
    cache = PagedKVCache(be, 1, kv_heads, dim, 16, 4, kv_dtype)
    cache.add_sequence("a", [])
    for new, commit in ((9, True), (tokens, False)):
        batch = ForwardBatch.build(cache, [("a", list(range(new)))])
        qkv = put(rand(rng, new, (heads + 2 * kv_heads) * dim))
        if commit:  # writes the cached positions' keys and values
            be.attention(0, qkv, batch, heads, INV_FREQ[: dim // 2], 0.2, 0)
            cache.commit("a", list(range(new)))
    return qkv, batch


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_attention_into_out(kv_dtype, nrt_stats):
    be, rng, calls, heads = CPUBackend(), np.random.default_rng(0), [], 6
    for tokens in (2, 20):
        qkv, batch = attention_case(be, rng, tokens, kv_dtype, heads)
        args = (0, qkv, batch, heads, INV_FREQ, 0.2, 0)
        want = be.attention(*args).copy()
        out = np.full((tokens, heads * 10), np.nan, dtype=np.float32)
        check_into(be.attention(*args, out=out), out, want)
        calls.append(lambda args=args, out=out: be.attention(*args, out=out))
    assert_allocates_nothing(calls)


def test_scratch_grows_and_reuses():
    be = CPUBackend()
    small = be.scratch.take("act", (2, 8), np.int16)
    assert small.shape == (2, 8) and small.flags.c_contiguous
    assert be.scratch.take("act", (2, 8), np.int16) is small
    assert np.shares_memory(be.scratch.take("act", (4, 4), np.int16), small)
    big = be.scratch.take("act", (3, 100), np.int16)
    assert big.shape == (3, 100) and not np.shares_memory(big, small)
    assert np.shares_memory(be.scratch.take("act", (2, 8), np.int16), big)


def test_empty_allocates_where_the_backend_computes():
    buffer = CPUBackend().empty((3, 5))
    assert isinstance(buffer, np.ndarray) and buffer.shape == (3, 5) and buffer.dtype == np.float32
    assert CPUBackend().empty((2,), "int16").dtype == np.int16


@pytest.mark.skipif(not kernels_gpu.available(), reason="no CUDA GPU or simulator")
def test_cuda_backend_writes_into_out():
    """Each op with `out` (device buffers from `empty`) gives the bits of the allocating call."""
    from engine.backends.cuda import CUDABackend

    be, rng = CUDABackend(), np.random.default_rng(0)
    tokens, width, n = 3, 8, 5
    dev = cuda.to_device

    def same(call, shape):
        want = call(None).copy_to_host()
        out = be.empty(shape)
        got = call(out)
        assert got is out
        np.testing.assert_array_equal(out.copy_to_host(), want)

    x, norm = dev(rand(rng, tokens, width)), dev(rand(rng, width))
    table = Int8Weight(
        dev(rng.integers(-127, 128, (9, width), dtype=np.int8)), dev(rng.random(9, np.float32))
    )
    ids, rows = np.array([1, 8, 1]), np.array([2, 0])
    int8 = make_weight(rng, "int8", n, width, bias=True)
    w8 = Int8Weight(dev(int8.data), dev(int8.scale), dev(int8.bias))
    w32 = DenseWeight(dev(rand(rng, n, width)), dev(rand(rng, n)))
    with pooled_blocks():
        same(lambda out: be.embed(table, ids, out=out), (tokens, width))
        same(lambda out: be.linear(x, w8, out=out), (tokens, n))
        same(lambda out: be.linear(x, w32, out=out), (tokens, n))
        same(lambda out: be.norm_linear(x, norm, 1e-5, w8, out=out), (tokens, n))
        same(lambda out: be.take_rows(x, rows, out=out), (2, width))
        heads, kv_heads, dim = 2, 1, 4
        qkv, batch = attention_case(be, rng, 2, "float32", heads, kv_heads, dim, dev)
        args = (0, qkv, batch, heads, INV_FREQ[: dim // 2], 0.5, 0)
        same(lambda out: be.attention(*args, out=out), (2, heads * dim))
