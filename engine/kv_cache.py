"""KV cache for one sequence, and the ForwardBatch that tells the model where tokens go.

model.py only hands a ForwardBatch to `Backend.attention`; the backend writes the new keys
and values into the cache and reads the history from it. The paged cache (block tables,
many sequences) replaces this class and extends ForwardBatch without touching model.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import ContextLengthError


class SequenceKVCache:
    """Contiguous K and V storage of shape (layers, max_tokens, kv_heads, head_dim)."""

    def __init__(
        self, backend: Any, num_layers: int, max_tokens: int, num_kv_heads: int, head_dim: int
    ):
        shape = (num_layers, max_tokens, num_kv_heads, head_dim)
        self.k = backend.allocate_kv(shape)
        self.v = backend.allocate_kv(shape)
        self.max_tokens = max_tokens
        self.length = 0

    def reserve(self, n_tokens: int) -> int:
        """Check that n more tokens fit; return the position of the first of them."""
        if self.length + n_tokens > self.max_tokens:
            raise ContextLengthError(
                f"{self.length + n_tokens} tokens do not fit in the {self.max_tokens}-token cache"
            )
        return self.length

    def commit(self, n_tokens: int) -> None:
        """Mark n tokens written by the last forward pass as part of the sequence."""
        self.length += n_tokens


@dataclass
class ForwardBatch:
    """The tokens of one forward pass and where their keys and values live."""

    token_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    cache: SequenceKVCache
    start: int  # position of token_ids[0]; the cache already holds 0 .. start-1
    logits_rows: np.ndarray  # rows of the batch whose logits are wanted

    @classmethod
    def for_sequence(
        cls, cache: SequenceKVCache, token_ids: list[int], all_logits: bool = False
    ) -> ForwardBatch:
        start = cache.reserve(len(token_ids))
        n = len(token_ids)
        return cls(
            token_ids=np.asarray(token_ids, dtype=np.int64),
            positions=np.arange(start, start + n, dtype=np.int64),
            cache=cache,
            start=start,
            logits_rows=np.arange(n) if all_logits else np.array([n - 1]),
        )
