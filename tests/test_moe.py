"""Mixture of experts: routing against numpy, batched outputs equal sequential ones,
checkpoints, the calibrated methods' refusal, and GGUFs written by llama.cpp's converter."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine import LLM, SamplingParams
from engine.cli import main
from engine.kv_cache import ForwardBatch
from engine.weights import BlockWeight, DenseWeight, ExpertWeights, Int8Weight
from kernels_cpu.moe import group_by_expert_into, route_top_k_into
from kernels_cpu.rows import put_rows
from tests.test_model_parity import assert_logits_close, greedy, hf_greedy, hf_logits
from tests.tiny_models import VARIANTS, build_tiny_model

# ------------------------------------------------------------------ fused decode kernels


def random_experts(rng, count: int, hidden: int, width: int, fmt: str) -> ExpertWeights:
    """Experts with random float weights, quantized as `fmt` (int8 or int4)."""
    from engine.quant.int4 import quantize_int4
    from engine.quant.int8 import quantize_int8

    quantize = quantize_int8 if fmt == "int8" else (lambda w: quantize_int4(w, 32))

    def mat(rows, cols):
        return quantize(DenseWeight(rng.standard_normal((rows, cols)).astype(np.float32)))

    router = DenseWeight(rng.standard_normal((count, hidden)).astype(np.float32))
    gate_up = [mat(2 * width, hidden) for _ in range(count)]
    down = [mat(hidden, width) for _ in range(count)]
    return ExpertWeights(router, gate_up, down)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(1, 9),
    k=st.integers(1, 9),
    width=st.sampled_from([16, 40, 64]),
    normalize=st.booleans(),
)
@settings(max_examples=15, deadline=None)
def test_fused_decode_equals_grouped_path(fmt, seed, count, k, width, normalize):
    """A single token's experts through the fused kernels (stacked experts, two parallel
    regions) give the grouped path's bits, which runs each expert on the linear kernels."""
    from engine.backends import cpu

    k = min(k, count)
    rng = np.random.default_rng(seed)
    hidden = 48
    experts = random_experts(rng, count, hidden, width, fmt)
    norm = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    grouped, fused = x.copy(), x.copy()
    backend = cpu.CPUBackend()
    backend.moe_add_(grouped, norm, 1e-5, experts, k, normalize)
    experts.stack()
    assert set(experts.stacked) == {"gate_up", "down"}
    bytes_before, ran = backend.expert_bytes_read, []
    name = "moe_decode_w8_into" if fmt == "int8" else "moe_decode_blocks_into"
    kernel = getattr(cpu, name)
    setattr(cpu, name, lambda *args: ran.append(kernel(*args)))
    try:
        backend.moe_add_(fused, norm, 1e-5, experts, k, normalize)
    finally:
        setattr(cpu, name, kernel)
    assert ran, "the fused kernel did not run"
    assert backend.expert_bytes_read - bytes_before == k * experts.expert_nbytes(0)
    np.testing.assert_array_equal(fused, grouped)
    assert not np.array_equal(fused, x)


def test_stacking_a_mapped_checkpoint_copies_nothing(moe_folders, tmp_path):
    """A checkpoint stores each projection's experts as one tensor per part; loading maps
    views of them, and stacking those views makes views again, not copies."""
    out = tmp_path / "ck"
    assert main(["quantize", str(moe_folders["qwen3_moe-renorm"]), str(out)]) == 0
    experts = LLM(out, threads=1).loaded.weights.layers[0].experts
    assert experts.stacked is not None
    data = experts.stacked["gate_up"].data
    assert data.shape == (8, *experts.gate_up[0].data.shape)
    assert not data.flags.owndata and not data.flags.writeable
    assert np.shares_memory(data, experts.gate_up[3].data)


# ----------------------------------------------------------------------------- routing


def reference_route(logits: np.ndarray, k: int, normalize: bool):
    """transformers' routing in numpy: softmax over all experts in float32, the k most
    probable (a stable sort: ties to the lower index), optionally renormalised."""
    x = logits.astype(np.float32)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    return ids.astype(np.int32), w.astype(np.float32)


