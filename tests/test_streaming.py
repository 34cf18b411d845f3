"""Disk -> RAM layer streaming: identical outputs, bounded resident memory, nothing leaked."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.errors import EngineClosedError, LaminaError, UnsupportedModelError
from engine.loader.checkpoint import save_checkpoint
from engine.loader.model_loader import LoadedModel
from engine.loader.tokenizer import Tokenizer
from engine.weights import DenseWeight, Int8Weight, LayerWeights, ModelWeights
from offload.placement import Tier
from offload.streaming import LayerLayout, LayerStream, TensorSpec

MiB = 2**20
VOCAB = 1024
PROMPT = [int(i) for i in np.random.default_rng(1).integers(3, VOCAB, 40)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def random_checkpoint(
    folder: Path, tokenizer, layers: int, hidden: int, ffn: int, int8: bool = True
) -> Path:
    """A random-weight Llama checkpoint written straight from typed weights (fast: random
    bytes, no float generation or quantization); weights large enough that greedy decoding
    has clear winners."""
    rng = np.random.default_rng(layers * hidden)
    heads, kv_heads = 8, 2
    head_dim = hidden // heads

    def linear(rows: int, cols: int):
        if int8:
            data = np.frombuffer(rng.bytes(rows * cols), np.int8).reshape(rows, cols)
            scale = np.full(rows, 2.0 / (127 * np.sqrt(cols)), np.float32)
            return Int8Weight(data.copy(), scale)
        return DenseWeight((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32))

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    qkv_rows = (heads + 2 * kv_heads) * head_dim
    weights = ModelWeights(
        embed=linear(VOCAB, hidden),
        layers=[
            LayerWeights(
                norm(),
                linear(qkv_rows, hidden),
                linear(hidden, heads * head_dim),
                norm(),
                linear(2 * ffn, hidden),
                linear(hidden, ffn),
            )
            for _ in range(layers)
        ],
        final_norm=norm(),
        lm_head=linear(VOCAB, hidden),
    )
    config = ModelConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 256,
            "eos_token_id": 2,
        }
    )
    save_checkpoint(LoadedModel(folder, config, weights, tokenizer), folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A word-level tokenizer of VOCAB words "w0".."w1023": tiny, so that it neither slows
    the tests nor blurs the resident-memory measurement (SmolLM2's takes ~20 MiB)."""
    import tokenizers

    words = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(
        backend,
        special_tokens={"eos_token": "w2"},
        bos_token_id=None,
        eos_token_ids=[2],
        pad_token_id=None,
        chat_template=None,
    )


@pytest.fixture(scope="module")
def small_int8(tmp_path_factory, tokenizer) -> Path:
    """8 layers of 3.6 MiB int8."""
    return random_checkpoint(tmp_path_factory.mktemp("int8"), tokenizer, 8, 512, 2048)


def budget_for(checkpoint: Path, resident_layers: int, **options) -> int:
    """A budget that keeps `resident_layers` layers resident (read off the fully resident plan
    of the same checkpoint under an ample budget with the same KV cache default)."""
    with LLM(checkpoint, max_model_len=256, cpu_memory="4G", **options) as llm:
        plan = llm.placement
    return plan.cpu.used - sum(plan.layer_bytes[resident_layers:]) + 2 * max(plan.layer_bytes)


def test_streamed_outputs_equal_resident(small_int8):
    resident = LLM(small_int8, max_model_len=256)
    with LLM(small_int8, max_model_len=256, cpu_memory=budget_for(small_int8, 2)) as streamed:
        plan = streamed.placement
        assert plan.tiers == (Tier.HOST,) * 2 + (Tier.DISK,) * 6
        assert plan.cpu.used <= plan.cpu.budget
        expected = resident.generate(PROMPT, GREEDY)[0].token_ids
        assert len(set(expected)) > 1  # the model is not degenerate
        assert streamed.generate(PROMPT, GREEDY)[0].token_ids == expected
        assert np.array_equal(streamed.prompt_logits(PROMPT), resident.prompt_logits(PROMPT))
        stats = streamed.stream_stats
        assert stats.reads > 0 and stats.bytes_read > 0 and stats.sync_reads == 0
        assert 0.0 <= stats.overlap <= 1.0


