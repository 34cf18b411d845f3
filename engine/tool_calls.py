"""Tool calls in the syntaxes models write them: parsing a reply (whole or streamed) into
OpenAI tool calls, and a grammar that constrains a reply to calls of the given tools.

Three syntaxes cover most open models, named as vLLM's tool parsers name them:

- "hermes" (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`` blocks, anywhere in the reply. A block left open at the end of the reply
  (a stop string or token limit cut it) is still a call when its JSON is complete.
- "llama3_json" (Llama 3.1-3.3): the reply, after optional ``<|python_tag|>``, is a JSON
  object ``{"name": ..., "parameters": {...}}``; several are separated by ``;``.
- "mistral": ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments"}`` objects.

Parsing never raises: a call whose JSON is malformed, whose name is missing or whose
arguments are not an object is no call, and its text stays content (as vLLM leaves it), so a
model's slip reaches the user as text. The whole-reply parser is the streaming parser fed the
reply at once, so the two cannot disagree about what a reply means. Both read text: where a
marker is a special token of the model's tokenizer (Mistral's [TOOL_CALLS], Llama's
<|python_tag|>), the reply must be detokenized with special tokens kept.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidInputError, LaminaError

SYNTAXES = ("hermes", "llama3_json", "mistral")

# The literal markers each syntax's grammar writes. A caller whose tokenizer holds one of
# them as a special token passes its id to `tool_call_grammar` (`marker_ids`), since a
# grammar's text literal never matches a special token.
GRAMMAR_MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": (),
    "mistral": ("[TOOL_CALLS]",),
}

_HERMES_OPEN, _HERMES_CLOSE = GRAMMAR_MARKERS["hermes"]
(_MISTRAL_OPEN,) = GRAMMAR_MARKERS["mistral"]
_PYTHON_TAG = "<|python_tag|>"
_ID_CHARS = string.ascii_letters + string.digits
# Arguments are written as models write JSON (json.dumps' separators): a grammar that also
# allowed any whitespace lets small models run away in spaces and newlines.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity, which Python's json accepts, would make arguments no client can parse.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class ToolSyntaxError(LaminaError):
    """A chat template writes tool calls in a syntax lamina does not parse."""


@dataclass
class ToolCall:
    """One parsed call; `arguments` is the JSON text of an object, in compact form."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The entry of an assistant message's `tool_calls`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ContentDelta:
    """Text of the reply that is not a tool call."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A whole call, sent once its JSON is complete: a call's JSON can still turn out
    malformed (and become content) until its last character, so nothing of it is sent
    earlier."""

    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The entry of a streamed chunk's `delta.tool_calls`."""
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


StreamEvent = ContentDelta | ToolCallDelta


def detect_tool_syntax(chat_template: str) -> str:
    """The tool-call syntax a chat template teaches its model, from the markers it contains."""
    if _MISTRAL_OPEN in chat_template:
        return "mistral"
    if _HERMES_OPEN in chat_template:
        return "hermes"
    if (
        _PYTHON_TAG in chat_template
        or "Environment: ipython" in chat_template
        or ('"parameters"' in chat_template and "<|eom_id|>" in chat_template)
    ):
        return "llama3_json"
    raise ToolSyntaxError(
        "the chat template's tool-call syntax is unknown; lamina parses " + ", ".join(SYNTAXES)
    )


def parse_tool_calls(text: str, syntax: str) -> tuple[str | None, list[ToolCall]]:
    """The content left of a whole reply (None when only whitespace is left) and its calls."""
    stream = ToolCallStream(syntax)
    content: list[str] = []
    calls: list[ToolCall] = []
    for event in stream.feed(text) + stream.finish():
        if isinstance(event, ContentDelta):
            content.append(event.text)
        else:
            calls.append(ToolCall(event.id, event.name, event.arguments))
    return "".join(content) or None, calls


