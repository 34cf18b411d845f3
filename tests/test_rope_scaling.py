"""Rope scaling (YaRN, dynamic NTK, LongRoPE) against transformers' own frequency functions.

The tiny-model parity tests run each kind end to end; here the frequencies and the factor
on cos and sin are compared with `transformers.modeling_rope_utils` over random parameters,
at sequence lengths on both sides of where dynamic NTK and LongRoPE change.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.config import ModelConfig
from engine.errors import ModelLoadError, UnsupportedModelError

HEAD_DIM = 16


def both(rope: dict, max_positions: int = 256, arch: str = "llama", **extra):
    """(lamina's ModelConfig, transformers' config) of the same config.json."""
    cfg = {"model_type": arch, "vocab_size": 32, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
           "max_position_embeddings": max_positions, "rope_parameters": rope, **extra}  # fmt: skip
    ours = ModelConfig.from_hf(copy.deepcopy(cfg))  # transformers edits the dict it is given
    config_class = transformers.Phi3Config if arch == "phi3" else transformers.LlamaConfig
    return ours, config_class(**{k: v for k, v in cfg.items() if k != "model_type"})


def check(ours: ModelConfig, hf, seq_len: int) -> None:
    rope_type = hf.rope_parameters["rope_type"]
    inv, factor = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"), seq_len=seq_len)
    np.testing.assert_allclose(ours.rope.inv_freq(HEAD_DIM, seq_len), inv.numpy(), rtol=2e-6)
    assert math.isclose(ours.rope.cos_sin_factor(), factor, rel_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    factor=st.floats(1.0, 16.0),
    original=st.sampled_from([16, 64, 4096]),
    beta=st.sampled_from([(32.0, 1.0), (16.0, 2.0)]),
    truncate=st.booleans(),
    mscales=st.sampled_from([None, (1.0, 0.5), (0.707, 0.707)]),
)
def test_yarn_matches_transformers(factor, original, beta, truncate, mscales):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
            "original_max_position_embeddings": original, "beta_fast": beta[0],
            "beta_slow": beta[1], "truncate": truncate}  # fmt: skip
    if mscales:
        rope["mscale"], rope["mscale_all_dim"] = mscales
    ours, hf = both(rope)
    check(ours, hf, 0)
    assert ours.context_limit == max(int(original * factor), 256)


@pytest.mark.parametrize("seq_len", [10, 24, 25, 100])
@pytest.mark.parametrize("factor", [2.0, 3.5])
def test_dynamic_ntk_matches_transformers(seq_len, factor):
    ours, hf = both({"rope_type": "dynamic", "rope_theta": 500.0, "factor": factor}, 24)
    check(ours, hf, seq_len)
    assert ours.rope.varies_with_length and ours.context_limit == int(24 * factor)


@pytest.mark.parametrize("seq_len", [10, 32, 33, 200])
@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_longrope_matches_transformers(seq_len, attention_factor):
    rng = np.random.default_rng(seq_len)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": list(1 + rng.random(HEAD_DIM // 2)),
            "long_factor": list(1 + 8 * rng.random(HEAD_DIM // 2))}  # fmt: skip
    if attention_factor:
        rope["attention_factor"] = attention_factor
    ours, hf = both(rope, 256, "phi3", original_max_position_embeddings=32)
    check(ours, hf, seq_len)


def test_bad_rope_settings_are_refused():
    with pytest.raises(ModelLoadError, match="long_factor"):
        ModelConfig.from_hf({"model_type": "phi3", "vocab_size": 32, "hidden_size": 64,
                             "intermediate_size": 96, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "original_max_position_embeddings": 32,
                             "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                              "long_factor": [1.0]}})  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 64,
                             "intermediate_size": 96, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "partial_rotary_factor": 0.5})  # fmt: skip


def test_yarn_from_gguf_metadata():
    meta = {"general.architecture": "qwen3", "qwen3.embedding_length": 64,
            "qwen3.attention.head_count": 4, "qwen3.vocab_size": 32,
            "qwen3.feed_forward_length": 96, "qwen3.block_count": 1,
            "qwen3.attention.layer_norm_rms_epsilon": 1e-6, "qwen3.context_length": 256,
            "qwen3.rope.freq_base": 10000.0, "qwen3.rope.scaling.type": "yarn",
            "qwen3.rope.scaling.factor": 4.0,
            "qwen3.rope.scaling.original_context_length": 64}  # fmt: skip
    ours = ModelConfig.from_gguf(meta)
    same, hf = both({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 64})  # fmt: skip
    assert ours.rope == same.rope and ours.qk_norm
    check(ours, hf, 0)


def _gguf_meta(arch: str, **keys) -> dict:
    """Minimal GGUF metadata of a 4-head, 64-wide model; `keys` without the arch prefix."""
    base = {"embedding_length": 64, "attention.head_count": 4, "vocab_size": 32,
            "feed_forward_length": 96, "block_count": 1, "context_length": 256,
            "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}  # fmt: skip
    meta = {f"{arch}.{k}": v for k, v in {**base, **keys}.items()}
    return {"general.architecture": arch, **meta}


def test_longrope_from_gguf_factor_tensors():
    """The converter writes Phi-3's LongRoPE as two factor tensors, the original context
    and the attention factor, with no scaling type: the same rope as config.json's."""
    short, long = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8], [1.2, 1.5, 2.1, 2.9, 4, 5.5, 7.5, 10]
    meta = _gguf_meta("phi3", **{"rope.scaling.original_context_length": 32,
                                 "rope.scaling.attn_factor": 1.2649110555648804})  # fmt: skip
    tensors = {"short_factor": np.float32(short), "long_factor": np.float32(long)}
    ours = ModelConfig.from_gguf(meta, tensors)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
            "long_factor": long}  # fmt: skip
    same, hf = both(rope, 256, "phi3", original_max_position_embeddings=32)
    assert ours.rope.rope_type == "longrope" and ours.rope.factor == same.rope.factor == 8
    for seq_len in (0, 32, 33):  # short factors up to the original context, long past it
        inv, factor = ROPE_INIT_FUNCTIONS["longrope"](hf, torch.device("cpu"), seq_len=seq_len)
        np.testing.assert_allclose(ours.rope.inv_freq(HEAD_DIM, seq_len), inv.numpy(), rtol=2e-6)
        assert math.isclose(ours.rope.cos_sin_factor(), factor, rel_tol=1e-6)
    # no attention factor in the file: 1, as llama.cpp reads it
    del meta["phi3.rope.scaling.attn_factor"]
    assert ModelConfig.from_gguf(meta, tensors).rope.cos_sin_factor() == 1.0
    with pytest.raises(ModelLoadError, match="rope_factors_short"):
        ModelConfig.from_gguf(meta, {"long_factor": np.float32(long)})
    with pytest.raises(ModelLoadError, match="positive"):
        ModelConfig.from_gguf(meta, {**tensors, "long_factor": np.float32([0.0] * 8)})


