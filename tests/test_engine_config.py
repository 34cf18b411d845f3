"""EngineConfig is the one definition of the engine's settings: LLM(**kwargs) and the CLI's
model flags both come from it, and bad values are user errors raised before any model loads.
The Backend protocol is what both backends implement, checked signature by signature."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from engine.backends import Backend
from engine.backends.cpu import CPUBackend
from engine.backends.cuda import CUDABackend
from engine.cli import build_parser
from engine.engine_config import EngineConfig
from engine.errors import InvalidInputError, LaminaError

BAD = [
    ({"max_num_seqs": 0}, "max_num_seqs must be positive"),
    ({"max_num_seqs": 2.5}, "max_num_seqs must be an integer"),
    ({"max_num_seqs": True}, "max_num_seqs must be an integer"),
    ({"max_num_seqs": 64, "max_num_batched_tokens": 8}, "must be at least max_num_seqs"),
    ({"max_model_len": 1}, "max_model_len must be at least 2"),
    ({"kv_cache_mb": float("nan")}, "kv_cache_mb must be finite"),
    ({"kv_cache_mb": -1}, "kv_cache_mb must be positive"),
    ({"kv_cache_fraction": 1.5}, r"kv_cache_fraction must be in \(0, 1\]"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype must be one of float32, int8"),
    ({"quant": "int3"}, "quant must be one of f32, int8"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"cpu_memory": "lots"}, "not a memory size"),
    ({"cpu_memory": 0}, "cpu_memory must be positive"),
    ({"threads": 10_000}, "threads must be between 1 and"),
    ({"enable_prefix_caching": "yes"}, "enable_prefix_caching must be true or false"),
    ({"max_num_seq": 4}, "unknown engine setting 'max_num_seq'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD)
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        EngineConfig.from_kwargs(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), BAD[:3])
def test_llm_refuses_bad_settings_before_loading(kwargs, message, monkeypatch):
    import engine.api

    def never(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.api, "load_model", never)
    with pytest.raises(LaminaError, match=message):
        engine.api.LLM(**kwargs)


def test_memory_sizes_become_bytes():
    config = EngineConfig(cpu_memory="512M", gpu_memory="2G")
    assert (config.cpu_memory, config.gpu_memory) == (512 * 2**20, 2 * 2**30)
    assert EngineConfig(cpu_memory="700").cpu_memory == 700 * 2**20  # bare numbers are MiB


def test_every_field_has_a_cli_flag_on_every_model_command():
    parser = build_parser()
    commands = ("generate", "chat", "batch", "serve", "perplexity")
    for command in commands:
        extra = ["p"] if command == "generate" else ["a", "b"] if command == "batch" else []
        extra = ["f"] if command == "perplexity" else extra
        args = parser.parse_args([command, *extra])
        assert EngineConfig.from_cli(args) == EngineConfig()  # defaults are the config's
    args = parser.parse_args(
        ["generate", "-m", "x.gguf", "--max-num-seqs", "4", "--cpu-memory", "1G",
         "--no-enable-prefix-caching", "--kv-cache-dtype", "int8", "p"]
    )  # fmt: skip
    config = EngineConfig.from_cli(args)
    assert (config.model, config.max_num_seqs, config.cpu_memory) == ("x.gguf", 4, 2**30)
    assert config.enable_prefix_caching is False and config.kv_cache_dtype == "int8"


def test_help_shows_each_field_and_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(EngineConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 64)" in text and "(default: float32)" in text


@pytest.mark.parametrize("backend", [CPUBackend, CUDABackend])
def test_backends_implement_the_protocol(backend):
    """Every protocol member exists with the same parameters (names, kinds, defaults)."""
    members = [n for n in dir(Backend) if not n.startswith("_")]
    members += list(Backend.__annotations__)
    for name in members:
        assert hasattr(backend, name), f"{backend.__name__} lacks {name}"
        want = getattr(Backend, name, None)
        if callable(want):
            got = inspect.signature(getattr(backend, name)).parameters
            expected = inspect.signature(want).parameters
            shape = [(p.name, p.kind, p.default) for p in expected.values()]
            assert [(p.name, p.kind, p.default) for p in got.values()] == shape, name
