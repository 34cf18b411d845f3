"""Tokenizers for Hugging Face folders and GGUF files, plus the chat template they carry.

A Hugging Face folder ships a `tokenizer.json` that the `tokenizers` library loads as is; its
`tokenizer_config.json` adds the named special tokens, the BOS/EOS flags and the chat template.

A GGUF file has no `tokenizer.json`: it stores the vocabulary, merges, token types and special
ids as metadata under llama.cpp's key names, so we rebuild an equivalent `tokenizers.Tokenizer`
from `tokenizers`' own components (BPE model, pre-tokenizers, decoders, post-processors). Where
transformers' GGUF converter and llama.cpp disagree, we follow llama.cpp, because it
reproduces the tokenizer the model was trained with: SmolLM's digit splitting, Llama 3's
`ignore_merges`, and control tokens matched whole by their raw text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loader.chat_template import ChatTemplateError, render_chat_template

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Token texts that end generation even when the file names another EOS (llama.cpp's EOG list):
# chat models close a turn with these, base models a document.
_END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)

# GGUF token types (llama.cpp's llama_token_type: undefined, normal, ..., unused, byte).
_TOKEN_TYPES = range(7)
_TYPE_UNKNOWN = 2
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4

# Pre-tokenizer split regexes, by family, as llama.cpp and the original tokenizer.json use them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (split regexes applied in order, BPE ignore_merges, default add_bos).
# "digits" is llama.cpp's `\p{N}` pass, i.e. the `Digits(individual_digits=True)` pre-tokenizer
# of StarCoder-family tokenizer.json files.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    **dict.fromkeys(
        ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "trillion"),
        ((_GPT2_SPLIT,), False, False),
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (("digits", _GPT2_SPLIT), False, False),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"),
        ((_LLAMA3_SPLIT,), True, True),
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe", "lfm2"), ((_LLAMA3_SPLIT,), False, False)),
    **dict.fromkeys(
        ("qwen2", "qwen2.5", "deepseek-r1-qwen", "megrez", "stablelm2"),
        ((_QWEN2_SPLIT,), False, False),
    ),
    "tekken": ((_TEKKEN_SPLIT,), True, True),
    **dict.fromkeys(("gpt-4o", "llama4"), ((_GPT4O_SPLIT,), False, False)),
}

# SentencePiece vocabularies these architectures need rebuilt differently (Phi-3's
# normalizer); not implemented.
_UNSUPPORTED_SPM_ARCHITECTURES = ("phi3",)
# Gemma's: spaces become "▁" in a normalizer (no prefix space), whitespace-run tokens are
# stored as real spaces, and the merge order is the vocabulary's order, not its scores.
_GEMMA_SPM_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what an engine needs around it.

    `special_tokens` holds the named special tokens as strings (bos_token, eos_token, ...),
    exactly what transformers passes to chat templates. `eos_token_ids` lists every id that
    ends generation, the model's EOS first.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None,
        chat_template: str | None,
        chat_templates: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The model's own EOS id (the first of `eos_token_ids`)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token text such as "<|im_start|>" maps to its id.

        With `add_special_tokens`, BOS/EOS are added as the model's tokenizer config says.
        Text rendered by a chat template already holds them: encode it without.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; special tokens are left out unless `skip_special_tokens` is False."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and not isinstance(self.backend.model, models.BPE):
            # transformers skips this cleanup for BPE models, whose spaces are real text.
            text = _clean_up_tokenization(text)
        return text

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that `load_hf_tokenizer` reads back
        to an equivalent tokenizer (how a quantized checkpoint carries a GGUF's tokenizer)."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = dict(self.special_tokens)
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        if self.chat_templates:
            config["chat_template"] = [
                {"name": name, "template": text} for name, text in self.chat_templates.items()
            ]
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False)
        )

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (byte-level spelling), None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary string `token`, None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages`, rendered with the model's chat template."""
        if self.chat_template is None:
            named = f" (it has named templates: {sorted(self.chat_templates)})"
            raise ChatTemplateError(
                "this model has no default chat template"
                + (named if self.chat_templates else "")
                + "; use plain text generation instead of chat"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: undo WordPiece-style spaces before punctuation."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text


# --------------------------------------------------------------------------------------------
# Hugging Face folders


def load_hf_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model folder as transformers would.

    `tokenizer.json` is required and its post-processor decides BOS/EOS. `tokenizer_config.json`
    gives the named special tokens (falling back to `special_tokens_map.json`) and the chat
    template; `chat_template.jinja`, when present, takes precedence over the latter.
    """
    folder = Path(folder)
    backend = _read_tokenizer_json(folder / "tokenizer.json")
    config = _read_json_if_exists(folder / "tokenizer_config.json")
    special_map = _read_json_if_exists(folder / "special_tokens_map.json")
    special_tokens = _named_special_tokens(config, special_map)
    _register_special_tokens(backend, special_tokens.values())
    add_bos, add_eos = _post_processor_adds(backend)
    templates = _hf_chat_templates(folder, config)
    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        bos_token_id=_token_id(backend, special_tokens.get("bos_token")),
        eos_token_ids=_eos_ids(backend, _token_id(backend, special_tokens.get("eos_token"))),
        pad_token_id=_token_id(backend, special_tokens.get("pad_token")),
        chat_template=templates.get("default"),
        chat_templates=templates,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise ModelLoadError(
            f"{path.parent} has no tokenizer.json; lamina needs the fast-tokenizer file "
            f"(expected at {path})"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception on bad files
        raise ModelLoadError(f"{path} is not a valid tokenizer.json: {exc}") from None


def _read_json_if_exists(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _named_special_tokens(config: Mapping[str, Any], fallback: Mapping[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... as strings; each may be a string or an AddedToken dict."""
    named = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if value is None:
            value = fallback.get(name)
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(value.get("content"), str):
            value = value["content"]
        if not isinstance(value, str):
            raise ModelLoadError(f"tokenizer config has an invalid {name}: {value!r}")
        named[name] = value
    return named


def _post_processor_adds(backend: tokenizers.Tokenizer) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor puts special tokens before/after the text.

    transformers 5 ignores tokenizer_config's add_bos_token/add_eos_token when tokenizer.json
    exists: its post-processor alone decides (Llama 3 adds BOS there), and so do we.
    """
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    positions = range(len(full) - len(plain) + 1)
    start = next((i for i in positions if full[i : i + len(plain)] == plain), 0)
    return start > 0, len(full) - start - len(plain) > 0


def _hf_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates; the one named "default" is the model's chat template."""
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return {"default": jinja_path.read_text(encoding="utf-8")}
    template = config.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list) and all(
        isinstance(t, Mapping)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in template
    ):
        return {t["name"]: t["template"] for t in template}
    raise ModelLoadError(
        "tokenizer_config.json chat_template must be a string or a list of "
        '{"name": ..., "template": ...} objects'
    )


