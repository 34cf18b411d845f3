"""Sampling: turn one row of logits into one token id.

The order of operations follows vLLM so that the same parameters give the same distribution:
penalties (repetition over prompt + output, then frequency and presence over output), then greedy
argmax when temperature is 0, else temperature, top-k, top-p, min-p and one seeded draw.

Everything is vectorised numpy over a single row. The full-vocabulary passes (exp, sum, compare)
are unavoidable; everything else (sorting for top-p, the cumulative sum for the draw) is done on
small subsets or per block, because a plain `argsort` or float64 `cumsum` over a 150k vocabulary
costs several milliseconds on a laptop, more than a decode step of a small model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import InvalidInputError
from engine.structured import check_guided_fields

if TYPE_CHECKING:
    from engine.structured import Guide

# Temperatures below this are treated as greedy (as in vLLM): dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5
# Block length for the two-level cumulative-sum search used by the draw and by top-p.
_BLOCK = 1024
# Below this length a plain float64 cumsum is cheaper than the blocked search.
_SMALL = 4 * _BLOCK
# OpenAI's documented range for presence and frequency penalties.
_PENALTY_RANGE = 2.0
# Most alternatives per token that `logprobs` may ask for (OpenAI's limit for chat).
MAX_LOGPROBS = 20
# How --help describes a None default that SamplingParams.with_defaults fills from the model.
_MODEL = "the model's"


def _doc(help: str, *, cli: bool = False, unset: str | None = None) -> dict[str, Any]:
    """A SamplingParams field's metadata: what the CLI, batch files and server derive from it.

    help: one line for --help and docs. cli: exposed as a `--name-with-dashes` flag.
    unset: what a None default means, for --help.
    """
    return {"help": help, "cli": cli, "unset": unset}


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    This is the one list of sampling fields: `lamina` flags (fields marked `cli`), the fields a
    batch line accepts and the server's request fields all come from it (`sampling_kwargs`).

    `temperature`, `top_p` and `top_k` default to None, meaning "use the model's generation
    config"; `with_defaults` resolves them before a `Sampler` is built. `top_k` of 0 or -1
    disables top-k explicitly (-1 is normalised to 0), which overrides a model default.

    n > 1 returns several completions of one prompt; they share the prompt's KV blocks.
    best_of (default n) sequences are generated and the n with the highest cumulative
    log-probability are returned. use_beam_search keeps the best_of most likely sequences at
    each step instead of sampling (deterministic; temperature and penalties do not apply), and
    ranks finished beams by cumulative log-probability / length ** length_penalty.

    logprobs (0 to 20) returns, for every generated token, the model's log-probability of it
    and of the `logprobs` most likely tokens at that step (raw logits, as in vLLM).
    logit_bias maps token ids to values in [-100, 100] added to their logits before sampling
    (OpenAI's field: -100 bans a token, 100 all but forces it).

    guided_json (a JSON schema), guided_regex, guided_choice and guided_grammar (vLLM's names;
    at most one) constrain the output: tokens the constraint rejects are never sampled, and
    the completion ends when it is complete (engine/structured.py).
    """

    max_tokens: int = field(
        default=256, metadata=_doc("tokens to generate per completion", cli=True)
    )
    temperature: float | None = field(
        default=None, metadata=_doc("0 means greedy", cli=True, unset=_MODEL)
    )
    top_p: float | None = field(
        default=None,
        metadata=_doc(
            "sample among the most likely tokens holding this probability mass",
            cli=True,
            unset=_MODEL,
        ),
    )
    top_k: int | None = field(
        default=None,
        metadata=_doc(
            "sample among the k most likely tokens (0 or -1: all)", cli=True, unset=_MODEL
        ),
    )
    min_p: float = field(
        default=0.0,
        metadata=_doc("drop tokens less likely than min_p times the likeliest", cli=True),
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata=_doc("above 1 makes tokens of the prompt and output less likely", cli=True),
    )
    presence_penalty: float = field(
        default=0.0,
        metadata=_doc(
            "subtracted from the logit of every token already generated (-2 to 2)", cli=True
        ),
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata=_doc(
            "subtracted per earlier occurrence of a token in the output (-2 to 2)", cli=True
        ),
    )
    seed: int | None = field(
        default=None, metadata=_doc("same seed, same text", cli=True, unset="random")
    )
    stop: list[str] | str | None = field(
        default=None,
        metadata=_doc(
            "stop at this string, which is left out of the text (repeatable)",
            cli=True,
            unset="none",
        ),
    )
    stop_token_ids: list[int] | None = field(
        default=None, metadata=_doc("token ids that end generation")
    )
    ignore_eos: bool = field(
        default=False, metadata=_doc("keep generating past the end-of-sequence token", cli=True)
    )
    skip_special_tokens: bool = field(
        default=True, metadata=_doc("leave special tokens out of the text")
    )
    include_stop_str_in_output: bool = field(
        default=False, metadata=_doc("keep the matched stop string in the text")
    )
    n: int = field(default=1, metadata=_doc("completions returned per prompt"))
    best_of: int | None = field(
        default=None, metadata=_doc("completions generated, the n likeliest returned", unset="n")
    )
    use_beam_search: bool = field(
        default=False, metadata=_doc("beam search of width best_of instead of sampling")
    )
    length_penalty: float = field(
        default=1.0, metadata=_doc("beam score = logprob / length ** length_penalty")
    )
    logprobs: int | None = field(
        default=None,
        metadata=_doc(
            f"log-probabilities of the chosen and the k likeliest tokens (0-{MAX_LOGPROBS})",
            unset="none",
        ),
    )
    logit_bias: dict[int, float] | None = field(
        default=None,
        metadata=_doc("token id -> value in [-100, 100] added to its logit", unset="none"),
    )
    guided_json: dict[str, Any] | str | None = field(
        default=None,
        metadata=_doc("constrain the output to JSON valid under this schema", unset="none"),
    )
    guided_regex: str | None = field(
        default=None, metadata=_doc("constrain the output to a full match of this regex")
    )
    guided_choice: list[str] | None = field(
        default=None, metadata=_doc("constrain the output to one of these strings")
    )
    guided_grammar: str | None = field(
        default=None,
        metadata=_doc("constrain the output to this grammar (Lark, or GBNF as llama.cpp's)"),
    )

    def __post_init__(self) -> None:
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            _require(
                isinstance(value, (bool, np.bool_)), f"{name} must be true or false, got {value!r}"
            )
            setattr(self, name, bool(value))
        self.max_tokens = _as_int("max_tokens", self.max_tokens)
        _require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        self._check_sampling_knobs()
        self._check_penalties()
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_token_ids(self.stop_token_ids)
        self._check_parallel()
        if self.logprobs is not None:
            self.logprobs = _as_int("logprobs", self.logprobs)
            _require(
                0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            )
            _require(not self.use_beam_search, "logprobs are not supported with beam search")
        self.logit_bias = _normalize_bias(self.logit_bias)
        check_guided_fields(self)

    def _check_parallel(self) -> None:
        self.n = _as_int("n", self.n)
        _require(self.n >= 1, f"n must be >= 1, got {self.n}")
        self.best_of = self.n if self.best_of is None else _as_int("best_of", self.best_of)
        _require(self.best_of >= self.n, f"best_of ({self.best_of}) must be >= n ({self.n})")
        self.length_penalty = _as_float("length_penalty", self.length_penalty)
        if self.use_beam_search:
            _require(not self.stop, "stop strings are not supported with beam search")
            _require(
                self.repetition_penalty == 1.0
                and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0,
                "penalties are not supported with beam search",
            )

    def _check_sampling_knobs(self) -> None:
        if self.temperature is not None:
            self.temperature = _as_float("temperature", self.temperature)
            _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None:
            self.top_p = _as_float("top_p", self.top_p)
            _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            self.top_k = _as_int("top_k", self.top_k)
            _require(
                self.top_k >= -1, f"top_k must be >= 1, or 0 / -1 to disable, got {self.top_k}"
            )
            self.top_k = max(self.top_k, 0)
        self.min_p = _as_float("min_p", self.min_p)
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")

    def _check_penalties(self) -> None:
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        _require(
            self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            _require(
                -_PENALTY_RANGE <= value <= _PENALTY_RANGE,
                f"{name} must be in [-2, 2], got {value}",
            )
            setattr(self, name, value)

    @property
    def is_resolved(self) -> bool:
        """True when no field still waits for a model default."""
        return None not in (self.temperature, self.top_p, self.top_k)

    def with_defaults(self, defaults: Mapping[str, Any] | None) -> SamplingParams:
        """Fill the None fields from a model's generation config, then from neutral values.

        `defaults` is shaped like HF's generation_config.json (`temperature`, `top_p`, `top_k`,
        `do_sample`; other keys are ignored). As in HF `generate`, an explicit
        `do_sample: false` makes the default greedy. What is still unset falls back to
        temperature 1.0, top_p 1.0 and top-k disabled, i.e. plain sampling.
        """
        d = dict(defaults or {})
        temperature = self.temperature
        if temperature is None:
            temperature = 0.0 if d.get("do_sample") is False else d.get("temperature")
        return replace(
            self,
            temperature=1.0 if temperature is None else temperature,
            top_p=_first_set(self.top_p, d.get("top_p"), 1.0),
            top_k=_first_set(self.top_k, d.get("top_k"), 0),
        )


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
BOOL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(SamplingParams) if isinstance(f.default, bool)
)


