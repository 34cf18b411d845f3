"""`lamina generate` and `lamina chat` as a user drives them."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from engine import SamplingParams
from engine.chat_session import ChatSession
from engine.cli import main


def test_generate_json_matches_api(default_llm, capsys):
    prompt = "The capital of France is"
    code = main(["generate", "--temperature", "0", "--max-tokens", "12", "--json", prompt])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("text", "token_ids", "finish_reason", "ttft_s", "tpot_s", "tokens_per_s"):
        assert key in result
    expected = default_llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert result["finish_reason"] == expected.finish_reason
    assert result["ttft_s"] > 0 and result["tokens_per_s"] > 0


def test_generate_seed_reproduces_text(capsys):
    argv = ["generate", "--temperature", "1.0", "--seed", "7", "--max-tokens", "10", "Once upon"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_console_script_help_for_every_command():
    for argv in (["--help"], ["generate", "--help"], ["chat", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", "engine.cli", *argv], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and "usage: lamina" in proc.stdout


class ScriptedInput:
    """Stands in for input(): returns lines, then raises EOFError (Ctrl-D)."""

    def __init__(self, lines):
        self.lines = list(lines)

    def __call__(self, prompt=""):
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line


class InterruptingWriter(io.StringIO):
    """Raises KeyboardInterrupt (Ctrl-C) on the n-th write, once."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def write(self, s):
        self.at -= 1
        if self.at == 0:
            raise KeyboardInterrupt
        return super().write(s)


@pytest.fixture
def greedy():
    return SamplingParams(max_tokens=16, temperature=0)


def test_chat_multi_turn_reset_and_exit(default_llm, greedy, monkeypatch):
    monkeypatch.setattr(
        "builtins.input", ScriptedInput(["Hi!", "And again?", "/reset", "Hi!", "/exit", "never"])
    )
    out = io.StringIO()
    session = ChatSession(default_llm, greedy, system="Be brief.", out=out)
    session.run()
    # after /reset the conversation is the system prompt plus one exchange
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    first_reply = default_llm.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], greedy
    ).text
    assert out.getvalue().count(first_reply) == 2
    assert "(conversation cleared)" in out.getvalue()


def test_chat_ctrl_c_stops_reply_but_not_chat(default_llm, greedy, monkeypatch):
    monkeypatch.setattr(
        "builtins.input", ScriptedInput(["Tell me a story.", KeyboardInterrupt, "Thanks"])
    )
    out = InterruptingWriter(at=3)
    session = ChatSession(default_llm, greedy, out=out)
    session.run()  # returns on EOF (Ctrl-D) after the third line
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert "[stopped]" in out.getvalue()
    full = default_llm.chat([{"role": "user", "content": "Tell me a story."}], greedy).text
    assert full.startswith(session.messages[1]["content"])
    assert len(session.messages[1]["content"]) < len(full)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, hf_tokenizer):
    from tests.tiny_models import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_model("llama-gqa-untied", folder, hf_tokenizer)
    return folder


def run_lamina(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv], input=stdin, capture_output=True, check=False
    )


def test_generate_reads_prompt_from_stdin(tiny_model):
    argv = ["generate", "-m", str(tiny_model), "--temperature", "0", "--max-tokens", "5", "--json"]
    from_stdin = run_lamina(*argv, "-", stdin="héllo wörld".encode())
    from_arg = run_lamina(*argv, "héllo wörld")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert json.loads(from_stdin.stdout)["token_ids"] == json.loads(from_arg.stdout)["token_ids"]


def test_generate_rejects_non_utf8_stdin(tiny_model):
    proc = run_lamina("generate", "-m", str(tiny_model), "-", stdin=b"\xff\xfe abc")
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and "UTF-8" in proc.stderr.decode()


def test_generate_into_a_closed_pipe_exits_quietly(tiny_model):
    cmd = (
        f"{sys.executable} -m engine.cli generate -m {tiny_model} --temperature 0 "
        "--max-tokens 200 'Count: 1, 2, 3,' | head -c 1"
    )
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr


def test_stop_string_and_chat_flags(default_llm, capsys):
    params = SamplingParams(max_tokens=24, temperature=0)
    full = default_llm.chat([{"role": "user", "content": "List three colors."}], params).text
    stop = full.strip().split()[1]
    argv = [
        "generate",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--stop",
        stop,
        "--json",
    ]
    assert main([*argv, "List three colors."]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]


def test_chat_survives_a_conversation_longer_than_the_context(tiny_model, monkeypatch):
    from engine import LLM

    llm = LLM(tiny_model, max_model_len=40)
    lines = [
        "one two three four five six",
        "seven eight nine ten",
        "eleven twelve",
        "x " * 60,
        "ok",
    ]
    monkeypatch.setattr("builtins.input", ScriptedInput(lines))
    out = io.StringIO()
    session = ChatSession(llm, SamplingParams(max_tokens=8, temperature=0), out=out)
    session.run()
    text = out.getvalue()
    assert "oldest turn dropped" in text
    assert "error:" in text  # the 60-word message alone does not fit, and is refused
    assert session.messages[-2] == {"role": "user", "content": "ok"}
