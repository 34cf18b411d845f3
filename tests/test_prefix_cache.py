"""Prefix caching through the engine: a repeated prompt prefix is not recomputed, and reusing
its cached keys and values changes no output."""

from __future__ import annotations

import numpy as np

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SYSTEM = "You are a careful assistant. Answer in one short sentence. " * 4


def test_repeated_prefix_is_served_from_the_cache(default_llm):
    first = default_llm.generate(SYSTEM + "What is the capital of France?", GREEDY)[0]
    second = default_llm.generate(SYSTEM + "What is the capital of France?", GREEDY)[0]
    assert second.metrics.cached_prompt_tokens >= 16
    assert second.metrics.cached_prompt_tokens % 16 == 0
    assert second.token_ids == first.token_ids


def test_shared_system_prompt_gives_the_same_answer_as_a_cold_run(default_llm):
    """The second question shares only the system prompt; its greedy answer must equal the
    one computed with no cache at all (prompt_logits never reads the prefix cache)."""
    default_llm.generate(SYSTEM + "Name a colour.", GREEDY)
    prompt = SYSTEM + "Name a planet."
    warm = default_llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0]
    assert warm.metrics.cached_prompt_tokens > 0
    cold_logits = default_llm.prompt_logits(prompt)[-1]
    assert warm.token_ids[0] == int(np.argmax(cold_logits))


def test_prefix_caching_can_be_turned_off():
    llm = LLM(enable_prefix_caching=False)
    llm.generate(SYSTEM + "Hi.", GREEDY)
    assert llm.generate(SYSTEM + "Hi.", GREEDY)[0].metrics.cached_prompt_tokens == 0


def test_a_long_prefix_is_reused_through_the_engine(tmp_path, hf_tokenizer):
    """A 64k-token prompt (nested-tuple keys hit Python's recursion limit from about 16k) is
    served from the prefix cache the second time: the same greedy continuation."""
    import torch
    import transformers

    from tests.tiny_models import VOCAB

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=65_600,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    llm = LLM(tmp_path, kv_cache_mb=32, max_num_batched_tokens=4096)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, VOCAB, 65_540)]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    first = llm.generate(prompt, params)[0]
    again = llm.generate(prompt, params)[0]
    assert again.metrics.cached_prompt_tokens == 65_536  # every full block
    assert again.token_ids == first.token_ids
