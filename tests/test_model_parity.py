"""Logits and greedy continuations agree with transformers (float32) for every architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from tests.tiny_models import VARIANTS, build_tiny_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a village by the sea, there lived an old fisherman who",
]
GREEDY_TOKENS = 32


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' KV cache, ignoring EOS."""
    out: list[int] = []
    with torch.no_grad():
        result = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(
                torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True
            )
    return out


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    spread = float(ref.max() - ref.min())
    worst = float(np.abs(ours - ref).max())
    assert worst <= 1e-3 * spread, (
        f"max |diff| {worst:.2e} exceeds 1e-3 of logit range {spread:.2f}"
    )


def greedy(llm: LLM, prompt_ids: list[int], n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    stream = llm.stream(prompt_ids, params)
    for _ in stream:
        pass
    assert stream.output.finish_reason == "length"
    return stream.output.token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_logits_match_transformers(
    default_llm, hf_default_model, hf_tokenizer, prompt
):
    ids = hf_tokenizer.encode(prompt)
    assert_logits_close(default_llm.prompt_logits(ids), hf_logits(hf_default_model, ids))


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_default_model_greedy_continuation_matches(
    default_llm, hf_default_model, hf_tokenizer, prompt
):
    ids = hf_tokenizer.encode(prompt)
    assert greedy(default_llm, ids, GREEDY_TOKENS) == hf_greedy(
        hf_default_model, ids, GREEDY_TOKENS
    )


def test_default_model_chat_greedy_matches(default_llm, hf_default_model, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    reply = default_llm.chat(messages, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0))
    expected = hf_greedy(hf_default_model, ids, len(reply.token_ids))
    assert reply.token_ids == expected[: len(reply.token_ids)]
    assert reply.prompt_token_ids == ids


@pytest.fixture(scope="module")
def tokenizer_for_tiny(hf_tokenizer):
    return hf_tokenizer


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tiny_models_match_transformers(name, tmp_path, tokenizer_for_tiny):
    hf = build_tiny_model(name, tmp_path, tokenizer_for_tiny)
    llm = LLM(tmp_path)
    assert llm.config.architecture == name.split("-")[0]
    if "rope_type" in hf.config.rope_parameters:  # not one per layer type (Gemma 3)
        assert llm.config.rope.rope_type == hf.config.rope_parameters["rope_type"]
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(3, 49152, size=40)]  # longer than mistral's window
    assert_logits_close(llm.prompt_logits(ids), hf_logits(hf, ids))
    assert greedy(llm, ids[:8], GREEDY_TOKENS) == hf_greedy(hf, ids[:8], GREEDY_TOKENS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sharded_checkpoint(dtype, tmp_path, tokenizer_for_tiny):
    """bf16/f16 shards with an index json load, upcast to f32, like transformers does."""
    build_tiny_model("llama-gqa-untied", tmp_path, tokenizer_for_tiny, dtype=dtype, shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = list(range(100, 130))
    assert_logits_close(LLM(tmp_path).prompt_logits(ids), hf_logits(hf, ids))


@pytest.mark.parametrize(
    ("name", "half"),
    [
        ("llama-gqa-untied", True),
        ("qwen2-bias-tied", False),
        ("qwen3-qknorm-tied", False),
        ("phi3-fused", False),
        ("qwen3_moe-softmax", False),  # experts stacked per projection, no renormalising
        ("mixtral-window", True),  # a llama with experts, and a sliding window
    ],
)
def test_gguf_export_of_tiny_model(name, half, tmp_path, tokenizer_for_tiny, default_gguf):
    """A GGUF written like llama.cpp's converter (llama Q/K permuted, qwen2 not) loads right."""
    from bench.gguf_export import export_gguf

    hf = build_tiny_model(name, tmp_path / "hf", tokenizer_for_tiny)
    path = export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", default_gguf, half=half)
    ids = list(range(200, 230))
    ref = hf_logits(hf.half().float() if half else hf, ids)
    assert_logits_close(LLM(path).prompt_logits(ids), ref)


@pytest.mark.parametrize(
    "legacy",
    [
        {"rope_theta": 50000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {
            "rope_theta": 50000.0,
            "rope_scaling": VARIANTS["llama-mha-tied-rope3"][2]["rope_scaling"],
        },
    ],
)
def test_transformers4_style_rope_config(legacy, tmp_path, tokenizer_for_tiny):
    """Hub configs written by transformers 4 (rope_theta + rope_scaling) are read the same."""
    import json

    from transformers import AutoModelForCausalLM

    build_tiny_model("llama-gqa-untied", tmp_path, tokenizer_for_tiny)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["rope_parameters"]
    path.write_text(json.dumps({**cfg, **legacy}))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = list(range(300, 340))
    assert_logits_close(LLM(tmp_path).prompt_logits(ids), hf_logits(hf, ids))
