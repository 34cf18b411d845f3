"""A request inside the engine: its sequences, and what happens to the logits they produce.

`SamplingGroup` serves ordinary requests, including n > 1 and best_of: the prompt is computed
once by a single sequence, which forks into best_of sequences at the first token, so all of
them share the prompt's KV blocks. `BeamSearchGroup` (engine/beam_search.py) is the other kind.
The scheduler only sees `live`, `finished` and the two hooks; the engine loop calls `process`
with the logits of the sequences whose pending tokens were all computed in a step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
from tokenizers import Tokenizer

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.errors import InvalidInputError
from engine.kv_cache import PagedKVCache
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling import Sampler, SamplingParams, token_logprob, top_logprobs
from engine.scheduler import Sequence
from engine.speculative import DraftLength, Speculator
from engine.structured import Guide, StructuredOutputs


@dataclass(frozen=True)
class GenerationContext:
    """What every request needs from the model, fixed for the engine's life."""

    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    max_model_len: int
    structured: StructuredOutputs
    speculator: Speculator | None = None


class SequenceGroup:
    """Base of the request kinds: the output, the live sequences and the arrival time."""

    def __init__(
        self, output: RequestOutput, params: SamplingParams, ctx: GenerationContext
    ) -> None:
        self.output = output
        self.params = params
        self.ctx = ctx
        self.arrival = time.perf_counter()
        prompt = output.prompt_token_ids
        self.live = [Sequence(prompt, len(prompt))]
        self.budget = min(params.max_tokens, ctx.max_model_len - len(prompt))
        self.stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            self.stop_ids.update(ctx.eos_token_ids)
        # The structured-output constraint's state before the first token (compiled here,
        # so a constraint llguidance refuses fails this request as it is submitted).
        self.guide = ctx.structured.guide(params, self.stop_ids)
        self._admitted_once = False
        output.metrics.prompt_tokens = len(prompt)
        # (sequence, k): sequences that want k proposals after this step's token.
        self.asks: list[tuple[Sequence, int]] = []

    @property
    def finished(self) -> bool:
        return self.output.finished

    @property
    def width(self) -> int:
        """Sequences this request runs at once after its prompt."""
        return self.params.best_of

    def check_fits(self, max_num_seqs: int) -> None:
        if self.width > max_num_seqs:
            raise InvalidInputError(
                f"best_of / n of {self.width} is more than max_num_seqs ({max_num_seqs})"
            )

    def on_admitted(self) -> None:
        if not self._admitted_once:
            self._admitted_once = True
            seq = self.live[0]
            self.output.metrics.cached_prompt_tokens = seq.computed

    def on_preempted(self) -> None:
        """The live sequences lost their cache and will be recomputed."""

    def process(self, ready: list[tuple[Sequence, np.ndarray]], cache: PagedKVCache) -> None:
        raise NotImplementedError

    def guides_to_fill(self, seq: Sequence) -> list[Guide]:
        """The guides that need a next-token mask once `seq`'s logits come (none unless the
        request is constrained)."""
        raise NotImplementedError

    def _record_step(self, new_tokens: int) -> None:
        self.output.metrics.record_step(time.perf_counter() - self.arrival, new_tokens)


class _Track:
    """One sampled completion: its sequence, sampler, detokenizer and stop-string matcher."""

    def __init__(
        self,
        seq: Sequence,
        completion: CompletionOutput,
        params: SamplingParams,
        ctx: GenerationContext,
        guide: Guide | None,
    ) -> None:
        self.seq = seq
        self.completion = completion
        self.guide = guide
        index = completion.index
        if index and params.seed is not None:
            params = replace(params, seed=params.seed + index)  # distinct, reproducible draws
        self.sampler = Sampler(params, ctx.vocab_size)
        spec = ctx.speculator
        self.draft_length = (
            None if spec is None else DraftLength(spec.config.num_speculative_tokens)
        )
        self.detok = IncrementalDetokenizer(
            ctx.tokenizer, seq.tokens[: seq.num_prompt], params.skip_special_tokens
        )
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)


