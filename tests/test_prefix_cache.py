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
