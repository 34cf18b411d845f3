"""Speculative decoding (engine/speculative.py) is lossless.

- Greedy: the same tokens with and without speculation, on the default model and prompts
  that the n-gram lookup predicts well (so most steps verify several proposals), alone, in
  a batch, with n > 1, with a structured-output constraint, with prefix-cache hits and under
  preemption.
- Sampling: a seed gives the tokens plain decode gives (every position is drawn as without
  speculation, and a proposal kept when it is the drawn token), and on a random tiny model
  the second token's distribution after speculation is the one its logits give (a
  chi-square test).
- The lookup against a plain Python reference.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from engine.cli import main
from engine.errors import InvalidInputError
from engine.loader.default_model import default_model_path
from engine.speculative import SpeculativeConfig, ngram_proposal
from tests.test_server import client, server  # noqa: F401 - fixtures serving `llm`
from tests.test_structured import tiny  # noqa: F401 - the random 273-token model fixture

PASSAGE = (
    "Lamina is a CPU-first inference engine written in Python. It runs quantized models on "
    "ordinary laptops, and its kernels are compiled by numba. The quick brown fox jumps over "
    "the lazy dog. "
) * 2
COPY = [{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "max_batch": 64}


@pytest.fixture(scope="module")
def plain() -> LLM:
    return LLM(quant="int8", max_model_len=1024)


@pytest.fixture(scope="module")
def spec() -> LLM:
    return LLM(quant="int8", max_model_len=1024, speculative=NGRAM)


def reference(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=30), st.integers(1, 5), st.integers(1, 3),
       st.integers(0, 3))  # fmt: skip
def test_ngram_lookup_matches_a_plain_reference(tokens, k, lo, extra):
    assert ngram_proposal(tokens, k, lo, lo + extra) == reference(tokens, k, lo, lo + extra)


def greedy(llm: LLM, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=96, temperature=0, **fields)


def test_greedy_tokens_are_the_same_and_proposals_are_accepted(plain, spec):
    expected = plain.chat(COPY, greedy(plain))
    got = spec.chat(COPY, greedy(spec))
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert got.text == expected.text
    m = got.metrics
    assert m.spec_proposed > 0 and m.spec_accepted / m.spec_proposed > 0.5
    assert m.steps < m.generated_tokens  # several tokens per step


def test_greedy_in_a_batch_with_n_and_a_constraint(plain, spec):
    prompts = [plain.encode_chat(COPY)[1], plain.encode_chat([{"role": "user", "content":
               "Count: one two three one two three one two"}])[1]]  # fmt: skip
    for fields in ({}, {"n": 2}, {"guided_regex": "[A-Za-z ,.\n-]{1,80}"}):
        want = [o.outputs for o in plain.generate(prompts, greedy(plain, **fields))]
        got = [o.outputs for o in spec.generate(prompts, greedy(spec, **fields))]
        assert [[c.token_ids for c in cs] for cs in got] == [
            [c.token_ids for c in cs] for cs in want
        ]
    constrained = spec.generate(prompts[:1], greedy(spec, guided_regex="[A-Za-z ,.\n-]{1,80}"))
    assert re.fullmatch("[A-Za-z ,.\n-]{1,80}", constrained[0].text)
    assert constrained[0].metrics.spec_accepted > 0


def test_prefix_cache_hits_and_preemption(plain):
    """A KV cache too small for all requests at once: some are preempted and recomputed,
    and the repeated prompt is served from the prefix cache."""
    small = LLM(quant="int8", max_model_len=256, kv_cache_mb=12, speculative=NGRAM)
    prompts = [small.encode_chat(COPY)[1]] * 2 + [
        small.encode_chat([{"role": "user", "content": f"Say {w} three times."}])[1]
        for w in ("apple", "river", "stone")
    ]
    params = greedy(small, ignore_eos=True)  # 217 tokens for each copy: 14 of 17 blocks
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    outs = small.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert small.engine_loop.scheduler.num_preemptions > 0
    assert any(o.metrics.cached_prompt_tokens > 0 for o in outs)
    assert sum(o.metrics.spec_accepted for o in outs) > 0
    cache = small.engine_loop.cache
    assert cache.usage() == (0, 0) and not cache.allocator.refcount.any()


def critical_chi2(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability about 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: Counter, probs: np.ndarray, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, bins with expected count < 5 merged."""
    expected = probs * n
    big = expected >= 5
    stat = sum((counts[t] - expected[t]) ** 2 / expected[t] for t in np.flatnonzero(big))
    rest_e = expected[~big].sum()
    rest_o = sum(c for t, c in counts.items() if not big[t])
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
    return stat, int(big.sum()) - (0 if rest_e > 0 else 1)


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.3},
     {"temperature": 1.3, "top_p": 0.8, "frequency_penalty": 0.5}, {"temperature": 0.9,
     "min_p": 0.05, "n": 2}],
)  # fmt: skip
def test_seeded_sampling_gives_the_tokens_of_plain_decode(plain, spec, fields):
    """Each position is sampled as plain decode samples it, one seeded draw per position in
    order, and a proposal is kept when it is the sampled token: the same seed gives the same
    text with or without speculation, alone or beside other requests."""
    params = SamplingParams(max_tokens=64, seed=11, **fields)
    want = [c.token_ids for c in plain.chat(COPY, params).outputs]
    got = spec.chat(COPY, params)
    assert [c.token_ids for c in got.outputs] == want
    assert got.metrics.spec_proposed > 0
    other = SamplingParams(max_tokens=16, temperature=0)
    ids = spec.encode_chat(COPY)[1]
    together = spec.generate([ids, [5, 6, 7]], [params, other])[0]
    assert [c.token_ids for c in together.outputs] == want


