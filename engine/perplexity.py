"""Perplexity of a text with a sliding window, as the usual evaluation scripts compute it.

Following Hugging Face's perplexity guide: windows of `context` tokens advance by `stride`;
each window scores only the tokens not scored by the previous one, with everything before
them in the window as context. Perplexity is exp(mean negative log-likelihood).
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
        logits = logits_fn(window).astype(np.float64)
        # logits at position i predict token i + 1; score the last `new` targets (not token 0)
        first_target = max(len(window) - new, 1)
        pred = logits[first_target - 1 : len(window) - 1]
        targets = np.asarray(window[first_target:])
        shifted = pred - pred.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, windows)