# --------------------------------------------------------------------------------------------
# GGUF metadata


def tokenizer_from_gguf(metadata: Mapping[str, object]) -> Tokenizer:
    """Rebuild the tokenizer a GGUF file describes from its `tokenizer.*` metadata.

    `metadata` maps GGUF keys to the Python values `ReaderField.contents()` returns. Byte-level
    BPE ("gpt2") and SentencePiece-style BPE ("llama") vocabularies are supported.
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(kind, str) or not isinstance(tokens, list) or not tokens:
        raise ModelLoadError(
            "GGUF metadata has no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens)"
        )
    _check_tokens(tokens)
    token_types = _token_types(metadata, len(tokens))
    if kind == "gpt2":
        backend, default_add_bos = _byte_level_backend(metadata, tokens, token_types)
    elif kind == "llama":
        backend, default_add_bos = _sentencepiece_backend(metadata, tokens, token_types), True
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported; lamina supports 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece BPE)"
        )
    return _finish_gguf_tokenizer(backend, metadata, tokens, token_types, default_add_bos)


def _finish_gguf_tokenizer(
    backend: tokenizers.Tokenizer,
    metadata: Mapping[str, object],
    tokens: list[str],
    token_types: list[int],
    default_add_bos: bool,
) -> Tokenizer:
    """Special tokens, BOS/EOS post-processing and the chat template, common to all models."""
    _add_gguf_added_tokens(backend, tokens, token_types)
    ids = {name: _gguf_id(metadata, key, len(tokens)) for name, key in _GGUF_SPECIAL_IDS.items()}
    special_tokens = {name: tokens[i] for name, i in ids.items() if i is not None}
    add_bos = _gguf_flag(metadata, "tokenizer.ggml.add_bos_token", default_add_bos)
    add_eos = _gguf_flag(metadata, "tokenizer.ggml.add_eos_token", False)
    add_bos = add_bos and ids["bos_token"] is not None
    add_eos = add_eos and ids["eos_token"] is not None
    _set_bos_eos_processor(
        backend,
        (special_tokens["bos_token"], ids["bos_token"]) if add_bos else None,
        (special_tokens["eos_token"], ids["eos_token"]) if add_eos else None,
    )
    templates = _gguf_chat_templates(metadata)
    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        bos_token_id=ids["bos_token"],
        eos_token_ids=_gguf_eos_ids(metadata, tokens, ids["eos_token"]),
        pad_token_id=ids["pad_token"],
        chat_template=templates.get("default"),
        chat_templates=templates,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )


_GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _check_tokens(tokens: list[object]) -> None:
    """Every token a string, each once: a repeated text would leave one of its ids without a
    vocabulary entry (llama.cpp refuses such files too, by assertion)."""
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ModelLoadError(f"GGUF tokenizer.ggml.tokens[{index}] is not a string: {token!r}")
        if token in seen:
            raise ModelLoadError(
                f"GGUF tokenizer.ggml.tokens holds {token!r} twice (ids {seen[token]} and {index})"
            )
        seen[token] = index


def _token_types(metadata: Mapping[str, object], n_tokens: int) -> list[int]:
    """Per-token types; files without them mark every token normal (1), as llama.cpp assumes."""
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return [1] * n_tokens
    if not isinstance(types, list) or len(types) != n_tokens:
        raise ModelLoadError("GGUF tokenizer.ggml.token_type does not match tokenizer.ggml.tokens")
    for index, kind in enumerate(types):
        if not isinstance(kind, int) or isinstance(kind, bool) or kind not in _TOKEN_TYPES:
            raise ModelLoadError(
                f"GGUF tokenizer.ggml.token_type[{index}] is {kind!r}; llama.cpp's token types "
                f"are {_TOKEN_TYPES.start} to {_TOKEN_TYPES.stop - 1}"
            )
    return types


def _gguf_id(metadata: Mapping[str, object], key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_tokens:
        raise ModelLoadError(f"GGUF {key} = {value!r} is not a token id of this vocabulary")
    return value


def _gguf_flag(metadata: Mapping[str, object], key: str, default: bool) -> bool:
    value = metadata.get(key)
    if value is None:
        return default
    if value not in (True, False):  # also the integers 0 and 1 of files written as uint8
        raise ModelLoadError(f"GGUF {key} = {value!r} is not a boolean")
    return bool(value)


def _gguf_chat_templates(metadata: Mapping[str, object]) -> dict[str, str]:
    """`tokenizer.chat_template` is the default; `tokenizer.chat_template.NAME` adds named ones."""
    templates = {}
    for key, value in metadata.items():
        if key == "tokenizer.chat_template" and isinstance(value, str):
            templates["default"] = value
        elif key.startswith("tokenizer.chat_template.") and isinstance(value, str):
            templates[key.removeprefix("tokenizer.chat_template.")] = value
    return templates


def _gguf_eos_ids(
    metadata: Mapping[str, object], tokens: list[str], eos_id: int | None
) -> list[int]:
    """EOS, then EOT/EOM and the tokens llama.cpp treats as end-of-generation by their text."""
    found = [eos_id] if eos_id is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = _gguf_id(metadata, key, len(tokens))
        if token_id is not None:
            found.append(token_id)
    found += [i for i, text in enumerate(tokens) if text in _END_OF_GENERATION_TEXTS]
    return list(dict.fromkeys(found))


def _add_gguf_added_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int]
) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added.

    Both are matched whole in the input text, as llama.cpp does; otherwise "<|im_start|>" would
    be cut into pieces. Their vocabulary entries keep the raw text, so no new ids appear.
    """
    special = [
        AddedToken(text, special=True, normalized=False)
        for text, kind in zip(tokens, token_types, strict=True)
        if kind in (_TYPE_CONTROL, _TYPE_UNKNOWN)
    ]
    user_defined = [
        AddedToken(text, special=False, normalized=False)
        for text, kind in zip(tokens, token_types, strict=True)
        if kind == _TYPE_USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user_defined:
        backend.add_tokens(user_defined)


def _byte_level_backend(
    metadata: Mapping[str, object], tokens: list[str], token_types: list[int]
) -> tuple[tokenizers.Tokenizer, bool]:
    """GPT-2 style byte-level BPE; returns the tokenizer and the pre-tokenizer's add_bos default."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}"
        )
    splits, ignore_merges, default_add_bos = _PRE_TOKENIZERS[pre]
    vocab = _byte_level_vocab(tokens, token_types)
    merges = _gguf_merges(metadata, vocab)
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=ignore_merges,
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(splits)
    backend.decoder = decoders.ByteLevel()
    return backend, default_add_bos


def _byte_level_pre_tokenizer(splits: tuple[str, ...]) -> pre_tokenizers.PreTokenizer:
    """Split as the model's tokenizer.json did, then map bytes to the GPT-2 unicode alphabet.

    The GPT-2 regex is ByteLevel's own, so it stays inside ByteLevel exactly as in GPT-2,
    StarCoder and SmolLM tokenizer.json files.
    """
    steps: list[pre_tokenizers.PreTokenizer] = []
    for split in splits:
        if split == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif split != _GPT2_SPLIT:
            steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False))
    use_gpt2_regex = _GPT2_SPLIT in splits
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_gpt2_regex))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _byte_level_vocab(tokens: list[str], token_types: list[int]) -> dict[str, int]:
    """Token -> id, with stray raw-text spellings of normal tokens mapped to the byte alphabet.

    Control and user-defined tokens keep their raw text: they are matched as added tokens on
    the input text before byte-level mapping, and the ByteLevel decoder passes raw text through.
    """
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, (token, kind) in enumerate(zip(tokens, token_types, strict=True)):
        if kind not in (_TYPE_CONTROL, _TYPE_USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    return vocab


def _gguf_merges(metadata: Mapping[str, object], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The merges as pairs, each checked against the vocabulary: `tokenizers` answers a merge
    of unknown tokens with an exception, or a Rust panic when only the merged token is unknown."""
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ModelLoadError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pairs = []
    for index, merge in enumerate(merges):
        left, sep, right = merge.partition(" ") if isinstance(merge, str) else ("", "", "")
        if not sep:
            raise ModelLoadError(
                f"GGUF merge {index} ({merge!r}) is not two tokens separated by a space"
            )
        unknown = [t for t in (left, right, left + right) if t not in vocab]
        if unknown:
            raise ModelLoadError(
                f"GGUF merge {index} ({merge!r}) names {unknown[0]!r}, which is not in "
                "tokenizer.ggml.tokens"
            )
        pairs.append((left, right))
    return pairs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _sentencepiece_backend(
    metadata: Mapping[str, object], tokens: list[str], token_types: list[int]
) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE with byte fallback, as LlamaTokenizerFast builds it.

    GGUF stores scores, not merges; merges are recovered from the scores (best first), which is
    how transformers converts SentencePiece models. Gemma's vocabulary is rebuilt as
    transformers' GGUF loader rebuilds it for GemmaTokenizer (`_gemma_vocabulary`).
    """
    architecture = metadata.get("general.architecture")
    if architecture in _UNSUPPORTED_SPM_ARCHITECTURES:
        raise UnsupportedModelError(
            f"SentencePiece tokenizers of {architecture!r} GGUF files are not supported yet"
        )
    gemma = architecture in _GEMMA_SPM_ARCHITECTURES
    scores = metadata.get("tokenizer.ggml.scores")
    if (
        not isinstance(scores, list)
        or len(scores) != len(tokens)
        or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores)
    ):
        raise ModelLoadError(
            "GGUF SentencePiece tokenizer needs one finite tokenizer.ggml.scores value per token"
        )
    if gemma:
        tokens, scores = _gemma_vocabulary(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = _gguf_id(metadata, "tokenizer.ggml.unknown_token_id", len(tokens))
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, dict(zip(tokens, scores, strict=True))),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        return backend
    prefix_space = _gguf_flag(metadata, "tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _gemma_vocabulary(tokens: list[str]) -> tuple[list[str], list[float]]:
    """Gemma's tokens and merge ranks as transformers' GGUF loader rebuilds them: a token of
    spaces only is stored as real spaces and looked up as "▁" * length, and its merges
    follow the file's order (earlier is better), which Gemma's scores do not."""
    respelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    return respelled, [-float(i) for i in range(len(tokens))]


def _merges_from_scores(
    vocab: Mapping[str, int], scores: Mapping[str, float]
) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, the best-scored token's first.

    Ties go to the shorter left piece, then to vocabulary order, matching transformers'
    `generate_merges`, so both rebuild the same SentencePiece merges.
    """
    candidates = []
    for token, score in scores.items():
        pairs = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(left, right, score) for left, right in pairs]
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


