"""The CUDA backend against the CPU backend on a toy model, and device selection.

Runs on numba's CUDA simulator (conftest.py), which makes every CUDA thread a Python thread:
the model is as small as a real one can be in shape (2 layers, hidden 16, GQA, attention
biases, vocabulary 32) and passes are few. `cudasim.pooled_blocks` makes the simulator
several times faster without changing what it computes. The mixtures of experts are
tests/tiny_models.py's, with their output head cut to its first rows.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
from numba import cuda
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import kernels_gpu
from engine import LLM, SamplingParams
from engine.backends.cpu import CPUBackend
from engine.backends.cuda import CUDABackend
from engine.backends.device import select_device
from engine.cli import main
from engine.errors import LaminaError
from engine.kv_cache import ForwardBatch, PagedKVCache
from engine.layer_placement import ResidentLayers
from engine.loader.model_loader import load_model
from engine.model import Transformer, Workspace
from engine.weights import (
    BLOCK_ARRAYS,
    BlockWeight,
    ColskipInt8Weight,
    Int8Weight,
    ModelWeights,
    SparseInt8Weight,
    StackedWeight,
)
from tests.cudasim import pooled_blocks
from tests.test_block_formats import BLOCK_FORMATS, block_weight
from tests.test_load_fuzz import write_tiny_gguf
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(not kernels_gpu.available(), reason="no CUDA GPU or simulator")

VOCAB = 32
EXPERT_FFN = 8
PROMPTS = [[3, 5, 7, 9, 11], [4, 6, 8]]


@pytest.fixture(scope="module", autouse=True)
def fast_simulator():
    with pooled_blocks():
        yield


def build_toy_llama(
    folder, tied: bool, seed: int = 0, layers: int = 2, qwen3=False, experts: int = 0
) -> None:
    """A random Llama (`layers` layers, hidden 16, 2 query heads on 1 kv head, ffn 32,
    attention biases) with a word-level tokenizer `w0 .. w31`, saved as a Hugging Face
    folder; with `qwen3`, a Qwen3 (the same plus per-head q and k norms); with `experts`, a
    Mixtral (no biases; that many experts of width 8 in each layer, top 2: each smaller
    than the layer's attention, as in real mixtures of experts)."""
    hidden, ffn, heads, kv_heads, head_dim = 16, 32, 2, 1, 8
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:  # large enough that greedy picks are clear
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, hidden)}
    tensors["model.norm.weight"] = 1 + rand(hidden)
    if not tied:
        tensors["lm_head.weight"] = rand(VOCAB, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, rows, cols in [
            ("self_attn.q_proj", heads * head_dim, hidden),
            ("self_attn.k_proj", kv_heads * head_dim, hidden),
            ("self_attn.v_proj", kv_heads * head_dim, hidden),
            ("self_attn.o_proj", hidden, heads * head_dim),
        ]:
            tensors[p + name + ".weight"] = rand(rows, cols)
            if not experts:
                tensors[p + name + ".bias"] = rand(rows)
        if experts:
            tensors[p + "block_sparse_moe.gate.weight"] = rand(experts, hidden) * 3
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                tensors[q + "w1.weight"] = rand(EXPERT_FFN, hidden)
                tensors[q + "w3.weight"] = rand(EXPERT_FFN, hidden)
                tensors[q + "w2.weight"] = rand(hidden, EXPERT_FFN)
        else:
            tensors[p + "mlp.gate_proj.weight"] = rand(ffn, hidden)
            tensors[p + "mlp.up_proj.weight"] = rand(ffn, hidden)
            tensors[p + "mlp.down_proj.weight"] = rand(hidden, ffn)
        tensors[p + "input_layernorm.weight"] = 1 + rand(hidden)
        tensors[p + "post_attention_layernorm.weight"] = 1 + rand(hidden)
        if qwen3:
            tensors[p + "self_attn.q_norm.weight"] = 1 + rand(head_dim)
            tensors[p + "self_attn.k_norm.weight"] = 1 + rand(head_dim)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    arch = "mixtral" if experts else "qwen3" if qwen3 else "llama"
    classes = {"mixtral": "MixtralForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    config = {
        "model_type": arch,
        "architectures": [classes.get(arch, "LlamaForCausalLM")],
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": EXPERT_FFN if experts else ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "attention_bias": not experts,
        **({"num_local_experts": experts, "num_experts_per_tok": 2} if experts else {}),
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda") / "untied"
    build_toy_llama(folder, tied=False)
    return folder


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda") / "tied"
    build_toy_llama(folder, tied=True, seed=1)
    return folder


def on_both(folder, **kwargs) -> tuple[LLM, LLM]:
    return tuple(LLM(folder, device=d, kv_cache_mb=1, **kwargs) for d in ("cpu", "cuda"))


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, share: float) -> None:
    """max |ours - ref| at most `share` of the reference logits' range."""
    assert ours.shape == ref.shape
    worst, spread = float(np.abs(ours - ref).max()), float(np.ptp(ref))
    assert worst <= share * spread, f"max |diff| {worst:.2e} > {share:g} of range {spread:.2f}"


def test_int8_linear_is_bit_identical_to_cpu():
    """Decode (CPU GEMV) and prefill (CPU GEMM) shapes, with a bias."""
    rng = np.random.default_rng(0)
    weight = Int8Weight(
        rng.integers(-127, 128, (20, 12), dtype=np.int8),
        rng.random(20, dtype=np.float32),
        rng.standard_normal(20).astype(np.float32),
    )
    cpu, gpu = CPUBackend(), CUDABackend()
    moved = ModelWeights(weight, [], np.ones(12, np.float32), weight)
    gpu.prepare_weights(moved)
    assert moved.lm_head is moved.embed  # a shared weight stays shared
    for tokens in (1, 3):
        x = rng.standard_normal((tokens, 12)).astype(np.float32)
        ours = gpu.to_numpy(gpu.linear(cuda.to_device(x), moved.lm_head))
        np.testing.assert_array_equal(ours, cpu.linear(x, weight))


def test_int8_prompt_logits_match_cpu(untied):
    cpu, gpu = on_both(untied, quant="int8")
    assert gpu.device == "cuda" and isinstance(gpu.backend, CUDABackend)
    # Integer matmuls are exact on both; attention, norms and activations round differently
    # in the last bit, which can move an int16 activation by one step (3e-5 of a row's
    # peak). Measured: 5e-6 of the range.
    assert_logits_close(gpu.prompt_logits(PROMPTS[0]), cpu.prompt_logits(PROMPTS[0]), 5e-5)


def test_f32_tied_prompt_logits_match_cpu(tied):
    cpu, gpu = on_both(tied)
    assert gpu.loaded.weights.lm_head is gpu.loaded.weights.embed
    # Float32 all the way: summation orders and libm differ (measured: 3e-7 of the range).
    assert_logits_close(gpu.prompt_logits(PROMPTS[0]), cpu.prompt_logits(PROMPTS[0]), 3e-6)


@pytest.mark.parametrize("fmt", [*BLOCK_FORMATS, "stacked"])
def test_block_linears_and_lookups_match_cpu(fmt):
    """Every block format (lamina's int4, each GGUF type) and a stacked q/k/v of two, with a
    bias: decode, prefill, a fused rmsnorm and an add into the stream. Both devices compute
    the same integer block dots; they sum the blocks' float products in other orders."""
    rng = np.random.default_rng(7)
    if fmt == "stacked":  # as a Q4_K_M file's attention: Q4_K q and k, Q6_K v
        parts = [block_weight(rng, name, n, 256) for name, n in (("Q4_K", 20), ("Q6_K", 5))]
        weight = StackedWeight(parts, rng.standard_normal(25).astype(np.float32))
    else:
        weight = block_weight(rng, fmt, 20, 40)
        weight.bias = rng.standard_normal(20).astype(np.float32)
    k, n = weight.in_features, weight.out_features
    cpu, gpu = CPUBackend(), CUDABackend()
    moved = ModelWeights(weight, [], np.ones(k, np.float32), weight)
    gpu.prepare_weights(moved)
    norm = (1 + rng.standard_normal(k)).astype(np.float32)
    for tokens in (1, 9):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        residual = rng.standard_normal((tokens, n)).astype(np.float32)
        x_d, norm_d, residual_d = (cuda.to_device(a) for a in (x, norm, residual))
        pairs = [
            (gpu.linear(x_d, moved.lm_head), cpu.linear(x, weight)),
            (gpu.norm_linear(x_d, norm_d, 1e-5, moved.lm_head),
             cpu.norm_linear(x, norm, 1e-5, weight)),
            (gpu.linear_add_(residual_d, x_d, moved.lm_head),
             cpu.linear_add_(residual.copy(), x, weight)),
        ]  # fmt: skip
        for ours, ref in pairs:  # sums of terms up to max|ref|: their float32 rounding
            atol = 1e-5 * np.abs(ref).max()
            np.testing.assert_allclose(gpu.to_numpy(ours), ref, rtol=1e-5, atol=atol)
    if fmt != "stacked":
        ids = np.array([19, 0, 7], np.int64)
        ours = gpu.to_numpy(gpu.embed(moved.embed, ids))
        np.testing.assert_array_equal(ours, cpu.embed(weight, ids))


def test_int4_prompt_logits_and_greedy_tokens_match_cpu(untied):
    cpu, gpu = on_both(untied, quant="int4")
    assert isinstance(gpu.loaded.weights.layers[0].qkv, BlockWeight)
    # Both round the activations to the same int8 blocks (norms agree to the last bit or
    # so); the float sums of the blocks' products run in other orders.
    assert_logits_close(gpu.prompt_logits(PROMPTS[0]), cpu.prompt_logits(PROMPTS[0]), 5e-5)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in cpu.generate(PROMPTS, params)]
    assert [out.token_ids for out in gpu.generate(PROMPTS, params)] == expected


