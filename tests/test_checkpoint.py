"""`lamina quantize` checkpoints: written, loaded memory-mapped, bit-identical outputs."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.cli import main
from engine.errors import ModelLoadError
from tests.tiny_models import build_tiny_model

TEXT = "Checkpoints must give the same logits as quantizing on load: 1, 2, 3, ünïcödé."


def assert_same_model(a: LLM, b: LLM) -> None:
    assert np.array_equal(a.prompt_logits(TEXT), b.prompt_logits(TEXT))
    assert a.tokenizer.encode(TEXT) == b.tokenizer.encode(TEXT)
    assert a.config.eos_token_ids == b.config.eos_token_ids
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3)
    assert a.generate(TEXT, params)[0].token_ids == b.generate(TEXT, params)[0].token_ids


def is_memory_mapped(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return not isinstance(base, np.ndarray)  # the root is the mmap object itself


def test_default_model_int8_round_trip(tmp_path):
    out = tmp_path / "ck"
    assert main(["quantize", "default", str(out), "--weights", "int8"]) == 0
    loaded = LLM(out)
    qkv = loaded.loaded.weights.layers[0].qkv
    assert qkv.data.dtype == np.int8 and is_memory_mapped(qkv.data)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        LLM(quant="int8").tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    )
    assert_same_model(loaded, LLM(quant="int8"))


@pytest.mark.parametrize(
    ("name", "weights"), [("qwen2-bias-tied", "int8"), ("llama-all-biases", "f32")]
)
def test_tiny_model_round_trip(name, weights, tmp_path, hf_tokenizer):
    build_tiny_model(name, tmp_path / "hf", hf_tokenizer)
    assert main(["quantize", str(tmp_path / "hf"), str(tmp_path / "ck"), "--weights", weights]) == 0
    assert_same_model(LLM(tmp_path / "ck"), LLM(tmp_path / "hf", quant=weights))


def test_checkpoint_refuses_another_precision(tmp_path, hf_tokenizer):
    build_tiny_model("llama-gqa-untied", tmp_path / "hf", hf_tokenizer)
    main(["quantize", str(tmp_path / "hf"), str(tmp_path / "ck")])
    with pytest.raises(ModelLoadError, match="int8"):
        LLM(tmp_path / "ck", quant="f32")


def test_truncated_checkpoint_is_reported(tmp_path, hf_tokenizer):
    build_tiny_model("llama-gqa-untied", tmp_path / "hf", hf_tokenizer)
    main(["quantize", str(tmp_path / "hf"), str(tmp_path / "ck")])
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        LLM(tmp_path / "ck")


def test_quantize_into_existing_folder_exits_2(tmp_path, capsys):
    assert main(["quantize", "default", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
