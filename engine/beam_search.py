"""Beam search as a request kind: `SamplingParams(use_beam_search=True, best_of=W, n=N)`.

Each step every live beam proposes its 2W most likely next tokens; the W best candidates by
cumulative log-probability become the next beams. A candidate ending in a stop token among the
W best becomes a finished hypothesis. New beams fork their parent in the KV cache, so beams
share every block they have in common and only a partly filled last block is ever copied.
The search ends when the max_tokens limit is reached or when W hypotheses are finished and no
live beam scores better than the worst of them (scores are cumulative log-probability divided
by generated length ** length_penalty). The N best hypotheses are returned.
"""

from __future__ import annotations

import numpy as np

from engine.kv_cache import PagedKVCache
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling import SamplingParams, log_softmax
from engine.scheduler import Sequence
from engine.sequence_group import GenerationContext, SequenceGroup
from engine.structured import Guide


class BeamSearchGroup(SequenceGroup):
    def __init__(
        self, output: RequestOutput, params: SamplingParams, ctx: GenerationContext
    ) -> None:
        super().__init__(output, params, ctx)
        self._pending: dict[int, np.ndarray] = {}
        # (generated tokens, cumulative logprob, finish reason) of finished hypotheses
        self._hypotheses: list[tuple[list[int], float, str]] = []
        # Each live beam's place in a structured-output constraint, by sequence id.
        self._guides: dict[int, Guide] = {} if self.guide is None else {
            self.live[0].seq_id: self.guide
        }  # fmt: skip

    def guides_to_fill(self, seq: Sequence) -> list[Guide]:
        guide = self._guides.get(seq.seq_id)
        return [] if guide is None else [guide]

    def on_preempted(self) -> None:
        self._pending.clear()

    def process(self, ready: list[tuple[Sequence, np.ndarray]], cache: PagedKVCache) -> None:
        for seq, logits in ready:
            # A copy: the runner's logits are valid until its next pass, and after a
            # preemption the beams may finish recomputing in different steps.
            self._pending[seq.seq_id] = np.array(logits)
        if any(seq.seq_id not in self._pending for seq in self.live):
            return  # after a preemption the beams may finish recomputing in different steps
        chosen = self._step_candidates()
        children, guides = [], {}
        for score, parent, token, guide in chosen:
            children.append(self._extend(parent, token, score, cache))
            if guide is not None:
                guides[children[-1].seq_id] = guide
        for seq in self.live:
            cache.free(seq.seq_id)
        self.live, self._guides = children, guides
        self._pending.clear()
        self._record_step(len(chosen) or 1)
        if not self.live:
            self._finish()

    def _step_candidates(self) -> list[tuple[float, Sequence, int, Guide | None]]:
        """The next beams (with their constraint's state after the token); finished
        hypotheses (a stop token, or a constraint made complete) go to `_hypotheses`."""
        width = self.params.best_of
        candidates = []
        for order, seq in enumerate(self.live):
            logits, guide = self._pending[seq.seq_id], self._guides.get(seq.seq_id)
            if guide is not None:
                logits = guide.apply(logits, self.ctx.vocab_size)
            logprobs = log_softmax(logits, self.ctx.vocab_size)
            k = min(2 * width, len(logprobs))
            for token in np.argpartition(-logprobs, k - 1)[:k]:
                if logprobs[token] == -np.inf:  # disallowed by the constraint
                    continue
                score = seq.cumulative_logprob + float(logprobs[token])
                candidates.append((score, order, int(token), seq))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))  # ties broken deterministically
        chosen = []
        for rank, (score, _, token, seq) in enumerate(candidates):
            finished = token in self.stop_ids
            guide = self._guides.get(seq.seq_id)
            if guide is not None and not finished:
                guide = guide.fork()
                finished = guide.advance(token)  # the constraint is complete: as a stop token
            if finished:
                if rank < width:
                    self._hypotheses.append((seq.generated + [token], score, "stop"))
                continue
            chosen.append((score, seq, token, guide))
            if len(chosen) == width:
                break
        length = len(self.live[0].generated) + 1
        if length >= self.budget:
            self._hypotheses += [(s.generated + [t], score, "length") for score, s, t, _ in chosen]
            return []
        if self._done(chosen, length):
            return []
        return chosen

    def _done(self, chosen: list[tuple[float, Sequence, int, Guide | None]], length: int) -> bool:
        width = self.params.best_of
        if len(self._hypotheses) < width or not chosen:
            return not chosen
        worst_kept = sorted(self._scores(), reverse=True)[width - 1]
        best_live = max(c[0] for c in chosen) / length**self.params.length_penalty
        return best_live <= worst_kept

    def _scores(self) -> list[float]:
        lp = self.params.length_penalty
        return [cum / max(len(tokens), 1) ** lp for tokens, cum, _ in self._hypotheses]

    def _extend(self, parent: Sequence, token: int, score: float, cache: PagedKVCache) -> Sequence:
        child = parent.fork(cache)
        child.tokens.append(token)
        child.cumulative_logprob = score
        return child

    def _finish(self) -> None:
        scores = self._scores()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: self.params.n]
        skip = self.params.skip_special_tokens
        self.output.outputs = [
            CompletionOutput(
                index=i,
                text=self.ctx.tokenizer.decode(self._hypotheses[h][0], skip_special_tokens=skip),
                token_ids=self._hypotheses[h][0],
                finish_reason=self._hypotheses[h][2],
                cumulative_logprob=self._hypotheses[h][1],
            )
            for i, h in enumerate(order)
        ]
