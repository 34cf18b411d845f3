"""The OpenAI-compatible server, driven by the real `openai` client and raw HTTP.

References come from `llm.generate` on the same model (int8 outputs do not depend on how
requests are batched). The server runs in-process on a free loopback port, so the tests can
look at the engine's scheduler and KV cache while it serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, InternalServerError, NotFoundError, OpenAI

from engine import SamplingParams
from engine.api import LLM
from engine.sequence_group import SamplingGroup
from engine.server import OpenAIServer, listen, uvicorn_server

API_KEY = "test-key"
MAX_MODEL_LEN = 256
PROMPTS = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(32)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(quant="int8", max_model_len=MAX_MODEL_LEN, max_num_seqs=32, kv_cache_mb=64)


@pytest.fixture(scope="module")
def server(llm: LLM):
    app = OpenAIServer(llm, "smollm2", API_KEY)
    sock = listen("127.0.0.1", 0)
    uv = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_for(lambda: uv.started, "the server did not start")
    app.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield app
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server: OpenAIServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def _wait_for(condition, message: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def _greedy(llm: LLM, prompts, max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [out.text for out in llm.generate(prompts, params)]


def _idle(server: OpenAIServer, timeout: float = 20.0) -> None:
    """Wait until the engine holds no request and no KV block."""
    cache = server.llm.engine_loop.cache
    _wait_for(
        lambda: not server.engine.num_active and not cache.usage()[1],
        "requests or KV blocks were not released",
        timeout,
    )


def test_models_and_health(server: OpenAIServer, client: OpenAI):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    health = httpx.get(f"{server.base_url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_matches_generate(llm: LLM, client: OpenAI):
    prompt = "The capital of France is"
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == _greedy(llm, prompt, 12)[0]
    assert reply.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].finish_reason == "length"


def test_chat_matches_llm_chat(llm: LLM, client: OpenAI):
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=16, temperature=0
    )
    expected = llm.chat(messages, SamplingParams(max_tokens=16, temperature=0))
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streams_concatenate_to_the_full_reply(llm: LLM, client: OpenAI):
    prompt = "Once upon a time"
    expected = _greedy(llm, prompt, 20)[0]
    stream = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected

    messages = [{"role": "user", "content": "Count to five."}]
    reference = llm.chat(messages, SamplingParams(max_tokens=20, temperature=0)).text
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_sse_wire_format_ends_with_done(server: OpenAIServer):
    body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers)
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [line for line in reply.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_sampling_fields_n_seed_stop_logprobs(llm: LLM, client: OpenAI):
    fields = {"model": "smollm2", "prompt": "My favourite fruit is", "max_tokens": 10}
    extensions = {"top_k": 40, "min_p": 0.05}  # vLLM's extra fields
    a = client.completions.create(**fields, n=3, temperature=1.0, seed=7, extra_body=extensions)
    b = client.completions.create(**fields, n=3, temperature=1.0, seed=7, extra_body=extensions)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]

    full = _greedy(llm, "My favourite fruit is", 10)[0]
    stop = full.strip().split()[1]
    cut = client.completions.create(**fields, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    scored = client.completions.create(**fields, temperature=0, logprobs=3)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == scored.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely
        assert chosen <= 0


def test_echo_repeats_text_and_token_id_prompts(llm: LLM, client: OpenAI):
    ids = llm.tokenizer.encode("The capital of France is")
    expected = llm.tokenizer.decode(ids, skip_special_tokens=False) + _greedy(llm, ids, 4)[0]
    reply = client.completions.create(
        model="smollm2", prompt=ids, max_tokens=4, temperature=0, echo=True
    )
    assert reply.choices[0].text == expected
    stream = client.completions.create(
        model="smollm2", prompt=ids, max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


def test_logit_bias_bans_a_token(llm: LLM, client: OpenAI):
    prompt = "The capital of France is"
    greedy = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    banned = {str(greedy[0]): -100, str(greedy[1]): -100}
    reply = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=6, temperature=0, logit_bias=banned, logprobs=0
    )
    ids = [
        llm.tokenizer.encode(t, add_special_tokens=False) for t in reply.choices[0].logprobs.tokens
    ]
    assert reply.choices[0].text != llm.tokenizer.decode(greedy)
    assert not {greedy[0], greedy[1]} & {i for piece in ids for i in piece}


def test_32_concurrent_streams_are_batched_and_correct(llm: LLM, server: OpenAIServer):
    expected = _greedy(llm, PROMPTS, 16)
    loop = llm.engine_loop
    widest = []
    step = loop.step

    def recording_step() -> None:
        widest.append(len(loop.scheduler.running))
        step()

    async def one(client: AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def everyone() -> list[str]:
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    loop.step = recording_step
    try:
        texts = asyncio.run(everyone())
    finally:
        del loop.step
    assert texts == expected
    assert max(widest) >= 8  # served together, not one after another
    _idle(server)


def test_disconnect_mid_stream_frees_its_blocks(server: OpenAIServer):
    _idle(server)
    body = {
        "model": "smollm2",
        "prompt": "Write a very long story about a lighthouse keeper.",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=body, headers=headers
    ) as reply:
        lines = reply.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        (handle,) = list(server.engine._active.values())
        assert server.llm.engine_loop.cache.usage()[1] > 0
    _idle(server)  # closing the connection aborted the request and freed every block
    assert handle.output.finish_reason == "abort"
    assert len(handle.output.token_ids) < 200


BAD_REQUESTS = [
    ("not json at all {", 400, None),
    ({"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "frobnicate": 1}, 400, None),
    ({"model": "gpt-17", "prompt": "Hi"}, 404, "model_not_found"),
    ({"model": "smollm2", "prompt": "word " * 400}, 400, "context_length_exceeded"),
    ({"model": "smollm2", "prompt": "Hi", "temperature": -1}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "top_p": 2}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "max_tokens": 0}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "n": 0}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "logprobs": 99}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "presence_penalty": 5}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "stop": 3}, 400, None),
    ({"model": "smollm2", "prompt": ""}, 400, None),
    ({"model": "smollm2", "prompt": ["Hi", ""]}, 400, None),
    ({"model": "smollm2", "prompt": [[5], []]}, 400, None),
    ({"model": "smollm2", "prompt": [99999999]}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "logit_bias": {"abc": 1}}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "logit_bias": {"5": 500}}, 400, None),
    ({"model": "smollm2", "prompt": "Hi", "logit_bias": {"99999999": 1}}, 400, None),
    ({"prompt": "Hi"}, 400, None),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(
    server: OpenAIServer, client: OpenAI, body, status: int, code: str | None
):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    reply = httpx.post(f"{server.base_url}/v1/completions", content=content, headers=headers)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    ok = client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_chat_refuses_what_it_cannot_do(client: OpenAI):
    messages = [{"role": "user", "content": "Hi"}]
    # SmolLM2's template writes no tool calls: lamina would not know how to read them.
    with pytest.raises(BadRequestError, match="tool-call syntax"):
        client.chat.completions.create(
            model="smollm2",
            messages=messages,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[])
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=0)
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="other", messages=messages)


def test_api_key_is_required_on_v1_routes(server: OpenAIServer):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        reply = httpx.get(f"{server.base_url}/v1/models", headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_cli_serves_on_loopback_with_a_key():
    port = _free_port()
    command = [sys.executable, "-m", "engine.cli", "serve", "--quant", "int8", "--port", str(port)]
    command += ["--api-key", "k", "--max-model-len", "128", "--kv-cache-mb", "16"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ}
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "lamina serve did not come up"
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(url, json=body).status_code == 401
        # no read timeout: the first request may compile kernels on a loaded machine
        reply = httpx.post(url, json=body, headers={"Authorization": "Bearer k"}, timeout=None)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def _post(server: OpenAIServer, path: str, content: str | dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = content if isinstance(content, str) else json.dumps(content)
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=120)


def _events(reply: httpx.Response) -> list[str]:
    return [line[6:] for line in reply.text.split("\n\n") if line.startswith("data: ")]


def test_empty_prompt_is_not_a_context_length_error(server: OpenAIServer):
    for prompt in ("", [], ["Hi", ""], [[]]):
        reply = _post(server, "/v1/completions", {"model": "smollm2", "prompt": prompt})
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "prompt" and error["code"] is None
        assert "empty" in error["message"]


def test_lone_surrogate_is_a_400_and_the_next_request_works(server: OpenAIServer, client):
    # A JSON escape for half of a UTF-16 pair: valid JSON, but no valid Unicode string.
    bodies = [
        ("/v1/completions", '{"model": "smollm2", "prompt": "a\\ud800b", "max_tokens": 2}'),
        (
            "/v1/chat/completions",
            json.dumps(
                {"model": "smollm2", "messages": [{"role": "user", "content": "x"}]}
            ).replace('"x"', '"\\udfff"'),
        ),
    ]
    for path, body in bodies:
        reply = _post(server, path, body)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and "Unicode" in error["message"]
        assert error["param"] in ("prompt", "messages.0.content")
        ok = client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        assert ok.usage.completion_tokens == 2
    # A valid pair written as two escapes is one character, and fine.
    pair = '{"model": "smollm2", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'
    assert _post(server, "/v1/completions", pair).status_code == 200


def test_openai_sdk_fields_that_cannot_change_the_answer_are_accepted(llm: LLM, client: OpenAI):
    messages = [{"role": "user", "content": "Name a colour."}]
    expected = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0)).text
    harmless = {
        "store": False,
        "user": "user-1",
        "metadata": {"team": "a"},
        "service_tier": "auto",
        "parallel_tool_calls": False,
        "prediction": {"type": "content", "content": "Blue"},
        "reasoning_effort": "low",
        "modalities": ["text"],
        "verbosity": "medium",
        "safety_identifier": "hash",
        "prompt_cache_key": "k",
        # Tools the model may not call: as if there were none.
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "none",
    }
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, temperature=0, **harmless
    )
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        **harmless,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    completion = client.completions.create(
        model="smollm2", prompt="Hi", max_tokens=2, user="user-1", extra_body={"store": False}
    )
    assert completion.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("web_search_options", {}),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("verbosity", "low"),
        ("moderation", {"model": "omni-moderation-latest"}),
        ("functions", [{"name": "f", "parameters": {}}]),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(client: OpenAI, field: str, value):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(BadRequestError, match="not supported") as refused:
        client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=2, extra_body={field: value}
        )
    assert refused.value.body["param"].startswith(field.split("_")[0])


def test_model_card_by_id(server: OpenAIServer, client: OpenAI):
    card = client.models.retrieve("smollm2")
    assert card.id == "smollm2" and card.object == "model"
    for unknown in ("gpt-17", "org/model"):
        with pytest.raises(NotFoundError) as missing:
            client.models.retrieve(unknown)
        assert missing.value.body["code"] == "model_not_found"


def test_a_bug_in_a_handler_is_a_500_with_a_logged_traceback(
    llm: LLM, client: OpenAI, monkeypatch, caplog
):
    """A plain ValueError from lamina's own code is a bug, not bad input."""
    encode_chat = llm.encode_chat

    def broken(messages, **kwargs):
        if messages[0]["content"] == "break":
            raise ValueError("a bug")
        return encode_chat(messages, **kwargs)

    monkeypatch.setattr(llm, "encode_chat", broken)
    with (
        caplog.at_level(logging.ERROR, logger="lamina.server"),
        pytest.raises(InternalServerError) as failed,
    ):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "break"}]
        )
    assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
    ok = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert ok.usage.completion_tokens == 2