@st.composite
def router_logits(draw):
    tokens = draw(st.integers(1, 12))
    experts = draw(st.integers(1, 16))
    k = draw(st.sampled_from(sorted({1, experts, draw(st.integers(1, experts))})))
    # a few distinct values, so that ties are common; or any finite floats
    values = st.sampled_from([-2.0, 0.0, 0.5, 3.0]) | st.floats(-30, 30, width=32)
    logits = draw(hnp.arrays(np.float32, (tokens, experts), elements=values))
    return logits, k


def route(logits: np.ndarray, k: int, normalize: bool):
    ids = np.full((logits.shape[0], k), -7, np.int32)
    weights = np.full((logits.shape[0], k), np.nan, np.float32)
    route_top_k_into(logits, normalize, ids, weights)
    return ids, weights


@settings(max_examples=150, deadline=None)
@given(router_logits(), st.booleans())
def test_route_top_k_matches_numpy(case, normalize):
    logits, k = case
    ids, weights = route(logits, k, normalize)
    ref_ids, ref_weights = reference_route(logits, k, normalize)
    np.testing.assert_allclose(weights, ref_weights, rtol=2e-6, atol=1e-7)
    # Ids must agree wherever the probabilities are not within rounding of each other.
    probs = reference_route(logits, logits.shape[1], False)[1]
    for t in range(logits.shape[0]):
        for j in range(k):
            if ids[t, j] != ref_ids[t, j]:
                a, b = ids[t, j], ref_ids[t, j]
                p = dict(zip(reference_route(logits[t : t + 1], logits.shape[1], False)[0][0],
                             probs[t], strict=True))  # fmt: skip
                assert abs(p[a] - p[b]) <= 1e-6 * p[b], (t, j, ids[t], ref_ids[t])
        assert len(set(ids[t])) == k  # each expert at most once
    if normalize:
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_route_forced_ties_go_to_the_lower_index(normalize):
    logits = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # all tied
            [0.0, 2.0, 2.0, -1.0],  # a tie at the top
            [3.0, -1.0, 0.5, 0.5],  # a tie at the k-th place
            [-5.0, -5.0, 7.0, -5.0],
        ],
        np.float32,
    )
    ids, weights = route(logits, 2, normalize)
    assert ids.tolist() == [[0, 1], [1, 2], [0, 2], [2, 0]]
    ref_ids, ref_weights = reference_route(logits, 2, normalize)
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-6)
    if normalize:
        assert weights[0].tolist() == [0.5, 0.5]


def test_route_k_one_and_all_experts():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 6)).astype(np.float32)
    ids, weights = route(logits, 1, True)
    assert ids[:, 0].tolist() == logits.argmax(axis=1).tolist()
    assert np.all(weights == 1.0)  # one expert renormalised carries the whole token
    ids, weights = route(logits, 6, False)  # every expert, most probable first
    assert np.array_equal(ids, np.argsort(-logits, axis=1, kind="stable"))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    ids_n, weights_n = route(logits, 6, True)
    assert np.array_equal(ids, ids_n)
    np.testing.assert_allclose(weights_n, weights, rtol=1e-6)


@pytest.mark.parametrize("k", [0, 7])
def test_route_refuses_k_outside_one_to_experts(k):
    with pytest.raises(ValueError):
        route(np.zeros((2, 6), np.float32), k, False)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_group_by_expert_invariants(data):
    tokens = data.draw(st.integers(1, 10))
    experts = data.draw(st.integers(1, 9))
    k = data.draw(st.integers(1, experts))
    ids = np.array(
        [data.draw(st.permutations(range(experts)))[:k] for _ in range(tokens)], np.int32
    ).reshape(tokens, k)
    weights = data.draw(hnp.arrays(np.float32, (tokens, k), elements=st.floats(0, 1, width=32)))
    starts = np.full(experts + 1, -1, np.int64)
    rows = np.full(tokens * k, -1, np.int64)
    scales = np.full(tokens * k, np.nan, np.float32)
    group_by_expert_into(ids, weights, starts, rows, scales)
    assert starts[0] == 0 and starts[-1] == tokens * k
    assert np.all(np.diff(starts) >= 0)
    seen = []
    for e in range(experts):
        lo, hi = starts[e], starts[e + 1]
        expected = [t for t in range(tokens) if e in ids[t]]  # in token order
        assert rows[lo:hi].tolist() == expected
        for r, s in zip(rows[lo:hi], scales[lo:hi], strict=True):
            (j,) = np.flatnonzero(ids[r] == e)
            assert s == weights[r, j]  # the weight travels with its (token, choice)
            seen.append((int(r), int(j)))
    assert sorted(seen) == [(t, j) for t in range(tokens) for j in range(k)]  # each once