def cli_fields() -> list[Any]:
    """The SamplingParams fields that are `lamina` flags (dataclasses.Field objects)."""
    return [f for f in fields(SamplingParams) if f.metadata["cli"]]


def sampling_kwargs(source: Mapping[str, Any] | object) -> dict[str, Any]:
    """The SamplingParams keyword arguments set in `source`: a mapping (a batch line, a JSON
    body) or an object with attributes (parsed flags, a pydantic request).

    Only SamplingParams field names are picked; None means "not given", so it is left out and
    SamplingParams' own default (or the model's, through `with_defaults`) applies.
    """
    if isinstance(source, Mapping):
        values = {name: source.get(name) for name in SAMPLING_FIELDS}
    else:
        values = {name: getattr(source, name, None) for name in SAMPLING_FIELDS}
    return {name: value for name, value in values.items() if value is not None}


class Sampler:
    """Picks the next token of one request from its logits.

    One Sampler per request: it owns the request's random generator, so a fixed seed gives the
    same sequence of draws whatever else the engine is doing.
    """

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        if int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if not params.is_resolved:
            params = params.with_defaults(None)
        self.params = params
        self.vocab_size = int(vocab_size)
        self.is_greedy = params.temperature < _GREEDY_EPS
        self._inv_temperature = 1.0 if self.is_greedy else 1.0 / params.temperature
        self._top_k = params.top_k
        self._top_p = params.top_p
        self._min_p = params.min_p
        self._penalized = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        seed = None if params.seed is None else params.seed % 2**64
        self._rng = np.random.default_rng(seed)
        self._prompt_source: object = None
        self._prompt_key: tuple[int, int] | None = None
        self._prompt_unique = np.empty(0, dtype=np.int64)

    def sample(
        self,
        logits: np.ndarray,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        guide: Guide | None = None,
    ) -> int:
        """Return the next token id, always < vocab_size (padded head columns are ignored);
        with a `guide`, one its grammar allows (masked before anything else applies)."""
        x = _logits_row(logits, self.vocab_size)
        if guide is not None:
            x = guide.apply(x, self.vocab_size)  # a copy
        if self._bias_ids.size:
            x = x.copy() if guide is None else x
            x[self._bias_ids] += self._bias_values
        if self._penalized:
            x = apply_penalties(x, self._unique_prompt(prompt_ids, len(x)), output_ids, self.params)
        if self.is_greedy:
            return _greedy(x)
        return self._draw(x)

    def _unique_prompt(self, prompt_ids: Sequence[int], n: int) -> np.ndarray:
        """Prompt ids in range, deduplicated once per request rather than once per token.

        The cache is keyed on the identity and length of the sequence the engine passes, so a
        prompt list that grows (or a different one) is converted again.
        """
        key = (len(prompt_ids), n)
        if prompt_ids is not self._prompt_source or key != self._prompt_key:
            self._prompt_unique = np.unique(_token_ids(prompt_ids, n))
            # Holding the object (not its id) means a freed list's id can never alias it.
            self._prompt_source, self._prompt_key = prompt_ids, key
        return self._prompt_unique

    def _draw(self, x: np.ndarray) -> int:
        """Temperature, top-k, top-p, min-p, then one draw from the seeded generator."""
        n = len(x)
        candidates = None
        if 0 < self._top_k < n:
            # top-k commutes with temperature scaling, so select on raw logits and only
            # exponentiate the k survivors.
            candidates = np.argpartition(x, n - self._top_k)[n - self._top_k :]
            x = x[candidates]
        top = x.max()
        if not np.isfinite(top):
            return _degenerate_choice(x, candidates, top, self._rng.random())
        with np.errstate(over="ignore"):
            weights = x - top
            weights *= np.float32(self._inv_temperature)
        np.exp(weights, out=weights)  # unnormalised probabilities, the largest is exactly 1
        threshold = self._min_p  # min-p relative to the max probability, which is 1 here
        if self._top_p < 1.0:
            threshold = max(threshold, _nucleus_threshold(weights, self._top_p))
        u = self._rng.random()
        if threshold > 0.0:
            kept = np.flatnonzero(weights >= threshold)
            index = int(kept[_draw_index(weights[kept], u)])
        else:
            index = _draw_index(weights, u)
        return index if candidates is None else int(candidates[index])


