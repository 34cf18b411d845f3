"""Streaming text out of a stream of token ids, and stop strings over that text.

`IncrementalDetokenizer` turns token ids into text pieces as they are generated. Two things make
this harder than decoding each token on its own: byte-level BPE splits one character across
several tokens (decoding the first half alone gives U+FFFD), and SentencePiece-style decoders
drop the leading space of the first token of a decode. Both are solved as in vLLM and TGI by
decoding a short window that starts a few tokens *before* the new ones and emitting only what
the new tokens added to it.

`StopStringMatcher` holds back text that might be the start of a stop string, so a stop string
split across pieces is never partly shown to the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from engine.errors import InvalidInputError

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context for the first generated tokens (vLLM uses 5).
_CONTEXT_TOKENS = 5
# Undecodable tokens held back before giving up on them ever completing a character. A UTF-8
# character is at most 4 bytes, so this only triggers on garbage (or a long run of skipped
# special tokens) and keeps the decoded window, hence the cost per token, bounded.
_MAX_PENDING_TOKENS = 16


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer (`tokenizers.Tokenizer` has it)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns generated token ids into text pieces, one `push` per token.

    The window `_ids` holds context tokens (already emitted, `[:_read]`) followed by pending
    ones. `_context_text` is the decode of the context alone; the decode of the whole window
    minus that prefix is the text the pending tokens add. When that text no longer ends in
    U+FFFD, it is final: it is emitted and the pending tokens become the next context. While it
    does end in U+FFFD, the part before the trailing U+FFFD run is already final (appending
    bytes cannot change complete characters), so it is emitted early and remembered in
    `_emitted`.

    For byte-level BPE the concatenation of all pieces equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)`; for SentencePiece decoders it keeps
    the leading space that a standalone decode of the output would strip.
    """

    def __init__(
        self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0
        self._context_text = ""
        self._emitted = 0
        self._set_context([int(i) for i in prompt_ids[max(len(prompt_ids) - _CONTEXT_TOKENS, 0) :]])

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (often "")."""
        self._ids.append(int(token_id))
        new_text = self._pending_text()
        if new_text and not new_text.endswith(REPLACEMENT_CHAR):
            return self._advance(new_text)
        if len(self._ids) - self._read > _MAX_PENDING_TOKENS:
            return self._advance(new_text)
        return self._emit_stable_part(new_text)

    def flush(self) -> str:
        """Return whatever is still held back, at the end of generation."""
        return self._advance(self._pending_text())

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _pending_text(self) -> str:
        """Text added by the pending tokens, decoded together with their left context."""
        return self._decode(self._ids)[len(self._context_text) :]

    def _advance(self, new_text: str) -> str:
        """Emit the rest of `new_text` and make the pending tokens the next context."""
        piece = new_text[self._emitted :]
        self._set_context(self._ids[self._read :])
        return piece

    def _set_context(self, ids: list[int]) -> None:
        """Make `ids` the left context of the next tokens.

        A context that ends inside a character (a prompt cut mid-character, or garbage bytes
        given up on) would merge with the next bytes and shift every later slice, so it is
        dropped and the next tokens are decoded on their own.
        """
        self._ids = ids
        self._context_text = self._decode(ids)
        if self._context_text.endswith(REPLACEMENT_CHAR):
            self._ids, self._context_text = [], ""
        self._read = len(self._ids)
        self._emitted = 0

    def _emit_stable_part(self, new_text: str) -> str:
        """Emit what precedes a trailing U+FFFD run: later bytes cannot change it."""
        stable = new_text.rstrip(REPLACEMENT_CHAR)
        if len(stable) <= self._emitted:
            return ""
        piece = stable[self._emitted :]
        self._emitted = len(stable)
        return piece


class StopStringMatcher:
    """Cuts a stream of text at the first stop string, whatever the split into pieces.

    The stop is the one that *completes* first (earliest end; for equal ends, the longest), which
    is the only rule a streaming matcher can honour without emitting text it might have to take
    back. Text is held back only while it could still be the start of a stop string.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        if isinstance(stops, str):
            stops = [stops]
        if any(not s for s in stops):
            raise InvalidInputError("stop strings must be non-empty")
        self._stops = list(dict.fromkeys(stops))
        self._include = include_stop
        self._longest = max((len(s) for s in self._stops), default=0)
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add text; return (text safe to show now, whether a stop string completed)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return piece, False
        buffer = self._buffer + piece
        match = self._earliest_match(buffer)
        if match is not None:
            start, stop = match
            self.stopped, self.matched, self._buffer = True, stop, ""
            end = start + len(stop) if self._include else start
            return buffer[:end], True
        keep = self._partial_suffix_length(buffer)
        self._buffer = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Return held-back text once the stream ended without a stop string."""
        text, self._buffer = self._buffer, ""
        return "" if self.stopped else text

    def _earliest_match(self, buffer: str) -> tuple[int, str] | None:
        """(start, stop) of the stop string that ends first in buffer, or None.

        Only the unemitted buffer is searched: everything emitted before was, by construction,
        not the start of any stop string.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key < best:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[len(buffer) - length :]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
