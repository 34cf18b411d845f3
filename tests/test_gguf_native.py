"""GGUF files run in their own quantization: the block types end to end, memory while loading.

The reference is the same file dequantized to float32 by the `gguf` package (`--quant f32`),
whose float path test_model_parity checks against transformers: running the blocks natively
may differ from it only by the int8 rounding of the activations.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.gguf_export import export_gguf
from bench.load_memory import measure_load
from engine import LLM, SamplingParams
from engine.loader.default_model import default_model_path
from engine.loader.model_loader import load_model
from engine.weights import BLOCK_ARRAYS, BlockWeight, StackedWeight
from tests.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def mixed_types(name: str) -> str | None:
    """A file mixing every legacy type: attn_v in Q8_0 (so q/k/v stack across layouts), the
    embedding in Q8_0, the other matrices cycling through the 4- and 5-bit types."""
    if name.endswith("attn_v.weight") or name == "token_embd.weight":
        return "Q8_0"
    return LEGACY[sum(map(ord, name)) % len(LEGACY)]


def logit_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean |difference| per position, as a share of the reference's logit range; worst."""
    spread = ref.max(axis=1) - ref.min(axis=1)
    return float((np.abs(ours - ref).mean(axis=1) / spread).max())


def test_a_gguf_of_mixed_block_types_runs_natively(tmp_path, hf_tokenizer):
    build_tiny_model("llama-gqa-untied", tmp_path / "hf", hf_tokenizer)
    path = export_gguf(
        tmp_path / "hf", tmp_path / "m.gguf", default_model_path(), qtype=mixed_types
    )
    native, reference = LLM(path), LLM(path, quant="f32")
    layer = native.loaded.weights.layers[0]
    assert isinstance(layer.qkv, StackedWeight) and isinstance(layer.down, BlockWeight)
    assert native.loaded.weights.embed.kind == "Q8_0"
    ids = list(range(300, 340))
    assert logit_error(native.prompt_logits(ids), reference.prompt_logits(ids)) < 0.01
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    one = native.generate([ids], params)[0].token_ids
    batched = native.generate([ids, ids[:20], ids[5:]], params)[0].token_ids
    assert one == batched  # batched rows give the bits of one-by-one rows


def test_the_default_model_runs_in_its_own_quantization(default_llm, native_llm):
    """No flags: the default Q4_1 GGUF keeps its blocks (Q8_0 embedding), close to float32
    and greedy-equal on most tokens."""
    native = native_llm
    w = native.loaded.weights
    assert w.layers[0].qkv.kind == "Q4_1" and w.embed.kind == "Q8_0"
    assert w.nbytes < 0.3 * default_llm.loaded.weights.nbytes
    text = "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue."
    assert logit_error(native.prompt_logits(text), default_llm.prompt_logits(text)) < 0.03
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "Water boils at", "def add(a, b):"]
    same = sum(
        a == b
        for prompt in prompts
        for a, b in zip(
            native.generate(prompt, params)[0].token_ids,
            default_llm.generate(prompt, params)[0].token_ids,
            strict=True,
        )
    )
    assert same >= 0.75 * 16 * len(prompts)


# The tokenizer and the parsed metadata (49152 tokens and merges for the default model) stay
# in memory beside the weights; they do not grow with the weights.
FIXED_OVERHEAD = 64 * 2**20


def test_loading_a_gguf_keeps_peak_memory_near_the_file_size(tmp_path):
    """Peak RSS while loading the default GGUF grows by at most 1.3x the file's size (plus
    the tokenizer's fixed share), when repacking it (tensor by tensor, 256 rows at a time,
    mapped pages released as they go) and when mapping the repacked layout from the cache."""
    path = default_model_path()
    size = path.stat().st_size
    env = {**os.environ, "LAMINA_CACHE": str(tmp_path)}
    for expected in ("cached at", "mapped from the cache"):
        figures = measure_load(path, env)
        if figures["peak_growth"] is None:
            pytest.skip("this kernel cannot reset a process's peak RSS (/proc/self/clear_refs)")
        assert expected in figures["note"]
        assert figures["weights"] <= 1.1 * size
        assert figures["peak_growth"] <= 1.3 * size + FIXED_OVERHEAD, (figures, size)


def test_the_repacked_layout_is_cached_by_the_files_identity(tmp_path, monkeypatch):
    """A second load maps the cached layout (the same arrays); a changed file, or a bad
    entry, is repacked again."""
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    shutil.copyfile(default_model_path(), gguf)
    first = load_model(gguf)
    second = load_model(gguf)
    assert "cached at" in first.note and "mapped from the cache" in second.note
    a, b = first.weights.layers[2].gate_up, second.weights.layers[2].gate_up
    for name in BLOCK_ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or np.array_equal(x, y)
    assert not b.values.flags.owndata and b.kind == a.kind
    os.utime(gguf, ns=(1, 1))  # another modification time: another file
    assert "cached at" in load_model(gguf).note
    entries = list((tmp_path / "cache" / "repacked").rglob("*.safetensors"))
    assert len(entries) == 1  # the older entry of the same file is gone
    entries[0].write_bytes(b"not safetensors")
    reloaded = load_model(gguf)
    assert "bad cache entry" in reloaded.note and "cached at" in reloaded.note
    assert load_model(gguf).weights.layers[0].qkv.kind == "Q4_1"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_gguf_converts_on_load_when_asked(quant):
    weights = LLM(quant=quant).loaded.weights
    qkv = weights.layers[0].qkv
    assert (isinstance(qkv, BlockWeight) and qkv.kind == "int4-g32") == (quant == "int4")
