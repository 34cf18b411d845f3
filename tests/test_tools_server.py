"""Tool calling through the real `openai` client against `lamina serve`, and `LLM.chat`.

The default model's own template has no tools, so the model here speaks through Qwen3's
template (Hermes `<tool_call>` syntax, tests/data/templates). Forced calls ("required", a
named function) are checked against each tool's schema with `jsonschema`; "auto" is checked
on a prompt that asks for a call verbatim (the 135M model follows it greedily); streamed
`delta.tool_calls` must reassemble into the whole reply's calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from engine import LLM, SamplingParams
from tests.test_server import client, server  # noqa: F401 - fixtures

QWEN3 = Path(__file__).parent / "data" / "templates" / "qwen3.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
VERBATIM = [
    {
        "role": "user",
        "content": 'Reply only with <tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Berlin"}}</tool_call>',
    }
]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The default model, speaking through Qwen3's template (the server fixture's model)."""
    model = LLM(quant="int8", max_model_len=1024, max_num_seqs=8, kv_cache_mb=64)
    model.tokenizer.chat_template = QWEN3.read_text()
    return model


def check_calls(calls, names=None) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_choices_give_valid_calls(client: OpenAI):  # noqa: F811
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60,
        temperature=0, extra_body=NO_THINKING,
    )  # fmt: skip
    choice = reply.choices[0]
    check_calls(choice.message.tool_calls)
    assert choice.finish_reason == "tool_calls"
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60,
        temperature=0, extra_body=NO_THINKING,
    )  # fmt: skip
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1
    check_calls(calls, ["get_time"])
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60,
        temperature=0.9, seed=7, parallel_tool_calls=False, extra_body=NO_THINKING, n=3,
    )  # fmt: skip
    for choice in reply.choices:
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_auto_parses_a_call_the_model_makes(client: OpenAI):  # noqa: F811
    reply = client.chat.completions.create(
        model="smollm2", messages=VERBATIM, tools=TOOLS, max_tokens=60, temperature=0,
        extra_body=NO_THINKING,
    )  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Berlin"}
    assert reply.choices[0].message.content is None
    assert reply.choices[0].finish_reason == "tool_calls"
    # Asked nothing of the kind, the model answers in text, which stays content.
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, max_tokens=20, temperature=0,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content


def test_streamed_tool_call_deltas_reassemble_into_the_whole_reply(client: OpenAI):  # noqa: F811
    for messages, choice in ((ASK, "required"), (VERBATIM, "auto")):
        kwargs = {
            "model": "smollm2", "messages": messages, "tools": TOOLS, "tool_choice": choice,
            "max_tokens": 60, "temperature": 0, "extra_body": NO_THINKING,
        }  # fmt: skip
        whole = client.chat.completions.create(**kwargs).choices[0].message
        calls: dict[int, dict] = {}
        content, reasons = "", []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
            for part in delta.tool_calls or ():
                entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
        expected = [
            {"name": c.function.name, "arguments": c.function.arguments} for c in whole.tool_calls
        ]
        assert [calls[i] for i in sorted(calls)] == expected
        assert (content or None) == whole.content
        assert reasons[-1] == "tool_calls"


def test_a_full_round_trip(llm: LLM, client: OpenAI):  # noqa: F811
    """The call goes back as the assistant's message, the tool's result after it, and the
    model answers; the prompt the server renders holds both."""
    first = client.chat.completions.create(
        model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, parallel_tool_calls=False, extra_body=NO_THINKING,
    )  # fmt: skip
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(
        model="smollm2", messages=history, tools=[WEATHER], max_tokens=30, temperature=0,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert final.choices[0].message.content
    prompt, _ = llm.encode_chat(history, tools=[WEATHER], enable_thinking=False)
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt
    assert f'"arguments": {json.dumps(json.loads(call.function.arguments))}' in prompt
    # Sent back with its content null, as the openai SDK does.
    history[1] = message.model_dump()
    again = client.chat.completions.create(
        model="smollm2", messages=history, tools=[WEATHER], max_tokens=30, temperature=0,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert again.choices[0].message.content == final.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tool_choice": "required"}, "no tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "nope"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "cannot be combined"),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "name"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s(client: OpenAI, extra, message):  # noqa: F811
    with pytest.raises(BadRequestError, match=message):
        client.chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=4, extra_body=extra
        )


def test_llm_chat_returns_parsed_calls(llm: LLM):
    params = SamplingParams(max_tokens=60, temperature=0)
    out = llm.chat(VERBATIM, params, tools=TOOLS, enable_thinking=False)
    (call,) = out.outputs[0].tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Berlin"})
    named = {"type": "function", "function": {"name": "get_time"}}
    out = llm.chat(ASK, params, tools=TOOLS, tool_choice=named, enable_thinking=False)
    (call,) = out.outputs[0].tool_calls
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_time"])
    out = llm.chat(ASK, params, tools=TOOLS, tool_choice="none", enable_thinking=False)
    assert out.outputs[0].tool_calls is None
