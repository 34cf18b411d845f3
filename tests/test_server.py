"""The OpenAI-compatible server, driven by the real `openai` client and raw HTTP.

References come from `llm.generate` on the same model (int8 outputs do not depend on how
requests are batched). The server runs in-process on a free loopback port, so the tests can
look at the engine's scheduler and KV cache while it serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI

from engine import SamplingParams
from engine.api import LLM
from engine.server import OpenAIServer

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
    import uvicorn

    app = OpenAIServer(llm, "smollm2", API_KEY)
    port = _free_port()
    config = uvicorn.Config(app.app(), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    app.base_url = f"http://127.0.0.1:{port}"
    yield app
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server: OpenAIServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def _greedy(llm: LLM, prompts, max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [out.text for out in llm.generate(prompts, params)]


def _idle(server: OpenAIServer, timeout: float = 20.0) -> None:
    """Wait until the engine holds no request and no KV block."""
    deadline = time.monotonic() + timeout
    cache = server.llm.engine_loop.cache
    while server.engine.num_active or cache.usage()[1]:
        assert time.monotonic() < deadline, "requests or KV blocks were not released"
        time.sleep(0.02)


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
    with pytest.raises(BadRequestError, match="tool"):
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
        reply = httpx.post(url, json=body, headers={"Authorization": "Bearer k"})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15)
