"""int8 KV storage through the engine: about a quarter of the memory, and nearly the same model."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np

from engine import LLM

TEXT = topics["assignment"][:2500]


def test_int8_kv_cache_holds_more_and_stays_close_to_float32(default_llm):
    q = LLM(max_model_len=default_llm.max_model_len, kv_cache_dtype="int8")
    assert _bytes_per_block(q) < 0.3 * _bytes_per_block(default_llm)
    ref = default_llm.prompt_logits(TEXT[:1200])
    got = q.prompt_logits(TEXT[:1200])
    assert np.mean(ref.argmax(1) == got.argmax(1)) > 0.9
    ppl_ref = default_llm.perplexity(TEXT, context=256).perplexity
    ppl = q.perplexity(TEXT, context=256).perplexity
    assert abs(ppl / ppl_ref - 1) < 0.02


def _bytes_per_block(llm: LLM) -> float:
    cache = llm._engine.cache
    arrays = [a for a in (cache.k, cache.v, cache.k_scale, cache.v_scale) if a is not None]
    return sum(a.nbytes for a in arrays) / cache.allocator.num_blocks
