"""Tokenizers rebuilt from GGUF metadata or loaded from HF folders, against transformers.

References:
- the default SmolLM2 GGUF loaded by transformers (`gguf_file=`), with one correction: its GGUF
  converter has no "smollm" pre-tokenizer and splits digits the plain GPT-2 way, while SmolLM2's
  own tokenizer.json (and llama.cpp) split every digit off first. They differ only when a
  whitespace run precedes a digit ("a  1"). We follow the model's tokenizer, so the reference
  gets SmolLM2's pre-tokenizer back, and a separate test pins that this is the only difference;
- small vocabularies trained here and written as GGUF files, for the SentencePiece ("llama")
  model and the llama-bpe and qwen2 pre-tokenizers;
- `save_pretrained` folders reloaded with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import pydoc_data.topics
import unicodedata
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer

from engine.errors import LaminaError, ModelLoadError, UnsupportedModelError
from engine.loader.tokenizer import load_hf_tokenizer, tokenizer_from_gguf

SAMPLES = [
    "",
    " ",
    "Hello, world!",
    "Ünïcödé àccents: café, naïve, façade, Ångström",
    "日本語のテキストと中文文本",
    "emoji 🎉🚀 and a family 👩‍👩‍👧 ok",
    "1234567890 12 345 6789",
    "pi is 3.14159265358979323846264338327950288",
    "a  1",
    "x\t\t2\n\n3",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\rreturns",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more<|im_start",
    "I'm sure you'LL see it's fine, isn't it?",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "ﬁ ligature, Ⅻ roman, ² superscript, ½ fraction",
]

FRAGMENTS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "7",
    "2024",
    "9" * 17,
    "é",
    "naïve",
    "日本",
    "🎉",
    "def f():",
    "'s",
    "...",
    "Hello",
]

TEXTS = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12).map("".join),
)

HYPOTHESIS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _has_number(text: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in text)


# --------------------------------------------------------------------------------------------
# The default model's GGUF


@pytest.fixture(scope="module")
def ours(default_gguf_metadata):
    return tokenizer_from_gguf(default_gguf_metadata)


@pytest.fixture(scope="module")
def hf_gguf(hf_tokenizer):
    """transformers' tokenizer for the default GGUF (session fixture in conftest.py)."""
    return hf_tokenizer


@pytest.fixture(scope="module")
def hf_reference(hf_gguf):
    """transformers' GGUF tokenizer with SmolLM2's tokenizer.json pre-tokenizer restored."""
    reference = copy.deepcopy(hf_gguf)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


def _assert_same_encoding(ours, hf, text):
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def _assert_same_decoding(ours, hf, ids):
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_tokenizer_matches_transformers(ours, hf_reference, text):
    _assert_same_encoding(ours, hf_reference, text)
    _assert_same_decoding(ours, hf_reference, hf_reference.encode(text))
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


@HYPOTHESIS
@given(text=TEXTS)
def test_gguf_tokenizer_matches_transformers_on_any_text(ours, hf_reference, text):
    _assert_same_encoding(ours, hf_reference, text)
    _assert_same_decoding(ours, hf_reference, hf_reference.encode(text))


@HYPOTHESIS
@given(text=TEXTS)
def test_only_digit_splitting_differs_from_transformers_converter(ours, hf_gguf, text):
    assume(not _has_number(text))
    _assert_same_encoding(ours, hf_gguf, text)


def test_smollm_splits_digits_like_its_own_tokenizer(ours, hf_gguf):
    # SmolLM2's tokenizer.json runs Digits(individual_digits=True) before ByteLevel, so the
    # two spaces stay one "ĠĠ" token; transformers' GGUF converter yields "Ġ", "Ġ".
    ids = ours.encode("a  1")
    assert [ours.id_to_token(i) for i in ids] == ["a", "ĠĠ", "1"]
    assert hf_gguf.convert_ids_to_tokens(hf_gguf.encode("a  1")) == ["a", "Ġ", "Ġ", "1"]