def apply_penalties(
    logits: np.ndarray,
    prompt_ids: Sequence[int] | np.ndarray,
    output_ids: Sequence[int] | np.ndarray,
    params: SamplingParams,
) -> np.ndarray:
    """Return a float32 copy of `logits` with repetition, frequency and presence penalties.

    Repetition (HF/vLLM rule) covers every token seen in prompt or output: positive logits are
    divided by the penalty and negative ones multiplied, so a penalty > 1 always makes a seen
    token less likely. Frequency and presence (OpenAI semantics) cover output tokens only:
    `logit -= frequency * count + presence * (count > 0)`. Ids outside the row are ignored.
    """
    x = np.array(logits, dtype=np.float32, copy=True)
    n = len(x)
    out = _token_ids(output_ids, n)
    penalty = params.repetition_penalty
    if penalty != 1.0:
        seen = np.concatenate([_token_ids(prompt_ids, n), out])
        # Duplicated ids are fine: each write computes from the same original value.
        values = x[seen]
        x[seen] = np.where(values > 0, values / penalty, values * penalty)
    if out.size and (params.frequency_penalty or params.presence_penalty):
        ids, counts = np.unique(out, return_counts=True)
        x[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return x


def log_softmax(logits: np.ndarray, vocab_size: int) -> np.ndarray:
    """Log-probabilities of the first vocab_size logits, in float64 for stable sums."""
    x = _logits_row(logits, vocab_size).astype(np.float64)
    x -= x.max()
    x -= np.log(np.exp(x).sum())
    return x


def token_logprob(logits: np.ndarray, token: int, vocab_size: int) -> float:
    """The model's log-probability of `token` (raw logits: before penalties and temperature)."""
    x = _logits_row(logits, vocab_size)
    top = float(x.max())
    return float(x[token]) - top - math.log(float(np.exp(x - top, dtype=np.float64).sum()))


def top_logprobs(
    logits: np.ndarray, token: int, k: int, vocab_size: int
) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the k most likely (id, logprob), most likely first."""
    x = log_softmax(logits, vocab_size)
    if k == 0:
        return float(x[token]), []
    top = np.argpartition(x, -k)[-k:] if k < x.size else np.arange(x.size)
    top = top[np.argsort(-x[top], kind="stable")]
    return float(x[token]), [(int(i), float(x[i])) for i in top]


def _logits_row(logits: np.ndarray, vocab_size: int) -> np.ndarray:
    """View the first vocab_size logits as float32 without copying when possible."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 1:
        if x.ndim == 2 and x.shape[0] == 1:
            x = x[0]
        else:
            raise ValueError(f"expected one row of logits, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("logits are empty")
    return x[:vocab_size]


def _token_ids(ids: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Token ids as int64, dropping any outside [0, n)."""
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= n):
        a = a[(a >= 0) & (a < n)]
    return a


def _greedy(x: np.ndarray) -> int:
    """Argmax, refusing rows where no token is valid (NaN, or every logit -inf)."""
    index = int(np.argmax(x))  # numpy's argmax returns the first NaN if there is one
    value = x[index]
    if np.isnan(value):
        raise ValueError("logits contain NaN")
    if value == -np.inf:
        raise ValueError("every logit is -inf: no token can be sampled")
    return index


def _degenerate_choice(x: np.ndarray, candidates: np.ndarray | None, top: float, u: float) -> int:
    """Handle a non-finite maximum: +inf tokens share the mass, NaN or all -inf is an error."""
    if np.isnan(top):
        raise ValueError("logits contain NaN")
    if top == -np.inf:
        raise ValueError("every logit is -inf: no token can be sampled")
    infinite = np.flatnonzero(x == np.inf)
    index = int(infinite[min(int(u * len(infinite)), len(infinite) - 1)])
    return index if candidates is None else int(candidates[index])


def _nucleus_threshold(weights: np.ndarray, top_p: float) -> float:
    """Smallest weight kept by top-p: the nucleus is every token with weight >= it.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p. Sorting
    ascending, tokens are dropped from the bottom while the dropped mass stays <= (1 - top_p),
    as vLLM does; ties with the boundary token are kept. Tokens lighter than
    (1 - top_p) * total / n cannot be in the nucleus (all of them together weigh less than
    what may be dropped), so only the heavier ones are sorted.
    """
    total = float(weights.sum(dtype=np.float64))
    budget = (1.0 - top_p) * total  # mass that may be dropped from the bottom
    if len(weights) > _SMALL:
        ordered = weights[weights >= budget / len(weights)]  # a fresh copy: sort in place
        budget -= total - float(ordered.sum(dtype=np.float64))
        ordered.sort()
    else:
        ordered = np.sort(weights)
    return float(ordered[_first_exceeding(ordered, budget)])


def _draw_index(weights: np.ndarray, u: float) -> int:
    """Index i drawn with probability weights[i] / sum(weights), for u uniform in [0, 1)."""
    total = float(weights.sum(dtype=np.float64))
    index = _first_exceeding(weights, u * total)
    if weights[index] <= 0:
        # Only reachable through rounding at the very top of the range: take the closest
        # token that has mass, never a masked one.
        nonzero = np.flatnonzero(weights[: index + 1])
        index = int(nonzero[-1]) if nonzero.size else int(np.flatnonzero(weights)[0])
    return index


def _first_exceeding(weights: np.ndarray, target: float) -> int:
    """First i with sum(weights[:i + 1]) > target, clamped to the last index.

    Long rows are searched in two levels (per-block sums, then one block) so the cumulative
    sum never runs over the whole row.
    """
    n = len(weights)
    if n <= _SMALL:
        running = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(running, target, side="right")), n - 1)
    full = n // _BLOCK
    block_sums = weights[: full * _BLOCK].reshape(full, _BLOCK).sum(axis=1, dtype=np.float64)
    if n % _BLOCK:
        block_sums = np.append(block_sums, weights[full * _BLOCK :].sum(dtype=np.float64))
    running = np.cumsum(block_sums)
    block = min(int(np.searchsorted(running, target, side="right")), len(running) - 1)
    start = block * _BLOCK
    before = float(running[block - 1]) if block else 0.0
    inner = np.cumsum(weights[start : start + _BLOCK], dtype=np.float64)
    offset = min(int(np.searchsorted(inner, target - before, side="right")), len(inner) - 1)
    return start + offset


def _first_set(*values: Any) -> Any:
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _require(condition: bool, message: str) -> None:
    """Refuse a bad parameter value: the caller's input, so a one-line InvalidInputError."""
    if not condition:
        raise InvalidInputError(message)


def _as_float(name: str, value: Any) -> float:
    """Coerce a numeric parameter, rejecting bools, non-numbers, NaN and infinities."""
    _require(_is_number(value), f"{name} must be a number, got {value!r}")
    result = float(value)
    _require(math.isfinite(result), f"{name} must be finite, got {value!r}")
    return result


def _as_int(name: str, value: Any) -> int:
    """Coerce an integer parameter, rejecting bools and non-integral numbers."""
    _require(
        _is_number(value) and float(value).is_integer(),
        f"{name} must be an integer, got {value!r}",
    )
    return int(value)


def _is_number(value: Any) -> bool:
    """Real numbers only: bool is an int subclass but never a meaningful parameter value."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _normalize_stop(stop: list[str] | str | None) -> list[str]:
    """Stop strings as a list; empty strings are refused since they would match everywhere."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    _require(
        isinstance(stop, (list, tuple)),
        f"stop must be a string or a list of strings, got {stop!r}",
    )
    for s in stop:
        _require(isinstance(s, str) and bool(s), f"stop strings must be non-empty, got {s!r}")
    return list(stop)


def _normalize_bias(bias: Mapping[Any, Any] | None) -> dict[int, float] | None:
    """Token id -> bias, with ids as ints (JSON object keys arrive as strings)."""
    if not bias:
        return None
    _require(isinstance(bias, Mapping), "logit_bias must map token ids to numbers")
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidInputError(f"logit_bias key {key!r} is not a token id") from None
        _require(token >= 0, f"logit_bias key {key!r} is not a token id")
        value = _as_float(f"logit_bias[{key}]", value)
        _require(-100 <= value <= 100, f"logit_bias values must be in [-100, 100], got {value}")
        result[token] = value
    return result


def _normalize_token_ids(ids: Sequence[int] | None) -> list[int]:
    """Stop token ids as a list of non-negative ints."""
    if ids is None:
        return []
    _require(
        isinstance(ids, (list, tuple, np.ndarray)),
        f"stop_token_ids must be a list of ints, got {ids!r}",
    )
    result = [_as_int("stop_token_ids", i) for i in ids]
    for i in result:
        _require(i >= 0, f"stop_token_ids must be >= 0, got {i}")
    return result