def test_a_gguf_of_mixed_block_types_runs_on_the_gpu_as_on_the_cpu(tmp_path):
    """A GGUF run as it is: each layer matrix in another legacy type, v in Q8_0 beside a Q4_1
    k (q/k/v stacked across two layouts); prompt logits and greedy tokens as on the CPU."""
    kinds = {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q5_0",
             "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q5_1"}  # fmt: skip
    path = write_tiny_gguf(tmp_path / "mixed.gguf", block_type=kinds.get)
    cpu, gpu = on_both(path)
    layer = gpu.loaded.weights.layers[0]
    assert isinstance(layer.qkv, StackedWeight) and layer.down.kind == "Q5_1"
    ids = [40, 41, 42, 43, 44, 45]
    assert_logits_close(gpu.prompt_logits(ids), cpu.prompt_logits(ids), 5e-5)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert gpu.generate([ids], params)[0].token_ids == cpu.generate([ids], params)[0].token_ids


def test_qwen3_head_norms_match_cpu(tmp_path):
    build_toy_llama(tmp_path / "qwen3", tied=False, qwen3=True)
    cpu, gpu = on_both(tmp_path / "qwen3")
    assert gpu.config.qk_norm
    assert_logits_close(gpu.prompt_logits(PROMPTS[0]), cpu.prompt_logits(PROMPTS[0]), 3e-6)


