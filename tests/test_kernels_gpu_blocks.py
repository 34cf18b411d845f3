"""kernels_gpu.matmul_blocks (4-, 6- and 8-bit block formats) against numpy and the gguf
package's dequantisers, on numba's CUDA simulator.

The formats are test_block_formats' (lamina's int4 and every GGUF type lamina runs, repacked
from random blocks); the references are its: gguf's dequantisation for the rows, and float64
numpy over the activations rounded per 32 inputs for the matmul, with the CPU kernels' bound
on float32 accumulation. Shapes straddle a 16-row group, the GEMV's 8 slots of 32-input
blocks, its 4-token passes and the GEMM's 16-token tiles.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import cuda

import kernels_gpu
from engine.loader.gguf_blocks import dequantize
from kernels_cpu.matmul_blocks import padded_inputs
from kernels_gpu import activations, norms
from kernels_gpu.matmul_blocks import activation_shapes, block_rows, gemm_blocks
from tests.test_block_formats import BLOCK_FORMATS, block_weight, quantized_activations
from tests.test_kernels_gpu import fast_thread_switches, on_device, rand  # noqa: F401

pytestmark = pytest.mark.skipif(not kernels_gpu.available(), reason="no CUDA GPU or simulator")


def device_blocks(w) -> tuple:
    """A BlockWeight's kernel arrays on the device, as the CUDA backend holds them."""
    arrays = (w.values, w.high, w.scale, w.scale_sup, w.mins, w.mins_sup)
    return (*(None if a is None else cuda.to_device(a) for a in arrays), w.group, w.zero)


def reference(w, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 numpy of the rounded activations times the dequantised weight, the bound on
    float32 accumulation the CPU kernels are held to)."""
    kp = padded_inputs(w.scale, w.group)
    w_ref = np.zeros((w.out_features, kp))
    w_ref[:, : w.in_features] = dequantize(w)
    xq = quantized_activations(x, kp)
    return xq @ w_ref.T, 1e-5 * (np.abs(xq) @ np.abs(w_ref).T) + 1e-30


@settings(max_examples=12, deadline=None)
@given(
    fmt=st.sampled_from(BLOCK_FORMATS),
    tokens=st.sampled_from([1, 2, 5]),
    n=st.sampled_from([3, 17]),
    k=st.sampled_from([17, 300]),
    seed=st.integers(0, 2**16),
)
@example(fmt="Q6_K", tokens=17, n=17, k=300, seed=0)  # the GEMM, 6-bit, a factor per 16
@example(fmt="int4-g64", tokens=9, n=3, k=17, seed=1)
def test_gemm_blocks_matches_numpy(fmt, tokens, n, k, seed):
    rng = np.random.default_rng(seed)
    w = block_weight(rng, fmt, n, k)
    x = (rng.standard_normal((tokens, w.in_features)) * 3).astype(np.float32)
    got = gemm_blocks(*on_device(x), device_blocks(w), w.in_features, n).copy_to_host()
    want, bound = reference(w, x)
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


@settings(max_examples=4, deadline=None)
@given(fmt=st.sampled_from(BLOCK_FORMATS), seed=st.integers(0, 99))
@example(fmt="Q4_K", seed=0)  # two-level factors with minimums
def test_a_token_gets_the_same_bits_alone_and_in_a_prompt(fmt, seed):
    """The GEMM (17 tokens) sums each row in the GEMV's slots and order: batch invariance,
    bias and accumulation included."""
    rng = np.random.default_rng(seed)
    w = block_weight(rng, fmt, 17, 300)
    tokens = 17
    x = rand(rng, tokens, w.in_features)
    bias, start = rand(rng, 17), rand(rng, tokens, 17)
    blocks = device_blocks(w)
    (bias_d,) = on_device(bias)
    batched = gemm_blocks(*on_device(x), blocks, w.in_features, 17, *on_device(start),
                          bias=bias_d, accumulate=True).copy_to_host()  # fmt: skip
    for t in (0, 9, 16):
        alone = gemm_blocks(*on_device(x[t : t + 1]), blocks, w.in_features, 17,
                            *on_device(start[t : t + 1]), bias=bias_d,
                            accumulate=True).copy_to_host()  # fmt: skip
        np.testing.assert_array_equal(batched[t], alone[0])


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_rows_equal_gguf_dequantisation(fmt):
    """The embedding lookup of a quantised table: gguf's float32 bits for every row asked."""
    rng = np.random.default_rng(3)
    w = block_weight(rng, fmt, 20, 40)
    ids = np.array([19, 0, 16, 19], np.int64)
    got = block_rows(device_blocks(w), w.in_features, *on_device(ids)).copy_to_host()
    np.testing.assert_array_equal(got, dequantize(w)[ids])


def quantize(x_d, k: int, tokens: int, **prologue) -> list[np.ndarray]:
    kp = -(-k // 32) * 32
    act = [cuda.device_array(shape, dtype) for shape, dtype in activation_shapes(tokens, kp)]
    return [a.copy_to_host() for a in norms.quantize_blocks(x_d, k, act, **prologue)]


@settings(max_examples=6, deadline=None)
@given(
    tokens=st.sampled_from([1, 3]),
    k=st.sampled_from([1, 17, 130]),
    mode=st.sampled_from([norms.PLAIN, norms.RMSNORM, norms.GATED]),
    seed=st.integers(0, 2**16),
)
def test_quantize_blocks_rounds_as_numpy_and_fuses_its_prologue(tokens, k, mode, seed):
    """Per 32 inputs: int8 of max|h| / 127 steps (numpy's rounding), per 16 their sum and
    that sum times the step; rmsnorm(x) or silu(gate) * up in the same launch gives the bits
    of those kernels' output quantised after them."""
    rng = np.random.default_rng(seed)
    x = rand(rng, tokens, 2 * k if mode == norms.GATED else k) * 3
    x[0, :k] = 0  # a zero block quantises to zeros with step 0
    weight = 1 + rand(rng, k)
    x_d, w_d = on_device(x, weight)
    xq, xsum, xs, xm = quantize(x_d, k, tokens, mode=mode, weight=w_d, eps=1e-5)
    if mode == norms.PLAIN:
        h = x
    else:
        h_d = norms.rmsnorm(x_d, w_d, 1e-5) if mode == norms.RMSNORM else activations.silu_mul(x_d)
        h = h_d.copy_to_host()
        unfused = quantize(h_d, k, tokens)
        for got, want in zip((xq, xsum, xs, xm), unfused, strict=True):
            np.testing.assert_array_equal(got, want)
    kp = xq.shape[1]
    steps = np.repeat(xs, 32, axis=1)
    np.testing.assert_array_equal(xq * steps.astype(np.float64), quantized_activations(h, kp))
    sums = xq.reshape(tokens, -1, 16).astype(np.int32).sum(axis=2)
    np.testing.assert_array_equal(xsum, sums)
    np.testing.assert_array_equal(xm, sums.astype(np.float32) * np.repeat(xs, 2, axis=1))
