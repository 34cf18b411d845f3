"""Structured output (engine/structured.py): what the constrained engine emits, checked
against independent references: Python's `re` for regexes, `jsonschema` for JSON schemas,
membership for choices.

The hypothesis tests run a random-weight Llama with a 273-token byte-level vocabulary: its
logits favour arbitrary tokens, so only the mask keeps its output inside the constraint, and
a small vocabulary makes tokens that cross the constraint's boundaries common.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine import LLM, SamplingParams
from engine.errors import InvalidInputError

EOS = "<eos>"
TOOL_MARKERS = ["<tool_call>", "</tool_call>"]
QWEN3 = Path(__file__).parent / "data" / "templates" / "qwen3.jinja"
CORPUS = ['ab ba 01 10 abba 0110 {"a": 1, "b": [true, null]}', "yes no maybe 2024-12-05"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    """A random Llama over a 273-token byte-level BPE vocabulary (EOS is id 0; Hermes'
    tool-call markers are special tokens, as in Qwen's vocabulary)."""
    folder = tmp_path_factory.mktemp("structured") / "tiny"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS, *TOOL_MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    vocab = tok.get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    wrapped.save_pretrained(folder)
    return LLM(folder, max_model_len=1024)


def run(llm: LLM, params: SamplingParams, prompt: str = "ab") -> list:
    (out,) = llm.generate(prompt, params)
    assert out.error is None, out.error
    return out.outputs


# Regexes with a bounded match length, from pieces over the tiny vocabulary's alphabet.
_ATOMS = st.sampled_from(["a", "b", "0", "1", "ab", "[01]", "[ab]", "(ab|ba)", " ", "x"])
_QUANT = st.sampled_from(["", "?", "{1,3}", "{2}", "{0,2}"])
regexes = st.lists(st.tuples(_ATOMS, _QUANT), min_size=1, max_size=5).map(
    lambda parts: "".join(f"(?:{a}){q}" if q else a for a, q in parts)
)
sampling = st.one_of(
    st.just({"temperature": 0.0}),
    st.integers(0, 2**16).map(lambda seed: {"temperature": 1.5, "seed": seed}),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(regex=regexes, how=sampling)
def test_regex_output_is_a_full_match(tiny, regex, how):
    """Whatever the model prefers, the completion is a full match, and it ends (finish
    reason stop) as soon as the regex allows nothing more or the model picks EOS."""
    (c,) = run(tiny, SamplingParams(max_tokens=40, guided_regex=regex, **how))
    assert c.finish_reason == "stop"
    assert re.fullmatch(regex, c.text), (regex, c.text)


words = st.text(alphabet="ab01 xy", min_size=1, max_size=8)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(choices=st.lists(words, min_size=1, max_size=5, unique=True), how=sampling)
def test_choice_output_is_one_of_the_choices(tiny, choices, how):
    (c,) = run(tiny, SamplingParams(max_tokens=20, guided_choice=choices, **how))
    assert c.text in choices and c.finish_reason == "stop"


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"b": {"enum": ["ab", "ba", None]},
     "n": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["b", "n"],
     "additionalProperties": False},
    {"type": "string", "pattern": "^[ab]{2,4}$"},
]  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("n", [1, 3])
def test_json_output_validates_with_n_completions(tiny, schema, n):
    """The random model is pushed through the schema by the mask alone: every one of n
    sampled completions parses and validates."""
    params = SamplingParams(max_tokens=120, guided_json=schema, temperature=1.0, seed=3, n=n)
    outputs = run(tiny, params)
    assert len(outputs) == n
    for c in outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_beam_search_under_a_constraint(tiny):
    params = SamplingParams(
        max_tokens=30, guided_regex="(ab|ba){1,3}[01]", use_beam_search=True, best_of=3, n=2
    )
    outputs = run(tiny, params)
    assert len(outputs) == 2
    for c in outputs:
        assert re.fullmatch("(ab|ba){1,3}[01]", c.text), c.text


def test_eos_is_allowed_exactly_when_the_constraint_can_end(tiny):
    """EOS pushed up by +100: taken at the first place the regex may end, never before."""
    eos = tiny.tokenizer.eos_token_id
    bias = {eos: 100.0}
    (c,) = run(tiny, SamplingParams(max_tokens=20, guided_regex="ab(01)+", logit_bias=bias,
                                    temperature=0))  # fmt: skip
    assert c.text == "ab01" and c.token_ids[-1] == eos and c.finish_reason == "stop"
    # Pushed down by -100, EOS still ends a completion that can take nothing more.
    (c,) = run(tiny, SamplingParams(max_tokens=20, guided_choice=["ba"], temperature=0,
                                    logit_bias={eos: -100.0}))  # fmt: skip
    assert c.text == "ba" and c.finish_reason == "stop"