def test_engine_greedy_tokens_match_cpu_with_int8_kv_cache(untied):
    """Two sequences prefill together, then decode together, through the scheduler."""
    cpu, gpu = on_both(untied, quant="int8", kv_cache_dtype="int8")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in cpu.generate(PROMPTS, params)]
    assert [out.token_ids for out in gpu.generate(PROMPTS, params)] == expected


def paged_logits(backend, folder) -> list[np.ndarray]:
    """Three passes over an int8 paged cache of 2-token blocks: a 3-token prefill; a fork,
    whose shared, half-full last block is copied on write (keys, values and their scales)
    as one sequence decodes while the other takes a 2-token chunk; a decode step of both."""
    loaded = load_model(folder, "int8")
    backend.prepare_weights(loaded.weights)
    c = loaded.config
    model = Transformer(c, loaded.weights, ResidentLayers(loaded.weights.layers), backend)
    workspace = Workspace(backend, c, tokens=4, logit_rows=2)
    cache = PagedKVCache(backend, c.num_layers, c.num_kv_heads, c.head_dim, 12, 2, "int8")
    cache.add_sequence("a", [])
    steps = [[("a", [3, 5, 7])], [("a", [9]), ("b", [11, 13])], [("a", [15]), ("b", [17])]]
    logits = []
    for step, chunks in enumerate(steps):
        if step == 1:
            cache.fork("a", "b")
        logits.append(np.array(model.forward(ForwardBatch.build(cache, chunks), workspace)))
        for seq_id, tokens in chunks:
            cache.commit(seq_id, tokens)
    a, b = cache.block_table("a"), cache.block_table("b")
    assert a[0] == b[0] and a[1] != b[1]  # the full block stays shared, the partial one not
    return logits