def _check_syntax(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise InvalidInputError(
            f"unknown tool-call syntax {syntax!r}; lamina knows {', '.join(SYNTAXES)}"
        )


def _new_id(syntax: str) -> str:
    # Mistral's chat templates refuse tool call ids that are not 9 letters or digits.
    if syntax == "mistral":
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def _call(value: Any) -> tuple[str, str] | None:
    """(name, compact arguments) of a decoded call object, or None when it is not a call.
    Arguments may be named "arguments" or "parameters" and may arrive as a JSON string."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = _DECODER.decode(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _decode(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of text and where it ends; None while it is incomplete
    or malformed. An array or object ends at its closing bracket, so the value a prefix of
    a reply decodes to is the value the whole reply decodes to there."""
    try:
        return _DECODER.raw_decode(text)
    except ValueError:
        return None


def _decoded_whole(text: str) -> Any:
    """The JSON value that is all of text; None when there is none."""
    decoded = _decode(text)
    return decoded[0] if decoded is not None and decoded[1] == len(text) else None


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of text that begins marker (and so must wait)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ToolCallStream:
    """Incremental parser of one reply: `feed` each new piece of text and `finish` at its
    end; each returns the events the text known so far settles.

    Text that may begin a marker is held until the next piece tells; a call's text is held
    until its JSON is complete, then sent as one `ToolCallDelta` or, when it is no call, as
    content. Whitespace before the first content or after a call is held until more
    content follows: whitespace that only leads, separates or trails calls is no content (a
    reply of calls and newlines has None).
    """

    def __init__(self, syntax: str) -> None:
        _check_syntax(syntax)
        self._syntax = syntax
        # The parser's state is the method that reads the buffer next; each returns whether
        # it got further (and the next state may read on).
        self._step: Callable[[bool], bool] = (
            self._llama_start if syntax == "llama3_json" else self._text
        )
        self._buffer = ""  # text not yet settled
        self._held = ""  # text of a pending call already taken from the buffer
        self._space = ""  # whitespace held until content follows it
        self._holding_space = True  # at the start of the reply or after a call
        self._calls = 0
        self._events: list[StreamEvent] = []
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        """Events settled once delta is appended to the reply."""
        if self._finished:
            raise RuntimeError("ToolCallStream.feed after finish")
        self._buffer += delta
        return self._run(final=False)

    def finish(self) -> list[StreamEvent]:
        """Events settled by the end of the reply: all that was held."""
        if self._finished:
            raise RuntimeError("ToolCallStream.finish called twice")
        self._finished = True
        return self._run(final=True)

    def _run(self, final: bool) -> list[StreamEvent]:
        while self._step(final):
            pass
        events, self._events = self._events, []
        return events

    def _content(self, text: str) -> None:
        if self._holding_space:
            self._space += text
            if not self._space.strip():
                return
            text, self._space, self._holding_space = self._space, "", False
        if text:
            self._events.append(ContentDelta(text))

    def _emit_call(self, name: str, arguments: str) -> None:
        self._events.append(ToolCallDelta(self._calls, _new_id(self._syntax), name, arguments))
        self._calls += 1
        self._space, self._holding_space = "", True

    def _settle(
        self, consumed: int, calls: list[tuple[str, str]] | None, then: Callable[[bool], bool]
    ) -> bool:
        """End a pending call section after `consumed` more buffer characters: its calls,
        or (None) all its text as content."""
        if calls:
            for name, arguments in calls:
                self._emit_call(name, arguments)
        else:
            self._content(self._held + self._buffer[:consumed])
        self._held, self._buffer, self._step = "", self._buffer[consumed:], then
        return True

    def _open(self, at: int, then: Callable[[bool], bool]) -> bool:
        """Hold the buffer's text up to `at` as the start of a call section."""
        self._held, self._buffer, self._step = self._buffer[:at], self._buffer[at:], then
        return True

    def _text(self, final: bool) -> bool:
        """Content, watching for the syntax's opening marker (llama3_json has none here: its
        calls come only first in a reply)."""
        marker = {"hermes": _HERMES_OPEN, "mistral": _MISTRAL_OPEN}.get(self._syntax)
        if marker is not None and (at := self._buffer.find(marker)) >= 0:
            self._content(self._buffer[:at])
            self._buffer = self._buffer[at:]
            body = self._hermes_block if marker == _HERMES_OPEN else self._mistral_array
            return self._open(len(marker), body)
        keep = 0 if final or marker is None else _partial_marker(self._buffer, marker)
        self._content(self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _hermes_block(self, final: bool) -> bool:
        end = self._buffer.find(_HERMES_CLOSE)
        if end < 0 and not final:
            return False
        body = self._buffer if end < 0 else self._buffer[:end]
        call = _call(_decoded_whole(body.strip()))
        consumed = len(self._buffer) if end < 0 else end + len(_HERMES_CLOSE)
        return self._settle(consumed, [call] if call else None, self._text)

    def _mistral_array(self, final: bool) -> bool:
        body = self._buffer.lstrip()
        if not body:
            return self._settle(len(self._buffer), None, self._text) if final else False
        if body[0] != "[":
            return self._settle(0, None, self._text)  # a marker without an array is content
        decoded = _decode(body)
        if decoded is None:
            return self._settle(len(self._buffer), None, self._text) if final else False
        value, end = decoded
        calls = [_call(item) for item in value] if isinstance(value, list) and value else [None]
        valid = None if None in calls else calls
        return self._settle(len(self._buffer) - len(body) + end, valid, self._text)

    def _llama_start(self, final: bool) -> bool:
        """A reply is calls when it starts (after spaces) with a JSON object, or with
        <|python_tag|> and then one; anything else makes it all content."""
        body = self._buffer.lstrip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG) :].lstrip()
        elif _PYTHON_TAG.startswith(body) and not final:
            return False  # nothing yet, or part of the tag
        if not body and not final:
            return False
        if body.startswith("{"):
            return self._open(len(self._buffer) - len(body), self._llama_object)
        self._step = self._text
        return True

    def _llama_object(self, final: bool) -> bool:
        decoded = _decode(self._buffer)
        if decoded is None:
            return self._settle(len(self._buffer), None, self._text) if final else False
        value, end = decoded
        call = _call(value)
        # A call that is no call makes the rest of the reply content, as a reply not
        # starting with a call is.
        return self._settle(
            end, [call] if call else None, self._llama_after if call else self._text
        )

    def _llama_after(self, final: bool) -> bool:
        """After a call: "; " and the next call, or the rest of the reply as content."""
        body = self._buffer.lstrip()
        if body.startswith(";"):
            body = body[1:].lstrip()
            if body.startswith("{"):
                return self._open(len(self._buffer) - len(body), self._llama_object)
            if not body and not final:
                return False
        elif not body and not final:
            return False
        self._step = self._text
        return True


