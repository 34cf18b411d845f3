"""OpenAI API request bodies and the response objects built from engine outputs.

Requests are pydantic models that forbid unknown fields, so a misspelt parameter is a 400
rather than silently ignored. Fields OpenAI documents fall in three groups: those lamina
honours; those that cannot change its answer (bookkeeping such as `store` and `metadata`,
caching and latency hints, tool options when no tool is called), accepted and ignored as
vLLM does, so that OpenAI's SDKs and the frameworks on them work unchanged (`_IgnoredFields`);
and those that would change the answer but that lamina cannot honour (audio, web search, a
suffix, the deprecated `functions`), refused with a 400 that says so. Tools are honoured
(engine/chat_tools.py). Extensions that vLLM and llama.cpp's server also
accept (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, vLLM's guided_json,
guided_regex, guided_choice and guided_grammar) are allowed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.async_engine import CompletionDelta
from engine.outputs import TokenLogprob
from engine.sampling import SamplingParams, sampling_kwargs
from engine.structured import GUIDED_FORMATS, response_format_fields


class OpenAIError(Exception):
    """An error the client caused, sent as OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: lamina's chunks carry no padding


class _IgnoredFields(BaseModel):
    """Fields OpenAI's SDKs may send that cannot change lamina's answer: accepted, ignored."""

    model_config = ConfigDict(extra="forbid")

    user: str | None = None
    store: bool | None = None  # lamina stores nothing
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache needs no key
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # a latency hint: the answer stays the same
    reasoning_effort: str | None = None  # lamina's models answer without a reasoning phase


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    presence_penalty: float | None = None  # None: SamplingParams' default
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's structured-output extensions (SamplingParams' fields of the same names).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, best_of: int | None = None
    ) -> SamplingParams:
        """The request as SamplingParams; InvalidInputError (-> 400) for values out of range."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed with stream: true")
        # Fields named as in SamplingParams map by name; these three differ per endpoint.
        given = {"max_tokens": max_tokens, "logprobs": logprobs, "best_of": best_of}
        structured = response_format_fields(self.response_format)
        if structured and any(getattr(self, name) is not None for name in GUIDED_FORMATS):
            raise OpenAIError("give response_format or a guided_* field, not both")
        return SamplingParams(**{**sampling_kwargs(self), **given, **structured})

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields, _IgnoredFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(i, int) for i in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts or not all(prompts):
            raise OpenAIError("prompt is empty: there is no token to start from", param="prompt")
        return prompts

    def params(self, context_window: int) -> SamplingParams:
        if self.suffix:
            raise OpenAIError("suffix (insertion) is not supported by lamina", param="suffix")
        if self.echo and self.logprobs is not None:
            raise OpenAIError(
                "echo with logprobs (prompt log-probabilities) is not supported", param="echo"
            )
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise OpenAIError("best_of > n cannot be streamed", param="best_of")
        max_tokens = context_window if self.max_tokens is None else self.max_tokens
        return self.sampling_params(max_tokens, self.logprobs, self.best_of)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a "tool" message answers
    # What the openai SDK sends back with an assistant message it received: not rendered.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # Chat templates know "system", not OpenAI's newer "developer".
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields, _IgnoredFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Extra chat template variables, as vLLM accepts them ({"enable_thinking": false}).
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Refused by `_refuse_unsupported` when they ask for what lamina cannot do.
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools
    function_call: Any = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    def _refuse_unsupported(self) -> None:
        # Functions the model may not call change nothing (OpenAI's "none").
        if self.function_call != "none" and (
            self.functions or self.function_call not in (None, "auto")
        ):
            raise OpenAIError(
                "the deprecated functions are not supported by lamina; use tools (functions "
                'are accepted with function_call: "none")',
                param="functions" if self.functions else "function_call",
            )
        if self.modalities is not None and set(self.modalities) != {"text"}:
            raise OpenAIError(
                "output modalities other than text are not supported", param="modalities"
            )
        refused = {
            "audio": self.audio is not None,
            "verbosity": self.verbosity not in (None, "medium"),
            "web_search_options": self.web_search_options is not None,
            "moderation": self.moderation is not None,
        }
        for field, asked in refused.items():
            if asked:
                raise OpenAIError(f"{field} is not supported by lamina", param=field)

    def params(self, context_window: int) -> SamplingParams:
        self._refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        limit = (
            self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = context_window if limit is None else limit
        return self.sampling_params(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobFormatter:
    """Turns TokenLogprobs into OpenAI's two logprobs shapes, decoding each token's text."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, items: list[TokenLogprob], offset: int) -> dict[str, list]:
        """The legacy completions shape; offset is where the first token's text starts."""
        tokens = [self._text(t.token_id) for t in items]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{self._text(i): lp for i, lp in t.top} for t in items],
            "text_offset": offsets,
        }

    def chat(self, items: list[TokenLogprob]) -> dict[str, list]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                for t in items
            ]
        }


def finish_reason(delta: CompletionDelta) -> str | None:
    """OpenAI's finish reasons are "stop" and "length"; lamina's "abort" has no equivalent
    and only reaches a client together with an error."""
    return delta.finish_reason if delta.finish_reason in ("stop", "length") else None