@HYPOTHESIS
@given(ids=st.lists(st.integers(0, 49151), max_size=24))
def test_gguf_decode_matches_transformers_on_any_ids(ours, hf_gguf, ids):
    # Arbitrary ids include broken UTF-8 sequences and special tokens mid-text.
    _assert_same_decoding(ours, hf_gguf, ids)


def test_gguf_special_ids_match_metadata(ours, hf_gguf, default_gguf_metadata):
    meta = default_gguf_metadata
    assert ours.bos_token_id == meta["tokenizer.ggml.bos_token_id"] == hf_gguf.bos_token_id
    assert ours.eos_token_ids[0] == meta["tokenizer.ggml.eos_token_id"] == hf_gguf.eos_token_id
    assert ours.eos_token_id == ours.eos_token_ids[0]
    assert ours.pad_token_id == meta["tokenizer.ggml.padding_token_id"] == hf_gguf.pad_token_id
    # <|endoftext|> also ends generation, as in llama.cpp.
    assert ours.eos_token_ids == [2, 0]
    assert ours.special_tokens == hf_gguf.special_tokens_map
    assert ours.chat_template == meta["tokenizer.chat_template"] == hf_gguf.chat_template
    assert ours.vocab_size == len(hf_gguf) == len(meta["tokenizer.ggml.tokens"])
    assert not ours.add_bos_token and not ours.add_eos_token


def test_gguf_control_tokens_are_special(ours):
    assert ours.encode("<|im_start|>user") == [1, 4093]
    assert ours.decode([1, 4093, 2]) == "user"
    assert ours.decode([1, 4093, 2], skip_special_tokens=False) == "<|im_start|>user<|im_end|>"
    assert ours.id_to_token(49151) is not None and ours.id_to_token(49152) is None
    assert ours.token_to_id("<|im_end|>") == 2


# --------------------------------------------------------------------------------------------
# Hugging Face folders


@pytest.fixture(scope="module")
def saved_folder(hf_gguf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved_tokenizer")
    hf_gguf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours_saved(saved_folder):
    return load_hf_tokenizer(saved_folder)


@pytest.fixture(scope="module")
def hf_saved(saved_folder):
    return AutoTokenizer.from_pretrained(saved_folder)


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_folder_matches_transformers(ours_saved, hf_saved, text):
    _assert_same_encoding(ours_saved, hf_saved, text)
    _assert_same_decoding(ours_saved, hf_saved, hf_saved.encode(text))


@HYPOTHESIS
@given(text=TEXTS)
def test_hf_folder_matches_transformers_on_any_text(ours_saved, hf_saved, text):
    _assert_same_encoding(ours_saved, hf_saved, text)
    _assert_same_decoding(ours_saved, hf_saved, hf_saved.encode(text))


def test_hf_folder_special_tokens_and_template(ours_saved, hf_saved):
    assert ours_saved.special_tokens == hf_saved.special_tokens_map
    assert ours_saved.bos_token_id == hf_saved.bos_token_id
    assert ours_saved.eos_token_ids == [hf_saved.eos_token_id, 0]
    assert ours_saved.pad_token_id == hf_saved.pad_token_id
    assert ours_saved.chat_template == hf_saved.chat_template
    assert ours_saved.vocab_size == len(hf_saved)


def _copy_folder(
    source: Path,
    target: Path,
    config_edits: dict,
    special_map: dict | None = None,
    post_processor: dict | None = None,
) -> Path:
    target.mkdir()
    backend = json.loads((source / "tokenizer.json").read_text())
    if post_processor is not None:
        backend["post_processor"] = post_processor
    (target / "tokenizer.json").write_text(json.dumps(backend))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(config_edits)
    config = {k: v for k, v in config.items() if v is not None}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (target / "special_tokens_map.json").write_text(json.dumps(special_map))
    return target


def test_hf_folder_token_dicts_and_special_tokens_map_fallback(saved_folder, tmp_path):
    eos = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    folder = _copy_folder(
        saved_folder,
        tmp_path / "dicts",
        {"eos_token": eos, "pad_token": None},
        special_map={"pad_token": {"content": "<|im_end|>", "special": True}},
    )
    ours, hf = load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.special_tokens["pad_token"] == "<|im_end|>"
    assert ours.eos_token_ids[0] == hf.eos_token_id == 0
    assert ours.pad_token_id == hf.pad_token_id == 2


def test_hf_folder_bos_eos_come_from_tokenizer_json(saved_folder, tmp_path):
    # transformers 5 ignores tokenizer_config's add_bos_token/add_eos_token when tokenizer.json
    # exists; its post-processor adds BOS/EOS (as Llama 3's does).
    post_processor = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
            "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]},
        },
    }
    folder = _copy_folder(
        saved_folder,
        tmp_path / "flags",
        {"add_bos_token": False, "add_eos_token": False},
        post_processor=post_processor,
    )
    ours, hf = load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.add_bos_token, ours.add_eos_token) == (True, True)
    assert ours.encode("hi") == [1, 6004, 0]
    for text in SAMPLES:
        _assert_same_encoding(ours, hf, text)