def test_paged_int8_cache_with_copy_on_write_matches_cpu(untied):
    """The int8 cache adds its own rounding steps to the int8 weights' (measured: 2e-5)."""
    for ours, ref in zip(paged_logits(CUDABackend(), untied), paged_logits(CPUBackend(), untied)):
        assert_logits_close(ours, ref, 1e-4)


# Logits over the first tokens only: one GEMV over the 49k rows of the tiny models' head
# takes minutes in the simulator.
MOE_VOCAB = 64
MOE_MODELS = ("qwen3_moe-renorm", "mixtral-window", "gemma2-softcap")


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("moe")
    for name in MOE_MODELS:
        build_tiny_model(name, root / name, hf_tokenizer)
    return {name: root / name for name in MOE_MODELS}


def moe_logits(backend, folder, quant: str) -> list[np.ndarray]:
    """Three passes of a tiny mixture of experts: a prefill of two sequences (3 and 2
    tokens, so most experts get some of the tokens: gathered and added back by row), a
    decode step of both, and one of the first alone (its experts have every token)."""
    loaded = load_model(folder, quant)
    weights = loaded.weights
    head = weights.lm_head
    if isinstance(head, BlockWeight):  # its first 16-row groups
        groups = -(-MOE_VOCAB // 16)
        cut = {f: a[:groups] for f in BLOCK_ARRAYS if (a := getattr(head, f)) is not None}
        weights.lm_head = dataclasses.replace(head, out_features=MOE_VOCAB, **cut)
    else:
        cut = {"scale": head.scale[:MOE_VOCAB]} if isinstance(head, Int8Weight) else {}
        weights.lm_head = dataclasses.replace(head, data=head.data[:MOE_VOCAB], **cut)
    c = dataclasses.replace(loaded.config, vocab_size=MOE_VOCAB)
    backend.prepare_weights(weights)
    model = Transformer(c, weights, ResidentLayers(weights.layers), backend)
    workspace = Workspace(backend, c, tokens=5, logit_rows=2)
    cache = PagedKVCache(backend, c.num_layers, c.num_kv_heads, c.head_dim, 8, 4)
    cache.add_sequence("a", [])
    cache.add_sequence("b", [])
    steps = [[("a", [300, 5000, 17]), ("b", [42, 9000])], [("a", [77]), ("b", [123])], [("a", [8])]]
    logits = []
    for chunks in steps:
        logits.append(np.array(model.forward(ForwardBatch.build(cache, chunks), workspace)))
        for seq_id, tokens in chunks:
            cache.commit(seq_id, tokens)
    return logits


@pytest.mark.parametrize(
    ("name", "quant", "share"),
    [
        ("qwen3_moe-renorm", "f32", 3e-6),
        # Each expert quantises its two inputs to int16, where a last-bit difference moves
        # a value by one step (3e-5 of a row's peak), as the int8 cache's steps do in the
        # paged test: its tolerance (measured: 4e-5 and 2e-5).
        ("qwen3_moe-renorm", "int8", 1e-4),
        ("mixtral-window", "int8", 1e-4),
        ("mixtral-window", "int4", 1e-4),  # int8 activations per 32 inputs: as int8's
        ("gemma2-softcap", "f32", 3e-6),  # soft-capped attention and logits
    ],
)
def test_mixture_of_experts_matches_cpu(moe_folders, name, quant, share):
    """Routing runs on the host with the CPU's kernels, so both devices pick the same
    experts and differ only in float rounding (f32 measured: 5e-7)."""
    gpu = moe_logits(CUDABackend(), moe_folders[name], quant)
    for ours, ref in zip(gpu, moe_logits(CPUBackend(), moe_folders[name], quant), strict=True):
        assert_logits_close(ours, ref, share)


# Weight formats with no CUDA kernel, by the words their error must use.
UNRUNNABLE = {
    "sparse int8": lambda: SparseInt8Weight(
        np.zeros((2, 2), np.uint8),
        np.zeros(0, np.int8),
        np.zeros(3, np.int64),
        np.ones(2, np.float32),
        16,
    ),
    "activation-sparse int8": lambda: ColskipInt8Weight(
        np.zeros((16, 2), np.int8), np.ones(2, np.float32), 0.1
    ),
}


@pytest.mark.parametrize("named", list(UNRUNNABLE))
def test_formats_without_a_kernel_are_refused_by_name(named):
    weight = UNRUNNABLE[named]()
    weights = ModelWeights(weight, [], np.ones(16, np.float32), weight)
    with pytest.raises(LaminaError, match=named):
        CUDABackend().prepare_weights(weights)


def test_an_expert_without_a_kernel_is_refused_by_name(moe_folders):
    weights = load_model(moe_folders["mixtral-window"], "int8").weights
    weights.layers[1].set_linear("experts.3.down", UNRUNNABLE["sparse int8"]())
    with pytest.raises(LaminaError, match="sparse int8"):
        CUDABackend().prepare_weights(weights)


def test_a_weight_left_in_host_memory_is_refused():
    weight = Int8Weight(np.ones((4, 4), np.int8), np.ones(4, np.float32))
    gpu = CUDABackend()
    with pytest.raises(LaminaError, match="host memory"):
        gpu.linear(cuda.to_device(np.ones((1, 4), np.float32)), weight)


def test_auto_picks_the_cpu_under_the_simulator_and_cuda_runs_on_it():
    assert kernels_gpu.simulated()
    assert select_device("auto").name == "cpu"
    assert select_device().name == "cpu"
    assert select_device("cuda").name == "cuda"
    assert select_device("cpu").reason == "requested"


def test_auto_picks_a_real_gpu(monkeypatch):
    monkeypatch.setattr(kernels_gpu, "simulated", lambda: False)
    monkeypatch.setattr(kernels_gpu, "available", lambda: True)
    monkeypatch.setattr("engine.backends.device._gpu_name", lambda: "Test GPU")
    choice = select_device("auto")
    assert (choice.name, choice.describe()) == ("cuda", "device cuda (auto: Test GPU)")


def test_cuda_without_a_gpu_is_an_error_and_auto_falls_to_cpu(monkeypatch):
    monkeypatch.setattr(kernels_gpu, "simulated", lambda: False)
    monkeypatch.setattr(kernels_gpu, "available", lambda: False)
    with pytest.raises(LaminaError, match="no usable CUDA GPU"):
        select_device("cuda")
    assert select_device("auto").name == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "CUDA", ""])
