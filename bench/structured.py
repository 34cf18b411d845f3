"""`lamina bench structured`: what structured output (engine/structured.py) costs and whether
its completions hold, on the default model.

- speed: decode tok/s with a JSON schema against unconstrained decode, at batch 1 and at
  batch 16, the four settings taking turns run by run (medians of `runs`). Both sides decode
  the same chat prompts for exactly `gen` tokens (ignore_eos; the schema's minItems keeps a
  constrained completion open past `gen` tokens), so like is compared with like. Batch 1:
  (generated - 1) / (total_s - ttft_s) of the request. Batch 16: aggregate tokens after each
  request's first over the time when all were decoding (every request is submitted at once:
  from the last first token to the last token), as in `lamina bench --batch`; the median
  of the requests' own (generated - 1) / (total_s - ttft_s) is reported beside it.
  During the constrained runs the engine is instrumented from outside: each mask fill
  (`StructuredOutputs._fill`: on a mask thread beside the forward pass when a core is
  spare, else just before it; `mask_overlapped_with_forward` says which) is timed with
  the guides it filled, as is the engine's wait for the masks after the pass (the future
  `fill` returns when it overlaps, wrapped), `Guide.apply` (the mask applied to the logits) and
  `Guide.advance` (the sampled token consumed by the grammar), both on the loop's thread,
  and every `EngineLoop.step`; shares are of the summed step time (prefill steps included).
  The fill's share is of a thread that runs beside the forward pass's threads: it costs
  step time only as far as the cores are shared or the loop waits.
- conformance: the 50 schemas of bench/data/schemas.json (nesting, enums, arrays with
  min/maxItems, optional fields, patterns, formats, number and integer bounds, booleans,
  nulls, anyOf/oneOf/allOf, const, prefixItems, $defs/$ref), each with a prompt asking for
  such an object, generated greedily and once sampled (temperature 0.7, fixed seed) with
  CONFORMANCE_MAX_TOKENS. A completion passes when it finished with "stop", parses with
  json.loads and validates with jsonschema (Draft 2020-12, with its format checker, which
  checks the formats listed in `formats_checked`). Every failure is listed with its reason.
  The schemas bound their output: every string that no enum, const, pattern or fixed-length
  format bounds has a maxLength (a time or date-time too: llguidance lets them run on in
  fractional digits), every array maxItems,
  every object additionalProperties false. maxLength counts characters, not tokens (an
  emoji is several), hence the generous max_tokens. What no JSON-schema keyword bounds is
  the whitespace between tokens, which llguidance's JSON grammar leaves free by default.
- refused: JSON-schema keywords llguidance refuses to compile (probed, not generated).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Self

SCHEMAS = Path(__file__).parent / "data" / "schemas.json"
CONFORMANCE_MAX_TOKENS = 512
SAMPLED = {"temperature": 0.7, "seed": 1234}
BATCHES = (1, 16)
SUFFIX = " Reply with JSON only."

# A schema that keeps a completion going: at least 20 records of about 15 tokens each.
SPEED_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 20,
            "maxItems": 60,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string", "maxLength": 24},
                    "member": {"type": "boolean"},
                },
                "required": ["name", "age", "city", "member"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}
SPEED_TOPICS = (
    "club members", "customers of a bakery", "chess players", "hikers", "students",
    "musicians", "painters", "nurses", "pilots", "gardeners",
    "librarians", "runners", "chefs", "teachers", "sailors", "farmers",
)  # fmt: skip

# Keywords probed for refusal, each in a schema that is otherwise plain.
REFUSAL_PROBES = {
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "string"}, "then": {"minLength": 1}, "else": {}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "dependentSchemas": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "maxProperties (optional keys)": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "maxProperties": 1,
    },
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
    "unevaluatedProperties": {"type": "object", "unevaluatedProperties": False},
    "format: unknown": {"type": "string", "format": "no-such-format"},
    "recursive $ref": {
        "$defs": {"node": {"type": "object", "properties": {
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node",
    },
    "patternProperties": {"type": "object", "patternProperties": {"^a": {"type": "integer"}}},
}  # fmt: skip
FORMATS_PROBED = (
    "date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
    "uuid",
)  # fmt: skip


def run_structured(model: str | None, quant: str | None, gen: int, runs: int) -> list[dict]:
    from bench.run import resolve_model
    from engine import LLM

    llm = LLM(resolve_model(model), quant=quant, max_num_seqs=64)
    speed = speed_figures(llm, gen, runs)
    speed.update({"kind": "speed", "model": model or "default"})
    conformance = conformance_figures(llm)
    conformance.update({"kind": "conformance", "model": model or "default"})
    return [speed, conformance]


def _chat_ids(llm, text: str) -> list[int]:
    return llm.encode_chat([{"role": "user", "content": text + SUFFIX}])[1]


class MaskTimer:
    """Times structured output inside the engine while active, from outside it: the mask
    fills (on the mask thread), the loop's waits for them, Guide.apply and Guide.advance
    (on the loop's thread) and the steps."""

    def __init__(self, llm) -> None:
        self.engine = llm.engine_loop
        self.structured = self.engine.ctx.structured
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.fill_s = self.wait_s = self.apply_s = self.advance_s = self.step_s = 0.0
        self.fills = self.guides = self.waits = self.applies = self.advances = self.steps = 0
        self.overlapped = False  # whether the fills ran beside the forward pass (a spare core)

    def __enter__(self) -> Self:
        from engine.structured import Guide

        structured, engine, timer = self.structured, self.engine, self
        fill, fill_now_or_later, step = structured._fill, structured.fill, engine.step
        apply, advance = Guide.apply, Guide.advance

        def timed_fill(guides):
            t = time.perf_counter()
            try:
                return fill(guides)
            finally:
                with timer.lock:
                    timer.fill_s += time.perf_counter() - t
                    timer.fills += 1
                    timer.guides += len(guides)

        def timed_fill_now_or_later(guides, overlap):
            timer.overlapped = overlap
            future = fill_now_or_later(guides, overlap)
            return None if future is None else _TimedFuture(future, timer)

        def timed_step():
            t = time.perf_counter()
            try:
                return step()
            finally:
                timer.step_s += time.perf_counter() - t
                timer.steps += 1

        def timed_apply(guide, logits, vocab_size):
            t = time.perf_counter()
            try:
                return apply(guide, logits, vocab_size)
            finally:
                timer.apply_s += time.perf_counter() - t
                timer.applies += 1

        def timed_advance(guide, token):
            t = time.perf_counter()
            try:
                return advance(guide, token)
            finally:
                timer.advance_s += time.perf_counter() - t
                timer.advances += 1

        self._restore = (Guide, apply, advance)
        structured._fill, structured.fill = timed_fill, timed_fill_now_or_later
        engine.step = timed_step
        Guide.apply, Guide.advance = timed_apply, timed_advance
        return self

    def __exit__(self, *exc: object) -> None:
        guide_class, apply, advance = self._restore
        guide_class.apply, guide_class.advance = apply, advance
        del self.structured._fill, self.structured.fill, self.engine.step

    def figures(self, prefix: str) -> dict:
        step = max(self.step_s, 1e-12)
        return {
            f"{prefix}_steps": self.steps,
            f"{prefix}_mask_overlapped_with_forward": self.overlapped,
            f"{prefix}_step_ms": 1e3 * self.step_s / max(1, self.steps),
            f"{prefix}_mask_fill_calls": self.fills,
            f"{prefix}_mask_fill_ms_per_call": 1e3 * self.fill_s / max(1, self.fills),
            f"{prefix}_mask_fill_ms_per_guide": 1e3 * self.fill_s / max(1, self.guides),
            f"{prefix}_mask_fill_share_of_step": self.fill_s / step,
            f"{prefix}_mask_wait_ms_per_step": 1e3 * self.wait_s / max(1, self.waits),
            f"{prefix}_mask_wait_share_of_step": self.wait_s / step,
            f"{prefix}_mask_apply_ms_per_token": 1e3 * self.apply_s / max(1, self.applies),
            f"{prefix}_mask_apply_share_of_step": self.apply_s / step,
            f"{prefix}_guide_advance_ms_per_token": 1e3 * self.advance_s / max(1, self.advances),
            f"{prefix}_guide_advance_share_of_step": self.advance_s / step,
        }


class _TimedFuture:
    """A mask future whose result() (the loop waiting for the masks) is timed."""

    def __init__(self, future, timer: MaskTimer) -> None:
        self._future, self._timer = future, timer

    def result(self, timeout: float | None = None):
        t = time.perf_counter()
        try:
            return self._future.result(timeout)
        finally:
            self._timer.wait_s += time.perf_counter() - t
            self._timer.waits += 1

    def __getattr__(self, name: str):
        return getattr(self._future, name)


def _decode_speeds(outputs) -> tuple[float, float]:
    """(aggregate decode tok/s over the time all decoded, median per-request decode tok/s)."""
    start = max(o.metrics.ttft_s for o in outputs)
    end = max(o.metrics.total_s for o in outputs)
    aggregate = sum(o.metrics.generated_tokens - 1 for o in outputs) / (end - start)
    own = [
        (o.metrics.generated_tokens - 1) / (o.metrics.total_s - o.metrics.ttft_s) for o in outputs
    ]
    return aggregate, statistics.median(own)


def speed_figures(llm, gen: int, runs: int) -> dict:
    from engine import SamplingParams

    prompts = [
        _chat_ids(llm, f"List {t} with their name, age, city and membership as JSON.")
        for t in SPEED_TOPICS
    ]
    plain = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    guided = SamplingParams(
        max_tokens=gen, temperature=0, ignore_eos=True, guided_json=SPEED_SCHEMA
    )
    timers = {b: MaskTimer(llm) for b in BATCHES}
    for b in BATCHES:  # warm-up: numba shapes, the llguidance tokenizer, the compiled schema
        llm.generate(prompts[:b], SamplingParams(max_tokens=8, temperature=0))
        llm.generate(prompts[:b], SamplingParams(max_tokens=8, temperature=0,
                                                 guided_json=SPEED_SCHEMA))  # fmt: skip
    samples: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    finish: dict[str, set] = {}
    for _ in range(runs):  # settings take turns, so a swing in the machine's speed hits all
        for b in BATCHES:
            for mode, params in (("unconstrained", plain), ("constrained", guided)):
                if mode == "constrained":
                    with timers[b]:
                        outputs = llm.generate(prompts[:b], params)
                else:
                    outputs = llm.generate(prompts[:b], params)
                errors = [o.error for o in outputs if o.error]
                if errors:
                    raise RuntimeError(f"batch {b} {mode}: {errors[0]}")
                aggregate, own = _decode_speeds(outputs)
                key = f"batch{b}_{mode}"
                samples.setdefault(f"{key}_decode_tok_s", []).append(aggregate)
                if b > 1:
                    samples.setdefault(f"{key}_per_request_median_tok_s", []).append(own)
                tokens.setdefault(key, []).extend(o.metrics.generated_tokens for o in outputs)
                finish.setdefault(key, set()).update(o.finish_reason for o in outputs)
    result: dict = {"schema_min_items": SPEED_SCHEMA["properties"]["records"]["minItems"],
                    "gen_tokens": gen, "runs": runs}  # fmt: skip
    for key, values in samples.items():
        result[key] = statistics.median(values)
    for b in BATCHES:
        for mode in ("unconstrained", "constrained"):
            key = f"batch{b}_{mode}"
            result[f"{key}_generated_tokens_median"] = statistics.median(tokens[key])
            result[f"{key}_finish_reasons"] = sorted(finish[key])
        ratio = (
            result[f"batch{b}_constrained_decode_tok_s"]
            / result[f"batch{b}_unconstrained_decode_tok_s"]
        )
        result[f"batch{b}_constrained_vs_unconstrained"] = ratio
        if b > 1:
            result[f"batch{b}_per_request_constrained_vs_unconstrained"] = (
                result[f"batch{b}_constrained_per_request_median_tok_s"]
                / result[f"batch{b}_unconstrained_per_request_median_tok_s"]
            )
        result.update(timers[b].figures(f"batch{b}_constrained"))
    result["target_constrained_vs_unconstrained"] = 0.9
    return result


def load_schemas() -> list[dict]:
    return json.loads(SCHEMAS.read_text())


def _check(output, schema: dict, validator_class, format_checker) -> str | None:
    """None if the completion passes, else why not."""
    if output.error:
        return f"error: {output.error}"
    if output.finish_reason != "stop":
        why = f"finish_reason {output.finish_reason} after {len(output.token_ids)} tokens"
        blank = len(output.text) - len(output.text.rstrip())
        if blank >= 32:  # the grammar's free whitespace, not the schema, let it run on
            why += f", the last {blank} characters whitespace"
        return why
    try:
        value = json.loads(output.text)
    except json.JSONDecodeError as error:
        return f"not JSON: {error}"
    errors = list(validator_class(schema, format_checker=format_checker).iter_errors(value))
    if errors:
        return "invalid: " + "; ".join(e.message for e in errors[:3])
    return None


def conformance_figures(llm) -> dict:
    import jsonschema

    from engine import SamplingParams

    validator_class = jsonschema.Draft202012Validator
    format_checker = validator_class.FORMAT_CHECKER
    entries = load_schemas()
    runs = {"greedy": {"temperature": 0.0}, "sampled": SAMPLED}
    requests, labels = [], []
    for run, how in runs.items():
        for entry in entries:
            params = SamplingParams(
                max_tokens=CONFORMANCE_MAX_TOKENS, guided_json=entry["schema"], **how
            )
            requests.append((_chat_ids(llm, entry["prompt"]), params))
            labels.append((run, entry))
    t = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], [s for _, s in requests])
    wall = time.perf_counter() - t
    failures, passed = [], {run: 0 for run in runs}
    for (run, entry), output in zip(labels, outputs, strict=True):
        reason = _check(output, entry["schema"], validator_class, format_checker)
        if reason is None:
            passed[run] += 1
        else:
            failures.append({"schema": entry["name"], "run": run, "reason": reason,
                             "text": output.text[:300]})  # fmt: skip
    total = len(outputs)
    return {
        "schemas": len(entries),
        "completions": total,
        "passed": sum(passed.values()),
        "pass_rate": sum(passed.values()) / total,
        "passed_greedy": passed["greedy"],
        "passed_sampled": passed["sampled"],
        "sampled": SAMPLED,
        "max_tokens": CONFORMANCE_MAX_TOKENS,
        "generated_tokens": sum(o.metrics.generated_tokens for o in outputs),
        "wall_s": wall,
        "failures": failures,
        "formats_checked": sorted(set(FORMATS_PROBED) & set(format_checker.checkers)),
        "formats_unchecked": sorted(set(FORMATS_PROBED) - set(format_checker.checkers)),
        **_refusals(llm),
    }


