"""Tool calls: parsing each syntax against hand-written expectations, the streaming parser
against the whole-reply parser over random chunkings (hypothesis), and the tool-call grammar
through llguidance with the default model's tokenizer, its accepted calls checked by
jsonschema."""

from __future__ import annotations

import itertools
import json
import re

import jsonschema
import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidInputError, LaminaError
from engine.tool_calls import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolSyntaxError,
    detect_tool_syntax,
    parse_tool_calls,
    tool_call_grammar,
)

SYNTAXES = ["hermes", "llama3_json", "mistral"]


def compact(arguments: dict) -> str:
    return json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)


def dumps(value: object) -> str:
    # As chat templates' tojson writes JSON: json.dumps' layout, characters unescaped.
    return json.dumps(value, ensure_ascii=False)


def render(syntax: str, calls: list[tuple[str, dict]]) -> str:
    """Calls as each model family writes them."""
    if syntax == "hermes":
        return "\n".join(
            f"<tool_call>\n{dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls
        )
    if syntax == "llama3_json":
        return "; ".join(dumps({"name": n, "parameters": a}) for n, a in calls)
    return "[TOOL_CALLS]" + dumps([{"name": n, "arguments": a} for n, a in calls])


def named(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


WEATHER = ("get_weather", {"city": "Paris", "days": 3})
TIME = ("get_time", {"zone": "UTC"})

# (syntax, reply, content, [(name, arguments)]) written out by hand.
PARSE_CASES = [
    ("hermes", "Just text, <b>bold</b> & [brackets].", "Just text, <b>bold</b> & [brackets].", []),
    ("hermes", render("hermes", [WEATHER]), None, [WEATHER]),
    ("hermes", "Let me check.\n" + render("hermes", [WEATHER]), "Let me check.\n", [WEATHER]),
    ("hermes", render("hermes", [WEATHER, TIME]) + "\n", None, [WEATHER, TIME]),
    (
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}\n</tool_call>',
        [],
    ),
    # A block cut short before its closing marker is still a call; arguments may be a string.
    (
        "hermes",
        '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}',
        None,
        [TIME],
    ),
    # Arguments that are not an object make no call.
    (
        "hermes",
        'x<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        'x<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [],
    ),
    ("llama3_json", "The weather is {sunny} today.", "The weather is {sunny} today.", []),
    ("llama3_json", render("llama3_json", [WEATHER]), None, [WEATHER]),
    ("llama3_json", "<|python_tag|>" + render("llama3_json", [TIME]), None, [TIME]),
    ("llama3_json", render("llama3_json", [WEATHER, TIME]), None, [WEATHER, TIME]),
    # Llama's calls open the reply; after content, an object is content.
    (
        "llama3_json",
        "Sure: " + render("llama3_json", [TIME]),
        "Sure: " + render("llama3_json", [TIME]),
        [],
    ),
    (
        "llama3_json",
        '{"name": "get_time", "parameters": {"zone": "UTC"}',
        '{"name": "get_time", "parameters": {"zone": "UTC"}',
        [],
    ),
    ("llama3_json", '{"city": "Paris"}', '{"city": "Paris"}', []),
    ("mistral", "A list: [1, 2] and [TOOL] x", "A list: [1, 2] and [TOOL] x", []),
    ("mistral", render("mistral", [WEATHER]), None, [WEATHER]),
    ("mistral", "On it. " + render("mistral", [TIME]), "On it. ", [TIME]),
    ("mistral", render("mistral", [WEATHER, TIME]), None, [WEATHER, TIME]),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}]',
        '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}]',
        [],
    ),
    ("mistral", "[TOOL_CALLS] no array", "[TOOL_CALLS] no array", []),
]


