"""Sampler and SamplingParams against plain-numpy references.

Filters are checked as "the chosen token is allowed" over many random rows (hypothesis), and the
distribution itself with a chi-square statistic over many seeded draws.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cli import build_parser
from engine.errors import InvalidInputError
from engine.sampling import (
    BOOL_FIELDS,
    SAMPLING_FIELDS,
    Sampler,
    SamplingParams,
    apply_penalties,
    cli_fields,
    sampling_kwargs,
)

VOCABS = [1, 2, 17, 4097]
# Chi-square critical values at p = 1e-4: a correct sampler fails these about once in 10^4
# seeds, and the seeds are fixed, so the tests are deterministic.
CHI2_CRIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 7: 29.9}


@st.composite
def logit_rows(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """A float32 row of logits for a random vocab, with ties, -inf and padded columns.

    The padded columns (beyond vocab_size, as in padded LM heads) hold huge logits, so a
    sampler that looked at them would pick them.
    """
    vocab = draw(st.sampled_from(VOCABS))
    seed = draw(st.integers(0, 2**32 - 1))
    style = draw(st.sampled_from(["normal", "ties", "spiky", "flat"]))
    masked = draw(st.sampled_from([0.0, 0.3, 0.95]))
    pad = draw(st.sampled_from([0, 3, 64]))
    rng = np.random.default_rng(seed)
    if style == "normal":
        row = rng.normal(0.0, draw(st.sampled_from([0.5, 2.0, 8.0])), vocab)
    elif style == "ties":
        row = rng.integers(-3, 3, vocab).astype(np.float64)
    elif style == "spiky":
        row = rng.normal(0.0, 1.0, vocab)
        row[rng.integers(0, vocab, 3)] += 12.0
    else:
        row = np.zeros(vocab)
    row[rng.random(vocab) < masked] = -np.inf
    if not np.isfinite(row).any():
        row[rng.integers(0, vocab)] = 0.0
    padded = np.concatenate([row, np.full(pad, 1e4)]).astype(np.float32)
    return padded, vocab


def ref_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64."""
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z[np.isfinite(z)].max())
    return z / z.sum()


