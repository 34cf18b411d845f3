"""The engine loop: owns the model and KV cache, and turns a request into streamed text.

Every entry point (Python API, CLI, later the batch runner and server) goes through here, so
nothing else calls the model. For now requests run one at a time; the continuous-batching
scheduler replaces `run` with an iteration-level loop over many sequences.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import numpy as np

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.errors import ContextLengthError, LaminaError
from engine.kv_cache import BLOCK_SIZE, ForwardBatch, PagedKVCache, budget_blocks
from engine.loader.model_loader import LoadedModel
from engine.model import Transformer
from engine.outputs import RequestOutput
from engine.sampling import Sampler, SamplingParams


class EngineLoop:
    def __init__(
        self,
        loaded: LoadedModel,
        backend: object,
        max_model_len: int | None = None,
        kv_cache_mb: float | None = None,
        kv_cache_fraction: float | None = None,
        enable_prefix_caching: bool = True,
    ):
        self.loaded = loaded
        self.backend = backend
        self.model = Transformer(loaded.config, loaded.weights, backend)
        limit = loaded.config.max_position_embeddings
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.max_model_len = min(max_model_len or limit, limit)
        # numba's workqueue threading layer aborts the process on concurrent parallel calls.
        self._model_lock = threading.Lock()
        self._score_ids = itertools.count()
        self.vocab_size = min(loaded.tokenizer.vocab_size, loaded.config.vocab_size)
        self.cache = self._make_cache(kv_cache_mb, kv_cache_fraction)
        self.enable_prefix_caching = enable_prefix_caching

    def _make_cache(self, memory_mb: float | None, fraction: float | None) -> PagedKVCache:
        cfg = self.loaded.config
        token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
        blocks = budget_blocks(token_bytes * BLOCK_SIZE, memory_mb, fraction)
        needed = -(-self.max_model_len // BLOCK_SIZE)
        if blocks < needed:
            raise LaminaError(
                f"the KV cache budget holds {blocks * BLOCK_SIZE} tokens, less than one "
                f"{self.max_model_len}-token context ({token_bytes * self.max_model_len / 2**20:.0f}"
                " MB); raise the budget or lower max_model_len"
            )
        return PagedKVCache(
            self.backend, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, blocks, BLOCK_SIZE
        )

    def start(self, output: RequestOutput, params: SamplingParams) -> Iterator[str]:
        """Check the prompt now, then return the generator that fills `output` and yields text.

        Checking here rather than inside the generator makes a bad prompt fail at the call,
        not at the first iteration. Closing the generator early (e.g. Ctrl-C in a chat) ends
        the request with "abort".
        """
        self.check_prompt(output.prompt_token_ids)
        return self._run(output, params)

    def _run(self, output: RequestOutput, params: SamplingParams) -> Iterator[str]:
        prompt = output.prompt_token_ids
        cfg = self.loaded.config
        budget = min(params.max_tokens, self.max_model_len - len(prompt))
        seq_id = ("generate", output.request_id)
        sampler = Sampler(params, self.vocab_size)
        detok = IncrementalDetokenizer(self.loaded.tokenizer, prompt, params.skip_special_tokens)
        stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(cfg.eos_token_ids)
        m = output.metrics
        m.prompt_tokens = len(prompt)
        start = time.perf_counter()
        cached = self.cache.add_sequence(seq_id, prompt if self.enable_prefix_caching else [])
        m.cached_prompt_tokens = cached
        feed = list(prompt[cached:])
        try:
            while True:
                logits = self._step(seq_id, feed)
                token = sampler.sample(logits, prompt, output.token_ids)
                output.token_ids.append(token)
                m.record_token(time.perf_counter() - start)
                reason = None
                if token in stop_ids:
                    reason, text = "stop", detok.flush()
                else:
                    text = detok.push(token)
                    if len(output.token_ids) >= budget:
                        reason, text = "length", text + detok.flush()
                piece, hit_stop_string = stops.feed(text)
                if hit_stop_string:
                    reason = "stop"
                elif reason is not None:
                    piece += stops.flush()
                output.text += piece
                output.finish_reason = reason
                if piece:
                    yield piece
                if reason is not None:
                    return
                feed = [token]
        finally:
            self.cache.free(seq_id)
            if output.finish_reason is None:
                output.finish_reason = "abort"

    def prompt_logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits at every position of `token_ids` (T, vocab), from one prefill pass."""
        self.check_prompt(token_ids, room_to_generate=0)
        seq_id = ("score", next(self._score_ids))
        self.cache.add_sequence(seq_id, [])
        try:
            batch = ForwardBatch.build(self.cache, [(seq_id, token_ids)], all_logits=True)
            with self._model_lock:
                return self.model.forward(batch)
        finally:
            self.cache.free(seq_id)

    def _step(self, seq_id: tuple, token_ids: list[int]) -> np.ndarray:
        """One forward pass of a sequence's new tokens; the logits of the last one."""
        with self._model_lock:
            batch = ForwardBatch.build(self.cache, [(seq_id, token_ids)])
            logits = self.model.forward(batch)
            self.cache.commit(seq_id, token_ids)
        return logits[-1]

    def check_prompt(self, prompt: list[int], room_to_generate: int = 1) -> None:
        """Refuse empty prompts, unknown token ids, and prompts that leave fewer than
        `room_to_generate` free positions in the context window (0 when only scoring)."""
        if not prompt:
            raise ContextLengthError("the prompt is empty: there is no token to start from")
        bad = [i for i in prompt if not 0 <= i < self.loaded.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the model's vocabulary "
                f"(0 .. {self.loaded.config.vocab_size - 1})"
            )
        longest = self.max_model_len - room_to_generate
        if len(prompt) > longest:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context window is "
                f"{self.max_model_len}; shorten it to at most {longest} tokens"
            )