def test_f32_checkpoint_streams_with_page_cache_dropped(tmp_path, tokenizer):
    folder = random_checkpoint(tmp_path, tokenizer, 4, 128, 256, int8=False)
    resident = LLM(folder, max_model_len=256)
    with LLM(
        folder, max_model_len=256, cpu_memory=budget_for(folder, 1), drop_page_cache=True
    ) as s:
        assert s.placement.layers(Tier.DISK) == [1, 2, 3]
        assert s.generate(PROMPT, GREEDY)[0].token_ids == (
            resident.generate(PROMPT, GREEDY)[0].token_ids
        )
        assert s.stream_stats.drop_page_cache and "dropped" in s.stream_stats.describe()


def test_generate_verbose_prints_plan_and_stats(small_int8, capsys):
    from engine.cli import main

    budget = budget_for(small_int8, 2)
    argv = ["generate", "-m", str(small_int8), "--max-model-len", "256", "--verbose"]
    argv += ["--cpu-memory", f"{budget}B", "--max-tokens", "3", "--temperature", "0", "w5 w6"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 resident in host RAM (0-1); 6 streamed from disk (2-7)" in err
    assert "host streaming buffers: 2 x" in err and "overlap" in err


def test_close_leaks_no_file_or_thread(small_int8):
    process = psutil.Process()
    gc.collect()
    fds, threads = process.num_fds(), threading.active_count()
    llm = LLM(small_int8, max_model_len=256, cpu_memory=budget_for(small_int8, 0))
    llm.generate(PROMPT, GREEDY)
    assert threading.active_count() == threads + 1  # the reader
    llm.close()
    assert threading.active_count() == threads
    with pytest.raises(EngineClosedError, match="closed"):
        llm.generate(PROMPT, GREEDY)
    del llm
    gc.collect()  # drops the memory map of the resident weights too
    assert process.num_fds() == fds


def test_unclosed_stream_is_released_when_collected(small_int8):
    process = psutil.Process()
    gc.collect()
    fds = process.num_fds()
    llm = LLM(small_int8, max_model_len=256, cpu_memory=budget_for(small_int8, 0))
    llm.generate(PROMPT, GREEDY)
    del llm
    gc.collect()
    # No more than before: earlier tests' background threads (Ray's, say) may close theirs.
    assert process.num_fds() <= fds


def test_non_checkpoint_too_large_says_to_quantize(tmp_path, tokenizer):
    """A Hugging Face folder is quantized into RAM while loading: nothing to stream from."""
    from safetensors.numpy import save_file

    ck = random_checkpoint(tmp_path / "ck", tokenizer, 4, 64, 128, int8=False)
    config = json.loads((ck / "config.json").read_text())
    del config["lamina"]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config))
    tokenizer.save(hf)
    with LLM(ck) as llm:
        w = llm.loaded.weights
        tensors = {"model.embed_tokens.weight": w.embed.data, "lm_head.weight": w.lm_head.data}
        tensors["model.norm.weight"] = w.final_norm
        for i, layer in enumerate(w.layers):
            p = f"model.layers.{i}."
            q, k, v = np.split(layer.qkv.data, [64, 80])
            gate, up = np.split(layer.gate_up.data, 2)
            parts = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                     "self_attn.o_proj": layer.o_proj.data, "mlp.gate_proj": gate,
                     "mlp.up_proj": up, "mlp.down_proj": layer.down.data}  # fmt: skip
            tensors.update({p + name + ".weight": a for name, a in parts.items()})
            tensors[p + "input_layernorm.weight"] = layer.attn_norm
            tensors[p + "post_attention_layernorm.weight"] = layer.ffn_norm
        save_file(
            {k: np.ascontiguousarray(a) for k, a in tensors.items()}, hf / "model.safetensors"
        )
        budget = budget_for(ck, 0)
    assert np.array_equal(LLM(hf).prompt_logits(PROMPT), LLM(ck).prompt_logits(PROMPT))
    with pytest.raises(LaminaError, match="lamina quantize"):
        LLM(hf, max_model_len=256, cpu_memory=budget)


