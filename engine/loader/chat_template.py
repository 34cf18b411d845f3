"""Render a model's Jinja chat template exactly as transformers' `apply_chat_template` does.

Chat templates are written against transformers' Jinja environment, so matching it byte for
byte matters: one missing newline or a differently escaped quote changes the prompt the model
sees. We rebuild that environment here (sandboxed, `trim_blocks`/`lstrip_blocks`, loop controls,
a non-HTML-escaping `tojson`, `raise_exception`, `strftime_now`, a restricted `dict` and
`namespace`, and the `{% generation %}` tag) instead of importing transformers, which is only a
test dependency. Templates are untrusted code from model files, hence the immutable sandbox.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import InvalidInputError, LaminaError

# Names a message's reasoning may arrive under; transformers copies it to the first two so that
# templates reading either one see it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(LaminaError):
    """A chat template failed to compile or refused the conversation (e.g. a bad role)."""


# Template variables set by the renderer itself, and the parameter names on the way to it,
# which a caller's kwargs may not replace.
RESERVED_TEMPLATE_NAMES = (
    "messages", "add_generation_prompt", "special_tokens", "self", "params", "template",
)  # fmt: skip


def check_template_kwargs(kwargs: Any, where: str = "chat_template_kwargs") -> dict[str, Any]:
    """A caller's extra template variables (enable_thinking, tools, documents, ...), as
    vLLM's chat_template_kwargs: a JSON object with string keys, none of the reserved ones."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidInputError(f"{where} must be an object with string keys")
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_NAMES))
    if reserved:
        raise InvalidInputError(f"{where} may not set {', '.join(reserved)}")
    for name in ("tools", "documents"):
        value = kwargs.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, Mapping) for v in value)
        ):
            raise InvalidInputError(f"{where}: {name} must be a list of objects")
    return dict(kwargs)


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template` as `apply_chat_template(..., tokenize=False)` would.

    `special_tokens` (bos_token, eos_token, ...) become template variables, as transformers
    passes its `special_tokens_map`; `kwargs` (tools, documents, enable_thinking, ...) override
    them. Template failures raise `ChatTemplateError` with the template's own message.
    """
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    compiled = _compile(template)
    tools = kwargs.pop("tools", None)
    documents = kwargs.pop("documents", None)
    variables = {
        **_plain(dict(special_tokens or {})),
        **_plain(kwargs),
        "messages": _prepare_messages(messages),
        "tools": _prepare_tools(tools),
        "documents": _prepare_documents(documents),
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return compiled.render(**variables)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc.message or exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ChatTemplateError(
            f"chat template failed on this conversation: {type(exc).__name__}: {exc}"
        ) from exc


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template text; compiling costs far more than rendering."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"chat template has a syntax error at line {exc.lineno}: {exc.message}"
        ) from exc


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in, rebuilt piece by piece."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks.

    We never build those masks, but templates that use the tag must still compile and render
    their body unchanged, as transformers does when it is not tracking.
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (a bad role, a missing system turn)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`; chat templates need raw JSON."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    """Templates like Llama 3.1's stamp today's date into the system prompt."""
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # No named `self`, like jinja2's Namespace, so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}"
            )


def _prepare_messages(messages: list[dict]) -> list[dict]:
    """Plain copies of the messages, as transformers hands them to the template.

    Keys whose value is None are dropped (OpenAI clients send `content=None` with tool calls,
    and templates handle a missing key better than a literal "None"), and reasoning given
    under an older field name is copied to `reasoning_content` and `thinking`.
    """
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {message!r}")
        plain = _plain({k: v for k, v in message.items() if v is not None})
        if isinstance(plain.get("tool_calls"), list):
            plain["tool_calls"] = [_call_arguments_as_object(c) for c in plain["tool_calls"]]
            plain.setdefault("content", "")  # templates search an assistant's content
        prepared.append(_alias_reasoning(plain))
    return prepared


def _call_arguments_as_object(call: Any) -> Any:
    """An earlier tool call with its `function.arguments` decoded: OpenAI sends them as JSON
    text, templates write them with `tojson` (as vLLM does, and transformers documents)."""
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        decoded = json.loads(arguments)
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": decoded}}


def _alias_reasoning(message: dict) -> dict:
    reasoning = next(
        (message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None
    )
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _prepare_tools(tools: Any) -> list | None:
    """Tools are JSON schemas; transformers also derives them from Python functions, we do not."""
    if tools is None:
        return None
    if not all(isinstance(tool, Mapping) for tool in tools):
        raise ChatTemplateError("tools must be JSON schema dicts")
    return _plain(list(tools))


def _prepare_documents(documents: Any) -> list | None:
    if documents is None:
        return None
    if not all(isinstance(document, Mapping) for document in documents):
        raise ChatTemplateError("documents must be dicts, e.g. with 'title' and 'text' keys")
    return _plain(list(documents))


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON types, so no rich object's methods reach the sandbox.

    Anything that is not a scalar, mapping, sequence or dataclass becomes an inert placeholder
    naming its type, as in transformers.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