def test_group_by_expert_refuses_bad_ids():
    starts = np.zeros(4, np.int64)
    rows, scales = np.zeros(2, np.int64), np.zeros(2, np.float32)
    with pytest.raises(IndexError):
        group_by_expert_into(np.array([[0], [3]], np.int32), np.ones((2, 1), np.float32),
                             starts, rows, scales)  # fmt: skip
    with pytest.raises(ValueError):
        group_by_expert_into(np.array([[0, 1]], np.int32), np.ones((1, 2), np.float32),
                             starts, rows[:1], scales[:1])  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_put_rows_scatters_distinct_rows(data):
    n = data.draw(st.integers(1, 8))
    cols = data.draw(st.integers(1, 5))
    rows = np.array(data.draw(st.permutations(range(n)))[: data.draw(st.integers(0, n))], np.int64)
    src = np.arange(len(rows) * cols, dtype=np.float32).reshape(len(rows), cols)
    dst = np.full((n, cols), -1.0, np.float32)
    expected = dst.copy()
    expected[rows] = src
    put_rows(src, rows, dst)
    assert np.array_equal(dst, expected)


def test_put_rows_refuses_rows_outside():
    with pytest.raises(IndexError):
        put_rows(np.ones((1, 2), np.float32), np.array([3]), np.zeros((3, 2), np.float32))


# ------------------------------------------------------------- batched equals sequential

PROMPTS = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Mixture of experts",
    "import numpy as np\n",
]


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory, hf_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    folders = {}
    for name in ("qwen3_moe-renorm", "mixtral-window"):
        build_tiny_model(name, root / name, hf_tokenizer)
        folders[name] = root / name
    return folders


def batch_prompt_logits(llm: LLM, prompts: list[list[int]]) -> list[np.ndarray]:
    """Every position's logits of several prompts prefilled in one forward pass (as
    runner.score does for one)."""
    engine = llm._engine
    runner = engine.runner
    ids = [("moe-batch", i) for i in range(len(prompts))]
    with engine._lock:
        for seq_id in ids:
            runner.cache.add_sequence(seq_id, [])
        try:
            batch = ForwardBatch.build(runner.cache, list(zip(ids, prompts)), all_logits=True)
            runner.threads.apply()
            logits = np.array(runner.model.forward(batch, runner.workspace))
        finally:
            for seq_id in ids:
                runner.cache.free(seq_id)
    bounds = np.cumsum([0, *map(len, prompts)])
    return [logits[lo:hi] for lo, hi in itertools.pairwise(bounds)]


@pytest.mark.parametrize("name", ["qwen3_moe-renorm", "mixtral-window"])
@pytest.mark.parametrize("quant", ["int8", "f32"])
def test_batched_generation_equals_sequential(name, quant, moe_folders):
    """Six prompts decode together (more rows than the small-batch kernels take), each
    routed to its own experts, and give the tokens each gives alone."""
    # One thread: float32 BLAS may sum in another order with another thread count
    llm = LLM(moe_folders[name], quant=quant, threads=1)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    together = [out.token_ids for out in llm.generate(PROMPTS, params)]
    alone = [llm.generate(p, params)[0].token_ids for p in PROMPTS]
    assert together == alone


@pytest.mark.parametrize("name", ["qwen3_moe-renorm", "mixtral-window"])
@pytest.mark.parametrize("quant", ["int8", "f32"])
def test_batched_prompt_logits_equal_alone(name, quant, moe_folders):
    """The router and experts see other prompts' tokens in a batch; each prompt's rows must
    not care: bit for bit with integer sums, within rounding for float32."""
    llm = LLM(moe_folders[name], quant=quant, threads=1)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    single = [llm.prompt_logits(p) for p in prompts]
    for ours, ref in zip(batch_prompt_logits(llm, prompts), single, strict=True):
        if quant == "int8":
            assert np.array_equal(ours, ref)
        else:  # BLAS picks its kernels by row count
            assert_logits_close(ours, ref)


