"""`lamina serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.

Starlette routes the requests and uvicorn serves them; every request becomes one or more
requests of the single engine loop (engine/async_engine.py), so concurrent clients are batched
together rather than served one after another. Streams are server-sent events that end with
`data: [DONE]`; a client that disconnects is aborted before the next engine step, which frees
its KV blocks.

Errors follow OpenAI's shape, {"error": {"message", "type", "param", "code"}}: a 4xx status
for what the client can fix (its body, a `LaminaError` from the engine's checks), a 500
"server_error" with the traceback in the log for anything else (a bug), whether it is raised
by a handler or the engine ends the request with an internal error; after the headers of a
stream went out, the error is an SSE event before `data: [DONE]`. The server keeps serving
everyone else.

Lifecycle: `lamina serve` binds its port before loading the model (`listen`), so a port in
use fails at once. SIGINT or SIGTERM ends the requests in flight with an error (streams get
their error event and [DONE]), frees their KV blocks, stops the engine thread and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.api import LLM
from engine.async_engine import AsyncEngine, EngineStopped, RequestHandle, Update, updates
from engine.chat_tools import ChatTools
from engine.errors import ContextLengthError, EngineClosedError, LaminaError
from engine.loader.chat_template import check_template_kwargs
from engine.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LogprobFormatter,
    OpenAIError,
    finish_reason,
    new_id,
    now,
    usage,
)
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling import SamplingParams
from engine.text_input import invalid_text
from engine.tool_calls import ContentDelta, ToolCallDelta, ToolCallStream

log = logging.getLogger("lamina.server")

SHUTTING_DOWN = "the server is shutting down"
# After a shutdown signal, how long uvicorn waits for connections to close before it cancels
# them; the requests in flight end at once, so only a stuck client reaches it.
GRACEFUL_SHUTDOWN_S = 3


class OpenAIServer:
    """The routes, bound to one loaded model and its engine thread."""

    def __init__(self, llm: LLM, model_name: str, api_key: str | None = None) -> None:
        self.llm = llm
        self.model_name = model_name
        self.api_key = api_key
        self.engine = AsyncEngine(llm.engine_loop)
        self.logprobs = LogprobFormatter(llm.tokenizer)
        self.created = now()

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self._guarded(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._guarded(self.model), methods=["GET"]),
            Route("/v1/completions", self._guarded(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._guarded(self.chat), methods=["POST"]),
        ]
        handlers = {OpenAIError: _error_response, HTTPException: _http_error, 500: _server_error}

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            self.engine.shutdown()

        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)

    def _guarded(self, handler: Callable) -> Callable:
        """Check the bearer key; turn bad input into OpenAI-style 4xx errors, and anything
        else (a bug) into a 500 whose traceback goes to the log."""

        async def endpoint(request: Request) -> Response:
            self._authorize(request)
            try:
                return await handler(request)
            except OpenAIError:
                raise
            except ValidationError as error:
                raise OpenAIError(_validation_message(error)) from None
            except ContextLengthError as error:
                raise OpenAIError(str(error), code="context_length_exceeded") from None
            except EngineClosedError as error:
                raise OpenAIError(str(error), status=503, kind="server_error") from None
            except LaminaError as error:
                raise OpenAIError(str(error)) from None
            except EngineStopped:
                raise OpenAIError(SHUTTING_DOWN, status=503, kind="server_error") from None
            except Exception as error:
                log.exception("%s %s failed", request.method, request.url.path)
                raise _internal_error(error) from None

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.encode(), self.api_key.encode()
        ):
            raise OpenAIError(
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                status=401,
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "running_requests": self.engine.num_active})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self._card())

    def _card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "lamina",
            "max_model_len": self.llm.max_model_len,
        }

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise OpenAIError(
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    async def completions(self, request: Request) -> Response:
        body = CompletionRequest.model_validate(await _json_body(request))
        self._check_model(body.model)
        # Without max_tokens, generate up to the context window (the engine caps it there).
        params = body.params(self.llm.max_model_len)
        await self._compile(params)
        requests = [self.llm.new_request(prompt, params) for prompt in body.prompts()]
        run = _Run(self.engine, requests, body.stream)
        if body.stream:
            return _sse(self._completion_chunks(body, run), run)
        outputs = await run.finish(request)
        choices = []
        for i, output in enumerate(outputs):
            echo = self._prompt_text(output) if body.echo else ""
            for c in output.outputs:
                logprobs = None
                if c.logprobs is not None:
                    logprobs = self.logprobs.completion(c.logprobs, 0)
                choices.append(
                    {
                        "index": i * body.n + c.index,
                        "text": echo + c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
        result = {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(outputs),
        }
        return JSONResponse(result)

    async def _compile(self, params: SamplingParams) -> None:
        """Compile a structured-output constraint on a worker thread (the first one also
        builds llguidance's tokenizer, tenths of a second): the engine's submit then finds
        it compiled, and the event loop serves the other streams meanwhile."""
        structured = self.llm.engine_loop.ctx.structured
        await asyncio.to_thread(structured.guide, params, ())

    def _prompt_text(self, output: RequestOutput) -> str:
        """What `echo` repeats: the prompt as sent, or its token ids decoded."""
        if output.prompt is not None:
            return output.prompt
        return self.llm.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)

    async def _completion_chunks(
        self, body: CompletionRequest, run: _Run
    ) -> AsyncIterator[dict[str, Any]]:
        rid, created = new_id("cmpl"), now()
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        async for update in run.updates():
            output = run.outputs[update.tag]
            for d in update.deltas:
                index = update.tag * body.n + d.index
                text = d.text
                if body.echo and index not in echoed:
                    echoed.add(index)
                    text = self._prompt_text(output) + text
                logprobs = None
                if d.logprobs is not None:
                    logprobs = self.logprobs.completion(d.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(d.text)
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(d),
                }
                yield _chunk(rid, "text_completion", created, self.model_name, [choice])
        if body.include_usage:
            yield _chunk(rid, "text_completion", created, self.model_name, [], _usage(run.outputs))

    async def chat(self, request: Request) -> Response:
        body = ChatCompletionRequest.model_validate(await _json_body(request))
        self._check_model(body.model)
        kwargs = check_template_kwargs(body.chat_template_kwargs)  # before unpacking them
        tokenizer = self.llm.tokenizer
        tools = ChatTools.of(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer)
        params = body.params(self.llm.max_model_len)
        if tools is not None:
            kwargs = {**kwargs, **tools.template_kwargs()}
            params = tools.constrain(params, tokenizer)
        await self._compile(params)
        text, ids = self.llm.encode_chat(body.template_messages(), **kwargs)
        output, params = self.llm.new_request(ids, params)
        output.prompt = text
        run = _Run(self.engine, [(output, params)], body.stream)
        if body.stream:
            return _sse(self._chat_chunks(body, run, tools), run)
        (output,) = await run.finish(request)
        choices = []
        for c in output.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            reason = c.finish_reason
            if tools is not None:
                content, calls = tools.parse(c.text)
                if calls:
                    message = {"role": "assistant", "content": content,
                               "tool_calls": [call.to_openai() for call in calls]}  # fmt: skip
                    reason = "tool_calls"
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": None if c.logprobs is None else self.logprobs.chat(c.logprobs),
                    "finish_reason": reason,
                }
            )
        result = {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage([output]),
        }
        return JSONResponse(result)

    async def _chat_chunks(
        self, body: ChatCompletionRequest, run: _Run, tools: ChatTools | None
    ) -> AsyncIterator[dict[str, Any]]:
        """One chunk per engine delta; with tools, its text goes through each choice's
        tool-call parser, and calls come out as `delta.tool_calls` entries."""
        rid, created, kind = new_id("chatcmpl"), now(), "chat.completion.chunk"
        started: set[int] = set()
        parsers: dict[int, ToolCallStream] = {}
        called: set[int] = set()
        async for update in run.updates():
            for d in update.deltas:
                delta: dict[str, Any] = {}
                if d.index not in started:
                    started.add(d.index)
                    delta["role"] = "assistant"
                content, calls = d.text, []
                if tools is not None:
                    parser = parsers.setdefault(d.index, tools.stream())
                    events = parser.feed(d.text)
                    if d.finish_reason is not None:
                        events += parser.finish()
                    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
                    calls = [e.to_openai() for e in events if isinstance(e, ToolCallDelta)]
                if content or "role" in delta:
                    delta["content"] = content
                if calls:
                    delta["tool_calls"] = calls
                    called.add(d.index)
                reason = finish_reason(d)
                if reason is not None and d.index in called:
                    reason = "tool_calls"
                choice = {
                    "index": d.index,
                    "delta": delta,
                    "logprobs": None if d.logprobs is None else self.logprobs.chat(d.logprobs),
                    "finish_reason": reason,
                }
                yield _chunk(rid, kind, created, self.model_name, [choice])
        if body.include_usage:
            yield _chunk(rid, kind, created, self.model_name, [], _usage(run.outputs))


class _Run:
    """The engine requests behind one HTTP request, and their shared update queue."""

    def __init__(
        self, engine: AsyncEngine, requests: list[tuple[RequestOutput, Any]], stream: bool
    ) -> None:
        self.engine = engine
        self.outputs = [output for output, _ in requests]
        self.sink: asyncio.Queue[Update] = asyncio.Queue()
        self.handles: list[RequestHandle] = []
        try:
            for tag, (output, params) in enumerate(requests):
                self.handles.append(engine.submit(output, params, self.sink, tag, stream))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for handle in self.handles:
            self.engine.abort(handle)

    async def updates(self) -> AsyncIterator[Update]:
        """Every update until all requests finish; raises OpenAIError if the engine ended
        one with an error. Leaving early (a client that went away) aborts the rest."""
        try:
            async for update in updates(self.sink, len(self.handles)):
                if update.error is not None:
                    raise _engine_error(update)
                yield update
        finally:
            self.abort()

    async def finish(self, request: Request) -> list[RequestOutput]:
        """Wait for every request to finish, aborting them if the client disconnects."""

        async def drain() -> None:
            async for _ in self.updates():
                pass

        work = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self.abort()
        if work.cancelled():
            raise OpenAIError("the client disconnected", status=499)
        work.result()
        return self.outputs


async def _disconnected(request: Request) -> None:
    """Return once the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunks: AsyncIterator[dict[str, Any]], run: _Run) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`. An error after
    the headers went out is sent as an error event before [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except OpenAIError as error:
            yield f"data: {json.dumps(error.body)}\n\n"
        except Exception as error:
            log.exception("stream failed")
            yield f"data: {json.dumps(_internal_error(error).body)}\n\n"
        finally:
            run.abort()  # a no-op for finished requests; frees a disconnected client's blocks
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _chunk(
    rid: str,
    kind: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    chunk = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def _usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    """OpenAI's usage, plus lamina's `speculative` counts when tokens were proposed."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(o.metrics.generated_tokens for o in outputs)
    result: dict[str, Any] = usage(prompt, generated)
    if any(o.metrics.spec_proposed for o in outputs):
        m = [o.metrics for o in outputs]
        total = RequestMetrics(  # the request's sequences together
            spec_proposed=sum(x.spec_proposed for x in m),
            spec_accepted=sum(x.spec_accepted for x in m),
            spec_steps=sum(x.spec_steps for x in m),
            spec_draft_s=sum(x.spec_draft_s for x in m),
            total_s=sum(x.total_s - x.ttft_s for x in m),
        )
        result["speculative"] = total.speculative_dict()
    return result


def _engine_error(update: Update) -> OpenAIError:
    """The error of a request the engine ended: the engine thread logged a failure's
    traceback; a rejected request is the client's to fix (it does not fit the KV cache)."""
    message = update.error or ""
    if update.cause == "failed":
        return OpenAIError(message, status=500, kind="server_error")
    if update.cause == "stopped":
        return OpenAIError(message, status=503, kind="server_error")
    return OpenAIError(message)


def _internal_error(error: Exception) -> OpenAIError:
    return OpenAIError(f"internal server error: {error!r}", status=500, kind="server_error")


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OpenAIError(f"the request body is not valid JSON: {error}") from None
    bad = invalid_text(body)
    if bad is not None:
        # JSON escapes can spell lone surrogates ("\ud800"), which no tokenizer can encode.
        where = bad[0]
        raise OpenAIError(
            f"{where or 'the body'} is not valid Unicode: it contains a lone surrogate",
            param=where or None,
        )
    return body


def _validation_message(error: ValidationError) -> str:
    """pydantic's first complaint, phrased for an API user."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    if first["type"] == "missing":
        return f"missing required field {where!r}"
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


async def _error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, OpenAIError)
    return JSONResponse(error.body, status_code=error.status)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return await _error_response(request, OpenAIError(str(error.detail), status=error.status_code))


async def _server_error(request: Request, error: Exception) -> Response:
    log.exception("request failed", exc_info=error)
    return await _error_response(request, _internal_error(error))


def default_model_name(llm: LLM) -> str:
    """The name clients pass as `model`: the file's stem or the folder's name."""
    path = llm.loaded.path
    return path.stem if path.is_file() else path.name


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, to be handed to `serve`: bound before the model
    loads, so that a port in use fails at once, and kept, so that nothing takes the port in
    between. Raises LaminaError when the address cannot be used."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as error:
        raise LaminaError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as error:
        sock.close()
        in_use = error.errno == errno.EADDRINUSE
        hint = "; is another server running? choose another port" if in_use else ""
        raise LaminaError(f"cannot listen on {host}:{port}: {error.strerror}{hint}") from None
    return sock


class ShutdownServer(uvicorn.Server):
    """uvicorn, where SIGINT or SIGTERM also ends the requests in flight: uvicorn alone
    waits for every open stream to finish (forever, for a long one) before it stops."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            # The requests are ending already; uvicorn's "force quit" of a second Ctrl-C
            # would only skip the engine's cleanup and cancel the app mid-shutdown.
            return
        super().handle_exit(sig, frame)
        if self._loop is not None:
            # A signal handler may interrupt the event loop anywhere: stop from the loop.
            self._loop.call_soon_threadsafe(self._engine.stop, SHUTTING_DOWN)


def uvicorn_server(app: OpenAIServer, log_level: str = "info") -> ShutdownServer:
    """The HTTP server for `app`, to be run on a socket from `listen`."""
    config = uvicorn.Config(
        app.app(), log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    return ShutdownServer(config, app.engine)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """uvicorn raises the signal that stopped it again once it has shut down (to exit with
    the signal's status, or KeyboardInterrupt); a clean shutdown here exits 0 instead."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    llm: LLM,
    sock: socket.socket,
    api_key: str | None = None,
    model_name: str | None = None,
) -> None:
    """Serve on `sock` (from `listen`) until SIGINT or SIGTERM, then end the requests in
    flight, stop the engine thread and return."""
    app = OpenAIServer(llm, model_name or default_model_name(llm), api_key)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d/v1 (Ctrl-C to stop)", app.model_name, host, port)
    with _signals_ignored():
        uvicorn_server(app).run(sockets=[sock])
