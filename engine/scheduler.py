"""Continuous batching: which sequences run in the next forward pass, with how many tokens.

Every step the scheduler builds one batch from three sources, in this order:

1. decode steps (one token) of every running sequence, so generation never stalls;
2. the next chunk of every prompt still being prefilled, within a token budget per step
   (chunked prefill: a long prompt takes several steps instead of freezing everyone else);
3. waiting requests, first come first served, while the token budget, `max_num_seqs` and the
   free KV blocks allow. A request is admitted only when the blocks for its whole prompt are
   free, so that its prefill cannot be cut short.

When the running sequences need more blocks than are free, the newest request is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed from its
tokens later (prefix caching usually hands its prompt blocks straight back). This is vLLM's
recompute policy; swapping blocks out to RAM buys nothing on a CPU, where the cache already is
in RAM.

A request is a `SequenceGroup` (see engine/sequence_group.py): one or more sequences that are
scheduled, preempted and finished together, so beams or parallel samples stay in step.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.engine_config import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from engine.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from engine.sequence_group import SequenceGroup

# Share of the blocks kept free at admission, so newly admitted prompts don't force an
# immediate preemption when the running sequences grow by one block.
WATERMARK = 0.01

_sequence_ids = itertools.count()


class Sequence:
    """One token stream in the KV cache: its prompt, what it generated, and what is computed.

    tokens[:computed] have their keys and values in the cache; the rest (the prompt at first,
    then the last sampled token) go into the next forward passes. The last `draft` tokens,
    when there are any, are speculative proposals (engine/speculative.py): computed in one
    chunk with the sampled token before them, and verified from that chunk's logits.
    """

    def __init__(self, tokens: list[int], num_prompt: int) -> None:
        self.seq_id = next(_sequence_ids)
        self.tokens = list(tokens)
        self.num_prompt = num_prompt
        self.computed = 0
        self.cumulative_logprob = 0.0
        self.draft = 0

    def drop_draft(self) -> None:
        """Forget the proposals not yet computed (the step has no room, or a preemption)."""
        if self.draft:
            del self.tokens[len(self.tokens) - self.draft :]
            self.draft = 0

    @property
    def uncomputed(self) -> int:
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    def fork(self, cache: PagedKVCache) -> Sequence:
        """A copy that shares this sequence's cached blocks (copy-on-write)."""
        child = Sequence(self.tokens, self.num_prompt)
        child.computed = self.computed
        child.cumulative_logprob = self.cumulative_logprob
        cache.fork(self.seq_id, child.seq_id)
        return child


@dataclass
class StepPlan:
    """One step's work: (sequence, number of new tokens) chunks, and the request of each
    sequence. Blocks are not taken yet: the runner reserves them all at once."""

    chunks: list[tuple[Sequence, int]]
    owner: dict[int, SequenceGroup]

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def groups(self) -> list[SequenceGroup]:
        """The requests with a chunk in this step, each once, in plan order."""
        return list({id(g): g for g in (self.owner[s.seq_id] for s, _ in self.chunks)}.values())


class Scheduler:
    """Waiting and running requests, and the plan of each forward pass."""

    def __init__(
        self,
        cache: PagedKVCache,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        enable_prefix_caching: bool = True,
    ) -> None:
        """The sizes come checked from EngineConfig."""
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.num_preemptions = 0
        self._watermark = max(1, int(WATERMARK * cache.allocator.num_blocks))

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, group: SequenceGroup, error: str | None = None) -> None:
        """Drop a request wherever it is and free its blocks at once."""
        self._drop(group)
        group.output.abort(error)

    def fail(self, group: SequenceGroup, error: str) -> None:
        """End a request that failed inside the engine (finish reason "error")."""
        self._drop(group)
        group.output.fail(error)

    def _drop(self, group: SequenceGroup) -> None:
        if group in self.running:
            self.running.remove(group)
            self._release(group)
        elif group in self.waiting:
            self.waiting.remove(group)

    def remove_finished(self) -> None:
        self.running = [g for g in self.running if not g.finished]

    def schedule(self) -> StepPlan:
        """The chunks of the next forward pass."""
        plan = self._plan_running()
        while self._blocks_needed(plan) > self.cache.allocator.num_free:
            victim = self.running[-1]
            plan = [(s, n) for s, n in plan if s not in victim.live]
            self._preempt(victim)
        self._admit(plan)
        owner = {seq.seq_id: g for g in self.running for seq in g.live}
        return StepPlan(plan, owner)

    def _plan_running(self) -> list[tuple[Sequence, int]]:
        """Decoding sequences first, each with its proposals whole (their logits are all
        needed in one pass) while the token budget leaves every decoding sequence its
        token; then prefill chunks with what is left."""
        budget = self.max_num_batched_tokens
        decoding = [s for g in self.running for s in g.live if s.uncomputed == 1 + s.draft]
        spare = budget - len(decoding)
        plan = []
        for seq in decoding:
            if seq.draft > spare:
                seq.drop_draft()
            spare -= seq.draft
            plan.append((seq, seq.uncomputed))
            budget -= seq.uncomputed
        for group in self.running:
            for seq in group.live:
                if seq.uncomputed > 1 + seq.draft and budget > 0:
                    plan.append((seq, min(seq.uncomputed, budget)))
                    budget -= plan[-1][1]
        return plan

    def _blocks_needed(self, plan: list[tuple[Sequence, int]]) -> int:
        return sum(self.cache.blocks_needed(seq.seq_id, n) for seq, n in plan)

    def _admit(self, plan: list[tuple[Sequence, int]]) -> None:
        """Move waiting requests to running while tokens, sequences and blocks allow."""
        budget = self.max_num_batched_tokens - sum(n for _, n in plan)
        claimed = self._blocks_needed(plan)
        num_seqs = sum(len(g.live) for g in self.running)
        while self.waiting and budget > 0:
            group = self.waiting[0]
            if num_seqs + len(group.live) > self.max_num_seqs:
                return
            for seq in group.live:
                tokens = seq.tokens if self.enable_prefix_caching else []
                seq.computed = self.cache.add_sequence(seq.seq_id, tokens)
            need = sum(self.cache.blocks_needed(s.seq_id, s.uncomputed) for s in group.live)
            if claimed + need + self._watermark > self.cache.allocator.num_free:
                self._release(group)
                if not self.running and not plan:
                    self.waiting.popleft()
                    group.output.abort(
                        f"the request needs {need} KV blocks but the cache has "
                        f"{self.cache.allocator.num_blocks}; raise the KV cache budget"
                    )
                    continue
                return
            self.waiting.popleft()
            self.running.append(group)
            group.on_admitted()
            claimed += need
            num_seqs += len(group.live)
            for seq in group.live:
                n = min(seq.uncomputed, budget)
                if n:
                    plan.append((seq, n))
                    budget -= n

    def _preempt(self, group: SequenceGroup) -> None:
        """Free a running request's blocks and queue it first, to be recomputed."""
        self.running.remove(group)
        self._release(group)
        if not self.running:
            # Alone and still short of blocks: waiting would only repeat this.
            group.output.abort("the KV cache is too small for this request; raise its budget")
            return
        self.num_preemptions += 1
        group.on_preempted()
        self.waiting.appendleft(group)

    def _release(self, group: SequenceGroup) -> None:
        for seq in group.live:
            if seq.seq_id in self.cache:  # a request that failed may have freed it already
                self.cache.free(seq.seq_id)
            seq.computed = 0
