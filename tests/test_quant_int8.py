"""Int8 quantization: the quantizer against numpy, the backend's int8 paths against float32,
and the int8 default model against its float32 self."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from engine.backends.cpu import SMALL_BATCH, CPUBackend
from engine.quant.formats import WeightPlan
from engine.quant.int8 import quantize_int8
from engine.weights import DenseWeight


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 2, 17]), k=st.sampled_from([1, 5, 64]), seed=st.integers(0, 2**16))
def test_quantize_int8_is_per_row_absmax(n, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0] = 0.0  # an all-zero row must not divide by zero
    q = quantize_int8(DenseWeight(w))
    assert q.data.dtype == np.int8 and q.scale.dtype == np.float32
    assert q.scale[0] == 0 and not q.data[0].any()
    assert np.allclose(q.scale, np.abs(w).max(axis=1) / 127)
    # rounding error is at most half a step per element
    err = np.abs(q.data * q.scale[:, None] - w)
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("tokens", [1, SMALL_BATCH, SMALL_BATCH + 1, 300])
def test_backend_int8_linear_matches_dequantized_float(tokens):
    """Decode GEMV and prefill GEMM compute x @ dequant(W).T + b, up to the rounding of x to
    int16 per token (half a step, absmax / 32767, per activation)."""
    rng = np.random.default_rng(tokens)
    w = DenseWeight(
        rng.standard_normal((700, 96)).astype(np.float32), rng.random(700).astype(np.float32)
    )
    q = quantize_int8(w)
    x = rng.standard_normal((tokens, 96)).astype(np.float32)
    dequantized = (q.data * q.scale[:, None]).astype(np.float64)
    ref = x.astype(np.float64) @ dequantized.T + w.bias
    step = np.abs(x).max(axis=1, keepdims=True) / 32767
    bound = 0.5 * step * np.abs(dequantized).sum(axis=1) + 1e-4 * np.abs(ref) + 1e-5
    assert np.all(np.abs(CPUBackend().linear(x, q) - ref) <= bound)


def test_unknown_quant_is_refused():
    with pytest.raises(ValueError, match="int3.*f32, int8, int4"):
        WeightPlan("int3")


@pytest.fixture(scope="module")
def int8_llm():
    return LLM(quant="int8")


def test_int8_weights_are_a_quarter_of_float32(int8_llm, default_llm):
    ratio = int8_llm.loaded.weights.nbytes / default_llm.loaded.weights.nbytes
    assert 0.24 < ratio < 0.27


def test_int8_logits_close_to_float32(int8_llm, default_llm):
    """Stated tolerance: the int8 model's logits stay within 3% of the float32 logit range on
    average, the top token agrees at 90% of positions or more."""
    text = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue."
    a = int8_llm.prompt_logits(text)
    b = default_llm.prompt_logits(text)
    spread = b.max(axis=1) - b.min(axis=1)
    assert (np.abs(a - b).mean(axis=1) / spread).max() < 0.03
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 0.9


def test_int8_greedy_mostly_agrees_with_float32(int8_llm, default_llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):"]
    same = total = 0
    for prompt in prompts:
        x = int8_llm.generate(prompt, params)[0].token_ids
        y = default_llm.generate(prompt, params)[0].token_ids
        agree = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        same += agree
        total += len(x)
    assert same / total >= 0.5