@pytest.mark.parametrize(("syntax", "text", "content", "calls"), PARSE_CASES)
def test_parse(syntax: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_tool_calls(text, syntax)
    assert got_content == content
    assert named(got_calls) == [(n, compact(a)) for n, a in calls]


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_call_ids_and_openai_form(syntax: str) -> None:
    _, calls = parse_tool_calls(render(syntax, [WEATHER, TIME]), syntax)
    # Mistral's templates take only 9-character alphanumeric ids.
    pattern = r"[A-Za-z0-9]{9}" if syntax == "mistral" else r"call_[A-Za-z0-9]{24}"
    assert all(re.fullmatch(pattern, c.id) for c in calls)
    assert len({c.id for c in calls}) == 2
    assert calls[0].to_openai() == {
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":3}'},
    }


@pytest.mark.parametrize(
    ("template", "syntax"),
    [
        ("{%- for t in tools %}<tool_call>\n{{ t | tojson }}\n</tool_call>{% endfor %}", "hermes"),
        ("{{- '[AVAILABLE_TOOLS]' }}{% if m.tool_calls %}[TOOL_CALLS]{% endif %}", "mistral"),
        ('{{- "Environment: ipython\\n" }}{{- "<|eot_id|>" }}', "llama3_json"),
        ("{%- if m.tool_calls %}<|python_tag|>{{ m.content }}<|eom_id|>{% endif %}", "llama3_json"),
        ('{"name": function name, "parameters": dictionary}{{ "<|eom_id|>" }}', "llama3_json"),
    ],
)
def test_detect_tool_syntax(template: str, syntax: str) -> None:
    assert detect_tool_syntax(template) == syntax


def test_detect_tool_syntax_unknown() -> None:
    with pytest.raises(ToolSyntaxError) as error:
        detect_tool_syntax("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert isinstance(error.value, LaminaError)
    message = str(error.value)
    assert "\n" not in message and all(s in message for s in SYNTAXES)


def test_unknown_syntax_is_an_input_error() -> None:
    with pytest.raises(InvalidInputError):
        ToolCallStream("json")


# --- streaming ------------------------------------------------------------------------


def stream(text: str, cuts: list[int], syntax: str) -> tuple[list, str, dict]:
    """Feed text cut at the given offsets; the events, their content and per-index calls."""
    bounds = [0, *sorted(set(cuts)), len(text)]
    parser = ToolCallStream(syntax)
    events = []
    for a, b in itertools.pairwise(bounds):
        events += parser.feed(text[a:b])
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.index not in calls:
                assert e.id and e.name, "a call's first delta carries its id and name"
                calls[e.index] = [e.name, ""]
            calls[e.index][1] += e.arguments
    return events, content, calls


def check_stream(text: str, cuts: list[int], syntax: str) -> None:
    _, content, calls = stream(text, cuts, syntax)
    whole_content, whole_calls = parse_tool_calls(text, syntax)
    assert content == (whole_content or "")
    assert sorted(calls) == list(range(len(calls)))
    assert [tuple(calls[i]) for i in range(len(calls))] == named(whole_calls)


# Content that looks like the start of a marker without being one.
DECOYS = [
    "<",
    "<tool",
    "<tool_call",
    "</tool_call>",
    "<b>",
    "[",
    "[TOOL",
    "[TOOL_CALLS",
    "[1, 2]",
    "{",
    "}",
    "{}",
    ";",
    "<|python",
    "<|python_tag|>",
    " ",
    "\n",
    "é",
    "text",
    '"',
]


def pieces(syntax: str) -> st.SearchStrategy[str]:
    """Fragments whose concatenations exercise a syntax: calls, broken calls, decoys."""
    call = st.sampled_from([WEATHER, TIME, ("ping", {})]).map(lambda c: render(syntax, [c]))
    broken = call.flatmap(lambda t: st.integers(1, len(t) - 1).map(lambda n: t[:n]))
    separators = {"hermes": "\n", "llama3_json": "; ", "mistral": ""}
    return st.one_of(
        call,
        broken,
        st.just(separators[syntax]),
        st.sampled_from(DECOYS),
        st.text(alphabet='<[{;|/ \n_aTt"}]>', max_size=8),
    )


@pytest.mark.parametrize("syntax", SYNTAXES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_stream_matches_whole_parse(syntax: str, data: st.DataObject) -> None:
    text = "".join(data.draw(st.lists(pieces(syntax), max_size=6)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    check_stream(text, cuts, syntax)


# Fixed replies, including content with '<', '[' and '{' that are not markers.
FIXED = {
    "hermes": [
        "if a < b and c[0] > 1: <tool_calls> is not <tool_call",
        "x <tool_call" + render("hermes", [WEATHER])[len("<tool_call") :],
        "See:\n" + render("hermes", [WEATHER, TIME]) + "\nDone <3",
        render("hermes", [WEATHER])
        + "<tool_call>\n{oops}\n</tool_call>"
        + render("hermes", [TIME]),
    ],
    "llama3_json": [
        "<|python_tag|>print('hi')",
        "  " + render("llama3_json", [WEATHER, TIME]) + " ; then text",
        render("llama3_json", [WEATHER]) + "; {broken",
        "<|python_ta",
    ],
    "mistral": [
        "arrays like [1, 2] and [TOOL_CALL] or [TOOL_CALLS",
        "Hi [TOOL_CALLS] " + render("mistral", [WEATHER, TIME])[len("[TOOL_CALLS]") :] + " bye",
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"no": "name"}]',
        render("mistral", [TIME]) + render("mistral", [WEATHER]),
    ],
}


@pytest.mark.parametrize(("syntax", "text"), [(s, t) for s, ts in FIXED.items() for t in ts])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stream_fixed_replies(syntax: str, text: str, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    check_stream(text, cuts, syntax)


@pytest.mark.parametrize(("syntax", "text"), [(s, t) for s, ts in FIXED.items() for t in ts])
def test_stream_one_character_at_a_time(syntax: str, text: str) -> None:
    check_stream(text, list(range(len(text))), syntax)


@pytest.mark.parametrize("syntax", SYNTAXES)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_generated_calls_are_found(syntax: str, data: st.DataObject) -> None:
    """Replies built from known calls and marker-free content give back exactly those calls."""
    arguments = st.dictionaries(
        st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8)), max_size=3
    )
    calls = data.draw(
        st.lists(st.tuples(st.sampled_from(["f", "g_2"]), arguments), min_size=1, max_size=3)
    )
    # Llama's calls open the reply: no content before them.
    prose = "" if syntax == "llama3_json" else data.draw(st.text(alphabet="ab <>[]{}.\n"))
    text = prose + render(syntax, calls)
    content, got = parse_tool_calls(text, syntax)
    assert named(got) == [(n, compact(a)) for n, a in calls]
    assert content == (prose if prose.strip() else None)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    check_stream(text, cuts, syntax)


def test_stream_sends_text_when_known() -> None:
    """Content that cannot begin a marker goes out at once; a call goes out as soon as its
    closing marker arrives, before the reply ends."""
    parser = ToolCallStream("hermes")
    assert parser.feed("a < b <tool") == [ContentDelta("a < b ")]
    assert parser.feed("s> and ") == [ContentDelta("<tools> and ")]
    assert parser.feed("<tool_call>\n" + json.dumps({"name": "f", "arguments": {}})) == []
    (call,) = parser.feed("\n</tool_call>")
    assert (call.index, call.name, call.arguments) == (0, "f", "{}")
    assert parser.finish() == []
    mistral = ToolCallStream("mistral")
    assert mistral.feed("[1] [") == [ContentDelta("[1] ")]
    assert mistral.feed("x") == [ContentDelta("[x")]


# --- grammar --------------------------------------------------------------------------


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
}
# The shape pydantic writes: a $ref into $defs at the schema's root.
TIME_SCHEMA = {
    "$defs": {"Zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "type": "object",
    "properties": {"zone": {"$ref": "#/$defs/Zone"}},
    "required": ["zone"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Forecast",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_SCHEMA}},
    {"type": "function", "function": {"name": "ping"}},
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA, "ping": {"type": "object"}}


@pytest.fixture(scope="module")
def ll() -> llguidance.LLTokenizer:
    from engine.loader.default_model import default_model_path
    from engine.loader.model_loader import load_model

    tok = load_model(default_model_path(), None).tokenizer
    return llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=49152, eos_token=tok.eos_token_ids)


def accepts(ll: llguidance.LLTokenizer, grammar: str, tokens: list[int]) -> bool:
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


def accepts_text(ll: llguidance.LLTokenizer, grammar: str, text: str) -> bool:
    return accepts(ll, grammar, ll.tokenize_str(text))


REQUIRED_OK = [
    [WEATHER],
    [("get_weather", {"city": 'Saint-"Étienne"\\'})],
    [("get_time", {"zone": "CET"})],
    [("ping", {})],
]
REJECTED = {
    "wrong type": [("get_weather", {"city": 5})],
    "below minimum": [("get_weather", {"city": "Paris", "days": 0})],
    "missing required": [("get_weather", {"days": 2})],
    "not in enum": [("get_time", {"zone": "PST"})],
    "unknown tool": [("get_stock", {"symbol": "X"})],
    "arguments not an object": [("ping", [1])],
}


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_grammar_required(ll: llguidance.LLTokenizer, syntax: str) -> None:
    single = tool_call_grammar(TOOLS, syntax, "required", parallel=False)
    parallel = tool_call_grammar(TOOLS, syntax, "required", parallel=True)
    for calls in [*REQUIRED_OK, [WEATHER, TIME], [TIME, ("ping", {}), TIME]]:
        text = render(syntax, calls)
        assert accepts_text(ll, parallel, text), text
        assert accepts_text(ll, single, text) == (len(calls) == 1), text
        _, parsed = parse_tool_calls(text, syntax)
        assert [c.name for c in parsed] == [n for n, _ in calls]
        for call in parsed:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    for why, calls in REJECTED.items():
        assert not accepts_text(ll, parallel, render(syntax, calls)), why
        assert not accepts_text(ll, parallel, render(syntax, [WEATHER, *calls])), why
    assert not accepts_text(ll, single, "Sure. " + render(syntax, [WEATHER]))
    assert not accepts_text(ll, single, "The weather is fine.")


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_grammar_named_function(ll: llguidance.LLTokenizer, syntax: str) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    grammar = tool_call_grammar(TOOLS, syntax, choice, parallel=True)
    assert accepts_text(ll, grammar, render(syntax, [TIME]))
    assert not accepts_text(ll, grammar, render(syntax, [WEATHER]))
    assert not accepts_text(ll, grammar, render(syntax, [TIME, TIME]))
    assert not accepts_text(ll, grammar, render(syntax, [("get_time", {})]))


def test_grammar_tokens_one_at_a_time(ll: llguidance.LLTokenizer) -> None:
    """The matcher takes the reply's tokens one by one as a sampler would give them."""
    grammar = tool_call_grammar(TOOLS, "hermes", "required", parallel=True)
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    tokens = ll.tokenize_str(render("hermes", [WEATHER, TIME]))
    assert matcher.validate_tokens(tokens) == len(tokens)
    assert all(matcher.consume_token(t) for t in tokens)
    assert matcher.is_accepting()


def test_grammar_special_token_markers(ll: llguidance.LLTokenizer) -> None:
    """A marker the tokenizer holds as a special token is asked for as that token (the
    default model's <repo_name> and <reponame> stand in for <tool_call> and </tool_call>)."""
    ids = {"<tool_call>": 3, "</tool_call>": 4}
    grammar = tool_call_grammar(TOOLS, "hermes", "required", parallel=False, marker_ids=ids)
    body = json.dumps({"name": "get_time", "arguments": {"zone": "UTC"}})
    assert accepts(ll, grammar, [3, *ll.tokenize_str(f"\n{body}\n"), 4])
    assert not accepts_text(ll, grammar, render("hermes", [TIME]))


@pytest.mark.parametrize(
    ("tools", "choice", "fragment"),
    [
        ([], "required", "non-empty list of tools"),
        ([{"type": "function", "function": {"description": "x"}}], "required", "needs a name"),
        ([{"type": "retrieval"}], "required", '"type": "function"'),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "'nope'"),
        (TOOLS, "auto", "tool_choice must be"),
        (TOOLS, {"type": "function"}, "tool_choice must be"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "object"}}],
            "required",
            "JSON schema",
        ),
    ],
)
def test_grammar_input_errors(tools: list, choice: str | dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        tool_call_grammar(tools, "hermes", choice, parallel=False)
    assert fragment in str(error.value) and "\n" not in str(error.value)
