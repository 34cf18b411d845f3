"""The `lamina` command line as a user drives it: generate, chat, quantize, perplexity, --help."""

from __future__ import annotations

import argparse
import ast
import builtins
import importlib.metadata
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import SamplingParams
from engine.chat_session import ChatSession
from engine.cli import build_parser, main


def test_generate_json_matches_api(native_llm, capsys):
    prompt = "The capital of France is"
    code = main(["generate", "--temperature", "0", "--max-tokens", "12", "--json", prompt])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("text", "token_ids", "finish_reason", "ttft_s", "tpot_s", "tokens_per_s"):
        assert key in result
    expected = native_llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
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


def test_chat_ctrl_c_stops_reply_and_drops_it(default_llm, greedy, monkeypatch):
    monkeypatch.setattr(
        "builtins.input", ScriptedInput(["Tell me a story.", KeyboardInterrupt, "Thanks"])
    )
    out = InterruptingWriter(at=3)
    session = ChatSession(default_llm, greedy, out=out)
    session.run()  # returns on EOF (Ctrl-D) after the third line
    assert "[stopped" in out.getvalue()
    # The stopped exchange is gone: the next turn does not build on a fragment.
    assert session.messages[0] == {"role": "user", "content": "Thanks"}
    assert [m["role"] for m in session.messages] == ["user", "assistant"]


class NoModel:
    """An LLM stand-in for chat commands: any generation is a test failure."""

    max_model_len = 64

    def stream_chat(self, messages, params):
        raise AssertionError(f"sent to the model: {messages[-1]['content']!r}")


def test_chat_commands_are_not_sent_to_the_model(greedy, monkeypatch):
    lines = ["/help", "/xyz", "/help me", "\ud800 hi", "/exit", "never read"]
    monkeypatch.setattr("builtins.input", ScriptedInput(lines))
    out = io.StringIO()
    session = ChatSession(NoModel(), greedy, out=out)
    session.run()
    text = out.getvalue()
    for command in ("/help", "/reset", "/exit"):
        assert text.count(command) >= 2  # listed by each of the two /help
    assert "unknown command /xyz" in text
    assert "error: the message is not valid UTF-8 text" in text
    assert session.messages == []


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


@pytest.mark.parametrize(
    ("flags", "what"),
    [([b"\xff\xfe hi"], "PROMPT"), ([b"--stop", b"\xe9", b"hi"], "--stop")],
)
def test_generate_rejects_non_utf8_arguments(flags, what):
    """The shell passes bytes; Python turns undecodable ones into lone surrogates."""
    command = [sys.executable.encode(), b"-m", b"engine.cli", b"generate", b"-m", b"/no/model"]
    proc = subprocess.run([*command, *flags], capture_output=True, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1  # checked before the (missing) model is looked for
    assert f"{what} is not valid UTF-8 text" in err and "at byte 0" in err


def test_generate_rejects_lone_surrogate_prompt(capsys):
    assert main(["generate", "-m", "/no/model", "say \ud800"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "lamina generate: error: PROMPT is not valid UTF-8 text (lone surrogate U+D800 at character 4)\n"
    )


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


class FakeLLM:
    """Stands in for a loaded LLM in `generate`: streams `pieces`, then calls `end`."""

    def __init__(self, pieces, end):
        self.pieces, self.end = pieces, end

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def stream(self, prompt, params):
        from engine.api import TextStream
        from engine.outputs import RequestOutput

        output = RequestOutput("0", prompt, [1])

        def pieces():
            for piece in self.pieces:
                output.outputs[0].text += piece
                yield piece
            self.end(output)

        return TextStream(output, pieces())


def engine_error(output):
    output.outputs[0].finish_reason = "error"
    output.error = "RuntimeError: boom"


def ctrl_c(output):
    raise KeyboardInterrupt


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_generate_reports_an_engine_error_and_exits_1(monkeypatch, capsys, json_flag):
    monkeypatch.setattr("engine.cli._load", lambda args: FakeLLM(["Hel", "lo"], engine_error))
    assert main(["generate", *json_flag, "hi"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "lamina generate: error: RuntimeError: boom\n"
    assert "{" not in captured.out  # no JSON result for a failed request


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_generate_ctrl_c_exits_130(monkeypatch, capsys, json_flag):
    monkeypatch.setattr("engine.cli._load", lambda args: FakeLLM(["Hel", "lo"], ctrl_c))
    assert main(["generate", *json_flag, "hi"]) == 130
    if not json_flag:
        assert capsys.readouterr().out == "Hello\n"  # what was generated before Ctrl-C


def test_quantize_checks_out_before_loading(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # The source does not exist: had quantize loaded it first, the error would be about it.
    for out, reason in [
        (a_file, "already exists"),
        (a_file / "sub", "is not a folder"),
        (Path("/proc/lamina-out"), "is not writable"),
    ]:
        assert main(["quantize", "/no/such/model", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out}" in err and reason in err, err


def test_perplexity_json_reports_the_loaded_precision(tiny_model, tmp_path, capsys):
    checkpoint = tmp_path / "int8"
    assert main(["quantize", str(tiny_model), str(checkpoint), "--weights", "int8"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    capsys.readouterr()
    for model, quant in [(checkpoint, "int8"), (tiny_model, "f32")]:
        argv = ["perplexity", "-m", str(model), "--context", "16", "--json", str(text)]
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["quant"] == quant


def typed_options():
    """(command, option, checked_by_cli) for every option whose value is converted; the CLI's
    own type functions refuse bad values while parsing, others may leave that to their owner
    (EngineConfig checks its fields when it is built)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.type is not None and action.option_strings:
                yield name, action.option_strings[0], action.type.__module__ == "engine.cli"


@pytest.mark.parametrize(("command", "option", "checked_by_cli"), list(typed_options()))
def test_bad_option_values_are_explained_in_one_line(command, option, checked_by_cli, capsys):
    """argparse names the type function in its message unless it raises ArgumentTypeError."""
    positionals = {"batch": ["in", "out"], "quantize": ["a", "b"]}.get(command, ["x"])
    for value in ("nan", "bogus"):
        try:
            build_parser().parse_known_args([command, option, value, *positionals])
        except SystemExit as exit_:
            assert exit_.code == 2
        else:
            assert not checked_by_cli, f"{option} {value} was accepted"
            continue
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument {option}: " in err, err
        assert not re.search(r"invalid \S+ value", err), err  # "invalid _positive_int value"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lamina {importlib.metadata.version('lamina')}\n"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--max-tokens N tokens to generate per completion (default: 128)" in text
    assert "--temperature X 0 means greedy (default: the model's)" in text
    assert "(default: 1.0)" in text  # repetition penalty, from SamplingParams
    with pytest.raises(SystemExit):
        main(["perplexity", "--help"])
    assert "(default: 1024)" in " ".join(capsys.readouterr().out.split())


def readme_python_names() -> tuple[set[str], set[str]]:
    """Names the README's Python examples read, and names they define (any block)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    loaded, defined = set(), set(dir(builtins))
    for node in ast.walk(ast.parse("\n".join(blocks))):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, ast.alias):
            defined.add((node.asname or node.name).split(".")[0])
    return loaded, defined


def test_readme_examples_define_every_name_they_use():
    loaded, defined = readme_python_names()
    assert loaded - defined == set()
