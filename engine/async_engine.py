"""The engine loop on its own thread, for asyncio callers (the HTTP server).

One thread owns every forward pass (numba's thread pool is not re-entrant). asyncio handlers
never take the engine's lock: they hand requests and aborts to the thread through a queue,
and the thread, after each step, posts what every request gained (new text, tokens,
log-probabilities, finish reasons) to that request's asyncio queue. So a step over 32
sequences never blocks the event loop, and a client that goes away is aborted before the next
step, which frees its KV blocks.

A request ends with an error for one of three causes (`Update.cause`): the engine could not
run it ("rejected": it does not fit the KV cache), it failed inside the engine ("failed": a
bug, whether the loop ended it with finish_reason "error" or `step()` raised), or the engine
is stopping ("stopped"). The thread outlives a failed step: it logs the traceback, ends the
requests in flight and goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from engine.engine_loop import EngineLoop
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling import SamplingParams
from engine.sequence_group import SequenceGroup

log = logging.getLogger("lamina.engine")

Cause = Literal["rejected", "failed", "stopped"]


class EngineStopped(RuntimeError):
    """A request was submitted after `stop`."""


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
    """One step's news for one request: `done` once every completion finished, `error` (with
    its `cause`) when the request ended without a result."""

    tag: int
    deltas: list[CompletionDelta]
    done: bool
    error: str | None = None
    cause: Cause | None = None


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
        self.sink = sink
        # Set by the engine thread when it ends the request itself (a step that raised).
        self.failure: tuple[Cause, str] | None = None
        self._sent_text: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
        # A reply sent whole needs only the end; with best_of > n the winners are only
        # known at the end.
        self._streams = incremental and group.params.best_of == group.params.n

    @property
    def output(self) -> RequestOutput:
        return self.group.output

    def publish(self, outbox: list[tuple[RequestHandle, Update]]) -> bool:
        """Add what changed to `outbox` (engine thread only); True once the request is finished."""
        output = self.group.output
        done = output.finished or self.failure is not None
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
            cause, error = self.failure or _failure(output) or (None, None)
            outbox.append((self, Update(self.tag, deltas, done, error, cause)))
        return done


def _failure(output: RequestOutput) -> tuple[Cause, str] | None:
    """How the engine loop ended a request without a result, if it did."""
    if any(c.finish_reason == "error" for c in output.outputs):
        return "failed", output.error or "the request failed inside the engine"
    if output.error is not None:
        return "rejected", output.error
    return None


class AsyncEngine:
    """Runs an EngineLoop on a daemon thread; `submit`, `abort` and `stop` are safe from
    asyncio."""

    def __init__(self, engine: EngineLoop) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, RequestHandle] = {}  # engine thread only
        # Submitted and not yet delivered as done; `stop` ends them without the thread.
        self._submitted: set[RequestHandle] = set()
        self._stopped = False
        self._lock = threading.Lock()
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
        """Check a request (raises on bad input, EngineStopped after `stop`) and queue it; its
        updates arrive on `sink` as `Update`s carrying `tag`, after every step that adds
        text when `incremental`, else once when it finishes."""
        group = self.engine.new_group(output, params)
        handle = RequestHandle(group, sink, asyncio.get_running_loop(), tag, incremental)
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine is stopping")
            self._submitted.add(handle)
            self._inbox.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request; the engine thread frees its sequences before its next step."""
        self._inbox.put(("abort", handle))

    def stop(self, message: str) -> None:
        """End every request in flight now with `message` (cause "stopped") and refuse new
        ones; the thread frees their KV blocks and exits after its current step. The updates
        are sent from here, not by the thread, so that a long step does not hold them up."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            handles = list(self._submitted)
            self._submitted.clear()
            self._inbox.put(("stop", None))
        for handle in handles:
            update = Update(handle.tag, [], True, message, "stopped")
            handle.loop.call_soon_threadsafe(handle.sink.put_nowait, update)

    def shutdown(self) -> None:
        """Stop (if not stopped yet) and wait for the thread to exit."""
        self.stop("the engine was shut down")
        self._thread.join()

    @property
    def num_active(self) -> int:
        return len(self._active)

    def _run(self) -> None:
        while True:
            try:
                # Sleep on the inbox when idle; otherwise take what came in and step.
                if not self._handle_inbox(block=not self._active):
                    break
                if self._active:
                    self.engine.step()
            except Exception as error:
                # A bug, not bad input. The requests in flight may have lost their state, so
                # they end; the next ones get a fresh start (and an idle thread sleeps).
                log.exception("engine step failed; ending %d requests", len(self._active))
                self._fail_all(f"internal error in the engine: {error!r}")
            self._publish(list(self._active.values()))
        for handle in self._active.values():  # `stop` has told their clients already
            self._abort(handle)
        self._active.clear()

    def _fail_all(self, message: str) -> None:
        for handle in self._active.values():
            handle.failure = ("failed", message)
            self._abort(handle)

    def _abort(self, handle: RequestHandle) -> None:
        try:
            self.engine.abort(handle.group)
        except Exception:
            log.exception("could not abort request %s", handle.output.request_id)

    def _publish(self, handles: list[RequestHandle]) -> None:
        """Send the handles' news, one wake-up per event loop rather than one per request:
        on 2 cores every wake-up of the server's thread slows the next step's kernels."""
        outboxes: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Update]]] = {}
        for handle in handles:
            if handle.publish(outboxes.setdefault(handle.loop, [])):
                self._active.pop(id(handle), None)
        for loop, outbox in outboxes.items():
            if outbox:
                loop.call_soon_threadsafe(self._deliver, outbox)

    def _deliver(self, outbox: list[tuple[RequestHandle, Update]]) -> None:
        for handle, update in outbox:
            if update.done:
                with self._lock:
                    self._submitted.discard(handle)
            handle.sink.put_nowait(update)

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
                self._active[id(handle)] = handle
                self.engine.add(handle.group)
            elif id(handle) in self._active:
                self.engine.abort(handle.group)
                self._publish([handle])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True


async def updates(sink: asyncio.Queue, count: int) -> AsyncIterator[Update]:
    """Yield updates from `sink` until `count` requests are done."""
    remaining = count
    while remaining:
        update = await sink.get()
        remaining -= update.done
        yield update
