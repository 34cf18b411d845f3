"""Activation-sparse 4-bit weights: the input-major layout and the kernel that skips rows.

The kernel is checked against numpy: the weight dequantized in float64 (d * q + m), the
activations with every |x| <= threshold set to 0 and the rest rounded to int8 per group of
inputs as llama.cpp rounds them (scale max|x| / 127). The products run in float64, so only
the kernel's float32 accumulation differs. Dropped inputs must not matter whatever their
rows hold, and a kept NaN must reach the output.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir

from engine.quant.int4 import quantize_int4
from engine.quant.sparsify import to_colskip_blocks
from engine.weights import DenseWeight
from kernels_cpu import colskip_blocks as cb
from kernels_cpu.matmul_blocks import GATED, RMSNORM, dequantize_rows_into
from kernels_cpu.rows import PAGE
from tests.test_simd import assembly_for


def random_weight(rng: np.random.Generator, n: int, k: int, group: int):
    """(values, scale, mins) in the kernel's layout, the float64 matrix (n, Kp) they hold
    and the magnitude of its two terms, |d| q + |m| (the rounding bound's scale)."""
    kp = -(-k // group) * group
    q = rng.integers(0, 16, (n, kp)).astype(np.uint8)
    d = (rng.random((n, kp // group)) * 0.05).astype(np.float16)
    m = (rng.standard_normal((n, kp // group)) * 0.1).astype(np.float16)
    scale, minimum = (np.repeat(a.astype(np.float64), group, 1) for a in (d, m))
    packed = (cb.interleave_outputs(q), *(cb.factors_by_group(a.view(np.uint16)) for a in (d, m)))
    return packed, scale * q + minimum, np.abs(scale) * q + np.abs(minimum)


def rounded_activations(x: np.ndarray, kp: int, group: int, threshold: float) -> np.ndarray:
    """x (T, K) with |x| <= threshold zeroed, rounded to int8 per group and scaled back, in
    float64 (T, kp)."""
    kept = np.where(np.abs(x) > np.float32(threshold), x, np.float32(0))
    padded = np.zeros((x.shape[0], kp), np.float32)
    padded[:, : x.shape[1]] = kept
    groups = padded.reshape(x.shape[0], kp // group, group)
    amax = np.abs(groups).max(axis=2, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(groups * inv).astype(np.float64)
    return (q * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape[0], kp)


def check_close(got: np.ndarray, xq: np.ndarray, dense: np.ndarray, size: np.ndarray) -> None:
    """got equals xq @ dense.T up to float32 rounding of sums of terms of magnitude `size`:
    the kernel adds the scale's and the minimum's terms apart, which may cancel."""
    want = xq @ dense.T
    bound = 1e-5 * (np.abs(xq) @ size.T) + 1e-30
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([1, 17, 129, 300]), seed=st.integers(0, 2**16),
       k=st.sampled_from([1, 17, 64, 300]))  # fmt: skip
def test_the_layout_round_trips(n, k, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    values = cb.interleave_outputs(q)
    assert values.shape == (k, cb.padded_outputs(n) // 2)
    assert values.ctypes.data % PAGE == 0
    assert np.array_equal(cb.deinterleave_outputs(values, n), q)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.sampled_from([1, 2, 3, 9]),
    n=st.sampled_from([1, 17, 130, 256]),
    k=st.sampled_from([1, 17, 64, 300, 4097]),
    group=st.sampled_from(cb.GROUPS),
    dropped=st.sampled_from([0.0, 0.4, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_colskip_matmul_matches_numpy(tokens, n, k, group, dropped, seed):
    """One token (decode) and several, over the pass size; groups of every size; K not a
    multiple of the group; nothing, 40% or 90% of the inputs dropped."""
    rng = np.random.default_rng(seed)
    (values, scale, mins), dense, size = random_weight(rng, n, k, group)
    x = (rng.standard_normal((tokens, k)) * 2).astype(np.float32)
    threshold = float(np.quantile(np.abs(x), dropped)) if dropped else 0.0
    got = cb.colskip_matmul_w4(x, values, scale, mins, threshold, n)
    xq = rounded_activations(x, values.shape[0], group, threshold)
    check_close(got, xq, dense, size)


def test_dropped_inputs_are_never_read():
    """Garbage in the rows of inputs every token drops changes nothing."""
    rng = np.random.default_rng(3)
    (values, scale, mins), _, _ = random_weight(rng, 300, 512, 64)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[:, ::3] = 0.01  # dropped at threshold 0.05, whatever the other token holds
    clean = cb.colskip_matmul_w4(x, values, scale, mins, 0.05, 300)
    spoiled = values.copy()
    spoiled[::3] = 0xFF
    assert np.array_equal(cb.colskip_matmul_w4(x, spoiled, scale, mins, 0.05, 300), clean)


def test_a_kept_nan_reaches_the_output():
    rng = np.random.default_rng(4)
    (values, scale, mins), _, _ = random_weight(rng, 40, 128, 32)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    x[0, 70] = np.nan
    assert np.isnan(cb.colskip_matmul_w4(x, values, scale, mins, 0.5, 40)).all()


@pytest.mark.parametrize("prologue", [RMSNORM, GATED])
def test_the_fused_prologue_and_add_match_numpy(prologue):
    rng = np.random.default_rng(5)
    k, n, tokens = 256, 130, 3
    (values, scale, mins), dense, size = random_weight(rng, n, k, 64)
    x = rng.standard_normal((tokens, 2 * k if prologue == GATED else k)).astype(np.float32)
    norm = (rng.random(k) + 0.5).astype(np.float32)
    if prologue == RMSNORM:
        h = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-5) * norm
    else:
        gate, up = x[:, :k].astype(np.float64), x[:, k:]
        h = gate / (1 + np.exp(-gate)) * up
    out = rng.standard_normal((tokens, n)).astype(np.float32)
    start = out.copy()
    cb.colskip_matmul_w4_into(
        x, values, scale, mins, 0.3, k, out, h=np.empty((tokens, k), np.float32), norm=norm,
        eps=1e-5, prologue=prologue, accumulate=True,
    )  # fmt: skip
    xq = rounded_activations(h.astype(np.float32), k, 64, 0.3)
    want = start + xq @ dense.T
    # The prologue's float32 rounding (and fast exp) can move an input across a rounding
    # step of its int8 value: a few steps of 1/127 of a group's largest input, at most.
    assert np.abs(out - want).max() <= 1e-3 * (np.abs(xq) @ size.T).max()


def test_mismatched_arrays_are_refused():
    rng = np.random.default_rng(6)
    (values, scale, mins), _, _ = random_weight(rng, 8, 64, 32)
    three = np.zeros((3, scale.shape[1]), np.uint16)  # 64 inputs in 3 groups
    with pytest.raises(ValueError, match="group"):
        cb.colskip_matmul_w4(np.zeros((1, 64), np.float32), values, three, three, 0.0, 8)
    with pytest.raises(ValueError, match="mins must be"):
        cb.colskip_matmul_w4(np.zeros((1, 64), np.float32), values, scale, mins[:1], 0.0, 8)
    with pytest.raises(ValueError, match="shapes do not match"):
        cb.colskip_matmul_w4(np.zeros((1, 65), np.float32), values, scale, mins, 0.0, 8)


@pytest.mark.parametrize("group", cb.GROUPS)
def test_an_int4_weight_keeps_its_values_in_the_input_major_layout(group):
    """lamina's int4 BlockWeight and its activation-sparse form dequantize to the same bits."""
    rng = np.random.default_rng(group)
    block = quantize_int4(DenseWeight(rng.standard_normal((37, 200)).astype(np.float32)), group)
    skipping = to_colskip_blocks(block, 0.25)
    rows = np.empty((37, 200), np.float32)
    dequantize_rows_into(*block.kernel_arrays, 37, np.arange(37), rows)
    q = cb.deinterleave_outputs(skipping.values, 37).astype(np.float32)
    d, m = (np.repeat(a.view(np.float16).astype(np.float32)[:, :37].T, group, 1)
            for a in (skipping.scale, skipping.mins))  # fmt: skip
    assert np.array_equal((d * q + m)[:, :200], rows)
    assert skipping.threshold == 0.25 and skipping.group == group


def _interleave_assembly(cpu: str) -> str:
    module = ir.Module(name="interleave")
    v64 = ir.VectorType(ir.IntType(8), 64)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [v64.as_pointer()] * 2), "f")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    rows = [builder.load(builder.gep(fn.args[0], [ir.IntType(64)(i)])) for i in range(4)]
    for i, vector in enumerate(cb._interleave(builder, rows)):
        builder.store(vector, builder.gep(fn.args[1], [ir.IntType(64)(i)]))
    builder.ret_void()
    return assembly_for(module, cpu)


@pytest.mark.parametrize("cpu", ["icelake-server", "haswell"])
def test_the_interleave_compiles_to_in_lane_unpacks(cpu):
    """Four rows become dword lanes with 8 unpacks and no cross-lane permutes."""
    assembly = _interleave_assembly(cpu)
    for instruction in ("vpunpcklbw", "vpunpckhbw", "vpunpcklwd", "vpunpckhwd"):
        assert instruction in assembly
    assert "vperm" not in assembly