def test_gemma3_gguf_layers_and_ropes_as_llama_cpp_reads_them():
    """No layer types in the file: with a window every sixth layer is global (or the file's
    pattern); local layers take freq_base_swa unscaled; scale 1/sqrt(head_dim); the stored
    norms are already 1 + w."""
    keys = {"block_count": 7, "attention.key_length": 32, "attention.sliding_window": 16,
            "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4, "rope.scaling.type": "linear",
            "rope.scaling.factor": 8.0}  # fmt: skip
    c = ModelConfig.from_gguf(_gguf_meta("gemma3", **keys))
    assert c.architecture == "gemma3_text" and c.sandwich_norms and c.qk_norm
    assert not c.norm_plus_one and c.mlp_activation == "gelu_tanh"
    assert c.layer_windows == (16, 16, 16, 16, 16, 0, 16)
    assert c.attention_scale == 32**-0.5 and c.embed_scale == np.float32(8.0)
    assert c.layer_rope(0).theta == 1e4 and c.layer_rope(0).rope_type == "default"
    assert c.layer_rope(5).theta == 1e6 and c.layer_rope(5).factor == 8.0
    pattern = {**keys, "attention.sliding_window_pattern": 2}
    assert ModelConfig.from_gguf(_gguf_meta("gemma3", **pattern)).layer_windows == (
        16, 0, 16, 0, 16, 0, 16)  # fmt: skip
    flags = [True, False] * 3 + [False]
    per_layer = {**keys, "attention.sliding_window_pattern": flags}
    assert ModelConfig.from_gguf(_gguf_meta("gemma3", **per_layer)).layer_windows == tuple(
        16 if s else 0 for s in flags)  # fmt: skip
    no_window = {k: v for k, v in keys.items() if k != "attention.sliding_window"}
    assert ModelConfig.from_gguf(_gguf_meta("gemma3", **no_window)).layer_windows == (0,) * 7
    capped = ModelConfig.from_gguf(_gguf_meta("gemma3", final_logit_softcapping=30.0, **keys))
    assert capped.final_softcap == 30.0


