"""Chat templates rendered by lamina against transformers' `apply_chat_template(tokenize=False)`.

The Qwen3, Phi-3.5 and Gemma 2 templates in tests/data/templates are the models' own, as
llama.cpp keeps them (models/templates in its source).

Each template is written into a small tokenizer folder (tokenizer.json + tokenizer_config.json),
loaded both by `load_hf_tokenizer` and by `AutoTokenizer.from_pretrained`, and rendered over the
same conversations, so template variables (bos_token, ...) come from the same config on both
sides.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models
from transformers import AutoTokenizer

from engine.errors import LaminaError
from engine.loader.chat_template import ChatTemplateError, _compile, render_chat_template
from engine.loader.tokenizer import load_hf_tokenizer, tokenizer_from_gguf

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unexpected role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. '
            'You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
        {{- '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}
[INST] {{ message['content'] }} [/INST]
{% elif message['role'] == 'assistant' %}
{{ message['content'] }}{{ eos_token }}
{% endif %}
{% endfor %}"""

# Exercises the environment's extras: namespace, loop controls, {% generation %}, tojson
# without HTML escaping, dict(), extra variables, reasoning aliases, documents.
FEATURES_TEMPLATE = """{% set ns = namespace(count=0, last='') %}
{% for message in messages %}
  {% if message.role == 'system' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
  {% set ns.last = message.role %}
  <{{ message.role }}>{% if message.role == 'assistant' %}{% generation %}
{{ message.content }}{% endgeneration %}{% else %}{{ message.content }}{% endif %}

  {% if message.reasoning_content is defined %}[think:{{ message.reasoning_content }}]{% endif %}
  {% if ns.count > 3 %}{% break %}{% endif %}
{% endfor %}
{{ {'n': ns.count, 'last': ns.last, 'q': "<a & 'b'> é"} | tojson }}
{{ dict(a=1, b=[1, 2]) | tojson(indent=2) }}
{% if documents %}{% for d in documents %}<doc>{{ d.title }}: {{ d.text }}</doc>{% endfor %}{% endif %}
{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system": [
        {"role": "system", "content": "You are terse.  "},
        {"role": "user", "content": "Hi! 你好 🎉"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
}

# Which conversations each template accepts (Mistral's refuses a system turn).
TEMPLATE_CONVERSATIONS = {
    "smollm2": list(CONVERSATIONS),
    "llama3": list(CONVERSATIONS),
    "qwen2": list(CONVERSATIONS),
    "mistral": ["user", "multi_turn"],
    "features": list(CONVERSATIONS),
    "qwen3": list(CONVERSATIONS),
    "phi-3.5": list(CONVERSATIONS),
    "gemma-2": ["user", "multi_turn"],  # it refuses system messages
}
DATA_TEMPLATES = Path(__file__).parent / "data" / "templates"

SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
]

TEMPLATE_SPECIALS = {
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "features": {"bos_token": "<s>", "eos_token": "</s>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "phi-3.5": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "gemma-2": {"bos_token": "<s>", "eos_token": "</s>"},
}


def _write_folder(folder: Path, config: dict, jinja: str | None = None) -> Path:
    """A minimal tokenizer folder that both lamina and transformers can load."""
    folder.mkdir(parents=True)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


@pytest.fixture(scope="module")
def smollm2_template(default_gguf_metadata) -> str:
    return default_gguf_metadata["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, smollm2_template):
    """Template name -> (lamina tokenizer, transformers tokenizer) loaded from one folder."""
    templates = {
        "smollm2": smollm2_template,
        "llama3": LLAMA3_TEMPLATE,
        "qwen2": QWEN2_TEMPLATE,
        "mistral": MISTRAL_TEMPLATE,
        "features": FEATURES_TEMPLATE,
        **{name: (DATA_TEMPLATES / f"{name}.jinja").read_text() for name in
           ("qwen3", "phi-3.5", "gemma-2")},
    }  # fmt: skip
    root = tmp_path_factory.mktemp("templates")
    loaded = {}
    for name, template in templates.items():
        config = {**TEMPLATE_SPECIALS[name], "chat_template": template}
        folder = _write_folder(root / name, config)
        loaded[name] = (load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder))
    return loaded


def _cases():
    for name, conversations in TEMPLATE_CONVERSATIONS.items():
        for conversation in conversations:
            for add_generation_prompt in (True, False):
                yield pytest.param(
                    name,
                    conversation,
                    add_generation_prompt,
                    id=f"{name}-{conversation}-{'gen' if add_generation_prompt else 'nogen'}",
                )


@pytest.mark.parametrize(("template", "conversation", "add_generation_prompt"), list(_cases()))
def test_rendering_matches_transformers(pairs, template, conversation, add_generation_prompt):
    ours, hf = pairs[template]
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
        expected
    )


def test_smollm2_gguf_template_matches_transformers(default_gguf_metadata, pairs):
    # The GGUF's own tokenizer, with the special tokens its metadata names.
    ours = tokenizer_from_gguf(default_gguf_metadata)
    _, hf = pairs["smollm2"]
    for messages in CONVERSATIONS.values():
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == expected
    assert ours.apply_chat_template(CONVERSATIONS["user"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tools_and_tool_calls_match_transformers(pairs):
    ours, hf = pairs["qwen2"]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city, e.g. <Zürich> & 'Bern'",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,  # dropped, as OpenAI clients send it with tool calls
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Z"}},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    expected = hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(messages, tools=tools) == expected
    assert "e.g. <Zürich> & 'Bern'\"" in expected  # tojson neither HTML- nor ASCII-escapes


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tool_calls_as_openai_sends_them_render_as_transformers_documents(pairs, family):
    """OpenAI clients send a call's arguments as JSON text and the assistant's content as
    null; transformers documents arguments as a dict: rendered alike."""
    ours, hf = pairs[family]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    sent = {**call, "function": {"name": "f", "arguments": '{"a": 1}'}}
    history = [{"role": "user", "content": "Hi"}]
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "2"}
    expected = hf.apply_chat_template(
        [*history, {"role": "assistant", "content": "", "tool_calls": [call]}, tool],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    got = ours.apply_chat_template(
        [*history, {"role": "assistant", "content": None, "tool_calls": [sent]}, tool]
    )
    assert got == expected and '"arguments": {"a": 1}' in got


def test_extra_variables_documents_and_reasoning_match_transformers(pairs):
    ours, hf = pairs["features"]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning": "because"},
    ]
    documents = [{"title": "T", "text": "body"}]
    for kwargs in ({}, {"enable_thinking": False}, {"documents": documents}):
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert ours.apply_chat_template(messages, **kwargs) == expected


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_thinking_switch_matches_transformers(pairs, thinking):
    """enable_thinking=False writes an empty think block for the reply; earlier turns'
    reasoning is dropped as the template says."""
    ours, hf = pairs["qwen3"]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "because"},
        {"role": "user", "content": "and?"},
    ]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      **kwargs)  # fmt: skip
    assert ours.apply_chat_template(messages, **kwargs) == expected
    assert expected.endswith("<think>\n\n</think>\n\n") == (thinking is False)


def test_raise_exception_becomes_lamina_error(pairs):
    ours, hf = pairs["mistral"]
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(LaminaError, match="roles must alternate"):
        ours.apply_chat_template(bad)
    llama3, _ = pairs["llama3"]
    with pytest.raises(ChatTemplateError, match="Unexpected role: tool"):
        llama3.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_syntax_error_is_a_lamina_error():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        render_chat_template("ok\n{% if messages %}unclosed", [{"role": "user", "content": "x"}])


def test_bad_conversations_are_lamina_errors(pairs):
    ours, _ = pairs["smollm2"]
    with pytest.raises(LaminaError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(LaminaError, match="must be dicts"):
        ours.apply_chat_template(["hello"])
    with pytest.raises(LaminaError, match="tools must be JSON schema dicts"):
        ours.apply_chat_template(CONVERSATIONS["user"], tools=[print])


def test_sandbox_blocks_python_internals():
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])


def test_chat_template_jinja_takes_precedence(tmp_path):
    config = {"bos_token": "<s>", "chat_template": "from config"}
    jinja = "from jinja: {{ bos_token }}{{ messages[0].content }}"
    folder = _write_folder(tmp_path / "both", config, jinja=jinja)
    ours, hf = load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS["user"]
    assert ours.chat_template == jinja
    expected = hf.apply_chat_template(messages, tokenize=False)
    assert expected == "from jinja: <s>What is 2 + 2?"
    assert ours.apply_chat_template(messages) == expected


def test_named_templates_use_default(tmp_path):
    templates = [
        {"name": "tool_use", "template": "tools: {{ messages[0].content }}"},
        {"name": "default", "template": "default: {{ messages[0].content }}"},
    ]
    folder = _write_folder(tmp_path / "named", {"chat_template": templates})
    ours, hf = load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS["user"]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert ours.chat_templates["tool_use"] == templates[0]["template"]

    folder = _write_folder(tmp_path / "no_default", {"chat_template": templates[:1]})
    with pytest.raises(LaminaError, match="no default chat template.*tool_use"):
        load_hf_tokenizer(folder).apply_chat_template(messages)


def test_missing_template_is_a_lamina_error(tmp_path):
    ours = load_hf_tokenizer(_write_folder(tmp_path / "none", {"eos_token": "</s>"}))
    assert ours.chat_template is None
    with pytest.raises(LaminaError, match="no default chat template"):
        ours.apply_chat_template(CONVERSATIONS["user"])


def test_templates_compile_once():
    template = "{{ messages | length }} cached-template-marker"
    messages = CONVERSATIONS["multi_turn"]
    before = _compile.cache_info()
    assert render_chat_template(template, messages) == "3 cached-template-marker"
    assert render_chat_template(template, messages) == "3 cached-template-marker"
    after = _compile.cache_info()
    assert after.misses == before.misses + 1
    assert after.hits == before.hits + 1