def test_unknown_devices_are_refused(bad, untied):
    with pytest.raises(LaminaError, match="auto, cpu, cuda"):
        LLM(untied, device=bad)


def test_cli_device_flag(untied, capsys, monkeypatch):
    argv = ["generate", "-m", str(untied), "--max-tokens", "2", "--temperature", "0"]
    assert main([*argv, "--device", "cpu", "--verbose", "w3 w5"]) == 0
    assert "lamina: device cpu (requested)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "gpu", "w3"])
    assert exc.value.code == 2
    monkeypatch.setattr(kernels_gpu, "simulated", lambda: False)
    monkeypatch.setattr(kernels_gpu, "available", lambda: False)
    capsys.readouterr()
    assert main([*argv, "--device", "cuda", "w3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable CUDA GPU" in err


ALLOCATORS = ("device_array", "device_array_like", "to_device", "pinned_array", "mapped_array")


def warm_step_calls(llm: LLM, monkeypatch, steps: int = 3) -> list[list[str]]:
    """Two sequences decode; after warm-up, the allocator calls (device or page-locked) and
    waits for the device (a stream, an event, all of it) that the engine's thread makes in
    each of `steps` decode steps, in order. (A disk stream's uploader thread waits for its
    own copies; when it does is up to the disk.)"""
    loop = llm.engine_loop
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for prompt in PROMPTS:
        loop.add(loop.new_group(*llm.new_request(prompt, params)))
    for _ in range(4):  # prefill, then decode steps
        loop.step()
    calls: list[str] = []
    engine_thread = threading.current_thread()

    def note(name: str) -> None:
        if threading.current_thread() is engine_thread:
            calls.append(name)

    for name in ALLOCATORS:
        original = getattr(cuda, name)
        monkeypatch.setattr(cuda, name, lambda *a, _f=original, _n=name, **k: note(_n)
                            or _f(*a, **k))  # fmt: skip
    for kind, label in (
        (type(loop.runner.backend.stream), "wait"),
        (type(cuda.event()), "event wait"),
    ):
        wait = kind.synchronize
        monkeypatch.setattr(kind, "synchronize", lambda s, _w=wait, _l=label: note(_l) or _w(s))
    monkeypatch.setattr(cuda, "synchronize", lambda: note("device wait"))
    per_step = []
    for _ in range(steps):
        calls.clear()
        loop.step()
        per_step.append(list(calls))
    return per_step


@pytest.mark.parametrize(
    ("quant", "kv"), [("int8", "float32"), ("f32", "int8"), ("int4", "float32")]
)
def test_a_warm_decode_step_allocates_nothing_and_waits_once(untied, quant, kv, monkeypatch):
    """...and the one wait is for the logits."""
    llm = LLM(untied, device="cuda", kv_cache_mb=1, quant=quant, kv_cache_dtype=kv)
    assert warm_step_calls(llm, monkeypatch) == [["wait"]] * 3


def test_a_failed_pass_is_waited_for_before_its_staging_is_reused(untied, monkeypatch):
    """A pass that raised after queueing its uploads never read its logits (the wait that
    covers its copies), so the next pass waits before it rewrites their staging."""
    llm = LLM(untied, device="cuda", kv_cache_mb=1)
    backend = llm.engine_loop.runner.backend
    one = SamplingParams(max_tokens=1, temperature=0.0)
    with monkeypatch.context() as patch:
        patch.setattr(backend, "attention", lambda *a, **k: 1 / 0)
        assert llm.generate([3, 5, 7], one)[0].error is not None
    waits = []
    stream_type = type(backend.stream)
    wait = stream_type.synchronize
    monkeypatch.setattr(stream_type, "synchronize", lambda s: waits.append(1) or wait(s))
    for expected in (2, 1):  # the failed pass's copies, then the logits; then the logits
        waits.clear()
        assert llm.generate([3, 5, 7], one)[0].error is None
        assert len(waits) == expected