# --------------------------------------------------------------------------------------------
# Shared helpers


def _register_special_tokens(backend: tokenizers.Tokenizer, texts: Iterable[str]) -> None:
    """Make the named special tokens special added tokens, as transformers does on load.

    Tokens already added (in tokenizer.json's added_tokens) keep their own flags.
    """
    added = {str(token.content) for token in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(texts) if t not in added]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _set_bos_eos_processor(
    backend: tokenizers.Tokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> None:
    """The post-processor transformers' `update_post_processor` builds: "[BOS] $A [EOS]"."""
    for token in (bos, eos):
        if token is not None and not _is_template_piece(token[0]):
            raise UnsupportedModelError(
                f"GGUF special token {token[0]!r} cannot be added to encoded text: its text holds "
                "a space or ':', or starts with '$', which tokenizers' templates reserve"
            )
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    special = [token for token in (bos, eos) if token is not None]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


def _is_template_piece(text: str) -> bool:
    """Whether TemplateProcessing's template language reads `text` as one special token."""
    return bool(text) and not text.startswith("$") and ":" not in text and text.split() == [text]


def _token_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _eos_ids(backend: tokenizers.Tokenizer, eos_id: int | None) -> list[int]:
    """EOS first, then the added special tokens llama.cpp also treats as end-of-generation."""
    found = [eos_id] if eos_id is not None else []
    for token_id, token in sorted(backend.get_added_tokens_decoder().items()):
        if token.special and token.content in _END_OF_GENERATION_TEXTS:
            found.append(token_id)
    return list(dict.fromkeys(found))