# ------------------------------------------------------------------------ checkpoints

TEXT = "Checkpoints of experts: 1, 2, 3, and the router stays float32."


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_checkpoint_equals_quantizing_on_load(weights, moe_folders, tmp_path):
    src = moe_folders["qwen3_moe-renorm"]
    out = tmp_path / "ck"
    assert main(["quantize", str(src), str(out), "--weights", weights]) == 0
    loaded, on_load = LLM(out, threads=1), LLM(src, quant=weights, threads=1)
    assert np.array_equal(loaded.prompt_logits(TEXT), on_load.prompt_logits(TEXT))
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=5)
    assert loaded.generate(TEXT, params)[0].token_ids == on_load.generate(TEXT, params)[0].token_ids
    layers = loaded.loaded.weights.layers
    assert layers[1].experts is None and layers[0].experts.count == 8  # mlp_only_layers=[1]
    kind = Int8Weight if weights == "int8" else BlockWeight
    for layer in (layers[0], layers[2]):
        assert all(isinstance(w, kind) for _, w in layer.linears())
        assert layer.experts.router.data.dtype == np.float32


def test_layer_weights_down_applies_to_experts(moe_folders, tmp_path):
    src = moe_folders["mixtral-window"]
    out = tmp_path / "ck"
    args = ["quantize", str(src), str(out), "--weights", "int4", "--layer-weights", "down=int8"]
    assert main(args) == 0
    llm = LLM(out, threads=1)
    for layer in llm.loaded.weights.layers:
        assert all(isinstance(w, Int8Weight) for w in layer.experts.down)
        assert all(isinstance(w, BlockWeight) for w in layer.experts.gate_up)
        assert isinstance(layer.qkv, BlockWeight)
    on_load = LLM(src, quant="int4", threads=1)
    assert not np.array_equal(llm.prompt_logits(TEXT), on_load.prompt_logits(TEXT))


@pytest.mark.parametrize(
    ("flags", "what"),
    [
        (["--sparsity", "0.5"], "pruning"),
        (["--activation-sparsity", "0.3"], "activation sparsity"),
        (["--weights", "int4", "--activation-sparsity", "0.3"], "activation sparsity"),
        (["--weights", "int4", "--method", "gptq"], "calibration"),
    ],
)
def test_calibrated_methods_refuse_experts(flags, what, moe_folders, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["quantize", str(moe_folders["qwen3_moe-renorm"]), str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"lamina quantize: error: {what}"), err
    assert "mixture-of-experts" in err
    assert not out.exists()


# ------------------------------------------------------------- llama.cpp's GGUF converter


@contextmanager
def variant(name: str, base: str, **overrides):
    """A tiny model like `base` with config overrides, under its own name (and seed)."""
    config, model, settings_ = VARIANTS[base]
    before = VARIANTS.get(name)
    VARIANTS[name] = (config, model, {**settings_, **overrides})
    try:
        yield name
    finally:
        if before is None:
            del VARIANTS[name]
        else:  # the base itself, unchanged
            VARIANTS[name] = before


# name -> (base variant, overrides): what llama.cpp's converter can write. Its Qwen3-MoE
# has no plain-MLP layers (mlp_only_layers) and always renormalises the top k; it writes
# no sliding window for Mixtral (llama.cpp runs it with full attention). A Gemma 3 GGUF
# names no layer types nor query_pre_attn_scalar: llama.cpp makes every sixth layer global
# and scales by 1/sqrt(head_dim), as Google's models are.
CONVERTED = {
    "qwen3_moe-renorm-gguf": ("qwen3_moe-renorm", {"mlp_only_layers": []}),
    "mixtral-full-gguf": ("mixtral-window", {"sliding_window": None}),
    "qwen3-qknorm-tied": ("qwen3-qknorm-tied", {}),
    "phi3-fused": ("phi3-fused", {}),
    "phi3-longrope": ("phi3-longrope", {}),
    "gemma3_text-mixed-gguf": (
        "gemma3_text-mixed",
        {
            "num_hidden_layers": 6,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
            "query_pre_attn_scalar": 16,
        },
    ),
}


def convert(converter: Path, folder: Path, out: Path, outtype: str) -> Path:
    cmd = [sys.executable, str(converter), str(folder), "--outfile", str(out),
           "--outtype", outtype]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_llama_cpp_converter_gguf_matches_transformers(
    name, llama_cpp_converter, hf_tokenizer, tmp_path
):
    base, overrides = CONVERTED[name]
    with variant(name, base, **overrides):
        hf = build_tiny_model(name, tmp_path / "hf", hf_tokenizer)
    if base.startswith("phi3"):
        # Without a sentencepiece tokenizer.model the converter takes a GPT-2 style BPE
        # vocabulary only from a tokenizer_config naming it (as Phi-4's does).
        path = tmp_path / "hf" / "tokenizer_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    gguf = convert(llama_cpp_converter, tmp_path / "hf", tmp_path / "model.gguf", "f32")
    llm = LLM(gguf)
    hf_experts = getattr(hf.config, "num_experts", None) or getattr(
        hf.config, "num_local_experts", 0
    )
    assert (llm.config.num_experts or 0) == hf_experts
    rng = np.random.default_rng(1)
    ids = [int(i) for i in rng.integers(3, 49152, size=40)]
    assert_logits_close(llm.prompt_logits(ids), hf_logits(hf, ids))
    assert greedy(llm, ids[:8], 32) == hf_greedy(hf, ids[:8], 32)


# Text a tiny SentencePiece model is trained on: words, digits, accents, curly quotes and
# runs of spaces and tabs, so its pieces include whitespace runs and byte fallbacks.
_SPM_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
    "in",
    "the",
    "old",
    "town",
    "square",
    "near",
    "rivers",
    "and",
    "mountains",
    "under",
    "blue",
    "skies",
]