# What stands between two calls, in each syntax's grammar.
_SEPARATORS = {"hermes": '"\\n"', "llama3_json": '"; "', "mistral": '", "'}


def tool_call_grammar(
    tools: list[dict[str, Any]],
    syntax: str,
    choice: str | dict[str, Any],
    parallel: bool,
    *,
    marker_ids: Mapping[str, int] | None = None,
) -> str:
    """A Lark grammar (llguidance's dialect) for a reply that is exactly tool calls in
    `syntax`: any of `tools` (one call, or one or more when `parallel`) for choice
    "required"; only the named function, once, for ``{"type": "function", "function":
    {"name": N}}``. Each call's arguments follow its function's `parameters` schema.

    The call object is spelled out in the grammar, name first, and only the arguments are a
    JSON schema (each the root of its own `%json`, so its `$ref`s resolve as written; an
    object, whatever the schema allows). JSON is laid out as json.dumps and chat templates'
    tojson write it, ", " and ": " between items, characters unescaped. `marker_ids` maps
    markers of GRAMMAR_MARKERS to the ids of special tokens that spell them in the model's
    tokenizer.
    """
    _check_syntax(syntax)
    functions = _functions(tools)
    if choice == "required":
        chosen = functions
    else:
        name = _named_choice(choice)
        if name not in functions:
            raise InvalidInputError(f"tool_choice names function {name!r}, which is not in tools")
        chosen = {name: functions[name]}
        parallel = False
    ids = marker_ids or {}

    def marker(text: str) -> str:
        return f"<[{ids[text]}]>" if text in ids else json.dumps(text)

    key = "parameters" if syntax == "llama3_json" else "arguments"
    rules = []
    for i, (name, parameters) in enumerate(chosen.items()):
        head = json.dumps(f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{key}": ')
        schema = {"x-guidance": _JSON_LAYOUT, "type": "object", **parameters}
        rules.append(f'fn_{i}: {head} args_{i} "}}"')
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    call = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    if syntax == "hermes":
        call = f'{marker(_HERMES_OPEN)} "\\n" ({call}) "\\n" {marker(_HERMES_CLOSE)}'
    calls = "call" + (f" ({_SEPARATORS[syntax]} call)*" if parallel else "")
    start = f'{marker(_MISTRAL_OPEN)} "[" {calls} "]"' if syntax == "mistral" else calls
    return "\n".join([f"start: {start}", f"call: {call}", *rules]) + "\n"


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """The parameter schema of each function in an OpenAI `tools` list, by name."""
    if not isinstance(tools, list) or not tools:
        raise InvalidInputError("tool_choice needs a non-empty list of tools")
    functions = {}
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidInputError('each tool must be {"type": "function", "function": {...}}')
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInputError("each tool's function needs a name")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {}  # OpenAI's default: any arguments object
        if not isinstance(parameters, dict):
            raise InvalidInputError(f"the parameters of function {name!r} must be a JSON schema")
        functions[name] = parameters
    return functions


def _named_choice(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name:
            return name
    raise InvalidInputError(
        'tool_choice must be "required" or {"type": "function", "function": {"name": ...}}'
    )