def test_sparse_layers_are_refused(tmp_path, tokenizer):
    from engine.cli import main

    f32 = random_checkpoint(tmp_path / "f32", tokenizer, 4, 128, 256, int8=False)
    out = tmp_path / "sparse"
    args = ["quantize", str(f32), str(out), "--sparsity", "0.5", "--method", "magnitude"]
    assert main(args) == 0
    with pytest.raises(UnsupportedModelError, match="int8 and f32"):
        LLM(out, max_model_len=256, cpu_memory=budget_for(out, 0))


def write_tensors(path: Path, arrays: list[np.ndarray], gap: int = 3) -> list[int]:
    """Write arrays back to back with `gap` junk bytes between some; return their offsets."""
    offsets, blob = [], bytearray(b"x" * 5)
    for k, a in enumerate(arrays):
        if k % 2:
            blob += b"#" * gap
        blob += b"\0" * (-len(blob) % a.itemsize)
        offsets.append(len(blob))
        blob += a.tobytes()
    path.write_bytes(bytes(blob))
    return offsets


def test_layer_stream_in_order_and_random_access(tmp_path):
    rng = np.random.default_rng(0)
    layers = {i: [rng.standard_normal(7 + i).astype(np.float32), rng.integers(0, 9, (3, i + 1))]
              for i in range(6)}  # fmt: skip
    flat = [a for i in range(6) for a in layers[i]]
    offsets = write_tensors(tmp_path / "blob", flat)
    specs = {
        i: [TensorSpec(f"t{j}", offsets[2 * i + j], a.dtype, a.shape) for j, a in enumerate(ts)]
        for i, ts in layers.items()
    }
    resident = {0: "resident zero"}
    streamed = {i: specs[i] for i in range(1, 6)}
    with LayerStream(tmp_path / "blob", 6, resident, streamed, lambda i, a: (i, a)) as stream:
        assert stream.fetch(0) == "resident zero"
        for _ in range(3):  # passes wrap around
            for i in range(1, 6):
                layer = stream.fetch(i)
                assert layer[0] == i
                for j, want in enumerate(layers[i]):
                    assert np.array_equal(layer[1][f"t{j}"], want)
                stream.release(i)
        for i in (4, 2, 5, 3):  # random access reads what it must, never stale data
            got = stream.fetch(i)[1]
            assert all(np.array_equal(got[f"t{j}"], w) for j, w in enumerate(layers[i]))
            stream.release(i)
        with pytest.raises(IndexError):
            stream.fetch(6)


def test_layer_layout_merges_adjacent_tensors_and_keeps_alignment():
    f32, i8 = np.dtype(np.float32), np.dtype(np.int8)
    specs = [
        TensorSpec("b", 108, f32, (4,)),  # adjacent to "a": one run
        TensorSpec("a", 100, i8, (8,)),
        TensorSpec("c", 200, f32, (2, 3)),  # a second run
    ]
    layout = LayerLayout.of(specs)
    assert [(f, n) for f, _, n in layout.runs] == [(100, 24), (200, 24)]
    for file_offset, buffer_offset, _ in layout.runs:
        assert (file_offset - buffer_offset) % 64 == 0
    assert {name for name, *_ in layout.views} == {"a", "b", "c"}


def test_a_tensor_at_an_odd_file_offset_reads_into_an_aligned_place(tmp_path):
    """A checkpoint's odd-length tensor (a block weight's kind) leaves the next one at an odd
    file offset: that one gets its own run at a 4-byte boundary of the buffer, and reads
    back whole (a GPU reads block values as int32 words, aligned)."""
    kind = np.frombuffer(b"int4-g128", np.uint8)
    values = np.arange(64, dtype=np.uint8)
    offsets = [64, 64 + kind.size]
    (tmp_path / "blob").write_bytes(bytes(64) + kind.tobytes() + values.tobytes())
    specs = [TensorSpec("kind", offsets[0], kind.dtype, kind.shape),
             TensorSpec("values", offsets[1], values.dtype, values.shape)]  # fmt: skip
    layout = LayerLayout.of(specs)
    assert len(layout.runs) == 2
    assert all(where.start % 4 == 0 for _, where, *_ in layout.views)
    with LayerStream(tmp_path / "blob", 1, {}, {0: specs}, lambda i, a: a) as stream:
        got = stream.fetch(0)
        assert np.array_equal(got["kind"], kind) and np.array_equal(got["values"], values)