class SamplingGroup(SequenceGroup):
    """Sampling (or greedy) requests with n completions chosen from best_of sequences."""

    def __init__(
        self, output: RequestOutput, params: SamplingParams, ctx: GenerationContext
    ) -> None:
        super().__init__(output, params, ctx)
        self._tracks: dict[int, _Track] = {}
        self._wants_logprob = params.best_of > params.n or params.logprobs is not None
        output.outputs = [CompletionOutput(i) for i in range(params.best_of)]

    def guides_to_fill(self, seq: Sequence) -> list[Guide]:
        if self.guide is None:
            return []
        if not self._tracks:  # the prompt: its mask serves every completion's first token
            return [self.guide]
        return [self._tracks[seq.seq_id].guide]

    def on_preempted(self) -> None:
        for seq in self.live:  # proposals are made again after the recomputation
            seq.drop_draft()

    def process(self, ready: list[tuple[Sequence, np.ndarray]], cache: PagedKVCache) -> None:
        new_tokens = 0
        for seq, logits in ready:
            if not self._tracks:
                self._fork(seq, cache)
                for track in list(self._tracks.values()):
                    new_tokens += self._take(track, logits, cache)
            else:
                new_tokens += self._take(self._tracks[seq.seq_id], logits, cache)
        self._record_step(new_tokens)
        if not self.live:
            self._choose_best()

    def _fork(self, first: Sequence, cache: PagedKVCache) -> None:
        """The prompt is computed; start the best_of sequences, sharing its blocks."""
        for _ in range(self.params.best_of - 1):
            self.live.append(first.fork(cache))
        for k, (seq, completion) in enumerate(zip(self.live, self.output.outputs, strict=True)):
            if self._wants_logprob:
                completion.cumulative_logprob = 0.0
            if self.params.logprobs is not None:
                completion.logprobs = []
            guide = self.guide if self.guide is None or k == 0 else self.guide.fork()
            self._tracks[seq.seq_id] = _Track(seq, completion, self.params, self.ctx, guide)

    def _take(self, track: _Track, logits: np.ndarray, cache: PagedKVCache) -> int:
        """Sample a sequence's next token (or check its proposals, one logits row each, and
        keep the accepted ones and the token after them), stream the text, end the sequence
        if it stops, else propose again; return how many tokens it gained."""
        seq = track.seq
        if not seq.draft:
            finished = self._append(track, logits, cache)
            gained = 1
        else:
            proposals = seq.tokens[len(seq.tokens) - seq.draft :]
            seq.drop_draft()
            start = len(seq.tokens)  # the K/V of tokens[:start] and of the proposals are in
            gained = accepted = 0
            for i, row in enumerate(logits):
                proposal = proposals[i] if i < len(proposals) else None
                if i and track.guide is not None:  # the guide has taken the accepted ones
                    self.ctx.structured.fill([track.guide], overlap=False)
                finished = self._append(track, row, cache)
                gained += 1
                if proposal is None or seq.tokens[-1] != proposal:
                    break
                accepted += 1
                if finished:
                    break
            track.draft_length.update(len(proposals), accepted)
            self.output.metrics.spec_proposed += len(proposals)
            self.output.metrics.spec_accepted += accepted
            self.output.metrics.spec_steps += 1
            if not finished:  # the rejected proposals' keys and values go
                cache.truncate(seq.seq_id, start + accepted)
                seq.computed = start + accepted
        if not finished:
            self._ask_proposals(track)
        return gained

    def _ask_proposals(self, track: _Track) -> None:
        """Ask for proposals after the token just sampled, when the engine speculates (the
        engine loop asks the proposer for every sequence of a step at once)."""
        speculator, seq = self.ctx.speculator, track.seq
        if speculator is None or not speculator.enabled or not track.draft_length.ready():
            return
        # A check of k proposals gives up to k + 1 tokens: no more than the request may take.
        k = min(track.draft_length.k, self.budget - len(track.completion.token_ids) - 1)
        if k > 0:
            self.asks.append((seq, k))

    def _append(self, track: _Track, logits: np.ndarray, cache: PagedKVCache) -> bool:
        """Sample one token from one row of logits, stream its text, and end the sequence if
        it stops; True when it ended."""
        seq, c = track.seq, track.completion
        token = track.sampler.sample(logits, self.output.prompt_token_ids, c.token_ids, track.guide)
        if self.params.logprobs is not None:
            chosen, top = top_logprobs(logits, token, self.params.logprobs, self.ctx.vocab_size)
            c.logprobs.append(TokenLogprob(token, chosen, top))
            c.cumulative_logprob += chosen
        elif self._wants_logprob:
            c.cumulative_logprob += token_logprob(logits, token, self.ctx.vocab_size)
        seq.tokens.append(token)
        c.token_ids.append(token)
        reason = None
        if token in self.stop_ids:
            reason, text = "stop", track.detok.flush()
        else:
            text = track.detok.push(token)
            if track.guide is not None and track.guide.advance(token):
                reason, text = "stop", text + track.detok.flush()  # the constraint is complete
            elif len(c.token_ids) >= self.budget:
                reason, text = "length", text + track.detok.flush()
        piece, hit_stop_string = track.stops.feed(text)
        if hit_stop_string:
            reason = "stop"
        elif reason is not None:
            piece += track.stops.flush()
        c.text += piece
        if reason is not None:
            c.finish_reason = reason
            cache.free(seq.seq_id)
            self.live.remove(seq)
        return reason is not None

    def _choose_best(self) -> None:
        """Keep the n completions with the highest cumulative log-probability."""
        n = self.params.n
        if self.params.best_of > n:
            ranked = sorted(self.output.outputs, key=lambda c: -c.cumulative_logprob)[:n]
            self.output.outputs = [replace(c, index=i) for i, c in enumerate(ranked)]
