"""Proposals from a draft model: a smaller model with the target's vocabulary ("draft"), or
the target itself run cheaper ("self": its first layers only, and/or its weights in another
precision), with its own runner and paged KV cache on the same backend.

The draft keeps, per target sequence, the tokens whose keys and values its cache holds. To
propose, it first catches up with the target's tokens (after the longest prefix both share:
rejected proposals and preemptions simply shorten it), in chunks that fit its token budget,
then decodes k tokens greedily for every sequence at once, one pass per token. Greedy
proposals are certain ones, so the target's check (engine/speculative.py) stays exact for
sampling too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from engine.backends import Backend
from engine.engine_config import EngineConfig
from engine.errors import InvalidInputError
from engine.kv_cache import ReservationError, kv_bytes_per_token
from engine.loader.model_loader import LoadedModel, load_model
from engine.runner import ModelRunner
from engine.scheduler import Sequence as Seq
from engine.speculative import SpeculativeConfig

logger = logging.getLogger("lamina.engine")


def draft_model(
    target: LoadedModel, spec: SpeculativeConfig, config: EngineConfig, max_model_len: int
) -> LoadedModel:
    """The draft of a target: another model ("draft", with the same vocabulary, checked) or
    the target's own weights, cut to `draft_layers` layers (by default half of them, unless
    `draft_quant` loads them again in another precision: "self")."""
    if spec.method == "draft":
        draft = load_model(spec.draft_model, spec.draft_quant)
        if draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
            raise InvalidInputError(
                f"the draft model {spec.draft_model} has another vocabulary than the target; "
                "a draft must share the target's tokenizer"
            )
    else:
        draft = target if spec.draft_quant is None else load_model(config.model, spec.draft_quant)
    layers = spec.draft_layers
    if layers is None and spec.method == "self" and spec.draft_quant is None:
        layers = max(1, draft.config.num_layers // 2)  # the same weights: run fewer layers
    if layers is None:
        return draft
    if layers > draft.config.num_layers:
        raise InvalidInputError(
            f"draft_layers ({layers}) exceeds the model's {draft.config.num_layers} layers"
        )
    c = draft.config
    windows = None if c.layer_windows is None else c.layer_windows[:layers]
    config_ = dataclasses.replace(c, num_layers=layers, layer_windows=windows)
    weights = dataclasses.replace(draft.weights, layers=draft.weights.layers[:layers])
    return dataclasses.replace(draft, config=config_, weights=weights)


class DraftProposer:
    """Proposes tokens for target sequences with a draft model."""

    def __init__(
        self,
        target: LoadedModel,
        backend: Backend,
        config: EngineConfig,
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        spec = config.speculative
        loaded = draft_model(target, spec, config, max_model_len)
        c = loaded.config
        # One context per sequence that may speculate (the engine stops above max_batch).
        token_bytes = kv_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, "float32")
        kv_mb = token_bytes * (max_model_len + 16) * spec.max_batch / 2**20
        runner_config = dataclasses.replace(
            config,
            speculative=None,
            max_model_len=max_model_len,
            kv_cache_mb=kv_mb,
            kv_cache_fraction=None,
            kv_cache_dtype="float32",
            enable_prefix_caching=False,
            max_num_seqs=spec.max_batch,
            max_num_batched_tokens=max(config.max_num_batched_tokens, spec.max_batch),
        )
        self.runner = ModelRunner(loaded, backend, runner_config)
        self.cache = self.runner.cache
        self.vocab_size = vocab_size
        self._budget = runner_config.max_num_batched_tokens
        self._held: dict[int, list[int]] = {}  # target seq id -> tokens the draft cache holds

    def propose(self, requests: Sequence[tuple[Seq, int]]) -> list[list[int]]:
        """Up to k greedy draft tokens after each sequence's tokens."""
        proposals: list[list[int]] = [[] for _ in requests]
        pending = {}  # index -> the tokens the draft must still compute
        for i, (seq, k) in enumerate(requests):
            if k > 0:
                pending[i] = self._catch_up_tokens(seq)
        last: dict[int, np.ndarray] = {}
        while pending:  # catch up, in chunks within the token budget
            chunks, budget = [], self._budget
            for i, todo in pending.items():
                if budget <= 0:
                    break
                take = todo[:budget]
                chunks.append((i, take))
                budget -= len(take)
            rows = self._run([(requests[i][0].seq_id, take) for i, take in chunks])
            for (i, take), row in zip(chunks, rows, strict=True):
                if row is None:  # the draft cache is full: no proposal for it this step
                    pending.pop(i)
                    continue
                pending[i] = pending[i][len(take) :]
                if not pending[i]:
                    pending.pop(i)
                    last[i] = row
        step = {i: int(np.argmax(row[: self.vocab_size])) for i, row in last.items()}
        for i, token in step.items():
            proposals[i].append(token)
        while True:  # one greedy token per pass, for every sequence that wants more
            wanted = [i for i in step if len(proposals[i]) < requests[i][1]]
            if not wanted:
                return proposals
            rows = self._run([(requests[i][0].seq_id, [proposals[i][-1]]) for i in wanted])
            step = {}
            for i, row in zip(wanted, rows, strict=True):
                if row is not None:
                    step[i] = int(np.argmax(row[: self.vocab_size]))
                    proposals[i].append(step[i])

    def _catch_up_tokens(self, seq: Seq) -> list[int]:
        """The tokens of `seq` the draft has not computed, after cutting its cache back to
        the longest prefix it shares with them."""
        sid = seq.seq_id
        held = self._held.get(sid)
        if held is None:
            self.cache.add_sequence(sid, [])
            held = self._held[sid] = []
        common = 0
        limit = min(len(held), len(seq.tokens))
        while common < limit and held[common] == seq.tokens[common]:
            common += 1
        if common < len(held):
            self.cache.truncate(sid, common)
            del held[common:]
        return list(seq.tokens[common:])

    def _run(self, chunks: list[tuple[int, list[int]]]) -> list[np.ndarray | None]:
        """Each chunk's last logits row; None for a sequence whose slots do not fit (its
        draft state is dropped, and rebuilt at its next proposal)."""
        rows: list[np.ndarray | None] = [None] * len(chunks)
        todo = list(range(len(chunks)))
        while todo:
            try:
                logits = self.runner.run([chunks[j] for j in todo])
            except ReservationError as error:
                failed = next(j for j in todo if chunks[j][0] == error.seq_id)
                self.forget(error.seq_id)
                todo.remove(failed)
                continue
            for j, row in zip(todo, logits, strict=True):
                sid, tokens = chunks[j]
                self.cache.commit(sid, tokens)
                self._held[sid].extend(tokens)
                rows[j] = np.array(row)
            return rows
        return rows

    def forget(self, seq_id: int) -> None:
        """Drop a sequence's draft state (it finished, or the draft cache is full)."""
        if self._held.pop(seq_id, None) is not None:
            self.cache.free(seq_id)

    def release(self, live: set[int]) -> None:
        """Forget every sequence that is no longer live in the target."""
        for sid in [s for s in self._held if s not in live]:
            self.forget(sid)

    def close(self) -> None:
        self.runner.close()