def test_missing_tokenizer_json_is_a_load_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_hf_tokenizer(tmp_path)


def test_corrupt_files_are_load_errors(saved_folder, tmp_path):
    folder = _copy_folder(saved_folder, tmp_path / "bad", {})
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        load_hf_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_hf_tokenizer(folder)


# --------------------------------------------------------------------------------------------
# Other GGUF vocabularies, trained here on a small corpus

_CORPUS = list(pydoc_data.topics.topics.values())
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _train(tokenizer: BackendTokenizer, special: list[str], **trainer_args) -> list[str]:
    trainer = trainers.BpeTrainer(
        vocab_size=2500, special_tokens=special, show_progress=False, **trainer_args
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.get)


def _write_gguf(path: Path, tokenizer_keys: dict, arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in tokenizer_keys.items():
        if key == "tokenizer.ggml.scores":
            writer.add_array(key, value)  # float32 array
        elif key == "tokenizer.ggml.token_type":
            writer.add_token_types(value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _sentencepiece_keys() -> dict:
    backend = BackendTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokens = _train(backend, ["<unk>", "<s>", "</s>", *_BYTE_TOKENS])
    n_normal = len(tokens) - 259
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(n_normal)],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * n_normal,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def _gemma_keys() -> dict:
    """A Gemma-style SentencePiece vocabulary: spaces normalised to "▁" with no prefix space,
    whitespace-run tokens stored as real spaces (as Gemma's files store them), and scores
    that run against the merge order (which is the vocabulary's order for Gemma)."""
    backend = BackendTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = _train(backend, [*special, *_BYTE_TOKENS])
    tokens += [" " * n for n in range(2, 9) if "▁" * n not in tokens]
    n_normal = len(tokens) - len(special) - 256
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(special) + 256) + [float(i) for i in range(n_normal)],
        "tokenizer.ggml.token_type": [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * n_normal,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }


def _byte_level_keys(pre: str, split: str) -> dict:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # transformers' GPT-2 class defaults unk_token to "<|endoftext|>" and adds it to the
    # vocabulary when the file names no unknown token; naming it keeps the vocabularies equal.
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"]
    tokens = _train(backend, special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    merges = json.loads(backend.to_str())["model"]["merges"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(m) for m in merges],
        "tokenizer.ggml.token_type": [3, 3, 3, 3] + [1] * (len(tokens) - 4),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_bos_token": True,
    }


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SYNTHETIC = {
    "sentencepiece": _sentencepiece_keys,
    "gemma": _gemma_keys,
    "llama-bpe": lambda: _byte_level_keys("llama-bpe", _LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level_keys("qwen2", _QWEN2_SPLIT),
}


@pytest.fixture(scope="module", params=sorted(_SYNTHETIC))
def synthetic_pair(request, tmp_path_factory):
    arch = "gemma3" if request.param == "gemma" else "llama"
    path = _write_gguf(
        tmp_path_factory.mktemp(request.param) / "m.gguf", _SYNTHETIC[request.param](), arch
    )
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tokenizer_from_gguf(metadata), hf


def test_synthetic_gguf_matches_transformers(synthetic_pair):
    ours, hf = synthetic_pair
    # GemmaTokenizer adds a "<mask>" of its own, which the file does not have
    file_vocab = ours.backend.get_vocab(with_added_tokens=False)
    named = {k: v for k, v in hf.special_tokens_map.items() if v in file_vocab}
    assert ours.special_tokens == named
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_id == hf.eos_token_id
    assert ours.add_bos_token
    specials = ["<s>inside</s>", "<|begin_of_text|>x<|eot_id|>", "<start_of_turn>user\nhi"]
    for text in SAMPLES + specials + ["a  b   c    d\n\n\te", "  lead", "tail   "]:
        _assert_same_encoding(ours, hf, text)
        _assert_same_decoding(ours, hf, hf.encode(text))


@settings(max_examples=60, deadline=None)
@given(text=TEXTS)
def test_synthetic_gguf_matches_transformers_on_any_text(synthetic_pair, text):
    ours, hf = synthetic_pair
    _assert_same_encoding(ours, hf, text)
    _assert_same_decoding(ours, hf, hf.encode(text))


# --------------------------------------------------------------------------------------------
# What is refused


def _minimal_gpt2_metadata(**overrides) -> dict:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
    }
    metadata.update(overrides)
    return {k: v for k, v in metadata.items() if v is not None}


def test_minimal_gpt2_vocabulary():
    tok = tokenizer_from_gguf(_minimal_gpt2_metadata())
    assert tok.encode("abab<|end|>") == [2, 2, 3]
    assert tok.eos_token_ids == [3]
    assert tok.bos_token_id is None and tok.chat_template is None
    with pytest.raises(LaminaError, match="no default chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"tokenizer.ggml.model": "t5"}, UnsupportedModelError, "'t5'"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, UnsupportedModelError, "no-such-pre"),
        ({"tokenizer.ggml.merges": None}, ModelLoadError, "merges"),
        ({"tokenizer.ggml.tokens": None}, ModelLoadError, "tokenizer"),
        ({"tokenizer.ggml.eos_token_id": 99}, ModelLoadError, "eos_token_id"),
        ({"tokenizer.ggml.token_type": [1]}, ModelLoadError, "token_type"),
        ({"tokenizer.ggml.token_type": [1, 1, 9, 3]}, ModelLoadError, r"token_type\[2\] is 9"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a", "<|end|>"]}, ModelLoadError, "'a' twice"),
        ({"tokenizer.ggml.tokens": ["a", "b", 7, "<|end|>"]}, ModelLoadError, "not a string"),
        ({"tokenizer.ggml.merges": ["a c"]}, ModelLoadError, "merge 0 .* names 'c'"),
        ({"tokenizer.ggml.merges": ["b a"]}, ModelLoadError, "merge 0 .* names 'ba'"),
        ({"tokenizer.ggml.merges": [3]}, ModelLoadError, "merge 0"),
        ({"tokenizer.ggml.pre": ["gpt-2"]}, UnsupportedModelError, "pre-tokenizer"),
        ({"tokenizer.ggml.add_eos_token": "yes"}, ModelLoadError, "add_eos_token"),
        (
            {
                "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end of text|>"],
                "tokenizer.ggml.add_eos_token": True,
            },
            UnsupportedModelError,
            "end of text",
        ),
        (
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.scores": [0.0, float("nan"), 0.0, 0.0],
            },
            ModelLoadError,
            "scores",
        ),
        (
            {"tokenizer.ggml.model": "llama", "general.architecture": "phi3"},
            UnsupportedModelError,
            "phi3",
        ),
    ],
)
def test_unsupported_or_broken_metadata_is_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        tokenizer_from_gguf(_minimal_gpt2_metadata(**overrides))
