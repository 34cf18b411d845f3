"""Structured output: token masks that keep a completion inside a JSON schema, a regex, a
choice of strings or a grammar, computed by llguidance from the model's own tokenizer.

A request asks for one constraint through SamplingParams' `guided_*` fields (vLLM's names;
the server maps OpenAI's `response_format` onto `guided_json`). `StructuredOutputs`, one per
engine, compiles it when the request is submitted, so a schema or grammar that llguidance
cannot compile is that request's error alone. Each sequence then carries a `Guide`: the
grammar's state after the tokens it has generated. Before a step's forward pass the engine
asks for the next-token masks of every guided sequence the pass will produce logits for, all
at once (`fill`): llguidance computes them on its own threads, without the GIL, while the
model runs when a core is free for them (else just before the pass, where they do not
compete with the kernels for the cores); sampling then sends every disallowed token to -inf
before temperature, top-k/p and the draw. A model's end-of-sequence tokens (and the
request's stop token ids) are allowed exactly when the grammar may stop there; a grammar that
can take no further token ends the completion with finish reason "stop".
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import InvalidInputError
from kernels_cpu.rows import masked_copy_into

if TYPE_CHECKING:
    import llguidance

    from engine.loader.tokenizer import Tokenizer
    from engine.sampling import SamplingParams

# SamplingParams' constraint fields, each with the llguidance grammar format it holds.
GUIDED_FORMATS = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",  # Lark, or GBNF as llama.cpp writes it
}
# JSON may be laid out freely, but whitespace runs are bounded: left free, small models
# fall into emitting whitespace until max_tokens (3 of 50 schemas in `lamina bench
# structured`), as vLLM's disable_any_whitespace also guards against.
_JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,24}"}
# Compiled grammars kept per engine, by their text: a batch job or server often sends one
# schema many times, and compiling a large one takes milliseconds.
_COMPILED_KEPT = 128


def guided_constraint(params: SamplingParams) -> tuple[str, str] | None:
    """(field, text) of a request's constraint, the text as llguidance reads it; None when
    the request has none. SamplingParams has checked that at most one field is set."""
    for name in GUIDED_FORMATS:
        value = getattr(params, name)
        if value is None:
            continue
        if name == "guided_json":
            return name, value if isinstance(value, str) else json.dumps(value)
        if name == "guided_choice":
            return name, json.dumps(value)
        return name, value
    return None


def check_guided_fields(params: SamplingParams) -> None:
    """The shape of the guided_* fields (a grammar's validity needs the tokenizer: later)."""
    given = [name for name in GUIDED_FORMATS if getattr(params, name) is not None]
    if len(given) > 1:
        raise InvalidInputError(f"give one structured-output constraint, not {', '.join(given)}")
    schema = params.guided_json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"guided_json is not valid JSON: {error}") from None
        params.guided_json = schema
    if schema is True:  # JSON schema's "anything"
        schema = params.guided_json = {}
    if schema is not None and not isinstance(schema, dict):
        raise InvalidInputError("guided_json must be a JSON schema (an object, or true)")
    for name in ("guided_regex", "guided_grammar"):
        value = getattr(params, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidInputError(f"{name} must be a non-empty string")
    choice = params.guided_choice
    if choice is not None and (
        not isinstance(choice, list | tuple)
        or not choice
        or not all(isinstance(c, str) and c for c in choice)
    ):
        raise InvalidInputError("guided_choice must be a list of non-empty strings")
    if choice is not None:
        params.guided_choice = list(choice)


def response_format_fields(response_format: Any) -> dict[str, Any]:
    """SamplingParams fields for OpenAI's `response_format`: "text" constrains nothing,
    "json_object" asks for any JSON object, "json_schema" for JSON valid under its
    `json_schema.schema` (strict or not: the constraint is always strict)."""
    if response_format is None:
        return {}
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise InvalidInputError('response_format must be an object with a "type"')
    kind = response_format["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"guided_json": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInputError(
                'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}'
            )
        return {"guided_json": schema}
    raise InvalidInputError(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema"
    )


class Guide:
    """One sequence's place in its grammar, and its next-token mask once filled."""

    def __init__(
        self, matcher: llguidance.LLMatcher, stop_ids: frozenset[int], banned: frozenset[int]
    ) -> None:
        self.matcher = matcher
        self.stop_ids = stop_ids  # the request's: allowed exactly where the grammar may end
        self.banned = banned  # EOS ids llguidance allows that do not stop this request
        self.mask: np.ndarray | None = None  # int32 bit words, filled by StructuredOutputs

    def fork(self) -> Guide:
        """A copy at the same place (and with the same mask), for a sequence forked from
        this one."""
        twin = Guide(self.matcher.deep_copy(), self.stop_ids, self.banned)
        twin.mask = self.mask
        return twin

    def apply(self, logits: np.ndarray, vocab_size: int) -> np.ndarray:
        """A copy of the first vocab_size logits with every disallowed token at -inf. The
        request's stop tokens are allowed exactly when the grammar accepts what came before;
        an EOS that does not stop it (ignore_eos) never is."""
        if self.mask is None:
            raise RuntimeError("the mask of a guided sequence was not computed before sampling")
        x = np.asarray(logits, dtype=np.float32)
        out = np.empty(vocab_size, np.float32)
        masked_copy_into(x, self.mask, out)
        stops = [t for t in self.stop_ids if t < vocab_size]
        if stops:
            out[stops] = x[stops] if self.matcher.is_accepting() else -np.inf
        out[[t for t in self.banned if t < vocab_size]] = -np.inf
        if not np.isfinite(out).any():
            raise InvalidInputError(
                "the structured-output constraint allows only stop tokens here, and the "
                "grammar cannot end yet: remove them from stop_token_ids"
            )
        return out

    def advance(self, token: int) -> bool:
        """Consume a sampled token (not a stop token, which ends the sequence first); True
        when the grammar can take nothing more (the completion is over)."""
        self.mask = None
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


class StructuredOutputs:
    """The engine's llguidance tokenizer, compiled grammars and mask threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool: ThreadPoolExecutor | None = None
        self._executor: Any = None

    @functools.cached_property
    def _lltokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about 0.15 s for a 49k vocabulary): unguided engines never pay."""
        import llguidance

        # At least the tokenizer's own ids (a model's head may have fewer rows, or more).
        vocab = max(self.vocab_size, self._tokenizer.vocab_size)
        return llguidance.LLTokenizer(
            self._tokenizer.backend.to_str(),
            n_vocab=vocab,
            eos_token=list(self._tokenizer.eos_token_ids) or None,
        )

    def guide(self, params: SamplingParams, stop_ids: Sequence[int]) -> Guide | None:
        """A fresh guide for a request's constraint (None without one); raises
        InvalidInputError naming the field when llguidance cannot compile it."""
        constraint = guided_constraint(params)
        if constraint is None:
            return None
        matcher = self._compiled(*constraint)
        stops = frozenset(stop_ids)
        return Guide(matcher.deep_copy(), stops, frozenset(self._lltokenizer.eos_tokens) - stops)

    @functools.lru_cache(maxsize=_COMPILED_KEPT)  # noqa: B019 - one instance per engine
    def _compiled(self, field: str, text: str) -> llguidance.LLMatcher:
        import llguidance

        try:
            if field == "guided_json":  # the schema's own "x-guidance" may override these
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, _JSON_OPTIONS)
            else:
                grammar = llguidance.grammar_from(GUIDED_FORMATS[field], text)
        except ValueError as error:
            raise InvalidInputError(f"{field} cannot be compiled: {_first_line(error)}") from None
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInputError(
                f"{field} cannot be compiled: {_first_line(matcher.get_error())}"
            )
        return matcher

    def fill(self, guides: list[Guide], overlap: bool) -> Future | None:
        """Compute the next-token masks of `guides`, all at once on llguidance's threads.
        With `overlap` (a core the forward pass leaves free) start them in the background
        and return a future done when every guide's `mask` is set; else compute them now:
        on cores the kernels keep busy, a mask thread beside the pass slowed constrained
        decode more than it saved (2 cores, batch 16: 0.94x against 0.96x unconstrained)."""
        if not guides:
            return None
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        if not overlap:
            self._fill(guides)
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lamina-masks")
        return self._pool.submit(self._fill, guides)

    def _fill(self, guides: list[Guide]) -> None:
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

        masks = allocate_token_bitmask(len(guides), self._lltokenizer.vocab_size)
        fill_next_token_bitmask_par(
            self._executor, [(g.matcher, i) for i, g in enumerate(guides)], masks
        )
        for guide, row in zip(guides, masks, strict=True):
            guide.mask = row

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _first_line(error: object) -> str:
    """One line of llguidance's message, which quotes the grammar over several: its first
    line and the lines that name the error."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    kept = lines[:1] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(kept) or "unknown error"
