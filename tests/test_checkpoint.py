"""`lamina quantize` checkpoints: written, loaded memory-mapped, bit-identical outputs."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.cli import main
from engine.errors import ModelLoadError
from engine.loader.gguf_blocks import dequantize
from engine.loader.model_loader import load_model
from engine.quant.formats import WeightPlan
from engine.quant.gptq import gptq_int4
from engine.quant.int4 import quantize_int4
from engine.weights import BLOCK_ARRAYS, BlockWeight, DenseWeight, Int8Weight
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
    ("name", "weights"),
    [
        ("qwen2-bias-tied", "int8"),
        ("llama-all-biases", "f32"),
        ("llama-gqa-untied", "int4"),
        ("qwen3-qknorm-tied", "int8"),
        ("phi3-longrope", "int8"),
        ("llama-yarn", "f32"),
        ("gemma3_text-mixed", "int8"),
        ("gemma2-softcap", "int4"),
    ],
)
def test_tiny_model_round_trip(name, weights, tmp_path, hf_tokenizer):
    build_tiny_model(name, tmp_path / "hf", hf_tokenizer)
    assert main(["quantize", str(tmp_path / "hf"), str(tmp_path / "ck"), "--weights", weights]) == 0
    # One thread each: float32 BLAS sums in another order with another thread count, and
    # the default count follows the machine's load
    assert_same_model(
        LLM(tmp_path / "ck", threads=1), LLM(tmp_path / "hf", quant=weights, threads=1)
    )


def test_default_gguf_int4_round_trip_is_memory_mapped(tmp_path):
    """A 4-bit checkpoint made from the default GGUF loads mapped, holding the arrays that
    quantizing on load makes (so the same logits); float16 scales and minimums."""
    out = tmp_path / "ck"
    assert main(["quantize", "default", str(out), "--weights", "int4", "--group-size", "64"]) == 0
    mapped = LLM(out).loaded.weights.layers[3].gate_up
    on_load = load_model(None, plan=WeightPlan("int4", 64)).weights.layers[3].gate_up
    assert isinstance(mapped, BlockWeight) and mapped.group == 64
    assert is_memory_mapped(mapped.values) and mapped.scale.dtype == np.uint16
    for field in BLOCK_ARRAYS:
        a, b = getattr(mapped, field), getattr(on_load, field)
        assert (a is None and b is None) or np.array_equal(a, b)


def test_layer_weights_mix_precisions(tmp_path, hf_tokenizer):
    """--layer-weights keeps the embedding and one layer's down projection at int8 in an
    int4 checkpoint, as Q4_K_M keeps some matrices at higher precision."""
    build_tiny_model("llama-gqa-untied", tmp_path / "hf", hf_tokenizer)
    args = ["quantize", str(tmp_path / "hf"), str(tmp_path / "ck"), "--weights", "int4"]
    assert main([*args, "--layer-weights", "embed=int8,lm_head=int8", "--layer-weights",
                 "1.down=int8"]) == 0  # fmt: skip
    w = LLM(tmp_path / "ck").loaded.weights
    assert isinstance(w.embed, Int8Weight) and isinstance(w.lm_head, Int8Weight)
    assert isinstance(w.layers[1].down, Int8Weight) and isinstance(w.layers[0].down, BlockWeight)


def test_a_tied_head_at_another_precision_is_untied():
    """The default model ties its head to its embedding; a plan that stores them apart gets
    two matrices, each as asked."""
    w = load_model(None, plan=WeightPlan("int4", overrides={"lm_head": "int8"})).weights
    assert isinstance(w.embed, BlockWeight) and isinstance(w.lm_head, Int8Weight)
    assert load_model(None, plan=WeightPlan("int4")).weights.lm_head.kind == "int4-g32"


def test_gptq_beats_round_to_nearest_on_its_calibration_error(hf_tokenizer):
    """GPTQ's compensated rounding leaves a smaller output error than RTN on the inputs it
    was calibrated on (the quantity it minimises), for the same grid family."""
    rng = np.random.default_rng(0)
    # correlated inputs, as a model's activations are: 32 directions in 128 features
    x = rng.standard_normal((1024, 32)) @ rng.standard_normal((32, 128))
    x += 0.05 * rng.standard_normal(x.shape)
    w = DenseWeight(rng.standard_normal((48, 128)).astype(np.float32))
    rtn, gptq = dequantize(quantize_int4(w, 32)), dequantize(gptq_int4(w, x.T @ x, 32))
    err = [np.linalg.norm(x @ (q - w.data).T) for q in (rtn, gptq)]
    assert err[1] < 0.7 * err[0], err


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