def ref_nucleus_floor(probs: np.ndarray, top_p: float) -> float:
    """Smallest probability in the top-p nucleus, computed the textbook way (stable sort)."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    size = min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, len(probs))
    return float(probs[order[size - 1]])


def draws(params: SamplingParams, logits: np.ndarray, vocab: int, n: int) -> list[int]:
    sampler = Sampler(params.with_defaults({}), vocab)
    return [sampler.sample(logits, [], []) for _ in range(n)]


temperatures = st.sampled_from([0.05, 0.3, 1.0, 2.5])


@settings(max_examples=80, deadline=None)
@given(row=logit_rows(), temperature=temperatures, k=st.integers(1, 5000), seed=st.integers(0, 9))
def test_top_k_never_leaves_the_k_highest(row, temperature, k, seed):
    logits, vocab = row
    real = logits[:vocab]
    kth = np.sort(real)[::-1][min(k, vocab) - 1]
    params = SamplingParams(temperature=temperature, top_k=k, seed=seed)
    for token in draws(params, logits, vocab, 10):
        assert 0 <= token < vocab
        assert real[token] >= kth
        assert np.isfinite(real[token])


@settings(max_examples=80, deadline=None)
@given(
    row=logit_rows(),
    temperature=temperatures,
    top_p=st.sampled_from([0.01, 0.3, 0.5, 0.9, 0.99, 1.0]),
    top_k=st.sampled_from([None, 0, 3, 50]),
    seed=st.integers(0, 9),
)
def test_top_p_never_leaves_the_nucleus(row, temperature, top_p, top_k, seed):
    logits, vocab = row
    real = logits[:vocab]
    if top_k:  # top-k first: the nucleus is computed over the renormalised k survivors
        kth = np.sort(real)[::-1][min(top_k, vocab) - 1]
        real = np.where(real >= kth, real, -np.inf)
    probs = ref_probs(real, temperature)
    # A hair of slack on p and on the floor absorbs float32 vs float64 rounding at the border.
    floor = ref_nucleus_floor(probs, min(top_p + 1e-4, 1.0)) * (1 - 1e-4)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for token in draws(params, logits, vocab, 10):
        assert 0 <= token < vocab
        assert probs[token] > 0
        assert probs[token] >= floor


@settings(max_examples=80, deadline=None)
@given(
    row=logit_rows(),
    temperature=temperatures,
    min_p=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    top_p=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 9),
)
def test_min_p_never_picks_below_the_threshold(row, temperature, min_p, top_p, seed):
    logits, vocab = row
    probs = ref_probs(logits[:vocab], temperature)
    params = SamplingParams(temperature=temperature, min_p=min_p, top_p=top_p, seed=seed)
    for token in draws(params, logits, vocab, 10):
        assert 0 <= token < vocab
        assert probs[token] > 0
        assert probs[token] >= min_p * probs.max() * (1 - 1e-4)


@settings(max_examples=100, deadline=None)
@given(row=logit_rows(), temperature=st.sampled_from([0.0, 1e-7]))
def test_greedy_is_argmax(row, temperature):
    logits, vocab = row
    params = SamplingParams(temperature=temperature, top_k=5, top_p=0.5, seed=1)
    assert draws(params, logits, vocab, 1) == [int(np.argmax(logits[:vocab]))]


def test_same_seed_same_sequence_and_different_seeds_differ():
    logits = np.random.default_rng(0).normal(0, 1, 1000).astype(np.float32)

    def run(seed):
        return draws(SamplingParams(temperature=1.0, top_p=0.95, seed=seed), logits, 1000, 50)

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert len({tuple(run(s)) for s in range(5)}) == 5


def test_unseeded_samplers_use_fresh_entropy():
    logits = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0)
    assert draws(params, logits, 1000, 20) != draws(params, logits, 1000, 20)


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_frequencies_match_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], dtype=np.float32)
    tokens = draws(SamplingParams(temperature=temperature, seed=1234), logits, 8, 20000)
    counts = np.bincount(tokens, minlength=8)
    assert chi_square(counts, ref_probs(logits, temperature)) < CHI2_CRIT[7]


def test_frequencies_match_truncated_softmax_with_top_k_top_p_min_p():
    logits = np.array([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -np.inf], dtype=np.float32)
    temperature, top_k, top_p, min_p = 1.2, 6, 0.9, 0.2
    expected = np.zeros(8)
    expected[:top_k] = ref_probs(logits[:top_k], temperature)  # top-k: the first six
    expected[expected < ref_nucleus_floor(expected, top_p)] = 0.0  # top-p over survivors
    expected[expected < min_p * expected.max()] = 0.0  # min-p after top-p drops one more
    expected /= expected.sum()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=99)
    counts = np.bincount(draws(params, logits, 8, 20000), minlength=8)
    support = expected > 0
    assert support.sum() == 3
    assert counts[~support].sum() == 0
    assert chi_square(counts[support], expected[support]) < CHI2_CRIT[2]


@pytest.mark.parametrize("top_p, size", [(0.45, 1), (0.6, 2), (0.9, 3), (0.97, 4)])
def test_top_p_keeps_exactly_the_smallest_nucleus(top_p, size):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    tokens = draws(SamplingParams(temperature=1.0, top_p=top_p, seed=11), logits, 4, 3000)
    counts = np.bincount(tokens, minlength=4)
    assert set(tokens) == set(range(size))
    if size > 1:
        expected = probs[:size] / probs[:size].sum()
        assert chi_square(counts[:size], expected) < CHI2_CRIT[size - 1]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_frequencies_on_a_large_vocab(top_p):
    """Exercises the blocked cumulative sum and the pre-filtered nucleus (vocab > 4096)."""
    vocab = 20000
    logits = np.random.default_rng(5).normal(0, 1.0, vocab).astype(np.float32)
    logits[[10, 5000, 19999]] = [9.0, 8.5, 8.0]  # heavy tokens in the first, a middle, last block
    probs = ref_probs(logits, 1.0)
    if top_p < 1.0:
        probs = np.where(probs >= ref_nucleus_floor(probs, top_p), probs, 0.0)
        probs /= probs.sum()
    tokens = np.array(
        draws(SamplingParams(temperature=1.0, top_p=top_p, seed=3), logits, vocab, 4000)
    )
    assert np.all(probs[tokens] > 0)
    # Bins: the two halves of the vocab, then each heavy token on its own.
    bins = 1 + np.arange(vocab) // 10000
    bins[[10, 5000, 19999]] = [0, 3, 4]
    counts = np.bincount(bins[tokens], minlength=5).astype(float)
    expected = np.bincount(bins, weights=probs, minlength=5)
    assert chi_square(counts, expected) < CHI2_CRIT[4]


def ref_penalties(logits, prompt_ids, output_ids, rep, freq, pres):
    x = logits.astype(np.float64).copy()
    for token in set(prompt_ids) | set(output_ids):
        x[token] = x[token] / rep if x[token] > 0 else x[token] * rep
    for token in set(output_ids):
        count = output_ids.count(token)
        x[token] -= freq * count + pres
    return x


@settings(max_examples=100, deadline=None)
@given(
    row=logit_rows(),
    data=st.data(),
    rep=st.sampled_from([1.0, 0.5, 1.1, 2.0]),
    freq=st.sampled_from([0.0, 0.5, -1.0, 2.0]),
    pres=st.sampled_from([0.0, 0.3, -0.7, 2.0]),
)
def test_penalties_match_reference(row, data, rep, freq, pres):
    logits, vocab = row
    ids = st.lists(st.integers(0, vocab - 1), max_size=30)
    prompt_ids, output_ids = data.draw(ids), data.draw(ids)
    params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    got = apply_penalties(logits[:vocab], prompt_ids, output_ids, params)
    want = ref_penalties(logits[:vocab], prompt_ids, output_ids, rep, freq, pres)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    greedy = Sampler(
        SamplingParams(
            temperature=0, repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres
        ),
        vocab,
    )
    token = greedy.sample(logits, prompt_ids, output_ids)
    assert want[token] >= want.max() - 1e-4


def test_penalties_ignore_out_of_range_ids_and_keep_input_intact():
    logits = np.array([1.0, -1.0, 2.0], dtype=np.float32)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)
    got = apply_penalties(logits, np.array([0, 7]), [1, 1, 99, -3], params)
    np.testing.assert_allclose(got, [0.5, -4.0, 2.0])
    np.testing.assert_array_equal(logits, [1.0, -1.0, 2.0])


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = np.array([5.0, 4.0, 1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 3)
    assert sampler.sample(logits, [0], []) == 1
    assert sampler.sample(logits, [0], [1]) == 0  # 5/2 = 2.5 > 4/2 = 2
    assert sampler.sample(logits, [0, 1], []) == 0


def test_degenerate_rows_raise():
    sampler = Sampler(SamplingParams(temperature=1.0), 4)
    greedy = Sampler(SamplingParams(temperature=0.0), 4)
    for s in (sampler, greedy):
        with pytest.raises(ValueError, match="-inf"):
            s.sample(np.full(4, -np.inf, dtype=np.float32), [], [])
        with pytest.raises(ValueError, match="NaN"):
            s.sample(np.array([0, np.nan, 1, 2], dtype=np.float32), [], [])
    row = np.array([0.0, np.inf, 1.0, np.inf], dtype=np.float32)
    assert {sampler.sample(row, [], []) for _ in range(50)} == {1, 3}


def test_accepts_a_single_row_batch_and_never_returns_padded_ids():
    logits = np.array([[0.0, 1.0, 100.0, 100.0]], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0), 2).sample(logits, [], []) == 1
    with pytest.raises(ValueError, match="one row"):
        Sampler(SamplingParams(temperature=0), 2).sample(np.zeros((2, 4)), [], [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": "a lot"}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
    ],
)
def test_invalid_params_raise_one_line_input_error(kwargs, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # as vLLM's callers expect


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_flags_must_be_booleans(name):
    """A JSON "no" must not read as true."""
    with pytest.raises(InvalidInputError, match=f"{name} must be true or false"):
        SamplingParams(**{name: "no"})
    assert getattr(SamplingParams(**{name: np.bool_(True)}), name) is True


def test_every_cli_field_is_a_flag_of_every_sampling_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    values = {"max_tokens": "7", "temperature": "0.5", "top_p": "0.9", "top_k": "5"}
    values |= {"min_p": "0.1", "repetition_penalty": "1.1", "presence_penalty": "0.5"}
    values |= {"frequency_penalty": "-0.5", "seed": "3", "stop": "###", "ignore_eos": None}
    assert {f.name for f in cli_fields()} == set(values)
    positionals = {"generate": ["hi"], "chat": [], "batch": ["in", "out"]}
    for command, rest in positionals.items():
        argv = [command]
        for name, value in values.items():
            argv += [f"--{name.replace('_', '-')}", *([value] if value else [])]
        kwargs = sampling_kwargs(commands.choices[command].parse_args(argv[1:] + rest))
        params = SamplingParams(**kwargs)
        assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (7, 0.5, 5, 3)
        assert (params.min_p, params.frequency_penalty, params.stop) == (0.1, -0.5, ["###"])
        assert params.ignore_eos is True
        # Unset flags are left out, so SamplingParams and the model decide.
        assert sampling_kwargs(commands.choices[command].parse_args(rest)).keys() == {"max_tokens"}


def test_sampling_kwargs_picks_sampling_fields():
    line = {"id": 1, "prompt": "x", "temperature": 0.5, "seed": None, "stop": ["a"]}
    assert sampling_kwargs(line) == {"temperature": 0.5, "stop": ["a"]}

    class Request:  # a parsed request object, e.g. pydantic
        model = "m"
        top_p = 0.9
        n = 2
        logprobs = None

    assert sampling_kwargs(Request()) == {"top_p": 0.9, "n": 2}
    assert set(SAMPLING_FIELDS) == {f.name for f in dataclasses.fields(SamplingParams)}
    assert all(f.metadata["help"] for f in dataclasses.fields(SamplingParams))


def test_params_normalisation():
    params = SamplingParams(stop="###", stop_token_ids=None, top_k=-1)
    assert params.stop == ["###"]
    assert params.stop_token_ids == []
    assert params.top_k == 0
    assert SamplingParams().stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_with_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "bos_token_id": 1}
    resolved = SamplingParams().with_defaults(defaults)
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.2, 0.9, 50)
    # Explicit values win, including explicit "disabled" and greedy.
    mine = SamplingParams(temperature=0.0, top_p=1.0, top_k=0).with_defaults(defaults)
    assert (mine.temperature, mine.top_p, mine.top_k) == (0.0, 1.0, 0)
    # Missing keys fall back to plain sampling.
    partial = SamplingParams(top_k=5).with_defaults({"top_p": 0.8})
    assert (partial.temperature, partial.top_p, partial.top_k) == (1.0, 0.8, 5)
    empty = SamplingParams().with_defaults(None)
    assert (empty.temperature, empty.top_p, empty.top_k) == (1.0, 1.0, 0)
    assert empty.is_resolved and not SamplingParams().is_resolved
    # HF semantics: an explicit do_sample=false makes the default greedy.
    assert SamplingParams().with_defaults({"do_sample": False, "temperature": 0.6}).temperature == 0
    assert SamplingParams(temperature=0.6).with_defaults({"do_sample": False}).temperature == 0.6
    # Other fields are untouched and the original is not mutated.
    base = SamplingParams(max_tokens=7, stop="x", seed=3)
    assert base.with_defaults(defaults).max_tokens == 7
    assert base.with_defaults(defaults).stop == ["x"]
    assert base.temperature is None
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().with_defaults({"top_p": 0})


def test_sampler_resolves_unresolved_params_to_plain_sampling():
    sampler = Sampler(SamplingParams(seed=0), 5)
    assert not sampler.is_greedy
    assert 0 <= sampler.sample(np.zeros(5, dtype=np.float32), [], []) < 5
