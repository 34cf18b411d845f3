"""Sparse checkpoints end to end: pruning through `lamina quantize`, formats, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM
from engine.cli import main
from engine.errors import ModelLoadError
from engine.loader.checkpoint import load_weights_file, save_weights_file
from engine.loader.model_loader import load_model
from engine.quant.formats import WeightPlan
from engine.quant.sparsify import (
    SparsityPlan,
    quantize_skipping,
    sparsify,
    to_colskip_blocks,
    to_sparse,
)
from engine.weights import (
    LAYER_LINEARS,
    BlockWeight,
    ColskipBlockWeight,
    ColskipInt8Weight,
    Int8Weight,
    SparseInt8Weight,
)
from kernels_cpu.colskip_int8 import to_input_major
from kernels_cpu.sparse_int8 import unpack_bitmask
from tests.tiny_models import build_tiny_model

TEXT = "Sparse weights must not change what the checkpoint computes: 1, 2, 3."


def linears(model):
    """The decoder linears of an LLM or of a LoadedModel."""
    loaded = getattr(model, "loaded", model)
    for layer in loaded.weights.layers:
        for name in LAYER_LINEARS:
            yield getattr(layer, name)


def convert_linears(llm: LLM, convert) -> None:
    """Replace every dense int8 decoder linear of `llm` by convert(weight), in place."""
    for layer in llm.loaded.weights.layers:
        for name in LAYER_LINEARS:
            weight = getattr(layer, name)
            assert isinstance(weight, Int8Weight)
            setattr(layer, name, convert(weight))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("sparse") / "hf"
    build_tiny_model("llama-all-biases", folder, hf_tokenizer)
    return folder


@pytest.mark.parametrize(
    ("flags", "plan"),
    [
        (["--sparsity", "0.5"], SparsityPlan(sparsity=0.5)),
        (
            ["--sparsity", "0.5", "--method", "magnitude", "--pattern", "2:4"],
            SparsityPlan(sparsity=0.5, method="magnitude", pattern="2:4"),
        ),
    ],
)
def test_pruned_checkpoint_round_trips_with_identical_logits(tiny, tmp_path, flags, plan):
    assert main(["quantize", str(tiny), str(tmp_path / "ck"), *flags]) == 0
    from_disk = LLM(tmp_path / "ck")
    in_memory = LLM(tiny)
    sparsify(in_memory.loaded, plan)
    assert np.array_equal(from_disk.prompt_logits(TEXT), in_memory.prompt_logits(TEXT))
    # the checkpoint as stored (an engine may unpack layers where dense int8 is faster)
    for weight in linears(load_model(tmp_path / "ck")):
        assert isinstance(weight, SparseInt8Weight)
        dense = unpack_bitmask(weight.mask, weight.values, weight.row_ptr, weight.in_features)
        zeros = (dense == 0).sum(axis=1)
        assert (zeros >= weight.in_features // 2).all()  # int8 rounding may add zeros
        if plan.pattern == "2:4":
            groups = dense[:, : weight.in_features // 4 * 4].reshape(dense.shape[0], -1, 4)
            assert ((groups == 0).sum(axis=2) >= 2).all()


def test_sparse_format_at_zero_sparsity_gives_the_dense_logits(tiny):
    dense = LLM(tiny, quant="int8")
    expected = dense.prompt_logits(TEXT)
    convert_linears(dense, to_sparse)
    assert np.array_equal(dense.prompt_logits(TEXT), expected)


@pytest.mark.parametrize(
    ("flags", "kind"), [([], ColskipInt8Weight), (["--weights", "int4"], ColskipBlockWeight)]
)
def test_activation_sparse_checkpoint_zeroes_about_the_asked_share(tiny, tmp_path, flags, kind):
    out = tmp_path / "ck"
    assert main(["quantize", str(tiny), str(out), "--activation-sparsity", "0.4", *flags]) == 0
    llm = LLM(out)
    weights = list(linears(llm))
    assert all(isinstance(w, kind) and w.threshold > 0 for w in weights)
    # independent check: the share of inputs at or under each threshold, on other text
    seen: dict[int, list[np.ndarray]] = {}
    backend = llm.backend
    norm_linear, linear_add_ = backend.norm_linear, backend.linear_add_

    def record(x, weight):
        seen.setdefault(id(weight), []).append(np.abs(x).reshape(-1))

    def norm_and_record(x, norm, eps, weight, *, out=None):  # the linear's input, in numpy
        record(x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm, weight)
        return norm_linear(x, norm, eps, weight, out=out)

    def add_and_record(residual, x, weight, *, gated=False):
        if gated:
            gate, up = np.split(x, 2, axis=1)
            record(gate / (1 + np.exp(-gate)) * up, weight)
        else:
            record(x, weight)
        return linear_add_(residual, x, weight, gated=gated)

    backend.norm_linear, backend.linear_add_ = norm_and_record, add_and_record
    llm.prompt_logits("def f(x):\n    return x * 2  # the return statement, in Python. " * 8)
    shares = [np.mean(np.concatenate(seen[id(w)]) <= w.threshold) for w in weights]
    assert 0.2 < np.median(shares) < 0.6


def test_activation_sparsity_at_zero_threshold_matches_dense_int8(tiny):
    llm = LLM(tiny, quant="int8")
    expected = llm.prompt_logits(TEXT)
    convert_linears(llm, lambda w: ColskipInt8Weight(to_input_major(w.data), w.scale, 0.0, w.bias))
    got = llm.prompt_logits(TEXT)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int4_activation_sparse_checkpoint_round_trips_with_identical_logits(
    tiny, tmp_path, method
):
    flags = ["--weights", "int4", "--group-size", "64", "--method", method]
    assert main(["quantize", str(tiny), str(tmp_path / "ck"), *flags, "--activation-sparsity",
                 "0.3"]) == 0  # fmt: skip
    from_disk = LLM(tmp_path / "ck")
    in_memory = LLM(tiny)
    plan = SparsityPlan(activation_sparsity=0.3)
    quantize_skipping(in_memory.loaded, WeightPlan("int4", 64), plan, method)
    assert all(isinstance(w, ColskipBlockWeight) for w in linears(from_disk))
    assert np.array_equal(from_disk.prompt_logits(TEXT), in_memory.prompt_logits(TEXT))


def test_int4_activation_sparsity_at_zero_threshold_matches_dense_int4(tiny):
    llm = LLM(tiny, quant="int4")
    expected = llm.prompt_logits(TEXT)
    for layer in llm.loaded.weights.layers:
        for name in LAYER_LINEARS:
            weight = getattr(layer, name)
            assert isinstance(weight, BlockWeight)
            setattr(layer, name, to_colskip_blocks(weight, 0.0))
    got = llm.prompt_logits(TEXT)  # both round activations per 32 inputs (the int4 group)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


def test_a_damaged_int4_activation_sparse_weight_is_refused(tiny, tmp_path):
    plan = SparsityPlan(activation_sparsity=0.3)
    loaded = load_model(tiny)
    quantize_skipping(loaded, WeightPlan("int4", 32), plan, "rtn")
    weights = loaded.weights
    down = weights.layers[0].down
    weights.layers[0].down = ColskipBlockWeight(
        down.values[:-32], down.scale, down.mins, down.in_features, down.out_features, 0.1
    )
    save_weights_file(weights, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="activation-sparse weight 'layers.0.down'"):
        load_weights_file(tmp_path / "w.safetensors", len(weights.layers))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sparsity", "0.5", "--weights", "f32"], "int8"),
        (["--sparsity", "0.5", "--weights", "int4"], "with int4 weights use --activation"),
        (["--activation-sparsity", "0.4", "--weights", "int4", "--method", "wanda"], "rtn or gptq"),
        (
            ["--activation-sparsity", "0.4", "--weights", "int4", "--layer-weights", "down=f32"],
            "float32",
        ),
        (["--sparsity", "0.5", "--pattern", "3-4"], "pattern"),
        (["--sparsity", "0.7", "--pattern", "2:4"], "means sparsity 0.5"),
        (["--sparsity", "0.5", "--layer-sparsity", "mlp=0.2"], "not a linear name"),
    ],
)
def test_bad_sparsity_options_are_refused(tiny, tmp_path, capsys, flags, message):
    assert main(["quantize", str(tiny), str(tmp_path / "ck"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_layer_overrides_prune_less(tiny, tmp_path):
    flags = ["--sparsity", "0.5", "--layer-sparsity", "down=0", "--layer-sparsity", "0.qkv=0.25"]
    assert main(["quantize", str(tiny), str(tmp_path / "ck"), *flags]) == 0
    layers = load_model(tmp_path / "ck").weights.layers
    assert isinstance(layers[0].down, Int8Weight)
    qkv = layers[0].qkv
    dense = unpack_bitmask(qkv.mask, qkv.values, qkv.row_ptr, qkv.in_features)
    assert np.median((dense == 0).mean(axis=1)) < 0.4
