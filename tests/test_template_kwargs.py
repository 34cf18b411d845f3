"""Chat template variables (vLLM's chat_template_kwargs) on every path: the API, the CLI's
generate, chat and batch, and the server. A tiny Qwen3 model carries Qwen3's own template,
whose `enable_thinking=False` writes an empty think block for the reply."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from engine.api import LLM
from engine.cli import main
from engine.errors import InvalidInputError
from engine.server import OpenAIServer, listen, uvicorn_server
from tests.tiny_models import build_tiny_model

TEMPLATE = Path(__file__).parent / "data" / "templates" / "qwen3.jinja"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
OFF = {"enable_thinking": False}
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, hf_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("qwen3") / "hf"
    build_tiny_model("qwen3-qknorm-tied", folder, hf_tokenizer)
    (folder / "chat_template.jinja").write_text(TEMPLATE.read_text())
    return folder


@pytest.fixture(scope="module")
def llm(qwen3) -> LLM:
    return LLM(qwen3, kv_cache_mb=16)


def test_the_api_passes_template_variables(llm):
    thinking, ids = llm.encode_chat(MESSAGES)
    plain, plain_ids = llm.encode_chat(MESSAGES, **OFF)
    assert plain == thinking + EMPTY_THINK
    assert len(plain_ids) > len(ids)
    with pytest.raises(InvalidInputError, match="add_generation_prompt"):
        llm.encode_chat(MESSAGES, add_generation_prompt=False)
    with pytest.raises(InvalidInputError, match="documents must be a list"):
        llm.encode_chat(MESSAGES, documents=True)


def test_generate_chat_passes_template_variables(qwen3, capsys):
    args = ["generate", "-m", str(qwen3), "--chat", "--max-tokens", "2", "--json", "hi"]
    assert main(args) == 0
    thinking = json.loads(capsys.readouterr().out)["prompt_tokens"]
    assert main([*args[:-1], "--chat-template-kwargs", json.dumps(OFF), "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > thinking


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chat", "--chat-template-kwargs", "{not json"], "not JSON"),
        (["--chat", "--chat-template-kwargs", "[1]"], "object with string keys"),
        (["--chat", "--chat-template-kwargs", '{"messages": []}'], "may not set messages"),
        (["--chat", "--chat-template-kwargs", '{"params": 1}'], "may not set params"),
        (["--chat", "--chat-template-kwargs", '{"tools": 5}'], "tools must be a list"),
        (["--chat-template-kwargs", json.dumps(OFF)], "applies to --chat"),
    ],
)
def test_bad_template_variables_exit_2(qwen3, capsys, flags, message):
    try:  # argparse's own errors exit from inside main
        code = main(["generate", "-m", str(qwen3), *flags, "hi"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_batch_lines_and_flag_pass_template_variables(qwen3, tmp_path):
    lines = [
        {"id": "think", "messages": MESSAGES},
        {"id": "plain", "messages": MESSAGES, "chat_template_kwargs": OFF},
        {"id": "bad", "prompt": "hi", "chat_template_kwargs": OFF},
        {"id": "reserved", "messages": MESSAGES, "chat_template_kwargs": {"messages": 1}},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    base = ["batch", "-m", str(qwen3), "--max-tokens", "2", "--no-progress"]
    assert main([*base, str(src), str(tmp_path / "a.jsonl")]) == 1  # two bad lines
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    assert out["plain"]["prompt_tokens"] > out["think"]["prompt_tokens"]
    assert 'applies to "messages" lines' in out["bad"]["error"]
    assert "may not set messages" in out["reserved"]["error"]
    # the flag is every line's default; a line's own setting wins
    flag = ["--chat-template-kwargs", json.dumps(OFF)]
    assert main([*base, *flag, str(src), str(tmp_path / "b.jsonl")]) == 1
    out_b = {r["id"]: r for r in map(json.loads, (tmp_path / "b.jsonl").read_text().splitlines())}
    assert out_b["think"]["prompt_tokens"] == out["plain"]["prompt_tokens"]


def test_the_server_passes_chat_template_kwargs(llm):
    app = OpenAIServer(llm, "qwen3", None)
    sock = listen("127.0.0.1", 0)
    uv = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
        with httpx.Client(timeout=60) as http:
            for _ in range(600):  # started within a minute
                if uv.started:
                    break
                threading.Event().wait(0.1)
            body = {"model": "qwen3", "messages": MESSAGES, "max_tokens": 2}
            usage = [
                http.post(url, json={**body, **extra}).json()["usage"]["prompt_tokens"]
                for extra in ({}, {"chat_template_kwargs": OFF})
            ]
            assert usage[1] > usage[0]
            bad = http.post(url, json={**body, "chat_template_kwargs": {"messages": 1}})
            assert bad.status_code == 400 and "may not set messages" in bad.text
            wrong = http.post(url, json={**body, "chat_template_kwargs": [1]})
            assert wrong.status_code == 400
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
