"""Perplexity of a text, as the usual evaluation scripts compute it.

Two schemes. `sliding_window_nll` follows Hugging Face's perplexity guide: windows of
`context` tokens advance by `stride`; each window scores only the tokens not scored by the
previous one, with everything before them in the window as context. `half_chunk_nll` is
llama.cpp's `llama-perplexity`: back-to-back chunks of `context` tokens (the first replaced
by BOS when the model adds one), each scoring its second half, so that lamina's figure can
be set beside llama.cpp's on the same file and text. Perplexity is exp(mean negative
log-likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidInputError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    scored_tokens: int
    windows: int

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "scored_tokens": self.scored_tokens,
            "windows": self.windows,
        }


def _window_nll(logits: np.ndarray, window: Sequence[int], first_target: int) -> tuple[float, int]:
    """Summed negative log-likelihood of window[first_target:] under `logits` (position i
    predicts token i + 1), and how many tokens that is."""
    pred = logits[first_target - 1 : len(window) - 1].astype(np.float64)
    targets = np.asarray(window[first_target:])
    shifted = pred - pred.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -float(log_probs[np.arange(len(targets)), targets].sum()), len(targets)


def half_chunk_nll(
    logits_fn: Callable[[list[int]], np.ndarray],
    ids: Sequence[int],
    context: int,
    chunks: int | None = None,
    bos: int | None = None,
) -> PerplexityResult:
    """llama-perplexity's scheme: up to `chunks` chunks of `context` tokens, each scoring the
    tokens after its first half; `bos` replaces each chunk's first token when given."""
    available = len(ids) // context
    if available < 1 or context < 4:
        raise InvalidInputError(
            f"half-chunk perplexity needs a text of at least one chunk of {context} tokens "
            f"(and a context of 4 or more); this text has {len(ids)}"
        )
    count = available if chunks is None else min(chunks, available)
    total, scored = 0.0, 0
    for c in range(count):
        window = list(ids[c * context : (c + 1) * context])
        if bos is not None:
            window[0] = bos
        nll, n = _window_nll(logits_fn(window), window, context // 2 + 1)
        total += nll
        scored += n
    return PerplexityResult(math.exp(total / scored), total / scored, scored, count)


def sliding_window_nll(
    logits_fn: Callable[[list[int]], np.ndarray],
    ids: Sequence[int],
    context: int,
    stride: int,
) -> PerplexityResult:
    """Score `ids` with `logits_fn` (token ids -> logits at every position)."""
    if len(ids) < 2:
        raise InvalidInputError("perplexity needs a text of at least 2 tokens")
    if not 1 <= stride <= context:
        raise InvalidInputError(
            f"stride must be between 1 and the context ({context}), got {stride}"
        )
    total = 0.0
    count = 0
    windows = 0
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        new = end - prev_end  # tokens this window scores
        window = list(ids[begin:end])
        # score the last `new` targets (never token 0, which nothing predicts)
        nll, n = _window_nll(logits_fn(window), window, max(len(window) - new, 1))
        total += nll
        count += n
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, windows)