@pytest.fixture(scope="module")
def peaked(tiny, tmp_path_factory):  # noqa: F811
    """The tiny model's vocabulary under weights drawn wide (std 0.6), so its next-token
    distributions put most mass on a few tokens: a test of the distribution then has power
    (a 2% shift between two likely tokens moves Pearson's statistic by about 30)."""
    import shutil

    import torch
    import transformers

    folder = tmp_path_factory.mktemp("peaked")
    source = tiny.engine_config.model
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, folder / name)
    config = transformers.LlamaConfig(
        vocab_size=tiny.config.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, initializer_range=0.6, eos_token_id=0,
        bos_token_id=None, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_sampling_after_speculation_keeps_the_models_distribution(peaked):
    """Every token appears in the prompt followed by token 7, so the lookup proposes 7 after
    any first token; the second tokens' frequencies, grouped by the first token, match the
    probabilities the model's logits give (one chi-square test over the groups)."""
    llm = LLM(peaked, max_model_len=1024, max_num_seqs=128,
              speculative={**NGRAM, "max_batch": 1000, "num_speculative_tokens": 1})  # fmt: skip
    vocab = llm.config.vocab_size
    prompt = [t for v in range(vocab) for t in (v, 7)] + [3]
    pairs: Counter = Counter()
    proposed = accepted = 0
    for request in range(60):  # completion i of a request draws with seed + i: no overlap
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=1000 * request, n=100,
                                ignore_eos=True)  # fmt: skip
        (out,) = llm.generate([prompt], params)
        pairs.update((c.token_ids[0], c.token_ids[1]) for c in out.outputs)
        proposed += out.metrics.spec_proposed
        accepted += out.metrics.spec_accepted
    assert proposed == 6000 and 0 < accepted < proposed  # both branches were taken
    groups: dict[int, Counter] = {}
    for (first, second), count in pairs.items():
        groups.setdefault(first, Counter())[second] += count
    stat = df = 0
    for first, seconds in groups.items():
        n = sum(seconds.values())
        if n < 300:
            continue
        row = llm.prompt_logits(prompt + [first])[-1][:vocab].astype(np.float64)
        probs = np.exp(row - row.max())
        s, d = chi2(seconds, probs / probs.sum(), n)
        stat, df = stat + s, df + d
    assert df >= 10 and stat < critical_chi2(df), (stat, df)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "eagle"}, "method must be one of"),
        ({"num_speculative_tokens": 2}, '"method"'),
        ({"method": "ngram", "num_speculative_tokens": 0}, "positive integer"),
        ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "must not exceed"),
        ({"method": "ngram", "k": 2}, "unknown speculative setting"),
        ({"method": "draft"}, "draft_model is given exactly with method draft"),
        ({"method": "self", "draft_layers": 0}, "draft_layers must be a positive integer"),
        ({"method": "ngram", "draft_layers": 2}, "apply to draft and self"),
    ],
)
def test_bad_settings_are_refused(value, message):
    with pytest.raises(InvalidInputError, match=message):
        SpeculativeConfig.of(value)


def test_cli_flags_json_and_verbose(capsys):
    argv = ["generate", "--quant", "int8", "--max-tokens", "48", "--temperature", "0", "--json",
            "--chat", f"Repeat this text exactly:\n\n{PASSAGE}"]  # fmt: skip
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    flags = ["--speculative-method", "ngram", "--num-speculative-tokens", "3", "-v"]
    assert main([*argv, *flags]) == 0
    out, err = capsys.readouterr()
    spec = json.loads(out)
    assert spec["token_ids"] == plain["token_ids"] and "spec_proposed" not in plain
    assert spec["spec_accepted"] > 0 and 0 < spec["acceptance_rate"] <= 1
    assert 0 < spec["mean_accepted_length"] <= 3  # at most k per check
    assert 0 < spec["draft_time_share"] < 1
    assert re.search(r"speculative: \d+ of \d+ proposed tokens accepted \(\d+%, [\d.]+ per "
                     r"check\), .* \d+% of the decode time drafting", err)  # fmt: skip
    code = main(["generate", "--num-speculative-tokens", "3", "Hi"])
    assert code == 2 and "needs --speculative-method" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llm(spec) -> LLM:
    """The model tests.test_server's `server` fixture serves: the speculating one."""
    return spec


