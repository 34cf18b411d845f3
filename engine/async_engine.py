"""The engine loop on its own thread, for asyncio callers (the HTTP server).

One thread owns every forward pass (numba's thread pool is not re-entrant). asyncio handlers
never take the engine's lock: they hand requests and aborts to the thread through a queue,
and the thread, after each step, posts what every request gained (new text, tokens,
log-probabilities, finish reasons) to that request's asyncio queue. So a step over 32
sequences never blocks the event loop, and a client that goes away is aborted before the next
step, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.engine_loop import EngineLoop
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling import SamplingParams
from engine.sequence_group import SequenceGroup

log = logging.getLogger("lamina.engine")


@dataclass(frozen=True)
class CompletionDelta:
    """What one completion gained since the last update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


@dataclass(frozen=True)
class Update:
    """One step's news for one request: `done` once every completion finished."""

    tag: int
    deltas: list[CompletionDelta]
    done: bool
    error: str | None


class RequestHandle:
    """A request in flight: the engine thread publishes its updates to an asyncio queue."""

    def __init__(
        self,
        group: SequenceGroup,
        sink: asyncio.Queue,
        loop: asyncio.AbstractEventLoop,
        tag: int,
        incremental: bool,
    ) -> None:
        self.group = group
        self.tag = tag
        self.loop = loop
        self._sink = sink
        self._sent_text: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
        # A reply sent whole needs only the end; with best_of > n the winners are only
        # known at the end.
        self._streams = incremental and group.params.best_of == group.params.n

    @property
    def output(self) -> RequestOutput:
        return self.group.output

    def publish(self, outbox: list[tuple[asyncio.Queue, Update]]) -> bool:
        """Add what changed to `outbox` (engine thread only); True once the request is finished."""
        output = self.group.output
        done = output.finished
        deltas = []
        if self._streams or done:
            for c in output.outputs:
                text_at = self._sent_text.get(c.index, 0)
                token_at = self._sent_tokens.get(c.index, 0)
                if len(c.text) == text_at and len(c.token_ids) == token_at and not done:
                    continue
                self._sent_text[c.index] = len(c.text)
                self._sent_tokens[c.index] = len(c.token_ids)
                logprobs = None if c.logprobs is None else c.logprobs[token_at:]
                deltas.append(
                    CompletionDelta(
                        c.index,
                        c.text[text_at:],
                        c.token_ids[token_at:],
                        logprobs,
                        c.finish_reason,
                    )
                )
        if deltas or done:
            outbox.append((self._sink, Update(self.tag, deltas, done, output.error)))
        return done


class AsyncEngine:
    """Runs an EngineLoop on a daemon thread; `submit` and `abort` are safe from asyncio."""

    def __init__(self, engine: EngineLoop) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, RequestHandle] = {}
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        output: RequestOutput,
        params: SamplingParams,
        sink: asyncio.Queue,
        tag: int = 0,
        incremental: bool = True,
    ) -> RequestHandle:
        """Check a request (raises ValueError/LaminaError on bad input) and queue it; its
        updates arrive on `sink` as `Update`s carrying `tag`, after every step that adds
        text when `incremental`, else once when it finishes."""
        group = self.engine.new_group(output, params)
        handle = RequestHandle(group, sink, asyncio.get_running_loop(), tag, incremental)
        self._inbox.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request; the engine thread frees its sequences before its next step."""
        self._inbox.put(("abort", handle))

    def shutdown(self) -> None:
        """Abort everything in flight and stop the thread."""
        self._inbox.put(("stop", None))
        self._thread.join()

    @property
    def num_active(self) -> int:
        return len(self._active)

    def _run(self) -> None:
        while True:
            # Sleep on the inbox when idle; otherwise take what came in and step.
            if not self._handle_inbox(block=not self._active):
                break
            if not self._active:
                continue
            try:
                self.engine.step()
            except Exception:  # the step already aborted the requests of the failed pass
                log.exception("forward pass failed")
            self._publish(list(self._active.values()))
        for handle in self._active.values():
            self.engine.abort(handle.group)
        self._publish(list(self._active.values()))

    def _publish(self, handles: list[RequestHandle]) -> None:
        """Send the handles' news, one wake-up per event loop rather than one per request:
        on 2 cores every wake-up of the server's thread slows the next step's kernels."""
        outboxes: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Update]]] = {}
        for handle in handles:
            if handle.publish(outboxes.setdefault(handle.loop, [])):
                self._active.pop(id(handle), None)
        for loop, outbox in outboxes.items():
            if outbox:
                loop.call_soon_threadsafe(_deliver, outbox)

    def _handle_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False when asked to stop."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            kind, handle = item
            if kind == "stop":
                return False
            if kind == "add":
                self.engine.add(handle.group)
                self._active[id(handle)] = handle
            elif id(handle) in self._active:
                self.engine.abort(handle.group)
                self._publish([handle])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True


def _deliver(outbox: list[tuple[asyncio.Queue, Update]]) -> None:
    for sink, update in outbox:
        sink.put_nowait(update)


async def updates(sink: asyncio.Queue, count: int) -> AsyncIterator[Update]:
    """Yield updates from `sink` until `count` requests are done."""
    remaining = count
    while remaining:
        update = await sink.get()
        remaining -= update.done
        yield update
