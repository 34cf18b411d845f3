"""`lamina batch`: JSONL in, one result line per request out, resumable after any interruption."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.batch_job import load_done_ids, run_batch
from engine.cli import main
from engine.errors import OutputPathError

GREEDY = {"max_tokens": 8, "temperature": 0}
TIMINGS = ("ttft_s", "total_s", "tokens_per_s")
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module", autouse=True)
def one_kernel_thread():
    """Run these tests on one kernel thread, then restore the count for the rest of the session.

    On a busy 2-core machine every parallel kernel waits for the slower core: decode steps of
    this small model took about 1 s with 2 threads against 20 ms with one.
    """
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


@pytest.fixture(scope="module")
def llm():
    return LLM(quant="int8", max_model_len=256)


def write_lines(path: Path, *lines) -> Path:
    """Objects are dumped as JSON (ASCII, so lone surrogates become "\\ud800" escapes); strings
    are written as they are and bytes as given (for malformed lines)."""
    raw = b"".join(
        (
            line
            if isinstance(line, bytes)
            else str.encode(line if isinstance(line, str) else json.dumps(line))
        )
        + b"\n"
        for line in lines
    )
    path.write_bytes(raw)
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    """Records minus their timings, in a stable order (results arrive in completion order)."""
    stripped = [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]
    return sorted(stripped, key=lambda r: json.dumps(r["id"]))


def interrupt_after(llm: LLM, k: int):
    """A generate_iter that raises KeyboardInterrupt (Ctrl-C) once k outputs are through."""
    original = llm.generate_iter

    def generate_iter(requests):
        outputs = original(requests)
        try:
            for done, output in enumerate(outputs):
                if done == k:
                    raise KeyboardInterrupt
                yield output
        finally:
            outputs.close()

    return generate_iter


@pytest.fixture
def five_prompts(tmp_path):
    lines = [{"id": i, "prompt": f"Fact number {i} about the sea:"} for i in range(4)]
    return write_lines(tmp_path / "in.jsonl", *lines, {"id": "chat", "messages": CHAT})


def test_full_run_matches_generate(llm, tmp_path):
    src = write_lines(
        tmp_path / "in.jsonl",
        {"id": 1, "prompt": "The capital of France is"},
        "",
        {"id": "1", "prompt": "Count: 1, 2, 3,", "max_tokens": 4},
        {"id": "chat", "messages": CHAT},
        {"id": 2.5, "prompt": "Once upon a time", "n": 2, "temperature": 0.8, "seed": 3},
    )
    log = io.StringIO()
    summary = run_batch(llm, src, tmp_path / "out.jsonl", GREEDY, log=log)
    assert (summary.written, summary.failed, summary.exit_code) == (4, 0, 0), log.getvalue()

    records = {json.dumps(r["id"]): r for r in read_records(tmp_path / "out.jsonl")}
    assert set(records) == {"1", '"1"', '"chat"', "2.5"}  # ids keep their JSON type
    greedy = SamplingParams(**GREEDY)
    expected = {
        "1": llm.generate("The capital of France is", greedy)[0],
        '"1"': llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=4, temperature=0))[0],
        '"chat"': llm.chat(CHAT, greedy),
    }
    for key, output in expected.items():
        record = records[key]
        assert record["text"] == output.text
        assert record["finish_reason"] == output.finish_reason
        assert record["prompt_tokens"] == output.metrics.prompt_tokens
        assert record["completion_tokens"] == len(output.token_ids)
        assert "outputs" not in record
        assert all(record[k] >= 0 for k in TIMINGS)
    sampled = records["2.5"]
    assert [c["index"] for c in sampled["outputs"]] == [0, 1]
    assert sampled["text"] == sampled["outputs"][0]["text"]
    assert sampled["completion_tokens"] == sum(c["completion_tokens"] for c in sampled["outputs"])


def test_interrupted_then_resumed_equals_uninterrupted(llm, tmp_path, five_prompts, monkeypatch):
    reference = tmp_path / "reference.jsonl"
    run_batch(llm, five_prompts, reference, GREEDY, log=io.StringIO())

    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(llm, "generate_iter", interrupt_after(llm, 2))
        stopped = run_batch(llm, five_prompts, out, GREEDY, log=io.StringIO())
    assert stopped.interrupted and stopped.exit_code == 130
    assert len(read_records(out)) == stopped.written == 2

    # kill -9 in the middle of writing the next result
    half = reference.read_text(encoding="utf-8").splitlines()[-1]
    with out.open("a", encoding="utf-8") as f:
        f.write(half[: len(half) // 2])
    log = io.StringIO()
    resumed = run_batch(llm, five_prompts, out, GREEDY, log=log)
    assert "cut off a truncated last line" in log.getvalue()
    assert (resumed.skipped, resumed.written, resumed.exit_code) == (2, 3, 0)
    assert without_timings(read_records(out)) == without_timings(read_records(reference))

    again = run_batch(llm, five_prompts, out, GREEDY, log=io.StringIO())
    assert (again.skipped, again.written) == (5, 0)


def test_out_file_repair(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "text": "a"}\n{"id": "x", "text": "b"}', encoding="utf-8")
    log = io.StringIO()
    assert load_done_ids(out, log) == {"1", '"x"'}  # complete, only the newline was missing
    assert out.read_text(encoding="utf-8").endswith('"b"}\n') and log.getvalue() == ""

    out.write_text('{"id": 1, "text": "a"}\nnot a result\n{"id": 2}\n', encoding="utf-8")
    with pytest.raises(OutputPathError, match=r"out.jsonl:2: not a batch result line"):
        load_done_ids(out, log)


def test_out_error_lines_are_dropped_and_retried(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [
        '{"id": 1, "text": "a"}',
        '{"id": 2, "line": 2, "finish_reason": "error", "error": "boom"}',
        '{"id": null, "line": 3, "finish_reason": "error", "error": "not valid JSON"}',
        '{"id": 4, "text": "d"}',
        '{"id": 5, "line": 5, "finish_reason": "error", "error": "cut"}',  # no final newline
    ]
    out.write_text("\n".join(lines), encoding="utf-8")
    log = io.StringIO()
    assert load_done_ids(out, log) == {"1", "4"}
    assert out.read_text(encoding="utf-8") == f"{lines[0]}\n{lines[3]}\n"
    assert "retrying the 3 line(s) that failed last time" in log.getvalue()


def test_bad_lines_get_an_error_line_and_the_rest_runs(llm, tmp_path):
    lines = [
        {"id": "ok", "prompt": "Hello"},  # 1
        '{"id": "broken", "prompt": ',  # 2 bad JSON
        "[1, 2]",  # 3 not an object
        {"prompt": "no id"},  # 4
        {"id": "ok", "prompt": "again"},  # 5 duplicate
        {"id": "neither"},  # 6
        {"id": "both", "prompt": "a", "messages": CHAT},  # 7
        {"id": "typo", "prompt": "a", "temprature": 0.5},  # 8 unknown field
        {"id": "top_p", "prompt": "a", "top_p": 2},  # 9 bad sampling value
        {"id": "flag", "prompt": "a", "ignore_eos": "yes"},  # 10 bad flag
        {"id": "long", "prompt": "word " * 400},  # 11 aborted by the engine: too long
        {"id": "nan", "prompt": "a", "seed": float("nan")},  # 12 NaN is not JSON
        {"id": "chat", "messages": "Hi"},  # 13 messages not a list
        {"id": "last", "messages": CHAT},  # 14
        {"id": "sur", "prompt": "a \ud800 b"},  # 15 lone surrogate in the text
        b'{"id": "bytes", "prompt": "\xff\xfe"}',  # 16 not UTF-8
        {"id": "sur\udc00", "prompt": "a"},  # 17 lone surrogate in the id
        {"id": "cs", "messages": [{"role": "user", "content": "\udfff"}]},  # 18
        '{"id": "ctl", "prompt": "a\tb"}',  # 19 a raw control character in a string
        {"id": "after", "prompt": "Goodbye"},  # 20
    ]
    src = write_lines(tmp_path / "in.jsonl", *lines)
    log = io.StringIO()
    summary = run_batch(llm, src, tmp_path / "out.jsonl", GREEDY, log=log)

    reports = {
        int(line.split(":")[1]): line for line in log.getvalue().splitlines() if ".jsonl:" in line
    }
    expected = {
        2: "not valid JSON",
        3: "expected a JSON object",
        4: 'missing "id"',
        5: 'duplicate id "ok" (first on line 1)',
        6: "exactly one of",
        7: "exactly one of",
        8: "unknown field(s): temprature",
        9: "top_p must be in (0, 1]",
        10: "ignore_eos must be true or false",
        11: "context window is 256",
        12: "NaN",
        13: '"messages" must be a non-empty list',
        15: '"prompt" is not valid Unicode text (lone surrogate U+D800)',
        16: "not valid UTF-8 (invalid start byte at byte 27)",
        17: '"id" is not valid Unicode text (lone surrogate U+DC00)',
        18: '"messages" is not valid Unicode text (lone surrogate U+DFFF)',
        19: "not valid JSON (Invalid control character at column 27)",
    }
    assert set(reports) == set(expected), log.getvalue()
    for number, reason in expected.items():
        assert reason in reports[number]
    records = read_records(tmp_path / "out.jsonl")
    results = [r for r in records if "error" not in r]
    assert sorted(r["id"] for r in results) == ["after", "last", "ok"]
    # One error line per bad line, with its id where it has a usable one.
    errors = {r["line"]: r for r in records if "error" in r}
    assert set(errors) == set(expected)
    for number, record in errors.items():
        assert record["finish_reason"] == "error" and expected[number] in record["error"]
        assert reports[number].endswith(record["error"])
    no_id = {2, 3, 4, 12, 16, 17, 19}
    assert all(errors[n]["id"] is None for n in no_id)
    with_id = {errors[n]["id"] for n in set(errors) - no_id}
    assert with_id == {
        "ok",
        "neither",
        "both",
        "typo",
        "top_p",
        "flag",
        "long",
        "chat",
        "sur",
        "cs",
    }
    assert (summary.written, summary.failed, summary.exit_code) == (3, len(expected), 1)


def test_an_engine_failure_costs_only_its_line(llm, tmp_path, five_prompts, monkeypatch):
    """The engine ends a request that fails inside it with finish_reason "error"."""
    original = llm.generate_iter

    def generate_iter(requests):
        outputs = original(requests)
        try:
            for output in outputs:
                if output.request_id == "2":
                    output.outputs[0].finish_reason = "error"
                    output.error = "RuntimeError: boom"
                yield output
        finally:
            outputs.close()

    monkeypatch.setattr(llm, "generate_iter", generate_iter)
    out = tmp_path / "out.jsonl"
    summary = run_batch(llm, five_prompts, out, GREEDY, log=io.StringIO())
    assert (summary.written, summary.failed, summary.exit_code) == (4, 1, 1)
    failed = [r for r in read_records(out) if "error" in r]
    assert failed == [{"id": 2, "line": 3, "finish_reason": "error", "error": "RuntimeError: boom"}]

    monkeypatch.undo()  # the rerun retries only that line
    again = run_batch(llm, five_prompts, out, GREEDY, log=io.StringIO())
    assert (again.skipped, again.written, again.failed) == (4, 1, 0)
    assert sorted(json.dumps(r["id"]) for r in read_records(out)) == sorted(
        ["0", "1", "2", "3", '"chat"']
    )


def test_cli_batch_runs_and_reports(tmp_path, capsys):
    src = write_lines(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "The capital of France is"},
        {"id": "b", "prompt": "x", "top_k": "many"},
    )
    out = tmp_path / "out.jsonl"
    argv = [
        "batch",
        *("--quant", "int8", "--max-model-len", "256", "--kv-cache-mb", "64", "--threads", "1"),
        *("--max-num-seqs", "4", "--temperature", "0", "--max-tokens", "8"),
        *("--no-progress", str(src), str(out)),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{src}:2: top_k must be an integer" in err
    assert read_records(out)[0]["error"] == "top_k must be an integer, got 'many'"
    assert err.splitlines()[-1].startswith("lamina batch: 1 written, 0 already done, 1 failed")
    assert [r["id"] for r in read_records(out)] == ["b", "a"]


def test_cli_ctrl_c_then_resume(llm, tmp_path, five_prompts, capsys, monkeypatch):
    monkeypatch.setattr("engine.cli._load", lambda args: llm)
    out = tmp_path / "out.jsonl"
    argv = ["batch", "--temperature", "0", "--max-tokens", "8", str(five_prompts), str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(llm, "generate_iter", interrupt_after(llm, 1))
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Rerun the same command to resume" in err
    assert len(read_records(out)) == 1

    assert main(argv) == 0
    assert "4 written, 1 already done, 0 failed" in capsys.readouterr().err
    assert len(read_records(out)) == 5


def test_cli_rejects_bad_arguments_before_loading(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "a"})
    assert main(["batch", "--top-p", "3", str(src), str(tmp_path / "o.jsonl")]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["batch", str(src), str(src)]) == 2
    assert "must be different files" in capsys.readouterr().err


def test_cli_checks_out_before_loading(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "a"})
    not_ours = tmp_path / "notes.txt"
    not_ours.write_text("my notes\n")
    # The model does not exist: had batch loaded it first, the error would be about it.
    for out, reason in [
        (tmp_path, "it is a folder"),
        (src / "out.jsonl", "is not a folder"),
        (Path("/proc/lamina-out.jsonl"), "cannot write /proc/lamina-out.jsonl"),
        (not_ours, "not a batch result line"),
    ]:
        assert main(["batch", "-m", "/no/such/model", str(src), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err, err
    assert not_ours.read_text() == "my notes\n"