_RSS_SCRIPT = """
import json, sys
import numpy as np
from engine import LLM, SamplingParams

def status(key):  # kB figures of /proc/self/status, in bytes
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

small, big, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [int(i) for i in np.arange(5, 45)]
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
options = {"max_model_len": 256, "cpu_memory": budget, "max_num_batched_tokens": 64}
warm = LLM(small, **options)  # loads every kernel's code
warm.generate(ids, params)
warm.close()  # kept alive: what it allocated stays in the baseline, not reused below
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
with LLM(big, **options) as llm:
    llm.generate(ids, params)
    streamed_peak = status("VmHWM")
    plan = llm.placement.describe()
resident = LLM(big, max_model_len=256)
resident.generate(ids, params)
print(json.dumps({"streamed_growth": streamed_peak - base,
                  "resident_growth": status("VmRSS") - base, "plan": plan}))
"""
# What RSS growth may exceed the budget by: Python objects, allocator slack and scratch that
# the budget's estimates leave out (a real tokenizer adds its own: ~20 MiB for 49k tokens).
RSS_MARGIN = 16 * MiB


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS"
)
def test_resident_memory_stays_under_budget(tmp_path, tokenizer, small_int8):
    big = random_checkpoint(tmp_path / "big", tokenizer, 16, 512, 4096)  # 112 MiB of layers
    weights = (big / "model.safetensors").stat().st_size
    budget = budget_for(big, 0, max_num_batched_tokens=64)  # a smaller activation reserve
    assert weights > 4 * budget
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(small_int8), str(big), str(budget)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "16 streamed from disk" in result["plan"]
    assert result["streamed_growth"] <= budget + RSS_MARGIN, result
    assert result["resident_growth"] > budget + RSS_MARGIN  # so the bound means something


def test_streaming_bench_reports_its_figures(small_int8):
    from bench.streaming import run_streaming_bench

    budget = budget_for(small_int8, 2)
    result = run_streaming_bench(small_int8, None, budget, prompt=8, gen=3, runs=1)
    for key in (
        "resident_decode_tok_s",
        "streamed_decode_tok_s",
        "streamed_vs_resident",
        "streamed_cached_decode_tok_s",
        "disk_read_gbps",
        "raw_disk_read_gbps",
        "overlap",
        "peak_rss_mb",
        "rss_growth_vs_budget",
    ):
        assert result[key] > 0 or key == "overlap", key
    assert result["cpu_memory_mb"] == budget / MiB
    assert "6 streamed from disk" in result["placement"]
    assert result["page_cache"].startswith("dropped")


@pytest.mark.parametrize(
    ("name", "resident_layers"),
    [("qwen3-qknorm-tied", 1), ("qwen3_moe-renorm", 0)],
)
def test_architecture_extras_stream_with_their_layer(name, resident_layers, tmp_path, hf_tokenizer):
    """int8 checkpoints streamed from disk: Qwen3's q and k norms, and a Qwen3-MoE layer's
    router and stacked experts (split into per-expert views), travel with each layer;
    prefill and decode give the resident model's bits."""
    from engine.cli import main
    from tests.tiny_models import build_tiny_model

    build_tiny_model(name, tmp_path / "hf", hf_tokenizer)
    checkpoint = tmp_path / "ck"
    assert main(["quantize", str(tmp_path / "hf"), str(checkpoint)]) == 0
    resident = LLM(checkpoint, max_model_len=256)
    budget = budget_for(checkpoint, resident_layers)
    with LLM(checkpoint, max_model_len=256, cpu_memory=budget) as streamed:
        assert Tier.DISK in streamed.placement.tiers
        ids = PROMPT[:20]
        assert np.array_equal(streamed.prompt_logits(ids), resident.prompt_logits(ids))
        expected = resident.generate(ids, GREEDY)[0].token_ids
        assert streamed.generate(ids, GREEDY)[0].token_ids == expected
