"""A chat request's tools, from the request to the parsed calls, shared by `LLM.chat` and the
server: how they reach the chat template, how `tool_choice` constrains the reply, and how
the reply's calls are parsed in the syntax the model's template teaches it.

As in OpenAI's API: "auto" (the default with tools) lets the model answer or call, and its
calls are parsed from the text; "required" and a named function constrain the reply to
calls (engine/tool_calls.py writes the grammar, structured output enforces it); "none"
calls nothing, and the tools are then left out of the prompt. `parallel_tool_calls` false
allows one call at most under a constraint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from engine.errors import InvalidInputError
from engine.loader.tokenizer import Tokenizer
from engine.sampling import SamplingParams
from engine.structured import guided_constraint
from engine.tool_calls import (
    GRAMMAR_MARKERS,
    ToolCall,
    ToolCallStream,
    detect_tool_syntax,
    parse_tool_calls,
    tool_call_grammar,
)


@dataclass(frozen=True)
class ChatTools:
    tools: list[dict[str, Any]]
    choice: str | dict[str, Any]  # "auto", "required" or {"type": "function", ...}
    parallel: bool
    syntax: str  # how the model's template writes calls (engine/tool_calls.py)

    @classmethod
    def of(
        cls,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: Any,
        parallel_tool_calls: bool | None,
        tokenizer: Tokenizer,
    ) -> ChatTools | None:
        """The request's tools, checked; None when no tool may be called."""
        if tool_choice is not None and not (
            tool_choice in ("none", "auto", "required") or isinstance(tool_choice, Mapping)
        ):
            raise InvalidInputError(
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}'
            )
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise InvalidInputError("tool_choice names a tool, but the request has no tools")
            return None
        if tool_choice == "none":
            return None
        if not isinstance(tools, Sequence) or not all(isinstance(t, Mapping) for t in tools):
            raise InvalidInputError("tools must be a list of objects")
        template = tokenizer.chat_template or ""
        return cls(
            tools=[dict(t) for t in tools],
            choice="auto" if tool_choice is None else tool_choice,
            parallel=True if parallel_tool_calls is None else bool(parallel_tool_calls),
            syntax=detect_tool_syntax(template),
        )

    def template_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools}

    def constrain(self, params: SamplingParams, tokenizer: Tokenizer) -> SamplingParams:
        """`params` for a reply that may call tools: constrained to calls unless the choice
        is "auto", and keeping special tokens in the text when the call markers are special
        tokens of this vocabulary (Mistral's [TOOL_CALLS]), so the parser sees them."""
        markers = GRAMMAR_MARKERS[self.syntax]
        ids = {m: i for m in markers if (i := _special_id(tokenizer, m)) is not None}
        if ids:
            params = replace(params, skip_special_tokens=False)
        if self.choice == "auto":
            return params
        if guided_constraint(params) is not None:
            raise InvalidInputError(
                "a tool_choice that forces calls cannot be combined with response_format or "
                "guided_* constraints"
            )
        grammar = tool_call_grammar(
            self.tools, self.syntax, self.choice, self.parallel, marker_ids=ids
        )
        return replace(params, guided_grammar=grammar)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole reply."""
        return parse_tool_calls(text, self.syntax)

    def stream(self) -> ToolCallStream:
        """A parser of one streamed reply's pieces."""
        return ToolCallStream(self.syntax)


def _special_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of a special token spelled `text` (`<tool_call>` in Qwen's vocabulary), which
    a grammar must name by id: special tokens never match as text."""
    token = tokenizer.token_to_id(text)
    if token is None:
        return None
    return token if tokenizer.decode([token], skip_special_tokens=True) == "" else None