@pytest.fixture(scope="module")
def gemma_sentencepiece(tmp_path_factory) -> Path:
    """A 320-piece BPE SentencePiece model as Gemma's are made (byte fallback, digits split,
    no dummy prefix, whitespace kept as it is, turn markers as user symbols)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_SPM_WORDS) for _ in range(12)) for _ in range(2000)]
    lines += ["Numbers 123 456 and symbols: café, naïve — “quotes”.  Tabs\tand  spaces."] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=320, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=["<start_of_turn>",
        "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


class _SentencePieceFiles:
    """Stands in for a tokenizer in build_tiny_model: saves Gemma's tokenizer.model only."""

    def __init__(self, model: Path) -> None:
        self.model = model

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.model").write_bytes(self.model.read_bytes())


def test_gemma2_gguf_from_the_converter_matches_transformers_and_sentencepiece(
    llama_cpp_converter, gemma_sentencepiece, tmp_path
):
    """Gemma 2 through llama.cpp's converter, which insists on a SentencePiece
    tokenizer.model: the logits and greedy tokens of transformers (soft-capping, sliding
    window, post-norms, 1 + w norms), and the token ids of the sentencepiece library."""
    import sentencepiece as spm

    # A Gemma 2 GGUF holds no query_pre_attn_scalar: llama.cpp scales by 1/sqrt(head_dim),
    # as Google's models below 27B are (the 27B's scale it derives from the layer count).
    special = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    shape = {"vocab_size": 320, "query_pre_attn_scalar": 16}
    with variant("gemma2-spm", "gemma2-softcap", **shape, **special):
        hf = build_tiny_model(
            "gemma2-spm", tmp_path / "hf", _SentencePieceFiles(gemma_sentencepiece)
        )
    gguf = convert(llama_cpp_converter, tmp_path / "hf", tmp_path / "model.gguf", "f32")
    llm = LLM(gguf)
    assert llm.config.attention_softcap == 2.0 and llm.config.final_softcap == 3.0
    rng = np.random.default_rng(2)
    ids = [int(i) for i in rng.integers(4, 320, size=24)]
    assert_logits_close(llm.prompt_logits(ids), hf_logits(hf, ids))
    assert greedy(llm, ids[:6], 16) == hf_greedy(hf, ids[:6], 16)
    sp = spm.SentencePieceProcessor(model_file=str(gemma_sentencepiece))
    for text in ["the quick  fox café 123", "Tabs\tand  spaces.", " lead", "“quotes” ü 7", ""]:
        assert llm.tokenizer.encode(text) == [2, *sp.encode(text)]
        assert llm.tokenizer.decode(sp.encode(text)) == text