def test_server_usage_reports_acceptance(client):  # noqa: F811
    reply = client.chat.completions.create(
        model="smollm2", messages=COPY, max_tokens=48, temperature=0
    )
    extra = reply.usage.model_extra["speculative"]
    assert extra["spec_accepted"] > 0 and extra["spec_proposed"] >= extra["spec_accepted"]
    assert 0 < extra["mean_accepted_length"] <= 4 and 0 < extra["draft_time_share"] < 1


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "draft", "draft_model": None},  # the target itself: every proposal holds
        {"method": "self", "draft_layers": 1},
        {"method": "self"},  # half the layers
        {"method": "self", "draft_quant": "int8"},
    ],
)
def test_draft_and_self_drafting_are_lossless(tiny, spec):  # noqa: F811
    """Greedy tokens equal plain decode's for a batch with n > 1, and sampled runs keep
    the batch's KV cache whole; a draft identical to the target has every proposal kept."""
    folder = tiny.engine_config.model
    if spec["method"] == "draft":
        spec = {**spec, "draft_model": folder}
    llm = LLM(folder, max_model_len=1024, speculative={**spec, "max_batch": 16})
    prompts = [[5, 6, 7, 8, 9, 10], [100, 101, 5, 6, 7], [3]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, n=2)
    want = [[c.token_ids for c in o.outputs] for o in tiny.generate(prompts, params)]
    outs = llm.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in outs] == want
    proposed = sum(o.metrics.spec_proposed for o in outs)
    accepted = sum(o.metrics.spec_accepted for o in outs)
    assert proposed > 0
    if spec["method"] == "draft":
        assert accepted == proposed
    llm.generate(prompts, SamplingParams(max_tokens=24, temperature=1.0, seed=3, n=2))
    draft = llm.engine_loop.ctx.speculator.proposer
    assert draft.cache.sequence_ids() == [] and not draft.cache.allocator.refcount.any()
    assert llm.engine_loop.cache.usage() == (0, 0)


def test_a_draft_with_another_vocabulary_is_refused(tiny):  # noqa: F811
    with pytest.raises(InvalidInputError, match="another vocabulary"):
        LLM(
            tiny.engine_config.model,
            speculative={"method": "draft", "draft_model": str(default_model_path())},
        )


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_constrained_and_preempted_speculation_keeps_greedy_tokens(tiny, method):  # noqa: F811
    """A regex constraint and a KV cache too small for the batch (preemptions) together."""
    folder = tiny.engine_config.model
    spec = {"method": method, "max_batch": 16, **({"draft_layers": 1} if method == "self" else {})}
    # Four 16-token blocks (256 bytes a token): the three sequences need nine at their end.
    small = {"max_model_len": 64, "kv_cache_mb": 64 * 256 / 2**20}
    plain = LLM(folder, **small)
    llm = LLM(folder, **small, speculative=spec)
    prompts = [[5, 6, 7], [9, 8, 9], [100, 101, 102]]
    params = SamplingParams(max_tokens=40, temperature=0, guided_regex="(ab|ba|01)+")
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    for o in outs:  # a full match, or a prefix of one where max_tokens cut it
        pattern = "(ab|ba|01)+" if o.outputs[0].finish_reason == "stop" else "(ab|ba|01)*[ab0]?"
        assert re.fullmatch(pattern, o.text), o.text
    assert llm.engine_loop.scheduler.num_preemptions > 0
    assert sum(o.metrics.spec_proposed for o in outs) > 0


def test_a_failing_proposer_costs_only_its_proposals(plain, caplog):
    """A bug in the proposer is logged with its traceback; every request still completes,
    with plain decode's tokens."""
    llm = LLM(quant="int8", max_model_len=1024, speculative=NGRAM)
    proposer = llm.engine_loop.ctx.speculator.proposer

    def broken(asks):
        raise RuntimeError("proposer bug")

    proposer.propose = broken
    params = SamplingParams(max_tokens=24, temperature=0)
    with caplog.at_level("ERROR", logger="lamina.engine"):
        out = llm.chat(COPY, params)
    assert out.outputs[0].token_ids == plain.chat(COPY, params).outputs[0].token_ids
    assert "proposer bug" in caplog.text and out.metrics.spec_proposed == 0