def test_stream_and_batch_of_mixed_requests(tiny):
    """A constrained and an unconstrained request in one batch; the stream's pieces add up
    to the final text."""
    params = [SamplingParams(max_tokens=12, guided_regex="[01]{5}", temperature=0),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]  # fmt: skip
    constrained, free = tiny.generate(["ab", "ab"], params)
    assert re.fullmatch("[01]{5}", constrained.outputs[0].text)
    assert len(free.outputs[0].token_ids) == 12
    stream = tiny.stream("ab", params[0])
    assert "".join(stream) == constrained.outputs[0].text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guided_regex": "(ab"}, "guided_regex cannot be compiled"),
        ({"guided_json": {"type": "frobnicate"}}, "guided_json cannot be compiled"),
        ({"guided_grammar": "start: foo"}, "guided_grammar cannot be compiled"),
    ],
)
def test_a_constraint_that_cannot_compile_fails_only_its_request(tiny, fields, message):
    good = SamplingParams(max_tokens=4, temperature=0, guided_choice=["ab"])
    bad_out, good_out = tiny.generate(["ab", "ab"], [SamplingParams(max_tokens=4, **fields), good])
    assert message in bad_out.error and "\n" not in bad_out.error
    assert good_out.error is None and good_out.outputs[0].text == "ab"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guided_regex": "a", "guided_choice": ["a"]}, "one structured-output constraint"),
        ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
        ({"guided_json": [1]}, "guided_json must be a JSON schema"),
        ({"guided_choice": []}, "guided_choice must be a list of non-empty strings"),
        ({"guided_regex": ""}, "guided_regex must be a non-empty string"),
    ],
)
def test_malformed_constraints_are_refused(fields, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingParams(**fields)


def test_gbnf_and_lark_grammars(tiny):
    gbnf = 'root ::= "a" ("b" | "0") [b0]? "1"'
    lark = 'start: "a" /[b0]{1,2}/ "1"'
    for grammar in (gbnf, lark):
        (c,) = run(tiny, SamplingParams(max_tokens=30, guided_grammar=grammar, temperature=0))
        assert re.fullmatch("a[b0]{1,2}1", c.text), (grammar, c.text)


def test_forced_tool_calls_through_special_token_markers(tiny):
    """Markers that are special tokens are named by id in the grammar and kept in the text,
    so the random model's constrained reply parses into a valid call."""
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMAS[0]}}
    tiny.tokenizer.chat_template = QWEN3.read_text()
    try:
        out = tiny.chat(
            [{"role": "user", "content": "ab"}],
            SamplingParams(max_tokens=120, temperature=1.0, seed=2),
            tools=[tool], tool_choice="required", parallel_tool_calls=False,
            enable_thinking=False,
        )  # fmt: skip
    finally:
        tiny.tokenizer.chat_template = None
    (c,) = out.outputs
    assert c.text.startswith("<tool_call>") and c.finish_reason == "stop", c.text
    (call,) = c.tool_calls
    assert call.name == "f"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[0])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.data())
def test_masked_copy_matches_numpy(n, data):
    """The mask kernel against numpy's unpacking of llguidance's bit order."""
    import numpy as np

    from kernels_cpu.rows import masked_copy_into

    words = (n + 31) // 32
    mask = np.array(data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=words,
                                       max_size=words)), dtype=np.int32)  # fmt: skip
    x = np.arange(n + 3, dtype=np.float32)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n].astype(bool)
    out = np.empty(n, np.float32)
    masked_copy_into(x, mask, out)
    np.testing.assert_array_equal(out, np.where(bits, x[:n], -np.inf))


def test_beam_search_keeps_its_width_when_the_constraint_completes(tiny):
    choices = ["0", "1", "01", "10", "0110", "1001"]
    params = SamplingParams(max_tokens=10, guided_choice=choices, use_beam_search=True,
                            best_of=4, n=4)  # fmt: skip
    outputs = run(tiny, params)
    assert len(outputs) == 4 and len({tuple(c.token_ids) for c in outputs}) == 4
    assert all(c.text in choices for c in outputs)


def test_ignore_eos_under_a_constraint_never_emits_eos(tiny):
    eos = tiny.tokenizer.eos_token_id
    for seed in range(8):
        (c,) = run(tiny, SamplingParams(max_tokens=12, guided_regex="(ab)+", ignore_eos=True,
                                        temperature=1.0, seed=seed, logit_bias={eos: 5.0}))  # fmt: skip
        assert eos not in c.token_ids and re.fullmatch("(ab)*a?", c.text), c.text


def test_guided_json_true_means_any_json(tiny):
    (c,) = run(tiny, SamplingParams(max_tokens=40, guided_json=True, temperature=0))
    if c.finish_reason == "stop":
        json.loads(c.text)
    with pytest.raises(InvalidInputError, match="guided_json must be a JSON schema"):
        SamplingParams(guided_json=False)


def test_a_tokenizer_with_more_ids_than_the_head(tiny, tmp_path):
    """Added tokens past the model's vocabulary: constrained and plain requests both run."""
    import shutil

    folder = tmp_path / "more-ids"
    shutil.copytree(tiny.engine_config.model, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens(["<extra1>", "<extra2>", "<extra3>"])
    tok.save(str(folder / "tokenizer.json"))
    llm = LLM(folder, max_model_len=256)
    guided, plain = llm.generate(["ab", "ab"], [
        SamplingParams(max_tokens=8, temperature=0, guided_regex="[01]{3}"),
        SamplingParams(max_tokens=4, temperature=0)])  # fmt: skip
    assert guided.error is None and re.fullmatch("[01]{3}", guided.outputs[0].text)
    assert plain.error is None and len(plain.outputs[0].token_ids) >= 1


def test_stop_ids_that_block_the_grammar_are_the_requests_error(tiny):
    """The grammar's only way on is a token the request made a stop token: a one-line user
    error for that request, no traceback; the batch goes on."""
    x = tiny.tokenizer.encode("x", add_special_tokens=False)
    assert len(x) == 1
    bad = SamplingParams(max_tokens=4, guided_regex="xa", stop_token_ids=x)
    blocked, fine = tiny.generate(["ab", "ab"], [bad, SamplingParams(max_tokens=3, temperature=0)])
    assert "allows only stop tokens" in blocked.error and "\n" not in blocked.error
    assert fine.error is None and fine.outputs[0].finish_reason == "length"
    cache = tiny.engine_loop.cache
    assert cache.usage() == (0, 0)
