"""A step is a transaction: one failing request ends with finish reason "error" and frees its
blocks, and every other request in flight completes exactly as in a clean run.

Faults are injected where a real bug would strike: the sampler, the detokenizer, block
allocation in the middle of a step's reservations, and the commit after the pass.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import BlockAllocator, PagedKVCache
from engine.sampling import Sampler
from tests.tiny_models import build_tiny_model

PROMPTS = [[5 + i, 17, 3 * i + 40, 99, 7, 123 + i] for i in range(8)]
VICTIM = 5  # index of the request made to fail
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("faults") / "tiny"
    build_tiny_model("llama-gqa-untied", folder, hf_tokenizer)
    return LLM(folder, kv_cache_mb=4, max_num_seqs=8)


def params(i: int) -> SamplingParams:
    # The seed marks the request for the injected faults; greedy ignores it.
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, seed=1000 + i)


def run_all(llm: LLM):
    return llm.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])


@pytest.fixture(scope="module")
def clean(llm):
    return [(o.token_ids, o.text, o.finish_reason) for o in run_all(llm)]


def assert_all_blocks_free(llm: LLM) -> None:
    alloc = llm.engine_loop.cache.allocator
    assert not alloc.refcount.any()
    assert alloc.num_free == alloc.num_blocks
    assert llm.engine_loop.cache.sequence_ids() == []


def assert_victim_failed_others_clean(outputs, clean, caplog) -> None:
    for i, out in enumerate(outputs):
        if i == VICTIM:
            assert out.finish_reason == "error"
            assert "internal error" in out.error and "injected" in out.error
        else:
            assert (out.token_ids, out.text, out.finish_reason) == clean[i]
    logged = [r for r in caplog.records if r.name == "lamina.engine"]
    assert logged and logged[0].exc_info is not None  # the developer gets the traceback


def victim(params_: SamplingParams) -> bool:
    return params_.seed == 1000 + VICTIM


def test_sampler_failure_ends_only_its_request(llm, clean, monkeypatch, caplog):
    real = Sampler.sample
    calls = {"n": 0}

    def sample(self, *args, **kwargs):
        if victim(self.params):
            calls["n"] += 1
            if calls["n"] == 3:  # mid-generation, with blocks held
                raise RuntimeError("injected sampler fault")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "sample", sample)
    with caplog.at_level(logging.ERROR, logger="lamina.engine"):
        outputs = run_all(llm)
    assert_victim_failed_others_clean(outputs, clean, caplog)
    assert len(outputs[VICTIM].token_ids) == 2
    assert_all_blocks_free(llm)


def test_detokenizer_failure_ends_only_its_request(llm, clean, monkeypatch, caplog):
    real_init, real_push = IncrementalDetokenizer.__init__, IncrementalDetokenizer.push

    def init(self, tokenizer, prompt_ids, *args, **kwargs):
        self.doomed = list(prompt_ids) == PROMPTS[VICTIM]
        real_init(self, tokenizer, prompt_ids, *args, **kwargs)

    def push(self, token_id):
        if self.doomed:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return real_push(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "__init__", init)
    monkeypatch.setattr(IncrementalDetokenizer, "push", push)
    with caplog.at_level(logging.ERROR, logger="lamina.engine"):
        outputs = run_all(llm)
    assert_victim_failed_others_clean(outputs, clean, caplog)
    assert_all_blocks_free(llm)


def test_allocation_failure_mid_step_rolls_back_and_ends_only_its_request(
    llm, clean, monkeypatch, caplog
):
    """The victim's second block (taken while decoding) is refused while the other
    sequences of the same step, which cross into their second block too, already hold
    their reservations."""
    cache = llm.engine_loop.cache
    real_reserve, real_allocate = PagedKVCache.reserve, BlockAllocator.allocate
    state = {"victim_seq": None, "reserving": None}

    def reserve(self, seq_id, num_tokens):
        state["reserving"] = seq_id
        try:
            return real_reserve(self, seq_id, num_tokens)
        finally:
            state["reserving"] = None

    def allocate(self):
        seq = state["reserving"]
        if seq is not None and seq == state["victim_seq"] and cache.block_table(seq):
            raise RuntimeError("injected allocation fault")  # its second block
        return real_allocate(self)

    real_add = PagedKVCache.add_sequence

    def add_sequence(self, seq_id, prompt):
        if list(prompt) == PROMPTS[VICTIM]:
            state["victim_seq"] = seq_id
        return real_add(self, seq_id, prompt)

    monkeypatch.setattr(PagedKVCache, "reserve", reserve)
    monkeypatch.setattr(BlockAllocator, "allocate", allocate)
    monkeypatch.setattr(PagedKVCache, "add_sequence", add_sequence)
    with caplog.at_level(logging.ERROR, logger="lamina.engine"):
        outputs = run_all(llm)
    assert_victim_failed_others_clean(outputs, clean, caplog)
    assert_all_blocks_free(llm)


def test_commit_failure_ends_only_its_request(llm, clean, monkeypatch, caplog):
    real_commit, real_add = PagedKVCache.commit, PagedKVCache.add_sequence
    state = {"victim_seq": None, "commits": 0}

    def add_sequence(self, seq_id, prompt):
        if list(prompt) == PROMPTS[VICTIM]:
            state["victim_seq"] = seq_id
        return real_add(self, seq_id, prompt)

    def commit(self, seq_id, token_ids):
        if seq_id == state["victim_seq"]:
            state["commits"] += 1
            if state["commits"] == 4:
                raise RuntimeError("injected commit fault")
        return real_commit(self, seq_id, token_ids)

    monkeypatch.setattr(PagedKVCache, "commit", commit)
    monkeypatch.setattr(PagedKVCache, "add_sequence", add_sequence)
    with caplog.at_level(logging.ERROR, logger="lamina.engine"):
        outputs = run_all(llm)
    assert_victim_failed_others_clean(outputs, clean, caplog)
    assert_all_blocks_free(llm)


def test_forward_failure_ends_the_requests_of_that_step_and_the_engine_goes_on(
    llm, clean, monkeypatch, caplog
):
    model = llm.engine_loop.runner.model
    real_forward = type(model).forward
    calls = {"n": 0}

    def forward(self, batch, ws):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected forward fault")
        return real_forward(self, batch, ws)

    monkeypatch.setattr(type(model), "forward", forward)
    with caplog.at_level(logging.ERROR, logger="lamina.engine"):
        outputs = run_all(llm)
    assert all(o.finish_reason == "error" for o in outputs)  # one pass held them all
    assert_all_blocks_free(llm)
    monkeypatch.undo()
    again = run_all(llm)
    assert [(o.token_ids, o.text, o.finish_reason) for o in again] == clean


def test_streams_of_other_requests_continue_when_one_fails(llm, clean, monkeypatch):
    """generate_iter (the batch job's path) yields the failed request with its error."""
    real = Sampler.sample

    def sample(self, *args, **kwargs):
        if victim(self.params):
            raise RuntimeError("injected sampler fault")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "sample", sample)
    pairs = [(p, params(i)) for i, p in enumerate(PROMPTS)]
    got = {int(o.request_id): o for o in llm.generate_iter(pairs)}
    assert got[VICTIM].finish_reason == "error"
    for i in set(range(len(PROMPTS))) - {VICTIM}:
        assert got[i].token_ids == clean[i][0]
    assert_all_blocks_free(llm)


def test_logits_are_not_shared_between_requests_of_one_step(llm):
    """Workspace logits are views: each request must sample from its own row."""
    outs = run_all(llm)
    singles = [llm.generate(p, params(i))[0].token_ids for i, p in enumerate(PROMPTS[:3])]
    assert [o.token_ids for o in outs[:3]] == singles
    assert np.unique([tuple(o.token_ids) for o in outs], axis=0).shape[0] > 1


def test_generate_iter_refuses_a_bad_prompt_alone(llm, clean):
    """A prompt that is not valid text ends only its own request, with the reason."""
    pairs = [(p, params(i)) for i, p in enumerate(PROMPTS)]
    pairs[VICTIM] = ("bad \ud800 text", params(VICTIM))
    got = {int(o.request_id): o for o in llm.generate_iter(pairs)}
    assert got[VICTIM].finish_reason == "abort"
    assert "not valid UTF-8" in got[VICTIM].error
    for i in set(range(len(PROMPTS))) - {VICTIM}:
        assert got[i].token_ids == clean[i][0]
    assert_all_blocks_free(llm)
