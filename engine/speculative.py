"""Speculative decoding: propose a few tokens cheaply, check them in one forward pass.

Decode on a CPU is memory-bound: a pass over k + 1 tokens of one sequence reads the weights
once, as a pass over one token does. So after each sampled token a sequence appends up to k
proposed tokens; the next pass computes all of them, with logits at each position, and the
request's own sampler walks the positions: it samples a token from position i's logits as
it always would, and keeps going while that token equals proposal i. The first token that
differs (or the one after the last proposal) ends the walk; the rejected proposals' keys and
values are cut from the KV cache (`PagedKVCache.truncate`).

Lossless, and the same output: each position's token is sampled from that position's
logits exactly as without speculation (same processing, same seeded draw, one per position
in order), and a proposal is kept when the sampled token equals it. For a proposal that is
certain (every method here proposes deterministically), this is the rejection scheme's rule:
the proposal x is kept with probability p(x), else the token comes from p without x. So
greedy and seeded sampling give the very tokens plain decode gives, whatever the batch.

Methods: "ngram" (prompt lookup): the last n tokens (n from prompt_lookup_max down to
prompt_lookup_min) are looked up in everything before them, prompt and output, and the k
tokens that followed their latest earlier occurrence are proposed. It costs microseconds
and pays on input-grounded tasks (summaries, edits, code), where the output copies spans.
"draft": a smaller model with the same vocabulary decodes k tokens greedily; "self": the
target's own first layers (and/or its weights in another precision) do
(engine/draft_model.py).

Each sequence adapts its k to how many proposals it has had accepted lately, and the engine
stops speculating when more sequences decode together than `max_batch`: a batch already
reads the weights once for many tokens, so verification would only add compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.errors import InvalidInputError

METHODS = ("ngram", "draft", "self")
# Decoding sequences above which an engine step speculates no more.
DEFAULT_MAX_BATCH = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    """How an engine speculates (vLLM's speculative_config keys)."""

    method: str
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    max_batch: int = DEFAULT_MAX_BATCH
    draft_model: str | None = None  # "draft": the smaller model's path
    draft_quant: str | None = None  # the draft's precision (default: as it loads)
    draft_layers: int | None = None  # run only the first layers ("self": default half)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(
                f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                     "max_batch"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise InvalidInputError("draft_model is given exactly with method draft")
        if self.draft_model is not None:
            object.__setattr__(self, "draft_model", str(self.draft_model))
        if self.draft_layers is not None and (
            isinstance(self.draft_layers, bool)
            or not isinstance(self.draft_layers, int)
            or self.draft_layers < 1
        ):
            raise InvalidInputError(
                f"draft_layers must be a positive integer, got {self.draft_layers!r}"
            )
        if self.method == "ngram" and (self.draft_quant or self.draft_layers):
            raise InvalidInputError("draft_quant and draft_layers apply to draft and self")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise InvalidInputError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def of(cls, value: Mapping[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From `LLM(speculative={...})`: a dict with "method" and the other field names."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, Mapping) or "method" not in value:
            raise InvalidInputError('speculative must be an object with a "method"')
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown speculative setting {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        return cls(**value)


def ngram_proposal(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` (max_n down to min_n tokens long); [] when no suffix occurred before."""
    length = len(tokens)
    if length < 2 or k < 1:
        return []
    seen = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seen[: length - 1], n)
        hits = np.flatnonzero((windows == seen[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in seen[start : start + k]]
    return []


class Proposer(Protocol):
    def propose(self, requests: Sequence[tuple[Any, int]]) -> list[list[int]]:
        """Up to k proposed tokens after each (Sequence, k)'s tokens."""

    def release(self, live: set[int]) -> None:
        """Forget every sequence id not in `live`."""

    def close(self) -> None: ...


class NgramProposer:
    """Prompt lookup: no state, microseconds per sequence."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, requests: Sequence[tuple[Any, int]]) -> list[list[int]]:
        c = self.config
        return [
            ngram_proposal(seq.tokens, k, c.prompt_lookup_min, c.prompt_lookup_max)
            for seq, k in requests
        ]

    def release(self, live: set[int]) -> None:
        """Nothing is kept per sequence."""

    def close(self) -> None:
        """Nothing to release."""


class Speculator:
    """The engine's speculation: the config, its proposer, and whether this step's batch is
    small enough to speculate."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        self.enabled = True  # set by the engine loop each step


class DraftLength:
    """One sequence's k: one more after every proposal accepted whole, halved after a
    proposal rejected at its first token, between 1 and the configured maximum. A single
    proposed token rejected pauses proposals for a while, doubling the pause each time
    (up to MAX_PAUSE steps): text the lookup cannot predict then costs almost nothing."""

    MAX_PAUSE = 16

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.k = maximum
        self._pause = 0  # steps left without proposals
        self._next_pause = 1

    def update(self, proposed: int, accepted: int) -> None:
        if accepted == proposed:
            self.k = min(self.maximum, self.k + 1)
            self._next_pause = 1
        elif accepted == 0:
            if self.k == 1:
                self._pause = self._next_pause
                self._next_pause = min(self.MAX_PAUSE, 2 * self._next_pause)
            self.k = max(1, self.k // 2)

    def ready(self) -> bool:
        """Whether to propose at this step (counts down a pause)."""
        if self._pause:
            self._pause -= 1
            return False
        return True
