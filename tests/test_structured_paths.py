"""Structured output on every path: `lamina generate` flags, batch lines (`response_format`,
`guided_*`), and the server's `response_format` and vLLM extensions through the `openai`
client. Outputs are checked with `jsonschema`, `re` and `json`, independently of llguidance.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from engine import SamplingParams
from engine.api import LLM
from engine.cli import main
from tests.test_batch_job import read_records, write_lines
from tests.test_server import client, llm, server  # noqa: F401 - fixtures

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person named Ann as JSON."}]
# Any JSON object is unbounded: a prompt the small model answers briefly.
ASK_OBJECT = [{"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}]


def test_generate_flags(tmp_path, capsys):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    base = ["generate", "--temperature", "0", "--max-tokens", "80", "--quant", "int8"]
    assert main([*base, "--json-schema", str(schema), "A person as JSON:"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    assert main([*base, "--regex", "[0-9]{4}-[0-9]{2}", "A year and month:"]) == 0
    assert re.fullmatch("[0-9]{4}-[0-9]{2}", capsys.readouterr().out.strip())
    assert main([*base, "--choice", "red", "--choice", "blue", "A colour:"]) == 0
    assert capsys.readouterr().out.strip() in ("red", "blue")
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "(" [a-z]+ ")"\n')
    assert main([*base, "--grammar", str(grammar), "--max-tokens", "8", "Word:"]) == 0
    assert re.fullmatch(r"\([a-z]+\)|\([a-z]*", capsys.readouterr().out.strip())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--regex", "(a"], "guided_regex cannot be compiled"),
        (["--json-schema", "/no/such/file"], "cannot read /no/such/file"),
        (["--regex", "a", "--choice", "a"], "not allowed with argument"),
    ],
)
def test_generate_refuses_bad_constraints(argv, message, capsys):
    try:
        code = main(["generate", "--max-tokens", "2", *argv, "Hi"])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


def test_batch_lines_with_response_format_and_guided_fields(llm, tmp_path):  # noqa: F811
    lines = [
        {"id": "schema", "messages": ASK, "max_tokens": 80, "temperature": 0,
         "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
        {"id": "object", "messages": ASK_OBJECT, "max_tokens": 80, "temperature": 0,
         "response_format": {"type": "json_object"}},
        {"id": "guided", "prompt": "Ann's age:", "max_tokens": 80, "temperature": 0,
         "guided_json": {"type": "integer"}},
        {"id": "regex", "prompt": "A code:", "max_tokens": 10, "guided_regex": "[A-Z]{3}"},
        {"id": "bad", "prompt": "x", "guided_regex": "(a"},
        {"id": "both", "prompt": "x", "guided_regex": "a", "response_format": {"type": "json_object"}},
        {"id": "kind", "prompt": "x", "response_format": {"type": "yaml"}},
    ]  # fmt: skip
    out = tmp_path / "out.jsonl"
    from engine.batch_job import run_batch

    run_batch(llm, write_lines(tmp_path / "in.jsonl", *lines), out, {})
    records = {r["id"]: r for r in read_records(out)}
    jsonschema.validate(json.loads(records["schema"]["text"]), PERSON)
    assert isinstance(json.loads(records["object"]["text"]), dict)
    assert isinstance(json.loads(records["guided"]["text"]), int)
    assert re.fullmatch("[A-Z]{3}", records["regex"]["text"])
    assert "guided_regex cannot be compiled" in records["bad"]["error"]
    assert "not both" in records["both"]["error"]
    assert "response_format type 'yaml' is not supported" in records["kind"]["error"]


def test_server_response_format_json_schema_and_object(llm: LLM, client: OpenAI):  # noqa: F811
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=80, temperature=0, response_format=fmt
    )
    text = reply.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    params = SamplingParams(max_tokens=80, temperature=0, guided_json=PERSON)
    assert text == llm.chat(ASK, params).text  # the server adds nothing of its own
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK_OBJECT, max_tokens=80, temperature=0,
        response_format={"type": "json_object"}, stream=True,
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    assert isinstance(json.loads(streamed), dict)
    completion = client.completions.create(
        model="smollm2", prompt="A person as JSON:", max_tokens=80, temperature=0,
        extra_body={"response_format": fmt},
    )  # fmt: skip
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_server_vllm_guided_extensions(client: OpenAI):  # noqa: F811
    reply = client.chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=10, temperature=0, n=2, seed=1,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert {c.message.content for c in reply.choices} <= {"yes", "no"}
    reply = client.completions.create(
        model="smollm2", prompt="Zip code:", max_tokens=10, temperature=0,
        extra_body={"guided_regex": "[0-9]{5}"},
    )  # fmt: skip
    assert re.fullmatch("[0-9]{5}", reply.choices[0].text)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"response_format": {"type": "yaml"}}, "not supported"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"guided_regex": "(a"}, "cannot be compiled"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "not both"),
    ],
)
def test_server_refuses_bad_constraints_with_a_400(client: OpenAI, extra, message):  # noqa: F811
    with pytest.raises(BadRequestError, match=message):
        client.chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=4, extra_body=extra
        )
    ok = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")