def test_gemma2_gguf_as_llama_cpp_reads_it():
    """Gemma 2: every other layer slides (4096 tokens without the key), one rope for all,
    soft-capping at 50 and 30 unless the file says otherwise, no q/k norms; the 46-layer
    model (27B) scales by 1/sqrt(hidden / heads)."""
    keys = {"block_count": 5, "attention.key_length": 32, "rope.freq_base": 1e4}
    c = ModelConfig.from_gguf(_gguf_meta("gemma2", **keys))
    assert c.architecture == "gemma2" and c.sandwich_norms and not c.qk_norm
    assert not c.norm_plus_one and c.mlp_activation == "gelu_tanh"
    assert c.layer_windows == (4096, 0, 4096, 0, 4096)
    assert c.rope_local is None and c.layer_rope(0) == c.layer_rope(1) == c.rope
    assert (c.attention_softcap, c.final_softcap) == (50.0, 30.0)
    assert c.attention_scale == 32**-0.5
    own = {**keys, "attention.sliding_window": 8, "attn_logit_softcapping": 20.0,
           "final_logit_softcapping": 10.0}  # fmt: skip
    c = ModelConfig.from_gguf(_gguf_meta("gemma2", **own))
    assert c.layer_windows == (8, 0, 8, 0, 8)
    assert (c.attention_softcap, c.final_softcap) == (20.0, 10.0)
    big = ModelConfig.from_gguf(_gguf_meta("gemma2", **{**keys, "block_count": 46}))
    assert big.attention_scale == (big.hidden_size / big.num_heads) ** -0.5


def test_yarn_and_longrope_default_their_original_context_to_max_positions():
    ours, hf = both({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}, 64)
    check(ours, hf, 0)
    assert ours.rope.original_max_position_embeddings == 64 and ours.context_limit == 256


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "factor": 4.0, "beta_fast": 0.0},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1.0},
        {"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0},
    ],
)
def test_degenerate_yarn_settings_are_refused(rope):
    with pytest.raises(ModelLoadError, match="YaRN|attention_factor"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 64,
                             "intermediate_size": 96, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "rope_parameters": rope})  # fmt: skip


def _gemma(**extra) -> dict:
    return {"model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, **extra}  # fmt: skip


def test_gemma3_hub_layout_reads_as_transformers_reads_it():
    """Hub configs give sliding_window_pattern, rope_theta, rope_local_base_freq and
    rope_scaling instead of transformers 5's layer_types and per-type rope_parameters."""
    hub = _gemma(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                 rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=32)  # fmt: skip
    ours = ModelConfig.from_hf(copy.deepcopy(hub))
    saved = transformers.Gemma3TextConfig(**{k: v for k, v in hub.items() if k != "model_type"})
    theirs = ModelConfig.from_hf({**saved.to_dict(), "model_type": "gemma3_text"})
    fields = (
        "layer_windows",
        "rope",
        "rope_local",
        "attention_scale",
        "mlp_activation",
        "tie_word_embeddings",
        "embed_scale",
    )  # the rest are transformers' defaults
    assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields]
    assert [ours.window(i) for i in range(7)] == [32, 32, 0, 32, 32, 0, 32]
    assert ours.rope.rope_type == "linear" and ours.rope_local.theta == 1e4
    assert ours.tie_word_embeddings  # Gemma ties them unless told otherwise


def test_gemma3_round_trips_its_activation_and_refuses_bad_scalars():
    silu = ModelConfig.from_hf(_gemma(layer_types=["full_attention"] * 7, hidden_activation="silu",
                                      rope_parameters={"full_attention": {"rope_theta": 1e6},
                                                       "sliding_attention": {"rope_theta": 1e4}}))  # fmt: skip
    assert ModelConfig.from_hf(silu.to_hf()) == silu
    with pytest.raises(ModelLoadError, match="query_pre_attn_scalar"):
        ModelConfig.from_hf(_gemma(query_pre_attn_scalar=0))
