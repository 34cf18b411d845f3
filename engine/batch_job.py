"""Offline batch generation over JSONL: the logic behind `lamina batch IN OUT`.

Each input line is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`, plus any
SamplingParams field. Every request goes through one `LLM.generate_iter`, so the scheduler
batches them all; each result is appended to OUT and flushed the moment it finishes.

OUT doubles as the checkpoint: a rerun skips ids already there, so an interrupted job
(Ctrl-C, kill -9, a crash) resumes without losing or repeating work. A kill -9 can leave a
half-written last line; it is cut off before anything is appended, keeping OUT valid JSONL.
A line that cannot run (bad JSON or text, a bad field, a failure in the engine) costs only
itself: it gets an error line in OUT (`error_record`) and on the log, and every other line
runs. A rerun drops the earlier error lines and tries those lines again, so fixing them and
rerunning completes the job.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from engine.errors import InvalidInputError, LaminaError, OutputPathError
from engine.loader.chat_template import check_template_kwargs
from engine.outputs import RequestOutput
from engine.sampling import SAMPLING_FIELDS, SamplingParams, sampling_kwargs
from engine.structured import GUIDED_FORMATS, response_format_fields
from engine.text_input import invalid_text

if TYPE_CHECKING:
    from engine.api import LLM

ALLOWED_FIELDS = frozenset(SAMPLING_FIELDS) | {
    "id", "prompt", "messages", "chat_template_kwargs", "response_format"
}  # fmt: skip
# How a request ends when it produced no result: could not run, or failed in the engine.
_FAILED = ("abort", "error")
_TIMING_DIGITS = 4


class BadLine(InvalidInputError):
    """An input line that cannot become a request; the message says why. request_id is the
    line's id when it has a usable one."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass
