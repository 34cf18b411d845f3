"""Continuous batching through the engine: a batch gives, token for token, what the same
prompts give one at a time, whatever the scheduler does to fit them (chunked prefill,
preemption under a tiny KV budget, prefix-cache hits, forks for n > 1 and beam search).

The int8 model is used because its matmuls are exact integer dot products, so a token's
logits do not depend on which other tokens share its forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):",
    "The best way to learn a language is " * 12,  # long: prefilled in several chunks
    "Water boils at",
    "Q: What is the largest planet?\nA:",
    "Roses are red,",
]


# K and V of one 16-token block of the default model: 30 layers, 3 KV heads of 64 floats.
BLOCK_BYTES = 2 * 30 * 3 * 64 * 4 * 16


def _int8_llm(max_model_len: int = 512, **kwargs) -> LLM:
    return LLM(quant="int8", max_model_len=max_model_len, **kwargs)


@pytest.fixture(scope="module")
def one_by_one() -> list[list[int]]:
    """Each prompt alone, with nothing cached: the reference the batches must match."""
    llm = _int8_llm(enable_prefix_caching=False, max_num_seqs=1, max_num_batched_tokens=512)
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def batch_llm() -> LLM:
    return _int8_llm(max_num_seqs=8, max_num_batched_tokens=32)


def test_batch_equals_one_by_one_with_chunked_prefill(batch_llm, one_by_one):
    outputs = batch_llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == one_by_one
    assert all(o.finish_reason == "length" for o in outputs)


def test_batch_equals_one_by_one_under_preemption(one_by_one):
    # The 8 sequences need 22 blocks at their longest; the cache has 14: sequences must be
    # preempted and recomputed.
    llm = _int8_llm(160, kv_cache_mb=14 * BLOCK_BYTES / 2**20, max_num_batched_tokens=64)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert llm._engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == one_by_one
    assert llm._engine.cache.allocator.num_free == llm._engine.cache.allocator.num_blocks


def test_prefix_cache_hits_in_a_batch_change_no_output(batch_llm, one_by_one):
    batch_llm.generate(PROMPTS[4], GREEDY)  # caches the long prompt's blocks
    outputs = batch_llm.generate(PROMPTS, GREEDY)
    assert outputs[4].metrics.cached_prompt_tokens >= 16
    assert [o.token_ids for o in outputs] == one_by_one


def test_per_request_sampling_params_in_one_batch(batch_llm, one_by_one):
    params = [GREEDY, SamplingParams(max_tokens=5, temperature=0.9, seed=3), GREEDY]
    outputs = batch_llm.generate(PROMPTS[:3], params)
    assert outputs[0].token_ids == one_by_one[0]
    assert outputs[2].token_ids == one_by_one[2]
    assert len(outputs[1].token_ids) <= 5
    again = batch_llm.generate(PROMPTS[1], params[1])[0]
    assert again.token_ids == outputs[1].token_ids  # a seed fixes the draws, batch or not


def test_n_greedy_completions_equal_the_single_one(batch_llm, one_by_one):
    out = batch_llm.generate(
        PROMPTS[0], SamplingParams(n=3, max_tokens=20, temperature=0, ignore_eos=True)
    )[0]
    assert [c.token_ids for c in out.outputs] == [one_by_one[0]] * 3


def test_best_of_keeps_the_most_likely_and_reports_true_logprobs(batch_llm):
    params = SamplingParams(n=2, best_of=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    out = batch_llm.generate(PROMPTS[0], params)[0]
    assert len(out.outputs) == 2
    prompt = out.prompt_token_ids
    for c in out.outputs:
        logits = batch_llm.prompt_logits(prompt + c.token_ids).astype(np.float64)
        rows = logits[len(prompt) - 1 : -1, : batch_llm.tokenizer.vocab_size]
        logp = rows - rows.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        expected = logp[np.arange(len(c.token_ids)), c.token_ids].sum()
        assert c.cumulative_logprob == pytest.approx(expected, abs=1e-3)
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob


def _reference_beam_search(
    llm: LLM,
    prompt: list[int],
    width: int,
    n: int,
    max_tokens: int,
    stop_ids: set[int],
    length_penalty: float = 1.0,
):
    """Beam search recomputing every beam from scratch with prompt_logits (no cache, no fork)."""
    vocab = llm.tokenizer.vocab_size
    beams = [([], 0.0)]
    finished = []

    def score(tokens, cum):
        return cum / max(len(tokens), 1) ** length_penalty

    for step in range(1, max_tokens + 1):
        candidates = []
        for order, (tokens, cum) in enumerate(beams):
            row = llm.prompt_logits(prompt + tokens)[-1, :vocab].astype(np.float64)
            logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
            for t in np.argsort(-logp, kind="stable")[: 2 * width]:
                candidates.append((cum + logp[t], order, int(t), tokens))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        chosen = []
        for rank, (cum, _, t, tokens) in enumerate(candidates):
            if t in stop_ids:
                if rank < width:
                    finished.append((tokens + [t], cum))
                continue
            chosen.append((tokens + [t], cum))
            if len(chosen) == width:
                break
        if step >= max_tokens:
            finished += chosen
            break
        if len(finished) >= width and chosen:
            worst = sorted((score(*f) for f in finished), reverse=True)[width - 1]
            if max(c for _, c in chosen) / step**length_penalty <= worst:
                break
        if not chosen:
            break
        beams = chosen
    finished.sort(key=lambda f: -score(*f))
    return [tokens for tokens, _ in finished[:n]]


@pytest.mark.parametrize("stop_word", [None, "."])
def test_beam_search_matches_a_recomputing_reference(batch_llm, stop_word):
    prompt = batch_llm.tokenizer.encode(PROMPTS[0])
    stop_ids = set()
    if stop_word is not None:
        stop_ids = {batch_llm.tokenizer.encode(stop_word, add_special_tokens=False)[0]}
    params = SamplingParams(
        n=2,
        best_of=3,
        use_beam_search=True,
        max_tokens=6,
        ignore_eos=True,
        stop_token_ids=sorted(stop_ids),
    )
    out = batch_llm.generate(prompt, params)[0]
    expected = _reference_beam_search(batch_llm, prompt, 3, 2, 6, stop_ids)
    assert [c.token_ids for c in out.outputs] == expected


def test_beam_width_one_is_greedy(batch_llm, one_by_one):
    params = SamplingParams(use_beam_search=True, best_of=1, max_tokens=20, ignore_eos=True)
    assert batch_llm.generate(PROMPTS[1], params)[0].token_ids == one_by_one[1]


def test_closing_a_stream_frees_its_blocks(batch_llm):
    allocator = batch_llm._engine.cache.allocator
    stream = batch_llm.stream(PROMPTS[2], SamplingParams(max_tokens=50, temperature=0))
    next(iter(stream))
    assert allocator.num_free < allocator.num_blocks
    stream.close()
    assert stream.output.finish_reason == "abort"
    assert allocator.num_free == allocator.num_blocks


def test_a_request_larger_than_the_cache_is_aborted_and_others_go_on():
    llm = _int8_llm(64, kv_cache_mb=4 * BLOCK_BYTES / 2**20)
    big, small = llm.generate(
        [PROMPTS[0], PROMPTS[1]],
        [
            SamplingParams(n=4, max_tokens=60, temperature=0.7, ignore_eos=True, seed=0),
            SamplingParams(max_tokens=4, temperature=0),
        ],
    )
    assert big.finish_reason == "abort" and "KV cache" in big.error
    assert small.finish_reason == "length" and len(small.token_ids) == 4


def test_int8_logits_do_not_depend_on_how_tokens_are_batched(batch_llm):
    """A prompt prefilled at once and the same tokens fed in a chunk then one by one (decode
    GEMV) give bit-identical logits: what makes a preempted sequence's recompute continue
    exactly where it was."""
    engine = batch_llm._engine
    prompt = batch_llm.tokenizer.encode(PROMPTS[2])
    full = batch_llm.prompt_logits(prompt)
    engine.cache.add_sequence("probe", [])
    rows = []
    try:
        for chunk in [prompt[:5]] + [[t] for t in prompt[5:]]:
            rows.append(engine.runner.run([("probe", chunk)])[-1].copy())  # a workspace view
            engine.cache.commit("probe", chunk)
    finally:
        engine.cache.free("probe")
    assert np.array_equal(np.array(rows), full[4:])
