"""The engine loop: owns the requests and the scheduler, and runs steps through the runner.

Every entry point (Python API, CLI, batch runner, server) submits requests here; nothing else
calls the model. `step` runs one iteration of continuous batching as a transaction: the
scheduler plans the chunks, the ModelRunner reserves their KV slots and runs one forward pass
(all or nothing), then each chunk is committed and each request turns its logits into
tokens. If anything fails for one request (its slots, its commit, its sampler or
detokenizer), that request ends with finish reason "error", its blocks are freed, the
traceback is logged for the developer, and every other request goes on. Whoever waits for a
result drives the loop by calling `step`, under a lock, so several streams interleaved in one
thread, or served from several threads, all make progress.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from engine.backends import Backend
from engine.beam_search import BeamSearchGroup
from engine.engine_config import EngineConfig
from engine.errors import (
    ContextLengthError,
    EngineClosedError,
    InvalidInputError,
    LaminaError,
)
from engine.kv_cache import NoFreeBlocksError, ReservationError
from engine.loader.model_loader import LoadedModel
from engine.outputs import RequestOutput
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, Sequence, StepPlan
from engine.sequence_group import GenerationContext, SamplingGroup, SequenceGroup
from engine.speculative import NgramProposer, Speculator
from engine.structured import Guide, StructuredOutputs

logger = logging.getLogger("lamina.engine")


class EngineLoop:
    def __init__(self, loaded: LoadedModel, backend: Backend, config: EngineConfig) -> None:
        """Sizes, budgets and placement come from `config` (see EngineConfig)."""
        self.loaded = loaded
        self.backend = backend
        self.config = config
        self.runner = ModelRunner(loaded, backend, config)
        self.cache = self.runner.cache
        self.max_model_len = self.runner.max_model_len
        # numba's workqueue threading layer aborts the process on concurrent parallel calls.
        self._lock = threading.RLock()
        self.closed = False
        self._score_ids = itertools.count()
        vocab_size = min(loaded.tokenizer.vocab_size, loaded.config.vocab_size)
        try:
            speculator = _speculator(loaded, backend, config, self.max_model_len, vocab_size)
        except BaseException:  # a bad draft: release what the runner holds open
            self.runner.close()
            raise
        self.ctx = GenerationContext(
            tokenizer=loaded.tokenizer,
            eos_token_ids=tuple(loaded.config.eos_token_ids),
            vocab_size=vocab_size,
            max_model_len=self.max_model_len,
            structured=StructuredOutputs(loaded.tokenizer, vocab_size),
            speculator=speculator,
        )
        self.scheduler = Scheduler(
            self.cache,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_prefix_caching,
        )

    def close(self) -> None:
        """Release what the runner holds open (layer streams: copies, buffers, file, thread);
        later requests are refused with EngineClosedError."""
        with self._lock:
            self.closed = True
            self.runner.close()
            self.ctx.structured.close()
            if self.ctx.speculator is not None:
                self.ctx.speculator.proposer.close()

    def submit(self, output: RequestOutput, params: SamplingParams) -> SequenceGroup:
        """Queue a request (checked first, so a bad prompt raises here)."""
        group = self.new_group(output, params)
        self.add(group)
        return group

    def new_group(self, output: RequestOutput, params: SamplingParams) -> SequenceGroup:
        """Check a request and build its group, without queueing it (no lock needed)."""
        self.check_prompt(output.prompt_token_ids)
        too_big = [t for t in params.logit_bias or () if t >= self.ctx.vocab_size]
        if too_big:
            raise InvalidInputError(f"logit_bias token id {too_big[0]} is outside the vocabulary")
        kind = BeamSearchGroup if params.use_beam_search else SamplingGroup
        group = kind(output, params, self.ctx)
        group.check_fits(self.scheduler.max_num_seqs)
        return group

    def add(self, group: SequenceGroup) -> None:
        """Queue a group made by `new_group`."""
        with self._lock:
            self.scheduler.add(group)

    def abort(self, group: SequenceGroup) -> None:
        """Stop a request; its sequences and KV blocks are freed at once."""
        with self._lock:
            if not group.finished:
                self.scheduler.abort(group)

    def step(self) -> None:
        """One iteration: schedule, one forward pass over every chunk, commit, sample."""
        with self._lock:
            plan = self.scheduler.schedule()
            if not plan:
                return
            if self.ctx.speculator is not None:  # speculate only while few sequences decode
                running = sum(len(g.live) for g in self.scheduler.running)
                self.ctx.speculator.enabled = running <= self.ctx.speculator.config.max_batch
            chunks = [
                (seq.seq_id, seq.tokens[seq.computed : seq.computed + n]) for seq, n in plan.chunks
            ]
            counts = [1 + seq.draft for seq, _ in plan.chunks]
            # Structured-output masks for the logits this pass makes (meanwhile, if a core
            # is free).
            spare = self.runner.threads.spare_core()
            masks = self.ctx.structured.fill(self._guides_to_fill(plan), overlap=spare)
            try:
                logits = self.runner.run(chunks, counts if any(c > 1 for c in counts) else None)
            except ReservationError as error:
                # Nothing is reserved: the others run next step, without the failed request.
                if isinstance(error.__cause__, NoFreeBlocksError):
                    raise  # the scheduler counted the blocks: a bug in lamina
                self._fail(plan.owner[error.seq_id], error.__cause__)
                return
            except Exception as error:  # noqa: BLE001 - the pass ran for all: no one to single out
                for group in plan.groups():
                    self._fail(group, error)
                return
            finally:
                if masks is not None:
                    masks.result()
            ready = self._commit(plan, chunks, logits, counts)
            for group, items in ready.values():
                if group.finished:
                    continue
                try:
                    group.process(items, self.cache)
                except LaminaError as error:  # the request's own settings cannot go on
                    self.scheduler.abort(group, str(error))
                except Exception as error:  # noqa: BLE001 - any bug ends only its request
                    self._fail(group, error)
            self.scheduler.remove_finished()
            if self.ctx.speculator is not None:
                self._propose([group for group, _ in ready.values()])

    def _propose(self, groups: list[SequenceGroup]) -> None:
        """Proposals for every sequence of the step that asked, from one proposer call (a
        draft model runs its passes for all of them together); the proposer then forgets
        the sequences that are gone."""
        asking = [g for g in groups if not g.finished and g.asks]
        asks = [ask for g in asking for ask in g.asks]
        for group in groups:
            group.asks = []
        proposer = self.ctx.speculator.proposer
        proposer.release({s.seq_id for g in self.scheduler.running for s in g.live})
        started = time.perf_counter()
        try:
            made = proposer.propose(asks)
        except Exception:  # proposals are an optimisation: decode goes on without them
            logger.exception("the speculative proposer failed; this step proposes nothing")
            return
        finally:  # every request that asked waited for the whole call
            elapsed = time.perf_counter() - started
            for group in asking:
                group.output.metrics.spec_draft_s += elapsed
        for (seq, _), proposals in zip(asks, made, strict=True):
            seq.tokens.extend(proposals)
            seq.draft = len(proposals)

    @staticmethod
    def _guides_to_fill(plan: StepPlan) -> list[Guide]:
        """The guides of the sequences whose pending tokens this pass completes."""
        return [
            guide
            for seq, n in plan.chunks
            if seq.computed + n == len(seq.tokens)
            for guide in plan.owner[seq.seq_id].guides_to_fill(seq)
        ]

    def _commit(
        self, plan: StepPlan, chunks: list, logits: np.ndarray, counts: list[int]
    ) -> dict[int, tuple[SequenceGroup, list[tuple[Sequence, np.ndarray]]]]:
        """Mark each chunk's tokens as computed; gather the logits of sequences whose pending
        tokens are all in, per request (a row, or one per position of a speculative chunk)."""
        ready: dict[int, tuple[SequenceGroup, list[tuple[Sequence, np.ndarray]]]] = {}
        ends = np.cumsum(counts)
        for (seq, n), (seq_id, tokens), end, count in zip(
            plan.chunks, chunks, ends, counts, strict=True
        ):
            rows = logits[end - count : end]
            group = plan.owner[seq_id]
            if group.finished:  # failed on an earlier chunk of this step
                continue
            try:
                self.cache.commit(seq_id, tokens)
            except Exception as error:  # noqa: BLE001 - any bug ends only its request
                self._fail(group, error)
                continue
            seq.computed += n
            if seq.uncomputed == 0:
                ready.setdefault(id(group), (group, []))[1].append(
                    (seq, rows if seq.draft else rows[0])
                )
        return ready

    def _fail(self, group: SequenceGroup, error: BaseException) -> None:
        """End one request with finish reason "error", log the traceback, free its blocks,
        including those of sequences it forked but had not yet tracked when it failed."""
        rid = group.output.request_id
        logger.error("request %s failed inside the engine", rid, exc_info=error)
        self.scheduler.fail(group, f"internal error: {error!r} (see the log for the traceback)")
        owned = {seq.seq_id for g in self.scheduler.running for seq in g.live}
        for seq_id in self.cache.sequence_ids():
            if seq_id not in owned:
                self.cache.free(seq_id)

    def start(self, output: RequestOutput, params: SamplingParams) -> Iterator[str]:
        """Check the request now; return a generator that queues it when first advanced,
        then drives the loop until it finishes, yielding the first completion's new text.

        Closing the generator early (e.g. Ctrl-C in a chat) aborts the request; one that is
        dropped unstarted never queues anything. With best_of > n the best completion is
        only known at the end, so its text comes at once.
        """
        return self._stream(self.new_group(output, params))

    def _stream(self, group: SequenceGroup) -> Iterator[str]:
        self.add(group)
        sent = 0
        streaming = group.params.best_of == group.params.n
        try:
            while True:
                text = group.output.text if streaming or group.finished else ""
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if group.finished:
                    return
                self.step()
        finally:
            self.abort(group)

    def run(
        self, requests: Iterable[tuple[RequestOutput, SamplingParams | None]]
    ) -> Iterator[RequestOutput]:
        """Run many requests through the scheduler; yield each output as it finishes.

        A request that cannot run (prompt too long, bad parameters) is yielded at once,
        aborted, with the reason in `output.error`; the others go on. An output that comes
        already finished (refused before it got here) is yielded as it is.

        Requests are pulled from the iterable lazily, keeping about two batches queued, so a
        million-line batch job does not tokenize everything up front. Closing the generator
        aborts whatever is still queued or running.
        """
        source = iter(requests)
        active: list[SequenceGroup] = []
        exhausted = False
        try:
            while True:
                while not exhausted and len(active) < 2 * self.scheduler.max_num_seqs:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        continue
                    if item[0].finished:  # refused before it reached the engine
                        yield item[0]
                        continue
                    try:
                        active.append(self.submit(*item))
                    except LaminaError as error:
                        item[0].abort(str(error))
                        yield item[0]
                if not active:
                    return
                self.step()
                for group in [g for g in active if g.finished]:
                    active.remove(group)
                    yield group.output
        finally:
            for group in active:
                self.abort(group)

    def prompt_logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits at every position of `token_ids` (T, vocab), from one prefill pass."""
        self.check_prompt(token_ids, room_to_generate=0)
        with self._lock:
            return self.runner.score(token_ids, ("score", next(self._score_ids)))

    def check_prompt(self, prompt: list[int], room_to_generate: int = 1) -> None:
        """Refuse empty prompts, unknown token ids, and prompts that leave fewer than
        `room_to_generate` free positions in the context window (0 when only scoring)."""
        if self.closed:
            raise EngineClosedError("this model was closed; load it again to run requests")
        if not prompt:
            raise InvalidInputError("the prompt is empty: there is no token to start from")
        bad = [i for i in prompt if not 0 <= i < self.loaded.config.vocab_size]
        if bad:
            raise InvalidInputError(
                f"prompt token id {bad[0]} is outside the model's vocabulary "
                f"(0 .. {self.loaded.config.vocab_size - 1})"
            )
        longest = self.max_model_len - room_to_generate
        if len(prompt) > longest:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context window is "
                f"{self.max_model_len}; shorten it to at most {longest} tokens"
            )


def _speculator(
    loaded: LoadedModel, backend: Backend, config: EngineConfig, max_model_len: int, vocab: int
) -> Speculator | None:
    """The engine's speculation, with the proposer its method needs (None: none)."""
    spec = config.speculative
    if spec is None:
        return None
    if spec.method == "ngram":
        return Speculator(spec, NgramProposer(spec))
    from engine.draft_model import DraftProposer

    return Speculator(spec, DraftProposer(loaded, backend, config, max_model_len, vocab))