def _refusals(llm) -> dict:
    """Which probed keywords and formats llguidance refuses to compile, with its message."""
    from engine import SamplingParams
    from engine.errors import InvalidInputError

    structured = llm.engine_loop.ctx.structured
    probes = dict(REFUSAL_PROBES)
    probes.update({f"format: {f}": {"type": "string", "format": f} for f in FORMATS_PROBED})
    refused, accepted = {}, []
    for name, schema in probes.items():
        try:
            structured.guide(SamplingParams(guided_json=schema), [])
            accepted.append(name)
        except InvalidInputError as error:
            refused[name] = str(error)
    return {"llguidance_refused": refused, "llguidance_accepted_probes": accepted}


def write_structured(rows: list[dict]) -> None:
    """bench/results/structured.json (the rows, stamped with the machine) and a short .md."""
    from bench.report import write_rows

    out = write_rows("structured", rows)
    (out / "structured.md").write_text(_markdown(rows, rows[0]["machine"]))


def _markdown(rows: list[dict], stamp: dict) -> str:
    speed = next(r for r in rows if r["kind"] == "speed")
    conf = next(r for r in rows if r["kind"] == "conformance")
    lines = [
        (
            f"Machine: {stamp['cpu']}, {stamp['isa']}, {stamp['threads']} threads, "
            f"commit {stamp['commit']}; model {speed['model']}, {speed['gen_tokens']} tokens, "
            f"medians of {speed['runs']} interleaved runs."
        ),
        "",
        (
            "| batch | unconstrained tok/s | constrained tok/s | ratio | fill ms/call | "
            "fill ms/guide | fill share | wait ms/step | wait share | apply ms/token | "
            "advance ms/token |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in BATCHES:
        p = f"batch{b}_constrained"
        cells = [
            speed[f"batch{b}_unconstrained_decode_tok_s"], speed[f"{p}_decode_tok_s"],
            speed[f"batch{b}_constrained_vs_unconstrained"], speed[f"{p}_mask_fill_ms_per_call"],
            speed[f"{p}_mask_fill_ms_per_guide"], speed[f"{p}_mask_fill_share_of_step"],
            speed[f"{p}_mask_wait_ms_per_step"], speed[f"{p}_mask_wait_share_of_step"],
            speed[f"{p}_mask_apply_ms_per_token"], speed[f"{p}_guide_advance_ms_per_token"],
        ]  # fmt: skip
        lines.append(f"| {b} | " + " | ".join(f"{c:.4g}" for c in cells) + " |")
    lines += [
        "",
        (
            f"Conformance: {conf['passed']}/{conf['completions']} completions pass "
            f"(greedy {conf['passed_greedy']}/{conf['schemas']}, sampled "
            f"{conf['passed_sampled']}/{conf['schemas']}) over {conf['schemas']} schemas."
        ),
    ]
    for f in conf["failures"]:
        lines.append(f"- {f['schema']} ({f['run']}): {f['reason']}")
    lines.append("")
    lines.append(
        "llguidance refuses: " + (", ".join(conf["llguidance_refused"]) or "nothing probed")
    )
    return "\n".join(lines) + "\n"