class BatchSummary:
    """What a run did, for the final line and the exit code."""

    written: int = 0
    skipped: int = 0  # already in OUT from an earlier run
    failed: int = 0  # error lines written to OUT (and the log)
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C (the shell's convention), 1 if any line failed, else 0."""
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def line(self) -> str:
        rate = self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        failed = f"{self.failed} failed (reported above and in OUT)" if self.failed else "0 failed"
        return (
            f"{self.written} written, {self.skipped} already done, {failed} "
            f"in {self.elapsed_s:.1f}s ({rate:.1f} generated tok/s)"
        )


def run_batch(
    llm: LLM,
    in_path: str | Path,
    out_path: str | Path,
    defaults: Mapping[str, Any] | None = None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = False,
    log: TextIO | None = None,
) -> BatchSummary:
    """Generate for every line of IN not yet in OUT, appending each result as it finishes.

    defaults: SamplingParams fields every line starts from (a line's own fields override
    them); checked here, so bad defaults raise InvalidInputError before anything runs.
    template_kwargs: chat template variables for "messages" lines (enable_thinking, ...),
    which a line's own "chat_template_kwargs" override.
    progress: True shows a bar on the log, None shows it only when the log is a terminal.
    Ctrl-C stops cleanly: finished results stay in OUT and the summary says `interrupted`.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    defaults = dict(defaults or {})
    log = log or sys.stderr
    template_kwargs = check_template_kwargs(template_kwargs, "--chat-template-kwargs")
    done = check_job(in_path, out_path, defaults, log)
    return _BatchJob(llm, in_path, out_path, defaults, template_kwargs, done, log, progress).run()


def check_job(
    in_path: str | Path,
    out_path: str | Path,
    defaults: Mapping[str, Any],
    log: TextIO | None = None,
) -> set[str]:
    """Check that a job can start, before anyone waits for a model load; return the ids OUT
    already holds (`load_done_ids`, which also repairs OUT, so checking twice is harmless).

    A missing IN or bad defaults raise InvalidInputError; an OUT that cannot be written or is
    not a results file raises OutputPathError.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise InvalidInputError(f"cannot read {in_path}: no such file")
    if in_path.resolve() == out_path.resolve():
        raise InvalidInputError("IN and OUT must be different files")
    _check_writable(out_path)
    _check_unknown(defaults.keys() - set(SAMPLING_FIELDS))
    SamplingParams(**defaults)
    return load_done_ids(out_path, log or sys.stderr)


def _check_writable(out_path: Path) -> None:
    """OUT must be a file that can be appended to, or created, in an existing folder."""
    if out_path.is_dir():
        raise OutputPathError(f"cannot write {out_path}: it is a folder")
    if not out_path.parent.is_dir():
        raise OutputPathError(f"cannot write {out_path}: {out_path.parent} is not a folder")
    try:
        if out_path.exists():
            out_path.open("ab").close()
        else:
            with tempfile.TemporaryFile(dir=out_path.parent):
                pass
    except OSError as exc:
        raise OutputPathError(f"cannot write {out_path}: {exc.strerror}") from None


def load_done_ids(out_path: Path, log: TextIO) -> set[str]:
    """Keys (see `_id_key`) of the ids OUT holds a result for, after repairing a cut-off tail
    and dropping the error lines of earlier runs (their lines run again).

    Any other unreadable line raises OutputPathError: appending to a file that is not ours
    could bury someone's data under results.
    """
    if not out_path.exists():
        return set()
    done: set[str] = set()
    errors = 0
    end = 0  # offset just past the last complete line
    with out_path.open("rb+") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                record = _repair_tail(f, end, raw, log)
                if record is None:
                    break
            else:
                end += len(raw)
                if not raw.strip():
                    continue
                record = _result(raw)
                if record is None:
                    raise OutputPathError(
                        f"{out_path}:{number}: not a batch result line; "
                        "refusing to append to this file"
                    )
            if "error" in record:
                errors += 1
            else:
                done.add(_id_key(record["id"]))
    if errors:
        _drop_error_lines(out_path)
        print(f"{out_path}: retrying the {errors} line(s) that failed last time", file=log)
    return done


def _repair_tail(f: BinaryIO, end: int, tail: bytes, log: TextIO) -> dict | None:
    """A last line without a newline is a complete record missing only that newline (kept,
    and returned), or what a killed run managed to write (cut off; its request simply runs
    again)."""
    record = _result(tail)
    if record is not None:
        f.write(b"\n")
        return record
    f.truncate(end)
    print(f"{f.name}: cut off a truncated last line ({len(tail)} bytes)", file=log)
    return None


def _drop_error_lines(out_path: Path) -> None:
    """Rewrite OUT without its error lines; atomically, so a crash leaves one or the other."""
    try:
        fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.")
    except OSError as exc:
        raise OutputPathError(f"cannot rewrite {out_path}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as new, out_path.open("rb") as old:
            for raw in old:
                if not raw.strip() or "error" not in _result(raw):
                    new.write(raw)
        shutil.copymode(out_path, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise


def _result(raw: bytes) -> dict | None:
    """The parsed OUT line, or None when it is not a result record."""
    try:
        record = json.loads(raw)
    except ValueError:  # bad JSON or bad UTF-8
        return None
    return record if isinstance(record, dict) and "id" in record else None


def _id_key(request_id: Any) -> str:
    """A set key that keeps ids of different JSON types apart (1, 1.0, "1", true)."""
    return json.dumps(request_id, ensure_ascii=False)


def _decode(raw: bytes) -> Any:
    """The JSON value of an input line."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise BadLine(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Invalid control character at").
        reason = exc.msg.removesuffix(" at")
        raise BadLine(f"not valid JSON ({reason} at column {exc.colno})") from None


def _parse_id(obj: Any) -> Any:
    """The line's id: any JSON string, number or boolean."""
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("id") is None:
        raise BadLine('missing "id"')
    if not isinstance(obj["id"], (str, int, float)):
        raise BadLine(f'"id" must be a string, number or boolean, got {obj["id"]!r}')
    _check_unicode("id", obj["id"])
    return obj["id"]


def _check_unicode(name: str, value: Any) -> None:
    """Refuse lone surrogates: "\\ud800" is valid JSON but not text, so the tokenizer cannot
    take it and OUT, which is UTF-8, could not hold it."""
    bad = invalid_text(name) or invalid_text(value)
    if bad is not None:
        raise BadLine(
            f"{json.dumps(name)} is not valid Unicode text (lone surrogate U+{bad[1]:04X})"
        )


def build_request(
    llm: LLM, obj: dict, defaults: Mapping[str, Any], template_kwargs: Mapping[str, Any]
) -> tuple[str | list[int], SamplingParams]:
    """The (prompt, params) pair of a parsed line; BadLine says what is wrong with it."""
    for name, value in obj.items():
        _check_unicode(name, value)
    _check_unknown(obj.keys() - ALLOWED_FIELDS)
    if ("prompt" in obj) == ("messages" in obj):
        raise BadLine('give exactly one of "prompt" and "messages"')
    try:
        structured = response_format_fields(obj.get("response_format"))
        if structured and any(obj.get(name) is not None for name in GUIDED_FORMATS):
            raise InvalidInputError('give "response_format" or a guided_* field, not both')
        params = SamplingParams(**{**defaults, **sampling_kwargs(obj), **structured})
    except InvalidInputError as exc:
        raise BadLine(str(exc)) from None
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise BadLine(f'"prompt" must be a string, got {type(obj["prompt"]).__name__}')
        if "chat_template_kwargs" in obj:
            raise BadLine('"chat_template_kwargs" applies to "messages" lines')
        return obj["prompt"], params
    try:
        own = check_template_kwargs(obj.get("chat_template_kwargs"), '"chat_template_kwargs"')
    except InvalidInputError as exc:
        raise BadLine(str(exc)) from None
    return _chat_prompt(llm, obj["messages"], {**template_kwargs, **own}), params


def _chat_prompt(llm: LLM, messages: Any, template_kwargs: Mapping[str, Any]) -> list[int]:
    """Token ids of a rendered conversation (the template writes BOS itself)."""
    if not isinstance(messages, list) or not messages:
        raise BadLine('"messages" must be a non-empty list of {"role": ..., "content": ...}')
    try:
        return llm.encode_chat(messages, **template_kwargs)[1]
    except LaminaError as exc:
        raise BadLine(str(exc)) from None


def _check_unknown(names: set[str]) -> None:
    if names:
        raise BadLine(f"unknown field(s): {', '.join(sorted(names))}")


def error_record(request_id: Any, line: int | None, message: str) -> dict:
    """The OUT line of an input line that produced no result: id is null when the line has
    no usable one, and `line` (1-based) points at it either way."""
    return {"id": request_id, "line": line, "finish_reason": "error", "error": message}


def output_record(request_id: Any, line: int | None, output: RequestOutput) -> dict:
    """The OUT line of a request the engine ended: its result, or an error line."""
    if output.error is not None or output.finish_reason in _FAILED:
        return error_record(request_id, line, output.error or "aborted")
    return result_record(request_id, output)


def result_record(request_id: Any, output: RequestOutput) -> dict:
    """The OUT line of a finished request."""
    m = output.metrics
    record = {
        "id": request_id,
        "text": output.text,
        "finish_reason": output.finish_reason,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.generated_tokens,
        "ttft_s": round(m.ttft_s, _TIMING_DIGITS),
        "total_s": round(m.total_s, _TIMING_DIGITS),
        "tokens_per_s": round(m.tokens_per_s, _TIMING_DIGITS),
    }
    if len(output.outputs) > 1:
        record["outputs"] = [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "completion_tokens": len(c.token_ids),
            }
            for c in output.outputs
        ]
    return record


def _count_pending(in_path: Path, done: set[str]) -> int:
    """Non-blank lines whose id is not yet in OUT: the progress bar's total.

    A cheap extra pass (JSON parsing costs nothing next to generation) that keeps the ETA
    honest on a resumed run.
    """
    pending = 0
    with in_path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    known = _id_key(_parse_id(json.loads(raw))) in done
                except ValueError:  # BadLine, bad JSON or bad UTF-8: it will be reported
                    known = False
                pending += not known
    return pending


@dataclass(frozen=True)
class Line:
    """An input line to run: its 1-based number, its id and its parsed object."""

    number: int
    request_id: Any
    obj: dict


class InputLines:
    """The lines of IN to run, read lazily: a `Line` for each, or (number, BadLine) for a
    line whose JSON or id is bad or repeated. Lines whose id OUT already holds are skipped
    and counted."""

    def __init__(self, in_path: Path, done: set[str]) -> None:
        self.in_path = in_path
        self.done = done
        self.skipped = 0
        self._seen: dict[str, int] = {}  # id key -> line number, to name the first of a pair

    def __iter__(self) -> Iterator[Line | tuple[int, BadLine]]:
        with self.in_path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    line = self._parse(raw, number)
                except BadLine as exc:
                    yield number, exc
                    continue
                if line is not None:
                    yield line

    def _parse(self, raw: bytes, number: int) -> Line | None:
        obj = _decode(raw)
        request_id = _parse_id(obj)
        key = _id_key(request_id)
        if key in self._seen:
            raise BadLine(f"duplicate id {key} (first on line {self._seen[key]})", request_id)
        self._seen[key] = number
        if key in self.done:
            self.skipped += 1
            return None
        return Line(number, request_id, obj)


class Progress:
    """A tqdm bar over finished lines with the generated tokens/s; messages print above it."""

    def __init__(self, total: int | None, enabled: bool, log: TextIO) -> None:
        from tqdm import tqdm

        self.log = log
        self.start = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(total=total, unit="req", file=log, disable=not enabled, dynamic_ncols=True)

    def advance(self, tokens: int = 0) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def note(self, message: str) -> None:
        self.bar.write(message, file=self.log)

    def close(self) -> None:
        self.bar.close()


class _BatchJob:
    """One pass over IN: feeds the engine lazily and writes results as they come back."""

    def __init__(
        self,
        llm: LLM,
        in_path: Path,
        out_path: Path,
        defaults: dict[str, Any],
        template_kwargs: dict[str, Any],
        done: set[str],
        log: TextIO,
        progress: bool | None,
    ) -> None:
        self.llm = llm
        self.in_path = in_path
        self.out_path = out_path
        self.defaults = defaults
        self.template_kwargs = template_kwargs
        self.log = log
        self.summary = BatchSummary()
        self.results: ResultWriter | None = None  # into OUT, open while the job runs
        self.lines = InputLines(in_path, done)
        # generate_iter request id -> (line number, id) of requests pulled but not finished.
        self.pending: dict[str, tuple[int, Any]] = {}
        if progress is None:
            progress = log.isatty()
        total = _count_pending(in_path, done) if progress else None
        self.progress = Progress(total, progress, log)

    def run(self) -> BatchSummary:
        start = time.perf_counter()
        outputs = self.llm.generate_iter(self._requests())
        try:
            with self.out_path.open("a", encoding="utf-8") as out:
                self.results = ResultWriter(out, self.in_path, self.summary, self.progress)
                for output in outputs:
                    self._finish(output)
        except KeyboardInterrupt:
            self.summary.interrupted = True
        finally:
            outputs.close()  # aborts whatever is still running
            self.progress.close()
            self.summary.elapsed_s = time.perf_counter() - start
            self.summary.skipped = self.lines.skipped
        return self.summary

    def _requests(self) -> Iterator[tuple[str | list[int], SamplingParams]]:
        """(prompt, params) for every runnable line, read only as the engine asks for more."""
        index = 0
        for line in self.lines:
            if not isinstance(line, Line):
                self._fail(line[0], line[1].request_id, str(line[1]))
                continue
            try:
                prompt, params = build_request(
                    self.llm, line.obj, self.defaults, self.template_kwargs
                )
            except BadLine as exc:
                self._fail(line.number, line.request_id, str(exc))
                continue
            self.pending[str(index)] = (line.number, line.request_id)
            index += 1
            yield prompt, params

    def _finish(self, output: RequestOutput) -> None:
        number, request_id = self.pending.pop(output.request_id)
        self.results.write(output_record(request_id, number, output))

    def _fail(self, number: int, request_id: Any, reason: str) -> None:
        """One line produced no result: say so in OUT and on the log, and go on."""
        self.results.write(error_record(request_id, number, reason))


class ResultWriter:
    """Appends records to OUT, each flushed as it is written (OUT is the checkpoint), and
    counts them in the summary and on the progress bar; an error record is also reported on
    the log as IN:LINE: reason. The local job and the Ray job's driver write through it."""

    def __init__(self, out: TextIO, in_path: Path, summary: BatchSummary, progress: Progress):
        self.out, self.in_path, self.summary, self.progress = out, in_path, summary, progress

    def write(self, record: dict) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        if "error" in record:
            self.summary.failed += 1
            self.progress.note(f"{self.in_path}:{record['line']}: {record['error']}")
            self.progress.advance()
        else:
            self.summary.written += 1
            self.summary.generated_tokens += record["completion_tokens"]
            self.progress.advance(record["completion_tokens"])


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity parse in Python but are not JSON, and would not survive into OUT."""
    raise BadLine(f"not valid JSON ({name} is not a JSON number)")