def test_a_request_failing_in_the_engine_ends_alone(
    llm: LLM, server: OpenAIServer, monkeypatch, caplog
):
    """A request whose processing raises ends with a 500 (or an error event), its traceback
    logged; the request running next to it finishes with the right text."""
    marker = "Please fail inside the engine."
    process = SamplingGroup.process

    def failing(self, *args, **kwargs):
        if self.output.prompt == marker:
            raise RuntimeError("failed on purpose")
        return process(self, *args, **kwargs)

    monkeypatch.setattr(SamplingGroup, "process", failing)
    other = "Once upon a time"
    expected = _greedy(llm, other, 40)[0]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "smollm2", "max_tokens": 40, "temperature": 0, "stream": True}

    async def both() -> tuple[list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            survivor = http.post("/v1/completions", json={**body, "prompt": other}, headers=headers)
            failed = [
                http.post("/v1/completions", json={**body, "prompt": marker}, headers=headers),
                http.post(
                    "/v1/completions",
                    json={**body, "prompt": marker, "stream": False},
                    headers=headers,
                ),
            ]
            *replies, ok = await asyncio.gather(*failed, survivor)
        text = "".join(json.loads(e)["choices"][0]["text"] for e in _events(ok)[:-1])
        return replies, text

    with caplog.at_level(logging.ERROR, logger="lamina.engine"):
        (streamed, whole), text = asyncio.run(both())
    assert text == expected
    *_, error, done = _events(streamed)
    assert json.loads(error)["error"]["type"] == "server_error" and done == "[DONE]"
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    assert any(r.exc_info and "failed on purpose" in str(r.exc_info[1]) for r in caplog.records)
    _idle(server)


def test_the_engine_thread_survives_a_step_that_raises(
    server: OpenAIServer, client: OpenAI, caplog
):
    loop = server.llm.engine_loop
    step = loop.step
    calls = []

    def raising_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("step failed on purpose")
        step()

    loop.step = raising_once
    try:
        with (
            caplog.at_level(logging.ERROR, logger="lamina.engine"),
            pytest.raises(InternalServerError),
        ):
            client.completions.create(model="smollm2", prompt="Hi", max_tokens=4)
        _idle(server)
        ok = client.completions.create(model="smollm2", prompt="Hi", max_tokens=4)
    finally:
        del loop.step
    assert ok.usage.completion_tokens == 4
    assert any(r.exc_info and "on purpose" in str(r.exc_info[1]) for r in caplog.records)
